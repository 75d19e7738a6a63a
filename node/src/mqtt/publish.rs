//! MQTT messages into the log: one record per PUBLISH (or will), with the
//! `mqtt.*` headers, in a Kafka v2 batch appended through the partition's
//! owning shard like a native produce. The executor hands over runs of
//! PUBLISHes read together, and consecutive records bound for the same
//! partition share one batch. The partition is the
//! key's (Kafka's murmur2, so every protocol agrees), or round robin for
//! rules without a key. Retained messages are set in the store in the
//! order their PUBLISHes arrived and written to disk before the PUBLISH
//! is acknowledged.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_channel::oneshot;
use rill_core::log::AppendInfo;
use rill_edge_bridge::mqtt::mapping::record_headers;
use rill_edge_bridge::mqtt::retained::RetainChange;
use rill_edge_bridge::mqtt::session::AppendError;
use rill_edge_bridge::mqtt::{Message, QoS, Will};
use rill_protocol::batch::BatchWriter;
use rill_protocol::partitioner::partition_for_key;
use rill_protocol::{Acks, ErrorCode};

use super::{MqttState, lock, now_ms};
use crate::broker::errors::OpError;
use crate::broker::shard::ShardOp;
use crate::broker::topics::{TopicView, shard_of};
use crate::broker::{Shared, ensure_topic};

/// Bytes a batch needs beyond its records.
const BATCH_OVERHEAD_BYTES: usize = 64;
/// Bytes one record needs beyond its key, value and header bytes.
const RECORD_OVERHEAD_BYTES: usize = 32;
/// Bytes one header needs beyond its name and value.
const HEADER_OVERHEAD_BYTES: usize = 10;

/// An append queued at its shard: the shard's answer comes on `answer`.
pub(crate) type PendingAppend = oneshot::Receiver<Result<AppendInfo, OpError>>;

/// One record to append.
pub(crate) struct Record<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
    pub value: &'a [u8],
    pub durable: bool,
}

impl Record<'_> {
    /// An upper bound of the bytes the record takes in a batch.
    pub(crate) fn batch_bytes(&self) -> usize {
        RECORD_OVERHEAD_BYTES
            + self.key.map_or(0, <[u8]>::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len() + HEADER_OVERHEAD_BYTES)
                .sum::<usize>()
    }
}

/// The records as one batch, all with the same timestamp.
pub(crate) fn batch(records: &[Record<'_>], timestamp_ms: i64) -> Result<Bytes, OpError> {
    let too_small = || OpError::new(ErrorCode::Internal, "batch buffer too small");
    let size = BATCH_OVERHEAD_BYTES + records.iter().map(Record::batch_bytes).sum::<usize>();
    let mut buffer = vec![0; size];
    let mut writer = BatchWriter::new(&mut buffer).map_err(|_| too_small())?;
    let mut headers: Vec<(&[u8], Option<&[u8]>)> = Vec::new();
    for record in records {
        headers.clear();
        headers.extend(
            record
                .headers
                .iter()
                .map(|(name, value)| (name.as_bytes(), Some(value.as_slice()))),
        );
        writer
            .push(timestamp_ms, record.key, Some(record.value), &headers)
            .map_err(|_| too_small())?;
    }
    let length = writer
        .finish_with_crc(rill_core::batch::crc32c)
        .map(<[u8]>::len)
        .ok_or_else(|| OpError::new(ErrorCode::Internal, "empty batch"))?;
    buffer.truncate(length);
    Ok(Bytes::from(buffer))
}

/// Where `topic`'s next record with `key` goes: the key's partition
/// (Kafka's murmur2), or round robin without a key. The topic is created
/// first when it is missing and `topics.auto_create` allows it.
pub(crate) async fn route(
    shared: &Shared,
    view: &mut TopicView,
    next_partition: &Cell<u32>,
    topic: &str,
    key: Option<&[u8]>,
) -> Result<u32, OpError> {
    shared.topics.refresh(view);
    let partitions = match view.table.get(topic) {
        Some(meta) => meta.partitions,
        None => {
            let meta = ensure_topic(shared, topic).await?;
            shared.topics.refresh(view);
            meta.partitions
        }
    };
    Ok(match key {
        Some(key) => partition_for_key(key, partitions),
        None => {
            let next = next_partition.get();
            next_partition.set(next.wrapping_add(1));
            next % partitions
        }
    })
}

/// Queues a finished batch at the partition's shard. Called in PUBLISH
/// order, it keeps that order per partition.
pub(crate) fn send(
    shared: &Shared,
    topic: &str,
    partition: u32,
    durable: bool,
    batch: Bytes,
) -> Result<PendingAppend, OpError> {
    let (reply, answer) = oneshot::channel();
    shared.send(
        shard_of(topic, partition, shared.shards()),
        ShardOp::Produce {
            key: (topic.to_owned(), partition),
            batch,
            acks: if durable {
                Acks::Durable
            } else {
                Acks::Written
            },
            reply,
        },
    )?;
    Ok(answer)
}

/// Routes one record and queues it at its shard as a batch of its own.
pub(crate) async fn dispatch(
    shared: &Shared,
    view: &mut TopicView,
    next_partition: &Cell<u32>,
    record: &Record<'_>,
) -> Result<PendingAppend, OpError> {
    let partition = route(shared, view, next_partition, record.topic, record.key).await?;
    let batch = batch(std::slice::from_ref(record), crate::broker::now_ms())?;
    send(shared, record.topic, partition, record.durable, batch)
}

/// The shard's answer, as the session machine takes it.
pub(crate) async fn finish(pending: Result<PendingAppend, OpError>) -> Result<(), AppendError> {
    let result = match pending {
        Ok(answer) => answer
            .await
            .unwrap_or_else(|_| Err(OpError::new(ErrorCode::ShuttingDown, "the shard stopped"))),
        Err(error) => Err(error),
    };
    result.map(|_| ()).map_err(|error| {
        tracing::debug!(%error, "MQTT append failed");
        match error.code {
            ErrorCode::QuotaExceeded | ErrorCode::DiskFull => AppendError::QuotaExceeded,
            _ => AppendError::Unavailable,
        }
    })
}

/// Sets (or clears) the retained message for its topic; `true` when the
/// change must be written to disk.
pub(crate) fn retain(state: &MqttState, message: Message) -> bool {
    let topic = message.topic.clone();
    match lock(&state.retained).set(message) {
        Ok(RetainChange::Stored | RetainChange::Replaced | RetainChange::Cleared) => true,
        Ok(RetainChange::Unchanged) => false,
        Err(error) => {
            state.stats.retained_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, %error, "message not retained");
            false
        }
    }
}

/// Writes `topic`'s retained entry on a blocking thread.
pub(crate) async fn sync_retained(shared: &Arc<Shared>, topic: String) {
    let shared = shared.clone();
    let result = compio::runtime::spawn_blocking(move || {
        let result = shared.mqtt.sync_retained(&topic);
        (topic, result)
    })
    .await;
    if let Ok((topic, Err(error))) = result {
        tracing::error!(topic, %error, "writing a retained message failed; it is kept in memory only");
    }
}

/// Publishes a will as a PUBLISH from `client_id` would be: through the
/// mapping, appended, retained when its flag says so.
pub(crate) async fn publish_will(shared: Arc<Shared>, client_id: String, will: Will) {
    let state = &shared.mqtt;
    let message = Message::from_will(&will, now_ms());
    let route = match state.context.mapping.route(&message.topic, &client_id) {
        Ok(route) => route,
        Err(_) => {
            tracing::info!(client_id, topic = %message.topic, "will not published: its topic matches no mapping rule");
            return;
        }
    };
    let headers = record_headers(&message, &client_id);
    let mut view = shared.topics.snapshot();
    let record = Record {
        topic: &route.topic,
        key: route.key.as_deref(),
        headers: &headers,
        value: &message.payload,
        durable: message.qos != QoS::AtMostOnce,
    };
    let pending = dispatch(&shared, &mut view, &Cell::new(0), &record).await;
    let retained = message.retain && retain(state, message.clone());
    let topic = message.topic.clone();
    match finish(pending).await {
        Ok(()) => {
            state.stats.wills_published.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client_id, topic, "will published");
        }
        Err(error) => tracing::warn!(client_id, topic, ?error, "will could not be appended"),
    }
    if retained {
        sync_retained(&shared, topic).await;
    }
}
