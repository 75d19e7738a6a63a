//! A set of partition logs under one data directory, with the disk quota.
//!
//! When an append would take the data directory past `quota_bytes`, the
//! topic's disk-full policy decides: `reject` refuses the append with a clear
//! error (reads keep working), `evict-oldest` deletes sealed segments first,
//! from topics with `evict-oldest`, lowest eviction priority first and oldest
//! data first within a priority, until the append fits. The same happens when
//! the disk itself reports ENOSPC. Active segments are never evicted.
//!
//! Several sets (one per shard) can share one quota through the same
//! [`DiskUsage`] counter; each set evicts only its own segments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::log::{
    AppendError, AppendInfo, LogConfig, MaintenanceError, OpenError, PartitionLog, Protection,
    RecoveryReport, TrimReport,
};
use crate::storage::Storage;

/// What happens to a topic's appends when the quota is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskFullPolicy {
    /// Refuse the append; nothing stored is touched.
    #[default]
    Reject,
    /// Make room by deleting the oldest sealed segments of evictable topics.
    EvictOldest,
}

/// A topic's place in eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EvictionSettings {
    pub disk_full: DiskFullPolicy,
    /// Lower priorities are evicted first.
    pub eviction_priority: i32,
}

/// Bytes used by the data directory, shared between the sets that fill it.
#[derive(Debug, Clone, Default)]
pub struct DiskUsage(Arc<AtomicU64>);

impl DiskUsage {
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    fn subtract(&self, bytes: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// Topic and partition.
pub type PartitionKey = (String, u32);

#[derive(Debug)]
struct Entry<S: Storage> {
    log: PartitionLog<S>,
    eviction: EvictionSettings,
    protection: Option<Protection>,
}

/// Eviction done to make room, for metrics and for counting lost data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictionReport {
    /// Per partition: what was deleted.
    pub evicted: Vec<(PartitionKey, TrimReport)>,
}

/// Partition logs under one root with a shared quota.
#[derive(Debug)]
pub struct LogSet<S: Storage> {
    storage: S,
    root: PathBuf,
    logs: BTreeMap<PartitionKey, Entry<S>>,
    quota_bytes: Option<u64>,
    usage: DiskUsage,
    evictions: EvictionReport,
}

/// `ROOT/topics/TOPIC/PARTITION`.
pub fn partition_directory(root: &Path, topic: &str, partition: u32) -> PathBuf {
    root.join("topics").join(topic).join(partition.to_string())
}

impl<S: Storage> LogSet<S> {
    pub fn new(storage: S, root: &Path, quota_bytes: Option<u64>, usage: DiskUsage) -> Self {
        Self {
            storage,
            root: root.to_path_buf(),
            logs: BTreeMap::new(),
            quota_bytes,
            usage,
            evictions: EvictionReport::default(),
        }
    }

    pub fn usage(&self) -> &DiskUsage {
        &self.usage
    }

    pub fn quota_bytes(&self) -> Option<u64> {
        self.quota_bytes
    }

    /// Opens (and recovers) one partition's log and adds it to the set.
    pub async fn open_partition(
        &mut self,
        topic: &str,
        partition: u32,
        config: LogConfig,
        eviction: EvictionSettings,
    ) -> Result<RecoveryReport, OpenError> {
        let directory = partition_directory(&self.root, topic, partition);
        let (log, report) = PartitionLog::open(self.storage.clone(), &directory, config).await?;
        self.usage.add(log.size_bytes());
        if let Some(old) = self.logs.insert(
            (topic.to_string(), partition),
            Entry {
                log,
                eviction,
                protection: None,
            },
        ) {
            self.usage.subtract(old.log.size_bytes());
        }
        Ok(report)
    }

    /// Removes a partition from the set; with `delete_files` its directory goes too.
    pub async fn close_partition(
        &mut self,
        topic: &str,
        partition: u32,
        delete_files: bool,
    ) -> std::io::Result<()> {
        let Some(mut entry) = self.logs.remove(&(topic.to_string(), partition)) else {
            return Ok(());
        };
        self.usage.subtract(entry.log.size_bytes());
        if delete_files {
            let directory = entry.log.directory().to_path_buf();
            drop(entry);
            return self.storage.remove_dir_all(&directory);
        }
        entry.log.close().await.map_err(std::io::Error::other)
    }

    pub fn log(&self, topic: &str, partition: u32) -> Option<&PartitionLog<S>> {
        self.logs
            .get(&(topic.to_string(), partition))
            .map(|entry| &entry.log)
    }

    pub fn log_mut(&mut self, topic: &str, partition: u32) -> Option<&mut PartitionLog<S>> {
        self.logs
            .get_mut(&(topic.to_string(), partition))
            .map(|entry| &mut entry.log)
    }

    /// What retention and eviction keep of a partition (the replicator's
    /// unmirrored records); `None`: nothing beyond its own settings.
    pub fn set_protection(&mut self, topic: &str, partition: u32, protection: Option<Protection>) {
        if let Some(entry) = self.logs.get_mut(&(topic.to_string(), partition)) {
            entry.protection = protection;
        }
    }

    pub fn set_eviction(&mut self, topic: &str, partition: u32, eviction: EvictionSettings) {
        if let Some(entry) = self.logs.get_mut(&(topic.to_string(), partition)) {
            entry.eviction = eviction;
        }
    }

    pub fn partitions(&self) -> impl Iterator<Item = (&PartitionKey, &PartitionLog<S>)> {
        self.logs.iter().map(|(key, entry)| (key, &entry.log))
    }

    /// Takes the evictions done since the last call.
    pub fn take_evictions(&mut self) -> EvictionReport {
        std::mem::take(&mut self.evictions)
    }

    /// Appends to one partition, applying the quota and the topic's disk-full policy.
    /// Returns `None` when the partition is not in this set.
    pub async fn append(
        &mut self,
        topic: &str,
        partition: u32,
        batch: &[u8],
        now_ms: i64,
    ) -> Option<Result<AppendInfo, AppendError>> {
        let key = (topic.to_string(), partition);
        let eviction = self.logs.get(&key)?.eviction;
        let incoming = batch.len() as u64;
        if let Some(quota_bytes) = self.quota_bytes {
            while self.usage.bytes() + incoming > quota_bytes {
                let evicted =
                    eviction.disk_full == DiskFullPolicy::EvictOldest && self.evict_one().await;
                if !evicted {
                    return Some(Err(AppendError::QuotaExceeded {
                        used_bytes: self.usage.bytes(),
                        quota_bytes,
                    }));
                }
            }
        }
        let mut result = self.append_counted(&key, batch, now_ms).await;
        // The disk itself is full: an evictable topic makes room once and retries.
        if matches!(result, Err(AppendError::DiskFull { .. }))
            && eviction.disk_full == DiskFullPolicy::EvictOldest
            && self.evict_one().await
        {
            result = self.append_counted(&key, batch, now_ms).await;
        }
        Some(result)
    }

    async fn append_counted(
        &mut self,
        key: &PartitionKey,
        batch: &[u8],
        now_ms: i64,
    ) -> Result<AppendInfo, AppendError> {
        let entry = self
            .logs
            .get_mut(key)
            .expect("caller checked the partition exists");
        let before = entry.log.size_bytes();
        let result = entry.log.append(batch, now_ms).await;
        let after = entry.log.size_bytes();
        self.usage.add(after.saturating_sub(before));
        self.usage.subtract(before.saturating_sub(after));
        result
    }

    /// Evicts the single best candidate segment. Returns whether one was found.
    async fn evict_one(&mut self) -> bool {
        let candidate = self
            .logs
            .iter()
            .filter(|(_, entry)| entry.eviction.disk_full == DiskFullPolicy::EvictOldest)
            .filter(|(_, entry)| entry.log.may_evict_oldest(entry.protection))
            .filter_map(|(key, entry)| {
                entry
                    .log
                    .oldest_sealed_segment()
                    .map(|(_, _, max_timestamp)| {
                        (
                            (entry.eviction.eviction_priority, max_timestamp),
                            key.clone(),
                        )
                    })
            })
            .min();
        let Some((_, key)) = candidate else {
            return false;
        };
        let entry = self.logs.get_mut(&key).expect("candidate exists");
        match entry.log.evict_oldest_segment().await {
            Ok(Some(report)) => {
                self.usage.subtract(report.bytes_deleted);
                tracing::warn!(topic = %key.0, partition = key.1, bytes = report.bytes_deleted,
                    records = report.records_deleted, "disk quota: evicted the oldest segment");
                self.evictions.evicted.push((key, report));
                true
            }
            Ok(None) => false,
            Err(error) => {
                tracing::error!(topic = %key.0, partition = key.1, %error, "disk quota: eviction failed");
                false
            }
        }
    }

    /// Applies every partition's retention; returns what was deleted in total.
    pub async fn apply_retention(&mut self, now_ms: i64) -> Result<TrimReport, MaintenanceError> {
        let mut total = TrimReport::default();
        for entry in self.logs.values_mut() {
            let report = entry
                .log
                .apply_retention_protected(now_ms, entry.protection)
                .await?;
            self.usage.subtract(report.bytes_deleted);
            total.segments_deleted += report.segments_deleted;
            total.bytes_deleted += report.bytes_deleted;
            total.records_deleted += report.records_deleted;
        }
        Ok(total)
    }
}
