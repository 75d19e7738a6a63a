//! The replicator's Kafka producer as a state machine: it emits encoded
//! request frames for the driver to write and consumes the response bytes
//! the driver reads, over one connection per broker (a bootstrap broker
//! for metadata, producer ids and topic creation, and each partition
//! leader for produce and fetch). It never opens a socket, reads a clock
//! or draws a random number: the driver does, and passes them in.
//!
//! What it does: ApiVersions on every connection (the highest version both
//! sides speak, per API), SASL PLAIN or SCRAM-SHA-256/512 when configured,
//! Metadata for the topics it is given (creating missing ones when allowed,
//! a clear [`TopicError`] when not), InitProducerId for an idempotent
//! producer, Produce with `acks=all` and per-partition sequence numbers,
//! and Fetch and ListOffsets for reading a destination partition's tail.
//! Batches of a partition go out in order, at most
//! [`ClientConfig::in_flight_requests_max`] (at most 5, the window within
//! which a Kafka broker detects a resent batch) at a time. When a
//! connection is lost, its batches go out again with the same producer id,
//! epoch and sequence, so the destination drops the copies that had
//! arrived. NOT_LEADER_OR_FOLLOWER and its kin refresh metadata and retry;
//! timeouts and network errors retry with backoff. OUT_OF_ORDER_SEQUENCE
//! (when no earlier batch of the partition is being retried),
//! UNKNOWN_PRODUCER_ID and INVALID_PRODUCER_EPOCH reset the producer
//! session: once nothing is in flight any more every unacknowledged batch
//! is dropped ([`Action::SessionReset`]) and a new producer id is asked
//! for; the driver then reconciles from the destination's tail
//! ([`super::progress`]).
//!
//! TLS is the driver's: it wraps the socket (rustls, as every Rill
//! listener) before the first byte and feeds plain bytes here.
//!
//! # The driver's contract
//!
//! 1. [`Client::new`] with the configuration, 32 random bytes from the
//!    operating system (SCRAM nonces and backoff jitter derive from them)
//!    and the time; then [`Client::set_topics`] with the destination
//!    topics. After every call, take the actions with
//!    [`Client::next_action`] until `None` and carry them out in order.
//! 2. [`Action::Connect`]: open TCP (and TLS) to the address, then call
//!    [`Client::handle_connected`] or [`Client::handle_connect_failed`].
//!    [`Action::Send`]: write the bytes, in order per connection.
//!    [`Action::Close`]: close the socket; the client has forgotten it.
//!    Bytes read go to [`Client::handle_received`]; a closed or failed
//!    socket to [`Client::handle_disconnected`].
//!    [`Client::handle_tick`] runs at least every 100 ms (timeouts,
//!    backoff, metadata refresh).
//! 3. Produce only after [`Action::ProducerReady`] and
//!    [`Action::TopicReady`] (which gives the partition count for
//!    [`super::plan::PartitionMap`]), and only for partitions reconciled
//!    since the last start or [`Action::SessionReset`]: give each finished,
//!    unstamped batch to [`Client::produce`] with a token; the client stamps
//!    it. [`Action::Acknowledged`] says it is written: tell the progress
//!    ([`super::progress::Progress::acknowledged`]) and persist a
//!    checkpoint when convenient. [`Action::Refused`]: the batch can never
//!    be written (too large, not authorized); stop that source partition
//!    and report it, never skip it.
//! 4. [`Action::SessionReset`]: forget the dropped batches
//!    (`Progress::discard_unacknowledged`), reconcile every destination
//!    partition again, then produce from the frontier.
//! 5. Reconciling a destination partition: [`Client::list_offsets`] gives
//!    [`Action::OffsetsListed`]; then [`Client::fetch`] at
//!    [`super::progress::TailScan::next_fetch_offset`] until the scan is
//!    done, feeding each [`Action::Fetched`].

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, FetchRequest, InitProducerIdRequest, ListOffsetsRequest,
    MetadataRequest, ProduceRequest, TopicName,
    create_topics_request::CreatableTopic,
    fetch_request::{FetchPartition, FetchTopic},
    list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic},
    metadata_request::MetadataRequestTopic,
    produce_request::{PartitionProduceData, TopicProduceData},
};
use kafka_protocol::protocol::StrBytes;
use sha2::Digest as _;

use super::batch::stamp;
use super::plan::{Backoff, JitterRng};
pub use super::progress::TopicPartition;

mod connection;
pub mod sasl;

#[cfg(test)]
mod tests;

use connection::{Connection, Incoming, Purpose, Response};
pub use sasl::SaslMechanism;

/// Where a broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslConfig {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: String,
}

/// How missing destination topics are created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicCreation {
    /// -1: the destination's default.
    pub partitions: i32,
    /// -1: the destination's default.
    pub replication_factor: i16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub bootstrap: Vec<BrokerAddress>,
    pub client_id: String,
    pub sasl: Option<SaslConfig>,
    /// `None`: a missing topic is an error, not created.
    pub create_topics: Option<TopicCreation>,
    /// A request not answered within this closes its connection (its
    /// batches are sent again on the next one).
    pub request_timeout_ms: u64,
    /// How long the broker may wait for replicas (`acks=all`).
    pub produce_timeout_ms: i32,
    /// The largest response frame accepted.
    pub response_bytes_max: usize,
    /// Requests in flight on one connection, and batches of one partition
    /// in flight; 1 to 5.
    pub in_flight_requests_max: usize,
    /// Batches one partition may hold, in flight or waiting.
    pub queued_batches_max: usize,
    pub metadata_refresh_ms: u64,
    pub backoff: Backoff,
    /// The most SCRAM iterations a server may ask for.
    pub scram_iterations_max: u32,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            bootstrap: Vec::new(),
            client_id: "rill-replicator".into(),
            sasl: None,
            create_topics: None,
            request_timeout_ms: 30_000,
            produce_timeout_ms: 30_000,
            response_bytes_max: 16 << 20,
            in_flight_requests_max: 5,
            queued_batches_max: 16,
            metadata_refresh_ms: 300_000,
            backoff: Backoff::default(),
            scram_iterations_max: 65_536,
        }
    }
}

/// A connection the driver opened for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(pub u64);

/// Why a connection or an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("configuration: {0}")]
    Config(&'static str),
    #[error("cannot encode request: {0}")]
    Encode(String),
    #[error("cannot decode response: {0}")]
    Decode(String),
    #[error("response of {bytes} bytes is over the limit of {bytes_max}")]
    FrameTooLarge { bytes: usize, bytes_max: usize },
    #[error("a response came that no request waits for")]
    UnexpectedResponse,
    #[error("response has correlation id {found}, expected {expected}")]
    CorrelationMismatch { expected: i32, found: i32 },
    #[error("the broker has no common version of API {api}")]
    UnsupportedApi { api: i16 },
    #[error("API {api} answered with error code {code}")]
    Broker { api: i16, code: i16 },
    #[error("the broker refuses SASL mechanism {mechanism} (it offers {offered:?})")]
    SaslMechanismRefused {
        mechanism: &'static str,
        offered: Vec<String>,
    },
    #[error("authentication failed: {0}")]
    Authentication(String),
    #[error("no answer within the request timeout")]
    RequestTimedOut,
    #[error("could not connect")]
    ConnectFailed,
    #[error("connection lost")]
    ConnectionLost,
}

/// Why a destination topic is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic does not exist at the destination and creating topics is not allowed")]
    Missing,
    #[error("destination refused to create the topic (error {code}): {message}")]
    CreationFailed { code: i16, message: String },
    #[error("destination answers error {code} for the topic")]
    Refused { code: i16 },
}

/// A fetch's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    Records {
        log_start_offset: i64,
        high_watermark: i64,
        records: Bytes,
    },
    /// A non-retriable error code (OFFSET_OUT_OF_RANGE: list the offsets
    /// again and start over).
    Error { code: i16 },
}

/// What the driver must do or learn, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Connect {
        connection: ConnectionId,
        address: BrokerAddress,
    },
    Send {
        connection: ConnectionId,
        bytes: Bytes,
    },
    Close {
        connection: ConnectionId,
    },
    /// The topic exists with this many partitions (again after a change).
    TopicReady {
        topic: String,
        partitions: u32,
    },
    TopicFailed {
        topic: String,
        error: TopicError,
    },
    ProducerReady {
        producer_id: i64,
        producer_epoch: i16,
    },
    /// The batch is written; `base_offset` is its first destination offset
    /// when the broker said (a resent duplicate may not say).
    Acknowledged {
        partition: TopicPartition,
        token: u64,
        base_offset: Option<i64>,
    },
    /// The batch can never be written; the partition takes no more.
    Refused {
        partition: TopicPartition,
        token: u64,
        code: i16,
    },
    /// The producer session was reset; these batches were dropped.
    SessionReset {
        dropped: Vec<(TopicPartition, u64)>,
    },
    Fetched {
        partition: TopicPartition,
        token: u64,
        outcome: FetchOutcome,
    },
    OffsetsListed {
        partition: TopicPartition,
        token: u64,
        log_start_offset: i64,
        high_watermark: i64,
    },
    /// For logs and status: a connection failed and will be retried.
    ConnectionFailed {
        connection: ConnectionId,
        error: ClientError,
    },
}

/// Why [`Client::produce`] did not take a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProduceError {
    #[error("the partition's queue is full")]
    QueueFull,
    #[error("the partition refused a batch before and takes no more")]
    PartitionStopped,
    #[error("the producer session is being reset")]
    Resetting,
    #[error("not a finished batch")]
    NotABatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FetchRequestInfo {
    partition: TopicPartition,
    token: u64,
    offset: i64,
    bytes_max: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListOffsetsInfo {
    partition: TopicPartition,
    token: u64,
    /// `None` while asking for the end, then the end while asking for the
    /// start.
    high_watermark: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    Fetch(FetchRequestInfo),
    ListOffsets(ListOffsetsInfo),
}

impl Read {
    fn partition(&self) -> &TopicPartition {
        match self {
            Read::Fetch(info) => &info.partition,
            Read::ListOffsets(info) => &info.partition,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Bootstrap,
    Node(i32),
}

struct Conn {
    target: Target,
    /// `None` until the socket is open.
    protocol: Option<Connection>,
}

#[derive(Debug)]
struct QueuedBatch {
    token: u64,
    bytes: Bytes,
    record_count: u32,
    /// `Some` once stamped for the current session.
    base_sequence: Option<i32>,
    in_flight_on: Option<ConnectionId>,
}

#[derive(Debug, Default)]
struct PartitionQueue {
    next_sequence: i32,
    batches: VecDeque<QueuedBatch>,
    retry_at_ms: u64,
    attempts: u32,
    stopped: bool,
}

#[derive(Debug, Default)]
struct TopicState {
    /// Leader node per partition, once known.
    leaders: Option<Vec<i32>>,
    needs_creation: bool,
    failed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Producer {
    None,
    Initializing,
    Ready { id: i64, epoch: i16 },
}

#[derive(Debug, Default)]
struct Retry {
    attempts: u32,
    at_ms: u64,
}

/// The producer client for one destination cluster.
pub struct Client {
    config: ClientConfig,
    seed: [u8; 32],
    nonce_counter: u64,
    rng: JitterRng,
    next_connection: u64,
    connections: BTreeMap<ConnectionId, Conn>,
    control: Option<ConnectionId>,
    control_retry: Retry,
    bootstrap_index: usize,
    brokers: BTreeMap<i32, BrokerAddress>,
    node_connections: BTreeMap<i32, ConnectionId>,
    node_retry: BTreeMap<i32, Retry>,
    topics: BTreeMap<String, TopicState>,
    metadata_due_ms: u64,
    metadata_in_flight: bool,
    create_in_flight: bool,
    producer: Producer,
    producer_retry: Retry,
    resetting: bool,
    partitions: BTreeMap<TopicPartition, PartitionQueue>,
    reads: VecDeque<Read>,
    actions: VecDeque<Action>,
}

const RETRIABLE_WITH_METADATA: &[i16] = &[
    3,  // UNKNOWN_TOPIC_OR_PARTITION
    5,  // LEADER_NOT_AVAILABLE
    6,  // NOT_LEADER_OR_FOLLOWER
    56, // KAFKA_STORAGE_ERROR
    74, // FENCED_LEADER_EPOCH
    75, // UNKNOWN_LEADER_EPOCH
];
const RETRIABLE: &[i16] = &[
    2,  // CORRUPT_MESSAGE (damaged in transit)
    7,  // REQUEST_TIMED_OUT
    13, // NETWORK_EXCEPTION
    14, // COORDINATOR_LOAD_IN_PROGRESS
    15, // COORDINATOR_NOT_AVAILABLE
    16, // NOT_COORDINATOR
    19, // NOT_ENOUGH_REPLICAS
    20, // NOT_ENOUGH_REPLICAS_AFTER_APPEND
    41, // NOT_CONTROLLER
    51, // CONCURRENT_TRANSACTIONS
    89, // THROTTLING_QUOTA_EXCEEDED
];
const OUT_OF_ORDER_SEQUENCE: i16 = 45;
const DUPLICATE_SEQUENCE: i16 = 46;
const RESETS_SESSION: &[i16] = &[
    47, // INVALID_PRODUCER_EPOCH
    59, // UNKNOWN_PRODUCER_ID
    90, // PRODUCER_FENCED
];
const TOPIC_ALREADY_EXISTS: i16 = 36;
const PARTITION_SEQUENCE_SPAN: i64 = i32::MAX as i64 + 1;

fn topic_name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_owned()))
}

impl Client {
    pub fn new(
        config: ClientConfig,
        random_seed: [u8; 32],
        now_ms: u64,
    ) -> Result<Client, ClientError> {
        if config.bootstrap.is_empty() {
            return Err(ClientError::Config("no bootstrap servers"));
        }
        if !(1..=5).contains(&config.in_flight_requests_max) {
            return Err(ClientError::Config("in_flight_requests_max must be 1 to 5"));
        }
        if config.queued_batches_max == 0 {
            return Err(ClientError::Config("queued_batches_max must be at least 1"));
        }
        if config.backoff.validate().is_err() {
            return Err(ClientError::Config("invalid backoff"));
        }
        let jitter_seed = sha2::Sha256::new()
            .chain_update(random_seed)
            .chain_update(b"jitter")
            .finalize();
        let mut jitter = [0u8; 8];
        jitter.copy_from_slice(&jitter_seed[..8]);
        let mut client = Client {
            config,
            seed: random_seed,
            nonce_counter: 0,
            rng: JitterRng::new(u64::from_le_bytes(jitter)),
            next_connection: 1,
            connections: BTreeMap::new(),
            control: None,
            control_retry: Retry::default(),
            bootstrap_index: 0,
            brokers: BTreeMap::new(),
            node_connections: BTreeMap::new(),
            node_retry: BTreeMap::new(),
            topics: BTreeMap::new(),
            metadata_due_ms: now_ms,
            metadata_in_flight: false,
            create_in_flight: false,
            producer: Producer::None,
            producer_retry: Retry::default(),
            resetting: false,
            partitions: BTreeMap::new(),
            reads: VecDeque::new(),
            actions: VecDeque::new(),
        };
        client.pump(now_ms);
        Ok(client)
    }

    /// The next thing to do, in order.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The destination topics to produce to; metadata is fetched (and
    /// missing topics created when allowed) for them.
    pub fn set_topics(&mut self, topics: impl IntoIterator<Item = String>, now_ms: u64) {
        let wanted: Vec<String> = topics.into_iter().collect();
        self.topics.retain(|topic, _| wanted.contains(topic));
        for topic in wanted {
            self.topics.entry(topic).or_default();
        }
        self.metadata_due_ms = now_ms;
        self.pump(now_ms);
    }

    /// The partition count of a destination topic, once known.
    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        let leaders = self.topics.get(topic)?.leaders.as_ref()?;
        u32::try_from(leaders.len()).ok()
    }

    /// The current producer id and epoch.
    pub fn producer(&self) -> Option<(i64, i16)> {
        match self.producer {
            Producer::Ready { id, epoch } => Some((id, epoch)),
            _ => None,
        }
    }

    /// Whether [`Client::produce`] would take a batch for `partition`.
    pub fn has_room(&self, partition: &TopicPartition) -> bool {
        !self.resetting
            && self.partitions.get(partition).is_none_or(|queue| {
                !queue.stopped && queue.batches.len() < self.config.queued_batches_max
            })
    }

    /// Batches of `partition` not yet acknowledged.
    pub fn queued_batches(&self, partition: &TopicPartition) -> usize {
        self.partitions
            .get(partition)
            .map_or(0, |queue| queue.batches.len())
    }

    /// Queues a finished, unstamped batch ([`super::batch::BatchBuilder`])
    /// for `partition`; `token` comes back with its outcome.
    pub fn produce(
        &mut self,
        partition: TopicPartition,
        token: u64,
        batch: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), ProduceError> {
        let header = rill_core::batch::check_batch(&batch).map_err(|_| ProduceError::NotABatch)?;
        if self.resetting {
            return Err(ProduceError::Resetting);
        }
        let queue = self.partitions.entry(partition).or_default();
        if queue.stopped {
            return Err(ProduceError::PartitionStopped);
        }
        if queue.batches.len() >= self.config.queued_batches_max {
            return Err(ProduceError::QueueFull);
        }
        queue.batches.push_back(QueuedBatch {
            token,
            bytes: Bytes::from(batch),
            record_count: header.record_count as u32,
            base_sequence: None,
            in_flight_on: None,
        });
        self.pump(now_ms);
        Ok(())
    }

    /// Asks for the start and end (high watermark) offsets of `partition`.
    pub fn list_offsets(&mut self, partition: TopicPartition, token: u64, now_ms: u64) {
        self.reads.push_back(Read::ListOffsets(ListOffsetsInfo {
            partition,
            token,
            high_watermark: None,
        }));
        self.pump(now_ms);
    }

    /// Fetches `partition` from `offset`, at most about `bytes_max` bytes
    /// (at least one whole batch).
    pub fn fetch(
        &mut self,
        partition: TopicPartition,
        token: u64,
        offset: i64,
        bytes_max: i32,
        now_ms: u64,
    ) {
        self.reads.push_back(Read::Fetch(FetchRequestInfo {
            partition,
            token,
            offset,
            bytes_max,
        }));
        self.pump(now_ms);
    }

    pub fn handle_connected(&mut self, connection: ConnectionId, now_ms: u64) {
        let nonce = self.next_nonce();
        let Some(conn) = self.connections.get_mut(&connection) else {
            return;
        };
        let opened = Connection::open(
            &self.config.client_id,
            self.config.sasl.clone(),
            nonce,
            self.config.scram_iterations_max,
            self.config.response_bytes_max,
            now_ms,
        );
        match opened {
            Ok(protocol) => {
                conn.protocol = Some(protocol);
                self.flush(connection);
            }
            Err(error) => self.fail(connection, error, now_ms),
        }
        self.pump(now_ms);
    }

    pub fn handle_connect_failed(&mut self, connection: ConnectionId, now_ms: u64) {
        self.lost(connection, ClientError::ConnectFailed, now_ms);
        self.pump(now_ms);
    }

    pub fn handle_disconnected(&mut self, connection: ConnectionId, now_ms: u64) {
        self.lost(connection, ClientError::ConnectionLost, now_ms);
        self.pump(now_ms);
    }

    pub fn handle_received(&mut self, connection: ConnectionId, bytes: &[u8], now_ms: u64) {
        let Some(protocol) = self
            .connections
            .get_mut(&connection)
            .and_then(|conn| conn.protocol.as_mut())
        else {
            return;
        };
        match protocol.receive(bytes, now_ms) {
            Ok(incoming) => {
                for item in incoming {
                    match item {
                        Incoming::Ready => {
                            if let Some(conn) = self.connections.get(&connection)
                                && conn.target == Target::Bootstrap
                            {
                                self.control_retry.attempts = 0;
                            }
                        }
                        Incoming::Response(purpose, response) => {
                            self.handle_response(connection, purpose, response, now_ms);
                        }
                    }
                }
                self.flush(connection);
            }
            Err(error) => self.fail(connection, error, now_ms),
        }
        self.pump(now_ms);
    }

    /// Timeouts and retries; call at least every 100 ms.
    pub fn handle_tick(&mut self, now_ms: u64) {
        let expired: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, conn)| {
                conn.protocol
                    .as_ref()
                    .and_then(Connection::oldest_sent_at_ms)
                    .is_some_and(|sent| {
                        now_ms.saturating_sub(sent) >= self.config.request_timeout_ms
                    })
            })
            .map(|(&id, _)| id)
            .collect();
        for connection in expired {
            self.fail(connection, ClientError::RequestTimedOut, now_ms);
        }
        self.pump(now_ms);
    }

    fn next_nonce(&mut self) -> String {
        use base64::Engine as _;
        self.nonce_counter += 1;
        let digest = sha2::Sha256::new()
            .chain_update(self.seed)
            .chain_update(self.nonce_counter.to_le_bytes())
            .finalize();
        base64::engine::general_purpose::STANDARD.encode(&digest[..18])
    }

    fn backoff_ms(&mut self, attempts: u32) -> u64 {
        self.config.backoff.delay_ms(attempts, &mut self.rng)
    }

    fn open(&mut self, target: Target, address: BrokerAddress) -> ConnectionId {
        let connection = ConnectionId(self.next_connection);
        self.next_connection += 1;
        self.connections.insert(
            connection,
            Conn {
                target,
                protocol: None,
            },
        );
        self.actions.push_back(Action::Connect {
            connection,
            address,
        });
        connection
    }

    fn flush(&mut self, connection: ConnectionId) {
        if let Some(protocol) = self
            .connections
            .get_mut(&connection)
            .and_then(|conn| conn.protocol.as_mut())
        {
            for bytes in protocol.outgoing.drain(..) {
                self.actions.push_back(Action::Send { connection, bytes });
            }
        }
    }

    /// A protocol error or timeout: close, then as if lost.
    fn fail(&mut self, connection: ConnectionId, error: ClientError, now_ms: u64) {
        if self.connections.contains_key(&connection) {
            self.actions.push_back(Action::Close { connection });
        }
        self.lost(connection, error, now_ms);
    }

    fn lost(&mut self, connection: ConnectionId, error: ClientError, now_ms: u64) {
        let Some(mut conn) = self.connections.remove(&connection) else {
            return;
        };
        self.actions
            .push_back(Action::ConnectionFailed { connection, error });
        let purposes = conn
            .protocol
            .as_mut()
            .map(Connection::take_in_flight)
            .unwrap_or_default();
        for purpose in purposes {
            match purpose {
                // Asked again as soon as a connection is back, not at the
                // next refresh: topics wait for it.
                Purpose::Metadata => {
                    self.metadata_in_flight = false;
                    self.metadata_due_ms = self.metadata_due_ms.min(now_ms);
                }
                Purpose::CreateTopics => {
                    self.create_in_flight = false;
                    self.metadata_due_ms = self.metadata_due_ms.min(now_ms);
                }
                Purpose::InitProducerId => self.producer = Producer::None,
                Purpose::Fetch(info) => self.reads.push_front(Read::Fetch(info)),
                Purpose::ListOffsets(info) => self.reads.push_front(Read::ListOffsets(info)),
                _ => {}
            }
        }
        for queue in self.partitions.values_mut() {
            for batch in &mut queue.batches {
                if batch.in_flight_on == Some(connection) {
                    batch.in_flight_on = None;
                }
            }
        }
        match conn.target {
            Target::Bootstrap => {
                self.control = None;
                self.bootstrap_index += 1;
                let delay = self.backoff_ms(self.control_retry.attempts);
                self.control_retry.attempts += 1;
                self.control_retry.at_ms = now_ms + delay;
            }
            Target::Node(node) => {
                self.node_connections.remove(&node);
                let attempts = self.node_retry.get(&node).map_or(0, |retry| retry.attempts);
                let delay = self.backoff_ms(attempts);
                self.node_retry.insert(
                    node,
                    Retry {
                        attempts: attempts + 1,
                        at_ms: now_ms + delay,
                    },
                );
                // The leader may have moved.
                self.metadata_due_ms = self.metadata_due_ms.min(now_ms);
            }
        }
        self.maybe_finish_reset();
    }

    fn ready(&self, connection: Option<ConnectionId>) -> Option<ConnectionId> {
        let connection = connection?;
        let protocol = self.connections.get(&connection)?.protocol.as_ref()?;
        (protocol.is_ready() && protocol.in_flight() < self.config.in_flight_requests_max)
            .then_some(connection)
    }

    fn protocol(&mut self, connection: ConnectionId) -> Option<&mut Connection> {
        self.connections.get_mut(&connection)?.protocol.as_mut()
    }

    fn pump(&mut self, now_ms: u64) {
        if self.control.is_none() && now_ms >= self.control_retry.at_ms {
            let address =
                self.config.bootstrap[self.bootstrap_index % self.config.bootstrap.len()].clone();
            self.control = Some(self.open(Target::Bootstrap, address));
        }
        if let Some(control) = self.ready(self.control) {
            self.send_control(control, now_ms);
        }
        self.send_to_leaders(now_ms);
    }

    fn send_control(&mut self, control: ConnectionId, now_ms: u64) {
        if !self.topics.is_empty() && !self.metadata_in_flight && now_ms >= self.metadata_due_ms {
            let request = MetadataRequest::default()
                .with_topics(Some(
                    self.topics
                        .keys()
                        .map(|topic| {
                            MetadataRequestTopic::default().with_name(Some(topic_name(topic)))
                        })
                        .collect(),
                ))
                .with_allow_auto_topic_creation(false);
            self.metadata_in_flight = true;
            self.metadata_due_ms = now_ms.saturating_add(self.config.metadata_refresh_ms);
            self.send_on(control, &request, Purpose::Metadata, now_ms);
        }
        if self.producer == Producer::None
            && !self.resetting
            && now_ms >= self.producer_retry.at_ms
            && self.ready(Some(control)).is_some()
        {
            let request = InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_transaction_timeout_ms(i32::MAX)
                .with_producer_id((-1).into())
                .with_producer_epoch(-1);
            self.producer = Producer::Initializing;
            self.send_on(control, &request, Purpose::InitProducerId, now_ms);
        }
        let creation = self.config.create_topics;
        let to_create: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, state)| state.needs_creation)
            .map(|(topic, _)| topic.clone())
            .collect();
        if let Some(creation) = creation
            && !to_create.is_empty()
            && !self.create_in_flight
            && self.ready(Some(control)).is_some()
        {
            let Some(protocol) = self.protocol(control) else {
                return;
            };
            if protocol.version(ApiKey::CreateTopics).is_none() {
                for topic in to_create {
                    self.topic_failed(
                        &topic,
                        TopicError::CreationFailed {
                            code: 35,
                            message: "the destination does not serve CreateTopics".into(),
                        },
                    );
                }
                return;
            }
            let request = CreateTopicsRequest::default()
                .with_topics(
                    to_create
                        .iter()
                        .map(|topic| {
                            CreatableTopic::default()
                                .with_name(topic_name(topic))
                                .with_num_partitions(creation.partitions)
                                .with_replication_factor(creation.replication_factor)
                        })
                        .collect(),
                )
                .with_timeout_ms(self.config.produce_timeout_ms);
            self.create_in_flight = true;
            self.send_on(control, &request, Purpose::CreateTopics, now_ms);
        }
    }

    fn send_on<R>(&mut self, connection: ConnectionId, request: &R, purpose: Purpose, now_ms: u64)
    where
        R: connection::ClientRequest,
    {
        let Some(protocol) = self.protocol(connection) else {
            return;
        };
        match protocol.send(request, purpose, now_ms) {
            Ok(()) => self.flush(connection),
            Err(error) => self.fail(connection, error, now_ms),
        }
    }

    fn leader(&self, partition: &TopicPartition) -> Option<i32> {
        let leaders = self.topics.get(&partition.topic)?.leaders.as_ref()?;
        leaders
            .get(partition.partition as usize)
            .copied()
            .filter(|&leader| leader >= 0)
    }

    /// The ready connection to `node`, opening one when allowed.
    fn leader_connection(&mut self, node: i32, now_ms: u64) -> Option<ConnectionId> {
        if let Some(&connection) = self.node_connections.get(&node) {
            return self.ready(Some(connection));
        }
        let retry_at = self.node_retry.get(&node).map_or(0, |retry| retry.at_ms);
        if now_ms < retry_at {
            return None;
        }
        let Some(address) = self.brokers.get(&node).cloned() else {
            self.metadata_due_ms = self.metadata_due_ms.min(now_ms);
            return None;
        };
        let connection = self.open(Target::Node(node), address);
        self.node_connections.insert(node, connection);
        None
    }

    fn send_to_leaders(&mut self, now_ms: u64) {
        // Leaders with something to send.
        let mut nodes: Vec<i32> = Vec::new();
        let wanted: Vec<TopicPartition> = self
            .partitions
            .iter()
            .filter(|(_, queue)| queue.batches.iter().any(|b| b.in_flight_on.is_none()))
            .map(|(partition, _)| partition.clone())
            .chain(self.reads.iter().map(|read| read.partition().clone()))
            .collect();
        for partition in &wanted {
            match self.leader(partition) {
                Some(node) if !nodes.contains(&node) => nodes.push(node),
                Some(_) => {}
                None => self.metadata_due_ms = self.metadata_due_ms.min(now_ms),
            }
        }
        for node in nodes {
            let Some(connection) = self.leader_connection(node, now_ms) else {
                continue;
            };
            self.send_reads(node, connection, now_ms);
            while self.ready(Some(connection)).is_some()
                && self.send_produce(node, connection, now_ms)
            {}
        }
    }

    fn send_reads(&mut self, node: i32, connection: ConnectionId, now_ms: u64) {
        let mut index = 0;
        while index < self.reads.len() && self.ready(Some(connection)).is_some() {
            if self.leader(self.reads[index].partition()) != Some(node) {
                index += 1;
                continue;
            }
            let Some(read) = self.reads.remove(index) else {
                break;
            };
            match read {
                Read::Fetch(info) => {
                    let request = FetchRequest::default()
                        .with_replica_id(BrokerId(-1))
                        .with_max_wait_ms(0)
                        .with_min_bytes(0)
                        .with_max_bytes(info.bytes_max)
                        .with_isolation_level(0)
                        .with_session_id(0)
                        .with_session_epoch(-1)
                        .with_topics(vec![
                            FetchTopic::default()
                                .with_topic(topic_name(&info.partition.topic))
                                .with_partitions(vec![
                                    FetchPartition::default()
                                        .with_partition(info.partition.partition as i32)
                                        .with_fetch_offset(info.offset)
                                        .with_current_leader_epoch(-1)
                                        .with_log_start_offset(-1)
                                        .with_partition_max_bytes(info.bytes_max),
                                ]),
                        ]);
                    self.send_on(connection, &request, Purpose::Fetch(info), now_ms);
                }
                Read::ListOffsets(info) => {
                    // -1: the end (high watermark); -2: the start.
                    let timestamp = if info.high_watermark.is_none() {
                        -1
                    } else {
                        -2
                    };
                    let request = ListOffsetsRequest::default()
                        .with_replica_id(BrokerId(-1))
                        .with_isolation_level(0)
                        .with_topics(vec![
                            ListOffsetsTopic::default()
                                .with_name(topic_name(&info.partition.topic))
                                .with_partitions(vec![
                                    ListOffsetsPartition::default()
                                        .with_partition_index(info.partition.partition as i32)
                                        .with_current_leader_epoch(-1)
                                        .with_timestamp(timestamp),
                                ]),
                        ]);
                    self.send_on(connection, &request, Purpose::ListOffsets(info), now_ms);
                }
            }
        }
    }

    /// Sends one Produce request to `node` with the next batch of each
    /// partition it leads that may send; false when there was none.
    fn send_produce(&mut self, node: i32, connection: ConnectionId, now_ms: u64) -> bool {
        let Producer::Ready { id, epoch } = self.producer else {
            return false;
        };
        if self.resetting {
            return false;
        }
        let window = self.config.in_flight_requests_max;
        let led: Vec<TopicPartition> = self
            .partitions
            .keys()
            .filter(|partition| self.leader(partition) == Some(node))
            .cloned()
            .collect();
        let mut topics: BTreeMap<String, Vec<PartitionProduceData>> = BTreeMap::new();
        let mut sent: Vec<(TopicPartition, u64)> = Vec::new();
        for partition in led {
            let Some(queue) = self.partitions.get_mut(&partition) else {
                continue;
            };
            if queue.stopped || now_ms < queue.retry_at_ms {
                continue;
            }
            let Some(index) = queue.batches.iter().position(|b| b.in_flight_on.is_none()) else {
                continue;
            };
            // In order: everything before it is in flight on this very
            // connection, and the window has room.
            if index >= window
                || queue
                    .batches
                    .iter()
                    .take(index)
                    .any(|b| b.in_flight_on != Some(connection))
            {
                continue;
            }
            let next_sequence = queue.next_sequence;
            let batch = &mut queue.batches[index];
            if batch.base_sequence.is_none() {
                // Stamped in place: the batch's only owner is the queue
                // until it is sent (a copy only if it is still shared).
                let mut bytes = match std::mem::take(&mut batch.bytes).try_into_mut() {
                    Ok(bytes) => bytes,
                    Err(shared) => BytesMut::from(&shared[..]),
                };
                stamp(&mut bytes, id, epoch, next_sequence);
                batch.bytes = bytes.freeze();
                batch.base_sequence = Some(next_sequence);
                queue.next_sequence = ((i64::from(next_sequence) + i64::from(batch.record_count))
                    % PARTITION_SEQUENCE_SPAN) as i32;
            }
            batch.in_flight_on = Some(connection);
            topics.entry(partition.topic.clone()).or_default().push(
                PartitionProduceData::default()
                    .with_index(partition.partition as i32)
                    .with_records(Some(batch.bytes.clone())),
            );
            sent.push((partition, batch.token));
        }
        if sent.is_empty() {
            return false;
        }
        let request = ProduceRequest::default()
            .with_transactional_id(None)
            .with_acks(-1)
            .with_timeout_ms(self.config.produce_timeout_ms)
            .with_topic_data(
                topics
                    .into_iter()
                    .map(|(topic, partitions)| {
                        TopicProduceData::default()
                            .with_name(topic_name(&topic))
                            .with_partition_data(partitions)
                    })
                    .collect(),
            );
        self.send_on(connection, &request, Purpose::Produce(sent), now_ms);
        true
    }

    fn topic_failed(&mut self, topic: &str, error: TopicError) {
        if let Some(state) = self.topics.get_mut(topic) {
            state.needs_creation = false;
            if state.failed {
                return;
            }
            state.failed = true;
        }
        self.actions.push_back(Action::TopicFailed {
            topic: topic.to_owned(),
            error,
        });
    }

    fn handle_response(
        &mut self,
        connection: ConnectionId,
        purpose: Purpose,
        response: Response,
        now_ms: u64,
    ) {
        match (purpose, response) {
            (Purpose::Metadata, Response::Metadata(response)) => {
                self.handle_metadata(response, now_ms)
            }
            (Purpose::CreateTopics, Response::CreateTopics(response)) => {
                self.create_in_flight = false;
                for result in response.topics {
                    let topic = result.name.0.to_string();
                    match result.error_code {
                        0 | TOPIC_ALREADY_EXISTS => {
                            if let Some(state) = self.topics.get_mut(&topic) {
                                state.needs_creation = false;
                            }
                            self.metadata_due_ms = now_ms;
                        }
                        code if RETRIABLE.contains(&code) => {}
                        code => self.topic_failed(
                            &topic,
                            TopicError::CreationFailed {
                                code,
                                message: result
                                    .error_message
                                    .map(|m| m.to_string())
                                    .unwrap_or_default(),
                            },
                        ),
                    }
                }
            }
            (Purpose::InitProducerId, Response::InitProducerId(response)) => {
                if response.error_code == 0 {
                    self.producer = Producer::Ready {
                        id: response.producer_id.0,
                        epoch: response.producer_epoch,
                    };
                    self.producer_retry.attempts = 0;
                    self.actions.push_back(Action::ProducerReady {
                        producer_id: response.producer_id.0,
                        producer_epoch: response.producer_epoch,
                    });
                } else {
                    self.producer = Producer::None;
                    let delay = self.backoff_ms(self.producer_retry.attempts);
                    self.producer_retry.attempts += 1;
                    self.producer_retry.at_ms = now_ms + delay;
                    self.actions.push_back(Action::ConnectionFailed {
                        connection,
                        error: ClientError::Broker {
                            api: ApiKey::InitProducerId as i16,
                            code: response.error_code,
                        },
                    });
                }
            }
            (Purpose::Produce(sent), Response::Produce(response)) => {
                for (partition, token) in sent {
                    let answer = response
                        .responses
                        .iter()
                        .filter(|topic| topic.name.0.as_str() == partition.topic)
                        .flat_map(|topic| &topic.partition_responses)
                        .find(|answer| answer.index == partition.partition as i32);
                    let (code, base_offset) =
                        answer.map_or((13, -1), |a| (a.error_code, a.base_offset));
                    self.handle_produce_result(&partition, token, code, base_offset, now_ms);
                }
                self.maybe_finish_reset();
            }
            (Purpose::Fetch(info), Response::Fetch(response)) => {
                let data = response
                    .responses
                    .iter()
                    .filter(|topic| topic.topic.0.as_str() == info.partition.topic)
                    .flat_map(|topic| &topic.partitions)
                    .find(|data| data.partition_index == info.partition.partition as i32);
                let code = data.map_or(response.error_code, |data| data.error_code);
                match (code, data) {
                    (0, Some(data)) => self.actions.push_back(Action::Fetched {
                        partition: info.partition.clone(),
                        token: info.token,
                        outcome: FetchOutcome::Records {
                            log_start_offset: data.log_start_offset,
                            high_watermark: data.high_watermark,
                            records: data.records.clone().unwrap_or_default(),
                        },
                    }),
                    (code, _) if self.retry_read(code, now_ms) || code == 0 => {
                        self.reads.push_back(Read::Fetch(info));
                    }
                    (code, _) => self.actions.push_back(Action::Fetched {
                        partition: info.partition,
                        token: info.token,
                        outcome: FetchOutcome::Error { code },
                    }),
                }
            }
            (Purpose::ListOffsets(info), Response::ListOffsets(response)) => {
                let answer = response
                    .topics
                    .iter()
                    .filter(|topic| topic.name.0.as_str() == info.partition.topic)
                    .flat_map(|topic| &topic.partitions)
                    .find(|answer| answer.partition_index == info.partition.partition as i32);
                let (code, offset) = answer.map_or((13, -1), |a| (a.error_code, a.offset));
                if code != 0 {
                    self.retry_read(code, now_ms);
                    self.reads.push_back(Read::ListOffsets(info));
                    return;
                }
                match info.high_watermark {
                    None => self.reads.push_back(Read::ListOffsets(ListOffsetsInfo {
                        high_watermark: Some(offset),
                        ..info
                    })),
                    Some(high_watermark) => self.actions.push_back(Action::OffsetsListed {
                        partition: info.partition,
                        token: info.token,
                        log_start_offset: offset,
                        high_watermark,
                    }),
                }
            }
            _ => self.fail(connection, ClientError::UnexpectedResponse, now_ms),
        }
    }

    /// Whether a read with this error code is tried again (after a
    /// metadata refresh when the leader may have moved).
    fn retry_read(&mut self, code: i16, now_ms: u64) -> bool {
        if RETRIABLE_WITH_METADATA.contains(&code) {
            self.metadata_due_ms = self.metadata_due_ms.min(now_ms);
            true
        } else {
            RETRIABLE.contains(&code)
        }
    }

    fn handle_produce_result(
        &mut self,
        partition: &TopicPartition,
        token: u64,
        code: i16,
        base_offset: i64,
        now_ms: u64,
    ) {
        let Some(queue) = self.partitions.get_mut(partition) else {
            return;
        };
        let Some(index) = queue.batches.iter().position(|b| b.token == token) else {
            return;
        };
        match code {
            0 | DUPLICATE_SEQUENCE => {
                queue.batches.remove(index);
                queue.attempts = 0;
                let base_offset = (code == 0 && base_offset >= 0).then_some(base_offset);
                self.actions.push_back(Action::Acknowledged {
                    partition: partition.clone(),
                    token,
                    base_offset,
                });
            }
            // A batch after one being retried arrives out of order: it is
            // retried too, with the same sequence.
            OUT_OF_ORDER_SEQUENCE if index > 0 => self.retry_batch(partition, index, now_ms),
            code if code == OUT_OF_ORDER_SEQUENCE || RESETS_SESSION.contains(&code) => {
                queue.batches[index].in_flight_on = None;
                self.resetting = true;
            }
            code if RETRIABLE_WITH_METADATA.contains(&code) => {
                self.metadata_due_ms = self.metadata_due_ms.min(now_ms);
                self.retry_batch(partition, index, now_ms);
            }
            code if RETRIABLE.contains(&code) => self.retry_batch(partition, index, now_ms),
            code => {
                queue.stopped = true;
                let tokens: Vec<u64> = queue.batches.drain(..).map(|b| b.token).collect();
                for dropped in tokens {
                    self.actions.push_back(Action::Refused {
                        partition: partition.clone(),
                        token: dropped,
                        code,
                    });
                }
            }
        }
    }

    fn retry_batch(&mut self, partition: &TopicPartition, index: usize, now_ms: u64) {
        let attempts = self
            .partitions
            .get(partition)
            .map_or(0, |queue| queue.attempts);
        let delay = self.backoff_ms(attempts);
        if let Some(queue) = self.partitions.get_mut(partition) {
            queue.batches[index].in_flight_on = None;
            queue.attempts += 1;
            queue.retry_at_ms = now_ms + delay;
        }
    }

    /// Ends a producer session reset once no batch is in flight anywhere.
    fn maybe_finish_reset(&mut self) {
        if !self.resetting {
            return;
        }
        let in_flight = self
            .partitions
            .values()
            .any(|queue| queue.batches.iter().any(|b| b.in_flight_on.is_some()));
        if in_flight {
            return;
        }
        let mut dropped = Vec::new();
        for (partition, queue) in &mut self.partitions {
            dropped.extend(
                queue
                    .batches
                    .drain(..)
                    .map(|b| (partition.clone(), b.token)),
            );
            queue.next_sequence = 0;
            queue.attempts = 0;
            queue.retry_at_ms = 0;
        }
        self.resetting = false;
        self.producer = Producer::None;
        self.actions.push_back(Action::SessionReset { dropped });
    }

    fn handle_metadata(
        &mut self,
        response: kafka_protocol::messages::MetadataResponse,
        now_ms: u64,
    ) {
        self.metadata_in_flight = false;
        for broker in &response.brokers {
            if let Ok(port) = u16::try_from(broker.port) {
                self.brokers.insert(
                    broker.node_id.0,
                    BrokerAddress {
                        host: broker.host.to_string(),
                        port,
                    },
                );
            }
        }
        let mut retry_soon = false;
        for topic in &response.topics {
            let Some(name) = topic.name.as_ref().map(|name| name.0.to_string()) else {
                continue;
            };
            let creation_allowed = self.config.create_topics.is_some();
            let Some(state) = self.topics.get_mut(&name) else {
                continue;
            };
            match topic.error_code {
                0 => {
                    let count = topic.partitions.len();
                    let mut leaders = vec![-1; count];
                    for partition in &topic.partitions {
                        if let Some(slot) = usize::try_from(partition.partition_index)
                            .ok()
                            .and_then(|index| leaders.get_mut(index))
                        {
                            *slot = if partition.error_code == 0 {
                                partition.leader_id.0
                            } else {
                                -1
                            };
                        }
                    }
                    retry_soon |= leaders.contains(&-1);
                    let changed = state.leaders.as_ref().map(Vec::len) != Some(count);
                    state.leaders = Some(leaders);
                    state.failed = false;
                    if changed && count > 0 {
                        self.actions.push_back(Action::TopicReady {
                            topic: name,
                            partitions: count as u32,
                        });
                    }
                }
                3 if creation_allowed => state.needs_creation = true,
                3 => self.topic_failed(&name, TopicError::Missing),
                code if RETRIABLE_WITH_METADATA.contains(&code) || RETRIABLE.contains(&code) => {
                    retry_soon = true;
                }
                code => self.topic_failed(&name, TopicError::Refused { code }),
            }
        }
        if retry_soon {
            let delay = self.config.backoff.initial_ms;
            self.metadata_due_ms = self.metadata_due_ms.min(now_ms + delay);
        }
    }
}
