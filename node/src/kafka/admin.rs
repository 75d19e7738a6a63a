//! Every Kafka request but Produce: the dispatcher, and the metadata,
//! topic, offset, config and producer-id APIs. Consumer groups live in
//! [`super::groups`], Fetch in [`super::fetch`].

use kafka_protocol::messages::create_partitions_response::{
    CreatePartitionsResponse, CreatePartitionsTopicResult,
};
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
};
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResponse, DescribeConfigsResult,
};
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderEpochResponse, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{
    BrokerId, CreatePartitionsRequest, CreateTopicsRequest, DeleteRecordsRequest,
    DeleteTopicsRequest, DescribeConfigsRequest, FindCoordinatorRequest, InitProducerIdRequest,
    ListOffsetsRequest, MetadataRequest, OffsetForLeaderEpochRequest, RequestKind, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use rill_protocol::OffsetSpec;

use super::connection::Context;
use super::errors;
use super::produce::encode;
use crate::broker::connection::owner_of;
use crate::broker::errors::OpError;
use crate::broker::shard::ShardOp;
use crate::broker::topics::check_topic_name;
use crate::broker::{alter_topic, create_topic, delete_topic, ensure_topic};
use crate::config::TopicSettings;

/// The only node of this one-broker cluster.
const NODE_ID: i32 = 0;
/// Leader epoch of every partition: Rill has one replica, which never moves.
const LEADER_EPOCH: i32 = 0;

fn text(value: impl Into<String>) -> StrBytes {
    StrBytes::from_string(value.into())
}

/// Answers one decoded request (never Produce) as a whole frame.
pub async fn answer(
    context: &Context,
    correlation_id: i32,
    version: i16,
    request: RequestKind,
) -> Option<Vec<u8>> {
    macro_rules! reply {
        ($response:expr) => {
            encode(correlation_id, version, &$response)
        };
    }
    match request {
        RequestKind::ApiVersions(_) => reply!(super::api::api_versions(errors::NONE)),
        RequestKind::Metadata(request) => reply!(metadata(context, version, request).await),
        RequestKind::ListOffsets(request) => {
            reply!(list_offsets(context, version, request).await)
        }
        RequestKind::CreateTopics(request) => reply!(create_topics(context, request).await),
        RequestKind::DeleteTopics(request) => reply!(delete_topics(context, request).await),
        RequestKind::CreatePartitions(request) => {
            reply!(create_partitions(context, request).await)
        }
        RequestKind::DescribeConfigs(request) => reply!(describe_configs(context, request)),
        RequestKind::DeleteRecords(request) => reply!(delete_records(context, request).await),
        RequestKind::OffsetForLeaderEpoch(request) => {
            reply!(offset_for_leader_epoch(context, request).await)
        }
        RequestKind::FindCoordinator(request) => reply!(find_coordinator(context, request)),
        RequestKind::InitProducerId(request) => reply!(init_producer_id(context, request)),
        request => super::groups::answer(context, correlation_id, version, request).await,
    }
}

async fn metadata(context: &Context, version: i16, request: MetadataRequest) -> MetadataResponse {
    let shared = &context.shared;
    // v0 asks for all topics with an empty list; later versions with null.
    let requested: Option<Vec<String>> = match request.topics {
        Some(topics) if !(version == 0 && topics.is_empty()) => Some(
            topics
                .into_iter()
                .filter_map(|topic| topic.name.map(|name| name.0.as_str().to_string()))
                .collect(),
        ),
        _ => None,
    };
    let auto_create = version < 4 || request.allow_auto_topic_creation;
    let mut topics = Vec::new();
    match requested {
        None => {
            let view = shared.topics.snapshot();
            for (name, meta) in view.table.iter() {
                topics.push(topic_metadata(name, Ok(meta.partitions)));
            }
        }
        Some(names) => {
            for name in names {
                let partitions = match context.view.table.get(&name) {
                    Some(meta) => Ok(meta.partitions),
                    None if check_topic_name(&name).is_err() => {
                        Err(errors::INVALID_TOPIC_EXCEPTION)
                    }
                    None if auto_create => ensure_topic(shared, &name)
                        .await
                        .map(|meta| meta.partitions)
                        .map_err(|error| errors::code_of(&error)),
                    None => Err(errors::UNKNOWN_TOPIC_OR_PARTITION),
                };
                topics.push(topic_metadata(&name, partitions));
            }
        }
    }
    MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(NODE_ID))
                .with_host(text(context.advertised.0.clone()))
                .with_port(context.advertised.1),
        ])
        .with_cluster_id(Some(text(shared.kafka.cluster_id.clone())))
        .with_controller_id(BrokerId(NODE_ID))
        .with_topics(topics)
}

fn topic_metadata(name: &str, partitions: Result<u32, i16>) -> MetadataResponseTopic {
    let topic = MetadataResponseTopic::default().with_name(Some(TopicName(text(name))));
    match partitions {
        Ok(count) => topic.with_partitions(
            (0..count as i32)
                .map(|index| {
                    MetadataResponsePartition::default()
                        .with_partition_index(index)
                        .with_leader_id(BrokerId(NODE_ID))
                        .with_leader_epoch(LEADER_EPOCH)
                        .with_replica_nodes(vec![BrokerId(NODE_ID)])
                        .with_isr_nodes(vec![BrokerId(NODE_ID)])
                })
                .collect(),
        ),
        Err(code) => topic.with_error_code(code),
    }
}

/// Asks a partition's shard for an offset.
async fn offset_at(
    context: &Context,
    topic: &str,
    partition: i32,
    at: OffsetSpec,
) -> Result<Option<i64>, OpError> {
    let index = u32::try_from(partition).map_err(|_| {
        OpError::new(
            rill_protocol::ErrorCode::UnknownPartition,
            "negative partition",
        )
    })?;
    let owner = owner_of(&context.shared, &context.view, topic, index)?;
    let key = (topic.to_string(), index);
    context
        .shared
        .call(owner, |reply| ShardOp::ListOffsets { key, at, reply })
        .await?
}

async fn list_offsets(
    context: &Context,
    version: i16,
    request: ListOffsetsRequest,
) -> ListOffsetsResponse {
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.name.0.as_str().to_string();
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for partition in topic.partitions {
            let at = match partition.timestamp {
                -1 => OffsetSpec::Latest,
                -2 => OffsetSpec::Earliest,
                timestamp => OffsetSpec::Timestamp(timestamp),
            };
            let response = ListOffsetsPartitionResponse::default()
                .with_partition_index(partition.partition_index);
            partitions.push(
                match offset_at(context, &name, partition.partition_index, at).await {
                    Ok(Some(offset)) => response
                        .with_offset(offset)
                        .with_timestamp(match at {
                            OffsetSpec::Timestamp(timestamp) => timestamp,
                            _ => -1,
                        })
                        // Leader epochs are in the answer from v4 on.
                        .with_leader_epoch(if version >= 4 { LEADER_EPOCH } else { -1 }),
                    // No record at or after the time: Kafka answers -1.
                    Ok(None) => response.with_offset(-1).with_timestamp(-1),
                    Err(error) => response
                        .with_error_code(errors::code_of(&error))
                        .with_offset(-1)
                        .with_timestamp(-1),
                },
            );
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

/// Kafka topic configs and the Rill settings they set. Values are
/// translated by [`rill_setting`].
const TOPIC_CONFIGS: &[(&str, &str)] = &[
    ("retention.ms", "retention_ms"),
    ("retention.bytes", "retention_bytes"),
    ("segment.bytes", "segment_bytes_max"),
    ("segment.ms", "segment_age_ms_max"),
    ("max.message.bytes", "batch_bytes_max"),
    ("message.timestamp.type", "timestamp_type"),
    ("index.interval.bytes", "index_interval_bytes"),
];

/// Kafka topic configs that mean nothing on a one-replica broker that
/// stores batches as they come: accepted (tools set them by habit) and
/// not stored.
const IGNORED_CONFIGS: &[&str] = &[
    "min.insync.replicas",
    "unclean.leader.election.enable",
    "message.downconversion.enable",
    "preallocate",
    "file.delete.delay.ms",
    "delete.retention.ms",
    "min.compaction.lag.ms",
    "max.compaction.lag.ms",
    "min.cleanable.dirty.ratio",
    "segment.jitter.ms",
    "segment.index.bytes",
    "follower.replication.throttled.replicas",
    "leader.replication.throttled.replicas",
    "message.timestamp.difference.max.ms",
    "message.timestamp.before.max.ms",
    "message.timestamp.after.max.ms",
];

/// A Kafka topic config as a Rill `key=value` override, `None` when it is
/// accepted and ignored.
fn rill_setting(name: &str, value: Option<&str>) -> Result<Option<(String, String)>, String> {
    let value = value.unwrap_or_default();
    if name == "cleanup.policy" {
        return match value {
            "delete" | "" => Ok(None),
            other => Err(format!(
                "cleanup.policy={other} is not supported: Rill deletes old segments, it does not compact"
            )),
        };
    }
    if name == "compression.type" {
        return match value {
            "producer" | "" => Ok(None),
            other => Err(format!(
                "compression.type={other} is not supported: Rill stores batches as producers compressed them (compression.type=producer)"
            )),
        };
    }
    if IGNORED_CONFIGS.contains(&name) {
        return Ok(None);
    }
    let Some(&(_, key)) = TOPIC_CONFIGS.iter().find(|(kafka, _)| *kafka == name) else {
        let known: Vec<&str> = TOPIC_CONFIGS.iter().map(|(kafka, _)| *kafka).collect();
        return Err(format!(
            "topic config {name} is not supported; supported: {}, cleanup.policy=delete, compression.type=producer",
            known.join(", ")
        ));
    };
    let value = match (name, value) {
        // Kafka's "no limit" is -1; Rill's is 0.
        ("retention.ms" | "retention.bytes", "-1") => "0".to_string(),
        ("message.timestamp.type", "CreateTime") => "create-time".to_string(),
        ("message.timestamp.type", "LogAppendTime") => "log-append-time".to_string(),
        (_, value) => value.to_string(),
    };
    Ok(Some((key.to_string(), value)))
}

/// A topic's settings as Kafka topic configs.
fn kafka_configs(settings: &TopicSettings) -> Vec<(&'static str, String)> {
    let unlimited = |value: Option<u64>| value.map_or("-1".to_string(), |value| value.to_string());
    vec![
        ("cleanup.policy", "delete".to_string()),
        ("compression.type", "producer".to_string()),
        ("retention.ms", unlimited(settings.retention_ms)),
        ("retention.bytes", unlimited(settings.retention_bytes)),
        ("segment.bytes", settings.segment_bytes_max.to_string()),
        (
            "segment.ms",
            settings
                .segment_age_ms_max
                .map_or(i64::MAX.to_string(), |age| age.to_string()),
        ),
        ("max.message.bytes", settings.batch_bytes_max.to_string()),
        (
            "message.timestamp.type",
            match settings.timestamp_type {
                crate::config::TimestampTypeSetting::CreateTime => "CreateTime",
                crate::config::TimestampTypeSetting::LogAppendTime => "LogAppendTime",
            }
            .to_string(),
        ),
        (
            "index.interval.bytes",
            settings.index_interval_bytes.to_string(),
        ),
        ("min.insync.replicas", "1".to_string()),
    ]
}

async fn create_topics(context: &Context, request: CreateTopicsRequest) -> CreateTopicsResponse {
    let shared = &context.shared;
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.name.0.as_str().to_string();
        let result = CreatableTopicResult::default().with_name(topic.name.clone());
        let outcome: Result<u32, (i16, String)> = async {
            if topic.replication_factor > 1 {
                return Err((
                    errors::INVALID_REPLICATION_FACTOR,
                    format!(
                        "replication factor {} asked, but this Rill broker keeps one copy",
                        topic.replication_factor
                    ),
                ));
            }
            if !topic.assignments.is_empty() {
                return Err((
                    errors::INVALID_REQUEST,
                    "manual replica assignments are not supported".to_string(),
                ));
            }
            let partitions = match topic.num_partitions {
                -1 => shared.config.topics.default_partitions,
                count if count > 0 => count as u32,
                count => {
                    return Err((
                        errors::INVALID_PARTITIONS,
                        format!("{count} partitions asked; at least 1"),
                    ));
                }
            };
            let mut overrides = Vec::new();
            for config in &topic.configs {
                match rill_setting(
                    config.name.as_str(),
                    config.value.as_ref().map(StrBytes::as_str),
                ) {
                    Ok(Some(setting)) => overrides.push(setting),
                    Ok(None) => {}
                    Err(message) => return Err((errors::INVALID_CONFIG, message)),
                }
            }
            if let Err(reason) = check_topic_name(&name) {
                return Err((errors::INVALID_TOPIC_EXCEPTION, reason));
            }
            if request.validate_only {
                if context.view.table.contains_key(&name) {
                    return Err((
                        errors::TOPIC_ALREADY_EXISTS,
                        format!("topic {name} exists already"),
                    ));
                }
                return Ok(partitions);
            }
            create_topic(shared, &name, partitions, &overrides)
                .await
                .map(|meta| meta.partitions)
                .map_err(|error| (errors::code_of(&error), error.message))
        }
        .await;
        results.push(match outcome {
            Ok(partitions) => result
                .with_num_partitions(partitions as i32)
                .with_replication_factor(1),
            Err((code, message)) => result
                .with_error_code(code)
                .with_error_message(Some(text(message)))
                .with_num_partitions(-1)
                .with_replication_factor(-1),
        });
    }
    CreateTopicsResponse::default().with_topics(results)
}

async fn delete_topics(context: &Context, request: DeleteTopicsRequest) -> DeleteTopicsResponse {
    // v0-v5 name topics in `topic_names`; v6 would use `topics`.
    let names: Vec<TopicName> = if request.topic_names.is_empty() {
        request
            .topics
            .into_iter()
            .filter_map(|topic| topic.name)
            .collect()
    } else {
        request.topic_names
    };
    let mut responses = Vec::with_capacity(names.len());
    for name in names {
        let result = delete_topic(&context.shared, name.0.as_str()).await;
        let response = DeletableTopicResult::default().with_name(Some(name));
        responses.push(match result {
            Ok(()) => response,
            Err(error) => response
                .with_error_code(errors::code_of(&error))
                .with_error_message(Some(text(error.message))),
        });
    }
    DeleteTopicsResponse::default().with_responses(responses)
}

async fn create_partitions(
    context: &Context,
    request: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.name.0.as_str().to_string();
        let current = context.view.table.get(&name).map(|meta| meta.partitions);
        let outcome = match (current, u32::try_from(topic.count)) {
            (None, _) => Err((
                errors::UNKNOWN_TOPIC_OR_PARTITION,
                format!("topic {name} does not exist"),
            )),
            (Some(current), Ok(count)) if count > current => {
                if request.validate_only {
                    Ok(())
                } else {
                    alter_topic(&context.shared, &name, Some(count), &[])
                        .await
                        .map(|_| ())
                        .map_err(|error| (errors::code_of(&error), error.message))
                }
            }
            (Some(current), _) => Err((
                errors::INVALID_PARTITIONS,
                format!(
                    "topic {name} has {current} partitions; the new count must be larger, not {}",
                    topic.count
                ),
            )),
        };
        let result = CreatePartitionsTopicResult::default().with_name(topic.name);
        results.push(match outcome {
            Ok(()) => result,
            Err((code, message)) => result
                .with_error_code(code)
                .with_error_message(Some(text(message))),
        });
    }
    CreatePartitionsResponse::default().with_results(results)
}

/// A config in a DescribeConfigs answer: name, value, source.
type ConfigEntry = (String, String, i8);

/// Resource types of DescribeConfigs.
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Config sources: a topic's own setting, and the broker's default.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;

fn describe_configs(context: &Context, request: DescribeConfigsRequest) -> DescribeConfigsResponse {
    let shared = &context.shared;
    let mut results = Vec::with_capacity(request.resources.len());
    for resource in request.resources {
        let name = resource.resource_name.as_str().to_string();
        let wanted = |key: &str| {
            resource
                .configuration_keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|wanted| wanted.as_str() == key))
        };
        let result = DescribeConfigsResult::default()
            .with_resource_type(resource.resource_type)
            .with_resource_name(resource.resource_name.clone());
        let entries: Result<Vec<ConfigEntry>, (i16, String)> = match resource.resource_type {
            RESOURCE_TOPIC => match context.view.table.get(&name) {
                Some(meta) => {
                    let defaults = kafka_configs(&shared.config.topic_defaults);
                    Ok(kafka_configs(&meta.settings)
                        .into_iter()
                        .map(|(key, value)| {
                            let source = if defaults.iter().any(|(k, v)| *k == key && *v == value) {
                                SOURCE_DEFAULT
                            } else {
                                SOURCE_TOPIC
                            };
                            (key.to_string(), value, source)
                        })
                        .collect())
                }
                None => Err((
                    errors::UNKNOWN_TOPIC_OR_PARTITION,
                    format!("topic {name} does not exist"),
                )),
            },
            RESOURCE_BROKER => Ok(vec![
                (
                    "auto.create.topics.enable".to_string(),
                    shared.config.topics.auto_create.to_string(),
                    SOURCE_DEFAULT,
                ),
                (
                    "num.partitions".to_string(),
                    shared.config.topics.default_partitions.to_string(),
                    SOURCE_DEFAULT,
                ),
                (
                    "default.replication.factor".to_string(),
                    "1".to_string(),
                    SOURCE_DEFAULT,
                ),
                (
                    "message.max.bytes".to_string(),
                    shared.config.topic_defaults.batch_bytes_max.to_string(),
                    SOURCE_DEFAULT,
                ),
            ]),
            other => Err((
                errors::INVALID_REQUEST,
                format!("resource type {other} has no configs in Rill"),
            )),
        };
        results.push(match entries {
            Ok(entries) => result.with_configs(
                entries
                    .into_iter()
                    .filter(|(key, _, _)| wanted(key))
                    .map(|(key, value, source)| {
                        DescribeConfigsResourceResult::default()
                            .with_name(text(key))
                            .with_value(Some(text(value)))
                            .with_read_only(resource.resource_type == RESOURCE_BROKER)
                            .with_config_source(source)
                    })
                    .collect(),
            ),
            Err((code, message)) => result
                .with_error_code(code)
                .with_error_message(Some(text(message))),
        });
    }
    DescribeConfigsResponse::default().with_results(results)
}

async fn delete_records(context: &Context, request: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let shared = &context.shared;
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.name.0.as_str().to_string();
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for partition in topic.partitions {
            let outcome = async {
                let index = u32::try_from(partition.partition_index).map_err(|_| {
                    OpError::new(
                        rill_protocol::ErrorCode::UnknownPartition,
                        "negative partition",
                    )
                })?;
                let owner = owner_of(shared, &context.view, &name, index)?;
                let key = (name.clone(), index);
                let before = partition.offset;
                shared
                    .call(owner, |reply| ShardOp::DeleteRecords { key, before, reply })
                    .await?
            }
            .await;
            let result = DeleteRecordsPartitionResult::default()
                .with_partition_index(partition.partition_index);
            partitions.push(match outcome {
                Ok(low_watermark) => result.with_low_watermark(low_watermark),
                Err(error) => result
                    .with_error_code(errors::code_of(&error))
                    .with_low_watermark(-1),
            });
        }
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    DeleteRecordsResponse::default().with_topics(topics)
}

async fn offset_for_leader_epoch(
    context: &Context,
    request: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.topic.0.as_str().to_string();
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for partition in topic.partitions {
            let result = EpochEndOffset::default().with_partition(partition.partition);
            // One epoch (0) for the partition's whole life: its end is the log's end.
            let outcome = if partition.current_leader_epoch > LEADER_EPOCH {
                Err(errors::UNKNOWN_LEADER_EPOCH)
            } else {
                offset_at(context, &name, partition.partition, OffsetSpec::Latest)
                    .await
                    .map_err(|error| errors::code_of(&error))
            };
            partitions.push(match outcome {
                Ok(end) => result
                    .with_leader_epoch(LEADER_EPOCH)
                    .with_end_offset(end.unwrap_or(-1)),
                Err(code) => result
                    .with_error_code(code)
                    .with_leader_epoch(-1)
                    .with_end_offset(-1),
            });
        }
        topics.push(
            OffsetForLeaderTopicResult::default()
                .with_topic(topic.topic)
                .with_partitions(partitions),
        );
    }
    OffsetForLeaderEpochResponse::default().with_topics(topics)
}

/// Key types of FindCoordinator.
const KEY_TYPE_GROUP: i8 = 0;

fn find_coordinator(context: &Context, request: FindCoordinatorRequest) -> FindCoordinatorResponse {
    let (host, port) = &context.advertised;
    let (code, message) = if request.key_type == KEY_TYPE_GROUP {
        (errors::NONE, None)
    } else {
        (
            errors::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            Some(text("transactions are not supported by Rill")),
        )
    };
    let response = FindCoordinatorResponse::default()
        .with_error_code(code)
        .with_error_message(message.clone())
        .with_node_id(BrokerId(if code == errors::NONE { NODE_ID } else { -1 }))
        .with_host(text(if code == errors::NONE {
            host.as_str()
        } else {
            ""
        }))
        .with_port(if code == errors::NONE { *port } else { -1 });
    // v4 asks for several keys at once; answered too, in case it is served later.
    let coordinators = request
        .coordinator_keys
        .into_iter()
        .map(|key| {
            Coordinator::default()
                .with_key(key)
                .with_node_id(BrokerId(NODE_ID))
                .with_host(text(host.as_str()))
                .with_port(*port)
                .with_error_code(code)
                .with_error_message(message.clone())
        })
        .collect();
    response.with_coordinators(coordinators)
}

fn init_producer_id(context: &Context, request: InitProducerIdRequest) -> InitProducerIdResponse {
    let failed = |code: i16| {
        InitProducerIdResponse::default()
            .with_error_code(code)
            .with_producer_id((-1).into())
            .with_producer_epoch(-1)
    };
    if request.transactional_id.is_some() {
        tracing::info!(peer = %context.peer, client_id = %context.client_id,
            "a client asked for a transactional producer; transactions are not supported");
        return failed(errors::TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
    }
    // A producer that asks to bump its epoch (KIP-360) keeps its id while
    // the epoch has room.
    let producer_id = request.producer_id.0;
    if producer_id >= 0 && request.producer_epoch >= 0 && request.producer_epoch < i16::MAX - 1 {
        return InitProducerIdResponse::default()
            .with_producer_id(producer_id.into())
            .with_producer_epoch(request.producer_epoch + 1);
    }
    let allocated = context
        .shared
        .kafka
        .producer_ids
        .lock()
        .map_err(|_| anyhow::anyhow!("producer-id allocator poisoned"))
        .and_then(|mut allocator| allocator.next_id());
    match allocated {
        Ok(id) => InitProducerIdResponse::default()
            .with_producer_id(id.into())
            .with_producer_epoch(0),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "allocating a producer id failed");
            failed(errors::KAFKA_STORAGE_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_topic_configs_map_to_rill_settings() {
        assert_eq!(
            rill_setting("retention.ms", Some("-1")),
            Ok(Some(("retention_ms".into(), "0".into())))
        );
        assert_eq!(
            rill_setting("message.timestamp.type", Some("LogAppendTime")),
            Ok(Some(("timestamp_type".into(), "log-append-time".into())))
        );
        assert_eq!(rill_setting("min.insync.replicas", Some("2")), Ok(None));
        assert_eq!(rill_setting("cleanup.policy", Some("delete")), Ok(None));
        assert!(rill_setting("cleanup.policy", Some("compact")).is_err());
        assert!(rill_setting("no.such.config", Some("1")).is_err());
        // Every mapped setting round-trips through the settings parser.
        let defaults = TopicSettings::default();
        for (kafka, value) in kafka_configs(&defaults) {
            if let Ok(Some(setting)) = rill_setting(kafka, Some(&value)) {
                let mut settings = defaults.clone();
                settings
                    .apply_overrides(std::slice::from_ref(&setting))
                    .unwrap_or_else(|error| panic!("{kafka}={value} -> {setting:?}: {error}"));
            }
        }
    }
}
