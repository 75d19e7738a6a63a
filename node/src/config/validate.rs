//! Range and consistency checks on the assembled configuration. Types are
//! checked per key while loading; what is left is what only makes sense with
//! values in hand (ranges, one limit against another). Each failure is
//! reported against the layer that set the offending key.

use std::collections::BTreeMap;

use super::error::{ConfigError, Origin};
use super::keys::TOPIC_SECTION;
use super::{Config, SHARDS_MAX};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const FRAME_BYTES_MIN: u64 = KIB;
const FRAME_BYTES_MAX: u64 = 256 * MIB;
const MEMORY_BUDGET_BYTES_MIN: u64 = 16 * MIB;
const INTERVAL_MS_MIN: u64 = 100;

pub(crate) fn validate(
    config: &Config,
    origins: &BTreeMap<String, Origin>,
) -> Result<(), ConfigError> {
    let fail = |key: &str, message: String| {
        let origin = origins.get(key).cloned().unwrap_or(Origin::Default);
        Err(ConfigError::new(origin, Some(key), message))
    };

    if config.data_dir.as_os_str().is_empty() {
        return fail(
            "data_dir",
            "must not be empty; give a directory such as \"/var/lib/rill\"".into(),
        );
    }

    let node = &config.node;
    if node.shards > SHARDS_MAX {
        return fail(
            "node.shards",
            format!(
                "{} is out of range: at most {SHARDS_MAX}; 0 means one per core",
                node.shards
            ),
        );
    }
    if node.memory_budget_bytes < MEMORY_BUDGET_BYTES_MIN {
        return fail(
            "node.memory_budget_bytes",
            format!(
                "{} is out of range: at least {MEMORY_BUDGET_BYTES_MIN} (16 MiB)",
                node.memory_budget_bytes
            ),
        );
    }

    let listeners = &config.listeners;
    // Port 0 asks the kernel for a free port, so two of them do not clash.
    for (name, address) in [
        ("listeners.kafka", listeners.kafka),
        ("listeners.admin", listeners.admin),
    ] {
        let clash = [
            ("listeners.native", listeners.native),
            ("listeners.kafka", listeners.kafka),
        ]
        .into_iter()
        .find(|(other, other_address)| {
            *other != name && *other_address == address && address.port() != 0
        });
        if let Some((other, _)) = clash {
            return fail(
                name,
                format!("{address} is also {other}; give each listener its own port"),
            );
        }
    }
    let mqtt_clash = [
        ("listeners.native", listeners.native),
        ("listeners.kafka", listeners.kafka),
        ("listeners.admin", listeners.admin),
    ]
    .into_iter()
    .find(|(_, address)| *address == listeners.mqtt && address.port() != 0);
    if let Some((other, _)) = mqtt_clash {
        return fail(
            "listeners.mqtt",
            format!(
                "{} is also {other}; give each listener its own port",
                listeners.mqtt
            ),
        );
    }
    let kafka = &config.kafka;
    if kafka.group_session_timeout_ms_min > kafka.group_session_timeout_ms_max {
        return fail(
            "kafka.group_session_timeout_ms_min",
            format!(
                "{} is more than kafka.group_session_timeout_ms_max ({})",
                kafka.group_session_timeout_ms_min, kafka.group_session_timeout_ms_max
            ),
        );
    }
    if kafka.group_members_max == 0 {
        return fail(
            "kafka.group_members_max",
            "0 is out of range: at least 1".into(),
        );
    }
    let mechanisms = kafka.sasl_mechanism_list();
    if let Some(unknown) = mechanisms
        .iter()
        .find(|name| !rill_edge_bridge::sasl::SERVER_MECHANISMS.contains(&name.as_str()))
    {
        return fail(
            "kafka.sasl_mechanisms",
            format!(
                "{unknown:?} is not a mechanism Rill serves; choose from {}",
                rill_edge_bridge::sasl::SERVER_MECHANISMS.join(", ")
            ),
        );
    }
    if !kafka.sasl_users_file.is_empty() {
        if mechanisms.is_empty() {
            return fail(
                "kafka.sasl_mechanisms",
                "empty, but kafka.sasl_users_file is set: no client could authenticate".into(),
            );
        }
        super::mqtt::check_users_file("kafka.sasl_users_file", &kafka.sasl_users_file, &fail)?;
    }

    let limits = &config.limits;
    if limits.connections_max == 0 {
        return fail(
            "limits.connections_max",
            "0 is out of range: at least 1".into(),
        );
    }
    let frame_bytes_max = u64::from(limits.frame_bytes_max);
    if !(FRAME_BYTES_MIN..=FRAME_BYTES_MAX).contains(&frame_bytes_max) {
        return fail(
            "limits.frame_bytes_max",
            format!(
                "{frame_bytes_max} is out of range: must be between {FRAME_BYTES_MIN} (1 KiB) \
                 and {FRAME_BYTES_MAX} (256 MiB)"
            ),
        );
    }
    if limits.requests_in_flight_max == 0 {
        return fail(
            "limits.requests_in_flight_max",
            "0 is out of range: at least 1".into(),
        );
    }
    if limits.fetch_bytes_max == 0 {
        return fail(
            "limits.fetch_bytes_max",
            "0 is out of range: at least 1".into(),
        );
    }
    if limits.buffer_memory_bytes_max < frame_bytes_max {
        return fail(
            "limits.buffer_memory_bytes_max",
            format!(
                "{} is smaller than limits.frame_bytes_max ({frame_bytes_max}), so a largest \
                 frame could never be read; raise it or lower frame_bytes_max",
                limits.buffer_memory_bytes_max
            ),
        );
    }
    if limits.buffer_memory_bytes_max > node.memory_budget_bytes {
        return fail(
            "limits.buffer_memory_bytes_max",
            format!(
                "{} is larger than node.memory_budget_bytes ({}), of which it is a part; \
                 lower it or raise the budget",
                limits.buffer_memory_bytes_max, node.memory_budget_bytes
            ),
        );
    }

    let storage = &config.storage;
    for (key, interval_ms) in [
        (
            "storage.checkpoint_interval_ms",
            storage.checkpoint_interval_ms,
        ),
        (
            "storage.retention_check_interval_ms",
            storage.retention_check_interval_ms,
        ),
    ] {
        if interval_ms < INTERVAL_MS_MIN {
            return fail(
                key,
                format!("{interval_ms} is out of range: at least {INTERVAL_MS_MIN} ms"),
            );
        }
    }

    if config.topics.default_partitions == 0 {
        return fail(
            "topics.default_partitions",
            "0 is out of range: at least 1".into(),
        );
    }

    let topic = &config.topic_defaults;
    if let Err(error) = topic.log_config().check() {
        return fail(
            &format!("{TOPIC_SECTION}.{}", error.key),
            format!("{} is out of range: {}", error.value, error.reason),
        );
    }
    super::mqtt::validate(config, &fail)?;
    super::mirror::validate(config, &fail)?;
    if topic.batch_bytes_max > frame_bytes_max {
        return fail(
            "topic_defaults.batch_bytes_max",
            format!(
                "{} is larger than limits.frame_bytes_max ({frame_bytes_max}), so a batch this \
                 large could never arrive; lower it or raise frame_bytes_max",
                topic.batch_bytes_max
            ),
        );
    }
    Ok(())
}
