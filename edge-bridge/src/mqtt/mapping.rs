//! Mapping rules between MQTT topics and Rill topics, both ways.
//!
//! **Forward (PUBLISH to record).** A [`Mapping`] is an ordered list of
//! [`Rule`]s, each an MQTT topic filter, the Rill topic its messages go to,
//! and where the record key comes from ([`KeySource`]). The first rule whose
//! filter matches the PUBLISH topic wins; a topic that matches no rule goes
//! to the catch-all topic or is refused, as [`Unmatched`] says. Rule filters
//! follow the MQTT filter rules (`+`, `#`, and `$` topics are not matched by
//! a leading wildcard); `$share/` filters are not rules. Rill topic names
//! follow Kafka's rules: 1 to 249 characters from `[a-zA-Z0-9._-]`, and not
//! `.` or `..`.
//!
//! **Headers.** Each record carries what MQTT said about the message as
//! record headers (values are ASCII text unless noted), so Kafka and native
//! consumers see it and MQTT subscribers get it back:
//!
//! | header | value |
//! |---|---|
//! | `mqtt.topic` | the MQTT topic name (after alias resolution) |
//! | `mqtt.client_id` | the publishing client's identifier (for No Local after a replay) |
//! | `mqtt.qos` | `0`, `1` or `2`: the QoS it was published with |
//! | `mqtt.retain` | `0` or `1` |
//! | `mqtt.content_type` | the Content Type, when set |
//! | `mqtt.payload_format` | `0` (bytes) or `1` (UTF-8), when set |
//! | `mqtt.message_expiry` | when the message expires, milliseconds since the Unix epoch, decimal; when set |
//! | `mqtt.response_topic` | the Response Topic, when set |
//! | `mqtt.correlation_data` | the Correlation Data, raw bytes, when set |
//! | `mqtt.user.NAME` | the value of user property `NAME`, once per property, in order (names may repeat) |
//!
//! **Reverse (record to PUBLISH).** A record read from a Rill topic is
//! delivered to MQTT subscribers on the MQTT topic in its `mqtt.topic`
//! header. A record without one (produced over Kafka or the native
//! protocol) gets its MQTT topic from the rules that send to its Rill topic,
//! tried in order, the first that can build one wins:
//! - `KeySource::Level(n)`: the key, which must be valid UTF-8 and a valid
//!   single level (no `/`, `+`, `#`, U+0000), replaces level `n` of the
//!   filter; every other level must be literal. With
//!   `sensors/+/temperature -> sensor-temperature` keyed by level 1, key
//!   `dev7` maps back to `sensors/dev7/temperature`.
//! - `KeySource::Topic`: the key is the whole MQTT topic, used when it is a
//!   valid topic name that the filter matches.
//! - `KeySource::ClientId` and `KeySource::None`: the filter itself, when
//!   it has no wildcard.
//!
//! A record that no rule maps back is not delivered to MQTT. Such records
//! are published as QoS 2, so the subscription's maximum QoS decides, and
//! with the retain flag clear. Expired records (by `mqtt.message_expiry`)
//! are not delivered.

use std::fmt;

use bytes::Bytes;

use super::message::{Message, MessageProperties};
use super::packet::QoS;
use super::properties::PayloadFormat;
use super::topic::{
    TopicError, TopicLimits, matches, parse_shared, validate_topic_filter, validate_topic_name,
};

/// Where a record's key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// Level `n` of the MQTT topic, counted from 0 (for `sensors/+/temp`,
    /// level 1 is the device id the `+` matches).
    Level(usize),
    /// The whole MQTT topic name.
    Topic,
    /// The publishing client's identifier.
    ClientId,
    /// No key: records spread over partitions by the topic's partitioner.
    None,
}

/// One rule: messages on MQTT topics matching `filter` go to Rill topic
/// `topic`, keyed by `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub filter: String,
    pub topic: String,
    pub key: KeySource,
}

/// What happens to a message whose topic matches no rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    /// It goes to this Rill topic, keyed by its MQTT topic.
    Topic(String),
    /// It is refused (MQTT 5.0 reason code 0x90 Topic Name invalid).
    Refuse,
}

/// Where one message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub topic: String,
    pub key: Option<Vec<u8>>,
}

/// The message matches no rule and [`Unmatched::Refuse`] is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// Why a set of rules is not a mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("rule {rule}: filter {filter:?} is not a valid MQTT topic filter: {error}")]
    InvalidFilter {
        rule: usize,
        filter: String,
        error: TopicError,
    },
    #[error("rule {rule}: filter {filter:?} is a shared subscription, not a topic filter")]
    SharedFilter { rule: usize, filter: String },
    #[error("rule {rule}: {problem}")]
    InvalidTopic {
        rule: usize,
        problem: TopicNameError,
    },
    #[error("rule {rule}: key level {level} is past the filter's {levels} levels")]
    KeyLevelMissing {
        rule: usize,
        level: usize,
        levels: usize,
    },
    #[error("rule {rule}: key level {level} is the multi-level wildcard '#'")]
    KeyLevelMultiLevel { rule: usize, level: usize },
    #[error("catch-all topic: {0}")]
    InvalidCatchAllTopic(TopicNameError),
}

/// Why a string is not a Rill (Kafka) topic name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name has {chars} characters, over the 249 allowed")]
    TooLong { chars: usize },
    #[error("topic name {name:?} may not be '.' or '..'")]
    Dots { name: String },
    #[error("topic name {name:?} has {character:?}; only [a-zA-Z0-9._-] are allowed")]
    InvalidCharacter { name: String, character: char },
}

/// The longest Rill topic name, as in Kafka.
pub const RILL_TOPIC_CHARS_MAX: usize = 249;

/// Checks a Rill topic name by Kafka's rules.
pub fn validate_rill_topic(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() {
        return Err(TopicNameError::Empty);
    }
    if let Some(character) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(TopicNameError::InvalidCharacter {
            name: name.to_owned(),
            character,
        });
    }
    if name.len() > RILL_TOPIC_CHARS_MAX {
        return Err(TopicNameError::TooLong { chars: name.len() });
    }
    if name == "." || name == ".." {
        return Err(TopicNameError::Dots {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checked rules and the unmatched policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    rules: Vec<Rule>,
    unmatched: Unmatched,
}

impl Mapping {
    /// Checks every rule: filters valid (and not shared), Rill topic names
    /// valid, key levels inside their filter and not on `#`.
    pub fn new(rules: Vec<Rule>, unmatched: Unmatched) -> Result<Mapping, MappingError> {
        for (index, rule) in rules.iter().enumerate() {
            validate_topic_filter(&rule.filter, &TopicLimits::PROTOCOL).map_err(|error| {
                MappingError::InvalidFilter {
                    rule: index,
                    filter: rule.filter.clone(),
                    error,
                }
            })?;
            if !matches!(parse_shared(&rule.filter), Ok(None)) {
                return Err(MappingError::SharedFilter {
                    rule: index,
                    filter: rule.filter.clone(),
                });
            }
            validate_rill_topic(&rule.topic).map_err(|problem| MappingError::InvalidTopic {
                rule: index,
                problem,
            })?;
            if let KeySource::Level(level) = rule.key {
                let levels: Vec<&str> = rule.filter.split('/').collect();
                match levels.get(level) {
                    None => {
                        return Err(MappingError::KeyLevelMissing {
                            rule: index,
                            level,
                            levels: levels.len(),
                        });
                    }
                    Some(&"#") => {
                        return Err(MappingError::KeyLevelMultiLevel { rule: index, level });
                    }
                    Some(_) => {}
                }
            }
        }
        if let Unmatched::Topic(topic) = &unmatched {
            validate_rill_topic(topic).map_err(MappingError::InvalidCatchAllTopic)?;
        }
        Ok(Mapping { rules, unmatched })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn unmatched(&self) -> &Unmatched {
        &self.unmatched
    }

    /// Where a message published on `mqtt_topic` (a valid topic name) by
    /// `client_id` goes: the first matching rule, else the unmatched policy.
    pub fn route(&self, mqtt_topic: &str, client_id: &str) -> Result<Route, Refused> {
        let Some(rule) = self
            .rules
            .iter()
            .find(|rule| matches(&rule.filter, mqtt_topic))
        else {
            return match &self.unmatched {
                Unmatched::Topic(topic) => Ok(Route {
                    topic: topic.clone(),
                    key: Some(mqtt_topic.as_bytes().to_vec()),
                }),
                Unmatched::Refuse => Err(Refused),
            };
        };
        let key = match rule.key {
            KeySource::Level(level) => mqtt_topic
                .split('/')
                .nth(level)
                .map(|level| level.as_bytes().to_vec()),
            KeySource::Topic => Some(mqtt_topic.as_bytes().to_vec()),
            KeySource::ClientId => Some(client_id.as_bytes().to_vec()),
            KeySource::None => None,
        };
        Ok(Route {
            topic: rule.topic.clone(),
            key,
        })
    }

    /// The Rill topics whose records may reach a subscriber of `filter`
    /// (an MQTT filter, the inner one for a shared subscription): the
    /// topics of rules whose filter overlaps it, and the catch-all topic.
    /// Each topic once, in rule order.
    pub fn source_topics(&self, filter: &str) -> Vec<&str> {
        let mut topics: Vec<&str> = Vec::new();
        let catch_all = match &self.unmatched {
            Unmatched::Topic(topic) => Some(topic.as_str()),
            Unmatched::Refuse => None,
        };
        let overlapping = self
            .rules
            .iter()
            .filter(|rule| filters_overlap(&rule.filter, filter))
            .map(|rule| rule.topic.as_str());
        for topic in overlapping.chain(catch_all) {
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        topics
    }

    /// The MQTT topic a record of Rill topic `rill_topic` is delivered on:
    /// its `mqtt.topic` header when that holds a valid topic name, else
    /// the first rule sending to `rill_topic` that maps it back (see the
    /// module documentation). `None`: it is not delivered to MQTT.
    pub fn mqtt_topic_of_record(
        &self,
        rill_topic: &str,
        headers: &[(String, Vec<u8>)],
        key: Option<&[u8]>,
    ) -> Option<String> {
        if let Some(topic) = header(headers, TOPIC_HEADER).and_then(mqtt_string)
            && validate_topic_name(topic, &TopicLimits::PROTOCOL).is_ok()
        {
            return Some(topic.to_owned());
        }
        self.rules
            .iter()
            .filter(|rule| rule.topic == rill_topic)
            .find_map(|rule| rule.reverse_topic(key))
    }

    /// The message a record becomes for MQTT subscribers at `now_ms`, or
    /// `None` when it maps to no MQTT topic or has expired.
    pub fn message_from_record(
        &self,
        rill_topic: &str,
        headers: &[(String, Vec<u8>)],
        key: Option<&[u8]>,
        value: Bytes,
        now_ms: u64,
    ) -> Option<Message> {
        let topic = self.mqtt_topic_of_record(rill_topic, headers, key)?;
        let message = message_from_headers(topic, headers, value);
        if message.properties.is_expired(now_ms) {
            return None;
        }
        Some(message)
    }
}

impl Rule {
    /// The MQTT topic this rule maps a record with `key` back to, if it
    /// can build one (module documentation, "Reverse").
    pub fn reverse_topic(&self, key: Option<&[u8]>) -> Option<String> {
        let has_wildcard =
            |filter: &str| filter.split('/').any(|level| level == "+" || level == "#");
        let topic = match self.key {
            KeySource::Level(index) => {
                let key = std::str::from_utf8(key?).ok()?;
                if key.contains(['/', '+', '#', '\0']) {
                    return None;
                }
                let mut levels: Vec<&str> = self.filter.split('/').collect();
                *levels.get_mut(index)? = key;
                if has_wildcard(&levels.join("/")) {
                    return None;
                }
                levels.join("/")
            }
            KeySource::Topic => {
                let topic = std::str::from_utf8(key?).ok()?;
                if validate_topic_name(topic, &TopicLimits::PROTOCOL).is_err()
                    || !matches(&self.filter, topic)
                {
                    return None;
                }
                topic.to_owned()
            }
            KeySource::ClientId | KeySource::None => {
                if has_wildcard(&self.filter) {
                    return None;
                }
                self.filter.clone()
            }
        };
        // A key that empties the first level can still make `$` topics a
        // leading wildcard filter would not match; the filter decides.
        (validate_topic_name(&topic, &TopicLimits::PROTOCOL).is_ok()
            && matches(&self.filter, &topic))
        .then_some(topic)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{} -> {} ({:?})",
            self.filter, self.topic, self.key
        )
    }
}

/// Whether some topic name matches both filters (neither shared). Used to
/// find the Rill topics a subscription draws from.
pub fn filters_overlap(first: &str, second: &str) -> bool {
    let dollar_first = first.starts_with('$');
    let dollar_second = second.starts_with('$');
    // A `$` topic is matched only by a filter whose first level is literal.
    let leading_wildcard = |filter: &str| filter.starts_with(['+', '#']);
    if (dollar_first && leading_wildcard(second)) || (dollar_second && leading_wildcard(first)) {
        return false;
    }
    let mut first_levels = first.split('/');
    let mut second_levels = second.split('/');
    loop {
        match (first_levels.next(), second_levels.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(a), Some(b)) if a == "+" || b == "+" || a == b => {}
            _ => return false,
        }
    }
}

pub const TOPIC_HEADER: &str = "mqtt.topic";
pub const CLIENT_ID_HEADER: &str = "mqtt.client_id";
pub const QOS_HEADER: &str = "mqtt.qos";
pub const RETAIN_HEADER: &str = "mqtt.retain";
pub const CONTENT_TYPE_HEADER: &str = "mqtt.content_type";
pub const PAYLOAD_FORMAT_HEADER: &str = "mqtt.payload_format";
pub const MESSAGE_EXPIRY_HEADER: &str = "mqtt.message_expiry";
pub const RESPONSE_TOPIC_HEADER: &str = "mqtt.response_topic";
pub const CORRELATION_DATA_HEADER: &str = "mqtt.correlation_data";
/// User property `NAME` is header `mqtt.user.NAME`.
pub const USER_HEADER_PREFIX: &str = "mqtt.user.";

/// The record headers that carry a message's MQTT metadata (the table in
/// the module documentation), in that order; `publisher` is the client
/// that published it.
pub fn record_headers(message: &Message, publisher: &str) -> Vec<(String, Vec<u8>)> {
    let properties = &message.properties;
    let mut headers = Vec::with_capacity(4 + properties.user_properties.len());
    let mut push = |name: &str, value: Vec<u8>| headers.push((name.to_owned(), value));
    push(TOPIC_HEADER, message.topic.as_bytes().to_vec());
    push(CLIENT_ID_HEADER, publisher.as_bytes().to_vec());
    push(QOS_HEADER, vec![b'0' + message.qos as u8]);
    push(
        RETAIN_HEADER,
        vec![if message.retain { b'1' } else { b'0' }],
    );
    if let Some(content_type) = &properties.content_type {
        push(CONTENT_TYPE_HEADER, content_type.as_bytes().to_vec());
    }
    if let Some(format) = properties.payload_format {
        push(PAYLOAD_FORMAT_HEADER, vec![b'0' + format as u8]);
    }
    if let Some(at_ms) = properties.expires_at_ms {
        push(MESSAGE_EXPIRY_HEADER, at_ms.to_string().into_bytes());
    }
    if let Some(topic) = &properties.response_topic {
        push(RESPONSE_TOPIC_HEADER, topic.as_bytes().to_vec());
    }
    if let Some(data) = &properties.correlation_data {
        push(CORRELATION_DATA_HEADER, data.to_vec());
    }
    for (name, value) in &properties.user_properties {
        headers.push((
            format!("{USER_HEADER_PREFIX}{name}"),
            value.as_bytes().to_vec(),
        ));
    }
    headers
}

/// The client that published a record over MQTT, from its
/// `mqtt.client_id` header.
pub fn publisher_of_record(headers: &[(String, Vec<u8>)]) -> Option<&str> {
    header(headers, CLIENT_ID_HEADER).and_then(|value| std::str::from_utf8(value).ok())
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(header, _)| header == name)
        .map(|(_, value)| value.as_slice())
}

/// A header value MQTT can carry as a string: UTF-8, no U+0000, at most
/// 65 535 bytes.
fn mqtt_string(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    (text.len() <= usize::from(u16::MAX) && !text.contains('\0')).then_some(text)
}

/// Rebuilds a message from record headers. Headers that do not parse
/// (from a foreign producer) are left out rather than failing the record.
fn message_from_headers(topic: String, headers: &[(String, Vec<u8>)], value: Bytes) -> Message {
    let qos = match header(headers, QOS_HEADER) {
        Some(b"0") => QoS::AtMostOnce,
        Some(b"1") => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let retain = header(headers, RETAIN_HEADER) == Some(b"1");
    let payload_format = match header(headers, PAYLOAD_FORMAT_HEADER) {
        Some(b"0") => Some(PayloadFormat::Bytes),
        Some(b"1") => Some(PayloadFormat::Utf8),
        _ => None,
    };
    let expires_at_ms = header(headers, MESSAGE_EXPIRY_HEADER)
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|text| text.parse::<u64>().ok());
    let response_topic = header(headers, RESPONSE_TOPIC_HEADER)
        .and_then(mqtt_string)
        .filter(|topic| validate_topic_name(topic, &TopicLimits::PROTOCOL).is_ok())
        .map(str::to_owned);
    let correlation_data = header(headers, CORRELATION_DATA_HEADER)
        .filter(|data| data.len() <= usize::from(u16::MAX))
        .map(Bytes::copy_from_slice);
    let user_properties = headers
        .iter()
        .filter_map(|(name, value)| {
            let name = mqtt_string(name.strip_prefix(USER_HEADER_PREFIX)?.as_bytes())?;
            Some((name.to_owned(), mqtt_string(value)?.to_owned()))
        })
        .collect();
    Message {
        topic,
        payload: value,
        qos,
        retain,
        properties: MessageProperties {
            payload_format,
            expires_at_ms,
            content_type: header(headers, CONTENT_TYPE_HEADER)
                .and_then(mqtt_string)
                .map(str::to_owned),
            response_topic,
            correlation_data,
            user_properties,
        },
    }
}

#[cfg(test)]
mod tests;
