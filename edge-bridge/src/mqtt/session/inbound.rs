//! PUBLISH from the client to the log: topic aliases, packet identifier
//! and Receive Maximum checks, the mapping to a Rill topic, and the
//! acknowledgements, which wait for the append and go out in the order the
//! PUBLISHes came (MQTT 5.0 section 4.6). QoS 2 is exactly once: the
//! record is appended once, PUBREC follows the append, and a PUBLISH
//! repeated with the same packet identifier before PUBREL is answered
//! without appending again.
//!
//! A PUBLISH the session refuses (mapping says refuse, topic over the
//! limits) gets reason code 0x90 under 5.0. Under 3.1.1 there is no way to
//! refuse one, and closing would make the client send it again forever, so
//! it is acknowledged, not stored, and counted. A failed append is
//! different: 5.0 gets the failure code, 3.1.1 gets its connection closed,
//! because acknowledging would tell it a message is safe that is not.

use super::super::mapping::record_headers;
use super::super::message::Message;
use super::super::packet::{Packet, ProtocolVersion, Publish, PublishResponse, QoS};
use super::super::reason;
use super::super::topic::validate_topic_name;
use super::{Action, Append, AppendError, Connection, PendingAck};

impl Connection {
    pub(super) fn handle_publish(&mut self, publish: Publish, now_ms: u64) -> Vec<Action> {
        self.stats.publishes_received += 1;
        let topic = match publish.properties.topic_alias {
            Some(alias) => {
                if alias > self.config().topic_aliases_max {
                    return self.close(now_ms, reason::TOPIC_ALIAS_INVALID, true);
                }
                if publish.topic.is_empty() {
                    match self.inbound_aliases.get(&alias) {
                        Some(topic) => topic.clone(),
                        // An alias never set (MQTT 5.0 section 3.3.2.3.4).
                        None => return self.close(now_ms, reason::PROTOCOL_ERROR, true),
                    }
                } else {
                    // At most topic_aliases_max entries: aliases above it
                    // are refused above.
                    self.inbound_aliases.insert(alias, publish.topic.clone());
                    publish.topic.clone()
                }
            }
            None => publish.topic.clone(),
        };

        let packet_id = publish.packet_id;
        if publish.qos != QoS::AtMostOnce {
            let pending = self
                .pending_acks
                .iter()
                .find(|pending| pending.packet_id == packet_id)
                .map(|pending| pending.qos);
            let releasing = self.awaiting_release.contains(&packet_id);
            match (publish.qos, pending, releasing) {
                // The same message again before its acknowledgement: it
                // comes once the first copy is appended.
                (qos, Some(pending_qos), _) if qos == pending_qos => return Vec::new(),
                // QoS 2 again after PUBREC: PUBREC again, no second append.
                (QoS::ExactlyOnce, None, true) => {
                    return vec![Action::Send(Packet::PubRec(PublishResponse::success(
                        packet_id,
                    )))];
                }
                (_, Some(_), _) | (_, None, true) => {
                    return self.packet_id_in_use(publish.qos, packet_id, now_ms);
                }
                (_, None, false) => {}
            }
            if self.inbound_in_flight() >= self.inflight_inbound_limit() {
                return self.close(now_ms, reason::RECEIVE_MAXIMUM_EXCEEDED, true);
            }
        }

        let context = std::sync::Arc::clone(&self.context);
        let route = if validate_topic_name(&topic, &context.config.topic_limits).is_err() {
            None
        } else {
            context.mapping.route(&topic, &self.client_id).ok()
        };
        let Some(route) = route else {
            self.stats.publishes_refused += 1;
            return self.refuse_publish(publish.qos, packet_id, reason::TOPIC_NAME_INVALID);
        };

        let message = Message::from_publish(&publish, &topic, now_ms);
        let token = self.take_token();
        let append = Append {
            token,
            topic: route.topic,
            key: route.key,
            headers: record_headers(&message, &self.client_id),
            value: publish.payload,
            durable: publish.qos != QoS::AtMostOnce,
            retain: publish.retain.then_some(message),
        };
        if publish.qos == QoS::AtMostOnce {
            self.pending_qos0.insert(token);
        } else {
            self.pending_acks.push_back(PendingAck {
                token,
                packet_id,
                qos: publish.qos,
                result: None,
            });
        }
        vec![Action::Append(append)]
    }

    /// A refusal decided without appending. It still waits its turn behind
    /// earlier acknowledgements.
    fn refuse_publish(&mut self, qos: QoS, packet_id: u16, code: u8) -> Vec<Action> {
        if qos == QoS::AtMostOnce {
            return Vec::new();
        }
        let result = match self.version {
            ProtocolVersion::V5 => Err(code),
            ProtocolVersion::V311 => Ok(()),
        };
        self.pending_acks.push_back(PendingAck {
            token: 0,
            packet_id,
            qos,
            result: Some(result),
        });
        self.flush_acks(0)
    }

    fn packet_id_in_use(&mut self, qos: QoS, packet_id: u16, now_ms: u64) -> Vec<Action> {
        match self.version {
            ProtocolVersion::V5 => {
                let response = PublishResponse {
                    packet_id,
                    reason_code: reason::PACKET_IDENTIFIER_IN_USE,
                    properties: Default::default(),
                };
                vec![Action::Send(match qos {
                    QoS::ExactlyOnce => Packet::PubRec(response),
                    _ => Packet::PubAck(response),
                })]
            }
            ProtocolVersion::V311 => self.close(now_ms, reason::PROTOCOL_ERROR, false),
        }
    }

    /// The node finished the append with `token`.
    pub fn handle_append_result(
        &mut self,
        token: u64,
        result: Result<(), AppendError>,
        now_ms: u64,
    ) -> Vec<Action> {
        if result.is_err() {
            self.stats.append_failures += 1;
        }
        if self.pending_qos0.remove(&token) {
            return Vec::new();
        }
        if let Some(pending) = self
            .pending_acks
            .iter_mut()
            .find(|pending| pending.token == token && pending.result.is_none())
        {
            pending.result = Some(result.map_err(AppendError::reason_code));
        }
        self.flush_acks(now_ms)
    }

    /// Sends the acknowledgements at the front whose results are in.
    fn flush_acks(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.phase != super::Phase::Connected {
            return actions;
        }
        while let Some(PendingAck {
            result: Some(result),
            ..
        }) = self.pending_acks.front()
        {
            let result = *result;
            let Some(pending) = self.pending_acks.pop_front() else {
                break;
            };
            let reason_code = match (result, self.version) {
                (Ok(()), _) => reason::SUCCESS,
                (Err(code), ProtocolVersion::V5) => code,
                (Err(code), ProtocolVersion::V311) => {
                    actions.extend(self.close(now_ms, code, false));
                    return actions;
                }
            };
            let response = PublishResponse {
                packet_id: pending.packet_id,
                reason_code,
                properties: Default::default(),
            };
            actions.push(Action::Send(match pending.qos {
                QoS::ExactlyOnce => {
                    if reason_code < 0x80 {
                        self.awaiting_release.insert(pending.packet_id);
                        self.dirty = true;
                    }
                    Packet::PubRec(response)
                }
                _ => Packet::PubAck(response),
            }));
        }
        actions
    }

    pub(super) fn handle_pubrel(&mut self, packet_id: u16) -> Vec<Action> {
        let reason_code = if self.awaiting_release.remove(&packet_id) {
            self.dirty = true;
            reason::SUCCESS
        } else if self.version == ProtocolVersion::V5 {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        } else {
            // Lost with a crash after PUBREC: the message was appended, so
            // completing is right.
            reason::SUCCESS
        };
        vec![Action::Send(Packet::PubComp(PublishResponse {
            packet_id,
            reason_code,
            properties: Default::default(),
        }))]
    }
}
