//! What decoding and encoding refuse, and the one place that maps a decode
//! failure to the MQTT 5.0 reason code a server sends for it (in CONNACK
//! before the connection is accepted, in DISCONNECT after). Under 3.1.1 a
//! server just closes the connection, except for an unsupported protocol
//! level, which 3.1.1 answers with CONNACK return code 1.

use super::packet::{PacketType, ProtocolVersion};
use super::properties::{PropertyId, PropertyOwner};
use super::reason;
use super::topic::TopicError;

/// Why bytes from the network are not a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Raised from the fixed header alone, before the body is buffered.
    #[error("packet of {packet_bytes} bytes is over the maximum of {max_packet_bytes} bytes")]
    PacketTooLarge {
        packet_bytes: u32,
        max_packet_bytes: u32,
    },
    #[error("remaining length runs past four bytes")]
    RemainingLengthTooLong,
    /// Type 0, or type 15 (AUTH) under 3.1.1.
    #[error("packet type {packet_type} is reserved in {version}")]
    ReservedPacketType {
        packet_type: u8,
        version: ProtocolVersion,
    },
    #[error("first packet has type {packet_type}, not CONNECT")]
    ExpectedConnect { packet_type: u8 },
    #[error("{packet_type} has fixed-header flags {flags:#06b}: {problem}")]
    InvalidFlags {
        packet_type: PacketType,
        flags: u8,
        problem: &'static str,
    },
    #[error("{packet_type} ends inside its {field}")]
    Truncated {
        packet_type: PacketType,
        field: &'static str,
    },
    #[error("{packet_type} has bytes left over after its last field ({bytes})")]
    TrailingBytes {
        packet_type: PacketType,
        bytes: usize,
    },
    #[error("{field} is a variable byte integer longer than four bytes")]
    InvalidVarint { field: &'static str },
    #[error("{field} is not well-formed UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{field} contains U+0000")]
    NullCharacter { field: &'static str },
    #[error("protocol name is not \"MQTT\"")]
    InvalidProtocolName,
    /// Level 3 is MQTT 3.1 (protocol name "MQIsdp").
    #[error("protocol level {level} is not supported (4 is MQTT 3.1.1, 5 is MQTT 5.0)")]
    UnsupportedProtocolLevel { level: u8 },
    #[error("CONNECT flags {flags:#010b}: {problem}")]
    InvalidConnectFlags { flags: u8, problem: &'static str },
    #[error("CONNACK flags {flags:#010b} have reserved bits set")]
    InvalidConnAckFlags { flags: u8 },
    #[error("{packet_type} has packet identifier 0")]
    ZeroPacketId { packet_type: PacketType },
    #[error("{field} is not valid: {error}")]
    InvalidTopicName {
        field: &'static str,
        error: TopicError,
    },
    #[error("topic filter is not valid: {error}")]
    InvalidTopicFilter { error: TopicError },
    #[error("PUBLISH has an empty topic name and no topic alias")]
    EmptyTopicWithoutAlias,
    #[error("{packet_type} has no topic filter")]
    NoTopicFilters { packet_type: PacketType },
    #[error("{packet_type} has no reason code")]
    NoReasonCodes { packet_type: PacketType },
    #[error("property identifier {identifier:#04x} is unknown")]
    UnknownProperty { identifier: u32 },
    #[error("{property} is not allowed in {owner}")]
    PropertyNotAllowed {
        property: PropertyId,
        owner: PropertyOwner,
    },
    #[error("{property} appears more than once")]
    DuplicateProperty { property: PropertyId },
    #[error("{property} has the invalid value {value}")]
    InvalidPropertyValue { property: PropertyId, value: u32 },
    #[error("CONNECT has Authentication Data without an Authentication Method")]
    AuthenticationDataWithoutMethod,
    #[error("{packet_type} cannot carry reason code {code:#04x}")]
    InvalidReasonCode { packet_type: PacketType, code: u8 },
    #[error("subscription options {options:#010b} have reserved bits set or QoS 3")]
    InvalidSubscriptionOptions { options: u8 },
    #[error("subscription options ask for retain handling 3")]
    InvalidRetainHandling,
}

impl DecodeError {
    /// The MQTT 5.0 reason code a server sends for this failure. Every
    /// code fits the packet the server answers with: CONNACK for errors in
    /// a CONNECT (only these give 0x84 Unsupported Protocol Version),
    /// DISCONNECT for the others.
    pub fn reason_code(&self) -> u8 {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            InvalidProtocolName | UnsupportedProtocolLevel { .. } => {
                reason::UNSUPPORTED_PROTOCOL_VERSION
            }
            InvalidTopicName { .. } => reason::TOPIC_NAME_INVALID,
            InvalidTopicFilter { .. } => reason::TOPIC_FILTER_INVALID,
            // Bytes that cannot be parsed by the specification.
            RemainingLengthTooLong
            | ReservedPacketType { .. }
            | InvalidFlags { .. }
            | Truncated { .. }
            | TrailingBytes { .. }
            | InvalidVarint { .. }
            | InvalidUtf8 { .. }
            | NullCharacter { .. }
            | InvalidConnectFlags { .. }
            | InvalidConnAckFlags { .. }
            | UnknownProperty { .. }
            | InvalidSubscriptionOptions { .. } => reason::MALFORMED_PACKET,
            // Parsed, but something the protocol does not allow.
            ExpectedConnect { .. }
            | ZeroPacketId { .. }
            | EmptyTopicWithoutAlias
            | NoTopicFilters { .. }
            | NoReasonCodes { .. }
            | PropertyNotAllowed { .. }
            | DuplicateProperty { .. }
            | InvalidPropertyValue { .. }
            | AuthenticationDataWithoutMethod
            | InvalidReasonCode { .. }
            | InvalidRetainHandling => reason::PROTOCOL_ERROR,
        }
    }
}

/// Why a packet cannot be encoded: something the receiver would refuse,
/// or something the protocol version cannot say. Nothing is written then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A remaining length past 268 435 455 bytes. The peer's own limit
    /// (Maximum Packet Size) is checked with [`super::encoded_len`].
    #[error("packet body of {remaining_bytes} bytes is over the 268435455 bytes MQTT allows")]
    PacketTooLarge { remaining_bytes: usize },
    #[error("{feature} cannot be sent in {version}")]
    NotInVersion {
        feature: &'static str,
        version: ProtocolVersion,
    },
    #[error("CONNECT says {connect} but encoding was asked for {requested}")]
    VersionMismatch {
        connect: ProtocolVersion,
        requested: ProtocolVersion,
    },
    #[error("{field} has {bytes} bytes, over the 65535 a field can hold")]
    FieldTooLong { field: &'static str, bytes: usize },
    #[error("{field} contains U+0000")]
    NullCharacter { field: &'static str },
    #[error("{field} is not valid: {error}")]
    InvalidTopicName {
        field: &'static str,
        error: TopicError,
    },
    #[error("topic filter is not valid: {error}")]
    InvalidTopicFilter { error: TopicError },
    #[error("PUBLISH has an empty topic name and no topic alias")]
    EmptyTopicWithoutAlias,
    #[error("{packet_type} has packet identifier {packet_id}, which its QoS does not allow")]
    InvalidPacketId {
        packet_type: PacketType,
        packet_id: u16,
    },
    #[error("PUBLISH with QoS 0 has DUP set")]
    DupWithQos0,
    #[error("{packet_type} has no entries (topic filters or reason codes)")]
    EmptyList { packet_type: PacketType },
    #[error("{packet_type} cannot carry reason code {code:#04x}")]
    InvalidReasonCode { packet_type: PacketType, code: u8 },
    #[error("{property} is not allowed in {owner}")]
    PropertyNotAllowed {
        property: PropertyId,
        owner: PropertyOwner,
    },
    #[error("{property} cannot be {value}")]
    InvalidPropertyValue { property: PropertyId, value: u32 },
    #[error("{property} may appear only once in {owner}")]
    RepeatedProperty {
        property: PropertyId,
        owner: PropertyOwner,
    },
    #[error("CONNECT has Authentication Data without an Authentication Method")]
    AuthenticationDataWithoutMethod,
}
