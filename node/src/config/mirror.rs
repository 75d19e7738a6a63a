//! `[mirror]`: the replicator that mirrors topics to central Kafka-protocol
//! clusters (docs/mirror.md). Destinations are an array of tables:
//!
//! ```toml
//! [mirror]
//! edge_id = "truck-17"
//!
//! [[mirror.destinations]]
//! name = "central"
//! bootstrap_servers = ["kafka-1.example:9093"]
//! include = ["*"]
//! exclude = ["scratch.*"]
//! priorities = [{ pattern = "alarms*", priority = 200 }]
//! bandwidth_bytes_per_s = 250000
//! ```
//!
//! (also as one value: `mirror.destinations=[{name="central", ...}]`).
//! No destination: the replicator is off.

use serde::{Deserialize, Serialize};

use rill_edge_bridge::replicator::batch::{BatchLimits, Compression};
use rill_edge_bridge::replicator::client::{
    BrokerAddress, ClientConfig, SaslConfig, SaslMechanism, TopicCreation,
};
use rill_edge_bridge::replicator::plan::{
    Backoff, Priorities, RenamePolicy, TopicSelection, validate_edge_id,
};

/// `[mirror]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorSection {
    /// Empty: the host name, with characters an edge id may not hold
    /// replaced by `-`.
    pub edge_id: String,
    /// Unmirrored bytes per partition that retention and the disk quota
    /// leave in place; 0: no protection.
    pub unmirrored_bytes_max: u64,
    pub checkpoint_interval_ms: u64,
    /// Wait after a start before reading destination tails (the
    /// destination's `replica.lag.time.max.ms`).
    pub reconcile_delay_ms: u64,
    pub topic_refresh_ms: u64,
    pub destinations: Vec<MirrorDestinationSetting>,
}

impl Default for MirrorSection {
    fn default() -> Self {
        Self {
            edge_id: String::new(),
            unmirrored_bytes_max: 1 << 30,
            checkpoint_interval_ms: 1_000,
            reconcile_delay_ms: 30_000,
            topic_refresh_ms: 5_000,
            destinations: Vec::new(),
        }
    }
}

/// One `priorities` entry of a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorPrioritySetting {
    pub pattern: String,
    pub priority: u8,
}

/// One `[[mirror.destinations]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorDestinationSetting {
    pub name: String,
    pub bootstrap_servers: Vec<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// `edge-prefix` (`EDGE_ID.TOPIC`) or `identity`.
    pub rename: String,
    pub create_topics: bool,
    /// -1: the destination's default.
    pub create_partitions: i32,
    pub create_replication_factor: i16,
    pub priorities: Vec<MirrorPrioritySetting>,
    pub default_priority: u8,
    /// 0: no cap.
    pub bandwidth_bytes_per_s: u64,
    pub linger_ms: u64,
    pub batch_bytes_max: u64,
    /// none, gzip, snappy, lz4 or zstd.
    pub compression: String,
    pub request_timeout_ms: u64,
    pub backoff_ms_min: u64,
    pub backoff_ms_max: u64,
    pub tls: bool,
    pub tls_ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// Empty: the bootstrap host.
    pub tls_server_name: String,
    /// Empty: no SASL; else plain, scram-sha-256 or scram-sha-512.
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password_file: String,
}

impl Default for MirrorDestinationSetting {
    fn default() -> Self {
        Self {
            name: String::new(),
            bootstrap_servers: Vec::new(),
            include: vec!["*".into()],
            exclude: Vec::new(),
            rename: "edge-prefix".into(),
            create_topics: true,
            create_partitions: -1,
            create_replication_factor: -1,
            priorities: Vec::new(),
            default_priority: 100,
            bandwidth_bytes_per_s: 0,
            linger_ms: 50,
            batch_bytes_max: 512 * 1024,
            compression: "none".into(),
            request_timeout_ms: 30_000,
            backoff_ms_min: 100,
            backoff_ms_max: 30_000,
            tls: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_server_name: String::new(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password_file: String::new(),
        }
    }
}

/// A destination as the driver runs it: every setting checked.
#[derive(Debug, Clone)]
pub struct MirrorDestination {
    pub name: String,
    pub selection: TopicSelection,
    pub rename: RenamePolicy,
    pub priorities: Priorities,
    pub bandwidth_bytes_per_s: Option<u64>,
    pub batch: BatchLimits,
    pub compression: Compression,
    pub client: ClientConfig,
    pub tls: Option<MirrorTls>,
}

#[derive(Debug, Clone)]
pub struct MirrorTls {
    pub ca_file: String,
    pub identity: Option<(String, String)>,
    pub server_name: String,
}

/// The largest uplink batch allowed (a Kafka broker's default message
/// limit is about 1 MiB; larger ones are for clusters that allow them).
const BATCH_BYTES_MAX: u64 = 16 << 20;

pub(crate) fn parse_address(text: &str) -> Result<BrokerAddress, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{text:?} has no valid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(format!("{text:?} is not host:port"));
    }
    Ok(BrokerAddress {
        host: host.to_string(),
        port,
    })
}

fn compression(name: &str) -> Result<Compression, String> {
    Ok(match name {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "snappy" => Compression::Snappy,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd,
        other => {
            return Err(format!(
                "compression {other:?} is not one of none, gzip, snappy, lz4, zstd"
            ));
        }
    })
}

impl MirrorSection {
    /// The edge id in force: the configured one, else from the host name.
    pub fn effective_edge_id(&self) -> String {
        if !self.edge_id.is_empty() {
            return self.edge_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let cleaned: String = host
            .trim()
            .chars()
            .map(|character| {
                if character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-') {
                    character
                } else {
                    '-'
                }
            })
            .take(rill_edge_bridge::replicator::plan::EDGE_ID_BYTES_MAX)
            .collect();
        if cleaned.is_empty() {
            "rill-edge".into()
        } else {
            cleaned
        }
    }

    /// Every destination checked; the first problem as `(key, message)`.
    pub fn destinations(&self) -> Result<Vec<MirrorDestination>, (&'static str, String)> {
        let mut names = std::collections::BTreeSet::new();
        self.destinations
            .iter()
            .enumerate()
            .map(|(index, setting)| {
                let label = format!("destination {} ({:?})", index + 1, setting.name);
                let bad = |message: String| ("mirror.destinations", format!("{label}: {message}"));
                if !names.insert(setting.name.clone()) {
                    return Err(bad("two destinations have this name".into()));
                }
                setting.check().map_err(bad)
            })
            .collect()
    }
}

impl MirrorDestinationSetting {
    fn check(&self) -> Result<MirrorDestination, String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
        if !name_ok {
            return Err(
                "name must be 1 to 64 bytes of letters, digits, '.', '_' or '-' (it names the checkpoint file)".into(),
            );
        }
        if self.bootstrap_servers.is_empty() {
            return Err("bootstrap_servers needs at least one host:port".into());
        }
        let bootstrap = self
            .bootstrap_servers
            .iter()
            .map(|server| parse_address(server))
            .collect::<Result<Vec<_>, _>>()?;
        let include: Vec<&str> = self.include.iter().map(String::as_str).collect();
        let exclude: Vec<&str> = self.exclude.iter().map(String::as_str).collect();
        let selection = TopicSelection::new(&include, &exclude)
            .map_err(|error| format!("include/exclude: {error}"))?;
        let rename = match self.rename.as_str() {
            "edge-prefix" => RenamePolicy::EdgePrefix,
            "identity" => RenamePolicy::Identity,
            other => {
                return Err(format!(
                    "rename {other:?} is not one of edge-prefix, identity"
                ));
            }
        };
        let rules: Vec<(&str, u8)> = self
            .priorities
            .iter()
            .map(|rule| (rule.pattern.as_str(), rule.priority))
            .collect();
        let priorities = Priorities::new(&rules, self.default_priority)
            .map_err(|error| format!("priorities: {error}"))?;
        if !(1..=BATCH_BYTES_MAX).contains(&self.batch_bytes_max) {
            return Err(format!(
                "batch_bytes_max {} is out of range: 1 to {BATCH_BYTES_MAX}",
                self.batch_bytes_max
            ));
        }
        if self.linger_ms > 60_000 {
            return Err(format!(
                "linger_ms {} is out of range: at most 60000",
                self.linger_ms
            ));
        }
        if self.request_timeout_ms < 100 {
            return Err(format!(
                "request_timeout_ms {} is out of range: at least 100",
                self.request_timeout_ms
            ));
        }
        let backoff = Backoff {
            initial_ms: self.backoff_ms_min,
            max_ms: self.backoff_ms_max,
            jitter_percent: 50,
        };
        backoff
            .validate()
            .map_err(|_| "backoff needs 0 < backoff_ms_min <= backoff_ms_max".to_string())?;
        let sasl = match self.sasl_mechanism.as_str() {
            "" => None,
            mechanism => {
                let mechanism = match mechanism {
                    "plain" => SaslMechanism::Plain,
                    "scram-sha-256" => SaslMechanism::ScramSha256,
                    "scram-sha-512" => SaslMechanism::ScramSha512,
                    other => {
                        return Err(format!(
                            "sasl_mechanism {other:?} is not one of plain, scram-sha-256, scram-sha-512"
                        ));
                    }
                };
                if self.sasl_username.is_empty() || self.sasl_password_file.is_empty() {
                    return Err("SASL needs sasl_username and sasl_password_file".to_string());
                }
                Some(SaslConfig {
                    mechanism,
                    username: self.sasl_username.clone(),
                    // Read when the replicator starts.
                    password: String::new(),
                })
            }
        };
        let tls = if self.tls {
            if self.tls_ca_file.is_empty() {
                return Err("tls needs tls_ca_file".into());
            }
            if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
                return Err("tls_cert_file and tls_key_file go together".into());
            }
            Some(MirrorTls {
                ca_file: self.tls_ca_file.clone(),
                identity: (!self.tls_cert_file.is_empty())
                    .then(|| (self.tls_cert_file.clone(), self.tls_key_file.clone())),
                server_name: if self.tls_server_name.is_empty() {
                    bootstrap[0].host.clone()
                } else {
                    self.tls_server_name.clone()
                },
            })
        } else {
            None
        };
        let client = ClientConfig {
            bootstrap,
            client_id: format!("rill-mirror-{}", self.name),
            sasl,
            create_topics: self.create_topics.then_some(TopicCreation {
                partitions: self.create_partitions,
                replication_factor: self.create_replication_factor,
            }),
            request_timeout_ms: self.request_timeout_ms,
            produce_timeout_ms: i32::try_from(self.request_timeout_ms).unwrap_or(i32::MAX),
            response_bytes_max: (self.batch_bytes_max as usize).max(1 << 20) * 2 + (1 << 20),
            backoff,
            ..ClientConfig::default()
        };
        Ok(MirrorDestination {
            name: self.name.clone(),
            selection,
            rename,
            priorities,
            bandwidth_bytes_per_s: (self.bandwidth_bytes_per_s > 0)
                .then_some(self.bandwidth_bytes_per_s),
            batch: BatchLimits {
                batch_bytes_max: self.batch_bytes_max as usize,
                linger_ms: self.linger_ms,
                ..BatchLimits::default()
            },
            compression: compression(&self.compression)?,
            client,
            tls,
        })
    }

    /// Reads the SASL password file (a final line break dropped).
    pub fn read_password(&self) -> std::io::Result<String> {
        let text = std::fs::read_to_string(&self.sasl_password_file)?;
        Ok(text
            .strip_suffix('\n')
            .map(|text| text.strip_suffix('\r').unwrap_or(text))
            .unwrap_or(&text)
            .to_string())
    }
}

/// Ranges and the destinations; `fail` reports against the key.
pub(crate) fn validate(
    config: &super::Config,
    fail: &dyn Fn(&str, String) -> Result<(), super::ConfigError>,
) -> Result<(), super::ConfigError> {
    let mirror = &config.mirror;
    if !mirror.edge_id.is_empty()
        && let Err(error) = validate_edge_id(&mirror.edge_id)
    {
        return fail("mirror.edge_id", error.to_string());
    }
    for (key, value) in [
        (
            "mirror.checkpoint_interval_ms",
            mirror.checkpoint_interval_ms,
        ),
        ("mirror.topic_refresh_ms", mirror.topic_refresh_ms),
    ] {
        if value < 100 {
            return fail(key, format!("{value} is out of range: at least 100 ms"));
        }
    }
    if let Err((key, message)) = mirror.destinations() {
        return fail(key, message);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_check_and_errors_name_the_destination() {
        let mut section = MirrorSection::default();
        assert!(
            section
                .destinations()
                .map(|d| d.is_empty())
                .unwrap_or(false)
        );
        section.destinations.push(MirrorDestinationSetting {
            name: "central".into(),
            bootstrap_servers: vec!["127.0.0.1:9092".into()],
            ..MirrorDestinationSetting::default()
        });
        let checked = section.destinations().expect("valid");
        assert_eq!(checked[0].client.bootstrap[0].port, 9092);
        assert_eq!(checked[0].rename, RenamePolicy::EdgePrefix);
        section.destinations[0].compression = "brotli".into();
        let (key, message) = section.destinations().expect_err("bad codec");
        assert_eq!(key, "mirror.destinations");
        assert!(message.contains("destination 1 (\"central\")"), "{message}");
        assert!(message.contains("brotli"), "{message}");
        section.destinations[0].compression = "zstd".into();
        section.destinations[0].bootstrap_servers = vec!["nohost".into()];
        assert!(section.destinations().is_err());
    }

    #[test]
    fn the_example_in_docs_mirror_md_is_a_valid_file() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/mirror.md"),
        )
        .expect("docs/mirror.md");
        let start = docs.find("```toml\n").expect("a toml example") + "```toml\n".len();
        let length = docs[start..].find("```").expect("the example ends");
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("mirror.toml");
        std::fs::write(&path, &docs[start..start + length]).expect("write");
        let config = crate::config::check_file(&path).expect("valid");
        let destinations = config.mirror.destinations().expect("valid destinations");
        assert_eq!(destinations.len(), 1);
        assert_eq!(destinations[0].bandwidth_bytes_per_s, Some(250_000));
        assert!(destinations[0].tls.is_some() && destinations[0].client.sasl.is_some());
        assert_eq!(config.mirror.effective_edge_id(), "truck-17");
    }

    #[test]
    fn edge_id_from_the_host_name_is_valid() {
        let id = MirrorSection::default().effective_edge_id();
        assert!(validate_edge_id(&id).is_ok(), "{id}");
    }
}
