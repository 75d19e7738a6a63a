//! Counters and latency histograms, rendered in the Prometheus text format
//! for `/metrics`. Shards update atomics; nothing here takes a lock on the
//! data path except the rare eviction record.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::shard::PartitionStats;

/// Latency bucket upper bounds, in microseconds.
const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    5_000_000,
];

/// A fixed-bucket latency histogram.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, latency: Duration) {
        let micros = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (index, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += self.counts[index].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        cumulative += self.counts[LATENCY_BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

#[derive(Debug, Default)]
struct ShardCounters {
    appends: AtomicU64,
    appended_bytes: AtomicU64,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
}

/// How a fetch's segment bytes reached the socket.
#[derive(Debug, Clone, Copy)]
pub enum FetchPath {
    /// `sendfile` from the page cache: no copy on the broker's side.
    Sendfile = 0,
    /// Spliced through a pipe on io_uring: no copy through user space.
    Splice = 1,
    /// Read into memory, then written: two copies.
    Read = 2,
}

const FETCH_PATHS: [&str; 3] = ["sendfile", "splice", "read"];

/// Everything `/metrics` reports that is not read from the shards' statistics.
#[derive(Debug)]
pub struct Metrics {
    shards: Vec<ShardCounters>,
    pub produce_latency: Histogram,
    pub fetch_latency: Histogram,
    pub connections_rejected: AtomicU64,
    /// Native and Kafka connections moved to the shard owning what they produce to.
    pub connections_moved: AtomicU64,
    pub frames_rejected: AtomicU64,
    /// Segment bytes sent to fetchers, by [`FetchPath`].
    fetch_sent_bytes: [AtomicU64; FETCH_PATHS.len()],
    /// Kafka requests by API key (index = key; keys past the end are not counted).
    kafka_requests: Vec<AtomicU64>,
    evicted_records: Mutex<BTreeMap<(String, u32), u64>>,
}

/// Kafka API keys counted in `/metrics` (0 to 99 covers every key defined).
const KAFKA_API_KEYS: usize = 100;

/// A per-partition series: name, Prometheus type, and how to read it.
type PartitionSeries = (&'static str, &'static str, fn(&PartitionStats) -> f64);

/// Facts about the process for `/metrics`.
pub struct ProcessFacts<'a> {
    pub io_driver: &'a str,
    pub connections: u32,
    pub disk_used_bytes: u64,
    pub disk_quota_bytes: Option<u64>,
    pub disk_free_bytes: Option<u64>,
    pub buffer_bytes: u64,
    pub buffer_bytes_max: u64,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards).map(|_| ShardCounters::default()).collect(),
            produce_latency: Histogram::default(),
            fetch_latency: Histogram::default(),
            connections_rejected: AtomicU64::new(0),
            connections_moved: AtomicU64::new(0),
            frames_rejected: AtomicU64::new(0),
            fetch_sent_bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            kafka_requests: (0..KAFKA_API_KEYS).map(|_| AtomicU64::new(0)).collect(),
            evicted_records: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts one Kafka request of API `key`.
    pub fn record_kafka_request(&self, key: i16) {
        if let Some(counter) = usize::try_from(key)
            .ok()
            .and_then(|key| self.kafka_requests.get(key))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn record_append(&self, shard: u32, bytes: u64) {
        if let Some(counters) = self.shards.get(shard as usize) {
            counters.appends.fetch_add(1, Ordering::Relaxed);
            counters.appended_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn record_fetch(&self, shard: u32, bytes: u64) {
        if let Some(counters) = self.shards.get(shard as usize) {
            counters.fetches.fetch_add(1, Ordering::Relaxed);
            counters.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn record_fetch_sent(&self, path: FetchPath, bytes: u64) {
        self.fetch_sent_bytes[path as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn record_eviction(&self, topic: &str, partition: u32, records: u64) {
        let mut evicted = self
            .evicted_records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *evicted.entry((topic.to_string(), partition)).or_default() += records;
    }

    /// The whole `/metrics` page.
    pub fn render(&self, partitions: &[PartitionStats], facts: &ProcessFacts<'_>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP rill_kafka_requests_total Kafka requests decoded, by API.\n# TYPE rill_kafka_requests_total counter"
        );
        for (key, counter) in self.kafka_requests.iter().enumerate() {
            let count = counter.load(Ordering::Relaxed);
            if count > 0 {
                let api = kafka_protocol::messages::ApiKey::try_from(key as i16)
                    .map_or_else(|()| format!("{key}"), |api| format!("{api:?}"));
                let _ = writeln!(out, "rill_kafka_requests_total{{api=\"{api}\"}} {count}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP rill_fetch_sent_bytes_total Segment bytes sent to fetchers, by how: sendfile from the page cache, spliced, or read into memory.\n# TYPE rill_fetch_sent_bytes_total counter"
        );
        for (path, counter) in FETCH_PATHS.iter().zip(&self.fetch_sent_bytes) {
            let _ = writeln!(
                out,
                "rill_fetch_sent_bytes_total{{path=\"{path}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP rill_io_driver The I/O driver in use.\n# TYPE rill_io_driver gauge"
        );
        let _ = writeln!(out, "rill_io_driver{{driver=\"{}\"}} 1", facts.io_driver);
        let _ = writeln!(
            out,
            "# HELP rill_connections Open client connections.\n# TYPE rill_connections gauge"
        );
        let _ = writeln!(out, "rill_connections {}", facts.connections);
        let _ = writeln!(
            out,
            "# HELP rill_buffer_bytes Bytes in connection buffers (read buffers, queued answers).\n# TYPE rill_buffer_bytes gauge"
        );
        let _ = writeln!(out, "rill_buffer_bytes {}", facts.buffer_bytes);
        let _ = writeln!(
            out,
            "# TYPE rill_buffer_bytes_max gauge\nrill_buffer_bytes_max {}",
            facts.buffer_bytes_max
        );
        let _ = writeln!(out, "# TYPE rill_connections_rejected_total counter");
        let _ = writeln!(
            out,
            "rill_connections_rejected_total {}",
            self.connections_rejected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rill_connections_moved_total Native and Kafka connections moved to the shard that owns the partition they produce to.\n# TYPE rill_connections_moved_total counter"
        );
        let _ = writeln!(
            out,
            "rill_connections_moved_total {}",
            self.connections_moved.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE rill_frames_rejected_total counter");
        let _ = writeln!(
            out,
            "rill_frames_rejected_total {}",
            self.frames_rejected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rill_disk_used_bytes Bytes of segments in the data directory.\n# TYPE rill_disk_used_bytes gauge"
        );
        let _ = writeln!(out, "rill_disk_used_bytes {}", facts.disk_used_bytes);
        if let Some(quota) = facts.disk_quota_bytes {
            let _ = writeln!(
                out,
                "# TYPE rill_disk_quota_bytes gauge\nrill_disk_quota_bytes {quota}"
            );
        }
        if let Some(free) = facts.disk_free_bytes {
            let _ = writeln!(
                out,
                "# TYPE rill_disk_free_bytes gauge\nrill_disk_free_bytes {free}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP rill_shard_appends_total Appends per shard (shard load).\n# TYPE rill_shard_appends_total counter"
        );
        for (index, counters) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "rill_shard_appends_total{{shard=\"{index}\"}} {}",
                counters.appends.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE rill_shard_append_bytes_total counter");
        for (index, counters) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "rill_shard_append_bytes_total{{shard=\"{index}\"}} {}",
                counters.appended_bytes.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE rill_shard_fetches_total counter");
        for (index, counters) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "rill_shard_fetches_total{{shard=\"{index}\"}} {}",
                counters.fetches.load(Ordering::Relaxed)
            );
        }
        let gauges: [PartitionSeries; 7] = [
            ("rill_partition_bytes_in_total", "counter", |stats| {
                stats.bytes_in as f64
            }),
            ("rill_partition_records_in_total", "counter", |stats| {
                stats.records_in as f64
            }),
            ("rill_partition_bytes_out_total", "counter", |stats| {
                stats.bytes_out as f64
            }),
            ("rill_partition_size_bytes", "gauge", |stats| {
                stats.size_bytes as f64
            }),
            ("rill_partition_log_start_offset", "gauge", |stats| {
                stats.log_start_offset as f64
            }),
            ("rill_partition_next_offset", "gauge", |stats| {
                stats.next_offset as f64
            }),
            ("rill_partition_durable_next_offset", "gauge", |stats| {
                stats.durable_next_offset as f64
            }),
        ];
        for (name, kind, value) in gauges {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for stats in partitions {
                let _ = writeln!(
                    out,
                    "{name}{{topic=\"{}\",partition=\"{}\",shard=\"{}\"}} {}",
                    escape(&stats.topic),
                    stats.partition,
                    stats.shard,
                    value(stats)
                );
            }
        }
        let evicted = self
            .evicted_records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = writeln!(
            out,
            "# HELP rill_evicted_records_total Records deleted by the disk quota's evict-oldest policy.\n# TYPE rill_evicted_records_total counter"
        );
        for ((topic, partition), records) in evicted.iter() {
            let _ = writeln!(
                out,
                "rill_evicted_records_total{{topic=\"{}\",partition=\"{partition}\"}} {records}",
                escape(topic)
            );
        }
        self.produce_latency.render(
            &mut out,
            "rill_produce_latency_seconds",
            "Time from a produce request to its acknowledgement.",
        );
        self.fetch_latency.render(
            &mut out,
            "rill_fetch_latency_seconds",
            "Time from a fetch request to its response (long polls included).",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_partitions_and_histograms() {
        let metrics = Metrics::new(2);
        metrics.record_append(1, 100);
        metrics.produce_latency.record(Duration::from_micros(700));
        let partitions = [PartitionStats {
            topic: "sensors".into(),
            partition: 3,
            shard: 1,
            next_offset: 42,
            ..PartitionStats::default()
        }];
        let facts = ProcessFacts {
            io_driver: "io-uring",
            connections: 2,
            disk_used_bytes: 10,
            disk_quota_bytes: Some(1000),
            disk_free_bytes: None,
            buffer_bytes: 0,
            buffer_bytes_max: 1,
        };
        let page = metrics.render(&partitions, &facts);
        assert!(
            page.contains("rill_io_driver{driver=\"io-uring\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("rill_shard_append_bytes_total{shard=\"1\"} 100"),
            "{page}"
        );
        assert!(
            page.contains(
                "rill_partition_next_offset{topic=\"sensors\",partition=\"3\",shard=\"1\"} 42"
            ),
            "{page}"
        );
        assert!(
            page.contains("rill_produce_latency_seconds_bucket{le=\"0.001\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("rill_produce_latency_seconds_bucket{le=\"0.0005\"} 0"),
            "{page}"
        );
    }
}
