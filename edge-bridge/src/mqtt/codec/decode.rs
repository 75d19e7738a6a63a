//! Packet bodies to values, once the fixed header is checked and the
//! whole body is buffered: running out of bytes here means the packet is
//! malformed, never that more should be read.

use bytes::Bytes;

use crate::mqtt::error::DecodeError;
use crate::mqtt::packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PacketType, ProtocolVersion, Publish,
    PublishResponse, QoS, RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions,
    UnsubAck, Unsubscribe, Will,
};
use crate::mqtt::properties::{Properties, PropertyOwner, decode_properties};
use crate::mqtt::reason;
use crate::mqtt::topic::{TopicLimits, validate_topic_filter, validate_topic_name};
use crate::mqtt::wire::Reader;

pub(super) fn expect_end(reader: &Reader<'_>, packet_type: PacketType) -> Result<(), DecodeError> {
    if reader.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::TrailingBytes {
            packet_type,
            bytes: reader.remaining(),
        })
    }
}

pub(super) fn decode_body(
    packet_type: PacketType,
    flags: u8,
    body: &[u8],
    version: ProtocolVersion,
) -> Result<Packet, DecodeError> {
    let mut reader = Reader::new(body, packet_type);
    let reader = &mut reader;
    let packet = match packet_type {
        PacketType::Connect => Packet::Connect(Box::new(decode_connect_body(reader)?)),
        PacketType::ConnAck => Packet::ConnAck(decode_connack(reader, version)?),
        PacketType::Publish => Packet::Publish(decode_publish(reader, flags, version)?),
        PacketType::PubAck => {
            Packet::PubAck(decode_publish_response(reader, packet_type, version)?)
        }
        PacketType::PubRec => {
            Packet::PubRec(decode_publish_response(reader, packet_type, version)?)
        }
        PacketType::PubRel => {
            Packet::PubRel(decode_publish_response(reader, packet_type, version)?)
        }
        PacketType::PubComp => {
            Packet::PubComp(decode_publish_response(reader, packet_type, version)?)
        }
        PacketType::Subscribe => Packet::Subscribe(decode_subscribe(reader, version)?),
        PacketType::SubAck => Packet::SubAck(decode_suback(reader, version)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(decode_unsubscribe(reader, version)?),
        PacketType::UnsubAck => Packet::UnsubAck(decode_unsuback(reader, version)?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => {
            let (reason_code, properties) =
                decode_reason_and_properties(reader, packet_type, version)?;
            Packet::Disconnect(Disconnect {
                reason_code,
                properties,
            })
        }
        PacketType::Auth => {
            let (reason_code, properties) =
                decode_reason_and_properties(reader, packet_type, version)?;
            Packet::Auth(Auth {
                reason_code,
                properties,
            })
        }
    };
    expect_end(reader, packet_type)?;
    Ok(packet)
}

/// Properties under 5.0, none under 3.1.1.
fn properties_of(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
    owner: PropertyOwner,
) -> Result<Properties, DecodeError> {
    match version {
        ProtocolVersion::V5 => decode_properties(reader, owner),
        ProtocolVersion::V311 => Ok(Properties::default()),
    }
}

fn packet_id(reader: &mut Reader<'_>, packet_type: PacketType) -> Result<u16, DecodeError> {
    match reader.u16("packet identifier")? {
        0 => Err(DecodeError::ZeroPacketId { packet_type }),
        id => Ok(id),
    }
}

fn reason_code(reader: &mut Reader<'_>, packet_type: PacketType) -> Result<u8, DecodeError> {
    let code = reader.u8("reason code")?;
    if reason::allowed_in(packet_type, code) {
        Ok(code)
    } else {
        Err(DecodeError::InvalidReasonCode { packet_type, code })
    }
}

pub(super) fn decode_connect_body(reader: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = reader.binary_slice("protocol name")?;
    let level = reader.u8("protocol level")?;
    // MQTT 3.1 named itself differently; its clients understand a 3.1.1
    // CONNACK refusing their level.
    if name == b"MQIsdp" {
        return Err(DecodeError::UnsupportedProtocolLevel { level });
    }
    if name != b"MQTT" {
        return Err(DecodeError::InvalidProtocolName);
    }
    let version = ProtocolVersion::from_level(level)
        .ok_or(DecodeError::UnsupportedProtocolLevel { level })?;
    let flags = reader.u8("connect flags")?;
    let invalid = |problem| DecodeError::InvalidConnectFlags { flags, problem };
    if flags & 0b0000_0001 != 0 {
        return Err(invalid("the reserved bit is set"));
    }
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos_bits = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let password_flag = flags & 0b0100_0000 != 0;
    let username_flag = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(invalid("will QoS or will retain without a will"));
    }
    let will_qos = QoS::from_bits(will_qos_bits).ok_or(invalid("will QoS 3"))?;
    if version == ProtocolVersion::V311 && password_flag && !username_flag {
        return Err(invalid("a password without a user name in MQTT 3.1.1"));
    }
    let keep_alive_s = reader.u16("keep alive")?;
    let properties = properties_of(reader, version, PropertyOwner::Packet(PacketType::Connect))?;
    let client_id = reader.string("client identifier")?;
    let will = if will_flag {
        let properties = properties_of(reader, version, PropertyOwner::Will)?;
        let topic = reader.string("will topic")?;
        validate_topic_name(&topic, &TopicLimits::PROTOCOL).map_err(|error| {
            DecodeError::InvalidTopicName {
                field: "will topic",
                error,
            }
        })?;
        let payload = reader.binary("will payload")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(reader.string("user name")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(reader.binary("password")?)
    } else {
        None
    };
    Ok(Connect {
        protocol_version: version,
        clean_start: flags & 0b0000_0010 != 0,
        keep_alive_s,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<ConnAck, DecodeError> {
    let flags = reader.u8("acknowledge flags")?;
    if flags & 0b1111_1110 != 0 {
        return Err(DecodeError::InvalidConnAckFlags { flags });
    }
    let reason_code = match version {
        ProtocolVersion::V5 => reason_code(reader, PacketType::ConnAck)?,
        ProtocolVersion::V311 => {
            let code = reader.u8("return code")?;
            reason::connack_from_v311_return_code(code).ok_or(DecodeError::InvalidReasonCode {
                packet_type: PacketType::ConnAck,
                code,
            })?
        }
    };
    let properties = properties_of(reader, version, PropertyOwner::Packet(PacketType::ConnAck))?;
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        reason_code,
        properties,
    })
}

fn decode_publish(
    reader: &mut Reader<'_>,
    flags: u8,
    version: ProtocolVersion,
) -> Result<Publish, DecodeError> {
    let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(DecodeError::InvalidFlags {
        packet_type: PacketType::Publish,
        flags,
        problem: "QoS 3",
    })?;
    let topic = reader.string("topic name")?;
    let packet_id = match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce | QoS::ExactlyOnce => packet_id(reader, PacketType::Publish)?,
    };
    let properties = properties_of(reader, version, PropertyOwner::Packet(PacketType::Publish))?;
    if topic.is_empty() && version == ProtocolVersion::V5 {
        // The topic comes from an alias the session resolves.
        if properties.topic_alias.is_none() {
            return Err(DecodeError::EmptyTopicWithoutAlias);
        }
    } else {
        validate_topic_name(&topic, &TopicLimits::PROTOCOL).map_err(|error| {
            DecodeError::InvalidTopicName {
                field: "topic name",
                error,
            }
        })?;
    }
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        payload: Bytes::copy_from_slice(reader.rest()),
        properties,
    })
}

/// The optional tail of 5.0 PUBACK, PUBREC, PUBREL, PUBCOMP, DISCONNECT
/// and AUTH: a reason code (Success when absent) and properties (none when
/// absent). 3.1.1 has neither.
fn decode_reason_and_properties(
    reader: &mut Reader<'_>,
    packet_type: PacketType,
    version: ProtocolVersion,
) -> Result<(u8, Properties), DecodeError> {
    if version == ProtocolVersion::V311 || reader.is_empty() {
        return Ok((reason::SUCCESS, Properties::default()));
    }
    let code = reason_code(reader, packet_type)?;
    if reader.is_empty() {
        return Ok((code, Properties::default()));
    }
    let properties = decode_properties(reader, PropertyOwner::Packet(packet_type))?;
    Ok((code, properties))
}

fn decode_publish_response(
    reader: &mut Reader<'_>,
    packet_type: PacketType,
    version: ProtocolVersion,
) -> Result<PublishResponse, DecodeError> {
    let packet_id = packet_id(reader, packet_type)?;
    let (reason_code, properties) = decode_reason_and_properties(reader, packet_type, version)?;
    Ok(PublishResponse {
        packet_id,
        reason_code,
        properties,
    })
}

fn topic_filter(reader: &mut Reader<'_>) -> Result<String, DecodeError> {
    let filter = reader.string("topic filter")?;
    validate_topic_filter(&filter, &TopicLimits::PROTOCOL)
        .map_err(|error| DecodeError::InvalidTopicFilter { error })?;
    Ok(filter)
}

fn subscription_options(
    options: u8,
    version: ProtocolVersion,
) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = match version {
        ProtocolVersion::V311 => 0b1111_1100,
        ProtocolVersion::V5 => 0b1100_0000,
    };
    let qos = QoS::from_bits(options & 0b11);
    let (Some(qos), 0) = (qos, options & reserved) else {
        return Err(DecodeError::InvalidSubscriptionOptions { options });
    };
    let retain_handling = match (options >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendAtSubscribeIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::InvalidRetainHandling),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: options & 0b0100 != 0,
        retain_as_published: options & 0b1000 != 0,
        retain_handling,
    })
}

fn decode_subscribe(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Subscribe, DecodeError> {
    let packet_type = PacketType::Subscribe;
    let packet_id = packet_id(reader, packet_type)?;
    let properties = properties_of(reader, version, PropertyOwner::Packet(packet_type))?;
    let mut subscriptions = Vec::new();
    while !reader.is_empty() {
        let filter = topic_filter(reader)?;
        let options = subscription_options(reader.u8("subscription options")?, version)?;
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::NoTopicFilters { packet_type });
    }
    Ok(Subscribe {
        packet_id,
        subscriptions,
        properties,
    })
}

/// The reason codes that fill the rest of a SUBACK or a 5.0 UNSUBACK.
fn reason_code_list(
    reader: &mut Reader<'_>,
    packet_type: PacketType,
    version: ProtocolVersion,
) -> Result<Vec<u8>, DecodeError> {
    let codes = reader.rest();
    if codes.is_empty() {
        return Err(DecodeError::NoReasonCodes { packet_type });
    }
    for &code in codes {
        let allowed = match version {
            ProtocolVersion::V5 => reason::allowed_in(packet_type, code),
            ProtocolVersion::V311 => matches!(code, 0 | 1 | 2 | reason::V311_SUBSCRIBE_FAILURE),
        };
        if !allowed {
            return Err(DecodeError::InvalidReasonCode { packet_type, code });
        }
    }
    Ok(codes.to_vec())
}

fn decode_suback(reader: &mut Reader<'_>, version: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_type = PacketType::SubAck;
    let packet_id = packet_id(reader, packet_type)?;
    let properties = properties_of(reader, version, PropertyOwner::Packet(packet_type))?;
    let reason_codes = reason_code_list(reader, packet_type, version)?;
    Ok(SubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

fn decode_unsubscribe(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Unsubscribe, DecodeError> {
    let packet_type = PacketType::Unsubscribe;
    let packet_id = packet_id(reader, packet_type)?;
    let properties = properties_of(reader, version, PropertyOwner::Packet(packet_type))?;
    let mut filters = Vec::new();
    while !reader.is_empty() {
        filters.push(topic_filter(reader)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters { packet_type });
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_unsuback(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<UnsubAck, DecodeError> {
    let packet_type = PacketType::UnsubAck;
    let packet_id = packet_id(reader, packet_type)?;
    let (reason_codes, properties) = match version {
        ProtocolVersion::V311 => (Vec::new(), Properties::default()),
        ProtocolVersion::V5 => {
            let properties = decode_properties(reader, PropertyOwner::Packet(packet_type))?;
            (reason_code_list(reader, packet_type, version)?, properties)
        }
    };
    Ok(UnsubAck {
        packet_id,
        reason_codes,
        properties,
    })
}
