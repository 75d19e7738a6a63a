//! MQTT 3.1.1 (protocol level 4) and 5.0 (protocol level 5): the packet
//! codec, v5 properties, reason codes and topic rules.
//!
//! Everything here is pure: [`decode`] takes the bytes a connection has
//! buffered and gives back one packet and how many bytes it used, or asks
//! for more; [`encode`] appends one packet to a buffer. Decoding checks
//! everything the specifications let a receiver check without session
//! state, so a session state machine can trust what it gets; encoding
//! refuses what decoding would refuse, so whatever decodes re-encodes to
//! the same packet. Session rules (a second CONNECT, packet identifiers in
//! use, topic aliases, receive maximum, shared subscription policy) belong
//! to the session, which can use [`topic`] for its own limits.
//!
//! The server side builds on the codec: [`session`] runs one connection
//! (its module documentation is the node's contract), [`mapping`] maps
//! MQTT topics to Rill topics and back, [`subscriptions`] and [`retained`]
//! are the broker-wide index and store the node owns, and [`auth`] decides
//! who connects.

pub mod auth;
mod codec;
mod error;
pub mod mapping;
mod message;
mod packet;
mod properties;
pub mod reason;
pub mod retained;
pub mod session;
mod stored;
pub mod subscriptions;
pub mod topic;
mod wire;

pub use codec::{connect_protocol_version, decode, decode_connect, encode, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use message::{Message, MessageProperties};
pub use packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PacketType, ProtocolVersion, Publish,
    PublishResponse, QoS, RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions,
    UnsubAck, Unsubscribe, Will,
};
pub use properties::{PayloadFormat, Properties, PropertyId, PropertyOwner};
pub use stored::StoredDecodeError;

/// The largest remaining length a fixed header can carry (four bytes of
/// variable byte integer): 268 435 455 bytes.
pub const REMAINING_BYTES_MAX: u32 = 268_435_455;
