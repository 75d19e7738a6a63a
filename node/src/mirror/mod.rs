//! The replicator, run: the `rill_edge_bridge::replicator` parts driven
//! over real sockets and the shards, one task per destination on a thread
//! of its own (own compio runtime, on the broker's I/O driver).
//!
//! `driver` is one destination's task, following the steps written in
//! `rill_edge_bridge::replicator`'s module documentation: it reads the
//! selected source partitions through the owning shards (long-polling when
//! caught up), batches, paces the uplink with the token bucket, carries out
//! the producer client's actions over TCP (and TLS), reconciles every
//! destination partition from its tail on each start and session reset, and
//! persists the progress atomically under `DATA_DIR/mirror/NAME.checkpoint`.
//! `MirrorState` in `Shared` is what the rest of the broker sees: the
//! per-partition frontier retention must keep, and the figures for
//! `/metrics`, `/mirror` (JSON) and `rill mirror status`.

mod driver;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::broker::Shared;
use crate::config::{Config, MirrorDestination};

/// One source partition's lag at one destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: u32,
    pub destination_topic: String,
    /// Every record below it is at the destination.
    pub frontier: u64,
    /// The source partition's end (next offset) when last read.
    pub end: u64,
    pub lag_records: u64,
    /// Estimated from the partition's average record size on disk.
    pub lag_bytes: u64,
    /// Since the partition was last fully mirrored (0 when it is).
    pub lag_seconds: u64,
    /// The destination refused a batch: this partition is stopped.
    pub stopped: bool,
}

/// One destination as `rill mirror status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationStatus {
    pub name: String,
    pub bootstrap_servers: Vec<String>,
    /// `starting`, `connecting`, `reconciling`, `mirroring`, `stopped`.
    pub state: String,
    pub last_error: Option<String>,
    pub records_sent: u64,
    pub bytes_sent: u64,
    pub batches_sent: u64,
    pub connection_failures: u64,
    pub session_resets: u64,
    pub truncated_partitions: u64,
    pub partitions: Vec<PartitionLag>,
}

/// Per destination (by index), a partition's frontier.
type DestinationFrontiers = Vec<(usize, u64)>;

/// The replicator's broker-wide state.
#[derive(Debug, Default)]
pub struct MirrorState {
    destinations: Mutex<Vec<DestinationStatus>>,
    /// Per source partition, the lowest frontier over the destinations:
    /// what retention keeps (up to `mirror.unmirrored_bytes_max`).
    frontiers: Mutex<BTreeMap<(String, u32), DestinationFrontiers>>,
    /// By destination, topic and partition.
    evicted_unmirrored: Mutex<BTreeMap<(String, String, u32), u64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MirrorState {
    pub fn is_enabled(&self) -> bool {
        !lock(&self.destinations).is_empty()
    }

    pub fn status(&self) -> Vec<DestinationStatus> {
        lock(&self.destinations).clone()
    }

    fn register(&self, name: &str, bootstrap: Vec<String>) -> usize {
        let mut destinations = lock(&self.destinations);
        destinations.push(DestinationStatus {
            name: name.to_string(),
            bootstrap_servers: bootstrap,
            state: "starting".into(),
            ..DestinationStatus::default()
        });
        destinations.len() - 1
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut DestinationStatus)) {
        if let Some(status) = lock(&self.destinations).get_mut(index) {
            change(status);
        }
    }

    fn publish_frontier(&self, destination: usize, topic: &str, partition: u32, frontier: u64) {
        let mut frontiers = lock(&self.frontiers);
        let entry = frontiers.entry((topic.to_string(), partition)).or_default();
        match entry.iter_mut().find(|(index, _)| *index == destination) {
            Some(slot) => slot.1 = frontier,
            None => entry.push((destination, frontier)),
        }
    }

    /// The offset below which every destination has a partition's records
    /// (`None`: no destination mirrors it).
    pub fn frontier(&self, topic: &str, partition: u32) -> Option<u64> {
        lock(&self.frontiers)
            .get(&(topic.to_string(), partition))
            .and_then(|entries| entries.iter().map(|(_, frontier)| *frontier).min())
    }

    /// Records retention or eviction took from a partition before a
    /// destination had them (counted when the destination's reader finds
    /// them gone, so exactly).
    pub fn record_evicted_unmirrored(
        &self,
        destination: &str,
        topic: &str,
        partition: u32,
        records: u64,
    ) {
        if records == 0 {
            return;
        }
        *lock(&self.evicted_unmirrored)
            .entry((destination.to_string(), topic.to_string(), partition))
            .or_default() += records;
    }

    /// The replicator's lines of `/metrics` (none when it is off).
    pub fn render_metrics(&self, out: &mut String) {
        let destinations = self.status();
        if destinations.is_empty() {
            return;
        }
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        gauge(
            out,
            "rill_mirror_connected",
            "gauge",
            "1 while the destination has a producer session and is mirroring or reconciling.",
        );
        for destination in &destinations {
            let connected = matches!(destination.state.as_str(), "mirroring" | "reconciling");
            let _ = writeln!(
                out,
                "rill_mirror_connected{{destination=\"{}\",state=\"{}\"}} {}",
                destination.name,
                destination.state,
                u8::from(connected)
            );
        }
        type Field = fn(&DestinationStatus) -> u64;
        let counters: [(&str, &str, Field); 6] = [
            (
                "rill_mirror_records_sent_total",
                "Records the destination acknowledged.",
                |d| d.records_sent,
            ),
            (
                "rill_mirror_bytes_sent_total",
                "Batch bytes (compressed) the destination acknowledged.",
                |d| d.bytes_sent,
            ),
            (
                "rill_mirror_batches_sent_total",
                "Batches the destination acknowledged.",
                |d| d.batches_sent,
            ),
            (
                "rill_mirror_connection_failures_total",
                "Connections to the destination that failed or were lost (each retried).",
                |d| d.connection_failures,
            ),
            (
                "rill_mirror_session_resets_total",
                "Producer sessions reset (followed by reconciliation).",
                |d| d.session_resets,
            ),
            (
                "rill_mirror_truncated_partitions_total",
                "Destination partitions found shorter than what they acknowledged.",
                |d| d.truncated_partitions,
            ),
        ];
        for (name, help, field) in counters {
            gauge(out, name, "counter", help);
            for destination in &destinations {
                let _ = writeln!(
                    out,
                    "{name}{{destination=\"{}\"}} {}",
                    destination.name,
                    field(destination)
                );
            }
        }
        type Lag = fn(&PartitionLag) -> u64;
        let lags: [(&str, &str, Lag); 4] = [
            (
                "rill_mirror_lag_records",
                "Records of the source partition not yet at the destination.",
                |p| p.lag_records,
            ),
            (
                "rill_mirror_lag_bytes",
                "Bytes not yet at the destination (estimated from the average record size).",
                |p| p.lag_bytes,
            ),
            (
                "rill_mirror_lag_seconds",
                "Seconds since the partition was last fully mirrored (0 when it is).",
                |p| p.lag_seconds,
            ),
            (
                "rill_mirror_frontier_offset",
                "Source offset below which every record is at the destination.",
                |p| p.frontier,
            ),
        ];
        for (name, help, field) in lags {
            gauge(out, name, "gauge", help);
            for destination in &destinations {
                for partition in &destination.partitions {
                    let _ = writeln!(
                        out,
                        "{name}{{destination=\"{}\",topic=\"{}\",partition=\"{}\"}} {}",
                        destination.name,
                        partition.topic,
                        partition.partition,
                        field(partition)
                    );
                }
            }
        }
        gauge(
            out,
            "rill_mirror_evicted_unmirrored_records_total",
            "counter",
            "Records retention or the disk quota deleted before the destination had them.",
        );
        let evicted = lock(&self.evicted_unmirrored).clone();
        for destination in &destinations {
            let mut any = false;
            for ((name, topic, partition), records) in &evicted {
                if *name == destination.name {
                    any = true;
                    let _ = writeln!(
                        out,
                        "rill_mirror_evicted_unmirrored_records_total{{destination=\"{name}\",topic=\"{topic}\",partition=\"{partition}\"}} {records}"
                    );
                }
            }
            if !any {
                let _ = writeln!(
                    out,
                    "rill_mirror_evicted_unmirrored_records_total{{destination=\"{}\"}} 0",
                    destination.name
                );
            }
        }
    }

    /// `/mirror`: the status as JSON.
    pub fn render_json(&self) -> String {
        let evicted: u64 = lock(&self.evicted_unmirrored).values().sum();
        serde_json::json!({
            "destinations": self.status(),
            "evicted_unmirrored_records": evicted,
        })
        .to_string()
    }
}

/// The destinations when the replicator is on, with passwords read: done
/// before the broker starts, so a missing file stops the start.
pub(crate) fn prepare(config: &Config) -> anyhow::Result<Vec<MirrorDestination>> {
    let mut destinations = config
        .mirror
        .destinations()
        .map_err(|(key, message)| anyhow::anyhow!("{key}: {message}"))?;
    for (destination, setting) in destinations
        .iter_mut()
        .zip(config.mirror.destinations.iter())
    {
        if let Some(sasl) = &mut destination.client.sasl {
            sasl.password = setting.read_password().with_context(|| {
                format!(
                    "reading sasl_password_file {} of mirror destination {}",
                    setting.sasl_password_file, setting.name
                )
            })?;
        }
        if let Some(tls) = &destination.tls {
            let identity = tls
                .identity
                .as_ref()
                .map(|(cert, key)| (std::path::Path::new(cert), std::path::Path::new(key)));
            crate::tls::client_config(std::path::Path::new(&tls.ca_file), identity)
                .with_context(|| format!("TLS of mirror destination {}", setting.name))?;
        }
    }
    Ok(destinations)
}

/// Starts the replicator's thread (nothing when no destination is set).
pub(crate) fn spawn(
    shared: Arc<Shared>,
    destinations: Vec<MirrorDestination>,
) -> anyhow::Result<Option<std::thread::JoinHandle<()>>> {
    if destinations.is_empty() {
        return Ok(None);
    }
    let edge_id = shared.config.mirror.effective_edge_id();
    let indexes: Vec<usize> = destinations
        .iter()
        .map(|destination| {
            shared.mirror.register(
                &destination.name,
                destination
                    .client
                    .bootstrap
                    .iter()
                    .map(|address| format!("{}:{}", address.host, address.port))
                    .collect(),
            )
        })
        .collect();
    let thread = std::thread::Builder::new()
        .name("rill-mirror".into())
        .spawn(move || {
            let mut selection = shared.driver.clone();
            match crate::io::build_runtime(&mut selection) {
                Ok(runtime) => runtime.block_on(async move {
                    crate::io::home::install_relay();
                    crate::io::home::homed(async move {
                        let tasks: Vec<_> = destinations
                            .into_iter()
                            .zip(indexes)
                            .map(|(destination, index)| {
                                crate::io::home::spawn(driver::run(
                                    shared.clone(),
                                    destination,
                                    index,
                                    edge_id.clone(),
                                ))
                            })
                            .collect();
                        for task in tasks {
                            let _ = task.await;
                        }
                    })
                    .await
                }),
                Err(error) => {
                    tracing::error!(%error, "the replicator could not start its runtime")
                }
            }
        })
        .context("starting the replicator thread")?;
    Ok(Some(thread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontiers_are_the_lowest_over_destinations_and_figures_render() {
        let state = MirrorState::default();
        assert!(!state.is_enabled());
        let mut page = String::new();
        state.render_metrics(&mut page);
        assert!(page.is_empty(), "nothing while the replicator is off");
        let first = state.register("central", vec!["10.0.0.1:9092".into()]);
        let second = state.register("backup", vec!["10.0.0.2:9092".into()]);
        state.publish_frontier(first, "gps", 0, 120);
        state.publish_frontier(second, "gps", 0, 80);
        state.publish_frontier(first, "gps", 0, 130);
        assert_eq!(state.frontier("gps", 0), Some(80));
        assert_eq!(state.frontier("gps", 1), None);
        state.update(first, |status| {
            status.state = "mirroring".into();
            status.records_sent = 42;
            status.partitions = vec![PartitionLag {
                topic: "gps".into(),
                partition: 0,
                destination_topic: "edge.gps".into(),
                frontier: 130,
                end: 150,
                lag_records: 20,
                ..PartitionLag::default()
            }];
        });
        state.record_evicted_unmirrored("backup", "gps", 0, 7);
        let mut page = String::new();
        state.render_metrics(&mut page);
        for line in [
            "rill_mirror_connected{destination=\"central\",state=\"mirroring\"} 1",
            "rill_mirror_connected{destination=\"backup\",state=\"starting\"} 0",
            "rill_mirror_records_sent_total{destination=\"central\"} 42",
            "rill_mirror_lag_records{destination=\"central\",topic=\"gps\",partition=\"0\"} 20",
            "rill_mirror_evicted_unmirrored_records_total{destination=\"backup\",topic=\"gps\",partition=\"0\"} 7",
            "rill_mirror_evicted_unmirrored_records_total{destination=\"central\"} 0",
        ] {
            assert!(page.contains(line), "missing {line} in\n{page}");
        }
        let table = crate::cli::format_mirror_status(&state.render_json()).expect("formats");
        assert!(table.contains("destination central"), "{table}");
        assert!(
            table.contains("records deleted before they were mirrored: 7"),
            "{table}"
        );
    }

    #[test]
    fn the_sasl_password_is_read_from_its_file_before_the_start() {
        let directory = tempfile::tempdir().expect("tempdir");
        let password_file = directory.path().join("password");
        std::fs::write(&password_file, "s3cret\n").expect("write");
        let mut config = Config::default();
        config
            .mirror
            .destinations
            .push(crate::config::MirrorDestinationSetting {
                name: "central".into(),
                bootstrap_servers: vec!["127.0.0.1:9092".into()],
                sasl_mechanism: "scram-sha-512".into(),
                sasl_username: "edge".into(),
                sasl_password_file: password_file.display().to_string(),
                ..crate::config::MirrorDestinationSetting::default()
            });
        let destinations = prepare(&config).expect("prepared");
        let sasl = destinations[0].client.sasl.as_ref().expect("sasl");
        assert_eq!(sasl.password, "s3cret");
        assert_eq!(sasl.username, "edge");
        config.mirror.destinations[0].sasl_password_file =
            directory.path().join("missing").display().to_string();
        let error = prepare(&config).expect_err("a missing password file stops the start");
        assert!(
            format!("{error:#}").contains("sasl_password_file"),
            "{error:#}"
        );
    }
}
