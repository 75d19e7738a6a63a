//! One MQTT client connection's protocol state machine, server side.
//!
//! A [`Connection`] takes decoded packets, broker events and the time, and
//! gives back [`Action`]s for the node to carry out in order. It never
//! touches a socket, the log, the clock or another connection: what is
//! broker-wide (the session store, the [`super::subscriptions`] index, the
//! [`super::retained`] store, wills waiting for their delay, the log) is
//! the node's, reached through actions and fed back through `handle_*`
//! calls. The contract, step by step:
//!
//! 1. A socket is accepted: [`Connection::new`]. The node decodes the
//!    first packet with [`super::decode_connect`] and later ones with
//!    [`super::decode`] at [`Connection::protocol_version`] and
//!    [`SessionConfig::packet_bytes_max`], and feeds each packet to
//!    [`Connection::handle_packet`]. A decode error goes to
//!    [`Connection::handle_decode_error`] (with
//!    [`super::connect_protocol_version`] of the buffer while no CONNECT has
//!    been accepted), a closed or failed socket to
//!    [`Connection::handle_connection_lost`]. [`Connection::handle_tick`]
//!    runs at least once a second.
//! 2. An accepted CONNECT gives [`Action::OpenSession`]. The node ends any
//!    other connection of that client id ([`Connection::handle_takeover`],
//!    carrying out its actions first), cancels that client's will if it is
//!    still waiting for its delay (unless this CONNECT asks for a clean
//!    start, which ends the old session and so publishes it now), drops the
//!    stored session when `clean_start` is set or it has expired, and then
//!    calls [`Connection::handle_session_opened`] with the stored
//!    [`SessionState`], if any, before feeding any other packet.
//! 3. [`Action::Append`]: append the record to the Rill topic (requesting
//!    durability by the topic's fsync policy when `durable` is set); when
//!    `retain` holds a message, also set it in the retained store and
//!    persist that change; then report with
//!    [`Connection::handle_append_result`] and the same token. Results may
//!    come in any order; acknowledgements go out in the order the
//!    PUBLISHes came in, each only after its own append succeeded.
//! 4. [`Action::Subscribe`]: add the entries to the subscription index,
//!    then report each entry's result in order with
//!    [`Connection::handle_subscribe_result`] right away.
//!    [`Action::Unsubscribe`]: remove the entry. [`Action::SendRetained`]:
//!    look the filter up in the retained store and give each message to
//!    [`Connection::handle_delivery`] as a [`DeliveryKind::Retained`]
//!    delivery with the QoS and identifier the action names.
//! 5. Live messages: for each record appended to a Rill topic, the node
//!    makes the [`super::Message`] (`Mapping::message_from_record`), routes
//!    it through the subscription index, and calls
//!    [`Connection::handle_delivery`] for each recipient with the record's
//!    [`LogPosition`]; for a shared subscription it offers the message to
//!    the candidates in order until one returns [`DeliveryOutcome::Taken`].
//!    [`Action::ResumeDeliveries`] asks the node to read the session's
//!    source topics (`Mapping::source_topics` of each subscription) from the
//!    given cursors (the start of a partition where none is given, bounded
//!    by retention) and feed what it reads through
//!    [`Connection::catch_up_delivery`] and [`Connection::handle_delivery`]
//!    until it reaches the live end; deliveries the session already took
//!    are recognised by position and ignored, so live and catch-up feeds may
//!    overlap. [`Action::PauseDeliveries`] tells the node it may stop
//!    feeding this session until the next `ResumeDeliveries`.
//! 6. [`Action::SetWill`]: keep the will for this client.
//!    [`Action::ClearWill`]: forget it. [`Action::PublishWill`]: publish it
//!    (through the mapping as a PUBLISH from this client, retained when its
//!    flag says so) after the delay, unless a new connection for the client
//!    takes the session first.
//! 7. [`Action::PersistSession`]: store the state durably, replacing the
//!    previous one; [`Action::EndSession`]: delete it and the client's
//!    index entries. [`Action::Close`] comes last: flush what was sent and
//!    close the socket; the connection takes no more input. On close the
//!    node also removes the client's subscription index entries (a
//!    persistent session's come back from its state on the next connect).
//!
//! **Queue policy.** Messages for the client wait in a queue of at most
//! `queued_messages_max` messages. When it is full, a QoS 0 delivery is
//! dropped and counted ([`ConnectionStats::dropped_queue_full`]); a QoS 1
//! or 2 delivery is refused, and the session emits
//! [`Action::PauseDeliveries`] and refuses every delivery that has a log
//! position until the queue has drained to half, when it emits
//! [`Action::ResumeDeliveries`] with its cursors: nothing acknowledged by
//! the log is lost, the node simply reads it again. A refused shared or
//! retained delivery (no log position) is the node's to offer elsewhere or
//! drop.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::auth::Authenticator;
use super::mapping::Mapping;
use super::message::Message;
use super::packet::{Disconnect, Packet, ProtocolVersion, QoS, Will};
use super::properties::Properties;
use super::reason;
use super::subscriptions::Entry;
use super::topic::TopicLimits;
use super::{DecodeError, REMAINING_BYTES_MAX};

mod connect;
mod inbound;
mod outbound;
mod state;
mod subscribe;

#[cfg(test)]
mod tests;

pub use state::{
    Cursor, OutboundMessage, OutboundStage, SESSION_STATE_VERSION, SessionState, StoredSubscription,
};

/// The limits and switches of the MQTT listener, set by the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Whether a CONNECT without user name, password or authentication
    /// method is let in.
    pub allow_anonymous: bool,
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout_ms: u64,
    /// Inbound QoS 1 and 2 PUBLISHes in flight at once (sent to the client
    /// as Receive Maximum); more is DISCONNECT 0x93.
    pub inflight_inbound_max: u16,
    /// Outbound QoS 1 and 2 messages in flight at once, whatever larger
    /// Receive Maximum the client allows.
    pub inflight_outbound_max: u16,
    /// Topic aliases a client may set (sent as Topic Alias Maximum).
    pub topic_aliases_max: u16,
    /// The largest packet accepted, fixed header included (sent as
    /// Maximum Packet Size; the node decodes with it).
    pub packet_bytes_max: u32,
    /// Messages waiting to be sent to one client.
    pub queued_messages_max: usize,
    /// Subscriptions one session may hold.
    pub subscriptions_max: usize,
    /// Topic names and filters longer or deeper than this are refused.
    pub topic_limits: TopicLimits,
    pub client_id_bytes_max: usize,
    /// The longest session expiry granted; 3.1.1 persistent sessions get
    /// exactly this.
    pub session_expiry_max_s: u32,
    /// The longest keep alive granted to a 5.0 client (0: any); a client
    /// asking for more or for none gets this as Server Keep Alive.
    pub keep_alive_max_s: u16,
    /// How often a persistent session's cursors and in-flight messages
    /// are persisted while it is connected.
    pub session_persist_interval_ms: u64,
}

impl Default for SessionConfig {
    /// Values for a small gateway; profiles override them.
    fn default() -> SessionConfig {
        SessionConfig {
            allow_anonymous: true,
            connect_timeout_ms: 10_000,
            inflight_inbound_max: 64,
            inflight_outbound_max: 64,
            topic_aliases_max: 32,
            packet_bytes_max: 1 << 20,
            queued_messages_max: 1_000,
            subscriptions_max: 100,
            topic_limits: TopicLimits {
                topic_bytes_max: 256,
                topic_levels_max: 16,
            },
            client_id_bytes_max: 128,
            session_expiry_max_s: 7 * 24 * 3600,
            keep_alive_max_s: 0,
            session_persist_interval_ms: 1_000,
        }
    }
}

/// What every connection of one listener shares.
pub struct ServerContext {
    pub config: SessionConfig,
    pub mapping: Mapping,
    pub authenticator: Box<dyn Authenticator>,
}

/// Why the node could not append a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendError {
    /// The disk or the topic's quota is full.
    QuotaExceeded,
    /// The topic refuses this client.
    NotAuthorized,
    /// Anything else (the topic is missing, an I/O error).
    Unavailable,
}

impl AppendError {
    /// The MQTT 5.0 PUBACK/PUBREC reason code for it.
    pub fn reason_code(self) -> u8 {
        match self {
            AppendError::QuotaExceeded => reason::QUOTA_EXCEEDED,
            AppendError::NotAuthorized => reason::NOT_AUTHORIZED,
            AppendError::Unavailable => reason::UNSPECIFIED_ERROR,
        }
    }
}

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// Quoted back in [`Connection::handle_append_result`].
    pub token: u64,
    /// The Rill topic.
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Bytes,
    /// Report success only once the record is durable as the topic's
    /// fsync policy defines (set for QoS 1 and 2).
    pub durable: bool,
    /// Set the retained message for its topic (an empty payload clears
    /// it) before reporting success.
    pub retain: Option<Message>,
}

/// Where a record sits in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPosition {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

/// Why a message is offered to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryKind {
    /// A message published now or read from the log.
    Live,
    /// A retained message sent because of a new subscription: it goes
    /// out with the retain flag set.
    Retained,
}

/// A message offered to this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// As published: its QoS and retain flag are the publisher's.
    pub message: Message,
    /// The subscription's maximum QoS (the highest of the session's
    /// matching subscriptions).
    pub qos: QoS,
    pub subscription_identifiers: Vec<u32>,
    pub retain_as_published: bool,
    pub kind: DeliveryKind,
    /// The record's place in the log, for cursors; `None` for retained
    /// messages and shared subscriptions.
    pub position: Option<LogPosition>,
}

/// What the session did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Queued or sent.
    Taken,
    /// At a position the session already took.
    Duplicate,
    /// Its message expired: skipped.
    Expired,
    /// QoS 0 with the queue full: dropped and counted.
    Dropped,
    /// Not taken: the queue is full or deliveries are paused (the node
    /// reads it again after [`Action::ResumeDeliveries`], or offers a
    /// shared message to another member), or the session is not open.
    Refused,
}

/// What the node must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Encode at [`Connection::protocol_version`] and write.
    Send(Packet),
    /// Take over or create the client's session, then call
    /// [`Connection::handle_session_opened`].
    OpenSession {
        client_id: String,
        clean_start: bool,
    },
    Append(Append),
    /// Add these (filter, entry) pairs to the subscription index for this
    /// client and report with [`Connection::handle_subscribe_result`];
    /// `packet_id` is `None` for subscriptions restored with a session.
    Subscribe {
        packet_id: Option<u16>,
        subscriptions: Vec<(String, Entry)>,
    },
    /// Remove this client's filter from the subscription index.
    Unsubscribe {
        filter: String,
    },
    /// Deliver the retained messages matching `filter`.
    SendRetained {
        filter: String,
        qos: QoS,
        subscription_identifier: Option<u32>,
    },
    /// Read the session's source topics from these cursors (see the
    /// module documentation).
    ResumeDeliveries {
        cursors: Vec<Cursor>,
    },
    /// The session refuses deliveries until the next `ResumeDeliveries`.
    PauseDeliveries,
    /// Keep this will for the client; `delay_ms` is its will delay,
    /// capped by the session expiry.
    SetWill {
        will: Will,
        delay_ms: u64,
    },
    /// Forget the client's will.
    ClearWill,
    /// Publish the client's will after `delay_ms`, unless a new
    /// connection for the client takes the session first.
    PublishWill {
        delay_ms: u64,
    },
    /// Store the session durably, replacing the previous state.
    PersistSession(SessionState),
    /// Delete the stored session.
    EndSession,
    /// Close the socket after writing what was sent; `reason_code` says
    /// why (0 for a normal close) for logs and counters.
    Close {
        reason_code: u8,
    },
}

/// Counters for the node's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    pub publishes_received: u64,
    /// Refused by the mapping or the topic limits.
    pub publishes_refused: u64,
    pub append_failures: u64,
    pub messages_sent: u64,
    /// QoS 0 deliveries dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Messages over the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// Messages that expired while queued.
    pub dropped_expired: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingConnect,
    AwaitingSession,
    Connected,
    Closed,
}

/// A message waiting in the queue, with the QoS and retain flag it will
/// be sent with.
#[derive(Debug, Clone)]
struct Queued {
    message: Message,
    subscription_identifiers: Vec<u32>,
    position: Option<LogPosition>,
}

/// An inbound QoS 1 or 2 PUBLISH whose acknowledgement waits for its
/// append (and for the ones received before it).
#[derive(Debug, Clone)]
struct PendingAck {
    token: u64,
    packet_id: u16,
    qos: QoS,
    /// `None` until the append result comes; a refusal decided without
    /// appending is `Some(Err(code))` from the start.
    result: Option<Result<(), u8>>,
}

#[derive(Debug, Clone)]
struct PendingSubscribe {
    /// Per filter of the SUBSCRIBE: the reason code decided by the
    /// session, or `None` for a filter sent to the index.
    codes: Vec<Option<u8>>,
    /// Entries sent to the index, in order, with whether retained
    /// messages go out if the index takes them.
    entries: Vec<(StoredSubscription, bool)>,
}

/// One client connection.
pub struct Connection {
    context: Arc<ServerContext>,
    connection_id: u64,
    phase: Phase,
    created_at_ms: u64,
    last_received_ms: u64,
    version: ProtocolVersion,
    client_id: String,
    clean_start: bool,
    client_id_assigned: bool,
    /// 0: no keep alive.
    keep_alive_s: u16,
    server_keep_alive_s: Option<u16>,
    session_expiry_s: u32,
    session_expiry_capped: bool,
    will: Option<Will>,
    client_receive_maximum: u16,
    client_packet_bytes_max: u32,
    client_topic_aliases_max: u16,
    inbound_aliases: HashMap<u16, String>,
    pending_acks: VecDeque<PendingAck>,
    /// Tokens of QoS 0 appends, whose results only count failures.
    pending_qos0: BTreeSet<u64>,
    awaiting_release: BTreeSet<u16>,
    next_token: u64,
    queue: VecDeque<Queued>,
    outbound: BTreeMap<u16, OutboundStage>,
    last_packet_id: u16,
    outbound_aliases: HashMap<String, u16>,
    /// Next offset per (Rill topic, partition) after what was taken.
    taken: BTreeMap<(String, u32), u64>,
    paused: bool,
    subscriptions: BTreeMap<String, StoredSubscription>,
    pending_subscribes: VecDeque<(Option<u16>, PendingSubscribe)>,
    dirty: bool,
    last_persisted_ms: u64,
    stats: ConnectionStats,
}

impl Connection {
    /// A connection accepted at `now_ms`. `connection_id` must be unique
    /// over the broker's lifetime, restarts included (for example start
    /// time and a counter): clients that send an empty client id are
    /// assigned `rill-` and its hex digits.
    pub fn new(context: Arc<ServerContext>, connection_id: u64, now_ms: u64) -> Connection {
        Connection {
            context,
            connection_id,
            phase: Phase::AwaitingConnect,
            created_at_ms: now_ms,
            last_received_ms: now_ms,
            version: ProtocolVersion::V5,
            client_id: String::new(),
            clean_start: true,
            client_id_assigned: false,
            keep_alive_s: 0,
            server_keep_alive_s: None,
            session_expiry_s: 0,
            session_expiry_capped: false,
            will: None,
            client_receive_maximum: u16::MAX,
            client_packet_bytes_max: REMAINING_BYTES_MAX + 5,
            client_topic_aliases_max: 0,
            inbound_aliases: HashMap::new(),
            pending_acks: VecDeque::new(),
            pending_qos0: BTreeSet::new(),
            awaiting_release: BTreeSet::new(),
            next_token: 1,
            queue: VecDeque::new(),
            outbound: BTreeMap::new(),
            last_packet_id: 0,
            outbound_aliases: HashMap::new(),
            taken: BTreeMap::new(),
            paused: false,
            subscriptions: BTreeMap::new(),
            pending_subscribes: VecDeque::new(),
            dirty: false,
            last_persisted_ms: now_ms,
            stats: ConnectionStats::default(),
        }
    }

    fn config(&self) -> &SessionConfig {
        &self.context.config
    }

    /// The version to decode and encode at: MQTT 5.0 until a CONNECT
    /// says otherwise.
    pub fn protocol_version(&self) -> ProtocolVersion {
        self.version
    }

    /// The client identifier (assigned or given); empty before CONNECT.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    pub fn stats(&self) -> ConnectionStats {
        self.stats
    }

    /// Whether the node should read more packets: false while as many
    /// inbound QoS 1 and 2 PUBLISHes are in flight as the session accepts.
    /// A 3.1.1 client has no Receive Maximum to respect, so the node stops
    /// reading instead.
    pub fn wants_input(&self) -> bool {
        self.phase != Phase::Closed && self.inbound_in_flight() < self.inflight_inbound_limit()
    }

    fn inflight_inbound_limit(&self) -> usize {
        usize::from(self.config().inflight_inbound_max.max(1))
    }

    fn inbound_in_flight(&self) -> usize {
        self.pending_acks.len() + self.awaiting_release.len()
    }

    fn is_persistent(&self) -> bool {
        self.session_expiry_s > 0
    }

    /// One decoded packet received at `now_ms`.
    pub fn handle_packet(&mut self, packet: Packet, now_ms: u64) -> Vec<Action> {
        match self.phase {
            Phase::Closed => return Vec::new(),
            Phase::AwaitingConnect => {
                self.last_received_ms = now_ms;
                return match packet {
                    Packet::Connect(connect) => self.handle_connect(*connect),
                    // decode_connect refuses anything else first.
                    _ => self.close(now_ms, reason::PROTOCOL_ERROR, true),
                };
            }
            Phase::AwaitingSession => {
                // The node must open the session before reading on.
                debug_assert!(false, "packet fed before handle_session_opened");
                return self.close(now_ms, reason::PROTOCOL_ERROR, true);
            }
            Phase::Connected => {}
        }
        self.last_received_ms = now_ms;
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish, now_ms),
            Packet::PubAck(response) => self.handle_puback(response.packet_id, now_ms),
            Packet::PubRec(response) => {
                self.handle_pubrec(response.packet_id, response.reason_code, now_ms)
            }
            Packet::PubRel(response) => self.handle_pubrel(response.packet_id),
            Packet::PubComp(response) => self.handle_pubcomp(response.packet_id, now_ms),
            Packet::Subscribe(subscribe) => self.handle_subscribe(subscribe, now_ms),
            Packet::Unsubscribe(unsubscribe) => self.handle_unsubscribe(unsubscribe, now_ms),
            Packet::PingReq => vec![Action::Send(Packet::PingResp)],
            Packet::Disconnect(disconnect) => self.handle_disconnect(disconnect, now_ms),
            // A second CONNECT, packets only a server sends, and AUTH
            // without an authentication method in CONNECT.
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp
            | Packet::Auth(_) => self.close(now_ms, reason::PROTOCOL_ERROR, true),
        }
    }

    /// The bytes from the client are not a packet. `connect_version` is
    /// what [`super::connect_protocol_version`] read from the buffer, used
    /// before a CONNECT is accepted to pick the CONNACK's form.
    pub fn handle_decode_error(
        &mut self,
        error: &DecodeError,
        connect_version: Option<ProtocolVersion>,
        now_ms: u64,
    ) -> Vec<Action> {
        let code = error.reason_code();
        match self.phase {
            Phase::Closed => Vec::new(),
            Phase::AwaitingConnect => match connect_version {
                Some(version) => {
                    self.version = version;
                    self.refuse_connect(code)
                }
                // 3.1 and unknown levels get the 3.1.1 refusal they
                // understand (return code 1).
                None if code == reason::UNSUPPORTED_PROTOCOL_VERSION => {
                    self.version = ProtocolVersion::V311;
                    self.refuse_connect(code)
                }
                None => self.close(now_ms, code, false),
            },
            Phase::AwaitingSession | Phase::Connected => self.close(now_ms, code, true),
        }
    }

    /// The socket closed or failed without a DISCONNECT.
    pub fn handle_connection_lost(&mut self, now_ms: u64) -> Vec<Action> {
        self.close(now_ms, reason::UNSPECIFIED_ERROR, false)
    }

    /// Another connection took this client's session (the node calls it
    /// on the old connection, before opening the new one).
    pub fn handle_takeover(&mut self, now_ms: u64) -> Vec<Action> {
        self.close(now_ms, reason::SESSION_TAKEN_OVER, true)
    }

    /// The broker is shutting down: DISCONNECT 0x8B under 5.0, the will
    /// as for a lost connection, the session kept.
    pub fn handle_shutdown(&mut self, now_ms: u64) -> Vec<Action> {
        self.close(now_ms, reason::SERVER_SHUTTING_DOWN, true)
    }

    /// Time passes: connect timeout, keep alive (1.5 times the interval
    /// without a packet), periodic persistence, queued message expiry.
    pub fn handle_tick(&mut self, now_ms: u64) -> Vec<Action> {
        match self.phase {
            Phase::AwaitingConnect => {
                if now_ms.saturating_sub(self.created_at_ms) >= self.config().connect_timeout_ms {
                    return self.close(now_ms, reason::MAXIMUM_CONNECT_TIME, false);
                }
                Vec::new()
            }
            Phase::Connected => {
                let keep_alive_ms = u64::from(self.keep_alive_s) * 1000;
                if keep_alive_ms > 0
                    && now_ms.saturating_sub(self.last_received_ms) >= keep_alive_ms * 3 / 2
                {
                    return self.close(now_ms, reason::KEEP_ALIVE_TIMEOUT, true);
                }
                let mut actions = self.pump(now_ms);
                if self.dirty
                    && self.is_persistent()
                    && now_ms.saturating_sub(self.last_persisted_ms)
                        >= self.config().session_persist_interval_ms
                {
                    actions.push(self.persist(now_ms));
                }
                actions
            }
            Phase::AwaitingSession | Phase::Closed => Vec::new(),
        }
    }

    fn handle_disconnect(&mut self, disconnect: Disconnect, now_ms: u64) -> Vec<Action> {
        if let Some(expiry_s) = disconnect.properties.session_expiry_interval_s {
            // A session that ends with its connection cannot be made to
            // outlive it at DISCONNECT (MQTT 5.0 section 3.14.2.2.2).
            if self.session_expiry_s == 0 && expiry_s != 0 {
                return self.close(now_ms, reason::PROTOCOL_ERROR, true);
            }
            self.session_expiry_s = expiry_s.min(self.config().session_expiry_max_s);
        }
        let with_will = disconnect.reason_code != reason::NORMAL_DISCONNECTION;
        let mut actions = Vec::new();
        self.finish_session(now_ms, with_will, &mut actions);
        actions.push(Action::Close {
            reason_code: disconnect.reason_code,
        });
        actions
    }

    /// Ends the connection: a DISCONNECT with `reason_code` under 5.0 when
    /// `send_disconnect` is set and the client was connected, the will
    /// published (every close but a normal DISCONNECT), the session stored
    /// or ended, then `Close`.
    fn close(&mut self, now_ms: u64, reason_code: u8, send_disconnect: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.phase == Phase::Closed {
            return actions;
        }
        if self.phase == Phase::Connected
            && send_disconnect
            && self.version == ProtocolVersion::V5
            && reason::allowed_in(super::PacketType::Disconnect, reason_code)
        {
            actions.push(Action::Send(Packet::Disconnect(Disconnect {
                reason_code,
                properties: Properties::default(),
            })));
        }
        self.finish_session(now_ms, true, &mut actions);
        actions.push(Action::Close { reason_code });
        actions
    }

    /// Will and session at the end of a connection.
    fn finish_session(&mut self, now_ms: u64, with_will: bool, actions: &mut Vec<Action>) {
        let was_connected = self.phase == Phase::Connected;
        self.phase = Phase::Closed;
        if !was_connected {
            return;
        }
        if let Some(will) = &self.will {
            if with_will {
                actions.push(Action::PublishWill {
                    delay_ms: self.will_delay_ms(will),
                });
            } else {
                actions.push(Action::ClearWill);
            }
        }
        if self.is_persistent() {
            actions.push(Action::PersistSession(self.snapshot(now_ms)));
        } else {
            actions.push(Action::EndSession);
        }
    }

    /// The will delay, capped by the session expiry: the will goes when
    /// the session ends if that comes first.
    fn will_delay_ms(&self, will: &Will) -> u64 {
        let delay_s = will.properties.will_delay_interval_s.unwrap_or(0);
        u64::from(delay_s.min(self.session_expiry_s)) * 1000
    }

    fn persist(&mut self, now_ms: u64) -> Action {
        self.dirty = false;
        self.last_persisted_ms = now_ms;
        Action::PersistSession(self.snapshot(now_ms))
    }

    /// The session as it would survive now: cursors point at the first
    /// message still queued, so a queued message is read again after a
    /// crash rather than lost.
    pub fn snapshot(&self, now_ms: u64) -> SessionState {
        let mut cursors = self.taken.clone();
        for queued in &self.queue {
            if let Some(position) = &queued.position {
                let key = (position.topic.clone(), position.partition);
                if let Some(next) = cursors.get_mut(&key) {
                    *next = (*next).min(position.offset);
                }
            }
        }
        SessionState {
            client_id: self.client_id.clone(),
            session_expiry_s: self.session_expiry_s,
            saved_at_ms: now_ms,
            subscriptions: self.subscriptions.values().cloned().collect(),
            outbound: self
                .outbound
                .iter()
                .map(|(&packet_id, stage)| OutboundMessage {
                    packet_id,
                    stage: stage.clone(),
                })
                .collect(),
            inbound_awaiting_release: self.awaiting_release.iter().copied().collect(),
            cursors: cursors
                .into_iter()
                .map(|((topic, partition), next_offset)| Cursor {
                    topic,
                    partition,
                    next_offset,
                })
                .collect(),
        }
    }

    fn take_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }
}
