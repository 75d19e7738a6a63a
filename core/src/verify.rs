//! `verify`: walks a whole data directory and reports every bad batch with its
//! file and position, without changing anything.
//!
//! Unlike recovery, which stops at the first bad batch, verify keeps going past
//! a bad batch whenever its length field still points at a plausible next
//! batch, so one flipped bit does not hide later damage.

use std::io;
use std::path::{Path, PathBuf};

use crate::batch::BatchHeader;
use crate::checkpoint::{CHECKPOINT_FILE_NAME, Checkpoint};
use crate::segment::{self, SCAN_BATCH_BYTES_MAX, ScanStop, scan_batches};
use crate::storage::{OpenMode, Storage, StorageFile, read_exact_at, read_file};

/// One thing wrong, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    /// Byte position in the file, where it applies.
    pub position: Option<u64>,
    pub reason: String,
}

/// What a verify run saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub partitions: usize,
    pub segments: usize,
    pub batches: u64,
    pub records: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

/// Verifies every partition directory (a directory holding `.log` files)
/// under `root`. `progress` is called with each segment before it is read.
pub async fn verify_data_dir<S: Storage>(
    storage: &S,
    root: &Path,
    mut progress: impl FnMut(&Path),
) -> io::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let mut names = storage.list_dir(&directory)?;
        names.sort();
        let mut bases = Vec::new();
        for name in names {
            let path = directory.join(&name);
            if storage.is_dir(&path) {
                pending.push(path);
            } else if let Some(base) = segment::parse_log_file_name(&name.to_string_lossy()) {
                bases.push(base);
            }
        }
        if !bases.is_empty() {
            report.partitions += 1;
            verify_partition(storage, &directory, &bases, &mut report, &mut progress).await?;
        }
    }
    Ok(report)
}

async fn verify_partition<S: Storage>(
    storage: &S,
    directory: &Path,
    bases: &[i64],
    report: &mut VerifyReport,
    progress: &mut impl FnMut(&Path),
) -> io::Result<()> {
    let checkpoint_path = directory.join(CHECKPOINT_FILE_NAME);
    match read_file(storage, &checkpoint_path).await {
        Ok(bytes) => {
            if let Err(problem) = Checkpoint::decode(&bytes) {
                report.problems.push(Problem {
                    path: checkpoint_path,
                    position: None,
                    reason: format!("{problem} (recovery will check the whole partition)"),
                });
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut expected_next: Option<i64> = None;
    for &base in bases {
        let path = directory.join(segment::log_file_name(base));
        progress(&path);
        report.segments += 1;
        if let Some(expected) = expected_next
            && expected != base
        {
            report.problems.push(Problem {
                path: path.clone(),
                position: Some(0),
                reason: format!(
                    "segment starts at offset {base}, the previous one ended at {expected}"
                ),
            });
        }
        let file = storage.open(&path, OpenMode::READ)?;
        let end = file.size_bytes().await?;
        let mut position = 0;
        let mut next = Some(base);
        while position < end {
            let mut last_good = None;
            let mut counted = (0u64, 0u64);
            let (stopped_at, stop) = scan_batches(&file, position, end, next, |batch| {
                counted.0 += 1;
                counted.1 += u64::try_from(batch.header.record_count).unwrap_or(0);
                last_good = Some(batch.header.last_offset() + 1);
            })
            .await?;
            report.batches += counted.0;
            report.records += counted.1;
            report.bytes += stopped_at - position;
            if last_good.is_some() {
                next = last_good;
            }
            match stop {
                ScanStop::End | ScanStop::ZeroTail => break,
                ScanStop::Bad {
                    position: bad,
                    reason,
                } => {
                    report.problems.push(Problem {
                        path: path.clone(),
                        position: Some(bad),
                        reason,
                    });
                    match skip_bad_batch(&file, bad, end).await? {
                        Some((after, header)) => {
                            position = after;
                            next = Some(header.last_offset().saturating_add(1));
                        }
                        None => {
                            report.problems.push(Problem {
                                path: path.clone(),
                                position: Some(bad),
                                reason: format!("{} bytes from here cannot be walked", end - bad),
                            });
                            break;
                        }
                    }
                }
            }
        }
        expected_next = next;
    }
    Ok(())
}

/// Where the batch after a bad one starts, if its length field is believable.
async fn skip_bad_batch<F: StorageFile>(
    file: &F,
    position: u64,
    end: u64,
) -> io::Result<Option<(u64, BatchHeader)>> {
    if end - position < crate::batch::BATCH_HEADER_BYTES as u64 {
        return Ok(None);
    }
    let bytes = read_exact_at(file, position, crate::batch::BATCH_HEADER_BYTES).await?;
    let Ok(header) = BatchHeader::parse(&bytes) else {
        return Ok(None);
    };
    Ok(header
        .total_bytes()
        .filter(|&total| total <= SCAN_BATCH_BYTES_MAX && position + total as u64 <= end)
        .map(|total| (position + total as u64, header)))
}
