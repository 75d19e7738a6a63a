//! `rill-bench`: Rill's benchmark harness. Every figure is measured next to
//! the machine's own limit in the same run and reported as a ratio, because
//! shared machines are noisy and absolute numbers travel badly.
//!
//! Every run is bounded: by the bytes it writes, and by a watchdog that ends
//! the process with a clear message if the machine stalls.

mod limits;
mod machine;
mod report;
mod storage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use rill_core::log::FsyncPolicy;
use rill_node::io::{IoDriver, io_uring_unavailable_reason};
use serde::Serialize;

use crate::machine::Machine;
use crate::report::{Row, gib_per_second, print_table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// The storage engine: append per driver and fsync policy, write
    /// amplification, sealed-segment reads, recovery of an active segment.
    Storage,
}

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
            ExitCode::FAILURE
        }
    }
}

fn run(arguments: &Arguments) -> anyhow::Result<()> {
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

fn storage_scenario(data_dir: &std::path::Path, smoke: bool) -> anyhow::Result<Vec<Row>> {
    let (append_bytes, limit_bytes, recovery_bytes, sync_iterations) = if smoke {
        (mib(48), mib(64), mib(48), 50)
    } else {
        (mib(1024), mib(2048), mib(1024), 2000)
    };
    let mut rows = Vec::new();
    let limits_directory = storage::RunDirectory::new(data_dir, "limits")?;
    eprintln!("measuring limits: direct write, buffered write, fdatasync");
    let direct = limits::direct_write_bandwidth(limits_directory.path(), limit_bytes)
        .context("raw direct write")?;
    let buffered = limits::buffered_write_bandwidth(limits_directory.path(), limit_bytes)
        .context("raw buffered write")?;
    let fdatasync = limits::fdatasync_latency(limits_directory.path(), sync_iterations)
        .context("raw fdatasync")?;
    rows.push(Row::new(
        "limit: sequential O_DIRECT write, 1 MiB blocks, QD16",
        "raw",
        gib_per_second(direct),
        "GiB/s",
    ));
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
    for &driver in &drivers {
        for (policy_name, policy) in policies {
            let run = storage::RunDirectory::new(data_dir, "append")?;
            eprintln!("append: driver {driver}, fsync {policy_name}");
            let figures = storage::append_run(driver, run.path(), policy, append_bytes)
                .with_context(|| format!("append with {driver}, {policy_name}"))?;
            let target = match (driver, policy) {
                (IoDriver::IoUring, FsyncPolicy::Never) => ">= 70%",
                (IoDriver::IoUring, FsyncPolicy::EveryBatch) => ">= 25%",
                _ => "",
            };
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
            rows.push(
                Row::new(
                    &format!(
                        "append 1 KiB records in 64 KiB batches, 1 partition, fsync {policy_name}"
                    ),
                    &driver.to_string(),
                    gib_per_second(figures.bytes_per_second()),
                    "GiB/s",
                )
                .against("direct write", gib_per_second(direct))
                .target(target)
                .note(note),
            );
            if policy == FsyncPolicy::Never {
                let mut amplification = Row::new(
                    "write amplification (process bytes to block layer / batch bytes), fsync never",
                    &driver.to_string(),
                    figures.process_write_amplification,
                    "x",
                )
                .target("<= 1.05");
                if let Some(device) = figures.device_write_amplification {
                    amplification =
                        amplification.note(format!("device sectors written / batch bytes: {device:.3} (includes journal and other processes)"));
                }
                rows.push(amplification);
            }
        }
    }

    let read_driver = drivers[0];
    {
        let run = storage::RunDirectory::new(data_dir, "read")?;
        eprintln!(
            "read: writing {} MiB of sealed segments",
            append_bytes / mib(1)
        );
        storage::append_run(read_driver, run.path(), FsyncPolicy::Never, append_bytes)?;
        let (cold_speed, cold) = storage::read_run(read_driver, run.path())?;
        let (warm_speed, _) = {
            // Without dropping the cache: the second read is served from memory.
            let (runtime_speed, _) = storage::read_run(read_driver, run.path())?;
            (runtime_speed, false)
        };
        rows.push(
            Row::new(
                "read sealed segments, checked owned bytes, 1 MiB reads",
                &read_driver.to_string(),
                gib_per_second(cold_speed),
                "GiB/s",
            )
            .against("direct write", gib_per_second(direct))
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
