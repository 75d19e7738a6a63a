//! Committed consumer-group offsets, persisted so they survive restarts.
//!
//! One file per group under `DATA_DIR/groups/`, named by the hex of the group
//! name (group names are arbitrary strings), replaced atomically on every
//! commit. The format is text lines `TOPIC<TAB>PARTITION<TAB>OFFSET` and a last
//! line `crc32 XXXXXXXX` over everything before it (see `docs/format.md`).
//! A file that fails its check is reported and ignored, never half-read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

/// Most groups the broker keeps.
pub const GROUPS_MAX: usize = 10_000;
/// Most (topic, partition) offsets one group keeps.
pub const GROUP_OFFSETS_MAX: usize = 100_000;
/// Longest group name.
pub const GROUP_NAME_BYTES_MAX: usize = 255;

type Offsets = BTreeMap<(String, u32), i64>;
/// A group's committed offsets as (topic, partition, offset).
pub type GroupOffsets = Vec<(String, u32, i64)>;

/// All groups' committed offsets.
/// Puts a group's offsets back as they were before a failed change.
fn restore(groups: &mut BTreeMap<String, Offsets>, group: &str, before: Option<Offsets>) {
    match before {
        Some(offsets) => groups.insert(group.to_string(), offsets),
        None => groups.remove(group),
    };
}

#[derive(Debug)]
pub struct GroupStore {
    directory: PathBuf,
    groups: Mutex<BTreeMap<String, Offsets>>,
}

fn file_name(group: &str) -> String {
    let hex: String = group.bytes().map(|byte| format!("{byte:02x}")).collect();
    format!("{hex}.offsets")
}

fn group_of_file_name(name: &str) -> Option<String> {
    let hex = name.strip_suffix(".offsets")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(&hex[index..index + 2], 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn encode(offsets: &Offsets) -> String {
    let mut text = String::new();
    for ((topic, partition), offset) in offsets {
        text.push_str(&format!("{topic}\t{partition}\t{offset}\n"));
    }
    let crc = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("crc32 {crc:08x}\n"));
    text
}

fn decode(text: &str) -> Result<Offsets, String> {
    let body_end = text
        .trim_end_matches('\n')
        .rfind('\n')
        .map_or(0, |index| index + 1);
    let (body, trailer) = text.split_at(body_end);
    let stored = trailer
        .trim()
        .strip_prefix("crc32 ")
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or("missing crc32 trailer")?;
    if crc32fast::hash(body.as_bytes()) != stored {
        return Err("crc32 mismatch".into());
    }
    let mut offsets = Offsets::new();
    for line in body.lines() {
        let mut fields = line.split('\t');
        let (Some(topic), Some(partition), Some(offset), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("malformed line `{line}`"));
        };
        let partition = partition
            .parse()
            .map_err(|_| format!("bad partition in `{line}`"))?;
        let offset = offset
            .parse()
            .map_err(|_| format!("bad offset in `{line}`"))?;
        offsets.insert((topic.to_string(), partition), offset);
    }
    Ok(offsets)
}

impl GroupStore {
    /// Loads every group file under `DATA_DIR/groups`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let directory = data_dir.join("groups");
        std::fs::create_dir_all(&directory)
            .with_context(|| format!("creating {}", directory.display()))?;
        let mut groups = BTreeMap::new();
        for entry in std::fs::read_dir(&directory)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(group) = group_of_file_name(&name) else {
                continue;
            };
            let text = std::fs::read_to_string(entry.path())?;
            match decode(&text) {
                Ok(offsets) => {
                    groups.insert(group, offsets);
                }
                Err(problem) => tracing::warn!(file = %entry.path().display(), %problem,
                    "group offsets file is damaged; the group starts without committed offsets"),
            }
        }
        Ok(Self {
            directory,
            groups: Mutex::new(groups),
        })
    }

    /// Records a committed offset and persists the group before returning.
    pub fn commit(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<(), String> {
        if group.is_empty() || group.len() > GROUP_NAME_BYTES_MAX {
            return Err(format!(
                "group name must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
            ));
        }
        if offset < 0 {
            return Err(format!("offset {offset} is negative"));
        }
        let mut groups = self
            .groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !groups.contains_key(group) && groups.len() >= GROUPS_MAX {
            return Err(format!(
                "too many groups (groups_max {GROUPS_MAX}); delete unused groups"
            ));
        }
        let offsets = groups.entry(group.to_string()).or_default();
        let key = (topic.to_string(), partition);
        if !offsets.contains_key(&key) && offsets.len() >= GROUP_OFFSETS_MAX {
            return Err(format!(
                "group {group} holds {GROUP_OFFSETS_MAX} offsets already"
            ));
        }
        let previous = offsets.insert(key.clone(), offset);
        if let Err(error) = self.persist(group, offsets) {
            match previous {
                Some(previous) => offsets.insert(key, previous),
                None => offsets.remove(&key),
            };
            return Err(format!("could not persist the commit: {error:#}"));
        }
        Ok(())
    }

    /// Records several committed offsets of one group with one write; all
    /// or none are kept. Returns a message per refused entry, or for all.
    pub fn commit_many(&self, group: &str, entries: &[(String, u32, i64)]) -> Result<(), String> {
        if group.is_empty() || group.len() > GROUP_NAME_BYTES_MAX {
            return Err(format!(
                "group name must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
            ));
        }
        if let Some((_, _, offset)) = entries.iter().find(|(_, _, offset)| *offset < 0) {
            return Err(format!("offset {offset} is negative"));
        }
        let mut groups = self
            .groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !groups.contains_key(group) && groups.len() >= GROUPS_MAX {
            return Err(format!(
                "too many groups (groups_max {GROUPS_MAX}); delete unused groups"
            ));
        }
        let before = groups.get(group).cloned();
        let offsets = groups.entry(group.to_string()).or_default();
        for (topic, partition, offset) in entries {
            offsets.insert((topic.clone(), *partition), *offset);
        }
        if offsets.len() > GROUP_OFFSETS_MAX {
            restore(&mut groups, group, before);
            return Err(format!(
                "group {group} would hold more than {GROUP_OFFSETS_MAX} offsets"
            ));
        }
        let result = match groups.get(group) {
            Some(offsets) => self.persist(group, offsets),
            None => Ok(()),
        };
        if let Err(error) = result {
            restore(&mut groups, group, before);
            return Err(format!("could not persist the commit: {error:#}"));
        }
        Ok(())
    }

    /// Forgets a group's committed offsets. Returns whether it had any.
    pub fn delete(&self, group: &str) -> anyhow::Result<bool> {
        let mut groups = self
            .groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if groups.remove(group).is_none() {
            return Ok(false);
        }
        let path = self.directory.join(file_name(group));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing {}", path.display()));
            }
        }
        std::fs::File::open(&self.directory)?.sync_all()?;
        Ok(true)
    }

    fn persist(&self, group: &str, offsets: &Offsets) -> anyhow::Result<()> {
        let path = self.directory.join(file_name(group));
        let temporary = self.directory.join(format!("{}.tmp", file_name(group)));
        std::fs::write(&temporary, encode(offsets))?;
        std::fs::File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(&self.directory)?.sync_all()?;
        Ok(())
    }

    pub fn fetch(&self, group: &str, topic: &str, partition: u32) -> Option<i64> {
        let groups = self
            .groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        groups
            .get(group)?
            .get(&(topic.to_string(), partition))
            .copied()
    }

    /// Every group with its offsets, for listing.
    pub fn list(&self) -> Vec<(String, GroupOffsets)> {
        let groups = self
            .groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        groups
            .iter()
            .map(|(group, offsets)| {
                let offsets = offsets
                    .iter()
                    .map(|((topic, partition), offset)| (topic.clone(), *partition, *offset))
                    .collect();
                (group.clone(), offsets)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_survive_reopen_and_damage_is_refused() {
        let data = tempfile::tempdir().expect("tempdir");
        let store = GroupStore::open(data.path()).expect("open");
        store.commit("readers/1", "sensors", 0, 42).expect("commit");
        store.commit("readers/1", "sensors", 1, 7).expect("commit");
        assert!(store.commit("", "sensors", 0, 1).is_err());
        drop(store);
        let store = GroupStore::open(data.path()).expect("reopen");
        assert_eq!(store.fetch("readers/1", "sensors", 0), Some(42));
        assert_eq!(store.fetch("readers/1", "sensors", 1), Some(7));
        assert_eq!(store.fetch("readers/1", "other", 0), None);

        let path = data.path().join("groups").join(file_name("readers/1"));
        let text = std::fs::read_to_string(&path)
            .expect("read")
            .replace("42", "43");
        std::fs::write(&path, text).expect("damage");
        let store = GroupStore::open(data.path()).expect("reopen damaged");
        assert_eq!(
            store.fetch("readers/1", "sensors", 0),
            None,
            "a damaged file is not half-read"
        );
    }
}
