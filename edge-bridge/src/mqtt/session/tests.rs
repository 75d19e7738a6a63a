//! The connection state machine driven by packets, node reports and
//! ticks, with the actions it gives checked. Each file covers one area.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::mqtt::auth::AcceptAll;
use crate::mqtt::mapping::{KeySource, Rule, Unmatched};
use crate::mqtt::message::MessageProperties;
use crate::mqtt::packet::{
    ConnAck, Connect, Publish, PublishResponse, Subscribe, Subscription, SubscriptionOptions,
    Unsubscribe,
};

mod connect;
mod inbound;
mod outbound;
mod subscribe;
mod will;

use ProtocolVersion::{V5, V311};

pub(super) fn mapping() -> Mapping {
    Mapping::new(
        vec![Rule {
            filter: "sensors/+/temperature".into(),
            topic: "sensor-temperature".into(),
            key: KeySource::Level(1),
        }],
        Unmatched::Topic("mqtt-other".into()),
    )
    .expect("valid mapping")
}

pub(super) fn context(config: SessionConfig) -> Arc<ServerContext> {
    Arc::new(ServerContext {
        config,
        mapping: mapping(),
        authenticator: Box::new(AcceptAll),
    })
}

pub(super) fn connect_packet(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol_version: version,
        clean_start: true,
        keep_alive_s: 0,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// Packets the actions send.
pub(super) fn sent(actions: &[Action]) -> Vec<Packet> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send(packet) => Some(packet.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn appends(actions: &[Action]) -> Vec<Append> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Append(append) => Some(append.clone()),
            _ => None,
        })
        .collect()
}

/// The kinds of the actions, for checking order.
pub(super) fn kinds(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .map(|action| match action {
            Action::Send(packet) => packet.packet_type().name(),
            Action::OpenSession { .. } => "OpenSession",
            Action::Append(_) => "Append",
            Action::Subscribe { .. } => "Subscribe",
            Action::Unsubscribe { .. } => "Unsubscribe",
            Action::SendRetained { .. } => "SendRetained",
            Action::ResumeDeliveries { .. } => "ResumeDeliveries",
            Action::PauseDeliveries => "PauseDeliveries",
            Action::SetWill { .. } => "SetWill",
            Action::ClearWill => "ClearWill",
            Action::PublishWill { .. } => "PublishWill",
            Action::PersistSession(_) => "PersistSession",
            Action::EndSession => "EndSession",
            Action::Close { .. } => "Close",
        })
        .collect()
}

pub(super) fn close_reason(actions: &[Action]) -> Option<u8> {
    actions.iter().find_map(|action| match action {
        Action::Close { reason_code } => Some(*reason_code),
        _ => None,
    })
}

pub(super) fn connack(actions: &[Action]) -> ConnAck {
    sent(actions)
        .into_iter()
        .find_map(|packet| match packet {
            Packet::ConnAck(connack) => Some(connack),
            _ => None,
        })
        .expect("a CONNACK")
}

/// A connection driven through CONNECT and session opening.
pub(super) struct Client {
    pub connection: Connection,
    pub now_ms: u64,
    /// What opening the session did.
    pub opened: Vec<Action>,
}

impl Client {
    pub fn connect_with(
        config: SessionConfig,
        connect: Connect,
        stored: Option<SessionState>,
    ) -> Client {
        let now_ms = 1_000_000;
        let mut connection = Connection::new(context(config), 0xabc, now_ms);
        let actions = connection.handle_packet(Packet::Connect(Box::new(connect)), now_ms);
        assert_eq!(kinds(&actions), ["OpenSession"], "{actions:?}");
        let opened = connection.handle_session_opened(stored, now_ms);
        Client {
            connection,
            now_ms,
            opened,
        }
    }

    pub fn connect(version: ProtocolVersion, config: SessionConfig) -> Client {
        Client::connect_with(config, connect_packet(version, "dev7"), None)
    }

    pub fn packet(&mut self, packet: Packet) -> Vec<Action> {
        self.connection.handle_packet(packet, self.now_ms)
    }

    pub fn append_ok(&mut self, token: u64) -> Vec<Action> {
        self.connection
            .handle_append_result(token, Ok(()), self.now_ms)
    }

    pub fn deliver(&mut self, delivery: Delivery) -> (DeliveryOutcome, Vec<Action>) {
        self.connection.handle_delivery(delivery, self.now_ms)
    }

    pub fn tick(&mut self, advance_ms: u64) -> Vec<Action> {
        self.now_ms += advance_ms;
        self.connection.handle_tick(self.now_ms)
    }
}

pub(super) fn publish(topic: &str, qos: QoS, packet_id: u16, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        payload: Bytes::from_static(payload),
        properties: Properties::default(),
    })
}

pub(super) fn message(topic: &str, qos: QoS, payload: &'static [u8]) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: MessageProperties::default(),
    }
}

pub(super) fn delivery(topic: &str, qos: QoS, offset: Option<u64>) -> Delivery {
    Delivery {
        message: message(topic, QoS::ExactlyOnce, b"m"),
        qos,
        subscription_identifiers: Vec::new(),
        retain_as_published: false,
        kind: DeliveryKind::Live,
        position: offset.map(|offset| LogPosition {
            topic: "t".into(),
            partition: 0,
            offset,
        }),
    }
}

pub(super) fn ack(packet_id: u16) -> PublishResponse {
    PublishResponse::success(packet_id)
}

pub(super) fn subscribe(packet_id: u16, filters: &[(&str, SubscriptionOptions)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: filters
            .iter()
            .map(|(filter, options)| Subscription {
                filter: (*filter).into(),
                options: *options,
            })
            .collect(),
        properties: Properties::default(),
    })
}

pub(super) fn unsubscribe(packet_id: u16, filters: &[&str]) -> Packet {
    Packet::Unsubscribe(Unsubscribe {
        packet_id,
        filters: filters.iter().map(|filter| (*filter).into()).collect(),
        properties: Properties::default(),
    })
}
