//! Shared subscriptions (`$share/GROUP/filter`): one reader per group and
//! filter, broker-wide, follows the filter's source partitions from the
//! moment the group's first member subscribed, and offers each matching
//! record to the group's members in the index's round-robin order until
//! one takes it. When every member refuses (queues full), a QoS 1 or 2
//! message is offered again shortly after, holding its partition back; a
//! QoS 0 message is dropped. The reader ends once the group has no member.
//!
//! Shared deliveries carry no log position, so they are live only: a
//! group's members do not catch up on what was published while none of
//! them was connected, or while the broker was down.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rill_edge_bridge::mqtt::mapping::publisher_of_record;
use rill_edge_bridge::mqtt::session::{Delivery, DeliveryKind, DeliveryOutcome};
use rill_edge_bridge::mqtt::topic::matches;
use rill_edge_bridge::mqtt::{Message, QoS};

use super::delivery::{self, End, PartitionKey, Start, Step};
use super::{lock, now_ms};
use crate::broker::Shared;

/// How often a group's reader looks for new partitions and members.
const GROUP_CHECK_MS: u64 = 1_000;

/// The source partitions of `filter`, as the topic table has them now.
pub(crate) fn source_partitions(shared: &Shared, filter: &str) -> BTreeSet<PartitionKey> {
    let view = shared.topics.snapshot();
    let mut keys = BTreeSet::new();
    for topic in shared.mqtt.context.mapping.source_topics(filter) {
        if let Some(meta) = view.table.get(topic) {
            keys.extend((0..meta.partitions).map(|partition| (topic.to_owned(), partition)));
        }
    }
    keys
}

fn is_current(shared: &Shared, group: &(String, String), id: u64) -> bool {
    lock(&shared.mqtt.share_groups).get(group) == Some(&id)
}

/// Starts the reader of `group` for `filter` unless one runs; its
/// partitions' start offsets are fixed before this returns, so the
/// SUBACK that follows promises what is published after it.
pub(crate) async fn ensure_group(shared: &Arc<Shared>, group: &str, filter: &str) {
    let name = (group.to_owned(), filter.to_owned());
    let id = {
        let state = &shared.mqtt;
        let mut groups = lock(&state.share_groups);
        if groups.contains_key(&name) {
            return;
        }
        let id = state.next_connection_id();
        groups.insert(name.clone(), id);
        id
    };
    let mut starts = Vec::new();
    for key in source_partitions(shared, filter) {
        if let Ok(offset) = delivery::resolve(shared, &key, Start::Latest).await {
            starts.push((key, offset));
        }
    }
    crate::io::home::spawn(run_group(shared.clone(), name, id, starts)).detach();
}

async fn run_group(
    shared: Arc<Shared>,
    name: (String, String),
    id: u64,
    starts: Vec<(PartitionKey, i64)>,
) {
    tracing::debug!(group = %name.0, filter = %name.1, "shared subscription reader started");
    let running: Rc<RefCell<BTreeSet<PartitionKey>>> = Rc::default();
    for (key, offset) in starts {
        running.borrow_mut().insert(key.clone());
        crate::io::home::spawn(read_for_group(
            shared.clone(),
            name.clone(),
            id,
            key,
            offset,
            running.clone(),
        ))
        .detach();
    }
    loop {
        compio::time::sleep(Duration::from_millis(GROUP_CHECK_MS)).await;
        if shared.is_shutting_down() || !is_current(&shared, &name, id) {
            return;
        }
        let members = lock(&shared.mqtt.index).shared_members(&name.0, &name.1);
        if members == 0 {
            let mut groups = lock(&shared.mqtt.share_groups);
            if groups.get(&name) == Some(&id) {
                groups.remove(&name);
            }
            tracing::debug!(group = %name.0, filter = %name.1, "shared subscription reader stopped: no members");
            return;
        }
        // Partitions that appeared since: read from their start.
        for key in source_partitions(&shared, &name.1) {
            if running.borrow_mut().insert(key.clone()) {
                crate::io::home::spawn(read_for_group(
                    shared.clone(),
                    name.clone(),
                    id,
                    key,
                    0,
                    running.clone(),
                ))
                .detach();
            }
        }
    }
}

async fn read_for_group(
    shared: Arc<Shared>,
    name: (String, String),
    id: u64,
    key: PartitionKey,
    offset: i64,
    running: Rc<RefCell<BTreeSet<PartitionKey>>>,
) {
    let stopped = || !is_current(&shared, &name, id);
    let mapping = &shared.mqtt.context.mapping;
    let end = delivery::follow(&shared, &key, offset, &stopped, |record| {
        let Some(message) = mapping.message_from_record(
            &key.0,
            &record.headers,
            record.key,
            Bytes::copy_from_slice(record.value),
            now_ms(),
        ) else {
            return Step::Next;
        };
        if !matches(&name.1, &message.topic) {
            return Step::Next;
        }
        offer(
            &shared,
            &name,
            message,
            publisher_of_record(&record.headers),
        )
    })
    .await;
    if matches!(end, End::Gone) {
        running.borrow_mut().remove(&key);
    }
}

/// Offers `message` to the group's members in turn.
fn offer(
    shared: &Shared,
    name: &(String, String),
    message: Message,
    publisher: Option<&str>,
) -> Step {
    let state = &shared.mqtt;
    let routes = lock(&state.index).route(&message.topic, publisher);
    let Some(group) = routes
        .shared
        .into_iter()
        .find(|shared| shared.group == name.0 && shared.filter == name.1)
    else {
        return Step::Next;
    };
    for candidate in group.candidates {
        let Some(client) = lock(&state.sessions)
            .live
            .get(&candidate.client_id)
            .cloned()
        else {
            continue;
        };
        let outcome = client.deliver(Delivery {
            message: message.clone(),
            qos: candidate.qos,
            subscription_identifiers: candidate.subscription_identifiers,
            retain_as_published: candidate.retain_as_published,
            kind: DeliveryKind::Live,
            position: None,
        });
        if outcome != DeliveryOutcome::Refused {
            return Step::Next;
        }
    }
    if message.qos == QoS::AtMostOnce {
        Step::Next
    } else {
        Step::Again
    }
}
