//! The shard thread and the native protocol's connections.
//!
//! A connection reads frames, checks them, and dispatches each request in the
//! order it arrived: a produce is queued at the owning shard before the next
//! frame is read, so pipelined produces to one partition keep their order.
//! Waiting (for a sync, for long-poll data) happens in a task per request, so
//! many requests are in flight at once, up to `requests_in_flight_max`; the
//! connection stops reading while that many are pending. Responses go out
//! through one writer task in completion order, matched by correlation id.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use compio::io::{AsyncWrite, AsyncWriteExt};
use compio::net::{TcpListener, TcpStream};
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use futures_util::future::{Either, FutureExt, Shared as SharedFuture, select};
use rill_protocol::frame::encode_frame_vec;
use rill_protocol::message::{GroupInfo, PartitionInfo, StatusInfo, TopicInfo};
use rill_protocol::partitioner::partition_for_key;
use rill_protocol::{
    Acks, ErrorCode, FrameError, PROTOCOL_VERSION, Request, RequestFrame, Response, ResponseFrame,
    Target, split_frame,
};

use super::errors::OpError;
use super::shard::{FetchData, SendRange, ShardOp, Storage, TICK_MS};
use super::topics::{TopicMeta, TopicView, shard_of};
use super::{
    Shared, alter_topic, create_topic, delete_topic, ensure_topic, parse_settings, settings_text,
    shard_ready,
};
use crate::io::build_runtime;

/// A future that completes when this shard starts shutting down.
pub(crate) type ShutdownSignal = SharedFuture<oneshot::Receiver<()>>;

/// How long a stopping shard waits for its connections to finish in-flight requests.
const SHUTDOWN_GRACE_MS: u64 = 10_000;
/// How often a connection held back by the buffer budget looks again.
const BUDGET_RECHECK_MS: u64 = 5;
/// Bytes a connection's read buffer starts with.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// A produce's batch at least this large goes to its shard as a slice of the
/// read buffer; a smaller one is copied. A slice keeps its whole buffer
/// allocated until the batch is appended, so small batches arriving one per
/// read (a slow trickle of small produces) would each keep a read buffer
/// alive; from this size on a batch holds at most 8 times its own size.
const SHARED_BATCH_BYTES_MIN: usize = READ_BUFFER_BYTES / 8;

/// `part` of `frame` (a produce's batch, or a whole produce request) as
/// `Bytes` for its shard: a slice of the frame's read buffer when it is
/// large, a copy when it is small ([`SHARED_BATCH_BYTES_MIN`]).
pub(crate) fn batch_bytes(frame: &Bytes, part: &[u8]) -> Bytes {
    if part.len() >= SHARED_BATCH_BYTES_MIN {
        frame.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
}

/// The listening sockets every shard accepts from.
pub struct Listeners {
    pub native: std::net::TcpListener,
    pub kafka: std::net::TcpListener,
    pub mqtt: std::net::TcpListener,
    /// Native and Kafka connections other shards move to this one.
    pub arrived: mpsc::UnboundedReceiver<MovedConnection>,
}

/// The body of a shard thread: runtime, partitions, acceptor, storage task.
pub fn shard_main(
    index: usize,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<ShardOp>,
    listeners: Listeners,
) -> anyhow::Result<()> {
    if shared.config.node.pin_threads {
        super::pin_to_core(index);
    }
    let mut selection = shared.driver.clone();
    let runtime = build_runtime(&mut selection)?;
    runtime.block_on(async move {
        // Before anything is spawned: every task of this shard is woken from
        // other threads through the relay (see `io::home`).
        crate::io::home::install_relay();
        crate::io::home::homed(serve_shard(index, shared, inbox, listeners)).await
    })
}

async fn serve_shard(
    index: usize,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<ShardOp>,
    listeners: Listeners,
) -> anyhow::Result<()> {
    let Listeners {
        native: listener,
        kafka,
        mqtt,
        arrived,
    } = listeners;
    {
        let inbox_sender = shared.inboxes[index].clone();
        let mut storage = Storage::new(index as u32, shared.clone(), inbox_sender.clone());
        let view = shared.topics.snapshot();
        for (topic, meta) in view.table.iter() {
            for partition in 0..meta.partitions {
                if shard_of(topic, partition, shared.shards()) == index {
                    storage
                        .open_partition(&(topic.clone(), partition), &meta.settings)
                        .await
                        .map_err(|error| {
                            anyhow::anyhow!("opening {topic}/{partition}: {}", error.message)
                        })?;
                }
            }
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped: ShutdownSignal = stopped.shared();
        let listener = TcpListener::from_std(listener)?;
        crate::io::home::spawn(accept_loop(
            listener,
            shared.clone(),
            stopped.clone(),
            move |shared, _, peer| Connection::new(shared, peer, index),
            Some(native_refusal()),
        ))
        .detach();
        crate::io::home::spawn(arrival_loop(
            arrived,
            shared.clone(),
            stopped.clone(),
            index,
        ))
        .detach();
        let kafka = TcpListener::from_std(kafka)?;
        crate::io::home::spawn(accept_loop(
            kafka,
            shared.clone(),
            stopped.clone(),
            move |shared, stream, peer| {
                crate::kafka::connection::KafkaConnection::new(shared, stream, peer, index)
            },
            None,
        ))
        .detach();
        let mqtt = TcpListener::from_std(mqtt)?;
        crate::io::home::spawn(accept_loop(
            mqtt,
            shared.clone(),
            stopped.clone(),
            crate::mqtt::MqttConnection::new,
            None,
        ))
        .detach();
        crate::io::home::spawn(tick_loop(inbox_sender)).detach();
        if index == 0 {
            crate::io::home::spawn(group_tick_loop(shared.clone())).detach();
            crate::io::home::spawn(crate::mqtt::tick_loop(shared.clone())).detach();
            crate::io::home::spawn(crate::mqtt::ensure_mapping_topics(shared.clone())).detach();
        }
        crate::io::home::spawn(stop_on_shutdown(shared.clone(), stop)).detach();
        shard_ready(&shared);
        storage.run(inbox).await;
        anyhow::Ok(())
    }
}

/// Fires the shard's stop signal when the broker starts shutting down, and
/// gives up on connections that have not finished within the grace period.
async fn stop_on_shutdown(shared: Arc<Shared>, stop: oneshot::Sender<()>) {
    while !shared.is_shutting_down() {
        compio::time::sleep(Duration::from_millis(TICK_MS)).await;
    }
    let _ = stop.send(());
    compio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)).await;
    if shared.connections_open() > 0 {
        tracing::warn!(
            open = shared.connections_open(),
            "connections did not finish in time; closing anyway"
        );
        shared.force_stop();
    }
}

/// Expires consumer-group members and ends rebalances on time (shard 0).
async fn group_tick_loop(shared: Arc<Shared>) {
    while !shared.is_shutting_down() {
        compio::time::sleep(Duration::from_millis(TICK_MS)).await;
        shared
            .kafka
            .coordinator
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .tick(Instant::now());
    }
}

async fn tick_loop(inbox: mpsc::UnboundedSender<ShardOp>) {
    loop {
        compio::time::sleep(Duration::from_millis(TICK_MS)).await;
        if inbox.unbounded_send(ShardOp::Tick).is_err() {
            return;
        }
    }
}

/// Accepts connections until shutdown and serves each with the handler
/// `make` builds. Past `connections_max` a connection gets `refusal` (if
/// the protocol has a way to say it) and is closed.
pub(crate) async fn accept_loop<H, F>(
    listener: TcpListener,
    shared: Arc<Shared>,
    stopped: ShutdownSignal,
    make: F,
    refusal: Option<Vec<u8>>,
) where
    H: FrameHandler + 'static,
    F: Fn(Arc<Shared>, &TcpStream, SocketAddr) -> H,
{
    loop {
        let accepted = match select(Box::pin(listener.accept()), stopped.clone()).await {
            Either::Left((accepted, _)) => accepted,
            Either::Right(_) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: do not spin on it.
                tracing::warn!(%error, "accept failed");
                compio::time::sleep(Duration::from_millis(TICK_MS)).await;
                continue;
            }
        };
        if !shared.try_add_connection() {
            shared
                .metrics
                .connections_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%peer, limit = shared.config.limits.connections_max, "connection refused: connections_max reached");
            if let Some(frame) = refusal.clone() {
                crate::io::home::spawn(async move {
                    let mut stream = stream;
                    let _ = stream.write_all(frame).await;
                })
                .detach();
            }
            continue;
        }
        let handler = make(shared.clone(), &stream, peer);
        spawn_serving(handler, stream, &stopped, BytesMut::new());
    }
}

/// Serves a connection in a task of its own, from the bytes already read
/// for it (`unread`: none for a new connection).
fn spawn_serving<H: FrameHandler + 'static>(
    handler: H,
    stream: TcpStream,
    stopped: &ShutdownSignal,
    unread: BytesMut,
) {
    crate::io::home::spawn(serve_connection(handler, stream, stopped.clone(), unread)).detach();
}

/// Serves the native and Kafka connections other shards move to this one,
/// until the shard stops; a connection still queued then is dropped, which
/// closes it.
async fn arrival_loop(
    mut arrived: mpsc::UnboundedReceiver<MovedConnection>,
    shared: Arc<Shared>,
    stopped: ShutdownSignal,
    shard: usize,
) {
    loop {
        let moved = match select(arrived.next(), stopped.clone()).await {
            Either::Left((Some(moved), _)) => moved,
            Either::Left((None, _)) | Either::Right(_) => return,
        };
        let MovedConnection {
            stream,
            unread,
            peer,
            protocol,
            slot,
        } = moved;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%peer, %error, "a moved connection could not be taken in; closing it");
                continue;
            }
        };
        match protocol {
            MovedProtocol::Native { next_partition } => {
                let mut handler = Connection::with_slot(shared.clone(), peer, shard, slot);
                handler.handshaken = true;
                handler.next_partition.set(next_partition);
                handler.placement = Placement::arrived();
                spawn_serving(handler, stream, &stopped, unread);
            }
            MovedProtocol::Kafka(moved) => {
                let handler = crate::kafka::connection::KafkaConnection::arrived(
                    shared.clone(),
                    peer,
                    shard,
                    slot,
                    moved,
                );
                spawn_serving(handler, stream, &stopped, unread);
            }
        }
    }
}

/// What a native client past `connections_max` is told.
fn native_refusal() -> Vec<u8> {
    response_frame(
        0,
        Response::Error {
            code: ErrorCode::TooManyRequests,
            message: "connections_max reached; try again later",
        },
        &[],
    )
}

fn response_frame(correlation_id: u32, response: Response<'_>, trailing: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + trailing.len());
    encode_frame_vec(
        &ResponseFrame {
            correlation_id,
            response,
        },
        trailing.len() as u32,
        &mut out,
    );
    out.extend_from_slice(trailing);
    out
}

fn error_frame(correlation_id: u32, error: &OpError) -> Vec<u8> {
    response_frame(
        correlation_id,
        Response::Error {
            code: error.code,
            message: &error.message,
        },
        &[],
    )
}

/// Counts a connection's requests in flight (until their answer is written)
/// and wakes the reader when one ends. A client that stops reading its
/// answers therefore stops being read: memory stays bounded.
#[derive(Default)]
pub(crate) struct InFlight {
    pub(crate) count: Cell<u32>,
    closed: Cell<bool>,
    waiter: RefCell<Option<oneshot::Sender<()>>>,
}

impl InFlight {
    fn wake(&self) {
        if let Some(waiter) = self.waiter.borrow_mut().take() {
            let _ = waiter.send(());
        }
    }

    pub(crate) fn finish(&self, requests: u32) {
        self.count.set(self.count.get().saturating_sub(requests));
        self.wake();
    }

    /// The writer is gone: nothing in flight will be answered any more.
    fn close(&self) {
        self.closed.set(true);
        self.count.set(0);
        self.wake();
    }

    pub(crate) async fn below(&self, limit: u32) {
        while self.count.get() >= limit && !self.closed.get() {
            let (sender, receiver) = oneshot::channel();
            *self.waiter.borrow_mut() = Some(sender);
            let _ = receiver.await;
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    writer: Option<mpsc::UnboundedSender<Answer>>,
    in_flight: Rc<InFlight>,
    view: TopicView,
    handshaken: bool,
    next_partition: Cell<u32>,
    /// The shard serving this connection.
    shard: usize,
    placement: Placement,
    /// The shard to move to before the next frame, once a run of produces
    /// to another shard's partitions asked for it.
    pending_move: Option<usize>,
    /// The connection's place under `connections_max`, handed on when it moves.
    slot: Option<ConnectionSlot>,
}

/// One counted connection: frees its place under `connections_max` when
/// dropped, on whichever shard the connection ended.
pub(crate) struct ConnectionSlot(pub(crate) Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.remove_connection();
    }
}

/// Produces in a row to partitions of one other shard before a connection
/// moves there.
const MOVE_AFTER_PRODUCES: u32 = 8;
/// A connection moves at most once in this long, so a producer alternating
/// between shards cannot keep it moving.
const MOVE_INTERVAL: Duration = Duration::from_secs(2);

/// What decides whether a connection moves: its run of produces to
/// partitions owned by one other shard.
#[derive(Default)]
pub(crate) struct Placement {
    run_shard: usize,
    run: u32,
    moved_at: Option<Instant>,
}

impl Placement {
    /// For a connection that has just arrived: it stays put for a while.
    pub(crate) fn arrived() -> Self {
        Self {
            moved_at: Some(Instant::now()),
            ..Self::default()
        }
    }

    /// Notes a produce to partitions all owned by `owner` (`None`: owned by
    /// several shards, or unknown), on a connection served by `here`.
    /// Returns the shard the connection should move to, if it should.
    pub(crate) fn note_produce(&mut self, owner: Option<usize>, here: usize) -> Option<usize> {
        match owner {
            Some(owner) if owner != here => {
                if owner != self.run_shard {
                    self.run_shard = owner;
                    self.run = 0;
                }
                self.run = self.run.saturating_add(1);
            }
            _ => self.run = 0,
        }
        let settled = self
            .moved_at
            .is_some_and(|moved| moved.elapsed() < MOVE_INTERVAL);
        (self.run >= MOVE_AFTER_PRODUCES && !settled).then_some(self.run_shard)
    }
}

/// Counts a move and hands the connection to `to`'s acceptor.
pub(crate) fn send_moved(shared: &Shared, from: usize, to: usize, moved: MovedConnection) {
    tracing::debug!(peer = %moved.peer, from, to, "connection moves to the shard it produces to");
    shared
        .metrics
        .connections_moved
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared.move_connection(to, moved);
}

/// Whether connections may move on this broker: plaintext, more than one
/// shard, and `node.move_connections` on.
pub(crate) fn moves_allowed(shared: &Shared) -> bool {
    shared.tls.is_none() && shared.config.node.move_connections && shared.shards() > 1
}

/// What a moved connection's protocol carries over.
pub(crate) enum MovedProtocol {
    Native { next_partition: u32 },
    Kafka(crate::kafka::connection::MovedKafka),
}

/// A plaintext native or Kafka connection on its way to the shard that owns
/// what it produces to: the socket, the bytes read but not yet handled,
/// and its place under `connections_max`.
pub struct MovedConnection {
    pub(crate) stream: std::net::TcpStream,
    pub(crate) unread: BytesMut,
    pub(crate) peer: SocketAddr,
    pub(crate) protocol: MovedProtocol,
    pub(crate) slot: Option<ConnectionSlot>,
}

/// What the writer task sends: a whole frame, or a frame header followed by
/// a large payload written without copying the two together.
pub(crate) enum Outgoing {
    Frame(Vec<u8>),
    HeaderAndPayload(Vec<u8>, Vec<u8>),
    /// Nothing to answer, but TLS has handshake or alert bytes to send.
    Flush,
    /// The last item: write what is pending, then stop without closing the
    /// socket, which moves to another shard.
    Release,
    /// A frame header, segment file ranges sent with splice (no copy through
    /// user space), then bytes from memory.
    Ranges {
        header: Vec<u8>,
        ranges: Vec<SendRange>,
        tail: Vec<u8>,
    },
}

impl Outgoing {
    /// Bytes of memory the answer holds (file ranges hold none).
    fn bytes(&self) -> u64 {
        match self {
            Self::Frame(frame) => frame.len() as u64,
            Self::HeaderAndPayload(header, payload) => (header.len() + payload.len()) as u64,
            Self::Flush | Self::Release => 0,
            Self::Ranges { header, tail, .. } => (header.len() + tail.len()) as u64,
        }
    }
}

/// Queues an answer for the writer, counting its bytes against the broker's
/// buffer budget until the writer takes it. Returns whether it was queued.
pub(crate) fn queue_answer(
    writer: &mpsc::UnboundedSender<Answer>,
    budget: &super::BufferBudget,
    item: Outgoing,
    counted: bool,
) -> bool {
    let bytes = item.bytes();
    budget.take(bytes);
    let queued = writer.unbounded_send((item, counted)).is_ok();
    if !queued {
        budget.give_back(bytes);
    }
    queued
}

/// Whether a fetch's segment ranges go to the writer as descriptors, to be
/// sent there without a copy, rather than read into memory by the request's
/// task. Never over TLS: rustls needs the bytes. Ranges all in the page
/// cache: yes, on either driver ([`crate::io::sendfile`]). Otherwise only
/// buffered segments on io_uring, which the writer splices (the polling
/// driver would block on splice; direct-I/O segments are not in the page
/// cache, and one large read beats splicing them in pipe-sized steps).
pub(crate) fn send_as_ranges(shared: &Shared, direct_io: bool, ranges: &[SendRange]) -> bool {
    use std::os::fd::AsFd;
    if shared.tls.is_some() || ranges.is_empty() {
        return false;
    }
    let uring = shared.driver.driver == crate::io::IoDriver::IoUring;
    (uring && !direct_io)
        || ranges.iter().all(|range| {
            crate::io::sendfile::range_cached(range.fd.as_fd(), range.position, range.length)
                == Some(true)
        })
}

/// Sends one file range of an answer the cheapest way it can go: with
/// sendfile when it is in the page cache (and the socket could be made
/// non-blocking), else spliced through `pipe` on io_uring, else read into
/// memory and written.
async fn send_file_range(
    stream: &TcpStream,
    sender: &RangeSender,
    pipe: &mut Option<(compio::fs::pipe::Receiver, compio::fs::pipe::Sender)>,
    range: SendRange,
) -> std::io::Result<()> {
    use super::metrics::FetchPath;
    use std::os::fd::AsFd;
    let length = range.length;
    if let Some(poll) = &sender.poll
        && crate::io::sendfile::range_cached(range.fd.as_fd(), range.position, length) == Some(true)
    {
        crate::io::sendfile::send_range(poll, range.fd.as_fd(), range.position, length).await?;
        sender
            .shared
            .metrics
            .record_fetch_sent(FetchPath::Sendfile, length);
        return Ok(());
    }
    if sender.splice {
        if pipe.is_none() {
            *pipe = Some(splice_pipe().await?);
        }
        if let Some(pipe) = pipe.as_ref() {
            splice_range(stream, sender.poll.as_ref(), pipe, range).await?;
            sender
                .shared
                .metrics
                .record_fetch_sent(FetchPath::Splice, length);
            return Ok(());
        }
    }
    // Read into memory after all (the range left the page cache since the
    // answer was made, or the driver cannot splice): the bytes count
    // against the buffer budget while they are held.
    let budget = &sender.shared.buffers;
    budget.take(length);
    let sent = async {
        let bytes = read_fetch_ranges(&sender.shared, vec![range]).await?;
        let mut stream = stream;
        stream.write_all(bytes).await.0
    }
    .await;
    budget.give_back(length);
    sent
}

/// What a connection's writer needs to send file ranges.
struct RangeSender {
    /// A poll handle on the socket, made non-blocking so a full socket
    /// buffer cannot block the shard in sendfile (`None` if that failed).
    poll: Option<compio::runtime::fd::PollFd<std::os::fd::OwnedFd>>,
    /// The driver is io_uring: ranges not in the page cache are spliced.
    splice: bool,
    shared: Arc<Shared>,
}

/// Bytes a connection's splice pipe holds (it is resized to this).
const PIPE_BYTES: usize = 1024 * 1024;

/// Moves a file range to the socket through a pipe with splice: the bytes
/// go from the page cache to the socket without entering user space.
async fn splice_range(
    stream: &TcpStream,
    poll: Option<&compio::runtime::fd::PollFd<std::os::fd::OwnedFd>>,
    pipe: &(compio::fs::pipe::Receiver, compio::fs::pipe::Sender),
    range: SendRange,
) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor is ours (a dup made by the owning shard).
    let file = unsafe { compio::fs::File::from_raw_fd(range.fd.into_raw_fd()) };
    let mut position = range.position;
    let mut remaining = range.length;
    while remaining > 0 {
        let chunk = remaining.min(PIPE_BYTES as u64) as usize;
        let moved = compio::fs::pipe::splice(&file, &pipe.1, chunk)
            .offset_in(position as i64)
            .await?;
        if moved == 0 {
            return Err(crate::io::direct::shorter_than_range());
        }
        let mut in_pipe = moved;
        while in_pipe > 0 {
            let sent = match compio::fs::pipe::splice(&pipe.0, stream, in_pipe).await {
                Ok(sent) => sent,
                // A non-blocking socket (see `poll_handle`) with a full
                // buffer: wait for room, then splice the rest.
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    let Some(poll) = poll else {
                        return Err(error);
                    };
                    poll.write_ready().await?;
                    continue;
                }
                Err(error) => return Err(error),
            };
            if sent == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "socket closed",
                ));
            }
            in_pipe -= sent;
        }
        position += moved as u64;
        remaining -= moved as u64;
    }
    Ok(())
}

/// A pipe for splicing, sized to [`PIPE_BYTES`] where the kernel allows.
async fn splice_pipe() -> std::io::Result<(compio::fs::pipe::Receiver, compio::fs::pipe::Sender)> {
    use std::os::fd::AsRawFd;
    let (receiver, sender) = compio::fs::pipe::anonymous().await?;
    // SAFETY: fcntl on a descriptor we own; failure keeps the default size.
    unsafe {
        libc::fcntl(
            sender.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_BYTES as libc::c_int,
        )
    };
    Ok((receiver, sender))
}

use crate::tls::{TlsSession, encrypt};

/// Frames up to this size are coalesced into one write.
const COALESCE_BYTES_MAX: usize = 256 * 1024;

/// An answer for the writer, and whether it ends a counted request.
pub(crate) type Answer = (Outgoing, bool);

pub(crate) async fn write_loop(
    stream: TcpStream,
    outgoing: mpsc::UnboundedReceiver<Answer>,
    in_flight: Rc<InFlight>,
    tls: Option<TlsSession>,
    shared: Arc<Shared>,
) {
    // Answers leave the budget as the writer takes them from the queue.
    let budget = &shared.buffers;
    let outgoing = outgoing.map(|(item, counted)| {
        budget.give_back(item.bytes());
        (item, counted)
    });
    let mut outgoing: AnswerStream<'_> = Box::pin(outgoing);
    match tls {
        Some(session) => write_answers_tls(stream, &mut outgoing, &in_flight, &session).await,
        None => {
            let sender = RangeSender {
                poll: None,
                splice: shared.driver.driver == crate::io::IoDriver::IoUring,
                shared: shared.clone(),
            };
            write_answers(stream, &mut outgoing, &in_flight, sender).await
        }
    }
    // Whatever is still queued is dropped: give its bytes back.
    while let Some(Some(_)) = outgoing.next().now_or_never() {}
    in_flight.close();
}

/// The writer's view of its queue.
type AnswerStream<'a> = std::pin::Pin<Box<dyn futures_util::Stream<Item = Answer> + 'a>>;

/// A fetch's segment ranges read into memory to be written (the `read`
/// path of `rill_fetch_sent_bytes_total`).
pub(crate) async fn read_fetch_ranges(
    shared: &Shared,
    ranges: Vec<SendRange>,
) -> std::io::Result<Vec<u8>> {
    let length: u64 = ranges.iter().map(|range| range.length).sum();
    shared
        .metrics
        .record_fetch_sent(super::metrics::FetchPath::Read, length);
    read_ranges_async(ranges).await
}

/// Reads file ranges into one buffer through the shard's I/O driver (one
/// large read per range).
pub(crate) async fn read_ranges_async(ranges: Vec<SendRange>) -> std::io::Result<Vec<u8>> {
    let total: u64 = ranges.iter().map(|range| range.length).sum();
    let (result, bytes) =
        read_ranges_into(ranges, Vec::with_capacity(total as usize), &mut Vec::new()).await;
    result.map(|()| bytes)
}

/// [`read_ranges_async`] appending to `bytes`, which comes back either way
/// (a reader that keeps one buffer reuses its pages). Ranges of segments
/// written with direct I/O are read with direct I/O too, staged in
/// `scratch` ([`crate::io::direct`]).
pub(crate) async fn read_ranges_into(
    ranges: Vec<SendRange>,
    mut bytes: Vec<u8>,
    scratch: &mut Vec<u8>,
) -> (std::io::Result<()>, Vec<u8>) {
    use compio::buf::{IntoInner, IoBuf};
    use compio::io::AsyncReadAt;
    use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
    let total: u64 = ranges.iter().map(|range| range.length).sum();
    bytes.reserve(total as usize);
    for range in ranges {
        if range.direct
            && let Some(file) = crate::io::direct::open(range.fd.as_fd())
        {
            let (result, returned) = crate::io::direct::read_into(
                &file,
                range.position,
                range.length as usize,
                &mut bytes,
                std::mem::take(scratch),
            )
            .await;
            *scratch = returned;
            if let Err(error) = result {
                return (Err(error), bytes);
            }
            continue;
        }
        // SAFETY: the descriptor is ours (a dup made by the owning shard).
        let file = unsafe { compio::fs::File::from_raw_fd(range.fd.into_raw_fd()) };
        let mut position = range.position;
        let end = bytes.len() + range.length as usize;
        while bytes.len() < end {
            let start = bytes.len();
            let compio::BufResult(result, returned) =
                file.read_at(bytes.slice(start..end), position).await;
            bytes = returned.into_inner();
            let read = match result {
                Ok(read) => read,
                Err(error) => return (Err(error), bytes),
            };
            if read == 0 {
                return (Err(crate::io::direct::shorter_than_range()), bytes);
            }
            position += read as u64;
        }
    }
    (Ok(()), bytes)
}

async fn write_answers_tls(
    mut stream: TcpStream,
    outgoing: &mut AnswerStream<'_>,
    in_flight: &InFlight,
    session: &TlsSession,
) {
    while let Some((item, counted)) = outgoing.next().await {
        let ciphertext = match &item {
            Outgoing::Frame(frame) => encrypt(session, &[frame]),
            Outgoing::HeaderAndPayload(header, payload) => encrypt(session, &[header, payload]),
            Outgoing::Flush => encrypt(session, &[]),
            // TLS connections never move (their session stays on this shard).
            Outgoing::Release => {
                debug_assert!(false, "a TLS connection asked to move");
                Err(std::io::Error::other("a TLS connection cannot move"))
            }
            // Fetches on TLS connections never splice (answer() reads their
            // ranges): file ranges here are a programming error.
            Outgoing::Ranges { .. } => {
                debug_assert!(false, "file ranges queued on a TLS connection");
                Err(std::io::Error::other("file ranges cannot be sent over TLS"))
            }
        };
        let Ok(ciphertext) = ciphertext else {
            return;
        };
        if !ciphertext.is_empty() && stream.write_all(ciphertext).await.0.is_err() {
            return;
        }
        in_flight.finish(u32::from(counted));
    }
    // Say goodbye properly (close_notify), then close.
    session.borrow_mut().send_close_notify();
    if let Ok(ciphertext) = encrypt(session, &[]) {
        let _ = stream.write_all(ciphertext).await;
    }
    let _ = stream.shutdown().await;
}

async fn write_answers(
    mut stream: TcpStream,
    outgoing: &mut AnswerStream<'_>,
    in_flight: &InFlight,
    mut sender: RangeSender,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut pipe = None;
    let mut polled = false;
    // Requests whose answers sit in `pending`, finished once it is written.
    let mut answered = 0u32;
    while let Some(first) = outgoing.next().await {
        let mut next = Some(first);
        while let Some((item, counted)) = next.take() {
            match item {
                Outgoing::Frame(frame) if pending.len() + frame.len() <= COALESCE_BYTES_MAX => {
                    pending.extend_from_slice(&frame);
                }
                Outgoing::Frame(frame) => {
                    if !flush_pending(&mut stream, &mut pending, &mut answered, in_flight).await {
                        return;
                    }
                    if stream.write_all(frame).await.0.is_err() {
                        return;
                    }
                }
                Outgoing::Flush => {}
                Outgoing::Release => {
                    flush_pending(&mut stream, &mut pending, &mut answered, in_flight).await;
                    return;
                }
                Outgoing::Ranges {
                    header,
                    ranges,
                    tail,
                } => {
                    pending.extend_from_slice(&header);
                    if !polled {
                        use std::os::fd::AsFd;
                        sender.poll = crate::io::sendfile::poll_handle(stream.as_fd());
                        polled = true;
                    }
                    // The header goes straight from this thread, marked as
                    // followed by more, so it leaves in one segment with the
                    // first of the ranges rather than as a small one of its own.
                    let written = match &sender.poll {
                        Some(poll) => crate::io::sendfile::send_bytes(poll, &pending, true)
                            .await
                            .is_ok(),
                        None => {
                            let buffer = std::mem::take(&mut pending);
                            stream.write_all(buffer).await.0.is_ok()
                        }
                    };
                    pending.clear();
                    if !written {
                        return;
                    }
                    for range in ranges {
                        if let Err(error) =
                            send_file_range(&stream, &sender, &mut pipe, range).await
                        {
                            tracing::debug!(%error, "sending a file range failed");
                            return;
                        }
                    }
                    if !tail.is_empty() && stream.write_all(tail).await.0.is_err() {
                        return;
                    }
                    in_flight.finish(std::mem::take(&mut answered));
                }
                Outgoing::HeaderAndPayload(header, payload) => {
                    pending.extend_from_slice(&header);
                    let buffers = (std::mem::take(&mut pending), (payload,));
                    if stream.write_vectored_all(buffers).await.0.is_err() {
                        return;
                    }
                    in_flight.finish(std::mem::take(&mut answered));
                }
            }
            answered += u32::from(counted);
            if pending.is_empty() {
                in_flight.finish(std::mem::take(&mut answered));
            }
            // Take what else is queued before writing.
            next = outgoing.next().now_or_never().flatten();
        }
        if !flush_pending(&mut stream, &mut pending, &mut answered, in_flight).await {
            return;
        }
    }
    let _ = stream.shutdown().await;
}

/// Writes the coalesced answers, then finishes the requests they answer.
/// Returns `false` when the socket failed.
async fn flush_pending(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    answered: &mut u32,
    in_flight: &InFlight,
) -> bool {
    if !pending.is_empty() && stream.write_all(std::mem::take(pending)).await.0.is_err() {
        return false;
    }
    in_flight.finish(std::mem::take(answered));
    true
}

/// What a wire protocol plugs into [`serve_connection`].
pub(crate) trait FrameHandler {
    fn shared(&self) -> &Arc<Shared>;
    fn peer(&self) -> SocketAddr;
    fn in_flight(&self) -> &Rc<InFlight>;
    fn writer(&self) -> Option<&mpsc::UnboundedSender<Answer>>;
    fn set_writer(&mut self, writer: Option<mpsc::UnboundedSender<Answer>>);
    /// Splits the first whole frame off `buffer`: its body and the bytes it used.
    fn split(buffer: &[u8], frame_bytes_max: u32) -> Result<Option<(&[u8], usize)>, FrameError>;
    /// The whole length of the frame `buffer` starts with, once its prefix is in.
    fn declared_length(buffer: &[u8]) -> Option<usize>;
    /// Answers a frame that cannot be read; the connection closes after it.
    fn reject(&self, error: &FrameError);
    /// Handles one frame. Returns `false` when the connection must close.
    /// `body` shares the connection's read buffer: a handler keeps a slice of
    /// it only for as long as the request it carries is in flight, never
    /// longer (a kept slice holds the whole read buffer's allocation).
    async fn handle_frame(&mut self, body: &Bytes) -> bool;
    /// The largest frame [`FrameHandler::split`] is given as its limit.
    fn frame_bytes_max(&self) -> u32 {
        self.shared().config.limits.frame_bytes_max
    }
    /// Completes when the protocol ends the connection on its own (MQTT:
    /// a session taken over, a keep-alive timeout), which stops the reader
    /// as a shutdown does. `None`: only the client or a shutdown end it.
    fn close_signal(&self) -> Option<ShutdownSignal> {
        None
    }
    /// Called once when the reader has stopped, before the writer drains
    /// and closes, with why it stopped.
    async fn finish(&mut self, _ended: Ended) {}

    /// The shard the connection should move to before its next frame is
    /// handled, as the frames handled so far decided; `None` to stay. Only a
    /// handler whose connections can move ([`FrameHandler::hand_over`])
    /// answers anything but `None`, and never on a TLS connection.
    fn shard_to_move_to(&mut self) -> Option<usize> {
        None
    }

    /// Sends the connection, drained of requests in flight, to `shard`:
    /// its socket and the bytes read but not handled yet.
    fn hand_over(self, _stream: std::net::TcpStream, _unread: BytesMut, _shard: usize)
    where
        Self: Sized,
    {
    }
}

/// Why a connection's reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The client closed the socket, or it failed.
    PeerClosed,
    /// The broker is shutting down.
    ShuttingDown,
    /// The handler closed it (a bad frame, the protocol's own close).
    Closed,
}

/// Serves one connection of any wire protocol: reads frames, hands each to
/// the protocol's handler in arrival order, and bounds what is buffered by
/// the requests in flight and the broker-wide buffer budget.
pub(crate) async fn serve_connection<H: FrameHandler>(
    mut handler: H,
    stream: TcpStream,
    stopped: ShutdownSignal,
    unread: BytesMut,
) {
    let _ = stream.set_nodelay(true);
    let tls = match &handler.shared().tls {
        Some(config) => match rustls::ServerConnection::new(config.clone()) {
            Ok(mut session) => {
                // In-flight limits bound what is buffered, not rustls.
                session.set_buffer_limit(None);
                Some(Rc::new(RefCell::new(rustls::Connection::Server(session))))
            }
            Err(error) => {
                tracing::warn!(peer = %handler.peer(), %error, "TLS session could not start");
                return;
            }
        },
        None => None,
    };
    let (writer, frames) = mpsc::unbounded();
    handler.set_writer(Some(writer));
    let writer_task = crate::io::home::spawn(write_loop(
        stream.clone(),
        frames,
        handler.in_flight().clone(),
        tls.clone(),
        handler.shared().clone(),
    ));
    let writer_for_flush = handler.writer().cloned();
    let mut reader = stream;
    let limits = &handler.shared().config.limits;
    let frame_bytes_max = handler.frame_bytes_max();
    let closed = handler.close_signal();
    let mut ended = Ended::Closed;
    let mut moving = None;
    let in_flight_max = limits.requests_in_flight_max.max(1);
    // A moved connection starts with the frames its last shard read. Frames
    // are split off the front as `Bytes`, so a produce's batch reaches its
    // shard without being copied out of the buffer it was read into.
    let mut buffer = unread;
    buffer.reserve(READ_BUFFER_BYTES.saturating_sub(buffer.len()));
    // The read buffer's capacity counts against the broker's buffer budget.
    let shared = handler.shared().clone();
    let budget = &shared.buffers;
    let mut accounted = buffer.capacity() as u64;
    budget.take(accounted);
    let account = |buffer: &BytesMut, accounted: &mut u64| {
        let now = buffer.capacity() as u64;
        if now > *accounted {
            budget.take(now - *accounted);
        } else {
            budget.give_back(*accounted - now);
        }
        *accounted = now;
    };
    'connection: loop {
        loop {
            match H::split(&buffer, frame_bytes_max) {
                Ok(Some((body, used))) => {
                    if tls.is_none()
                        && let Some(shard) = handler.shard_to_move_to()
                    {
                        moving = Some(shard);
                        break 'connection;
                    }
                    let body_start = body.as_ptr() as usize - buffer.as_ptr() as usize;
                    let body_end = body_start + body.len();
                    let body = buffer.split_to(used).freeze().slice(body_start..body_end);
                    // Frames already read wait too: the limits hold per request.
                    handler.in_flight().below(in_flight_max).await;
                    // Over the broker-wide budget a connection keeps at most
                    // one request in flight, so stalled clients holding the
                    // budget cannot starve everyone else.
                    while budget.exceeded()
                        && handler.in_flight().count.get() > 0
                        && !shared.is_shutting_down()
                    {
                        compio::time::sleep(Duration::from_millis(BUDGET_RECHECK_MS)).await;
                    }
                    if !handler.handle_frame(&body).await {
                        break 'connection;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    handler.reject(&error);
                    break 'connection;
                }
            }
        }
        handler.in_flight().below(in_flight_max).await;
        if shared.is_shutting_down() {
            ended = Ended::ShuttingDown;
            break;
        }
        // Room for the rest of the frame being read (bounded by frame_bytes_max).
        let wanted = match H::declared_length(&buffer) {
            Some(declared) => declared.saturating_sub(buffer.len()).max(4096),
            None => READ_BUFFER_BYTES,
        };
        buffer.reserve(wanted);
        account(&buffer, &mut accounted);
        // Over the broker-wide budget, read nothing new while answers of
        // this connection are pending.
        while budget.exceeded() && handler.in_flight().count.get() > 0 && !shared.is_shutting_down()
        {
            compio::time::sleep(Duration::from_millis(BUDGET_RECHECK_MS)).await;
        }
        let read = select(
            Box::pin(crate::tls::read_plaintext(
                &mut reader,
                tls.as_ref(),
                || {
                    if let Some(writer) = writer_for_flush.as_ref() {
                        let _ = writer.unbounded_send((Outgoing::Flush, false));
                    }
                },
                std::mem::take(&mut buffer),
            )),
            select(
                stopped.clone(),
                match &closed {
                    Some(closed) => Either::Left(closed.clone()),
                    None => Either::Right(futures_util::future::pending()),
                },
            ),
        )
        .await;
        match read {
            Either::Left((compio::BufResult(result, returned), _)) => {
                buffer = returned;
                match result {
                    Ok(0) | Err(_) => {
                        ended = Ended::PeerClosed;
                        break;
                    }
                    Ok(_) => {}
                }
            }
            Either::Right((Either::Left(_), _)) => {
                ended = Ended::ShuttingDown;
                break;
            }
            Either::Right((Either::Right(_), _)) => break,
        }
        if buffer.capacity() > 4 * READ_BUFFER_BYTES && buffer.len() < READ_BUFFER_BYTES {
            let mut smaller = BytesMut::with_capacity(READ_BUFFER_BYTES);
            smaller.extend_from_slice(&buffer);
            buffer = smaller;
            account(&buffer, &mut accounted);
        }
    }
    budget.give_back(accounted);
    if let Some(shard) = moving {
        // Every frame read but not yet handled is served there.
        move_connection(
            handler,
            reader,
            writer_task,
            writer_for_flush,
            buffer,
            shard,
        )
        .await;
        return;
    }
    drop(buffer);
    handler.finish(ended).await;
    // Finish what is in flight, then let the writer drain and close.
    handler.in_flight().below(1).await;
    handler.set_writer(None);
    drop(writer_for_flush);
    let _ = writer_task.await;
}

/// Moves a plaintext connection to `shard`: waits until every request in
/// flight is answered, lets the writer write what it holds and stop, then
/// hands the socket and the unread bytes over. The requests already queued
/// at their owners are answered before any request read after them.
async fn move_connection<H: FrameHandler>(
    mut handler: H,
    reader: TcpStream,
    writer_task: compio::runtime::JoinHandle<()>,
    writer_for_flush: Option<mpsc::UnboundedSender<Answer>>,
    unread: BytesMut,
    shard: usize,
) {
    handler.in_flight().below(1).await;
    if let Some(writer) = &writer_for_flush {
        let _ = writer.unbounded_send((Outgoing::Release, false));
    }
    handler.set_writer(None);
    drop(writer_for_flush);
    let _ = writer_task.await;
    use std::os::fd::AsFd;
    // The socket goes on as a descriptor of its own; this shard's runtime
    // closes its own when `reader` drops, with nothing pending on it.
    let stream = reader.as_fd().try_clone_to_owned();
    drop(reader);
    match stream {
        Ok(stream) => handler.hand_over(std::net::TcpStream::from(stream), unread, shard),
        Err(error) => {
            tracing::warn!(peer = %handler.peer(), %error, "a connection could not move; closing it");
        }
    }
}

impl FrameHandler for Connection {
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
        self.writer = writer;
    }

    fn split(buffer: &[u8], frame_bytes_max: u32) -> Result<Option<(&[u8], usize)>, FrameError> {
        split_frame(buffer, frame_bytes_max)
    }

    fn declared_length(buffer: &[u8]) -> Option<usize> {
        let prefix: [u8; 4] = buffer.get(..4)?.try_into().ok()?;
        Some(u32::from_le_bytes(prefix) as usize + 4)
    }

    fn reject(&self, error: &FrameError) {
        self.shared
            .metrics
            .frames_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(peer = %self.peer, %error, "closing connection after a bad frame");
        let code = match error {
            FrameError::TooLarge { .. } => ErrorCode::InvalidRequest,
            _ => ErrorCode::InvalidRequest,
        };
        self.send_frame(error_frame(0, &OpError::new(code, error.to_string())));
    }

    /// A producer whose produces keep going to partitions of one other
    /// shard moves there: every batch would otherwise cross threads twice
    /// (to the owner and the answer back), which costs the broker more CPU
    /// than writing the batch. The decision is taken as a produce is
    /// handled ([`Connection::note_produce`]).
    fn shard_to_move_to(&mut self) -> Option<usize> {
        self.pending_move.take()
    }

    fn hand_over(mut self, stream: std::net::TcpStream, unread: BytesMut, shard: usize) {
        let moved = MovedConnection {
            stream,
            unread,
            peer: self.peer,
            protocol: MovedProtocol::Native {
                next_partition: self.next_partition.get(),
            },
            slot: self.slot.take(),
        };
        send_moved(&self.shared, self.shard, shard, moved);
    }

    /// Handles one frame. Returns `false` when the connection must close.
    async fn handle_frame(&mut self, body: &Bytes) -> bool {
        let frame = match RequestFrame::decode(body) {
            Ok(frame) => frame,
            Err(error) => {
                self.reject(&error);
                return false;
            }
        };
        let correlation_id = frame.correlation_id;
        if !self.handshaken {
            return match frame.request {
                Request::Handshake {
                    protocol_version,
                    client_id,
                } if protocol_version >= 1 => {
                    self.handshaken = true;
                    tracing::debug!(peer = %self.peer, client_id, protocol_version, "client connected");
                    let response = Response::HandshakeOk {
                        protocol_version: protocol_version.min(PROTOCOL_VERSION),
                        broker_version: env!("CARGO_PKG_VERSION"),
                        frame_bytes_max: self.shared.config.limits.frame_bytes_max,
                    };
                    self.send_frame(response_frame(correlation_id, response, &[]));
                    true
                }
                Request::Handshake {
                    protocol_version, ..
                } => {
                    let message = format!(
                        "protocol version {protocol_version} is not supported; this broker speaks 1 to {PROTOCOL_VERSION}"
                    );
                    self.send_frame(error_frame(
                        correlation_id,
                        &OpError::new(ErrorCode::UnsupportedVersion, message),
                    ));
                    false
                }
                _ => {
                    let error =
                        OpError::new(ErrorCode::HandshakeRequired, "send a handshake first");
                    self.send_frame(error_frame(correlation_id, &error));
                    false
                }
            };
        }
        self.shared.topics.refresh(&mut self.view);
        self.in_flight.count.set(self.in_flight.count.get() + 1);
        let started = Instant::now();
        match frame.request {
            Request::Produce {
                topic,
                target,
                acks,
                batch,
            } => {
                // Only a named partition or key of a topic the connection
                // already knew counts towards a move.
                let placed = !matches!(target, Target::Any) && self.view.table.contains_key(topic);
                let batch = batch_bytes(body, batch);
                let pending = self.dispatch_produce(topic, target, acks, batch).await;
                self.note_produce(topic, placed, &pending);
                let task = self.finish_produce(correlation_id, acks, pending, started);
                crate::io::home::spawn(task).detach();
            }
            Request::Handshake { .. } => {
                let error = OpError::new(
                    ErrorCode::InvalidRequest,
                    "second handshake on one connection",
                );
                self.send_frame(error_frame(correlation_id, &error));
                self.in_flight.finish(1);
                return false;
            }
            request => {
                let shared = self.shared.clone();
                let writer = self.writer.clone();
                let in_flight = self.in_flight.clone();
                // A fetch's answer is held against the budget from dispatch
                // on, so many fetches in flight cannot overshoot it.
                let reserved = match request {
                    Request::Fetch { max_bytes, .. } => {
                        u64::from(max_bytes.min(self.shared.config.limits.fetch_bytes_max))
                    }
                    _ => 0,
                };
                shared.buffers.take(reserved);
                // The task owns a copy of the frame (requests other than
                // produce are small) and decodes its request from it.
                let body = body.to_vec();
                let view = self.view.clone();
                crate::io::home::spawn(async move {
                    let answered = match RequestFrame::decode(&body) {
                        Ok(frame) => answer(&shared, &view, frame.request).await,
                        Err(error) => {
                            Err(OpError::new(ErrorCode::InvalidRequest, error.to_string()))
                        }
                    };
                    let frame = match answered {
                        Ok(frame) => frame(correlation_id),
                        Err(error) => Outgoing::Frame(error_frame(correlation_id, &error)),
                    };
                    let queued = writer
                        .is_some_and(|writer| queue_answer(&writer, &shared.buffers, frame, true));
                    shared.buffers.give_back(reserved);
                    if !queued {
                        in_flight.finish(1);
                    }
                })
                .detach();
            }
        }
        true
    }
}

impl Connection {
    /// A connection just accepted (and counted) on `shard`.
    fn new(shared: Arc<Shared>, peer: SocketAddr, shard: usize) -> Self {
        let slot = ConnectionSlot(shared.clone());
        Self::with_slot(shared, peer, shard, Some(slot))
    }

    fn with_slot(
        shared: Arc<Shared>,
        peer: SocketAddr,
        shard: usize,
        slot: Option<ConnectionSlot>,
    ) -> Self {
        let view = shared.topics.snapshot();
        Self {
            slot,
            shared,
            peer,
            writer: None,
            in_flight: Rc::new(InFlight::default()),
            view,
            handshaken: false,
            next_partition: Cell::new(0),
            shard,
            placement: Placement::default(),
            pending_move: None,
        }
    }

    /// Notes where a produce went, for the move rule ([`Placement`]): its
    /// partition's owner when `placed` and it was dispatched, else nothing.
    fn note_produce(
        &mut self,
        topic: &str,
        placed: bool,
        pending: &Result<PendingAppend, OpError>,
    ) {
        if !moves_allowed(&self.shared) {
            return;
        }
        let owner = match pending {
            Ok((partition, _)) if placed => Some(shard_of(topic, *partition, self.shared.shards())),
            _ => None,
        };
        self.pending_move = self.placement.note_produce(owner, self.shard);
    }

    fn send_frame(&self, frame: Vec<u8>) {
        if let Some(writer) = &self.writer {
            queue_answer(writer, &self.shared.buffers, Outgoing::Frame(frame), false);
        }
    }

    /// Resolves the partition and queues the append at its owner, in arrival order.
    async fn dispatch_produce(
        &mut self,
        topic: &str,
        target: Target<'_>,
        acks: Acks,
        batch: Bytes,
    ) -> Result<PendingAppend, OpError> {
        let meta = match self.view.table.get(topic) {
            Some(meta) => meta.clone(),
            None => {
                let meta = ensure_topic(&self.shared, topic).await?;
                self.shared.topics.refresh(&mut self.view);
                meta
            }
        };
        let partition = match target {
            Target::Partition(partition) if partition < meta.partitions => partition,
            Target::Partition(partition) => {
                return Err(OpError::new(
                    ErrorCode::UnknownPartition,
                    format!(
                        "topic {topic} has partitions 0..{}, not {partition}",
                        meta.partitions
                    ),
                ));
            }
            Target::Key(key) => partition_for_key(key, meta.partitions),
            Target::Any => {
                let next = self.next_partition.get();
                self.next_partition.set(next.wrapping_add(1));
                next % meta.partitions
            }
        };
        let owner = shard_of(topic, partition, self.shared.shards());
        let (reply, answer) = oneshot::channel();
        self.shared.send(
            owner,
            ShardOp::Produce {
                key: (topic.to_string(), partition),
                batch,
                acks,
                reply,
            },
        )?;
        Ok((partition, answer))
    }

    fn finish_produce(
        &self,
        correlation_id: u32,
        acks: Acks,
        pending: Result<PendingAppend, OpError>,
        started: Instant,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let writer = self.writer.clone();
        let in_flight = self.in_flight.clone();
        let shared = self.shared.clone();
        async move {
            let result = match pending {
                Ok((partition, answer)) => answer
                    .await
                    .unwrap_or_else(|_| {
                        Err(OpError::new(ErrorCode::ShuttingDown, "the shard stopped"))
                    })
                    .map(|info| (partition, info)),
                Err(error) => Err(error),
            };
            shared.metrics.produce_latency.record(started.elapsed());
            let frame = match result {
                Ok(_) if acks == Acks::None => None,
                Ok((partition, info)) => Some(response_frame(
                    correlation_id,
                    Response::Produced {
                        partition,
                        base_offset: info.base_offset,
                        last_offset: info.last_offset,
                        log_append_time_ms: info.log_append_time_ms,
                    },
                    &[],
                )),
                // Fire-and-forget producers get no answer, not even errors.
                Err(_) if acks == Acks::None => None,
                Err(error) => Some(error_frame(correlation_id, &error)),
            };
            let queued = match (frame, writer) {
                (Some(frame), Some(writer)) => {
                    queue_answer(&writer, &shared.buffers, Outgoing::Frame(frame), true)
                }
                _ => false,
            };
            if !queued {
                in_flight.finish(1);
            }
        }
    }
}

/// The partition a produce went to and the answer its shard will give.
type PendingAppend = (
    u32,
    oneshot::Receiver<Result<rill_core::log::AppendInfo, OpError>>,
);

type FrameBuilder = Box<dyn FnOnce(u32) -> Outgoing>;

fn reply(response: Response<'static>) -> FrameBuilder {
    Box::new(move |correlation_id| Outgoing::Frame(response_frame(correlation_id, response, &[])))
}

fn reply_owned(response: impl FnOnce() -> Response<'static> + 'static) -> FrameBuilder {
    Box::new(move |correlation_id| Outgoing::Frame(response_frame(correlation_id, response(), &[])))
}

pub(crate) fn topic_meta(view: &TopicView, topic: &str) -> Result<TopicMeta, OpError> {
    view.table.get(topic).cloned().ok_or_else(|| {
        OpError::new(
            ErrorCode::UnknownTopic,
            format!("topic {topic} does not exist"),
        )
    })
}

pub(crate) fn owner_of(
    shared: &Shared,
    view: &TopicView,
    topic: &str,
    partition: u32,
) -> Result<usize, OpError> {
    let meta = topic_meta(view, topic)?;
    if partition >= meta.partitions {
        return Err(OpError::new(
            ErrorCode::UnknownPartition,
            format!(
                "topic {topic} has partitions 0..{}, not {partition}",
                meta.partitions
            ),
        ));
    }
    Ok(shard_of(topic, partition, shared.shards()))
}

async fn topic_infos(
    shared: &Shared,
    view: &TopicView,
    only: Option<&str>,
) -> Result<Vec<TopicInfo>, OpError> {
    if let Some(topic) = only {
        topic_meta(view, topic)?;
    }
    let stats = shared.partition_stats().await;
    Ok(view
        .table
        .iter()
        .filter(|(name, _)| only.is_none_or(|only| only == name.as_str()))
        .map(|(name, meta)| TopicInfo {
            name: name.clone(),
            partitions: stats
                .iter()
                .filter(|stats| &stats.topic == name)
                .map(|stats| PartitionInfo {
                    partition: stats.partition,
                    shard: stats.shard,
                    log_start_offset: stats.log_start_offset,
                    next_offset: stats.next_offset,
                    size_bytes: stats.size_bytes,
                })
                .collect(),
            settings: settings_text(&meta.settings),
        })
        .collect())
}

/// A fetch as the connection hands it to the owning shard.
pub(crate) struct FetchRequest {
    pub owner: usize,
    pub key: (String, u32),
    pub offset: i64,
    pub max_bytes: u64,
    pub min_bytes: u64,
    pub max_wait: Duration,
}

pub(crate) async fn fetch_with_wait(
    shared: &Shared,
    request: FetchRequest,
) -> Result<FetchData, OpError> {
    let FetchRequest {
        owner,
        key,
        offset,
        max_bytes,
        min_bytes,
        max_wait,
    } = request;
    let fetch_once = || {
        shared.call(owner, |reply| ShardOp::Fetch {
            key: key.clone(),
            offset,
            max_bytes,
            read_direct: false,
            reply,
        })
    };
    let deadline = Instant::now() + max_wait;
    loop {
        let data = fetch_once().await??;
        let remaining = deadline.saturating_duration_since(Instant::now());
        // The read stopped at the budget, not the end of the log: more
        // waiting cannot add to this answer.
        let budget_limited = data.total_bytes() > 0 && data.next_offset < data.high_watermark;
        if budget_limited
            || data.total_bytes() >= min_bytes.clamp(1, max_bytes)
            || remaining.is_zero()
            || shared.is_shutting_down()
        {
            return Ok(data);
        }
        let (reply, woken) = oneshot::channel();
        shared.send(
            owner,
            ShardOp::WaitForData {
                key: key.clone(),
                offset: data.next_offset.max(offset),
                reply,
            },
        )?;
        // Either new data arrived or the wait is over: fetch once more.
        let _ = compio::time::timeout(remaining, woken).await;
        if Instant::now() >= deadline {
            return fetch_once().await?;
        }
    }
}

async fn answer(
    shared: &Shared,
    view: &TopicView,
    request: Request<'_>,
) -> Result<FrameBuilder, OpError> {
    let limits = &shared.config.limits;
    Ok(match request {
        Request::Ping => reply(Response::Pong),
        Request::Fetch {
            topic,
            partition,
            offset,
            max_bytes,
            min_bytes,
            max_wait_ms,
        } => {
            let started = Instant::now();
            let owner = owner_of(shared, view, topic, partition)?;
            let direct_io = topic_meta(view, topic)?.settings.direct_io;
            let max_bytes = u64::from(max_bytes.min(limits.fetch_bytes_max).max(1));
            let max_wait =
                Duration::from_millis(u64::from(max_wait_ms).min(limits.fetch_wait_ms_max));
            let request = FetchRequest {
                owner,
                key: (topic.to_string(), partition),
                offset,
                max_bytes,
                min_bytes: u64::from(min_bytes),
                max_wait,
            };
            let mut data = fetch_with_wait(shared, request).await?;
            if !send_as_ranges(shared, direct_io, &data.ranges) && !data.ranges.is_empty() {
                let mut bytes = read_fetch_ranges(shared, std::mem::take(&mut data.ranges))
                    .await
                    .map_err(|error| {
                        OpError::new(
                            ErrorCode::StorageError,
                            format!("reading a segment: {error}"),
                        )
                    })?;
                bytes.extend_from_slice(&data.bytes);
                data.bytes = bytes;
            }
            shared.metrics.fetch_latency.record(started.elapsed());
            Box::new(move |correlation_id| {
                let response = Response::Fetched {
                    partition,
                    high_watermark: data.high_watermark,
                    log_start_offset: data.log_start_offset,
                    next_offset: data.next_offset,
                    records_bytes: data.total_bytes() as u32,
                };
                let mut header = Vec::with_capacity(64);
                encode_frame_vec(
                    &ResponseFrame {
                        correlation_id,
                        response,
                    },
                    data.total_bytes() as u32,
                    &mut header,
                );
                if data.ranges.is_empty() {
                    Outgoing::HeaderAndPayload(header, data.bytes)
                } else {
                    Outgoing::Ranges {
                        header,
                        ranges: data.ranges,
                        tail: data.bytes,
                    }
                }
            })
        }
        Request::ListOffsets {
            topic,
            partition,
            at,
        } => {
            let owner = owner_of(shared, view, topic, partition)?;
            let key = (topic.to_string(), partition);
            let offset = shared
                .call(owner, |reply| ShardOp::ListOffsets { key, at, reply })
                .await??;
            reply(Response::Offset { offset })
        }
        Request::Metadata { topic } => {
            let topics = topic_infos(shared, view, topic).await?;
            reply_owned(move || Response::Metadata { topics })
        }
        Request::DescribeTopic { name } => {
            let topics = topic_infos(shared, view, Some(name)).await?;
            reply_owned(move || Response::Metadata { topics })
        }
        Request::CreateTopic {
            name,
            partitions,
            settings,
        } => {
            create_topic(shared, name, partitions, &parse_settings(settings)?).await?;
            reply(Response::Done)
        }
        Request::AlterTopic {
            name,
            partitions,
            settings,
        } => {
            alter_topic(shared, name, partitions, &parse_settings(settings)?).await?;
            reply(Response::Done)
        }
        Request::DeleteTopic { name } => {
            delete_topic(shared, name).await?;
            reply(Response::Done)
        }
        Request::CommitOffset {
            group,
            topic,
            partition,
            offset,
        } => {
            owner_of(shared, view, topic, partition)?;
            shared
                .groups
                .commit(group, topic, partition, offset)
                .map_err(|message| OpError::new(ErrorCode::InvalidRequest, message))?;
            reply(Response::Done)
        }
        Request::FetchOffset {
            group,
            topic,
            partition,
        } => reply(Response::CommittedOffset {
            offset: shared.groups.fetch(group, topic, partition),
        }),
        Request::ListGroups => {
            let groups = shared
                .groups
                .list()
                .into_iter()
                .map(|(group, offsets)| GroupInfo { group, offsets })
                .collect();
            reply_owned(move || Response::Groups { groups })
        }
        Request::Status => {
            let stats = shared.published_stats();
            let status = StatusInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                io_driver: shared.driver.driver.to_string(),
                io_driver_reason: shared.driver.reason.clone(),
                shards: shared.shards() as u32,
                profile: shared.config.profile.clone(),
                topics: view.table.len() as u32,
                partitions: view.table.values().map(|meta| meta.partitions).sum(),
                connections: shared.connections_open(),
                data_bytes: stats.iter().map(|stats| stats.size_bytes).sum(),
                disk_quota_bytes: shared.config.storage.disk_quota_bytes,
                uptime_ms: shared.uptime_ms(),
            };
            reply_owned(move || Response::Status(status))
        }
        Request::Handshake { .. } | Request::Produce { .. } => {
            return Err(OpError::new(
                ErrorCode::InvalidRequest,
                "unexpected request",
            ));
        }
    })
}
