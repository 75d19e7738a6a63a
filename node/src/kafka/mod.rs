//! The Kafka wire protocol: a listener on every shard that serves
//! unmodified Kafka clients over the same logs, topics and groups as the
//! native protocol, so a record written by either is read by both at the
//! same offset.
//!
//! Codecs come from the `kafka-protocol` crate; everything else is here:
//! framing and in-order answers ([`connection`]), the version table
//! ([`api`]), error codes ([`errors`]), and one module per family of APIs.

pub mod admin;
pub mod api;
pub mod codec;
pub mod connection;
pub mod coordinator;
pub mod errors;
pub mod fetch;
pub mod groups;
pub mod produce;
pub mod sasl;

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;

use rill_edge_bridge::mqtt::auth::PasswordFile;

use crate::broker::producers::ProducerIdAllocator;
use crate::config::KafkaSection;
use coordinator::{CoordinatorConfig, GroupCoordinator};

/// Broker-wide state of the Kafka protocol, shared by all shards.
#[derive(Debug)]
pub struct KafkaState {
    /// Consumer groups; shard 0 ticks it for timeouts.
    pub coordinator: Mutex<GroupCoordinator>,
    pub producer_ids: Mutex<ProducerIdAllocator>,
    /// Kafka's cluster id: made once per data directory, kept across restarts.
    pub cluster_id: String,
    /// Who may connect, when `kafka.sasl_users_file` is set: every
    /// connection authenticates before its first other request.
    pub sasl_users: Option<std::sync::Arc<PasswordFile>>,
    /// The mechanisms offered, as SaslHandshake names.
    pub sasl_mechanisms: Vec<String>,
}

impl KafkaState {
    pub fn open(data_dir: &Path, settings: &KafkaSection) -> anyhow::Result<Self> {
        let clamp = |ms: u64| i32::try_from(ms).unwrap_or(i32::MAX);
        let coordinator = GroupCoordinator::new(CoordinatorConfig {
            session_timeout_min_ms: clamp(settings.group_session_timeout_ms_min),
            session_timeout_max_ms: clamp(settings.group_session_timeout_ms_max),
            initial_rebalance_delay_ms: clamp(settings.group_initial_rebalance_delay_ms),
            group_members_max: settings.group_members_max as usize,
            ..CoordinatorConfig::default()
        });
        let sasl_users = if settings.sasl_users_file.is_empty() {
            None
        } else {
            let file = &settings.sasl_users_file;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading kafka.sasl_users_file {file}"))?;
            let users = PasswordFile::parse(&text)
                .map_err(|error| anyhow::anyhow!("kafka.sasl_users_file {file}: {error}"))?;
            tracing::info!(users = users.len(), file = %file, mechanisms = %settings.sasl_mechanisms, "Kafka clients must authenticate with SASL");
            Some(std::sync::Arc::new(users))
        };
        Ok(Self {
            coordinator: Mutex::new(coordinator),
            producer_ids: Mutex::new(ProducerIdAllocator::open(data_dir)?),
            cluster_id: cluster_id(data_dir)?,
            sasl_users,
            sasl_mechanisms: settings.sasl_mechanism_list(),
        })
    }
}

/// The id in `DATA_DIR/cluster-id`, made on first start: 22 characters of
/// URL-safe base64, the shape Kafka's own cluster ids have.
fn cluster_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("cluster-id");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("reading {}", path.display()));
        }
    }
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut seed = crate::broker::now_ms() as u64 ^ (u64::from(std::process::id()) << 32);
    let mut id = String::with_capacity(22);
    for _ in 0..22 {
        // splitmix64: spreads the seed's few varying bits over every character.
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = seed;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^= mixed >> 31;
        id.push(ALPHABET[(mixed % 64) as usize] as char);
    }
    let temporary = data_dir.join("cluster-id.tmp");
    std::fs::write(&temporary, format!("{id}\n"))
        .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
        .and_then(|()| std::fs::rename(&temporary, &path))
        .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}
