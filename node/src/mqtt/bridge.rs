//! The upstream MQTT bridge, run: the `rill_edge_bridge` [`Bridge`] state
//! machine over a compio TCP connection, on a thread of its own with its
//! own runtime (on the broker's I/O driver), appending through the owning
//! shards like the MQTT listener does.
//!
//! One task runs the machine: it carries out the actions in order, then
//! waits for the next event (bytes read, the socket lost, an append
//! finished) or a tick. A reader task per connection reads only when the
//! machine has room for more ([`Bridge::wants_input`]), one read at a time
//! on a permit, so a read is never cancelled half-way (an io_uring read
//! whose future is dropped may have taken bytes already). Appends are
//! queued at their shard in PUBLISH order; their results come back as
//! events whenever they are ready, and the machine decides what to
//! acknowledge.
//!
//! While it runs, the bridge counts as one connection of the broker, so a
//! graceful shutdown waits for it: it stops reading, lets its appends
//! finish and their PUBACKs leave, sends DISCONNECT and closes, and the
//! upstream broker keeps the session for the next start.

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use compio::BufResult;
use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::TcpStream;
use futures_channel::mpsc;
use futures_util::StreamExt;
use futures_util::future::{Either, select};
use rill_edge_bridge::mqtt::bridge::{
    Action, Append, AppendError, Bridge, BridgeConfig, BridgeStats, Notice, reason_name,
};
use rill_edge_bridge::mqtt::{QoS, encode};

use super::now_ms;
use super::publish::{self, Record};
use crate::broker::Shared;
use crate::broker::topics::TopicView;
use crate::config::Config;

/// Bytes read from the upstream socket at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// The longest the bridge waits without a tick (keep alive, reconnects,
/// shutdown are checked on ticks).
const TICK_MS: u64 = 100;

/// The bridge's figures for `/metrics`.
#[derive(Debug, Default)]
pub struct BridgeMetrics {
    enabled: AtomicBool,
    connected: AtomicU64,
    connections: AtomicU64,
    reconnects: AtomicU64,
    messages_received: AtomicU64,
    messages_appended: AtomicU64,
    duplicates_skipped: AtomicU64,
    messages_unmatched: AtomicU64,
    append_failures: AtomicU64,
    filters_refused: AtomicU64,
}

impl BridgeMetrics {
    fn publish(&self, stats: BridgeStats, connected: bool) {
        let set = |counter: &AtomicU64, value: u64| counter.store(value, Ordering::Relaxed);
        set(&self.connected, u64::from(connected));
        set(&self.connections, stats.connections);
        set(&self.reconnects, stats.reconnects);
        set(&self.messages_received, stats.messages_received);
        set(&self.messages_appended, stats.messages_appended);
        set(&self.duplicates_skipped, stats.duplicates_skipped);
        set(&self.messages_unmatched, stats.messages_unmatched);
        set(&self.append_failures, stats.append_failures);
        set(&self.filters_refused, stats.filters_refused);
    }

    /// The bridge's lines of `/metrics` (none when it is off).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let metrics = [
            (
                "rill_mqtt_bridge_connected",
                "gauge",
                "1 while the upstream broker has accepted the bridge's connection.",
                &self.connected,
            ),
            (
                "rill_mqtt_bridge_connections_total",
                "counter",
                "Connections the upstream broker accepted.",
                &self.connections,
            ),
            (
                "rill_mqtt_bridge_reconnects_total",
                "counter",
                "Connection attempts after the first.",
                &self.reconnects,
            ),
            (
                "rill_mqtt_bridge_messages_received_total",
                "counter",
                "PUBLISHes received from the upstream broker, redeliveries included.",
                &self.messages_received,
            ),
            (
                "rill_mqtt_bridge_messages_appended_total",
                "counter",
                "Bridged messages appended to the log.",
                &self.messages_appended,
            ),
            (
                "rill_mqtt_bridge_duplicates_skipped_total",
                "counter",
                "Redeliveries recognised and not appended again.",
                &self.duplicates_skipped,
            ),
            (
                "rill_mqtt_bridge_messages_unmatched_total",
                "counter",
                "Bridged messages no rule takes (unmatched = refuse): dropped.",
                &self.messages_unmatched,
            ),
            (
                "rill_mqtt_bridge_append_failures_total",
                "counter",
                "Bridged messages whose append failed (QoS 1/2 come again).",
                &self.append_failures,
            ),
            (
                "rill_mqtt_bridge_filters_refused_total",
                "counter",
                "Filters the upstream broker refused in SUBACK.",
                &self.filters_refused,
            ),
        ];
        for (name, kind, help, value) in metrics {
            let value = value.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// The machine's settings when the bridge is on, with the password read:
/// done before the broker starts, so a missing file stops the start.
pub(crate) fn prepare(config: &Config) -> anyhow::Result<Option<BridgeConfig>> {
    let section = &config.mqtt.bridge;
    if !section.enabled {
        return Ok(None);
    }
    let password = section.read_password().with_context(|| {
        format!(
            "reading mqtt.bridge.password_file {}",
            section.password_file
        )
    })?;
    let packet_bytes_max = config
        .mqtt
        .effective_packet_bytes_max(config.topic_defaults.batch_bytes_max);
    Ok(Some(section.bridge_config(password, packet_bytes_max)))
}

/// Starts the bridge's thread.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    config: BridgeConfig,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    shared.mqtt.bridge.enabled.store(true, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("rill-mqtt-bridge".into())
        .spawn(move || {
            let mut selection = shared.driver.clone();
            match crate::io::build_runtime(&mut selection) {
                Ok(runtime) => runtime.block_on(async move {
                    crate::io::home::install_relay();
                    crate::io::home::homed(run(shared, config)).await
                }),
                Err(error) => {
                    tracing::error!(%error, "the MQTT bridge could not start its runtime")
                }
            }
        })
        .context("starting the MQTT bridge thread")
}

/// What the reader tasks and append tasks report.
enum Event {
    Bytes {
        connection: u64,
        bytes: Vec<u8>,
    },
    Lost {
        connection: u64,
        error: String,
    },
    Appended {
        token: u64,
        result: Result<(), AppendError>,
    },
}

/// The node's side of the machine: the socket, its reader, the appends.
struct Link {
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    socket: Option<TcpStream>,
    /// Counts connections; events of an older one are stale.
    connection: u64,
    permits: Option<mpsc::UnboundedSender<()>>,
    read_outstanding: bool,
    view: TopicView,
    next_partition: Cell<u32>,
    connect_timeout: Duration,
    address: String,
}

async fn run(shared: Arc<Shared>, config: BridgeConfig) {
    // Counted, so that a graceful shutdown waits for the bridge's appends.
    let counted = shared.try_add_connection();
    let seed = seed(&config.client_id);
    let mapping = shared.mqtt.context.mapping.clone();
    let (events_sender, mut events) = mpsc::unbounded();
    let mut link = Link {
        view: shared.topics.snapshot(),
        shared: shared.clone(),
        events: events_sender,
        socket: None,
        connection: 0,
        permits: None,
        read_outstanding: false,
        next_partition: Cell::new(0),
        connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        address: config.address.clone(),
    };
    tracing::info!(
        upstream = %config.address,
        client_id = %config.client_id,
        version = %config.protocol_version,
        filters = ?config.filters,
        "MQTT bridge starting"
    );
    let mut machine = Bridge::new(config, mapping, seed);
    let mut actions = machine.start(now_ms());
    let mut shutdown_seen = false;
    loop {
        link.carry_out(&mut machine, actions).await;
        shared
            .mqtt
            .bridge
            .publish(machine.stats(), machine.is_connected());
        if machine.is_stopped() {
            break;
        }
        link.grant_read(machine.wants_input());
        let tick = Box::pin(compio::time::sleep(Duration::from_millis(TICK_MS)));
        let event = match select(events.next(), tick).await {
            Either::Left((event, _)) => event,
            Either::Right(_) => None,
        };
        let now = now_ms();
        actions = match event {
            Some(event) => link.on_event(&mut machine, event, now),
            None => Vec::new(),
        };
        if shared.is_shutting_down() && !shutdown_seen {
            shutdown_seen = true;
            actions.extend(machine.handle_shutdown(now));
        }
        actions.extend(machine.handle_tick(now));
    }
    link.close_socket();
    shared.mqtt.bridge.publish(machine.stats(), false);
    tracing::info!("MQTT bridge stopped");
    if counted {
        shared.remove_connection();
    }
}

/// Differs between boxes and starts, so bridges that lost the same broker
/// do not retry in step.
fn seed(client_id: &str) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ u64::from(crc32fast::hash(client_id.as_bytes()))
}

impl Link {
    /// Carries out `actions` and whatever they lead to, in order.
    async fn carry_out(&mut self, machine: &mut Bridge, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        let mut out = Vec::new();
        loop {
            while let Some(action) = queue.pop_front() {
                match action {
                    Action::Connect { address } => {
                        let more = self.connect(machine, &address).await;
                        queue.extend(more);
                    }
                    Action::Send(packet) => {
                        if let Err(error) = encode(&packet, machine.protocol_version(), &mut out) {
                            tracing::error!(%error, packet = %packet.packet_type(), "MQTT bridge packet not encodable");
                        }
                    }
                    Action::Append(append) => self.append(append).await,
                    Action::Close => {
                        let _ = self.write(&mut out).await;
                        self.close_socket();
                    }
                    // The loop ticks often enough to be on time.
                    Action::ScheduleReconnect { .. } => {}
                    Action::Notice(notice) => self.log(notice),
                }
            }
            match self.write(&mut out).await {
                Ok(()) => return,
                Err(error) => {
                    self.close_socket();
                    queue.extend(machine.handle_connection_lost(&error, now_ms()));
                }
            }
        }
    }

    async fn connect(&mut self, machine: &mut Bridge, address: &str) -> Vec<Action> {
        let connected =
            compio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await;
        let now = now_ms();
        match connected {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                self.attach(stream);
                machine.handle_connected(now)
            }
            Ok(Err(error)) => machine.handle_connect_failed(&error.to_string(), now),
            Err(_) => machine.handle_connect_failed(
                &format!(
                    "no TCP connection within {} ms",
                    self.connect_timeout.as_millis()
                ),
                now,
            ),
        }
    }

    /// A new connection: its reader task waits for permits.
    fn attach(&mut self, stream: TcpStream) {
        self.close_socket();
        self.connection += 1;
        let (permits, granted) = mpsc::unbounded();
        crate::io::home::spawn(read_loop(
            stream.clone(),
            granted,
            self.events.clone(),
            self.connection,
        ))
        .detach();
        self.socket = Some(stream);
        self.permits = Some(permits);
        self.read_outstanding = false;
    }

    /// Lets the reader read once more when the machine wants input.
    fn grant_read(&mut self, wants_input: bool) {
        if !wants_input || self.read_outstanding {
            return;
        }
        if let Some(permits) = &self.permits
            && permits.unbounded_send(()).is_ok()
        {
            self.read_outstanding = true;
        }
    }

    /// Shuts the socket down (which ends a read in progress) and forgets
    /// it; later events of it are stale.
    fn close_socket(&mut self) {
        if let Some(socket) = self.socket.take() {
            // SAFETY: shutdown(2) on a descriptor the stream still owns.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
            self.connection += 1;
        }
        self.permits = None;
        self.read_outstanding = false;
    }

    async fn write(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if out.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(out);
        let Some(socket) = self.socket.as_mut() else {
            return Ok(());
        };
        // A broker that stops reading is a lost connection.
        match compio::time::timeout(self.connect_timeout, socket.write_all(bytes)).await {
            Ok(BufResult(Ok(()), _)) => Ok(()),
            Ok(BufResult(Err(error), _)) => Err(format!("write failed: {error}")),
            Err(_) => Err(format!(
                "the upstream broker took nothing for {} ms",
                self.connect_timeout.as_millis()
            )),
        }
    }

    fn on_event(&mut self, machine: &mut Bridge, event: Event, now: u64) -> Vec<Action> {
        match event {
            Event::Bytes { connection, bytes } if connection == self.connection => {
                self.read_outstanding = false;
                machine.handle_bytes(&bytes, now)
            }
            Event::Lost { connection, error } if connection == self.connection => {
                self.close_socket();
                machine.handle_connection_lost(&error, now)
            }
            Event::Appended { token, result } => machine.handle_append_result(token, result, now),
            // Of a connection that is gone.
            Event::Bytes { .. } | Event::Lost { .. } => Vec::new(),
        }
    }

    /// Queues the append at its shard now (PUBLISH order per partition);
    /// the result comes back as an event.
    async fn append(&mut self, append: Append) {
        let record = Record {
            topic: &append.topic,
            key: append.key.as_deref(),
            headers: &append.headers,
            value: &append.value,
            durable: append.durable,
        };
        let pending =
            publish::dispatch(&self.shared, &mut self.view, &self.next_partition, &record).await;
        let events = self.events.clone();
        let token = append.token;
        crate::io::home::spawn(async move {
            let result = publish::finish(pending).await;
            let _ = events.unbounded_send(Event::Appended { token, result });
        })
        .detach();
    }

    fn log(&self, notice: Notice) {
        let upstream = &self.address;
        match notice {
            Notice::Connected { session_present } => {
                tracing::info!(%upstream, session_present, "MQTT bridge connected");
            }
            Notice::Subscribed { filter, granted } => {
                if granted == QoS::AtMostOnce {
                    tracing::warn!(%upstream, filter, "the upstream broker granted QoS 0 for this bridge filter: its messages can be lost in an outage");
                } else {
                    tracing::info!(%upstream, filter, granted = granted as u8, "MQTT bridge subscribed");
                }
            }
            Notice::FilterRefused {
                filter,
                reason_code,
            } => {
                tracing::error!(
                    %upstream,
                    filter,
                    reason_code = format!("{reason_code:#04x}"),
                    reason = reason_name(reason_code),
                    "the upstream broker refused a bridge filter: nothing it matches will arrive"
                );
            }
            Notice::Disconnected {
                reason,
                reconnect_in_ms,
            } => match reconnect_in_ms {
                Some(delay_ms) => tracing::warn!(
                    %upstream,
                    %reason,
                    reconnect_in_ms = delay_ms,
                    "MQTT bridge disconnected"
                ),
                None => tracing::info!(%upstream, %reason, "MQTT bridge disconnected"),
            },
        }
    }
}

/// Reads one chunk per permit and reports it.
async fn read_loop(
    mut stream: TcpStream,
    mut permits: mpsc::UnboundedReceiver<()>,
    events: mpsc::UnboundedSender<Event>,
    connection: u64,
) {
    while permits.next().await.is_some() {
        let BufResult(result, bytes) = stream.read(Vec::with_capacity(READ_CHUNK_BYTES)).await;
        let event = match result {
            Ok(0) => Event::Lost {
                connection,
                error: "closed by the upstream broker".into(),
            },
            Ok(_) => Event::Bytes { connection, bytes },
            Err(error) => Event::Lost {
                connection,
                error: error.to_string(),
            },
        };
        let lost = matches!(event, Event::Lost { .. });
        if events.unbounded_send(event).is_err() || lost {
            return;
        }
    }
}
