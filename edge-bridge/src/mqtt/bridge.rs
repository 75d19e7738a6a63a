//! The upstream MQTT bridge: Rill as an MQTT client of another broker (a
//! Mosquitto on the gateway, say), subscribed with QoS 1 and a persistent
//! session to configured filters, appending what arrives through the same
//! [`Mapping`] and with the same `mqtt.*` headers as the MQTT listener.
//!
//! A [`Bridge`] is a pure client state machine: events in (the socket is
//! connected, bytes arrived, an append finished, time passed, the socket
//! was lost), [`Action`]s out (connect, send a packet, append a record,
//! close, reconnect at a time, report something worth a log line). It
//! never touches a socket, the log, the clock or a random source: the
//! jitter of its backoff comes from a seeded generator.
//!
//! **The node's side of the contract**, step by step:
//!
//! 1. [`Bridge::new`], then [`Bridge::start`]: carry out the actions.
//! 2. [`Action::Connect`]: open a TCP connection to `address`, then call
//!    [`Bridge::handle_connected`], or [`Bridge::handle_connect_failed`]
//!    with the error.
//! 3. Read from the socket only while [`Bridge::wants_input`] holds, and
//!    give every byte read to [`Bridge::handle_bytes`] in order. A socket
//!    that closes or fails goes to [`Bridge::handle_connection_lost`].
//! 4. [`Action::Send`]: encode the packet at the configured protocol
//!    version and write it, in order. [`Action::Close`]: write what was
//!    queued, then close the socket; bytes and results of that connection
//!    that arrive later may still be fed (they are recognised as stale).
//! 5. [`Action::Append`]: append the record to the Rill topic, durable by
//!    the topic's fsync policy when `durable` is set, and report with
//!    [`Bridge::handle_append_result`] and the same token, in any order.
//! 6. [`Bridge::handle_tick`] runs at least once a second, and at the time
//!    an [`Action::ScheduleReconnect`] names (it then gives
//!    [`Action::Connect`]).
//! 7. On shutdown, [`Bridge::handle_shutdown`], then keep feeding results
//!    and ticks until [`Bridge::is_stopped`].
//!
//! **What it guarantees.** A PUBACK (PUBREC for QoS 2) goes upstream only
//! after the append it answers is durable, and acknowledgements leave in
//! the order the PUBLISHes came (MQTT 5.0 section 4.6). Nothing is
//! acknowledged that is not in the log: a failed append closes the
//! connection instead, so the upstream broker keeps the message and sends
//! it again on the next connection. The price is at-least-once: a message
//! appended whose PUBACK was lost (the connection dropped, Rill crashed)
//! comes again and is appended again. Within one process the bridge
//! recognises most of these: a PUBLISH with DUP set whose packet
//! identifier is in flight is not appended twice, and one whose packet
//! identifier and contents match a message appended but not acknowledged
//! on an earlier connection of the same upstream session is acknowledged
//! without a second append. After a crash there is no such memory, and the
//! redelivered messages are appended again.
//!
//! **Reconnects.** Every failure (the connection refused or lost, no
//! CONNACK in time, a keep-alive timeout, a refusal, a failed append)
//! closes the connection and schedules the next attempt after an
//! exponential backoff with jitter ([`Backoff`]), which a connection that
//! stayed up at least the backoff maximum resets.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;

use bytes::Bytes;

use super::codec::decode;
use super::error::DecodeError;
use super::mapping::Mapping;
use super::packet::{
    ConnAck, Connect, Disconnect, Packet, ProtocolVersion, PublishResponse, QoS, RetainHandling,
    SubAck, Subscribe, Subscription, SubscriptionOptions,
};
use super::properties::Properties;
use super::reason;

mod backoff;
mod inbound;
#[cfg(test)]
mod tests;

pub use super::session::AppendError;
pub use backoff::Backoff;

/// The QoS the bridge subscribes with: at least once, so every message
/// the upstream broker takes for this session reaches the log.
pub const SUBSCRIPTION_QOS: QoS = QoS::AtLeastOnce;

/// How long a stopping bridge waits for its appends to finish and their
/// acknowledgements to leave before it closes anyway.
pub const SHUTDOWN_DRAIN_MS: u64 = 5_000;

/// Appends of earlier connections still running, at most (their results
/// feed the redelivery check; past this they are forgotten).
const ORPHANS_MAX: usize = 65_536;

/// The bridge's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// The upstream broker, `host:port`, handed back in [`Action::Connect`].
    pub address: String,
    pub protocol_version: ProtocolVersion,
    /// Non-empty: a persistent session needs a fixed identifier.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    /// Subscribed in order with [`SUBSCRIPTION_QOS`].
    pub filters: Vec<String>,
    /// 0: no keep alive.
    pub keep_alive_s: u16,
    /// MQTT 5.0 Session Expiry Interval; 3.1.1 sessions last as long as
    /// the upstream broker keeps them.
    pub session_expiry_s: u32,
    /// From [`Action::Connect`] to an accepted CONNACK.
    pub connect_timeout_ms: u64,
    /// QoS 1 and 2 PUBLISHes (and QoS 0 appends) in flight at once: sent
    /// as Receive Maximum under 5.0; the bridge stops reading at it.
    pub inflight_max: u16,
    /// The largest packet accepted (sent as Maximum Packet Size under
    /// 5.0); a larger one is a malformed connection.
    pub packet_bytes_max: u32,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
}

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// Quoted back in [`Bridge::handle_append_result`].
    pub token: u64,
    /// The Rill topic.
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Bytes,
    /// Report success only once the record is durable by the topic's
    /// fsync policy (QoS 1 and 2).
    pub durable: bool,
}

/// What the node must do, in order.
#[expect(
    clippy::large_enum_variant,
    reason = "actions live for one step and most are Send; boxing would cost an allocation per acknowledgement"
)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection (see the module documentation).
    Connect {
        address: String,
    },
    /// Encode at the configured protocol version and write.
    Send(Packet),
    Append(Append),
    /// Write what was sent, then close the socket.
    Close,
    /// Call [`Bridge::handle_tick`] at or after `at_ms`.
    ScheduleReconnect {
        at_ms: u64,
    },
    /// Something an operator wants in the log.
    Notice(Notice),
}

/// Events worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The upstream broker accepted the connection.
    Connected { session_present: bool },
    /// The upstream broker granted this filter at this QoS.
    Subscribed { filter: String, granted: QoS },
    /// The upstream broker refused this filter: nothing it matches comes.
    FilterRefused { filter: String, reason_code: u8 },
    /// The connection ended (or never came up); the next attempt comes in
    /// `reconnect_in_ms`, or never when stopping.
    Disconnected {
        reason: DisconnectReason,
        reconnect_in_ms: Option<u64>,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The TCP connection could not be opened.
    ConnectFailed(String),
    /// No accepted CONNACK within the connect timeout.
    ConnectTimeout,
    /// CONNACK with a failure reason code (5.0 code, also for 3.1.1).
    Refused {
        reason_code: u8,
        reason_string: Option<String>,
    },
    /// The upstream broker sent DISCONNECT (5.0).
    ServerDisconnected {
        reason_code: u8,
        reason_string: Option<String>,
    },
    /// The socket closed or failed.
    ConnectionLost(String),
    /// No PINGRESP within the keep alive after a PINGREQ.
    KeepAliveTimeout,
    /// The upstream broker broke the protocol.
    ProtocolError(String),
    /// Bytes from the upstream broker are not a packet.
    Malformed(DecodeError),
    /// An append failed: the message stays upstream, unacknowledged.
    AppendFailed(AppendError),
    ShuttingDown,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_string = |formatter: &mut fmt::Formatter<'_>, reason_string: &Option<String>| {
            match reason_string {
                Some(text) => write!(formatter, " ({text})"),
                None => Ok(()),
            }
        };
        match self {
            DisconnectReason::ConnectFailed(error) => write!(formatter, "cannot connect: {error}"),
            DisconnectReason::ConnectTimeout => {
                formatter.write_str("no accepted CONNACK within the connect timeout")
            }
            DisconnectReason::Refused {
                reason_code,
                reason_string,
            } => {
                write!(
                    formatter,
                    "CONNACK refused the connection: {reason_code:#04x} {}",
                    reason_name(*reason_code)
                )?;
                with_string(formatter, reason_string)
            }
            DisconnectReason::ServerDisconnected {
                reason_code,
                reason_string,
            } => {
                write!(
                    formatter,
                    "the upstream broker disconnected: {reason_code:#04x} {}",
                    reason_name(*reason_code)
                )?;
                with_string(formatter, reason_string)
            }
            DisconnectReason::ConnectionLost(error) => {
                write!(formatter, "connection lost: {error}")
            }
            DisconnectReason::KeepAliveTimeout => {
                formatter.write_str("no PINGRESP within the keep alive")
            }
            DisconnectReason::ProtocolError(problem) => {
                write!(
                    formatter,
                    "protocol error by the upstream broker: {problem}"
                )
            }
            DisconnectReason::Malformed(error) => {
                write!(
                    formatter,
                    "malformed packet from the upstream broker: {error}"
                )
            }
            DisconnectReason::AppendFailed(error) => write!(
                formatter,
                "an append failed ({error:?}); the message stays upstream and comes again"
            ),
            DisconnectReason::ShuttingDown => formatter.write_str("Rill is shutting down"),
        }
    }
}

/// A short name for the reason codes a CONNACK, SUBACK or DISCONNECT is
/// likely to carry, for log lines.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        reason::SUCCESS => "success",
        reason::GRANTED_QOS_1 => "granted QoS 1",
        reason::GRANTED_QOS_2 => "granted QoS 2",
        reason::UNSPECIFIED_ERROR => "unspecified error",
        reason::MALFORMED_PACKET => "malformed packet",
        reason::PROTOCOL_ERROR => "protocol error",
        reason::IMPLEMENTATION_SPECIFIC_ERROR => "implementation specific error",
        reason::UNSUPPORTED_PROTOCOL_VERSION => "unsupported protocol version",
        reason::CLIENT_IDENTIFIER_NOT_VALID => "client identifier not valid",
        reason::BAD_USER_NAME_OR_PASSWORD => "bad user name or password",
        reason::NOT_AUTHORIZED => "not authorized",
        reason::SERVER_UNAVAILABLE => "server unavailable",
        reason::SERVER_BUSY => "server busy",
        reason::BANNED => "banned",
        reason::SERVER_SHUTTING_DOWN => "server shutting down",
        reason::KEEP_ALIVE_TIMEOUT => "keep alive timeout",
        reason::SESSION_TAKEN_OVER => "session taken over (another client uses this client id)",
        reason::TOPIC_FILTER_INVALID => "topic filter invalid",
        reason::PACKET_TOO_LARGE => "packet too large",
        reason::QUOTA_EXCEEDED => "quota exceeded",
        reason::ADMINISTRATIVE_ACTION => "administrative action",
        reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED => "shared subscriptions not supported",
        reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED => "wildcard subscriptions not supported",
        _ => "failure",
    }
}

/// Counters for the node's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Connections the upstream broker accepted.
    pub connections: u64,
    /// Connection attempts after the first.
    pub reconnects: u64,
    /// PUBLISHes received, duplicates included.
    pub messages_received: u64,
    /// Appends that succeeded.
    pub messages_appended: u64,
    /// Redeliveries recognised and not appended again.
    pub duplicates_skipped: u64,
    /// Messages no mapping rule takes (with `unmatched = refuse`):
    /// acknowledged and dropped.
    pub messages_unmatched: u64,
    pub append_failures: u64,
    pub filters_refused: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before [`Bridge::start`].
    Idle,
    /// [`Action::Connect`] given; the socket is not up yet.
    Connecting {
        since_ms: u64,
    },
    /// CONNECT sent.
    AwaitingConnAck {
        since_ms: u64,
    },
    Connected {
        since_ms: u64,
    },
    /// Waiting out the backoff.
    Waiting {
        until_ms: u64,
    },
    /// Stopping: no more input, waiting for acknowledgements to leave.
    Draining {
        deadline_ms: u64,
    },
    Stopped,
}

/// What identifies a message well enough to recognise its redelivery
/// (with its packet identifier and the DUP flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    qos: QoS,
    topic_crc: u32,
    payload_crc: u32,
    payload_bytes: usize,
}

/// An inbound QoS 1 or 2 PUBLISH whose acknowledgement waits for its
/// append and for the ones received before it.
#[derive(Debug, Clone)]
struct PendingAck {
    /// 0: decided without an append.
    token: u64,
    packet_id: u16,
    qos: QoS,
    fingerprint: Fingerprint,
    /// Set once the append succeeded (from the start when none is needed).
    appended: bool,
}

/// An append of a connection that has ended: if it succeeds, the
/// redelivery of its message is recognised.
#[derive(Debug, Clone, Copy)]
struct Orphan {
    packet_id: u16,
    fingerprint: Fingerprint,
    /// The upstream session it belongs to.
    session: u64,
}

/// The upstream bridge (see the module documentation).
pub struct Bridge {
    config: BridgeConfig,
    mapping: Mapping,
    phase: Phase,
    stopping: bool,
    backoff: Backoff,
    /// When the current connection's CONNACK accepted it.
    connected_at_ms: Option<u64>,
    keep_alive_s: u16,
    last_sent_ms: u64,
    ping_sent_ms: Option<u64>,
    /// Bytes received and not yet decoded.
    buffer: Vec<u8>,
    pending_acks: VecDeque<PendingAck>,
    pending_qos0: BTreeSet<u64>,
    subscribe_packet_id: Option<u16>,
    next_packet_id: u16,
    next_token: u64,
    /// The upstream session, counted up whenever the upstream broker says
    /// it has none (CONNACK session present 0).
    session: u64,
    /// QoS 2 packet identifiers answered with PUBREC, waiting for PUBREL
    /// (session state: kept across connections).
    awaiting_release: BTreeSet<u16>,
    /// Messages appended and not acknowledged when their connection
    /// ended, by packet identifier (at most 65 535).
    appended_unacknowledged: HashMap<u16, Fingerprint>,
    orphans: HashMap<u64, Orphan>,
    stats: BridgeStats,
}

impl Bridge {
    /// A bridge that has not started. `seed` drives the backoff's jitter
    /// (the node passes something that differs between boxes and starts).
    pub fn new(config: BridgeConfig, mapping: Mapping, seed: u64) -> Bridge {
        let backoff = Backoff::new(config.backoff_min_ms, config.backoff_max_ms, seed);
        let keep_alive_s = config.keep_alive_s;
        Bridge {
            config,
            mapping,
            phase: Phase::Idle,
            stopping: false,
            backoff,
            connected_at_ms: None,
            keep_alive_s,
            last_sent_ms: 0,
            ping_sent_ms: None,
            buffer: Vec::new(),
            pending_acks: VecDeque::new(),
            pending_qos0: BTreeSet::new(),
            subscribe_packet_id: None,
            next_packet_id: 0,
            next_token: 1,
            session: 0,
            awaiting_release: BTreeSet::new(),
            appended_unacknowledged: HashMap::new(),
            orphans: HashMap::new(),
            stats: BridgeStats::default(),
        }
    }

    pub fn config(&self) -> &BridgeConfig {
        &self.config
    }

    pub fn protocol_version(&self) -> ProtocolVersion {
        self.config.protocol_version
    }

    pub fn stats(&self) -> BridgeStats {
        self.stats
    }

    /// Whether the upstream broker has accepted the current connection.
    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Connected { .. } | Phase::Draining { .. })
    }

    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Whether the node should read from the socket: while connecting,
    /// and once connected while fewer than `inflight_max` appends are in
    /// flight (a 3.1.1 broker has no Receive Maximum to respect, so the
    /// bridge stops reading instead).
    pub fn wants_input(&self) -> bool {
        match self.phase {
            Phase::AwaitingConnAck { .. } => true,
            Phase::Connected { .. } => self.has_room(),
            _ => false,
        }
    }

    fn has_room(&self) -> bool {
        self.pending_acks.len() + self.pending_qos0.len() < usize::from(self.config.inflight_max)
    }

    /// Starts: the first connection attempt, at once.
    pub fn start(&mut self, now_ms: u64) -> Vec<Action> {
        if self.phase != Phase::Idle {
            return Vec::new();
        }
        self.phase = Phase::Connecting { since_ms: now_ms };
        vec![Action::Connect {
            address: self.config.address.clone(),
        }]
    }

    /// The socket [`Action::Connect`] asked for is up: CONNECT goes out.
    pub fn handle_connected(&mut self, now_ms: u64) -> Vec<Action> {
        if !matches!(self.phase, Phase::Connecting { .. }) {
            return Vec::new();
        }
        self.phase = Phase::AwaitingConnAck { since_ms: now_ms };
        self.keep_alive_s = self.config.keep_alive_s;
        self.last_sent_ms = now_ms;
        self.ping_sent_ms = None;
        self.buffer.clear();
        let config = &self.config;
        let properties = match config.protocol_version {
            ProtocolVersion::V311 => Properties::default(),
            ProtocolVersion::V5 => Properties {
                session_expiry_interval_s: Some(config.session_expiry_s),
                receive_maximum: Some(config.inflight_max.max(1)),
                maximum_packet_bytes: Some(config.packet_bytes_max),
                ..Properties::default()
            },
        };
        vec![Action::Send(Packet::Connect(Box::new(Connect {
            protocol_version: config.protocol_version,
            clean_start: false,
            keep_alive_s: config.keep_alive_s,
            client_id: config.client_id.clone(),
            will: None,
            username: config.username.clone(),
            password: config.password.clone(),
            properties,
        })))]
    }

    /// The socket [`Action::Connect`] asked for could not be opened.
    pub fn handle_connect_failed(&mut self, error: &str, now_ms: u64) -> Vec<Action> {
        if !matches!(self.phase, Phase::Connecting { .. }) {
            return Vec::new();
        }
        self.fail(
            DisconnectReason::ConnectFailed(error.to_owned()),
            now_ms,
            false,
        )
    }

    /// The socket closed or failed.
    pub fn handle_connection_lost(&mut self, error: &str, now_ms: u64) -> Vec<Action> {
        match self.phase {
            Phase::AwaitingConnAck { .. } | Phase::Connected { .. } | Phase::Draining { .. } => {
                self.fail(
                    DisconnectReason::ConnectionLost(error.to_owned()),
                    now_ms,
                    true,
                )
            }
            _ => Vec::new(),
        }
    }

    /// Bytes read from the socket.
    pub fn handle_bytes(&mut self, bytes: &[u8], now_ms: u64) -> Vec<Action> {
        match self.phase {
            Phase::AwaitingConnAck { .. } | Phase::Connected { .. } => {
                self.buffer.extend_from_slice(bytes);
                self.decode_buffered(now_ms)
            }
            // Stopping or stale: what is not acknowledged comes again.
            _ => Vec::new(),
        }
    }

    /// Time passes: connect timeout, reconnect when the backoff is over,
    /// keep alive, the end of a shutdown's drain.
    pub fn handle_tick(&mut self, now_ms: u64) -> Vec<Action> {
        match self.phase {
            Phase::Idle | Phase::Stopped => Vec::new(),
            Phase::Connecting { since_ms } | Phase::AwaitingConnAck { since_ms } => {
                if now_ms.saturating_sub(since_ms) >= self.config.connect_timeout_ms {
                    let socket_open = matches!(self.phase, Phase::AwaitingConnAck { .. });
                    return self.fail(DisconnectReason::ConnectTimeout, now_ms, socket_open);
                }
                Vec::new()
            }
            Phase::Waiting { until_ms } => {
                if now_ms < until_ms {
                    return Vec::new();
                }
                self.stats.reconnects += 1;
                self.phase = Phase::Connecting { since_ms: now_ms };
                vec![Action::Connect {
                    address: self.config.address.clone(),
                }]
            }
            Phase::Connected { .. } => self.keep_alive(now_ms),
            Phase::Draining { deadline_ms } => {
                if now_ms >= deadline_ms {
                    return self.fail(DisconnectReason::ShuttingDown, now_ms, true);
                }
                Vec::new()
            }
        }
    }

    /// Rill is stopping: no more input; once the appends in flight have
    /// been acknowledged (or [`SHUTDOWN_DRAIN_MS`] passed), DISCONNECT
    /// (the upstream session stays) and close.
    pub fn handle_shutdown(&mut self, now_ms: u64) -> Vec<Action> {
        self.stopping = true;
        match self.phase {
            Phase::Connected { .. } => {
                self.phase = Phase::Draining {
                    deadline_ms: now_ms.saturating_add(SHUTDOWN_DRAIN_MS),
                };
                self.drain(now_ms)
            }
            Phase::Connecting { .. } | Phase::AwaitingConnAck { .. } => {
                let socket_open = matches!(self.phase, Phase::AwaitingConnAck { .. });
                self.fail(DisconnectReason::ShuttingDown, now_ms, socket_open)
            }
            Phase::Idle | Phase::Waiting { .. } => {
                self.phase = Phase::Stopped;
                Vec::new()
            }
            Phase::Draining { .. } | Phase::Stopped => Vec::new(),
        }
    }

    /// While draining: the DISCONNECT once nothing waits.
    fn drain(&mut self, now_ms: u64) -> Vec<Action> {
        if !matches!(self.phase, Phase::Draining { .. }) || !self.pending_acks.is_empty() {
            return Vec::new();
        }
        let mut actions = vec![self.send(
            Packet::Disconnect(Disconnect {
                reason_code: reason::NORMAL_DISCONNECTION,
                properties: Properties::default(),
            }),
            now_ms,
        )];
        actions.extend(self.fail(DisconnectReason::ShuttingDown, now_ms, true));
        actions
    }

    fn send(&mut self, packet: Packet, now_ms: u64) -> Action {
        self.last_sent_ms = now_ms;
        Action::Send(packet)
    }

    fn keep_alive(&mut self, now_ms: u64) -> Vec<Action> {
        let keep_alive_ms = u64::from(self.keep_alive_s) * 1000;
        if keep_alive_ms == 0 {
            return Vec::new();
        }
        if let Some(sent_ms) = self.ping_sent_ms {
            // While the bridge does not read (its appends are slow) the
            // PINGRESP may be sitting unread: the wait starts again.
            if !self.wants_input() {
                self.ping_sent_ms = Some(now_ms);
            } else if now_ms.saturating_sub(sent_ms) >= keep_alive_ms {
                return self.fail(DisconnectReason::KeepAliveTimeout, now_ms, true);
            }
            return Vec::new();
        }
        if now_ms.saturating_sub(self.last_sent_ms) >= keep_alive_ms {
            self.ping_sent_ms = Some(now_ms);
            return vec![self.send(Packet::PingReq, now_ms)];
        }
        Vec::new()
    }

    /// Decodes what is buffered while there is room for more appends.
    fn decode_buffered(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let buffer = std::mem::take(&mut self.buffer);
        let mut consumed = 0;
        while self.wants_input() {
            match decode(
                &buffer[consumed..],
                self.config.protocol_version,
                self.config.packet_bytes_max,
            ) {
                Ok(Some((packet, used))) => {
                    consumed += used;
                    actions.extend(self.handle_packet(packet, now_ms));
                }
                Ok(None) => break,
                Err(error) => {
                    actions.extend(self.fail(DisconnectReason::Malformed(error), now_ms, true));
                    break;
                }
            }
        }
        // A connection that ended dropped its buffer; one that goes on
        // keeps the rest for later.
        if matches!(
            self.phase,
            Phase::AwaitingConnAck { .. } | Phase::Connected { .. }
        ) {
            self.buffer = buffer;
            self.buffer.drain(..consumed);
        }
        actions
    }

    fn handle_packet(&mut self, packet: Packet, now_ms: u64) -> Vec<Action> {
        if let Phase::AwaitingConnAck { .. } = self.phase {
            return match packet {
                Packet::ConnAck(ack) => self.handle_connack(ack, now_ms),
                other => self.fail(
                    DisconnectReason::ProtocolError(format!(
                        "{} before CONNACK",
                        other.packet_type()
                    )),
                    now_ms,
                    true,
                ),
            };
        }
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish, now_ms),
            Packet::PubRel(release) => {
                let known = self.awaiting_release.remove(&release.packet_id);
                let reason_code = match (known, self.config.protocol_version) {
                    (false, ProtocolVersion::V5) => reason::PACKET_IDENTIFIER_NOT_FOUND,
                    _ => reason::SUCCESS,
                };
                vec![self.send(
                    Packet::PubComp(PublishResponse {
                        packet_id: release.packet_id,
                        reason_code,
                        properties: Properties::default(),
                    }),
                    now_ms,
                )]
            }
            Packet::SubAck(ack) => self.handle_suback(ack, now_ms),
            Packet::PingResp => {
                self.ping_sent_ms = None;
                Vec::new()
            }
            Packet::Disconnect(disconnect) => self.fail(
                DisconnectReason::ServerDisconnected {
                    reason_code: disconnect.reason_code,
                    reason_string: disconnect.properties.reason_string,
                },
                now_ms,
                true,
            ),
            // Answers to packets the bridge never sends: harmless.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::UnsubAck(_) => {
                Vec::new()
            }
            other @ (Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq
            | Packet::Auth(_)) => self.fail(
                DisconnectReason::ProtocolError(format!(
                    "a server does not send {}",
                    other.packet_type()
                )),
                now_ms,
                true,
            ),
        }
    }

    fn handle_connack(&mut self, ack: ConnAck, now_ms: u64) -> Vec<Action> {
        if ack.reason_code >= reason::UNSPECIFIED_ERROR {
            return self.fail(
                DisconnectReason::Refused {
                    reason_code: ack.reason_code,
                    reason_string: ack.properties.reason_string,
                },
                now_ms,
                true,
            );
        }
        self.phase = Phase::Connected { since_ms: now_ms };
        self.connected_at_ms = Some(now_ms);
        self.stats.connections += 1;
        if let Some(keep_alive_s) = ack.properties.server_keep_alive_s {
            self.keep_alive_s = keep_alive_s;
        }
        if !ack.session_present {
            // A new upstream session: nothing of the old one comes again.
            self.session += 1;
            self.awaiting_release.clear();
            self.appended_unacknowledged.clear();
        }
        let mut actions = vec![Action::Notice(Notice::Connected {
            session_present: ack.session_present,
        })];
        if !self.config.filters.is_empty() {
            actions.push(self.subscribe(now_ms));
        }
        actions
    }

    /// SUBSCRIBE to every filter, on every connection: a filter added to
    /// the configuration since the session began is taken too. Under 5.0,
    /// retained messages come only for subscriptions the session did not
    /// have; 3.1.1 brokers send them again on every SUBSCRIBE.
    fn subscribe(&mut self, now_ms: u64) -> Action {
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        let packet_id = self.next_packet_id;
        self.subscribe_packet_id = Some(packet_id);
        let options = match self.config.protocol_version {
            ProtocolVersion::V311 => SubscriptionOptions::with_qos(SUBSCRIPTION_QOS),
            ProtocolVersion::V5 => SubscriptionOptions {
                qos: SUBSCRIPTION_QOS,
                no_local: false,
                // The retain header says what the publisher said.
                retain_as_published: true,
                retain_handling: RetainHandling::SendAtSubscribeIfNew,
            },
        };
        let subscriptions = self
            .config
            .filters
            .iter()
            .map(|filter| Subscription {
                filter: filter.clone(),
                options,
            })
            .collect();
        self.send(
            Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions,
                properties: Properties::default(),
            }),
            now_ms,
        )
    }

    fn handle_suback(&mut self, ack: SubAck, now_ms: u64) -> Vec<Action> {
        if self.subscribe_packet_id != Some(ack.packet_id) {
            return self.fail(
                DisconnectReason::ProtocolError(format!(
                    "SUBACK for packet identifier {}, which no SUBSCRIBE used",
                    ack.packet_id
                )),
                now_ms,
                true,
            );
        }
        if ack.reason_codes.len() != self.config.filters.len() {
            return self.fail(
                DisconnectReason::ProtocolError(format!(
                    "SUBACK has {} reason codes for {} filters",
                    ack.reason_codes.len(),
                    self.config.filters.len()
                )),
                now_ms,
                true,
            );
        }
        self.subscribe_packet_id = None;
        let mut actions = Vec::new();
        for (filter, &code) in self.config.filters.iter().zip(&ack.reason_codes) {
            let notice = match QoS::from_bits(code) {
                Some(granted) => Notice::Subscribed {
                    filter: filter.clone(),
                    granted,
                },
                None => {
                    self.stats.filters_refused += 1;
                    Notice::FilterRefused {
                        filter: filter.clone(),
                        reason_code: code,
                    }
                }
            };
            actions.push(Action::Notice(notice));
        }
        actions
    }

    /// The append with `token` finished.
    pub fn handle_append_result(
        &mut self,
        token: u64,
        result: Result<(), AppendError>,
        now_ms: u64,
    ) -> Vec<Action> {
        if self.pending_qos0.remove(&token) {
            match result {
                Ok(()) => self.stats.messages_appended += 1,
                // QoS 0 promised nothing: it is lost and counted.
                Err(_) => self.stats.append_failures += 1,
            }
            return self.after_room(now_ms);
        }
        if let Some(index) = self
            .pending_acks
            .iter()
            .position(|pending| pending.token == token)
        {
            return match result {
                Ok(()) => {
                    self.stats.messages_appended += 1;
                    self.pending_acks[index].appended = true;
                    let mut actions = self.flush_acks(now_ms);
                    actions.extend(self.after_room(now_ms));
                    actions
                }
                Err(error) => {
                    self.stats.append_failures += 1;
                    self.fail(DisconnectReason::AppendFailed(error), now_ms, true)
                }
            };
        }
        if let Some(orphan) = self.orphans.remove(&token) {
            match result {
                Ok(()) => {
                    self.stats.messages_appended += 1;
                    if orphan.session == self.session {
                        self.appended_unacknowledged
                            .insert(orphan.packet_id, orphan.fingerprint);
                    }
                }
                Err(_) => self.stats.append_failures += 1,
            }
        }
        Vec::new()
    }

    /// An append finished: buffered packets may be decoded now, and a
    /// drain may be over.
    fn after_room(&mut self, now_ms: u64) -> Vec<Action> {
        match self.phase {
            Phase::Connected { .. } if !self.buffer.is_empty() => self.decode_buffered(now_ms),
            Phase::Draining { .. } => self.drain(now_ms),
            _ => Vec::new(),
        }
    }

    /// Acknowledgements whose appends are done, in receive order.
    fn flush_acks(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        while self
            .pending_acks
            .front()
            .is_some_and(|front| front.appended)
        {
            let Some(done) = self.pending_acks.pop_front() else {
                break;
            };
            let response = PublishResponse::success(done.packet_id);
            let packet = match done.qos {
                QoS::ExactlyOnce => {
                    self.awaiting_release.insert(done.packet_id);
                    Packet::PubRec(response)
                }
                _ => Packet::PubAck(response),
            };
            actions.push(self.send(packet, now_ms));
        }
        actions
    }

    /// Ends the connection (if any) and schedules the next one, or stops.
    fn fail(&mut self, reason: DisconnectReason, now_ms: u64, close: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        if close {
            actions.push(Action::Close);
        }
        self.end_connection();
        let good = self
            .connected_at_ms
            .take()
            .is_some_and(|at_ms| now_ms.saturating_sub(at_ms) >= self.config.backoff_max_ms);
        if self.stopping {
            self.phase = Phase::Stopped;
            actions.push(Action::Notice(Notice::Disconnected {
                reason,
                reconnect_in_ms: None,
            }));
            return actions;
        }
        if good {
            self.backoff.reset();
        }
        let delay_ms = self.backoff.next_delay_ms();
        let at_ms = now_ms.saturating_add(delay_ms);
        self.phase = Phase::Waiting { until_ms: at_ms };
        actions.push(Action::Notice(Notice::Disconnected {
            reason,
            reconnect_in_ms: Some(delay_ms),
        }));
        actions.push(Action::ScheduleReconnect { at_ms });
        actions
    }

    /// Forgets the connection's buffers; remembers what was appended and
    /// not acknowledged, so its redelivery is recognised.
    fn end_connection(&mut self) {
        for pending in self.pending_acks.drain(..) {
            if pending.appended {
                self.appended_unacknowledged
                    .insert(pending.packet_id, pending.fingerprint);
            } else if pending.token != 0 && self.orphans.len() < ORPHANS_MAX {
                self.orphans.insert(
                    pending.token,
                    Orphan {
                        packet_id: pending.packet_id,
                        fingerprint: pending.fingerprint,
                        session: self.session,
                    },
                );
            }
        }
        self.pending_qos0.clear();
        self.buffer = Vec::new();
        self.ping_sent_ms = None;
        self.subscribe_packet_id = None;
    }

    fn take_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }
}
