//! One destination's task: the steps of `rill_edge_bridge::replicator`'s
//! module documentation carried out over the shards and real sockets.
//!
//! Everything runs in one loop: carry out the client's actions, start the
//! reconciliations that are due, read source partitions the drain
//! scheduler picks while there is room, finish batches whose linger is up,
//! hand finished batches to the client as the token bucket allows, persist
//! the checkpoint, publish the status; then wait for an event (bytes read,
//! a socket connected or lost, new data in a caught-up partition) or a
//! tick. Sockets have a reader and a writer task each, so the loop never
//! waits on the network; connects run as tasks too. Memory is bounded:
//! one chunk is read at a time, only while few finished batches wait, and
//! the client holds at most `queued_batches_max` batches per destination
//! partition.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compio::BufResult;
use compio::io::AsyncWriteExt;
use compio::net::TcpStream;
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use futures_util::future::{Either, select};
use rill_edge_bridge::replicator::batch::{
    BatchBuilder, ProducerBatch, Provenance, PushError, decode_batch, split_batches,
};
use rill_edge_bridge::replicator::client::{
    Action, Client, ConnectionId, FetchOutcome, ProduceError, TopicPartition,
};
use rill_edge_bridge::replicator::plan::{
    DrainCandidate, DrainScheduler, PartitionMap, TokenBucket,
};
use rill_edge_bridge::replicator::progress::{
    Checkpoint, Progress, TailChunk, TailFound, TailScan,
};
use rill_protocol::{ErrorCode, OffsetSpec};

use super::PartitionLag;
use crate::broker::Shared;
use crate::broker::connection::read_ranges_into;
use crate::broker::shard::ShardOp;
use crate::broker::topics::shard_of;
use crate::config::MirrorDestination;
use crate::tls::TlsSession;

/// The loop wakes at least this often (client timeouts, linger, bucket).
const TICK_MS: u64 = 10;
/// Bytes read from a source partition at once.
const READ_CHUNK_BYTES: u64 = 1024 * 1024;
/// Chunks the reader reads ahead of the one being batched.
const READ_AHEAD_CHUNKS: usize = 3;
/// Chunks read per loop turn, so events are not kept waiting.
const READS_PER_TURN: usize = 16;
/// Finished batches waiting for the bucket or the client, at most, before
/// reading stops.
const PENDING_BATCHES_MAX: usize = 4;
/// A finished batch of a destination partition waits at most this many
/// behind the client's queue before its source is not read further.
const PENDING_PER_PARTITION_MAX: usize = 2;
/// Largest uncompressed size of a source or destination batch decoded.
const UNCOMPRESSED_BYTES_MAX: usize = 64 << 20;
/// Largest checkpoint file read back.
const CHECKPOINT_BYTES_MAX: usize = 64 << 20;
/// Fetch size while scanning a destination's tail.
const SCAN_FETCH_BYTES: i32 = 1 << 20;
/// A long poll on a caught-up partition is renewed this often.
const WAIT_MS: u64 = 5_000;
/// Status and frontiers are published this often.
const PUBLISH_MS: u64 = 250;
/// A failed reconciliation or source read is tried again after this.
const RETRY_MS: u64 = 500;
/// How long a graceful shutdown waits for batches in flight.
const SHUTDOWN_DRAIN_MS: u64 = 5_000;
/// Connect attempts give up after this.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Batch bytes one destination holds (in flight or waiting) at most.
const HELD_BYTES_MAX: u64 = 64 << 20;
/// Under a bandwidth cap, batches are cut at the bucket's burst, but not
/// below this.
const BATCH_BYTES_MIN_UNDER_CAP: u64 = 16 * 1024;
/// Bytes read from a destination socket at once.
const SOCKET_READ_BYTES: usize = 64 * 1024;

fn now_ms() -> u64 {
    crate::broker::now_ms().max(0) as u64
}

enum Event {
    Connected {
        connection: ConnectionId,
        stream: TcpStream,
    },
    ConnectFailed {
        connection: ConnectionId,
        error: String,
    },
    Bytes {
        connection: ConnectionId,
        bytes: Vec<u8>,
    },
    Lost {
        connection: ConnectionId,
        error: String,
    },
    DataReady {
        source: usize,
    },
}

struct Socket {
    stream: TcpStream,
    writer: mpsc::UnboundedSender<Vec<u8>>,
}

/// A source partition being mirrored.
struct Source {
    partition: TopicPartition,
    destination_topic: String,
    priority: u8,
    /// The partition's end when last read.
    end: u64,
    /// Read to its end; a long poll is out.
    idle: bool,
    waiting: bool,
    stopped: bool,
    retry_at_ms: u64,
    caught_up_at_ms: u64,
}

#[derive(Debug)]
enum Reconcile {
    Pending { not_before_ms: u64 },
    Listing { token: u64 },
    Scanning { token: u64, scan: Box<TailScan> },
    Done,
}

struct DestinationTopic {
    partitions: u32,
    reconcile: Vec<Reconcile>,
}

/// A batch handed to the client.
struct Sent {
    source: usize,
    first_offset: u64,
    last_offset: u64,
    record_count: u32,
    bytes: u64,
}

/// A finished batch waiting for the bucket or the client.
struct Finished {
    source: usize,
    destination: TopicPartition,
    batch: ProducerBatch,
}

struct Driver {
    shared: Arc<Shared>,
    config: MirrorDestination,
    index: usize,
    edge_id: String,
    client: Client,
    events: mpsc::UnboundedSender<Event>,
    sockets: HashMap<ConnectionId, Socket>,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    progress: Progress,
    sources: Vec<Source>,
    source_index: HashMap<TopicPartition, usize>,
    source_partitions: HashMap<String, u32>,
    destinations: BTreeMap<String, DestinationTopic>,
    producer_ready: bool,
    scheduler: DrainScheduler,
    builders: BTreeMap<(usize, u32), BatchBuilder>,
    /// Reads source chunks on a thread of its own.
    reader: ChunkReader,
    /// The chunks the reader streams ahead for the partition read last.
    prefetch: Option<Prefetch>,
    pending: VecDeque<Finished>,
    in_flight: HashMap<u64, Sent>,
    /// Bytes of the batches in `in_flight` and `pending`.
    held_bytes: u64,
    /// Reading stops while `held_bytes` is at this.
    held_bytes_max: u64,
    next_token: u64,
    bucket: Option<TokenBucket>,
    /// Bytes asked of a source partition at once: [`READ_CHUNK_BYTES`],
    /// or a few batches' worth under a bandwidth cap so that what waits
    /// in `pending` is never long and priority stays responsive.
    read_chunk_bytes: u64,
    checkpoint_path: PathBuf,
    checkpoint_dirty: bool,
    last_checkpoint: Instant,
    last_publish: Instant,
    last_topic_refresh: Option<Instant>,
    reconcile_not_before_ms: u64,
    records_sent: u64,
    bytes_sent: u64,
    batches_sent: u64,
    connection_failures: u64,
    session_resets: u64,
    truncated_partitions: u64,
    last_error: Option<String>,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    config: MirrorDestination,
    index: usize,
    edge_id: String,
) {
    let name = config.name.clone();
    let (events_sender, mut events) = mpsc::unbounded();
    let mut driver = match Driver::new(shared.clone(), config, index, edge_id, events_sender) {
        Ok(driver) => driver,
        Err(error) => {
            tracing::error!(destination = %name, %error, "the mirror destination cannot start");
            shared.mirror.update(index, |status| {
                status.state = "stopped".into();
                status.last_error = Some(error);
            });
            return;
        }
    };
    tracing::info!(destination = %name, edge_id = %driver.edge_id, "mirror starting");
    let mut shutdown_at: Option<Instant> = None;
    loop {
        driver.carry_out().await;
        if shared.is_shutting_down() {
            let since = *shutdown_at.get_or_insert_with(Instant::now);
            if driver.in_flight.is_empty()
                || since.elapsed() >= Duration::from_millis(SHUTDOWN_DRAIN_MS)
            {
                break;
            }
        } else {
            driver.step().await;
            // What step handed the client goes out now, not at the next wake.
            driver.carry_out().await;
        }
        driver.housekeeping(false);
        let tick = Box::pin(compio::time::sleep(Duration::from_millis(
            driver.next_wake_ms(now_ms()),
        )));
        let first = match select(events.next(), tick).await {
            Either::Left((event, _)) => event,
            Either::Right(_) => None,
        };
        let now = now_ms();
        if let Some(event) = first {
            driver.on_event(event, now);
        }
        while let Ok(event) = events.try_recv() {
            driver.on_event(event, now);
        }
        driver.client.handle_tick(now);
    }
    driver.housekeeping(true);
    for socket in driver.sockets.values() {
        shutdown(&socket.stream);
    }
    shared
        .mirror
        .update(index, |status| status.state = "stopped".into());
    tracing::info!(destination = %name, "mirror stopped");
}

fn shutdown(stream: &TcpStream) {
    // SAFETY: shutdown(2) on a descriptor the stream still owns.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR) };
}

fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    if let Ok(mut file) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = file.read_exact(&mut seed);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    for (byte, extra) in seed.iter_mut().zip(nanos.to_le_bytes()) {
        *byte ^= extra;
    }
    seed
}

impl Driver {
    fn new(
        shared: Arc<Shared>,
        config: MirrorDestination,
        index: usize,
        edge_id: String,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Driver, String> {
        let now = now_ms();
        let tls = match &config.tls {
            Some(tls) => {
                let identity = tls
                    .identity
                    .as_ref()
                    .map(|(cert, key)| (std::path::Path::new(cert), std::path::Path::new(key)));
                let client_config =
                    crate::tls::client_config(std::path::Path::new(&tls.ca_file), identity)
                        .map_err(|error| format!("{error:#}"))?;
                let server_name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())
                    .map_err(|error| format!("tls server name {:?}: {error}", tls.server_name))?;
                Some((client_config, server_name))
            }
            None => None,
        };
        let client = Client::new(config.client.clone(), random_seed(), now)
            .map_err(|error| error.to_string())?;
        let directory = shared.config.data_dir.join("mirror");
        std::fs::create_dir_all(&directory)
            .map_err(|error| format!("creating {}: {error}", directory.display()))?;
        let checkpoint_path = directory.join(format!("{}.checkpoint", config.name));
        let progress = match std::fs::read(&checkpoint_path) {
            Ok(bytes) => match Checkpoint::decode(&bytes, CHECKPOINT_BYTES_MAX) {
                Ok(checkpoint) if checkpoint.edge_id == edge_id => {
                    Progress::from_checkpoint(&checkpoint)
                }
                Ok(checkpoint) => {
                    tracing::warn!(destination = %config.name, old = %checkpoint.edge_id, new = %edge_id,
                        "the edge id changed: mirroring starts afresh under the new one");
                    Progress::new(edge_id.clone())
                }
                Err(error) => {
                    // Reconciliation from the start of every destination
                    // partition finds what is there: still exactly once.
                    tracing::warn!(destination = %config.name, %error,
                        "mirror checkpoint unreadable; reconciling from the destination's start");
                    Progress::new(edge_id.clone())
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Progress::new(edge_id.clone())
            }
            Err(error) => return Err(format!("reading {}: {error}", checkpoint_path.display())),
        };
        let mut config = config;
        let mut read_chunk_bytes = READ_CHUNK_BYTES;
        let bucket = match config.bandwidth_bytes_per_s {
            // A burst of a tenth of a second; batches no larger than about
            // that, so the uplink is paced smoothly rather than a large
            // batch now and silence for seconds after.
            Some(rate) => {
                let burst = (rate / 10).max(1);
                let batch_bytes =
                    usize::try_from(burst.max(BATCH_BYTES_MIN_UNDER_CAP)).unwrap_or(usize::MAX);
                config.batch.batch_bytes_max = config.batch.batch_bytes_max.min(batch_bytes);
                read_chunk_bytes = (config.batch.batch_bytes_max as u64)
                    .saturating_mul(PENDING_BATCHES_MAX as u64)
                    .min(READ_CHUNK_BYTES);
                Some(TokenBucket::new(rate, burst, now).map_err(|error| error.to_string())?)
            }
            None => None,
        };
        let reconcile_not_before_ms = now + shared.config.mirror.reconcile_delay_ms;
        // An eighth of the memory budget per destination, at least a few
        // largest batches.
        let held_bytes_max = (shared.config.node.memory_budget_bytes / 8)
            .clamp(4 * config.batch.batch_bytes_max as u64, HELD_BYTES_MAX);
        let reader = ChunkReader::start(shared.clone())?;
        Ok(Driver {
            shared,
            config,
            index,
            edge_id,
            client,
            events,
            sockets: HashMap::new(),
            tls,
            progress,
            sources: Vec::new(),
            source_index: HashMap::new(),
            source_partitions: HashMap::new(),
            destinations: BTreeMap::new(),
            producer_ready: false,
            scheduler: DrainScheduler::new(),
            builders: BTreeMap::new(),
            reader,
            prefetch: None,
            pending: VecDeque::new(),
            in_flight: HashMap::new(),
            held_bytes: 0,
            held_bytes_max,
            next_token: 1,
            bucket,
            read_chunk_bytes,
            checkpoint_path,
            checkpoint_dirty: false,
            last_checkpoint: Instant::now(),
            last_publish: Instant::now(),
            last_topic_refresh: None,
            reconcile_not_before_ms,
            records_sent: 0,
            bytes_sent: 0,
            batches_sent: 0,
            connection_failures: 0,
            session_resets: 0,
            truncated_partitions: 0,
            last_error: None,
        })
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// One turn of work besides events.
    async fn step(&mut self) {
        let due = self.last_topic_refresh.is_none_or(|last| {
            last.elapsed() >= Duration::from_millis(self.shared.config.mirror.topic_refresh_ms)
        });
        if due {
            self.last_topic_refresh = Some(Instant::now());
            self.refresh_topics().await;
        }
        self.start_reconciliations();
        self.send_pending();
        for _ in 0..READS_PER_TURN {
            if !self.read_next().await {
                break;
            }
        }
        self.finish_due_builders(now_ms());
        self.send_pending();
    }

    /// Carries out the client's actions, in order.
    async fn carry_out(&mut self) {
        while let Some(action) = self.client.next_action() {
            let now = now_ms();
            match action {
                Action::Connect {
                    connection,
                    address,
                } => {
                    let events = self.events.clone();
                    crate::io::home::spawn(async move {
                        let target = format!("{}:{}", address.host, address.port);
                        let connected = compio::time::timeout(
                            Duration::from_millis(CONNECT_TIMEOUT_MS),
                            TcpStream::connect(target.as_str()),
                        )
                        .await;
                        let event = match connected {
                            Ok(Ok(stream)) => {
                                let _ = stream.set_nodelay(true);
                                Event::Connected { connection, stream }
                            }
                            Ok(Err(error)) => Event::ConnectFailed {
                                connection,
                                error: format!("connecting to {target}: {error}"),
                            },
                            Err(_) => Event::ConnectFailed {
                                connection,
                                error: format!("connecting to {target}: timed out"),
                            },
                        };
                        let _ = events.unbounded_send(event);
                    })
                    .detach();
                }
                Action::Send { connection, bytes } => {
                    if let Some(socket) = self.sockets.get(&connection) {
                        // A frame the client no longer holds: no copy.
                        let _ = socket.writer.unbounded_send(Vec::from(bytes));
                    }
                }
                Action::Close { connection } => {
                    if let Some(socket) = self.sockets.remove(&connection) {
                        shutdown(&socket.stream);
                    }
                }
                Action::TopicReady { topic, partitions } => self.topic_ready(topic, partitions),
                Action::TopicFailed { topic, error } => {
                    let message = format!("destination topic {topic}: {error}");
                    tracing::error!(destination = %self.config.name, %message);
                    self.last_error = Some(message);
                }
                Action::ProducerReady {
                    producer_id,
                    producer_epoch,
                } => {
                    tracing::info!(destination = %self.config.name, producer_id, producer_epoch, "mirror producer session ready");
                    self.producer_ready = true;
                }
                Action::Acknowledged {
                    partition,
                    token,
                    base_offset,
                } => self.acknowledged(&partition, token, base_offset),
                Action::Refused {
                    partition,
                    token,
                    code,
                } => {
                    let sent = self.in_flight.remove(&token);
                    if let Some(sent) = &sent {
                        self.held_bytes = self.held_bytes.saturating_sub(sent.bytes);
                    }
                    let message = format!(
                        "the destination refused a batch for {}/{} (error {code}); its source partition is stopped",
                        partition.topic, partition.partition
                    );
                    tracing::error!(destination = %self.config.name, %message);
                    if let Some(sent) = sent
                        && let Some(source) = self.sources.get_mut(sent.source)
                    {
                        source.stopped = true;
                    }
                    self.last_error = Some(message);
                }
                Action::SessionReset { dropped } => self.session_reset(dropped.len()),
                Action::Fetched {
                    partition,
                    token,
                    outcome,
                } => self.fetched(partition, token, outcome, now),
                Action::OffsetsListed {
                    partition,
                    token,
                    log_start_offset,
                    high_watermark,
                } => self.offsets_listed(partition, token, log_start_offset, high_watermark, now),
                Action::ConnectionFailed { connection, error } => {
                    self.connection_failures += 1;
                    if let Some(socket) = self.sockets.remove(&connection) {
                        shutdown(&socket.stream);
                    }
                    tracing::debug!(destination = %self.config.name, %error, "mirror connection failed; retrying");
                    self.last_error = Some(error.to_string());
                }
            }
        }
    }

    fn on_event(&mut self, event: Event, now: u64) {
        match event {
            Event::Connected { connection, stream } => self.attach(connection, stream, now),
            Event::ConnectFailed { connection, error } => {
                self.last_error = Some(error);
                self.client.handle_connect_failed(connection, now);
            }
            Event::Bytes { connection, bytes } => {
                if self.sockets.contains_key(&connection) {
                    self.client.handle_received(connection, &bytes, now);
                }
            }
            Event::Lost { connection, error } => {
                if let Some(socket) = self.sockets.remove(&connection) {
                    shutdown(&socket.stream);
                    self.connection_failures += 1;
                    self.last_error = Some(error);
                    self.client.handle_disconnected(connection, now);
                }
            }
            Event::DataReady { source } => {
                if let Some(source) = self.sources.get_mut(source) {
                    source.waiting = false;
                    source.idle = false;
                }
            }
        }
    }

    /// A socket is open: its reader and writer tasks start.
    fn attach(&mut self, connection: ConnectionId, stream: TcpStream, now: u64) {
        let session: Option<TlsSession> = match &self.tls {
            Some((config, name)) => {
                match rustls::ClientConnection::new(config.clone(), name.clone()) {
                    Ok(session) => Some(std::rc::Rc::new(std::cell::RefCell::new(
                        rustls::Connection::Client(session),
                    ))),
                    Err(error) => {
                        self.last_error = Some(format!("TLS: {error}"));
                        shutdown(&stream);
                        self.client.handle_connect_failed(connection, now);
                        return;
                    }
                }
            }
            None => None,
        };
        let (writer, outgoing) = mpsc::unbounded::<Vec<u8>>();
        crate::io::home::spawn(write_loop(
            stream.clone(),
            outgoing,
            session.clone(),
            self.events.clone(),
            connection,
        ))
        .detach();
        let kick = writer.clone();
        crate::io::home::spawn(read_loop(
            stream.clone(),
            session.clone(),
            kick,
            self.events.clone(),
            connection,
        ))
        .detach();
        if session.is_some() {
            // The ClientHello goes out now.
            let _ = writer.unbounded_send(Vec::new());
        }
        self.sockets.insert(connection, Socket { stream, writer });
        self.client.handle_connected(connection, now);
    }

    /// Tracks new source partitions and gives the client their topics.
    async fn refresh_topics(&mut self) {
        let view = self.shared.topics.snapshot();
        let mut added = false;
        for (topic, meta) in view.table.iter() {
            if !self.config.selection.selects(topic) {
                continue;
            }
            self.source_partitions
                .insert(topic.clone(), meta.partitions);
            for partition in 0..meta.partitions {
                let source = TopicPartition::new(topic.clone(), partition);
                if self.source_index.contains_key(&source) {
                    continue;
                }
                let start = match self.list_offset(&source, OffsetSpec::Earliest).await {
                    Some(start) => start,
                    None => continue,
                };
                self.progress.track(source.clone(), start);
                let destination_topic = self.config.rename.destination_topic(&self.edge_id, topic);
                self.source_index.insert(source.clone(), self.sources.len());
                self.sources.push(Source {
                    partition: source,
                    destination_topic,
                    priority: self.config.priorities.priority(topic),
                    end: 0,
                    idle: false,
                    waiting: false,
                    stopped: false,
                    retry_at_ms: 0,
                    caught_up_at_ms: now_ms(),
                });
                added = true;
            }
        }
        if added {
            let topics: BTreeSet<String> = self
                .sources
                .iter()
                .map(|source| source.destination_topic.clone())
                .collect();
            self.client.set_topics(topics, now_ms());
        }
    }

    async fn list_offset(&self, source: &TopicPartition, at: OffsetSpec) -> Option<u64> {
        let key = (source.topic.clone(), source.partition);
        let owner = shard_of(&key.0, key.1, self.shared.shards());
        match self
            .shared
            .call(owner, |reply| ShardOp::ListOffsets { key, at, reply })
            .await
        {
            Ok(Ok(Some(offset))) => u64::try_from(offset).ok(),
            _ => None,
        }
    }

    fn topic_ready(&mut self, topic: String, partitions: u32) {
        let not_before_ms = self.reconcile_not_before_ms;
        let entry = self
            .destinations
            .entry(topic.clone())
            .or_insert_with(|| DestinationTopic {
                partitions: 0,
                reconcile: Vec::new(),
            });
        if entry.partitions != partitions {
            if entry.partitions != 0 {
                tracing::warn!(destination = %self.config.name, %topic, from = entry.partitions, to = partitions,
                    "destination partition count changed; reconciling the topic again");
            }
            entry.partitions = partitions;
            entry.reconcile = (0..partitions)
                .map(|_| Reconcile::Pending { not_before_ms })
                .collect();
        }
    }

    /// Step 2: reconcile destination partitions that need it, once the
    /// producer is ready and nothing of theirs is queued.
    fn start_reconciliations(&mut self) {
        if !self.producer_ready {
            return;
        }
        let now = now_ms();
        let mut starts = Vec::new();
        for (topic, state) in &self.destinations {
            for (partition, reconcile) in state.reconcile.iter().enumerate() {
                if let Reconcile::Pending { not_before_ms } = reconcile
                    && *not_before_ms <= now
                {
                    let destination = TopicPartition::new(topic.clone(), partition as u32);
                    if self.client.queued_batches(&destination) == 0 {
                        starts.push(destination);
                    }
                }
            }
        }
        for destination in starts {
            let token = self.token();
            if let Some(state) = self.destinations.get_mut(&destination.topic) {
                state.reconcile[destination.partition as usize] = Reconcile::Listing { token };
            }
            self.client.list_offsets(destination, token, now);
        }
    }

    fn reconcile_state(&mut self, destination: &TopicPartition) -> Option<&mut Reconcile> {
        self.destinations
            .get_mut(&destination.topic)
            .and_then(|state| state.reconcile.get_mut(destination.partition as usize))
    }

    fn retry_reconcile(&mut self, destination: &TopicPartition, why: String, now: u64) {
        tracing::warn!(destination = %self.config.name, topic = %destination.topic, partition = destination.partition, %why, "reconciliation failed; retrying");
        self.last_error = Some(why);
        if let Some(state) = self.reconcile_state(destination) {
            *state = Reconcile::Pending {
                not_before_ms: now + RETRY_MS,
            };
        }
    }

    fn offsets_listed(
        &mut self,
        destination: TopicPartition,
        token: u64,
        log_start_offset: i64,
        high_watermark: i64,
        now: u64,
    ) {
        if !matches!(self.reconcile_state(&destination), Some(Reconcile::Listing { token: expected }) if *expected == token)
        {
            return;
        }
        let mut scan = TailScan::new(&self.progress, destination.clone(), UNCOMPRESSED_BYTES_MAX);
        let from = scan.next_fetch_offset().unwrap_or(high_watermark);
        if from >= high_watermark {
            let chunk = TailChunk {
                fetch_offset: from,
                log_start_offset,
                high_watermark,
                records: &[],
            };
            match scan.observe(chunk) {
                Ok(Some(found)) => self.reconciled(found),
                Ok(None) => self.retry_reconcile(&destination, "scan did not finish".into(), now),
                Err(error) => self.retry_reconcile(&destination, error.to_string(), now),
            }
            return;
        }
        let token = self.token();
        let offset = from.max(log_start_offset);
        if let Some(state) = self.reconcile_state(&destination) {
            *state = Reconcile::Scanning {
                token,
                scan: Box::new(scan),
            };
        }
        self.client
            .fetch(destination, token, offset, SCAN_FETCH_BYTES, now);
    }

    fn fetched(
        &mut self,
        destination: TopicPartition,
        token: u64,
        outcome: FetchOutcome,
        now: u64,
    ) {
        let Some(Reconcile::Scanning {
            token: expected,
            scan,
        }) = self.reconcile_state(&destination)
        else {
            return;
        };
        if *expected != token {
            return;
        }
        let Some(offset) = scan.next_fetch_offset() else {
            return;
        };
        match outcome {
            FetchOutcome::Records {
                log_start_offset,
                high_watermark,
                records,
            } => {
                let chunk = TailChunk {
                    fetch_offset: offset,
                    log_start_offset,
                    high_watermark,
                    records: &records,
                };
                match scan.observe(chunk) {
                    Ok(Some(found)) => self.reconciled(found),
                    Ok(None) => {
                        let next = scan.next_fetch_offset().unwrap_or(offset);
                        let token = self.token();
                        if let Some(Reconcile::Scanning { token: slot, .. }) =
                            self.reconcile_state(&destination)
                        {
                            *slot = token;
                        }
                        self.client
                            .fetch(destination, token, next, SCAN_FETCH_BYTES, now);
                    }
                    Err(error) => self.retry_reconcile(&destination, error.to_string(), now),
                }
            }
            FetchOutcome::Error { code } => {
                self.retry_reconcile(&destination, format!("tail fetch: error {code}"), now)
            }
        }
    }

    fn reconciled(&mut self, found: TailFound) {
        if let Some((acknowledged_end, high_watermark)) = found.truncated {
            self.truncated_partitions += 1;
            tracing::error!(destination = %self.config.name, topic = %found.partition.topic,
                partition = found.partition.partition, acknowledged_end, high_watermark,
                "destination partition is shorter than what it acknowledged: acknowledged records were lost there");
        }
        tracing::debug!(destination = %self.config.name, topic = %found.partition.topic,
            partition = found.partition.partition, scanned_to = found.scanned_to,
            batches = found.batches_read, "destination partition reconciled");
        self.progress.reconcile(&found);
        self.checkpoint_dirty = true;
        if let Some(state) = self.reconcile_state(&found.partition) {
            *state = Reconcile::Done;
        }
        for source in &mut self.sources {
            if source.destination_topic == found.partition.topic {
                source.idle = false;
            }
        }
    }

    fn session_reset(&mut self, dropped: usize) {
        self.session_resets += 1;
        tracing::warn!(destination = %self.config.name, dropped, "producer session reset; reconciling every destination partition");
        self.builders.clear();
        self.pending.clear();
        self.in_flight.clear();
        self.held_bytes = 0;
        self.progress.discard_unacknowledged();
        self.producer_ready = false;
        // A batch of the old session whose connection was lost may sit
        // unreplicated at a leader, invisible to a scan: wait as after a
        // restart before reading the tails.
        let not_before_ms = now_ms() + self.shared.config.mirror.reconcile_delay_ms;
        for state in self.destinations.values_mut() {
            for reconcile in &mut state.reconcile {
                *reconcile = Reconcile::Pending { not_before_ms };
            }
        }
        for source in &mut self.sources {
            source.idle = false;
        }
    }

    fn acknowledged(&mut self, destination: &TopicPartition, token: u64, base_offset: Option<i64>) {
        let Some(sent) = self.in_flight.remove(&token) else {
            return;
        };
        self.held_bytes = self.held_bytes.saturating_sub(sent.bytes);
        let Some(source) = self.sources.get(sent.source) else {
            return;
        };
        let end = base_offset.map(|base| base + i64::from(sent.record_count));
        if let Err(error) =
            self.progress
                .acknowledged(&source.partition, sent.first_offset, sent.last_offset, end)
        {
            tracing::error!(destination = %self.config.name, %error, topic = %destination.topic, "acknowledgement does not match a batch");
            return;
        }
        self.records_sent += u64::from(sent.record_count);
        self.bytes_sent += sent.bytes;
        self.batches_sent += 1;
        self.checkpoint_dirty = true;
    }

    /// The destination partitions a source partition's records may go to,
    /// and the map, once its topic is ready there.
    fn mapping(&self, source: &Source) -> Option<PartitionMap> {
        let destination = self.destinations.get(&source.destination_topic)?;
        let source_partitions = *self.source_partitions.get(&source.partition.topic)?;
        (destination.partitions > 0 && source_partitions > 0)
            .then(|| PartitionMap::new(source_partitions, destination.partitions))
    }

    fn pending_for(&self, destination: &TopicPartition) -> usize {
        self.pending
            .iter()
            .filter(|finished| &finished.destination == destination)
            .count()
    }

    fn destination_ready(&self, destination: &TopicPartition) -> bool {
        let reconciled = self
            .destinations
            .get(&destination.topic)
            .and_then(|state| state.reconcile.get(destination.partition as usize))
            .is_some_and(|state| matches!(state, Reconcile::Done));
        reconciled
            && self.client.has_room(destination)
            && self.pending_for(destination) < PENDING_PER_PARTITION_MAX
    }

    fn source_ready(&self, index: usize, now: u64) -> bool {
        let source = &self.sources[index];
        if source.stopped || source.retry_at_ms > now || !self.producer_ready {
            return false;
        }
        let Some(map) = self.mapping(source) else {
            return false;
        };
        if map.is_same_partition() {
            self.destination_ready(&TopicPartition::new(
                source.destination_topic.clone(),
                source.partition.partition,
            ))
        } else {
            (0..map.destination_partitions).all(|partition| {
                self.destination_ready(&TopicPartition::new(
                    source.destination_topic.clone(),
                    partition,
                ))
            })
        }
    }

    /// Step 3: reads one chunk of the partition the scheduler picks.
    /// Returns whether anything was read.
    async fn read_next(&mut self) -> bool {
        let now = now_ms();
        if self.pending.len() >= PENDING_BATCHES_MAX || self.held_bytes >= self.held_bytes_max {
            return false;
        }
        // Under a cap, read the next chunk when the last batch of the
        // previous one is waiting for the bucket, not before: what is read
        // next is chosen by priority close to when it can be sent, and it
        // is ready when the bucket is, so no send slot goes unused
        // (reading after the bucket is ready made emulated, slow boxes
        // fall 15% short of the cap).
        if self.bucket.is_some() && self.pending.len() > 1 {
            return false;
        }
        let candidates: Vec<DrainCandidate> = (0..self.sources.len())
            .map(|index| {
                let source = &self.sources[index];
                let position = self.progress.read_position(&source.partition).unwrap_or(0);
                DrainCandidate {
                    priority: source.priority,
                    backlog_records: if source.idle {
                        0
                    } else {
                        source.end.saturating_sub(position).max(1)
                    },
                    ready: self.source_ready(index, now),
                }
            })
            .collect();
        let Some(index) = self.scheduler.next(&candidates) else {
            return false;
        };
        self.read_chunk(index).await
    }

    async fn read_chunk(&mut self, index: usize) -> bool {
        let now = now_ms();
        let partition = self.sources[index].partition.clone();
        let Some(position) = self.progress.read_position(&partition) else {
            return false;
        };
        // The chunk the reader streamed ahead, when it is the one wanted;
        // otherwise a stream starts here (or, under a cap, one chunk is read).
        let mut stream = match self.prefetch.take() {
            Some(prefetch) if prefetch.index == index && prefetch.position == position => prefetch,
            _ => {
                // A stream of another partition or position is let go.
                let ahead = if self.bucket.is_some() {
                    0
                } else {
                    READ_AHEAD_CHUNKS
                };
                self.reader.stream(
                    index,
                    partition.clone(),
                    position,
                    self.read_chunk_bytes,
                    ahead,
                )
            }
        };
        let chunk = stream
            .chunks
            .next()
            .await
            .unwrap_or_else(SourceChunk::shutting_down);
        let SourceChunk {
            outcome,
            bytes,
            scratch,
        } = chunk;
        let (end, next_offset) = match outcome {
            ChunkOutcome::Read {
                high_watermark,
                next_offset,
            } => (u64::try_from(high_watermark).unwrap_or(0), next_offset),
            ChunkOutcome::OutOfRange => {
                self.skip_evicted(index, position).await;
                return true;
            }
            ChunkOutcome::Gone(error) => {
                self.stop_source(index, format!("the source partition is gone: {error}"));
                return false;
            }
            ChunkOutcome::Failed(error) => {
                tracing::warn!(destination = %self.config.name, topic = %partition.topic, partition = partition.partition, %error, "mirror read failed; retrying");
                self.sources[index].retry_at_ms = now + RETRY_MS;
                return false;
            }
            ChunkOutcome::ShuttingDown => return false,
        };
        self.sources[index].end = end;
        let read_any = self.take_records(index, position, &bytes);
        // The buffers go back to the reader (kept between reads: a fresh
        // buffer per chunk cost a page fault per 4 KiB read).
        let _ = stream.spare.unbounded_send((bytes, scratch));
        let position = self.progress.read_position(&partition).unwrap_or(position);
        // The stream goes on from where this chunk ended, if that is where
        // the partition's reading goes on.
        if u64::try_from(next_offset).is_ok_and(|next| next == position) && position < end {
            stream.position = position;
            self.prefetch = Some(stream);
        }
        if position >= end {
            self.go_idle(index, position);
        }
        read_any
    }

    /// Batches the records of one chunk; returns whether the position moved.
    fn take_records(&mut self, index: usize, position: u64, bytes: &[u8]) -> bool {
        let now = now_ms();
        let source = &self.sources[index];
        let partition = source.partition.clone();
        let destination_topic = source.destination_topic.clone();
        let Some(map) = self.mapping(source) else {
            return false;
        };
        let mut last_read: Option<u64> = None;
        // Built once per chunk; only the offset changes from record to record.
        let mut provenance = Provenance {
            edge_id: self.edge_id.clone(),
            topic: partition.topic.clone(),
            partition: partition.partition,
            offset: 0,
        };
        let mut destination = TopicPartition::new(destination_topic, 0);
        for batch in split_batches(bytes) {
            let batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    self.stop_source(index, format!("damaged batch in the source log: {error}"));
                    break;
                }
            };
            let decoded = match decode_batch(batch, UNCOMPRESSED_BYTES_MAX) {
                Ok(decoded) => decoded,
                Err(error) => {
                    self.stop_source(index, format!("source batch unreadable: {error}"));
                    break;
                }
            };
            let batch_last = u64::try_from(decoded.header.last_offset()).unwrap_or(0);
            if batch_last < position {
                continue;
            }
            if decoded.header.is_control() {
                last_read = Some(batch_last);
                continue;
            }
            let mut failed = false;
            for record in decoded.records() {
                let record = match record {
                    Ok(record) => record,
                    Err(error) => {
                        self.stop_source(index, format!("source record unreadable: {error}"));
                        failed = true;
                        break;
                    }
                };
                if record.offset < position {
                    continue;
                }
                destination.partition = map.destination_partition(partition.partition, record.key);
                if !self
                    .progress
                    .is_present(&partition, &destination, record.offset)
                {
                    provenance.offset = record.offset;
                    if let Err(error) = self.push(index, &destination, &record, &provenance, now) {
                        self.stop_source(index, error);
                        failed = true;
                        break;
                    }
                }
                last_read = Some(record.offset);
            }
            if failed {
                break;
            }
            // Offsets a batch spans without records (compaction) are read too.
            last_read = Some(batch_last);
        }
        match last_read {
            Some(offset) => {
                let _ = self.progress.read_through(&partition, offset);
                true
            }
            None => false,
        }
    }

    fn push(
        &mut self,
        index: usize,
        destination: &TopicPartition,
        record: &rill_edge_bridge::replicator::batch::SourceRecord<'_>,
        provenance: &Provenance,
        now: u64,
    ) -> Result<(), String> {
        let key = (index, destination.partition);
        for _ in 0..2 {
            let builder = self
                .builders
                .entry(key)
                .or_insert_with(|| BatchBuilder::new(self.config.compression, self.config.batch));
            let was_empty = builder.is_empty();
            match builder.push(record, provenance, now) {
                Ok(()) => {
                    if was_empty {
                        let _ = self.progress.open_batch(
                            &self.sources[index].partition,
                            destination,
                            record.offset,
                        );
                    }
                    return Ok(());
                }
                Err(PushError::Full) => self.finish_builder(key, destination.clone()),
                Err(error) => return Err(format!("record {}: {error}", record.offset)),
            }
        }
        Err(format!("record {} fits no batch", record.offset))
    }

    fn finish_builder(&mut self, key: (usize, u32), destination: TopicPartition) {
        let Some(builder) = self.builders.get_mut(&key) else {
            return;
        };
        if builder.is_empty() {
            return;
        }
        match builder.finish() {
            Ok(batch) => {
                self.held_bytes += batch.bytes.len() as u64;
                self.pending.push_back(Finished {
                    source: key.0,
                    destination,
                    batch,
                });
            }
            Err(error) => self.stop_source(key.0, format!("compressing a batch: {error}")),
        }
    }

    fn finish_due_builders(&mut self, now: u64) {
        let due: Vec<(usize, u32)> = self
            .builders
            .iter()
            .filter(|(_, builder)| builder.ready_at_ms().is_some_and(|at| at <= now))
            .map(|(key, _)| *key)
            .collect();
        for key in due {
            let topic = self.sources[key.0].destination_topic.clone();
            self.finish_builder(key, TopicPartition::new(topic, key.1));
        }
    }

    /// How long the loop may sleep when no event comes: the tick, or less
    /// when a batch waits for the bucket and it is ready sooner. (A batch
    /// the bucket would take now waits for the client, whose answer is an
    /// event.)
    fn next_wake_ms(&self, now: u64) -> u64 {
        let wait = match &self.bucket {
            Some(bucket) if !self.pending.is_empty() => bucket.ready_at_ms(now).saturating_sub(now),
            _ => 0,
        };
        if wait == 0 {
            TICK_MS
        } else {
            wait.min(TICK_MS)
        }
    }

    /// Hands finished batches to the client in order per destination
    /// partition, as the bucket allows.
    fn send_pending(&mut self) {
        let now = now_ms();
        let mut blocked: BTreeSet<TopicPartition> = BTreeSet::new();
        let mut position = 0;
        while position < self.pending.len() {
            let destination = self.pending[position].destination.clone();
            // Nothing goes to a partition while it is reconciled (its
            // partition count changed): the scan must see a quiet tail.
            let reconciled = self
                .destinations
                .get(&destination.topic)
                .and_then(|state| state.reconcile.get(destination.partition as usize))
                .is_some_and(|state| matches!(state, Reconcile::Done));
            if blocked.contains(&destination) || !reconciled || !self.client.has_room(&destination)
            {
                blocked.insert(destination);
                position += 1;
                continue;
            }
            let size = self.pending[position].batch.bytes.len() as u64;
            if let Some(bucket) = &mut self.bucket
                && bucket.try_take(size, now).is_err()
            {
                return;
            }
            let Some(finished) = self.pending.remove(position) else {
                return;
            };
            let token = self.token();
            let sent = Sent {
                source: finished.source,
                first_offset: finished.batch.first_source_offset,
                last_offset: finished.batch.last_source_offset,
                record_count: finished.batch.record_count,
                bytes: size,
            };
            match self
                .client
                .produce(destination.clone(), token, finished.batch.bytes, now)
            {
                Ok(()) => {
                    self.in_flight.insert(token, sent);
                }
                Err(error) => {
                    // has_room said it would be taken. Dropping it would
                    // stall the frontier and re-reading could duplicate
                    // what is in flight: stop the partition and report.
                    self.held_bytes = self.held_bytes.saturating_sub(size);
                    let why = match error {
                        ProduceError::PartitionStopped => "destination partition stopped".into(),
                        error => format!("the producer client refused a batch: {error}"),
                    };
                    self.stop_source(finished.source, why);
                }
            }
        }
    }

    fn stop_source(&mut self, index: usize, why: String) {
        let source = &mut self.sources[index];
        if !source.stopped {
            tracing::error!(destination = %self.config.name, topic = %source.partition.topic,
                partition = source.partition.partition, %why, "mirroring of the partition stopped");
        }
        source.stopped = true;
        self.last_error = Some(why);
    }

    /// The read position was removed by retention or the disk quota before
    /// it was mirrored: those records are lost to this destination.
    async fn skip_evicted(&mut self, index: usize, position: u64) {
        let partition = self.sources[index].partition.clone();
        let Some(start) = self.list_offset(&partition, OffsetSpec::Earliest).await else {
            self.sources[index].retry_at_ms = now_ms() + RETRY_MS;
            return;
        };
        if start <= position {
            // Past the end rather than below the start: wait for data.
            self.go_idle(index, position);
            return;
        }
        let lost = start - position;
        tracing::error!(destination = %self.config.name, topic = %partition.topic,
            partition = partition.partition, from = position, to = start, records = lost,
            "records were deleted before they were mirrored");
        self.shared.mirror.record_evicted_unmirrored(
            &self.config.name,
            &partition.topic,
            partition.partition,
            lost,
        );
        let _ = self.progress.read_through(&partition, start - 1);
        self.checkpoint_dirty = true;
    }

    /// Waits (in a task) for data at `position`.
    fn go_idle(&mut self, index: usize, position: u64) {
        let source = &mut self.sources[index];
        source.idle = true;
        if source.waiting {
            return;
        }
        source.waiting = true;
        let key = (source.partition.topic.clone(), source.partition.partition);
        let owner = shard_of(&key.0, key.1, self.shared.shards());
        let shared = self.shared.clone();
        let events = self.events.clone();
        crate::io::home::spawn(async move {
            let (reply, woken) = oneshot::channel();
            let sent = shared.send(
                owner,
                ShardOp::WaitForData {
                    key,
                    offset: position as i64,
                    reply,
                },
            );
            if sent.is_ok() {
                let _ = compio::time::timeout(Duration::from_millis(WAIT_MS), woken).await;
            }
            let _ = events.unbounded_send(Event::DataReady { source: index });
        })
        .detach();
    }

    /// Checkpoint and status, when due (or `now`).
    fn housekeeping(&mut self, now: bool) {
        let interval = Duration::from_millis(self.shared.config.mirror.checkpoint_interval_ms);
        if self.checkpoint_dirty && (now || self.last_checkpoint.elapsed() >= interval) {
            self.last_checkpoint = Instant::now();
            self.checkpoint_dirty = false;
            let bytes = self.progress.checkpoint().encode();
            let directory = self.checkpoint_path.parent().map(PathBuf::from);
            let name = self
                .checkpoint_path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned());
            if let (Some(directory), Some(name)) = (directory, name)
                && let Err(error) =
                    crate::broker::shard::write_atomically(&directory, &name, &bytes)
            {
                tracing::error!(destination = %self.config.name, %error, "mirror checkpoint write failed");
                self.checkpoint_dirty = true;
            }
        }
        if now || self.last_publish.elapsed() >= Duration::from_millis(PUBLISH_MS) {
            self.last_publish = Instant::now();
            self.publish();
        }
    }

    fn publish(&mut self) {
        let stats = self.shared.published_stats();
        let sizes: HashMap<(&str, u32), (u64, i64, i64)> = stats
            .iter()
            .map(|stats| {
                (
                    (stats.topic.as_str(), stats.partition),
                    (stats.size_bytes, stats.log_start_offset, stats.next_offset),
                )
            })
            .collect();
        let now = now_ms();
        let mut partitions = Vec::with_capacity(self.sources.len());
        for source in &mut self.sources {
            let frontier = self.progress.frontier(&source.partition).unwrap_or(0);
            let size = sizes.get(&(source.partition.topic.as_str(), source.partition.partition));
            let end = size
                .map(|&(_, _, next)| u64::try_from(next).unwrap_or(0))
                .unwrap_or(0)
                .max(source.end);
            let lag_records = end.saturating_sub(frontier);
            if lag_records == 0 {
                source.caught_up_at_ms = now;
            }
            let lag_bytes = size.map_or(0, |&(bytes, start, next)| {
                let records = (next - start).max(1) as u64;
                (bytes as u128 * u128::from(lag_records) / u128::from(records)) as u64
            });
            self.shared.mirror.publish_frontier(
                self.index,
                &source.partition.topic,
                source.partition.partition,
                frontier,
            );
            partitions.push(PartitionLag {
                topic: source.partition.topic.clone(),
                partition: source.partition.partition,
                destination_topic: source.destination_topic.clone(),
                frontier,
                end,
                lag_records,
                lag_bytes,
                lag_seconds: now.saturating_sub(source.caught_up_at_ms) / 1000,
                stopped: source.stopped,
            });
        }
        let reconciling = self.destinations.values().any(|state| {
            state
                .reconcile
                .iter()
                .any(|reconcile| !matches!(reconcile, Reconcile::Done))
        });
        let topics_known = self
            .sources
            .iter()
            .all(|source| self.destinations.contains_key(&source.destination_topic));
        let state = if !self.producer_ready || !topics_known {
            "connecting"
        } else if reconciling {
            "reconciling"
        } else {
            "mirroring"
        };
        let (records, bytes, batches) = (self.records_sent, self.bytes_sent, self.batches_sent);
        let (failures, resets, truncated) = (
            self.connection_failures,
            self.session_resets,
            self.truncated_partitions,
        );
        let last_error = self.last_error.clone();
        self.shared.mirror.update(self.index, |status| {
            status.state = state.into();
            status.last_error = last_error;
            status.records_sent = records;
            status.bytes_sent = bytes;
            status.batches_sent = batches;
            status.connection_failures = failures;
            status.session_resets = resets;
            status.truncated_partitions = truncated;
            status.partitions = partitions;
        });
    }
}

/// Reads chunks of source partitions on a thread of its own, so the disk
/// and the shard's answer are waited for while the replicator's thread
/// batches the chunk before: on one thread, a read ahead only moved when
/// that thread paused, and the drain ran at the speed of the two in turn.
/// The thread ends when the reader is dropped.
struct ChunkReader {
    requests: mpsc::UnboundedSender<StreamRequest>,
}

/// Read one partition from `position` on, up to `ahead` chunks ahead of
/// what was taken.
struct StreamRequest {
    partition: TopicPartition,
    position: u64,
    max_bytes: u64,
    chunks: mpsc::Sender<SourceChunk>,
    spare: mpsc::UnboundedReceiver<(Vec<u8>, Vec<u8>)>,
    /// One chunk only, no reading ahead.
    once: bool,
}

impl ChunkReader {
    fn start(shared: Arc<Shared>) -> Result<ChunkReader, String> {
        let (requests, mut incoming) = mpsc::unbounded::<StreamRequest>();
        let mut selection = shared.driver.clone();
        std::thread::Builder::new()
            .name("rill-mirror-rd".into())
            .spawn(move || {
                let runtime = match crate::io::build_runtime(&mut selection) {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(%error, "the replicator's reader could not start its runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    crate::io::home::install_relay();
                    crate::io::home::homed(async move {
                        while let Some(request) = incoming.next().await {
                            crate::io::home::spawn(stream_chunks(shared.clone(), request))
                                .detach();
                        }
                    })
                    .await
                });
            })
            .map_err(|error| format!("starting the replicator's reader thread: {error}"))?;
        Ok(ChunkReader { requests })
    }

    /// Starts reading `partition` from `position`: the first chunk, then
    /// up to `ahead` more while they are not taken. Dropping the stream
    /// stops it.
    fn stream(
        &self,
        index: usize,
        partition: TopicPartition,
        position: u64,
        max_bytes: u64,
        ahead: usize,
    ) -> Prefetch {
        // The channel holds its bound plus one (its one sender's slot).
        let (chunks_tx, chunks) = mpsc::channel(ahead.saturating_sub(1));
        let (spare, spare_rx) = mpsc::unbounded();
        let _ = self.requests.unbounded_send(StreamRequest {
            partition,
            position,
            max_bytes,
            chunks: chunks_tx,
            spare: spare_rx,
            once: ahead == 0,
        });
        Prefetch {
            index,
            position,
            chunks,
            spare,
        }
    }
}

/// The reader's side of a stream: chunk after chunk, each from where the
/// last ended, until the end of the partition, an error, or the stream is
/// dropped. The channel's bound holds it to its read-ahead.
async fn stream_chunks(shared: Arc<Shared>, mut request: StreamRequest) {
    let mut position = request.position;
    loop {
        // Room first, then the read: at most the read-ahead is held.
        let room = std::future::poll_fn(|context| request.chunks.poll_ready(context)).await;
        if room.is_err() {
            return;
        }
        let (bytes, scratch) = request.spare.try_recv().ok().unwrap_or_default();
        let chunk = read_source_chunk(
            shared.clone(),
            request.partition.clone(),
            position,
            request.max_bytes,
            bytes,
            scratch,
        )
        .await;
        let next = match chunk.outcome {
            ChunkOutcome::Read {
                high_watermark,
                next_offset,
            } if next_offset > position as i64 && next_offset < high_watermark => {
                Some(next_offset as u64)
            }
            _ => None,
        };
        if request.chunks.try_send(chunk).is_err() || request.once {
            return;
        }
        match next {
            Some(next) => position = next,
            None => return,
        }
    }
}

impl SourceChunk {
    fn shutting_down() -> SourceChunk {
        SourceChunk {
            outcome: ChunkOutcome::ShuttingDown,
            bytes: Vec::new(),
            scratch: Vec::new(),
        }
    }
}

/// A stream of chunks of one source partition from the reader.
struct Prefetch {
    index: usize,
    /// Where the next chunk of the stream starts.
    position: u64,
    chunks: mpsc::Receiver<SourceChunk>,
    /// Buffers given back for the reader to read into again.
    spare: mpsc::UnboundedSender<(Vec<u8>, Vec<u8>)>,
}

/// What reading a chunk of a source partition gave, with the buffers it
/// used (they are reused).
struct SourceChunk {
    outcome: ChunkOutcome,
    /// The chunk's batches, when read.
    bytes: Vec<u8>,
    scratch: Vec<u8>,
}

enum ChunkOutcome {
    Read {
        high_watermark: i64,
        next_offset: i64,
    },
    /// Below the partition's start: retention took it.
    OutOfRange,
    /// The partition no longer exists.
    Gone(crate::broker::errors::OpError),
    Failed(String),
    ShuttingDown,
}

/// Reads up to `max_bytes` of whole batches of `partition` from `position`,
/// into `bytes` (cleared first).
async fn read_source_chunk(
    shared: Arc<Shared>,
    partition: TopicPartition,
    position: u64,
    max_bytes: u64,
    mut bytes: Vec<u8>,
    mut scratch: Vec<u8>,
) -> SourceChunk {
    let key = (partition.topic, partition.partition);
    let owner = shard_of(&key.0, key.1, shared.shards());
    let answer = shared
        .call(owner, |reply| ShardOp::Fetch {
            key,
            offset: position as i64,
            max_bytes,
            read_direct: true,
            reply,
        })
        .await;
    bytes.clear();
    let outcome = match answer {
        Ok(Ok(mut data)) => {
            let (result, returned) =
                read_ranges_into(std::mem::take(&mut data.ranges), bytes, &mut scratch).await;
            bytes = returned;
            match result {
                Ok(()) => {
                    bytes.extend_from_slice(&data.bytes);
                    ChunkOutcome::Read {
                        high_watermark: data.high_watermark,
                        next_offset: data.next_offset,
                    }
                }
                Err(error) => {
                    bytes.clear();
                    ChunkOutcome::Failed(error.to_string())
                }
            }
        }
        Ok(Err(error)) => match error.code {
            ErrorCode::OffsetOutOfRange => ChunkOutcome::OutOfRange,
            ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => ChunkOutcome::Gone(error),
            _ => ChunkOutcome::Failed(error.to_string()),
        },
        Err(_) => ChunkOutcome::ShuttingDown,
    };
    SourceChunk {
        outcome,
        bytes,
        scratch,
    }
}

/// Writes what the driver queues for one connection, in order (through
/// the TLS session when there is one).
async fn write_loop(
    mut stream: TcpStream,
    mut outgoing: mpsc::UnboundedReceiver<Vec<u8>>,
    session: Option<TlsSession>,
    events: mpsc::UnboundedSender<Event>,
    connection: ConnectionId,
) {
    while let Some(bytes) = outgoing.next().await {
        let bytes = match &session {
            Some(session) => match crate::tls::encrypt(session, &[&bytes]) {
                Ok(ciphertext) => ciphertext,
                Err(error) => {
                    let _ = events.unbounded_send(Event::Lost {
                        connection,
                        error: format!("TLS: {error}"),
                    });
                    return;
                }
            },
            None => bytes,
        };
        if bytes.is_empty() {
            continue;
        }
        let BufResult(result, _) = stream.write_all(bytes).await;
        if let Err(error) = result {
            let _ = events.unbounded_send(Event::Lost {
                connection,
                error: format!("write failed: {error}"),
            });
            return;
        }
    }
}

/// Reads one connection until it ends and reports what it read.
async fn read_loop(
    mut stream: TcpStream,
    session: Option<TlsSession>,
    kick: mpsc::UnboundedSender<Vec<u8>>,
    events: mpsc::UnboundedSender<Event>,
    connection: ConnectionId,
) {
    loop {
        let wants_write = || {
            let _ = kick.unbounded_send(Vec::new());
        };
        let BufResult(result, bytes) = crate::tls::read_plaintext(
            &mut stream,
            session.as_ref(),
            wants_write,
            Vec::with_capacity(SOCKET_READ_BYTES),
        )
        .await;
        let event = match result {
            Ok(0) => Event::Lost {
                connection,
                error: "closed by the destination".into(),
            },
            Ok(_) => Event::Bytes { connection, bytes },
            Err(error) => Event::Lost {
                connection,
                error: format!("read failed: {error}"),
            },
        };
        let lost = matches!(event, Event::Lost { .. });
        if events.unbounded_send(event).is_err() || lost {
            return;
        }
    }
}
