//! Messages from the broker to the client: the queue (see the queue policy
//! in the module documentation of `session`), packet identifiers, the
//! window of unacknowledged QoS 1 and 2 messages (the client's Receive
//! Maximum, capped by `inflight_outbound_max`), topic aliases the server
//! sets, the client's Maximum Packet Size (a message too large for it is
//! dropped as if sent, MQTT 5.0 section 3.1.2.25), expiry, and the log
//! cursors that say what the session has taken.

use super::super::encoded_len;
use super::super::message::Message;
use super::super::packet::{Packet, ProtocolVersion, Publish, PublishResponse, QoS};
use super::super::properties::Properties;
use super::super::reason;
use super::super::topic::{matches, parse_shared};
use super::{
    Action, Connection, Cursor, Delivery, DeliveryKind, DeliveryOutcome, LogPosition,
    OutboundStage, Phase, Queued,
};

impl Connection {
    /// Offers one message to the session (see the contract in the module
    /// documentation of `session`).
    pub fn handle_delivery(
        &mut self,
        delivery: Delivery,
        now_ms: u64,
    ) -> (DeliveryOutcome, Vec<Action>) {
        if self.phase != Phase::Connected {
            return (DeliveryOutcome::Refused, Vec::new());
        }
        if let Some(position) = &delivery.position
            && position.offset < self.taken_next(position)
        {
            return (DeliveryOutcome::Duplicate, Vec::new());
        }
        // Before anything moves a cursor: while paused, the cursor must
        // stay on the first refused position of its partition.
        if self.paused && delivery.position.is_some() {
            return (DeliveryOutcome::Refused, Vec::new());
        }
        if delivery.message.properties.is_expired(now_ms) {
            self.advance(delivery.position.as_ref());
            return (DeliveryOutcome::Expired, Vec::new());
        }
        let qos = delivery.message.qos.min(delivery.qos);
        if self.queue.len() >= self.config().queued_messages_max {
            if qos == QoS::AtMostOnce {
                self.stats.dropped_queue_full += 1;
                self.advance(delivery.position.as_ref());
                return (DeliveryOutcome::Dropped, Vec::new());
            }
            if delivery.position.is_some() {
                self.paused = true;
                return (DeliveryOutcome::Refused, vec![Action::PauseDeliveries]);
            }
            return (DeliveryOutcome::Refused, Vec::new());
        }
        let retain = match delivery.kind {
            DeliveryKind::Retained => true,
            DeliveryKind::Live => delivery.retain_as_published && delivery.message.retain,
        };
        self.advance(delivery.position.as_ref());
        self.queue.push_back(Queued {
            message: Message {
                qos,
                retain,
                ..delivery.message
            },
            subscription_identifiers: delivery.subscription_identifiers,
            position: delivery.position,
        });
        (DeliveryOutcome::Taken, self.pump(now_ms))
    }

    /// The delivery a record read from the log while catching up makes for
    /// this session: its ordinary subscriptions that match the message's
    /// topic, folded as the index folds them (No Local against
    /// `publisher`, the record's `mqtt.client_id`). `None` when none
    /// match. Shared subscriptions are served live only.
    pub fn catch_up_delivery(
        &self,
        message: Message,
        publisher: Option<&str>,
        position: LogPosition,
    ) -> Option<Delivery> {
        let mut qos = None;
        let mut subscription_identifiers = Vec::new();
        let mut retain_as_published = false;
        for subscription in self.subscriptions.values() {
            if !matches!(parse_shared(&subscription.filter), Ok(None))
                || !matches(&subscription.filter, &message.topic)
                || (subscription.options.no_local && publisher == Some(self.client_id.as_str()))
            {
                continue;
            }
            qos = Some(qos.map_or(subscription.options.qos, |qos: QoS| {
                qos.max(subscription.options.qos)
            }));
            subscription_identifiers.extend(subscription.identifier);
            retain_as_published |= subscription.options.retain_as_published;
        }
        Some(Delivery {
            message,
            qos: qos?,
            subscription_identifiers,
            retain_as_published,
            kind: DeliveryKind::Live,
            position: Some(position),
        })
    }

    fn taken_next(&self, position: &LogPosition) -> u64 {
        self.taken
            .get(&(position.topic.clone(), position.partition))
            .copied()
            .unwrap_or(0)
    }

    /// Moves the cursor past `position`.
    fn advance(&mut self, position: Option<&LogPosition>) {
        let Some(position) = position else {
            return;
        };
        let next = self
            .taken
            .entry((position.topic.clone(), position.partition))
            .or_insert(0);
        *next = (*next).max(position.offset + 1);
        self.dirty = true;
    }

    /// The cursors to resume from: past everything taken.
    pub(super) fn cursors(&self) -> Vec<Cursor> {
        self.taken
            .iter()
            .map(|((topic, partition), &next_offset)| Cursor {
                topic: topic.clone(),
                partition: *partition,
                next_offset,
            })
            .collect()
    }

    fn outbound_limit(&self) -> usize {
        usize::from(
            self.client_receive_maximum
                .min(self.config().inflight_outbound_max)
                .max(1),
        )
    }

    /// The next packet identifier no outbound message holds; it is
    /// taken only when its PUBLISH is sent.
    fn free_packet_id(&self) -> Option<u16> {
        let mut candidate = self.last_packet_id;
        for _ in 0..u16::MAX {
            candidate = candidate.checked_add(1).unwrap_or(1);
            if !self.outbound.contains_key(&candidate) {
                return Some(candidate);
            }
        }
        None
    }

    /// Sends queued messages while the window allows, in queue order.
    pub(super) fn pump(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(front) = self.queue.front() {
            if front.message.properties.is_expired(now_ms) {
                self.queue.pop_front();
                self.stats.dropped_expired += 1;
                continue;
            }
            let qos = front.message.qos;
            if qos != QoS::AtMostOnce && self.outbound.len() >= self.outbound_limit() {
                break;
            }
            let packet_id = match qos {
                QoS::AtMostOnce => 0,
                _ => match self.free_packet_id() {
                    Some(packet_id) => packet_id,
                    None => break,
                },
            };
            let Some(queued) = self.queue.pop_front() else {
                break;
            };
            let Some(packet) = self.publish_packet(&queued, packet_id, now_ms) else {
                // Too large for the client: dropped as if sent.
                self.stats.dropped_too_large += 1;
                continue;
            };
            if qos != QoS::AtMostOnce {
                self.last_packet_id = packet_id;
                self.outbound.insert(
                    packet_id,
                    OutboundStage::Published {
                        message: queued.message,
                        subscription_identifiers: queued.subscription_identifiers,
                    },
                );
                self.dirty = true;
            }
            self.stats.messages_sent += 1;
            actions.push(Action::Send(packet));
        }
        if self.paused && self.queue.len() <= self.config().queued_messages_max / 2 {
            self.paused = false;
            actions.push(Action::ResumeDeliveries {
                cursors: self.cursors(),
            });
        }
        actions
    }

    /// The PUBLISH for a queued message, with a topic alias when the
    /// client allows them, or `None` when it is over the client's Maximum
    /// Packet Size.
    fn publish_packet(&mut self, queued: &Queued, packet_id: u16, now_ms: u64) -> Option<Packet> {
        let message = &queued.message;
        let v5 = self.version == ProtocolVersion::V5;
        let mut properties = if v5 {
            let mut properties = message.properties.to_properties(now_ms);
            properties.subscription_identifiers = queued.subscription_identifiers.clone();
            properties
        } else {
            Properties::default()
        };
        let mut topic = message.topic.clone();
        let mut new_alias = None;
        if v5 && self.client_topic_aliases_max > 0 {
            if let Some(&alias) = self.outbound_aliases.get(&message.topic) {
                properties.topic_alias = Some(alias);
                topic = String::new();
            } else if self.outbound_aliases.len() < usize::from(self.client_topic_aliases_max) {
                // Aliases run from 1 to the client's maximum, one per topic,
                // never reassigned within the connection.
                let alias = u16::try_from(self.outbound_aliases.len() + 1).ok()?;
                properties.topic_alias = Some(alias);
                new_alias = Some(alias);
            }
        }
        let packet = Packet::Publish(Publish {
            dup: false,
            qos: message.qos,
            retain: message.retain,
            topic,
            packet_id,
            payload: message.payload.clone(),
            properties,
        });
        let fits = encoded_len(&packet, self.version)
            .is_ok_and(|bytes| bytes <= self.client_packet_bytes_max as usize);
        if !fits {
            return None;
        }
        if let Some(alias) = new_alias {
            self.outbound_aliases.insert(message.topic.clone(), alias);
        }
        Some(packet)
    }

    pub(super) fn handle_puback(&mut self, packet_id: u16, now_ms: u64) -> Vec<Action> {
        if let Some(OutboundStage::Published { message, .. }) = self.outbound.get(&packet_id)
            && message.qos == QoS::AtLeastOnce
        {
            self.outbound.remove(&packet_id);
            self.dirty = true;
            return self.pump(now_ms);
        }
        // An acknowledgement for nothing in flight changes nothing.
        Vec::new()
    }

    pub(super) fn handle_pubrec(
        &mut self,
        packet_id: u16,
        reason_code: u8,
        now_ms: u64,
    ) -> Vec<Action> {
        match self.outbound.get(&packet_id) {
            Some(OutboundStage::Published { message, .. }) if message.qos == QoS::ExactlyOnce => {
                self.dirty = true;
                if reason_code >= 0x80 {
                    // The client refused it: the flow ends here.
                    self.outbound.remove(&packet_id);
                    return self.pump(now_ms);
                }
                self.outbound.insert(packet_id, OutboundStage::Released);
                vec![Action::Send(Packet::PubRel(PublishResponse::success(
                    packet_id,
                )))]
            }
            Some(OutboundStage::Released) => vec![Action::Send(Packet::PubRel(
                PublishResponse::success(packet_id),
            ))],
            _ => {
                let reason_code = match self.version {
                    ProtocolVersion::V5 => reason::PACKET_IDENTIFIER_NOT_FOUND,
                    ProtocolVersion::V311 => reason::SUCCESS,
                };
                vec![Action::Send(Packet::PubRel(PublishResponse {
                    packet_id,
                    reason_code,
                    properties: Properties::default(),
                }))]
            }
        }
    }

    pub(super) fn handle_pubcomp(&mut self, packet_id: u16, now_ms: u64) -> Vec<Action> {
        if let Some(OutboundStage::Released) = self.outbound.get(&packet_id) {
            self.outbound.remove(&packet_id);
            self.dirty = true;
            return self.pump(now_ms);
        }
        Vec::new()
    }
}
