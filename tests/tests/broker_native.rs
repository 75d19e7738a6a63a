//! The real `rill` binary over the native protocol, with the client library:
//! bulk produce and consume across partitions and shards with a restart in the
//! middle, long polls, concurrency, group offsets across restarts, crashes
//! after durable acknowledgements, bad frames, and the portable I/O driver.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rill_core::batch::RecordBuilder;
use rill_node::client::{Client, ClientConfig, ClientError, records_of};
use rill_protocol::{Acks, ErrorCode, OffsetSpec, Target};
use rill_tests::{Broker, topic_across_two_shards};

fn runtime() -> compio::runtime::Runtime {
    compio::runtime::Runtime::new().expect("client runtime")
}

async fn connect(broker: &Broker) -> Client {
    Client::connect(&broker.address(), ClientConfig::default())
        .await
        .expect("connect to the broker")
}

/// The value of record `index` of partition `partition`: checkable byte for byte.
fn value_of(partition: u32, index: u64) -> Vec<u8> {
    format!(
        "p{partition}-r{index:09}-{}",
        "x".repeat((index % 61) as usize)
    )
    .into_bytes()
}

fn batch_of(partition: u32, first: u64, count: u64) -> Vec<u8> {
    let mut builder = RecordBuilder::new();
    for index in first..first + count {
        let key = format!("key-{index}");
        builder.push(
            1_700_000_000_000 + index as i64,
            Some(key.as_bytes()),
            Some(&value_of(partition, index)),
            &[],
        );
    }
    builder.finish()
}

/// Produces `count` records to each partition from `first`, pipelined.
async fn produce_range(
    client: &Client,
    topic: &str,
    partitions: u32,
    first: u64,
    count: u64,
    acks: Acks,
) {
    const PER_BATCH: u64 = 1000;
    let mut pending = Vec::new();
    for partition in 0..partitions {
        let mut next = first;
        while next < first + count {
            let records = PER_BATCH.min(first + count - next);
            let batch = batch_of(partition, next, records);
            let produce = client
                .start_produce(topic, Target::Partition(partition), acks, &batch)
                .expect("queue produce");
            pending.push((partition, next, records, produce));
            next += records;
            if pending.len() >= 32 {
                check_produced(pending.remove(0)).await;
            }
        }
    }
    for produce in pending {
        check_produced(produce).await;
    }
}

async fn check_produced(
    (partition, first, records, produce): (u32, u64, u64, rill_node::client::PendingProduce),
) {
    let produced = produce
        .wait()
        .await
        .expect("produce")
        .expect("acknowledged");
    assert_eq!(produced.partition, partition);
    assert_eq!(
        produced.base_offset, first as i64,
        "records land at the offsets they were sent in"
    );
    assert_eq!(produced.last_offset, (first + records - 1) as i64);
}

/// Reads a whole partition and checks every record's offset, key and value.
async fn check_partition(client: &Client, topic: &str, partition: u32, expected_records: u64) {
    let mut offset = 0i64;
    while (offset as u64) < expected_records {
        let fetched = client
            .fetch(topic, partition, offset, 4 * 1024 * 1024, 1, 0)
            .await
            .expect("fetch");
        check_fetched(partition, &fetched, &mut offset);
    }
    check_latest(client, topic, partition, expected_records).await;
}

/// Checks the records of one fetch answer against what was produced, from
/// `offset` on, and moves `offset` past them.
fn check_fetched(partition: u32, fetched: &rill_node::client::Fetched, offset: &mut i64) {
    assert!(
        fetched.next_offset > *offset,
        "fetch made no progress at {offset}"
    );
    for record in records_of(&fetched.batches).expect("decode batches") {
        if record.offset < *offset {
            continue; // the first batch may start before the offset asked for
        }
        assert_eq!(
            record.offset, *offset,
            "partition {partition}: records in order, none missing"
        );
        let index = *offset as u64;
        assert_eq!(
            record.value.as_deref(),
            Some(value_of(partition, index).as_slice())
        );
        assert_eq!(
            record.key.as_deref(),
            Some(format!("key-{index}").as_bytes())
        );
        *offset += 1;
    }
}

/// The partition's latest offset is the number of records produced.
async fn check_latest(client: &Client, topic: &str, partition: u32, expected_records: u64) {
    let latest = client
        .list_offsets(topic, partition, OffsetSpec::Latest)
        .await
        .expect("latest");
    assert_eq!(latest, Some(expected_records as i64), "no record twice");
}

#[test]
fn a_million_records_across_partitions_and_shards_survive_a_restart() {
    let mut broker = Broker::start(&["node.shards=2", "topic_defaults.fsync=interval-ms"]);
    let partitions = 4;
    let half = 125_000;
    runtime().block_on(async {
        let client = connect(&broker).await;
        client
            .create_topic("bulk", partitions, &[])
            .await
            .expect("create topic");
        produce_range(&client, "bulk", partitions, 0, half, Acks::Written).await;
    });
    broker.restart();
    // A clean stop leaves each partition's producer snapshot, even with no
    // idempotent producer: the next start replays nothing before it.
    for partition in 0..partitions {
        let snapshot = rill_core::logset::partition_directory(&broker.data_dir, "bulk", partition)
            .join("producers.snapshot");
        assert!(snapshot.exists(), "{} is missing", snapshot.display());
    }
    runtime().block_on(async {
        let client = connect(&broker).await;
        produce_range(&client, "bulk", partitions, half, half, Acks::Written).await;
        let shards: std::collections::BTreeSet<u32> = client
            .describe_topic("bulk")
            .await
            .expect("describe")
            .partitions
            .iter()
            .map(|partition| partition.shard)
            .collect();
        assert_eq!(shards.len(), 2, "partitions are spread over both shards");
        for partition in 0..partitions {
            check_partition(&client, "bulk", partition, 2 * half).await;
        }
    });
}

#[test]
fn durable_acknowledgements_survive_a_crash() {
    let mut broker = Broker::start(&["node.shards=2"]);
    runtime().block_on(async {
        let client = connect(&broker).await;
        client.create_topic("safe", 3, &[]).await.expect("create");
        produce_range(&client, "safe", 3, 0, 20_000, Acks::Durable).await;
    });
    broker.kill();
    broker.restart();
    runtime().block_on(async {
        let client = connect(&broker).await;
        for partition in 0..3 {
            check_partition(&client, "safe", partition, 20_000).await;
        }
    });
}

#[test]
fn long_poll_wakes_when_data_arrives() {
    let broker = Broker::start(&["node.shards=2"]);
    runtime().block_on(async {
        let consumer = connect(&broker).await;
        let producer = connect(&broker).await;
        consumer.create_topic("poll", 1, &[]).await.expect("create");
        let started = Instant::now();
        let waiting = consumer.fetch("poll", 0, 0, 1024 * 1024, 1, 20_000);
        let produce = async {
            // The consumer is already waiting once the produce goes out.
            let batch = batch_of(0, 0, 3);
            producer
                .produce("poll", Target::Partition(0), Acks::Written, &batch)
                .await
                .expect("produce")
        };
        let (fetched, _) = futures_util::future::join(waiting, produce).await;
        let fetched = fetched.expect("long poll");
        assert_eq!(records_of(&fetched.batches).expect("decode").len(), 3);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the poll was woken by the data, not its deadline"
        );
        // With nothing new, the poll ends at its deadline with nothing.
        let started = Instant::now();
        let empty = consumer
            .fetch("poll", 0, 3, 1024, 1, 300)
            .await
            .expect("empty poll");
        assert!(empty.batches.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(250));
    });
}

#[test]
fn many_producers_and_consumers_at_once() {
    let broker = Broker::start(&["node.shards=2"]);
    let producers = 8u32;
    let per_producer = 5_000u64;
    runtime().block_on(async {
        let admin = connect(&broker).await;
        admin
            .create_topic("busy", producers, &[])
            .await
            .expect("create");
        let mut clients = Vec::new();
        for _ in 0..producers {
            clients.push(connect(&broker).await);
        }
        let producing = clients.iter().enumerate().map(|(partition, client)| {
            produce_partition(client, "busy", partition as u32, per_producer)
        });
        futures_util::future::join_all(producing).await;
        let consuming = clients.iter().enumerate().map(|(partition, client)| {
            check_partition(client, "busy", partition as u32, per_producer)
        });
        futures_util::future::join_all(consuming).await;
    });
}

/// Hundreds of connections, each with requests in flight to partitions on
/// both shards at once: every answer crosses between the shards' threads.
/// A broker whose cross-shard wake-ups could block would stall here (the
/// runtime's cross-thread wake queue holds 64 tasks); the whole run is
/// bounded, so a stall fails instead of hanging.
#[test]
fn hundreds_of_connections_crossing_shards_never_stall() {
    let broker = Broker::start(&["node.shards=2", "limits.requests_in_flight_max=16"]);
    let connections = 900usize;
    // Under an emulator (the aarch64 gate runs the broker in qemu) every
    // request costs tens of times more: fewer rounds, the same crowd.
    let rounds = if std::env::var_os("RILL_TEST_RUNNER").is_some() {
        3u64
    } else {
        40u64
    };
    runtime().block_on(async {
        let admin = connect(&broker).await;
        admin
            .create_topic("crossing", 2, &[])
            .await
            .expect("create");
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(connect(&broker).await);
        }
        let batch = batch_of(0, 0, 4);
        let work = clients.iter().map(|client| {
            let batch = &batch;
            async move {
                for _ in 0..rounds {
                    // Both partitions at once: one of them is on the other shard.
                    let sends = (0..8u32).map(|request| {
                        client
                            .start_produce(
                                "crossing",
                                Target::Partition(request % 2),
                                Acks::Written,
                                batch,
                            )
                            .expect("send")
                            .wait()
                    });
                    for answer in futures_util::future::join_all(sends).await {
                        answer.expect("produce").expect("acknowledged");
                    }
                }
            }
        });
        let all = futures_util::future::join_all(work);
        compio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("every produce across shards is answered: the broker stalled");
        let expected = connections as i64 * rounds as i64 * 8 * 4;
        let mut total = 0;
        for partition in 0..2 {
            total += admin
                .list_offsets("crossing", partition, OffsetSpec::Latest)
                .await
                .expect("list offsets")
                .expect("an offset");
        }
        assert_eq!(total, expected, "every acknowledged record is in the log");
    });
    // Producers that alternate between the shards' partitions stay put.
    assert_eq!(metric(&broker, "rill_connections_moved_total"), Some(0.0));
}

#[test]
fn a_producer_moves_to_the_shard_of_its_partition_and_loses_nothing() {
    let broker = Broker::start(&["node.shards=2"]);
    let topic = topic_across_two_shards("moving");
    let per_partition = 40_000u64;
    runtime().block_on(async {
        let client = connect(&broker).await;
        client.create_topic(&topic, 2, &[]).await.expect("create");
        // All of partition 0, then all of partition 1, 32 produces in
        // flight: wherever the connection landed, one of the two runs goes
        // to the other shard, and the connection moves with requests in
        // flight and frames read but not yet handled.
        produce_range(&client, &topic, 2, 0, per_partition, Acks::Written).await;
        let moved = metric(&broker, "rill_connections_moved_total").expect("metrics");
        assert!(
            moved >= 1.0,
            "a producer to the other shard's partition moves there (moved {moved})"
        );
        // The connection is still counted once, wherever it is served.
        assert_eq!(metric(&broker, "rill_connections"), Some(1.0));
        // It keeps working after the move, for everything else too.
        client.ping().await.expect("ping after moving");
        for partition in 0..2 {
            check_partition(&client, &topic, partition, per_partition).await;
        }
    });
    rill_tests::wait_until(
        "the moved connection's close is counted",
        Duration::from_secs(30),
        || metric(&broker, "rill_connections") == Some(0.0),
    );
}

#[test]
fn a_broker_told_not_to_move_connections_keeps_them() {
    let broker = Broker::start(&["node.shards=2", "node.move_connections=false"]);
    let topic = topic_across_two_shards("staying");
    runtime().block_on(async {
        let client = connect(&broker).await;
        client.create_topic(&topic, 2, &[]).await.expect("create");
        produce_range(&client, &topic, 2, 0, 20_000, Acks::Written).await;
        assert_eq!(metric(&broker, "rill_connections_moved_total"), Some(0.0));
        for partition in 0..2 {
            check_partition(&client, &topic, partition, 20_000).await;
        }
    });
}

/// Produces one partition's records from one client, one durable batch at a time.
async fn produce_partition(client: &Client, topic: &str, partition: u32, count: u64) {
    let mut next = 0;
    while next < count {
        let records = 500.min(count - next);
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

#[test]
fn committed_group_offsets_survive_a_restart() {
    let mut broker = Broker::start(&["node.shards=2"]);
    runtime().block_on(async {
        let client = connect(&broker).await;
        client.create_topic("orders", 2, &[]).await.expect("create");
        client
            .commit_offset("billing", "orders", 0, 17)
            .await
            .expect("commit");
        client
            .commit_offset("billing", "orders", 1, 4)
            .await
            .expect("commit");
        let error = client
            .commit_offset("billing", "orders", 9, 1)
            .await
            .expect_err("no partition 9");
        assert!(
            matches!(
                error,
                ClientError::Broker {
                    code: ErrorCode::UnknownPartition,
                    ..
                }
            ),
            "{error}"
        );
    });
    broker.restart();
    runtime().block_on(async {
        let client = connect(&broker).await;
        assert_eq!(
            client
                .fetch_offset("billing", "orders", 0)
                .await
                .expect("fetch"),
            Some(17)
        );
        assert_eq!(
            client
                .fetch_offset("billing", "orders", 1)
                .await
                .expect("fetch"),
            Some(4)
        );
        assert_eq!(
            client
                .fetch_offset("other", "orders", 0)
                .await
                .expect("fetch"),
            None
        );
        let groups = client.list_groups().await.expect("groups");
        assert_eq!(groups.len(), 1);
    });
}

fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(length) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

#[test]
fn malformed_and_oversized_frames_close_only_their_connection() {
    let broker = Broker::start(&[
        "limits.frame_bytes_max=65536",
        "topic_defaults.batch_bytes_max=32768",
    ]);
    // Garbage where a handshake should be.
    let mut garbage = TcpStream::connect(broker.native).expect("connect");
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    garbage
        .write_all(&[3, 0, 0, 0, 0xff, 0xfe, 0xfd])
        .expect("send garbage");
    let answer = read_frame(&mut garbage).expect("an error frame before closing");
    let (frame, _) = rill_protocol::ResponseFrame::decode(&answer).expect("decodable error");
    assert!(
        matches!(frame.response, rill_protocol::Response::Error { .. }),
        "{frame:?}"
    );
    assert!(
        read_frame(&mut garbage).is_none(),
        "the connection is closed after garbage"
    );

    // A frame larger than frame_bytes_max is refused before it is buffered.
    let mut oversized = TcpStream::connect(broker.native).expect("connect");
    oversized
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    oversized
        .write_all(&(100 * 1024 * 1024u32).to_le_bytes())
        .expect("send length");
    let answer = read_frame(&mut oversized).expect("an error frame");
    let (frame, _) = rill_protocol::ResponseFrame::decode(&answer).expect("decodable error");
    match frame.response {
        rill_protocol::Response::Error { message, .. } => {
            assert!(message.contains("frame_bytes_max"), "{message}")
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(read_frame(&mut oversized).is_none());

    // A request before the handshake is refused.
    let mut early = TcpStream::connect(broker.native).expect("connect");
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut ping = Vec::new();
    rill_protocol::frame::encode_frame_vec(
        &rill_protocol::RequestFrame {
            correlation_id: 5,
            request: rill_protocol::Request::Ping,
        },
        0,
        &mut ping,
    );
    early.write_all(&ping).expect("send ping");
    let answer = read_frame(&mut early).expect("an error frame");
    let (frame, _) = rill_protocol::ResponseFrame::decode(&answer).expect("decodable");
    assert!(matches!(
        frame.response,
        rill_protocol::Response::Error {
            code: ErrorCode::HandshakeRequired,
            ..
        }
    ));

    // Everyone else is unaffected.
    runtime().block_on(async {
        let client = connect(&broker).await;
        client.ping().await.expect("ping after bad clients");
        let produced = client
            .produce("after", Target::Any, Acks::Durable, &batch_of(0, 0, 10))
            .await
            .expect("produce after bad clients");
        assert!(produced.is_some());
    });
}

#[test]
fn the_portable_driver_serves_the_same_protocol() {
    let mut broker = Broker::start(&["node.io_driver=portable", "node.shards=2"]);
    runtime().block_on(async {
        let client = connect(&broker).await;
        let status = client.status().await.expect("status");
        assert_eq!(status.io_driver, "portable");
        assert!(
            status.io_driver_reason.contains("portable"),
            "{}",
            status.io_driver_reason
        );
        client
            .create_topic("fallback", 2, &[])
            .await
            .expect("create");
        produce_range(&client, "fallback", 2, 0, 10_000, Acks::Durable).await;
    });
    broker.restart();
    runtime().block_on(async {
        let client = connect(&broker).await;
        for partition in 0..2 {
            check_partition(&client, "fallback", partition, 10_000).await;
        }
        // Read again, now from the page cache: sendfile works on the
        // polling driver too (it waits for room with epoll).
        let sendfile = "rill_fetch_sent_bytes_total{path=\"sendfile\"}";
        let before = metric(&broker, sendfile).expect("sendfile metric");
        for partition in 0..2 {
            check_partition(&client, "fallback", partition, 10_000).await;
        }
        if cachestat_works() {
            assert!(metric(&broker, sendfile).expect("sendfile metric") > before);
        }
        // Keys land where Kafka's partitioner puts them.
        let produced = client
            .produce(
                "fallback",
                Target::Key(b"device-17"),
                Acks::Written,
                &batch_of(0, 0, 1),
            )
            .await
            .expect("produce by key")
            .expect("acknowledged");
        assert_eq!(
            produced.partition,
            rill_protocol::partitioner::partition_for_key(b"device-17", 2)
        );
    });
}

#[test]
fn topic_admin_round_trip_and_clear_errors() {
    let broker = Broker::start(&["topics.auto_create=false"]);
    runtime().block_on(async {
        let client = connect(&broker).await;
        let error = client
            .produce("missing", Target::Any, Acks::Written, &batch_of(0, 0, 1))
            .await
            .expect_err("auto-create is off");
        assert!(error.to_string().contains("rill topic create"), "{error}");
        client
            .create_topic("t", 1, &[("retention_ms".into(), "60000".into())])
            .await
            .expect("create");
        let error = client.create_topic("t", 1, &[]).await.expect_err("exists");
        assert!(matches!(
            error,
            ClientError::Broker {
                code: ErrorCode::TopicExists,
                ..
            }
        ));
        let error = client
            .create_topic("bad/name", 1, &[])
            .await
            .expect_err("bad name");
        assert!(error.to_string().contains('/'), "{error}");
        client
            .alter_topic("t", Some(3), &[("fsync".into(), "never".into())])
            .await
            .expect("alter");
        let described = client.describe_topic("t").await.expect("describe");
        assert_eq!(described.partitions.len(), 3);
        assert!(
            described.settings.contains("retention_ms=60000"),
            "{}",
            described.settings
        );
        assert!(
            described.settings.contains("fsync=\"never\""),
            "{}",
            described.settings
        );
        let mut lines = BTreeMap::new();
        for line in described.settings.lines() {
            if let Some((key, value)) = line.split_once('=') {
                lines.insert(key.to_string(), value.to_string());
            }
        }
        assert!(lines.contains_key("segment_bytes_max"));
        client.delete_topic("t").await.expect("delete");
        let error = client.describe_topic("t").await.expect_err("deleted");
        assert!(
            matches!(
                error,
                ClientError::Broker {
                    code: ErrorCode::UnknownTopic,
                    ..
                }
            ),
            "{error}"
        );
    });
}

#[test]
fn a_client_that_never_reads_cannot_grow_the_brokers_memory() {
    let broker = Broker::start(&["limits.requests_in_flight_max=8", "node.shards=1"]);
    produce_one_mebibyte(&broker, "big");
    let before = broker.resident_kib();
    // 400 fetches of 1 MiB each would be 400 MiB of answers; the client never reads.
    let _stalled = stalled_fetcher(&broker, "big", 400);
    // Wait until the broker has read all it is going to read (its in-flight
    // limit holds the rest in the socket), then measure.
    let grown_kib = settled_growth_kib(&broker, before);
    assert!(
        grown_kib < 64 * 1024,
        "a stalled client grew the broker by {grown_kib} KiB; answers must stay bounded by requests_in_flight_max"
    );
    // Others are still served.
    runtime().block_on(async {
        let client = connect(&broker).await;
        client.ping().await.expect("ping while a client is stalled");
    });
}

#[test]
fn a_fetcher_that_hangs_up_mid_answer_leaves_the_broker_serving() {
    // Cached answers go out with sendfile from the shard thread; a peer
    // that hangs up while one is in flight must cost its connection only
    // (sendfile to a closed socket raises SIGPIPE unless it is ignored).
    let mut broker = Broker::start(&["node.shards=1"]);
    produce_one_mebibyte(&broker, "big");
    // After a restart the batch is in the segment file, not the write
    // buffer; one read brings it into the page cache.
    broker.restart();
    runtime().block_on(async {
        let client = connect(&broker).await;
        let fetched = client
            .fetch("big", 0, 0, 2 << 20, 1, 0)
            .await
            .expect("warm-up fetch");
        assert!(fetched.batches.len() > 1_000_000);
    });
    let sendfile = "rill_fetch_sent_bytes_total{path=\"sendfile\"}";
    let before = metric(&broker, sendfile).expect("sendfile metric");
    // Sixteen answers of 1 MiB: more than the socket buffers hold.
    let mut fetcher = stalled_fetcher(&broker, "big", 16);
    fetcher.set_nonblocking(false).expect("blocking");
    let mut some = [0u8; 4096];
    std::io::Read::read_exact(&mut fetcher, &mut some).expect("the answer starts");
    if cachestat_works() {
        rill_tests::wait_until("a sendfile answer", Duration::from_secs(30), || {
            metric(&broker, sendfile).is_some_and(|now| now > before)
        });
    }
    drop(fetcher);
    rill_tests::wait_until(
        "the hung-up connection to close",
        Duration::from_secs(30),
        || metric(&broker, "rill_connections") == Some(0.0),
    );
    runtime().block_on(async {
        let client = connect(&broker).await;
        client.ping().await.expect("ping after a fetcher hung up");
        let fetched = client
            .fetch("big", 0, 0, 2 << 20, 1, 0)
            .await
            .expect("fetch after a fetcher hung up");
        assert!(fetched.batches.len() > 1_000_000);
    });
}

#[test]
fn the_cli_produces_consumes_and_manages_topics() {
    let broker = Broker::start(&["node.shards=2"]);
    let rill = |arguments: &[&str], input: Option<&str>| {
        let mut command = rill_tests::rill_command();
        command
            .args(arguments)
            .arg("--broker")
            .arg(broker.address());
        command.stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("run rill");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        let output = child.wait_with_output().expect("rill output");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = rill(&["topic", "create", "lines", "--partitions", "2"], None);
    assert!(ok, "{stdout}{stderr}");
    let lines: String = (0..300).map(|index| format!("line {index}\n")).collect();
    let (ok, stdout, stderr) = rill(&["produce", "lines", "--key", "k"], Some(&lines));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("produced 300 records"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = rill(
        &["consume", "lines", "--from-beginning", "--group", "g1"],
        None,
    );
    assert!(ok, "{stderr}");
    let consumed: Vec<&str> = stdout.lines().collect();
    assert_eq!(consumed.len(), 300, "{stdout}");
    assert_eq!(consumed[0], "k\tline 0");
    assert_eq!(consumed[299], "k\tline 299");
    // The group resumes where it stopped: nothing new, nothing printed.
    let (ok, stdout, _) = rill(&["consume", "lines", "--group", "g1"], None);
    assert!(ok);
    assert!(stdout.is_empty(), "{stdout}");
    let (ok, stdout, _) = rill(
        &[
            "consume",
            "lines",
            "--from-beginning",
            "--max-records",
            "2",
            "--output",
            "json",
        ],
        None,
    );
    assert!(ok);
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|line| line.contains("\"value\":\"line 0\"")),
        "{stdout}"
    );
    let (ok, stdout, _) = rill(&["topic", "list"], None);
    assert!(ok && stdout.contains("lines"), "{stdout}");
    let (ok, stdout, _) = rill(&["group", "describe", "g1"], None);
    assert!(ok && stdout.contains("lines"), "{stdout}");
    let (ok, stdout, _) = rill(&["status"], None);
    assert!(ok && stdout.contains("shards"), "{stdout}");
    let (ok, _, stderr) = rill(&["topic", "describe", "nothing"], None);
    assert!(!ok && stderr.contains("nothing"), "{stderr}");
}

#[test]
fn a_consumer_that_asks_ahead_reads_every_record_in_order() {
    // Each partition's next fetch leaves as soon as the head of the answer
    // before it arrives, so the broker holds two fetches of one partition
    // from one connection at once, the second for where the first ends.
    // Small fetches make many such pairs; every record must come once, in
    // order, wherever its bytes came from.
    let broker = Broker::start(&["node.shards=2"]);
    runtime().block_on(async {
        let client = connect(&broker).await;
        client.create_topic("ahead", 2, &[]).await.expect("create");
        produce_range(&client, "ahead", 2, 0, 40_000, Acks::Written).await;
        let readers = (0..2).map(|partition| {
            let client = &client;
            async move {
                let start = |offset| {
                    client
                        .start_fetch("ahead", partition, offset, 64 * 1024, 1, 0)
                        .expect("queue fetch")
                };
                let mut offset = 0i64;
                let mut current = start(0);
                let mut asked_ahead = 0;
                loop {
                    let head = current.head().await.expect("a fetch answer's head");
                    let next =
                        (head.next_offset < head.high_watermark).then(|| start(head.next_offset));
                    let fetched = current.wait().await.expect("fetch");
                    assert_eq!(fetched.next_offset, head.next_offset);
                    assert_eq!(fetched.batches.len() as u32, head.records_bytes);
                    check_fetched(partition, &fetched, &mut offset);
                    match next {
                        Some(next) => {
                            asked_ahead += 1;
                            current = next;
                        }
                        None => break,
                    }
                }
                assert_eq!(offset, 40_000, "partition {partition} read to its end");
                assert!(asked_ahead > 20, "only {asked_ahead} fetches asked ahead");
            }
        });
        futures_util::future::join_all(readers).await;
        for partition in 0..2 {
            check_latest(&client, "ahead", partition, 40_000).await;
        }
    });
}

#[test]
fn fetches_go_out_by_sendfile_splice_or_read_byte_for_byte() {
    // How a fetch's segment bytes reach the socket depends on where they
    // are: in the page cache, sendfile from the shard thread; buffered
    // segments not in it, splice on io_uring; direct-I/O segments not in
    // it, one large read. Each path must carry every byte, and each must be
    // the one taken (rill_fetch_sent_bytes_total says which).
    let mut broker = Broker::start(&["node.shards=2"]);
    let uring = runtime().block_on(async {
        let client = connect(&broker).await;
        let uring = client.status().await.expect("status").io_driver == "io_uring";
        client
            .create_topic("buffered", 2, &[("direct_io".into(), "false".into())])
            .await
            .expect("create buffered");
        client
            .create_topic("direct", 2, &[])
            .await
            .expect("create direct");
        produce_range(&client, "buffered", 2, 0, 30_000, Acks::Written).await;
        produce_range(&client, "direct", 2, 0, 30_000, Acks::Written).await;
        uring
    });
    // The restart syncs every segment, so their pages are clean and can be
    // dropped from the cache.
    broker.restart();
    let cachestat = cachestat_works();
    let sent = |path: &str| {
        metric(
            &broker,
            &format!("rill_fetch_sent_bytes_total{{path=\"{path}\"}}"),
        )
        .expect("fetch path metric")
    };
    evict_page_cache(&broker.data_dir);
    runtime().block_on(async {
        let client = connect(&broker).await;
        for partition in 0..2 {
            check_partition(&client, "buffered", partition, 30_000).await;
        }
    });
    if uring {
        assert!(
            sent("splice") > 0.0,
            "uncached buffered segments are spliced"
        );
    }
    evict_page_cache(&broker.data_dir);
    let read_before = sent("read");
    runtime().block_on(async {
        let client = connect(&broker).await;
        for partition in 0..2 {
            check_partition(&client, "direct", partition, 30_000).await;
        }
    });
    assert!(
        sent("read") > read_before,
        "uncached direct segments are read"
    );
    // Both topics were just read through the page cache: now every range
    // is in it and goes out with sendfile, wherever the kernel can say so.
    let sendfile_before = sent("sendfile");
    runtime().block_on(async {
        let client = connect(&broker).await;
        for topic in ["buffered", "direct"] {
            for partition in 0..2 {
                check_partition(&client, topic, partition, 30_000).await;
            }
        }
    });
    if cachestat {
        assert!(
            sent("sendfile") > sendfile_before,
            "cached segments go out with sendfile"
        );
    } else {
        assert_eq!(sent("sendfile"), 0.0, "no sendfile without cachestat");
    }
}

/// Drops the clean pages of every file under `dir` from the page cache.
fn evict_page_cache(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    for entry in std::fs::read_dir(dir).expect("data dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            evict_page_cache(&path);
        } else if let Ok(file) = std::fs::File::open(&path) {
            // SAFETY: fadvise on an open descriptor; no memory is involved.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// Whether this kernel (or emulator) answers cachestat(2), which the
/// broker needs before it sends a range with sendfile.
fn cachestat_works() -> bool {
    use std::os::fd::AsFd;
    let probe = tempfile::tempfile().expect("probe file");
    rill_node::io::sendfile::range_cached(probe.as_fd(), 0, 4096).is_some()
}

/// How much the broker's resident memory grew since `before`, once it stops
/// changing (the broker has read all it is going to read).
fn settled_growth_kib(broker: &Broker, before: u64) -> u64 {
    let mut previous = 0;
    rill_tests::wait_until(
        "the broker's memory to settle",
        Duration::from_secs(20),
        || {
            let now = broker.resident_kib();
            let settled = now == previous;
            previous = now;
            settled
        },
    );
    broker.resident_kib().saturating_sub(before)
}

/// Opens a raw connection that asks for `count` fetches of `topic` and never
/// reads an answer.
fn stalled_fetcher(broker: &Broker, topic: &str, count: u32) -> TcpStream {
    let mut stalled = TcpStream::connect(broker.native).expect("connect");
    let mut frames = Vec::new();
    let handshake = rill_protocol::Request::Handshake {
        protocol_version: 1,
        client_id: "stalled",
    };
    rill_protocol::frame::encode_frame_vec(
        &rill_protocol::RequestFrame {
            correlation_id: 0,
            request: handshake,
        },
        0,
        &mut frames,
    );
    for correlation_id in 1..=count {
        let fetch = rill_protocol::Request::Fetch {
            topic,
            partition: 0,
            offset: 0,
            max_bytes: 2 << 20,
            min_bytes: 1,
            max_wait_ms: 0,
        };
        rill_protocol::frame::encode_frame_vec(
            &rill_protocol::RequestFrame {
                correlation_id,
                request: fetch,
            },
            0,
            &mut frames,
        );
    }
    stalled.set_nonblocking(true).expect("nonblocking");
    let mut written = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while written < frames.len() && Instant::now() < deadline {
        match stalled.write(&frames[written..]) {
            Ok(count) => written += count,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::yield_now()
            }
            Err(error) => panic!("write: {error}"),
        }
    }
    stalled
}

fn produce_one_mebibyte(broker: &Broker, topic: &str) {
    runtime().block_on(async {
        let client = connect(broker).await;
        client.create_topic(topic, 1, &[]).await.expect("create");
        let mut builder = RecordBuilder::new();
        for index in 0..1000u32 {
            builder.push(0, None, Some(&vec![index as u8; 1000]), &[]);
        }
        client
            .produce(
                topic,
                Target::Partition(0),
                Acks::Written,
                &builder.finish(),
            )
            .await
            .expect("produce");
    });
}

fn metric(broker: &Broker, name: &str) -> Option<f64> {
    let (_, body) = rill_tests::http_get(broker.admin, "/metrics").ok()?;
    body.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
}

#[test]
fn the_buffer_budget_bounds_memory_across_connections() {
    // A generous per-connection limit, a small broker-wide budget.
    let broker = Broker::start(&[
        "limits.requests_in_flight_max=10000",
        "limits.buffer_memory_bytes_max=16777216",
        "node.shards=1",
    ]);
    produce_one_mebibyte(&broker, "budget");
    let before = broker.resident_kib();
    let _first = stalled_fetcher(&broker, "budget", 300);
    let _second = stalled_fetcher(&broker, "budget", 300);
    let grown_kib = settled_growth_kib(&broker, before);
    assert!(
        grown_kib < 96 * 1024,
        "600 unread 1 MiB answers grew the broker by {grown_kib} KiB"
    );
    let held = metric(&broker, "rill_buffer_bytes").expect("buffer metric");
    assert!(
        held <= 16.0 * 1048576.0 + 4.0 * 1048576.0,
        "buffers hold {held} bytes"
    );
    runtime().block_on(async {
        connect(&broker)
            .await
            .ping()
            .await
            .expect("others are still served");
    });
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut broker = Broker::start(&["limits.requests_in_flight_max=64", "node.shards=1"]);
    produce_one_mebibyte(&broker, "stuck");
    // A client that never reads keeps the graceful shutdown waiting.
    let _stalled = stalled_fetcher(&broker, "stuck", 64);
    rill_tests::wait_until("answers to pile up", Duration::from_secs(20), || {
        metric(&broker, "rill_buffer_bytes").is_some_and(|bytes| bytes > 1048576.0)
    });
    let started = Instant::now();
    broker.signal(libc::SIGTERM);
    rill_tests::wait_until("the shutdown to begin", Duration::from_secs(10), || {
        matches!(rill_tests::http_get(broker.admin, "/ready"), Ok((503, _)))
    });
    broker.signal(libc::SIGTERM);
    let status = broker.wait_exit();
    assert_eq!(
        status.code(),
        Some(130),
        "the second signal exits at once with 130"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "it did not wait out the grace period"
    );
}
