//! The log of one partition: a directory of segments, appended at the end,
//! read from any offset, trimmed at the start.
//!
//! The log never reads the clock and never syncs on its own: the caller passes
//! the time in and decides when to sync, by the topic's fsync policy, through
//! [`PartitionLog::begin_sync`] and [`PartitionLog::finish_sync`]. That split is
//! group commit: appends go on while a sync runs and share the next one.

mod config;
mod error;
mod open;
mod read;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub use config::{ConfigError, FsyncPolicy, LogConfig, TimestampType};
pub use error::{AppendError, MaintenanceError, OpenError, ReadError, SyncError, is_disk_full};
pub use open::{RecoveryReport, Truncation};
pub use read::{FileRange, ReadAheadMark, ReadSlice};

use crate::batch;
use crate::checkpoint::{CHECKPOINT_FILE_NAME, Checkpoint};
use crate::segment::{SealError, Segment, SegmentSettings};
use crate::storage::{Storage, StorageFile, write_file_atomic};

/// Whether the producer's acknowledgement waits for a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The fsync policy is `every-batch`: durable once a sync covers `last_offset`.
    AwaitSync,
    /// The policy does not hold acknowledgements for syncs.
    NotAwaited,
}

/// What an append stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: i64,
    pub last_offset: i64,
    /// The stamped time when the topic uses log-append time.
    pub log_append_time_ms: Option<i64>,
    pub bytes: u64,
    pub durability: Durability,
}

/// A sync in flight: which file, and how far it makes the log durable.
#[derive(Debug)]
pub struct SyncJob<F> {
    file: Option<F>,
    target: SyncTarget,
}

/// The point a finished sync makes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTarget {
    pub next_offset: i64,
    pub segment_base_offset: i64,
    pub position: u64,
}

impl<F: StorageFile> SyncJob<F> {
    /// Runs the fdatasync. Borrows nothing from the log, so appends continue.
    pub async fn run(self) -> (io::Result<()>, SyncTarget) {
        let result = match &self.file {
            Some(file) => file.sync_data().await,
            None => Ok(()),
        };
        (result, self.target)
    }
}

/// What retention, eviction or delete-records removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrimReport {
    pub segments_deleted: u32,
    pub bytes_deleted: u64,
    pub records_deleted: u64,
}

/// Records retention and eviction should keep because they are not yet
/// where they must go (the replicator's frontier), up to a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    /// Records from this offset on are protected.
    pub from_offset: i64,
    /// Bytes of segments holding protected records that are kept; past it
    /// the oldest of them may go.
    pub bytes_max: u64,
}

/// The log of one partition.
#[derive(Debug)]
pub struct PartitionLog<S: Storage> {
    storage: S,
    directory: PathBuf,
    config: LogConfig,
    /// Base offset to segment; the last one is active.
    segments: BTreeMap<i64, Segment<S::File>>,
    log_start_offset: i64,
    durable: SyncTarget,
    sync_in_flight: bool,
    poisoned: Option<String>,
}

impl<S: Storage> PartitionLog<S> {
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Changes settings that apply from the next append on (retention, fsync,
    /// segment size, batch limit, timestamp type).
    pub fn set_config(&mut self, config: LogConfig) {
        self.config = config;
    }

    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset
    }

    /// One past the last offset stored (the high watermark of a single node).
    pub fn next_offset(&self) -> i64 {
        self.active().next_offset
    }

    /// One past the last offset known durable.
    pub fn durable_next_offset(&self) -> i64 {
        self.durable.next_offset
    }

    /// Bytes of the active segment.
    pub fn active_segment_bytes(&self) -> u64 {
        self.active().size_bytes
    }

    /// Bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments
            .values()
            .map(|segment| segment.size_bytes)
            .sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Sparse index entries held in memory (each about 8 to 12 bytes).
    pub fn index_entries(&self) -> usize {
        self.segments.values().map(Segment::index_entries).sum()
    }

    /// Whether writes are refused after a failed sync.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn active(&self) -> &Segment<S::File> {
        self.segments
            .values()
            .next_back()
            .expect("a log always has an active segment")
    }

    fn active_mut(&mut self) -> &mut Segment<S::File> {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log always has an active segment")
    }

    fn segment_settings(&self) -> SegmentSettings {
        SegmentSettings {
            index_interval_bytes: self.config.index_interval_bytes,
            write_buffer_bytes: self.config.write_buffer_bytes,
            direct_io: self.config.direct_io,
            preallocate_bytes: if self.config.preallocate {
                self.config.segment_bytes_max
            } else {
                0
            },
        }
    }

    /// Checks a batch, assigns its offsets and writes it at the end of the log.
    ///
    /// Nothing of a batch that fails a check is written. The batch is durable
    /// once [`Self::durable_next_offset`] passes its last offset.
    pub async fn append(
        &mut self,
        batch_bytes: &[u8],
        now_ms: i64,
    ) -> Result<AppendInfo, AppendError> {
        if let Some(reason) = &self.poisoned {
            return Err(AppendError::Poisoned {
                path: self.active().log_path(),
                reason: reason.clone(),
            });
        }
        let bytes = batch_bytes.len() as u64;
        if bytes > self.config.batch_bytes_max {
            return Err(AppendError::BatchTooLarge {
                bytes,
                limit: self.config.batch_bytes_max,
            });
        }
        let header = batch::check_batch(batch_bytes)?;
        // A roll that failed after sealing left no writable segment: it is
        // tried again here.
        let needs_roll = !self.active().is_active()
            || self.should_roll(bytes, i64::from(header.last_offset_delta), now_ms);
        if needs_roll && let Err(source) = self.roll().await {
            return Err(self.append_io_error(source));
        }
        let base_offset = self.active().next_offset;
        let log_append_time_ms =
            (self.config.timestamp_type == TimestampType::LogAppendTime).then_some(now_ms);
        let mut stored_header = header;
        stored_header.base_offset = base_offset;
        if let Some(time) = log_append_time_ms {
            stored_header.max_timestamp = time;
        }
        let stamp = |bytes: &mut [u8]| batch::stamp_batch(bytes, base_offset, log_append_time_ms);
        let result = self
            .active_mut()
            .append(batch_bytes, &stored_header, now_ms, stamp)
            .await;
        result.map_err(|source| self.append_io_error(source))?;
        Ok(AppendInfo {
            base_offset,
            last_offset: stored_header.last_offset(),
            log_append_time_ms,
            bytes,
            durability: match self.config.fsync {
                FsyncPolicy::EveryBatch => Durability::AwaitSync,
                FsyncPolicy::IntervalMs(_) | FsyncPolicy::Never => Durability::NotAwaited,
            },
        })
    }

    fn append_io_error(&self, source: io::Error) -> AppendError {
        let path = self.active().log_path();
        if is_disk_full(&source) {
            AppendError::DiskFull { path, source }
        } else {
            AppendError::Io { path, source }
        }
    }

    fn should_roll(&self, incoming_bytes: u64, last_offset_delta: i64, now_ms: i64) -> bool {
        let active = self.active();
        if active.is_empty() {
            return false;
        }
        let too_big = active.size_bytes + incoming_bytes > self.config.segment_bytes_max;
        let too_old = match (self.config.segment_age_ms_max, active.first_append_ms) {
            (Some(age_ms_max), Some(first)) => now_ms.saturating_sub(first) >= age_ms_max as i64,
            _ => false,
        };
        // Index entries hold offsets relative to the base as u32.
        let relative_end = active.next_offset + last_offset_delta - active.base_offset;
        too_big || too_old || relative_end > i64::from(u32::MAX)
    }

    /// Seals the active segment (synced) and starts a new one.
    pub async fn roll(&mut self) -> io::Result<()> {
        let storage = self.storage.clone();
        let settings = self.segment_settings();
        let next_offset = self.next_offset();
        if self.active().is_active() {
            match self.active_mut().seal(&storage).await {
                Ok(()) => {}
                // The segment is sealed and synced; only its indexes lag.
                Err(SealError::Indexes(error)) => {
                    tracing::warn!(%error, "segment sealed, index files behind (rebuilt when needed)");
                }
                Err(SealError::Sync(error)) => {
                    // After a failed fsync only recovery knows what is on disk.
                    self.poisoned = Some(format!("segment roll failed to sync: {error}"));
                    return Err(error);
                }
                Err(error) => return Err(error.into_io()),
            }
            self.durable = SyncTarget {
                next_offset,
                segment_base_offset: next_offset,
                position: 0,
            };
        }
        let segment = Segment::create(&storage, &self.directory, next_offset, settings).await?;
        self.segments.insert(next_offset, segment);
        storage.sync_dir(&self.directory)?;
        self.write_checkpoint().await
    }

    /// Rolls the active segment if it is older than the age limit, so a quiet
    /// partition's data still becomes eligible for retention.
    pub async fn roll_if_due(&mut self, now_ms: i64) -> io::Result<bool> {
        if self.should_roll(0, 0, now_ms) {
            self.roll().await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether appended data is not yet covered by a sync.
    pub fn sync_needed(&self) -> bool {
        self.durable.next_offset < self.next_offset()
    }

    /// Starts a sync of everything appended so far, unless one is running or
    /// nothing needs it: writes out what the segment buffers (awaited, so no
    /// later write can overtake it) and returns the fdatasync to run. Finish it
    /// with [`Self::finish_sync`]; appends may go on meanwhile.
    pub async fn begin_sync(&mut self) -> Result<Option<SyncJob<S::File>>, SyncError> {
        if self.sync_in_flight || !self.sync_needed() || self.poisoned.is_some() {
            return Ok(None);
        }
        let path = self.active().log_path();
        self.active_mut()
            .flush()
            .await
            .map_err(|source| SyncError::Flush { path, source })?;
        self.sync_in_flight = true;
        let active = self.active();
        Ok(Some(SyncJob {
            file: active.writer_file().cloned(),
            target: SyncTarget {
                next_offset: active.next_offset,
                segment_base_offset: active.base_offset,
                position: active.size_bytes,
            },
        }))
    }

    /// Records the outcome of a sync. A failed sync poisons the log: after a
    /// failed fsync the kernel may have dropped the dirty pages, so only
    /// recovery on reopen can say what is on disk.
    pub fn finish_sync(
        &mut self,
        result: io::Result<()>,
        target: SyncTarget,
    ) -> Result<i64, SyncError> {
        self.sync_in_flight = false;
        if let Err(source) = result {
            self.poisoned = Some(source.to_string());
            return Err(SyncError::Io {
                path: self.active().log_path(),
                source,
            });
        }
        if target.next_offset > self.durable.next_offset {
            self.durable = target;
        }
        Ok(self.durable.next_offset)
    }

    /// Syncs everything appended so far and waits for it.
    pub async fn sync(&mut self) -> Result<i64, SyncError> {
        match self.begin_sync().await? {
            Some(job) => {
                let (result, target) = job.run().await;
                self.finish_sync(result, target)
            }
            None => Ok(self.durable.next_offset),
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            log_start_offset: self.log_start_offset,
            recovery_segment_base: self.durable.segment_base_offset,
            recovery_position: self.durable.position,
            recovery_next_offset: self.durable.next_offset,
        }
    }

    /// Persists the recovery point (and the log start), with the index entries
    /// recovery will start from.
    pub async fn write_checkpoint(&mut self) -> io::Result<()> {
        let storage = self.storage.clone();
        self.active_mut().flush_indexes(&storage).await?;
        let path = self.directory.join(CHECKPOINT_FILE_NAME);
        write_file_atomic(&self.storage, &path, &self.checkpoint().encode()).await
    }

    /// Syncs, writes the checkpoint and trims direct-I/O padding: what a clean
    /// shutdown does. The log stays usable.
    pub async fn close(&mut self) -> Result<(), SyncError> {
        self.sync().await?;
        let path = self.active().log_path();
        let io_error = |source| SyncError::Io {
            path: path.clone(),
            source,
        };
        self.active_mut().flush().await.map_err(io_error)?;
        if let Some(file) = self.active().writer_file() {
            file.truncate(self.active().size_bytes)
                .await
                .map_err(io_error)?;
        }
        self.write_checkpoint().await.map_err(io_error)
    }

    /// Deletes the sealed segments retention no longer keeps: by age (newest
    /// timestamp older than `retention_ms`) and by size (while the log without
    /// the oldest segment still holds `retention_bytes`). Never the active one.
    pub async fn apply_retention(&mut self, now_ms: i64) -> Result<TrimReport, MaintenanceError> {
        self.apply_retention_protected(now_ms, None).await
    }

    /// Bytes of the segments that hold records at or after `offset`.
    pub fn bytes_from(&self, offset: i64) -> u64 {
        self.segments
            .values()
            .filter(|segment| segment.next_offset > offset || segment.is_active())
            .map(|segment| segment.size_bytes)
            .sum()
    }

    /// Whether deleting the oldest sealed segment keeps `protection`: it
    /// holds no protected record, or the protected bytes are over budget.
    pub fn may_evict_oldest(&self, protection: Option<Protection>) -> bool {
        let Some(protection) = protection else {
            return true;
        };
        self.segments
            .values()
            .next()
            .filter(|segment| !segment.is_active())
            .is_some_and(|segment| {
                segment.next_offset <= protection.from_offset
                    || self.bytes_from(protection.from_offset) > protection.bytes_max
            })
    }

    /// [`PartitionLog::apply_retention`], keeping segments with records
    /// `protection` covers while they fit its budget.
    pub async fn apply_retention_protected(
        &mut self,
        now_ms: i64,
        protection: Option<Protection>,
    ) -> Result<TrimReport, MaintenanceError> {
        let mut remaining = self.size_bytes();
        let mut protected_bytes =
            protection.map(|protection| self.bytes_from(protection.from_offset));
        let mut delete_before = None;
        for segment in self.segments.values() {
            if segment.is_active() {
                break;
            }
            let expired = self.config.retention_ms.is_some_and(|retention_ms| {
                segment.max_timestamp != i64::MIN
                    && segment.max_timestamp < now_ms.saturating_sub(retention_ms as i64)
            });
            let oversized = self
                .config
                .retention_bytes
                .is_some_and(|retention_bytes| remaining - segment.size_bytes >= retention_bytes);
            let below_start = segment.next_offset <= self.log_start_offset;
            if !(expired || oversized || below_start) {
                break;
            }
            if let (Some(protection), Some(protected)) = (protection, protected_bytes.as_mut())
                && !below_start
                && segment.next_offset > protection.from_offset
            {
                if *protected <= protection.bytes_max {
                    break;
                }
                *protected -= segment.size_bytes;
            }
            remaining -= segment.size_bytes;
            delete_before = Some(segment.next_offset);
        }
        match delete_before {
            Some(offset) => self.delete_segments_before(offset).await,
            None => Ok(TrimReport::default()),
        }
    }

    /// Deletes the oldest sealed segment, whatever retention says: what the
    /// disk quota's `evict-oldest` policy does. Returns `None` when only the
    /// active segment is left.
    pub async fn evict_oldest_segment(&mut self) -> Result<Option<TrimReport>, MaintenanceError> {
        let Some(oldest) = self
            .segments
            .values()
            .next()
            .filter(|segment| !segment.is_active())
        else {
            return Ok(None);
        };
        let next = oldest.next_offset;
        self.delete_segments_before(next).await.map(Some)
    }

    /// Size of the oldest sealed segment, if any: what one eviction would free.
    pub fn oldest_sealed_segment(&self) -> Option<(i64, u64, i64)> {
        self.segments
            .values()
            .next()
            .filter(|segment| !segment.is_active())
            .map(|segment| {
                (
                    segment.base_offset,
                    segment.size_bytes,
                    segment.max_timestamp,
                )
            })
    }

    /// Advances the log start to `offset` (Kafka's DeleteRecords): offsets
    /// before it are no longer served, and segments wholly before it are deleted.
    pub async fn delete_records_before(
        &mut self,
        offset: i64,
    ) -> Result<TrimReport, MaintenanceError> {
        let next_offset = self.next_offset();
        if offset > next_offset {
            return Err(MaintenanceError::OffsetPastEnd {
                requested: offset,
                next_offset,
            });
        }
        if offset <= self.log_start_offset {
            return Ok(TrimReport::default());
        }
        let before = self.log_start_offset;
        self.log_start_offset = offset;
        let mut report = self.delete_segments_before(offset).await?;
        report.records_deleted = (offset - before) as u64;
        Ok(report)
    }

    /// Deletes sealed segments whose offsets all lie before `offset`, persisting
    /// the new log start first so a crash in between cannot resurrect them.
    async fn delete_segments_before(
        &mut self,
        offset: i64,
    ) -> Result<TrimReport, MaintenanceError> {
        let doomed: Vec<i64> = self
            .segments
            .values()
            .filter(|segment| !segment.is_active() && segment.next_offset <= offset)
            .map(|segment| segment.base_offset)
            .collect();
        let records_before = self.log_start_offset;
        if let Some(&last_doomed) = doomed.last() {
            let new_start = self.segments[&last_doomed].next_offset;
            self.log_start_offset = self.log_start_offset.max(new_start);
        }
        let checkpoint_path = self.directory.join(CHECKPOINT_FILE_NAME);
        self.write_checkpoint()
            .await
            .map_err(|source| MaintenanceError::Io {
                path: checkpoint_path,
                source,
            })?;
        let mut report = TrimReport::default();
        for base in doomed {
            if let Some(segment) = self.segments.remove(&base) {
                segment
                    .delete_files(&self.storage)
                    .map_err(|source| MaintenanceError::Io {
                        path: segment.log_path(),
                        source,
                    })?;
                report.segments_deleted += 1;
                report.bytes_deleted += segment.size_bytes;
            }
        }
        report.records_deleted = (self.log_start_offset - records_before).max(0) as u64;
        Ok(report)
    }
}
