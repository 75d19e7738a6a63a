//! Topic metadata: which topics exist, their partition counts and settings,
//! which shard owns each partition, and how that survives restarts.
//!
//! Each topic's metadata lives in `DATA_DIR/topics/TOPIC/topic.toml`, replaced
//! atomically (write, sync, rename, sync directory). Shards read the table
//! through [`TopicDirectory::current`], which takes a lock only when the table
//! changed since the caller last looked: the data path reads one atomic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::TopicSettings;

/// Longest topic name (Kafka's limit).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Most partitions one topic may have.
pub const PARTITIONS_MAX: u32 = 4096;

/// What is persisted about a topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicMeta {
    pub partitions: u32,
    pub settings: TopicSettings,
}

/// All topics, by name.
pub type TopicTable = BTreeMap<String, TopicMeta>;

/// Checks a topic name: Kafka's rules, so every protocol accepts the same names.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(format!(
            "topic name must be 1 to {TOPIC_NAME_BYTES_MAX} bytes"
        ));
    }
    if name == "." || name == ".." {
        return Err("topic name cannot be `.` or `..`".into());
    }
    if let Some(bad) = name.chars().find(|character| {
        !(character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-'))
    }) {
        return Err(format!(
            "topic name `{name}` has `{bad}`; use letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// The shard that owns a partition: deterministic, and spreading a topic's
/// consecutive partitions over consecutive shards.
pub fn shard_of(topic: &str, partition: u32, shards: usize) -> usize {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in topic.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash.wrapping_add(u64::from(partition)) % shards.max(1) as u64) as usize
}

fn topic_directory(data_dir: &Path, topic: &str) -> PathBuf {
    data_dir.join("topics").join(topic)
}

fn meta_path(data_dir: &Path, topic: &str) -> PathBuf {
    topic_directory(data_dir, topic).join("topic.toml")
}

/// Writes a topic's metadata atomically.
pub fn persist(data_dir: &Path, topic: &str, meta: &TopicMeta) -> anyhow::Result<()> {
    let directory = topic_directory(data_dir, topic);
    std::fs::create_dir_all(&directory)
        .with_context(|| format!("creating {}", directory.display()))?;
    let text = toml::to_string(meta).context("encoding topic metadata")?;
    let path = meta_path(data_dir, topic);
    let temporary = directory.join("topic.toml.tmp");
    std::fs::write(&temporary, text.as_bytes())
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::File::open(&temporary)?.sync_all()?;
    std::fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(&directory)?.sync_all()?;
    std::fs::File::open(directory.parent().unwrap_or(&directory))?.sync_all()?;
    Ok(())
}

/// Removes a topic's directory (metadata and partitions).
pub fn remove(data_dir: &Path, topic: &str) -> anyhow::Result<()> {
    let directory = topic_directory(data_dir, topic);
    // Remove the metadata first: a crash half way leaves partition files
    // without metadata, which the next start ignores and reports.
    let _ = std::fs::remove_file(meta_path(data_dir, topic));
    match std::fs::remove_dir_all(&directory) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("removing {}", directory.display())),
    }
}

/// Loads every topic's metadata from the data directory.
pub fn load_all(data_dir: &Path) -> anyhow::Result<TopicTable> {
    let root = data_dir.join("topics");
    let mut table = TopicTable::new();
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(table),
        Err(error) => return Err(error).with_context(|| format!("listing {}", root.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = meta_path(data_dir, &name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(directory = %entry.path().display(),
                    "directory under topics/ has no topic.toml; ignored (a topic deletion interrupted?)");
                continue;
            }
            Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
        };
        let meta: TopicMeta =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        table.insert(name, meta);
    }
    Ok(table)
}

/// The topic table shared by all shards, versioned.
#[derive(Debug)]
pub struct TopicDirectory {
    version: AtomicU64,
    table: Mutex<Arc<TopicTable>>,
    /// Serialises create, alter and delete, which span several shards.
    pub changes: Mutex<()>,
}

/// A shard's or connection's cached view of the table.
#[derive(Debug, Clone)]
pub struct TopicView {
    version: u64,
    pub table: Arc<TopicTable>,
}

impl TopicDirectory {
    pub fn new(table: TopicTable) -> Self {
        Self {
            version: AtomicU64::new(1),
            table: Mutex::new(Arc::new(table)),
            changes: Mutex::new(()),
        }
    }

    pub fn snapshot(&self) -> TopicView {
        let table = self
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        TopicView {
            version: self.version.load(Ordering::Acquire),
            table,
        }
    }

    /// Refreshes `view` if the table changed since it was taken.
    pub fn refresh(&self, view: &mut TopicView) {
        if self.version.load(Ordering::Acquire) != view.version {
            *view = self.snapshot();
        }
    }

    /// Replaces the table (callers hold `changes`).
    pub fn publish(&self, table: TopicTable) {
        *self
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(table);
        self.version.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kafka_rules() {
        assert!(check_topic_name("sensor-temperature.v2_raw").is_ok());
        assert!(check_topic_name("").is_err());
        assert!(check_topic_name("..").is_err());
        let error = check_topic_name("a/b").expect_err("slash");
        assert!(error.contains('/'), "{error}");
        assert!(check_topic_name(&"x".repeat(250)).is_err());
    }

    #[test]
    fn assignment_is_deterministic_and_spreads_partitions() {
        let owners: Vec<usize> = (0..8)
            .map(|partition| shard_of("sensors", partition, 4))
            .collect();
        assert_eq!(
            owners,
            (0..8)
                .map(|partition| shard_of("sensors", partition, 4))
                .collect::<Vec<_>>()
        );
        for shard in 0..4 {
            assert_eq!(
                owners.iter().filter(|&&owner| owner == shard).count(),
                2,
                "{owners:?}"
            );
        }
        assert_eq!(shard_of("anything", 3, 1), 0);
    }
}
