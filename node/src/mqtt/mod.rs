//! The MQTT listener: the `rill-edge-bridge` state machines run on the
//! broker's shards, with the broker-wide parts they leave to the node.
//!
//! - `connection`: one client connection, plugged into the generic
//!   connection loop (`FrameHandler`: reader, buffer budget, TLS, writer).
//!   Packets go to the session state machine ([`Connection`]) behind a
//!   mutex; the actions it gives back are carried out in order by one
//!   executor task per connection (`executor`).
//! - [`MqttState`] (in `Shared`): the subscription index, the retained
//!   store, live connections and stored sessions by client identifier
//!   (takeover), and wills waiting for their delay, each behind a std
//!   mutex held only for short, await-free sections. Lock order, where two
//!   are held: sessions, then a connection's machine, then the index or
//!   the wills; a store directory's lock before the sessions or retained
//!   lock it reads.
//! - `store`: sessions and retained messages under `DATA_DIR/mqtt/`.
//! - `publish`: records from PUBLISHes and wills, appended through the
//!   owning shard.
//! - `share`: shared subscriptions, one reader per group and filter that
//!   offers each record to the group's members in turn.
//! - `delivery`: how records reach subscribers. Each connected session
//!   reads the partitions of its subscriptions' source topics itself, with
//!   the same fetch and long poll (`WaitForData`) a Kafka consumer uses,
//!   and offers each record to its session in offset order. Live delivery
//!   and catching up after a reconnect, a restart or a full queue are one
//!   path, so no record can slip between a catch-up and a live feed, and
//!   records from any protocol (MQTT, native, Kafka) are delivered alike.
//!   The price is one read of a partition per subscribed session, which
//!   suits an edge box's handful of subscribers.
//! - `bridge`: the upstream MQTT bridge (Rill as a client of another
//!   broker), on a thread of its own, appending through the same mapping.

pub(crate) mod bridge;
mod connection;
mod delivery;
mod executor;
mod publish;
mod share;
mod store;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use rill_edge_bridge::mqtt::auth::{AcceptAll, Authenticator, PasswordFile};
use rill_edge_bridge::mqtt::retained::{self, RetainedLimits, RetainedStore};
use rill_edge_bridge::mqtt::session::{Action, ServerContext, SessionState};
use rill_edge_bridge::mqtt::subscriptions::{SubscriptionIndex, SubscriptionLimits};
use rill_edge_bridge::mqtt::{Message, Will};

use crate::broker::Shared;
use crate::config::MqttSection;
pub(crate) use connection::MqttConnection;
pub(crate) use connection::{Client, Work};

/// Retained entries larger than this are refused when read back.
fn retained_entry_bytes_max(config: &MqttSection) -> usize {
    config.packet_bytes_max as usize * 2 + 4096
}

/// Stored sessions larger than this are refused when read back: every
/// in-flight message at the largest packet size, and the rest.
fn session_bytes_max(config: &MqttSection) -> usize {
    (config.packet_bytes_max as usize + 1024) * (usize::from(config.inflight_outbound_max) + 1)
        + config.session_subscriptions_max as usize * 1024
        + (16 << 20)
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds since the Unix epoch, as the session machines count time.
pub(crate) fn now_ms() -> u64 {
    crate::broker::now_ms().max(0) as u64
}

/// Live connections and stored sessions by client identifier.
#[derive(Default)]
pub(crate) struct Sessions {
    pub live: HashMap<String, Arc<Client>>,
    pub stored: HashMap<String, SessionState>,
}

/// A client's will: kept while it is connected, waiting for its delay
/// once it is not.
pub(crate) struct PendingWill {
    pub connection_id: u64,
    pub will: Will,
    /// When it is published; `None` while its connection is open.
    pub publish_at_ms: Option<u64>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub connections_accepted: AtomicU64,
    pub publishes_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub append_failures: AtomicU64,
    pub retained_refused: AtomicU64,
    pub wills_published: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub sessions_refused: AtomicU64,
}

/// The MQTT listener's broker-wide state.
pub struct MqttState {
    pub(crate) context: Arc<ServerContext>,
    pub(crate) index: Mutex<SubscriptionIndex>,
    pub(crate) retained: Mutex<RetainedStore>,
    pub(crate) sessions: Mutex<Sessions>,
    pub(crate) wills: Mutex<HashMap<String, PendingWill>>,
    /// Shared subscriptions being read, by (group, filter), with the
    /// reader's identity.
    pub(crate) share_groups: Mutex<HashMap<(String, String), u64>>,
    session_files: store::Directory,
    retained_files: store::Directory,
    next_connection: AtomicU64,
    /// `mqtt.stored_sessions_max`.
    stored_sessions_max: usize,
    pub stats: MqttStats,
    /// The upstream bridge's figures (`bridge`).
    pub bridge: bridge::BridgeMetrics,
}

impl fmt::Debug for MqttState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sessions = lock(&self.sessions);
        formatter
            .debug_struct("MqttState")
            .field("live", &sessions.live.len())
            .field("stored", &sessions.stored.len())
            .field("retained", &lock(&self.retained).len())
            .field("subscriptions", &lock(&self.index).len())
            .finish()
    }
}

impl MqttState {
    /// Builds the state from the configuration and loads what is stored
    /// under `data_dir/mqtt/`.
    pub fn open(
        data_dir: &Path,
        config: &MqttSection,
        batch_bytes_max: u64,
    ) -> anyhow::Result<MqttState> {
        let mapping = config
            .mapping()
            .map_err(|error| anyhow::anyhow!("mqtt.rules: {error}"))?;
        let authenticator: Box<dyn Authenticator> = if config.users_file.is_empty() {
            Box::new(AcceptAll)
        } else {
            let text = std::fs::read_to_string(&config.users_file)
                .with_context(|| format!("reading mqtt.users_file {}", config.users_file))?;
            let users = PasswordFile::parse(&text).map_err(|error| {
                anyhow::anyhow!("mqtt.users_file {}: {error}", config.users_file)
            })?;
            tracing::info!(users = users.len(), file = %config.users_file, "MQTT users loaded");
            Box::new(users)
        };
        let session_config = config.session_config(batch_bytes_max);
        if session_config.packet_bytes_max < config.packet_bytes_max {
            tracing::warn!(
                packet_bytes_max = session_config.packet_bytes_max,
                configured = config.packet_bytes_max,
                batch_bytes_max,
                "mqtt.packet_bytes_max lowered so that a record of the largest packet fits topic_defaults.batch_bytes_max"
            );
        }
        let context = Arc::new(ServerContext {
            config: session_config,
            mapping,
            authenticator,
        });
        let root = data_dir.join("mqtt");
        let state_bytes_max = session_bytes_max(config);
        let (session_files, stored) =
            store::Directory::open(root.join("sessions"), ".session", "session", |bytes| {
                let state = SessionState::decode(bytes, state_bytes_max)
                    .map_err(|error| error.to_string())?;
                Ok((state.client_id.clone(), state))
            })?;
        let entry_bytes_max = retained_entry_bytes_max(config);
        let (retained_files, messages) = store::Directory::open(
            root.join("retained"),
            ".retained",
            "retained message",
            |bytes| {
                let message = retained::decode_entry(bytes, entry_bytes_max)
                    .map_err(|error| error.to_string())?;
                Ok((message.topic.clone(), message))
            },
        )?;
        let mut retained = RetainedStore::new(RetainedLimits {
            retained_messages_max: config.retained_messages_max as usize,
            retained_bytes_max: config.retained_bytes_max as usize,
        });
        for (topic, message) in messages {
            if let Err(error) = retained.set(message) {
                tracing::warn!(topic, %error, "stored retained message dropped: over the retained limits");
            }
        }
        if !stored.is_empty() || !retained.is_empty() {
            tracing::info!(
                sessions = stored.len(),
                retained = retained.len(),
                "MQTT state loaded"
            );
        }
        let started_ms = now_ms();
        Ok(MqttState {
            context,
            index: Mutex::new(SubscriptionIndex::new(SubscriptionLimits {
                subscriptions_max: config.subscriptions_max as usize,
            })),
            retained: Mutex::new(retained),
            sessions: Mutex::new(Sessions {
                live: HashMap::new(),
                stored: stored.into_iter().collect(),
            }),
            wills: Mutex::new(HashMap::new()),
            share_groups: Mutex::new(HashMap::new()),
            session_files,
            retained_files,
            // Unique across restarts: the start time, then a counter.
            next_connection: AtomicU64::new(started_ms.wrapping_mul(1 << 20)),
            stored_sessions_max: config.stored_sessions_max as usize,
            stats: MqttStats::default(),
            bridge: bridge::BridgeMetrics::default(),
        })
    }

    /// The MQTT lines of `/metrics` (Prometheus text format).
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let (live, stored) = {
            let sessions = lock(&self.sessions);
            (sessions.live.len(), sessions.stored.len())
        };
        let gauges = [
            (
                "rill_mqtt_sessions_connected",
                "MQTT sessions with a connection.",
                live,
            ),
            (
                "rill_mqtt_sessions_stored",
                "MQTT sessions stored (persistent).",
                stored,
            ),
            (
                "rill_mqtt_subscriptions",
                "Subscriptions of connected MQTT sessions.",
                lock(&self.index).len(),
            ),
            (
                "rill_mqtt_retained_messages",
                "Retained MQTT messages.",
                lock(&self.retained).len(),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let stats = &self.stats;
        let counters = [
            (
                "rill_mqtt_connections_accepted_total",
                "MQTT connections accepted.",
                &stats.connections_accepted,
            ),
            (
                "rill_mqtt_publishes_received_total",
                "MQTT PUBLISHes appended or tried.",
                &stats.publishes_received,
            ),
            (
                "rill_mqtt_packets_sent_total",
                "MQTT packets sent.",
                &stats.messages_sent,
            ),
            (
                "rill_mqtt_append_failures_total",
                "MQTT PUBLISHes whose append failed.",
                &stats.append_failures,
            ),
            (
                "rill_mqtt_retained_refused_total",
                "Retained messages not kept (limits).",
                &stats.retained_refused,
            ),
            (
                "rill_mqtt_wills_published_total",
                "MQTT wills published.",
                &stats.wills_published,
            ),
            (
                "rill_mqtt_sessions_expired_total",
                "Stored MQTT sessions that expired.",
                &stats.sessions_expired,
            ),
            (
                "rill_mqtt_sessions_refused_total",
                "Persistent MQTT sessions not kept: mqtt.stored_sessions_max was reached.",
                &stats.sessions_refused,
            ),
        ];
        for (name, help, counter) in counters {
            let value = counter.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        self.bridge.render(out);
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `client` is the live connection of its client identifier.
    pub(crate) fn is_owner(&self, client_id: &str, client: &Arc<Client>) -> bool {
        lock(&self.sessions)
            .live
            .get(client_id)
            .is_some_and(|live| Arc::ptr_eq(live, client))
    }

    /// Keeps `client_id`'s session unless that would pass
    /// `mqtt.stored_sessions_max` (a session already kept is always
    /// updated); `false` when it was not kept. Memory and the session
    /// directory stay bounded however many client ids come and go.
    pub(crate) fn store_session(
        &self,
        sessions: &mut Sessions,
        client_id: &str,
        state: SessionState,
    ) -> bool {
        if let Some(kept) = sessions.stored.get_mut(client_id) {
            *kept = state;
            return true;
        }
        if sessions.stored.len() >= self.stored_sessions_max {
            let refused = self.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
            if refused.is_power_of_two() || refused == 0 {
                tracing::warn!(
                    client_id,
                    stored = sessions.stored.len(),
                    refused = refused + 1,
                    "mqtt.stored_sessions_max reached: this client's session is not kept"
                );
            }
            return false;
        }
        sessions.stored.insert(client_id.to_owned(), state);
        true
    }

    /// Writes (or deletes) `client_id`'s session file to match memory.
    /// Blocking: run it off the shard's thread.
    pub(crate) fn sync_session(&self, client_id: &str) -> std::io::Result<()> {
        self.session_files.sync(client_id, || {
            lock(&self.sessions)
                .stored
                .get(client_id)
                .map(SessionState::encode)
        })
    }

    /// Writes (or deletes) `topic`'s retained file to match memory.
    /// Blocking: run it off the shard's thread.
    pub(crate) fn sync_retained(&self, topic: &str) -> std::io::Result<()> {
        self.retained_files.sync(topic, || {
            lock(&self.retained).get(topic).map(retained::encode_entry)
        })
    }

    /// Applies what a connection's session asks of the broker-wide state
    /// (session store, wills, index) for `client_id`, on behalf of the
    /// connection `connection_id`. Used where those effects must land at
    /// once (a takeover); returns the actions left for the connection's
    /// own executor, and whether a will is due now.
    fn apply_now(
        &self,
        sessions: &mut Sessions,
        client_id: &str,
        connection_id: u64,
        actions: Vec<Action>,
        now: u64,
    ) -> (Vec<Action>, Option<Will>) {
        let mut left = Vec::new();
        let mut due = None;
        for action in actions {
            match action {
                Action::PersistSession(state) => {
                    self.store_session(sessions, client_id, state);
                }
                Action::EndSession => {
                    sessions.stored.remove(client_id);
                }
                Action::PublishWill { delay_ms } => {
                    due = self.schedule_will(client_id, connection_id, delay_ms, now);
                }
                Action::ClearWill => {
                    let mut wills = lock(&self.wills);
                    if wills
                        .get(client_id)
                        .is_some_and(|will| will.connection_id == connection_id)
                    {
                        wills.remove(client_id);
                    }
                }
                Action::Close { reason_code } => {
                    lock(&self.index).remove_client(client_id);
                    left.push(Action::Close { reason_code });
                }
                other => left.push(other),
            }
        }
        (left, due)
    }

    /// Arms the will of `connection_id` to go after `delay_ms`; returns it
    /// when it is due at once.
    pub(crate) fn schedule_will(
        &self,
        client_id: &str,
        connection_id: u64,
        delay_ms: u64,
        now: u64,
    ) -> Option<Will> {
        let mut wills = lock(&self.wills);
        let entry = wills.get_mut(client_id)?;
        if entry.connection_id != connection_id || entry.publish_at_ms.is_some() {
            return None;
        }
        if delay_ms == 0 {
            return wills.remove(client_id).map(|pending| pending.will);
        }
        entry.publish_at_ms = Some(now.saturating_add(delay_ms));
        None
    }

    /// Opens `client_id`'s session for `client` (see the contract in
    /// `rill_edge_bridge::mqtt::session`): takes over a live connection,
    /// settles a waiting will, and returns the stored session to resume
    /// (none on a clean start or when it expired), with the wills to
    /// publish now.
    pub(crate) fn open_session(
        &self,
        client: &Arc<Client>,
        client_id: &str,
        clean_start: bool,
        now: u64,
    ) -> (Option<SessionState>, Vec<(String, Will)>) {
        let mut due = Vec::new();
        let mut sessions = lock(&self.sessions);
        if let Some(old) = sessions.live.get(client_id).cloned()
            && !Arc::ptr_eq(&old, client)
        {
            tracing::debug!(client_id, "session taken over by a new connection");
            old.step_with(|machine, push| {
                let actions = machine.handle_takeover(now);
                let (left, will) =
                    self.apply_now(&mut sessions, client_id, old.connection_id, actions, now);
                for action in left {
                    push(action);
                }
                due.extend(will.map(|will| (client_id.to_owned(), will)));
            });
        }
        sessions.live.insert(client_id.to_owned(), client.clone());
        {
            let mut wills = lock(&self.wills);
            if let Some(pending) = wills.remove(client_id) {
                match pending.publish_at_ms {
                    // The old session ends now, and its will goes with it.
                    Some(_) if clean_start => due.push((client_id.to_owned(), pending.will)),
                    // The session goes on: its will is cancelled.
                    Some(_) => {}
                    // Armed by a connection that is gone (its close is
                    // still on its way): the takeover above settled it.
                    None => {}
                }
            }
        }
        let expired = sessions
            .stored
            .get(client_id)
            .and_then(SessionState::expires_at_ms)
            .is_some_and(|at| at <= now);
        let stored = if clean_start || expired {
            sessions.stored.remove(client_id);
            None
        } else {
            sessions.stored.get(client_id).cloned()
        };
        (stored, due)
    }

    /// Every message retained for `filter`, cloned out of the lock.
    pub(crate) fn retained_for(&self, filter: &str, now: u64) -> Vec<Message> {
        lock(&self.retained)
            .lookup(filter, now)
            .into_iter()
            .cloned()
            .collect()
    }

    /// Wills whose delay is over, and stored sessions that expired
    /// (removed from memory; their files are the caller's to sync).
    pub(crate) fn due(&self, now: u64) -> (Vec<(String, Will)>, Vec<String>) {
        let wills = {
            let mut wills = lock(&self.wills);
            let due: Vec<String> = wills
                .iter()
                .filter(|(_, will)| will.publish_at_ms.is_some_and(|at| at <= now))
                .map(|(client_id, _)| client_id.clone())
                .collect();
            due.into_iter()
                .filter_map(|client_id| {
                    let will = wills.remove(&client_id)?.will;
                    Some((client_id, will))
                })
                .collect()
        };
        let expired = {
            let mut sessions = lock(&self.sessions);
            let Sessions { live, stored } = &mut *sessions;
            let expired: Vec<String> = stored
                .iter()
                .filter(|(client_id, state)| {
                    !live.contains_key(*client_id)
                        && state.expires_at_ms().is_some_and(|at| at <= now)
                })
                .map(|(client_id, _)| client_id.clone())
                .collect();
            for client_id in &expired {
                stored.remove(client_id);
            }
            expired
        };
        (wills, expired)
    }
}

/// What runs MQTT on a shard: the broker-wide tick on shard 0 (wills
/// after their delay, expired sessions and retained messages).
pub(crate) async fn tick_loop(shared: Arc<Shared>) {
    const TICK_MS: u64 = 250;
    while !shared.is_shutting_down() {
        compio::time::sleep(std::time::Duration::from_millis(TICK_MS)).await;
        let state = &shared.mqtt;
        let now = now_ms();
        let (wills, expired) = state.due(now);
        for (client_id, will) in wills {
            crate::io::home::spawn(publish::publish_will(shared.clone(), client_id, will)).detach();
        }
        let expired_retained = lock(&state.retained).remove_expired(now);
        if expired.is_empty() && expired_retained.is_empty() {
            continue;
        }
        state
            .stats
            .sessions_expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        let task_shared = shared.clone();
        let _ = compio::runtime::spawn_blocking(move || {
            let state = &task_shared.mqtt;
            for client_id in &expired {
                tracing::debug!(client_id, "MQTT session expired");
                if let Err(error) = state.sync_session(client_id) {
                    tracing::warn!(client_id, %error, "deleting an expired MQTT session failed");
                }
            }
            for topic in &expired_retained {
                if let Err(error) = state.sync_retained(topic) {
                    tracing::warn!(topic, %error, "deleting an expired retained message failed");
                }
            }
        })
        .await;
    }
}

/// Creates the Rill topics the mapping writes to, so that subscribers find
/// them from the start (when `topics.auto_create` allows it).
pub(crate) async fn ensure_mapping_topics(shared: Arc<Shared>) {
    let mapping = &shared.mqtt.context.mapping;
    let mut topics: Vec<String> = mapping
        .rules()
        .iter()
        .map(|rule| rule.topic.clone())
        .collect();
    if let rill_edge_bridge::mqtt::mapping::Unmatched::Topic(topic) = mapping.unmatched() {
        topics.push(topic.clone());
    }
    topics.sort();
    topics.dedup();
    for topic in topics {
        if let Err(error) = crate::broker::ensure_topic(&shared, &topic).await {
            tracing::warn!(topic, error = %error.message, "the MQTT mapping's topic is not available yet");
        }
    }
}
