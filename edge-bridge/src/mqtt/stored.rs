//! The byte layout Rill uses for the MQTT state it keeps on disk (retained
//! messages, sessions): little-endian fixed-width integers, a version byte
//! first and a CRC-32 (IEEE, `crc32fast`) of everything before it last, as
//! `docs/format.md` draws. Decoding checks the size limit, then the CRC,
//! then the version, and reads every length against the bytes left, so a
//! damaged or hostile file costs at most its own size and is refused.

use bytes::Bytes;

use super::message::{Message, MessageProperties};
use super::packet::QoS;
use super::properties::PayloadFormat;
use super::topic::{TopicLimits, validate_topic_name};

/// Why stored bytes are not a valid record of MQTT state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoredDecodeError {
    #[error("{bytes} bytes are over the limit of {bytes_max} bytes")]
    TooLarge { bytes: usize, bytes_max: usize },
    #[error("{bytes} bytes are too short for a version byte and a checksum")]
    TooShort { bytes: usize },
    #[error("checksum {stored:#010x} does not match the contents ({computed:#010x})")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("format version {version} is not supported (expected {expected})")]
    UnsupportedVersion { version: u8, expected: u8 },
    #[error("ends inside {field}")]
    Truncated { field: &'static str },
    #[error("{field} is not valid")]
    Invalid { field: &'static str },
    #[error("{bytes} bytes are left after the last field")]
    TrailingBytes { bytes: usize },
}

/// Writes fields little-endian.
#[derive(Default)]
pub(crate) struct StoredWriter {
    bytes: Vec<u8>,
}

impl StoredWriter {
    /// A writer that starts with the format version byte.
    pub(crate) fn new(version: u8) -> StoredWriter {
        StoredWriter {
            bytes: vec![version],
        }
    }

    pub(crate) fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub(crate) fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// A count or length that the caller has bounded below `u32::MAX`.
    pub(crate) fn len32(&mut self, len: usize) {
        let len = u32::try_from(len);
        assert!(len.is_ok(), "stored lengths are bounded below 4 GiB");
        self.u32(len.unwrap_or(u32::MAX));
    }

    /// A `u32` length and the bytes.
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.len32(bytes.len());
        self.bytes.extend_from_slice(bytes);
    }

    pub(crate) fn string(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    /// Appends the CRC-32 of everything written and returns the bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.bytes);
        self.u32(crc);
        self.bytes
    }
}

/// Checks size, CRC and version of stored bytes and returns the fields
/// between the version byte and the CRC.
pub(crate) fn open(
    bytes: &[u8],
    version: u8,
    bytes_max: usize,
) -> Result<StoredReader<'_>, StoredDecodeError> {
    if bytes.len() > bytes_max {
        return Err(StoredDecodeError::TooLarge {
            bytes: bytes.len(),
            bytes_max,
        });
    }
    let Some(split) = bytes.len().checked_sub(4).filter(|&split| split >= 1) else {
        return Err(StoredDecodeError::TooShort { bytes: bytes.len() });
    };
    let (contents, crc) = bytes.split_at(split);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(contents);
    if stored != computed {
        return Err(StoredDecodeError::ChecksumMismatch { stored, computed });
    }
    if contents[0] != version {
        return Err(StoredDecodeError::UnsupportedVersion {
            version: contents[0],
            expected: version,
        });
    }
    Ok(StoredReader {
        bytes: &contents[1..],
    })
}

/// Reads fields little-endian from checked contents.
pub(crate) struct StoredReader<'a> {
    bytes: &'a [u8],
}

impl<'a> StoredReader<'a> {
    pub(crate) fn take(
        &mut self,
        count: usize,
        field: &'static str,
    ) -> Result<&'a [u8], StoredDecodeError> {
        if count > self.bytes.len() {
            return Err(StoredDecodeError::Truncated { field });
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], StoredDecodeError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, StoredDecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, StoredDecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, StoredDecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, StoredDecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, StoredDecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StoredDecodeError::Invalid { field }),
        }
    }

    /// A count of entries that each take at least `entry_bytes_min`
    /// bytes: checked against the bytes left before anything is sized by
    /// it.
    pub(crate) fn count(
        &mut self,
        entry_bytes_min: usize,
        field: &'static str,
    ) -> Result<usize, StoredDecodeError> {
        let count = self.u32(field)? as usize;
        if count.saturating_mul(entry_bytes_min.max(1)) > self.bytes.len() {
            return Err(StoredDecodeError::Truncated { field });
        }
        Ok(count)
    }

    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], StoredDecodeError> {
        let len = self.u32(field)? as usize;
        self.take(len, field)
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, StoredDecodeError> {
        let bytes = self.bytes(field)?;
        let text = std::str::from_utf8(bytes).map_err(|_| StoredDecodeError::Invalid { field })?;
        if text.len() > usize::from(u16::MAX) || text.contains('\0') {
            return Err(StoredDecodeError::Invalid { field });
        }
        Ok(text.to_owned())
    }

    pub(crate) fn finish(self) -> Result<(), StoredDecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(StoredDecodeError::TrailingBytes {
                bytes: self.bytes.len(),
            })
        }
    }
}

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
