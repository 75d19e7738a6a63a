//! Choosing the I/O driver at start, and the storage the shards use.
//!
//! `auto` takes io_uring when the kernel allows it and otherwise the portable
//! driver, saying why in one log line; `io-uring` and `portable` force one.
//! The runtime of every shard is built to match: compio on io_uring, or compio
//! on its polling driver (epoll) with the portable file driver. Nothing here
//! panics because io_uring is missing or blocked.

pub mod direct;
pub mod home;
mod probe;
pub mod sendfile;
mod uring;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use compio::driver::{DriverType, ProactorBuilder};
use rill_core::storage::portable::{PortableFile, PortableStorage};
use rill_core::storage::{AlignedBuf, OpenMode, Storage, StorageFile};

pub use probe::io_uring_unavailable_reason;
pub use uring::{UringFile, UringStorage};

/// The `io_driver` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoDriverSetting {
    #[default]
    Auto,
    IoUring,
    Portable,
}

impl FromStr for IoDriverSetting {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(Self::Auto),
            "io-uring" | "io_uring" => Ok(Self::IoUring),
            "portable" => Ok(Self::Portable),
            other => Err(format!(
                "unknown I/O driver `{other}`: expected auto, io-uring or portable"
            )),
        }
    }
}

/// The driver in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    IoUring,
    Portable,
}

impl fmt::Display for IoDriver {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::IoUring => "io-uring",
            Self::Portable => "portable",
        })
    }
}

/// The chosen driver and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverSelection {
    pub driver: IoDriver,
    pub reason: String,
}

/// Picks the driver for a setting. Only a forced `io-uring` on a machine
/// without it is an error, with the kernel's reason.
pub fn select_driver(setting: IoDriverSetting) -> Result<DriverSelection, String> {
    match (setting, io_uring_unavailable_reason()) {
        (IoDriverSetting::Portable, _) => Ok(DriverSelection {
            driver: IoDriver::Portable,
            reason: "forced by io_driver = \"portable\"".into(),
        }),
        (IoDriverSetting::IoUring, Some(why)) => Err(format!(
            "io_driver = \"io-uring\" was requested but io_uring is unavailable: {why}; \
             use io_driver = \"auto\" to fall back to the portable driver"
        )),
        (IoDriverSetting::Auto, Some(why)) => Ok(DriverSelection {
            driver: IoDriver::Portable,
            reason: format!("io_uring unavailable, using the portable driver: {why}"),
        }),
        (_, None) => Ok(DriverSelection {
            driver: IoDriver::IoUring,
            reason: "io_uring available".into(),
        }),
    }
}

/// Builds a compio runtime for the selected driver. Should the ring still
/// fail to come up (a kernel lacking operations compio needs), the selection
/// is downgraded to the portable driver with the error as the reason.
pub fn build_runtime(selection: &mut DriverSelection) -> io::Result<compio::runtime::Runtime> {
    let build = |driver_type: DriverType| {
        let mut proactor = ProactorBuilder::new();
        proactor.driver_type(driver_type);
        compio::runtime::RuntimeBuilder::new()
            .with_proactor(proactor)
            .build()
    };
    if selection.driver == IoDriver::IoUring {
        match build(DriverType::IoUring) {
            Ok(runtime) => return Ok(runtime),
            Err(error) => {
                selection.driver = IoDriver::Portable;
                selection.reason =
                    format!("io_uring runtime failed to start, using the portable driver: {error}");
            }
        }
    }
    build(DriverType::Poll)
}

/// The storage of whichever driver was selected.
#[derive(Debug, Clone, Copy)]
pub enum NodeStorage {
    IoUring(UringStorage),
    Portable(PortableStorage),
}

impl NodeStorage {
    pub fn for_driver(driver: IoDriver) -> Self {
        match driver {
            IoDriver::IoUring => Self::IoUring(UringStorage),
            IoDriver::Portable => Self::Portable(PortableStorage),
        }
    }
}

/// A file of either driver.
#[derive(Debug, Clone)]
pub enum NodeFile {
    IoUring(UringFile),
    Portable(PortableFile),
}

macro_rules! dispatch_storage {
    ($self:expr, $storage:ident => $body:expr) => {
        match $self {
            NodeStorage::IoUring($storage) => $body,
            NodeStorage::Portable($storage) => $body,
        }
    };
}

macro_rules! dispatch_file {
    ($self:expr, $file:ident => $body:expr) => {
        match $self {
            NodeFile::IoUring($file) => $body,
            NodeFile::Portable($file) => $body,
        }
    };
}

impl Storage for NodeStorage {
    type File = NodeFile;

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<NodeFile> {
        match self {
            Self::IoUring(storage) => storage.open(path, mode).map(NodeFile::IoUring),
            Self::Portable(storage) => storage.open(path, mode).map(NodeFile::Portable),
        }
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        dispatch_storage!(self, storage => storage.remove_file(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        dispatch_storage!(self, storage => storage.rename(from, to))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        dispatch_storage!(self, storage => storage.create_dir_all(path))
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        dispatch_storage!(self, storage => storage.remove_dir_all(path))
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        dispatch_storage!(self, storage => storage.list_dir(path))
    }

    fn is_dir(&self, path: &Path) -> bool {
        dispatch_storage!(self, storage => storage.is_dir(path))
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        dispatch_storage!(self, storage => storage.sync_dir(path))
    }
}

impl StorageFile for NodeFile {
    async fn read_at(&self, buffer: Vec<u8>, position: u64) -> (io::Result<usize>, Vec<u8>) {
        dispatch_file!(self, file => file.read_at(buffer, position).await)
    }

    async fn write_at(&self, buffer: std::rc::Rc<AlignedBuf>, position: u64) -> io::Result<()> {
        dispatch_file!(self, file => file.write_at(buffer, position).await)
    }

    async fn sync_data(&self) -> io::Result<()> {
        dispatch_file!(self, file => file.sync_data().await)
    }

    async fn truncate(&self, length: u64) -> io::Result<()> {
        dispatch_file!(self, file => file.truncate(length).await)
    }

    async fn allocate(&self, length: u64) -> io::Result<()> {
        dispatch_file!(self, file => file.allocate(length).await)
    }

    async fn size_bytes(&self) -> io::Result<u64> {
        dispatch_file!(self, file => file.size_bytes().await)
    }

    fn direct(&self) -> bool {
        dispatch_file!(self, file => file.direct())
    }

    fn will_need(&self, position: u64, length: u64) {
        dispatch_file!(self, file => file.will_need(position, length))
    }

    fn raw_fd(&self) -> Option<i32> {
        dispatch_file!(self, file => file.raw_fd())
    }
}
