//! Consumer groups over Kafka: the classic group protocol (JoinGroup,
//! SyncGroup, Heartbeat, LeaveGroup) run by [`super::coordinator`], and
//! committed offsets kept in the broker's [`GroupStore`], the same store
//! the native protocol commits to, so offsets survive restarts and either
//! protocol sees the other's commits.
//!
//! [`GroupStore`]: crate::broker::groups::GroupStore

use std::time::Instant;

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::{
    DeletableGroupResult, DeleteGroupsResponse,
};
use kafka_protocol::messages::describe_groups_response::{
    DescribeGroupsResponse, DescribedGroup, DescribedGroupMember,
};
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};
use kafka_protocol::messages::list_groups_response::{ListGroupsResponse, ListedGroup};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;
use kafka_protocol::messages::{
    DeleteGroupsRequest, DescribeGroupsRequest, GroupId, HeartbeatRequest, JoinGroupRequest,
    LeaveGroupRequest, ListGroupsRequest, OffsetCommitRequest, OffsetFetchRequest, RequestKind,
    SyncGroupRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::connection::Context;
use super::coordinator::{
    self, GroupCoordinator, GroupState, JoinOutcome, JoinRequest, JoinResponse, SyncOutcome,
    SyncRequest, SyncResponse,
};
use super::errors;
use super::produce::encode;

fn text(value: impl Into<String>) -> StrBytes {
    StrBytes::from_string(value.into())
}

fn optional_text(value: Option<String>) -> Option<StrBytes> {
    value.map(text)
}

/// Runs `f` on the coordinator; a poisoned lock is taken over (the
/// coordinator's state stays consistent per call).
fn with_coordinator<T>(context: &Context, f: impl FnOnce(&mut GroupCoordinator) -> T) -> T {
    let mut coordinator = context
        .shared
        .kafka
        .coordinator
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f(&mut coordinator)
}

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
        RequestKind::JoinGroup(request) => reply!(join(context, version, request).await),
        RequestKind::SyncGroup(request) => reply!(sync(context, request).await),
        RequestKind::Heartbeat(request) => reply!(heartbeat(context, request)),
        RequestKind::LeaveGroup(request) => reply!(leave(context, version, request)),
        RequestKind::OffsetCommit(request) => reply!(offset_commit(context, request)),
        RequestKind::OffsetFetch(request) => reply!(offset_fetch(context, request)),
        RequestKind::ListGroups(request) => reply!(list_groups(context, request)),
        RequestKind::DescribeGroups(request) => reply!(describe_groups(context, request)),
        RequestKind::DeleteGroups(request) => reply!(delete_groups(context, request)),
        other => {
            // api::serves() lets only served APIs through to decoding.
            tracing::error!(peer = %context.peer, request = ?std::mem::discriminant(&other),
                "a decoded Kafka request has no handler");
            None
        }
    }
}

async fn join(context: &Context, version: i16, request: JoinGroupRequest) -> JoinGroupResponse {
    let group = request.group_id.0.as_str().to_string();
    let join = JoinRequest {
        member_id: request.member_id.as_str().to_string(),
        group_instance_id: request.group_instance_id.map(|id| id.as_str().to_string()),
        client_id: context.client_id.to_string(),
        client_host: format!("/{}", context.peer.ip()),
        session_timeout_ms: request.session_timeout_ms,
        // v0 has no rebalance timeout: the session timeout stands in for it.
        rebalance_timeout_ms: if version == 0 {
            request.session_timeout_ms
        } else {
            request.rebalance_timeout_ms
        },
        protocol_type: request.protocol_type.as_str().to_string(),
        protocols: request
            .protocols
            .into_iter()
            .map(|protocol| {
                (
                    protocol.name.as_str().to_string(),
                    protocol.metadata.to_vec(),
                )
            })
            .collect(),
        require_known_member_id: version >= 4,
        reason: request.reason.map(|reason| reason.as_str().to_string()),
    };
    let member_id = join.member_id.clone();
    let outcome = with_coordinator(context, |coordinator| {
        coordinator.join(&group, join, Instant::now())
    });
    let response = match outcome {
        JoinOutcome::Ready(response) => response,
        JoinOutcome::Waiting(waiting) => waiting.await.unwrap_or_else(|_| JoinResponse {
            error_code: errors::COORDINATOR_NOT_AVAILABLE,
            generation_id: coordinator::UNKNOWN_GENERATION,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id,
            members: Vec::new(),
        }),
    };
    JoinGroupResponse::default()
        .with_error_code(response.error_code)
        .with_generation_id(response.generation_id)
        .with_protocol_type(optional_text(response.protocol_type))
        // Before v7 the protocol name is not nullable.
        .with_protocol_name(Some(text(response.protocol_name.unwrap_or_default())))
        .with_leader(text(response.leader))
        .with_member_id(text(response.member_id))
        .with_members(
            response
                .members
                .into_iter()
                .map(|member| {
                    JoinGroupResponseMember::default()
                        .with_member_id(text(member.member_id))
                        .with_group_instance_id(optional_text(member.group_instance_id))
                        .with_metadata(Bytes::from(member.metadata))
                })
                .collect(),
        )
}

async fn sync(context: &Context, request: SyncGroupRequest) -> SyncGroupResponse {
    let group = request.group_id.0.as_str().to_string();
    let sync = SyncRequest {
        member_id: request.member_id.as_str().to_string(),
        generation_id: request.generation_id,
        protocol_type: request
            .protocol_type
            .map(|value| value.as_str().to_string()),
        protocol_name: request
            .protocol_name
            .map(|value| value.as_str().to_string()),
        assignments: request
            .assignments
            .into_iter()
            .map(|assignment| {
                (
                    assignment.member_id.as_str().to_string(),
                    assignment.assignment.to_vec(),
                )
            })
            .collect(),
    };
    let outcome = with_coordinator(context, |coordinator| {
        coordinator.sync(&group, sync, Instant::now())
    });
    let response = match outcome {
        SyncOutcome::Ready(response) => response,
        SyncOutcome::Waiting(waiting) => waiting.await.unwrap_or_else(|_| SyncResponse {
            error_code: errors::COORDINATOR_NOT_AVAILABLE,
            protocol_type: None,
            protocol_name: None,
            assignment: Vec::new(),
        }),
    };
    SyncGroupResponse::default()
        .with_error_code(response.error_code)
        .with_protocol_type(optional_text(response.protocol_type))
        .with_protocol_name(optional_text(response.protocol_name))
        .with_assignment(Bytes::from(response.assignment))
}

fn heartbeat(context: &Context, request: HeartbeatRequest) -> HeartbeatResponse {
    let code = with_coordinator(context, |coordinator| {
        coordinator.heartbeat(
            request.group_id.0.as_str(),
            request.member_id.as_str(),
            request.generation_id,
            Instant::now(),
        )
    });
    HeartbeatResponse::default().with_error_code(code)
}

fn leave(context: &Context, version: i16, request: LeaveGroupRequest) -> LeaveGroupResponse {
    // v0-v2 name one member; v3 and later a list.
    let members: Vec<String> = if version < 3 {
        vec![request.member_id.as_str().to_string()]
    } else {
        request
            .members
            .iter()
            .map(|member| member.member_id.as_str().to_string())
            .collect()
    };
    let results = with_coordinator(context, |coordinator| {
        coordinator.leave(request.group_id.0.as_str(), members, Instant::now())
    });
    if version < 3 {
        let code = results.first().map_or(errors::NONE, |(_, code)| *code);
        return LeaveGroupResponse::default().with_error_code(code);
    }
    LeaveGroupResponse::default().with_members(
        results
            .into_iter()
            .map(|(member_id, code)| {
                MemberResponse::default()
                    .with_member_id(text(member_id))
                    .with_error_code(code)
            })
            .collect(),
    )
}

fn offset_commit(context: &Context, request: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = request.group_id.0.as_str().to_string();
    let check = with_coordinator(context, |coordinator| {
        coordinator.generation_check(
            &group,
            request.member_id.as_str(),
            request.generation_id_or_member_epoch,
        )
    });
    let mut entries = Vec::new();
    let mut codes: Vec<Vec<i16>> = Vec::with_capacity(request.topics.len());
    for topic in &request.topics {
        let name = topic.name.0.as_str();
        let meta = context.view.table.get(name);
        codes.push(
            topic
                .partitions
                .iter()
                .map(|partition| {
                    if let Err(code) = check {
                        return code;
                    }
                    let known = meta.is_some_and(|meta| {
                        u32::try_from(partition.partition_index)
                            .is_ok_and(|index| index < meta.partitions)
                    });
                    if !known {
                        return errors::UNKNOWN_TOPIC_OR_PARTITION;
                    }
                    entries.push((
                        name.to_string(),
                        partition.partition_index as u32,
                        partition.committed_offset,
                    ));
                    errors::NONE
                })
                .collect(),
        );
    }
    let stored = if entries.is_empty() {
        Ok(())
    } else {
        context.shared.groups.commit_many(&group, &entries)
    };
    if let Err(message) = &stored {
        tracing::warn!(group, %message, "offset commit refused");
    }
    let topics = request
        .topics
        .into_iter()
        .zip(codes)
        .map(|(topic, codes)| {
            OffsetCommitResponseTopic::default()
                .with_name(topic.name)
                .with_partitions(
                    topic
                        .partitions
                        .iter()
                        .zip(codes)
                        .map(|(partition, code)| {
                            let code = match (&stored, code) {
                                (Err(_), errors::NONE) => errors::KAFKA_STORAGE_ERROR,
                                (_, code) => code,
                            };
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(partition.partition_index)
                                .with_error_code(code)
                        })
                        .collect(),
                )
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}

fn offset_fetch(context: &Context, request: OffsetFetchRequest) -> OffsetFetchResponse {
    let group = request.group_id.0.as_str().to_string();
    let store = &context.shared.groups;
    let committed = |topic: &str, partition: i32| {
        u32::try_from(partition)
            .ok()
            .and_then(|index| store.fetch(&group, topic, index))
            .unwrap_or(-1)
    };
    let wanted: Vec<(TopicName, Vec<i32>)> = match request.topics {
        Some(topics) => topics
            .into_iter()
            .map(|topic| (topic.name, topic.partition_indexes))
            .collect(),
        // Null (v2+): every partition the group committed.
        None => {
            let mut by_topic: Vec<(TopicName, Vec<i32>)> = Vec::new();
            for (name, partition, _) in store
                .list()
                .into_iter()
                .filter(|(listed, _)| *listed == group)
                .flat_map(|(_, offsets)| offsets)
            {
                match by_topic
                    .iter_mut()
                    .find(|(topic, _)| topic.0.as_str() == name)
                {
                    Some((_, partitions)) => partitions.push(partition as i32),
                    None => by_topic.push((TopicName(text(name)), vec![partition as i32])),
                }
            }
            by_topic
        }
    };
    let topics = wanted
        .into_iter()
        .map(|(name, partitions)| {
            let partitions = partitions
                .into_iter()
                .map(|partition| {
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(partition)
                        .with_committed_offset(committed(name.0.as_str(), partition))
                        .with_committed_leader_epoch(-1)
                        .with_metadata(Some(StrBytes::default()))
                })
                .collect();
            OffsetFetchResponseTopic::default()
                .with_name(name)
                .with_partitions(partitions)
        })
        .collect();
    OffsetFetchResponse::default().with_topics(topics)
}

fn list_groups(context: &Context, request: ListGroupsRequest) -> ListGroupsResponse {
    let mut listed: Vec<(String, String, String)> = with_coordinator(context, |coordinator| {
        coordinator
            .list()
            .into_iter()
            .map(|group| {
                (
                    group.group_id,
                    group.protocol_type,
                    group.state.as_str().to_string(),
                )
            })
            .collect()
    });
    // Groups known only by their committed offsets are empty consumer groups.
    for (group, _) in context.shared.groups.list() {
        if !listed.iter().any(|(listed, _, _)| *listed == group) {
            listed.push((
                group,
                "consumer".to_string(),
                GroupState::Empty.as_str().to_string(),
            ));
        }
    }
    let states: Vec<&str> = request.states_filter.iter().map(StrBytes::as_str).collect();
    ListGroupsResponse::default().with_groups(
        listed
            .into_iter()
            .filter(|(_, _, state)| states.is_empty() || states.contains(&state.as_str()))
            .map(|(group, protocol_type, state)| {
                ListedGroup::default()
                    .with_group_id(GroupId(text(group)))
                    .with_protocol_type(text(protocol_type))
                    .with_group_state(text(state))
                    .with_group_type(text("classic"))
            })
            .collect(),
    )
}

fn describe_groups(context: &Context, request: DescribeGroupsRequest) -> DescribeGroupsResponse {
    let groups = request
        .groups
        .into_iter()
        .map(|group_id| {
            let description = with_coordinator(context, |coordinator| {
                coordinator.describe(group_id.0.as_str())
            });
            DescribedGroup::default()
                .with_group_id(group_id)
                .with_group_state(text(description.state.as_str()))
                .with_protocol_type(text(description.protocol_type))
                .with_protocol_data(text(description.protocol))
                .with_members(
                    description
                        .members
                        .into_iter()
                        .map(|member| {
                            DescribedGroupMember::default()
                                .with_member_id(text(member.member_id))
                                .with_group_instance_id(optional_text(member.group_instance_id))
                                .with_client_id(text(member.client_id))
                                .with_client_host(text(member.client_host))
                                .with_member_metadata(Bytes::from(member.metadata))
                                .with_member_assignment(Bytes::from(member.assignment))
                        })
                        .collect(),
                )
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}

fn delete_groups(context: &Context, request: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let results = request
        .groups_names
        .into_iter()
        .map(|group_id| {
            let name = group_id.0.as_str().to_string();
            let mut code = with_coordinator(context, |coordinator| coordinator.delete(&name));
            // A group with only committed offsets is not the coordinator's.
            if code == errors::NONE || code == errors::GROUP_ID_NOT_FOUND {
                match context.shared.groups.delete(&name) {
                    Ok(true) => code = errors::NONE,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(group = name, error = %format!("{error:#}"), "deleting a group's offsets failed");
                        code = errors::KAFKA_STORAGE_ERROR;
                    }
                }
            }
            DeletableGroupResult::default()
                .with_group_id(group_id)
                .with_error_code(code)
        })
        .collect();
    DeleteGroupsResponse::default().with_results(results)
}
