//! MQTT 5.0 properties (specification section 2.2.2): their identifiers
//! and types, which packets may carry which, and their encoding as a
//! variable-byte-integer length followed by identifier-value pairs.
//!
//! Decoding refuses a property its packet may not carry, a second copy of
//! a property that may appear once, and the values the specification calls
//! a protocol error (a receive maximum of 0, a maximum QoS of 2, ...).
//! Encoding refuses the same, so encoded properties always decode.

use std::fmt;

use bytes::Bytes;

use super::REMAINING_BYTES_MAX;
use super::error::{DecodeError, EncodeError};
use super::packet::{PacketType, QoS};
use super::topic::{TopicLimits, validate_topic_name};
use super::wire::{Counter, Reader, Sink};

/// The properties one packet (or a will) carries. Properties that may
/// appear once are `Option`s; user properties and subscription identifiers
/// keep their wire order. Time intervals are in seconds as on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format: Option<PayloadFormat>,
    pub message_expiry_interval_s: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// 1 to 268 435 455; several only in PUBLISH (server to client).
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval_s: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive_s: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<bool>,
    pub will_delay_interval_s: Option<u32>,
    pub request_response_information: Option<bool>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    /// Not 0.
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    /// Not 0.
    pub topic_alias: Option<u16>,
    /// At most once: exactly-once is the default and is never sent.
    pub maximum_qos: Option<QoS>,
    pub retain_available: Option<bool>,
    /// Name and value pairs, in order; names may repeat.
    pub user_properties: Vec<(String, String)>,
    /// Not 0.
    pub maximum_packet_bytes: Option<u32>,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifier_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
}

impl Properties {
    /// Whether no property is set (what 3.1.1 packets hold).
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

/// The payload format indicator's two values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// Unspecified bytes.
    Bytes = 0,
    /// UTF-8 encoded character data.
    Utf8 = 1,
}

/// The property identifiers of MQTT 5.0 (table 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyId {
    PayloadFormatIndicator = 0x01,
    MessageExpiryInterval = 0x02,
    ContentType = 0x03,
    ResponseTopic = 0x08,
    CorrelationData = 0x09,
    SubscriptionIdentifier = 0x0B,
    SessionExpiryInterval = 0x11,
    AssignedClientIdentifier = 0x12,
    ServerKeepAlive = 0x13,
    AuthenticationMethod = 0x15,
    AuthenticationData = 0x16,
    RequestProblemInformation = 0x17,
    WillDelayInterval = 0x18,
    RequestResponseInformation = 0x19,
    ResponseInformation = 0x1A,
    ServerReference = 0x1C,
    ReasonString = 0x1F,
    ReceiveMaximum = 0x21,
    TopicAliasMaximum = 0x22,
    TopicAlias = 0x23,
    MaximumQos = 0x24,
    RetainAvailable = 0x25,
    UserProperty = 0x26,
    MaximumPacketSize = 0x27,
    WildcardSubscriptionAvailable = 0x28,
    SubscriptionIdentifierAvailable = 0x29,
    SharedSubscriptionAvailable = 0x2A,
}

/// Where a property list sits: a packet, or the will inside CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyOwner {
    Packet(PacketType),
    Will,
}

impl fmt::Display for PropertyOwner {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyOwner::Packet(packet_type) => write!(formatter, "{packet_type}"),
            PropertyOwner::Will => formatter.write_str("the will properties"),
        }
    }
}

impl PropertyId {
    pub fn from_identifier(identifier: u32) -> Option<PropertyId> {
        use PropertyId::*;
        Some(match identifier {
            0x01 => PayloadFormatIndicator,
            0x02 => MessageExpiryInterval,
            0x03 => ContentType,
            0x08 => ResponseTopic,
            0x09 => CorrelationData,
            0x0B => SubscriptionIdentifier,
            0x11 => SessionExpiryInterval,
            0x12 => AssignedClientIdentifier,
            0x13 => ServerKeepAlive,
            0x15 => AuthenticationMethod,
            0x16 => AuthenticationData,
            0x17 => RequestProblemInformation,
            0x18 => WillDelayInterval,
            0x19 => RequestResponseInformation,
            0x1A => ResponseInformation,
            0x1C => ServerReference,
            0x1F => ReasonString,
            0x21 => ReceiveMaximum,
            0x22 => TopicAliasMaximum,
            0x23 => TopicAlias,
            0x24 => MaximumQos,
            0x25 => RetainAvailable,
            0x26 => UserProperty,
            0x27 => MaximumPacketSize,
            0x28 => WildcardSubscriptionAvailable,
            0x29 => SubscriptionIdentifierAvailable,
            0x2A => SharedSubscriptionAvailable,
            _ => return None,
        })
    }

    pub fn identifier(self) -> u8 {
        self as u8
    }

    /// The name the specification uses.
    pub fn name(self) -> &'static str {
        use PropertyId::*;
        match self {
            PayloadFormatIndicator => "Payload Format Indicator",
            MessageExpiryInterval => "Message Expiry Interval",
            ContentType => "Content Type",
            ResponseTopic => "Response Topic",
            CorrelationData => "Correlation Data",
            SubscriptionIdentifier => "Subscription Identifier",
            SessionExpiryInterval => "Session Expiry Interval",
            AssignedClientIdentifier => "Assigned Client Identifier",
            ServerKeepAlive => "Server Keep Alive",
            AuthenticationMethod => "Authentication Method",
            AuthenticationData => "Authentication Data",
            RequestProblemInformation => "Request Problem Information",
            WillDelayInterval => "Will Delay Interval",
            RequestResponseInformation => "Request Response Information",
            ResponseInformation => "Response Information",
            ServerReference => "Server Reference",
            ReasonString => "Reason String",
            ReceiveMaximum => "Receive Maximum",
            TopicAliasMaximum => "Topic Alias Maximum",
            TopicAlias => "Topic Alias",
            MaximumQos => "Maximum QoS",
            RetainAvailable => "Retain Available",
            UserProperty => "User Property",
            MaximumPacketSize => "Maximum Packet Size",
            WildcardSubscriptionAvailable => "Wildcard Subscription Available",
            SubscriptionIdentifierAvailable => "Subscription Identifier Available",
            SharedSubscriptionAvailable => "Shared Subscription Available",
        }
    }

    /// Whether `owner` may carry this property (table 2-4).
    pub fn allowed_in(self, owner: PropertyOwner) -> bool {
        use PacketType as P;
        use PropertyId::*;
        let PropertyOwner::Packet(packet_type) = owner else {
            return matches!(
                self,
                PayloadFormatIndicator
                    | MessageExpiryInterval
                    | ContentType
                    | ResponseTopic
                    | CorrelationData
                    | WillDelayInterval
                    | UserProperty
            );
        };
        match self {
            PayloadFormatIndicator
            | MessageExpiryInterval
            | ContentType
            | ResponseTopic
            | CorrelationData
            | TopicAlias => packet_type == P::Publish,
            SubscriptionIdentifier => matches!(packet_type, P::Publish | P::Subscribe),
            SessionExpiryInterval => {
                matches!(packet_type, P::Connect | P::ConnAck | P::Disconnect)
            }
            AssignedClientIdentifier
            | ServerKeepAlive
            | ResponseInformation
            | MaximumQos
            | RetainAvailable
            | WildcardSubscriptionAvailable
            | SubscriptionIdentifierAvailable
            | SharedSubscriptionAvailable => packet_type == P::ConnAck,
            AuthenticationMethod | AuthenticationData => {
                matches!(packet_type, P::Connect | P::ConnAck | P::Auth)
            }
            RequestProblemInformation | RequestResponseInformation => packet_type == P::Connect,
            WillDelayInterval => false,
            ServerReference => matches!(packet_type, P::ConnAck | P::Disconnect),
            ReasonString => matches!(
                packet_type,
                P::ConnAck
                    | P::PubAck
                    | P::PubRec
                    | P::PubRel
                    | P::PubComp
                    | P::SubAck
                    | P::UnsubAck
                    | P::Disconnect
                    | P::Auth
            ),
            ReceiveMaximum | TopicAliasMaximum | MaximumPacketSize => {
                matches!(packet_type, P::Connect | P::ConnAck)
            }
            UserProperty => !matches!(packet_type, P::PingReq | P::PingResp),
        }
    }
}

impl fmt::Display for PropertyId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} ({:#04x})", self.name(), self.identifier())
    }
}

/// Reads a property length and the property list it covers.
pub(crate) fn decode_properties(
    reader: &mut Reader<'_>,
    owner: PropertyOwner,
) -> Result<Properties, DecodeError> {
    let length = reader.varint("property length")?;
    // The length is checked against the bytes present before it is used.
    let mut list = reader.sub_reader(length as usize, "properties")?;
    let mut properties = Properties::default();
    while !list.is_empty() {
        let identifier = list.varint("property identifier")?;
        let property = PropertyId::from_identifier(identifier)
            .ok_or(DecodeError::UnknownProperty { identifier })?;
        if !property.allowed_in(owner) {
            return Err(DecodeError::PropertyNotAllowed { property, owner });
        }
        decode_value(&mut list, property, owner, &mut properties)?;
    }
    if owner == PropertyOwner::Packet(PacketType::Connect)
        && properties.authentication_data.is_some()
        && properties.authentication_method.is_none()
    {
        return Err(DecodeError::AuthenticationDataWithoutMethod);
    }
    Ok(properties)
}

fn set_once<T>(slot: &mut Option<T>, value: T, property: PropertyId) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty { property });
    }
    *slot = Some(value);
    Ok(())
}

fn invalid(property: PropertyId, value: u32) -> DecodeError {
    DecodeError::InvalidPropertyValue { property, value }
}

/// A byte that must be 0 or 1.
fn flag(list: &mut Reader<'_>, property: PropertyId) -> Result<bool, DecodeError> {
    match list.u8(property.name())? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(invalid(property, u32::from(other))),
    }
}

fn nonzero_u16(list: &mut Reader<'_>, property: PropertyId) -> Result<u16, DecodeError> {
    match list.u16(property.name())? {
        0 => Err(invalid(property, 0)),
        value => Ok(value),
    }
}

fn decode_value(
    list: &mut Reader<'_>,
    property: PropertyId,
    owner: PropertyOwner,
    properties: &mut Properties,
) -> Result<(), DecodeError> {
    use PropertyId::*;
    let name = property.name();
    let p = properties;
    match property {
        PayloadFormatIndicator => {
            let format = match list.u8(name)? {
                0 => PayloadFormat::Bytes,
                1 => PayloadFormat::Utf8,
                other => return Err(invalid(property, u32::from(other))),
            };
            set_once(&mut p.payload_format, format, property)
        }
        MessageExpiryInterval => {
            set_once(&mut p.message_expiry_interval_s, list.u32(name)?, property)
        }
        ContentType => set_once(&mut p.content_type, list.string(name)?, property),
        ResponseTopic => {
            let topic = list.string(name)?;
            validate_topic_name(&topic, &TopicLimits::PROTOCOL)
                .map_err(|error| DecodeError::InvalidTopicName { field: name, error })?;
            set_once(&mut p.response_topic, topic, property)
        }
        CorrelationData => set_once(&mut p.correlation_data, list.binary(name)?, property),
        SubscriptionIdentifier => {
            let identifier = list.varint(name)?;
            if identifier == 0 {
                return Err(invalid(property, 0));
            }
            // Only a server's PUBLISH gathers several (one per matching
            // subscription); SUBSCRIBE carries at most one.
            if owner != PropertyOwner::Packet(PacketType::Publish)
                && !p.subscription_identifiers.is_empty()
            {
                return Err(DecodeError::DuplicateProperty { property });
            }
            p.subscription_identifiers.push(identifier);
            Ok(())
        }
        SessionExpiryInterval => {
            set_once(&mut p.session_expiry_interval_s, list.u32(name)?, property)
        }
        AssignedClientIdentifier => set_once(
            &mut p.assigned_client_identifier,
            list.string(name)?,
            property,
        ),
        ServerKeepAlive => set_once(&mut p.server_keep_alive_s, list.u16(name)?, property),
        AuthenticationMethod => {
            set_once(&mut p.authentication_method, list.string(name)?, property)
        }
        AuthenticationData => set_once(&mut p.authentication_data, list.binary(name)?, property),
        RequestProblemInformation => set_once(
            &mut p.request_problem_information,
            flag(list, property)?,
            property,
        ),
        WillDelayInterval => set_once(&mut p.will_delay_interval_s, list.u32(name)?, property),
        RequestResponseInformation => set_once(
            &mut p.request_response_information,
            flag(list, property)?,
            property,
        ),
        ResponseInformation => set_once(&mut p.response_information, list.string(name)?, property),
        ServerReference => set_once(&mut p.server_reference, list.string(name)?, property),
        ReasonString => set_once(&mut p.reason_string, list.string(name)?, property),
        ReceiveMaximum => set_once(
            &mut p.receive_maximum,
            nonzero_u16(list, property)?,
            property,
        ),
        TopicAliasMaximum => set_once(&mut p.topic_alias_maximum, list.u16(name)?, property),
        TopicAlias => set_once(&mut p.topic_alias, nonzero_u16(list, property)?, property),
        MaximumQos => {
            let qos = match list.u8(name)? {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                other => return Err(invalid(property, u32::from(other))),
            };
            set_once(&mut p.maximum_qos, qos, property)
        }
        RetainAvailable => set_once(&mut p.retain_available, flag(list, property)?, property),
        UserProperty => {
            let key = list.string(name)?;
            let value = list.string(name)?;
            p.user_properties.push((key, value));
            Ok(())
        }
        MaximumPacketSize => match list.u32(name)? {
            0 => Err(invalid(property, 0)),
            bytes => set_once(&mut p.maximum_packet_bytes, bytes, property),
        },
        WildcardSubscriptionAvailable => set_once(
            &mut p.wildcard_subscription_available,
            flag(list, property)?,
            property,
        ),
        SubscriptionIdentifierAvailable => set_once(
            &mut p.subscription_identifier_available,
            flag(list, property)?,
            property,
        ),
        SharedSubscriptionAvailable => set_once(
            &mut p.shared_subscription_available,
            flag(list, property)?,
            property,
        ),
    }
}

/// Writes the property length and the list, after checking every property
/// against `owner` and the specification's values.
pub(crate) fn encode_properties<S: Sink>(
    sink: &mut S,
    properties: &Properties,
    owner: PropertyOwner,
) -> Result<(), EncodeError> {
    let mut counter = Counter::default();
    encode_list(&mut counter, properties, owner)?;
    let length = u32::try_from(counter.bytes)
        .ok()
        .filter(|&length| length <= REMAINING_BYTES_MAX)
        .ok_or(EncodeError::PacketTooLarge {
            remaining_bytes: counter.bytes,
        })?;
    sink.varint(length);
    encode_list(sink, properties, owner)
}

/// Starts one property: checks that `owner` may carry it and writes its
/// identifier.
fn start<S: Sink>(
    sink: &mut S,
    property: PropertyId,
    owner: PropertyOwner,
) -> Result<(), EncodeError> {
    if !property.allowed_in(owner) {
        return Err(EncodeError::PropertyNotAllowed { property, owner });
    }
    sink.u8(property.identifier());
    Ok(())
}

fn check_value(valid: bool, property: PropertyId, value: u32) -> Result<(), EncodeError> {
    if valid {
        Ok(())
    } else {
        Err(EncodeError::InvalidPropertyValue { property, value })
    }
}

/// The list in identifier order, user properties in their own order.
fn encode_list<S: Sink>(
    sink: &mut S,
    p: &Properties,
    owner: PropertyOwner,
) -> Result<(), EncodeError> {
    use PropertyId::*;
    if let Some(format) = p.payload_format {
        start(sink, PayloadFormatIndicator, owner)?;
        sink.u8(format as u8);
    }
    if let Some(interval) = p.message_expiry_interval_s {
        start(sink, MessageExpiryInterval, owner)?;
        sink.u32(interval);
    }
    if let Some(content_type) = &p.content_type {
        start(sink, ContentType, owner)?;
        sink.string(content_type, ContentType.name())?;
    }
    if let Some(topic) = &p.response_topic {
        start(sink, ResponseTopic, owner)?;
        validate_topic_name(topic, &TopicLimits::PROTOCOL).map_err(|error| {
            EncodeError::InvalidTopicName {
                field: ResponseTopic.name(),
                error,
            }
        })?;
        sink.string(topic, ResponseTopic.name())?;
    }
    if let Some(data) = &p.correlation_data {
        start(sink, CorrelationData, owner)?;
        sink.binary(data, CorrelationData.name())?;
    }
    if p.subscription_identifiers.len() > 1
        && SubscriptionIdentifier.allowed_in(owner)
        && owner != PropertyOwner::Packet(PacketType::Publish)
    {
        return Err(EncodeError::RepeatedProperty {
            property: SubscriptionIdentifier,
            owner,
        });
    }
    for &identifier in &p.subscription_identifiers {
        start(sink, SubscriptionIdentifier, owner)?;
        check_value(
            (1..=REMAINING_BYTES_MAX).contains(&identifier),
            SubscriptionIdentifier,
            identifier,
        )?;
        sink.varint(identifier);
    }
    if let Some(interval) = p.session_expiry_interval_s {
        start(sink, SessionExpiryInterval, owner)?;
        sink.u32(interval);
    }
    if let Some(identifier) = &p.assigned_client_identifier {
        start(sink, AssignedClientIdentifier, owner)?;
        sink.string(identifier, AssignedClientIdentifier.name())?;
    }
    if let Some(keep_alive) = p.server_keep_alive_s {
        start(sink, ServerKeepAlive, owner)?;
        sink.u16(keep_alive);
    }
    if let Some(method) = &p.authentication_method {
        start(sink, AuthenticationMethod, owner)?;
        sink.string(method, AuthenticationMethod.name())?;
    }
    if let Some(data) = &p.authentication_data {
        start(sink, AuthenticationData, owner)?;
        if owner == PropertyOwner::Packet(PacketType::Connect) && p.authentication_method.is_none()
        {
            return Err(EncodeError::AuthenticationDataWithoutMethod);
        }
        sink.binary(data, AuthenticationData.name())?;
    }
    if let Some(request) = p.request_problem_information {
        start(sink, RequestProblemInformation, owner)?;
        sink.u8(u8::from(request));
    }
    if let Some(interval) = p.will_delay_interval_s {
        start(sink, WillDelayInterval, owner)?;
        sink.u32(interval);
    }
    if let Some(request) = p.request_response_information {
        start(sink, RequestResponseInformation, owner)?;
        sink.u8(u8::from(request));
    }
    if let Some(information) = &p.response_information {
        start(sink, ResponseInformation, owner)?;
        sink.string(information, ResponseInformation.name())?;
    }
    if let Some(reference) = &p.server_reference {
        start(sink, ServerReference, owner)?;
        sink.string(reference, ServerReference.name())?;
    }
    if let Some(reason) = &p.reason_string {
        start(sink, ReasonString, owner)?;
        sink.string(reason, ReasonString.name())?;
    }
    if let Some(maximum) = p.receive_maximum {
        start(sink, ReceiveMaximum, owner)?;
        check_value(maximum != 0, ReceiveMaximum, 0)?;
        sink.u16(maximum);
    }
    if let Some(maximum) = p.topic_alias_maximum {
        start(sink, TopicAliasMaximum, owner)?;
        sink.u16(maximum);
    }
    if let Some(alias) = p.topic_alias {
        start(sink, TopicAlias, owner)?;
        check_value(alias != 0, TopicAlias, 0)?;
        sink.u16(alias);
    }
    if let Some(qos) = p.maximum_qos {
        start(sink, MaximumQos, owner)?;
        check_value(qos != QoS::ExactlyOnce, MaximumQos, qos as u32)?;
        sink.u8(qos as u8);
    }
    if let Some(available) = p.retain_available {
        start(sink, RetainAvailable, owner)?;
        sink.u8(u8::from(available));
    }
    for (key, value) in &p.user_properties {
        start(sink, UserProperty, owner)?;
        sink.string(key, UserProperty.name())?;
        sink.string(value, UserProperty.name())?;
    }
    if let Some(bytes) = p.maximum_packet_bytes {
        start(sink, MaximumPacketSize, owner)?;
        check_value(bytes != 0, MaximumPacketSize, 0)?;
        sink.u32(bytes);
    }
    if let Some(available) = p.wildcard_subscription_available {
        start(sink, WildcardSubscriptionAvailable, owner)?;
        sink.u8(u8::from(available));
    }
    if let Some(available) = p.subscription_identifier_available {
        start(sink, SubscriptionIdentifierAvailable, owner)?;
        sink.u8(u8::from(available));
    }
    if let Some(available) = p.shared_subscription_available {
        start(sink, SharedSubscriptionAvailable, owner)?;
        sink.u8(u8::from(available));
    }
    Ok(())
}
