//! Broker figures over the Kafka wire protocol with a real Kafka client,
//! librdkafka (through rdkafka), next to the native protocol on the same
//! broker in the same run: produce and consume throughput of the same
//! records over both protocols, interleaved round by round so a slow spell
//! of the machine is slow for both, and Kafka produce latency at a fixed
//! offered rate with acks=all, counted from each record's intended send time
//! (a stalled broker cannot hide its stall: no coordinated omission).
//!
//! Set `KAFKA_BENCH_DEBUG` to a librdkafka `debug` value (say
//! `protocol,broker`) to see the client's side of a failure on stderr (not a
//! `RILL_` name: the broker refuses unknown `RILL_` variables).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::broker::{BrokerProcess, own_cpu_seconds};
use crate::native;
use crate::native::LatencyFigures;
use crate::storage::{RECORD_VALUE_BYTES, RECORDS_PER_BATCH, producer_batch};

/// The environment variable whose value becomes librdkafka's `debug` setting.
pub const DEBUG_VARIABLE: &str = "KAFKA_BENCH_DEBUG";
/// The longest one phase (a produce with its flush, a consume) may take.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);

/// Librdkafka producer settings of the throughput rounds: batches of about
/// 64 KiB (62 records of 1 KiB, as the native batches), as many requests in
/// flight as the native producer's window, acks=1, no compression.
pub const PRODUCER_SETTINGS: &[(&str, &str)] = &[
    ("acks", "1"),
    // A throughput producer wants to hear of failures only: a report per
    // delivered record costs the client about a tenth of its CPU. The run
    // still proves every record landed: no failure, a flush that leaves
    // nothing outstanding, and the partition's end offset after it.
    ("delivery.report.only.error", "true"),
    ("linger.ms", "5"),
    ("batch.size", "65536"),
    ("max.in.flight.requests.per.connection", "64"),
    ("compression.type", "none"),
    ("enable.idempotence", "false"),
];
/// The latency run's producer: acks=all and a 1 ms linger, so the figure is
/// mostly the broker's (a record waits at most 1 ms for its batch to fill).
pub const LATENCY_PRODUCER_SETTINGS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("linger.ms", "1"),
    ("batch.size", "65536"),
    ("max.in.flight.requests.per.connection", "64"),
    ("compression.type", "none"),
    ("enable.idempotence", "false"),
];
/// Librdkafka consumer settings: 4 MiB fetches like the native consumer, and
/// a prefetch queue of a few fetches that is refilled as soon as it drains
/// (librdkafka's default waits a whole second once the queue was full).
pub const CONSUMER_SETTINGS: &[(&str, &str)] = &[
    ("fetch.max.bytes", "4194304"),
    ("max.partition.fetch.bytes", "4194304"),
    ("fetch.min.bytes", "1"),
    ("fetch.wait.max.ms", "100"),
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.queue.backoff.ms", "1"),
    // librdkafka assigns partitions only with a group id; nothing is committed.
    ("group.id", "rill-bench"),
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

/// How much each part of the scenario does.
pub struct Plan {
    /// Bytes each produce of each round writes (native and Kafka alike).
    pub bytes: u64,
    pub rounds: usize,
    pub latency_offered_bytes_per_second: f64,
    pub latency_duration: Duration,
}

/// One measured phase: speed, and the CPU the broker and this process (the
/// client) spent per GiB moved.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub bytes_per_second: f64,
    pub broker_cpu_seconds_per_gib: f64,
    pub client_cpu_seconds_per_gib: f64,
}

pub struct Round {
    pub native_produce: Phase,
    pub kafka_produce: Phase,
    pub native_consume: Phase,
    pub kafka_consume: Phase,
    /// Whether the page cache was dropped before each consume.
    pub cold: bool,
}

pub struct Figures {
    pub rounds: Vec<Round>,
    /// Bytes of each produce and consume.
    pub bytes: u64,
    pub latency: LatencyFigures,
    pub peak_resident_kib: u64,
}

/// Runs the scenario against one broker: `plan.rounds` rounds of native and
/// Kafka produce then consume of the same bytes (the order alternating from
/// round to round), then the latency run.
pub fn run(data_dir: &Path, plan: &Plan) -> anyhow::Result<Figures> {
    let broker = BrokerProcess::start(
        data_dir,
        &[
            "node.shards=2".into(),
            format!("node.memory_budget_bytes={}", 512 * 1024 * 1024),
            // acks=all waits for a sync that covers the batch.
            "topic_defaults.fsync=every-batch".into(),
        ],
    )?;
    let runtime = compio::runtime::Runtime::new()?;
    let batch = producer_batch();
    let batches = plan.bytes.div_ceil(batch.len() as u64);
    let bytes = batches * batch.len() as u64;
    let records = batches * RECORDS_PER_BATCH as u64;
    let client = runtime.block_on(native::connect(&broker))?;
    let mut rounds = Vec::new();
    for round in 0..plan.rounds {
        let native_topic = format!("native-{round}");
        let kafka_topic = format!("kafka-{round}");
        runtime.block_on(async {
            client.create_topic(&native_topic, 1, &[]).await?;
            client.create_topic(&kafka_topic, 1, &[]).await?;
            anyhow::Ok(())
        })?;
        let native_first = round % 2 == 0;
        let produce_native = || {
            eprintln!(
                "round {}/{}: native produce, {} MiB",
                round + 1,
                plan.rounds,
                bytes >> 20
            );
            measure(&broker, bytes, || {
                let sent = runtime.block_on(native::produce_windowed(
                    &client,
                    &native_topic,
                    1,
                    &batch,
                    bytes,
                ))?;
                anyhow::ensure!(sent == bytes, "native produce sent {sent} of {bytes} bytes");
                Ok(())
            })
            .context("native produce")
        };
        let produce_kafka = || {
            eprintln!(
                "round {}/{}: Kafka produce (librdkafka), {} MiB",
                round + 1,
                plan.rounds,
                bytes >> 20
            );
            kafka_produce(&broker, &kafka_topic, records, bytes).context("Kafka produce")
        };
        let (native_produce, kafka_produce) = if native_first {
            let native = produce_native()?;
            (native, produce_kafka()?)
        } else {
            let kafka = produce_kafka()?;
            (produce_native()?, kafka)
        };
        // Both consumers read the natively produced topic: the same batches,
        // each from the disk when the page cache can be dropped.
        let cold = std::cell::Cell::new(true);
        let consume_native = || {
            eprintln!(
                "round {}/{}: native consume of {native_topic}",
                round + 1,
                plan.rounds
            );
            cold.set(cold.get() & crate::machine::drop_page_cache());
            measure(&broker, bytes, || {
                let consumed = runtime.block_on(native::consume_all(
                    &client,
                    &native_topic,
                    1,
                    native::FETCH_BYTES,
                ))?;
                anyhow::ensure!(
                    consumed == bytes,
                    "native consume read {consumed} of {bytes} bytes"
                );
                Ok(())
            })
            .context("native consume")
        };
        let consume_kafka = || {
            eprintln!(
                "round {}/{}: Kafka consume (librdkafka) of {native_topic}",
                round + 1,
                plan.rounds
            );
            cold.set(cold.get() & crate::machine::drop_page_cache());
            kafka_consume(&broker, &native_topic, records, bytes).context("Kafka consume")
        };
        let (native_consume, kafka_consume) = if native_first {
            let native = consume_native()?;
            (native, consume_kafka()?)
        } else {
            let kafka = consume_kafka()?;
            (consume_native()?, kafka)
        };
        rounds.push(Round {
            native_produce,
            kafka_produce,
            native_consume,
            kafka_consume,
            cold: cold.get(),
        });
    }
    drop(client);
    eprintln!(
        "Kafka produce at {:.0} MB/s offered for {} s, acks=all",
        plan.latency_offered_bytes_per_second / 1e6,
        plan.latency_duration.as_secs_f64()
    );
    runtime.block_on(async {
        let client = native::connect(&broker).await?;
        client.create_topic("kafka-latency", 1, &[]).await?;
        anyhow::Ok(())
    })?;
    let latency = kafka_latency(
        &broker,
        "kafka-latency",
        plan.latency_offered_bytes_per_second,
        plan.latency_duration,
    )
    .context("Kafka produce latency")?;
    let (_, peak_resident_kib) = broker.resident_kib()?;
    broker.stop()?;
    Ok(Figures {
        rounds,
        bytes,
        latency,
        peak_resident_kib,
    })
}

/// Times `work`, which moves `bytes`, with the CPU both sides spent on it.
fn measure(
    broker: &BrokerProcess,
    bytes: u64,
    work: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Phase> {
    let broker_before = broker.cpu_seconds()?;
    let client_before = own_cpu_seconds();
    let started = Instant::now();
    work()?;
    let elapsed = started.elapsed().as_secs_f64();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    Ok(Phase {
        bytes_per_second: bytes as f64 / elapsed,
        broker_cpu_seconds_per_gib: (broker.cpu_seconds()? - broker_before) / gib,
        client_cpu_seconds_per_gib: (own_cpu_seconds() - client_before) / gib,
    })
}

/// What a librdkafka client saw: its log lines and errors go to stderr,
/// deliveries are counted, and (for the latency run) each delivered record's
/// latency from its intended send time is recorded.
struct BenchContext {
    name: &'static str,
    /// The instant delivery opaques count from.
    base: Instant,
    delivered: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
    latencies: Option<Mutex<Histogram<u64>>>,
}

impl BenchContext {
    fn new(name: &'static str, latencies: Option<Histogram<u64>>) -> Self {
        Self {
            name,
            base: Instant::now(),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_failure: Mutex::new(None),
            latencies: latencies.map(Mutex::new),
        }
    }

    /// Fails if any record failed (delivery reports on errors only).
    fn check_no_failures(&self, records: u64) -> anyhow::Result<()> {
        let failed = self.failed.load(Ordering::Acquire);
        if failed > 0 {
            let first = self
                .first_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_default();
            anyhow::bail!("{failed} of {records} records were not delivered; the first: {first}");
        }
        Ok(())
    }

    /// Fails unless exactly `records` were delivered and none failed.
    fn check_deliveries(&self, records: u64) -> anyhow::Result<()> {
        self.check_no_failures(records)?;
        let delivered = self.delivered.load(Ordering::Acquire);
        anyhow::ensure!(
            delivered == records,
            "{delivered} of {records} records were reported delivered"
        );
        Ok(())
    }
}

impl ClientContext for BenchContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        eprintln!("[{} librdkafka {level:?} {facility}] {message}", self.name);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("[{} librdkafka error] {error}: {reason}", self.name);
    }
}

impl ProducerContext for BenchContext {
    /// Nanoseconds from `base` to the record's intended send time (read by
    /// the latency run only).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, intended_nanos: usize) {
        match result {
            Ok(_) => {
                if let Some(latencies) = &self.latencies {
                    let intended = self.base + Duration::from_nanos(intended_nanos as u64);
                    let micros = intended.elapsed().as_micros().max(1) as u64;
                    latencies
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .saturating_record(micros);
                }
                self.delivered.fetch_add(1, Ordering::AcqRel);
            }
            Err((error, message)) => {
                self.failed.fetch_add(1, Ordering::AcqRel);
                let mut first = self
                    .first_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if first.is_none() {
                    *first = Some(format!(
                        "{}/{}: {error}",
                        message.topic(),
                        message.partition()
                    ));
                }
            }
        }
    }
}

impl ConsumerContext for BenchContext {}

type BenchProducer = ThreadedProducer<BenchContext>;

fn client_config(broker: &BrokerProcess, settings: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &broker.kafka)
        .set("client.id", "rill-bench")
        .set("socket.timeout.ms", "30000")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in settings {
        config.set(*key, *value);
    }
    if let Ok(debug) = std::env::var(DEBUG_VARIABLE)
        && !debug.is_empty()
    {
        config
            .set("debug", debug)
            .set_log_level(RDKafkaLogLevel::Debug);
    }
    config
}

/// A producer that has connected and learned `topic`'s leader, so no clock
/// that starts after this counts the connection.
fn producer(
    broker: &BrokerProcess,
    topic: &str,
    settings: &[(&str, &str)],
    context: BenchContext,
) -> anyhow::Result<BenchProducer> {
    let mut config = client_config(broker, settings);
    // Producers only: message.timeout.ms is a producer setting.
    config.set("message.timeout.ms", "60000");
    let producer: BenchProducer = config
        .create_with_context(context)
        .context("creating a librdkafka producer")?;
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("Kafka metadata for {topic} from {}", broker.kafka))?;
    Ok(producer)
}

/// Sends a record, waiting while librdkafka's queue is full.
fn send(
    producer: &BenchProducer,
    mut record: BaseRecord<'_, [u8], [u8], usize>,
) -> anyhow::Result<()> {
    let mut full_since = None;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                let since = *full_since.get_or_insert_with(Instant::now);
                anyhow::ensure!(
                    since.elapsed() < PHASE_DEADLINE,
                    "librdkafka's queue stayed full for {} s: the broker stopped acknowledging",
                    PHASE_DEADLINE.as_secs()
                );
                record = back;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err((error, _)) => anyhow::bail!("librdkafka refused a record: {error}"),
        }
    }
}

/// The keys and values of one native batch's records (storage::producer_batch).
fn batch_records() -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..RECORDS_PER_BATCH)
        .map(|index| {
            let value = (0..RECORD_VALUE_BYTES)
                .map(|byte| (byte * 31 + index) as u8)
                .collect();
            (format!("sensor-{index}").into_bytes(), value)
        })
        .collect()
}

/// Produces `records` records (the native batches' records, in order) to
/// partition 0 of `topic` and waits for every delivery report; `bytes` is
/// what the same records weigh as native batches.
pub(crate) fn kafka_produce(
    broker: &BrokerProcess,
    topic: &str,
    records: u64,
    bytes: u64,
) -> anyhow::Result<Phase> {
    let producer = producer(
        broker,
        topic,
        PRODUCER_SETTINGS,
        BenchContext::new("producer", None),
    )?;
    let contents = batch_records();
    let phase = measure(broker, bytes, || {
        for index in 0..records {
            let (key, value) = &contents[(index % RECORDS_PER_BATCH as u64) as usize];
            send(
                &producer,
                BaseRecord::with_opaque_to(topic, 0)
                    .partition(0)
                    .key(key.as_slice())
                    .payload(value.as_slice()),
            )?;
        }
        producer
            .flush(PHASE_DEADLINE)
            .context("flushing the librdkafka producer")?;
        producer.context().check_no_failures(records)
    })?;
    let (low, high) = producer
        .client()
        .fetch_watermarks(topic, 0, Duration::from_secs(30))
        .with_context(|| format!("the offsets of {topic} after the Kafka produce"))?;
    anyhow::ensure!(
        u64::try_from(high - low).ok() == Some(records),
        "{topic} holds offsets {low}..{high} after {records} records were produced"
    );
    Ok(phase)
}

/// Reads `records` records of partition 0 of `topic` from offset 0 with an
/// assigned consumer (no group membership, no commits), checking that offsets follow each other
/// and every value is whole.
fn kafka_consume(
    broker: &BrokerProcess,
    topic: &str,
    records: u64,
    bytes: u64,
) -> anyhow::Result<Phase> {
    let config = client_config(broker, CONSUMER_SETTINGS);
    let consumer: BaseConsumer<BenchContext> = config
        .create_with_context(BenchContext::new("consumer", None))
        .context("creating a librdkafka consumer")?;
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("Kafka metadata for {topic} from {}", broker.kafka))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Offset(0))?;
    consumer.assign(&assignment)?;
    measure(broker, bytes, || {
        let started = Instant::now();
        let mut received = 0u64;
        while received < records {
            anyhow::ensure!(
                started.elapsed() < PHASE_DEADLINE,
                "read {received} of {records} records within {} s",
                PHASE_DEADLINE.as_secs()
            );
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    anyhow::ensure!(
                        message.offset() == received as i64,
                        "expected offset {received}, got {}",
                        message.offset()
                    );
                    let length = message.payload().map_or(0, <[u8]>::len);
                    anyhow::ensure!(
                        length == RECORD_VALUE_BYTES,
                        "offset {received}: a value of {length} bytes"
                    );
                    received += 1;
                }
                Some(Err(error)) => anyhow::bail!("consume error at offset {received}: {error}"),
                None => {}
            }
        }
        Ok(())
    })
}

/// Produces 1 KiB records to partition 0 of `topic` at a fixed offered rate
/// (bytes counted as in native batches) for `duration`, acks=all. Each
/// record's latency runs from its intended send time on the schedule to its
/// delivery report, whatever the sender or broker did in between.
fn kafka_latency(
    broker: &BrokerProcess,
    topic: &str,
    offered_bytes_per_second: f64,
    duration: Duration,
) -> anyhow::Result<LatencyFigures> {
    let histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let producer = producer(
        broker,
        topic,
        LATENCY_PRODUCER_SETTINGS,
        BenchContext::new("latency producer", Some(histogram)),
    )?;
    let record_bytes = producer_batch().len() as f64 / RECORDS_PER_BATCH as f64;
    let interval = Duration::from_secs_f64(record_bytes / offered_bytes_per_second);
    let contents = batch_records();
    let base = producer.context().base;
    let started = Instant::now();
    let mut sent = 0u32;
    while started.elapsed() < duration {
        let intended = started + interval * sent;
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let (key, value) = &contents[sent as usize % RECORDS_PER_BATCH];
        let opaque = (intended - base).as_nanos() as usize;
        send(
            &producer,
            BaseRecord::with_opaque_to(topic, opaque)
                .partition(0)
                .key(key.as_slice())
                .payload(value.as_slice()),
        )?;
        sent += 1;
    }
    producer
        .flush(PHASE_DEADLINE)
        .context("flushing the librdkafka producer")?;
    let elapsed = started.elapsed();
    let context = producer.context();
    context.check_deliveries(u64::from(sent))?;
    let histogram = context
        .latencies
        .as_ref()
        .context("the latency producer has a histogram")?
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(LatencyFigures::from_histogram(
        &histogram,
        offered_bytes_per_second,
        f64::from(sent) * record_bytes,
        elapsed,
    ))
}
