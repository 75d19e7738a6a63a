//! The publishing clients of one generator thread: each client has a
//! writer task that sends QoS 1 PUBLISHes while its window has room (at
//! once, or on its schedule at a fixed rate) and a reader task that takes
//! PUBACKs, frees their packet ids and records their latency.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use compio::BufResult;
use compio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use compio::net::TcpStream;
use hdrhistogram::Histogram;
use rill_edge_bridge::mqtt::{Packet, Properties, ProtocolVersion, Publish, QoS, decode, encode};

use super::{
    CONNECT_DEADLINE, Load, PACKET_BYTES_MAX, Pace, READ_CHUNK_BYTES, Start, Timing,
    connect_packet, disconnect_packet, histogram, micros,
};

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

/// What one generator thread counted.
pub(super) struct ThreadResult {
    pub measured_acknowledged: u64,
    pub acknowledged_total: u64,
    pub latency: Histogram<u64>,
    pub send_lag: Histogram<u64>,
}

/// One generator thread: connects `clients` (global indexes), waits for the
/// common start, runs them, and returns what it counted.
pub(super) fn generator_thread(
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
