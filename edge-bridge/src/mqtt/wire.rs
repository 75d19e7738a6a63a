//! The MQTT data representations (section 1.5 of both specifications):
//! big-endian integers, variable byte integers, UTF-8 strings and binary
//! data with a two-byte length. A [`Reader`] walks the body of one packet
//! that is already whole in memory, so running out of bytes inside it means
//! the packet is malformed; a [`Sink`] writes or only counts, so the same
//! code computes a packet's size and then writes it.

use bytes::Bytes;

use super::REMAINING_BYTES_MAX;
use super::error::{DecodeError, EncodeError};
use super::packet::PacketType;

/// A variable byte integer at the start of `bytes`: `Ok(None)` when it is
/// not complete yet, `Err(())` when a fourth byte still says more follow.
/// Non-minimal encodings are accepted: the minimum is a sender's duty.
pub(crate) fn varint_prefix(bytes: &[u8]) -> Result<Option<(u32, usize)>, ()> {
    let mut value = 0u32;
    for (index, byte) in bytes.iter().take(4).enumerate() {
        value |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((value, index + 1)));
        }
    }
    if bytes.len() >= 4 { Err(()) } else { Ok(None) }
}

/// Bytes a variable byte integer takes.
pub(crate) fn varint_bytes(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The body of one whole packet, read from the front.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    packet_type: PacketType,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], packet_type: PacketType) -> Reader<'a> {
        Reader { bytes, packet_type }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The first `count` bytes, or the error that names `field`.
    pub(crate) fn take(
        &mut self,
        count: usize,
        field: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        if count > self.bytes.len() {
            return Err(DecodeError::Truncated {
                packet_type: self.packet_type,
                field,
            });
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// A reader over the next `count` bytes (a property list).
    pub(crate) fn sub_reader(
        &mut self,
        count: usize,
        field: &'static str,
    ) -> Result<Reader<'a>, DecodeError> {
        let bytes = self.take(count, field)?;
        Ok(Reader::new(bytes, self.packet_type))
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let bytes = self.take(2, field)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let bytes = self.take(4, field)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        match varint_prefix(self.bytes) {
            Ok(Some((value, used))) => {
                self.bytes = &self.bytes[used..];
                Ok(value)
            }
            Ok(None) => Err(DecodeError::Truncated {
                packet_type: self.packet_type,
                field,
            }),
            Err(()) => Err(DecodeError::InvalidVarint { field }),
        }
    }

    /// A two-byte length and that many bytes.
    pub(crate) fn binary_slice(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let length = self.u16(field)?;
        self.take(usize::from(length), field)
    }

    pub(crate) fn binary(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        Ok(Bytes::copy_from_slice(self.binary_slice(field)?))
    }

    /// A UTF-8 string: well-formed (which rules out surrogates) and without
    /// U+0000, as both specifications require of every string.
    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let bytes = self.binary_slice(field)?;
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { field })?;
        if text.contains('\0') {
            return Err(DecodeError::NullCharacter { field });
        }
        Ok(text.to_owned())
    }
}

/// Where encoded bytes go: a buffer, or a counter that only measures.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);

    fn u8(&mut self, value: u8) {
        self.put(&[value]);
    }

    fn u16(&mut self, value: u16) {
        self.put(&value.to_be_bytes());
    }

    fn u32(&mut self, value: u32) {
        self.put(&value.to_be_bytes());
    }

    fn varint(&mut self, value: u32) {
        debug_assert!(
            value <= REMAINING_BYTES_MAX,
            "varint {value} over four bytes"
        );
        let mut value = value;
        loop {
            let byte = (value & 0x7F) as u8;
            value >>= 7;
            if value == 0 {
                self.u8(byte);
                return;
            }
            self.u8(byte | 0x80);
        }
    }

    /// Binary data with its two-byte length.
    fn binary(&mut self, bytes: &[u8], field: &'static str) -> Result<(), EncodeError> {
        let Ok(length) = u16::try_from(bytes.len()) else {
            return Err(EncodeError::FieldTooLong {
                field,
                bytes: bytes.len(),
            });
        };
        self.u16(length);
        self.put(bytes);
        Ok(())
    }

    /// A string with its two-byte length; U+0000 is refused because the
    /// receiver must refuse it.
    fn string(&mut self, text: &str, field: &'static str) -> Result<(), EncodeError> {
        if text.contains('\0') {
            return Err(EncodeError::NullCharacter { field });
        }
        self.binary(text.as_bytes(), field)
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Counts what would be written.
#[derive(Default)]
pub(crate) struct Counter {
    pub(crate) bytes: usize,
}

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.bytes = self.bytes.saturating_add(bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The remaining-length examples of section 2.2.3 (3.1.1) / 1.5.5 (5.0).
    #[test]
    fn varints_match_the_specification_examples() {
        let examples: [(u32, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ];
        for (value, bytes) in examples {
            let mut out = Vec::new();
            out.varint(value);
            assert_eq!(out, bytes, "{value}");
            assert_eq!(varint_bytes(value), bytes.len());
            assert_eq!(varint_prefix(bytes), Ok(Some((value, bytes.len()))));
            for end in 0..bytes.len() {
                assert_eq!(varint_prefix(&bytes[..end]), Ok(None));
            }
        }
        assert_eq!(varint_prefix(&[0xFF, 0xFF, 0xFF, 0xFF]), Err(()));
        assert_eq!(varint_prefix(&[0x80, 0x80, 0x80, 0x80, 0x01]), Err(()));
        // Not minimal, but a receiver can read it.
        assert_eq!(varint_prefix(&[0x80, 0x00]), Ok(Some((0, 2))));
    }
}
