//! The portable driver: plain positional reads and writes on `std::fs`.
//!
//! This is what runs where io_uring is blocked or missing (Docker's default
//! seccomp profile, qemu-user, hardened kernels). Every call completes before its
//! future is first polled, so it works under any executor, including
//! [`super::block_on_ready`].

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::{AlignedBuf, OpenMode, Storage, StorageFile};

/// Files on the local filesystem through `std::fs`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortableStorage;

/// An open file; clones share the descriptor.
#[derive(Debug, Clone)]
pub struct PortableFile {
    file: Rc<fs::File>,
    direct: bool,
}

/// Opens a file, trying O_DIRECT first when asked and falling back to buffered
/// I/O when the filesystem refuses it (tmpfs and some SD-card setups answer EINVAL).
pub fn open_std(path: &Path, mode: OpenMode) -> io::Result<(fs::File, bool)> {
    let mut options = fs::OpenOptions::new();
    options
        .read(true)
        .write(mode.write)
        .create(mode.create && mode.write);
    if mode.direct {
        let mut direct_options = options.clone();
        direct_options.custom_flags(libc::O_DIRECT);
        match direct_options.open(path) {
            Ok(file) => return Ok((file, true)),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {}
            Err(error) => return Err(error),
        }
    }
    Ok((options.open(path)?, false))
}

/// Reserves disk blocks with fallocate, keeping the visible size. Filesystems that
/// cannot (EOPNOTSUPP) are fine: preallocation is an optimisation.
pub fn allocate_std(file: &fs::File, length: u64) -> io::Result<()> {
    let Ok(length) = libc::off_t::try_from(length) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "allocation too large",
        ));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, length) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(error),
    }
}

/// Asks the kernel to read a file range ahead (POSIX_FADV_WILLNEED). Best
/// effort: errors are ignored, the read that follows works either way.
pub fn advise_will_need(fd: i32, position: u64, length: u64) {
    let (Ok(offset), Ok(length)) = (
        libc::off_t::try_from(position),
        libc::off_t::try_from(length),
    ) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its integer arguments.
    unsafe { libc::posix_fadvise(fd, offset, length, libc::POSIX_FADV_WILLNEED) };
}

/// Syncs a directory so entries created, renamed or removed in it are durable.
pub fn sync_dir_std(path: &Path) -> io::Result<()> {
    fs::File::open(path)?.sync_all()
}

impl Storage for PortableStorage {
    type File = PortableFile;

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<PortableFile> {
        let (file, direct) = open_std(path, mode)?;
        Ok(PortableFile {
            file: Rc::new(file),
            direct,
        })
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(path)?
            .map(|entry| entry.map(|entry| PathBuf::from(entry.file_name())))
            .collect()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        sync_dir_std(path)
    }
}

impl StorageFile for PortableFile {
    async fn read_at(&self, mut buffer: Vec<u8>, position: u64) -> (io::Result<usize>, Vec<u8>) {
        let mut filled = 0;
        while filled < buffer.len() {
            match self
                .file
                .read_at(&mut buffer[filled..], position + filled as u64)
            {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return (Err(error), buffer),
            }
        }
        (Ok(filled), buffer)
    }

    async fn write_at(&self, buffer: Rc<AlignedBuf>, position: u64) -> io::Result<()> {
        self.file.write_all_at(buffer.as_slice(), position)
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    async fn truncate(&self, length: u64) -> io::Result<()> {
        self.file.set_len(length)
    }

    async fn allocate(&self, length: u64) -> io::Result<()> {
        allocate_std(&self.file, length)
    }

    async fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn direct(&self) -> bool {
        self.direct
    }

    fn will_need(&self, position: u64, length: u64) {
        advise_will_need(self.file.as_raw_fd(), position, length);
    }

    fn raw_fd(&self) -> Option<i32> {
        Some(self.file.as_raw_fd())
    }
}
