//! Produce: each partition's batch is queued at its shard while the
//! connection still holds the frame (arrival order is append order), then a
//! task waits for the appends and answers. acks=0 gets no answer at all, as
//! the protocol says; acks=1 answers once appended, acks=-1 ("all") once
//! durable by the topic's fsync policy (Rill is its own, only replica).

use std::cell::Cell;
use std::time::Instant;

use futures_channel::oneshot;
use kafka_protocol::messages::ProduceRequest;
use kafka_protocol::messages::TopicName;
use kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, ProduceResponse, TopicProduceResponse,
};
use kafka_protocol::protocol::StrBytes;
use rill_core::log::AppendInfo;
use rill_protocol::{Acks, ErrorCode};

use super::connection::{Context, Responder};
use super::{codec, errors};
use crate::broker::ensure_topic;
use crate::broker::errors::OpError;
use crate::broker::shard::ShardOp;
use crate::broker::topics::shard_of;

type AppendAnswer = oneshot::Receiver<Result<AppendInfo, OpError>>;

enum Pending {
    Appending(AppendAnswer),
    Failed(i16, String),
}

/// A produce request whose batches are queued at their shards.
pub struct PendingProduce {
    acks: i16,
    topics: Vec<(TopicName, Vec<(i32, Pending)>)>,
    started: Instant,
}

fn failed(code: i16, message: impl Into<String>) -> Pending {
    Pending::Failed(code, message.into())
}

/// Checks each partition's batch and queues it at the owning shard.
pub async fn dispatch(
    context: &Context,
    request: ProduceRequest,
    _next_partition: &Cell<u32>,
) -> PendingProduce {
    let shared = &context.shared;
    let acks = match request.acks {
        0 => Some(Acks::None),
        1 => Some(Acks::Written),
        -1 => Some(Acks::Durable),
        _ => None,
    };
    let mut topics = Vec::with_capacity(request.topic_data.len());
    for topic in request.topic_data {
        let name = topic.name.0.as_str().to_string();
        let meta = match context.view.table.get(&name) {
            Some(meta) => Ok(meta.clone()),
            None => ensure_topic(shared, &name).await,
        };
        let mut partitions = Vec::with_capacity(topic.partition_data.len());
        for data in topic.partition_data {
            let index = data.index;
            let pending = (|| {
                let Some(acks) = acks else {
                    return failed(
                        errors::INVALID_REQUIRED_ACKS,
                        format!("acks must be 0, 1 or -1, not {}", request.acks),
                    );
                };
                if request.transactional_id.is_some() {
                    return failed(
                        errors::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                        "transactions are not supported by Rill",
                    );
                }
                let meta = match &meta {
                    Ok(meta) => meta,
                    Err(error) => return failed(errors::code_of(error), error.message.clone()),
                };
                let Ok(partition) = u32::try_from(index) else {
                    return failed(errors::UNKNOWN_TOPIC_OR_PARTITION, "negative partition");
                };
                if partition >= meta.partitions {
                    return failed(
                        errors::UNKNOWN_TOPIC_OR_PARTITION,
                        format!("topic {name} has partitions 0..{}", meta.partitions),
                    );
                }
                let Some(records) = data.records.as_ref().filter(|records| !records.is_empty())
                else {
                    return failed(errors::CORRUPT_MESSAGE, "no records");
                };
                // Since v3 a partition's data is exactly one batch.
                let whole = rill_core::batch::BatchHeader::parse(records)
                    .ok()
                    .and_then(|header| header.total_bytes());
                if whole != Some(records.len()) {
                    return failed(
                        errors::INVALID_RECORD,
                        "a partition's records must be exactly one record batch (magic 2)",
                    );
                }
                let owner = shard_of(&name, partition, shared.shards());
                let (reply, answer) = oneshot::channel();
                let op = ShardOp::Produce {
                    key: (name.clone(), partition),
                    batch: records.clone(),
                    acks,
                    reply,
                };
                match shared.send(owner, op) {
                    Ok(()) => Pending::Appending(answer),
                    Err(error) => failed(errors::code_of(&error), error.message),
                }
            })();
            partitions.push((index, pending));
        }
        topics.push((topic.name, partitions));
    }
    PendingProduce {
        acks: request.acks,
        topics,
        started: Instant::now(),
    }
}

/// Waits for the appends and answers (unless acks=0).
pub async fn finish(
    context: Context,
    correlation_id: i32,
    version: i16,
    pending: PendingProduce,
    responder: Responder,
) {
    let mut responses = Vec::with_capacity(pending.topics.len());
    for (name, partitions) in pending.topics {
        let mut partition_responses = Vec::with_capacity(partitions.len());
        for (index, pending) in partitions {
            let result = match pending {
                Pending::Appending(answer) => match answer.await {
                    Ok(Ok(info)) => Ok(info),
                    Ok(Err(error)) => Err((errors::code_of(&error), error.message)),
                    Err(_) => Err((
                        errors::code_of(&OpError::new(ErrorCode::ShuttingDown, "")),
                        "the shard stopped".to_string(),
                    )),
                },
                Pending::Failed(code, message) => Err((code, message)),
            };
            let response = PartitionProduceResponse::default().with_index(index);
            partition_responses.push(match result {
                Ok(info) => response
                    .with_base_offset(info.base_offset)
                    .with_log_append_time_ms(info.log_append_time_ms.unwrap_or(-1))
                    .with_log_start_offset(-1),
                Err((code, message)) => {
                    tracing::debug!(peer = %context.peer, topic = %name.0.as_str(), partition = index, code, %message, "produce failed");
                    response
                        .with_error_code(code)
                        .with_base_offset(-1)
                        .with_log_append_time_ms(-1)
                        .with_log_start_offset(-1)
                        .with_error_message(Some(StrBytes::from_string(message)))
                }
            });
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(name)
                .with_partition_responses(partition_responses),
        );
    }
    context
        .shared
        .metrics
        .produce_latency
        .record(pending.started.elapsed());
    if pending.acks == 0 {
        responder.send(None);
        return;
    }
    let response = ProduceResponse::default().with_responses(responses);
    responder.send(encode(correlation_id, version, &response));
}

/// Encodes an answer; a failure (a bug: the codec refused our own values)
/// is logged and the request goes unanswered rather than killing the task.
pub fn encode<R>(correlation_id: i32, version: i16, response: &R) -> Option<Vec<u8>>
where
    R: kafka_protocol::protocol::Encodable + kafka_protocol::protocol::HeaderVersion,
{
    match codec::encode_response(correlation_id, version, response) {
        Ok(frame) => Some(frame),
        Err(error) => {
            let response = std::any::type_name::<R>()
                .rsplit("::")
                .next()
                .unwrap_or("response");
            tracing::error!(%error, response, version, "encoding a Kafka response failed");
            None
        }
    }
}
