//! Opening a partition log: recovery after a clean stop, a crash or a power cut.
//!
//! Segments before the checkpoint's recovery point are trusted as they are
//! (their indexes must vouch for them, or they are rescanned). From the
//! recovery point on, every batch is checked: length, magic, CRC-32C, record
//! framing, offset continuity. At the first bad batch the log is cut, and any
//! later segment is removed: offsets after a hole cannot be served in order.
//! The recovered tail is synced before the log accepts writes, so what
//! survived a process crash in the page cache is durable before it is counted.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::{OpenError, PartitionLog, SyncTarget};
use crate::checkpoint::{CHECKPOINT_FILE_NAME, Checkpoint};
use crate::log::LogConfig;
use crate::segment::{self, ScanStop, Segment};
use crate::storage::{Storage, read_file};

/// Something recovery cut off, for the log line and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub path: PathBuf,
    pub position: u64,
    pub bytes_cut: u64,
    pub reason: String,
}

/// What opening the log found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Bytes read and checked batch by batch (after the recovery point).
    pub bytes_checked: u64,
    pub truncations: Vec<Truncation>,
    /// Segments whose indexes were rebuilt from the log.
    pub indexes_rebuilt: usize,
    /// Later segments removed because an earlier one was cut.
    pub segments_removed: usize,
    pub checkpoint_problem: Option<String>,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl<S: Storage> PartitionLog<S> {
    /// Opens (creating if needed) the log in `directory` and recovers it.
    pub async fn open(
        storage: S,
        directory: &Path,
        config: LogConfig,
    ) -> Result<(Self, RecoveryReport), OpenError> {
        config.check()?;
        let mut report = RecoveryReport::default();
        storage
            .create_dir_all(directory)
            .map_err(io_error(directory))?;
        let checkpoint_path = directory.join(CHECKPOINT_FILE_NAME);
        let checkpoint = match read_file(&storage, &checkpoint_path).await {
            Ok(bytes) => match Checkpoint::decode(&bytes) {
                Ok(checkpoint) => Some(checkpoint),
                Err(problem) => {
                    tracing::warn!(path = %checkpoint_path.display(), %problem,
                        "checkpoint unusable; checking every segment from the start");
                    report.checkpoint_problem = Some(problem.to_string());
                    None
                }
            },
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => return Err(io_error(&checkpoint_path)(error)),
        };

        let mut bases: Vec<i64> = Vec::new();
        for name in storage.list_dir(directory).map_err(io_error(directory))? {
            let name = name.to_string_lossy();
            if let Some(base) = segment::parse_log_file_name(&name) {
                bases.push(base);
            } else if name.ends_with(".tmp") {
                // A checkpoint write that never got renamed: ignore and remove.
                let _ = storage.remove_file(&directory.join(name.as_ref()));
            }
        }
        bases.sort_unstable();

        let (recovery_base, recovery_position) = match checkpoint {
            Some(checkpoint) => (
                checkpoint.recovery_segment_base,
                checkpoint.recovery_position,
            ),
            None => (i64::MIN, 0),
        };
        let mut segments: BTreeMap<i64, Segment<S::File>> = BTreeMap::new();
        let mut cut = false;
        for (index, &base) in bases.iter().enumerate() {
            let log_path = directory.join(segment::log_file_name(base));
            if cut {
                remove_segment_files(&storage, directory, base).map_err(io_error(&log_path))?;
                report.segments_removed += 1;
                continue;
            }
            let (mut segment, file_bytes) =
                Segment::open_existing(&storage, directory, base, config.index_interval_bytes)
                    .await
                    .map_err(io_error(&log_path))?;
            let next_base = bases.get(index + 1).copied();
            let trusted = match next_base {
                Some(next) if next <= recovery_base => segment.adopt_trusted(file_bytes, next),
                _ => false,
            };
            if !trusted {
                let trusted_bytes = match base.cmp(&recovery_base) {
                    std::cmp::Ordering::Equal => recovery_position.min(file_bytes),
                    _ => 0,
                };
                if next_base.is_some_and(|next| next <= recovery_base) {
                    report.indexes_rebuilt += 1;
                }
                let stop = segment
                    .recover_from(trusted_bytes, file_bytes)
                    .await
                    .map_err(io_error(&log_path))?;
                report.bytes_checked += file_bytes.saturating_sub(trusted_bytes);
                let good_bytes = segment.size_bytes;
                let mut problem = match stop {
                    ScanStop::Bad { reason, .. } => Some(reason),
                    ScanStop::End | ScanStop::ZeroTail => None,
                };
                if problem.is_none()
                    && let Some(next) = next_base
                    && segment.next_offset != next
                {
                    problem = Some(format!(
                        "segment ends at offset {} but the next segment starts at {next}",
                        segment.next_offset
                    ));
                }
                if let Some(reason) = problem {
                    tracing::warn!(path = %log_path.display(), position = good_bytes,
                        bytes_cut = file_bytes - good_bytes, %reason,
                        "recovery cut the log at the first bad batch");
                    report.truncations.push(Truncation {
                        path: log_path.clone(),
                        position: good_bytes,
                        bytes_cut: file_bytes - good_bytes,
                        reason,
                    });
                    cut = true;
                }
                if next_base.is_some() && !cut {
                    // A sealed segment rescanned whole: persist rebuilt indexes.
                    segment
                        .seal(&storage)
                        .await
                        .map_err(|error| io_error(&log_path)(error.into_io()))?;
                } else if next_base.is_some() {
                    segment
                        .cut_sealed(&storage)
                        .await
                        .map_err(io_error(&log_path))?;
                    segment
                        .seal(&storage)
                        .await
                        .map_err(|error| io_error(&log_path)(error.into_io()))?;
                }
            }
            segments.insert(base, segment);
        }
        // An empty sealed segment can be left by a crash right after a roll.
        // Drop empty segments that are not the last: they hold no offsets.
        let last_base = segments.keys().next_back().copied();
        let empty: Vec<i64> = segments
            .iter()
            .filter(|(base, segment)| segment.is_empty() && Some(**base) != last_base)
            .map(|(base, _)| *base)
            .collect();
        for base in empty {
            remove_segment_files(&storage, directory, base).map_err(io_error(directory))?;
            segments.remove(&base);
        }

        let settings_log = Self {
            storage: storage.clone(),
            directory: directory.to_path_buf(),
            config,
            segments: BTreeMap::new(),
            log_start_offset: 0,
            durable: SyncTarget {
                next_offset: 0,
                segment_base_offset: 0,
                position: 0,
            },
            sync_in_flight: false,
            poisoned: None,
        };
        let settings = settings_log.segment_settings();
        let mut log = settings_log;
        match segments.values_mut().next_back() {
            Some(active) => {
                let path = active.log_path();
                active
                    .reopen_for_append(&storage, settings)
                    .await
                    .map_err(io_error(&path))?;
            }
            None => {
                let base = checkpoint.map_or(0, |checkpoint| {
                    checkpoint
                        .recovery_next_offset
                        .max(checkpoint.log_start_offset)
                });
                let segment = Segment::create(&storage, directory, base, settings)
                    .await
                    .map_err(io_error(directory))?;
                segments.insert(base, segment);
                storage.sync_dir(directory).map_err(io_error(directory))?;
            }
        }
        report.segments = segments.len();
        log.segments = segments;
        let first_base = *log
            .segments
            .keys()
            .next()
            .expect("at least the active segment");
        let next_offset = log.next_offset();
        log.log_start_offset = checkpoint
            .map_or(first_base, |checkpoint| {
                checkpoint.log_start_offset.max(first_base)
            })
            .min(next_offset);
        let active = log.active();
        log.durable = SyncTarget {
            next_offset,
            segment_base_offset: active.base_offset,
            position: active.size_bytes,
        };
        // Drop sealed segments wholly before the log start (a crash between the
        // checkpoint write and the file removal leaves them behind).
        let log_start = log.log_start_offset;
        log.delete_segments_before(log_start)
            .await
            .map_err(|error| io_error(directory)(io::Error::other(error.to_string())))?;
        log.write_checkpoint()
            .await
            .map_err(io_error(&checkpoint_path))?;
        if !report.truncations.is_empty() || report.segments_removed > 0 {
            tracing::warn!(directory = %directory.display(), truncations = report.truncations.len(),
                segments_removed = report.segments_removed, next_offset, "log recovered with damage cut");
        } else {
            tracing::debug!(directory = %directory.display(), next_offset, bytes_checked = report.bytes_checked,
                "log recovered cleanly");
        }
        Ok((log, report))
    }
}

fn remove_segment_files<S: Storage>(storage: &S, directory: &Path, base: i64) -> io::Result<()> {
    for name in [
        segment::log_file_name(base),
        segment::offset_index_file_name(base),
        segment::time_index_file_name(base),
    ] {
        match storage.remove_file(&directory.join(name)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}
