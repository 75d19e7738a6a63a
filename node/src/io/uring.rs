//! The io_uring driver: rill-core's storage traits on compio files.
//!
//! Files are opened with `std` (open is rare and compio's open goes through
//! the ring only to come back with the same descriptor), then handed to compio,
//! which submits reads, writes and syncs to the ring with owned buffers.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use compio::buf::{IntoInner, IoBuf};
use compio::io::{AsyncReadAt, AsyncWriteAtExt};
use rill_core::storage::portable::{PortableStorage, allocate_std, open_std};
use rill_core::storage::{AlignedBuf, OpenMode, Storage, StorageFile};

/// Files on the local filesystem through compio's proactor.
#[derive(Debug, Clone, Copy, Default)]
pub struct UringStorage;

/// An open file on the ring; clones share the descriptor.
#[derive(Debug, Clone)]
pub struct UringFile {
    file: compio::fs::File,
    direct: bool,
}

/// Lets the ring read an aligned buffer it holds a share of while the write
/// is in flight: the buffer lives until the ring is done with it.
struct WriteBuffer(Rc<AlignedBuf>);

impl IoBuf for WriteBuffer {
    fn as_init(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl Storage for UringStorage {
    type File = UringFile;

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<UringFile> {
        let (file, direct) = open_std(path, mode)?;
        // SAFETY: the descriptor comes from a file we own and give up here;
        // compio takes sole ownership of it.
        let file = unsafe { compio::fs::File::from_raw_fd(file.into_raw_fd()) };
        Ok(UringFile { file, direct })
    }

    // Directory operations are the same synchronous calls as the portable
    // driver's: the ring brings nothing to them.
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        PortableStorage.remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        PortableStorage.rename(from, to)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        PortableStorage.create_dir_all(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        PortableStorage.remove_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        PortableStorage.list_dir(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        PortableStorage.is_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        PortableStorage.sync_dir(path)
    }
}

impl StorageFile for UringFile {
    async fn read_at(&self, mut buffer: Vec<u8>, position: u64) -> (io::Result<usize>, Vec<u8>) {
        // Read straight into the caller's buffer: the ring fills the slice
        // from the current length, and compio advances the length by what it read.
        let wanted = buffer.len();
        buffer.clear();
        let mut outcome = Ok(());
        while buffer.len() < wanted {
            let filled = buffer.len();
            let slice = buffer.slice(filled..wanted);
            let compio::BufResult(result, slice) =
                self.file.read_at(slice, position + filled as u64).await;
            buffer = slice.into_inner();
            match result {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            }
        }
        let read = buffer.len();
        buffer.resize(wanted, 0);
        (outcome.map(|()| read), buffer)
    }

    fn will_need(&self, position: u64, length: u64) {
        rill_core::storage::portable::advise_will_need(self.file.as_raw_fd(), position, length);
    }

    async fn write_at(&self, buffer: Rc<AlignedBuf>, position: u64) -> io::Result<()> {
        (&self.file)
            .write_all_at(WriteBuffer(buffer), position)
            .await
            .0
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data().await
    }

    async fn truncate(&self, length: u64) -> io::Result<()> {
        self.file.set_len(length).await
    }

    async fn allocate(&self, length: u64) -> io::Result<()> {
        // compio has no fallocate op; KEEP_SIZE preallocation is a quick
        // metadata call, done inline on a borrowed descriptor.
        // SAFETY: the descriptor stays open while the borrowed File lives, and
        // ManuallyDrop keeps the borrowed File from closing it.
        let borrowed = std::mem::ManuallyDrop::new(unsafe {
            std::fs::File::from_raw_fd(self.file.as_raw_fd())
        });
        allocate_std(&borrowed, length)
    }

    async fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata().await?.len())
    }

    fn direct(&self) -> bool {
        self.direct
    }

    fn raw_fd(&self) -> Option<i32> {
        Some(self.file.as_raw_fd())
    }
}
