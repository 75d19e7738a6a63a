//! One shard: a thread with its own compio runtime, owning a set of
//! partitions. All operations on those partitions, from this shard's
//! connections or forwarded by other shards, go through the shard's inbox and
//! are carried out in order by its storage task, which owns the logs outright
//! (no locks, no shared mutable state). Group commit lives here: after a burst
//! of appends the task starts one sync per partition that has waiting
//! producers; appends that arrive meanwhile share the next one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use rill_core::log::{AppendInfo, Durability, FsyncPolicy, SyncTarget};
use rill_core::logset::LogSet;
use rill_protocol::{Acks, ErrorCode, OffsetSpec};

use super::errors::{OpError, append_error, read_error};
use super::producers::{ProducerStates, SequenceCheck};
use super::{Shared, now_ms};
use crate::config::TopicSettings;
use crate::io::NodeStorage;
use rill_core::storage::StorageFile;

/// How often a shard wakes for housekeeping (interval syncs, retention,
/// checkpoints, statistics) when nothing else happens.
pub const TICK_MS: u64 = 100;
/// The idempotent-producer snapshot in each partition's directory.
const PRODUCER_SNAPSHOT: &str = "producers.snapshot";
/// Bytes read at a time when producer state is replayed from the log.
const REPLAY_READ_BYTES: u64 = 1 << 20;

/// Writes `name` in `directory` so that a crash leaves the old file or the
/// new one, never a mix: temporary file, sync, rename, sync the directory.
pub(crate) fn write_atomically(
    directory: &std::path::Path,
    name: &str,
    bytes: &[u8],
) -> io::Result<()> {
    use std::io::Write;
    let temporary = directory.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    drop(file);
    std::fs::rename(&temporary, directory.join(name))?;
    std::fs::File::open(directory)?.sync_all()
}

/// Most long-poll waiters one partition keeps; older ones are woken early
/// (they fetch again, so nothing is lost).
const DATA_WAITERS_MAX: usize = 1024;

pub type PartitionKey = (String, u32);

/// A range of a segment file to send as it is (zero copy), with its own
/// descriptor so it outlives retention and crosses threads.
#[derive(Debug)]
pub struct SendRange {
    pub fd: std::os::fd::OwnedFd,
    pub position: u64,
    pub length: u64,
    /// The segment is written with direct I/O (so not in the page cache):
    /// read it with direct I/O too.
    pub direct: bool,
}

/// Whole batches for a fetch, with the partition's state: file ranges to
/// send without copying (when asked for), then `bytes` (copied batches, or
/// the part still in the active segment's write buffer).
#[derive(Debug)]
pub struct FetchData {
    pub ranges: Vec<SendRange>,
    pub bytes: Vec<u8>,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub next_offset: i64,
}

impl FetchData {
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|range| range.length).sum::<u64>() + self.bytes.len() as u64
    }
}

/// A partition's figures, for metadata, status and metrics.
#[derive(Debug, Clone, Default)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: u32,
    pub shard: u32,
    pub log_start_offset: i64,
    pub next_offset: i64,
    pub durable_next_offset: i64,
    pub size_bytes: u64,
    pub segments: u32,
    pub bytes_in: u64,
    pub records_in: u64,
    pub bytes_out: u64,
}

/// What a shard's storage task is asked to do.
#[derive(Debug)]
pub enum ShardOp {
    Produce {
        key: PartitionKey,
        /// The batch as it came off the wire (a Kafka request's records are a
        /// slice of the frame: no copy of their own).
        batch: bytes::Bytes,
        acks: Acks,
        reply: oneshot::Sender<Result<AppendInfo, OpError>>,
    },
    Fetch {
        key: PartitionKey,
        offset: i64,
        max_bytes: u64,
        /// The reader reads ranges of direct-I/O segments with direct I/O
        /// and reads ahead itself (the replicator): no kernel read-ahead.
        /// Consumers leave it off: one fetch at a time, they rely on the
        /// kernel reading ahead while they send.
        read_direct: bool,
        reply: oneshot::Sender<Result<FetchData, OpError>>,
    },
    /// Answers once the partition holds data at `offset` (or on shutdown).
    WaitForData {
        key: PartitionKey,
        offset: i64,
        reply: oneshot::Sender<()>,
    },
    ListOffsets {
        key: PartitionKey,
        at: OffsetSpec,
        reply: oneshot::Sender<Result<Option<i64>, OpError>>,
    },
    /// Deletes records below `before` (-1: the high watermark); answers the
    /// new log start offset.
    DeleteRecords {
        key: PartitionKey,
        before: i64,
        reply: oneshot::Sender<Result<i64, OpError>>,
    },
    OpenPartition {
        key: PartitionKey,
        settings: Box<TopicSettings>,
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    ClosePartition {
        key: PartitionKey,
        delete: bool,
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    AlterPartition {
        key: PartitionKey,
        settings: Box<TopicSettings>,
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    Stats {
        reply: oneshot::Sender<Vec<PartitionStats>>,
    },
    SyncDone {
        key: PartitionKey,
        /// Which opening of the partition the sync was for: a topic deleted
        /// and created again while a sync ran must not take its result.
        generation: u64,
        result: io::Result<()>,
        target: SyncTarget,
    },
    Tick,
    /// Stop: finish what is queued, sync and checkpoint every partition.
    Shutdown,
}

struct DurableWaiter {
    last_offset: i64,
    info: AppendInfo,
    reply: oneshot::Sender<Result<AppendInfo, OpError>>,
}

#[derive(Default)]
struct PartitionState {
    generation: u64,
    durable_waiters: VecDeque<DurableWaiter>,
    data_waiters: Vec<(i64, oneshot::Sender<()>)>,
    syncing: bool,
    last_sync: Option<Instant>,
    bytes_in: u64,
    records_in: u64,
    bytes_out: u64,
    /// Idempotent producers' sequence state (Kafka's producer state).
    producers: ProducerStates,
    /// The offset the last producer snapshot written covers up to.
    snapshot_offset: Option<i64>,
    /// How far read-ahead was asked for after the last fetch.
    read_ahead: rill_core::log::ReadAheadMark,
}

/// The storage task's state: the logs and who waits on them.
pub struct Storage {
    index: u32,
    shared: Arc<Shared>,
    logs: LogSet<NodeStorage>,
    partitions: HashMap<PartitionKey, PartitionState>,
    inbox_sender: mpsc::UnboundedSender<ShardOp>,
    last_retention: Instant,
    last_checkpoint: Instant,
    shutting_down: bool,
    next_generation: u64,
}

fn unknown_partition(key: &PartitionKey) -> OpError {
    OpError::new(
        ErrorCode::UnknownPartition,
        format!(
            "partition {} of topic {} is not on this broker",
            key.1, key.0
        ),
    )
}

impl Storage {
    pub fn new(
        index: u32,
        shared: Arc<Shared>,
        inbox_sender: mpsc::UnboundedSender<ShardOp>,
    ) -> Self {
        let logs = LogSet::new(
            NodeStorage::for_driver(shared.driver.driver),
            &shared.config.data_dir,
            shared.config.storage.disk_quota_bytes,
            shared.usage.clone(),
        );
        Self {
            index,
            shared,
            logs,
            partitions: HashMap::new(),
            inbox_sender,
            last_retention: Instant::now(),
            last_checkpoint: Instant::now(),
            shutting_down: false,
            next_generation: 0,
        }
    }

    /// Opens a partition this shard owns.
    pub async fn open_partition(
        &mut self,
        key: &PartitionKey,
        settings: &TopicSettings,
    ) -> Result<(), OpError> {
        let report = self
            .logs
            .open_partition(&key.0, key.1, settings.log_config(), settings.eviction())
            .await
            .map_err(|error| OpError::new(ErrorCode::StorageError, error.to_string()))?;
        if !report.truncations.is_empty() {
            tracing::warn!(topic = %key.0, partition = key.1, cut = ?report.truncations,
                "partition recovered with damage cut");
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        let producers = self.load_producers(key).await;
        let state = self.partitions.entry(key.clone()).or_default();
        state.generation = generation;
        state.producers = producers;
        Ok(())
    }

    /// The partition's producer state: its snapshot, then every batch from
    /// the snapshot's offset to the end of the log replayed on top.
    async fn load_producers(&self, key: &PartitionKey) -> ProducerStates {
        let Some(log) = self.logs.log(&key.0, key.1) else {
            return ProducerStates::default();
        };
        let path = log.directory().join(PRODUCER_SNAPSHOT);
        let (mut from, mut producers) = match std::fs::read(&path) {
            Ok(bytes) => match ProducerStates::decode_snapshot(&bytes) {
                Ok(loaded) => loaded,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error,
                        "producer snapshot unreadable; rebuilding producer state from the log");
                    (0, ProducerStates::default())
                }
            },
            Err(error) if error.kind() == io::ErrorKind::NotFound => (0, ProducerStates::default()),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error,
                    "producer snapshot unreadable; rebuilding producer state from the log");
                (0, ProducerStates::default())
            }
        };
        producers.set_max_producers(super::producers::PRODUCERS_MAX_DEFAULT);
        from = from.max(log.log_start_offset());
        let end = log.next_offset();
        let mut replayed = 0u64;
        while from < end {
            let (bytes, _) = match log.read_owned(from, REPLAY_READ_BYTES).await {
                Ok(read) => read,
                Err(error) => {
                    tracing::warn!(topic = %key.0, partition = key.1, %error,
                        "replaying producer state stopped early");
                    break;
                }
            };
            let mut position = 0;
            let mut advanced = false;
            while let Some(rest) = bytes.get(position..) {
                let Ok(header) = rill_core::batch::BatchHeader::parse(rest) else {
                    break;
                };
                let Some(length) = header.total_bytes() else {
                    break;
                };
                if header.producer_id >= 0 {
                    producers.replay(
                        header.producer_id,
                        header.producer_epoch,
                        header.base_sequence,
                        header.record_count,
                        header.base_offset,
                        header.last_offset(),
                        header.max_timestamp,
                    );
                    replayed += 1;
                }
                from = header.last_offset() + 1;
                position += length;
                advanced = true;
            }
            if !advanced {
                break;
            }
        }
        if replayed > 0 {
            tracing::debug!(topic = %key.0, partition = key.1, replayed, "producer state rebuilt");
        }
        producers
    }

    /// Writes the producer snapshot of a partition, covering the batches
    /// below its durable offset (later ones are replayed from the log, so a
    /// crash that loses unsynced batches cannot leave phantom duplicates).
    ///
    /// Written when the durable offset moved since the last one, empty or
    /// not: without a snapshot, opening the partition replays its whole log
    /// (ten seconds of reading and checking for a 10 GiB backlog).
    fn write_producer_snapshot(&mut self, key: &PartitionKey) {
        let (Some(log), Some(state)) = (self.logs.log(&key.0, key.1), self.partitions.get_mut(key))
        else {
            return;
        };
        let durable = log.durable_next_offset();
        if state.snapshot_offset == Some(durable) {
            return;
        }
        let bytes = state.producers.encode_snapshot(durable);
        let directory = log.directory();
        match write_atomically(directory, PRODUCER_SNAPSHOT, &bytes) {
            Ok(()) => state.snapshot_offset = Some(durable),
            Err(error) => {
                tracing::warn!(topic = %key.0, partition = key.1, %error, "producer snapshot write failed");
            }
        }
    }

    /// Runs until shutdown: takes ops from the inbox in order, then starts the
    /// syncs the burst made necessary.
    pub async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<ShardOp>) {
        while let Some(op) = inbox.next().await {
            self.handle(op).await;
            while let Ok(op) = inbox.try_recv() {
                self.handle(op).await;
            }
            self.start_syncs(false).await;
            if self.shutting_down
                && (self.shared.connections_open() == 0 || self.shared.is_forced())
            {
                break;
            }
        }
        // Syncs still running finish before the logs close, so a clean stop
        // never skips an fdatasync or checkpoints an old recovery point.
        while self.partitions.values().any(|state| state.syncing) {
            match inbox.next().await {
                Some(op) => self.handle(op).await,
                None => break,
            }
        }
        // Ops that raced the last check are still answered.
        while let Ok(op) = inbox.try_recv() {
            self.handle(op).await;
        }
        self.close_all().await;
    }

    async fn handle(&mut self, op: ShardOp) {
        match op {
            ShardOp::Produce {
                key,
                batch,
                acks,
                reply,
            } => self.produce(key, &batch, acks, reply).await,
            ShardOp::Fetch {
                key,
                offset,
                max_bytes,
                read_direct,
                reply,
            } => {
                let _ = reply.send(self.fetch(&key, offset, max_bytes, read_direct).await);
            }
            ShardOp::WaitForData { key, offset, reply } => self.wait_for_data(key, offset, reply),
            ShardOp::ListOffsets { key, at, reply } => {
                let _ = reply.send(self.list_offsets(&key, at).await);
            }
            ShardOp::DeleteRecords { key, before, reply } => {
                let _ = reply.send(self.delete_records(&key, before).await);
            }
            ShardOp::OpenPartition {
                key,
                settings,
                reply,
            } => {
                let _ = reply.send(self.open_partition(&key, &settings).await);
            }
            ShardOp::ClosePartition { key, delete, reply } => {
                let _ = reply.send(self.close_partition(&key, delete).await);
            }
            ShardOp::AlterPartition {
                key,
                settings,
                reply,
            } => {
                let result = match self.logs.log_mut(&key.0, key.1) {
                    Some(log) => {
                        log.set_config(settings.log_config());
                        self.logs.set_eviction(&key.0, key.1, settings.eviction());
                        Ok(())
                    }
                    None => Err(unknown_partition(&key)),
                };
                let _ = reply.send(result);
            }
            ShardOp::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            ShardOp::SyncDone {
                key,
                generation,
                result,
                target,
            } => {
                if self
                    .partitions
                    .get(&key)
                    .is_some_and(|state| state.generation == generation)
                {
                    self.sync_done(&key, result, target);
                }
            }
            ShardOp::Tick => self.tick().await,
            ShardOp::Shutdown => {
                self.shutting_down = true;
                // Long polls end now with what is there.
                for state in self.partitions.values_mut() {
                    for (_, waiter) in state.data_waiters.drain(..) {
                        let _ = waiter.send(());
                    }
                }
            }
        }
    }

    async fn produce(
        &mut self,
        key: PartitionKey,
        batch: &[u8],
        acks: Acks,
        reply: oneshot::Sender<Result<AppendInfo, OpError>>,
    ) {
        let header = rill_core::batch::BatchHeader::parse(batch).ok();
        let idempotent = header.filter(|header| header.producer_id >= 0);
        if let Some(header) = &idempotent {
            if header.is_transactional() {
                let _ = reply.send(Err(OpError::new(
                    ErrorCode::InvalidRequest,
                    "transactional batches are not supported",
                )));
                return;
            }
            let check = self.partitions.get(&key).map(|state| {
                state.producers.check(
                    header.producer_id,
                    header.producer_epoch,
                    header.base_sequence,
                    header.record_count,
                )
            });
            match check {
                Some(SequenceCheck::Append) | None => {}
                Some(SequenceCheck::Duplicate {
                    base_offset,
                    last_offset,
                }) => {
                    self.answer_duplicate(&key, base_offset, last_offset, acks, reply);
                    return;
                }
                Some(SequenceCheck::Error { code, message }) => {
                    let code = match code {
                        super::producers::OUT_OF_ORDER_SEQUENCE_NUMBER => {
                            ErrorCode::OutOfOrderSequence
                        }
                        super::producers::INVALID_PRODUCER_EPOCH => ErrorCode::InvalidProducerEpoch,
                        super::producers::UNKNOWN_PRODUCER_ID => ErrorCode::UnknownProducerId,
                        _ => ErrorCode::InvalidBatch,
                    };
                    let _ = reply.send(Err(OpError::new(code, message)));
                    return;
                }
            }
        }
        let Some(result) = self.logs.append(&key.0, key.1, batch, now_ms()).await else {
            let _ = reply.send(Err(unknown_partition(&key)));
            return;
        };
        let info = match result {
            Ok(info) => info,
            Err(error) => {
                let _ = reply.send(Err(append_error(&error)));
                return;
            }
        };
        self.shared.metrics.record_append(self.index, info.bytes);
        let state = self.partitions.entry(key.clone()).or_default();
        if let Some(header) = &idempotent {
            state.producers.record(
                header.producer_id,
                header.producer_epoch,
                header.base_sequence,
                header.record_count,
                info.base_offset,
                info.last_offset,
                header.max_timestamp,
                now_ms(),
            );
        }
        state.bytes_in += info.bytes;
        state.records_in += (info.last_offset - info.base_offset + 1) as u64;
        for (_, waiter) in state.data_waiters.drain(..) {
            let _ = waiter.send(());
        }
        if acks == Acks::Durable && info.durability == Durability::AwaitSync {
            state.durable_waiters.push_back(DurableWaiter {
                last_offset: info.last_offset,
                info,
                reply,
            });
        } else {
            let _ = reply.send(Ok(info));
        }
    }

    /// A retried batch that is already in the log: answered with the
    /// offsets it got the first time, once it is as durable as asked.
    fn answer_duplicate(
        &mut self,
        key: &PartitionKey,
        base_offset: i64,
        last_offset: i64,
        acks: Acks,
        reply: oneshot::Sender<Result<AppendInfo, OpError>>,
    ) {
        let durable_next = self
            .logs
            .log(&key.0, key.1)
            .map_or(i64::MAX, |log| log.durable_next_offset());
        let info = AppendInfo {
            base_offset,
            last_offset,
            log_append_time_ms: None,
            bytes: 0,
            durability: if last_offset < durable_next {
                Durability::NotAwaited
            } else {
                Durability::AwaitSync
            },
        };
        match self.partitions.get_mut(key) {
            Some(state) if acks == Acks::Durable && info.durability == Durability::AwaitSync => {
                state.durable_waiters.push_back(DurableWaiter {
                    last_offset,
                    info,
                    reply,
                });
            }
            _ => {
                let _ = reply.send(Ok(info));
            }
        }
    }

    async fn delete_records(&mut self, key: &PartitionKey, before: i64) -> Result<i64, OpError> {
        let log = self
            .logs
            .log_mut(&key.0, key.1)
            .ok_or_else(|| unknown_partition(key))?;
        let before = if before < 0 {
            log.next_offset()
        } else {
            before
        };
        log.delete_records_before(before).await.map_err(|error| {
            let code = match error {
                rill_core::log::MaintenanceError::OffsetPastEnd { .. } => {
                    ErrorCode::OffsetOutOfRange
                }
                _ => ErrorCode::StorageError,
            };
            OpError::new(code, error.to_string())
        })?;
        let log_start = log.log_start_offset();
        if let Some(state) = self.partitions.get_mut(key) {
            state.producers.truncate_before(log_start);
        }
        Ok(log_start)
    }

    async fn fetch(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        max_bytes: u64,
        read_direct: bool,
    ) -> Result<FetchData, OpError> {
        let log = self
            .logs
            .log(&key.0, key.1)
            .ok_or_else(|| unknown_partition(key))?;
        let slice = log
            .read(offset, max_bytes)
            .await
            .map_err(|error| read_error(&error))?;
        // Sequential consumers come back for what follows: start reading it
        // now. Not for a reader that reads direct-I/O segments with direct
        // I/O and reads ahead itself: read-ahead would read them twice.
        let direct = read_direct && log.config().direct_io;
        if !direct {
            let mut unknown = rill_core::log::ReadAheadMark::default();
            let mark = match self.partitions.get_mut(key) {
                Some(state) => &mut state.read_ahead,
                None => &mut unknown,
            };
            log.advise_sequential(&slice, 2 * max_bytes, mark);
        }
        let mut ranges = Vec::new();
        let mut bytes = Vec::new();
        for range in &slice.ranges {
            // Ranges go out as descriptors, so the requesting connection's
            // task reads or splices them and this shard never waits on the
            // disk for a fetch. The in-memory driver has no descriptors. Once
            // a range is copied, later ones are too: copied bytes are sent
            // after all file ranges, so order must not change.
            let duplicate = range
                .file
                .raw_fd()
                .filter(|_| bytes.is_empty())
                .and_then(|fd| {
                    // SAFETY: the descriptor is open while the segment's handle lives (here).
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                        .try_clone_to_owned()
                        .ok()
                });
            if let Some(fd) = duplicate {
                ranges.push(SendRange {
                    fd,
                    position: range.position,
                    length: range.length,
                    direct,
                });
                continue;
            }
            let chunk = rill_core::storage::read_exact_at(
                &range.file,
                range.position,
                range.length as usize,
            )
            .await
            .map_err(|error| {
                OpError::new(ErrorCode::StorageError, format!("reading {key:?}: {error}"))
            })?;
            if bytes.is_empty() {
                // The first range becomes the buffer: no second copy.
                bytes = chunk;
                bytes.reserve((slice.bytes as usize).saturating_sub(bytes.len()));
            } else {
                bytes.extend_from_slice(&chunk);
            }
        }
        bytes.extend_from_slice(&slice.memory_tail);
        self.shared.metrics.record_fetch(self.index, slice.bytes);
        if let Some(state) = self.partitions.get_mut(key) {
            state.bytes_out += slice.bytes;
        }
        Ok(FetchData {
            ranges,
            bytes,
            high_watermark: slice.high_watermark,
            log_start_offset: slice.log_start_offset,
            next_offset: slice.next_fetch_offset,
        })
    }

    fn wait_for_data(&mut self, key: PartitionKey, offset: i64, reply: oneshot::Sender<()>) {
        let has_data = self
            .logs
            .log(&key.0, key.1)
            .is_none_or(|log| log.next_offset() > offset);
        if has_data || self.shutting_down {
            let _ = reply.send(());
            return;
        }
        let state = self.partitions.entry(key).or_default();
        if state.data_waiters.len() >= DATA_WAITERS_MAX {
            let (_, oldest) = state.data_waiters.remove(0);
            let _ = oldest.send(());
        }
        state.data_waiters.push((offset, reply));
    }

    async fn list_offsets(
        &mut self,
        key: &PartitionKey,
        at: OffsetSpec,
    ) -> Result<Option<i64>, OpError> {
        let log = self
            .logs
            .log(&key.0, key.1)
            .ok_or_else(|| unknown_partition(key))?;
        match at {
            OffsetSpec::Earliest => Ok(Some(log.log_start_offset())),
            OffsetSpec::Latest => Ok(Some(log.next_offset())),
            OffsetSpec::Timestamp(timestamp_ms) => log
                .offset_for_timestamp(timestamp_ms)
                .await
                .map_err(|error| read_error(&error)),
        }
    }

    async fn close_partition(&mut self, key: &PartitionKey, delete: bool) -> Result<(), OpError> {
        if let Some(mut state) = self.partitions.remove(key) {
            for waiter in state.durable_waiters.drain(..) {
                let _ = waiter.reply.send(Err(OpError::new(
                    ErrorCode::UnknownTopic,
                    format!("topic {} was deleted", key.0),
                )));
            }
            for (_, waiter) in state.data_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
        self.logs
            .close_partition(&key.0, key.1, delete)
            .await
            .map_err(|error| OpError::new(ErrorCode::StorageError, error.to_string()))
    }

    /// Starts one sync per partition that has producers waiting for
    /// durability (or, with `interval_due`, whose fsync interval elapsed).
    async fn start_syncs(&mut self, interval_due: bool) {
        let keys: Vec<PartitionKey> = self
            .partitions
            .iter()
            .filter(|(_, state)| !state.syncing)
            .filter(|(key, state)| {
                !state.durable_waiters.is_empty()
                    || (interval_due && self.interval_sync_due(key, state))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            let Some(log) = self.logs.log_mut(&key.0, key.1) else {
                continue;
            };
            if let Some(reason) = log.poisoned() {
                // No sync will ever come: answer the waiting producers now.
                let reason = format!("the partition refuses writes until restarted: {reason}");
                self.resolve_durable(&key, i64::MAX, Some(reason));
                continue;
            }
            match log.begin_sync().await {
                Ok(Some(job)) => {
                    let mut generation = 0;
                    if let Some(state) = self.partitions.get_mut(&key) {
                        state.syncing = true;
                        generation = state.generation;
                    }
                    let inbox = self.inbox_sender.clone();
                    crate::io::home::spawn(async move {
                        let (result, target) = job.run().await;
                        let _ = inbox.unbounded_send(ShardOp::SyncDone {
                            key,
                            generation,
                            result,
                            target,
                        });
                    })
                    .detach();
                }
                Ok(None) => {
                    // Nothing to sync: whatever waits is durable already.
                    let durable = log.durable_next_offset();
                    self.resolve_durable(&key, durable, None);
                }
                Err(error) => {
                    let message = error.to_string();
                    tracing::error!(topic = %key.0, partition = key.1, %message, "flush before sync failed");
                    self.resolve_durable(&key, i64::MAX, Some(message));
                }
            }
        }
    }

    fn interval_sync_due(&self, key: &PartitionKey, state: &PartitionState) -> bool {
        let Some(log) = self.logs.log(&key.0, key.1) else {
            return false;
        };
        match log.config().fsync {
            FsyncPolicy::IntervalMs(interval_ms) => {
                log.sync_needed()
                    && state
                        .last_sync
                        .is_none_or(|last| last.elapsed() >= Duration::from_millis(interval_ms))
            }
            _ => false,
        }
    }

    fn sync_done(&mut self, key: &PartitionKey, result: io::Result<()>, target: SyncTarget) {
        let Some(log) = self.logs.log_mut(&key.0, key.1) else {
            return;
        };
        let outcome = log.finish_sync(result, target);
        if let Some(state) = self.partitions.get_mut(key) {
            state.syncing = false;
            state.last_sync = Some(Instant::now());
        }
        match outcome {
            Ok(durable) => self.resolve_durable(key, durable, None),
            Err(error) => {
                tracing::error!(topic = %key.0, partition = key.1, %error, "sync failed; partition refuses writes");
                self.resolve_durable(key, i64::MAX, Some(error.to_string()));
            }
        }
    }

    /// Answers producers whose batches are below `durable_next`, or fails them all.
    fn resolve_durable(&mut self, key: &PartitionKey, durable_next: i64, failure: Option<String>) {
        let Some(state) = self.partitions.get_mut(key) else {
            return;
        };
        while state
            .durable_waiters
            .front()
            .is_some_and(|waiter| waiter.last_offset < durable_next)
        {
            let Some(waiter) = state.durable_waiters.pop_front() else {
                break;
            };
            let answer = match &failure {
                None => Ok(waiter.info),
                Some(message) => Err(OpError::new(ErrorCode::StorageError, message.clone())),
            };
            let _ = waiter.reply.send(answer);
        }
    }

    async fn tick(&mut self) {
        self.start_syncs(true).await;
        let now = now_ms();
        let keys: Vec<PartitionKey> = self.partitions.keys().cloned().collect();
        for key in &keys {
            if let Some(log) = self.logs.log_mut(&key.0, key.1)
                && let Err(error) = log.roll_if_due(now).await
            {
                tracing::error!(topic = %key.0, partition = key.1, %error, "rolling an aged segment failed");
            }
        }
        self.protect_unmirrored(&keys);
        let storage = &self.shared.config.storage;
        if self.last_retention.elapsed()
            >= Duration::from_millis(storage.retention_check_interval_ms)
        {
            self.last_retention = Instant::now();
            match self.logs.apply_retention(now).await {
                Ok(report) if report.segments_deleted > 0 => tracing::info!(
                    shard = self.index,
                    segments = report.segments_deleted,
                    bytes = report.bytes_deleted,
                    "retention deleted segments"
                ),
                Ok(_) => {}
                Err(error) => tracing::error!(shard = self.index, %error, "retention failed"),
            }
        }
        if self.last_checkpoint.elapsed() >= Duration::from_millis(storage.checkpoint_interval_ms) {
            self.last_checkpoint = Instant::now();
            let idle_ms = self.shared.config.kafka.producer_id_expiration_ms as i64;
            for key in &keys {
                if let Some(log) = self.logs.log_mut(&key.0, key.1)
                    && let Err(error) = log.write_checkpoint().await
                {
                    tracing::error!(topic = %key.0, partition = key.1, %error, "checkpoint write failed");
                }
                let log_start = self
                    .logs
                    .log(&key.0, key.1)
                    .map(|log| log.log_start_offset());
                if let (Some(state), Some(log_start)) = (self.partitions.get_mut(key), log_start) {
                    state.producers.truncate_before(log_start);
                    state.producers.expire(now, idle_ms);
                }
                self.write_producer_snapshot(key);
            }
        }
        let evictions = self.logs.take_evictions();
        for ((topic, partition), report) in evictions.evicted {
            self.shared
                .metrics
                .record_eviction(&topic, partition, report.records_deleted);
        }
        self.shared.publish_stats(self.index, self.stats());
    }

    /// Tells the logs what the replicator has not mirrored yet, so that
    /// retention and disk-quota eviction keep it up to the budget.
    fn protect_unmirrored(&mut self, keys: &[PartitionKey]) {
        let budget = self.shared.config.mirror.unmirrored_bytes_max;
        for key in keys {
            let protection = (budget > 0)
                .then(|| self.shared.mirror.frontier(&key.0, key.1))
                .flatten()
                .map(|frontier| rill_core::log::Protection {
                    from_offset: i64::try_from(frontier).unwrap_or(i64::MAX),
                    bytes_max: budget,
                });
            self.logs.set_protection(&key.0, key.1, protection);
        }
    }

    fn stats(&self) -> Vec<PartitionStats> {
        self.logs
            .partitions()
            .map(|((topic, partition), log)| {
                let state = self.partitions.get(&(topic.clone(), *partition));
                PartitionStats {
                    topic: topic.clone(),
                    partition: *partition,
                    shard: self.index,
                    log_start_offset: log.log_start_offset(),
                    next_offset: log.next_offset(),
                    durable_next_offset: log.durable_next_offset(),
                    size_bytes: log.size_bytes(),
                    segments: log.segment_count() as u32,
                    bytes_in: state.map_or(0, |state| state.bytes_in),
                    records_in: state.map_or(0, |state| state.records_in),
                    bytes_out: state.map_or(0, |state| state.bytes_out),
                }
            })
            .collect()
    }

    /// Syncs and checkpoints every partition: what a clean stop leaves.
    async fn close_all(&mut self) {
        let keys: Vec<PartitionKey> = self.partitions.keys().cloned().collect();
        let mut failures = BTreeMap::new();
        for key in keys {
            if let Some(log) = self.logs.log_mut(&key.0, key.1) {
                match log.close().await {
                    Ok(()) => {
                        let durable = log.durable_next_offset();
                        self.resolve_durable(&key, durable, None);
                        self.write_producer_snapshot(&key);
                    }
                    Err(error) => {
                        failures.insert(key.clone(), error.to_string());
                        self.resolve_durable(&key, i64::MAX, Some(error.to_string()));
                    }
                }
            }
        }
        if failures.is_empty() {
            tracing::info!(
                shard = self.index,
                "shard stopped: every partition synced and checkpointed"
            );
        } else {
            tracing::error!(
                shard = self.index,
                ?failures,
                "shard stopped with partitions that failed to sync"
            );
        }
    }
}
