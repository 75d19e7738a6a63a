//! The replicator of the real `rill` binary mirroring to a second `rill`
//! process serving as the central cluster through its Kafka listener:
//! records arrive exactly once, in order per partition, with key, headers,
//! timestamp and a provenance header, through cuts, stalls and black holes
//! of the link (the tests' TCP proxy) and SIGKILLs of both processes;
//! backlogs drain in priority order and within the bandwidth cap; records
//! retention takes before they were mirrored are counted.

use std::time::{Duration, Instant};

use rill_core::batch::RecordBuilder;
use rill_node::client::{Client, ClientConfig, records_of};
use rill_protocol::{Acks, OffsetSpec, Target};
use rill_tests::proxy::{Direction, Proxy};
use rill_tests::{Broker, Ports, http_get, wait_until};

const EDGE_ID: &str = "edge-1";
const PROVENANCE: &[u8] = b"rill.source";
/// How long one expected event may take.
const DEADLINE: Duration = Duration::from_secs(60);

fn runtime() -> compio::runtime::Runtime {
    compio::runtime::Runtime::new().expect("client runtime")
}

async fn connect(address: &str) -> Client {
    Client::connect(address, ClientConfig::default())
        .await
        .expect("connect to the broker")
}

/// The edge's settings mirroring to `bootstrap` with the destination table
/// `extra` (more `key = value` pairs of the destination, TOML inline).
fn edge_settings(bootstrap: &str, extra: &str) -> Vec<String> {
    vec![
        format!("mirror.edge_id={EDGE_ID}"),
        "mirror.reconcile_delay_ms=0".into(),
        "mirror.checkpoint_interval_ms=100".into(),
        "mirror.topic_refresh_ms=200".into(),
        format!(
            "mirror.destinations=[{{name=\"central\", bootstrap_servers=[\"{bootstrap}\"], linger_ms=5{extra}}}]"
        ),
    ]
}

fn start_edge(settings: &[String]) -> Broker {
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    Broker::start(&settings)
}

fn key_of(partition: u32, index: u64) -> Vec<u8> {
    format!("k{partition}-{index}").into_bytes()
}

fn value_of(partition: u32, index: u64) -> Vec<u8> {
    format!("v{partition}-{index}-{}", "x".repeat((index % 7) as usize)).into_bytes()
}

fn timestamp_of(index: u64) -> i64 {
    1_700_000_000_000 + index as i64
}

fn batch_of(partition: u32, first: u64, count: u64) -> Vec<u8> {
    let mut builder = RecordBuilder::new();
    for index in first..first + count {
        let header = index.to_string();
        builder.push(
            timestamp_of(index),
            Some(&key_of(partition, index)),
            Some(&value_of(partition, index)),
            &[(b"h".as_slice(), Some(header.as_bytes()))],
        );
    }
    builder.finish()
}

/// Produces records `first..first + count` to each partition, durably.
async fn produce(client: &Client, topic: &str, partitions: u32, first: u64, count: u64) {
    produce_batches(client, topic, partitions, first, count, 5_000).await;
}

async fn produce_batches(
    client: &Client,
    topic: &str,
    partitions: u32,
    first: u64,
    count: u64,
    per_batch: u64,
) {
    for partition in 0..partitions {
        let mut next = first;
        while next < first + count {
            let records = per_batch.min(first + count - next);
            let produced = client
                .produce(
                    topic,
                    Target::Partition(partition),
                    Acks::Durable,
                    &batch_of(partition, next, records),
                )
                .await
                .expect("produce")
                .expect("acknowledged");
            assert_eq!(produced.base_offset, next as i64);
            next += records;
        }
    }
}

/// The records of fetched batches, compressed ones too (the uplink may be
/// compressed; the native client's decoder takes plain batches only).
fn decode_records(bytes: &[u8]) -> Vec<rill_node::client::ConsumedRecord> {
    use rill_edge_bridge::replicator::batch::{decode_batch, split_batches};
    let mut records = Vec::new();
    for batch in split_batches(bytes) {
        let batch = batch.expect("whole batch");
        let decoded = decode_batch(batch, 64 << 20).expect("batch decodes");
        for record in decoded.records() {
            let record = record.expect("record decodes");
            records.push(rill_node::client::ConsumedRecord {
                offset: record.offset as i64,
                timestamp_ms: record.timestamp_ms,
                key: record.key.map(<[u8]>::to_vec),
                value: record.value.map(<[u8]>::to_vec),
                headers: record
                    .headers
                    .iter()
                    .map(|header| (header.key.to_vec(), header.value.map(<[u8]>::to_vec)))
                    .collect(),
            });
        }
    }
    records
}

/// Records in each destination partition (0 while the topic is missing).
async fn destination_counts(client: &Client, topic: &str, partitions: u32) -> Vec<u64> {
    let mut counts = Vec::new();
    for partition in 0..partitions {
        let latest = client
            .list_offsets(topic, partition, OffsetSpec::Latest)
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        counts.push(latest.max(0) as u64);
    }
    counts
}

fn wait_for_counts(destination: &Broker, topic: &str, partitions: u32, expected: u64) {
    let runtime = runtime();
    let client = runtime.block_on(connect(&destination.address()));
    let mut last = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(180) {
        last = runtime.block_on(destination_counts(&client, topic, partitions));
        if last.iter().all(|&count| count >= expected) {
            return;
        }
        runtime.block_on(compio::time::sleep(Duration::from_millis(50)));
    }
    panic!("destination {topic} has {last:?} records, expected {expected} per partition");
}

/// Reads destination partition `partition` and checks it holds exactly
/// records `0..expected` of source partition `partition`, in order, with
/// key, value, headers, timestamp and provenance.
async fn check_mirrored(
    client: &Client,
    destination_topic: &str,
    source_topic: &str,
    partition: u32,
    expected: u64,
) {
    check_mirrored_from(
        client,
        destination_topic,
        source_topic,
        partition,
        0,
        expected,
    )
    .await;
}

/// [`check_mirrored`] when the source's records before `first` were lost.
async fn check_mirrored_from(
    client: &Client,
    destination_topic: &str,
    source_topic: &str,
    partition: u32,
    first: u64,
    expected: u64,
) {
    let mut offset = 0i64;
    let mut index = first;
    while index < expected {
        let fetched = client
            .fetch(destination_topic, partition, offset, 8 << 20, 1, 0)
            .await
            .expect("fetch");
        assert!(
            fetched.next_offset > offset,
            "fetch made no progress at {offset}"
        );
        for record in decode_records(&fetched.batches) {
            if record.offset < offset {
                continue;
            }
            assert_eq!(
                record.key.as_deref(),
                Some(key_of(partition, index).as_slice()),
                "partition {partition} destination offset {}: in order, none missing, none twice",
                record.offset
            );
            assert_eq!(
                record.value.as_deref(),
                Some(value_of(partition, index).as_slice())
            );
            assert_eq!(record.timestamp_ms, timestamp_of(index));
            let provenance = format!("{EDGE_ID}/{source_topic}/{partition}/{index}");
            assert_eq!(
                record.headers,
                vec![
                    (b"h".to_vec(), Some(index.to_string().into_bytes())),
                    (PROVENANCE.to_vec(), Some(provenance.into_bytes())),
                ]
            );
            index += 1;
            offset = record.offset + 1;
            if index == expected {
                break;
            }
        }
    }
    let latest = client
        .list_offsets(destination_topic, partition, OffsetSpec::Latest)
        .await
        .expect("latest");
    assert_eq!(
        latest,
        Some((expected - first) as i64),
        "partition {partition}: nothing after the expected records (no duplicates)"
    );
}

/// A counter or gauge of the edge's `/metrics`, summed over its labels
/// when `labels` is empty, else the line with exactly these labels.
fn metric(broker: &Broker, name: &str, labels: &str) -> Option<u64> {
    let (_, page) = http_get(broker.admin, "/metrics").ok()?;
    let mut found = None;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (line_labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.split_once("} ") {
                Some((labels, value)) => (labels, value),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => ("", value),
                None => continue,
            },
        };
        if !labels.is_empty() && line_labels != labels {
            continue;
        }
        let value: u64 = value.trim().parse().ok()?;
        *found.get_or_insert(0) += value;
    }
    found
}

#[test]
fn records_arrive_once_in_order_with_keys_headers_timestamps_and_provenance() {
    let destination = Broker::start(&[]);
    let settings = edge_settings(&destination.kafka_address(), ", create_partitions=3");
    let edge = start_edge(&settings);
    let runtime = runtime();
    let count = 2_000;
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client
            .create_topic("telemetry", 3, &[])
            .await
            .expect("create");
        produce(&client, "telemetry", 3, 0, count).await;
    });
    wait_for_counts(&destination, "edge-1.telemetry", 3, count);
    runtime.block_on(async {
        let client = connect(&destination.address()).await;
        for partition in 0..3 {
            check_mirrored(&client, "edge-1.telemetry", "telemetry", partition, count).await;
        }
    });
    // Lag comes down to zero and the status says so.
    wait_until("lag to reach zero", DEADLINE, || {
        metric(&edge, "rill_mirror_lag_records", "") == Some(0)
            && metric(
                &edge,
                "rill_mirror_records_sent_total",
                "destination=\"central\"",
            ) == Some(3 * count)
    });
    let (status, body) = http_get(edge.admin, "/mirror").expect("status");
    assert_eq!(status, 200);
    assert!(body.contains("\"state\":\"mirroring\""), "{body}");
    // `rill mirror status` reads the same page.
    let output = rill_tests::rill_command()
        .args(["mirror", "status", "--admin", &edge.admin.to_string()])
        .output()
        .expect("run rill mirror status");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("destination central") && text.contains("telemetry/2"),
        "{text}"
    );
    let mut edge = edge;
    assert!(
        edge.stop().success(),
        "a graceful stop with the replicator on"
    );
}

#[test]
fn fewer_destination_partitions_keep_each_source_partitions_order() {
    let destination = Broker::start(&[]);
    let settings = edge_settings(&destination.kafka_address(), ", create_partitions=2");
    let edge = start_edge(&settings);
    let runtime = runtime();
    let count = 3_000;
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client.create_topic("keyed", 3, &[]).await.expect("create");
        produce(&client, "keyed", 3, 0, count).await;
    });
    let client = runtime.block_on(connect(&destination.address()));
    wait_until("every record to arrive", DEADLINE, || {
        runtime
            .block_on(destination_counts(&client, "edge-1.keyed", 2))
            .iter()
            .sum::<u64>()
            >= 3 * count
    });
    // Records are placed by key: each source partition's records must be
    // there once each, in source order within each destination partition.
    let mut seen: Vec<Vec<u64>> = vec![Vec::new(); 3];
    runtime.block_on(async {
        for partition in 0..2 {
            let mut offset = 0;
            let end = destination_counts(&client, "edge-1.keyed", 2).await[partition as usize];
            let mut last_per_source = [None::<u64>; 3];
            while (offset as u64) < end {
                let fetched = client
                    .fetch("edge-1.keyed", partition, offset, 8 << 20, 1, 0)
                    .await
                    .expect("fetch");
                for record in records_of(&fetched.batches).expect("decode") {
                    if record.offset < offset {
                        continue;
                    }
                    offset = record.offset + 1;
                    let provenance = record
                        .headers
                        .iter()
                        .rev()
                        .find(|(key, _)| key == PROVENANCE)
                        .and_then(|(_, value)| value.clone())
                        .expect("provenance");
                    let text = String::from_utf8(provenance).expect("text");
                    let parts: Vec<&str> = text.split('/').collect();
                    assert_eq!(&parts[..2], &[EDGE_ID, "keyed"]);
                    let source: usize = parts[2].parse().expect("partition");
                    let index: u64 = parts[3].parse().expect("offset");
                    assert_eq!(
                        record.key.as_deref(),
                        Some(key_of(source as u32, index).as_slice())
                    );
                    if let Some(last) = last_per_source[source] {
                        assert!(
                            index > last,
                            "source order kept within a destination partition"
                        );
                    }
                    last_per_source[source] = Some(index);
                    seen[source].push(index);
                }
            }
        }
    });
    for (source, mut indexes) in seen.into_iter().enumerate() {
        indexes.sort_unstable();
        assert_eq!(
            indexes,
            (0..count).collect::<Vec<_>>(),
            "source partition {source}: every record exactly once"
        );
    }
}

/// Faults of the link held until the edge noticed them.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Cut,
    Stall,
    BlackHole,
}

fn failures(edge: &Broker) -> u64 {
    metric(
        edge,
        "rill_mirror_connection_failures_total",
        "destination=\"central\"",
    )
    .unwrap_or(0)
}

/// Puts one record in a topic of its own on the edge, so the replicator
/// has something to send while a fault is on (an idle link shows no fault).
fn pulse(edge: &Broker) {
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client
            .produce(
                "pulse",
                Target::Partition(0),
                Acks::Durable,
                &batch_of(0, 0, 1),
            )
            .await
            .expect("pulse")
            .expect("acknowledged");
    });
}

/// Starts a fault; returns what `heal_fault` needs to know it was noticed.
fn begin_fault(fault: Fault, proxy: &Proxy, edge: &Broker) -> u64 {
    match fault {
        Fault::Cut => {
            let accepted = proxy.accepted();
            proxy.cut_all();
            accepted
        }
        Fault::Stall => {
            let before = failures(edge);
            proxy.stall(Direction::Both);
            before
        }
        Fault::BlackHole => {
            let before = failures(edge);
            proxy.black_hole(true);
            before
        }
    }
}

/// [`wait_until`], with the edge's replicator status in the failure.
fn wait_for_edge(edge: &Broker, what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        if started.elapsed() > DEADLINE {
            let status = http_get(edge.admin, "/mirror").map(|(_, body)| body);
            panic!("timed out waiting for {what}; the edge's mirror status: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the edge noticed the fault (with a record to send, so an
/// idle link cannot hide it), then ends it.
fn heal_fault(fault: Fault, proxy: &Proxy, edge: &Broker, before: u64) {
    pulse(edge);
    match fault {
        Fault::Cut => wait_for_edge(edge, "a reconnect after a cut", || {
            proxy.accepted() > before
        }),
        Fault::Stall => {
            wait_for_edge(edge, "the edge to give up on a stalled link", || {
                failures(edge) > before
            });
            proxy.resume();
        }
        Fault::BlackHole => {
            wait_for_edge(edge, "the edge to give up on a black hole", || {
                failures(edge) > before
            });
            proxy.black_hole(false);
        }
    }
}

#[test]
fn a_million_records_arrive_exactly_once_through_link_faults_and_crashes() {
    const PARTITIONS: u32 = 4;
    const ROUNDS: u64 = 25;
    const PER_ROUND: u64 = 10_000; // per partition: 25 × 10,000 × 4 = 1,000,000
    let started = Instant::now();
    let ports = Ports::free();
    let proxy = Proxy::start(ports.kafka);
    let advertised = format!("kafka.advertised_port={}", proxy.port());
    let mut destination = Broker::start_on(ports, &[advertised.as_str()]);
    let settings = edge_settings(
        &proxy.address().to_string(),
        ", create_partitions=4, request_timeout_ms=1000, backoff_ms_min=20, backoff_ms_max=400",
    );
    let mut edge = start_edge(&settings);
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client
            .create_topic("chaos", PARTITIONS, &[])
            .await
            .expect("create");
        client.create_topic("pulse", 1, &[]).await.expect("create");
    });
    let destination_topic = "edge-1.chaos";
    let faults = [Fault::Cut, Fault::Stall, Fault::BlackHole];
    let mut inflicted = 0;
    let mut kills = 0;
    let mut behind_at_heal = 0;
    for round in 0..ROUNDS {
        // The round's records are produced while the link is faulty, so
        // every fault hits the mirror with records waiting.
        let fault = faults[round as usize % faults.len()];
        let before = begin_fault(fault, &proxy, &edge);
        runtime.block_on(async {
            let client = connect(&edge.address()).await;
            produce(&client, "chaos", PARTITIONS, round * PER_ROUND, PER_ROUND).await;
        });
        let produced = (round + 1) * PER_ROUND;
        let mirrored = runtime.block_on(async {
            let client = connect(&destination.address()).await;
            destination_counts(&client, destination_topic, PARTITIONS).await
        });
        if mirrored.iter().any(|&count| count < produced) {
            behind_at_heal += 1;
        }
        heal_fault(fault, &proxy, &edge, before);
        inflicted += 1;
        if round == 8 {
            edge.kill();
            edge.restart();
            kills += 1;
        }
        if round == 16 {
            destination.kill();
            destination.restart();
            kills += 1;
        }
    }
    let total = ROUNDS * PER_ROUND;
    wait_for_counts(&destination, destination_topic, PARTITIONS, total);
    runtime.block_on(async {
        let client = connect(&destination.address()).await;
        for partition in 0..PARTITIONS {
            check_mirrored(&client, destination_topic, "chaos", partition, total).await;
        }
    });
    let elapsed = started.elapsed();
    println!(
        "mirrored {} records exactly once through {inflicted} link faults ({behind_at_heal} with records still to mirror when healed) and {kills} SIGKILLs in {:.1} s",
        total * u64::from(PARTITIONS),
        elapsed.as_secs_f64()
    );
    assert!(inflicted >= 20 && kills >= 2);
    assert!(
        behind_at_heal >= 20,
        "faults should hit the mirror mid-stream ({behind_at_heal} of {inflicted} did)"
    );
    drop(proxy);
}

#[test]
fn a_backlog_drains_high_priority_topics_first() {
    let ports = Ports::free();
    let address = ports.kafka.to_string();
    let settings = edge_settings(
        &address,
        ", create_partitions=1, bandwidth_bytes_per_s=400000, backoff_ms_max=500, priorities=[{pattern=\"alarms\", priority=200}]",
    );
    let edge = start_edge(&settings);
    let runtime = runtime();
    let count = 20_000;
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        for topic in ["alarms", "telemetry"] {
            client.create_topic(topic, 1, &[]).await.expect("create");
        }
        // Telemetry first, so arrival order alone would favour it.
        produce(&client, "telemetry", 1, 0, count).await;
        produce(&client, "alarms", 1, 0, count).await;
    });
    // The destination comes up with the backlog waiting.
    let destination = Broker::start_on(ports, &[]);
    let client = runtime.block_on(connect(&destination.address()));
    let mut telemetry_when_alarms_done = None;
    wait_until(
        "the alarms backlog to drain",
        Duration::from_secs(120),
        || {
            let alarms = runtime.block_on(destination_counts(&client, "edge-1.alarms", 1))[0];
            let telemetry = runtime.block_on(destination_counts(&client, "edge-1.telemetry", 1))[0];
            if alarms >= count {
                telemetry_when_alarms_done = Some(telemetry);
                return true;
            }
            false
        },
    );
    let telemetry = telemetry_when_alarms_done.expect("drained");
    println!("telemetry records at the destination when alarms finished: {telemetry} of {count}");
    assert!(
        telemetry < count / 4,
        "the high-priority topic finishes first: telemetry had {telemetry} of {count}"
    );
    wait_for_counts(&destination, "edge-1.telemetry", 1, count);
    runtime.block_on(async {
        check_mirrored(&client, "edge-1.alarms", "alarms", 0, count).await;
        check_mirrored(&client, "edge-1.telemetry", "telemetry", 0, count).await;
    });
}

#[test]
fn the_bandwidth_cap_holds_within_ten_percent() {
    const CAP: u64 = 200_000;
    let ports = Ports::free();
    let proxy = Proxy::start(ports.kafka);
    let advertised = format!("kafka.advertised_port={}", proxy.port());
    let _destination = Broker::start_on(ports, &[advertised.as_str()]);
    let settings = edge_settings(
        &proxy.address().to_string(),
        &format!(", create_partitions=1, bandwidth_bytes_per_s={CAP}"),
    );
    let edge = start_edge(&settings);
    let runtime = runtime();
    let count = 60_000;
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client.create_topic("bulk", 1, &[]).await.expect("create");
        produce(&client, "bulk", 1, 0, count).await;
    });
    // What reached the destination's socket: batches and request headers.
    let sent = || proxy.bytes_to_target();
    // Measure over a window after the first bytes went (the burst is out).
    wait_until("mirroring to start", DEADLINE, || sent() > CAP / 5);
    let (start_bytes, start) = (sent(), Instant::now());
    let mut rate = 0.0;
    wait_until("a few seconds of draining", DEADLINE, || {
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed < 5.0 {
            return false;
        }
        rate = (sent() - start_bytes) as f64 / elapsed;
        true
    });
    println!("mirrored at {rate:.0} bytes/s with a cap of {CAP} bytes/s");
    assert!(
        (rate - CAP as f64).abs() <= CAP as f64 * 0.10,
        "rate {rate:.0} bytes/s is not within 10% of the cap {CAP}"
    );
}

async fn earliest(client: &Client, topic: &str) -> u64 {
    client
        .list_offsets(topic, 0, OffsetSpec::Earliest)
        .await
        .expect("earliest")
        .unwrap_or(0)
        .max(0) as u64
}

#[test]
fn unmirrored_records_are_kept_up_to_the_budget_and_counted_when_lost() {
    const BUDGET: u64 = 256 * 1024;
    let ports = Ports::free();
    let mut settings = edge_settings(
        &ports.kafka.to_string(),
        ", create_partitions=1, exclude=[\"scratch\"], backoff_ms_max=300",
    );
    settings.extend([
        "node.shards=1".to_string(),
        format!("mirror.unmirrored_bytes_max={BUDGET}"),
        "storage.retention_check_interval_ms=100".into(),
        "topic_defaults.segment_bytes_max=16384".into(),
        "topic_defaults.retention_bytes=16384".into(),
    ]);
    let edge = start_edge(&settings);
    let runtime = runtime();
    let client = runtime.block_on(connect(&edge.address()));
    runtime.block_on(async {
        for topic in ["kept", "scratch"] {
            client.create_topic(topic, 1, &[]).await.expect("create");
        }
    });
    // The replicator tracks the partition (and so protects it) before data comes.
    wait_until("the replicator to track kept/0", DEADLINE, || {
        http_get(edge.admin, "/mirror")
            .map(|(_, body)| body.contains("\"topic\":\"kept\""))
            .unwrap_or(false)
    });
    // Under the budget: retention trims the unmirrored topic, not this one.
    let first_round = 2_000;
    runtime.block_on(async {
        produce_batches(&client, "kept", 1, 0, first_round, 100).await;
        produce_batches(&client, "scratch", 1, 0, first_round, 100).await;
    });
    wait_until(
        "retention to trim the unmirrored-free topic",
        DEADLINE,
        || runtime.block_on(earliest(&client, "scratch")) > 0,
    );
    assert_eq!(
        runtime.block_on(earliest(&client, "kept")),
        0,
        "unmirrored records within the budget are kept"
    );
    // Over the budget: the oldest unmirrored records go.
    let total = 20_000;
    runtime.block_on(produce_batches(
        &client,
        "kept",
        1,
        first_round,
        total - first_round,
        100,
    ));
    wait_until(
        "retention to take unmirrored records past the budget",
        DEADLINE,
        || runtime.block_on(earliest(&client, "kept")) > 0,
    );
    let start = runtime.block_on(earliest(&client, "kept"));
    assert!(
        start < total - 2_000,
        "the budget's worth is kept (start {start})"
    );
    // The destination comes up: what is left arrives, what was lost is counted.
    let destination = Broker::start_on(ports, &[]);
    let lost_metric = || {
        metric(
            &edge,
            "rill_mirror_evicted_unmirrored_records_total",
            "destination=\"central\",topic=\"kept\",partition=\"0\"",
        )
    };
    wait_until("the lost records to be counted", DEADLINE, || {
        lost_metric().is_some_and(|lost| lost > 0)
    });
    let lost = lost_metric().unwrap_or(0);
    println!("unmirrored records lost to retention: {lost} of {total}");
    wait_for_counts(&destination, "edge-1.kept", 1, total - lost);
    runtime.block_on(async {
        let destination_client = connect(&destination.address()).await;
        check_mirrored_from(&destination_client, "edge-1.kept", "kept", 0, lost, total).await;
    });
    assert!(lost >= start, "every record retention took is counted");
}

/// A CA, a server certificate for localhost and a client certificate, as
/// PEM files in `directory`: (ca, server cert, server key, client cert,
/// client key).
fn pki(directory: &std::path::Path) -> [String; 5] {
    rill_tests::pki::generate(&["localhost"], "edge-1").write(directory)
}

#[test]
fn mirroring_over_tls_with_a_client_certificate() {
    let directory = tempfile::tempdir().expect("tempdir");
    let [ca, server_cert, server_key, client_cert, client_key] = pki(directory.path());
    // The destination requires TLS and a client certificate on every listener.
    let destination = Broker::start(&[
        &format!("tls.cert_file={server_cert}"),
        &format!("tls.key_file={server_key}"),
        &format!("tls.client_ca_file={ca}"),
    ]);
    let settings = edge_settings(
        &destination.kafka_address(),
        &format!(
            ", create_partitions=2, tls=true, tls_ca_file=\"{ca}\", tls_cert_file=\"{client_cert}\", tls_key_file=\"{client_key}\", tls_server_name=\"localhost\", compression=\"zstd\""
        ),
    );
    let edge = start_edge(&settings);
    let runtime = runtime();
    let count = 3_000;
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client.create_topic("secure", 2, &[]).await.expect("create");
        produce(&client, "secure", 2, 0, count).await;
    });
    let tls = rill_node::client::ClientTls {
        config: rill_node::tls::client_config(
            std::path::Path::new(&ca),
            Some((
                std::path::Path::new(&client_cert),
                std::path::Path::new(&client_key),
            )),
        )
        .expect("client tls"),
        server_name: "localhost".into(),
    };
    let client = runtime.block_on(async {
        Client::connect(
            &destination.address(),
            ClientConfig {
                tls: Some(tls),
                ..ClientConfig::default()
            },
        )
        .await
        .expect("connect over TLS")
    });
    wait_until("every record to arrive over TLS", DEADLINE, || {
        runtime
            .block_on(destination_counts(&client, "edge-1.secure", 2))
            .iter()
            .all(|&records| records >= count)
    });
    runtime.block_on(async {
        for partition in 0..2 {
            check_mirrored(&client, "edge-1.secure", "secure", partition, count).await;
        }
    });
}

#[test]
fn a_missing_topic_without_creation_is_reported() {
    let destination = Broker::start(&["topics.auto_create=false"]);
    let settings = edge_settings(
        &destination.kafka_address(),
        ", create_topics=false, include=[\"orders\"]",
    );
    let edge = start_edge(&settings);
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client.create_topic("orders", 1, &[]).await.expect("create");
        produce(&client, "orders", 1, 0, 10).await;
    });
    wait_for_edge(&edge, "the missing topic to be reported", || {
        http_get(edge.admin, "/mirror")
            .map(|(_, body)| {
                body.contains("edge-1.orders") && body.contains("creating topics is not allowed")
            })
            .unwrap_or(false)
    });
    let (_, body) = http_get(edge.admin, "/mirror").expect("status");
    assert!(body.contains("\"state\":\"connecting\""), "{body}");
    assert_eq!(
        metric(
            &edge,
            "rill_mirror_lag_records",
            "destination=\"central\",topic=\"orders\",partition=\"0\""
        ),
        Some(10)
    );
}

#[test]
fn several_destinations_each_keep_their_own_progress() {
    let up = Broker::start(&[]);
    let later = Ports::free();
    let settings = vec![
        format!("mirror.edge_id={EDGE_ID}"),
        "mirror.reconcile_delay_ms=0".into(),
        "mirror.topic_refresh_ms=200".into(),
        format!(
            "mirror.destinations=[{{name=\"up\", bootstrap_servers=[\"{}\"], create_partitions=2, linger_ms=5}}, {{name=\"later\", bootstrap_servers=[\"{}\"], create_partitions=2, linger_ms=5, backoff_ms_max=300, rename=\"identity\"}}]",
            up.kafka_address(),
            later.kafka
        ),
    ];
    let edge = start_edge(&settings);
    let runtime = runtime();
    let count = 2_000;
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client.create_topic("shared", 2, &[]).await.expect("create");
        produce(&client, "shared", 2, 0, count).await;
    });
    // One destination being down holds nothing up at the other.
    wait_for_counts(&up, "edge-1.shared", 2, count);
    wait_for_edge(&edge, "the lag of the destination that is down", || {
        metric(
            &edge,
            "rill_mirror_lag_records",
            "destination=\"later\",topic=\"shared\",partition=\"0\"",
        ) == Some(count)
    });
    let later = Broker::start_on(later, &[]);
    wait_for_counts(&later, "shared", 2, count);
    runtime.block_on(async {
        let up_client = connect(&up.address()).await;
        let later_client = connect(&later.address()).await;
        for partition in 0..2 {
            check_mirrored(&up_client, "edge-1.shared", "shared", partition, count).await;
            check_mirrored(&later_client, "shared", "shared", partition, count).await;
        }
    });
}

#[test]
fn the_disk_quota_evicts_unmirrored_records_only_past_the_budget() {
    let quota_settings = |budget: u64, bootstrap: &str| {
        let mut settings = edge_settings(
            bootstrap,
            ", create_partitions=1, include=[\"kept\"], backoff_ms_max=300",
        );
        settings.extend([
            "node.shards=1".to_string(),
            format!("mirror.unmirrored_bytes_max={budget}"),
            "storage.disk_quota_bytes=1048576".into(),
            "topic_defaults.disk_full_policy=evict-oldest".into(),
            "topic_defaults.segment_bytes_max=16384".into(),
        ]);
        settings
    };
    let runtime = runtime();
    // A budget above the quota: unmirrored records are never evicted, so
    // appends are refused once the quota is full.
    let nowhere = Ports::free();
    let edge = start_edge(&quota_settings(8 << 20, &nowhere.kafka.to_string()));
    let client = runtime.block_on(connect(&edge.address()));
    runtime.block_on(async {
        client.create_topic("kept", 1, &[]).await.expect("create");
    });
    wait_for_edge(&edge, "the replicator to track kept/0", || {
        http_get(edge.admin, "/mirror")
            .map(|(_, body)| body.contains("\"topic\":\"kept\""))
            .unwrap_or(false)
    });
    let mut next = 0u64;
    let refused = runtime.block_on(async {
        while next < 200_000 {
            match client
                .produce(
                    "kept",
                    Target::Partition(0),
                    Acks::Durable,
                    &batch_of(0, next, 100),
                )
                .await
            {
                Ok(Some(_)) => next += 100,
                Ok(None) => panic!("durable produce answers"),
                Err(error) => return Some(error.to_string()),
            }
        }
        None
    });
    let refused = refused.expect("the quota refuses appends instead of evicting");
    println!("refused at {next} records: {refused}");
    assert_eq!(runtime.block_on(earliest(&client, "kept")), 0);
    drop(client);
    drop(edge);

    // A budget below the quota: the oldest unmirrored records make room,
    // and the mirror counts what it lost.
    let ports = Ports::free();
    let edge = start_edge(&quota_settings(256 * 1024, &ports.kafka.to_string()));
    let client = runtime.block_on(connect(&edge.address()));
    runtime.block_on(async {
        client.create_topic("kept", 1, &[]).await.expect("create");
    });
    wait_for_edge(&edge, "the replicator to track kept/0", || {
        http_get(edge.admin, "/mirror")
            .map(|(_, body)| body.contains("\"topic\":\"kept\""))
            .unwrap_or(false)
    });
    let total = 60_000;
    runtime.block_on(produce_batches(&client, "kept", 1, 0, total, 100));
    let start = runtime.block_on(earliest(&client, "kept"));
    assert!(start > 0, "the quota evicted the oldest records");
    let destination = Broker::start_on(ports, &[]);
    let lost_metric = || {
        metric(
            &edge,
            "rill_mirror_evicted_unmirrored_records_total",
            "destination=\"central\",topic=\"kept\",partition=\"0\"",
        )
    };
    wait_for_edge(&edge, "the lost records to be counted", || {
        lost_metric().is_some_and(|lost| lost > 0)
    });
    let lost = lost_metric().unwrap_or(0);
    println!("unmirrored records evicted by the quota: {lost} of {total}");
    assert!(lost >= start);
    wait_for_counts(&destination, "edge-1.kept", 1, total - lost);
    runtime.block_on(async {
        let destination_client = connect(&destination.address()).await;
        check_mirrored_from(&destination_client, "edge-1.kept", "kept", 0, lost, total).await;
    });
}

/// A destination whose Kafka listener wants SASL: the edge logs in with
/// SCRAM-SHA-256 (and PLAIN), and a wrong password mirrors nothing and
/// says why in the status.
#[test]
fn mirroring_to_a_destination_that_wants_sasl() {
    let directory = tempfile::tempdir().expect("tempdir");
    let users = directory.path().join("users");
    let line = rill_edge_bridge::mqtt::auth::hash_password(b"uplink-secret", b"edge-salt-1", 4096);
    std::fs::write(&users, format!("edge-1:{line}\n")).expect("users file");
    let right = directory.path().join("right.password");
    std::fs::write(&right, "uplink-secret\n").expect("password file");
    let wrong = directory.path().join("wrong.password");
    std::fs::write(&wrong, "guess\n").expect("password file");
    let destination = Broker::start(&[&format!("kafka.sasl_users_file={}", users.display())]);
    let runtime = runtime();
    let count = 2_000;
    let destination_client = runtime.block_on(connect(&destination.address()));

    for mechanism in ["scram-sha-256", "plain"] {
        let topic = format!("sasl-{mechanism}");
        let settings = edge_settings(
            &destination.kafka_address(),
            &format!(
                ", include=[\"{topic}\"], sasl_mechanism=\"{mechanism}\", sasl_username=\"edge-1\", sasl_password_file=\"{}\"",
                right.display()
            ),
        );
        let edge = start_edge(&settings);
        runtime.block_on(async {
            let client = connect(&edge.address()).await;
            client.create_topic(&topic, 1, &[]).await.expect("create");
            produce(&client, &topic, 1, 0, count).await;
        });
        let mirrored = format!("edge-1.{topic}");
        wait_until("every record to arrive through SASL", DEADLINE, || {
            runtime
                .block_on(destination_counts(&destination_client, &mirrored, 1))
                .iter()
                .all(|&records| records >= count)
        });
        runtime.block_on(check_mirrored(
            &destination_client,
            &mirrored,
            &topic,
            0,
            count,
        ));
    }

    let settings = edge_settings(
        &destination.kafka_address(),
        &format!(
            ", include=[\"refused\"], sasl_mechanism=\"scram-sha-256\", sasl_username=\"edge-1\", sasl_password_file=\"{}\"",
            wrong.display()
        ),
    );
    let edge = start_edge(&settings);
    runtime.block_on(async {
        let client = connect(&edge.address()).await;
        client
            .create_topic("refused", 1, &[])
            .await
            .expect("create");
        produce(&client, "refused", 1, 0, 10).await;
    });
    wait_for_edge(&edge, "the refusal to show in the status", || {
        http_get(edge.admin, "/mirror")
            .map(|(_, body)| body.contains("bad user name or password"))
            .unwrap_or(false)
    });
    let (_, body) = http_get(edge.admin, "/mirror").expect("status");
    assert!(!body.contains("\"state\":\"mirroring\""), "{body}");
    assert_eq!(
        runtime.block_on(destination_counts(&destination_client, "edge-1.refused", 1)),
        vec![0],
        "nothing crosses without the right password"
    );
}
