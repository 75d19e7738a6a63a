//! An in-memory storage that injects faults, for tests and the crash simulator.
//!
//! Each file keeps two images: what reads see now, and what a power cut would
//! leave (the durable image). Writes and truncations since the last sync are kept
//! as a list; [`MemoryStorage::crash`] replays a seeded prefix of that list onto
//! the durable image, tearing the last write at any byte and optionally flipping
//! a bit in what it kept. Directory operations (create, rename, remove) are
//! modelled as durable at once, which is what `write_file_atomic` relies on after
//! its directory sync.
//!
//! Faults: a space limit that turns writes into ENOSPC (after writing what fits,
//! as a real disk may), and a countdown after which every operation fails with EIO.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::{AlignedBuf, OpenMode, Storage, StorageFile};

/// A small deterministic generator (SplitMix64), so a seed replays exactly.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "empty range");
        self.next_u64() % bound
    }

    pub fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }
}

/// What a simulated power cut does to data written since the last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Everything not synced is gone.
    LoseUnsynced,
    /// A random prefix of the unsynced operations survives; the last one may be
    /// torn at any byte.
    TornWrites,
    /// As `TornWrites`, then one bit flips inside the surviving unsynced bytes.
    TornWritesWithBitFlip,
}

#[derive(Debug, Clone)]
enum PendingOperation {
    Write { position: usize, bytes: Vec<u8> },
    Truncate { length: usize },
}

#[derive(Debug, Default)]
struct FileState {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<PendingOperation>,
}

fn apply(image: &mut Vec<u8>, operation: &PendingOperation) {
    match operation {
        PendingOperation::Write { position, bytes } => {
            let end = position + bytes.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*position..end].copy_from_slice(bytes);
        }
        PendingOperation::Truncate { length } => image.resize(*length, 0),
    }
}

#[derive(Debug, Default)]
struct FileSystem {
    files: BTreeMap<PathBuf, Rc<RefCell<FileState>>>,
    directories: BTreeSet<PathBuf>,
    space_bytes_max: Option<u64>,
    operations_until_failure: Option<u64>,
    operations_total: u64,
    /// Times a write answers "not yet" before it takes effect, so writes
    /// stay in flight the way a completion-based driver's do.
    write_delay_polls: u32,
}

impl FileSystem {
    fn used_bytes(&self) -> u64 {
        self.files
            .values()
            .map(|file| file.borrow().data.len() as u64)
            .sum()
    }

    /// Counts an operation against the EIO countdown.
    fn tick(&mut self) -> io::Result<()> {
        self.operations_total += 1;
        match self.operations_until_failure.as_mut() {
            Some(0) => Err(io::Error::other("injected EIO")),
            Some(left) => {
                *left -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// A fault-injecting in-memory filesystem. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    fs: Rc<RefCell<FileSystem>>,
}

/// An open in-memory file.
#[derive(Debug, Clone)]
pub struct MemoryFile {
    state: Rc<RefCell<FileState>>,
    fs: Rc<RefCell<FileSystem>>,
}

/// Answers "not yet" once (asking to be polled again), then "done".
async fn not_yet() {
    let mut answered = false;
    std::future::poll_fn(|context| {
        if answered {
            std::task::Poll::Ready(())
        } else {
            answered = true;
            context.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Limits the total size of all files; writes past it fail with ENOSPC.
    pub fn set_space_bytes_max(&self, space_bytes_max: Option<u64>) {
        self.fs.borrow_mut().space_bytes_max = space_bytes_max;
    }

    /// After `operations` more file operations, every operation fails with EIO.
    pub fn fail_after_operations(&self, operations: Option<u64>) {
        self.fs.borrow_mut().operations_until_failure = operations;
    }

    /// Makes every write stay in flight for `polls` polls before it takes
    /// effect (0, the default, completes writes at once).
    pub fn set_write_delay_polls(&self, polls: u32) {
        self.fs.borrow_mut().write_delay_polls = polls;
    }

    /// File operations performed so far (reads, writes, syncs, truncations).
    pub fn operations_total(&self) -> u64 {
        self.fs.borrow().operations_total
    }

    pub fn used_bytes(&self) -> u64 {
        self.fs.borrow().used_bytes()
    }

    /// Simulates a power cut: every file keeps its durable image plus what `mode`
    /// lets survive of its unsynced operations. Faults are cleared.
    pub fn crash(&self, seed: u64, mode: CrashMode) {
        let mut rng = SimRng::new(seed);
        let mut fs = self.fs.borrow_mut();
        fs.operations_until_failure = None;
        for state in fs.files.values() {
            let mut state = state.borrow_mut();
            let mut image = std::mem::take(&mut state.durable);
            let pending = std::mem::take(&mut state.pending);
            if mode != CrashMode::LoseUnsynced && !pending.is_empty() {
                let kept = rng.below(pending.len() as u64 + 1) as usize;
                let mut flip_candidates = Vec::new();
                for (index, operation) in pending.iter().take(kept).enumerate() {
                    let torn = index + 1 == kept && rng.chance(1, 2);
                    match operation {
                        PendingOperation::Write { position, bytes } if torn => {
                            let length = rng.below(bytes.len() as u64 + 1) as usize;
                            let partial = PendingOperation::Write {
                                position: *position,
                                bytes: bytes[..length].to_vec(),
                            };
                            apply(&mut image, &partial);
                            flip_candidates.push((*position, length));
                        }
                        PendingOperation::Write { position, bytes } => {
                            apply(&mut image, operation);
                            flip_candidates.push((*position, bytes.len()));
                        }
                        PendingOperation::Truncate { .. } => apply(&mut image, operation),
                    }
                }
                if mode == CrashMode::TornWritesWithBitFlip {
                    flip_candidates.retain(|&(position, length)| {
                        length > 0 && position + length <= image.len()
                    });
                    if !flip_candidates.is_empty() {
                        let pick = rng.below(flip_candidates.len() as u64) as usize;
                        let (position, length) = flip_candidates[pick];
                        let at = position + rng.below(length as u64) as usize;
                        image[at] ^= 1 << rng.below(8);
                    }
                }
            }
            state.data = image.clone();
            state.durable = image;
        }
    }

    /// Flips one bit of a file's durable and current image: media corruption.
    pub fn flip_bit(&self, path: &Path, byte: usize, bit: u8) -> io::Result<()> {
        let fs = self.fs.borrow();
        let file = fs.files.get(path).ok_or_else(|| not_found(path))?;
        let mut state = file.borrow_mut();
        if byte >= state.data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "flip past the end",
            ));
        }
        state.data[byte] ^= 1 << (bit % 8);
        if byte < state.durable.len() {
            state.durable[byte] ^= 1 << (bit % 8);
        }
        Ok(())
    }

    /// Paths of all files, sorted.
    pub fn file_paths(&self) -> Vec<PathBuf> {
        self.fs.borrow().files.keys().cloned().collect()
    }

    pub fn file_len(&self, path: &Path) -> Option<usize> {
        self.fs
            .borrow()
            .files
            .get(path)
            .map(|file| file.borrow().data.len())
    }
}

impl Storage for MemoryStorage {
    type File = MemoryFile;

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<MemoryFile> {
        let mut fs = self.fs.borrow_mut();
        fs.tick()?;
        let state = match fs.files.get(path) {
            Some(state) => state.clone(),
            None if mode.create && mode.write => {
                let state = Rc::new(RefCell::new(FileState::default()));
                fs.files.insert(path.to_path_buf(), state.clone());
                state
            }
            None => return Err(not_found(path)),
        };
        Ok(MemoryFile {
            state,
            fs: self.fs.clone(),
        })
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        fs.tick()?;
        fs.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        fs.tick()?;
        let state = fs.files.remove(from).ok_or_else(|| not_found(from))?;
        fs.files.insert(to.to_path_buf(), state);
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        for ancestor in path.ancestors() {
            if !ancestor.as_os_str().is_empty() {
                fs.directories.insert(ancestor.to_path_buf());
            }
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        fs.tick()?;
        fs.files.retain(|file, _| !file.starts_with(path));
        fs.directories
            .retain(|directory| !directory.starts_with(path));
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        let fs = self.fs.borrow();
        if !fs.directories.contains(path) {
            return Err(not_found(path));
        }
        let files = fs.files.keys().map(PathBuf::as_path);
        let directories = fs.directories.iter().map(PathBuf::as_path);
        Ok(files
            .chain(directories)
            .filter(|entry| entry.parent() == Some(path))
            .filter_map(|entry| entry.file_name().map(PathBuf::from))
            .collect())
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.fs.borrow().directories.contains(path)
    }

    fn sync_dir(&self, _path: &Path) -> io::Result<()> {
        self.fs.borrow_mut().tick()
    }
}

impl StorageFile for MemoryFile {
    async fn read_at(&self, mut buffer: Vec<u8>, position: u64) -> (io::Result<usize>, Vec<u8>) {
        if let Err(error) = self.fs.borrow_mut().tick() {
            return (Err(error), buffer);
        }
        let state = self.state.borrow();
        let start = (position as usize).min(state.data.len());
        let read = buffer.len().min(state.data.len() - start);
        buffer[..read].copy_from_slice(&state.data[start..start + read]);
        (Ok(read), buffer)
    }

    async fn write_at(&self, buffer: Rc<AlignedBuf>, position: u64) -> io::Result<()> {
        let delay = self.fs.borrow().write_delay_polls;
        for _ in 0..delay {
            not_yet().await;
        }
        let mut fs = self.fs.borrow_mut();
        fs.tick()?;
        let position = position as usize;
        let bytes = buffer.as_slice();
        let mut state = self.state.borrow_mut();
        let growth = (position + bytes.len()).saturating_sub(state.data.len()) as u64;
        drop(state);
        let mut writable = bytes.len();
        let mut result = Ok(());
        if let Some(space_bytes_max) = fs.space_bytes_max {
            let used = fs.used_bytes();
            if used + growth > space_bytes_max {
                let room = space_bytes_max.saturating_sub(used) as usize;
                let current_length = self.state.borrow().data.len();
                writable = (current_length + room)
                    .saturating_sub(position)
                    .min(bytes.len());
                result = Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        state = self.state.borrow_mut();
        if writable > 0 {
            let operation = PendingOperation::Write {
                position,
                bytes: bytes[..writable].to_vec(),
            };
            apply(&mut state.data, &operation);
            state.pending.push(operation);
        }
        result
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.fs.borrow_mut().tick()?;
        let mut state = self.state.borrow_mut();
        state.durable = state.data.clone();
        state.pending.clear();
        Ok(())
    }

    async fn truncate(&self, length: u64) -> io::Result<()> {
        self.fs.borrow_mut().tick()?;
        let mut state = self.state.borrow_mut();
        let operation = PendingOperation::Truncate {
            length: length as usize,
        };
        apply(&mut state.data, &operation);
        state.pending.push(operation);
        Ok(())
    }

    async fn allocate(&self, _length: u64) -> io::Result<()> {
        self.fs.borrow_mut().tick()
    }

    async fn size_bytes(&self) -> io::Result<u64> {
        self.fs.borrow_mut().tick()?;
        Ok(self.state.borrow().data.len() as u64)
    }

    fn direct(&self) -> bool {
        false
    }

    fn raw_fd(&self) -> Option<i32> {
        None
    }
}
