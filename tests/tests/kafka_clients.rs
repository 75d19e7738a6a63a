#![cfg(feature = "kafka-clients")]
//! The real `rill` binary's Kafka listener driven by real Kafka clients:
//! librdkafka (through rdkafka) for most tests, and kafka-python and kcat to
//! follow the protocol rather than one client's tolerance. Every wait has a
//! deadline; nothing sleeps to synchronise.
//!
//! Set `KAFKA_TEST_DEBUG` to a librdkafka `debug` value (say
//! `protocol,broker,cgrp`) to see the client's side of a failure.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, Timestamp, TopicPartitionList};
use rill_core::batch::{BatchHeader, Compression};
use rill_tests::proxy::{Direction, Proxy};
use rill_tests::{Broker, Ports, rill_command, wait_until};

/// The longest any one step (a flush, a read, a rebalance) may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// A create-time timestamp the tests count from.
const BASE_TIMESTAMP: i64 = 1_700_000_000_000;
/// Settings every broker of these tests gets: a short first-rebalance delay
/// keeps group tests quick.
const BROKER_SETTINGS: &[&str] = &["kafka.group_initial_rebalance_delay_ms=100"];

fn start_broker() -> Broker {
    Broker::start(BROKER_SETTINGS)
}

// ---------------------------------------------------------------------------
// Clients

/// What a client saw: librdkafka's log lines and errors go to stderr (shown
/// for a failing test), delivery reports are kept.
struct Context {
    name: &'static str,
    deliveries: Mutex<Vec<Result<(i32, i64), String>>>,
}

impl Context {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            deliveries: Mutex::new(Vec::new()),
        }
    }

    fn take_deliveries(&self) -> Vec<Result<(i32, i64), String>> {
        std::mem::take(&mut *self.deliveries.lock().expect("deliveries"))
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        eprintln!("[{} librdkafka {level:?} {facility}] {message}", self.name);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("[{} librdkafka error] {error}: {reason}", self.name);
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let outcome = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, message)) => Err(format!(
                "partition {}: {error} ({:?})",
                message.partition(),
                error.rdkafka_error_code()
            )),
        };
        self.deliveries.lock().expect("deliveries").push(outcome);
    }
}

impl ConsumerContext for Context {}

type TestProducer = BaseProducer<Context>;
type TestConsumer = BaseConsumer<Context>;

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "rill-tests")
        .set("socket.timeout.ms", "10000")
        .set("reconnect.backoff.ms", "20")
        .set("reconnect.backoff.max.ms", "500")
        .set("retry.backoff.ms", "50")
        .set("api.version.request.timeout.ms", "5000")
        .set_log_level(RDKafkaLogLevel::Warning);
    if let Ok(debug) = std::env::var("KAFKA_TEST_DEBUG") {
        config
            .set("debug", debug)
            .set_log_level(RDKafkaLogLevel::Debug);
    }
    config
}

fn producer(bootstrap: &str, settings: &[(&str, &str)]) -> TestProducer {
    let mut config = client_config(bootstrap);
    config
        .set("message.timeout.ms", "45000")
        .set("linger.ms", "5");
    for (key, value) in settings {
        config.set(*key, *value);
    }
    config
        .create_with_context(Context::new("producer"))
        .expect("create a producer")
}

fn consumer(bootstrap: &str, group: Option<&str>, settings: &[(&str, &str)]) -> TestConsumer {
    named_consumer("consumer", bootstrap, group, settings)
}

fn named_consumer(
    name: &'static str,
    bootstrap: &str,
    group: Option<&str>,
    settings: &[(&str, &str)],
) -> TestConsumer {
    let mut config = client_config(bootstrap);
    config
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("max.poll.interval.ms", "30000")
        .set("fetch.wait.max.ms", "100");
    // librdkafka wants a group id even to assign partitions by hand; readers
    // that never commit get one of their own.
    let reader_group = format!("reader-{}", std::process::id());
    config.set("group.id", group.unwrap_or(&reader_group));
    for (key, value) in settings {
        config.set(*key, *value);
    }
    config
        .create_with_context(Context::new(name))
        .expect("create a consumer")
}

/// Closes a group consumer (LeaveGroup, final callbacks) on another thread
/// and fails if that takes longer than the deadline: rdkafka's drop waits
/// for librdkafka's close with no bound of its own.
fn close_bounded(consumer: TestConsumer, what: &str) -> Duration {
    let started = Instant::now();
    let (done, closed) = channel();
    std::thread::spawn(move || {
        drop(consumer);
        let _ = done.send(());
    });
    match closed.recv_timeout(DEADLINE) {
        Ok(()) => started.elapsed(),
        Err(_) => panic!("closing {what} did not finish within {DEADLINE:?}"),
    }
}

/// Sends a record, serving delivery reports while librdkafka's queue is full.
fn send(producer: &TestProducer, mut record: BaseRecord<'_, [u8], [u8]>) {
    let started = Instant::now();
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                assert!(started.elapsed() < DEADLINE, "producer queue stayed full");
                record = back;
                producer.poll(Duration::from_millis(20));
            }
            Err((error, _)) => panic!("send failed: {error}"),
        }
    }
}

/// Flushes and returns every delivery since the last call, failing on any error.
fn flush_ok(producer: &TestProducer) -> Vec<(i32, i64)> {
    producer.flush(DEADLINE).expect("flush within the deadline");
    producer
        .context()
        .take_deliveries()
        .into_iter()
        .map(|delivery| delivery.unwrap_or_else(|error| panic!("delivery failed: {error}")))
        .collect()
}

/// A record as read back: everything a Kafka record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Option<Vec<(String, Option<Vec<u8>>)>>,
}

fn record_of(message: &BorrowedMessage<'_>) -> Record {
    Record {
        partition: message.partition(),
        offset: message.offset(),
        timestamp: message.timestamp(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers: message.headers().map(|headers| {
            headers
                .iter()
                .map(|header| (header.key.to_string(), header.value.map(<[u8]>::to_vec)))
                .collect()
        }),
    }
}

/// Reads `count` records of one partition from `from` with an assigned
/// (group-less) consumer.
fn read_partition(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    from: i64,
    count: usize,
) -> Vec<Record> {
    let consumer = consumer(bootstrap, None, &[]);
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(from))
        .expect("offset");
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::with_capacity(count);
    let started = Instant::now();
    while records.len() < count {
        assert!(
            started.elapsed() < DEADLINE,
            "{topic}/{partition}: read {} of {count} records from offset {from} before the deadline",
            records.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => records.push(record_of(&message)),
            Some(Err(error)) => panic!("{topic}/{partition}: consume error: {error}"),
            None => {}
        }
    }
    records
}

/// Creates a topic over the native protocol with the `rill` CLI.
fn create_topic(broker: &Broker, topic: &str, partitions: u32) {
    let output = run_bounded(
        rill_command().args([
            "topic",
            "create",
            topic,
            "--partitions",
            &partitions.to_string(),
            "--broker",
            &broker.address(),
        ]),
        b"",
    );
    assert!(
        output.status.success(),
        "rill topic create {topic}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a command with `input` on stdin, bounded by the deadline.
fn run_bounded(command: &mut Command, input: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("start {command:?}: {error}"));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    let stdout = reader_thread(child.stdout.take().expect("stdout"));
    let stderr = reader_thread(child.stderr.take().expect("stderr"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = stdout.join().unwrap_or_default();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "{command:?} did not finish within {DEADLINE:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        // Polling a child's exit: there is no blocking wait with a timeout.
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn reader_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

// ---------------------------------------------------------------------------
// Produce and consume with every codec

fn codec_key(index: usize) -> Option<Vec<u8>> {
    (index % 7 != 3).then(|| format!("key-{index}").into_bytes())
}

fn codec_value(codec: &str, index: usize) -> Option<Vec<u8>> {
    (index % 11 != 5)
        .then(|| format!("{codec}-{index:05}-{}", "abc".repeat(index % 40)).into_bytes())
}

fn codec_headers(codec: &str, index: usize) -> Option<Vec<(String, Option<Vec<u8>>)>> {
    if index.is_multiple_of(13) {
        return None;
    }
    let mut headers = vec![
        ("index".to_string(), Some(index.to_string().into_bytes())),
        ("codec".to_string(), Some(codec.as_bytes().to_vec())),
    ];
    if index.is_multiple_of(5) {
        headers.push(("nothing".to_string(), None));
    }
    Some(headers)
}

#[test]
fn every_compression_codec_round_trips_keys_values_headers_and_timestamps() {
    const RECORDS: usize = 300;
    let broker = start_broker();
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("codec-{codec}");
        create_topic(&broker, &topic, 1);
        let producer = producer(
            &broker.kafka_address(),
            &[("compression.type", codec), ("linger.ms", "50")],
        );
        for index in 0..RECORDS {
            let key = codec_key(index);
            let value = codec_value(codec, index);
            let mut record = BaseRecord::to(&topic)
                .partition(0)
                .timestamp(BASE_TIMESTAMP + (index as i64) * 7);
            if let Some(key) = &key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &value {
                record = record.payload(value.as_slice());
            }
            if let Some(headers) = codec_headers(codec, index) {
                let mut owned = OwnedHeaders::new();
                for (key, value) in &headers {
                    owned = owned.insert(Header {
                        key,
                        value: value.as_deref(),
                    });
                }
                record = record.headers(owned);
            }
            send(&producer, record);
        }
        let delivered = flush_ok(&producer);
        let offsets: Vec<i64> = delivered.iter().map(|(_, offset)| *offset).collect();
        assert_eq!(
            offsets,
            (0..RECORDS as i64).collect::<Vec<_>>(),
            "{codec}: delivery reports give offsets 0.. in order"
        );

        let records = read_partition(&broker.kafka_address(), &topic, 0, 0, RECORDS);
        for (index, record) in records.iter().enumerate() {
            let expected = Record {
                partition: 0,
                offset: index as i64,
                timestamp: Timestamp::CreateTime(BASE_TIMESTAMP + (index as i64) * 7),
                key: codec_key(index),
                value: codec_value(codec, index),
                headers: codec_headers(codec, index),
            };
            assert_eq!(record, &expected, "{codec}: record {index}");
        }
    }
}

/// Records a native client sees in one partition of `broker` (0 while the
/// topic is missing), and the compression codec of every batch there.
fn native_view(broker: &Broker, topic: &str) -> (i64, Vec<Option<Compression>>) {
    use rill_node::client::{Client, ClientConfig};
    compio::runtime::Runtime::new()
        .expect("client runtime")
        .block_on(async {
            let Ok(client) = Client::connect(&broker.address(), ClientConfig::default()).await
            else {
                return (0, Vec::new());
            };
            let latest = client
                .list_offsets(topic, 0, rill_protocol::OffsetSpec::Latest)
                .await
                .ok()
                .flatten()
                .unwrap_or(0);
            let mut codecs = Vec::new();
            let mut offset = 0;
            while offset < latest {
                let Ok(fetched) = client.fetch(topic, 0, offset, 1 << 20, 1, 0).await else {
                    break;
                };
                let mut rest = &fetched.batches[..];
                while let Ok(header) = BatchHeader::parse(rest) {
                    codecs.push(header.compression());
                    let Some(total) = header.total_bytes() else {
                        break;
                    };
                    rest = rest.get(total..).unwrap_or_default();
                }
                if fetched.next_offset <= offset {
                    break;
                }
                offset = fetched.next_offset;
            }
            (latest, codecs)
        })
}

#[test]
fn the_replicators_uplink_in_every_codec_reads_back_with_librdkafka() {
    // The replicator compresses with its own codecs (edge-bridge); a Kafka
    // consumer of the central cluster must read every record back, with its
    // provenance header, whatever codec the uplink used.
    const RECORDS: usize = 400;
    let central = start_broker();
    for (codec, id) in [
        ("gzip", Compression::Gzip),
        ("snappy", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        let edge_id = format!("edge-{codec}");
        let edge = Broker::start(&[
            &format!("mirror.edge_id={edge_id}"),
            "mirror.reconcile_delay_ms=0",
            "mirror.topic_refresh_ms=200",
            &format!(
                "mirror.destinations=[{{name=\"central\", bootstrap_servers=[\"{}\"], linger_ms=5, create_partitions=1, compression=\"{codec}\"}}]",
                central.kafka_address()
            ),
        ]);
        create_topic(&edge, "readings", 1);
        let producer = producer(&edge.kafka_address(), &[("compression.type", "none")]);
        for index in 0..RECORDS {
            let key = codec_key(index);
            let value = codec_value(codec, index);
            let mut record = BaseRecord::to("readings")
                .partition(0)
                .timestamp(BASE_TIMESTAMP + index as i64);
            if let Some(key) = &key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &value {
                record = record.payload(value.as_slice());
            }
            send(&producer, record);
        }
        flush_ok(&producer);
        let mirrored = format!("{edge_id}.readings");
        wait_until(&format!("{codec}: every record mirrored"), DEADLINE, || {
            native_view(&central, &mirrored).0 >= RECORDS as i64
        });
        let (latest, codecs) = native_view(&central, &mirrored);
        assert_eq!(latest, RECORDS as i64, "{codec}: each record once");
        assert!(
            !codecs.is_empty() && codecs.iter().all(|&batch_codec| batch_codec == Some(id)),
            "{codec}: every batch on the central cluster is compressed with {id:?}: {codecs:?}"
        );
        let records = read_partition(&central.kafka_address(), &mirrored, 0, 0, RECORDS);
        for (index, record) in records.iter().enumerate() {
            let provenance = format!("{edge_id}/readings/0/{index}");
            let expected = Record {
                partition: 0,
                offset: index as i64,
                timestamp: Timestamp::CreateTime(BASE_TIMESTAMP + index as i64),
                key: codec_key(index),
                value: codec_value(codec, index),
                headers: Some(vec![(
                    "rill.source".to_string(),
                    Some(provenance.into_bytes()),
                )]),
            };
            assert_eq!(record, &expected, "{codec}: record {index}");
        }
    }
}

// ---------------------------------------------------------------------------
// A consumer group that rebalances as members join, leave and are killed

const GROUP_TOPIC: &str = "work";
const GROUP_PARTITIONS: i32 = 6;
const GROUP_RECORDS_PER_PARTITION: i64 = 150;
const GROUP_NAME: &str = "workers";
const MEMBER_BOOTSTRAP_VARIABLE: &str = "KAFKA_TEST_MEMBER_BOOTSTRAP";

/// What one step of a member did.
#[derive(Debug, Clone, Copy, Default)]
struct Step {
    /// A record processed and its offset committed: (partition, offset).
    processed: Option<(i32, i64)>,
    /// Partitions assigned to the member after the step.
    assigned: usize,
}

/// One step of a member: poll once, and for a record, commit the offset after
/// it. Only a committed record counts as processed; when the commit fails
/// (a rebalance took the partition) the position goes back so that whoever
/// owns the partition processes the record again.
fn member_step(consumer: &TestConsumer) -> Step {
    let mut step = Step::default();
    match consumer.poll(Duration::from_millis(50)) {
        Some(Ok(message)) => {
            let (partition, offset) = (message.partition(), message.offset());
            let mut commit = TopicPartitionList::new();
            commit
                .add_partition_offset(GROUP_TOPIC, partition, Offset::Offset(offset + 1))
                .expect("offset");
            drop(message);
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => step.processed = Some((partition, offset)),
                Err(error) => {
                    eprintln!("commit of {partition}/{offset} failed, to be redone: {error}");
                    let _ = consumer.seek(
                        GROUP_TOPIC,
                        partition,
                        Offset::Offset(offset),
                        Duration::from_secs(5),
                    );
                }
            }
        }
        Some(Err(error)) => eprintln!("member poll error: {error}"),
        None => {}
    }
    step.assigned = consumer
        .assignment()
        .map_or(0, |assignment| assignment.count());
    step
}

fn group_member(name: &'static str, bootstrap: &str) -> TestConsumer {
    let member = named_consumer(name, bootstrap, Some(GROUP_NAME), &[]);
    member.subscribe(&[GROUP_TOPIC]).expect("subscribe");
    member
}

/// Not a test of its own: the body of a group member run as a separate
/// process (by `a_group_of_three_rebalances_...`), so that it can be killed
/// with SIGKILL and vanish without leaving the group. It reads `step` lines
/// on stdin and answers each with one `member:` line on stdout.
#[test]
fn group_member_process() {
    let Ok(bootstrap) = std::env::var(MEMBER_BOOTSTRAP_VARIABLE) else {
        return; // run directly: nothing to do
    };
    let member = group_member("member c", &bootstrap);
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() != "step" {
            break;
        }
        let step = member_step(&member);
        let answer = match step.processed {
            Some((partition, offset)) => {
                format!("member: processed {partition} {offset} {}", step.assigned)
            }
            None => format!("member: idle {}", step.assigned),
        };
        if writeln!(stdout, "{answer}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
}

/// A member in another process, stepped over its stdin and stdout.
struct ChildMember {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ChildMember {
    fn start(bootstrap: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("test executable"))
            .args([
                "--exact",
                "group_member_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(MEMBER_BOOTSTRAP_VARIABLE, bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the member process");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest's "test group_member_process ... " may precede
                // the first answer on its line.
                if let Some((_, answer)) = line.split_once("member: ")
                    && sender.send(answer.to_string()).is_err()
                {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            reader: Some(reader),
        }
    }

    fn step(&mut self) -> Step {
        writeln!(self.stdin, "step").expect("step the member process");
        let answer = match self.lines.recv_timeout(DEADLINE) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => panic!("member process did not answer a step"),
            Err(RecvTimeoutError::Disconnected) => panic!("member process ended"),
        };
        let words: Vec<&str> = answer.split_whitespace().collect();
        let number = |index: usize| -> i64 { words[index].parse().expect("a number") };
        match words.first() {
            Some(&"processed") => Step {
                processed: Some((number(1) as i32, number(2))),
                assigned: number(3) as usize,
            },
            Some(&"idle") => Step {
                processed: None,
                assigned: number(1) as usize,
            },
            _ => panic!("member process said {answer:?}"),
        }
    }

    /// SIGKILL: the process vanishes without leaving the group.
    fn kill(mut self) {
        self.child.kill().expect("kill the member process");
        self.child.wait().expect("reap the member process");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("member reader");
        }
    }
}

impl Drop for ChildMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Member {
    InProcess(TestConsumer),
    Child(ChildMember),
}

impl Member {
    fn step(&mut self) -> Step {
        match self {
            Member::InProcess(consumer) => member_step(consumer),
            Member::Child(child) => child.step(),
        }
    }
}

/// The members of the group run in turns, one step each.
struct Group {
    members: BTreeMap<&'static str, (Member, usize)>,
    processed: BTreeMap<(i32, i64), Vec<&'static str>>,
    total: usize,
}

impl Drop for Group {
    /// Members still in the group close on threads of their own, so a close
    /// that never finishes cannot hang the test (after a failure too).
    fn drop(&mut self) {
        let (done, closed) = channel();
        let mut closing = 0;
        for (name, (member, _)) in std::mem::take(&mut self.members) {
            closing += 1;
            let done = done.clone();
            std::thread::spawn(move || {
                drop(member);
                let _ = done.send(name);
            });
        }
        let started = Instant::now();
        for _ in 0..closing {
            let left = DEADLINE.saturating_sub(started.elapsed());
            if closed.recv_timeout(left).is_err() {
                eprintln!("group members still closing after {DEADLINE:?}");
                if !std::thread::panicking() {
                    panic!("closing the group's members did not finish within {DEADLINE:?}");
                }
                return;
            }
        }
    }
}

impl Group {
    fn round(&mut self) {
        for (name, (member, assigned)) in &mut self.members {
            let step = member.step();
            *assigned = step.assigned;
            if let Some(record) = step.processed {
                self.processed.entry(record).or_default().push(name);
                self.total += 1;
            }
        }
    }

    fn processed_by(&self, name: &str) -> usize {
        self.processed
            .values()
            .flatten()
            .filter(|member| **member == name)
            .count()
    }

    fn assigned(&self) -> usize {
        self.members.values().map(|(_, assigned)| assigned).sum()
    }

    /// Runs rounds until `condition` holds, within the deadline.
    fn run_until(&mut self, what: &str, mut condition: impl FnMut(&Self) -> bool) {
        let started = Instant::now();
        while !condition(self) {
            assert!(
                started.elapsed() < DEADLINE,
                "group: timed out waiting for {what}; processed {} records, assignments {:?}",
                self.total,
                self.members
                    .iter()
                    .map(|(name, (_, assigned))| (*name, *assigned))
                    .collect::<Vec<_>>()
            );
            self.round();
        }
    }
}

#[test]
fn a_group_of_three_rebalances_through_joins_leaves_and_kills_processing_each_record_once() {
    let broker = start_broker();
    let bootstrap = broker.kafka_address();
    create_topic(&broker, GROUP_TOPIC, GROUP_PARTITIONS as u32);
    let producer = producer(&bootstrap, &[]);
    let produce_wave = |from: i64, to: i64| {
        for partition in 0..GROUP_PARTITIONS {
            for index in from..to {
                let value = format!("p{partition}-{index}");
                send(
                    &producer,
                    BaseRecord::to(GROUP_TOPIC)
                        .partition(partition)
                        .payload(value.as_bytes()),
                );
            }
        }
        assert_eq!(
            flush_ok(&producer).len(),
            (GROUP_PARTITIONS as i64 * (to - from)) as usize
        );
    };
    produce_wave(0, GROUP_RECORDS_PER_PARTITION);

    let mut group = Group {
        members: BTreeMap::new(),
        processed: BTreeMap::new(),
        total: 0,
    };
    group.members.insert(
        "a",
        (Member::InProcess(group_member("member a", &bootstrap)), 0),
    );
    group.run_until("member a alone to process 50 records", |group| {
        group.processed_by("a") >= 50
    });

    group.members.insert(
        "b",
        (Member::InProcess(group_member("member b", &bootstrap)), 0),
    );
    group.run_until(
        "member b to get partitions and process 20 records",
        |group| group.processed_by("b") >= 20,
    );

    group
        .members
        .insert("c", (Member::Child(ChildMember::start(&bootstrap)), 0));
    group.run_until(
        "member c (another process) to get partitions and process 20 records",
        |group| group.processed_by("c") >= 20,
    );
    assert!(
        group.members.values().all(|(_, assigned)| *assigned > 0),
        "three members share the partitions"
    );

    // b leaves: closing the consumer sends LeaveGroup.
    let Some((Member::InProcess(b), _)) = group.members.remove("b") else {
        panic!("member b")
    };
    let took = close_bounded(b, "member b");
    eprintln!("member b closed in {took:?}");
    let before = group.total;
    group.run_until("a and c to take over b's partitions", |group| {
        group.assigned() == GROUP_PARTITIONS as usize && group.total >= before + 30
    });

    // c is killed: it never leaves, so the broker must expire its session.
    let Some((Member::Child(c), _)) = group.members.remove("c") else {
        panic!("member c")
    };
    c.kill();
    let killed = Instant::now();
    group.run_until(
        "a to own every partition after c's session expires",
        |group| group.assigned() == GROUP_PARTITIONS as usize,
    );
    eprintln!("c's partitions moved {:?} after the kill", killed.elapsed());
    let before = group.total;
    group.run_until("a to go on processing", |group| group.total >= before + 30);

    group.members.insert(
        "d",
        (Member::InProcess(group_member("member d", &bootstrap)), 0),
    );
    group.run_until("member d to get partitions", |group| {
        group.members["d"].1 > 0 && group.assigned() == GROUP_PARTITIONS as usize
    });
    // A second wave, so that d has work whichever partitions it got (the
    // first wave may be done on them already).
    let records_per_partition = GROUP_RECORDS_PER_PARTITION + 50;
    produce_wave(GROUP_RECORDS_PER_PARTITION, records_per_partition);
    let total = (GROUP_PARTITIONS as i64 * records_per_partition) as usize;
    group.run_until("every record to be processed", |group| group.total >= total);
    // A few more rounds: a record processed twice would show up now.
    for _ in 0..20 {
        group.round();
    }

    let twice: Vec<_> = group
        .processed
        .iter()
        .filter(|(_, members)| members.len() > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "records processed more than once: {twice:?}"
    );
    for partition in 0..GROUP_PARTITIONS {
        for offset in 0..records_per_partition {
            assert!(
                group.processed.contains_key(&(partition, offset)),
                "record {partition}/{offset} never processed"
            );
        }
    }
    assert_eq!(group.total, total);
    for name in ["a", "b", "c", "d"] {
        assert!(
            group.processed_by(name) > 0,
            "member {name} processed nothing"
        );
    }

    // The group's committed offsets are the ends of the partitions.
    let Some((Member::InProcess(a), _)) = group.members.get("a") else {
        panic!("member a")
    };
    let mut asked = TopicPartitionList::new();
    asked.add_partition_range(GROUP_TOPIC, 0, GROUP_PARTITIONS - 1);
    let committed = a
        .committed_offsets(asked, DEADLINE)
        .expect("committed offsets");
    for element in committed.elements_for_topic(GROUP_TOPIC) {
        assert_eq!(
            element.offset(),
            Offset::Offset(records_per_partition),
            "committed offset of partition {}",
            element.partition()
        );
    }
}

// ---------------------------------------------------------------------------
// Committed offsets survive a restart

#[test]
fn committed_offsets_survive_a_broker_restart() {
    let mut broker = start_broker();
    let topic = "durable-offsets";
    create_topic(&broker, topic, 3);
    let producer = producer(&broker.kafka_address(), &[]);
    for partition in 0..3 {
        for index in 0..30 {
            let value = format!("p{partition}-{index}");
            send(
                &producer,
                BaseRecord::to(topic)
                    .partition(partition)
                    .payload(value.as_bytes()),
            );
        }
    }
    assert_eq!(flush_ok(&producer).len(), 90);
    drop(producer);

    let wanted = [(0, 7), (1, 13), (2, 30)];
    let mut commit = TopicPartitionList::new();
    for (partition, offset) in wanted {
        commit
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .expect("offset");
    }
    {
        let group = consumer(&broker.kafka_address(), Some("keeper"), &[]);
        group.subscribe(&[topic]).expect("subscribe");
        // Process something first, as a real member would.
        let started = Instant::now();
        while group
            .assignment()
            .map_or(0, |assignment| assignment.count())
            < 3
        {
            assert!(started.elapsed() < DEADLINE, "no assignment for the group");
            let _ = group.poll(Duration::from_millis(100));
        }
        group.commit(&commit, CommitMode::Sync).expect("commit");
    }

    let status = broker.stop();
    assert!(
        status.success(),
        "rill stopped by SIGTERM exits cleanly: {status:?}"
    );
    broker.restart();

    let group = consumer(&broker.kafka_address(), Some("keeper"), &[]);
    let mut asked = TopicPartitionList::new();
    for (partition, _) in wanted {
        asked.add_partition(topic, partition);
    }
    let committed = group
        .committed_offsets(asked, DEADLINE)
        .expect("committed offsets after the restart");
    for (partition, offset) in wanted {
        let element = committed
            .find_partition(topic, partition)
            .expect("the partition");
        assert_eq!(
            element.offset(),
            Offset::Offset(offset),
            "partition {partition} after the restart"
        );
    }
    // A member of the group resumes from them.
    group.subscribe(&[topic]).expect("subscribe");
    let mut first = BTreeMap::new();
    let started = Instant::now();
    while first.len() < 2 {
        assert!(started.elapsed() < DEADLINE, "resumed reading: {first:?}");
        if let Some(message) = group.poll(Duration::from_millis(100)) {
            let message = message.expect("consume after the restart");
            first.entry(message.partition()).or_insert(message.offset());
        }
    }
    assert_eq!(first.get(&0), Some(&7));
    assert_eq!(first.get(&1), Some(&13));
}

// ---------------------------------------------------------------------------
// An idempotent producer whose connections are cut

#[test]
fn an_idempotent_producer_through_cut_connections_leaves_exactly_one_copy() {
    const PARTITIONS: i32 = 3;
    const PER_ROUND: i64 = 400;
    const ROUNDS: i64 = 6;
    let ports = Ports::free();
    let proxy = Proxy::start(ports.kafka);
    let advertised = format!("kafka.advertised_port={}", proxy.port());
    let mut settings = BROKER_SETTINGS.to_vec();
    settings.push(&advertised);
    let broker = Broker::start_on(ports, &settings);
    let topic = "exactly-once";
    create_topic(&broker, topic, PARTITIONS as u32);

    let bootstrap = proxy.address().to_string();
    let producer = producer(
        &bootstrap,
        &[
            ("enable.idempotence", "true"),
            ("linger.ms", "2"),
            ("batch.num.messages", "50"),
        ],
    );
    // Connected, with a producer id, before the first stall.
    send(&producer, BaseRecord::to("warm-up").payload(&b"warm"[..]));
    flush_ok(&producer);

    let mut next = [0i64; PARTITIONS as usize];
    for round in 0..ROUNDS {
        // Even rounds hold the broker's answers back and cut once requests
        // have reached the broker: those were written but never acknowledged,
        // so the producer sends them again. Odd rounds cut mid-flow.
        let stalled = round % 2 == 0;
        if stalled {
            proxy.stall(Direction::ToClient);
        }
        let sent_before = proxy.bytes_to_target();
        for _ in 0..PER_ROUND {
            for partition in 0..PARTITIONS {
                let index = next[partition as usize];
                next[partition as usize] += 1;
                let value = format!("p{partition}-{index:06}");
                send(
                    &producer,
                    BaseRecord::to(topic)
                        .partition(partition)
                        .payload(value.as_bytes()),
                );
            }
            producer.poll(Duration::ZERO);
        }
        let started = Instant::now();
        while proxy.bytes_to_target() < sent_before + 500 {
            assert!(
                started.elapsed() < DEADLINE,
                "round {round}: produce requests did not reach the broker"
            );
            producer.poll(Duration::from_millis(10));
        }
        let cut = proxy.cut_all();
        assert!(cut > 0, "round {round}: a connection to cut");
        proxy.resume();
        // Everything of this round is delivered (retried) before the next.
        producer
            .flush(DEADLINE)
            .unwrap_or_else(|error| panic!("round {round}: flush after the cut: {error}"));
    }
    assert!(
        proxy.accepted() > ROUNDS as u64,
        "the producer reconnected after each cut"
    );
    producer.flush(DEADLINE).expect("flush after the cuts");
    let deliveries = producer.context().take_deliveries();
    let failed: Vec<_> = deliveries.iter().filter_map(|d| d.as_ref().err()).collect();
    assert!(failed.is_empty(), "deliveries failed: {failed:?}");
    assert_eq!(
        deliveries.len() as i64,
        PARTITIONS as i64 * PER_ROUND * ROUNDS
    );
    drop(producer);

    let expected = PER_ROUND * ROUNDS;
    for partition in 0..PARTITIONS {
        let records = read_partition(
            &broker.kafka_address(),
            topic,
            partition,
            0,
            expected as usize,
        );
        for (index, record) in records.iter().enumerate() {
            assert_eq!(record.offset, index as i64);
            assert_eq!(
                String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()),
                format!("p{partition}-{index:06}"),
                "partition {partition} offset {index}: one copy of each record, in order"
            );
        }
        let watermarks = consumer(&broker.kafka_address(), None, &[])
            .fetch_watermarks(topic, partition, DEADLINE)
            .expect("watermarks");
        assert_eq!(
            watermarks,
            (0, expected),
            "partition {partition}: no extra copies"
        );
    }
}

// ---------------------------------------------------------------------------
// Seek by timestamp

#[test]
fn offsets_for_times_finds_the_first_record_at_or_after_the_time() {
    let broker = start_broker();
    let topic = "by-time";
    create_topic(&broker, topic, 2);
    let producer = producer(&broker.kafka_address(), &[]);
    // Partition 0: timestamps 0, 10, 20, ...; partition 1: two records per time.
    for index in 0..50i64 {
        let value = format!("r{index}");
        send(
            &producer,
            BaseRecord::to(topic)
                .partition(0)
                .timestamp(BASE_TIMESTAMP + index * 10)
                .payload(value.as_bytes()),
        );
        send(
            &producer,
            BaseRecord::to(topic)
                .partition(1)
                .timestamp(BASE_TIMESTAMP + (index / 2) * 10)
                .payload(value.as_bytes()),
        );
    }
    flush_ok(&producer);

    let consumer = consumer(&broker.kafka_address(), None, &[]);
    let lookup = |partition: i32, time: i64| -> Offset {
        let mut times = TopicPartitionList::new();
        times
            .add_partition_offset(topic, partition, Offset::Offset(time))
            .expect("time");
        let found = consumer
            .offsets_for_times(times, DEADLINE)
            .expect("offsets_for_times");
        let element = found.find_partition(topic, partition).expect("partition");
        element.error().expect("no partition error");
        element.offset()
    };
    let cases = [
        (0, BASE_TIMESTAMP - 1_000, Offset::Offset(0)),
        (0, BASE_TIMESTAMP, Offset::Offset(0)),
        (0, BASE_TIMESTAMP + 25, Offset::Offset(3)),
        (0, BASE_TIMESTAMP + 30, Offset::Offset(3)),
        (0, BASE_TIMESTAMP + 490, Offset::Offset(49)),
        (0, BASE_TIMESTAMP + 491, Offset::End),
        (1, BASE_TIMESTAMP + 15, Offset::Offset(4)),
        (1, BASE_TIMESTAMP + 20, Offset::Offset(4)),
        (1, BASE_TIMESTAMP + 240, Offset::Offset(48)),
    ];
    for (partition, time, expected) in cases {
        assert_eq!(
            lookup(partition, time),
            expected,
            "partition {partition}, time base+{}",
            time - BASE_TIMESTAMP
        );
    }
    // Reading from the offset found gives the record at or after the time,
    // and the one before it is earlier.
    let target = BASE_TIMESTAMP + 25;
    let Offset::Offset(found) = lookup(0, target) else {
        panic!("an offset")
    };
    let records = read_partition(&broker.kafka_address(), topic, 0, found - 1, 2);
    assert!(records[0].timestamp.to_millis().expect("time") < target);
    assert!(records[1].timestamp.to_millis().expect("time") >= target);
    assert_eq!(records[1].offset, found);
}

// ---------------------------------------------------------------------------
// The native protocol and the Kafka protocol see the same log

#[test]
fn records_cross_between_the_native_protocol_and_kafka_at_the_same_offsets() {
    let broker = start_broker();
    let topic = "bridge";
    create_topic(&broker, topic, 1);

    // Native in, Kafka out.
    let output = run_bounded(
        rill_command().args([
            "produce",
            topic,
            "--partition",
            "0",
            "--key",
            "native-key",
            "--broker",
            &broker.address(),
        ]),
        b"alpha\nbeta\ngamma\n",
    );
    assert!(
        output.status.success(),
        "rill produce: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let records = read_partition(&broker.kafka_address(), topic, 0, 0, 3);
    for (index, (record, value)) in records.iter().zip(["alpha", "beta", "gamma"]).enumerate() {
        assert_eq!(record.offset, index as i64);
        assert_eq!(record.value.as_deref(), Some(value.as_bytes()));
        assert_eq!(record.key.as_deref(), Some(&b"native-key"[..]));
        assert!(
            matches!(record.timestamp, Timestamp::CreateTime(time) if time > BASE_TIMESTAMP),
            "a create time: {:?}",
            record.timestamp
        );
    }

    // Kafka in, native out.
    let producer = producer(&broker.kafka_address(), &[]);
    for index in 0..2i64 {
        let value = format!("from-kafka-{index}");
        let key = format!("kafka-key-{index}");
        send(
            &producer,
            BaseRecord::to(topic)
                .partition(0)
                .key(key.as_bytes())
                .payload(value.as_bytes())
                .timestamp(BASE_TIMESTAMP + index)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "origin",
                    value: Some(&b"kafka"[..]),
                })),
        );
    }
    assert_eq!(flush_ok(&producer), [(0, 3), (0, 4)]);
    let output = run_bounded(
        rill_command().args([
            "consume",
            topic,
            "--partition",
            "0",
            "--offset",
            "3",
            "--max-records",
            "2",
            "--output",
            "json",
            "--broker",
            &broker.address(),
        ]),
        b"",
    );
    assert!(
        output.status.success(),
        "rill consume: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .collect();
    assert_eq!(lines.len(), 2, "two records: {stdout}");
    for (index, record) in lines.iter().enumerate() {
        let index = index as i64;
        assert_eq!(record["offset"], 3 + index, "{record}");
        assert_eq!(record["partition"], 0);
        assert_eq!(record["timestamp"], BASE_TIMESTAMP + index);
        assert_eq!(record["key"], format!("kafka-key-{index}"));
        assert_eq!(record["value"], format!("from-kafka-{index}"));
        assert_eq!(
            record["headers"],
            serde_json::json!([{"key": "origin", "value": "kafka"}])
        );
    }
}

// ---------------------------------------------------------------------------
// Transactions are refused clearly

#[test]
fn a_transactional_producer_gets_a_clear_error_not_a_hang() {
    let broker = start_broker();
    let producer = producer(
        &broker.kafka_address(),
        &[
            ("transactional.id", "rill-tests-tx"),
            ("transaction.timeout.ms", "10000"),
            ("message.timeout.ms", "10000"),
        ],
    );
    let timeout = Duration::from_secs(30);
    let started = Instant::now();
    let result = producer.init_transactions(timeout);
    let elapsed = started.elapsed();
    eprintln!("init_transactions after {elapsed:?}: {result:?}");
    let error = result.expect_err("Rill has no transactions: init_transactions must fail");
    assert!(
        elapsed < Duration::from_secs(20),
        "init_transactions took {elapsed:?} to fail ({error})"
    );
    assert_ne!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::OperationTimedOut),
        "a clear error, not a time-out: {error}"
    );
}

// ---------------------------------------------------------------------------
// The raw protocol: ApiVersions too new, garbage, oversized frames

fn raw_connection(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
}

#[test]
fn api_versions_too_new_is_answered_with_v0_unsupported_version_and_the_api_list() {
    let broker = start_broker();
    let mut stream = raw_connection(broker.kafka);
    // Request header v2 (flexible): api key 18, version 127, correlation id,
    // client id, no tagged fields; body as ApiVersions v3+ would have it.
    let mut request = Vec::new();
    request.extend_from_slice(&18i16.to_be_bytes());
    request.extend_from_slice(&127i16.to_be_bytes());
    request.extend_from_slice(&4242i32.to_be_bytes());
    let client_id = b"rill-tests";
    request.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    request.extend_from_slice(client_id);
    request.push(0); // tagged fields
    for text in [&b"rill-tests"[..], b"1.0"] {
        request.push(text.len() as u8 + 1);
        request.extend_from_slice(text);
    }
    request.push(0); // tagged fields
    let mut frame = (request.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&request);
    stream.write_all(&frame).expect("send ApiVersions v127");

    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .expect("an answer to ApiVersions v127");
    let size = i32::from_be_bytes(size);
    assert!((10..1_000_000).contains(&size), "response size {size}");
    let mut body = vec![0u8; size as usize];
    stream.read_exact(&mut body).expect("the whole response");
    let i16_at = |at: usize| i16::from_be_bytes([body[at], body[at + 1]]);
    let i32_at =
        |at: usize| i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
    assert_eq!(i32_at(0), 4242, "correlation id");
    assert_eq!(i16_at(4), 35, "error code UNSUPPORTED_VERSION");
    let count = i32_at(6);
    assert!(count > 0, "a non-empty api list");
    assert_eq!(
        body.len(),
        10 + count as usize * 6,
        "a v0 body: error code, then {count} (key, min, max) entries and nothing else"
    );
    let apis: BTreeMap<i16, (i16, i16)> = (0..count as usize)
        .map(|entry| {
            let at = 10 + entry * 6;
            (i16_at(at), (i16_at(at + 2), i16_at(at + 4)))
        })
        .collect();
    for key in [0i16, 1, 3, 18] {
        let (min, max) = apis
            .get(&key)
            .copied()
            .unwrap_or_else(|| panic!("api {key} listed: {apis:?}"));
        assert!(min <= max, "api {key}: {min}..{max}");
    }
    assert!(
        apis[&18].1 >= 3,
        "ApiVersions up to at least v3: {:?}",
        apis[&18]
    );
}

/// Whether the broker closes `stream` within the read timeout (any bytes it
/// sends first, such as an error answer, are skipped).
fn closed_by_broker(stream: &mut TcpStream) -> Result<(), String> {
    let mut buffer = [0u8; 4096];
    let started = Instant::now();
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ) =>
            {
                return Ok(());
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("still open after {:?}", started.elapsed()));
            }
            Err(error) => return Err(format!("read error {error}")),
        }
    }
}

#[test]
fn garbage_and_oversized_frames_close_only_their_own_connection() {
    let broker = start_broker();
    let topic = "survivor";
    create_topic(&broker, topic, 1);
    let producer = producer(&broker.kafka_address(), &[]);
    send(
        &producer,
        BaseRecord::to(topic).partition(0).payload(&b"before"[..]),
    );
    assert_eq!(flush_ok(&producer), [(0, 0)]);

    let mut noise = Vec::with_capacity(4096);
    let mut state = 0x2545_f491_u32;
    while noise.len() < 4096 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        noise.extend_from_slice(&state.to_be_bytes());
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "text that is not Kafka",
            b"\x00\x00\x00\x0cnot kafka!!!".to_vec(),
        ),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: rill\r\n\r\n".to_vec(),
        ),
        (
            "a 2 GiB length prefix",
            [&0x7fff_ffffu32.to_be_bytes()[..], b"xxxx"].concat(),
        ),
        (
            "a 256 MiB + 1 length prefix",
            [&(256u32 * 1024 * 1024 + 1).to_be_bytes()[..], b"x"].concat(),
        ),
        (
            "a negative length prefix",
            [&(-1i32).to_be_bytes()[..], b"xxxx"].concat(),
        ),
        ("random bytes", noise),
    ];
    for (what, bytes) in &cases {
        let mut stream = raw_connection(broker.kafka);
        // The broker may close before all is written; that is fine.
        let _ = stream.write_all(bytes);
        if let Err(problem) = closed_by_broker(&mut stream) {
            panic!("{what}: the broker did not close the connection: {problem}");
        }
        // The well-behaved client is unaffected.
        let value = format!("after {what}");
        send(
            &producer,
            BaseRecord::to(topic).partition(0).payload(value.as_bytes()),
        );
        assert_eq!(flush_ok(&producer).len(), 1, "{what}: produce still works");
    }
    let records = read_partition(&broker.kafka_address(), topic, 0, 0, cases.len() + 1);
    assert_eq!(records[0].value.as_deref(), Some(&b"before"[..]));
    for (record, (what, _)) in records[1..].iter().zip(&cases) {
        assert_eq!(
            record.value.as_deref(),
            Some(format!("after {what}").as_bytes())
        );
    }
}

// ---------------------------------------------------------------------------
// Other clients: kafka-python and kcat

const KAFKA_PYTHON_SCRIPT: &str = r#"
import sys, time
from kafka import KafkaProducer, KafkaConsumer, TopicPartition

bootstrap, topic, group = sys.argv[1:4]
base = 1700000000000
producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type="gzip",
                         request_timeout_ms=20000, max_block_ms=20000)
futures = [producer.send(topic, key=b"k%d" % i, value=b"v%d" % i, partition=0,
                         headers=[("h", b"%d" % i)], timestamp_ms=base + i) for i in range(5)]
offsets = [future.get(timeout=30).offset for future in futures]
assert offsets == [0, 1, 2, 3, 4], "produce offsets %r" % offsets
producer.close(timeout=10)

consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                         auto_offset_reset="earliest", enable_auto_commit=False,
                         session_timeout_ms=6000, heartbeat_interval_ms=500,
                         request_timeout_ms=20000)
records = []
deadline = time.monotonic() + 60
while len(records) < 5:
    assert time.monotonic() < deadline, "consumed %d of 5 records" % len(records)
    for batch in consumer.poll(timeout_ms=200).values():
        records.extend(batch)
for i, record in enumerate(records):
    assert (record.offset, record.key, record.value, record.timestamp) == (i, b"k%d" % i, b"v%d" % i, base + i), record
    assert [(k, v) for k, v in record.headers] == [("h", b"%d" % i)], record.headers
consumer.commit()
partition = TopicPartition(topic, 0)
committed = consumer.committed(partition)
assert committed == 5, "committed %r" % committed
consumer.close()

again = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                      request_timeout_ms=20000)
assert again.committed(partition) == 5, "committed after reconnecting"
again.close()
print("kafka-python ok")
"#;

#[test]
fn kafka_python_produces_consumes_and_commits_in_a_group() {
    let probe = Command::new("python3")
        .args(["-c", "import kafka; print(kafka.__version__)"])
        .output();
    let version = match probe {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        }
        Ok(output) => panic!(
            "kafka-python is missing (python3 -c 'import kafka': {}); scripts/test.sh installs it with pip",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => panic!("python3 is missing ({error}); scripts/test.sh expects it"),
    };
    eprintln!("kafka-python {version}");
    let broker = start_broker();
    let output = run_bounded(
        Command::new("python3").args([
            "-c",
            KAFKA_PYTHON_SCRIPT,
            &broker.kafka_address(),
            "python-topic",
            "python-group",
        ]),
        b"",
    );
    assert!(
        output.status.success(),
        "kafka-python failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn kcat() -> Command {
    match Command::new("kcat").arg("-V").output() {
        Ok(output) if output.status.success() => Command::new("kcat"),
        _ => panic!("kcat is missing from PATH; scripts/test.sh installs the Debian package kcat"),
    }
}

fn kcat_ok(arguments: &[&str], input: &[u8]) -> String {
    let output = run_bounded(kcat().args(arguments), input);
    assert!(
        output.status.success(),
        "kcat {arguments:?} failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 from kcat")
}

#[test]
fn kcat_produces_consumes_and_balances_a_group() {
    let kcat_version = kcat().arg("-V").output().expect("kcat -V");
    eprintln!("{}", String::from_utf8_lossy(&kcat_version.stdout));
    let broker = start_broker();
    let bootstrap = broker.kafka_address();
    let topic = "kcat-topic";
    // Auto-created by kcat's produce (topics.auto_create is on by default).
    kcat_ok(
        &[
            "-b",
            &bootstrap,
            "-P",
            "-t",
            topic,
            "-p",
            "0",
            "-K",
            ":",
            "-H",
            "origin=kcat",
            "-z",
            "snappy",
        ],
        b"k0:v0\nk1:v1\nk2:v2\n",
    );
    let consumed = kcat_ok(
        &[
            "-b",
            &bootstrap,
            "-C",
            "-t",
            topic,
            "-p",
            "0",
            "-o",
            "beginning",
            "-e",
            "-f",
            "%o|%k|%s|%h\n",
        ],
        b"",
    );
    assert_eq!(
        consumed,
        "0|k0|v0|origin=kcat\n1|k1|v1|origin=kcat\n2|k2|v2|origin=kcat\n"
    );

    // A balanced consumer group: reads everything, commits on close.
    let grouped = kcat_ok(
        &[
            "-b",
            &bootstrap,
            "-G",
            "kcat-group",
            "-X",
            "auto.offset.reset=earliest",
            "-X",
            "session.timeout.ms=6000",
            "-c",
            "3",
            "-f",
            "%p/%o %s\n",
            topic,
        ],
        b"",
    );
    assert_eq!(grouped, "0/0 v0\n0/1 v1\n0/2 v2\n");
    let checker = consumer(&bootstrap, Some("kcat-group"), &[]);
    let mut asked = TopicPartitionList::new();
    asked.add_partition(topic, 0);
    let committed = checker
        .committed_offsets(asked, DEADLINE)
        .expect("committed");
    assert_eq!(
        committed
            .find_partition(topic, 0)
            .map(|element| element.offset()),
        Some(Offset::Offset(3)),
        "kcat's group committed its position on close"
    );
}

/// The proxy's own controls work against a real Kafka client: cutting a
/// consumer's connections does not lose or repeat records.
#[test]
fn a_consumer_reconnects_after_its_connections_are_cut() {
    let ports = Ports::free();
    let proxy = Proxy::start(ports.kafka);
    let advertised = format!("kafka.advertised_port={}", proxy.port());
    let mut settings = BROKER_SETTINGS.to_vec();
    settings.push(&advertised);
    let broker = Broker::start_on(ports, &settings);
    let topic = "cut-reader";
    create_topic(&broker, topic, 1);
    let producer = producer(&broker.kafka_address(), &[]);
    for index in 0..1000 {
        let value = format!("{index:05}");
        send(
            &producer,
            BaseRecord::to(topic).partition(0).payload(value.as_bytes()),
        );
    }
    flush_ok(&producer);

    let reader = consumer(
        &proxy.address().to_string(),
        None,
        &[
            ("message.max.bytes", "4096"),
            ("fetch.max.bytes", "4096"),
            ("max.partition.fetch.bytes", "1024"),
        ],
    );
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("offset");
    reader.assign(&assignment).expect("assign");
    let mut next = 0i64;
    let started = Instant::now();
    while next < 1000 {
        assert!(
            started.elapsed() < DEADLINE,
            "read {next} of 1000 through cuts"
        );
        if let Some(message) = reader.poll(Duration::from_millis(100)) {
            let message = message.expect("consume");
            assert_eq!(message.offset(), next, "in order, none repeated or lost");
            assert_eq!(message.payload(), Some(format!("{next:05}").as_bytes()));
            next += 1;
            if next % 250 == 0 {
                proxy.cut_all();
            }
        }
    }
    wait_until("the reader to reconnect", DEADLINE, || proxy.accepted() > 1);
}

// ---------------------------------------------------------------------------
// SASL

/// A broker whose Kafka listener wants SASL (PLAIN or SCRAM-SHA-256), with
/// one user `edge`, made with `rill mqtt passwd` as a user would.
fn start_sasl_broker() -> (Broker, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let output = run_bounded(
        rill_command().args(["mqtt", "passwd", "edge"]),
        b"edge-secret\n",
    );
    assert!(output.status.success(), "rill mqtt passwd failed");
    let users = directory.path().join("kafka-users");
    std::fs::write(&users, &output.stdout).expect("users file");
    let users_setting = format!("kafka.sasl_users_file={}", users.display());
    let mut settings = BROKER_SETTINGS.to_vec();
    settings.push(&users_setting);
    (Broker::start(&settings), directory)
}

fn sasl_settings<'a>(mechanism: &'a str, password: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanisms", mechanism),
        ("sasl.username", "edge"),
        ("sasl.password", password),
    ]
}

const KAFKA_PYTHON_SASL_SCRIPT: &str = r#"
import sys
from kafka import KafkaProducer, KafkaConsumer, TopicPartition

bootstrap, topic, mechanism, password, expect = sys.argv[1:6]
auth = dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism,
            sasl_plain_username="edge", sasl_plain_password=password)
if expect == "refused":
    try:
        KafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000, max_block_ms=5000,
                      api_version_auto_timeout_ms=5000, **auth)
    except Exception as error:
        print("refused:", type(error).__name__, error)
        sys.exit(0)
    sys.exit("a wrong password was let in")
value = b"over " + mechanism.encode()
producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=20000,
                         max_block_ms=20000, **auth)
offset = producer.send(topic, value=value, partition=0).get(timeout=30).offset
producer.close(timeout=10)
consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                         request_timeout_ms=20000, consumer_timeout_ms=20000, **auth)
partition = TopicPartition(topic, 0)
consumer.assign([partition])
consumer.seek(partition, offset)
record = next(iter(consumer))
assert record.value == value, record
consumer.close()
print("kafka-python", mechanism, "ok at offset", offset)
"#;

fn kafka_python_sasl(broker: &Broker, mechanism: &str, password: &str, expect: &str) {
    let output = run_bounded(
        Command::new("python3").args([
            "-c",
            KAFKA_PYTHON_SASL_SCRIPT,
            &broker.kafka_address(),
            "sasl-python",
            mechanism,
            password,
            expect,
        ]),
        b"",
    );
    assert!(
        output.status.success(),
        "kafka-python {mechanism} ({expect}) failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim());
}

#[test]
fn sasl_clients_authenticate_and_a_wrong_password_is_refused() {
    let (broker, _users) = start_sasl_broker();
    let bootstrap = broker.kafka_address();
    let topic = "sasl-topic";

    // librdkafka with PLAIN (this build has no OpenSSL, which its SCRAM needs).
    let plain = sasl_settings("PLAIN", "edge-secret");
    let writer = producer(&bootstrap, &plain);
    for index in 0..3u8 {
        send(
            &writer,
            BaseRecord::to(topic)
                .partition(0)
                .key(&[index][..])
                .payload(&b"authenticated"[..]),
        );
    }
    assert_eq!(flush_ok(&writer).len(), 3);
    let reader = consumer(&bootstrap, None, &plain);
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("offset");
    reader.assign(&assignment).expect("assign");
    let mut read = Vec::new();
    let started = Instant::now();
    while read.len() < 3 {
        assert!(started.elapsed() < DEADLINE, "read {} of 3", read.len());
        match reader.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => read.push(record_of(&message)),
            Some(Err(error)) => panic!("consume error: {error}"),
            None => {}
        }
    }
    assert!(
        read.iter()
            .all(|record| record.value.as_deref() == Some(b"authenticated"))
    );

    // The wrong password gets no metadata, within a bound.
    let intruder = producer(&bootstrap, &sasl_settings("PLAIN", "guess"));
    let refused = intruder
        .client()
        .fetch_metadata(None, Duration::from_secs(3));
    assert!(refused.is_err(), "a wrong password was let in: {refused:?}");

    // Without SASL at all: the broker closes the connection, no metadata.
    let anonymous = producer(&bootstrap, &[]);
    assert!(
        anonymous
            .client()
            .fetch_metadata(None, Duration::from_secs(3))
            .is_err(),
        "an unauthenticated client was served"
    );

    // kafka-python with SCRAM-SHA-256 and with PLAIN, and refused.
    kafka_python_sasl(&broker, "SCRAM-SHA-256", "edge-secret", "ok");
    kafka_python_sasl(&broker, "PLAIN", "edge-secret", "ok");
    kafka_python_sasl(&broker, "SCRAM-SHA-256", "guess", "refused");
}

// ---------------------------------------------------------------------------
// A Go client: sarama, built from Debian's sources

/// Builds tests/clients/sarama (Go, GOPATH mode against the sources Debian's
/// golang-github-shopify-sarama-dev installs) into `directory`.
fn build_sarama_client(directory: &std::path::Path) -> std::path::PathBuf {
    let gopath = "/usr/share/gocode";
    assert!(
        std::path::Path::new(gopath)
            .join("src/github.com/Shopify/sarama")
            .exists(),
        "sarama's sources are missing; scripts/test.sh installs golang-go and golang-github-shopify-sarama-dev"
    );
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/sarama/main.go");
    let binary = directory.join("sarama-client");
    let output = run_bounded(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(&source)
            .env("GO111MODULE", "off")
            .env("GOPATH", gopath)
            .env("GOCACHE", directory.join("go-cache"))
            .env("GOFLAGS", ""),
        b"",
    );
    assert!(
        output.status.success(),
        "building the sarama client failed (is golang-go installed?):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

#[test]
fn a_go_client_sarama_produces_consumes_and_commits_in_a_group() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let client = build_sarama_client(directory.path());
    let broker = start_broker();
    // sarama of Debian 12 asks no ApiVersions: it sends the versions of its
    // configured Kafka version, OffsetCommit v1 among them.
    let output = run_bounded(
        Command::new(&client).args([&broker.kafka_address(), "go-topic"]),
        b"",
    );
    assert!(
        output.status.success(),
        "the sarama client failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("sarama ok"));
}
