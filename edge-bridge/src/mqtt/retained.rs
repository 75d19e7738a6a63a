//! The broker-wide store of retained messages: at most one message per
//! MQTT topic name, set by a PUBLISH with the retain flag and cleared by
//! one with an empty payload, looked up by topic filter when a client
//! subscribes. It is a plain data structure; the node owns one, persists
//! each change with [`encode_entry`] (one entry per topic, replaced whole)
//! and rebuilds the store at start with [`decode_entry`].
//!
//! The store is bounded by `retained_messages_max` and
//! `retained_bytes_max` (topic, payload and properties of every entry).
//! When a new message does not fit, it is not retained and the old one for
//! its topic, if any, stays; the message itself is still appended to the
//! log and delivered like any other, so the publisher is acknowledged as
//! usual and the refusal is the operator's to see in the counters.

use std::collections::BTreeMap;

use super::message::Message;
use super::stored::{StoredDecodeError, StoredWriter, get_message, open, put_message};
use super::topic::{matches, parse_shared};

/// How many retained messages and bytes the broker keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    pub retained_messages_max: usize,
    /// Topic, payload and property bytes of all entries together.
    pub retained_bytes_max: usize,
}

/// What [`RetainedStore::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainChange {
    /// A new topic now has a retained message: persist it.
    Stored,
    /// The topic's retained message was replaced: persist it.
    Replaced,
    /// An empty payload removed the topic's message: delete it on disk.
    Cleared,
    /// An empty payload on a topic without one: nothing to do.
    Unchanged,
}

/// Why a message was not retained (it is still published).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetainError {
    #[error("the store holds its maximum of {retained_messages_max} retained messages")]
    MessagesFull { retained_messages_max: usize },
    #[error("{entry_bytes} more bytes would pass the limit of {retained_bytes_max} retained bytes")]
    BytesFull {
        entry_bytes: usize,
        retained_bytes_max: usize,
    },
}

/// The retained messages by topic.
#[derive(Debug, Clone)]
pub struct RetainedStore {
    limits: RetainedLimits,
    messages: BTreeMap<String, Message>,
    bytes: usize,
}

/// What an entry counts against `retained_bytes_max`.
pub fn entry_bytes(message: &Message) -> usize {
    let properties = &message.properties;
    message.topic.len()
        + message.payload.len()
        + properties.content_type.as_ref().map_or(0, String::len)
        + properties.response_topic.as_ref().map_or(0, String::len)
        + properties
            .correlation_data
            .as_ref()
            .map_or(0, |data| data.len())
        + properties
            .user_properties
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
}

impl RetainedStore {
    pub fn new(limits: RetainedLimits) -> RetainedStore {
        RetainedStore {
            limits,
            messages: BTreeMap::new(),
            bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Bytes counted against `retained_bytes_max`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Retains `message` for its topic (its retain flag is not looked at:
    /// the caller retains what was published with it), or clears the topic
    /// when the payload is empty.
    pub fn set(&mut self, message: Message) -> Result<RetainChange, RetainError> {
        if message.payload.is_empty() {
            return Ok(match self.messages.remove(&message.topic) {
                Some(old) => {
                    self.bytes -= entry_bytes(&old);
                    RetainChange::Cleared
                }
                None => RetainChange::Unchanged,
            });
        }
        let new_bytes = entry_bytes(&message);
        let old_bytes = self.messages.get(&message.topic).map(entry_bytes);
        if old_bytes.is_none() && self.messages.len() >= self.limits.retained_messages_max {
            return Err(RetainError::MessagesFull {
                retained_messages_max: self.limits.retained_messages_max,
            });
        }
        let total = self.bytes - old_bytes.unwrap_or(0) + new_bytes;
        if total > self.limits.retained_bytes_max {
            return Err(RetainError::BytesFull {
                entry_bytes: new_bytes,
                retained_bytes_max: self.limits.retained_bytes_max,
            });
        }
        self.bytes = total;
        self.messages.insert(message.topic.clone(), message);
        Ok(match old_bytes {
            Some(_) => RetainChange::Replaced,
            None => RetainChange::Stored,
        })
    }

    pub fn get(&self, topic: &str) -> Option<&Message> {
        self.messages.get(topic)
    }

    /// The unexpired retained messages whose topic `filter` matches, in
    /// topic order. Wildcard filters do not match `$` topics at their first
    /// level; a shared subscription gets none (MQTT 5.0 sends retained
    /// messages to non-shared subscriptions only).
    pub fn lookup(&self, filter: &str, now_ms: u64) -> Vec<&Message> {
        if !matches!(parse_shared(filter), Ok(None)) {
            return Vec::new();
        }
        let live = |message: &&Message| !message.properties.is_expired(now_ms);
        // Only topics that start with the filter's literal levels can match.
        let literal: Vec<&str> = filter
            .split('/')
            .take_while(|level| *level != "+" && *level != "#")
            .collect();
        if literal.len() == filter.split('/').count() {
            return self.messages.get(filter).filter(live).into_iter().collect();
        }
        let prefix = literal.join("/");
        self.messages
            .range(prefix.clone()..)
            .take_while(|(topic, _)| topic.starts_with(&prefix))
            .map(|(_, message)| message)
            .filter(|message| matches(filter, &message.topic))
            .filter(live)
            .collect()
    }

    /// Removes expired messages and returns their topics, so the node
    /// deletes them on disk too.
    pub fn remove_expired(&mut self, now_ms: u64) -> Vec<String> {
        let expired: Vec<String> = self
            .messages
            .iter()
            .filter(|(_, message)| message.properties.is_expired(now_ms))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in &expired {
            if let Some(old) = self.messages.remove(topic) {
                self.bytes -= entry_bytes(&old);
            }
        }
        expired
    }
}

/// The format version of a stored retained entry.
pub const RETAINED_ENTRY_VERSION: u8 = 1;

/// One retained message as the node stores it (layout in
/// `docs/format.md`): version 1, the message, CRC-32.
pub fn encode_entry(message: &Message) -> Vec<u8> {
    let mut writer = StoredWriter::new(RETAINED_ENTRY_VERSION);
    put_message(&mut writer, message);
    writer.finish()
}

/// Reads one stored retained entry of at most `entry_bytes_max` bytes,
/// refusing any damage.
pub fn decode_entry(bytes: &[u8], entry_bytes_max: usize) -> Result<Message, StoredDecodeError> {
    let mut reader = open(bytes, RETAINED_ENTRY_VERSION, entry_bytes_max)?;
    let message = get_message(&mut reader)?;
    reader.finish()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::mqtt::message::MessageProperties;
    use crate::mqtt::packet::QoS;
    use crate::mqtt::properties::PayloadFormat;

    fn message(topic: &str, payload: &'static [u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: MessageProperties::default(),
        }
    }

    fn roomy() -> RetainedStore {
        RetainedStore::new(RetainedLimits {
            retained_messages_max: 100,
            retained_bytes_max: 10_000,
        })
    }

    fn topics(messages: Vec<&Message>) -> Vec<&str> {
        messages
            .iter()
            .map(|message| message.topic.as_str())
            .collect()
    }

    #[test]
    fn set_replace_and_clear() {
        let mut store = roomy();
        assert_eq!(store.set(message("a/b", b"1")), Ok(RetainChange::Stored));
        assert_eq!(store.set(message("a/b", b"22")), Ok(RetainChange::Replaced));
        assert_eq!(store.bytes(), 5);
        assert_eq!(
            store.get("a/b").map(|m| m.payload.clone()),
            Some(Bytes::from_static(b"22"))
        );
        assert_eq!(store.set(message("a/b", b"")), Ok(RetainChange::Cleared));
        assert_eq!(store.set(message("a/b", b"")), Ok(RetainChange::Unchanged));
        assert!(store.is_empty());
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn lookup_by_filter_with_the_dollar_rule() {
        let mut store = roomy();
        for topic in ["a", "a/b", "a/b/c", "a/x", "ab", "$SYS/up", "b/b"] {
            assert!(store.set(message(topic, b"v")).is_ok());
        }
        let table: [(&str, &[&str]); 8] = [
            ("a", &["a"]),
            ("a/#", &["a", "a/b", "a/b/c", "a/x"]),
            ("a/+", &["a/b", "a/x"]),
            ("+/b", &["a/b", "b/b"]),
            ("#", &["a", "a/b", "a/b/c", "a/x", "ab", "b/b"]),
            ("$SYS/#", &["$SYS/up"]),
            ("+/up", &[]),
            ("$share/g/a", &[]),
        ];
        for (filter, expected) in table {
            assert_eq!(topics(store.lookup(filter, 0)), expected, "{filter}");
        }
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let mut store = RetainedStore::new(RetainedLimits {
            retained_messages_max: 2,
            retained_bytes_max: 10,
        });
        assert!(store.set(message("a", b"1234")).is_ok());
        assert!(store.set(message("b", b"1")).is_ok());
        assert_eq!(
            store.set(message("c", b"1")),
            Err(RetainError::MessagesFull {
                retained_messages_max: 2
            })
        );
        // Replacing is not a new entry; it counts the bytes it frees.
        assert_eq!(
            store.set(message("a", b"1234567")),
            Ok(RetainChange::Replaced)
        );
        assert_eq!(
            store.set(message("a", b"12345678")),
            Err(RetainError::BytesFull {
                entry_bytes: 9,
                retained_bytes_max: 10
            })
        );
        assert_eq!(store.get("a").map(|m| m.payload.len()), Some(7));
        assert_eq!(store.bytes(), 10);
    }

    #[test]
    fn expired_messages_are_not_found_and_are_removed() {
        let mut store = roomy();
        let mut expiring = message("t/1", b"v");
        expiring.properties.expires_at_ms = Some(1_000);
        assert!(store.set(expiring).is_ok());
        assert!(store.set(message("t/2", b"v")).is_ok());
        assert_eq!(topics(store.lookup("t/+", 999)), ["t/1", "t/2"]);
        assert_eq!(topics(store.lookup("t/+", 1_000)), ["t/2"]);
        assert_eq!(store.remove_expired(1_000), ["t/1"]);
        assert_eq!(store.len(), 1);
        assert_eq!(store.bytes(), 4);
    }

    fn full_message() -> Message {
        Message {
            topic: "sensors/dev7/t".into(),
            payload: Bytes::from_static(b"21.5"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: MessageProperties {
                payload_format: Some(PayloadFormat::Utf8),
                expires_at_ms: Some(123_456),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
            },
        }
    }

    #[test]
    fn entries_round_trip() {
        for message in [full_message(), message("a", b"")] {
            let bytes = encode_entry(&message);
            assert_eq!(decode_entry(&bytes, 1 << 20), Ok(message));
        }
        let bytes = encode_entry(&message("a", b"x"));
        expect_test::expect![[r#"
            "01 01000000 61 01000000 78 01 01 00 00000000 6fafb155"
        "#]]
        .assert_debug_eq(&spaced(&bytes, &[1, 4, 1, 4, 1, 1, 1, 1, 4, 4]));
    }

    /// Hex with a space after each field of `widths`.
    fn spaced(bytes: &[u8], widths: &[usize]) -> String {
        let mut fields = Vec::new();
        let mut rest = bytes;
        for &width in widths {
            let (field, tail) = rest.split_at(width);
            fields.push(
                field
                    .iter()
                    .map(|byte| format!("{byte:02x}"))
                    .collect::<String>(),
            );
            rest = tail;
        }
        fields.join(" ")
    }

    #[test]
    fn every_truncation_and_corruption_is_refused() {
        let bytes = encode_entry(&full_message());
        for len in 0..bytes.len() {
            assert!(
                decode_entry(&bytes[..len], 1 << 20).is_err(),
                "prefix {len}"
            );
        }
        for index in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[index] ^= 1 << bit;
                assert!(
                    decode_entry(&damaged, 1 << 20).is_err(),
                    "byte {index} bit {bit}"
                );
            }
        }
        assert_eq!(
            decode_entry(&bytes, 10),
            Err(StoredDecodeError::TooLarge {
                bytes: bytes.len(),
                bytes_max: 10
            })
        );
        // A valid checksum over a wrong version is still refused.
        let mut writer = StoredWriter::new(9);
        put_message(&mut writer, &full_message());
        assert_eq!(
            decode_entry(&writer.finish(), 1 << 20),
            Err(StoredDecodeError::UnsupportedVersion {
                version: 9,
                expected: 1
            })
        );
    }

    #[test]
    fn checked_but_hostile_lengths_are_refused_without_allocating() {
        // A user-property count of 2^32 - 1 with a valid checksum.
        let mut writer = StoredWriter::new(RETAINED_ENTRY_VERSION);
        writer.string("a");
        writer.bytes(b"x");
        writer.u8(1);
        writer.u8(1);
        writer.u8(0);
        writer.u32(u32::MAX);
        assert_eq!(
            decode_entry(&writer.finish(), 1 << 20),
            Err(StoredDecodeError::Truncated {
                field: "user properties"
            })
        );
        let mut writer = StoredWriter::new(RETAINED_ENTRY_VERSION);
        writer.string("a/+");
        assert_eq!(
            decode_entry(&writer.finish(), 1 << 20),
            Err(StoredDecodeError::Invalid {
                field: "message topic"
            })
        );
    }
}
