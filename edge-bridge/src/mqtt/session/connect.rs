//! CONNECT to CONNACK: the client identifier rules, authentication, keep
//! alive, session expiry and the client's own limits, then the session the
//! node opens (fresh or restored, with its messages resent).

use std::sync::Arc;

use super::super::auth::Credentials;
use super::super::packet::{ConnAck, Connect, Packet, ProtocolVersion, Publish};
use super::super::properties::Properties;
use super::super::reason;
use super::super::subscriptions::Entry;
use super::super::topic::validate_topic_name;
use super::{Action, Connection, OutboundStage, Phase, SessionState};

impl Connection {
    pub(super) fn handle_connect(&mut self, connect: Connect) -> Vec<Action> {
        self.version = connect.protocol_version;
        let v5 = self.version == ProtocolVersion::V5;
        let context = Arc::clone(&self.context);
        let config = &context.config;

        // Client identifier: an empty one is assigned, except for a 3.1.1
        // client that wants its session kept (it could never find it again).
        let mut client_id = connect.client_id.clone();
        if client_id.is_empty() {
            if !v5 && !connect.clean_start {
                return self.refuse_connect(reason::CLIENT_IDENTIFIER_NOT_VALID);
            }
            client_id = format!("rill-{:x}", self.connection_id);
            self.client_id_assigned = true;
        }
        if client_id.len() > config.client_id_bytes_max {
            return self.refuse_connect(reason::CLIENT_IDENTIFIER_NOT_VALID);
        }

        if let Some(will) = &connect.will
            && validate_topic_name(&will.topic, &config.topic_limits).is_err()
        {
            return self.refuse_connect(reason::TOPIC_NAME_INVALID);
        }

        let authentication_method = connect.properties.authentication_method.as_deref();
        let anonymous = connect.username.is_none()
            && connect.password.is_none()
            && authentication_method.is_none();
        let verdict = if anonymous {
            if config.allow_anonymous {
                Ok(())
            } else {
                Err(reason::NOT_AUTHORIZED)
            }
        } else {
            self.context.authenticator.authenticate(&Credentials {
                client_id: &client_id,
                username: connect.username.as_deref(),
                password: connect.password.as_deref(),
                authentication_method,
                authentication_data: connect.properties.authentication_data.as_deref(),
            })
        };
        if let Err(code) = verdict {
            return self.refuse_connect(code);
        }

        self.keep_alive_s = connect.keep_alive_s;
        if v5
            && config.keep_alive_max_s > 0
            && (connect.keep_alive_s == 0 || connect.keep_alive_s > config.keep_alive_max_s)
        {
            self.keep_alive_s = config.keep_alive_max_s;
            self.server_keep_alive_s = Some(config.keep_alive_max_s);
        }

        let asked_expiry_s = if v5 {
            connect.properties.session_expiry_interval_s.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            config.session_expiry_max_s
        };
        self.session_expiry_s = asked_expiry_s.min(config.session_expiry_max_s);
        self.session_expiry_capped = v5 && self.session_expiry_s != asked_expiry_s;

        if let Some(maximum) = connect.properties.receive_maximum {
            self.client_receive_maximum = maximum;
        }
        if let Some(bytes_max) = connect.properties.maximum_packet_bytes {
            self.client_packet_bytes_max = bytes_max;
        }
        self.client_topic_aliases_max = connect.properties.topic_alias_maximum.unwrap_or(0);

        self.client_id = client_id.clone();
        self.clean_start = connect.clean_start;
        self.will = connect.will;
        self.phase = Phase::AwaitingSession;
        vec![Action::OpenSession {
            client_id,
            clean_start: connect.clean_start,
        }]
    }

    /// CONNACK with a refusal (the 3.1.1 return code when 3.1.1 has one,
    /// else no CONNACK), then close. No will: the client never connected.
    pub(super) fn refuse_connect(&mut self, code: u8) -> Vec<Action> {
        let mut actions = Vec::new();
        let code = match self.version {
            ProtocolVersion::V5 if reason::allowed_in(super::super::PacketType::ConnAck, code) => {
                Some(code)
            }
            ProtocolVersion::V5 => Some(reason::UNSPECIFIED_ERROR),
            ProtocolVersion::V311 => match reason::connack_v311_return_code(code) {
                Some(_) => Some(code),
                None if is_auth(code) => Some(reason::NOT_AUTHORIZED),
                None => None,
            },
        };
        if let Some(reason_code) = code {
            actions.push(Action::Send(Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code,
                properties: Properties::default(),
            })));
        }
        self.phase = Phase::Closed;
        actions.push(Action::Close {
            reason_code: code.unwrap_or(reason::UNSPECIFIED_ERROR),
        });
        actions
    }

    /// The node opened the session: `stored` is the session it kept for
    /// this client id (ignored on a clean start).
    pub fn handle_session_opened(
        &mut self,
        stored: Option<SessionState>,
        now_ms: u64,
    ) -> Vec<Action> {
        if self.phase != Phase::AwaitingSession {
            debug_assert!(false, "handle_session_opened without OpenSession");
            return Vec::new();
        }
        self.phase = Phase::Connected;
        let stored = stored.filter(|_| !self.clean_start);
        let session_present = stored.is_some();
        let mut actions = Vec::new();
        let mut resend = Vec::new();
        if let Some(stored) = stored {
            for subscription in stored.subscriptions {
                self.subscriptions
                    .insert(subscription.filter.clone(), subscription);
            }
            // In the session's own (filter) order, which
            // handle_subscribe_result relies on.
            let restored: Vec<(String, Entry)> = self
                .subscriptions
                .values()
                .map(|subscription| {
                    (
                        subscription.filter.clone(),
                        Entry {
                            options: subscription.options,
                            identifier: subscription.identifier,
                        },
                    )
                })
                .collect();
            if !restored.is_empty() {
                actions.push(Action::Subscribe {
                    packet_id: None,
                    subscriptions: restored,
                });
            }
            for outbound in stored.outbound {
                self.last_packet_id = outbound.packet_id;
                resend.push(outbound.packet_id);
                self.outbound.insert(outbound.packet_id, outbound.stage);
            }
            self.awaiting_release
                .extend(stored.inbound_awaiting_release.iter().copied());
            for cursor in stored.cursors {
                self.taken
                    .insert((cursor.topic, cursor.partition), cursor.next_offset);
            }
        }
        actions.push(Action::Send(Packet::ConnAck(self.connack(session_present))));
        if let Some(will) = &self.will {
            actions.push(Action::SetWill {
                will: will.clone(),
                delay_ms: self.will_delay_ms(will),
            });
        }
        // Unacknowledged messages go again, with their identifiers and DUP
        // (MQTT 5.0 section 4.4); topic aliases are per connection, so they
        // carry their full topic.
        for packet_id in resend {
            match self.outbound.get(&packet_id) {
                Some(OutboundStage::Published {
                    message,
                    subscription_identifiers,
                }) => {
                    let mut properties = match self.version {
                        ProtocolVersion::V5 => message.properties.to_properties(now_ms),
                        ProtocolVersion::V311 => Properties::default(),
                    };
                    if self.version == ProtocolVersion::V5 {
                        properties.subscription_identifiers = subscription_identifiers.clone();
                    }
                    actions.push(Action::Send(Packet::Publish(Publish {
                        dup: true,
                        qos: message.qos,
                        retain: message.retain,
                        topic: message.topic.clone(),
                        packet_id,
                        payload: message.payload.clone(),
                        properties,
                    })));
                }
                Some(OutboundStage::Released) => {
                    actions.push(Action::Send(Packet::PubRel(
                        super::super::PublishResponse::success(packet_id),
                    )));
                }
                None => {}
            }
        }
        if !self.subscriptions.is_empty() {
            actions.push(Action::ResumeDeliveries {
                cursors: self.cursors(),
            });
        }
        if self.is_persistent() {
            actions.push(self.persist(now_ms));
        }
        actions
    }

    fn connack(&self, session_present: bool) -> ConnAck {
        let config = &self.context.config;
        let mut properties = Properties::default();
        if self.version == ProtocolVersion::V5 {
            if config.inflight_inbound_max != u16::MAX {
                properties.receive_maximum = Some(config.inflight_inbound_max.max(1));
            }
            if config.topic_aliases_max > 0 {
                properties.topic_alias_maximum = Some(config.topic_aliases_max);
            }
            properties.maximum_packet_bytes = Some(config.packet_bytes_max);
            if self.client_id_assigned {
                properties.assigned_client_identifier = Some(self.client_id.clone());
            }
            properties.server_keep_alive_s = self.server_keep_alive_s;
            if self.session_expiry_capped {
                properties.session_expiry_interval_s = Some(self.session_expiry_s);
            }
        }
        ConnAck {
            session_present,
            reason_code: reason::SUCCESS,
            properties,
        }
    }
}

/// Refusals that mean "not you": 3.1.1 says them as return code 5.
fn is_auth(code: u8) -> bool {
    matches!(
        code,
        reason::BANNED | reason::BAD_AUTHENTICATION_METHOD | reason::NOT_AUTHORIZED
    )
}
