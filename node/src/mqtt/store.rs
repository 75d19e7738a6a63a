//! MQTT state on disk, under `DATA_DIR/mqtt/`: one file per stored session
//! in `sessions/` and one per retained message in `retained/`, each in the
//! checked formats of `rill-edge-bridge` (version, body, CRC-32; layouts in
//! docs/format.md) and replaced atomically (write a temporary file, sync
//! it, rename it over the old one, sync the directory), so a power cut
//! leaves the old entry or the new one, never half of either.
//!
//! A file is named by the hex of its key (client identifier, MQTT topic)
//! when that is short enough for a file name, else by a hash of the key
//! with a number that makes it unique; the key is inside the file either
//! way, so names only have to be unique, not reversible.
//!
//! Memory is the authority: a change is made in memory first, then the
//! key's file is brought in line with whatever memory holds by
//! [`Directory::sync`], under one lock per directory. Whichever sync runs
//! last writes the newest value, so syncs for one key may run in any order
//! and from any thread. Files that fail their check at start are logged
//! with what is wrong and left aside (renamed `*.damaged`), never half-read.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

/// Keys up to this many bytes name their file by their hex.
const HEX_NAME_BYTES_MAX: usize = 100;

/// One directory of keyed entries.
#[derive(Debug)]
pub(crate) struct Directory {
    path: PathBuf,
    extension: &'static str,
    /// Key to file name, for keys that have a file; held while writing.
    names: Mutex<HashMap<String, String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// FNV-1a, 64 bits: spreads long keys over file names.
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Directory {
    /// Opens (creating) `path` and reads every entry with `decode`, which
    /// gives the entry's key. Damaged entries are logged and set aside.
    pub(crate) fn open<T>(
        path: PathBuf,
        extension: &'static str,
        what: &str,
        decode: impl Fn(&[u8]) -> Result<(String, T), String>,
    ) -> anyhow::Result<(Directory, Vec<(String, T)>)> {
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating the MQTT {what} directory {}", path.display()))?;
        let mut names = HashMap::new();
        let mut entries = Vec::new();
        let listing = std::fs::read_dir(&path)
            .with_context(|| format!("listing the MQTT {what} directory {}", path.display()))?;
        for entry in listing {
            let entry = entry?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let file = entry.path();
            if file_name.ends_with(".tmp") {
                // A write that a crash interrupted: the old entry stands.
                let _ = std::fs::remove_file(&file);
                continue;
            }
            if !file_name.ends_with(extension) {
                continue;
            }
            let decoded = std::fs::read(&file)
                .map_err(|error| error.to_string())
                .and_then(|bytes| decode(&bytes));
            match decoded {
                Ok((key, value)) => {
                    if let Some(other) = names.insert(key.clone(), file_name.clone()) {
                        tracing::warn!(file = %file.display(), other, "two MQTT {what} files hold one key; keeping the later one read");
                    }
                    entries.push((key, value));
                }
                Err(error) => {
                    let aside = path.join(format!("{file_name}.damaged"));
                    tracing::error!(
                        file = %file.display(),
                        %error,
                        "MQTT {what} file is damaged; it is skipped and renamed to {}",
                        aside.display()
                    );
                    let _ = std::fs::rename(&file, &aside);
                }
            }
        }
        Ok((
            Directory {
                path,
                extension,
                names: Mutex::new(names),
            },
            entries,
        ))
    }

    /// Brings `key`'s file in line with `current()` (called under this
    /// directory's lock, so it reads the newest value): written when
    /// `Some`, deleted when `None`.
    pub(crate) fn sync(
        &self,
        key: &str,
        current: impl FnOnce() -> Option<Vec<u8>>,
    ) -> std::io::Result<()> {
        let mut names = lock(&self.names);
        match current() {
            Some(bytes) => {
                let name = match names.get(key) {
                    Some(name) => name.clone(),
                    None => {
                        let name = self.new_name(key, &names);
                        names.insert(key.to_owned(), name.clone());
                        name
                    }
                };
                write_atomically(&self.path, &name, &bytes)
            }
            None => {
                let Some(name) = names.remove(key) else {
                    return Ok(());
                };
                match std::fs::remove_file(self.path.join(&name)) {
                    Ok(()) => std::fs::File::open(&self.path)?.sync_all(),
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(error) => Err(error),
                }
            }
        }
    }

    fn new_name(&self, key: &str, names: &HashMap<String, String>) -> String {
        if key.len() <= HEX_NAME_BYTES_MAX {
            return format!("{}{}", hex(key.as_bytes()), self.extension);
        }
        let hash = fnv64(key.as_bytes());
        let taken: std::collections::HashSet<&String> = names.values().collect();
        (0u32..)
            .map(|number| format!("h{hash:016x}-{number}{}", self.extension))
            .find(|name| !taken.contains(name))
            .unwrap_or_default()
    }
}

fn write_atomically(directory: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = directory.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    drop(file);
    std::fs::rename(&temporary, directory.join(name))?;
    std::fs::File::open(directory)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<(String, String), String> {
        let text = std::str::from_utf8(bytes).map_err(|error| error.to_string())?;
        let (key, value) = text.split_once('=').ok_or("no =")?;
        Ok((key.to_owned(), value.to_owned()))
    }

    #[test]
    fn entries_survive_reopen_long_keys_get_unique_names_and_damage_is_set_aside()
    -> anyhow::Result<()> {
        let temporary = tempfile::tempdir()?;
        let path = temporary.path().join("sessions");
        let (directory, entries) = Directory::open(path.clone(), ".s", "test", decode)?;
        assert!(entries.is_empty());
        let long_a = "a".repeat(300);
        let long_b = "b".repeat(300);
        for key in ["short", long_a.as_str(), long_b.as_str(), "gone"] {
            directory.sync(key, || Some(format!("{key}=v").into_bytes()))?;
        }
        directory.sync("gone", || None)?;
        std::fs::write(path.join("bad.s"), b"no equals sign")?;
        std::fs::write(path.join("half.s.tmp"), b"x=y")?;
        let (_, mut entries) = Directory::open(path.clone(), ".s", "test", decode)?;
        entries.sort();
        let keys: Vec<&str> = entries.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys, [long_a.as_str(), long_b.as_str(), "short"]);
        assert!(path.join("bad.s.damaged").exists());
        assert!(!path.join("half.s.tmp").exists());
        Ok(())
    }
}
