//! PUBLISH from the upstream broker to the log: redelivery checks, the
//! mapping, the append, and the acknowledgement that waits for it.
//!
//! A PUBLISH whose packet identifier is already waiting for its append is
//! the same message again (DUP): its acknowledgement comes with the first
//! copy's. One whose packet identifier and contents match a message that
//! was appended but not acknowledged before the last connection ended is
//! the upstream broker sending it again: it is acknowledged without a
//! second append. A QoS 2 PUBLISH whose PUBREC went out and whose PUBREL
//! has not come gets PUBREC again, no append. Messages that no mapping
//! rule takes (`unmatched = refuse`) are acknowledged and dropped, since
//! refusing them would bring them back forever.

use super::super::mapping::record_headers;
use super::super::message::Message;
use super::super::packet::{Packet, Publish, PublishResponse, QoS};
use super::{Action, Append, Bridge, DisconnectReason, Fingerprint, PendingAck};

impl Fingerprint {
    fn of(publish: &Publish) -> Fingerprint {
        Fingerprint {
            qos: publish.qos,
            topic_crc: crc32fast::hash(publish.topic.as_bytes()),
            payload_crc: crc32fast::hash(&publish.payload),
            payload_bytes: publish.payload.len(),
        }
    }
}

impl Bridge {
    pub(super) fn handle_publish(&mut self, publish: Publish, now_ms: u64) -> Vec<Action> {
        self.stats.messages_received += 1;
        if publish.properties.topic_alias.is_some() {
            // CONNECT allowed no aliases (Topic Alias Maximum 0).
            return self.fail(
                DisconnectReason::ProtocolError("a topic alias, though none was allowed".into()),
                now_ms,
                true,
            );
        }
        let fingerprint = Fingerprint::of(&publish);
        let packet_id = publish.packet_id;
        if publish.qos != QoS::AtMostOnce {
            if self
                .pending_acks
                .iter()
                .any(|pending| pending.packet_id == packet_id)
            {
                if publish.dup {
                    self.stats.duplicates_skipped += 1;
                    return Vec::new();
                }
                return self.fail(
                    DisconnectReason::ProtocolError(format!(
                        "packet identifier {packet_id} reused before its acknowledgement"
                    )),
                    now_ms,
                    true,
                );
            }
            if publish.qos == QoS::ExactlyOnce && self.awaiting_release.contains(&packet_id) {
                self.stats.duplicates_skipped += 1;
                return vec![
                    self.send(Packet::PubRec(PublishResponse::success(packet_id)), now_ms),
                ];
            }
            // Any PUBLISH with this identifier ends what was remembered
            // of it: either it is that message again, or the identifier
            // is free and in use for a new one.
            let remembered = self.appended_unacknowledged.remove(&packet_id);
            if publish.dup && remembered == Some(fingerprint) {
                self.stats.duplicates_skipped += 1;
                return self.acknowledge_without_append(
                    packet_id,
                    publish.qos,
                    fingerprint,
                    now_ms,
                );
            }
        }

        let Ok(route) = self.mapping.route(&publish.topic, &self.config.client_id) else {
            self.stats.messages_unmatched += 1;
            return self.acknowledge_without_append(packet_id, publish.qos, fingerprint, now_ms);
        };
        let message = Message::from_publish(&publish, &publish.topic, now_ms);
        let token = self.take_token();
        let append = Append {
            token,
            topic: route.topic,
            key: route.key,
            headers: record_headers(&message, &self.config.client_id),
            value: publish.payload,
            durable: publish.qos != QoS::AtMostOnce,
        };
        if publish.qos == QoS::AtMostOnce {
            self.pending_qos0.insert(token);
        } else {
            self.pending_acks.push_back(PendingAck {
                token,
                packet_id,
                qos: publish.qos,
                fingerprint,
                appended: false,
            });
        }
        vec![Action::Append(append)]
    }

    /// An acknowledgement decided without an append; it still waits its
    /// turn behind earlier ones.
    fn acknowledge_without_append(
        &mut self,
        packet_id: u16,
        qos: QoS,
        fingerprint: Fingerprint,
        now_ms: u64,
    ) -> Vec<Action> {
        if qos == QoS::AtMostOnce {
            return Vec::new();
        }
        self.pending_acks.push_back(PendingAck {
            token: 0,
            packet_id,
            qos,
            fingerprint,
            appended: true,
        });
        self.flush_acks(now_ms)
    }
}
