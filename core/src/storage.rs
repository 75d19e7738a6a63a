//! The one narrow door through which the log touches files.
//!
//! Everything `rill-core` stores goes through [`Storage`] and [`StorageFile`]. The
//! file operations are `async` with owned buffers so a completion-based driver
//! (io_uring on compio, in `rill-node`) can implement them without copies; the
//! implementations here, [`portable`] and [`memory`], complete at once. The traits
//! say nothing about threads: futures need not be `Send`, because each partition
//! lives on one shard.

pub mod aligned;
pub mod memory;
pub mod portable;

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

pub use aligned::AlignedBuf;

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMode {
    /// Create the file when it does not exist.
    pub create: bool,
    /// Open for writing (readers open read-only).
    pub write: bool,
    /// Ask for direct I/O (O_DIRECT). Implementations fall back to buffered I/O
    /// when the filesystem refuses it and say so through [`StorageFile::direct`].
    pub direct: bool,
}

impl OpenMode {
    pub const READ: Self = Self {
        create: false,
        write: false,
        direct: false,
    };
    pub const WRITE: Self = Self {
        create: true,
        write: true,
        direct: false,
    };
    pub const WRITE_DIRECT: Self = Self {
        create: true,
        write: true,
        direct: true,
    };
}

/// The alignment direct I/O needs for buffers, offsets and lengths.
pub const DIRECT_IO_ALIGNMENT_BYTES: usize = 4096;

/// Directory-level operations and the factory for files.
///
/// Metadata operations are synchronous: they are rare (segment roll, checkpoint)
/// and no driver Rill uses makes them cheaper asynchronously.
pub trait Storage: Clone + std::fmt::Debug {
    type File: StorageFile;

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Self::File>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (files and directories), unsorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>>;
    fn is_dir(&self, path: &Path) -> bool;
    /// Makes creations, renames and removals in a directory durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// One open file. Clones share the same open file.
#[allow(async_fn_in_trait)]
pub trait StorageFile: Clone + std::fmt::Debug + 'static {
    /// Reads up to `buffer.len()` bytes at `position`; returns how many were read
    /// (fewer only at the end of the file).
    async fn read_at(&self, buffer: Vec<u8>, position: u64) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buffer` at `position`. With direct I/O, `position` and the
    /// buffer length are multiples of [`DIRECT_IO_ALIGNMENT_BYTES`]. The buffer
    /// is shared, not lent: the caller may keep reading it while the write is
    /// in flight, and it stays alive until the write is done even if the
    /// future is dropped first.
    async fn write_at(&self, buffer: Rc<AlignedBuf>, position: u64) -> io::Result<()>;
    /// Makes written data durable (fdatasync).
    async fn sync_data(&self) -> io::Result<()>;
    async fn truncate(&self, length: u64) -> io::Result<()>;
    /// Reserves space up to `length` bytes without changing what reads return
    /// before the logical end the caller tracks. Best effort: filesystems without
    /// fallocate succeed doing nothing.
    async fn allocate(&self, length: u64) -> io::Result<()>;
    async fn size_bytes(&self) -> io::Result<u64>;
    /// Whether writes go around the page cache.
    fn direct(&self) -> bool;
    /// Hints that `length` bytes at `position` will be read soon, so the OS
    /// can start reading them ahead (sequential consumers). Best effort.
    fn will_need(&self, _position: u64, _length: u64) {}
    /// The OS file descriptor, where one exists, so a network layer can send file
    /// ranges with sendfile or splice instead of copying them.
    fn raw_fd(&self) -> Option<i32>;
}

/// Reads exactly `length` bytes at `position`, or fails with `UnexpectedEof`.
pub async fn read_exact_at<F: StorageFile>(
    file: &F,
    position: u64,
    length: usize,
) -> io::Result<Vec<u8>> {
    let (result, mut out) = file.read_at(vec![0u8; length], position).await;
    let mut filled = result?;
    // Drivers read until the end of the file, so a short read is the end.
    while filled < length {
        let (result, rest) = file
            .read_at(vec![0u8; length - filled], position + filled as u64)
            .await;
        let read = result?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file ends before {length} bytes at {position}"),
            ));
        }
        out[filled..filled + read].copy_from_slice(&rest[..read]);
        filled += read;
    }
    Ok(out)
}

/// Writes a small file atomically: write a temporary, sync it, rename it over the
/// target, sync the directory. Checkpoints and metadata use this.
pub async fn write_file_atomic<S: Storage>(
    storage: &S,
    path: &Path,
    contents: &[u8],
) -> io::Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    {
        let file = storage.open(&temporary, OpenMode::WRITE)?;
        file.truncate(0).await?;
        let mut buffer = AlignedBuf::with_capacity(contents.len(), 1);
        buffer.extend_from_slice(contents);
        file.write_at(Rc::new(buffer), 0).await?;
        file.sync_data().await?;
    }
    storage.rename(&temporary, path)?;
    storage.sync_dir(directory)
}

/// Reads a whole small file.
pub async fn read_file<S: Storage>(storage: &S, path: &Path) -> io::Result<Vec<u8>> {
    let file = storage.open(path, OpenMode::READ)?;
    let length = file.size_bytes().await?;
    let length = usize::try_from(length)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large to read whole"))?;
    read_exact_at(&file, 0, length).await
}

/// Drives a future that completes without waiting on any reactor, as every
/// operation of the portable and in-memory storages does (an in-memory write
/// may ask to be polled again, [`memory::MemoryStorage::set_write_delay_polls`]).
/// Tests, `verify` and tools use it; a future that would block is a
/// programmer error.
pub fn block_on_ready<T>(future: impl std::future::Future<Output = T>) -> T {
    use std::task::{Context, Poll, Waker};
    /// Far more polls than any delayed write asks for, far fewer than a hang.
    const POLLS_MAX: u64 = 1 << 24;
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    for _ in 0..POLLS_MAX {
        if let Poll::Ready(value) = future.as_mut().poll(&mut context) {
            return value;
        }
    }
    panic!("block_on_ready used with a future that waits on a reactor")
}
