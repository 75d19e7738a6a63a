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

mod publisher;
mod subscriber;

use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rill_edge_bridge::mqtt::{Connect, Packet, Properties, ProtocolVersion, encode};

use self::publisher::generator_thread;
use self::subscriber::Subscriber;
use crate::broker::{own_cpu_seconds, process_cpu_seconds, process_write_bytes};
use crate::machine::busy_cpu_seconds;

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
    /// Bytes the broker sent to the block layer within the window.
    pub broker_write_bytes: u64,
    /// CPU the rest of the machine (neither the broker nor this process)
    /// used within the window: how shared the machine was.
    pub other_cpu_seconds: f64,
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

    /// Cores the rest of the machine kept busy, on average, in the window.
    pub fn other_cores_busy(&self) -> f64 {
        self.other_cpu_seconds / self.measured.as_secs_f64()
    }

    pub fn broker_write_bytes_per_message(&self) -> f64 {
        self.broker_write_bytes as f64 / self.measured_acknowledged.max(1) as f64
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)?)
}

fn micros(duration: Duration) -> u64 {
    (duration.as_micros() as u64).clamp(1, LATENCY_MAX_US)
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

/// The start of a phase, shared by the coordinator and generator threads.
struct Start {
    connected: Barrier,
    at: OnceLock<Instant>,
    go: Barrier,
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
    let broker_written_before = process_write_bytes(broker_pid)?;
    let generator_cpu_before = own_cpu_seconds();
    let machine_cpu_before = busy_cpu_seconds();
    std::thread::sleep(measured_until.saturating_duration_since(Instant::now()));
    let broker_cpu_seconds = process_cpu_seconds(broker_pid)? - broker_cpu_before;
    let broker_write_bytes = process_write_bytes(broker_pid)? - broker_written_before;
    let generator_cpu_seconds = own_cpu_seconds() - generator_cpu_before;
    let other_cpu_seconds =
        (busy_cpu_seconds() - machine_cpu_before - broker_cpu_seconds - generator_cpu_seconds)
            .max(0.0);
    let mut phase = Phase {
        measured_acknowledged: 0,
        measured: timing.measured,
        acknowledged_total: 0,
        latency: histogram()?,
        send_lag: histogram()?,
        broker_cpu_seconds,
        generator_cpu_seconds,
        broker_write_bytes,
        other_cpu_seconds,
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
