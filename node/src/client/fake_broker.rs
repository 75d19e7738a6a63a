//! Test support: brokers that speak the native protocol on 127.0.0.1 inside
//! the test's own compio runtime. [`RawPeer`] lets a test script one
//! connection byte by byte (answer out of order, hang up, send a bad frame);
//! [`FakeBroker`] is a tiny in-memory broker with topics, logs and group
//! offsets, enough to run the CLI commands against.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use compio::BufResult;
use compio::driver::{DriverType, ProactorBuilder};
use compio::io::{AsyncReadExt, AsyncWriteExt};
use compio::net::{TcpListener, TcpStream};
use rill_core::batch::{check_batch, stamp_batch};
use rill_protocol::frame::encode_frame_vec;
use rill_protocol::message::{GroupInfo, PartitionInfo, StatusInfo, TopicInfo};
use rill_protocol::partitioner::partition_for_key;
use rill_protocol::{
    Acks, ErrorCode, OffsetSpec, Request, RequestFrame, Response, ResponseFrame, Target,
    split_frame,
};

/// Runs an async test on compio's polling driver, and again on io_uring
/// where the kernel allows it, so the client is checked on both drivers the
/// CLI may run on.
pub(crate) fn run<F: Future<Output = ()>>(test: impl Fn() -> F) {
    for driver_type in [DriverType::Poll, DriverType::IoUring] {
        let mut proactor = ProactorBuilder::new();
        proactor.driver_type(driver_type);
        let built = compio::runtime::RuntimeBuilder::new()
            .with_proactor(proactor)
            .build();
        match built {
            Ok(runtime) => runtime.block_on(test()),
            // io_uring may be missing or blocked here; polling never is.
            Err(error) => assert_eq!(driver_type, DriverType::IoUring, "{error}"),
        }
    }
}

/// A listener on an ephemeral loopback port, and its address.
pub(crate) async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    (listener, address)
}

/// Encodes a response frame, with `raw` bytes after the message.
pub(crate) fn response_frame(correlation_id: u32, response: Response<'_>, raw: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_frame_vec(
        &ResponseFrame {
            correlation_id,
            response,
        },
        raw.len() as u32,
        &mut bytes,
    );
    bytes.extend_from_slice(raw);
    bytes
}

/// One accepted connection, scripted by the test.
pub(crate) struct RawPeer {
    pub(crate) stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawPeer {
    pub(crate) async fn accept(listener: &TcpListener) -> Self {
        let (stream, _) = listener.accept().await.expect("accept");
        Self {
            stream,
            buffer: Vec::new(),
        }
    }

    /// The next request frame body; `None` when the client hung up.
    pub(crate) async fn read_request(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some((body, used)) = split_frame(&self.buffer, 1 << 24).expect("sane frame") {
                let body = body.to_vec();
                self.buffer.drain(..used);
                return Some(body);
            }
            self.buffer.reserve(4096);
            let buffer = std::mem::take(&mut self.buffer);
            let BufResult(result, buffer) = self.stream.append(buffer).await;
            self.buffer = buffer;
            match result {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads the handshake and accepts it.
    pub(crate) async fn handshake(&mut self, frame_bytes_max: u32) {
        let body = self.read_request().await.expect("handshake");
        let frame = RequestFrame::decode(&body).expect("decodes");
        assert!(
            matches!(frame.request, Request::Handshake { .. }),
            "{frame:?}"
        );
        self.send(&response_frame(
            frame.correlation_id,
            Response::HandshakeOk {
                protocol_version: 1,
                broker_version: "fake-1.0",
                frame_bytes_max,
            },
            &[],
        ))
        .await;
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        let BufResult(result, _) = self.stream.write_all(bytes.to_vec()).await;
        result.expect("write to client");
    }
}

struct PartitionLog {
    /// (base offset, last offset, max timestamp, stamped batch)
    batches: Vec<(i64, i64, i64, Vec<u8>)>,
    next_offset: i64,
}

struct Topic {
    partitions: Vec<PartitionLog>,
    settings: String,
}

/// The in-memory broker's state, open to tests for setup and checks.
#[derive(Default)]
pub(crate) struct BrokerState {
    topics: BTreeMap<String, Topic>,
    groups: BTreeMap<String, BTreeMap<(String, u32), i64>>,
    /// Every fetch as (partition, offset, max_wait_ms), to check what consumers asked.
    pub(crate) fetches: Vec<(u32, i64, u32)>,
}

impl BrokerState {
    pub(crate) fn create_topic(&mut self, name: &str, partitions: u32) {
        self.topics.insert(
            name.to_owned(),
            Topic {
                partitions: (0..partitions)
                    .map(|_| PartitionLog {
                        batches: Vec::new(),
                        next_offset: 0,
                    })
                    .collect(),
                settings: String::new(),
            },
        );
    }

    /// Appends a checked batch as a produce would; returns (base, last).
    pub(crate) fn append(&mut self, topic: &str, partition: u32, batch: &[u8]) -> (i64, i64) {
        let log = self
            .topics
            .get_mut(topic)
            .and_then(|topic| topic.partitions.get_mut(partition as usize))
            .expect("existing partition");
        let header = check_batch(batch).expect("valid batch");
        let mut batch = batch.to_vec();
        let base = log.next_offset;
        stamp_batch(&mut batch, base, None);
        let last = base + i64::from(header.last_offset_delta);
        log.batches.push((base, last, header.max_timestamp, batch));
        log.next_offset = last + 1;
        (base, last)
    }

    /// Drops the batches before `offset`, as retention would.
    pub(crate) fn trim(&mut self, topic: &str, partition: u32, before_offset: i64) {
        if let Some(log) = self
            .topics
            .get_mut(topic)
            .and_then(|topic| topic.partitions.get_mut(partition as usize))
        {
            log.batches.retain(|(_, last, _, _)| *last >= before_offset);
        }
    }

    pub(crate) fn set_committed(&mut self, group: &str, topic: &str, partition: u32, offset: i64) {
        self.groups
            .entry(group.to_owned())
            .or_default()
            .insert((topic.to_owned(), partition), offset);
    }

    pub(crate) fn committed(&self, group: &str, topic: &str, partition: u32) -> Option<i64> {
        self.groups
            .get(group)?
            .get(&(topic.to_owned(), partition))
            .copied()
    }

    fn topic_info(name: &str, topic: &Topic) -> TopicInfo {
        TopicInfo {
            name: name.to_owned(),
            partitions: topic
                .partitions
                .iter()
                .enumerate()
                .map(|(index, log)| PartitionInfo {
                    partition: index as u32,
                    shard: index as u32 % 2,
                    log_start_offset: Self::log_start(log),
                    next_offset: log.next_offset,
                    size_bytes: log.batches.iter().map(|batch| batch.3.len() as u64).sum(),
                })
                .collect(),
            settings: topic.settings.clone(),
        }
    }

    fn log_start(log: &PartitionLog) -> i64 {
        log.batches.first().map_or(log.next_offset, |batch| batch.0)
    }

    fn log(&self, topic: &str, partition: u32) -> Result<&PartitionLog, (ErrorCode, String)> {
        let found = self
            .topics
            .get(topic)
            .ok_or((ErrorCode::UnknownTopic, format!("no topic `{topic}`")))?;
        found.partitions.get(partition as usize).ok_or((
            ErrorCode::UnknownPartition,
            format!("`{topic}` has no partition {partition}"),
        ))
    }

    /// Answers one request; `None` for a produce with `Acks::None`.
    fn handle(&mut self, correlation_id: u32, request: Request<'_>) -> Option<Vec<u8>> {
        let answer = |response| Some(response_frame(correlation_id, response, &[]));
        let error = |(code, message): (ErrorCode, String)| {
            Some(response_frame(
                correlation_id,
                Response::Error {
                    code,
                    message: &message,
                },
                &[],
            ))
        };
        match request {
            Request::Handshake { .. } => answer(Response::HandshakeOk {
                protocol_version: 1,
                broker_version: "fake-1.0",
                frame_bytes_max: 1 << 20,
            }),
            Request::Ping => answer(Response::Pong),
            Request::Produce {
                topic,
                target,
                acks,
                batch,
            } => {
                let partitions = match self.topics.get(topic) {
                    Some(found) => found.partitions.len() as u32,
                    None => return error((ErrorCode::UnknownTopic, format!("no topic `{topic}`"))),
                };
                let partition = match target {
                    Target::Partition(partition) => partition,
                    Target::Key(key) => partition_for_key(key, partitions),
                    Target::Any => 0,
                };
                if partition >= partitions {
                    return error((
                        ErrorCode::UnknownPartition,
                        format!("no partition {partition}"),
                    ));
                }
                if let Err(problem) = check_batch(batch) {
                    return error((ErrorCode::InvalidBatch, problem.to_string()));
                }
                let (base_offset, last_offset) = self.append(topic, partition, batch);
                if acks == Acks::None {
                    return None;
                }
                answer(Response::Produced {
                    partition,
                    base_offset,
                    last_offset,
                    log_append_time_ms: None,
                })
            }
            Request::Fetch {
                topic,
                partition,
                offset,
                max_bytes,
                max_wait_ms,
                ..
            } => {
                self.fetches.push((partition, offset, max_wait_ms));
                let log = match self.log(topic, partition) {
                    Ok(log) => log,
                    Err(problem) => return error(problem),
                };
                let log_start_offset = Self::log_start(log);
                if offset < log_start_offset || offset > log.next_offset {
                    return error((
                        ErrorCode::OffsetOutOfRange,
                        format!(
                            "offset {offset} outside {log_start_offset}..{}",
                            log.next_offset
                        ),
                    ));
                }
                let mut raw = Vec::new();
                let mut next_offset = offset;
                for (_, last, _, batch) in log.batches.iter().filter(|batch| batch.1 >= offset) {
                    if !raw.is_empty() && raw.len() + batch.len() > max_bytes as usize {
                        break;
                    }
                    raw.extend_from_slice(batch);
                    next_offset = last + 1;
                }
                Some(response_frame(
                    correlation_id,
                    Response::Fetched {
                        partition,
                        high_watermark: log.next_offset,
                        log_start_offset,
                        next_offset,
                        records_bytes: raw.len() as u32,
                    },
                    &raw,
                ))
            }
            Request::ListOffsets {
                topic,
                partition,
                at,
            } => {
                let log = match self.log(topic, partition) {
                    Ok(log) => log,
                    Err(problem) => return error(problem),
                };
                let offset = match at {
                    OffsetSpec::Earliest => Some(Self::log_start(log)),
                    OffsetSpec::Latest => Some(log.next_offset),
                    OffsetSpec::Timestamp(time_ms) => log
                        .batches
                        .iter()
                        .find(|batch| batch.2 >= time_ms)
                        .map(|batch| batch.0),
                };
                answer(Response::Offset { offset })
            }
            Request::Metadata { topic } => {
                let topics = self
                    .topics
                    .iter()
                    .filter(|(name, _)| topic.is_none_or(|wanted| wanted == name.as_str()))
                    .map(|(name, found)| Self::topic_info(name, found))
                    .collect();
                answer(Response::Metadata { topics })
            }
            Request::DescribeTopic { name } => match self.topics.get(name) {
                Some(found) => answer(Response::Metadata {
                    topics: vec![Self::topic_info(name, found)],
                }),
                None => error((ErrorCode::UnknownTopic, format!("no topic `{name}`"))),
            },
            Request::CreateTopic {
                name,
                partitions,
                settings,
            } => {
                if self.topics.contains_key(name) {
                    return error((ErrorCode::TopicExists, format!("topic `{name}` exists")));
                }
                self.create_topic(name, partitions);
                if let Some(topic) = self.topics.get_mut(name) {
                    topic.settings = settings.to_owned();
                }
                answer(Response::Done)
            }
            Request::AlterTopic {
                name,
                partitions,
                settings,
            } => {
                let Some(topic) = self.topics.get_mut(name) else {
                    return error((ErrorCode::UnknownTopic, format!("no topic `{name}`")));
                };
                topic.settings.push_str(settings);
                while let Some(count) = partitions
                    && topic.partitions.len() < count as usize
                {
                    topic.partitions.push(PartitionLog {
                        batches: Vec::new(),
                        next_offset: 0,
                    });
                }
                answer(Response::Done)
            }
            Request::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => answer(Response::Done),
                None => error((ErrorCode::UnknownTopic, format!("no topic `{name}`"))),
            },
            Request::CommitOffset {
                group,
                topic,
                partition,
                offset,
            } => {
                self.set_committed(group, topic, partition, offset);
                answer(Response::Done)
            }
            Request::FetchOffset {
                group,
                topic,
                partition,
            } => answer(Response::CommittedOffset {
                offset: self.committed(group, topic, partition),
            }),
            Request::ListGroups => answer(Response::Groups {
                groups: self
                    .groups
                    .iter()
                    .map(|(group, offsets)| GroupInfo {
                        group: group.clone(),
                        offsets: offsets
                            .iter()
                            .map(|((topic, partition), offset)| {
                                (topic.clone(), *partition, *offset)
                            })
                            .collect(),
                    })
                    .collect(),
            }),
            Request::Status => answer(Response::Status(StatusInfo {
                version: "fake-1.0".into(),
                io_driver: "portable".into(),
                io_driver_reason: "forced".into(),
                shards: 2,
                profile: "test".into(),
                topics: self.topics.len() as u32,
                partitions: self
                    .topics
                    .values()
                    .map(|topic| topic.partitions.len() as u32)
                    .sum(),
                connections: 1,
                data_bytes: 0,
                disk_quota_bytes: None,
                uptime_ms: 1_000,
            })),
        }
    }
}

/// The in-memory broker, serving every connection until dropped.
pub(crate) struct FakeBroker {
    pub(crate) address: String,
    pub(crate) state: Rc<RefCell<BrokerState>>,
    _accepting: compio::runtime::JoinHandle<()>,
}

impl FakeBroker {
    pub(crate) async fn start() -> Self {
        let (listener, address) = listen().await;
        let state = Rc::new(RefCell::new(BrokerState::default()));
        let shared = Rc::clone(&state);
        let accepting = compio::runtime::spawn(async move {
            loop {
                let peer = RawPeer::accept(&listener).await;
                compio::runtime::spawn(serve(peer, Rc::clone(&shared))).detach();
            }
        });
        Self {
            address,
            state,
            _accepting: accepting,
        }
    }
}

async fn serve(mut peer: RawPeer, state: Rc<RefCell<BrokerState>>) {
    while let Some(body) = peer.read_request().await {
        let frame = RequestFrame::decode(&body).expect("client sends valid frames");
        let reply = state
            .borrow_mut()
            .handle(frame.correlation_id, frame.request);
        if let Some(bytes) = reply {
            let BufResult(result, _) = peer.stream.write_all(bytes).await;
            if result.is_err() {
                return;
            }
        }
    }
}
