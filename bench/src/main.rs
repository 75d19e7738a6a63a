//! `rill-bench`: Rill's benchmark harness. Every figure is measured next to
//! the machine's own limit in the same run and reported as a ratio, because
//! shared machines are noisy and absolute numbers travel badly.
//!
//! Every run is bounded: by the bytes it writes, and by a watchdog that ends
//! the process with a clear message if the machine stalls.

mod broker;
mod ingest;
#[cfg(feature = "kafka")]
mod kafka;
mod limits;
mod machine;
#[cfg(feature = "kafka")]
mod mirror;
mod mqtt;
mod native;
mod peers;
mod plot;
mod report;
mod shapes;
mod storage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use rill_core::log::FsyncPolicy;
use rill_node::io::{IoDriver, io_uring_unavailable_reason};
use rill_protocol::Acks;
use serde::Serialize;

use crate::machine::Machine;
use crate::report::{Row, gib_per_second, print_table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// The storage engine: append per driver and fsync policy, write
    /// amplification, sealed-segment reads, recovery of an active segment.
    Storage,
    /// Every scenario, one after the other, in one table.
    Suite,
    /// The broker over the native protocol: produce and consume throughput
    /// against loopback and disk limits, durable-produce latency at 50 MB/s,
    /// CPU per GiB, resident memory idle and under load.
    Native,
    /// The broker over the Kafka wire protocol with librdkafka, next to the
    /// native protocol in the same run: produce and consume throughput as a
    /// ratio to native, produce latency at 20 MB/s with acks=all. Needs the
    /// `kafka` feature.
    Kafka,
    /// The replicator: an edge drains a backlog to a central Kafka-protocol
    /// broker (a second rill) on loopback, next to librdkafka producing to
    /// that broker in the same run; the time a backlog takes; the edge's
    /// memory while draining. Needs the `kafka` feature.
    Mirror,
    /// MQTT QoS 1 ingest of 100-byte messages from many clients, every
    /// message appended to the log, next to Mosquitto under the same load
    /// generator: messages per second, PUBACK latency at a fixed rate, CPU
    /// per million messages. Installs Mosquitto (Debian) when missing.
    Mqtt,
}

/// Why the `kafka` scenario cannot run in this build.
const KAFKA_UNAVAILABLE: &str =
    "built without the kafka feature: cargo build --release -p rill-bench --features kafka";

#[derive(Debug, Parser)]
#[command(
    name = "rill-bench",
    about = "Rill's benchmarks, side by side with the machine's limits"
)]
struct Arguments {
    /// The scenario to run.
    scenario: Scenario,
    /// Where to write test data: put it on the disk you want measured.
    #[arg(long, default_value = "bench-data")]
    data_dir: PathBuf,
    /// A few seconds per figure, for CI: proves the harness runs, not the speed.
    #[arg(long)]
    smoke: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw the results as an SVG picture in this file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Give up (exit 2) if the whole run takes longer than this.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
}

#[derive(Debug, Serialize)]
struct Results {
    scenario: String,
    smoke: bool,
    command: String,
    machine: Machine,
    rows: Vec<Row>,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let timeout = Duration::from_secs(arguments.timeout_s);
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        eprintln!(
            "rill-bench: the run exceeded --timeout-s {}s; giving up",
            timeout.as_secs()
        );
        std::process::exit(2);
    });
    match run(&arguments) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rill-bench: {error:#}");
            let disk_full = error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.raw_os_error() == Some(libc_enospc()))
            }) || format!("{error:#}").contains("No space left on device");
            if disk_full {
                eprintln!(
                    "rill-bench: the disk under --data-dir {} is full: free space there or point --data-dir at a larger disk",
                    arguments.data_dir.display()
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// ENOSPC on Linux (the harness runs on Linux only).
fn libc_enospc() -> i32 {
    28
}

fn run(arguments: &Arguments) -> anyhow::Result<()> {
    if matches!(arguments.scenario, Scenario::Kafka | Scenario::Mirror) && !cfg!(feature = "kafka")
    {
        anyhow::bail!(
            "{} scenario unavailable: {KAFKA_UNAVAILABLE}",
            format!("{:?}", arguments.scenario).to_lowercase()
        );
    }
    std::fs::create_dir_all(&arguments.data_dir).with_context(|| {
        format!(
            "creating the data directory {}",
            arguments.data_dir.display()
        )
    })?;
    let data_dir = arguments.data_dir.canonicalize()?;
    let machine = Machine::describe(&data_dir);
    eprintln!(
        "machine: {} ({} cores, {:.1} GiB), kernel {}, {} on {} ({}), io_uring: {}",
        machine.cpu_model,
        machine.cores,
        machine.memory_gib,
        machine.kernel,
        machine.data_directory,
        machine.device,
        machine.filesystem,
        machine.io_uring
    );
    let rows = match arguments.scenario {
        Scenario::Storage => storage_scenario(&data_dir, arguments.smoke)?,
        Scenario::Native => native_scenario(&data_dir, arguments.smoke)?,
        Scenario::Kafka => kafka_scenario(&data_dir, arguments.smoke)?,
        Scenario::Mirror => mirror_scenario(&data_dir, arguments.smoke)?,
        Scenario::Mqtt => ingest::scenario(&data_dir, arguments.smoke)?,
        Scenario::Suite => {
            let mut rows = storage_scenario(&data_dir, arguments.smoke)?;
            rows.extend(native_scenario(&data_dir, arguments.smoke)?);
            if cfg!(feature = "kafka") {
                rows.extend(kafka_scenario(&data_dir, arguments.smoke)?);
                rows.extend(mirror_scenario(&data_dir, arguments.smoke)?);
            } else {
                eprintln!("Kafka wire protocol scenario unavailable: {KAFKA_UNAVAILABLE}");
                rows.push(
                    Row::new(
                        "Kafka wire protocol (librdkafka): produce, consume, latency",
                        "librdkafka",
                        0.0,
                        "GiB/s",
                    )
                    .note(format!("UNAVAILABLE: {KAFKA_UNAVAILABLE}")),
                );
            }
            rows.extend(ingest::scenario(&data_dir, arguments.smoke)?);
            rows
        }
    };
    println!();
    print_table(&rows);
    let results = Results {
        scenario: format!("{:?}", arguments.scenario).to_lowercase(),
        smoke: arguments.smoke,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        rows,
    };
    if let Some(path) = &arguments.svg {
        let title = format!(
            "rill-bench {} on {} ({} cores, kernel {})",
            results.scenario,
            results.machine.cpu_model,
            results.machine.cores,
            results.machine.kernel
        );
        std::fs::write(path, plot::svg(&title, &results.rows))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("picture written to {}", path.display());
    }
    if let Some(path) = &arguments.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

fn mib(value: u64) -> u64 {
    value * 1024 * 1024
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Samples of one figure across rounds, each with the limit of its round.
#[derive(Default)]
struct Samples {
    values: Vec<f64>,
    limits: Vec<f64>,
    notes: Vec<String>,
}

impl Samples {
    /// Rounds of (speed, limit) in bytes per second, as GiB/s samples.
    fn of_rounds(rounds: &[(f64, f64)]) -> Self {
        let mut samples = Self::default();
        for (speed, limit) in rounds {
            samples.push(
                gib_per_second(*speed),
                gib_per_second(*limit),
                String::new(),
            );
        }
        samples
    }

    fn push(&mut self, value: f64, limit: f64, note: String) {
        self.values.push(value);
        self.limits.push(limit);
        self.notes.push(note);
    }

    /// The median value against the median limit; the ratio is the median of
    /// the per-round ratios, so a slow round for the disk is a slow round for both.
    fn row(&self, scenario: &str, driver: &str, limit_name: &str, target: &str) -> Row {
        let mut values = self.values.clone();
        let mut limits = self.limits.clone();
        let mut ratios: Vec<f64> = self
            .values
            .iter()
            .zip(&self.limits)
            .map(|(value, limit)| value / limit)
            .collect();
        let mut row = Row::new(scenario, driver, median(&mut values), "GiB/s")
            .against(limit_name, median(&mut limits));
        row.ratio = Some(median(&mut ratios));
        let spread = format!(
            "median of {} rounds (min {:.2}, max {:.2} GiB/s)",
            self.values.len(),
            values.first().copied().unwrap_or(0.0),
            values.last().copied().unwrap_or(0.0)
        );
        row.target(target).note(format!(
            "{}; {spread}",
            self.notes.last().cloned().unwrap_or_default()
        ))
    }
}

fn storage_scenario(data_dir: &std::path::Path, smoke: bool) -> anyhow::Result<Vec<Row>> {
    let (append_bytes, limit_bytes, recovery_bytes, sync_iterations, rounds) = if smoke {
        (mib(48), mib(64), mib(48), 50, 1)
    } else {
        (mib(1024), mib(1024), mib(1024), 2000, 3)
    };
    let mut rows = Vec::new();
    let mut drivers = vec![IoDriver::Portable];
    match io_uring_unavailable_reason() {
        None => drivers.insert(0, IoDriver::IoUring),
        Some(reason) => eprintln!("io-uring driver unavailable, measuring portable only: {reason}"),
    }
    let policies = [
        ("never", FsyncPolicy::Never),
        ("every-batch", FsyncPolicy::EveryBatch),
        ("interval-ms=100", FsyncPolicy::IntervalMs(100)),
    ];

    // Rounds: the limit, then every driver and policy, measured again each
    // round, so a disk that is slow for a while is slow for the limit too.
    let mut direct_samples = Vec::new();
    let mut append_samples: Vec<((IoDriver, &str), Samples)> = Vec::new();
    let mut amplification: Vec<(IoDriver, f64, Option<f64>)> = Vec::new();
    for round in 0..rounds {
        let limits_directory = storage::RunDirectory::new(data_dir, "limits")?;
        eprintln!("round {}/{rounds}: raw direct write", round + 1);
        let direct = limits::direct_write_bandwidth(limits_directory.path(), limit_bytes)
            .context("raw direct write")?;
        drop(limits_directory);
        direct_samples.push(gib_per_second(direct));
        for &driver in &drivers {
            for (policy_name, policy) in policies {
                let run = storage::RunDirectory::new(data_dir, "append")?;
                eprintln!(
                    "round {}/{rounds}: append, driver {driver}, fsync {policy_name}",
                    round + 1
                );
                let figures = storage::append_run(driver, run.path(), policy, append_bytes)
                    .with_context(|| format!("append with {driver}, {policy_name}"))?;
                let mut note = format!(
                    "{} MiB, {}, {} syncs",
                    figures.bytes / mib(1),
                    if figures.direct {
                        "O_DIRECT"
                    } else {
                        "buffered"
                    },
                    figures.syncs
                );
                if let Some(latency) = figures.ack_latency {
                    note.push_str(&format!(
                        ", ack p50 {:.0} µs p99 {:.0} µs",
                        latency.p50_us, latency.p99_us
                    ));
                }
                let key = (driver, policy_name);
                let index = match append_samples
                    .iter()
                    .position(|(existing, _)| *existing == key)
                {
                    Some(index) => index,
                    None => {
                        append_samples.push((key, Samples::default()));
                        append_samples.len() - 1
                    }
                };
                append_samples[index].1.push(
                    gib_per_second(figures.bytes_per_second()),
                    gib_per_second(direct),
                    note,
                );
                if policy == FsyncPolicy::Never && round == 0 {
                    amplification.push((
                        driver,
                        figures.process_write_amplification,
                        figures.device_write_amplification,
                    ));
                }
            }
        }
    }
    let limits_directory = storage::RunDirectory::new(data_dir, "limits")?;
    eprintln!("raw buffered write and fdatasync latency");
    let buffered = limits::buffered_write_bandwidth(limits_directory.path(), limit_bytes)
        .context("raw buffered write")?;
    let fdatasync = limits::fdatasync_latency(limits_directory.path(), sync_iterations)
        .context("raw fdatasync")?;
    drop(limits_directory);
    let mut direct_sorted = direct_samples.clone();
    rows.push(
        Row::new(
            "limit: sequential O_DIRECT write, 1 MiB blocks, QD16",
            "raw",
            median(&mut direct_sorted),
            "GiB/s",
        )
        .note(format!(
            "median of {} rounds: {:?}",
            direct_samples.len(),
            direct_samples
                .iter()
                .map(|value| format!("{value:.2}"))
                .collect::<Vec<_>>()
        )),
    );
    rows.push(Row::new(
        "limit: buffered write + one fdatasync",
        "raw",
        gib_per_second(buffered),
        "GiB/s",
    ));
    rows.push(
        Row::new(
            "limit: fdatasync after a 4 KiB write, p50",
            "raw",
            fdatasync.p50_us,
            "us",
        )
        .note(format!(
            "mean {:.0} µs, p99 {:.0} µs",
            fdatasync.mean_us, fdatasync.p99_us
        )),
    );
    for ((driver, policy_name), samples) in &append_samples {
        let target = match (*driver, *policy_name) {
            (IoDriver::IoUring, "never") => ">= 70%",
            (IoDriver::IoUring, "every-batch") => ">= 25%",
            _ => "",
        };
        rows.push(samples.row(
            &format!("append 1 KiB records in 64 KiB batches, 1 partition, fsync {policy_name}"),
            &driver.to_string(),
            "direct write",
            target,
        ));
    }
    for (driver, process, device) in amplification {
        let mut row = Row::new(
            "write amplification (process bytes to block layer / batch bytes), fsync never",
            &driver.to_string(),
            process,
            "x",
        )
        .target("<= 1.05");
        if let Some(device) = device {
            row = row.note(format!(
                "device sectors written / batch bytes: {device:.3} (includes journal and other processes)"
            ));
        }
        rows.push(row);
    }

    let read_driver = drivers[0];
    {
        let run = storage::RunDirectory::new(data_dir, "read")?;
        eprintln!(
            "read: writing {} MiB of sealed segments",
            append_bytes / mib(1)
        );
        storage::append_run(read_driver, run.path(), FsyncPolicy::Never, append_bytes)?;
        let (cold_speed, cold) = storage::read_run(read_driver, run.path(), true)?;
        let (warm_speed, _) = storage::read_run(read_driver, run.path(), false)?;
        let direct = median(&mut direct_sorted);
        rows.push(
            Row::new(
                "read sealed segments, checked owned bytes, 1 MiB reads",
                &read_driver.to_string(),
                gib_per_second(cold_speed),
                "GiB/s",
            )
            .against("direct write", direct)
            .note(if cold {
                "page cache dropped first"
            } else {
                "page cache could not be dropped (not root): warm"
            }),
        );
        rows.push(
            Row::new(
                "read sealed segments again (page cache warm)",
                &read_driver.to_string(),
                gib_per_second(warm_speed),
                "GiB/s",
            )
            .note("bounded by memory copy and CRC-32C checking"),
        );
    }
    for &driver in &drivers {
        let run = storage::RunDirectory::new(data_dir, "recovery")?;
        eprintln!(
            "recovery: driver {driver}, {} MiB active segment",
            recovery_bytes / mib(1)
        );
        let (seconds, checked, cold) = storage::recovery_run(driver, run.path(), recovery_bytes)?;
        rows.push(
            Row::new(
                &format!(
                    "recovery of a {} MiB active segment, every batch checked",
                    recovery_bytes / mib(1)
                ),
                &driver.to_string(),
                seconds,
                "s",
            )
            .target(if smoke { "" } else { "<= 2 s" })
            .note(format!(
                "{} MiB checked at {:.2} GiB/s, {}",
                checked / mib(1),
                gib_per_second(checked as f64 / seconds),
                if cold { "cold cache" } else { "warm cache" }
            )),
        );
    }
    Ok(rows)
}

/// The tiny-512m profile's memory budget (hw-profiles/tiny-512m.toml).
const TINY_MEMORY_BUDGET_BYTES: u64 = 48 * 1024 * 1024;

fn native_scenario(data_dir: &std::path::Path, smoke: bool) -> anyhow::Result<Vec<Row>> {
    let (bytes, latency_seconds, memory_load_bytes) = if smoke {
        (mib(64), 1, mib(16))
    } else {
        (mib(2048), 10, mib(256))
    };
    let mut rows = Vec::new();
    eprintln!("limits: loopback TCP and raw direct write");
    // The best of three: a limit is what the machine can do, and one
    // stream on a shared machine is easily slowed by a neighbour.
    let mut loopback = 0.0f64;
    for _ in 0..3 {
        loopback = loopback.max(gib_per_second(limits::loopback_tcp_bandwidth(
            bytes.max(mib(1024)),
        )?));
    }
    let direct = {
        let run = storage::RunDirectory::new(data_dir, "limits")?;
        gib_per_second(limits::direct_write_bandwidth(
            run.path(),
            bytes.min(mib(1024)),
        )?)
    };
    // Four partitions read at once are four streams for the disk: its limit
    // for that differs from one stream's (virtual disks can be far slower).
    let cold_read_limit = |streams| -> anyhow::Result<(f64, bool)> {
        let run = storage::RunDirectory::new(data_dir, "limits")?;
        let (speed, cold) = limits::cold_read_bandwidth(run.path(), bytes.min(mib(1024)), streams)?;
        Ok((gib_per_second(speed), cold))
    };
    let (cold_read, cold) = cold_read_limit(1)?;
    let (cold_read_four, cold_four) = cold_read_limit(4)?;
    let cache_note = |cold: bool, detail: &str| {
        if cold {
            format!("page cache dropped{detail}")
        } else {
            "page cache could not be dropped: warm".to_string()
        }
    };
    rows.push(Row::new(
        "limit: loopback TCP, one stream, 1 MiB writes",
        "raw",
        loopback,
        "GiB/s",
    ));
    rows.push(
        Row::new(
            "limit: sequential 4 MiB reads with readahead, data not in the page cache",
            "raw",
            cold_read,
            "GiB/s",
        )
        .note(cache_note(cold, "")),
    );
    rows.push(
        Row::new(
            "limit: 4 files read at once, sequential 4 MiB reads with readahead, data not in the page cache",
            "raw",
            cold_read_four,
            "GiB/s",
        )
        .note(cache_note(
            cold_four,
            "; one thread per file, the same bytes in all as one stream",
        )),
    );
    rows.push(Row::new(
        "limit: sequential O_DIRECT write, 1 MiB blocks, QD16",
        "raw",
        direct,
        "GiB/s",
    ));
    let smaller = loopback.min(direct);
    let budget = 512 * 1024 * 1024;
    let run = storage::RunDirectory::new(data_dir, "native")?;
    eprintln!(
        "native produce then consume: {} MiB, 1 partition, acks=written",
        bytes / mib(1)
    );
    let figures = native::throughput(run.path(), bytes, budget)?;
    drop(run);
    rows.push(
        Row::new(
            "native produce, 1 KiB records in 64 KiB batches, 1 partition, acks=written",
            "broker",
            gib_per_second(figures.produce_bytes_per_second),
            "GiB/s",
        )
        .against(
            if loopback < direct {
                "loopback"
            } else {
                "direct write"
            },
            smaller,
        )
        .target(">= 50%")
        .note(format!(
            "{} MiB, window 64 batches (4 MiB), 2 shards; broker CPU {:.2} s/GiB; broker writes {:.3} bytes to the block layer per byte produced",
            figures.bytes / mib(1),
            figures.produce_cpu_seconds_per_gib,
            figures.produce_write_amplification
        )),
    );
    // Record size: batches of about 64 KiB made of small and large records.
    for value_bytes in [100usize, 16 * 1024] {
        let run = storage::RunDirectory::new(data_dir, "sizes")?;
        eprintln!("native produce with {value_bytes}-byte records");
        let speed = native::produce_record_size(run.path(), bytes.min(mib(1024)), value_bytes)?;
        drop(run);
        rows.push(
            Row::new(
                &format!("native produce, {value_bytes} B records in ~64 KiB batches, 1 partition, acks=written"),
                "broker",
                gib_per_second(speed),
                "GiB/s",
            )
            .against(if loopback < direct { "loopback" } else { "direct write" }, smaller)
            .note(format!("{} MiB", bytes.min(mib(1024)) / mib(1))),
        );
    }
    // Other load shapes: partitions, producers, fsync policies.
    let shape_bytes = bytes.min(mib(1024));
    let shapes_list = [
        (4, 1, "interval-ms", Acks::Written),
        (1, 4, "interval-ms", Acks::Written),
        (4, 4, "interval-ms", Acks::Written),
        (1, 1, "never", Acks::Written),
        (1, 1, "interval-ms", Acks::Written),
        (1, 1, "every-batch", Acks::Written),
        (1, 1, "every-batch", Acks::Durable),
        (4, 4, "every-batch", Acks::Durable),
    ];
    for (partitions, producers, fsync, acks) in shapes_list {
        let run = storage::RunDirectory::new(data_dir, "shapes")?;
        let acks_name = if acks == Acks::Durable {
            "durable"
        } else {
            "written"
        };
        eprintln!(
            "native produce: {partitions} partition(s), {producers} producer(s), fsync {fsync}, acks={acks_name}"
        );
        let shape = shapes::Shape {
            partitions,
            producers,
            fsync,
            acks,
        };
        let speed = shapes::produce(run.path(), shape_bytes, shape)?;
        drop(run);
        rows.push(
            Row::new(
                &format!(
                    "native produce, 1 KiB records in 64 KiB batches, {partitions} partition(s), {producers} producer(s), fsync {fsync}, acks={acks_name}"
                ),
                "broker",
                gib_per_second(speed),
                "GiB/s",
            )
            .against(if loopback < direct { "loopback" } else { "direct write" }, smaller)
            .note(format!(
                "{} MiB in all, each producer on its own connection with 64 batches in flight",
                shape_bytes / mib(1)
            )),
        );
    }
    let run = storage::RunDirectory::new(data_dir, "end-to-end")?;
    eprintln!("end-to-end latency at 20 MB/s offered for {latency_seconds} s");
    let end_to_end = shapes::end_to_end_latency(
        run.path(),
        20e6,
        std::time::Duration::from_secs(latency_seconds),
    )?;
    drop(run);
    rows.push(
        Row::new("end-to-end latency (produce acks=written to consumer long poll) at 20 MB/s offered: p99", "broker", end_to_end.latency.p99_us, "us")
            .note(format!(
                "p50 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs, {} batches of 64 KiB, achieved {:.1} MB/s of {:.0}; from each batch's intended send time to the consumer holding it",
                end_to_end.latency.p50_us,
                end_to_end.p999_us,
                end_to_end.latency.max_us,
                end_to_end.latency.samples,
                end_to_end.achieved_bytes_per_second / 1e6,
                end_to_end.offered_bytes_per_second / 1e6
            )),
    );
    // The same load shape on a peer: 1 KiB messages, persisted and acknowledged.
    let peer_bytes = bytes.min(mib(1024));
    let peer = storage::RunDirectory::new(data_dir, "nats").and_then(|run| {
        eprintln!(
            "peer: NATS JetStream, file storage, {} MiB of 1 KiB messages",
            peer_bytes / mib(1)
        );
        let server = peers::NatsServer::start(run.path())?;
        let speed = peers::jetstream_publish(&server, peer_bytes, 1024)?;
        drop(server);
        drop(run);
        Ok(speed)
    });
    match peer {
        Ok(speed) => {
            let nats = gib_per_second(speed);
            rows.push(
                Row::new("peer: NATS JetStream (file storage), publish 1 KiB messages, each acknowledged", "nats-server", nats, "GiB/s")
                    .against(if loopback < direct { "loopback" } else { "direct write" }, smaller)
                    .note(format!("{} MiB, 4096 unacknowledged at most; nats-server from Debian", peer_bytes / mib(1))),
            );
            rows.push(
                Row::new("native produce compared with NATS JetStream", "broker", gib_per_second(figures.produce_bytes_per_second) / nats, "x")
                    .note("Rill's acks=written produce throughput divided by JetStream's acknowledged publish throughput, same run"),
            );
        }
        Err(error) => {
            eprintln!("peer NATS JetStream unavailable: {error:#}");
            rows.push(
                Row::new("peer: NATS JetStream (file storage), publish 1 KiB messages, each acknowledged", "nats-server", 0.0, "GiB/s")
                    .note(format!("UNAVAILABLE: {error:#}")),
            );
        }
    }
    rows.push(
        Row::new(
            "native consume of data on disk, page cache cold, 4 MiB fetches",
            "broker",
            gib_per_second(figures.consume_bytes_per_second),
            "GiB/s",
        )
        .against("loopback", loopback)
        .target(">= 70%")
        .note(format!(
            "{:.0}% of the cold-read limit; CPU per GiB: broker {:.2} s, client {:.2} s; {}; one buffered read per fetch, the kernel asked to read ahead, then sent",
            100.0 * gib_per_second(figures.consume_bytes_per_second) / cold_read,
            figures.consume_cpu_seconds_per_gib,
            figures.consume_client_cpu_seconds_per_gib,
            if figures.consume_cold {
                "page cache dropped first"
            } else {
                "page cache could not be dropped (segments written with O_DIRECT are not cached anyway)"
            }
        ))
        ,
    );
    rows.push(
        Row::new(
            "native consume of data on disk, 4 partitions, 4 MiB fetches, each partition's next asked for at its answer's head",
            "broker",
            gib_per_second(figures.consume_four_partitions_bytes_per_second),
            "GiB/s",
        )
        .against("loopback", loopback)
        .target(">= 70%")
        .note(format!(
            "{:.0}% of the 4-file cold-read limit; the same bytes as above, spread over 4 partitions",
            100.0 * gib_per_second(figures.consume_four_partitions_bytes_per_second) / cold_read_four
        )),
    );
    // Each warm round is compared with a loopback measurement taken right
    // before it: the ratio is the median of the per-round ratios.
    let warm = Samples::of_rounds(&figures.consume_warm_rounds);
    let per_round = figures
        .consume_warm_rounds
        .iter()
        .map(|(speed, limit)| format!("{:.0}%", 100.0 * speed / limit))
        .collect::<Vec<_>>()
        .join(", ");
    let warm_row = warm.row(
        "native consume of data on disk, page cache warm (a second reader of the same partition), 4 MiB fetches",
        "broker",
        "loopback",
        ">= 70%",
    );
    let warm_note = format!(
        "the first read left the segments cached; CPU per GiB: broker {:.2} s, client {:.2} s; {} sent with sendfile; each round right after a loopback measurement of its own, the ratio the median of per-round ratios ({per_round}); {:.0}% of the best loopback above{}",
        figures.consume_warm_cpu_seconds_per_gib,
        figures.consume_warm_client_cpu_seconds_per_gib,
        figures
            .consume_warm_sendfile_share
            .map_or("unknown share".to_string(), |share| format!(
                "{:.0}%",
                100.0 * share
            )),
        100.0 * warm_row.value / loopback,
        warm_row.note
    );
    rows.push(warm_row.note(warm_note));
    let large_row = Samples::of_rounds(&figures.consume_warm_large_rounds).row(
        &format!(
            "native consume of data on disk, page cache warm, {} MiB fetches",
            figures.consume_warm_large_fetch_bytes.div_ceil(1024 * 1024)
        ),
        "broker",
        "loopback",
        "",
    );
    let large_note = format!(
        "the largest fetch the broker's frames hold; each round right after the 4 MiB round above, against its loopback measurement: fewer request-answer turns per GiB; broker CPU per GiB {:.2} s; {}",
        figures.consume_warm_large_cpu_seconds_per_gib, large_row.note
    );
    rows.push(large_row.note(large_note));
    rows.push(
        Row::new(
            "broker peak resident memory under that load",
            "broker",
            figures.peak_resident_kib as f64 / 1024.0,
            "MiB",
        )
        .against("memory budget", (budget / mib(1)) as f64)
        .target("<= 100%"),
    );
    let run = storage::RunDirectory::new(data_dir, "durable")?;
    eprintln!("durable produce at 50 MB/s offered for {latency_seconds} s");
    let latency = native::durable_latency(
        run.path(),
        50e6,
        std::time::Duration::from_secs(latency_seconds),
    )?;
    drop(run);
    rows.push(
        Row::new("durable produce (fsync every-batch) at 50 MB/s offered: p99 ack latency", "broker", latency.latency.p99_us, "us")
            .target("<= 5000 µs")
            .note(format!(
                "p50 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs, {} batches, achieved {:.1} MB/s of {:.0}; latency from the intended send time",
                latency.latency.p50_us,
                latency.p999_us,
                latency.latency.max_us,
                latency.latency.samples,
                latency.achieved_bytes_per_second / 1e6,
                latency.offered_bytes_per_second / 1e6
            )),
    );
    let run = storage::RunDirectory::new(data_dir, "memory")?;
    eprintln!(
        "resident memory on tiny-512m: idle, then under {} MiB of load",
        memory_load_bytes / mib(1)
    );
    let (idle_kib, peak_kib) = native::memory(run.path(), "tiny-512m", memory_load_bytes)?;
    drop(run);
    rows.push(
        Row::new(
            "idle broker resident memory, profile tiny-512m",
            "broker",
            idle_kib as f64 / 1024.0,
            "MiB",
        )
        .target("<= 16 MiB"),
    );
    rows.push(
        Row::new(
            "peak resident memory under load, profile tiny-512m",
            "broker",
            peak_kib as f64 / 1024.0,
            "MiB",
        )
        .against("memory budget", (TINY_MEMORY_BUDGET_BYTES / mib(1)) as f64)
        .target("<= 100%"),
    );
    Ok(rows)
}

#[cfg(not(feature = "kafka"))]
fn mirror_scenario(_data_dir: &std::path::Path, _smoke: bool) -> anyhow::Result<Vec<Row>> {
    anyhow::bail!("mirror scenario unavailable: {KAFKA_UNAVAILABLE}")
}

#[cfg(feature = "kafka")]
fn mirror_scenario(data_dir: &std::path::Path, smoke: bool) -> anyhow::Result<Vec<Row>> {
    let plan = if smoke {
        mirror::Plan {
            backlog_bytes: mib(64),
            kafka_bytes: mib(64),
            partitions: 1,
            drain_deadline: Duration::from_secs(120),
        }
    } else {
        mirror::Plan {
            // MIRROR_BACKLOG_MIB: a smaller backlog while
            // exploring; the figures in BENCHMARKS.md use the default.
            backlog_bytes: mib(std::env::var("MIRROR_BACKLOG_MIB")
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(10 * 1024)),
            kafka_bytes: mib(1024),
            partitions: 1,
            drain_deadline: Duration::from_secs(1200),
        }
    };
    let run = storage::RunDirectory::new(data_dir, "mirror")?;
    let figures = mirror::run(run.path(), &plan)?;
    drop(run);
    let backlog = format!(
        "{:.1} GiB backlog ({} records of 1 KiB in 64 KiB batches, {} partition(s))",
        figures.backlog_bytes as f64 / (1u64 << 30) as f64,
        figures.records,
        plan.partitions
    );
    let kafka_gib = gib_per_second(figures.kafka.bytes_per_second);
    let mut rows = vec![
        Row::new(
            "Kafka produce (librdkafka) to the central broker, 1 KiB records, 1 partition, acks=1",
            "librdkafka",
            kafka_gib,
            "GiB/s",
        )
        .note(format!(
            "median of {} rounds of {} MiB ({} GiB/s); central: rill, 2 shards, fsync interval-ms, {}; CPU per GiB (median round): central {:.2} s, client {:.2} s",
            figures.kafka_rates.len(),
            plan.kafka_bytes >> 20,
            figures
                .kafka_rates
                .iter()
                .map(|rate| format!("{:.3}", gib_per_second(*rate)))
                .collect::<Vec<_>>()
                .join(", "),
            figures.central_where,
            figures.kafka.broker_cpu_seconds_per_gib,
            figures.kafka.client_cpu_seconds_per_gib
        )),
        Row::new(
            "mirror: an edge drains its backlog to the central broker (Kafka protocol, unconstrained loopback)",
            "broker",
            gib_per_second(figures.drain_bytes_per_second()),
            "GiB/s",
        )
        .against("Kafka produce", kafka_gib)
        .target(">= 80%")
        .note(format!(
            "{backlog}; from the edge's start with the destination configured to the last record at the central broker (idempotent producer, acks=all, provenance header on every record, checked exactly once); CPU per GiB: edge {:.2} s, central {:.2} s",
            figures.edge_cpu_seconds_per_gib, figures.central_cpu_seconds_per_gib
        )),
        Row::new(
            &format!(
                "mirror: time to drain a {:.1} GiB backlog",
                figures.backlog_bytes as f64 / (1u64 << 30) as f64
            ),
            "broker",
            figures.drain_seconds,
            "s",
        )
        .note(backlog.clone()),
    ];
    let budget_mib = figures.edge_budget_bytes as f64 / (1u64 << 20) as f64;
    rows.push(
        Row::new(
            "mirror: edge peak resident memory while draining",
            "broker",
            figures.edge_peak_resident_kib as f64 / 1024.0,
            "MiB",
        )
        .against(
            &format!("profile {} memory budget", mirror::EDGE_PROFILE),
            budget_mib,
        )
        .target("<= 100%")
        .note(backlog),
    );
    Ok(rows)
}

#[cfg(not(feature = "kafka"))]
fn kafka_scenario(_data_dir: &std::path::Path, _smoke: bool) -> anyhow::Result<Vec<Row>> {
    anyhow::bail!("kafka scenario unavailable: {KAFKA_UNAVAILABLE}")
}

/// One figure's median over rounds, with its spread after `note`, as a
/// row without a limit.
#[cfg(feature = "kafka")]
fn median_row(scenario: &str, driver: &str, values: &[f64], note: String) -> Row {
    let mut sorted = values.to_vec();
    let value = median(&mut sorted);
    Row::new(scenario, driver, value, "GiB/s").note(format!(
        "{note}; median of {} rounds (min {:.2}, max {:.2} GiB/s)",
        values.len(),
        sorted.first().copied().unwrap_or(0.0),
        sorted.last().copied().unwrap_or(0.0)
    ))
}

#[cfg(feature = "kafka")]
fn kafka_scenario(data_dir: &std::path::Path, smoke: bool) -> anyhow::Result<Vec<Row>> {
    let plan = if smoke {
        kafka::Plan {
            bytes: mib(64),
            rounds: 1,
            latency_offered_bytes_per_second: 20e6,
            latency_duration: Duration::from_secs(1),
        }
    } else {
        kafka::Plan {
            bytes: mib(1024),
            rounds: 3,
            latency_offered_bytes_per_second: 20e6,
            latency_duration: Duration::from_secs(10),
        }
    };
    let run = storage::RunDirectory::new(data_dir, "kafka")?;
    eprintln!(
        "Kafka wire protocol next to native: {} rounds of {} MiB each way, 1 partition",
        plan.rounds,
        plan.bytes / mib(1)
    );
    let figures = kafka::run(run.path(), &plan)?;
    drop(run);
    let mib_moved = figures.bytes / mib(1);
    let settings = |settings: &[(&str, &str)]| {
        settings
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpu = |phases: Vec<kafka::Phase>| {
        let mut broker: Vec<f64> = phases
            .iter()
            .map(|phase| phase.broker_cpu_seconds_per_gib)
            .collect();
        let mut client: Vec<f64> = phases
            .iter()
            .map(|phase| phase.client_cpu_seconds_per_gib)
            .collect();
        format!(
            "CPU per GiB (medians): broker {:.2} s, client {:.2} s",
            median(&mut broker),
            median(&mut client)
        )
    };
    let gib = |phase: &kafka::Phase| gib_per_second(phase.bytes_per_second);
    // Each round's Kafka/native ratio, in round order: the spread says more
    // than the median on this shared machine.
    let ratios = |ratio: fn(&kafka::Round) -> f64| {
        let ratios: Vec<String> = figures
            .rounds
            .iter()
            .map(|round| format!("{:.0}%", 100.0 * ratio(round)))
            .collect();
        format!(
            "per-round ratios {} (native first in odd rounds, Kafka first in even ones)",
            ratios.join(", ")
        )
    };
    let mut rows = Vec::new();

    let native_produce: Vec<f64> = figures
        .rounds
        .iter()
        .map(|round| gib(&round.native_produce))
        .collect();
    rows.push(
        median_row(
            "native produce, 1 KiB records in 64 KiB batches, 1 partition, acks=written (broker of the Kafka run)",
            "native",
            &native_produce,
            format!(
                "{mib_moved} MiB per round, window {} batches; {}",
                native::PRODUCE_WINDOW_BATCHES,
                cpu(figures.rounds.iter().map(|round| round.native_produce).collect())
            ),
        ),
    );
    let mut kafka_produce = Samples::default();
    for round in &figures.rounds {
        kafka_produce.push(
            gib(&round.kafka_produce),
            gib(&round.native_produce),
            format!(
                "{mib_moved} MiB, the same records as native (bytes counted as native batches); {}; {}; {}",
                settings(kafka::PRODUCER_SETTINGS),
                cpu(figures.rounds.iter().map(|round| round.kafka_produce).collect()),
                ratios(|round| {
                    round.kafka_produce.bytes_per_second / round.native_produce.bytes_per_second
                })
            ),
        );
    }
    rows.push(kafka_produce.row(
        "Kafka produce (librdkafka), 1 KiB records in ~64 KiB batches, 1 partition, acks=1",
        "librdkafka",
        "native produce",
        ">= 80%",
    ));

    let cold = figures.rounds.iter().all(|round| round.cold);
    let native_consume: Vec<f64> = figures
        .rounds
        .iter()
        .map(|round| gib(&round.native_consume))
        .collect();
    rows.push(median_row(
        "native consume of that data on disk, 4 MiB fetches, the next asked for at each answer's head",
        "native",
        &native_consume,
        format!(
            "{}; {}",
            if cold {
                "page cache dropped before each consume"
            } else {
                "page cache could not be dropped: warm"
            },
            cpu(figures
                .rounds
                .iter()
                .map(|round| round.native_consume)
                .collect())
        ),
    ));
    let mut kafka_consume = Samples::default();
    for round in &figures.rounds {
        kafka_consume.push(
            gib(&round.kafka_consume),
            gib(&round.native_consume),
            format!(
                "the same batches as the native consume, assigned partition (no group join, no commits); {}; {}; {}",
                settings(kafka::CONSUMER_SETTINGS),
                cpu(figures.rounds.iter().map(|round| round.kafka_consume).collect()),
                ratios(|round| {
                    round.kafka_consume.bytes_per_second / round.native_consume.bytes_per_second
                })
            ),
        );
    }
    rows.push(kafka_consume.row(
        "Kafka consume (librdkafka) of the same data on disk, 4 MiB fetches",
        "librdkafka",
        "native consume",
        ">= 80%",
    ));

    let latency = &figures.latency;
    rows.push(
        Row::new(
            &format!(
                "Kafka produce (librdkafka) at {:.0} MB/s offered, acks=all, fsync every-batch: p99 latency",
                latency.offered_bytes_per_second / 1e6
            ),
            "librdkafka",
            latency.latency.p99_us,
            "us",
        )
        .note(format!(
            "p50 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs, {} records in {} s, achieved {:.1} MB/s of {:.0}; latency from each record's intended send time to its delivery report; {}",
            latency.latency.p50_us,
            latency.p999_us,
            latency.latency.max_us,
            latency.latency.samples,
            plan.latency_duration.as_secs(),
            latency.achieved_bytes_per_second / 1e6,
            latency.offered_bytes_per_second / 1e6,
            settings(kafka::LATENCY_PRODUCER_SETTINGS)
        )),
    );
    rows.push(
        Row::new(
            "broker peak resident memory, Kafka and native load",
            "broker",
            figures.peak_resident_kib as f64 / 1024.0,
            "MiB",
        )
        .against("memory budget", 512.0)
        .target("<= 100%"),
    );
    Ok(rows)
}
