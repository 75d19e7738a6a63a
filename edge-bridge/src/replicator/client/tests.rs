//! The client against a fake broker that decodes every request and
//! answers as a Kafka broker would (idempotent producer state included),
//! with the network in the test's hands: answers can be dropped,
//! connections cut, errors injected.

use std::collections::{BTreeMap, VecDeque};

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::fetch_response::FetchableTopicResponse;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{
    Decodable, Encodable, HeaderVersion, StrBytes, decode_request_header_from_buffer,
};
use rill_core::batch::{BatchHeader, check_batch};

use super::*;
use crate::replicator::batch::{
    BatchBuilder, BatchLimits, Compression, Provenance, SourceRecord, last_provenance,
    split_batches,
};

const ADDRESS: (&str, u16) = ("central", 9092);

#[derive(Default)]
struct ProducerState {
    next_sequence: i32,
    /// Recent batches: base sequence to base offset.
    recent: VecDeque<(i32, i64)>,
}

#[derive(Default)]
struct FakeBroker {
    /// Topic to partitions to stored batches.
    topics: BTreeMap<String, Vec<Vec<Vec<u8>>>>,
    producers: BTreeMap<(i64, String, i32), ProducerState>,
    next_producer_id: i64,
    /// Error codes to answer the next produces of a partition with.
    inject: BTreeMap<(String, i32), VecDeque<i16>>,
    produce_max_version: i16,
    sasl_plain: Option<(String, String)>,
    /// Every request seen: (api key, version).
    seen: Vec<(i16, i16)>,
    /// Base sequences of produced batches, as received.
    sequences: Vec<i32>,
}

fn frame<R: Encodable + HeaderVersion>(
    correlation_id: i32,
    body: &R,
    version: i16,
    api: ApiKey,
) -> Bytes {
    let mut out = BytesMut::new();
    out.extend_from_slice(&[0; 4]);
    let header_version = if api == ApiKey::ApiVersions {
        0
    } else {
        R::header_version(version)
    };
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut out, header_version)
        .expect("header encodes");
    body.encode(&mut out, version).expect("body encodes");
    let size = (out.len() - 4) as i32;
    out[0..4].copy_from_slice(&size.to_be_bytes());
    out.freeze()
}

impl FakeBroker {
    fn new() -> FakeBroker {
        FakeBroker {
            next_producer_id: 1000,
            produce_max_version: 10,
            ..FakeBroker::default()
        }
    }

    fn log_end(&self, topic: &str, partition: usize) -> i64 {
        self.topics[topic][partition]
            .iter()
            .map(|b| i64::from(BatchHeader::parse(b).expect("batch").record_count))
            .sum()
    }

    fn answer(&mut self, mut request: Bytes) -> Bytes {
        request.advance(4);
        let header = decode_request_header_from_buffer(&mut request).expect("request header");
        let version = header.request_api_version;
        let api = ApiKey::try_from(header.request_api_key).expect("known API");
        let cid = header.correlation_id;
        self.seen.push((header.request_api_key, version));
        match api {
            ApiKey::ApiVersions => {
                let keys = [
                    (ApiKey::Produce, 3, self.produce_max_version),
                    (ApiKey::Fetch, 4, 12),
                    (ApiKey::ListOffsets, 1, 6),
                    (ApiKey::Metadata, 0, 12),
                    (ApiKey::ApiVersions, 0, 3),
                    (ApiKey::CreateTopics, 2, 7),
                    (ApiKey::InitProducerId, 0, 4),
                    (ApiKey::SaslHandshake, 0, 1),
                    (ApiKey::SaslAuthenticate, 0, 2),
                ];
                let body = ApiVersionsResponse::default().with_api_keys(
                    keys.iter()
                        .map(|&(key, min, max)| {
                            ApiVersion::default()
                                .with_api_key(key as i16)
                                .with_min_version(min)
                                .with_max_version(max)
                        })
                        .collect(),
                );
                frame(cid, &body, version, api)
            }
            ApiKey::SaslHandshake => {
                let request = SaslHandshakeRequest::decode(&mut request, version).expect("decodes");
                let code = if request.mechanism.as_str() == "PLAIN" {
                    0
                } else {
                    33
                };
                let body = SaslHandshakeResponse::default()
                    .with_error_code(code)
                    .with_mechanisms(vec![StrBytes::from_static_str("PLAIN")]);
                frame(cid, &body, version, api)
            }
            ApiKey::SaslAuthenticate => {
                let request =
                    SaslAuthenticateRequest::decode(&mut request, version).expect("decodes");
                let (user, password) = self.sasl_plain.clone().expect("SASL configured");
                let expected = sasl::plain_message(&user, &password);
                let code = if request.auth_bytes[..] == expected[..] {
                    0
                } else {
                    58
                };
                let body = SaslAuthenticateResponse::default()
                    .with_error_code(code)
                    .with_error_message(
                        (code != 0).then(|| StrBytes::from_static_str("bad password")),
                    );
                frame(cid, &body, version, api)
            }
            ApiKey::Metadata => {
                let request = MetadataRequest::decode(&mut request, version).expect("decodes");
                let topics = request
                    .topics
                    .unwrap_or_default()
                    .into_iter()
                    .map(|topic| {
                        let name = topic.name.expect("by name");
                        match self.topics.get(name.0.as_str()) {
                            None => MetadataResponseTopic::default()
                                .with_name(Some(name))
                                .with_error_code(3),
                            Some(partitions) => MetadataResponseTopic::default()
                                .with_name(Some(name))
                                .with_partitions(
                                    (0..partitions.len())
                                        .map(|index| {
                                            MetadataResponsePartition::default()
                                                .with_partition_index(index as i32)
                                                .with_leader_id(BrokerId(1))
                                        })
                                        .collect(),
                                ),
                        }
                    })
                    .collect();
                let body = MetadataResponse::default()
                    .with_brokers(vec![
                        MetadataResponseBroker::default()
                            .with_node_id(BrokerId(1))
                            .with_host(StrBytes::from_static_str(ADDRESS.0))
                            .with_port(i32::from(ADDRESS.1)),
                    ])
                    .with_topics(topics);
                frame(cid, &body, version, api)
            }
            ApiKey::CreateTopics => {
                let request = CreateTopicsRequest::decode(&mut request, version).expect("decodes");
                let results = request
                    .topics
                    .into_iter()
                    .map(|topic| {
                        let count = if topic.num_partitions > 0 {
                            topic.num_partitions
                        } else {
                            1
                        };
                        self.topics
                            .entry(topic.name.0.to_string())
                            .or_insert_with(|| vec![Vec::new(); count as usize]);
                        CreatableTopicResult::default().with_name(topic.name)
                    })
                    .collect();
                let body = CreateTopicsResponse::default().with_topics(results);
                frame(cid, &body, version, api)
            }
            ApiKey::InitProducerId => {
                self.next_producer_id += 1;
                let body = InitProducerIdResponse::default()
                    .with_producer_id(ProducerId(self.next_producer_id))
                    .with_producer_epoch(0);
                frame(cid, &body, version, api)
            }
            ApiKey::Produce => {
                let request = ProduceRequest::decode(&mut request, version).expect("decodes");
                assert_eq!(request.acks, -1, "acks=all");
                let mut responses = Vec::new();
                for topic in request.topic_data {
                    let name = topic.name.0.to_string();
                    let mut partitions = Vec::new();
                    for data in topic.partition_data {
                        let batch = data.records.expect("records").to_vec();
                        let (code, offset) = self.append(&name, data.index, batch);
                        partitions.push(
                            PartitionProduceResponse::default()
                                .with_index(data.index)
                                .with_error_code(code)
                                .with_base_offset(offset),
                        );
                    }
                    responses.push(
                        TopicProduceResponse::default()
                            .with_name(topic.name)
                            .with_partition_responses(partitions),
                    );
                }
                frame(
                    cid,
                    &ProduceResponse::default().with_responses(responses),
                    version,
                    api,
                )
            }
            ApiKey::Fetch => {
                let request = FetchRequest::decode(&mut request, version).expect("decodes");
                let topic = &request.topics[0];
                let partition = &topic.partitions[0];
                let name = topic.topic.0.to_string();
                let mut records = Vec::new();
                let mut start = 0i64;
                for batch in &self.topics[&name][partition.partition as usize] {
                    let count = i64::from(BatchHeader::parse(batch).expect("batch").record_count);
                    if start + count > partition.fetch_offset {
                        records.extend_from_slice(batch);
                    }
                    start += count;
                }
                let body = FetchResponse::default().with_responses(vec![
                    FetchableTopicResponse::default()
                        .with_topic(topic.topic.clone())
                        .with_partitions(vec![
                            fetch_response::PartitionData::default()
                                .with_partition_index(partition.partition)
                                .with_high_watermark(start)
                                .with_records(Some(Bytes::from(records))),
                        ]),
                ]);
                frame(cid, &body, version, api)
            }
            ApiKey::ListOffsets => {
                let request = ListOffsetsRequest::decode(&mut request, version).expect("decodes");
                let topic = &request.topics[0];
                let partition = &topic.partitions[0];
                let offset = if partition.timestamp == -1 {
                    self.log_end(topic.name.0.as_str(), partition.partition_index as usize)
                } else {
                    0
                };
                let body = ListOffsetsResponse::default().with_topics(vec![
                    ListOffsetsTopicResponse::default()
                        .with_name(topic.name.clone())
                        .with_partitions(vec![
                            ListOffsetsPartitionResponse::default()
                                .with_partition_index(partition.partition_index)
                                .with_offset(offset),
                        ]),
                ]);
                frame(cid, &body, version, api)
            }
            other => panic!("unexpected request {other:?}"),
        }
    }

    /// Appends as an idempotent Kafka partition does.
    fn append(&mut self, topic: &str, partition: i32, mut batch: Vec<u8>) -> (i16, i64) {
        let header = check_batch(&batch).expect("a valid batch");
        self.sequences.push(header.base_sequence);
        if let Some(code) = self
            .inject
            .get_mut(&(topic.to_owned(), partition))
            .and_then(VecDeque::pop_front)
        {
            return (code, -1);
        }
        let end = self.log_end(topic, partition as usize);
        let key = (header.producer_id, topic.to_owned(), partition);
        if !self.producers.contains_key(&key) {
            if header.base_sequence != 0 {
                return (59, -1); // UNKNOWN_PRODUCER_ID
            }
            self.producers.insert(key.clone(), ProducerState::default());
        }
        let state = self.producers.get_mut(&key).expect("inserted");
        if let Some(&(_, offset)) = state
            .recent
            .iter()
            .find(|(sequence, _)| *sequence == header.base_sequence)
        {
            return (0, offset); // a resent duplicate: not written again
        }
        if header.base_sequence != state.next_sequence {
            return (45, -1); // OUT_OF_ORDER_SEQUENCE_NUMBER
        }
        state.next_sequence += header.record_count;
        state.recent.push_back((header.base_sequence, end));
        if state.recent.len() > 5 {
            state.recent.pop_front();
        }
        batch[0..8].copy_from_slice(&end.to_be_bytes());
        self.topics.get_mut(topic).expect("topic")[partition as usize].push(batch);
        (0, end)
    }
}

/// The client, the fake broker and the wire between them.
struct Harness {
    client: Client,
    broker: FakeBroker,
    now_ms: u64,
    /// Open connections.
    open: Vec<ConnectionId>,
    /// Answers on their way to the client.
    inbound: VecDeque<(ConnectionId, Bytes)>,
    events: Vec<Action>,
    /// When set, requests reach the broker but its answers are lost.
    drop_answers: bool,
    /// Answers let through before `drop_answers` applies to the rest.
    answers_before_drop: usize,
}

fn config() -> ClientConfig {
    ClientConfig {
        bootstrap: vec![BrokerAddress {
            host: ADDRESS.0.into(),
            port: ADDRESS.1,
        }],
        create_topics: Some(TopicCreation {
            partitions: 2,
            replication_factor: -1,
        }),
        backoff: Backoff {
            initial_ms: 10,
            max_ms: 100,
            jitter_percent: 0,
        },
        ..ClientConfig::default()
    }
}

impl Harness {
    fn new(config: ClientConfig, broker: FakeBroker) -> Harness {
        let client = Client::new(config, [7; 32], 0).expect("valid config");
        let mut harness = Harness {
            client,
            broker,
            now_ms: 0,
            open: Vec::new(),
            inbound: VecDeque::new(),
            events: Vec::new(),
            drop_answers: false,
            answers_before_drop: 0,
        };
        harness.client.set_topics(["edge.gps".to_owned()], 0);
        harness
    }

    /// Runs the wire until nothing moves.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if let Some(action) = self.client.next_action() {
                match action {
                    Action::Connect {
                        connection,
                        address,
                    } => {
                        assert_eq!((address.host.as_str(), address.port), ADDRESS);
                        self.open.push(connection);
                        self.client.handle_connected(connection, self.now_ms);
                    }
                    Action::Send { connection, bytes } => {
                        assert!(
                            self.open.contains(&connection),
                            "send on an open connection"
                        );
                        let answer = self.broker.answer(bytes);
                        let let_through = self.answers_before_drop > 0;
                        self.answers_before_drop = self.answers_before_drop.saturating_sub(1);
                        if !self.drop_answers || let_through {
                            self.inbound.push_back((connection, answer));
                        }
                    }
                    Action::Close { connection } => self.open.retain(|&c| c != connection),
                    event => self.events.push(event),
                }
                continue;
            }
            if let Some((connection, bytes)) = self.inbound.pop_front() {
                if self.open.contains(&connection) {
                    // Byte by byte for the first few, to exercise framing.
                    let (head, tail) = bytes.split_at(bytes.len().min(3));
                    self.client.handle_received(connection, head, self.now_ms);
                    self.client.handle_received(connection, tail, self.now_ms);
                }
                continue;
            }
            return;
        }
        panic!("the wire did not settle");
    }

    /// Advances time in ticks, settling after each.
    fn advance(&mut self, ms: u64) {
        for _ in 0..ms.div_ceil(10) {
            self.now_ms += 10;
            self.client.handle_tick(self.now_ms);
            self.settle();
        }
    }

    fn cut_all(&mut self) {
        for connection in std::mem::take(&mut self.open) {
            self.client.handle_disconnected(connection, self.now_ms);
        }
        self.inbound.clear();
    }

    fn take_events(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.events)
    }
}

fn partition(index: u32) -> TopicPartition {
    TopicPartition::new("edge.gps", index)
}

fn batch(offsets: std::ops::Range<u64>) -> Vec<u8> {
    let mut builder = BatchBuilder::new(Compression::Snappy, BatchLimits::default());
    for offset in offsets {
        let record = SourceRecord {
            offset,
            timestamp_ms: 0,
            key: None,
            value: Some(b"reading"),
            headers: vec![],
        };
        let provenance = Provenance {
            edge_id: "edge".into(),
            topic: "gps".into(),
            partition: 0,
            offset,
        };
        builder.push(&record, &provenance, 0).expect("fits");
    }
    builder.finish().expect("compresses").bytes
}

fn ready_harness() -> Harness {
    let mut harness = Harness::new(config(), FakeBroker::new());
    harness.settle();
    let events = harness.take_events();
    assert!(events.contains(&Action::TopicReady {
        topic: "edge.gps".into(),
        partitions: 2
    }));
    assert!(events.contains(&Action::ProducerReady {
        producer_id: 1001,
        producer_epoch: 0
    }));
    harness
}

fn acknowledged(events: &[Action]) -> Vec<(u64, Option<i64>)> {
    events
        .iter()
        .filter_map(|event| match event {
            Action::Acknowledged {
                token, base_offset, ..
            } => Some((*token, *base_offset)),
            _ => None,
        })
        .collect()
}

#[test]
fn negotiates_the_highest_common_version_and_creates_the_topic() {
    let mut harness = ready_harness();
    // The topic was missing: created, then its metadata fetched again.
    assert!(
        harness
            .broker
            .seen
            .contains(&(ApiKey::CreateTopics as i16, 7))
    );
    assert_eq!(harness.broker.topics["edge.gps"].len(), 2);
    harness
        .client
        .produce(partition(0), 1, batch(0..3), harness.now_ms)
        .expect("queued");
    harness.settle();
    // Produce: ours go to 12, the broker's to 10.
    assert!(harness.broker.seen.contains(&(ApiKey::Produce as i16, 10)));
    assert!(harness.broker.seen.contains(&(ApiKey::Metadata as i16, 12)));
    assert_eq!(acknowledged(&harness.take_events()), vec![(1, Some(0))]);
}

#[test]
fn sequence_numbers_follow_records_per_partition() {
    let mut harness = ready_harness();
    for (token, offsets) in [(1, 0..3), (2, 3..8), (3, 8..9)] {
        harness
            .client
            .produce(partition(0), token, batch(offsets), harness.now_ms)
            .expect("queued");
    }
    harness
        .client
        .produce(partition(1), 4, batch(0..2), harness.now_ms)
        .expect("queued");
    harness.settle();
    let mut acks = acknowledged(&harness.take_events());
    acks.sort_unstable();
    assert_eq!(
        acks,
        vec![(1, Some(0)), (2, Some(3)), (3, Some(8)), (4, Some(0))]
    );
    let mut sequences = harness.broker.sequences.clone();
    sequences.sort_unstable();
    assert_eq!(sequences, vec![0, 0, 3, 8]);
}

#[test]
fn a_lost_answer_is_resent_with_the_same_sequence_and_deduplicated() {
    let mut harness = ready_harness();
    harness
        .client
        .produce(partition(0), 1, batch(0..4), harness.now_ms)
        .expect("queued");
    harness.settle();
    harness.take_events();
    // The next batch reaches the broker, its answer is lost, the link drops.
    harness.drop_answers = true;
    harness
        .client
        .produce(partition(0), 2, batch(4..6), harness.now_ms)
        .expect("queued");
    harness.settle();
    harness.drop_answers = false;
    harness.cut_all();
    harness.advance(200);
    let events = harness.take_events();
    assert_eq!(acknowledged(&events), vec![(2, Some(4))]);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Action::SessionReset { .. }))
    );
    // Sent twice with the same sequence, written once.
    assert_eq!(harness.broker.sequences, vec![0, 4, 4]);
    assert_eq!(harness.broker.topics["edge.gps"][0].len(), 2);
    assert_eq!(harness.broker.log_end("edge.gps", 0), 6);
}

#[test]
fn not_leader_refreshes_metadata_and_retries() {
    let mut harness = ready_harness();
    harness
        .broker
        .inject
        .insert(("edge.gps".into(), 0), VecDeque::from([6, 7]));
    let metadata_before = harness
        .broker
        .seen
        .iter()
        .filter(|(api, _)| *api == ApiKey::Metadata as i16)
        .count();
    harness
        .client
        .produce(partition(0), 9, batch(0..2), harness.now_ms)
        .expect("queued");
    harness.settle();
    assert!(acknowledged(&harness.take_events()).is_empty());
    harness.advance(500);
    assert_eq!(acknowledged(&harness.take_events()), vec![(9, Some(0))]);
    let metadata_after = harness
        .broker
        .seen
        .iter()
        .filter(|(api, _)| *api == ApiKey::Metadata as i16)
        .count();
    assert!(metadata_after > metadata_before);
    assert_eq!(harness.broker.sequences, vec![0, 0, 0]);
}

#[test]
fn unknown_producer_id_resets_the_session() {
    let mut harness = ready_harness();
    harness
        .client
        .produce(partition(0), 1, batch(0..2), harness.now_ms)
        .expect("queued");
    harness.settle();
    harness.take_events();
    // The broker forgets producer state (a long outage expires it).
    harness.broker.producers.clear();
    harness
        .client
        .produce(partition(0), 2, batch(2..4), harness.now_ms)
        .expect("queued");
    harness.settle();
    let events = harness.take_events();
    assert!(events.contains(&Action::SessionReset {
        dropped: vec![(partition(0), 2)]
    }));
    assert!(events.contains(&Action::ProducerReady {
        producer_id: 1002,
        producer_epoch: 0
    }));
    assert_eq!(harness.client.producer(), Some((1002, 0)));
    // The new session starts its sequences at zero.
    harness
        .client
        .produce(partition(0), 3, batch(2..4), harness.now_ms)
        .expect("queued");
    harness.settle();
    assert_eq!(acknowledged(&harness.take_events()), vec![(3, Some(2))]);
    assert_eq!(harness.broker.sequences.last(), Some(&0));
}

#[test]
fn a_refused_batch_stops_its_partition() {
    let mut harness = ready_harness();
    harness
        .broker
        .inject
        .insert(("edge.gps".into(), 1), VecDeque::from([10]));
    harness
        .client
        .produce(partition(1), 5, batch(0..2), harness.now_ms)
        .expect("queued");
    harness.settle();
    assert!(harness.take_events().contains(&Action::Refused {
        partition: partition(1),
        token: 5,
        code: 10
    }));
    assert_eq!(
        harness
            .client
            .produce(partition(1), 6, batch(2..3), harness.now_ms),
        Err(ProduceError::PartitionStopped)
    );
}

#[test]
fn missing_topic_without_creation_is_a_clear_error() {
    let config = ClientConfig {
        create_topics: None,
        ..config()
    };
    let mut harness = Harness::new(config, FakeBroker::new());
    harness.settle();
    assert!(harness.take_events().contains(&Action::TopicFailed {
        topic: "edge.gps".into(),
        error: TopicError::Missing
    }));
}

#[test]
fn plain_authentication_succeeds_and_a_wrong_password_fails() {
    let sasl = |password: &str| ClientConfig {
        sasl: Some(SaslConfig {
            mechanism: SaslMechanism::Plain,
            username: "edge".into(),
            password: password.into(),
        }),
        ..config()
    };
    let broker = || FakeBroker {
        sasl_plain: Some(("edge".into(), "s3cret".into())),
        ..FakeBroker::new()
    };
    let mut harness = Harness::new(sasl("s3cret"), broker());
    harness.settle();
    assert!(
        harness
            .take_events()
            .iter()
            .any(|e| matches!(e, Action::ProducerReady { .. }))
    );
    let mut harness = Harness::new(sasl("wrong"), broker());
    harness.settle();
    let events = harness.take_events();
    assert!(events.iter().any(|e| matches!(
        e,
        Action::ConnectionFailed {
            error: ClientError::Authentication(_),
            ..
        }
    )));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Action::ProducerReady { .. }))
    );
}

#[test]
fn the_tail_is_listed_and_fetched_with_its_provenance() {
    let mut harness = ready_harness();
    harness
        .client
        .produce(partition(0), 1, batch(0..3), harness.now_ms)
        .expect("queued");
    harness
        .client
        .produce(partition(0), 2, batch(3..7), harness.now_ms)
        .expect("queued");
    harness.settle();
    harness.take_events();
    harness
        .client
        .list_offsets(partition(0), 40, harness.now_ms);
    harness.settle();
    assert_eq!(
        harness.take_events(),
        vec![Action::OffsetsListed {
            partition: partition(0),
            token: 40,
            log_start_offset: 0,
            high_watermark: 7
        }]
    );
    harness
        .client
        .fetch(partition(0), 41, 3, 1 << 20, harness.now_ms);
    harness.settle();
    let events = harness.take_events();
    let [
        Action::Fetched {
            outcome:
                FetchOutcome::Records {
                    high_watermark: 7,
                    records,
                    ..
                },
            ..
        },
    ] = &events[..]
    else {
        panic!("one fetch answer: {events:?}");
    };
    let last = split_batches(records)
        .last()
        .expect("a batch")
        .expect("whole");
    let provenance = last_provenance(last, 1 << 20)
        .expect("valid")
        .expect("ours");
    assert_eq!(provenance.offset, 6);
}

#[test]
fn an_unanswered_request_times_out_and_is_resent() {
    let mut harness = ready_harness();
    harness.drop_answers = true;
    harness
        .client
        .produce(partition(0), 1, batch(0..2), harness.now_ms)
        .expect("queued");
    harness.settle();
    harness.drop_answers = false;
    harness.advance(30_100);
    let events = harness.take_events();
    assert!(events.iter().any(|e| matches!(
        e,
        Action::ConnectionFailed {
            error: ClientError::RequestTimedOut,
            ..
        }
    )));
    assert_eq!(acknowledged(&events), vec![(1, Some(0))]);
    assert_eq!(harness.broker.log_end("edge.gps", 0), 2);
}

#[test]
fn a_hostile_answer_closes_the_connection() {
    let mut harness = ready_harness();
    let connection = *harness.open.last().expect("open");
    // A frame larger than the limit, then a mismatched correlation id.
    harness
        .client
        .handle_received(connection, &(64i32 << 20).to_be_bytes(), harness.now_ms);
    let mut closed = false;
    while let Some(action) = harness.client.next_action() {
        if let Action::ConnectionFailed { error, .. } = &action {
            assert!(matches!(error, ClientError::FrameTooLarge { .. }));
        }
        closed |= action == Action::Close { connection };
    }
    assert!(closed);
}

#[test]
fn metadata_lost_with_its_connection_is_asked_again_at_once() {
    let mut harness = Harness::new(config(), FakeBroker::new());
    // ApiVersions is answered; Metadata and InitProducerId are lost.
    harness.drop_answers = true;
    harness.answers_before_drop = 1;
    harness.settle();
    assert!(harness.take_events().is_empty());
    harness.drop_answers = false;
    harness.cut_all();
    // Well within the metadata refresh interval (300 s).
    harness.advance(1_000);
    let events = harness.take_events();
    assert!(
        events
            .iter()
            .any(|event| matches!(event, Action::TopicReady { .. })),
        "{events:?}"
    );
}
