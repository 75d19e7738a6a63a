//! Carries out one connection's session actions, in the order the session
//! machine made them (the contract in `rill_edge_bridge::mqtt::session`).
//! One task per connection, on its shard. An action that must be on disk
//! before what follows (a stored session before a SUBACK) is awaited
//! before the next is taken; an append is queued at its shard in order
//! and its result comes back through the machine whenever it is ready.
//!
//! Broker-wide effects keyed by client identifier (index entries, stored
//! session, will) are applied only while this connection is the client's
//! live one: after a takeover, the new connection owns them, and the old
//! one's late actions must not undo its work.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_channel::mpsc;
use futures_util::StreamExt;
use rill_edge_bridge::mqtt::session::{Action, Append, Delivery, DeliveryKind};
use rill_edge_bridge::mqtt::subscriptions::IndexFull;
use rill_edge_bridge::mqtt::topic::parse_shared;

use super::delivery::{self, PartitionKey, ReaderSet, Start};
use super::publish::{self, Record};
use super::{Client, PendingWill, Work, lock, now_ms};
use crate::broker::Shared;
use crate::broker::connection::{Answer, Outgoing, queue_answer};
use crate::broker::errors::OpError;
use crate::broker::topics::TopicView;

/// How far before a session was last known alive a cursor-less partition
/// is read from on resume: what its reader had not reached yet.
const RESUME_MARGIN_MS: u64 = 2_000;

/// PUBLISHes appended together at most (one read's worth, usually).
const RUN_RECORDS_MAX: usize = 512;
/// Bytes of records in one batch at most (and at most the topic's
/// `batch_bytes_max`).
const RUN_BYTES_MAX: usize = 256 * 1024;

pub(crate) struct Executor {
    shared: Arc<Shared>,
    client: Arc<Client>,
    writer: mpsc::UnboundedSender<Answer>,
    peer: SocketAddr,
    client_id: String,
    view: TopicView,
    next_partition: Rc<Cell<u32>>,
    readers: ReaderSet,
    /// The session's filters in the index, as subscribed.
    filters: BTreeSet<String>,
    /// When a resumed session's records start (module documentation of
    /// `delivery`).
    resume_from_ms: u64,
    opened: bool,
}

impl Executor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        client: Arc<Client>,
        writer: mpsc::UnboundedSender<Answer>,
        peer: SocketAddr,
    ) -> Executor {
        let view = shared.topics.snapshot();
        Executor {
            shared,
            client,
            writer,
            peer,
            client_id: String::new(),
            view,
            next_partition: Rc::new(Cell::new(0)),
            readers: Rc::new(RefCell::new(delivery::Readers::default())),
            filters: BTreeSet::new(),
            resume_from_ms: now_ms(),
            opened: false,
        }
    }

    pub(crate) async fn run(mut self, mut work: mpsc::UnboundedReceiver<Work>) {
        let mut discover_at = std::time::Instant::now();
        let mut next: Option<Work> = None;
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => match work.next().await {
                    Some(item) => item,
                    None => break,
                },
            };
            match item {
                Work::Bytes(bytes, count) => {
                    self.shared
                        .mqtt
                        .stats
                        .messages_sent
                        .fetch_add(count, Ordering::Relaxed);
                    queue_answer(
                        &self.writer,
                        &self.shared.buffers,
                        Outgoing::Frame(bytes),
                        false,
                    );
                }
                Work::Action(action) => match *action {
                    Action::Close { reason_code } => {
                        self.close(reason_code);
                        break;
                    }
                    Action::Append(append) => {
                        // The appends already queued behind this one (the
                        // rest of what one read decoded) go to the log
                        // together: one batch per run of records bound for
                        // the same partition.
                        let mut run = vec![append];
                        while run.len() < RUN_RECORDS_MAX {
                            match work.try_recv() {
                                Ok(Work::Action(action)) => match *action {
                                    Action::Append(append) => run.push(append),
                                    other => {
                                        next = Some(Work::Action(Box::new(other)));
                                        break;
                                    }
                                },
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                // Nothing more queued, or the channel closed
                                // (seen again on the next `next()`).
                                _ => break,
                            }
                        }
                        self.append_run(run).await;
                    }
                    action => self.carry_out(action).await,
                },
                Work::Discover => {
                    if discover_at.elapsed() >= std::time::Duration::from_millis(900) {
                        discover_at = std::time::Instant::now();
                        self.discover().await;
                    }
                }
            }
        }
        self.readers.borrow_mut().stop_all();
    }

    fn state(&self) -> &super::MqttState {
        &self.shared.mqtt
    }

    fn is_owner(&self) -> bool {
        !self.client_id.is_empty() && self.state().is_owner(&self.client_id, &self.client)
    }

    async fn carry_out(&mut self, action: Action) {
        let now = now_ms();
        match action {
            Action::Send(_) => debug_assert!(false, "packets arrive encoded"),
            Action::OpenSession {
                client_id,
                clean_start,
            } => self.open_session(client_id, clean_start, now).await,
            Action::Append(append) => self.append_run(vec![append]).await,
            Action::Subscribe {
                packet_id,
                subscriptions,
            } => {
                let results: Vec<Result<(), IndexFull>> = if self.is_owner() {
                    let mut index = lock(&self.state().index);
                    subscriptions
                        .iter()
                        .map(|(filter, entry)| {
                            index.subscribe(&self.client_id, filter, *entry).map(|_| ())
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let mut added = Vec::new();
                for ((filter, _), result) in subscriptions.iter().zip(&results) {
                    if result.is_ok() && self.filters.insert(filter.clone()) {
                        added.push(filter.clone());
                    }
                }
                for filter in &added {
                    if let Ok(Some(shared)) = parse_shared(filter) {
                        super::share::ensure_group(&self.shared, shared.group, shared.filter).await;
                    }
                }
                // Restored subscriptions are read from the session's
                // cursors (ResumeDeliveries follows); new ones from now on,
                // fixed before the SUBACK goes out.
                if packet_id.is_some() {
                    self.start_readers(&added, |_| Start::Latest).await;
                }
                self.client
                    .step(|machine| machine.handle_subscribe_result(packet_id, results, now));
            }
            Action::Unsubscribe { filter } => {
                if self.is_owner() {
                    lock(&self.state().index).unsubscribe(&self.client_id, &filter);
                }
                self.filters.remove(&filter);
                let needed = self.source_partitions(&self.filters);
                self.readers
                    .borrow_mut()
                    .running
                    .retain(|key, _| needed.contains(key));
            }
            Action::SendRetained {
                filter,
                qos,
                subscription_identifier,
            } => {
                for message in self.state().retained_for(&filter, now) {
                    self.client.deliver(Delivery {
                        message,
                        qos,
                        subscription_identifiers: subscription_identifier.into_iter().collect(),
                        retain_as_published: true,
                        kind: DeliveryKind::Retained,
                        position: None,
                    });
                }
            }
            Action::ResumeDeliveries { cursors } => {
                {
                    let mut readers = self.readers.borrow_mut();
                    readers.stop_all();
                    readers.paused = false;
                }
                let since = self.resume_from_ms.saturating_sub(RESUME_MARGIN_MS) as i64;
                let filters: Vec<String> = self.filters.iter().cloned().collect();
                self.start_readers(&filters, |key| {
                    cursors
                        .iter()
                        .find(|cursor| cursor.topic == key.0 && cursor.partition == key.1)
                        .map_or(Start::Since(since), |cursor| {
                            Start::At(i64::try_from(cursor.next_offset).unwrap_or(i64::MAX))
                        })
                })
                .await;
            }
            Action::PauseDeliveries => {
                let mut readers = self.readers.borrow_mut();
                readers.stop_all();
                readers.paused = true;
                self.resume_from_ms = now;
            }
            Action::SetWill { will, delay_ms: _ } => {
                if self.is_owner() {
                    lock(&self.state().wills).insert(
                        self.client_id.clone(),
                        PendingWill {
                            connection_id: self.client.connection_id,
                            will,
                            publish_at_ms: None,
                        },
                    );
                }
            }
            Action::ClearWill => {
                let mut wills = lock(&self.state().wills);
                if wills
                    .get(&self.client_id)
                    .is_some_and(|will| will.connection_id == self.client.connection_id)
                {
                    wills.remove(&self.client_id);
                }
            }
            Action::PublishWill { delay_ms } => {
                let due = self.state().schedule_will(
                    &self.client_id,
                    self.client.connection_id,
                    delay_ms,
                    now,
                );
                if let Some(will) = due {
                    crate::io::home::spawn(publish::publish_will(
                        self.shared.clone(),
                        self.client_id.clone(),
                        will,
                    ))
                    .detach();
                }
            }
            Action::PersistSession(session) => {
                if self.is_owner() {
                    let kept = {
                        let state = self.state();
                        let mut sessions = lock(&state.sessions);
                        state.store_session(&mut sessions, &self.client_id, session)
                    };
                    if kept {
                        self.sync_session().await;
                    }
                }
            }
            Action::EndSession => {
                if self.is_owner() {
                    let removed = lock(&self.state().sessions)
                        .stored
                        .remove(&self.client_id)
                        .is_some();
                    if removed {
                        self.sync_session().await;
                    }
                }
            }
            Action::Close { reason_code } => self.close(reason_code),
        }
    }

    async fn open_session(&mut self, client_id: String, clean_start: bool, now: u64) {
        self.client_id = client_id;
        let (stored, due) =
            self.state()
                .open_session(&self.client, &self.client_id, clean_start, now);
        for (client_id, will) in due {
            crate::io::home::spawn(publish::publish_will(self.shared.clone(), client_id, will))
                .detach();
        }
        if let Some(stored) = &stored {
            self.resume_from_ms = stored.saved_at_ms;
        }
        // The store now holds what the takeover left, or nothing after a
        // clean start: the file follows before the session goes on.
        self.sync_session().await;
        tracing::debug!(peer = %self.peer, client_id = %self.client_id, resumed = stored.is_some(), "MQTT session opened");
        self.client
            .step(|machine| machine.handle_session_opened(stored, now));
        self.opened = true;
        self.client.mark_opened();
    }

    /// Appends a run of PUBLISHes in order: retained messages set in
    /// PUBLISH order, consecutive records for the same partition (and
    /// durability) as one batch, each batch queued at its shard before the
    /// next; then, as the shards answer, every PUBLISH's result goes back to
    /// the session machine in order.
    async fn append_run(&mut self, appends: Vec<Append>) {
        let stats = &self.shared.mqtt.stats;
        stats
            .publishes_received
            .fetch_add(appends.len() as u64, Ordering::Relaxed);
        let mut routes = Vec::with_capacity(appends.len());
        let mut tokens = Vec::with_capacity(appends.len());
        for append in &appends {
            // Set in PUBLISH order, so the last retained PUBLISH wins.
            let retained_topic = append.retain.as_ref().and_then(|message| {
                publish::retain(self.state(), message.clone()).then(|| message.topic.clone())
            });
            tokens.push((append.token, retained_topic));
            routes.push(
                publish::route(
                    &self.shared,
                    &mut self.view,
                    &self.next_partition,
                    &append.topic,
                    append.key.as_deref(),
                )
                .await,
            );
        }
        let mut groups: Vec<(Result<publish::PendingAppend, OpError>, usize)> = Vec::new();
        let mut start = 0;
        while start < appends.len() {
            let partition = match &routes[start] {
                Ok(partition) => *partition,
                Err(error) => {
                    groups.push((Err(error.clone()), 1));
                    start += 1;
                    continue;
                }
            };
            let head = &appends[start];
            let bytes_max = self
                .view
                .table
                .get(&head.topic)
                .map_or(RUN_BYTES_MAX, |meta| {
                    RUN_BYTES_MAX
                        .min(usize::try_from(meta.settings.batch_bytes_max).unwrap_or(usize::MAX))
                });
            let mut bytes = record_of(head).batch_bytes();
            let mut end = start + 1;
            while let Some(append) = appends.get(end) {
                let size = record_of(append).batch_bytes();
                if append.topic != head.topic
                    || append.durable != head.durable
                    || routes[end].as_ref().ok() != Some(&partition)
                    || bytes + size > bytes_max
                {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let records: Vec<Record<'_>> = appends[start..end].iter().map(record_of).collect();
            let pending = publish::batch(&records, crate::broker::now_ms()).and_then(|batch| {
                publish::send(&self.shared, &head.topic, partition, head.durable, batch)
            });
            groups.push((pending, end - start));
            start = end;
        }
        drop(appends);
        let shared = self.shared.clone();
        let client = self.client.clone();
        crate::io::home::spawn(async move {
            let mut tokens = tokens.into_iter();
            for (pending, count) in groups {
                let result = publish::finish(pending).await;
                if result.is_err() {
                    shared
                        .mqtt
                        .stats
                        .append_failures
                        .fetch_add(count as u64, Ordering::Relaxed);
                }
                let group: Vec<(u64, Option<String>)> = tokens.by_ref().take(count).collect();
                for (_, retained_topic) in &group {
                    if let Some(topic) = retained_topic {
                        publish::sync_retained(&shared, topic.clone()).await;
                    }
                }
                let now = now_ms();
                client.step_with(|machine, push| {
                    for (token, _) in group {
                        for action in machine.handle_append_result(token, result, now) {
                            push(action);
                        }
                    }
                });
            }
        })
        .detach();
    }

    fn close(&mut self, reason_code: u8) {
        tracing::debug!(peer = %self.peer, client_id = %self.client_id, reason_code, "MQTT connection closing");
        if !self.client_id.is_empty() {
            let state = &self.shared.mqtt;
            let mut sessions = lock(&state.sessions);
            let owner = sessions
                .live
                .get(&self.client_id)
                .is_some_and(|live| Arc::ptr_eq(live, &self.client));
            if owner {
                sessions.live.remove(&self.client_id);
                lock(&state.index).remove_client(&self.client_id);
            }
        }
        self.readers.borrow_mut().stop_all();
        self.client.fire_close();
    }

    /// Writes this client's stored session (or its absence) to disk.
    async fn sync_session(&self) {
        let shared = self.shared.clone();
        let client_id = self.client_id.clone();
        let result =
            compio::runtime::spawn_blocking(move || shared.mqtt.sync_session(&client_id)).await;
        if let Ok(Err(error)) = result {
            tracing::error!(client_id = %self.client_id, %error, "writing an MQTT session failed; it is kept in memory only");
        }
    }

    /// The partitions of the Rill topics that ordinary `filters` draw
    /// from, as the topic table has them now.
    fn source_partitions<'f>(
        &self,
        filters: impl IntoIterator<Item = &'f String>,
    ) -> BTreeSet<PartitionKey> {
        let view = self.shared.topics.snapshot();
        let mapping = &self.state().context.mapping;
        let mut keys = BTreeSet::new();
        for filter in filters {
            if !matches!(parse_shared(filter), Ok(None)) {
                continue;
            }
            for topic in mapping.source_topics(filter) {
                if let Some(meta) = view.table.get(topic) {
                    keys.extend(
                        (0..meta.partitions).map(|partition| (topic.to_owned(), partition)),
                    );
                }
            }
        }
        keys
    }

    /// Starts readers for the source partitions of `filters` that have
    /// none, each from where `start` says.
    async fn start_readers(&self, filters: &[String], start: impl Fn(&PartitionKey) -> Start) {
        for key in self.source_partitions(filters) {
            if self.readers.borrow().running.contains_key(&key) {
                continue;
            }
            let offset = match delivery::resolve(&self.shared, &key, start(&key)).await {
                Ok(offset) => offset,
                Err(error) => {
                    tracing::warn!(topic = %key.0, partition = key.1, %error, "MQTT delivery cannot find where to start; starting at the end");
                    match delivery::resolve(&self.shared, &key, Start::Latest).await {
                        Ok(offset) => offset,
                        Err(_) => continue,
                    }
                }
            };
            delivery::spawn_reader(
                self.shared.clone(),
                self.client.clone(),
                self.readers.clone(),
                key,
                offset,
            );
        }
    }

    /// Reads partitions that appeared since the readers started (a topic
    /// created by its first publish, partitions added) from their start.
    async fn discover(&mut self) {
        if !self.opened || self.readers.borrow().paused || self.filters.is_empty() {
            return;
        }
        let filters: Vec<String> = self.filters.iter().cloned().collect();
        self.start_readers(&filters, |_| Start::At(0)).await;
    }
}

/// The record an append writes.
fn record_of(append: &Append) -> Record<'_> {
    Record {
        topic: &append.topic,
        key: append.key.as_deref(),
        headers: &append.headers,
        value: &append.value,
        durable: append.durable,
    }
}
