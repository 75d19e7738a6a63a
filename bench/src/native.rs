//! Broker figures over the native protocol: produce and consume throughput
//! against the loopback and disk limits, durable-produce latency at a fixed
//! offered rate (counted from the intended send time, so a stalled broker
//! cannot hide its stall), CPU per gigabyte, and resident memory idle and
//! under load.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rill_node::client::{Client, ClientConfig, PendingProduce};
use rill_protocol::{Acks, Target};

use crate::broker::BrokerProcess;
use crate::report::Latency;
use crate::storage::producer_batch;

/// Batches a producer keeps unacknowledged (4 MiB, like a Kafka producer
/// with several requests of batches in flight).
pub const PRODUCE_WINDOW_BATCHES: usize = 64;

pub struct ThroughputFigures {
    pub produce_bytes_per_second: f64,
    pub consume_bytes_per_second: f64,
    /// The same partition read again with its segments in the page cache (a
    /// second consumer of recent data), [`WARM_CONSUME_ROUNDS`] times: each
    /// round's speed and the loopback limit measured right before it, in
    /// bytes per second, so a slow moment of the host is slow for both.
    pub consume_warm_rounds: Vec<(f64, f64)>,
    pub consume_warm_cpu_seconds_per_gib: f64,
    /// The same warm reads with fetches as large as the broker's frames
    /// allow ([`LARGE_FETCH_BYTES`] at most), each right after its 4 MiB
    /// round and against the same loopback measurement; and their broker CPU.
    pub consume_warm_large_rounds: Vec<(f64, f64)>,
    pub consume_warm_large_fetch_bytes: u32,
    pub consume_warm_large_cpu_seconds_per_gib: f64,
    /// The client library's CPU (this process) per GiB, cold and warm.
    pub consume_client_cpu_seconds_per_gib: f64,
    pub consume_warm_client_cpu_seconds_per_gib: f64,
    /// Share of the warm rounds' segment bytes the broker sent with
    /// sendfile (`rill_fetch_sent_bytes_total`), or `None` if not reported.
    pub consume_warm_sendfile_share: Option<f64>,
    /// The same bytes in four partitions, read at once (each asking ahead).
    pub consume_four_partitions_bytes_per_second: f64,
    pub produce_cpu_seconds_per_gib: f64,
    /// Bytes the broker wrote to the block layer per batch byte produced.
    pub produce_write_amplification: f64,
    pub consume_cpu_seconds_per_gib: f64,
    /// Whether the page cache was dropped before each cold read.
    pub consume_cold: bool,
    pub peak_resident_kib: u64,
    pub bytes: u64,
}

/// Reads of the warm partition; the median is reported.
pub const WARM_CONSUME_ROUNDS: usize = 3;

/// The consumers' fetch size (a Kafka consumer asks up to 50 MiB per
/// request, 1 MiB per partition by default).
pub const FETCH_BYTES: u32 = 4 * 1024 * 1024;

/// The larger fetch of the warm rows: fewer request-answer turns per GiB.
pub const LARGE_FETCH_BYTES: u32 = 16 * 1024 * 1024;

pub async fn connect(broker: &BrokerProcess) -> anyhow::Result<Client> {
    let config = ClientConfig {
        client_id: "rill-bench".into(),
        ..ClientConfig::default()
    };
    Client::connect(&broker.native, config)
        .await
        .with_context(|| format!("connecting to the broker at {}", broker.native))
}

/// Produces `total_bytes` of `batch` round robin over `partitions` with
/// acks=written, keeping [`PRODUCE_WINDOW_BATCHES`] unacknowledged. Returns
/// the bytes sent.
pub async fn produce_windowed(
    client: &Client,
    topic: &str,
    partitions: u32,
    batch: &[u8],
    total_bytes: u64,
) -> anyhow::Result<u64> {
    let mut window = VecDeque::new();
    let mut sent = 0u64;
    let mut next_partition = 0u32;
    while sent < total_bytes {
        let target = Target::Partition(next_partition % partitions);
        window.push_back(client.start_produce(topic, target, Acks::Written, batch)?);
        next_partition = next_partition.wrapping_add(1);
        sent += batch.len() as u64;
        if window.len() >= PRODUCE_WINDOW_BATCHES
            && let Some(oldest) = window.pop_front()
        {
            oldest.wait().await?;
        }
    }
    for pending in window {
        pending.wait().await?;
    }
    Ok(sent)
}

/// Reads `partitions` partitions of `topic` to their end with fetches of
/// `fetch_bytes`, each partition's next fetch sent as soon as the head of
/// the answer before it arrives ([`Client::start_fetch`]). Returns the
/// bytes read.
pub async fn consume_all(
    client: &Client,
    topic: &str,
    partitions: u32,
    fetch_bytes: u32,
) -> anyhow::Result<u64> {
    let readers = (0..partitions).map(|partition| async move {
        let mut bytes = 0u64;
        let mut current = client.start_fetch(topic, partition, 0, fetch_bytes, 1, 0)?;
        loop {
            // Ask for what follows as soon as the answer's head says where
            // it ends, so the broker prepares it while this one is sent.
            let next = match current.head().await {
                Some(head) if head.records_bytes > 0 && head.next_offset < head.high_watermark => {
                    Some(client.start_fetch(
                        topic,
                        partition,
                        head.next_offset,
                        fetch_bytes,
                        1,
                        0,
                    )?)
                }
                _ => None,
            };
            let fetched = current.wait().await?;
            bytes += fetched.batches.len() as u64;
            match next {
                Some(next) => current = next,
                None => return anyhow::Ok(bytes),
            }
        }
    });
    let mut total = 0;
    for bytes in futures_util::future::join_all(readers).await {
        total += bytes?;
    }
    Ok(total)
}

/// The batch bytes one answer frame of the broker holds.
fn frame_room(client: &Client) -> u32 {
    client.config().frame_bytes_max.saturating_sub(1024).max(1)
}

/// One timed read of a whole partition, with the CPU it cost.
struct TimedConsume {
    bytes: u64,
    /// The fetch size used (the one asked for, cut to the broker's frames).
    fetch_bytes: u32,
    elapsed: Duration,
    broker_cpu: f64,
    client_cpu: f64,
}

impl TimedConsume {
    fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }
}

/// Reads partition 0 of `topic` to its end on a fresh connection with
/// fetches of `fetch_bytes` (cut to what the broker's frames hold), timing
/// it and counting the broker's and this process's (the client's) CPU.
async fn timed_consume(
    broker: &BrokerProcess,
    topic: &str,
    fetch_bytes: u32,
) -> anyhow::Result<TimedConsume> {
    let client = connect(broker).await?;
    let fetch_bytes = fetch_bytes.min(frame_room(&client));
    let broker_before = broker.cpu_seconds()?;
    let client_before = crate::broker::own_cpu_seconds();
    let started = Instant::now();
    let bytes = consume_all(&client, topic, 1, fetch_bytes).await?;
    let elapsed = started.elapsed();
    Ok(TimedConsume {
        bytes,
        fetch_bytes,
        elapsed,
        broker_cpu: broker.cpu_seconds()? - broker_before,
        client_cpu: crate::broker::own_cpu_seconds() - client_before,
    })
}

/// Produces `total_bytes` of 64 KiB batches (1 KiB records) to one partition
/// with acks=written and a window of 16 batches, then consumes it all back.
pub fn throughput(
    data_dir: &Path,
    total_bytes: u64,
    memory_budget_bytes: u64,
) -> anyhow::Result<ThroughputFigures> {
    let broker = BrokerProcess::start(
        data_dir,
        &[
            "node.shards=2".into(),
            format!("node.memory_budget_bytes={memory_budget_bytes}"),
        ],
    )?;
    let runtime = compio::runtime::Runtime::new()?;
    let batch = producer_batch();
    let (produce_elapsed, produce_cpu, appended, device_written) = runtime.block_on(async {
        let client = connect(&broker).await?;
        client.create_topic("bench", 1, &[]).await?;
        let cpu_before = broker.cpu_seconds()?;
        let written_before = broker.write_bytes()?;
        let started = Instant::now();
        let sent = produce_windowed(&client, "bench", 1, &batch, total_bytes).await?;
        let elapsed = started.elapsed();
        let written = broker.write_bytes()? - written_before;
        anyhow::Ok((elapsed, broker.cpu_seconds()? - cpu_before, sent, written))
    })?;
    // Cold reads start as the disk limit's do: written data synced, the page
    // cache dropped, so the produce just finished does not weigh on them.
    let mut cold = crate::machine::drop_page_cache();
    eprintln!("native consume: page cache cold");
    let cold_read = runtime.block_on(timed_consume(&broker, "bench", FETCH_BYTES))?;
    let consumed = cold_read.bytes;
    // The first read left the segments in the page cache (consumers read
    // buffered): read them again, as a second consumer of the same data
    // would, before the next cold read drops the cache.
    let fetch_sent =
        |path: &str| broker.metric(&format!("rill_fetch_sent_bytes_total{{path=\"{path}\"}}"));
    // The broker's fetch paths (`rill_fetch_sent_bytes_total`), sendfile first.
    const FETCH_PATHS: [&str; 3] = ["sendfile", "splice", "read"];
    let sent_before = FETCH_PATHS.map(fetch_sent);
    let mut warm_rounds = Vec::new();
    let mut warm_large_rounds = Vec::new();
    let mut warm_loopback = Vec::new();
    for round in 1..=WARM_CONSUME_ROUNDS {
        eprintln!("native consume: page cache warm, round {round}/{WARM_CONSUME_ROUNDS}");
        warm_loopback.push(crate::limits::loopback_tcp_bandwidth(
            consumed.min(1 << 30),
        )?);
        let round = runtime.block_on(timed_consume(&broker, "bench", FETCH_BYTES))?;
        let large = runtime.block_on(timed_consume(&broker, "bench", LARGE_FETCH_BYTES))?;
        for read in [&round, &large] {
            anyhow::ensure!(
                read.bytes == consumed,
                "read {} bytes of {consumed} with a warm cache",
                read.bytes
            );
        }
        warm_rounds.push(round);
        warm_large_rounds.push(large);
    }
    let sent_after = FETCH_PATHS.map(fetch_sent);
    let sent: Option<Vec<f64>> = sent_before
        .iter()
        .zip(&sent_after)
        .map(|(before, after)| Some((*after)? - (*before)?))
        .collect();
    let consume_warm_sendfile_share = sent
        .filter(|sent| sent.iter().sum::<f64>() > 0.0)
        .map(|sent| sent[0] / sent.iter().sum::<f64>());
    let paired = |rounds: &[TimedConsume]| -> Vec<(f64, f64)> {
        rounds
            .iter()
            .map(TimedConsume::bytes_per_second)
            .zip(warm_loopback.iter().copied())
            .collect()
    };
    let consume_warm_rounds = paired(&warm_rounds);
    let consume_warm_large_rounds = paired(&warm_large_rounds);
    let median = |rounds: &mut Vec<TimedConsume>| {
        rounds.sort_by(|a, b| a.bytes_per_second().total_cmp(&b.bytes_per_second()));
        rounds.swap_remove(rounds.len() / 2)
    };
    let warm = median(&mut warm_rounds);
    let warm_large = median(&mut warm_large_rounds);
    // The same bytes over four partitions, consumed with four fetches in flight.
    eprintln!("native consume: 4 partitions, page cache cold");
    let consume_four_elapsed = runtime.block_on(async {
        let client = connect(&broker).await?;
        client.create_topic("bench4", 4, &[]).await?;
        let sent = produce_windowed(&client, "bench4", 4, &batch, total_bytes).await?;
        cold &= crate::machine::drop_page_cache();
        let started = Instant::now();
        let bytes = consume_all(&client, "bench4", 4, FETCH_BYTES).await?;
        anyhow::ensure!(
            bytes == sent,
            "consumed {bytes} bytes of {sent} from four partitions"
        );
        anyhow::Ok(started.elapsed())
    })?;
    anyhow::ensure!(
        consumed == appended,
        "consumed {consumed} bytes of {appended} produced"
    );
    let (_, peak_resident_kib) = broker.resident_kib()?;
    broker.stop()?;
    let gib = appended as f64 / (1u64 << 30) as f64;
    Ok(ThroughputFigures {
        produce_bytes_per_second: appended as f64 / produce_elapsed.as_secs_f64(),
        consume_bytes_per_second: cold_read.bytes_per_second(),
        consume_warm_rounds,
        consume_warm_cpu_seconds_per_gib: warm.broker_cpu / gib,
        consume_warm_large_rounds,
        consume_warm_large_fetch_bytes: warm_large.fetch_bytes,
        consume_warm_large_cpu_seconds_per_gib: warm_large.broker_cpu / gib,
        consume_client_cpu_seconds_per_gib: cold_read.client_cpu / gib,
        consume_warm_client_cpu_seconds_per_gib: warm.client_cpu / gib,
        consume_warm_sendfile_share,
        consume_four_partitions_bytes_per_second: appended as f64
            / consume_four_elapsed.as_secs_f64(),
        produce_cpu_seconds_per_gib: produce_cpu / gib,
        produce_write_amplification: device_written as f64 / appended as f64,
        consume_cpu_seconds_per_gib: cold_read.broker_cpu / gib,
        consume_cold: cold,
        peak_resident_kib,
        bytes: appended,
    })
}

pub struct LatencyFigures {
    pub offered_bytes_per_second: f64,
    pub achieved_bytes_per_second: f64,
    pub latency: Latency,
    pub p999_us: f64,
}

impl LatencyFigures {
    /// The figures of a fixed-rate run: `histogram` in microseconds,
    /// `sent_bytes` over `elapsed`.
    pub fn from_histogram(
        histogram: &Histogram<u64>,
        offered_bytes_per_second: f64,
        sent_bytes: f64,
        elapsed: Duration,
    ) -> Self {
        let quantile = |value: f64| histogram.value_at_quantile(value) as f64;
        Self {
            offered_bytes_per_second,
            achieved_bytes_per_second: sent_bytes / elapsed.as_secs_f64(),
            latency: Latency {
                samples: histogram.len() as usize,
                mean_us: histogram.mean(),
                p50_us: quantile(0.5),
                p99_us: quantile(0.99),
                max_us: histogram.max() as f64,
            },
            p999_us: quantile(0.999),
        }
    }
}

/// Durable produce (fsync every-batch, group commit) at a fixed offered rate:
/// each batch has an intended send time on a fixed schedule, and its latency
/// runs from that time to its acknowledgement.
pub fn durable_latency(
    data_dir: &Path,
    offered_bytes_per_second: f64,
    duration: Duration,
) -> anyhow::Result<LatencyFigures> {
    let broker = BrokerProcess::start(
        data_dir,
        &[
            "node.shards=2".into(),
            "topic_defaults.fsync=every-batch".into(),
        ],
    )?;
    let runtime = compio::runtime::Runtime::new()?;
    let batch = producer_batch();
    let interval = Duration::from_secs_f64(batch.len() as f64 / offered_bytes_per_second);
    let figures = runtime.block_on(async {
        use futures_util::StreamExt;
        let client = connect(&broker).await?;
        client.create_topic("durable", 1, &[]).await?;
        let histogram = Rc::new(RefCell::new(Histogram::<u64>::new_with_bounds(
            1, 60_000_000, 3,
        )?));
        // Acknowledgements are collected in order by a task of their own, so
        // the sender keeps to its schedule whatever the broker does.
        let (acknowledge, mut acknowledgements) =
            futures_channel::mpsc::unbounded::<(Instant, PendingProduce)>();
        let collector = compio::runtime::spawn({
            let histogram = histogram.clone();
            async move {
                while let Some((intended, produce)) = acknowledgements.next().await {
                    produce.wait().await?;
                    let micros = intended.elapsed().as_micros().max(1) as u64;
                    histogram.borrow_mut().record(micros)?;
                }
                anyhow::Ok(())
            }
        });
        let started = Instant::now();
        let mut sent = 0u64;
        let mut index = 0u32;
        while started.elapsed() < duration {
            let intended = started + interval * index;
            let now = Instant::now();
            if intended > now {
                compio::time::sleep(intended - now).await;
            }
            let produce =
                client.start_produce("durable", Target::Partition(0), Acks::Durable, &batch)?;
            acknowledge
                .unbounded_send((intended, produce))
                .map_err(|_| anyhow::anyhow!("the acknowledgement collector stopped"))?;
            sent += batch.len() as u64;
            index += 1;
        }
        drop(acknowledge);
        collector
            .await
            .map_err(|_| anyhow::anyhow!("the acknowledgement collector failed"))??;
        anyhow::Ok(LatencyFigures::from_histogram(
            &histogram.borrow(),
            offered_bytes_per_second,
            sent as f64,
            started.elapsed(),
        ))
    })?;
    broker.stop()?;
    Ok(figures)
}

/// Resident memory of an idle broker on a profile, and its peak while
/// `load_bytes` are produced and consumed.
pub fn memory(data_dir: &Path, profile: &str, load_bytes: u64) -> anyhow::Result<(u64, u64)> {
    let broker = BrokerProcess::start(data_dir, &[format!("profile={profile}")])?;
    // Let start-up allocations settle: the figure is the steady idle state.
    std::thread::sleep(Duration::from_millis(500));
    let (idle_kib, _) = broker.resident_kib()?;
    let runtime = compio::runtime::Runtime::new()?;
    let batch = producer_batch();
    runtime.block_on(async {
        let client = connect(&broker).await?;
        client.create_topic("memory", 1, &[]).await?;
        produce_windowed(&client, "memory", 1, &batch, load_bytes).await?;
        let mut offset = 0;
        loop {
            let fetched = client.fetch("memory", 0, offset, 1024 * 1024, 1, 0).await?;
            offset = fetched.next_offset;
            if fetched.batches.is_empty() || offset >= fetched.high_watermark {
                break;
            }
        }
        anyhow::Ok(())
    })?;
    let (_, peak_kib) = broker.resident_kib()?;
    broker.stop()?;
    Ok((idle_kib, peak_kib))
}

/// Produce throughput (acks=written, one partition) for batches of about
/// 64 KiB made of `value_bytes` records: how record size moves the figure.
pub fn produce_record_size(
    data_dir: &Path,
    total_bytes: u64,
    value_bytes: usize,
) -> anyhow::Result<f64> {
    let broker = BrokerProcess::start(data_dir, &["node.shards=2".into()])?;
    let runtime = compio::runtime::Runtime::new()?;
    let records = (64 * 1024 / (value_bytes + 24)).max(1);
    let batch = crate::storage::producer_batch_of(value_bytes, records);
    let speed = runtime.block_on(async {
        let client = connect(&broker).await?;
        client.create_topic("sizes", 1, &[]).await?;
        let started = Instant::now();
        let sent = produce_windowed(&client, "sizes", 1, &batch, total_bytes).await?;
        anyhow::Ok(sent as f64 / started.elapsed().as_secs_f64())
    })?;
    broker.stop()?;
    Ok(speed)
}
