//! The application message as the MQTT state Rill keeps on disk stores
//! it (retained messages, sessions), on the crate's shared stored layout
//! ([`crate::stored`]: little-endian, version byte first, CRC-32 last).

use bytes::Bytes;

pub use crate::stored::StoredDecodeError;
pub(crate) use crate::stored::{StoredReader, StoredWriter, open};

use super::message::{Message, MessageProperties};
use super::packet::QoS;
use super::properties::PayloadFormat;
use super::topic::{TopicLimits, validate_topic_name};

const HAS_PAYLOAD_FORMAT: u8 = 1;
const HAS_EXPIRY: u8 = 1 << 1;
const HAS_CONTENT_TYPE: u8 = 1 << 2;
const HAS_RESPONSE_TOPIC: u8 = 1 << 3;
const HAS_CORRELATION_DATA: u8 = 1 << 4;

/// Writes one application message (layout in `docs/format.md`).
pub(crate) fn put_message(writer: &mut StoredWriter, message: &Message) {
    let properties = &message.properties;
    writer.string(&message.topic);
    writer.bytes(&message.payload);
    writer.u8(message.qos as u8);
    writer.u8(u8::from(message.retain));
    let mut present = 0;
    for (flag, set) in [
        (HAS_PAYLOAD_FORMAT, properties.payload_format.is_some()),
        (HAS_EXPIRY, properties.expires_at_ms.is_some()),
        (HAS_CONTENT_TYPE, properties.content_type.is_some()),
        (HAS_RESPONSE_TOPIC, properties.response_topic.is_some()),
        (HAS_CORRELATION_DATA, properties.correlation_data.is_some()),
    ] {
        if set {
            present |= flag;
        }
    }
    writer.u8(present);
    if let Some(format) = properties.payload_format {
        writer.u8(format as u8);
    }
    if let Some(at_ms) = properties.expires_at_ms {
        writer.u64(at_ms);
    }
    if let Some(content_type) = &properties.content_type {
        writer.string(content_type);
    }
    if let Some(topic) = &properties.response_topic {
        writer.string(topic);
    }
    if let Some(data) = &properties.correlation_data {
        writer.bytes(data);
    }
    writer.len32(properties.user_properties.len());
    for (name, value) in &properties.user_properties {
        writer.string(name);
        writer.string(value);
    }
}

/// Reads what [`put_message`] wrote.
pub(crate) fn get_message(reader: &mut StoredReader<'_>) -> Result<Message, StoredDecodeError> {
    let topic = reader.string("message topic")?;
    if validate_topic_name(&topic, &TopicLimits::PROTOCOL).is_err() {
        return Err(StoredDecodeError::Invalid {
            field: "message topic",
        });
    }
    let payload = Bytes::copy_from_slice(reader.bytes("message payload")?);
    let qos = QoS::from_bits(reader.u8("message QoS")?).ok_or(StoredDecodeError::Invalid {
        field: "message QoS",
    })?;
    let retain = reader.bool("message retain flag")?;
    let present = reader.u8("message property flags")?;
    if present & !0b1_1111 != 0 {
        return Err(StoredDecodeError::Invalid {
            field: "message property flags",
        });
    }
    let mut properties = MessageProperties::default();
    if present & HAS_PAYLOAD_FORMAT != 0 {
        properties.payload_format = Some(match reader.u8("payload format")? {
            0 => PayloadFormat::Bytes,
            1 => PayloadFormat::Utf8,
            _ => {
                return Err(StoredDecodeError::Invalid {
                    field: "payload format",
                });
            }
        });
    }
    if present & HAS_EXPIRY != 0 {
        properties.expires_at_ms = Some(reader.u64("message expiry")?);
    }
    if present & HAS_CONTENT_TYPE != 0 {
        properties.content_type = Some(reader.string("content type")?);
    }
    if present & HAS_RESPONSE_TOPIC != 0 {
        properties.response_topic = Some(reader.string("response topic")?);
    }
    if present & HAS_CORRELATION_DATA != 0 {
        properties.correlation_data =
            Some(Bytes::copy_from_slice(reader.bytes("correlation data")?));
    }
    // Each user property is at least two empty strings: 8 bytes.
    let count = reader.count(8, "user properties")?;
    properties.user_properties.reserve(count);
    for _ in 0..count {
        let name = reader.string("user property name")?;
        let value = reader.string("user property value")?;
        properties.user_properties.push((name, value));
    }
    Ok(Message {
        topic,
        payload,
        qos,
        retain,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::mqtt::retained::{RETAINED_ENTRY_VERSION, decode_entry, encode_entry};
    use crate::mqtt::session::{SESSION_STATE_VERSION, SessionState};

    /// `body` behind `version` with a valid CRC: gets past the checksum so
    /// the field parser itself meets hostile bytes.
    fn sealed(version: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![version];
        bytes.extend_from_slice(body);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_entry(&body, 1 << 16);
            let _ = SessionState::decode(&body, 1 << 16);
            if let Ok(message) = decode_entry(&sealed(RETAINED_ENTRY_VERSION, &body), 1 << 16) {
                // Whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(encode_entry(&message), sealed(RETAINED_ENTRY_VERSION, &body));
            }
            if let Ok(state) = SessionState::decode(&sealed(SESSION_STATE_VERSION, &body), 1 << 16) {
                prop_assert_eq!(state.encode(), sealed(SESSION_STATE_VERSION, &body));
            }
        }
    }
}
