//! Fetch: every requested partition read in request order within the
//! response's byte budget (the first batch always fits, as KIP-74 has it),
//! waiting up to `max_wait_ms` for `min_bytes` across them all. Rill keeps
//! no incremental fetch sessions: it answers session id 0, which tells a
//! client to send full fetch requests, as the protocol allows.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::oneshot;
use futures_util::future::{Either, select, select_all};
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::messages::fetch_response::{
    FetchResponse, FetchableTopicResponse, PartitionData,
};
use rill_protocol::OffsetSpec;

use super::connection::Context;
use super::errors;
use super::produce::encode;
use crate::broker::connection::{owner_of, read_ranges_async};
use crate::broker::shard::{FetchData, ShardOp};

struct Wanted {
    topic: usize,
    partition: i32,
    offset: i64,
    partition_max_bytes: u64,
    /// The owning shard, or the error code the partition gets.
    owner: Result<usize, i16>,
}

struct Got {
    error_code: i16,
    high_watermark: i64,
    log_start_offset: i64,
    next_offset: i64,
    records: Option<Bytes>,
}

impl Got {
    fn error(error_code: i16) -> Self {
        Self {
            error_code,
            high_watermark: -1,
            log_start_offset: -1,
            next_offset: -1,
            records: None,
        }
    }

    fn bytes(&self) -> u64 {
        self.records
            .as_ref()
            .map_or(0, |records| records.len() as u64)
    }
}

pub async fn fetch(
    context: &Context,
    correlation_id: i32,
    version: i16,
    request: FetchRequest,
) -> Option<Vec<u8>> {
    let shared = &context.shared;
    let limits = &shared.config.limits;
    if request.session_id != 0 {
        let response = FetchResponse::default()
            .with_error_code(errors::FETCH_SESSION_ID_NOT_FOUND)
            .with_session_id(0);
        return encode(correlation_id, version, &response);
    }
    let response_max = u64::try_from(request.max_bytes)
        .unwrap_or(0)
        .clamp(1, u64::from(limits.fetch_bytes_max));
    let max_wait = Duration::from_millis(
        u64::try_from(request.max_wait_ms)
            .unwrap_or(0)
            .min(limits.fetch_wait_ms_max),
    );
    let min_bytes = u64::try_from(request.min_bytes).unwrap_or(0);
    let deadline = Instant::now() + max_wait;

    let mut names = Vec::with_capacity(request.topics.len());
    let mut wanted = Vec::new();
    for (topic_index, topic) in request.topics.iter().enumerate() {
        let name = topic.topic.0.as_str();
        names.push(topic.topic.clone());
        for partition in &topic.partitions {
            let owner = u32::try_from(partition.partition)
                .map_err(|_| errors::UNKNOWN_TOPIC_OR_PARTITION)
                .and_then(|index| {
                    owner_of(shared, &context.view, name, index)
                        .map_err(|error| errors::code_of(&error))
                });
            wanted.push(Wanted {
                topic: topic_index,
                partition: partition.partition,
                offset: partition.fetch_offset,
                partition_max_bytes: u64::try_from(partition.partition_max_bytes)
                    .unwrap_or(0)
                    .max(1),
                owner,
            });
        }
    }

    // The answer's bytes count against the broker's buffer budget while
    // they are gathered.
    shared.buffers.take(response_max);
    let started = Instant::now();
    let got = loop {
        let got = read_all(context, &names, &wanted, response_max).await;
        let total: u64 = got.iter().map(Got::bytes).sum();
        let any_error = got.iter().any(|got| got.error_code != errors::NONE);
        let remaining = deadline.saturating_duration_since(Instant::now());
        if total >= min_bytes.max(1)
            || any_error
            || remaining.is_zero()
            || shared.is_shutting_down()
        {
            break got;
        }
        if !wait_for_any(context, &names, &wanted, &got, remaining).await {
            break read_all(context, &names, &wanted, response_max).await;
        }
    };
    shared.metrics.fetch_latency.record(started.elapsed());

    let mut responses: Vec<FetchableTopicResponse> = names
        .iter()
        .map(|name| FetchableTopicResponse::default().with_topic(name.clone()))
        .collect();
    for (wanted, got) in wanted.iter().zip(got) {
        let data = PartitionData::default()
            .with_partition_index(wanted.partition)
            .with_error_code(got.error_code)
            .with_high_watermark(got.high_watermark)
            .with_last_stable_offset(got.high_watermark)
            .with_log_start_offset(got.log_start_offset)
            .with_aborted_transactions(Some(Vec::new()))
            .with_preferred_read_replica((-1).into())
            .with_records(got.records.or_else(|| Some(Bytes::new())));
        responses[wanted.topic].partitions.push(data);
    }
    let response = FetchResponse::default()
        .with_session_id(0)
        .with_responses(responses);
    let frame = encode(correlation_id, version, &response);
    shared.buffers.give_back(response_max);
    frame
}

/// Reads every wanted partition once, in order, within the response budget.
async fn read_all(
    context: &Context,
    names: &[kafka_protocol::messages::TopicName],
    wanted: &[Wanted],
    response_max: u64,
) -> Vec<Got> {
    let shared = &context.shared;
    let mut used = 0u64;
    let mut all = Vec::with_capacity(wanted.len());
    for want in wanted {
        let owner = match want.owner {
            Ok(owner) => owner,
            Err(code) => {
                all.push(Got::error(code));
                continue;
            }
        };
        let key = (
            names[want.topic].0.as_str().to_string(),
            want.partition as u32,
        );
        let budget = want
            .partition_max_bytes
            .min(response_max.saturating_sub(used));
        if budget == 0 {
            // The response is full: report the partition's state only.
            let latest = shared
                .call(owner, |reply| ShardOp::ListOffsets {
                    key,
                    at: OffsetSpec::Latest,
                    reply,
                })
                .await;
            all.push(match latest {
                Ok(Ok(high_watermark)) => Got {
                    error_code: errors::NONE,
                    high_watermark: high_watermark.unwrap_or(-1),
                    log_start_offset: -1,
                    next_offset: want.offset,
                    records: None,
                },
                Ok(Err(error)) | Err(error) => Got::error(errors::code_of(&error)),
            });
            continue;
        }
        let fetched = shared
            .call(owner, |reply| ShardOp::Fetch {
                key,
                offset: want.offset,
                max_bytes: budget,
                reply,
            })
            .await;
        let got = match fetched {
            Ok(Ok(data)) => gather(data).await,
            Ok(Err(error)) | Err(error) => Got::error(errors::code_of(&error)),
        };
        used += got.bytes();
        all.push(got);
    }
    all
}

/// One fetch's batches in memory: file ranges read, then the buffered tail.
async fn gather(mut data: FetchData) -> Got {
    let mut bytes = if data.ranges.is_empty() {
        Vec::new()
    } else {
        match read_ranges_async(std::mem::take(&mut data.ranges)).await {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(%error, "reading a segment for a Kafka fetch failed");
                return Got::error(errors::KAFKA_STORAGE_ERROR);
            }
        }
    };
    if bytes.is_empty() {
        bytes = data.bytes;
    } else {
        bytes.extend_from_slice(&data.bytes);
    }
    Got {
        error_code: errors::NONE,
        high_watermark: data.high_watermark,
        log_start_offset: data.log_start_offset,
        next_offset: data.next_offset,
        records: Some(Bytes::from(bytes)),
    }
}

/// Waits until any wanted partition has data past what was read, or the
/// time is up. Returns `false` when the wait ended by time.
async fn wait_for_any(
    context: &Context,
    names: &[kafka_protocol::messages::TopicName],
    wanted: &[Wanted],
    got: &[Got],
    remaining: Duration,
) -> bool {
    let mut waits = Vec::new();
    for (want, got) in wanted.iter().zip(got) {
        let Ok(owner) = want.owner else {
            continue;
        };
        let (reply, woken) = oneshot::channel();
        let op = ShardOp::WaitForData {
            key: (
                names[want.topic].0.as_str().to_string(),
                want.partition as u32,
            ),
            offset: got.next_offset.max(want.offset),
            reply,
        };
        if context.shared.send(owner, op).is_ok() {
            waits.push(woken);
        }
    }
    if waits.is_empty() {
        compio::time::sleep(remaining).await;
        return false;
    }
    let timer = Box::pin(compio::time::sleep(remaining));
    matches!(select(select_all(waits), timer).await, Either::Left(_))
}
