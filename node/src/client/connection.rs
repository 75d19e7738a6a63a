//! One native-protocol connection shared by many callers: a writer task that
//! owns the socket's write side and sends queued frames in order, and a reader
//! task that splits response frames and hands each to the caller waiting on its
//! correlation id.
//!
//! Callers never touch the socket. They register a waiter and queue a frame in
//! one synchronous step, so frames leave in the order calls were made and bytes
//! of two requests never interleave. When the connection dies, for whatever
//! reason, every waiter is failed with that reason and later calls fail at once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use compio::BufResult;
use compio::io::{AsyncWrite, AsyncWriteExt};
use compio::net::TcpStream;
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use rill_protocol::frame::encode_frame_vec;
use rill_protocol::{Request, RequestFrame, Response, ResponseFrame, split_frame};

use super::error::ClientError;

/// Bytes the reader asks the socket for at least, per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Most frames the writer gathers into one vectored write.
const WRITE_FRAMES_MAX: usize = 64;

/// A response frame body (correlation id, message, and any raw bytes after
/// it). Shared bytes, so a large fetch answer reaches its caller without a
/// copy ([`take_frame`]).
pub(crate) type ResponseBody = bytes::Bytes;

/// Frames at least this large that start the read buffer are handed over
/// with the buffer itself instead of copied out of it.
const HAND_OVER_BYTES_MIN: usize = 256 * 1024;

/// Why the connection ended; kept so every later call can say so.
#[derive(Debug, Clone)]
pub(crate) enum CloseReason {
    /// The broker broke the protocol; waiters get `ClientError::Protocol`.
    Protocol(String),
    /// The socket failed or the broker hung up; waiters get `ClientError::Closed`.
    Lost(String),
}

impl CloseReason {
    /// The error for a caller whose request was in flight when this happened.
    fn in_flight_error(&self) -> ClientError {
        match self {
            Self::Protocol(detail) => ClientError::Protocol(detail.clone()),
            Self::Lost(reason) => ClientError::Closed {
                reason: reason.clone(),
            },
        }
    }

    /// The error for a call made after the connection ended.
    pub(crate) fn later_error(&self) -> ClientError {
        ClientError::Closed {
            reason: match self {
                Self::Protocol(detail) => format!("protocol error: {detail}"),
                Self::Lost(reason) => reason.clone(),
            },
        }
    }
}

enum WriteJob {
    Frame {
        bytes: Vec<u8>,
        /// Told once the frame is in the socket; for requests without a response.
        written: Option<oneshot::Sender<io::Result<()>>>,
    },
    /// Close the write side and stop: the connection is over.
    Shutdown,
    /// Nothing to send but TLS handshake or alert bytes.
    Flush,
}

struct State {
    next_correlation_id: u32,
    waiters: HashMap<u32, oneshot::Sender<Result<ResponseBody, ClientError>>>,
    /// Fetches whose callers want the answer's head as soon as it arrives,
    /// before its batches ([`FetchHead`]).
    heads: HashMap<u32, oneshot::Sender<FetchHead>>,
    closed: Option<CloseReason>,
}

/// The head of a fetch answer: what it holds and where it ends, known as
/// soon as its first bytes arrive, while its batches are still on the way.
/// A consumer can ask for what follows `next_offset` right away, so the
/// broker prepares the next answer while this one is still being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchHead {
    pub partition: u32,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// One past the last batch the answer carries.
    pub next_offset: i64,
    /// Bytes of batches that follow the head.
    pub records_bytes: u32,
}

impl FetchHead {
    /// The head a response carries, when it is a fetch answer.
    pub(crate) fn of(response: &Response<'_>) -> Option<Self> {
        match *response {
            Response::Fetched {
                partition,
                high_watermark,
                log_start_offset,
                next_offset,
                records_bytes,
            } => Some(Self {
                partition,
                high_watermark,
                log_start_offset,
                next_offset,
                records_bytes,
            }),
            _ => None,
        }
    }
}

/// The part of a connection callers and both tasks share.
pub(crate) struct Connection {
    state: RefCell<State>,
    writes: mpsc::UnboundedSender<WriteJob>,
    /// The largest request frame body the broker accepts; 0 until the handshake says.
    broker_frame_bytes_max: Cell<u32>,
}

/// What a sent request will deliver.
pub(crate) enum Pending {
    Response(oneshot::Receiver<Result<ResponseBody, ClientError>>),
    Written(oneshot::Receiver<io::Result<()>>),
}

/// The connection and its two tasks. Dropping it cancels the tasks, which
/// closes the socket.
pub(crate) struct Driver {
    pub(crate) connection: Rc<Connection>,
    _reader: compio::runtime::JoinHandle<()>,
    _writer: compio::runtime::JoinHandle<()>,
}

impl Driver {
    /// Starts the reader and writer tasks on `stream` (in the current runtime).
    pub(crate) fn start(
        stream: TcpStream,
        frame_bytes_max: u32,
        tls: Option<crate::tls::TlsSession>,
    ) -> Self {
        let (writes, queue) = mpsc::unbounded();
        let connection = Rc::new(Connection {
            state: RefCell::new(State {
                next_correlation_id: 1,
                waiters: HashMap::new(),
                heads: HashMap::new(),
                closed: None,
            }),
            writes,
            broker_frame_bytes_max: Cell::new(0),
        });
        if tls.is_some() {
            // The client speaks first in TLS: send the ClientHello.
            let _ = connection.writes.unbounded_send(WriteJob::Flush);
        }
        let reader = compio::runtime::spawn(read_responses(
            stream.clone(),
            Rc::clone(&connection),
            frame_bytes_max,
            tls.clone(),
        ));
        let writer =
            compio::runtime::spawn(write_requests(stream, Rc::clone(&connection), queue, tls));
        Self {
            connection,
            _reader: reader,
            _writer: writer,
        }
    }
}

impl Connection {
    pub(crate) fn set_broker_frame_bytes_max(&self, frame_bytes_max: u32) {
        self.broker_frame_bytes_max.set(frame_bytes_max);
    }

    pub(crate) fn broker_frame_bytes_max(&self) -> u32 {
        self.broker_frame_bytes_max.get()
    }

    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.state.borrow().closed.clone()
    }

    /// Encodes `request` and queues it; registers a waiter first when a
    /// response is expected, so even an instant answer finds it.
    pub(crate) fn send(
        &self,
        request: Request<'_>,
        expects_response: bool,
    ) -> Result<Pending, ClientError> {
        self.send_inner(request, expects_response, None)
    }

    /// Like [`Self::send`] for a fetch, and also returns where the answer's
    /// head will be delivered as soon as it arrives ([`FetchHead`]). The
    /// head's sender is dropped when the answer is not `Fetched` or the
    /// connection ends; the response then says why.
    pub(crate) fn send_fetch(
        &self,
        request: Request<'_>,
    ) -> Result<(Pending, oneshot::Receiver<FetchHead>), ClientError> {
        let (head, receiver) = oneshot::channel();
        let pending = self.send_inner(request, true, Some(head))?;
        Ok((pending, receiver))
    }

    /// Queues `request`, registering its response waiter and, for a fetch
    /// whose caller wants it, its head's.
    fn send_inner(
        &self,
        request: Request<'_>,
        expects_response: bool,
        head: Option<oneshot::Sender<FetchHead>>,
    ) -> Result<Pending, ClientError> {
        let mut state = self.state.borrow_mut();
        if let Some(reason) = &state.closed {
            return Err(reason.later_error());
        }
        let mut correlation_id = state.next_correlation_id;
        // Skip ids still waiting (a timed-out request the broker may yet answer).
        while state.waiters.contains_key(&correlation_id) {
            correlation_id = correlation_id.wrapping_add(1);
        }
        state.next_correlation_id = correlation_id.wrapping_add(1);
        let mut bytes = Vec::new();
        encode_frame_vec(
            &RequestFrame {
                correlation_id,
                request,
            },
            0,
            &mut bytes,
        );
        let body_bytes = bytes.len() - rill_protocol::FRAME_HEADER_BYTES;
        let limit = self.broker_frame_bytes_max.get();
        if limit != 0 && body_bytes > limit as usize {
            return Err(ClientError::RequestTooLarge {
                frame_bytes: body_bytes,
                frame_bytes_max: limit,
            });
        }
        let (job, pending) = if expects_response {
            let (sender, receiver) = oneshot::channel();
            state.waiters.insert(correlation_id, sender);
            if let Some(head) = head {
                state.heads.insert(correlation_id, head);
            }
            let job = WriteJob::Frame {
                bytes,
                written: None,
            };
            (job, Pending::Response(receiver))
        } else {
            let (sender, receiver) = oneshot::channel();
            let job = WriteJob::Frame {
                bytes,
                written: Some(sender),
            };
            (job, Pending::Written(receiver))
        };
        drop(state);
        if self.writes.unbounded_send(job).is_err() {
            // The writer has stopped; it closed the connection with a reason first.
            let reason = self
                .close_reason()
                .unwrap_or_else(|| CloseReason::Lost("the connection task ended".into()));
            self.close(reason.clone());
            return Err(reason.later_error());
        }
        Ok(pending)
    }

    /// Hands the head of the partly read frame `partial` (length prefix
    /// included) to a caller waiting for it, once the head is all there.
    fn offer_head(&self, partial: &[u8]) {
        let Some(body) = partial.get(rill_protocol::FRAME_HEADER_BYTES..) else {
            return;
        };
        let mut state = self.state.borrow_mut();
        if state.heads.is_empty() {
            return;
        }
        let Ok((frame, _)) = ResponseFrame::decode(body) else {
            return;
        };
        if let Some(waiter) = state.heads.remove(&frame.correlation_id)
            && let Some(head) = FetchHead::of(&frame.response)
        {
            let _ = waiter.send(head);
        }
    }

    /// Ends the connection: fails every waiter with `reason` and stops the
    /// writer, which shuts the socket. Only the first reason counts.
    pub(crate) fn close(&self, reason: CloseReason) {
        let waiters = {
            let mut state = self.state.borrow_mut();
            if state.closed.is_some() {
                return;
            }
            state.closed = Some(reason.clone());
            state.heads.clear();
            std::mem::take(&mut state.waiters)
        };
        for (_, waiter) in waiters {
            // A caller that gave up (timeout, dropped future) no longer listens.
            let _ = waiter.send(Err(reason.in_flight_error()));
        }
        let _ = self.writes.unbounded_send(WriteJob::Shutdown);
    }

    /// Routes one response frame body to its waiter.
    fn deliver(&self, body: ResponseBody) -> Result<(), CloseReason> {
        let (frame, _raw) = ResponseFrame::decode(&body).map_err(|error| {
            CloseReason::Protocol(format!("undecodable response frame: {error}"))
        })?;
        let (waiter, head) = {
            let mut state = self.state.borrow_mut();
            (
                state.waiters.remove(&frame.correlation_id),
                state.heads.remove(&frame.correlation_id),
            )
        };
        // A head not offered early (the frame came in one read) goes first.
        if let Some(head) = head
            && let Some(fetched) = FetchHead::of(&frame.response)
        {
            let _ = head.send(fetched);
        }
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(Ok(body));
                Ok(())
            }
            None => Err(CloseReason::Protocol(format!(
                "response with correlation id {} that no request is waiting for: {}",
                frame.correlation_id,
                describe_response(&frame.response)
            ))),
        }
    }
}

/// A short description of a response, for error messages.
pub(crate) fn describe_response(response: &Response<'_>) -> String {
    match response {
        Response::Error { code, message } => format!("error {code:?}: {message}"),
        Response::HandshakeOk { .. } => "HandshakeOk".into(),
        Response::Pong => "Pong".into(),
        Response::Produced { .. } => "Produced".into(),
        Response::Fetched { .. } => "Fetched".into(),
        Response::Offset { .. } => "Offset".into(),
        Response::Done => "Done".into(),
        Response::CommittedOffset { .. } => "CommittedOffset".into(),
        Response::Metadata { .. } => "Metadata".into(),
        Response::Groups { .. } => "Groups".into(),
        Response::Status(_) => "Status".into(),
    }
}

/// The reader task: reads into one growing buffer, splits frames with the
/// configured limit, and routes each. Any failure closes the connection.
async fn read_responses(
    mut stream: TcpStream,
    connection: Rc<Connection>,
    frame_bytes_max: u32,
    tls: Option<crate::tls::TlsSession>,
) {
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut low_water = LowWater::default();
    let reason = loop {
        let mut consumed = 0;
        let split = loop {
            match split_frame(&buffer[consumed..], frame_bytes_max) {
                Ok(Some((body, used))) => {
                    // The body ends the frame, after its header.
                    let body_end = consumed + used;
                    let body_start = body_end - body.len();
                    let body = if consumed == 0 && used >= HAND_OVER_BYTES_MIN {
                        take_frame(&mut buffer, used).slice(body_start..body_end)
                    } else {
                        consumed += used;
                        ResponseBody::copy_from_slice(&buffer[body_start..body_end])
                    };
                    if let Err(reason) = connection.deliver(body) {
                        break Err(reason);
                    }
                }
                Ok(None) => break Ok(()),
                Err(error) => break Err(CloseReason::Protocol(error.to_string())),
            }
        };
        if let Err(reason) = split {
            break reason;
        }
        buffer.drain(..consumed);
        // A large answer is partly here: its head may already be wanted.
        if !buffer.is_empty() {
            connection.offer_head(&buffer);
        }
        // One large fetch response should not pin its buffer for the connection's life.
        if buffer.is_empty() && buffer.capacity() > 16 * READ_CHUNK_BYTES {
            buffer = Vec::with_capacity(READ_CHUNK_BYTES);
        }
        // Room for the rest of a partly read frame, or a fresh chunk.
        let wanted = match split_frame(&buffer, frame_bytes_max) {
            Ok(None) if buffer.len() >= rill_protocol::FRAME_HEADER_BYTES => {
                let body_bytes =
                    u32::from_le_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
                (rill_protocol::FRAME_HEADER_BYTES + body_bytes).max(READ_CHUNK_BYTES)
            }
            _ => READ_CHUNK_BYTES,
        };
        buffer.reserve(
            wanted
                .saturating_sub(buffer.len())
                .max(READ_CHUNK_BYTES / 4),
        );
        if tls.is_none() {
            low_water.set(&stream, wanted.saturating_sub(buffer.len()));
        }
        let flush = || {
            let _ = connection.writes.unbounded_send(WriteJob::Flush);
        };
        let BufResult(result, returned) =
            crate::tls::read_plaintext(&mut stream, tls.as_ref(), flush, buffer).await;
        buffer = returned;
        match result {
            Ok(0) => break CloseReason::Lost("the broker hung up".into()),
            Ok(_) => {}
            Err(error) => {
                break CloseReason::Lost(format!("reading from the broker failed: {error}"));
            }
        }
    };
    connection.close(reason);
}

/// The socket's receive low-water mark (`SO_RCVLOWAT`), raised while the
/// rest of a large frame is on its way.
///
/// Without it the kernel wakes the reader for every segment that arrives,
/// and a 4 MiB fetch answer comes in as dozens of small reads; on loopback
/// each wake-up is paid on the broker's thread, which delivers the segments.
/// With the mark at the bytes the frame still lacks (at most
/// [`LOW_WATER_BYTES_MAX`]) the reader sleeps until that much has arrived.
/// It never exceeds what the broker is about to send, so it cannot wait for
/// bytes that will not come; a closed connection wakes it too.
#[derive(Default)]
struct LowWater {
    /// The mark set on the socket (0: the kernel's default, one byte).
    set: usize,
}

/// Bytes of a frame still to come above which the low-water mark is raised.
const LOW_WATER_BYTES_MIN: usize = 128 * 1024;
/// Highest low-water mark: the kernel grows the receive buffer to twice it.
const LOW_WATER_BYTES_MAX: usize = 1024 * 1024;

impl LowWater {
    /// Sets the mark for a read that waits for `missing` more bytes of a
    /// frame (0: a new frame, whose size is not known yet).
    fn set(&mut self, stream: &TcpStream, missing: usize) {
        use std::os::fd::AsRawFd;
        let mark = low_water_mark(missing);
        if mark == self.set {
            return;
        }
        let value = libc::c_int::try_from(mark.max(1)).unwrap_or(1);
        // SAFETY: setsockopt reads `value` (a live c_int) on an open socket.
        let result = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // A refusal only costs the saving: reads then wake per segment.
        if result == 0 {
            self.set = mark;
        }
    }
}

/// The low-water mark for a read that waits for `missing` more bytes of a
/// frame: never more than will come, 0 (the default) for small remainders.
pub(super) fn low_water_mark(missing: usize) -> usize {
    if missing >= LOW_WATER_BYTES_MIN {
        missing.min(LOW_WATER_BYTES_MAX)
    } else {
        0
    }
}

/// Cuts the first `used` bytes (one whole frame) off `buffer` and returns
/// them without copying: the buffer's allocation goes with the frame, and
/// what followed the frame (usually little or nothing) moves to a fresh one.
fn take_frame(buffer: &mut Vec<u8>, used: usize) -> ResponseBody {
    let rest = buffer.split_off(used);
    ResponseBody::from(std::mem::replace(buffer, rest))
}

/// The writer task: sends queued frames in order, several per vectored write
/// when callers queue faster than the socket drains.
async fn write_requests(
    mut stream: TcpStream,
    connection: Rc<Connection>,
    mut queue: mpsc::UnboundedReceiver<WriteJob>,
    tls: Option<crate::tls::TlsSession>,
) {
    while let Some(job) = queue.next().await {
        let mut frames = Vec::new();
        let mut notify = Vec::new();
        let mut shutdown = false;
        let mut next = Some(job);
        while let Some(job) = next.take() {
            match job {
                WriteJob::Frame { bytes, written } => {
                    frames.push(bytes);
                    notify.extend(written);
                }
                WriteJob::Shutdown => {
                    shutdown = true;
                    break;
                }
                WriteJob::Flush => {}
            }
            if frames.len() < WRITE_FRAMES_MAX {
                next = queue.try_recv().ok();
            }
        }
        if frames.is_empty()
            && let Some(session) = &tls
            && let Ok(ciphertext) = crate::tls::encrypt(session, &[])
            && !ciphertext.is_empty()
            && stream.write_all(ciphertext).await.0.is_err()
        {
            connection.close(CloseReason::Lost("writing the TLS handshake failed".into()));
            break;
        }
        // Nothing is sent after a close: waiters were already failed.
        if !frames.is_empty() && connection.close_reason().is_none() {
            let result = match &tls {
                None => stream.write_vectored_all(frames).await.0,
                Some(session) => {
                    let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                    match crate::tls::encrypt(session, &parts) {
                        Ok(ciphertext) => stream.write_all(ciphertext).await.0,
                        Err(error) => Err(error),
                    }
                }
            };
            match result {
                Ok(()) => {
                    for sender in notify {
                        let _ = sender.send(Ok(()));
                    }
                }
                Err(error) => {
                    let reason = format!("writing to the broker failed: {error}");
                    for sender in notify {
                        let _ = sender.send(Err(io::Error::new(error.kind(), reason.clone())));
                    }
                    connection.close(CloseReason::Lost(reason));
                    shutdown = true;
                }
            }
        }
        if shutdown {
            break;
        }
    }
    // Tell the broker we are done; the reader then sees the end of the stream.
    let _ = stream.shutdown().await;
}

/// Waits for what `pending` delivers, up to `timeout`.
pub(crate) async fn wait(
    connection: &Connection,
    pending: Pending,
    request: &'static str,
    timeout: Duration,
) -> Result<Option<ResponseBody>, ClientError> {
    let timed_out = || ClientError::Timeout {
        request,
        after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    // A sender dropped without an answer means the tasks stopped.
    let gone = || {
        connection
            .close_reason()
            .map(|reason| reason.in_flight_error())
            .unwrap_or_else(|| ClientError::Closed {
                reason: "the connection task ended".into(),
            })
    };
    match pending {
        Pending::Response(receiver) => match compio::time::timeout(timeout, receiver).await {
            Err(_) => Err(timed_out()),
            Ok(Err(_canceled)) => Err(gone()),
            Ok(Ok(result)) => result.map(Some),
        },
        Pending::Written(receiver) => match compio::time::timeout(timeout, receiver).await {
            Err(_) => Err(timed_out()),
            Ok(Err(_canceled)) => Err(gone()),
            Ok(Ok(Err(error))) => Err(ClientError::Io(error)),
            Ok(Ok(Ok(()))) => Ok(None),
        },
    }
}
