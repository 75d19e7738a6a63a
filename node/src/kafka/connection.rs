//! A Kafka client's connection: frames are read and decoded in arrival
//! order, produces are queued at their partitions' shards before the next
//! frame is read (so pipelined batches keep their order), and every request
//! then runs in a task of its own. The protocol promises answers in request
//! order, so finished answers wait in a small reorder buffer until those of
//! earlier requests have gone out; how many can wait is bounded by
//! `limits.requests_in_flight_max`, like everything else a connection holds.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use compio::net::TcpStream;
use futures_channel::mpsc;
use kafka_protocol::messages::RequestKind;
use rill_protocol::FrameError;

use super::{api, codec, errors};
use crate::broker::Shared;
use crate::broker::connection::{
    Answer, ConnectionSlot, FrameHandler, InFlight, MovedConnection, MovedProtocol, Outgoing,
    Placement, moves_allowed, queue_answer,
};
use crate::broker::topics::{TopicView, shard_of};

/// What a request's handler needs to know about the connection and broker.
#[derive(Clone)]
pub struct Context {
    pub shared: Arc<Shared>,
    pub view: TopicView,
    /// Host and port clients are told to connect to.
    pub advertised: (String, i32),
    pub client_id: Rc<str>,
    pub peer: SocketAddr,
}

/// Answers in request order: each request holds a sequence number, and an
/// answer is written once every earlier one has been.
#[derive(Default)]
struct Ordered {
    next: Cell<u64>,
    /// Finished answers waiting for earlier ones: the pieces of each (none
    /// for a request without an answer).
    ready: RefCell<BTreeMap<u64, Vec<Outgoing>>>,
}

/// The right to answer one request. Dropping it unanswered answers nothing
/// (as for acks=0), so a failed handler cannot hold up later answers.
pub struct Responder {
    sequence: u64,
    ordered: Rc<Ordered>,
    writer: Option<mpsc::UnboundedSender<Answer>>,
    in_flight: Rc<InFlight>,
    shared: Arc<Shared>,
    done: bool,
}

impl Responder {
    /// Sends `frame` (or nothing, for requests without an answer) once the
    /// requests before this one are answered.
    pub fn send(mut self, frame: Option<Vec<u8>>) {
        self.deliver(frame.map(Outgoing::Frame).into_iter().collect());
    }

    /// Sends an answer made of pieces written one after the other (bytes
    /// and file ranges spliced to the socket).
    pub(crate) fn send_pieces(mut self, pieces: Vec<Outgoing>) {
        self.deliver(pieces);
    }

    fn deliver(&mut self, pieces: Vec<Outgoing>) {
        if self.done {
            return;
        }
        self.done = true;
        self.ordered
            .ready
            .borrow_mut()
            .insert(self.sequence, pieces);
        loop {
            let next = self.ordered.next.get();
            let Some(pieces) = self.ordered.ready.borrow_mut().remove(&next) else {
                break;
            };
            self.ordered.next.set(next + 1);
            // Pieces of one answer are queued together, so nothing comes
            // between them; the last one ends the request.
            let count = pieces.len();
            let mut queued = count > 0;
            for (index, piece) in pieces.into_iter().enumerate() {
                queued &= self.writer.as_ref().is_some_and(|writer| {
                    queue_answer(writer, &self.shared.buffers, piece, index + 1 == count)
                });
            }
            if !queued {
                self.in_flight.finish(1);
            }
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.deliver(Vec::new());
    }
}

pub struct KafkaConnection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    advertised: (String, i32),
    writer: Option<mpsc::UnboundedSender<Answer>>,
    in_flight: Rc<InFlight>,
    ordered: Rc<Ordered>,
    next_sequence: u64,
    view: TopicView,
    client_id: Rc<str>,
    /// Round-robin partition for produce requests without one (none in Kafka).
    pub next_partition: Cell<u32>,
    /// SASL: whether this connection still has to authenticate.
    auth: super::sasl::Auth,
    /// The shard serving this connection.
    shard: usize,
    placement: Placement,
    /// The shard to move to before the next frame, once a run of produces
    /// to another shard's partitions asked for it.
    pending_move: Option<usize>,
    /// The connection's place under `connections_max`, handed on when it moves.
    slot: Option<ConnectionSlot>,
}

/// What a Kafka connection takes along when it moves to another shard. It
/// moves only once it may produce, so it arrives authenticated.
pub(crate) struct MovedKafka {
    advertised: (String, i32),
    client_id: String,
}

impl KafkaConnection {
    pub fn new(shared: Arc<Shared>, stream: &TcpStream, peer: SocketAddr, shard: usize) -> Self {
        let view = shared.topics.snapshot();
        // Unless configured, clients are sent back to the address they used.
        let local = stream.local_addr().unwrap_or(shared.config.listeners.kafka);
        let settings = &shared.config.kafka;
        let host = if settings.advertised_host.is_empty() {
            local.ip().to_string()
        } else {
            settings.advertised_host.clone()
        };
        let port = match settings.advertised_port {
            0 => local.port(),
            port => port,
        };
        Self {
            auth: super::sasl::Auth::for_broker(&shared),
            slot: Some(ConnectionSlot(shared.clone())),
            shared,
            peer,
            advertised: (host, i32::from(port)),
            writer: None,
            in_flight: Rc::new(InFlight::default()),
            ordered: Rc::new(Ordered::default()),
            next_sequence: 0,
            view,
            client_id: Rc::from(""),
            next_partition: Cell::new(0),
            shard,
            placement: Placement::default(),
            pending_move: None,
        }
    }

    /// A connection another shard moved to `shard`, with nothing in flight.
    pub(crate) fn arrived(
        shared: Arc<Shared>,
        peer: SocketAddr,
        shard: usize,
        slot: Option<ConnectionSlot>,
        moved: MovedKafka,
    ) -> Self {
        let auth = match super::sasl::Auth::for_broker(&shared) {
            super::sasl::Auth::Open => super::sasl::Auth::Open,
            _ => super::sasl::Auth::Authenticated,
        };
        Self {
            auth,
            slot,
            view: shared.topics.snapshot(),
            shared,
            peer,
            advertised: moved.advertised,
            writer: None,
            in_flight: Rc::new(InFlight::default()),
            ordered: Rc::new(Ordered::default()),
            next_sequence: 0,
            client_id: Rc::from(moved.client_id.as_str()),
            next_partition: Cell::new(0),
            shard,
            placement: Placement::arrived(),
            pending_move: None,
        }
    }

    /// Notes which shards own the partitions a produce writes to, and asks
    /// for a move before the next frame once they keep being one other
    /// shard's (see [`Placement`]).
    fn note_produce(&mut self, request: &kafka_protocol::messages::ProduceRequest) {
        if !moves_allowed(&self.shared) {
            return;
        }
        let shards = self.shared.shards();
        let mut owners = request.topic_data.iter().flat_map(|topic| {
            topic.partition_data.iter().map(move |data| {
                u32::try_from(data.index)
                    .ok()
                    .map(|partition| shard_of(topic.name.0.as_str(), partition, shards))
            })
        });
        let first = owners.next().flatten();
        let owner = if owners.all(|owner| owner == first) {
            first
        } else {
            None
        };
        self.pending_move = self.placement.note_produce(owner, self.shard);
    }

    /// Counts a new request in flight and reserves its place in the answer order.
    fn responder(&mut self) -> Responder {
        self.in_flight.count.set(self.in_flight.count.get() + 1);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        Responder {
            sequence,
            ordered: self.ordered.clone(),
            writer: self.writer.clone(),
            in_flight: self.in_flight.clone(),
            shared: self.shared.clone(),
            done: false,
        }
    }

    fn context(&self) -> Context {
        Context {
            shared: self.shared.clone(),
            view: self.view.clone(),
            advertised: self.advertised.clone(),
            client_id: self.client_id.clone(),
            peer: self.peer,
        }
    }

    fn close_after(&self, what: &str, detail: &dyn std::fmt::Display) -> bool {
        self.shared
            .metrics
            .frames_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(peer = %self.peer, client_id = %self.client_id, %detail, "{what}; closing the Kafka connection");
        false
    }
}

impl FrameHandler for KafkaConnection {
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
        codec::split_frame(buffer, frame_bytes_max)
    }

    fn declared_length(buffer: &[u8]) -> Option<usize> {
        codec::declared_length(buffer)
    }

    /// Kafka has no answer for a frame that cannot be read: the connection
    /// just closes, as Kafka's own brokers do.
    fn reject(&self, error: &FrameError) {
        self.close_after("unreadable frame", error);
    }

    /// A producer whose produces keep going to one other shard's
    /// partitions moves there before its next request, as a native one
    /// does; the decision is made when a produce is handled.
    fn shard_to_move_to(&mut self) -> Option<usize> {
        self.pending_move.take()
    }

    fn hand_over(mut self, stream: std::net::TcpStream, unread: bytes::BytesMut, shard: usize) {
        let moved = MovedConnection {
            stream,
            unread,
            peer: self.peer,
            protocol: MovedProtocol::Kafka(MovedKafka {
                advertised: self.advertised.clone(),
                client_id: self.client_id.to_string(),
            }),
            slot: self.slot.take(),
        };
        crate::broker::connection::send_moved(&self.shared, self.shard, shard, moved);
    }

    async fn handle_frame(&mut self, body: &bytes::Bytes) -> bool {
        let (api_key, version, header, request) = match codec::decode_request_frame(body) {
            codec::Decoded::Request {
                api_key,
                version,
                header,
                request,
            } => {
                self.shared.metrics.record_kafka_request(api_key as i16);
                (api_key, version, header, *request)
            }
            codec::Decoded::ApiVersionsTooNew { correlation_id } => {
                // The client's version is newer than ours: a v0 answer with
                // UNSUPPORTED_VERSION and our ranges, so it can retry.
                let response = api::api_versions(errors::UNSUPPORTED_VERSION);
                let frame = codec::encode_response(correlation_id, 0, &response).ok();
                self.responder().send(frame);
                return true;
            }
            codec::Decoded::Refused(reason) => return self.close_after("request refused", &reason),
        };
        if !self.auth.allows(api_key) {
            return self.close_after(
                "request before SASL authentication",
                &format!("{api_key:?}"),
            );
        }
        if self.client_id.is_empty()
            && let Some(client_id) = &header.client_id
        {
            self.client_id = Rc::from(client_id.as_str());
        }
        self.shared.topics.refresh(&mut self.view);
        let correlation_id = header.correlation_id;
        let responder = self.responder();
        let context = self.context();
        match request {
            RequestKind::SaslHandshake(request) => {
                let response = super::sasl::handshake(&mut self.auth, &self.shared, &request);
                responder.send(super::produce::encode(correlation_id, version, &response));
            }
            RequestKind::SaslAuthenticate(request) => {
                let (response, go_on) =
                    super::sasl::authenticate(&mut self.auth, &self.shared, request).await;
                responder.send(super::produce::encode(correlation_id, version, &response));
                if !go_on {
                    return self.close_after("SASL authentication failed", &self.peer);
                }
            }
            RequestKind::Produce(request) => {
                self.note_produce(&request);
                let pending =
                    super::produce::dispatch(&context, request, &self.next_partition).await;
                crate::io::home::spawn(super::produce::finish(
                    context,
                    correlation_id,
                    version,
                    pending,
                    responder,
                ))
                .detach();
            }
            RequestKind::Fetch(request) => {
                crate::io::home::spawn(async move {
                    let pieces =
                        super::fetch::fetch(&context, correlation_id, version, request).await;
                    responder.send_pieces(pieces);
                })
                .detach();
            }
            request => {
                crate::io::home::spawn(async move {
                    let frame =
                        super::admin::answer(&context, correlation_id, version, request).await;
                    responder.send(frame);
                })
                .detach();
            }
        }
        true
    }
}
