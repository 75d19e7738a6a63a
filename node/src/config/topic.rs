//! Per-topic settings: the `[topic_defaults]` section of the configuration,
//! the settings a topic's metadata file persists (as TOML), and their mapping
//! onto `rill-core`'s `LogConfig` and eviction settings. Per-topic overrides
//! (`retention_ms=60000`) go through the same keys and checks as the file.

use rill_core::log::{FsyncPolicy, LogConfig, TimestampType};
use rill_core::logset::{DiskFullPolicy, EvictionSettings};
use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Origin};
use super::keys;
use super::values::{named_choice, zero_is_none};

named_choice! {
    /// When appended data is made durable (`topic_defaults.fsync`).
    FsyncSetting {
        /// Every append waits for a sync (group commit).
        #[default]
        EveryBatch => "every-batch",
        /// A sync every `fsync_interval_ms`; appends do not wait.
        IntervalMs => "interval-ms",
        /// Only rolls and shutdown sync.
        Never => "never",
    }
}

named_choice! {
    /// Which timestamp a stored batch carries (`topic_defaults.timestamp_type`).
    TimestampTypeSetting {
        #[default]
        CreateTime => "create-time",
        LogAppendTime => "log-append-time",
    }
}

named_choice! {
    /// What a topic's appends do when the disk quota is reached
    /// (`topic_defaults.disk_full_policy`).
    DiskFullPolicySetting {
        #[default]
        Reject => "reject",
        EvictOldest => "evict-oldest",
    }
}

/// Settings of one topic. Field meanings and units are in `keys.rs` (and
/// `docs/config.md`); `0` in an `Option` field means none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicSettings {
    pub segment_bytes_max: u64,
    #[serde(with = "zero_is_none")]
    pub segment_age_ms_max: Option<u64>,
    pub index_interval_bytes: u64,
    pub batch_bytes_max: u64,
    pub fsync: FsyncSetting,
    pub fsync_interval_ms: u64,
    pub timestamp_type: TimestampTypeSetting,
    #[serde(with = "zero_is_none")]
    pub retention_ms: Option<u64>,
    #[serde(with = "zero_is_none")]
    pub retention_bytes: Option<u64>,
    pub direct_io: bool,
    pub preallocate: bool,
    pub write_buffer_bytes: u64,
    pub disk_full_policy: DiskFullPolicySetting,
    pub eviction_priority: i32,
}

impl Default for TopicSettings {
    /// `rill-core`'s log defaults, so a topic configured nowhere behaves as
    /// the core's own tests assume.
    fn default() -> Self {
        let log = LogConfig::default();
        let (fsync, fsync_interval_ms) = match log.fsync {
            FsyncPolicy::EveryBatch => (FsyncSetting::EveryBatch, 1000),
            FsyncPolicy::IntervalMs(interval_ms) => (FsyncSetting::IntervalMs, interval_ms),
            FsyncPolicy::Never => (FsyncSetting::Never, 1000),
        };
        Self {
            segment_bytes_max: log.segment_bytes_max,
            segment_age_ms_max: log.segment_age_ms_max,
            index_interval_bytes: log.index_interval_bytes,
            batch_bytes_max: log.batch_bytes_max,
            fsync,
            fsync_interval_ms,
            timestamp_type: match log.timestamp_type {
                TimestampType::CreateTime => TimestampTypeSetting::CreateTime,
                TimestampType::LogAppendTime => TimestampTypeSetting::LogAppendTime,
            },
            retention_ms: log.retention_ms,
            retention_bytes: log.retention_bytes,
            direct_io: log.direct_io,
            preallocate: log.preallocate,
            write_buffer_bytes: log.write_buffer_bytes as u64,
            disk_full_policy: DiskFullPolicySetting::Reject,
            eviction_priority: 0,
        }
    }
}

impl TopicSettings {
    /// The partition log settings these map to.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes_max: self.segment_bytes_max,
            segment_age_ms_max: self.segment_age_ms_max,
            index_interval_bytes: self.index_interval_bytes,
            batch_bytes_max: self.batch_bytes_max,
            fsync: match self.fsync {
                FsyncSetting::EveryBatch => FsyncPolicy::EveryBatch,
                FsyncSetting::IntervalMs => FsyncPolicy::IntervalMs(self.fsync_interval_ms),
                FsyncSetting::Never => FsyncPolicy::Never,
            },
            timestamp_type: match self.timestamp_type {
                TimestampTypeSetting::CreateTime => TimestampType::CreateTime,
                TimestampTypeSetting::LogAppendTime => TimestampType::LogAppendTime,
            },
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            direct_io: self.direct_io,
            preallocate: self.preallocate,
            // Saturating keeps a 32-bit build from wrapping a huge value into
            // a small one; `LogConfig::check` then refuses it.
            write_buffer_bytes: usize::try_from(self.write_buffer_bytes).unwrap_or(usize::MAX),
        }
    }

    /// The topic's place in disk-full eviction.
    pub fn eviction(&self) -> EvictionSettings {
        EvictionSettings {
            disk_full: match self.disk_full_policy {
                DiskFullPolicySetting::Reject => DiskFullPolicy::Reject,
                DiskFullPolicySetting::EvictOldest => DiskFullPolicy::EvictOldest,
            },
            eviction_priority: self.eviction_priority,
        }
    }

    /// Applies `key=value` overrides (the keys of `[topic_defaults]`, e.g.
    /// `retention_ms=60000`, `fsync=never`). All or nothing: on an error the
    /// settings are unchanged. Errors name the key and the allowed values.
    pub fn apply_overrides(&mut self, overrides: &[(String, String)]) -> Result<(), ConfigError> {
        let mut table = toml::Table::try_from(&*self).map_err(|error| {
            ConfigError::new(
                Origin::Default,
                None,
                format!("cannot represent the topic settings as TOML: {error}"),
            )
        })?;
        let mut origins = Vec::with_capacity(overrides.len());
        for (key, raw_value) in overrides {
            let origin = Origin::Override {
                argument: format!("{key}={raw_value}"),
            };
            let dotted = format!("{}.{key}", keys::TOPIC_SECTION);
            let Some(info) = keys::find(&dotted) else {
                let known: Vec<&str> = keys::topic_keys().collect();
                let hint = keys::suggest(key, known.iter().copied())
                    .map(|near| format!("did you mean `{near}`? "))
                    .unwrap_or_default();
                return Err(ConfigError::new(
                    origin,
                    Some(key),
                    format!(
                        "unknown topic setting; {hint}expected one of {}",
                        known.join(", ")
                    ),
                ));
            };
            let value = keys::parse_override_value(raw_value, info);
            // Typed one key at a time so the error is this key's.
            let mut single = toml::Table::new();
            single.insert(key.clone(), value.clone());
            if let Err(error) = single.try_into::<TopicSettings>() {
                return Err(ConfigError::new(
                    origin,
                    Some(key),
                    keys::explain_value_error(error.message(), &value, info),
                ));
            }
            table.insert(key.clone(), value);
            origins.push((key.as_str(), origin));
        }
        let updated: TopicSettings = table.try_into().map_err(|error| {
            ConfigError::new(Origin::Default, None, error.message().to_string())
        })?;
        updated.log_config().check().map_err(|error| {
            let origin = origins
                .iter()
                .rev()
                .find(|(key, _)| *key == error.key)
                .map(|(_, origin)| origin.clone())
                .unwrap_or(Origin::Default);
            ConfigError::new(
                origin,
                Some(error.key),
                format!("{} is out of range: {}", error.value, error.reason),
            )
        })?;
        *self = updated;
        Ok(())
    }
}
