//! Per-partition log settings, with the defaults a topic gets when it names none.

/// When appended data is made durable with fdatasync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every append waits for a sync; appends that arrive while a sync runs
    /// share the next one (group commit).
    EveryBatch,
    /// The broker syncs every this many milliseconds; appends do not wait.
    IntervalMs(u64),
    /// Only rolls and shutdown sync; appends do not wait.
    Never,
}

/// Which timestamp a batch carries once stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    /// The producer's timestamps, as sent.
    CreateTime,
    /// The broker stamps the append time on every batch.
    LogAppendTime,
}

/// Settings of one partition's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment rolls before an append would take it past this size.
    pub segment_bytes_max: u64,
    /// A segment rolls once its first batch is this old.
    pub segment_age_ms_max: Option<u64>,
    /// Log bytes between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Largest batch an append accepts.
    pub batch_bytes_max: u64,
    pub fsync: FsyncPolicy,
    pub timestamp_type: TimestampType,
    /// Sealed segments whose newest timestamp is older than this are deleted.
    pub retention_ms: Option<u64>,
    /// Sealed segments are deleted, oldest first, while the log stays at least this large without them.
    pub retention_bytes: Option<u64>,
    /// Write the active segment with O_DIRECT where the filesystem allows it.
    pub direct_io: bool,
    /// Reserve the whole segment size when a segment is created.
    pub preallocate: bool,
    /// Appended bytes collected in memory before they are written to the
    /// segment file in one large write (a sync writes them at once). 0 writes
    /// every append through.
    pub write_buffer_bytes: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 128 * 1024 * 1024,
            segment_age_ms_max: Some(7 * 24 * 3600 * 1000),
            index_interval_bytes: 4096,
            batch_bytes_max: 1024 * 1024,
            fsync: FsyncPolicy::EveryBatch,
            timestamp_type: TimestampType::CreateTime,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            direct_io: true,
            preallocate: true,
            write_buffer_bytes: 1024 * 1024,
        }
    }
}

/// A setting outside the range the log can honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} = {value} is out of range: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub value: u64,
    pub reason: &'static str,
}

impl LogConfig {
    /// Checks the settings against what the formats and the writer allow.
    pub fn check(&self) -> Result<(), ConfigError> {
        let fail = |key, value, reason| Err(ConfigError { key, value, reason });
        if !(1024..=u64::from(u32::MAX)).contains(&self.segment_bytes_max) {
            return fail(
                "segment_bytes_max",
                self.segment_bytes_max,
                "must be between 1 KiB and 4 GiB - 1 (index positions are 32-bit)",
            );
        }
        if self.batch_bytes_max < crate::batch::BATCH_HEADER_BYTES as u64
            || self.batch_bytes_max > u64::from(u32::MAX)
        {
            return fail(
                "batch_bytes_max",
                self.batch_bytes_max,
                "must hold a batch header and stay below 4 GiB (a larger batch gets a segment of its own)",
            );
        }
        if self.index_interval_bytes == 0 {
            return fail("index_interval_bytes", 0, "must be at least 1");
        }
        if self.fsync == FsyncPolicy::IntervalMs(0) {
            return fail(
                "fsync_interval_ms",
                0,
                "must be at least 1; use every-batch to sync each append",
            );
        }
        if self.write_buffer_bytes > 64 * 1024 * 1024 {
            return fail(
                "write_buffer_bytes",
                self.write_buffer_bytes as u64,
                "must be at most 64 MiB per partition",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_bad_values_name_their_key() {
        assert_eq!(LogConfig::default().check(), Ok(()));
        let huge = LogConfig {
            segment_bytes_max: 8 << 30,
            ..LogConfig::default()
        };
        let error = huge.check().expect_err("8 GiB segments");
        assert_eq!(error.key, "segment_bytes_max");
        assert!(error.to_string().contains("32-bit"), "{error}");
        let zero = LogConfig {
            fsync: FsyncPolicy::IntervalMs(0),
            ..LogConfig::default()
        };
        assert_eq!(
            zero.check().map_err(|error| error.key),
            Err("fsync_interval_ms")
        );
    }
}
