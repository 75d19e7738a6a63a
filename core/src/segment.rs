//! One segment: a `.log` file of record batches named by its base offset, with
//! its sparse offset and time indexes.
//!
//! The active segment has a writer with a write-behind buffer: appends collect
//! in memory and reach the file in large block-aligned writes (direct I/O
//! where the filesystem allows it). A flush writes the partial last block
//! zero-padded, so bytes on disk past the logical end are zero padding, which
//! recovery recognises as a clean end.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;

use crate::batch::{self, BATCH_HEADER_BYTES, BatchHeader};
use crate::index::{
    self, OFFSET_ENTRY_BYTES, OffsetEntry, TIME_ENTRY_BYTES, TimeEntry, floor_offset,
};
use crate::storage::{
    AlignedBuf, DIRECT_IO_ALIGNMENT_BYTES, OpenMode, Storage, StorageFile, read_exact_at,
};

/// Largest batch recovery and reads will believe a length field for. Anything
/// larger is treated as corruption rather than allocated.
pub const SCAN_BATCH_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Bytes read at once while scanning a segment.
const SCAN_CHUNK_BYTES: usize = 1024 * 1024;

pub fn log_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.log")
}
pub fn offset_index_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.index")
}
pub fn time_index_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.timeindex")
}

/// Parses `00000000000000000042.log` into 42.
pub fn parse_log_file_name(name: &str) -> Option<i64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|byte| byte.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Why a scan stopped before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// Reached the end of the data.
    End,
    /// Only zero bytes follow: padding or preallocation past the logical end.
    ZeroTail,
    /// A batch at `position` failed a check.
    Bad { position: u64, reason: String },
}

/// One batch seen by a scan.
#[derive(Debug, Clone, Copy)]
pub struct ScannedBatch {
    pub position: u64,
    pub header: BatchHeader,
    pub total_bytes: u32,
}

/// Reads and fully checks batches from `position` to `end`: length, magic,
/// CRC-32C, record framing and offset continuity (when `expected_next` is given).
/// Calls `visit` for every good batch and returns where good data ends.
pub async fn scan_batches<F: StorageFile>(
    file: &F,
    mut position: u64,
    end: u64,
    mut expected_next: Option<i64>,
    mut visit: impl FnMut(&ScannedBatch),
) -> io::Result<(u64, ScanStop)> {
    let mut chunk: Vec<u8> = Vec::new();
    let mut chunk_start = position;
    loop {
        if position >= end {
            return Ok((position, ScanStop::End));
        }
        let remaining = end - position;
        let in_chunk = (position - chunk_start) as usize;
        if chunk.len() < in_chunk + BATCH_HEADER_BYTES.min(remaining as usize) {
            let length = (remaining as usize).min(SCAN_CHUNK_BYTES);
            chunk = read_exact_at(file, position, length).await?;
            chunk_start = position;
            continue;
        }
        let available = &chunk[in_chunk..];
        if available.len() < BATCH_HEADER_BYTES {
            let stop = if available.iter().all(|&byte| byte == 0) {
                ScanStop::ZeroTail
            } else {
                ScanStop::Bad {
                    position,
                    reason: format!(
                        "{} trailing bytes are too few for a batch header",
                        available.len()
                    ),
                }
            };
            return Ok((position, stop));
        }
        let header = BatchHeader::parse(available).map_err(io::Error::other)?;
        let total = match header.total_bytes() {
            Some(total) if total <= SCAN_BATCH_BYTES_MAX => total,
            _ => {
                let stop = if available[..BATCH_HEADER_BYTES]
                    .iter()
                    .all(|&byte| byte == 0)
                {
                    ScanStop::ZeroTail
                } else {
                    ScanStop::Bad {
                        position,
                        reason: format!("implausible batch_length {}", header.batch_length),
                    }
                };
                return Ok((position, stop));
            }
        };
        if total as u64 > remaining {
            let reason = format!(
                "batch of {total} bytes runs past the end of the data ({remaining} bytes left): torn write"
            );
            return Ok((position, ScanStop::Bad { position, reason }));
        }
        if available.len() < total {
            chunk = read_exact_at(
                file,
                position,
                total.max((remaining as usize).min(SCAN_CHUNK_BYTES)),
            )
            .await?;
            chunk_start = position;
            continue;
        }
        let bytes = &available[..total];
        if let Err(error) = batch::check_batch(bytes) {
            return Ok((
                position,
                ScanStop::Bad {
                    position,
                    reason: error.to_string(),
                },
            ));
        }
        if let Some(expected) = expected_next
            && header.base_offset != expected
        {
            let reason = format!(
                "offset discontinuity: batch starts at offset {}, expected {expected}",
                header.base_offset
            );
            return Ok((position, ScanStop::Bad { position, reason }));
        }
        visit(&ScannedBatch {
            position,
            header,
            total_bytes: total as u32,
        });
        expected_next = Some(header.last_offset() + 1);
        position += total as u64;
    }
}

/// Writes batches at the end of the active segment, behind an in-memory buffer.
///
/// The buffer holds every byte from `buffer_start` (a block boundary) to the
/// logical end. Appends land in it; once it holds `write_buffer_bytes`, its
/// whole blocks go to the file in one large write, which keeps direct I/O at
/// the disk's sequential speed. That write is left in flight while appends
/// fill a second buffer (the partial last block moves over with them), so
/// copying batches in and writing them out overlap; the next full buffer
/// waits for it first. A flush (before a sync, at seal and close) waits for
/// the write in flight, then writes the partial last block too, zero-padded;
/// the next write rewrites that block with more data. Bytes from
/// [`Self::memory_start`] on, in flight or buffered, are served to readers
/// from memory, so nothing appended is ever invisible. A write that fails
/// puts its bytes back in front of the buffer, to be written again.
#[derive(Debug)]
struct SegmentWriter<F> {
    file: F,
    buffer: AlignedBuf,
    buffer_start: u64,
    block_bytes: u64,
    write_buffer_bytes: usize,
    flight: Option<Flight>,
    /// The allocation of the last write that landed, for the next buffer.
    spare: Option<AlignedBuf>,
}

/// A write of whole blocks on its way to the file: `bytes` go at `start`,
/// and readers are served them from here until it lands.
struct Flight {
    start: u64,
    bytes: Rc<AlignedBuf>,
    done: Pin<Box<dyn Future<Output = io::Result<()>>>>,
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Flight")
            .field("start", &self.start)
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// Takes back a buffer shared with a write that has finished.
fn unshared(buffer: Rc<AlignedBuf>) -> AlignedBuf {
    Rc::try_unwrap(buffer).unwrap_or_else(|shared| {
        // Only if a driver kept its share past completion: copy instead.
        let mut copy = AlignedBuf::with_capacity(shared.capacity(), shared.alignment());
        copy.extend_from_slice(shared.as_slice());
        copy
    })
}

impl<F: StorageFile> SegmentWriter<F> {
    fn new(file: F, buffer_start: u64, partial_block: &[u8], write_buffer_bytes: usize) -> Self {
        let block_bytes = if file.direct() {
            DIRECT_IO_ALIGNMENT_BYTES
        } else {
            1
        };
        let mut buffer = AlignedBuf::with_capacity(
            Self::capacity_for(write_buffer_bytes, block_bytes),
            block_bytes,
        );
        buffer.extend_from_slice(partial_block);
        Self {
            file,
            buffer,
            buffer_start,
            block_bytes: block_bytes as u64,
            write_buffer_bytes,
            flight: None,
            spare: None,
        }
    }

    fn capacity_for(write_buffer_bytes: usize, block_bytes: usize) -> usize {
        write_buffer_bytes.max(64 * 1024) + 2 * block_bytes
    }

    /// Where the bytes served from memory start: the write in flight's, else
    /// the buffer's.
    fn memory_start(&self) -> u64 {
        self.flight
            .as_ref()
            .map_or(self.buffer_start, |flight| flight.start)
    }

    /// The bytes in memory with where each part starts: the write in
    /// flight, then the buffer.
    fn memory(&self) -> [(u64, &[u8]); 2] {
        let flight = self
            .flight
            .as_ref()
            .map_or((self.buffer_start, &[][..]), |flight| {
                (flight.start, flight.bytes.as_slice())
            });
        [flight, (self.buffer_start, self.buffer.as_slice())]
    }

    /// Adds a batch at the end; starts writing whole blocks once the buffer
    /// is full. On error the batch is taken out again, and every byte before
    /// it stays buffered (a failed write's bytes come back to the buffer).
    async fn append(&mut self, bytes: &[u8], stamp: impl FnOnce(&mut [u8])) -> io::Result<()> {
        let end_before = self.buffer_start + self.buffer.len() as u64;
        let before = self.buffer.len();
        self.buffer.extend_from_slice(bytes);
        stamp(&mut self.buffer.as_mut_slice()[before..]);
        if self.buffer.len() >= self.write_buffer_bytes.max(1)
            && let Err(error) = self.start_write().await
        {
            let keep = (end_before - self.buffer_start) as usize;
            self.buffer.set_len(keep);
            return Err(error);
        }
        Ok(())
    }

    /// Bytes of the buffer in whole blocks: what a write can leave behind.
    fn whole_blocks(&self) -> usize {
        let length = self.buffer.len();
        length - length % self.block_bytes as usize
    }

    /// Waits for the write in flight, if there is one.
    async fn land(&mut self) -> io::Result<()> {
        let Some(flight) = self.flight.as_mut() else {
            return Ok(());
        };
        let result = flight.done.as_mut().await;
        self.settle(result)
    }

    /// Ends the write in flight with `result`. On failure its bytes go back
    /// in front of the buffer.
    fn settle(&mut self, result: io::Result<()>) -> io::Result<()> {
        let Some(Flight { start, bytes, done }) = self.flight.take() else {
            return result;
        };
        drop(done);
        let mut bytes = unshared(bytes);
        match result {
            Ok(()) => {
                bytes.clear();
                self.spare = Some(bytes);
                Ok(())
            }
            Err(error) => {
                bytes.extend_from_slice(self.buffer.as_slice());
                let mut later = std::mem::replace(&mut self.buffer, bytes);
                later.clear();
                self.spare = Some(later);
                self.buffer_start = start;
                Err(error)
            }
        }
    }

    /// Starts writing the buffer's whole blocks, once the write before has
    /// landed, and goes on with the partial last block in a fresh buffer.
    async fn start_write(&mut self) -> io::Result<()> {
        self.land().await?;
        let whole = self.whole_blocks();
        if whole == 0 {
            return Ok(());
        }
        let block_bytes = self.block_bytes as usize;
        let capacity = Self::capacity_for(self.write_buffer_bytes, block_bytes);
        let mut next = self
            .spare
            .take()
            .unwrap_or_else(|| AlignedBuf::with_capacity(capacity, block_bytes));
        next.extend_from_slice(&self.buffer.as_slice()[whole..]);
        let mut full = std::mem::replace(&mut self.buffer, next);
        full.set_len(whole);
        let bytes = Rc::new(full);
        let start = self.buffer_start;
        let (file, shared) = (self.file.clone(), bytes.clone());
        let mut done: Pin<Box<dyn Future<Output = io::Result<()>>>> =
            Box::pin(async move { file.write_at(shared, start).await });
        // One poll hands the write to the driver; a driver that writes at
        // once is done here.
        let finished = std::future::poll_fn(|context| {
            std::task::Poll::Ready(match done.as_mut().poll(context) {
                std::task::Poll::Ready(result) => Some(result),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        self.buffer_start += whole as u64;
        self.flight = Some(Flight { start, bytes, done });
        match finished {
            Some(result) => self.settle(result),
            None => Ok(()),
        }
    }

    /// Writes everything buffered, the partial last block too (zero-padded),
    /// after the write in flight, and waits for it. Keeps the partial block
    /// buffered; the next write rewrites it.
    async fn write_out(&mut self) -> io::Result<()> {
        self.land().await?;
        let logical = self.buffer.len();
        if logical == 0 {
            return Ok(());
        }
        let whole = self.whole_blocks();
        let placeholder = self
            .spare
            .take()
            .unwrap_or_else(|| AlignedBuf::with_capacity(0, self.block_bytes as usize));
        let mut buffer = std::mem::replace(&mut self.buffer, placeholder);
        buffer.pad_to_alignment();
        let shared = Rc::new(buffer);
        let result = self.file.write_at(shared.clone(), self.buffer_start).await;
        let mut buffer = unshared(shared);
        // The allocation still holds every logical byte: restore the length.
        buffer.set_len(logical);
        if result.is_ok() {
            buffer.keep_range(whole, logical - whole);
            self.buffer_start += whole as u64;
        }
        let mut placeholder = std::mem::replace(&mut self.buffer, buffer);
        placeholder.clear();
        self.spare = Some(placeholder);
        result
    }
}

/// Why sealing failed, and so what the log must do about it.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Writing the buffered tail failed; the segment is still active and
    /// the seal can be tried again.
    #[error("writing the segment's last bytes failed: {0}")]
    Write(io::Error),
    /// The fsync failed: what is on disk is unknown until recovery.
    #[error("syncing the segment failed: {0}")]
    Sync(io::Error),
    /// The segment is sealed and durable; its index files are behind
    /// (rebuilt from the log when needed).
    #[error("writing the segment's indexes failed: {0}")]
    Indexes(io::Error),
}

impl SealError {
    pub fn into_io(self) -> io::Error {
        match self {
            Self::Write(error) | Self::Sync(error) | Self::Indexes(error) => error,
        }
    }
}

/// Settings a segment needs from its topic.
#[derive(Debug, Clone, Copy)]
pub struct SegmentSettings {
    pub index_interval_bytes: u64,
    pub write_buffer_bytes: usize,
    pub direct_io: bool,
    pub preallocate_bytes: u64,
}

/// One segment and its indexes.
#[derive(Debug)]
pub struct Segment<F> {
    pub base_offset: i64,
    /// One past the last offset stored.
    pub next_offset: i64,
    /// Logical size: the end of the last good batch.
    pub size_bytes: u64,
    /// Largest batch timestamp stored; `i64::MIN` while empty.
    pub max_timestamp: i64,
    /// When the first batch was appended (for rolling by age).
    pub first_append_ms: Option<i64>,
    reader: F,
    writer: Option<SegmentWriter<F>>,
    offset_index: Vec<OffsetEntry>,
    time_index: Vec<TimeEntry>,
    offset_index_flushed: usize,
    time_index_flushed: usize,
    last_batch_relative_offset: u32,
    bytes_since_index_entry: u64,
    index_interval_bytes: u64,
    directory: PathBuf,
}

impl<F: StorageFile> Segment<F> {
    pub fn log_path(&self) -> PathBuf {
        self.directory.join(log_file_name(self.base_offset))
    }

    fn offset_index_path(&self) -> PathBuf {
        self.directory
            .join(offset_index_file_name(self.base_offset))
    }

    fn time_index_path(&self) -> PathBuf {
        self.directory.join(time_index_file_name(self.base_offset))
    }

    pub fn reader(&self) -> &F {
        &self.reader
    }

    pub fn is_active(&self) -> bool {
        self.writer.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.next_offset == self.base_offset
    }

    /// The file handle a sync of this segment must use.
    pub fn writer_file(&self) -> Option<&F> {
        self.writer.as_ref().map(|writer| &writer.file)
    }

    /// Writes everything buffered (including the partial last block) to the
    /// file, so a sync that follows covers every byte appended so far.
    pub async fn flush(&mut self) -> io::Result<()> {
        match self.writer.as_mut() {
            Some(writer) => writer.write_out().await,
            None => Ok(()),
        }
    }

    /// Where the in-memory part of the active segment starts: bytes from here
    /// to the end are read from the writer's buffer, the rest from the file.
    fn memory_start(&self) -> u64 {
        self.writer
            .as_ref()
            .map_or(self.size_bytes, SegmentWriter::memory_start)
    }

    /// The bytes of `position..position + length` that live in the writer's
    /// memory (from `memory_start` on), in order: the part in the write in
    /// flight, then the part in the buffer. Either may be empty.
    pub fn memory_bytes(&self, position: u64, length: u64) -> [&[u8]; 2] {
        let mut parts: [&[u8]; 2] = [&[], &[]];
        let Some(writer) = self.writer.as_ref() else {
            return parts;
        };
        let end = (position + length).min(self.size_bytes);
        for (part, (start, bytes)) in parts.iter_mut().zip(writer.memory()) {
            let from = position.max(start);
            let to = end.min(start + bytes.len() as u64);
            if from < to {
                *part = &bytes[(from - start) as usize..(to - start) as usize];
            }
        }
        parts
    }

    /// The part of `position..position + length` that is in the file.
    pub fn file_part(&self, position: u64, length: u64) -> (u64, u64) {
        let end = (position + length).min(self.memory_start());
        (position, end.saturating_sub(position))
    }

    /// Reads bytes of the segment wherever they are: file, buffer, or both.
    pub async fn read_bytes(&self, position: u64, length: usize) -> io::Result<Vec<u8>> {
        let (file_position, file_length) = self.file_part(position, length as u64);
        let mut bytes = if file_length > 0 {
            read_exact_at(&self.reader, file_position, file_length as usize).await?
        } else {
            Vec::with_capacity(length)
        };
        for part in self.memory_bytes(position, length as u64) {
            bytes.extend_from_slice(part);
        }
        if bytes.len() != length {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("segment ends before {length} bytes at {position}"),
            ));
        }
        Ok(bytes)
    }

    /// Creates a new, empty active segment, replacing any leftover files.
    pub async fn create<S: Storage<File = F>>(
        storage: &S,
        directory: &Path,
        base_offset: i64,
        settings: SegmentSettings,
    ) -> io::Result<Self> {
        let mode = if settings.direct_io {
            OpenMode::WRITE_DIRECT
        } else {
            OpenMode::WRITE
        };
        let log_path = directory.join(log_file_name(base_offset));
        let file = storage.open(&log_path, mode)?;
        file.truncate(0).await?;
        if settings.preallocate_bytes > 0 {
            file.allocate(settings.preallocate_bytes).await?;
        }
        let reader = storage.open(&log_path, OpenMode::READ)?;
        let mut segment = Self::empty(
            directory,
            base_offset,
            reader,
            settings.index_interval_bytes,
        );
        segment.writer = Some(SegmentWriter::new(
            file,
            0,
            &[],
            settings.write_buffer_bytes,
        ));
        segment.truncate_index_files(storage).await?;
        Ok(segment)
    }

    fn empty(directory: &Path, base_offset: i64, reader: F, index_interval_bytes: u64) -> Self {
        Self {
            base_offset,
            next_offset: base_offset,
            size_bytes: 0,
            max_timestamp: i64::MIN,
            first_append_ms: None,
            reader,
            writer: None,
            offset_index: Vec::new(),
            time_index: Vec::new(),
            offset_index_flushed: 0,
            time_index_flushed: 0,
            last_batch_relative_offset: 0,
            bytes_since_index_entry: 0,
            index_interval_bytes: index_interval_bytes.max(1),
            directory: directory.to_path_buf(),
        }
    }

    async fn truncate_index_files<S: Storage<File = F>>(&mut self, storage: &S) -> io::Result<()> {
        for path in [self.offset_index_path(), self.time_index_path()] {
            let file = storage.open(&path, OpenMode::WRITE)?;
            file.truncate(0).await?;
            // Durable before any new entry, so no stale entry outlives a restart.
            file.sync_data().await?;
        }
        self.offset_index_flushed = 0;
        self.time_index_flushed = 0;
        Ok(())
    }

    /// Opens an existing segment and loads its indexes. Returns the segment (not
    /// yet sized: see [`Self::adopt_trusted`] and [`Self::recover_from`]) and the
    /// length of its log file.
    pub async fn open_existing<S: Storage<File = F>>(
        storage: &S,
        directory: &Path,
        base_offset: i64,
        index_interval_bytes: u64,
    ) -> io::Result<(Self, u64)> {
        let log_path = directory.join(log_file_name(base_offset));
        let reader = storage.open(&log_path, OpenMode::READ)?;
        let file_bytes = reader.size_bytes().await?;
        let mut segment = Self::empty(directory, base_offset, reader, index_interval_bytes);
        let offset_bytes = read_optional(storage, &segment.offset_index_path()).await;
        let time_bytes = read_optional(storage, &segment.time_index_path()).await;
        segment.offset_index = index::decode_offset_index(&offset_bytes, file_bytes).0;
        segment.time_index = index::decode_time_index(&time_bytes).0;
        Ok((segment, file_bytes))
    }

    /// Takes a sealed segment before the recovery point as it is, sized from
    /// its file and indexes, without reading the log. Returns `false` when the
    /// indexes cannot vouch for it (missing, damaged or without the seal entry);
    /// the caller then rebuilds them with [`Self::recover_from`].
    pub fn adopt_trusted(&mut self, file_bytes: u64, next_offset: i64) -> bool {
        let Some(last_time) = self.time_index.last() else {
            return false;
        };
        let Some(first_offset) = self.offset_index.first() else {
            return false;
        };
        let last_relative = next_offset - 1 - self.base_offset;
        if first_offset.position != 0
            || next_offset <= self.base_offset
            || last_relative > i64::from(u32::MAX)
        {
            return false;
        }
        // The seal entry names the last batch; an index cut short does not.
        let last_entry_offset = self
            .offset_index
            .last()
            .map_or(0, |entry| entry.relative_offset);
        if i64::from(last_time.relative_offset) < i64::from(last_entry_offset) {
            return false;
        }
        self.size_bytes = file_bytes;
        self.next_offset = next_offset;
        self.max_timestamp = last_time.timestamp;
        self.offset_index_flushed = self.offset_index.len();
        self.time_index_flushed = self.time_index.len();
        true
    }

    /// Trusts the log before `trusted_bytes` (a batch boundary known durable),
    /// keeps index entries inside it, then checks every batch from the last
    /// such entry to `file_bytes`, rebuilding index entries and the max
    /// timestamp. Returns why the check stopped; `size_bytes` and `next_offset`
    /// then describe the good data.
    pub async fn recover_from(
        &mut self,
        trusted_bytes: u64,
        file_bytes: u64,
    ) -> io::Result<ScanStop> {
        self.offset_index
            .retain(|entry| u64::from(entry.position) < trusted_bytes);
        let (start_position, start_relative) = self.offset_index.pop().map_or((0, 0), |entry| {
            (u64::from(entry.position), entry.relative_offset)
        });
        self.time_index
            .retain(|entry| entry.relative_offset < start_relative);
        self.max_timestamp = self
            .time_index
            .last()
            .map_or(i64::MIN, |entry| entry.timestamp);
        self.size_bytes = start_position;
        self.next_offset = self.base_offset + i64::from(start_relative);
        self.bytes_since_index_entry = self.index_interval_bytes;
        let mut scanned = Vec::new();
        let (_, stop) = scan_batches(
            &self.reader,
            start_position,
            file_bytes,
            Some(self.next_offset),
            |batch| scanned.push(*batch),
        )
        .await?;
        for batch in scanned {
            self.note_batch(batch.position, &batch.header, u64::from(batch.total_bytes));
        }
        // Index files are rewritten whole when the segment is sealed or reopened.
        self.offset_index_flushed = 0;
        self.time_index_flushed = 0;
        Ok(stop)
    }

    /// Records a batch that now ends the segment in the in-memory indexes.
    fn note_batch(&mut self, position: u64, header: &BatchHeader, total_bytes: u64) {
        let relative_offset = (header.base_offset - self.base_offset) as u32;
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
        if self.offset_index.is_empty() || self.bytes_since_index_entry >= self.index_interval_bytes
        {
            self.offset_index.push(OffsetEntry {
                relative_offset,
                position: position as u32,
            });
            self.bytes_since_index_entry = 0;
            self.push_time_entry(relative_offset);
        }
        self.last_batch_relative_offset = relative_offset;
        self.bytes_since_index_entry += total_bytes;
        self.size_bytes = position + total_bytes;
        self.next_offset = header.last_offset() + 1;
    }

    /// Adds a time entry when the largest timestamp grew since the last one.
    fn push_time_entry(&mut self, relative_offset: u32) {
        if self.max_timestamp == i64::MIN {
            return;
        }
        if self
            .time_index
            .last()
            .is_none_or(|last| self.max_timestamp > last.timestamp)
        {
            self.time_index.push(TimeEntry {
                timestamp: self.max_timestamp,
                relative_offset,
            });
        }
    }

    /// The seal entry: a time entry naming the last batch, pushed even when
    /// the largest timestamp did not grow (records produced within one
    /// millisecond, or with old timestamps). A later open trusts a sealed
    /// segment's indexes without reading its log only when they end with it.
    fn push_seal_entry(&mut self, relative_offset: u32) {
        if self.max_timestamp == i64::MIN {
            return;
        }
        if self.time_index.last().is_none_or(|last| {
            self.max_timestamp > last.timestamp || last.relative_offset < relative_offset
        }) {
            self.time_index.push(TimeEntry {
                timestamp: self.max_timestamp,
                relative_offset,
            });
        }
    }

    /// Makes this segment the active one again after recovery: cuts the file at
    /// the last good batch and opens a writer.
    pub async fn reopen_for_append<S: Storage<File = F>>(
        &mut self,
        storage: &S,
        settings: SegmentSettings,
    ) -> io::Result<()> {
        let mode = if settings.direct_io {
            OpenMode::WRITE_DIRECT
        } else {
            OpenMode::WRITE
        };
        let file = storage.open(&self.log_path(), mode)?;
        file.truncate(self.size_bytes).await?;
        file.sync_data().await?;
        let block = if file.direct() {
            DIRECT_IO_ALIGNMENT_BYTES as u64
        } else {
            1
        };
        let partial_start = self.size_bytes - self.size_bytes % block;
        let partial = read_exact_at(
            &self.reader,
            partial_start,
            (self.size_bytes - partial_start) as usize,
        )
        .await?;
        self.writer = Some(SegmentWriter::new(
            file,
            partial_start,
            &partial,
            settings.write_buffer_bytes,
        ));
        self.truncate_index_files(storage).await?;
        Ok(())
    }

    /// Cuts a sealed segment at `size_bytes` (used when recovery finds damage).
    pub async fn cut_sealed<S: Storage<File = F>>(&mut self, storage: &S) -> io::Result<()> {
        let file = storage.open(&self.log_path(), OpenMode::WRITE)?;
        file.truncate(self.size_bytes).await?;
        file.sync_data().await
    }

    /// Appends one checked batch. `stamp` sets the broker-assigned fields.
    pub async fn append(
        &mut self,
        bytes: &[u8],
        header: &BatchHeader,
        now_ms: i64,
        stamp: impl FnOnce(&mut [u8]),
    ) -> io::Result<()> {
        let Some(writer) = self.writer.as_mut() else {
            return Err(io::Error::other(
                "segment is sealed; the log must be reopened",
            ));
        };
        writer.append(bytes, stamp).await?;
        self.first_append_ms.get_or_insert(now_ms);
        self.note_batch(self.size_bytes, header, bytes.len() as u64);
        Ok(())
    }

    /// Writes index entries not yet in the index files (no sync: indexes are
    /// rebuilt from the log when they are behind).
    pub async fn flush_indexes<S: Storage<File = F>>(&mut self, storage: &S) -> io::Result<()> {
        if self.offset_index_flushed == 0 && self.time_index_flushed == 0 {
            // Rewriting from the start: drop whatever older entries the files hold.
            for path in [self.offset_index_path(), self.time_index_path()] {
                storage.open(&path, OpenMode::WRITE)?.truncate(0).await?;
            }
        }
        if self.offset_index_flushed < self.offset_index.len() {
            let mut bytes = Vec::new();
            for entry in &self.offset_index[self.offset_index_flushed..] {
                entry.encode(&mut bytes);
            }
            let position = (self.offset_index_flushed * OFFSET_ENTRY_BYTES) as u64;
            write_plain(storage, &self.offset_index_path(), &bytes, position).await?;
            self.offset_index_flushed = self.offset_index.len();
        }
        if self.time_index_flushed < self.time_index.len() {
            let mut bytes = Vec::new();
            for entry in &self.time_index[self.time_index_flushed..] {
                entry.encode(&mut bytes);
            }
            let position = (self.time_index_flushed * TIME_ENTRY_BYTES) as u64;
            write_plain(storage, &self.time_index_path(), &bytes, position).await?;
            self.time_index_flushed = self.time_index.len();
        }
        Ok(())
    }

    /// Seals the active segment: cut direct-I/O padding, sync log and indexes,
    /// drop the writer.
    pub async fn seal<S: Storage<File = F>>(&mut self, storage: &S) -> Result<(), SealError> {
        if let Some(writer) = self.writer.as_mut() {
            // Until the sync, a failure leaves the writer as it was: retryable.
            writer.write_out().await.map_err(SealError::Write)?;
            writer
                .file
                .truncate(self.size_bytes)
                .await
                .map_err(SealError::Write)?;
            writer.file.sync_data().await.map_err(SealError::Sync)?;
        }
        self.writer = None;
        self.push_seal_entry(self.last_batch_relative_offset);
        self.flush_indexes(storage)
            .await
            .map_err(SealError::Indexes)?;
        for path in [self.offset_index_path(), self.time_index_path()] {
            let file = storage
                .open(&path, OpenMode::WRITE)
                .map_err(SealError::Indexes)?;
            file.sync_data().await.map_err(SealError::Indexes)?;
        }
        Ok(())
    }

    /// Removes the segment's files.
    pub fn delete_files<S: Storage<File = F>>(&self, storage: &S) -> io::Result<()> {
        for path in [self.offset_index_path(), self.time_index_path()] {
            match storage.remove_file(&path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        storage.remove_file(&self.log_path())
    }

    /// Reads the header of the batch at `position`.
    pub async fn read_header(&self, position: u64) -> io::Result<BatchHeader> {
        let bytes = self.read_bytes(position, BATCH_HEADER_BYTES).await?;
        BatchHeader::parse(&bytes).map_err(io::Error::other)
    }

    /// Finds the batch that holds `offset` (or the first one after it).
    /// Returns its position and header, or `None` past the end.
    pub async fn locate(&self, offset: i64) -> io::Result<Option<(u64, BatchHeader)>> {
        let relative = (offset - self.base_offset).clamp(0, i64::from(u32::MAX)) as u32;
        let mut position =
            floor_offset(&self.offset_index, relative).map_or(0, |entry| u64::from(entry.position));
        while position < self.size_bytes {
            let header = self.read_header(position).await?;
            let Some(total) = header.total_bytes() else {
                return Err(corrupt_index(position));
            };
            if header.last_offset() >= offset {
                return Ok(Some((position, header)));
            }
            position += total as u64;
        }
        Ok(None)
    }

    /// The last indexed batch start after `position` and at or before
    /// `end` (within the segment), with its offset: every byte from
    /// `position` up to it is whole batches.
    pub fn index_jump(&self, position: u64, end: u64) -> Option<(u64, i64)> {
        let end = end.min(self.size_bytes);
        let after_end = self
            .offset_index
            .partition_point(|entry| u64::from(entry.position) <= end);
        let entry = self.offset_index[..after_end].last()?;
        (u64::from(entry.position) > position).then(|| {
            (
                u64::from(entry.position),
                self.base_offset + i64::from(entry.relative_offset),
            )
        })
    }

    /// Position to start scanning for the first record at or after `timestamp`.
    pub fn time_scan_start(&self, timestamp: i64) -> u64 {
        index::time_floor(&self.time_index, timestamp)
            .and_then(|entry| floor_offset(&self.offset_index, entry.relative_offset))
            .map_or(0, |entry| u64::from(entry.position))
    }

    /// In-memory index entries, for accounting the memory a segment holds.
    pub fn index_entries(&self) -> usize {
        self.offset_index.len() + self.time_index.len()
    }
}

fn corrupt_index(position: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("no valid batch header at position {position}"),
    )
}

async fn write_plain<S: Storage>(
    storage: &S,
    path: &Path,
    bytes: &[u8],
    position: u64,
) -> io::Result<()> {
    let file = storage.open(path, OpenMode::WRITE)?;
    let mut buffer = AlignedBuf::with_capacity(bytes.len(), 1);
    buffer.extend_from_slice(bytes);
    file.write_at(Rc::new(buffer), position).await
}

/// A whole small file, or nothing when it is missing or unreadable: indexes are
/// rebuilt from the log in that case.
async fn read_optional<S: Storage>(storage: &S, path: &Path) -> Vec<u8> {
    crate::storage::read_file(storage, path)
        .await
        .unwrap_or_default()
}
