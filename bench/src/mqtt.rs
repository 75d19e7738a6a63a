//! An MQTT load generator: many clients over plain TCP, each publishing
//! QoS 1 messages with a window of unacknowledged ones, speaking MQTT 3.1.1
//! through Rill's own codec (`rill_edge_bridge::mqtt`) on compio, like the
//! rest of the harness. The same generator drives Rill and Mosquitto, so
//! both brokers see the same load from the same code.
//!
//! A phase spreads its clients over a few generator threads, each with its
//! own compio runtime, connects them all, then starts them together. Each
//! client has a writer task (sends PUBLISHes while its window has room) and
//! a reader task (takes PUBACKs and frees their packet ids). Two paces:
//!
//! - unbounded: every client keeps its window full; the figure is the
//!   PUBACKs that arrive within the measured window, per second;
//! - a fixed total rate, spread evenly over the clients: every message has
//!   an intended send time on a fixed schedule, and its PUBACK latency runs
//!   from that time, so a broker that stalls cannot hide the stall behind a
//!   client that waited for it (no coordinated omission). How late the
//!   generator itself sent is measured too, to tell its delay from the
//!   broker's.
//!
//! A warm-up before the measured window is sent but not counted. After the
//! window the clients stop sending and wait (bounded) for every PUBACK, so
//! a broker that loses a message fails the phase instead of looking fast.
//! An optional subscriber takes everything on `bench/#` at QoS 0 through a
//! blocking socket on a thread of its own.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{Read, Write};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use compio::BufResult;
use compio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use compio::net::TcpStream;
use hdrhistogram::Histogram;
use rill_edge_bridge::mqtt::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe, Subscription,
    SubscriptionOptions, decode, encode,
};

use crate::broker::{own_cpu_seconds, process_cpu_seconds};

/// The largest packet the generator accepts from a broker.
const PACKET_BYTES_MAX: u32 = 1 << 20;
/// Bytes a reader asks the socket for at least, per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// How long connecting one client (TCP, CONNECT, CONNACK) may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(15);
/// The filter the subscriber takes everything with.
pub const SUBSCRIBER_FILTER: &str = "bench/#";
/// The longest latency a histogram holds: a minute, in microseconds.
const LATENCY_MAX_US: u64 = 60_000_000;

/// The shape of the load: the same for every broker of a run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    /// QoS 1 PUBLISHes each client keeps unacknowledged at most.
    pub window_messages: u16,
    pub payload_bytes: usize,
    /// Compio runtimes (threads) the clients are spread over.
    pub generator_threads: usize,
}

/// How fast the clients publish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Every client keeps its window full.
    Unbounded,
    /// This many messages per second over all clients together.
    MessagesPerSecond(f64),
}

/// How long a phase lasts.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Sent but not counted: connections and the broker settle.
    pub warm_up: Duration,
    /// The window the figures come from.
    pub measured: Duration,
    /// After the last send, how long the broker has to acknowledge the rest.
    pub drain_max: Duration,
}

/// What the subscriber took, when there was one.
#[derive(Debug, Clone, Copy)]
pub struct SubscriberFigures {
    /// PUBLISHes received over the whole phase.
    pub received: u64,
    /// How long after the last PUBACK the subscriber stopped: when it had
    /// everything, or when nothing more came for a while.
    pub after_last_ack: Duration,
}

/// The figures of one phase against one broker.
pub struct Phase {
    /// PUBACKs that arrived within the measured window.
    pub measured_acknowledged: u64,
    pub measured: Duration,
    /// PUBACKs over the whole phase (warm-up and drain included): every
    /// message published, since the phase fails when one is missing.
    pub acknowledged_total: u64,
    /// PUBACK latency in µs of the messages whose intended send time fell in
    /// the measured window, from that time.
    pub latency: Histogram<u64>,
    /// How late the generator sent those messages, in µs (rate pace only).
    pub send_lag: Histogram<u64>,
    /// CPU the broker process used within the measured window.
    pub broker_cpu_seconds: f64,
    /// CPU this process (generator and subscriber) used within the window.
    pub generator_cpu_seconds: f64,
    pub subscriber: Option<SubscriberFigures>,
}

impl Phase {
    pub fn messages_per_second(&self) -> f64 {
        self.measured_acknowledged as f64 / self.measured.as_secs_f64()
    }

    fn per_million(&self, cpu_seconds: f64) -> f64 {
        cpu_seconds / (self.measured_acknowledged.max(1) as f64 / 1e6)
    }

    pub fn broker_cpu_seconds_per_million(&self) -> f64 {
        self.per_million(self.broker_cpu_seconds)
    }

    pub fn generator_cpu_seconds_per_million(&self) -> f64 {
        self.per_million(self.generator_cpu_seconds)
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)?)
}

fn micros(duration: Duration) -> u64 {
    (duration.as_micros() as u64).clamp(1, LATENCY_MAX_US)
}

/// One PUBLISH encoded once by the codec; each send copies it and writes
/// the packet id in place, so the generator spends its time on the
/// broker, not on encoding.
pub struct PublishTemplate {
    bytes: Vec<u8>,
    packet_id_at: usize,
}

impl PublishTemplate {
    pub fn new(topic: &str, payload: &[u8]) -> anyhow::Result<Self> {
        let encoded = |packet_id: u16| -> anyhow::Result<Vec<u8>> {
            let mut out = Vec::new();
            encode(
                &Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: topic.into(),
                    packet_id,
                    payload: Bytes::copy_from_slice(payload),
                    properties: Properties::default(),
                }),
                ProtocolVersion::V311,
                &mut out,
            )?;
            Ok(out)
        };
        // Two encodings that differ only in the packet id show where it is.
        let first = encoded(0x0102)?;
        let second = encoded(0x0304)?;
        let packet_id_at = first
            .iter()
            .zip(&second)
            .position(|(a, b)| a != b)
            .context("two PUBLISHes with different packet ids encoded the same")?;
        anyhow::ensure!(
            first.len() == second.len()
                && first[packet_id_at..packet_id_at + 2] == [1, 2]
                && second[packet_id_at..packet_id_at + 2] == [3, 4]
                && first[packet_id_at + 2..] == second[packet_id_at + 2..],
            "the packet id of an encoded PUBLISH is not where expected"
        );
        Ok(Self {
            bytes: first,
            packet_id_at,
        })
    }

    pub fn append(&self, packet_id: u16, out: &mut Vec<u8>) {
        let start = out.len() + self.packet_id_at;
        out.extend_from_slice(&self.bytes);
        out[start..start + 2].copy_from_slice(&packet_id.to_be_bytes());
    }
}

fn connect_packet(client_id: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(
        &Packet::Connect(Box::new(Connect {
            protocol_version: ProtocolVersion::V311,
            clean_start: true,
            // No keep-alive: a phase is shorter than any timeout would be,
            // and a PINGREQ would be one more thing to measure.
            keep_alive_s: 0,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })),
        ProtocolVersion::V311,
        &mut out,
    )?;
    Ok(out)
}

fn disconnect_packet() -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(
        &Packet::Disconnect(rill_edge_bridge::mqtt::Disconnect {
            reason_code: 0,
            properties: Properties::default(),
        }),
        ProtocolVersion::V311,
        &mut out,
    )?;
    Ok(out)
}

/// A wake-up for one waiting task on one thread.
#[derive(Default)]
struct Signal {
    waker: Cell<Option<Waker>>,
}

impl Signal {
    fn notify(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    async fn until(&self, ready: impl Fn() -> bool) {
        poll_fn(|context| {
            if ready() {
                Poll::Ready(())
            } else {
                self.waker.set(Some(context.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }
}

/// What the tasks of one generator thread count together.
struct ThreadFigures {
    measured_from: Instant,
    measured_until: Instant,
    measured_acknowledged: Cell<u64>,
    acknowledged_total: Cell<u64>,
    latency: RefCell<Histogram<u64>>,
    send_lag: RefCell<Histogram<u64>>,
}

impl ThreadFigures {
    fn in_window(&self, time: Instant) -> bool {
        time >= self.measured_from && time < self.measured_until
    }
}

/// One client's packet ids: free ones, and the intended send time of each
/// one in flight.
struct ClientState {
    window: usize,
    free_ids: RefCell<Vec<u16>>,
    intended: RefCell<Vec<Option<Instant>>>,
    /// The writer waits here for free ids (or for the reader to fail).
    credit: Signal,
    failed: RefCell<Option<String>>,
    closing: Cell<bool>,
}

impl ClientState {
    fn new(window: u16) -> Self {
        Self {
            window: usize::from(window),
            free_ids: RefCell::new((1..=window).rev().collect()),
            intended: RefCell::new(vec![None; usize::from(window) + 1]),
            credit: Signal::default(),
            failed: RefCell::new(None),
            closing: Cell::new(false),
        }
    }

    fn fail(&self, reason: String) {
        self.failed.borrow_mut().get_or_insert(reason);
        self.credit.notify();
    }

    fn check(&self) -> anyhow::Result<()> {
        match &*self.failed.borrow() {
            Some(reason) => anyhow::bail!("{reason}"),
            None => Ok(()),
        }
    }

    fn in_flight(&self) -> usize {
        self.window - self.free_ids.borrow().len()
    }
}

/// Connects one client: TCP, CONNECT, CONNACK.
async fn connect_client(address: &str, client_id: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_nodelay(true)?;
    let BufResult(result, _) = stream.write_all(connect_packet(client_id)?).await;
    result?;
    let mut buffer = Vec::with_capacity(256);
    loop {
        buffer.reserve(256);
        let BufResult(result, returned) = stream.append(buffer).await;
        buffer = returned;
        anyhow::ensure!(
            result? > 0,
            "the broker closed the connection before CONNACK"
        );
        if let Some((packet, _)) = decode(&buffer, ProtocolVersion::V311, PACKET_BYTES_MAX)? {
            match packet {
                Packet::ConnAck(connack) if connack.reason_code == 0 => return Ok(stream),
                Packet::ConnAck(connack) => {
                    anyhow::bail!("CONNACK refused with code {:#04x}", connack.reason_code)
                }
                other => anyhow::bail!("expected CONNACK, got {}", other.packet_type()),
            }
        }
    }
}

/// Takes PUBACKs until the broker closes the connection after the
/// writer's DISCONNECT.
async fn read_acknowledgements(
    mut stream: TcpStream,
    state: Rc<ClientState>,
    figures: Rc<ThreadFigures>,
) -> anyhow::Result<()> {
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    loop {
        buffer.reserve(READ_CHUNK_BYTES);
        let BufResult(result, returned) = stream.append(buffer).await;
        buffer = returned;
        match result {
            Ok(0) if state.closing.get() => return Ok(()),
            Ok(0) => anyhow::bail!(
                "the broker closed the connection with {} PUBLISHes unacknowledged",
                state.in_flight()
            ),
            Ok(_) => {}
            Err(error) if state.closing.get() => {
                // A reset after DISCONNECT is an ending too.
                let _ = error;
                return Ok(());
            }
            Err(error) => return Err(error).context("reading from the broker"),
        }
        let now = Instant::now();
        let mut used = 0;
        while let Some((packet, bytes)) =
            decode(&buffer[used..], ProtocolVersion::V311, PACKET_BYTES_MAX)?
        {
            used += bytes;
            let Packet::PubAck(acknowledgement) = packet else {
                anyhow::bail!("expected PUBACK, got {}", packet.packet_type());
            };
            let packet_id = acknowledgement.packet_id;
            let intended = state
                .intended
                .borrow_mut()
                .get_mut(usize::from(packet_id))
                .and_then(Option::take)
                .with_context(|| format!("PUBACK for packet id {packet_id}, not in flight"))?;
            figures
                .acknowledged_total
                .set(figures.acknowledged_total.get() + 1);
            if figures.in_window(now) {
                figures
                    .measured_acknowledged
                    .set(figures.measured_acknowledged.get() + 1);
            }
            if figures.in_window(intended) {
                figures
                    .latency
                    .borrow_mut()
                    .record(micros(now.saturating_duration_since(intended)))?;
            }
            state.free_ids.borrow_mut().push(packet_id);
        }
        buffer.drain(..used);
        state.credit.notify();
    }
}

/// Sends PUBLISHes at `pace` until the measured window ends, then waits for
/// every PUBACK and disconnects.
#[allow(clippy::too_many_arguments)]
async fn publish(
    mut stream: TcpStream,
    state: Rc<ClientState>,
    figures: Rc<ThreadFigures>,
    template: PublishTemplate,
    pace: Pace,
    first_send: Instant,
    interval: Duration,
    drain_deadline: Instant,
) -> anyhow::Result<()> {
    let end = figures.measured_until;
    let mut out = Vec::with_capacity(template.bytes.len() * state.window);
    let mut next = 0u32;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = match pace {
            Pace::Unbounded => now,
            Pace::MessagesPerSecond(_) => {
                let due = first_send + interval * next;
                if due >= end {
                    break;
                }
                if due > now {
                    compio::time::sleep_until(due).await;
                }
                due
            }
        };
        let waited = compio::time::timeout_at(
            drain_deadline,
            state
                .credit
                .until(|| !state.free_ids.borrow().is_empty() || state.failed.borrow().is_some()),
        )
        .await;
        state.check()?;
        anyhow::ensure!(
            waited.is_ok(),
            "the broker stopped acknowledging: {} PUBLISHes in flight for {:?}",
            state.in_flight(),
            drain_deadline.saturating_duration_since(due)
        );
        out.clear();
        next = fill(
            &state, &figures, &template, pace, first_send, interval, next, &mut out,
        )?;
        let BufResult(result, returned) = stream.write_all(out).await;
        out = returned;
        result.context("writing PUBLISHes")?;
    }
    let drained = compio::time::timeout_at(
        drain_deadline,
        state
            .credit
            .until(|| state.in_flight() == 0 || state.failed.borrow().is_some()),
    )
    .await;
    state.check()?;
    anyhow::ensure!(
        drained.is_ok(),
        "{} PUBLISHes were still unacknowledged {:?} after the last send",
        state.in_flight(),
        drain_deadline.saturating_duration_since(end)
    );
    state.closing.set(true);
    let BufResult(result, _) = stream.write_all(disconnect_packet()?).await;
    result.context("writing DISCONNECT")?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// Encodes into `out` the PUBLISHes to send now: every free packet id when
/// unbounded; at a rate, every message due by now (from the `next`-th on)
/// that the window allows. Returns the next message's number.
#[allow(clippy::too_many_arguments)]
fn fill(
    state: &ClientState,
    figures: &ThreadFigures,
    template: &PublishTemplate,
    pace: Pace,
    first_send: Instant,
    interval: Duration,
    mut next: u32,
    out: &mut Vec<u8>,
) -> anyhow::Result<u32> {
    let now = Instant::now();
    let mut free_ids = state.free_ids.borrow_mut();
    let mut intended = state.intended.borrow_mut();
    match pace {
        Pace::Unbounded => {
            for packet_id in free_ids.drain(..) {
                intended[usize::from(packet_id)] = Some(now);
                template.append(packet_id, out);
            }
        }
        Pace::MessagesPerSecond(_) => {
            let mut lag = figures.send_lag.borrow_mut();
            loop {
                let due = first_send + interval * next;
                if due > now || due >= figures.measured_until {
                    break;
                }
                let Some(packet_id) = free_ids.pop() else {
                    break;
                };
                intended[usize::from(packet_id)] = Some(due);
                if figures.in_window(due) {
                    lag.record(micros(now.saturating_duration_since(due)))?;
                }
                template.append(packet_id, out);
                next += 1;
            }
        }
    }
    Ok(next)
}

/// The start of a phase, shared by the coordinator and generator threads.
struct Start {
    connected: Barrier,
    at: OnceLock<Instant>,
    go: Barrier,
}

struct ThreadResult {
    measured_acknowledged: u64,
    acknowledged_total: u64,
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
}

/// One generator thread: connects `clients` (global indexes), waits for the
/// common start, runs them, and returns what it counted.
fn generator_thread(
    address: String,
    clients: Vec<usize>,
    load: Load,
    pace: Pace,
    timing: Timing,
    start: Arc<Start>,
) -> anyhow::Result<ThreadResult> {
    let runtime = compio::runtime::Runtime::new();
    let connected = runtime
        .as_ref()
        .map_err(|error| error.to_string())
        .and_then(|runtime| {
            runtime.block_on(async {
                let connections = clients.iter().map(|&client| {
                    let address = address.as_str();
                    async move {
                        let client_id = format!("bench-{client}");
                        compio::time::timeout(CONNECT_DEADLINE, connect_client(address, &client_id))
                            .await
                            .map_err(|_| {
                                anyhow::anyhow!(
                                    "{client_id}: no CONNACK within {CONNECT_DEADLINE:?}"
                                )
                            })?
                            .with_context(|| client_id.clone())
                    }
                });
                futures_util::future::join_all(connections)
                    .await
                    .into_iter()
                    .collect::<anyhow::Result<Vec<_>>>()
                    .map_err(|error| format!("{error:#}"))
            })
        });
    // Every thread meets the coordinator, failed or not, so none waits forever.
    start.connected.wait();
    start.go.wait();
    let (runtime, streams) = match (runtime, connected) {
        (Ok(runtime), Ok(streams)) => (runtime, streams),
        (Err(error), _) => return Err(error).context("starting a compio runtime"),
        (_, Err(error)) => anyhow::bail!("{error}"),
    };
    let started = *start.at.get().context("the phase has no start time")?;
    let measured_from = started + timing.warm_up;
    let measured_until = measured_from + timing.measured;
    let drain_deadline = measured_until + timing.drain_max;
    let figures = Rc::new(ThreadFigures {
        measured_from,
        measured_until,
        measured_acknowledged: Cell::new(0),
        acknowledged_total: Cell::new(0),
        latency: RefCell::new(histogram()?),
        send_lag: RefCell::new(histogram()?),
    });
    let payload = vec![b'x'; load.payload_bytes];
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for (&client, stream) in clients.iter().zip(streams) {
            let state = Rc::new(ClientState::new(load.window_messages));
            let template = PublishTemplate::new(&format!("bench/{client}/data"), &payload)?;
            // A rate is spread evenly: each client sends every `interval`,
            // and the clients' schedules are staggered across it.
            let (first_send, interval) = match pace {
                Pace::Unbounded => (started, Duration::ZERO),
                Pace::MessagesPerSecond(rate) => (
                    started + Duration::from_secs_f64(client as f64 / rate),
                    Duration::from_secs_f64(load.clients as f64 / rate),
                ),
            };
            let reader = compio::runtime::spawn(read_acknowledgements(
                stream.clone(),
                state.clone(),
                figures.clone(),
            ));
            let writer = compio::runtime::spawn(publish(
                stream,
                state.clone(),
                figures.clone(),
                template,
                pace,
                first_send,
                interval,
                drain_deadline,
            ));
            tasks.push((client, state, reader, writer));
        }
        let mut first_error = None;
        for (client, state, reader, writer) in tasks {
            let written = writer
                .await
                .map_err(|_| anyhow::anyhow!("a publishing task panicked"))
                .and_then(|result| result);
            if let Err(error) = written {
                state.fail(format!("{error:#}"));
                first_error.get_or_insert(error.context(format!("client bench-{client}")));
                continue;
            }
            // The broker closes the connection after DISCONNECT.
            let read = compio::time::timeout(Duration::from_secs(10), reader).await;
            match read {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => {
                    first_error.get_or_insert(error.context(format!("client bench-{client}")));
                }
                Ok(Err(_)) => {
                    first_error.get_or_insert(anyhow::anyhow!("a reading task panicked"));
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow::anyhow!(
                        "client bench-{client}: the broker did not close the connection within 10 s of DISCONNECT"
                    ));
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    })?;
    let figures =
        Rc::try_unwrap(figures).map_err(|_| anyhow::anyhow!("a client task outlived its phase"))?;
    Ok(ThreadResult {
        measured_acknowledged: figures.measured_acknowledged.get(),
        acknowledged_total: figures.acknowledged_total.get(),
        latency: figures.latency.into_inner(),
        send_lag: figures.send_lag.into_inner(),
    })
}

/// A subscriber on its own thread, taking everything on `bench/#` at QoS 0
/// through a blocking socket.
struct Subscriber {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Subscriber {
    /// Connects and subscribes; returns once the SUBACK is in.
    fn start(address: &str) -> anyhow::Result<Self> {
        let mut stream = std::net::TcpStream::connect(address)
            .with_context(|| format!("subscriber: connecting to {address}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        stream.write_all(&connect_packet("bench-subscriber")?)?;
        let mut subscribe = Vec::new();
        encode(
            &Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: SUBSCRIBER_FILTER.into(),
                    options: SubscriptionOptions::with_qos(QoS::AtMostOnce),
                }],
                properties: Properties::default(),
            }),
            ProtocolVersion::V311,
            &mut subscribe,
        )?;
        stream.write_all(&subscribe)?;
        let mut buffer = Vec::new();
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        let deadline = Instant::now() + CONNECT_DEADLINE;
        let mut subscribed = false;
        while !subscribed {
            anyhow::ensure!(
                Instant::now() < deadline,
                "subscriber: no SUBACK within {CONNECT_DEADLINE:?}"
            );
            match stream.read(&mut chunk) {
                Ok(0) => anyhow::bail!("subscriber: the broker closed the connection"),
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                Err(error) if is_timeout(&error) => continue,
                Err(error) => return Err(error).context("subscriber: reading"),
            }
            let mut used = 0;
            while let Some((packet, bytes)) =
                decode(&buffer[used..], ProtocolVersion::V311, PACKET_BYTES_MAX)?
            {
                used += bytes;
                match packet {
                    Packet::ConnAck(connack) => anyhow::ensure!(
                        connack.reason_code == 0,
                        "subscriber: CONNACK refused with code {:#04x}",
                        connack.reason_code
                    ),
                    Packet::SubAck(suback) => {
                        anyhow::ensure!(
                            suback.reason_codes.iter().all(|&code| code < 0x80),
                            "subscriber: SUBSCRIBE refused: {:?}",
                            suback.reason_codes
                        );
                        subscribed = true;
                    }
                    other => anyhow::bail!(
                        "subscriber: expected CONNACK or SUBACK, got {}",
                        other.packet_type()
                    ),
                }
            }
            buffer.drain(..used);
        }
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let received = received.clone();
            let stop = stop.clone();
            move || -> anyhow::Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    match stream.read(&mut chunk) {
                        Ok(0) => anyhow::bail!("subscriber: the broker closed the connection"),
                        Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                        Err(error) if is_timeout(&error) => continue,
                        Err(error) => return Err(error).context("subscriber: reading"),
                    }
                    let mut used = 0;
                    let mut publishes = 0;
                    while let Some((packet, bytes)) =
                        decode(&buffer[used..], ProtocolVersion::V311, PACKET_BYTES_MAX)?
                    {
                        used += bytes;
                        match packet {
                            Packet::Publish(_) => publishes += 1,
                            other => anyhow::bail!(
                                "subscriber: expected PUBLISH, got {}",
                                other.packet_type()
                            ),
                        }
                    }
                    buffer.drain(..used);
                    received.fetch_add(publishes, Ordering::Relaxed);
                }
                let _ = stream.write_all(&disconnect_packet()?);
                Ok(())
            }
        });
        Ok(Self {
            received,
            stop,
            thread,
        })
    }

    /// Waits until `expected` messages are in, or nothing came for `quiet`,
    /// or `deadline`; then stops and says how many came.
    fn finish(self, expected: u64, quiet: Duration, deadline: Duration) -> anyhow::Result<u64> {
        let started = Instant::now();
        let mut last = self.received.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        while last < expected
            && last_change.elapsed() < quiet
            && started.elapsed() < deadline
            && !self.thread.is_finished()
        {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.received.load(Ordering::Relaxed);
            if now != last {
                last = now;
                last_change = Instant::now();
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the subscriber thread panicked"))??;
        Ok(self.received.load(Ordering::Relaxed))
    }
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Runs one phase against the broker at `address` (process `broker_pid`),
/// with one subscriber on `bench/#` when `subscribe` is set.
pub fn run_phase(
    address: &str,
    broker_pid: u32,
    load: &Load,
    pace: Pace,
    timing: &Timing,
    subscribe: bool,
) -> anyhow::Result<Phase> {
    assert!(load.clients > 0 && load.generator_threads > 0 && load.window_messages > 0);
    let subscriber = subscribe.then(|| Subscriber::start(address)).transpose()?;
    let threads = load.generator_threads.min(load.clients);
    let start = Arc::new(Start {
        connected: Barrier::new(threads + 1),
        at: OnceLock::new(),
        go: Barrier::new(threads + 1),
    });
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let clients: Vec<usize> = (thread..load.clients).step_by(threads).collect();
            let (address, load, timing, start) =
                (address.to_owned(), *load, *timing, start.clone());
            std::thread::spawn(move || {
                generator_thread(address, clients, load, pace, timing, start)
            })
        })
        .collect();
    start.connected.wait();
    let started = Instant::now() + Duration::from_millis(20);
    let _ = start.at.set(started);
    start.go.wait();
    let measured_from = started + timing.warm_up;
    let measured_until = measured_from + timing.measured;
    std::thread::sleep(measured_from.saturating_duration_since(Instant::now()));
    let broker_cpu_before = process_cpu_seconds(broker_pid)?;
    let generator_cpu_before = own_cpu_seconds();
    std::thread::sleep(measured_until.saturating_duration_since(Instant::now()));
    let broker_cpu_seconds = process_cpu_seconds(broker_pid)? - broker_cpu_before;
    let generator_cpu_seconds = own_cpu_seconds() - generator_cpu_before;
    let mut phase = Phase {
        measured_acknowledged: 0,
        measured: timing.measured,
        acknowledged_total: 0,
        latency: histogram()?,
        send_lag: histogram()?,
        broker_cpu_seconds,
        generator_cpu_seconds,
        subscriber: None,
    };
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(result)) => {
                phase.measured_acknowledged += result.measured_acknowledged;
                phase.acknowledged_total += result.acknowledged_total;
                phase.latency.add(&result.latency)?;
                phase.send_lag.add(&result.send_lag)?;
            }
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("a generator thread panicked"));
            }
        }
    }
    let last_ack = Instant::now();
    if let Some(subscriber) = subscriber {
        let received = subscriber.finish(
            phase.acknowledged_total,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )?;
        phase.subscriber = Some(SubscriberFigures {
            received,
            after_last_ack: last_ack.elapsed(),
        });
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(phase),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_from_the_template_decodes_with_its_packet_id() {
        let template = PublishTemplate::new("bench/7/data", &[b'x'; 100]).expect("template");
        let mut out = Vec::new();
        template.append(513, &mut out);
        template.append(65535, &mut out);
        let (first, used) = decode(&out, ProtocolVersion::V311, PACKET_BYTES_MAX)
            .expect("decodes")
            .expect("whole");
        let (second, _) = decode(&out[used..], ProtocolVersion::V311, PACKET_BYTES_MAX)
            .expect("decodes")
            .expect("whole");
        for (packet, packet_id) in [(first, 513), (second, 65535)] {
            let Packet::Publish(publish) = packet else {
                panic!("not a PUBLISH: {packet:?}");
            };
            assert_eq!(publish.packet_id, packet_id);
            assert_eq!(publish.qos, QoS::AtLeastOnce);
            assert_eq!(publish.topic, "bench/7/data");
            assert_eq!(publish.payload.len(), 100);
        }
    }
}
