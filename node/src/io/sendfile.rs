//! Sending segment ranges that are in the page cache with `sendfile(2)`,
//! called straight from the connection's shard thread.
//!
//! A fetch of cached data used to cost the shard two copies of every byte:
//! from the page cache into a buffer, then from the buffer into the socket.
//! `sendfile` gives the socket references to the cached pages instead, so
//! the sending side copies nothing. It runs on the shard thread itself, not
//! through io_uring: io_uring runs every splice on an io-wq worker, two
//! hand-offs per pipe-full, and that measured slower than the copies it
//! saves. Calling it from the shard thread is safe under two conditions,
//! both checked before each range:
//!
//! - every page of the range is in the page cache ([`range_cached`], from
//!   `cachestat(2)`, Linux 6.5), so the file side does not wait on the disk;
//! - the socket is non-blocking, so a full socket buffer returns `EAGAIN`
//!   and the task waits for room through the I/O driver
//!   ([`compio::runtime::fd::PollFd::write_ready`]) instead of blocking the
//!   shard.
//!
//! Where the kernel has no `cachestat` (older than 6.5, or refused by a
//! seccomp filter), [`range_cached`] answers `None` from then on and callers
//! serve the range as before; nothing is lost but the saving.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use compio::runtime::fd::PollFd;

/// `cachestat(2)`'s number: new system calls share one number on every
/// architecture, and the libc crate does not name this one on all of ours.
const SYS_CACHESTAT: libc::c_long = 451;

/// Set once the kernel has refused `cachestat`: no point asking again.
static CACHESTAT_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

#[repr(C)]
struct CachestatRange {
    offset: u64,
    length: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    cached: u64,
    dirty: u64,
    writeback: u64,
    evicted: u64,
    recently_evicted: u64,
}

/// Most bytes one `sendfile` call is asked for. The socket's buffer takes
/// less at a time anyway; the bound keeps one call's time on the shard short.
const CALL_BYTES_MAX: u64 = 1024 * 1024;

/// Whether every page of `length` bytes of `file` at `position` is in the
/// page cache. `None` when the kernel cannot say.
pub fn range_cached(file: BorrowedFd<'_>, position: u64, length: u64) -> Option<bool> {
    if length == 0 {
        return Some(true);
    }
    if CACHESTAT_UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let range = CachestatRange {
        offset: position,
        length,
    };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of
    // the layout the kernel defines; the descriptor is borrowed, open.
    let result = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd() as libc::c_uint,
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        if matches!(
            error.raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
        ) {
            CACHESTAT_UNAVAILABLE.store(true, Ordering::Relaxed);
        }
        return None;
    }
    let page = page_bytes();
    let pages = (position + length - 1) / page - position / page + 1;
    Some(stat.cached >= pages)
}

fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page)
        .ok()
        .filter(|&page| page > 0)
        .unwrap_or(4096)
}

/// Makes `socket` non-blocking and returns a poll handle on a duplicate of
/// it, for [`send_range`]; `None` where either fails. The flag is safe to
/// set under the runtime: the polling driver's sockets have it already, and
/// io_uring waits for a socket through poll whatever its flags, except for
/// a splice into it, which then ends in `EAGAIN` (the caller waits with
/// this handle and goes on).
pub fn poll_handle(socket: BorrowedFd<'_>) -> Option<PollFd<OwnedFd>> {
    // SAFETY: F_GETFL and F_SETFL on a borrowed, open descriptor.
    let flags = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return None;
    }
    if flags & libc::O_NONBLOCK == 0
        // SAFETY: as above.
        && unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return None;
    }
    PollFd::new(socket.try_clone_to_owned().ok()?).ok()
}

/// Sends `length` bytes of `file` from `position` to a non-blocking socket
/// with `sendfile`, waiting through `socket`'s poll handle whenever its
/// buffer is full. The range must be in the page cache ([`range_cached`]),
/// or the calls wait on the disk on this thread.
pub async fn send_range(
    socket: &PollFd<OwnedFd>,
    file: BorrowedFd<'_>,
    position: u64,
    length: u64,
) -> io::Result<()> {
    let end = position
        .checked_add(length)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range past 2^64"))?;
    let mut offset = libc::off64_t::try_from(position)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range past off_t"))?;
    loop {
        let at = offset as u64;
        if at >= end {
            return Ok(());
        }
        let count = (end - at).min(CALL_BYTES_MAX) as usize;
        // SAFETY: both descriptors are open for the call; `offset` is ours.
        let sent = until_room(socket, || unsafe {
            libc::sendfile64(
                socket.as_fd().as_raw_fd(),
                file.as_raw_fd(),
                &mut offset,
                count,
            )
        })
        .await?;
        if sent == 0 {
            return Err(super::direct::shorter_than_range());
        }
    }
}

/// Writes all of `bytes` to a non-blocking socket from this thread,
/// waiting for room through its poll handle; with `more`, marked as
/// followed by more data (`MSG_MORE`), so the kernel holds a small write
/// to go out with what follows. `MSG_NOSIGNAL`: a peer that hung up is an
/// error, never a signal.
pub async fn send_bytes(socket: &PollFd<OwnedFd>, mut bytes: &[u8], more: bool) -> io::Result<()> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    while !bytes.is_empty() {
        // SAFETY: `bytes` is live for the call; the descriptor is open.
        let sent = until_room(socket, || unsafe {
            libc::send(
                socket.as_fd().as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                flags,
            )
        })
        .await?;
        if sent == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[sent..];
    }
    Ok(())
}

/// Makes `call`, a write to the non-blocking `socket` (`sendfile`, `send`),
/// until it goes through: on `EAGAIN` it waits for room through the poll
/// handle, on `EINTR` it tries again. Returns the bytes written.
async fn until_room(
    socket: &PollFd<OwnedFd>,
    mut call: impl FnMut() -> isize,
) -> io::Result<usize> {
    loop {
        let written = call();
        if let Ok(written) = usize::try_from(written) {
            return Ok(written);
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::WouldBlock => socket.write_ready().await?,
            io::ErrorKind::Interrupted => {}
            _ => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_file_just_written_is_cached_and_an_empty_range_always_is() {
        let dir = std::env::temp_dir().join(format!("rill-cachestat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("segment");
        let mut file = std::fs::File::create(&path).expect("create");
        file.write_all(&vec![7u8; 64 * 1024]).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        assert_eq!(range_cached(file.as_fd(), 0, 0), Some(true));
        // Kernels without cachestat say they cannot tell; on ours (6.5 and
        // later in CI) freshly written pages are cached, and a range past
        // the end of the file has no pages at all.
        match range_cached(file.as_fd(), 100, 30_000) {
            Some(cached) => {
                assert!(cached, "pages just written are in the cache");
                assert_eq!(range_cached(file.as_fd(), 1 << 30, 4096), Some(false));
            }
            None => assert!(CACHESTAT_UNAVAILABLE.load(Ordering::Relaxed)),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn set_buffer(socket: BorrowedFd<'_>, option: libc::c_int) {
        let bytes: libc::c_int = 16 * 1024;
        // SAFETY: setsockopt with a live c_int of the size given.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(result, 0, "setsockopt");
    }

    #[compio::test]
    async fn send_range_moves_every_byte_through_a_full_socket_buffer() {
        let dir = std::env::temp_dir().join(format!("rill-sendfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("segment");
        let bytes: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("write");
        let file = std::fs::File::open(&path).expect("open");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        // Small socket buffers on both ends, drained a page at a time on
        // another thread: the sender fills them over and over, so it sends
        // in many partial calls and waits for room between them.
        set_buffer(listener.as_fd(), libc::SO_RCVBUF);
        let reader = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().expect("accept");
            let mut received = Vec::new();
            let mut chunk = vec![0u8; 4096];
            loop {
                let read = socket.read(&mut chunk).expect("read");
                if read == 0 {
                    return received;
                }
                received.extend_from_slice(&chunk[..read]);
            }
        });
        let stream = compio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        set_buffer(stream.as_fd(), libc::SO_SNDBUF);
        let poll = poll_handle(stream.as_fd()).expect("poll handle");
        let (position, length) = (12_345u64, 6 * 1024 * 1024u64);
        send_range(&poll, file.as_fd(), position, length)
            .await
            .expect("send");
        drop(poll);
        drop(stream);
        let received = reader.join().expect("reader");
        assert_eq!(received.len() as u64, length);
        assert!(received == bytes[position as usize..(position + length) as usize]);

        // A range that runs past the end of the file is an error, not a hang.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let stream = compio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let _accepted = listener.accept().expect("accept");
        let poll = poll_handle(stream.as_fd()).expect("poll handle");
        let error = send_range(&poll, file.as_fd(), bytes.len() as u64 - 10, 100)
            .await
            .expect_err("short file");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
