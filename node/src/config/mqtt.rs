//! `[mqtt]`: the MQTT listener's switches, limits and mapping rules.
//!
//! Rules are an array of tables in the file:
//!
//! ```toml
//! [[mqtt.rules]]
//! filter = "sensors/+/temperature"
//! topic = "sensor-temperature"
//! key = "level:1"
//! ```
//!
//! `key` is `level:N` (level N of the MQTT topic, from 0), `topic` (the
//! whole MQTT topic), `client-id` or `none`. The environment and `--set`
//! take the same array written inline
//! (`mqtt.rules=[{filter="a/#", topic="a", key="topic"}]`). Whether the
//! rules make a mapping (valid filters and Rill topic names, key levels
//! inside their filter) is checked with the rest of the configuration.

use rill_edge_bridge::mqtt::REMAINING_BYTES_MAX;
use rill_edge_bridge::mqtt::auth::PasswordFile;
use rill_edge_bridge::mqtt::mapping::{KeySource, Mapping, MappingError, Rule, Unmatched};
use rill_edge_bridge::mqtt::session::SessionConfig;
use rill_edge_bridge::mqtt::topic::TopicLimits;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::values::named_choice;

named_choice! {
    /// What happens to a PUBLISH whose topic matches no rule.
    UnmatchedSetting {
        /// Appended to `mqtt.catch_all_topic`, keyed by its MQTT topic.
        #[default]
        CatchAll => "catch-all",
        /// Refused (MQTT 5.0 reason code 0x90; acknowledged and dropped under 3.1.1).
        Refuse => "refuse",
    }
}

/// Where a rule's record key comes from, as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttKeySetting {
    Level(usize),
    Topic,
    ClientId,
    None,
}

impl MqttKeySetting {
    pub const EXPECTED: &'static str = "level:N (N from 0), topic, client-id or none";

    fn as_text(self) -> String {
        match self {
            Self::Level(level) => format!("level:{level}"),
            Self::Topic => "topic".into(),
            Self::ClientId => "client-id".into(),
            Self::None => "none".into(),
        }
    }
}

impl std::str::FromStr for MqttKeySetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "topic" => Ok(Self::Topic),
            "client-id" => Ok(Self::ClientId),
            "none" => Ok(Self::None),
            other => other
                .strip_prefix("level:")
                .and_then(|level| level.parse().ok())
                .map(Self::Level)
                .ok_or_else(|| {
                    format!("unknown key source `{other}`; expected {}", Self::EXPECTED)
                }),
        }
    }
}

impl Serialize for MqttKeySetting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.as_text())
    }
}

impl<'de> Deserialize<'de> for MqttKeySetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One `[[mqtt.rules]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttRuleSetting {
    /// An MQTT topic filter (`+` and `#` allowed; not `$share/`).
    pub filter: String,
    /// The Rill topic its messages go to.
    pub topic: String,
    #[serde(default = "default_rule_key")]
    pub key: MqttKeySetting,
}

fn default_rule_key() -> MqttKeySetting {
    MqttKeySetting::Topic
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    pub allow_anonymous: bool,
    /// Empty: no users file (every client is anonymous or refused).
    pub users_file: String,
    pub packet_bytes_max: u32,
    pub connect_timeout_ms: u64,
    /// Inbound QoS 1 and 2 PUBLISHes in flight per client (Receive Maximum).
    pub inflight_inbound_max: u16,
    /// Outbound QoS 1 and 2 messages in flight per client.
    pub inflight_outbound_max: u16,
    pub queued_messages_max: u32,
    pub topic_aliases_max: u16,
    pub topic_bytes_max: u32,
    pub topic_levels_max: u32,
    pub client_id_bytes_max: u32,
    /// Per session.
    pub session_subscriptions_max: u32,
    /// Broker-wide.
    pub subscriptions_max: u32,
    pub retained_messages_max: u32,
    pub retained_bytes_max: u64,
    pub session_expiry_ms_max: u64,
    /// 0: any keep alive the client asks for.
    pub keep_alive_ms_max: u64,
    pub session_persist_interval_ms: u64,
    /// Persistent sessions kept at most (connected or not).
    pub stored_sessions_max: u32,
    pub unmatched: UnmatchedSetting,
    pub catch_all_topic: String,
    pub rules: Vec<MqttRuleSetting>,
    /// `[mqtt.bridge]`: the upstream bridge, which uses the rules too.
    pub bridge: super::bridge::MqttBridgeSection,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            users_file: String::new(),
            packet_bytes_max: 256 << 10,
            connect_timeout_ms: 10_000,
            inflight_inbound_max: 64,
            inflight_outbound_max: 64,
            queued_messages_max: 1_000,
            topic_aliases_max: 32,
            topic_bytes_max: 256,
            topic_levels_max: 16,
            client_id_bytes_max: 128,
            session_subscriptions_max: 100,
            subscriptions_max: 100_000,
            retained_messages_max: 10_000,
            retained_bytes_max: 16 << 20,
            session_expiry_ms_max: 7 * 86_400_000,
            keep_alive_ms_max: 0,
            session_persist_interval_ms: 1_000,
            stored_sessions_max: 10_000,
            unmatched: UnmatchedSetting::CatchAll,
            catch_all_topic: "mqtt".into(),
            rules: Vec::new(),
            bridge: Default::default(),
        }
    }
}

/// Smallest packet limit: a CONNECT with a will and a few properties.
const PACKET_BYTES_MIN: u32 = 1024;
/// What a record adds to an MQTT payload besides topic and client id
/// (fixed headers, header names, QoS and flags), with room to spare.
const RECORD_OVERHEAD_BYTES: u64 = 1024;

impl MqttSection {
    /// The checked mapping rules and unmatched policy.
    pub fn mapping(&self) -> Result<Mapping, MappingError> {
        let rules = self
            .rules
            .iter()
            .map(|rule| Rule {
                filter: rule.filter.clone(),
                topic: rule.topic.clone(),
                key: match rule.key {
                    MqttKeySetting::Level(level) => KeySource::Level(level),
                    MqttKeySetting::Topic => KeySource::Topic,
                    MqttKeySetting::ClientId => KeySource::ClientId,
                    MqttKeySetting::None => KeySource::None,
                },
            })
            .collect();
        let unmatched = match self.unmatched {
            UnmatchedSetting::CatchAll => Unmatched::Topic(self.catch_all_topic.clone()),
            UnmatchedSetting::Refuse => Unmatched::Refuse,
        };
        Mapping::new(rules, unmatched)
    }

    /// The packet limit in force: `packet_bytes_max`, lowered when needed
    /// so that a record made from the largest packet (payload, MQTT topic
    /// and client id headers) fits `batch_bytes_max`.
    pub fn effective_packet_bytes_max(&self, batch_bytes_max: u64) -> u32 {
        let room = batch_bytes_max
            .saturating_sub(u64::from(self.topic_bytes_max))
            .saturating_sub(u64::from(self.client_id_bytes_max))
            .saturating_sub(RECORD_OVERHEAD_BYTES)
            .max(u64::from(PACKET_BYTES_MIN));
        self.packet_bytes_max
            .min(u32::try_from(room).unwrap_or(u32::MAX))
    }

    /// The session state machine's limits and switches, for topics whose
    /// batches may be `batch_bytes_max` large.
    pub fn session_config(&self, batch_bytes_max: u64) -> SessionConfig {
        let seconds = |milliseconds: u64| milliseconds / 1000;
        SessionConfig {
            allow_anonymous: self.allow_anonymous,
            connect_timeout_ms: self.connect_timeout_ms,
            inflight_inbound_max: self.inflight_inbound_max,
            inflight_outbound_max: self.inflight_outbound_max,
            topic_aliases_max: self.topic_aliases_max,
            packet_bytes_max: self.effective_packet_bytes_max(batch_bytes_max),
            queued_messages_max: self.queued_messages_max as usize,
            subscriptions_max: self.session_subscriptions_max as usize,
            topic_limits: TopicLimits {
                topic_bytes_max: self.topic_bytes_max as usize,
                topic_levels_max: self.topic_levels_max as usize,
            },
            client_id_bytes_max: self.client_id_bytes_max as usize,
            session_expiry_max_s: u32::try_from(seconds(self.session_expiry_ms_max))
                .unwrap_or(u32::MAX),
            keep_alive_max_s: u16::try_from(seconds(self.keep_alive_ms_max)).unwrap_or(u16::MAX),
            session_persist_interval_ms: self.session_persist_interval_ms,
        }
    }
}

/// The file's 1-based rule number and what is wrong with it.
fn explain_mapping_error(error: &MappingError, rules: &[MqttRuleSetting]) -> String {
    let rule = |index: usize| match rules.get(index) {
        Some(rule) => format!(
            "rule {} (filter {:?}, topic {:?})",
            index + 1,
            rule.filter,
            rule.topic
        ),
        None => format!("rule {}", index + 1),
    };
    match error {
        MappingError::InvalidFilter {
            rule: index, error, ..
        } => {
            format!(
                "{}: the filter is not a valid MQTT topic filter: {error}",
                rule(*index)
            )
        }
        MappingError::SharedFilter { rule: index, .. } => format!(
            "{}: a $share/ filter is a subscription, not a rule filter",
            rule(*index)
        ),
        MappingError::InvalidTopic {
            rule: index,
            problem,
        } => {
            format!("{}: {problem}", rule(*index))
        }
        MappingError::KeyLevelMissing {
            rule: index,
            level,
            levels,
        } => format!(
            "{}: key level:{level} is past the filter's {levels} levels (levels count from 0)",
            rule(*index)
        ),
        MappingError::KeyLevelMultiLevel { rule: index, level } => format!(
            "{}: key level:{level} is the filter's '#', which is not one level",
            rule(*index)
        ),
        MappingError::InvalidCatchAllTopic(problem) => problem.to_string(),
    }
}

/// Reads and parses the users file `path` named by `key` (MQTT's, or the
/// Kafka listener's SASL users), failing at that key.
pub(crate) fn check_users_file(
    key: &str,
    path: &str,
    fail: &dyn Fn(&str, String) -> Result<(), super::ConfigError>,
) -> Result<(), super::ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => return fail(key, format!("cannot read {path}: {error}")),
    };
    match PasswordFile::parse(&text) {
        Ok(_) => Ok(()),
        Err(error) => fail(key, format!("{path}: {error}")),
    }
}

/// Ranges and the mapping rules; `fail` reports against the key.
pub(crate) fn validate(
    config: &super::Config,
    fail: &dyn Fn(&str, String) -> Result<(), super::ConfigError>,
) -> Result<(), super::ConfigError> {
    let mqtt = &config.mqtt;
    if let Err(error) = mqtt.mapping() {
        let key = match error {
            MappingError::InvalidCatchAllTopic(_) => "mqtt.catch_all_topic",
            _ => "mqtt.rules",
        };
        return fail(key, explain_mapping_error(&error, &mqtt.rules));
    }
    let at_least_one = [
        (
            "mqtt.inflight_inbound_max",
            u64::from(mqtt.inflight_inbound_max),
        ),
        (
            "mqtt.inflight_outbound_max",
            u64::from(mqtt.inflight_outbound_max),
        ),
        (
            "mqtt.queued_messages_max",
            u64::from(mqtt.queued_messages_max),
        ),
        ("mqtt.topic_bytes_max", u64::from(mqtt.topic_bytes_max)),
        ("mqtt.topic_levels_max", u64::from(mqtt.topic_levels_max)),
        (
            "mqtt.client_id_bytes_max",
            u64::from(mqtt.client_id_bytes_max),
        ),
        (
            "mqtt.session_subscriptions_max",
            u64::from(mqtt.session_subscriptions_max),
        ),
        ("mqtt.subscriptions_max", u64::from(mqtt.subscriptions_max)),
        (
            "mqtt.session_persist_interval_ms",
            mqtt.session_persist_interval_ms,
        ),
        ("mqtt.connect_timeout_ms", mqtt.connect_timeout_ms),
    ];
    for (key, value) in at_least_one {
        if value == 0 {
            return fail(key, "0 is out of range: at least 1".into());
        }
    }
    if mqtt.packet_bytes_max < PACKET_BYTES_MIN || mqtt.packet_bytes_max > REMAINING_BYTES_MAX + 5 {
        return fail(
            "mqtt.packet_bytes_max",
            format!(
                "{} is out of range: must be between {PACKET_BYTES_MIN} (1 KiB) and {} (MQTT's \
                 largest packet)",
                mqtt.packet_bytes_max,
                REMAINING_BYTES_MAX + 5
            ),
        );
    }
    if mqtt.session_expiry_ms_max / 1000 > u64::from(u32::MAX) {
        return fail(
            "mqtt.session_expiry_ms_max",
            format!(
                "{} is out of range: at most {} (MQTT's longest expiry, in seconds)",
                mqtt.session_expiry_ms_max,
                u64::from(u32::MAX) * 1000
            ),
        );
    }
    if mqtt.keep_alive_ms_max / 1000 > u64::from(u16::MAX) {
        return fail(
            "mqtt.keep_alive_ms_max",
            format!(
                "{} is out of range: at most {} (MQTT's longest keep alive, in seconds)",
                mqtt.keep_alive_ms_max,
                u64::from(u16::MAX) * 1000
            ),
        );
    }
    if !mqtt.users_file.is_empty() {
        check_users_file("mqtt.users_file", &mqtt.users_file, fail)?;
    } else if !mqtt.allow_anonymous {
        return fail(
            "mqtt.allow_anonymous",
            "false with no mqtt.users_file would refuse every MQTT client; set a users file or \
             allow anonymous clients"
                .into(),
        );
    }
    super::bridge::validate(config, fail)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::check_file;
    use super::*;

    fn check(text: &str) -> Result<super::super::Config, String> {
        let directory = tempfile::tempdir().map_err(|error| error.to_string())?;
        let path = directory.path().join("rill.toml");
        std::fs::write(&path, text).map_err(|error| error.to_string())?;
        check_file(Path::new(&path)).map_err(|error| error.to_string())
    }

    #[test]
    fn rules_load_from_an_array_of_tables_and_become_a_mapping() -> Result<(), String> {
        let config = check(
            "[[mqtt.rules]]\nfilter = \"sensors/+/temperature\"\ntopic = \"sensor-temperature\"\nkey = \"level:1\"\n\n[[mqtt.rules]]\nfilter = \"alarms/#\"\ntopic = \"alarms\"\n",
        )?;
        let rules = &config.mqtt.rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].key, MqttKeySetting::Level(1));
        assert_eq!(rules[1].key, MqttKeySetting::Topic);
        let mapping = config.mqtt.mapping().map_err(|error| error.to_string())?;
        let route = mapping
            .route("sensors/dev7/temperature", "c")
            .map_err(|_| "refused")?;
        assert_eq!(
            (route.topic.as_str(), route.key.as_deref()),
            ("sensor-temperature", Some(&b"dev7"[..]))
        );
        let other = mapping.route("x/y", "c").map_err(|_| "refused")?;
        assert_eq!(other.topic, "mqtt");
        Ok(())
    }

    #[test]
    fn the_packet_limit_is_lowered_to_fit_a_batch() {
        let mqtt = MqttSection::default();
        assert_eq!(mqtt.effective_packet_bytes_max(1 << 20), 256 << 10);
        let small = mqtt.effective_packet_bytes_max(32 << 10);
        assert_eq!(small, (32 << 10) - 256 - 128 - 1024);
        assert_eq!(mqtt.session_config(32 << 10).packet_bytes_max, small);
    }

    #[test]
    fn bad_rules_are_reported_with_their_number_and_line() {
        let error = check(
            "[mqtt]\nallow_anonymous = true\n\n[[mqtt.rules]]\nfilter = \"a/+\"\ntopic = \"a\"\nkey = \"level:4\"\n",
        )
        .err()
        .unwrap_or_default();
        assert!(
            error.contains(":4:")
                && error.contains("mqtt.rules")
                && error.contains("rule 1 (filter \"a/+\""),
            "{error}"
        );
        let error = check("[[mqtt.rules]]\nfilter = \"a/#\"\ntopic = \"bad topic\"\n")
            .err()
            .unwrap_or_default();
        assert!(error.contains("rule 1") && error.contains("' '"), "{error}");
        let error = check("[[mqtt.rules]]\nfilter = \"a/#\"\ntopic = \"a\"\nkey = \"device\"\n")
            .err()
            .unwrap_or_default();
        assert!(error.contains("level:N"), "{error}");
        let error = check("[mqtt]\nallow_anonymous = false\n")
            .err()
            .unwrap_or_default();
        assert!(error.contains("users file"), "{error}");
    }
}
