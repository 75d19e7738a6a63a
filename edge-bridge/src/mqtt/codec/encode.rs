//! Packet bodies to bytes, through a [`Sink`] that writes or only counts.
//! Every check runs here, so measuring a packet also validates it.

use crate::mqtt::error::EncodeError;
use crate::mqtt::packet::{
    ConnAck, Connect, Packet, PacketType, ProtocolVersion, Publish, QoS, Subscribe,
    SubscriptionOptions,
};
use crate::mqtt::properties::{Properties, PropertyOwner, encode_properties};
use crate::mqtt::reason;
use crate::mqtt::topic::{TopicError, TopicLimits, validate_topic_filter, validate_topic_name};
use crate::mqtt::wire::Sink;

/// Properties under 5.0; under 3.1.1 there must be none.
fn put_properties<S: Sink>(
    sink: &mut S,
    properties: &Properties,
    owner: PropertyOwner,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    match version {
        ProtocolVersion::V5 => encode_properties(sink, properties, owner),
        ProtocolVersion::V311 if properties.is_empty() => Ok(()),
        ProtocolVersion::V311 => Err(EncodeError::NotInVersion {
            feature: "properties",
            version,
        }),
    }
}

fn put_packet_id<S: Sink>(
    sink: &mut S,
    packet_type: PacketType,
    packet_id: u16,
) -> Result<(), EncodeError> {
    if packet_id == 0 {
        return Err(EncodeError::InvalidPacketId {
            packet_type,
            packet_id,
        });
    }
    sink.u16(packet_id);
    Ok(())
}

fn check_reason_code(packet_type: PacketType, code: u8) -> Result<(), EncodeError> {
    if reason::allowed_in(packet_type, code) {
        Ok(())
    } else {
        Err(EncodeError::InvalidReasonCode { packet_type, code })
    }
}

fn topic_name_error(field: &'static str) -> impl Fn(TopicError) -> EncodeError {
    move |error| EncodeError::InvalidTopicName { field, error }
}

pub(super) fn encode_body<S: Sink>(
    sink: &mut S,
    packet: &Packet,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    let packet_type = packet.packet_type();
    match packet {
        Packet::Connect(connect) => encode_connect(sink, connect, version),
        Packet::ConnAck(connack) => encode_connack(sink, connack, version),
        Packet::Publish(publish) => encode_publish(sink, publish, version),
        Packet::PubAck(response)
        | Packet::PubRec(response)
        | Packet::PubRel(response)
        | Packet::PubComp(response) => {
            put_packet_id(sink, packet_type, response.packet_id)?;
            put_reason_and_properties(
                sink,
                packet_type,
                response.reason_code,
                &response.properties,
                version,
            )
        }
        Packet::Subscribe(subscribe) => encode_subscribe(sink, subscribe, version),
        Packet::SubAck(suback) => {
            put_packet_id(sink, packet_type, suback.packet_id)?;
            put_properties(
                sink,
                &suback.properties,
                PropertyOwner::Packet(packet_type),
                version,
            )?;
            put_reason_code_list(sink, packet_type, &suback.reason_codes, version)
        }
        Packet::Unsubscribe(unsubscribe) => {
            put_packet_id(sink, packet_type, unsubscribe.packet_id)?;
            put_properties(
                sink,
                &unsubscribe.properties,
                PropertyOwner::Packet(packet_type),
                version,
            )?;
            if unsubscribe.filters.is_empty() {
                return Err(EncodeError::EmptyList { packet_type });
            }
            for filter in &unsubscribe.filters {
                put_topic_filter(sink, filter)?;
            }
            Ok(())
        }
        Packet::UnsubAck(unsuback) => {
            put_packet_id(sink, packet_type, unsuback.packet_id)?;
            match version {
                ProtocolVersion::V5 => {
                    put_properties(
                        sink,
                        &unsuback.properties,
                        PropertyOwner::Packet(packet_type),
                        version,
                    )?;
                    put_reason_code_list(sink, packet_type, &unsuback.reason_codes, version)
                }
                ProtocolVersion::V311 => {
                    // No reason codes on the wire: success ones are implied.
                    for &code in &unsuback.reason_codes {
                        check_reason_code(packet_type, code)?;
                        if code >= reason::UNSPECIFIED_ERROR {
                            return Err(EncodeError::InvalidReasonCode { packet_type, code });
                        }
                    }
                    put_properties(
                        sink,
                        &unsuback.properties,
                        PropertyOwner::Packet(packet_type),
                        version,
                    )
                }
            }
        }
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(disconnect) => put_reason_and_properties(
            sink,
            packet_type,
            disconnect.reason_code,
            &disconnect.properties,
            version,
        ),
        Packet::Auth(auth) => {
            if version == ProtocolVersion::V311 {
                return Err(EncodeError::NotInVersion {
                    feature: "AUTH",
                    version,
                });
            }
            put_reason_and_properties(
                sink,
                packet_type,
                auth.reason_code,
                &auth.properties,
                version,
            )
        }
    }
}

fn encode_connect<S: Sink>(
    sink: &mut S,
    connect: &Connect,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    if connect.protocol_version != version {
        return Err(EncodeError::VersionMismatch {
            connect: connect.protocol_version,
            requested: version,
        });
    }
    if version == ProtocolVersion::V311 && connect.password.is_some() && connect.username.is_none()
    {
        return Err(EncodeError::NotInVersion {
            feature: "a password without a user name",
            version,
        });
    }
    sink.binary(b"MQTT", "protocol name")?;
    sink.u8(version.level());
    let mut flags = u8::from(connect.clean_start) << 1;
    if let Some(will) = &connect.will {
        flags |= 0b100 | (will.qos as u8) << 3 | u8::from(will.retain) << 5;
    }
    flags |= u8::from(connect.password.is_some()) << 6 | u8::from(connect.username.is_some()) << 7;
    sink.u8(flags);
    sink.u16(connect.keep_alive_s);
    put_properties(
        sink,
        &connect.properties,
        PropertyOwner::Packet(PacketType::Connect),
        version,
    )?;
    sink.string(&connect.client_id, "client identifier")?;
    if let Some(will) = &connect.will {
        put_properties(sink, &will.properties, PropertyOwner::Will, version)?;
        validate_topic_name(&will.topic, &TopicLimits::PROTOCOL)
            .map_err(topic_name_error("will topic"))?;
        sink.string(&will.topic, "will topic")?;
        sink.binary(&will.payload, "will payload")?;
    }
    if let Some(username) = &connect.username {
        sink.string(username, "user name")?;
    }
    if let Some(password) = &connect.password {
        sink.binary(password, "password")?;
    }
    Ok(())
}

fn encode_connack<S: Sink>(
    sink: &mut S,
    connack: &ConnAck,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    let packet_type = PacketType::ConnAck;
    check_reason_code(packet_type, connack.reason_code)?;
    sink.u8(u8::from(connack.session_present));
    match version {
        ProtocolVersion::V5 => sink.u8(connack.reason_code),
        ProtocolVersion::V311 => {
            let code = reason::connack_v311_return_code(connack.reason_code).ok_or(
                EncodeError::InvalidReasonCode {
                    packet_type,
                    code: connack.reason_code,
                },
            )?;
            sink.u8(code);
        }
    }
    put_properties(
        sink,
        &connack.properties,
        PropertyOwner::Packet(packet_type),
        version,
    )
}

fn encode_publish<S: Sink>(
    sink: &mut S,
    publish: &Publish,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    let packet_type = PacketType::Publish;
    if publish.dup && publish.qos == QoS::AtMostOnce {
        return Err(EncodeError::DupWithQos0);
    }
    if (publish.qos == QoS::AtMostOnce) != (publish.packet_id == 0) {
        return Err(EncodeError::InvalidPacketId {
            packet_type,
            packet_id: publish.packet_id,
        });
    }
    if publish.topic.is_empty() && version == ProtocolVersion::V5 {
        if publish.properties.topic_alias.is_none() {
            return Err(EncodeError::EmptyTopicWithoutAlias);
        }
    } else {
        validate_topic_name(&publish.topic, &TopicLimits::PROTOCOL)
            .map_err(topic_name_error("topic name"))?;
    }
    sink.string(&publish.topic, "topic name")?;
    if publish.qos != QoS::AtMostOnce {
        sink.u16(publish.packet_id);
    }
    put_properties(
        sink,
        &publish.properties,
        PropertyOwner::Packet(packet_type),
        version,
    )?;
    sink.put(&publish.payload);
    Ok(())
}

/// The tail shared by PUBACK, PUBREC, PUBREL, PUBCOMP, DISCONNECT and
/// AUTH, in its shortest form: nothing for Success without properties.
fn put_reason_and_properties<S: Sink>(
    sink: &mut S,
    packet_type: PacketType,
    code: u8,
    properties: &Properties,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    check_reason_code(packet_type, code)?;
    match version {
        ProtocolVersion::V311 => {
            // 3.1.1 cannot say a failure, nor a DISCONNECT that keeps the will.
            let implied = code < reason::UNSPECIFIED_ERROR
                && (packet_type != PacketType::Disconnect || code == 0);
            if !implied {
                return Err(EncodeError::InvalidReasonCode { packet_type, code });
            }
            put_properties(
                sink,
                properties,
                PropertyOwner::Packet(packet_type),
                version,
            )
        }
        ProtocolVersion::V5 => {
            if code == reason::SUCCESS && properties.is_empty() {
                return Ok(());
            }
            sink.u8(code);
            if properties.is_empty() {
                return Ok(());
            }
            encode_properties(sink, properties, PropertyOwner::Packet(packet_type))
        }
    }
}

fn put_topic_filter<S: Sink>(sink: &mut S, filter: &str) -> Result<(), EncodeError> {
    validate_topic_filter(filter, &TopicLimits::PROTOCOL)
        .map_err(|error| EncodeError::InvalidTopicFilter { error })?;
    sink.string(filter, "topic filter")
}

fn encode_subscribe<S: Sink>(
    sink: &mut S,
    subscribe: &Subscribe,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    let packet_type = PacketType::Subscribe;
    put_packet_id(sink, packet_type, subscribe.packet_id)?;
    put_properties(
        sink,
        &subscribe.properties,
        PropertyOwner::Packet(packet_type),
        version,
    )?;
    if subscribe.subscriptions.is_empty() {
        return Err(EncodeError::EmptyList { packet_type });
    }
    for subscription in &subscribe.subscriptions {
        put_topic_filter(sink, &subscription.filter)?;
        let options = subscription.options;
        if version == ProtocolVersion::V311 && options != SubscriptionOptions::with_qos(options.qos)
        {
            return Err(EncodeError::NotInVersion {
                feature: "subscription options other than QoS",
                version,
            });
        }
        sink.u8(options.qos as u8
            | u8::from(options.no_local) << 2
            | u8::from(options.retain_as_published) << 3
            | (options.retain_handling as u8) << 4);
    }
    Ok(())
}

/// SUBACK's or 5.0 UNSUBACK's reason codes. A 3.1.1 SUBACK has one failure
/// code, so every 5.0 failure becomes it.
fn put_reason_code_list<S: Sink>(
    sink: &mut S,
    packet_type: PacketType,
    codes: &[u8],
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    if codes.is_empty() {
        return Err(EncodeError::EmptyList { packet_type });
    }
    for &code in codes {
        check_reason_code(packet_type, code)?;
        let code = match version {
            ProtocolVersion::V311 if code >= reason::UNSPECIFIED_ERROR => {
                reason::V311_SUBSCRIBE_FAILURE
            }
            _ => code,
        };
        sink.u8(code);
    }
    Ok(())
}
