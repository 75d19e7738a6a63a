//! One MQTT client connection in the generic connection loop.
//!
//! The reader splits packets off the socket by their fixed header (a
//! packet over `mqtt.packet_bytes_max` is refused from its header, before
//! its body is buffered), decodes each and feeds it to the session state
//! machine. The machine sits in a [`Client`], shared by whatever touches
//! the session: this reader, the connection's executor and its append
//! results, its log readers, and other connections (a takeover). Every
//! call into the machine goes through [`Client::step_with`], which queues
//! the actions it gives for the executor while still holding the lock, so
//! actions leave in the order the machine made them, whichever thread made
//! them; packets to send are encoded there too, at the version in force.
//!
//! The reader stops reading while the session does not want input (as
//! many inbound QoS 1 and 2 PUBLISHes in flight as `inflight_inbound_max`)
//! and, after a CONNECT, until the executor has opened the session.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use compio::net::TcpStream;
use futures_channel::{mpsc, oneshot};
use futures_util::FutureExt;
use rill_edge_bridge::mqtt::session::{Action, Connection, Delivery, DeliveryOutcome};
use rill_edge_bridge::mqtt::{Packet, connect_protocol_version, decode, decode_connect, encode};
use rill_protocol::FrameError;

use super::{lock, now_ms};
use crate::broker::Shared;
use crate::broker::connection::{Answer, Ended, FrameHandler, InFlight, ShutdownSignal};

/// What the executor is given, in order.
pub(crate) enum Work {
    /// Encoded packets to write, back to back, and how many there are.
    Bytes(Vec<u8>, u64),
    /// Boxed: most work is packets, and an action is large.
    Action(Box<Action>),
    /// Once a second: look for partitions that appeared.
    Discover,
}

/// One connection's session machine and the ways to reach it.
pub(crate) struct Client {
    pub connection_id: u64,
    machine: Mutex<Connection>,
    work: mpsc::UnboundedSender<Work>,
    close: Mutex<Option<oneshot::Sender<()>>>,
    closed: AtomicBool,
    opened: AtomicBool,
    /// Wakes the reader waiting for the session to want input.
    waiter: Mutex<Option<oneshot::Sender<()>>>,
}

impl Client {
    /// Runs `f` on the machine; the actions it pushes are queued for the
    /// executor before the lock is released.
    pub(crate) fn step_with<R>(
        &self,
        f: impl FnOnce(&mut Connection, &mut dyn FnMut(Action)) -> R,
    ) -> R {
        let mut machine = lock(&self.machine);
        let mut actions = Vec::new();
        let result = f(&mut machine, &mut |action| actions.push(action));
        let version = machine.protocol_version();
        // Packets one step makes (the PUBACKs of a run of appends) go out
        // as one write.
        let mut packets = Vec::new();
        let mut count = 0;
        for action in actions {
            match action {
                Action::Send(packet) => {
                    if let Err(error) = encode(&packet, version, &mut packets) {
                        // The machine only makes packets the codec can write.
                        tracing::warn!(%error, packet = %packet.packet_type(), "an MQTT packet could not be encoded; not sent");
                    } else {
                        count += 1;
                    }
                }
                other => {
                    if count > 0 {
                        let _ = self
                            .work
                            .unbounded_send(Work::Bytes(std::mem::take(&mut packets), count));
                        count = 0;
                    }
                    let _ = self.work.unbounded_send(Work::Action(Box::new(other)));
                }
            }
        }
        if count > 0 {
            let _ = self.work.unbounded_send(Work::Bytes(packets, count));
        }
        if machine.is_closed() {
            self.closed.store(true, Ordering::Release);
        }
        drop(machine);
        self.wake();
        result
    }

    /// Runs one `handle_*` call.
    pub(crate) fn step(&self, f: impl FnOnce(&mut Connection) -> Vec<Action>) {
        self.step_with(|machine, push| {
            for action in f(machine) {
                push(action);
            }
        });
    }

    /// Offers a delivery to the session.
    pub(crate) fn deliver(&self, delivery: Delivery) -> DeliveryOutcome {
        let now = now_ms();
        self.step_with(|machine, push| {
            let (outcome, actions) = machine.handle_delivery(delivery, now);
            for action in actions {
                push(action);
            }
            outcome
        })
    }

    /// Reads the machine without changing it.
    pub(crate) fn with_machine<R>(&self, f: impl FnOnce(&Connection) -> R) -> R {
        f(&lock(&self.machine))
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_opened(&self) {
        self.opened.store(true, Ordering::Release);
        self.wake();
    }

    /// Stops the reader (the executor calls it on `Close`).
    pub(crate) fn fire_close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(close) = lock(&self.close).take() {
            let _ = close.send(());
        }
        self.wake();
    }

    fn wake(&self) {
        if let Some(waiter) = lock(&self.waiter).take() {
            let _ = waiter.send(());
        }
    }

    /// Waits until `ready` holds or the connection closes.
    async fn wait_until(&self, ready: impl Fn(&Client) -> bool) {
        loop {
            let (sender, receiver) = oneshot::channel();
            *lock(&self.waiter) = Some(sender);
            if self.is_closed() || ready(self) {
                lock(&self.waiter).take();
                return;
            }
            let _ = receiver.await;
        }
    }
}

pub(crate) struct MqttConnection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    writer: Option<mpsc::UnboundedSender<Answer>>,
    in_flight: Rc<InFlight>,
    client: Arc<Client>,
    work: Option<mpsc::UnboundedReceiver<Work>>,
    executor_done: Option<oneshot::Receiver<()>>,
    close_signal: ShutdownSignal,
    connect_seen: bool,
}

impl Drop for MqttConnection {
    fn drop(&mut self) {
        self.shared.remove_connection();
    }
}

impl MqttConnection {
    pub(crate) fn new(shared: Arc<Shared>, _stream: &TcpStream, peer: SocketAddr) -> Self {
        let state = &shared.mqtt;
        state
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let connection_id = state.next_connection_id();
        let machine = Connection::new(state.context.clone(), connection_id, now_ms());
        let (work, work_receiver) = mpsc::unbounded();
        let (close, closed) = oneshot::channel();
        let client = Arc::new(Client {
            connection_id,
            machine: Mutex::new(machine),
            work,
            close: Mutex::new(Some(close)),
            closed: AtomicBool::new(false),
            opened: AtomicBool::new(false),
            waiter: Mutex::new(None),
        });
        Self {
            shared,
            peer,
            writer: None,
            in_flight: Rc::new(InFlight::default()),
            client,
            work: Some(work_receiver),
            executor_done: None,
            close_signal: closed.shared(),
            connect_seen: false,
        }
    }

    fn packet_bytes_max(&self) -> u32 {
        self.shared.mqtt.context.config.packet_bytes_max
    }
}

/// The fixed header's view of `buffer`: the whole packet's length, or
/// `Err(())` when the remaining length is malformed. `Ok(None)`: the
/// header is not all in yet.
fn packet_length(buffer: &[u8]) -> Result<Option<usize>, ()> {
    let mut remaining: usize = 0;
    for index in 0..4 {
        let Some(&byte) = buffer.get(1 + index) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some(1 + index + 1 + remaining));
        }
    }
    Err(())
}

impl FrameHandler for MqttConnection {
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn in_flight(&self) -> &Rc<InFlight> {
        &self.in_flight
    }

    fn writer(&self) -> Option<&mpsc::UnboundedSender<Answer>> {
        self.writer.as_ref()
    }

    fn set_writer(&mut self, writer: Option<mpsc::UnboundedSender<Answer>>) {
        if let (Some(writer), Some(work)) = (writer.clone(), self.work.take()) {
            let (done, done_receiver) = oneshot::channel();
            self.executor_done = Some(done_receiver);
            let executor = super::executor::Executor::new(
                self.shared.clone(),
                self.client.clone(),
                writer,
                self.peer,
            );
            crate::io::home::spawn(async move {
                executor.run(work).await;
                let _ = done.send(());
            })
            .detach();
            crate::io::home::spawn(tick(self.client.clone())).detach();
        }
        self.writer = writer;
    }

    /// A whole packet, or (when the fixed header already shows it is bad
    /// or too large) everything buffered, which the decoder then refuses
    /// with the right reason code.
    fn split(buffer: &[u8], frame_bytes_max: u32) -> Result<Option<(&[u8], usize)>, FrameError> {
        if buffer.is_empty() {
            return Ok(None);
        }
        match packet_length(buffer) {
            Ok(None) => Ok(None),
            Ok(Some(length)) if length > frame_bytes_max as usize => {
                Ok(Some((buffer, buffer.len())))
            }
            Ok(Some(length)) => Ok(buffer.get(..length).map(|packet| (packet, length))),
            Err(()) => Ok(Some((buffer, buffer.len()))),
        }
    }

    fn declared_length(buffer: &[u8]) -> Option<usize> {
        packet_length(buffer).ok().flatten()
    }

    /// Not reached: `split` hands bad headers to the decoder instead.
    fn reject(&self, error: &FrameError) {
        tracing::debug!(peer = %self.peer, %error, "unreadable MQTT packet");
    }

    fn frame_bytes_max(&self) -> u32 {
        self.packet_bytes_max()
    }

    fn close_signal(&self) -> Option<ShutdownSignal> {
        Some(self.close_signal.clone())
    }

    async fn handle_frame(&mut self, body: &bytes::Bytes) -> bool {
        if self.client.is_closed() {
            return false;
        }
        let now = now_ms();
        let packet_bytes_max = self.packet_bytes_max();
        if !self.connect_seen {
            match decode_connect(body, packet_bytes_max) {
                Ok(Some((connect, _))) => {
                    self.connect_seen = true;
                    self.client.step(|machine| {
                        machine.handle_packet(Packet::Connect(Box::new(connect)), now)
                    });
                    // No packet goes to the machine before its session is open.
                    self.client
                        .wait_until(|client| client.opened.load(Ordering::Acquire))
                        .await;
                }
                Ok(None) => return false,
                Err(error) => {
                    tracing::debug!(peer = %self.peer, %error, "MQTT CONNECT refused");
                    let version = connect_protocol_version(body);
                    self.client
                        .step(|machine| machine.handle_decode_error(&error, version, now));
                    return false;
                }
            }
        } else {
            let version = self.client.with_machine(Connection::protocol_version);
            match decode(body, version, packet_bytes_max) {
                Ok(Some((packet, _))) => {
                    self.client
                        .step(|machine| machine.handle_packet(packet, now));
                }
                Ok(None) => return false,
                Err(error) => {
                    tracing::debug!(peer = %self.peer, %error, "bad MQTT packet; closing the connection");
                    self.shared
                        .metrics
                        .frames_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    self.client
                        .step(|machine| machine.handle_decode_error(&error, None, now));
                    return false;
                }
            }
        }
        self.client
            .wait_until(|client| client.with_machine(Connection::wants_input))
            .await;
        !self.client.is_closed()
    }

    async fn finish(&mut self, ended: Ended) {
        let now = now_ms();
        match ended {
            Ended::PeerClosed => self
                .client
                .step(|machine| machine.handle_connection_lost(now)),
            Ended::ShuttingDown => self.client.step(|machine| machine.handle_shutdown(now)),
            Ended::Closed => self
                .client
                .step(|machine| machine.handle_connection_lost(now)),
        }
        // The executor carries out the last actions (will, session, close)
        // before the connection stops counting: shards stop only once every
        // connection has.
        if let Some(done) = self.executor_done.take() {
            let _ = done.await;
        }
    }
}

/// Ticks the session once a second until it closes.
async fn tick(client: Arc<Client>) {
    while !client.is_closed() {
        compio::time::sleep(std::time::Duration::from_millis(1000)).await;
        let now = now_ms();
        client.step(|machine| machine.handle_tick(now));
        let _ = client.work.unbounded_send(Work::Discover);
    }
}
