//! The packets as owned values: one struct per packet body, one [`Packet`]
//! enum over all fifteen control packets. The same types serve both protocol
//! levels; fields that only MQTT 5.0 carries (properties, most reason codes,
//! subscription options beyond QoS) keep their defaults under 3.1.1.

use std::fmt;

use bytes::Bytes;

use super::properties::Properties;

/// The protocol level a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// The version for a protocol level byte, if Rill speaks it.
    pub fn from_level(level: u8) -> Option<ProtocolVersion> {
        match level {
            4 => Some(ProtocolVersion::V311),
            5 => Some(ProtocolVersion::V5),
            _ => None,
        }
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            ProtocolVersion::V311 => "MQTT 3.1.1",
            ProtocolVersion::V5 => "MQTT 5.0",
        })
    }
}

/// A delivery guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for its two-bit value; 3 is no QoS.
    pub fn from_bits(bits: u8) -> Option<QoS> {
        match bits {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The control packet types, numbered as in the fixed header's high nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    /// MQTT 5.0 only: type 15 is reserved in 3.1.1.
    Auth = 15,
}

impl PacketType {
    /// The type for a fixed header's high nibble in `version`; 0 is
    /// reserved in both versions and 15 in 3.1.1.
    pub fn from_nibble(nibble: u8, version: ProtocolVersion) -> Option<PacketType> {
        Some(match nibble {
            1 => PacketType::Connect,
            2 => PacketType::ConnAck,
            3 => PacketType::Publish,
            4 => PacketType::PubAck,
            5 => PacketType::PubRec,
            6 => PacketType::PubRel,
            7 => PacketType::PubComp,
            8 => PacketType::Subscribe,
            9 => PacketType::SubAck,
            10 => PacketType::Unsubscribe,
            11 => PacketType::UnsubAck,
            12 => PacketType::PingReq,
            13 => PacketType::PingResp,
            14 => PacketType::Disconnect,
            15 if version == ProtocolVersion::V5 => PacketType::Auth,
            _ => return None,
        })
    }

    /// The fixed-header flags every packet but PUBLISH must carry.
    pub(crate) fn required_flags(self) -> u8 {
        match self {
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
            _ => 0,
        }
    }

    /// The name the specifications use.
    pub fn name(self) -> &'static str {
        match self {
            PacketType::Connect => "CONNECT",
            PacketType::ConnAck => "CONNACK",
            PacketType::Publish => "PUBLISH",
            PacketType::PubAck => "PUBACK",
            PacketType::PubRec => "PUBREC",
            PacketType::PubRel => "PUBREL",
            PacketType::PubComp => "PUBCOMP",
            PacketType::Subscribe => "SUBSCRIBE",
            PacketType::SubAck => "SUBACK",
            PacketType::Unsubscribe => "UNSUBSCRIBE",
            PacketType::UnsubAck => "UNSUBACK",
            PacketType::PingReq => "PINGREQ",
            PacketType::PingResp => "PINGRESP",
            PacketType::Disconnect => "DISCONNECT",
            PacketType::Auth => "AUTH",
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Boxed: it is the largest packet and comes once per connection.
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PublishResponse),
    PubRec(PublishResponse),
    PubRel(PublishResponse),
    PubComp(PublishResponse),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    /// MQTT 5.0 only.
    Auth(Auth),
}

impl Packet {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

/// CONNECT: the first packet of every connection.
///
/// Session-level rules stay with the session: a 3.1.1 client with an empty
/// client identifier must ask for a clean session (else CONNACK return code
/// 2), and the server assigns identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Read from the packet's protocol level; encoding checks it against the
    /// version asked for.
    pub protocol_version: ProtocolVersion,
    /// Clean Session in 3.1.1, Clean Start in 5.0.
    pub clean_start: bool,
    pub keep_alive_s: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    /// Without a user name only in MQTT 5.0.
    pub password: Option<Bytes>,
    pub properties: Properties,
}

/// The will message a CONNECT leaves with the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Will properties (MQTT 5.0).
    pub properties: Properties,
}

/// CONNACK. `reason_code` is an MQTT 5.0 reason code in both versions: the
/// 3.1.1 return codes 0 to 5 decode to and encode from their 5.0
/// equivalents (see [`super::reason`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub reason_code: u8,
    pub properties: Properties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty only in MQTT 5.0 with a topic alias property.
    pub topic: String,
    /// Zero for QoS 0 (no identifier on the wire), non-zero otherwise.
    pub packet_id: u16,
    pub payload: Bytes,
    pub properties: Properties,
}

/// The body PUBACK, PUBREC, PUBREL and PUBCOMP share. Under 3.1.1 only the
/// packet identifier is sent; a success reason code (below 0x80) is implied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishResponse {
    pub packet_id: u16,
    pub reason_code: u8,
    pub properties: Properties,
}

impl PublishResponse {
    /// A successful response without properties.
    pub fn success(packet_id: u16) -> PublishResponse {
        PublishResponse {
            packet_id,
            reason_code: super::reason::SUCCESS,
            properties: Properties::default(),
        }
    }
}

/// SUBSCRIBE. Topic filters are checked for their syntax (wildcards,
/// `$share/` form); whether the server allows them is the session's call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    /// At least one.
    pub subscriptions: Vec<Subscription>,
    pub properties: Properties,
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub options: SubscriptionOptions,
}

/// The subscription options byte. Under 3.1.1 only `qos` is on the wire
/// and the others keep their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// The maximum QoS the subscriber accepts.
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options that mean the same in both versions: only a maximum QoS.
    pub fn with_qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }
}

/// When retained messages are sent for a new subscription (MQTT 5.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainHandling {
    SendAtSubscribe = 0,
    SendAtSubscribeIfNew = 1,
    DoNotSend = 2,
}

/// SUBACK: one reason code per topic filter of the SUBSCRIBE, in order.
/// Under 3.1.1 the codes are 0, 1, 2 (granted QoS) and 0x80 (failure);
/// encoding turns any 5.0 failure code into 0x80 there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    /// At least one.
    pub reason_codes: Vec<u8>,
    pub properties: Properties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    /// At least one.
    pub filters: Vec<String>,
    pub properties: Properties,
}

/// UNSUBACK. MQTT 5.0 carries one reason code per topic filter; 3.1.1
/// carries none, so these decode empty there and encoding leaves success
/// codes out (and refuses failure codes, which 3.1.1 cannot say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub reason_codes: Vec<u8>,
    pub properties: Properties,
}

/// DISCONNECT. Under 3.1.1 it has no body: the reason code is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason_code: u8,
    pub properties: Properties,
}

/// AUTH (MQTT 5.0 only): a step of enhanced authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason_code: u8,
    pub properties: Properties,
}
