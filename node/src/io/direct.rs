//! Reading segment ranges with direct I/O.
//!
//! Segments of `direct_io` topics are written around the page cache, so a
//! reader of older data would make the kernel read them into the cache and
//! then copy every byte again into the reader's buffer: on the mirror's
//! thread that copy was half its time. Read with `O_DIRECT` instead: the
//! device writes straight into an aligned buffer the reader owns, and the
//! thread only waits.
//!
//! The descriptor a shard hands out is a duplicate of its buffered reader,
//! and `O_DIRECT` is a flag of the open file description, which duplicates
//! share. So the file is opened again through `/proc/self/fd`, which gives a
//! description of its own. Where that or `O_DIRECT` is refused (no `/proc`,
//! a filesystem without direct I/O), [`open`] says so and the caller reads
//! through the page cache as before: nothing is lost but the saving.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};

use compio::buf::{IntoInner, IoBuf};
use compio::io::AsyncReadAt;
use rill_core::storage::DIRECT_IO_ALIGNMENT_BYTES as ALIGN;

/// A segment file ended before the range a shard gave for it.
pub(crate) fn shorter_than_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "segment shorter than its range",
    )
}

/// `fd`'s file opened again for direct reads, or `None` where it cannot be.
pub fn open(fd: BorrowedFd<'_>) -> Option<compio::fs::File> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    // SAFETY: a plain open(2) of a NUL-terminated path.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECT | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return None;
    }
    // SAFETY: a descriptor just opened and owned by nobody else.
    Some(unsafe { compio::fs::File::from_raw_fd(raw) })
}

/// Reads `length` bytes at `position` of a file opened by [`open`] and
/// appends them to `out`. `scratch` is the aligned staging buffer; it comes
/// back for reuse either way.
pub async fn read_into(
    file: &compio::fs::File,
    position: u64,
    length: usize,
    out: &mut Vec<u8>,
    mut scratch: Vec<u8>,
) -> (io::Result<()>, Vec<u8>) {
    let align = ALIGN as u64;
    let head = (position % align) as usize;
    let start = position - head as u64;
    let wanted = head + length;
    let span = wanted.div_ceil(ALIGN) * ALIGN;
    scratch.clear();
    scratch.reserve(span + ALIGN);
    // The first byte the device writes must sit on an aligned address.
    let pad = scratch.as_ptr().align_offset(ALIGN);
    scratch.resize(pad, 0);
    let mut filled = 0;
    while filled < wanted {
        let from = pad + filled;
        let compio::BufResult(result, returned) = file
            .read_at(scratch.slice(from..pad + span), start + filled as u64)
            .await;
        scratch = returned.into_inner();
        match result {
            Ok(0) => return (Err(shorter_than_range()), scratch),
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return (Err(error), scratch),
        }
        // A short read that is not at the end leaves an unaligned
        // position; the next read would be refused. Only the end of the
        // file reads short, and then what was wanted is already there.
        if filled < wanted && filled % ALIGN != 0 {
            return (Err(shorter_than_range()), scratch);
        }
    }
    out.extend_from_slice(&scratch[pad + head..pad + wanted]);
    (Ok(()), scratch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn reads_unaligned_ranges_exactly_and_up_to_the_end() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("segment");
        let content: Vec<u8> = (0..3 * ALIGN + 123).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::File::create(&path)
            .and_then(|mut file| file.write_all(&content))
            .expect("write");
        let buffered = std::fs::File::open(&path).expect("open");
        let runtime = compio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let Some(file) = open(buffered.as_fd()) else {
                // This filesystem has no direct I/O: callers read buffered.
                return;
            };
            let mut scratch = Vec::new();
            let cases = [
                (0, 10),
                (5, ALIGN),
                (ALIGN as u64 - 1, 2),
                (ALIGN as u64, ALIGN),
                (100, content.len() - 100),
                (content.len() as u64 - 1, 1),
            ];
            for (position, length) in cases {
                let mut out = vec![9u8];
                let (result, returned) =
                    read_into(&file, position, length, &mut out, scratch).await;
                scratch = returned;
                result.expect("read");
                let start = position as usize;
                assert_eq!(out[0], 9, "appended, not overwritten");
                assert_eq!(
                    &out[1..],
                    &content[start..start + length],
                    "{position}+{length}"
                );
            }
            let (result, _) = read_into(
                &file,
                content.len() as u64 - 10,
                20,
                &mut Vec::new(),
                scratch,
            )
            .await;
            assert!(result.is_err(), "a range past the end is an error");
        });
    }
}
