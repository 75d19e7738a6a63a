//! The registry of configuration keys: every key's unit, meaning and kind of
//! value, in one table that the docs, `rill config`, the environment-variable
//! names, typo suggestions and value-error messages all read. Defaults are not
//! written here but taken from `Config::default()`, so they cannot drift.

use super::Config;
use super::profile;
use super::topic::{DiskFullPolicySetting, FsyncSetting, TimestampTypeSetting};
use super::values::{io_driver, one_of};

/// The section whose keys are per-topic settings.
pub(crate) const TOPIC_SECTION: &str = "topic_defaults";

/// The configuration sections (tables) of the file.
pub(crate) const SECTIONS: &[&str] = &[
    "node",
    "listeners",
    "limits",
    "storage",
    "topics",
    TOPIC_SECTION,
    "tls",
    "kafka",
    "mqtt",
    "mqtt.bridge",
    "mirror",
];

/// `RILL_` variables that are not configuration keys but belong to Rill
/// (logging, tests, the CLI); everything else with the prefix must be a key.
pub const NON_CONFIG_VARIABLES: &[&str] = &[
    "RILL_LOG",
    "RILL_IO_DRIVER",
    "RILL_TEST_RUNNER",
    "RILL_REQUIRE_IO_URING",
    "RILL_CRASH_SEED",
    "RILL_CRASH_SEEDS",
    "RILL_CRASH_ROUNDS",
    "RILL_FUZZ_SECONDS",
    "RILL_CONFIG",
];

/// What kind of value a key takes; decides how env/`--set` text is read and
/// what a type error says is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Bytes,
    Milliseconds,
    Count,
    Priority,
    Switch,
    Address,
    Path,
    Text,
    Choice(&'static [&'static str]),
    Profile,
    /// An array of tables (`[[mqtt.rules]]`).
    Rules,
    /// An array of MQTT topic filters.
    Filters,
    /// An array of mirror destination tables.
    Destinations,
}

impl Kind {
    /// Values of these kinds are text, so env/`--set` values are taken as
    /// strings even when they look like numbers (a directory called `1234`).
    fn is_text(self) -> bool {
        matches!(
            self,
            Self::Address | Self::Path | Self::Text | Self::Choice(_) | Self::Profile
        )
    }

    fn expectation(self) -> String {
        match self {
            Self::Bytes => "a whole number of bytes".into(),
            Self::Milliseconds => "a whole number of milliseconds".into(),
            Self::Count => "a whole number".into(),
            Self::Priority => "a whole number (negative allowed)".into(),
            Self::Switch => "true or false".into(),
            Self::Address => "an address as a string, such as \"127.0.0.1:7470\"".into(),
            Self::Path => "a path as a string".into(),
            Self::Text => "a string".into(),
            Self::Choice(names) => one_of(names),
            Self::Profile => profile_expectation(),
            Self::Rules => format!(
                "an array of tables with filter, topic and key ({})",
                super::MqttKeySetting::EXPECTED
            ),
            Self::Destinations => {
                "an array of tables with name, bootstrap_servers and the destination's settings (docs/mirror.md)".into()
            }
            Self::Filters => {
                "an array of MQTT topic filters as strings, such as [\"sensors/#\"]".into()
            }
        }
    }
}

fn profile_expectation() -> String {
    let mut names = vec!["auto".to_string(), profile::NONE.to_string()];
    names.extend(
        profile::builtin_profiles()
            .into_iter()
            .map(|profile| profile.name.to_string()),
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    one_of(&names)
}

/// One key of the registry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyInfo {
    pub key: &'static str,
    pub kind: Kind,
    pub unit: &'static str,
    pub meaning: &'static str,
}

const fn key(key: &'static str, kind: Kind, unit: &'static str, meaning: &'static str) -> KeyInfo {
    KeyInfo {
        key,
        kind,
        unit,
        meaning,
    }
}

const FSYNC_UNIT: &str = "every-batch | interval-ms | never";
const TIMESTAMP_UNIT: &str = "create-time | log-append-time";
const DISK_FULL_UNIT: &str = "reject | evict-oldest";

/// Every key, in documentation order.
pub(crate) const KEYS: &[KeyInfo] = &[
    key(
        "profile",
        Kind::Profile,
        "name",
        "Hardware profile applied under the file: `auto` detects one from the machine, `none` applies none.",
    ),
    key(
        "data_dir",
        Kind::Path,
        "path",
        "Directory holding the topics; relative paths are from the working directory.",
    ),
    key(
        "node.shards",
        Kind::Count,
        "count",
        "Shard threads (at most 256). 0 takes the profile's number, else one per core.",
    ),
    key(
        "node.io_driver",
        Kind::Choice(io_driver::NAMES),
        "auto | io-uring | portable",
        "I/O driver: `auto` uses io_uring when the kernel allows it, else the portable driver.",
    ),
    key(
        "node.memory_budget_bytes",
        Kind::Bytes,
        "bytes",
        "Memory Rill plans to use for write buffers, request buffers and caches (at least 16 MiB).",
    ),
    key(
        "node.pin_threads",
        Kind::Switch,
        "true/false",
        "Pin each shard thread to its own core.",
    ),
    key(
        "node.move_connections",
        Kind::Switch,
        "true/false",
        "Move a plaintext native or Kafka connection to the shard that owns the partition it keeps producing to.",
    ),
    key(
        "listeners.native",
        Kind::Address,
        "IP:port",
        "Address of the native-protocol listener.",
    ),
    key(
        "listeners.kafka",
        Kind::Address,
        "IP:port",
        "Address of the Kafka wire-protocol listener.",
    ),
    key(
        "listeners.admin",
        Kind::Address,
        "IP:port",
        "Address of the admin (health, metrics) listener.",
    ),
    key(
        "listeners.mqtt",
        Kind::Address,
        "IP:port",
        "Address of the MQTT 3.1.1/5.0 listener (docs/mqtt.md).",
    ),
    key(
        "limits.connections_max",
        Kind::Count,
        "count",
        "Open client connections at most; further ones are refused (at least 1).",
    ),
    key(
        "limits.frame_bytes_max",
        Kind::Bytes,
        "bytes",
        "Largest request frame accepted (1 KiB to 256 MiB); must hold `topic_defaults.batch_bytes_max`.",
    ),
    key(
        "limits.requests_in_flight_max",
        Kind::Count,
        "count",
        "Requests one connection may have in flight before Rill stops reading from it (at least 1).",
    ),
    key(
        "limits.fetch_wait_ms_max",
        Kind::Milliseconds,
        "ms",
        "Longest a fetch may wait for data; longer client waits are cut to this.",
    ),
    key(
        "limits.fetch_bytes_max",
        Kind::Bytes,
        "bytes",
        "Most bytes one fetch response carries (at least one batch is always sent).",
    ),
    key(
        "limits.buffer_memory_bytes_max",
        Kind::Bytes,
        "bytes",
        "Request and response buffers of all connections together; at least one frame, at most the memory budget.",
    ),
    key(
        "storage.disk_quota_bytes",
        Kind::Bytes,
        "bytes",
        "Most bytes the data directory may hold; then each topic's `disk_full_policy` applies. 0 = no quota.",
    ),
    key(
        "storage.checkpoint_interval_ms",
        Kind::Milliseconds,
        "ms",
        "How often partition checkpoints (recovery points) are written; shorter means faster recovery (at least 100).",
    ),
    key(
        "storage.retention_check_interval_ms",
        Kind::Milliseconds,
        "ms",
        "How often retention looks for segments to delete (at least 100).",
    ),
    key(
        "topics.auto_create",
        Kind::Switch,
        "true/false",
        "Create a topic when a client first produces to or asks for it.",
    ),
    key(
        "topics.default_partitions",
        Kind::Count,
        "count",
        "Partitions of an auto-created topic (at least 1).",
    ),
    key(
        "topic_defaults.segment_bytes_max",
        Kind::Bytes,
        "bytes",
        "A segment rolls before an append would take it past this size (1 KiB to 4 GiB - 1).",
    ),
    key(
        "topic_defaults.segment_age_ms_max",
        Kind::Milliseconds,
        "ms",
        "A segment rolls once its first batch is this old. 0 = no age limit.",
    ),
    key(
        "topic_defaults.index_interval_bytes",
        Kind::Bytes,
        "bytes",
        "Log bytes between two sparse index entries (at least 1).",
    ),
    key(
        "topic_defaults.batch_bytes_max",
        Kind::Bytes,
        "bytes",
        "Largest batch an append accepts.",
    ),
    key(
        "topic_defaults.fsync",
        Kind::Choice(FsyncSetting::NAMES),
        FSYNC_UNIT,
        "When appends are made durable: each append waits for a (shared) sync, a sync every `fsync_interval_ms`, or only at rolls and shutdown.",
    ),
    key(
        "topic_defaults.fsync_interval_ms",
        Kind::Milliseconds,
        "ms",
        "Sync interval when `fsync = \"interval-ms\"` (at least 1).",
    ),
    key(
        "topic_defaults.timestamp_type",
        Kind::Choice(TimestampTypeSetting::NAMES),
        TIMESTAMP_UNIT,
        "Keep the producer's timestamps, or stamp the append time on every batch.",
    ),
    key(
        "topic_defaults.retention_ms",
        Kind::Milliseconds,
        "ms",
        "Sealed segments whose newest record is older than this are deleted. 0 = keep regardless of age.",
    ),
    key(
        "topic_defaults.retention_bytes",
        Kind::Bytes,
        "bytes",
        "Oldest sealed segments are deleted while a partition stays at least this large without them. 0 = no size limit.",
    ),
    key(
        "topic_defaults.direct_io",
        Kind::Switch,
        "true/false",
        "Write the active segment with O_DIRECT where the filesystem allows it.",
    ),
    key(
        "topic_defaults.preallocate",
        Kind::Switch,
        "true/false",
        "Reserve a segment's full size on disk when it is created.",
    ),
    key(
        "topic_defaults.write_buffer_bytes",
        Kind::Bytes,
        "bytes",
        "Appended bytes a partition collects in memory before one large write (at most 64 MiB); a second buffer fills while that write is on its way. 0 writes every append through.",
    ),
    key(
        "topic_defaults.disk_full_policy",
        Kind::Choice(DiskFullPolicySetting::NAMES),
        DISK_FULL_UNIT,
        "At the disk quota: refuse appends, or delete the oldest sealed segments of `evict-oldest` topics.",
    ),
    key(
        "topic_defaults.eviction_priority",
        Kind::Priority,
        "integer",
        "Among `evict-oldest` topics, lower priorities are evicted first.",
    ),
    key(
        "tls.cert_file",
        Kind::Path,
        "path",
        "PEM certificate chain; when set, every listener (native and admin) speaks TLS (rustls). Empty: plain TCP.",
    ),
    key(
        "tls.key_file",
        Kind::Path,
        "path",
        "PEM private key of tls.cert_file (PKCS#8, PKCS#1 or SEC1).",
    ),
    key(
        "tls.client_ca_file",
        Kind::Path,
        "path",
        "PEM CA certificates; when set, clients must present a certificate signed by one of them. Empty: no client certificates.",
    ),
    key(
        "kafka.advertised_host",
        Kind::Text,
        "host name or IP",
        "Host Kafka clients are told to connect to (Metadata, FindCoordinator); empty = the Kafka listener's IP.",
    ),
    key(
        "kafka.advertised_port",
        Kind::Count,
        "port",
        "Port Kafka clients are told to connect to; 0 = the Kafka listener's port.",
    ),
    key(
        "kafka.group_initial_rebalance_delay_ms",
        Kind::Milliseconds,
        "ms",
        "How long the first rebalance of an empty consumer group waits for more members to join.",
    ),
    key(
        "kafka.group_session_timeout_ms_min",
        Kind::Milliseconds,
        "ms",
        "Shortest session timeout a consumer-group member may ask for.",
    ),
    key(
        "kafka.group_session_timeout_ms_max",
        Kind::Milliseconds,
        "ms",
        "Longest session timeout a consumer-group member may ask for.",
    ),
    key(
        "kafka.group_members_max",
        Kind::Count,
        "count",
        "Members one consumer group may have at most (at least 1).",
    ),
    key(
        "kafka.producer_id_expiration_ms",
        Kind::Milliseconds,
        "ms",
        "How long an idle idempotent producer's sequence state is kept per partition.",
    ),
    key(
        "kafka.sasl_users_file",
        Kind::Path,
        "path",
        "Users file (the MQTT users-file format, `rill mqtt passwd`); when set, Kafka clients must authenticate with SASL before any other request. Empty: no authentication.",
    ),
    key(
        "kafka.sasl_mechanisms",
        Kind::Text,
        "comma-separated names",
        "SASL mechanisms offered to Kafka clients when kafka.sasl_users_file is set: PLAIN, SCRAM-SHA-256.",
    ),
    key(
        "mqtt.allow_anonymous",
        Kind::Switch,
        "true/false",
        "Let MQTT clients connect without a user name or password.",
    ),
    key(
        "mqtt.users_file",
        Kind::Path,
        "path",
        "Users file with hashed passwords (`user:$pbkdf2-sha256$...` lines, docs/mqtt.md). Empty: none.",
    ),
    key(
        "mqtt.packet_bytes_max",
        Kind::Bytes,
        "bytes",
        "Largest MQTT packet accepted (sent as Maximum Packet Size; lowered so a record of it fits `topic_defaults.batch_bytes_max`); larger ones close the client with 0x95.",
    ),
    key(
        "mqtt.connect_timeout_ms",
        Kind::Milliseconds,
        "ms",
        "How long a new MQTT connection may take to send CONNECT.",
    ),
    key(
        "mqtt.inflight_inbound_max",
        Kind::Count,
        "count",
        "QoS 1 and 2 PUBLISHes one client may have unacknowledged (Receive Maximum, 1 to 65535).",
    ),
    key(
        "mqtt.inflight_outbound_max",
        Kind::Count,
        "count",
        "QoS 1 and 2 messages sent to one client and not yet acknowledged (1 to 65535).",
    ),
    key(
        "mqtt.queued_messages_max",
        Kind::Count,
        "count",
        "Messages waiting for one client; when full, QoS 0 is dropped and QoS 1/2 is read from the log again later.",
    ),
    key(
        "mqtt.topic_aliases_max",
        Kind::Count,
        "count",
        "Topic aliases one MQTT 5.0 client may set (Topic Alias Maximum).",
    ),
    key(
        "mqtt.topic_bytes_max",
        Kind::Bytes,
        "bytes",
        "Longest MQTT topic name or filter accepted.",
    ),
    key(
        "mqtt.topic_levels_max",
        Kind::Count,
        "count",
        "Most levels an MQTT topic name or filter may have.",
    ),
    key(
        "mqtt.client_id_bytes_max",
        Kind::Bytes,
        "bytes",
        "Longest MQTT client identifier accepted.",
    ),
    key(
        "mqtt.session_subscriptions_max",
        Kind::Count,
        "count",
        "Subscriptions one MQTT session may hold.",
    ),
    key(
        "mqtt.subscriptions_max",
        Kind::Count,
        "count",
        "Subscriptions of all connected MQTT sessions together.",
    ),
    key(
        "mqtt.retained_messages_max",
        Kind::Count,
        "count",
        "Retained messages kept; past it new ones are published but not retained.",
    ),
    key(
        "mqtt.retained_bytes_max",
        Kind::Bytes,
        "bytes",
        "Bytes of all retained messages together (topic, payload, properties).",
    ),
    key(
        "mqtt.session_expiry_ms_max",
        Kind::Milliseconds,
        "ms",
        "Longest an MQTT session outlives its connection; 3.1.1 persistent sessions get exactly this (whole seconds).",
    ),
    key(
        "mqtt.keep_alive_ms_max",
        Kind::Milliseconds,
        "ms",
        "Longest keep alive granted to an MQTT 5.0 client (whole seconds); 0 = any.",
    ),
    key(
        "mqtt.session_persist_interval_ms",
        Kind::Milliseconds,
        "ms",
        "How often a connected persistent session's cursors and in-flight messages are written.",
    ),
    key(
        "mqtt.stored_sessions_max",
        Kind::Count,
        "count",
        "Persistent MQTT sessions kept at most; past it a new client's session is not kept (it reconnects to a fresh one, told so by CONNACK) and rill_mqtt_sessions_refused_total counts it.",
    ),
    key(
        "mqtt.unmatched",
        Kind::Choice(super::UnmatchedSetting::NAMES),
        "catch-all | refuse",
        "A PUBLISH whose topic matches no rule goes to `mqtt.catch_all_topic`, or is refused.",
    ),
    key(
        "mqtt.catch_all_topic",
        Kind::Text,
        "topic",
        "Rill topic for MQTT messages that match no rule, keyed by their MQTT topic.",
    ),
    key(
        "mqtt.rules",
        Kind::Rules,
        "[[mqtt.rules]]",
        "Mapping rules in order: `filter` (MQTT filter), `topic` (Rill topic), `key` (`level:N`, `topic`, `client-id` or `none`).",
    ),
    key(
        "mqtt.bridge.enabled",
        Kind::Switch,
        "true/false",
        "Run the upstream MQTT bridge: subscribe to another broker and append what it delivers through `mqtt.rules` (docs/mqtt.md).",
    ),
    key(
        "mqtt.bridge.address",
        Kind::Address,
        "host:port",
        "The upstream MQTT broker, for example a Mosquitto on the gateway.",
    ),
    key(
        "mqtt.bridge.protocol_version",
        Kind::Choice(super::BridgeProtocolSetting::NAMES),
        "5.0 | 3.1.1",
        "MQTT version the bridge speaks to the upstream broker.",
    ),
    key(
        "mqtt.bridge.client_id",
        Kind::Text,
        "text",
        "Client identifier of the bridge's persistent session upstream; no other client of that broker may use it.",
    ),
    key(
        "mqtt.bridge.username",
        Kind::Text,
        "text",
        "User name for the upstream broker. Empty: none.",
    ),
    key(
        "mqtt.bridge.password_file",
        Kind::Path,
        "path",
        "File holding the upstream broker's password (a final line break is dropped). Empty: none.",
    ),
    key(
        "mqtt.bridge.filters",
        Kind::Filters,
        "[\"filter\", ...]",
        "MQTT topic filters subscribed upstream at QoS 1; at least one when enabled.",
    ),
    key(
        "mqtt.bridge.keep_alive_ms",
        Kind::Milliseconds,
        "ms",
        "Keep alive asked in CONNECT (whole seconds); 0 = none.",
    ),
    key(
        "mqtt.bridge.session_expiry_ms",
        Kind::Milliseconds,
        "ms",
        "MQTT 5.0 session expiry asked of the upstream broker (whole seconds, at least 1 s): how long it queues for the bridge while Rill is away.",
    ),
    key(
        "mqtt.bridge.connect_timeout_ms",
        Kind::Milliseconds,
        "ms",
        "Longest from opening the connection to an accepted CONNACK.",
    ),
    key(
        "mqtt.bridge.inflight_max",
        Kind::Count,
        "count",
        "Messages being appended at once; the bridge stops reading at it (sent as Receive Maximum under 5.0; 1 to 65535).",
    ),
    key(
        "mqtt.bridge.reconnect_backoff_ms_min",
        Kind::Milliseconds,
        "ms",
        "Wait before the first reconnect after a failure (at least 1).",
    ),
    key(
        "mqtt.bridge.reconnect_backoff_ms_max",
        Kind::Milliseconds,
        "ms",
        "Longest wait between reconnects: failures in a row double the wait up to it, with jitter; a connection that lived this long resets it.",
    ),
    key(
        "mirror.edge_id",
        Kind::Text,
        "text",
        "This box's name in mirrored topic names (`EDGE_ID.TOPIC`) and provenance headers: 1 to 64 letters, digits, '.', '_' or '-'. Empty: the host name.",
    ),
    key(
        "mirror.unmirrored_bytes_max",
        Kind::Bytes,
        "bytes",
        "Per partition, unmirrored bytes that retention and the disk quota keep; beyond it eviction takes unmirrored records and counts them. 0 = no protection.",
    ),
    key(
        "mirror.checkpoint_interval_ms",
        Kind::Milliseconds,
        "ms",
        "How often each destination's progress is written to DATA_DIR/mirror/NAME.checkpoint (at least 100).",
    ),
    key(
        "mirror.reconcile_delay_ms",
        Kind::Milliseconds,
        "ms",
        "Wait after a start before reading the destinations' tails: the destination's `replica.lag.time.max.ms` (for a Rill destination, its sync interval; docs/mirror.md).",
    ),
    key(
        "mirror.topic_refresh_ms",
        Kind::Milliseconds,
        "ms",
        "How often new topics and partitions are looked for (at least 100).",
    ),
    key(
        "mirror.destinations",
        Kind::Destinations,
        "[[mirror.destinations]]",
        "Kafka-protocol clusters to mirror to; each table has `name`, `bootstrap_servers` and the settings in docs/mirror.md. None: the replicator is off.",
    ),
];

pub(crate) fn find(dotted: &str) -> Option<&'static KeyInfo> {
    KEYS.iter().find(|info| info.key == dotted)
}

/// The per-topic keys without their section, e.g. `retention_ms`.
pub(crate) fn topic_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter()
        .filter_map(|info| info.key.strip_prefix(TOPIC_SECTION)?.strip_prefix('.'))
}

/// `limits.frame_bytes_max` → `RILL_LIMITS__FRAME_BYTES_MAX`; `data_dir` → `RILL_DATA_DIR`.
pub fn environment_variable(dotted: &str) -> String {
    format!("RILL_{}", dotted.replace('.', "__").to_ascii_uppercase())
}

/// A key's documentation, for docs/config.md and `rill config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDoc {
    /// Dotted key, e.g. `limits.frame_bytes_max`.
    pub key: &'static str,
    /// The built-in default as written in TOML, with a readable size or
    /// duration after it where that helps.
    pub default: String,
    pub unit: &'static str,
    pub meaning: &'static str,
}

/// Every key with its built-in default, unit and meaning, in documentation order.
pub fn documented_keys() -> Vec<KeyDoc> {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    KEYS.iter()
        .map(|info| KeyDoc {
            key: info.key,
            default: lookup(&defaults, info.key)
                .map(|value| render_default(value, info.kind))
                .unwrap_or_else(|| "(none)".into()),
            unit: info.unit,
            meaning: info.meaning,
        })
        .collect()
}

pub(crate) fn lookup<'t>(table: &'t toml::Table, dotted: &str) -> Option<&'t toml::Value> {
    let mut parts = dotted.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

fn render_default(value: &toml::Value, kind: Kind) -> String {
    let literal = value.to_string();
    let Some(number) = value
        .as_integer()
        .and_then(|number| u64::try_from(number).ok())
    else {
        return literal;
    };
    let readable = match kind {
        Kind::Bytes => readable_bytes(number),
        Kind::Milliseconds => readable_duration(number),
        _ => None,
    };
    match readable {
        Some(readable) => format!("{literal} ({readable})"),
        None => literal,
    }
}

/// `134217728` → `128 MiB`, only when exact (an approximate size would
/// mislead someone copying it).
pub(crate) fn readable_bytes(bytes: u64) -> Option<String> {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    UNITS
        .iter()
        .find(|(size, _)| bytes >= *size && bytes.is_multiple_of(*size))
        .map(|(size, unit)| format!("{} {unit}", bytes / size))
}

fn readable_duration(milliseconds: u64) -> Option<String> {
    const UNITS: [(u64, &str, &str); 4] = [
        (86_400_000, "day", "days"),
        (3_600_000, "hour", "hours"),
        (60_000, "minute", "minutes"),
        (1000, "second", "seconds"),
    ];
    UNITS
        .iter()
        .find(|(size, _, _)| milliseconds >= *size && milliseconds.is_multiple_of(*size))
        .map(|(size, one, many)| {
            let count = milliseconds / size;
            format!("{count} {}", if count == 1 { one } else { many })
        })
}

/// Reads an env/`--set` value: text keys take it as a string (a TOML-quoted
/// string is unquoted); other keys take it as a TOML value (`1048576`,
/// `true`, `1_048_576`) and fall back to a string, which then fails type
/// checking with a message naming the key.
pub(crate) fn parse_override_value(raw: &str, info: &KeyInfo) -> toml::Value {
    let parsed = format!("value = {raw}")
        .parse::<toml::Table>()
        .ok()
        .filter(|table| table.len() == 1)
        .and_then(|mut table| table.remove("value"));
    match parsed {
        Some(toml::Value::String(text)) => toml::Value::String(text),
        Some(_) if info.kind.is_text() => toml::Value::String(raw.to_string()),
        Some(value) => value,
        None => toml::Value::String(raw.to_string()),
    }
}

/// Turns serde's type errors ("invalid type: string \"x\", expected u32")
/// into what the key accepts; messages from Rill's own parsers pass through.
pub(crate) fn explain_value_error(message: &str, value: &toml::Value, info: &KeyInfo) -> String {
    let message = message.trim_end();
    if !(message.starts_with("invalid type") || message.starts_with("invalid value")) {
        return message.to_string();
    }
    // 64-bit keys need no range: a TOML integer cannot exceed one.
    let range = if message.ends_with("expected u32") {
        format!(" from 0 to {}", u32::MAX)
    } else if message.ends_with("expected i32") {
        format!(" from {} to {}", i32::MIN, i32::MAX)
    } else {
        String::new()
    };
    format!(
        "invalid value {value}; expected {}{range}",
        info.kind.expectation()
    )
}

/// The closest candidate to a mistyped name, when it is close enough to be
/// a likely typo.
pub(crate) fn suggest<'c>(
    input: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let input = input.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            (
                edit_distance(&input, &candidate.to_ascii_lowercase()),
                candidate,
            )
        })
        .filter(|(distance, candidate)| *distance <= (candidate.len() / 4).max(2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(left: &str, right: &str) -> usize {
    let right: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right.len()).collect();
    for (row, left_char) in left.chars().enumerate() {
        let mut current = vec![row + 1; right.len() + 1];
        for (column, right_char) in right.iter().enumerate() {
            let substitution = previous[column] + usize::from(left_char != *right_char);
            current[column + 1] = substitution
                .min(previous[column + 1] + 1)
                .min(current[column] + 1);
        }
        previous = current;
    }
    previous[right.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_and_ignore_strangers() {
        let keys = ["limits.frame_bytes_max", "limits.fetch_bytes_max"];
        assert_eq!(
            suggest("limits.frame_byte_max", keys),
            Some("limits.frame_bytes_max")
        );
        assert_eq!(suggest("storage.quota", keys), None);
    }

    #[test]
    fn environment_names_use_a_double_underscore_between_section_and_key() {
        assert_eq!(
            environment_variable("topic_defaults.fsync"),
            "RILL_TOPIC_DEFAULTS__FSYNC"
        );
        assert_eq!(environment_variable("data_dir"), "RILL_DATA_DIR");
    }

    #[test]
    fn override_values_are_typed_by_key() {
        let frame = find("limits.frame_bytes_max").expect("registered");
        assert_eq!(
            parse_override_value("1_048_576", frame),
            toml::Value::Integer(1 << 20)
        );
        assert_eq!(
            parse_override_value("lots", frame),
            toml::Value::String("lots".into())
        );
        let data_dir = find("data_dir").expect("registered");
        assert_eq!(
            parse_override_value("1234", data_dir),
            toml::Value::String("1234".into())
        );
        assert_eq!(
            parse_override_value("\"/var/lib/rill\"", data_dir),
            toml::Value::String("/var/lib/rill".into())
        );
    }

    #[test]
    fn readable_sizes_and_durations_are_exact_or_absent() {
        assert_eq!(readable_bytes(128 << 20).as_deref(), Some("128 MiB"));
        assert_eq!(readable_bytes(1000), None);
        assert_eq!(readable_duration(7 * 86_400_000).as_deref(), Some("7 days"));
        assert_eq!(readable_duration(1000).as_deref(), Some("1 second"));
    }
}
