//! Errors of the partition log, one enum per operation, with variants callers
//! branch on: a producer gets a different answer for a bad batch, a full disk
//! and a broken file.

use std::io;
use std::path::PathBuf;

use crate::batch::BatchError;

/// Whether an I/O error means the disk is out of space.
pub fn is_disk_full(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("batch rejected, nothing written: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("batch is {bytes} bytes; this topic accepts at most {limit} (batch_bytes_max)")]
    BatchTooLarge { bytes: u64, limit: u64 },
    #[error(
        "disk quota reached: {used_bytes} of {quota_bytes} bytes used; this topic's \
         disk-full policy is `reject`, or nothing may be evicted (what is left is \
         protected, such as records not yet mirrored); reads keep working"
    )]
    QuotaExceeded { used_bytes: u64, quota_bytes: u64 },
    #[error(
        "disk full writing {path}: {source}; nothing was stored, reads keep working, \
         and appends succeed again once space is freed"
    )]
    DiskFull { path: PathBuf, source: io::Error },
    #[error("I/O error writing {path}: {source}; nothing was stored")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "log refuses writes after a failed sync of {path} ({reason}); reopen it so \
         recovery decides what is on disk"
    )]
    Poisoned { path: PathBuf, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("offset {requested} is out of range: the log holds {log_start_offset}..{next_offset}")]
    OffsetOutOfRange {
        requested: i64,
        log_start_offset: i64,
        next_offset: i64,
    },
    #[error("corrupt batch in {path} at position {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("I/O error reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "writing buffered data to {path} failed: {source}; the data stays buffered and the next sync retries"
    )]
    Flush { path: PathBuf, source: io::Error },
    #[error("sync of {path} failed: {source}; the log now refuses writes until it is reopened")]
    Io { path: PathBuf, source: io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid log settings: {0}")]
    Config(#[from] super::config::ConfigError),
    #[error("cannot open log in {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Errors of retention, eviction, delete-records and checkpoint writes.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("offset {requested} is past the end of the log ({next_offset})")]
    OffsetPastEnd { requested: i64, next_offset: i64 },
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}
