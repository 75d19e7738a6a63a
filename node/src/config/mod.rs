//! The broker's configuration: its sections, their built-in defaults, and
//! how they are assembled in layers — built-in defaults < hardware profile <
//! configuration file < `RILL_*` environment < `--set` arguments — then
//! checked, with every error naming the key and the file line, variable or
//! argument it came from. docs/config.md documents every key.

mod bridge;
mod detect;
mod error;
mod keys;
mod layers;
mod mirror;
mod mqtt;
pub mod profile;
mod topic;
mod validate;
mod values;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::io::IoDriverSetting;
use layers::Leaf;
use values::{io_driver, socket_address, zero_is_none};

pub use bridge::{BridgeProtocolSetting, MqttBridgeSection};
pub use detect::{Detection, DiskFact, DiskKind, MachineFacts, detect};
pub use error::{ConfigError, Origin};
pub use keys::{KeyDoc, NON_CONFIG_VARIABLES, documented_keys, environment_variable};
pub use mirror::{
    MirrorDestination, MirrorDestinationSetting, MirrorPrioritySetting, MirrorSection, MirrorTls,
};
pub use mqtt::{MqttKeySetting, MqttRuleSetting, MqttSection, UnmatchedSetting};
pub use profile::{Profile, builtin_profiles};
pub use topic::{DiskFullPolicySetting, FsyncSetting, TimestampTypeSetting, TopicSettings};

/// Shards allowed at most; more than this is a typo, not a machine.
pub const SHARDS_MAX: usize = 256;

/// The whole configuration, as the node runs with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The hardware profile in force (`none` when none; `auto` only from
    /// [`check_file`], which does not detect).
    pub profile: String,
    pub data_dir: PathBuf,
    pub node: NodeSection,
    pub listeners: ListenersSection,
    pub limits: LimitsSection,
    pub storage: StorageSection,
    pub topics: TopicsSection,
    pub topic_defaults: TopicSettings,
    pub tls: TlsSection,
    pub kafka: KafkaSection,
    pub mqtt: MqttSection,
    pub mirror: MirrorSection,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            profile: "auto".into(),
            data_dir: PathBuf::from("rill-data"),
            node: NodeSection::default(),
            listeners: ListenersSection::default(),
            limits: LimitsSection::default(),
            storage: StorageSection::default(),
            topics: TopicsSection::default(),
            topic_defaults: TopicSettings::default(),
            tls: TlsSection::default(),
            kafka: KafkaSection::default(),
            mqtt: MqttSection::default(),
            mirror: MirrorSection::default(),
        }
    }
}

impl Config {
    /// The configuration as a TOML file that loads back to the same values
    /// (for `rill config` output and support reports).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|error| {
            ConfigError::new(
                Origin::Default,
                None,
                format!(
                    "cannot write the configuration as TOML: {error} (is data_dir valid UTF-8?)"
                ),
            )
        })
    }
}

/// `[node]`: the process itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Resolved to at least 1 after loading; 0 in a file means "the
    /// profile's number, else one per core".
    pub shards: usize,
    #[serde(with = "io_driver")]
    pub io_driver: IoDriverSetting,
    pub memory_budget_bytes: u64,
    pub pin_threads: bool,
    pub move_connections: bool,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            shards: 0,
            io_driver: IoDriverSetting::Auto,
            memory_budget_bytes: 256 << 20,
            pin_threads: false,
            move_connections: true,
        }
    }
}

/// `[listeners]`: where clients connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenersSection {
    #[serde(with = "socket_address")]
    pub native: SocketAddr,
    #[serde(with = "socket_address")]
    pub kafka: SocketAddr,
    #[serde(with = "socket_address")]
    pub admin: SocketAddr,
    #[serde(with = "socket_address")]
    pub mqtt: SocketAddr,
}

impl Default for ListenersSection {
    /// Loopback only: opening a broker to the network is the operator's
    /// decision, not a default.
    fn default() -> Self {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Self {
            native: SocketAddr::new(loopback, 7470),
            kafka: SocketAddr::new(loopback, 9092),
            admin: SocketAddr::new(loopback, 7471),
            mqtt: SocketAddr::new(loopback, 1883),
        }
    }
}

/// `[limits]`: what one client, or all of them, may take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    pub connections_max: u32,
    pub frame_bytes_max: u32,
    /// Per connection.
    pub requests_in_flight_max: u32,
    pub fetch_wait_ms_max: u64,
    pub fetch_bytes_max: u32,
    pub buffer_memory_bytes_max: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            connections_max: 1024,
            frame_bytes_max: 4 << 20,
            requests_in_flight_max: 16,
            fetch_wait_ms_max: 30_000,
            fetch_bytes_max: 8 << 20,
            buffer_memory_bytes_max: 64 << 20,
        }
    }
}

/// `[storage]`: the data directory as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// `None` (0 or absent in files): no quota.
    #[serde(with = "zero_is_none")]
    pub disk_quota_bytes: Option<u64>,
    pub checkpoint_interval_ms: u64,
    pub retention_check_interval_ms: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            disk_quota_bytes: None,
            checkpoint_interval_ms: 30_000,
            retention_check_interval_ms: 60_000,
        }
    }
}

/// `[topics]`: how topics come to exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsSection {
    pub auto_create: bool,
    pub default_partitions: u32,
}

impl Default for TopicsSection {
    fn default() -> Self {
        Self {
            auto_create: true,
            default_partitions: 1,
        }
    }
}

/// `[tls]`: TLS (rustls) on every listener once a certificate and key are
/// given. Empty strings mean "not set".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file with the certificate chain the listeners present.
    pub cert_file: String,
    /// PEM file with the certificate's private key.
    pub key_file: String,
    /// PEM file of CAs whose client certificates are accepted; when set,
    /// clients must present one.
    pub client_ca_file: String,
}

impl TlsSection {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

/// `[kafka]`: the Kafka wire protocol's view of this broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSection {
    /// Empty: the Kafka listener's IP.
    pub advertised_host: String,
    /// 0: the Kafka listener's port.
    pub advertised_port: u16,
    pub group_initial_rebalance_delay_ms: u64,
    pub group_session_timeout_ms_min: u64,
    pub group_session_timeout_ms_max: u64,
    pub group_members_max: u32,
    pub producer_id_expiration_ms: u64,
    /// Empty: Kafka clients need not authenticate.
    pub sasl_users_file: String,
    /// Comma-separated SASL mechanisms offered when `sasl_users_file` is set.
    pub sasl_mechanisms: String,
}

impl KafkaSection {
    /// The SASL mechanisms offered, as configured (validated at load).
    pub fn sasl_mechanism_list(&self) -> Vec<String> {
        self.sasl_mechanisms
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl Default for KafkaSection {
    /// Kafka's own defaults, but for a shorter first-rebalance delay: an
    /// edge box has few consumers, and they start together.
    fn default() -> Self {
        Self {
            advertised_host: String::new(),
            advertised_port: 0,
            group_initial_rebalance_delay_ms: 1_000,
            group_session_timeout_ms_min: 6_000,
            group_session_timeout_ms_max: 1_800_000,
            group_members_max: 1_000,
            producer_id_expiration_ms: 86_400_000,
            sasl_users_file: String::new(),
            sasl_mechanisms: "PLAIN,SCRAM-SHA-256".into(),
        }
    }
}

/// A loaded configuration with how it came about, for `rill config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub config: Config,
    /// The detection, when the profile was detected rather than named.
    pub detection: Option<Detection>,
    /// Where each key's value came from; keys not listed are built-in defaults.
    pub origins: BTreeMap<String, Origin>,
}

/// Builds the configuration in layers: built-in defaults < hardware profile
/// < config file < `RILL_*` environment < `--set`. The profile is the
/// `profile` key of `--set`, else of the environment, else of the file;
/// absent or `auto`, it is detected from `machine`. `env` is the whole
/// process environment (`std::env::vars()`); only `RILL_` names are read.
pub fn load(
    file: Option<&Path>,
    sets: &[String],
    env: &[(String, String)],
    machine: &MachineFacts,
) -> Result<Config, ConfigError> {
    load_with_report(file, sets, env, machine).map(|loaded| loaded.config)
}

/// [`load`], also saying which profile was detected and why, and where
/// each value came from.
pub fn load_with_report(
    file: Option<&Path>,
    sets: &[String],
    env: &[(String, String)],
    machine: &MachineFacts,
) -> Result<Loaded, ConfigError> {
    let file_leaves = match file {
        Some(path) => read_file_leaves(path)?,
        None => Vec::new(),
    };
    let env_leaves = layers::environment_leaves(env)?;
    let set_leaves = layers::set_leaves(sets)?;
    let requested = [&set_leaves, &env_leaves, &file_leaves]
        .into_iter()
        .find_map(|leaves| leaves.iter().rev().find(|leaf| leaf.key == "profile"));
    let (profile, detection) = match requested {
        Some(leaf) if leaf.value.as_str() != Some("auto") => (
            ProfileChoice::Named {
                name: leaf.value.as_str().unwrap_or_default().to_string(),
                origin: leaf.origin.clone(),
            },
            None,
        ),
        _ => {
            let detection = detect(machine);
            (
                ProfileChoice::Named {
                    name: detection.profile.clone(),
                    origin: Origin::Machine,
                },
                Some(detection),
            )
        }
    };
    let (config, origins) = build(
        profile,
        &[file_leaves, env_leaves, set_leaves],
        machine.cores,
    )?;
    Ok(Loaded {
        config,
        detection,
        origins,
    })
}

/// Parses and validates one file on its own: no environment, no `--set`,
/// no detection. A profile the file names is applied; without one (or with
/// `auto`) none is, and `profile` stays `auto`. `shards = 0` resolves to
/// this machine's core count.
pub fn check_file(path: &Path) -> Result<Config, ConfigError> {
    let file_leaves = read_file_leaves(path)?;
    let profile = match file_leaves.iter().rev().find(|leaf| leaf.key == "profile") {
        Some(leaf) if leaf.value.as_str() != Some("auto") => ProfileChoice::Named {
            name: leaf.value.as_str().unwrap_or_default().to_string(),
            origin: leaf.origin.clone(),
        },
        _ => ProfileChoice::Undetected,
    };
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    build(profile, &[file_leaves], cores).map(|(config, _)| config)
}

enum ProfileChoice {
    Named {
        name: String,
        origin: Origin,
    },
    /// `check_file` without a named profile: none applied, `auto` reported.
    Undetected,
}

fn read_file_leaves(path: &Path) -> Result<Vec<Leaf>, ConfigError> {
    let origin_at = |position: Option<(usize, usize)>| Origin::File {
        path: path.to_path_buf(),
        line: position.map(|(line, _)| line),
        column: position.map(|(_, column)| column),
    };
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::new(
            origin_at(None),
            None,
            format!(
                "cannot read the configuration file: {error}; check the path and its permissions"
            ),
        )
    })?;
    layers::document_leaves(&text, &origin_at, None)
}

/// The leaves of a built-in profile, or an error naming the known ones.
fn profile_leaves(name: &str, origin: &Origin) -> Result<Vec<Leaf>, ConfigError> {
    if name == profile::NONE {
        return Ok(Vec::new());
    }
    let Some(found) = profile::find(name) else {
        let mut names = vec!["auto", profile::NONE];
        let builtin = builtin_profiles();
        names.extend(builtin.iter().map(|profile| profile.name));
        return Err(ConfigError::new(
            origin.clone(),
            Some("profile"),
            values::unknown_value(name, &names),
        ));
    };
    let profile_origin = |_: Option<(usize, usize)>| Origin::Profile {
        name: name.to_string(),
    };
    layers::document_leaves(found.raw_toml, &profile_origin, Some("profile"))
}

/// Merges the profile under `layers`, resolves the profile name and the
/// shard count, and validates.
fn build(
    profile: ProfileChoice,
    layers: &[Vec<Leaf>],
    cores: usize,
) -> Result<(Config, BTreeMap<String, Origin>), ConfigError> {
    let (name, profile_origin, profile_leaves) = match profile {
        ProfileChoice::Named { name, origin } => {
            let leaves = profile_leaves(&name, &origin)?;
            (name, origin, leaves)
        }
        ProfileChoice::Undetected => ("auto".to_string(), Origin::Default, Vec::new()),
    };
    let (table, mut origins) = layers::merge(
        std::iter::once(profile_leaves.as_slice()).chain(layers.iter().map(Vec::as_slice)),
    );
    // Every leaf was type-checked on its own, so this only fails on a bug.
    let mut config: Config = table.try_into().map_err(|error| {
        ConfigError::new(
            Origin::Default,
            None,
            error.message().trim_end().to_string(),
        )
    })?;
    config.profile = name.clone();
    origins.insert("profile".into(), profile_origin);
    if config.node.shards == 0 {
        // 0 defers to the profile, even when a file or override wrote it.
        let from_profile = profile_leaves
            .iter()
            .find(|leaf| leaf.key == "node.shards")
            .and_then(|leaf| leaf.value.as_integer())
            .and_then(|shards| usize::try_from(shards).ok())
            .filter(|shards| *shards > 0);
        let (shards, origin) = match from_profile {
            Some(shards) => (shards, Origin::Profile { name }),
            None => (cores.clamp(1, SHARDS_MAX), Origin::Machine),
        };
        config.node.shards = shards;
        origins.insert("node.shards".into(), origin);
    }
    validate::validate(&config, &origins)?;
    Ok((config, origins))
}
