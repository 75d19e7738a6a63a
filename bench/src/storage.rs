//! Storage-engine figures: append throughput per driver and fsync policy,
//! write amplification, read throughput of sealed segments, recovery time.
//! Each is measured on the data directory's disk, next to its limits.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use rill_core::batch::RecordBuilder;
use rill_core::log::{FsyncPolicy, LogConfig, PartitionLog, SyncTarget, TimestampType};
use rill_node::io::{DriverSelection, IoDriver, NodeStorage, build_runtime};

use crate::machine::{DiskCounters, drop_page_cache};
use crate::report::Latency;

/// Records per batch: 62 records of 1 KiB make a batch of about 64 KiB.
pub const RECORDS_PER_BATCH: usize = 62;
pub const RECORD_VALUE_BYTES: usize = 1024;
/// Unacknowledged batches a producer may have out (1 MiB): what group commit shares.
pub const PRODUCER_WINDOW_BATCHES: usize = 16;

/// A batch of 1 KiB records, as a producer would send it.
pub fn producer_batch() -> Vec<u8> {
    producer_batch_of(RECORD_VALUE_BYTES, RECORDS_PER_BATCH)
}

/// A batch of `records` records of `value_bytes` each, keyed like sensors.
pub fn producer_batch_of(value_bytes: usize, records: usize) -> Vec<u8> {
    let mut builder = RecordBuilder::new();
    for index in 0..records {
        let value: Vec<u8> = (0..value_bytes)
            .map(|byte| (byte * 31 + index) as u8)
            .collect();
        let key = format!("sensor-{index}");
        builder.push(
            1_700_000_000_000 + index as i64,
            Some(key.as_bytes()),
            Some(&value),
            &[],
        );
    }
    builder.finish()
}

fn config(fsync: FsyncPolicy, segment_bytes_max: u64) -> LogConfig {
    LogConfig {
        segment_bytes_max,
        segment_age_ms_max: None,
        index_interval_bytes: 4096,
        batch_bytes_max: 1024 * 1024,
        fsync,
        timestamp_type: TimestampType::CreateTime,
        retention_ms: None,
        retention_bytes: None,
        direct_io: true,
        preallocate: true,
        write_buffer_bytes: 1024 * 1024,
    }
}

/// What one append run measured.
#[derive(Debug, Clone)]
pub struct AppendFigures {
    pub bytes: u64,
    pub elapsed: Duration,
    /// Bytes this process sent to the block layer per batch byte appended.
    pub process_write_amplification: f64,
    /// Sectors the device wrote (all processes) per batch byte appended.
    pub device_write_amplification: Option<f64>,
    pub ack_latency: Option<Latency>,
    pub direct: bool,
    pub syncs: u64,
}

impl AppendFigures {
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }
}

/// Builds a runtime for `driver` and reports which one really runs.
pub fn runtime(driver: IoDriver) -> anyhow::Result<(compio::runtime::Runtime, IoDriver)> {
    let mut selection = DriverSelection {
        driver,
        reason: String::new(),
    };
    let runtime = build_runtime(&mut selection).context("starting the runtime")?;
    Ok((runtime, selection.driver))
}

/// Appends `total_bytes` of 64 KiB batches to one partition and closes it.
pub fn append_run(
    driver: IoDriver,
    directory: &Path,
    fsync: FsyncPolicy,
    total_bytes: u64,
) -> anyhow::Result<AppendFigures> {
    let (runtime, actual) = runtime(driver)?;
    anyhow::ensure!(actual == driver, "driver {driver} is not available here");
    let storage = NodeStorage::for_driver(driver);
    let batch = producer_batch();
    let disk = DiskCounters::for_path(directory);
    let process_before = crate::machine::process_write_bytes();
    let figures = runtime.block_on(async {
        let (mut log, _) =
            PartitionLog::open(storage, directory, config(fsync, 128 * 1024 * 1024)).await?;
        let direct = log.size_bytes() == 0 && probe_direct(directory);
        let started = Instant::now();
        let mut appended = 0u64;
        let mut syncs = 0u64;
        let mut latencies = Vec::new();
        match fsync {
            FsyncPolicy::EveryBatch => {
                // Group commit with a bounded producer window: batches wait for
                // the sync that covers them; those that arrive while one runs
                // share the next.
                let mut window: VecDeque<(i64, Instant)> = VecDeque::new();
                let mut running: Option<compio::runtime::JoinHandle<(io::Result<()>, SyncTarget)>> =
                    None;
                while appended < total_bytes || !window.is_empty() {
                    if appended < total_bytes && window.len() < PRODUCER_WINDOW_BATCHES {
                        let sent = Instant::now();
                        let info = log.append(&batch, 0).await?;
                        appended += info.bytes;
                        window.push_back((info.last_offset, sent));
                        if running.is_none()
                            && let Some(job) = log.begin_sync().await?
                        {
                            running = Some(compio::runtime::spawn(job.run()));
                        }
                        continue;
                    }
                    let Some(task) = running.take() else {
                        if let Some(job) = log.begin_sync().await? {
                            running = Some(compio::runtime::spawn(job.run()));
                        }
                        continue;
                    };
                    let (result, target) = task
                        .await
                        .map_err(|_| anyhow::anyhow!("sync task failed"))?;
                    let durable = log.finish_sync(result, target)?;
                    syncs += 1;
                    while window.front().is_some_and(|(last, _)| *last < durable) {
                        let (_, sent) = window.pop_front().expect("front exists");
                        latencies.push(sent.elapsed());
                    }
                    if let Some(job) = log.begin_sync().await? {
                        running = Some(compio::runtime::spawn(job.run()));
                    }
                }
            }
            FsyncPolicy::IntervalMs(interval_ms) => {
                let mut last_sync = Instant::now();
                while appended < total_bytes {
                    appended += log.append(&batch, 0).await?.bytes;
                    if last_sync.elapsed() >= Duration::from_millis(interval_ms) {
                        log.sync().await?;
                        syncs += 1;
                        last_sync = Instant::now();
                    }
                }
            }
            FsyncPolicy::Never => {
                while appended < total_bytes {
                    appended += log.append(&batch, 0).await?.bytes;
                }
            }
        }
        log.close().await?;
        let elapsed = started.elapsed();
        anyhow::Ok(AppendFigures {
            bytes: appended,
            elapsed,
            process_write_amplification: 0.0,
            device_write_amplification: None,
            ack_latency: (!latencies.is_empty()).then(|| Latency::from_samples(&mut latencies)),
            direct,
            syncs,
        })
    })?;
    let process_written = crate::machine::process_write_bytes().saturating_sub(process_before);
    let device_written = disk.and_then(|counters| counters.written_bytes_since());
    Ok(AppendFigures {
        process_write_amplification: process_written as f64 / figures.bytes as f64,
        device_write_amplification: device_written.map(|bytes| bytes as f64 / figures.bytes as f64),
        ..figures
    })
}

/// Whether this filesystem takes O_DIRECT (tmpfs and some SD setups do not).
fn probe_direct(directory: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let path = directory.join("direct-probe");
    let direct = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .is_ok();
    let _ = std::fs::remove_file(&path);
    direct
}

/// Reads a whole partition through the checked owned-bytes path, 1 MiB at a
/// time. Returns bytes per second, and whether the page cache was dropped first.
pub fn read_run(driver: IoDriver, directory: &Path, cold: bool) -> anyhow::Result<(f64, bool)> {
    let (runtime, _) = runtime(driver)?;
    let storage = NodeStorage::for_driver(driver);
    runtime.block_on(async {
        let (mut log, _) = PartitionLog::open(
            storage,
            directory,
            config(FsyncPolicy::Never, 128 * 1024 * 1024),
        )
        .await?;
        // Seal the active segment too: this measures sealed segments.
        if log.active_segment_bytes() > 0 {
            log.roll().await?;
        }
        let cold = cold && drop_page_cache();
        let started = Instant::now();
        let mut offset = log.log_start_offset();
        let mut bytes = 0u64;
        while offset < log.next_offset() {
            let (chunk, slice) = log.read_owned(offset, 1024 * 1024).await?;
            bytes += chunk.len() as u64;
            offset = slice.next_fetch_offset;
        }
        anyhow::Ok((bytes as f64 / started.elapsed().as_secs_f64(), cold))
    })
}

/// Writes `segment_bytes` into one active segment, stops without a clean
/// close (the checkpoint still points at the segment's start, as after a
/// power cut), and times recovery. Returns (seconds, bytes checked, cold cache).
pub fn recovery_run(
    driver: IoDriver,
    directory: &Path,
    segment_bytes: u64,
) -> anyhow::Result<(f64, u64, bool)> {
    let (runtime, _) = runtime(driver)?;
    let storage = NodeStorage::for_driver(driver);
    let config = config(FsyncPolicy::Never, segment_bytes + 64 * 1024 * 1024);
    let batch = producer_batch();
    runtime.block_on(async {
        {
            let (mut log, _) = PartitionLog::open(storage, directory, config).await?;
            let mut appended = 0;
            while appended < segment_bytes {
                appended += log.append(&batch, 0).await?.bytes;
            }
            log.sync().await?;
            anyhow::ensure!(
                log.segment_count() == 1,
                "the data must sit in one active segment"
            );
        }
        let cold = drop_page_cache();
        let started = Instant::now();
        let (log, report) = PartitionLog::open(storage, directory, config).await?;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.truncations.is_empty(),
            "recovery cut data: {report:?}"
        );
        anyhow::ensure!(log.size_bytes() >= segment_bytes, "recovery lost data");
        anyhow::Ok((seconds, report.bytes_checked, cold))
    })
}

/// A fresh directory for one run, removed when dropped.
pub struct RunDirectory(PathBuf);

impl RunDirectory {
    pub fn new(root: &Path, name: &str) -> anyhow::Result<Self> {
        let path = root.join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
