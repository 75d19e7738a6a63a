//! Packets to bytes and back (section 2 and 3 of both specifications).
//!
//! Decoding is streaming: [`decode`] looks at what a connection has
//! buffered, and either asks for more (`Ok(None)`), or returns one packet
//! and the bytes it took, or an error. The fixed header alone decides
//! whether a packet is too large, so an oversized packet is refused before
//! its body is buffered. Every length read off the wire is checked against
//! the bytes present before anything is sized by it.
//!
//! Encoding measures a packet first (which also checks it) and then
//! writes it, so [`encoded_len`] is exact and a failed [`encode`] writes
//! nothing.

use self::decode::{decode_body, decode_connect_body, expect_end};
use self::encode::encode_body;
use super::REMAINING_BYTES_MAX;
use super::error::{DecodeError, EncodeError};
use super::packet::{Connect, Packet, PacketType, ProtocolVersion};
use super::wire::{Counter, Reader, Sink, varint_bytes, varint_prefix};

/// Decodes the packet at the start of `buffer` on a connection that
/// speaks `version`. `Ok(None)`: the packet is not whole yet (a packet of
/// more than `max_packet_bytes`, fixed header included, is an error as soon
/// as its fixed header is in). A CONNECT is decoded at its own protocol
/// level, whatever `version` says.
pub fn decode(
    buffer: &[u8],
    version: ProtocolVersion,
    max_packet_bytes: u32,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    let Some(header) = fixed_header(buffer, Some(version), max_packet_bytes)? else {
        return Ok(None);
    };
    let Some(body) = buffer.get(header.body_start..header.total_bytes) else {
        return Ok(None);
    };
    let packet = decode_body(header.packet_type, header.flags, body, version)?;
    Ok(Some((packet, header.total_bytes)))
}

/// Decodes the first packet of a connection, which must be a CONNECT and
/// fixes the protocol version. Anything else is [`DecodeError::ExpectedConnect`].
pub fn decode_connect(
    buffer: &[u8],
    max_packet_bytes: u32,
) -> Result<Option<(Connect, usize)>, DecodeError> {
    let Some(header) = fixed_header(buffer, None, max_packet_bytes)? else {
        return Ok(None);
    };
    let Some(body) = buffer.get(header.body_start..header.total_bytes) else {
        return Ok(None);
    };
    let mut reader = Reader::new(body, PacketType::Connect);
    let connect = decode_connect_body(&mut reader)?;
    expect_end(&reader, PacketType::Connect)?;
    Ok(Some((connect, header.total_bytes)))
}

/// The protocol version a buffered CONNECT asks for, read without decoding
/// the rest: when [`decode_connect`] fails, it tells the server whether to
/// answer with a 5.0 CONNACK carrying the error's reason code or to close
/// (3.1.1). `None` when the buffer does not start with a CONNECT for MQTT
/// 3.1.1 or 5.0 (or not enough of it is in).
pub fn connect_protocol_version(buffer: &[u8]) -> Option<ProtocolVersion> {
    let (&first, rest) = buffer.split_first()?;
    if first >> 4 != PacketType::Connect as u8 {
        return None;
    }
    let (_, used) = varint_prefix(rest).ok()??;
    match rest.get(used..used + 7)? {
        [0, 4, b'M', b'Q', b'T', b'T', level] => ProtocolVersion::from_level(*level),
        _ => None,
    }
}

struct FixedHeader {
    packet_type: PacketType,
    flags: u8,
    body_start: usize,
    total_bytes: usize,
}

/// Reads and checks the fixed header. `version` is `None` while waiting
/// for CONNECT.
fn fixed_header(
    buffer: &[u8],
    version: Option<ProtocolVersion>,
    max_packet_bytes: u32,
) -> Result<Option<FixedHeader>, DecodeError> {
    let Some((&first, rest)) = buffer.split_first() else {
        return Ok(None);
    };
    let nibble = first >> 4;
    let flags = first & 0x0F;
    let packet_type = match version {
        None if nibble == PacketType::Connect as u8 => PacketType::Connect,
        None => {
            return Err(DecodeError::ExpectedConnect {
                packet_type: nibble,
            });
        }
        Some(version) => {
            PacketType::from_nibble(nibble, version).ok_or(DecodeError::ReservedPacketType {
                packet_type: nibble,
                version,
            })?
        }
    };
    check_flags(packet_type, flags)?;
    let (remaining_bytes, length_bytes) = match varint_prefix(rest) {
        Ok(Some(length)) => length,
        Ok(None) => return Ok(None),
        Err(()) => return Err(DecodeError::RemainingLengthTooLong),
    };
    // At most 1 + 4 + 268 435 455: no overflow.
    let packet_bytes = 1 + length_bytes as u32 + remaining_bytes;
    if packet_bytes > max_packet_bytes {
        return Err(DecodeError::PacketTooLarge {
            packet_bytes,
            max_packet_bytes,
        });
    }
    Ok(Some(FixedHeader {
        packet_type,
        flags,
        body_start: 1 + length_bytes,
        total_bytes: packet_bytes as usize,
    }))
}

fn check_flags(packet_type: PacketType, flags: u8) -> Result<(), DecodeError> {
    let problem = if packet_type == PacketType::Publish {
        let qos_bits = (flags >> 1) & 0b11;
        if qos_bits == 0b11 {
            "QoS 3"
        } else if qos_bits == 0 && flags & 0b1000 != 0 {
            "DUP set with QoS 0"
        } else {
            return Ok(());
        }
    } else if flags == packet_type.required_flags() {
        return Ok(());
    } else if packet_type.required_flags() == 0b0010 {
        "they must be 0b0010"
    } else {
        "they must be 0"
    };
    Err(DecodeError::InvalidFlags {
        packet_type,
        flags,
        problem,
    })
}

/// Appends `packet` encoded for `version` to `out`. On error nothing is
/// appended.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let remaining_bytes = remaining_bytes(packet, version)?;
    let start = out.len();
    out.reserve(1 + varint_bytes(remaining_bytes) + remaining_bytes as usize);
    out.u8(first_byte(packet));
    out.varint(remaining_bytes);
    if let Err(error) = encode_body(out, packet, version) {
        // Not reached: measuring ran the same checks.
        out.truncate(start);
        return Err(error);
    }
    debug_assert_eq!(
        out.len() - start,
        1 + varint_bytes(remaining_bytes) + remaining_bytes as usize
    );
    Ok(())
}

/// The bytes [`encode`] would write for `packet`, fixed header included:
/// what a server compares with the client's Maximum Packet Size.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let remaining_bytes = remaining_bytes(packet, version)?;
    Ok(1 + varint_bytes(remaining_bytes) + remaining_bytes as usize)
}

fn remaining_bytes(packet: &Packet, version: ProtocolVersion) -> Result<u32, EncodeError> {
    let mut counter = Counter::default();
    encode_body(&mut counter, packet, version)?;
    u32::try_from(counter.bytes)
        .ok()
        .filter(|&bytes| bytes <= REMAINING_BYTES_MAX)
        .ok_or(EncodeError::PacketTooLarge {
            remaining_bytes: counter.bytes,
        })
}

fn first_byte(packet: &Packet) -> u8 {
    let packet_type = packet.packet_type();
    let flags = match packet {
        Packet::Publish(publish) => {
            u8::from(publish.dup) << 3 | (publish.qos as u8) << 1 | u8::from(publish.retain)
        }
        _ => packet_type.required_flags(),
    };
    (packet_type as u8) << 4 | flags
}

mod decode;
mod encode;
#[cfg(test)]
mod tests;
