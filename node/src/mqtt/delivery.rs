//! Records to subscribers: each connected session reads the partitions of
//! its subscriptions' source topics (`Mapping::source_topics`) with fetches
//! and long polls, and offers every record, in offset order, to its
//! session (`catch_up_delivery`, then `handle_delivery`). One reader per
//! (session, partition), all on the connection's shard.
//!
//! Where a reader starts: a new subscription's partitions at their end
//! when the SUBACK goes out (only what is published after it arrives); a
//! resumed session's at its cursors. A partition the session has no cursor
//! for (it never took a record from it) starts at the first record
//! appended after the session was last known alive, less a small margin,
//! rather than at the start of the partition: that is where the records it
//! missed begin, and older ones predate its subscriptions. Partitions and
//! topics that appear later (a topic created by its first publish, more
//! partitions) are read from their start.
//!
//! A reader stops when its session refuses a record (the session pauses
//! deliveries when its queue is full and resumes with cursors, which starts
//! fresh readers), when the session closes, when its partition is
//! deleted, or when the executor replaces it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rill_core::batch::{BatchHeader, check_batch};
use rill_edge_bridge::mqtt::mapping::publisher_of_record;
use rill_edge_bridge::mqtt::session::{DeliveryOutcome, LogPosition};
use rill_protocol::{ErrorCode, OffsetSpec};

use super::Client;
use super::now_ms;
use crate::broker::Shared;
use crate::broker::connection::{FetchRequest, fetch_with_wait, read_ranges_async};
use crate::broker::errors::OpError;
use crate::broker::shard::ShardOp;
use crate::broker::topics::shard_of;

/// Bytes one fetch of a reader asks for.
const READ_BYTES_MAX: u64 = 1 << 20;
/// How long one long poll waits before the reader looks again.
const POLL_WAIT_MS: u64 = 1_000;
/// Pause after an unexpected read error.
const ERROR_BACKOFF_MS: u64 = 1_000;

pub(crate) type PartitionKey = (String, u32);

/// The readers of one connection.
#[derive(Default)]
pub(crate) struct Readers {
    /// Each running reader's identity; a reader whose entry changed or
    /// went stops before its next delivery.
    pub running: HashMap<PartitionKey, u64>,
    next_id: u64,
    /// A reader saw a refusal: the session has paused deliveries.
    pub paused: bool,
}

pub(crate) type ReaderSet = Rc<RefCell<Readers>>;

impl Readers {
    /// Stops every reader.
    pub(crate) fn stop_all(&mut self) {
        self.running.clear();
    }
}

/// Where a new reader starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    At(i64),
    Latest,
    /// The first record at or after this time (else the end).
    Since(i64),
}

pub(crate) async fn resolve(
    shared: &Shared,
    key: &PartitionKey,
    start: Start,
) -> Result<i64, OpError> {
    let spec = match start {
        Start::At(offset) => return Ok(offset),
        Start::Latest => OffsetSpec::Latest,
        Start::Since(timestamp_ms) => OffsetSpec::Timestamp(timestamp_ms),
    };
    let owner = shard_of(&key.0, key.1, shared.shards());
    let found = shared
        .call(owner, |reply| ShardOp::ListOffsets {
            key: key.clone(),
            at: spec,
            reply,
        })
        .await??;
    match found {
        Some(offset) => Ok(offset),
        None => {
            let owner = shard_of(&key.0, key.1, shared.shards());
            let latest = shared
                .call(owner, |reply| ShardOp::ListOffsets {
                    key: key.clone(),
                    at: OffsetSpec::Latest,
                    reply,
                })
                .await??;
            Ok(latest.unwrap_or(0))
        }
    }
}

/// Starts reading `key` from `start` for `client`, replacing any reader
/// of that partition.
pub(crate) fn spawn_reader(
    shared: Arc<Shared>,
    client: Arc<Client>,
    readers: ReaderSet,
    key: PartitionKey,
    start: i64,
) {
    let id = {
        let mut set = readers.borrow_mut();
        set.next_id += 1;
        let id = set.next_id;
        set.running.insert(key.clone(), id);
        id
    };
    crate::io::home::spawn(read_partition(shared, client, readers, key, start, id)).detach();
}

fn is_current(readers: &ReaderSet, key: &PartitionKey, id: u64) -> bool {
    readers.borrow().running.get(key) == Some(&id)
}

async fn read_partition(
    shared: Arc<Shared>,
    client: Arc<Client>,
    readers: ReaderSet,
    key: PartitionKey,
    offset: i64,
    id: u64,
) {
    let stopped = || client.is_closed() || !is_current(&readers, &key, id);
    let mapping = &shared.mqtt.context.mapping;
    let end = follow(&shared, &key, offset, &stopped, |record| {
        let Some(message) = mapping.message_from_record(
            &key.0,
            &record.headers,
            record.key,
            Bytes::copy_from_slice(record.value),
            now_ms(),
        ) else {
            return Step::Next;
        };
        let publisher = publisher_of_record(&record.headers).map(str::to_owned);
        let position = LogPosition {
            topic: key.0.clone(),
            partition: key.1,
            offset: record.offset as u64,
        };
        let outcome = client.step_with(|machine, push| {
            let delivery = machine.catch_up_delivery(message, publisher.as_deref(), position)?;
            let (outcome, actions) = machine.handle_delivery(delivery, now_ms());
            for action in actions {
                push(action);
            }
            Some(outcome)
        });
        match outcome {
            Some(DeliveryOutcome::Refused) => Step::Stop,
            _ => Step::Next,
        }
    })
    .await;
    match end {
        // Paused: the session resumes with cursors and new readers.
        End::Refused => readers.borrow_mut().paused = true,
        // Deleted: discovery starts a new reader if it comes back.
        End::Gone => {
            if is_current(&readers, &key, id) {
                readers.borrow_mut().running.remove(&key);
            }
        }
        End::Stopped => {}
    }
}

/// What to do after a record.
pub(crate) enum Step {
    Next,
    /// Stop reading (the reader ends with [`End::Refused`]).
    Stop,
    /// Offer this record again a little later.
    Again,
}

/// Why [`follow`] returned.
pub(crate) enum End {
    /// `stopped` said so, or the broker is shutting down.
    Stopped,
    /// The visitor said [`Step::Stop`].
    Refused,
    /// The partition is gone (its topic deleted).
    Gone,
}

/// Pause before offering a record again after [`Step::Again`].
const AGAIN_MS: u64 = 100;

/// Reads `key` from `offset` on, with long polls, and hands each record
/// to `visit` in offset order until `stopped` holds or `visit` stops.
pub(crate) async fn follow(
    shared: &Shared,
    key: &PartitionKey,
    mut offset: i64,
    stopped: &dyn Fn() -> bool,
    mut visit: impl FnMut(&RecordRef<'_>) -> Step,
) -> End {
    loop {
        if stopped() || shared.is_shutting_down() {
            return End::Stopped;
        }
        let owner = shard_of(&key.0, key.1, shared.shards());
        let request = FetchRequest {
            owner,
            key: key.clone(),
            offset,
            max_bytes: READ_BYTES_MAX,
            min_bytes: 1,
            max_wait: Duration::from_millis(POLL_WAIT_MS),
        };
        let mut data = match fetch_with_wait(shared, request).await {
            Ok(data) => data,
            Err(error) => match error.code {
                ErrorCode::OffsetOutOfRange => {
                    // Retention removed it, or the topic was made again.
                    let earliest = resolve(shared, key, Start::Since(0)).await;
                    offset = match earliest {
                        Ok(earliest) if offset < earliest => earliest,
                        _ => resolve(shared, key, Start::Latest).await.unwrap_or(0),
                    };
                    continue;
                }
                ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => return End::Gone,
                ErrorCode::ShuttingDown => return End::Stopped,
                _ => {
                    tracing::warn!(topic = %key.0, partition = key.1, %error, "MQTT delivery read failed; retrying");
                    compio::time::sleep(Duration::from_millis(ERROR_BACKOFF_MS)).await;
                    continue;
                }
            },
        };
        let mut bytes = if data.ranges.is_empty() {
            Vec::new()
        } else {
            match read_ranges_async(std::mem::take(&mut data.ranges)).await {
                Ok(bytes) => bytes,
                Err(error) => {
                    tracing::warn!(topic = %key.0, partition = key.1, %error, "MQTT delivery read failed; retrying");
                    compio::time::sleep(Duration::from_millis(ERROR_BACKOFF_MS)).await;
                    continue;
                }
            }
        };
        bytes.extend_from_slice(&data.bytes);
        let mut step = Step::Next;
        let mut next = offset;
        let walked = walk_records(&bytes, |record| {
            if record.offset < offset {
                return true;
            }
            if stopped() {
                step = Step::Stop;
                return false;
            }
            step = visit(&record);
            match step {
                Step::Next => {
                    next = record.offset + 1;
                    true
                }
                Step::Stop | Step::Again => {
                    next = record.offset;
                    false
                }
            }
        });
        if let Err(error) = walked {
            tracing::error!(topic = %key.0, partition = key.1, offset, %error, "MQTT delivery skips a damaged batch");
        }
        match step {
            Step::Stop if stopped() => return End::Stopped,
            Step::Stop => return End::Refused,
            Step::Again => {
                offset = next;
                compio::time::sleep(Duration::from_millis(AGAIN_MS)).await;
            }
            Step::Next => offset = next.max(data.next_offset).max(offset),
        }
    }
}

/// One record of a fetched batch, borrowed.
pub(crate) struct RecordRef<'a> {
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Most bytes a compressed batch may decompress to before it is refused.
const DECOMPRESSED_BATCH_BYTES_MAX: usize = 64 << 20;

/// Calls `visit` for each record of the batches in `bytes` until it returns
/// `false`. Compressed batches (from Kafka producers) are decompressed,
/// bounded; control batches are skipped; a cut-off last batch ends the walk.
fn walk_records(bytes: &[u8], mut visit: impl FnMut(RecordRef<'_>) -> bool) -> Result<(), String> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let Ok(header) = BatchHeader::parse(rest) else {
            return Ok(());
        };
        let Some(total_bytes) = header.total_bytes() else {
            return Err(format!(
                "batch at offset {} has an impossible length",
                header.base_offset
            ));
        };
        if total_bytes > rest.len() {
            return Ok(());
        }
        let (batch, after) = rest.split_at(total_bytes);
        rest = after;
        let header = check_batch(batch)
            .map_err(|error| format!("batch at offset {}: {error}", header.base_offset))?;
        if header.is_control() {
            continue;
        }
        // Compressed batches (Kafka producers compress) are decompressed,
        // bounded; uncompressed ones are read in place.
        let decoded =
            rill_edge_bridge::replicator::batch::decode_batch(batch, DECOMPRESSED_BATCH_BYTES_MAX)
                .map_err(|error| format!("batch at offset {}: {error}", header.base_offset))?;
        for record in decoded.records() {
            let record = record
                .map_err(|error| format!("batch at offset {}: {error}", header.base_offset))?;
            let headers = record
                .headers
                .iter()
                .map(|header| {
                    (
                        String::from_utf8_lossy(header.key).into_owned(),
                        header.value.unwrap_or_default().to_vec(),
                    )
                })
                .collect();
            let keep_going = visit(RecordRef {
                offset: record.offset as i64,
                key: record.key,
                value: record.value.unwrap_or_default(),
                headers,
            });
            if !keep_going {
                return Ok(());
            }
        }
    }
    Ok(())
}
