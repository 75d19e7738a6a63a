//! The MQTT ingest scenario (issue "MQTT ingestion", figures to measure):
//! QoS 1 PUBLISHes of 100 bytes from many clients, every message appended
//! to Rill's log, in the same run as Mosquitto under the same load
//! generator (`crate::mqtt`). Messages per second with every client's
//! window full, PUBACK latency at a fixed offered rate, the broker's CPU per
//! million messages, and the ratio of Rill to Mosquitto.
//!
//! Rill runs as it ships: the detected hardware profile, the default
//! mapping (every MQTT topic to the catch-all topic `mqtt`), and the
//! profile's fsync policy; the full run also measures the other policy of
//! `every-batch` and `interval-ms`. After each Rill phase the log is read
//! back: it must hold exactly one record per PUBACK the clients got.
//! Mosquitto runs with the configuration in `peers::mosquitto_config`.
//!
//! Two shapes: publishers alone, and publishers with one subscriber taking
//! everything on `bench/#` at QoS 0. Each measurement gets a fresh broker
//! on a fresh directory; rounds alternate the brokers' order so a slow
//! spell of the machine is slow for all of them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::broker::BrokerProcess;
use crate::limits;
use crate::mqtt::{self, Load, Pace, Phase, SUBSCRIBER_FILTER, Timing};
use crate::peers::MosquittoServer;
use crate::report::Row;
use crate::storage::RunDirectory;

/// The Rill topic the default mapping sends every MQTT topic to.
const CATCH_ALL_TOPIC: &str = "mqtt";
/// The target: Rill's messages per second over Mosquitto's.
const TARGET: &str = ">= 300%";

/// How much the scenario does.
pub struct Plan {
    pub load: Load,
    pub throughput: Timing,
    pub rounds: usize,
    /// The latency phase offers this rate, or half the slowest broker's
    /// throughput when that is lower, so no broker is measured saturated.
    pub latency_rate_max: f64,
    pub latency: Timing,
    /// Also measure Rill with the fsync policies the profile does not pick.
    pub other_fsync_policies: bool,
    /// Syncs of the fdatasync limit measured before the latency phases.
    pub fdatasync_samples: usize,
    /// Also measure Mosquitto with Nagle's algorithm off.
    pub mosquitto_without_nagle: bool,
}

impl Plan {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                load: Load {
                    clients: 10,
                    window_messages: 16,
                    payload_bytes: 100,
                    generator_threads: 1,
                },
                throughput: Timing {
                    warm_up: Duration::from_millis(200),
                    measured: Duration::from_secs(1),
                    drain_max: Duration::from_secs(10),
                },
                rounds: 1,
                latency_rate_max: 2_000.0,
                latency: Timing {
                    warm_up: Duration::from_millis(200),
                    measured: Duration::from_secs(1),
                    drain_max: Duration::from_secs(10),
                },
                other_fsync_policies: false,
                fdatasync_samples: 50,
                mosquitto_without_nagle: false,
            }
        } else {
            Self {
                load: Load {
                    clients: 100,
                    window_messages: 16,
                    payload_bytes: 100,
                    generator_threads: 1,
                },
                throughput: Timing {
                    warm_up: Duration::from_secs(1),
                    measured: Duration::from_secs(10),
                    drain_max: Duration::from_secs(30),
                },
                rounds: 3,
                latency_rate_max: 20_000.0,
                latency: Timing {
                    warm_up: Duration::from_secs(1),
                    measured: Duration::from_secs(10),
                    drain_max: Duration::from_secs(30),
                },
                other_fsync_policies: true,
                fdatasync_samples: 1000,
                mosquitto_without_nagle: true,
            }
        }
    }
}

/// A broker under test.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Broker {
    /// Rill with this `topic_defaults.fsync`, or the profile's when `None`.
    Rill(Option<&'static str>),
    /// Mosquitto as it ships, or with Nagle's algorithm off (`nodelay`).
    Mosquitto { nodelay: bool },
}

/// Mosquitto as people run it: the figure the target compares with.
const MOSQUITTO: Broker = Broker::Mosquitto { nodelay: false };

impl Broker {
    fn is_mosquitto(&self) -> bool {
        matches!(self, Broker::Mosquitto { .. })
    }
}

/// A running broker with its directory, removed when dropped.
struct Running {
    process: Process,
    _directory: RunDirectory,
}

enum Process {
    Rill(BrokerProcess),
    Mosquitto(MosquittoServer),
}

impl Running {
    fn start(broker: &Broker, data_dir: &Path) -> anyhow::Result<Self> {
        let directory = RunDirectory::new(data_dir, "mqtt")?;
        let process = match broker {
            Broker::Rill(fsync) => {
                let settings: Vec<String> = fsync
                    .iter()
                    .map(|fsync| format!("topic_defaults.fsync={fsync}"))
                    .collect();
                Process::Rill(BrokerProcess::start(directory.path(), &settings)?)
            }
            Broker::Mosquitto { nodelay } => {
                Process::Mosquitto(MosquittoServer::start(directory.path(), *nodelay)?)
            }
        };
        Ok(Self {
            process,
            _directory: directory,
        })
    }

    fn address(&self) -> &str {
        match &self.process {
            Process::Rill(broker) => &broker.mqtt,
            Process::Mosquitto(server) => &server.address,
        }
    }

    fn pid(&self) -> u32 {
        match &self.process {
            Process::Rill(broker) => broker.pid(),
            Process::Mosquitto(server) => server.pid(),
        }
    }
}

/// What Rill's log holds after a phase.
#[derive(Debug, Clone)]
struct RillLog {
    partitions: usize,
    records: u64,
    fsync: String,
}

/// Reads the catch-all topic's partitions and settings over the native
/// protocol.
fn rill_log(broker: &BrokerProcess) -> anyhow::Result<RillLog> {
    let runtime = compio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = crate::native::connect(broker).await?;
        // The broker creates the mapping's topics just after it is ready:
        // poll for a while before taking a missing topic for an answer.
        let deadline = Instant::now() + Duration::from_secs(10);
        let topic = loop {
            match client.describe_topic(CATCH_ALL_TOPIC).await {
                Ok(topic) => break topic,
                Err(_) if Instant::now() < deadline => {
                    compio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!("describing Rill's catch-all topic `{CATCH_ALL_TOPIC}`")
                    });
                }
            }
        };
        let records = topic
            .partitions
            .iter()
            .map(|partition| (partition.next_offset - partition.log_start_offset).max(0) as u64)
            .sum();
        let fsync = topic
            .settings
            .lines()
            .filter_map(|line| line.split_once('='))
            .find(|(key, _)| key.trim() == "fsync")
            .map(|(_, value)| value.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| "unknown".into());
        Ok(RillLog {
            partitions: topic.partitions.len(),
            records,
            fsync,
        })
    })
}

/// One phase on a fresh broker. For Rill, the log must then hold one
/// record per PUBACK.
fn measure(
    broker: &Broker,
    data_dir: &Path,
    plan: &Plan,
    pace: Pace,
    timing: &Timing,
    subscribe: bool,
) -> anyhow::Result<(Phase, Option<RillLog>)> {
    let running = Running::start(broker, data_dir)?;
    let phase = mqtt::run_phase(
        running.address(),
        running.pid(),
        &plan.load,
        pace,
        timing,
        subscribe,
    );
    let phase = match (phase, &running.process) {
        (Ok(phase), _) => phase,
        (Err(error), Process::Mosquitto(server)) => {
            let log = server.log_text();
            return Err(if log.trim().is_empty() {
                error
            } else {
                error.context(format!("mosquitto logged: {}", log.trim()))
            });
        }
        (Err(error), Process::Rill(_)) => return Err(error),
    };
    let log = match running.process {
        Process::Rill(broker) => {
            let log = rill_log(&broker)?;
            anyhow::ensure!(
                log.records == phase.acknowledged_total,
                "Rill acknowledged {} PUBLISHes but topic `{CATCH_ALL_TOPIC}` holds {} records",
                phase.acknowledged_total,
                log.records
            );
            broker.stop()?;
            Some(log)
        }
        Process::Mosquitto(_) => None,
    };
    Ok((phase, log))
}

/// The phases of one broker in one shape, over rounds.
struct Measured {
    broker: Broker,
    subscribe: bool,
    phases: Vec<Phase>,
    log: Option<RillLog>,
}

impl Measured {
    fn median_messages_per_second(&self) -> f64 {
        median(self.phases.iter().map(Phase::messages_per_second).collect())
    }

    fn median_broker_cpu_seconds_per_million(&self) -> f64 {
        median(
            self.phases
                .iter()
                .map(Phase::broker_cpu_seconds_per_million)
                .collect(),
        )
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    (min, max)
}

/// The broker's name in a row.
fn label(broker: &Broker, log: Option<&RillLog>, profile_fsync: &str) -> String {
    match broker {
        Broker::Rill(None) => format!("Rill fsync {profile_fsync} (profile default)"),
        Broker::Rill(Some(_)) => format!(
            "Rill fsync {}",
            log.map_or("unknown", |log| log.fsync.as_str())
        ),
        Broker::Mosquitto { nodelay: false } => {
            format!("Mosquitto {}", MosquittoServer::version())
        }
        Broker::Mosquitto { nodelay: true } => {
            format!("Mosquitto {} Nagle off", MosquittoServer::version())
        }
    }
}

fn driver(broker: &Broker) -> &'static str {
    match broker {
        Broker::Rill(_) => "broker",
        Broker::Mosquitto { .. } => "mosquitto",
    }
}

pub fn scenario(data_dir: &Path, smoke: bool) -> anyhow::Result<Vec<Row>> {
    let plan = Plan::new(smoke);
    let load = plan.load;
    let details = format!(
        "QoS 1, {} B payloads, {} clients x {} in flight",
        load.payload_bytes, load.clients, load.window_messages
    );

    // The profile's policy decides which others there are to measure.
    let profile_fsync = {
        let running = Running::start(&Broker::Rill(None), data_dir)?;
        let Process::Rill(broker) = running.process else {
            anyhow::bail!("a Rill broker was asked for and something else started");
        };
        let log = rill_log(&broker)?;
        broker.stop()?;
        log.fsync
    };
    let mut brokers = vec![Broker::Rill(None)];
    if plan.other_fsync_policies {
        for fsync in ["every-batch", "interval-ms"] {
            if fsync != profile_fsync {
                brokers.push(Broker::Rill(Some(fsync)));
            }
        }
    }
    brokers.push(MOSQUITTO);
    if plan.mosquitto_without_nagle {
        brokers.push(Broker::Mosquitto { nodelay: true });
    }
    eprintln!(
        "MQTT ingest: Rill's profile syncs {profile_fsync}; brokers {brokers:?}; {} round(s) of {:?} each",
        plan.rounds, plan.throughput.measured
    );

    let mut mosquitto_unavailable: Option<String> = None;
    let mut measured: Vec<Measured> = Vec::new();
    for subscribe in [false, true] {
        for round in 0..plan.rounds {
            // Rotate the order from round to round.
            let mut order = brokers.clone();
            order.rotate_left(round % brokers.len());
            for broker in order {
                if broker.is_mosquitto() && mosquitto_unavailable.is_some() {
                    continue;
                }
                eprintln!(
                    "MQTT ingest round {}/{}: {broker:?}, {}",
                    round + 1,
                    plan.rounds,
                    if subscribe {
                        "one QoS 0 subscriber"
                    } else {
                        "no subscriber"
                    }
                );
                let result = measure(
                    &broker,
                    data_dir,
                    &plan,
                    Pace::Unbounded,
                    &plan.throughput,
                    subscribe,
                );
                let (phase, log) = match (result, &broker) {
                    (Ok(measured), _) => measured,
                    (Err(error), Broker::Mosquitto { .. }) => {
                        eprintln!("peer Mosquitto unavailable: {error:#}");
                        mosquitto_unavailable = Some(format!("{error:#}"));
                        continue;
                    }
                    (Err(error), Broker::Rill(_)) => {
                        return Err(error).with_context(|| format!("MQTT ingest on {broker:?}"));
                    }
                };
                eprintln!(
                    "  {:.0} msg/s, broker CPU {:.2} s per million",
                    phase.messages_per_second(),
                    phase.broker_cpu_seconds_per_million()
                );
                match measured
                    .iter_mut()
                    .find(|entry| entry.broker == broker && entry.subscribe == subscribe)
                {
                    Some(entry) => {
                        entry.phases.push(phase);
                        entry.log = log.or(entry.log.take());
                    }
                    None => measured.push(Measured {
                        broker,
                        subscribe,
                        phases: vec![phase],
                        log,
                    }),
                }
            }
        }
    }

    let mut rows = Vec::new();
    for subscribe in [false, true] {
        let audience = if subscribe {
            format!("one QoS 0 subscriber on {SUBSCRIBER_FILTER}")
        } else {
            "no subscriber".to_string()
        };
        let mosquitto = measured
            .iter()
            .find(|entry| entry.broker == MOSQUITTO && entry.subscribe == subscribe);
        for entry in measured.iter().filter(|entry| entry.subscribe == subscribe) {
            rows.push(throughput_row(
                &format!("{audience}: {details}"),
                entry,
                mosquitto,
                &profile_fsync,
                subscribe,
            ));
        }
        if mosquitto.is_none() {
            rows.push(
                Row::new(
                    &format!("MQTT ingest, Mosquitto, {audience}: {details}"),
                    "mosquitto",
                    0.0,
                    "msg/s",
                )
                .note(format!(
                    "UNAVAILABLE: {}",
                    mosquitto_unavailable.as_deref().unwrap_or("not measured")
                )),
            );
        }
    }

    // The disk's own sync latency, next to the brokers' acknowledgements.
    let sync = {
        let run = RunDirectory::new(data_dir, "limits")?;
        limits::fdatasync_latency(run.path(), plan.fdatasync_samples).context("fdatasync limit")?
    };
    rows.push(
        Row::new(
            "limit: fdatasync after a 4 KiB write, p99 (before the MQTT latency phases)",
            "raw",
            sync.p99_us,
            "us",
        )
        .note(format!(
            "p50 {:.0} µs, max {:.0} µs, {} syncs",
            sync.p50_us, sync.max_us, sync.samples
        )),
    );

    // Latency at a rate every broker sustains.
    let slowest = measured
        .iter()
        .filter(|entry| !entry.subscribe)
        .map(Measured::median_messages_per_second)
        .fold(f64::INFINITY, f64::min);
    let rate = plan.latency_rate_max.min((slowest / 2.0).floor()).max(1.0);
    let mut mosquitto_p99 = None;
    let mut latency_rows = Vec::new();
    for broker in &brokers {
        if broker.is_mosquitto() && mosquitto_unavailable.is_some() {
            continue;
        }
        eprintln!("MQTT PUBACK latency at {rate:.0} msg/s offered: {broker:?}");
        let result = measure(
            broker,
            data_dir,
            &plan,
            Pace::MessagesPerSecond(rate),
            &plan.latency,
            false,
        );
        let (phase, log) = match (result, broker) {
            (Ok(measured), _) => measured,
            (Err(error), Broker::Mosquitto { .. }) => {
                eprintln!("peer Mosquitto unavailable: {error:#}");
                mosquitto_unavailable = Some(format!("{error:#}"));
                continue;
            }
            (Err(error), Broker::Rill(_)) => {
                return Err(error).with_context(|| format!("MQTT latency on {broker:?}"));
            }
        };
        let quantile = |quantile: f64| phase.latency.value_at_quantile(quantile) as f64;
        if *broker == MOSQUITTO {
            mosquitto_p99 = Some(quantile(0.99));
        }
        latency_rows.push((
            broker.clone(),
            Row::new(
                &format!(
                    "MQTT PUBACK latency p99, {}: QoS 1 at {rate:.0} msg/s offered, {} B payloads, {} clients",
                    label(broker, log.as_ref(), &profile_fsync),
                    load.payload_bytes,
                    load.clients,
                ),
                driver(broker),
                quantile(0.99),
                "us",
            ),
            format!(
                "p50 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs, {} messages in {} s, achieved {:.0} msg/s of {rate:.0}; from each message's intended send time to its PUBACK; the generator sent late by p99 {:.0} µs (max {:.0} µs); other processes kept {:.1} cores busy meanwhile",
                quantile(0.5),
                quantile(0.999),
                phase.latency.max() as f64,
                phase.latency.len(),
                plan.latency.measured.as_secs(),
                phase.messages_per_second(),
                phase.send_lag.value_at_quantile(0.99) as f64,
                phase.send_lag.max() as f64,
                phase.other_cores_busy(),
            ),
        ));
    }
    for (broker, row, note) in latency_rows {
        let note = match (&broker, mosquitto_p99) {
            (Broker::Rill(_), Some(p99)) => {
                format!("{note}; Mosquitto's p99 {p99:.0} µs (as it ships)")
            }
            _ => note,
        };
        rows.push(row.note(note));
    }
    if mosquitto_p99.is_none() {
        rows.push(
            Row::new(
                &format!(
                    "MQTT PUBACK latency p99, Mosquitto: QoS 1 at {rate:.0} msg/s offered, {} B payloads, {} clients",
                    load.payload_bytes, load.clients,
                ),
                "mosquitto",
                0.0,
                "us",
            )
            .note(format!(
                "UNAVAILABLE: {}",
                mosquitto_unavailable.as_deref().unwrap_or("not measured")
            )),
        );
    }
    Ok(rows)
}

fn throughput_row(
    shape: &str,
    entry: &Measured,
    mosquitto: Option<&Measured>,
    profile_fsync: &str,
    subscribe: bool,
) -> Row {
    let rates: Vec<f64> = entry
        .phases
        .iter()
        .map(Phase::messages_per_second)
        .collect();
    let (min, max) = spread(&rates);
    let value = median(rates);
    let broker_cpu = entry.median_broker_cpu_seconds_per_million();
    let other_cores = median(entry.phases.iter().map(Phase::other_cores_busy).collect());
    let generator_cpu = median(
        entry
            .phases
            .iter()
            .map(Phase::generator_cpu_seconds_per_million)
            .collect(),
    );
    let written = median(
        entry
            .phases
            .iter()
            .map(Phase::broker_write_bytes_per_message)
            .collect(),
    );
    let mut note = format!(
        "median of {} rounds of {} s (min {min:.0}, max {max:.0} msg/s); CPU per million messages: broker {broker_cpu:.2} s, load generator {generator_cpu:.2} s; the broker wrote {written:.0} bytes to the block layer per message; other processes kept {other_cores:.1} cores busy meanwhile",
        entry.phases.len(),
        entry
            .phases
            .first()
            .map_or(0, |phase| phase.measured.as_secs()),
    );
    if subscribe {
        let delivered: Vec<(f64, f64)> = entry
            .phases
            .iter()
            .filter_map(|phase| {
                let subscriber = phase.subscriber?;
                Some((
                    100.0 * subscriber.received as f64 / phase.acknowledged_total.max(1) as f64,
                    subscriber.after_last_ack.as_secs_f64(),
                ))
            })
            .collect();
        let latest = delivered
            .iter()
            .map(|(_, after)| *after)
            .fold(0.0, f64::max);
        if delivered.iter().all(|(percent, _)| *percent >= 100.0) {
            note.push_str(&format!(
                "; the subscriber received every message published, at most {latest:.1} s after the last PUBACK"
            ));
        } else {
            let percents: Vec<String> = delivered
                .iter()
                .map(|(percent, _)| format!("{percent:.1}%"))
                .collect();
            note.push_str(&format!(
                "; the subscriber received {} of the messages published (by round; QoS 0 may be dropped), waiting until none came for 2 s",
                percents.join(", ")
            ));
        }
    }
    let mut row = Row::new(
        &format!(
            "MQTT ingest, {}, {shape}",
            label(&entry.broker, entry.log.as_ref(), profile_fsync)
        ),
        driver(&entry.broker),
        value,
        "msg/s",
    );
    match (&entry.broker, &entry.log) {
        (Broker::Rill(_), Some(log)) => {
            note.push_str(&format!(
                "; every PUBACKed message is a record of topic `{CATCH_ALL_TOPIC}` ({} partition(s)), checked after each round",
                log.partitions
            ));
            match mosquitto {
                Some(mosquitto) => {
                    let efficiency = mosquitto.median_broker_cpu_seconds_per_million()
                        / broker_cpu.max(f64::MIN_POSITIVE);
                    note.push_str(&format!(
                        "; per CPU second Rill handles {efficiency:.2}x the messages Mosquitto does"
                    ));
                    row = row.against("Mosquitto", mosquitto.median_messages_per_second());
                    if !subscribe {
                        row = row.target(TARGET);
                    }
                }
                None => note.push_str("; Mosquitto UNAVAILABLE, no ratio"),
            }
        }
        (broker, _) => {
            note.push_str(
                "; persistence as Debian ships it (saved every 1800 s and at shutdown): no write, no fsync per message",
            );
            note.push_str(if *broker == MOSQUITTO {
                "; Nagle's algorithm on, Mosquitto's default"
            } else {
                "; set_tcp_nodelay true (Nagle's algorithm off, as on Rill's sockets)"
            });
        }
    }
    row.note(note)
}
