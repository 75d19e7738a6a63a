//! The replicator's figures: how fast an edge drains a backlog to a central
//! Kafka-protocol cluster on an unconstrained loopback link, next to how
//! fast librdkafka produces the same records to that cluster in the same
//! run; how long a backlog of the planned size takes; and the edge's memory
//! while it drains, against its profile's budget.
//!
//! The central cluster is a second `rill` serving Kafka (fsync interval-ms:
//! like a Kafka cluster, it acknowledges acks=all without a sync per
//! request). The backlog is built on the edge with the mirror not yet
//! configured (native produce), then the edge is restarted with the
//! destination, and the clock runs from that start until the central
//! partitions hold every record.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rill_protocol::OffsetSpec;

use crate::broker::BrokerProcess;
use crate::kafka;
use crate::native;
use crate::storage::{RECORDS_PER_BATCH, producer_batch};

/// The edge's name at the destination: topics arrive as `EDGE_ID.TOPIC`.
const EDGE_ID: &str = "bench-edge";
/// The profile the edge runs with: the one this kind of machine detects,
/// named so the budget reported is the one in force.
pub const EDGE_PROFILE: &str = "x86-gateway";

pub struct Plan {
    /// Bytes of the backlog (native batches of 1 KiB records).
    pub backlog_bytes: u64,
    /// Bytes of the librdkafka produce the mirror is compared with.
    pub kafka_bytes: u64,
    pub partitions: u32,
    /// The longest the drain may take before the run gives up.
    pub drain_deadline: Duration,
}

pub struct Figures {
    /// Where the central broker's log was (tmpfs or the edge's disk).
    pub central_where: &'static str,
    pub backlog_bytes: u64,
    pub records: u64,
    pub drain_seconds: f64,
    pub edge_cpu_seconds_per_gib: f64,
    pub central_cpu_seconds_per_gib: f64,
    /// The median librdkafka round.
    pub kafka: kafka::Phase,
    /// Every round's bytes per second, in the order run.
    pub kafka_rates: Vec<f64>,
    pub edge_peak_resident_kib: u64,
    pub edge_budget_bytes: u64,
}

impl Figures {
    pub fn drain_bytes_per_second(&self) -> f64 {
        self.backlog_bytes as f64 / self.drain_seconds
    }
}

/// `node.memory_budget_bytes` of `profile`, from `rill profile show`.
fn profile_budget_bytes(profile: &str) -> anyhow::Result<u64> {
    let output = std::process::Command::new(crate::broker::rill_binary()?)
        .args(["profile", "show", profile])
        .output()
        .context("running rill profile show")?;
    anyhow::ensure!(
        output.status.success(),
        "rill profile show {profile} failed"
    );
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("memory_budget_bytes")?;
            let value = value.trim_start().strip_prefix('=')?;
            let digits: String = value
                .split('#')
                .next()?
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .with_context(|| format!("profile {profile} names no memory_budget_bytes"))
}

/// Records in `topic`'s partitions on `broker` (their end offsets summed).
async fn records_in(client: &rill_node::client::Client, topic: &str, partitions: u32) -> u64 {
    let mut total = 0u64;
    for partition in 0..partitions {
        // A partition the mirror has not created yet holds nothing.
        if let Ok(Some(end)) = client
            .list_offsets(topic, partition, OffsetSpec::Latest)
            .await
        {
            total += u64::try_from(end).unwrap_or(0);
        }
    }
    total
}

/// Rounds of the librdkafka produce; the median is the comparison.
const KAFKA_ROUNDS: usize = 3;

/// Memory the central broker's log may use on tmpfs, at most.
const CENTRAL_TMPFS_BYTES: u64 = 4 << 30;

/// Where the central broker keeps its log: on tmpfs (`/dev/shm`) when it
/// has room, so that the central cluster, which in the field is another
/// machine, does not take the edge's disk bandwidth (on one box the edge's
/// reads and the central's writes shared one disk, and the drain measured
/// the disk, not the replicator). Retention keeps it to
/// [`CENTRAL_TMPFS_BYTES`]. Returns the directory and a note for the table.
fn central_directory(data_dir: &Path) -> (std::path::PathBuf, &'static str) {
    let shm = Path::new("/dev/shm");
    let available = rill_node::broker::admin::disk_free_bytes(shm);
    if available.is_some_and(|bytes| bytes >= 2 * CENTRAL_TMPFS_BYTES) {
        (
            shm.join(format!("rill-bench-central-{}", std::process::id())),
            "central log on tmpfs",
        )
    } else {
        (
            data_dir.join("central"),
            "central log on the same disk as the edge",
        )
    }
}

pub fn run(data_dir: &Path, plan: &Plan) -> anyhow::Result<Figures> {
    let (central_dir, central_where) = central_directory(data_dir);
    let central_guard = RemoveOnDrop(central_dir.clone());
    let central = BrokerProcess::start(
        &central_dir,
        &[
            "node.shards=2".into(),
            "topic_defaults.fsync=interval-ms".into(),
            // Bounded, so tmpfs holds it: old segments go as new ones come.
            format!("topic_defaults.retention_bytes={}", CENTRAL_TMPFS_BYTES / 4),
            format!("topic_defaults.segment_bytes_max={}", 64 << 20),
            "storage.retention_check_interval_ms=500".into(),
        ],
    )?;
    let runtime = compio::runtime::Runtime::new()?;
    let batch = producer_batch();

    // What librdkafka does against the same central broker.
    let kafka_batches = plan.kafka_bytes.div_ceil(batch.len() as u64);
    let kafka_bytes = kafka_batches * batch.len() as u64;
    let central_client = runtime.block_on(native::connect(&central))?;
    // Three rounds, each to a topic of its own, and the median: one short
    // librdkafka run varied from 0.49 to 0.78 GiB/s between runs here.
    let mut rounds = Vec::new();
    for round in 1..=KAFKA_ROUNDS {
        let topic = format!("baseline-{round}");
        runtime.block_on(central_client.create_topic(&topic, 1, &[]))?;
        eprintln!(
            "mirror: Kafka produce (librdkafka) to the central broker, {} MiB, round {round} of {KAFKA_ROUNDS}",
            kafka_bytes >> 20
        );
        rounds.push(
            kafka::kafka_produce(
                &central,
                &topic,
                kafka_batches * RECORDS_PER_BATCH as u64,
                kafka_bytes,
            )
            .context("the librdkafka produce the mirror is compared with")?,
        );
    }
    let kafka_rates: Vec<f64> = rounds.iter().map(|phase| phase.bytes_per_second).collect();
    rounds.sort_by(|a, b| a.bytes_per_second.total_cmp(&b.bytes_per_second));
    let kafka = rounds.swap_remove(rounds.len() / 2);

    // The backlog, built while nothing mirrors.
    let edge_dir = data_dir.join("edge");
    let edge_settings = |mirror: Option<String>| {
        let mut settings = vec![
            format!("profile={EDGE_PROFILE}"),
            "node.shards=2".into(),
            "topic_defaults.fsync=interval-ms".into(),
        ];
        if let Some(destination) = mirror {
            settings.extend([
                format!("mirror.edge_id={EDGE_ID}"),
                "mirror.reconcile_delay_ms=0".into(),
                format!("mirror.destinations=[{destination}]"),
            ]);
        }
        settings
    };
    let edge = BrokerProcess::start(&edge_dir, &edge_settings(None))?;
    let batches = plan.backlog_bytes.div_ceil(batch.len() as u64);
    let backlog_bytes = batches * batch.len() as u64;
    let records = batches * RECORDS_PER_BATCH as u64;
    eprintln!(
        "mirror: building a backlog of {} MiB on the edge, {} partitions",
        backlog_bytes >> 20,
        plan.partitions
    );
    runtime.block_on(async {
        let client = native::connect(&edge).await?;
        client.create_topic("backlog", plan.partitions, &[]).await?;
        let sent =
            native::produce_windowed(&client, "backlog", plan.partitions, &batch, backlog_bytes)
                .await?;
        anyhow::ensure!(
            sent == backlog_bytes,
            "sent {sent} of {backlog_bytes} bytes"
        );
        anyhow::Ok(())
    })?;
    edge.stop()
        .context("stopping the edge after building the backlog")?;

    // The drain: the edge starts with the destination configured.
    let destination = format!(
        "{{name=\"central\", bootstrap_servers=[\"{}\"], create_partitions={}, \
         backoff_ms_min=20, backoff_ms_max=200}}",
        central.kafka, plan.partitions
    );
    let central_cpu_before = central.cpu_seconds()?;
    eprintln!(
        "mirror: draining {} MiB ({records} records) to the central broker",
        backlog_bytes >> 20
    );
    let started = Instant::now();
    let edge = BrokerProcess::start(&edge_dir, &edge_settings(Some(destination)))?;
    let mirrored_topic = format!("{EDGE_ID}.backlog");
    let mut peak_kib = 0;
    let mut arrived_any = false;
    loop {
        peak_kib = peak_kib.max(edge.resident_kib()?.1);
        let arrived = runtime.block_on(records_in(
            &central_client,
            &mirrored_topic,
            plan.partitions,
        ));
        if arrived > 0 && !arrived_any {
            arrived_any = true;
            eprintln!(
                "mirror: first records at the central broker after {:.2} s",
                started.elapsed().as_secs_f64()
            );
        }
        if arrived >= records {
            anyhow::ensure!(
                arrived == records,
                "the central broker holds {arrived} records of {records}: some arrived twice"
            );
            break;
        }
        anyhow::ensure!(
            started.elapsed() < plan.drain_deadline,
            "the mirror moved {arrived} of {records} records in {} s",
            plan.drain_deadline.as_secs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let drain_seconds = started.elapsed().as_secs_f64();
    peak_kib = peak_kib.max(edge.resident_kib()?.1);
    let gib = backlog_bytes as f64 / (1u64 << 30) as f64;
    let figures = Figures {
        central_where,
        backlog_bytes,
        records,
        drain_seconds,
        edge_cpu_seconds_per_gib: edge.cpu_seconds()? / gib,
        central_cpu_seconds_per_gib: (central.cpu_seconds()? - central_cpu_before) / gib,
        kafka,
        kafka_rates,
        edge_peak_resident_kib: peak_kib,
        edge_budget_bytes: profile_budget_bytes(EDGE_PROFILE)?,
    };
    edge.stop()?;
    drop(central_client);
    central.stop()?;
    drop(central_guard);
    Ok(figures)
}

/// Removes a directory when dropped (the central's tmpfs log must not
/// outlive the run, whatever the outcome).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
