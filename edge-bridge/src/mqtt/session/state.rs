//! What of a session outlives its connection and the broker process: its
//! subscriptions, the QoS 1 and 2 messages sent to the client and not yet
//! acknowledged (with their packet identifiers), the QoS 2 packet
//! identifiers received and awaiting PUBREL, the session expiry interval,
//! and the per-partition log cursors the node uses to resume deliveries.
//! [`SessionState::encode`] writes it in Rill's checked format (layout in
//! `docs/format.md`); [`SessionState::decode`] refuses every truncation and
//! corruption and never allocates past what the bytes can hold.

use super::super::message::Message;
use super::super::packet::{QoS, RetainHandling, SubscriptionOptions};
use super::super::stored::{
    StoredDecodeError, StoredReader, StoredWriter, get_message, open, put_message,
};
use super::super::topic::{TopicLimits, validate_topic_filter};

/// The format version of a stored session.
pub const SESSION_STATE_VERSION: u8 = 1;

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    /// As subscribed, `$share/GROUP/` included.
    pub filter: String,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// Where an outbound QoS 1 or 2 message stands.
#[expect(
    clippy::large_enum_variant,
    reason = "most in-flight entries are Published; boxing would cost an allocation per message"
)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundStage {
    /// PUBLISH sent, awaiting PUBACK (QoS 1) or PUBREC (QoS 2). The
    /// message is kept with the QoS and retain flag it was sent with.
    Published {
        message: Message,
        subscription_identifiers: Vec<u32>,
    },
    /// QoS 2: PUBREC received and PUBREL sent, awaiting PUBCOMP.
    Released,
}

/// One outbound message in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    pub packet_id: u16,
    pub stage: OutboundStage,
}

/// How far a session has taken records of one Rill topic partition: the
/// node resumes reading there. Opaque to the session beyond ordering.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub topic: String,
    pub partition: u32,
    pub next_offset: u64,
}

/// A session as stored between connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub client_id: String,
    /// Seconds the session lives after its connection closes;
    /// `u32::MAX` never expires.
    pub session_expiry_s: u32,
    /// When the session was last known alive (its connection open, or
    /// the moment it closed), milliseconds since the Unix epoch.
    pub saved_at_ms: u64,
    pub subscriptions: Vec<StoredSubscription>,
    /// In packet identifier order.
    pub outbound: Vec<OutboundMessage>,
    /// QoS 2 packet identifiers whose PUBREC was sent and whose PUBREL
    /// has not come, in order.
    pub inbound_awaiting_release: Vec<u16>,
    pub cursors: Vec<Cursor>,
}

impl SessionState {
    /// When the session ends if no connection takes it over; `None` when
    /// it never expires.
    pub fn expires_at_ms(&self) -> Option<u64> {
        (self.session_expiry_s != u32::MAX)
            .then(|| self.saved_at_ms + u64::from(self.session_expiry_s) * 1000)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut writer = StoredWriter::new(SESSION_STATE_VERSION);
        writer.string(&self.client_id);
        writer.u32(self.session_expiry_s);
        writer.u64(self.saved_at_ms);
        writer.len32(self.subscriptions.len());
        for subscription in &self.subscriptions {
            writer.string(&subscription.filter);
            writer.u8(options_byte(subscription.options));
            writer.u32(subscription.identifier.unwrap_or(0));
        }
        writer.len32(self.outbound.len());
        for outbound in &self.outbound {
            writer.u16(outbound.packet_id);
            match &outbound.stage {
                OutboundStage::Published {
                    message,
                    subscription_identifiers,
                } => {
                    writer.u8(0);
                    put_message(&mut writer, message);
                    writer.len32(subscription_identifiers.len());
                    for identifier in subscription_identifiers {
                        writer.u32(*identifier);
                    }
                }
                OutboundStage::Released => writer.u8(1),
            }
        }
        writer.len32(self.inbound_awaiting_release.len());
        for packet_id in &self.inbound_awaiting_release {
            writer.u16(*packet_id);
        }
        writer.len32(self.cursors.len());
        for cursor in &self.cursors {
            writer.string(&cursor.topic);
            writer.u32(cursor.partition);
            writer.u64(cursor.next_offset);
        }
        writer.finish()
    }

    /// Reads a stored session of at most `state_bytes_max` bytes.
    pub fn decode(bytes: &[u8], state_bytes_max: usize) -> Result<SessionState, StoredDecodeError> {
        let mut reader = open(bytes, SESSION_STATE_VERSION, state_bytes_max)?;
        let client_id = reader.string("client identifier")?;
        let session_expiry_s = reader.u32("session expiry")?;
        let saved_at_ms = reader.u64("saved at")?;
        // Entry sizes: filter length 4 + options 1 + identifier 4.
        let count = reader.count(9, "subscriptions")?;
        let mut subscriptions = Vec::with_capacity(count);
        for _ in 0..count {
            let filter = reader.string("subscription filter")?;
            if validate_topic_filter(&filter, &TopicLimits::PROTOCOL).is_err() {
                return Err(invalid("subscription filter"));
            }
            let options = options_from_byte(reader.u8("subscription options")?)?;
            let identifier = match reader.u32("subscription identifier")? {
                0 => None,
                identifier @ 1..=268_435_455 => Some(identifier),
                _ => return Err(invalid("subscription identifier")),
            };
            subscriptions.push(StoredSubscription {
                filter,
                options,
                identifier,
            });
        }
        // Packet identifier 2 + stage 1.
        let count = reader.count(3, "outbound messages")?;
        let mut outbound: Vec<OutboundMessage> = Vec::with_capacity(count);
        for _ in 0..count {
            let packet_id = packet_id(&mut reader)?;
            if outbound
                .last()
                .is_some_and(|last| last.packet_id >= packet_id)
            {
                return Err(invalid("packet identifier order"));
            }
            let stage = match reader.u8("outbound stage")? {
                0 => published(&mut reader)?,
                1 => OutboundStage::Released,
                _ => return Err(invalid("outbound stage")),
            };
            outbound.push(OutboundMessage { packet_id, stage });
        }
        let count = reader.count(2, "inbound packet identifiers")?;
        let mut inbound_awaiting_release: Vec<u16> = Vec::with_capacity(count);
        for _ in 0..count {
            let packet_id = packet_id(&mut reader)?;
            if inbound_awaiting_release.contains(&packet_id) {
                return Err(invalid("inbound packet identifiers"));
            }
            inbound_awaiting_release.push(packet_id);
        }
        // Topic length 4 + partition 4 + offset 8.
        let count = reader.count(16, "cursors")?;
        let mut cursors = Vec::with_capacity(count);
        for _ in 0..count {
            cursors.push(Cursor {
                topic: reader.string("cursor topic")?,
                partition: reader.u32("cursor partition")?,
                next_offset: reader.u64("cursor offset")?,
            });
        }
        reader.finish()?;
        Ok(SessionState {
            client_id,
            session_expiry_s,
            saved_at_ms,
            subscriptions,
            outbound,
            inbound_awaiting_release,
            cursors,
        })
    }
}

fn invalid(field: &'static str) -> StoredDecodeError {
    StoredDecodeError::Invalid { field }
}

fn packet_id(reader: &mut StoredReader<'_>) -> Result<u16, StoredDecodeError> {
    match reader.u16("packet identifier")? {
        0 => Err(invalid("packet identifier")),
        packet_id => Ok(packet_id),
    }
}

fn published(reader: &mut StoredReader<'_>) -> Result<OutboundStage, StoredDecodeError> {
    let message = get_message(reader)?;
    if message.qos == QoS::AtMostOnce {
        return Err(invalid("outbound QoS"));
    }
    let count = reader.count(4, "subscription identifiers")?;
    let mut subscription_identifiers = Vec::with_capacity(count);
    for _ in 0..count {
        match reader.u32("subscription identifier")? {
            identifier @ 1..=268_435_455 => subscription_identifiers.push(identifier),
            _ => return Err(invalid("subscription identifier")),
        }
    }
    Ok(OutboundStage::Published {
        message,
        subscription_identifiers,
    })
}

/// The MQTT 5.0 subscription options byte.
fn options_byte(options: SubscriptionOptions) -> u8 {
    options.qos as u8
        | u8::from(options.no_local) << 2
        | u8::from(options.retain_as_published) << 3
        | (options.retain_handling as u8) << 4
}

fn options_from_byte(byte: u8) -> Result<SubscriptionOptions, StoredDecodeError> {
    let qos = QoS::from_bits(byte & 0b11);
    let retain_handling = match (byte >> 4) & 0b11 {
        0 => Some(RetainHandling::SendAtSubscribe),
        1 => Some(RetainHandling::SendAtSubscribeIfNew),
        2 => Some(RetainHandling::DoNotSend),
        _ => None,
    };
    match (qos, retain_handling, byte & 0b1100_0000) {
        (Some(qos), Some(retain_handling), 0) => Ok(SubscriptionOptions {
            qos,
            no_local: byte & 0b0100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        }),
        _ => Err(invalid("subscription options")),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::mqtt::message::MessageProperties;

    fn example() -> SessionState {
        SessionState {
            client_id: "dev7".into(),
            session_expiry_s: 3600,
            saved_at_ms: 1_000,
            subscriptions: vec![
                StoredSubscription {
                    filter: "cmd/dev7/#".into(),
                    options: SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                    identifier: Some(7),
                },
                StoredSubscription {
                    filter: "$share/g/jobs/+".into(),
                    options: SubscriptionOptions::with_qos(QoS::AtLeastOnce),
                    identifier: None,
                },
            ],
            outbound: vec![
                OutboundMessage {
                    packet_id: 3,
                    stage: OutboundStage::Published {
                        message: Message {
                            topic: "cmd/dev7/reboot".into(),
                            payload: Bytes::from_static(b"now"),
                            qos: QoS::AtLeastOnce,
                            retain: false,
                            properties: MessageProperties {
                                user_properties: vec![("by".into(), "ops".into())],
                                ..MessageProperties::default()
                            },
                        },
                        subscription_identifiers: vec![7],
                    },
                },
                OutboundMessage {
                    packet_id: 9,
                    stage: OutboundStage::Released,
                },
            ],
            inbound_awaiting_release: vec![4, 2],
            cursors: vec![Cursor {
                topic: "commands".into(),
                partition: 1,
                next_offset: 42,
            }],
        }
    }

    #[test]
    fn round_trips() {
        let state = example();
        assert_eq!(SessionState::decode(&state.encode(), 1 << 20), Ok(state));
        let empty = SessionState {
            client_id: String::new(),
            session_expiry_s: 0,
            saved_at_ms: 0,
            subscriptions: Vec::new(),
            outbound: Vec::new(),
            inbound_awaiting_release: Vec::new(),
            cursors: Vec::new(),
        };
        assert_eq!(SessionState::decode(&empty.encode(), 1 << 20), Ok(empty));
    }

    #[test]
    fn expiry() {
        let mut state = example();
        assert_eq!(state.expires_at_ms(), Some(3_601_000));
        state.session_expiry_s = u32::MAX;
        assert_eq!(state.expires_at_ms(), None);
    }

    #[test]
    fn every_truncation_and_corruption_is_refused() {
        let bytes = example().encode();
        for len in 0..bytes.len() {
            assert!(
                SessionState::decode(&bytes[..len], 1 << 20).is_err(),
                "prefix of {len} bytes"
            );
        }
        for index in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[index] ^= 1 << bit;
                assert!(
                    SessionState::decode(&damaged, 1 << 20).is_err(),
                    "byte {index} bit {bit}"
                );
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SessionState::decode(&longer, 1 << 20).is_err());
        assert_eq!(
            SessionState::decode(&bytes, bytes.len() - 1),
            Err(StoredDecodeError::TooLarge {
                bytes: bytes.len(),
                bytes_max: bytes.len() - 1
            })
        );
    }

    /// Contents with a valid checksum but values the format forbids.
    #[test]
    fn checked_but_invalid_contents_are_refused() {
        let header = |writer: &mut StoredWriter| {
            writer.string("c");
            writer.u32(0);
            writer.u64(0);
        };
        type Body = Box<dyn Fn(&mut StoredWriter)>;
        let cases: Vec<(Body, StoredDecodeError)> = vec![
            (
                Box::new(|writer| writer.u32(u32::MAX)),
                StoredDecodeError::Truncated {
                    field: "subscriptions",
                },
            ),
            (
                Box::new(|writer| {
                    writer.u32(1);
                    writer.string("a/#/b");
                    writer.u8(0);
                    writer.u32(0);
                }),
                invalid("subscription filter"),
            ),
            (
                Box::new(|writer| {
                    writer.u32(1);
                    writer.string("a");
                    writer.u8(0b11);
                    writer.u32(0);
                }),
                invalid("subscription options"),
            ),
            (
                Box::new(|writer| {
                    writer.u32(0);
                    writer.u32(2);
                    writer.u16(5);
                    writer.u8(1);
                    writer.u16(5);
                    writer.u8(1);
                }),
                invalid("packet identifier order"),
            ),
            (
                Box::new(|writer| {
                    writer.u32(0);
                    writer.u32(1);
                    writer.u16(0);
                    writer.u8(1);
                }),
                invalid("packet identifier"),
            ),
            (
                Box::new(|writer| {
                    writer.u32(0);
                    writer.u32(0);
                    writer.u32(2);
                    writer.u16(4);
                    writer.u16(4);
                }),
                invalid("inbound packet identifiers"),
            ),
        ];
        for (body, expected) in cases {
            let mut writer = StoredWriter::new(SESSION_STATE_VERSION);
            header(&mut writer);
            body(&mut writer);
            assert_eq!(
                SessionState::decode(&writer.finish(), 1 << 20),
                Err(expected.clone()),
                "{expected}"
            );
        }
    }
}
