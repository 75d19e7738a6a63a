//! The MQTT listener of the real `rill` binary, driven by a real MQTT
//! client library (`rumqttc`) and, where a library would hide what is
//! tested, by raw packets: QoS 0, 1 and 2 end to end; MQTT publishes read
//! over the native protocol and native produces received over MQTT;
//! retained messages; wills; persistent sessions across a reconnect and a
//! broker restart; a thousand concurrent clients; bad packets that close
//! only their own connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rill_core::batch::RecordBuilder;
use rill_node::client::{Client as NativeClient, ClientConfig, records_of};
use rill_protocol::{Acks, Target};
use rill_tests::Broker;
use rumqttc::{Client, Connection, Event, LastWill, MqttOptions, Packet, QoS};

/// How long any one expected event may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// Settings every MQTT test broker runs with: one rule keyed by the device
/// id level, everything else to the catch-all topic `mqtt`.
const RULES: &str =
    r#"mqtt.rules=[{filter="sensors/+/temperature", topic="sensor-temperature", key="level:1"}]"#;

fn start_broker(extra: &[&str]) -> Broker {
    let mut settings = vec![RULES];
    settings.extend_from_slice(extra);
    Broker::start(&settings)
}

/// A client with its event loop, driven from the test thread.
struct Mqtt {
    client: Client,
    connection: Connection,
}

fn options(broker: &Broker, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, broker.mqtt.ip().to_string(), broker.mqtt.port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

impl Mqtt {
    fn connect(options: MqttOptions) -> Mqtt {
        let (client, connection) = Client::new(options, 100);
        let mut mqtt = Mqtt { client, connection };
        mqtt.expect("CONNACK", |event| match event {
            Event::Incoming(Packet::ConnAck(ack)) => Some(ack.session_present),
            _ => None,
        });
        mqtt
    }

    /// Drives the event loop until `pick` returns something.
    fn expect<T>(&mut self, what: &str, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            let left = DEADLINE
                .checked_sub(started.elapsed())
                .unwrap_or_else(|| panic!("timed out waiting for {what}"));
            match self.connection.recv_timeout(left) {
                Ok(Ok(event)) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                Ok(Err(error)) => panic!("connection failed waiting for {what}: {error}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// Events until `quiet` passes with none that `pick` takes; returns
    /// what it took (for "this does not arrive" checks, bounded by a
    /// marker the caller waits for afterwards).
    fn publishes_until(&mut self, marker_topic: &str) -> Vec<rumqttc::Publish> {
        let mut seen = Vec::new();
        self.expect(&format!("a publish on {marker_topic}"), |event| {
            if let Event::Incoming(Packet::Publish(publish)) = event {
                if publish.topic == marker_topic {
                    return Some(());
                }
                seen.push(publish.clone());
            }
            None
        });
        seen
    }

    fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).expect("queue SUBSCRIBE");
        self.expect("SUBACK", |event| match event {
            Event::Incoming(Packet::SubAck(_)) => Some(()),
            _ => None,
        });
    }

    fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .expect("queue PUBLISH");
        match qos {
            QoS::AtMostOnce => self.expect("the PUBLISH to leave", |event| match event {
                Event::Outgoing(rumqttc::Outgoing::Publish(_)) => Some(()),
                _ => None,
            }),
            QoS::AtLeastOnce => self.expect("PUBACK", |event| match event {
                Event::Incoming(Packet::PubAck(_)) => Some(()),
                _ => None,
            }),
            QoS::ExactlyOnce => self.expect("PUBCOMP", |event| match event {
                Event::Incoming(Packet::PubComp(_)) => Some(()),
                _ => None,
            }),
        }
    }

    fn receive(&mut self) -> rumqttc::Publish {
        self.expect("a PUBLISH", |event| match event {
            Event::Incoming(Packet::Publish(publish)) => Some(publish.clone()),
            _ => None,
        })
    }

    /// A clean DISCONNECT, waited for.
    fn disconnect(mut self) {
        self.client.disconnect().expect("queue DISCONNECT");
        let started = Instant::now();
        while started.elapsed() < DEADLINE {
            match self.connection.recv_timeout(DEADLINE) {
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) => return,
                Ok(Ok(_)) => {}
                _ => return,
            }
        }
    }
}

fn runtime() -> compio::runtime::Runtime {
    compio::runtime::Runtime::new().expect("client runtime")
}

fn header<'r>(headers: &'r [(Vec<u8>, Option<Vec<u8>>)], name: &str) -> Option<&'r [u8]> {
    headers
        .iter()
        .find(|(key, _)| key == name.as_bytes())
        .and_then(|(_, value)| value.as_deref())
}

#[test]
fn qos_0_1_and_2_travel_end_to_end() {
    let broker = start_broker(&[]);
    let mut subscriber = Mqtt::connect(options(&broker, "e2e-subscriber"));
    subscriber.subscribe("e2e/#", QoS::ExactlyOnce);
    let mut publisher = Mqtt::connect(options(&broker, "e2e-publisher"));
    for (qos, payload) in [
        (QoS::AtMostOnce, "zero"),
        (QoS::AtLeastOnce, "one"),
        (QoS::ExactlyOnce, "two"),
    ] {
        publisher.publish(&format!("e2e/{payload}"), qos, false, payload.as_bytes());
        let received = subscriber.receive();
        assert_eq!(received.topic, format!("e2e/{payload}"));
        assert_eq!(received.payload.as_ref(), payload.as_bytes());
        assert_eq!(
            received.qos, qos,
            "delivered at the QoS it was published with"
        );
        assert!(!received.retain);
    }
    // A subscription at QoS 0 gets everything at QoS 0.
    let mut low = Mqtt::connect(options(&broker, "e2e-low"));
    low.subscribe("e2e/#", QoS::AtMostOnce);
    publisher.publish("e2e/again", QoS::ExactlyOnce, false, b"again");
    assert_eq!(low.receive().qos, QoS::AtMostOnce);
    assert_eq!(subscriber.receive().qos, QoS::ExactlyOnce);
    publisher.disconnect();
    subscriber.disconnect();
    low.disconnect();
}

#[test]
fn mqtt_publishes_are_records_and_native_records_reach_mqtt() {
    let broker = start_broker(&[]);
    let mut subscriber = Mqtt::connect(options(&broker, "bridge-subscriber"));
    subscriber.subscribe("sensors/+/temperature", QoS::AtLeastOnce);
    let mut publisher = Mqtt::connect(options(&broker, "device-7"));
    publisher.publish("sensors/dev7/temperature", QoS::AtLeastOnce, false, b"21.5");
    assert_eq!(subscriber.receive().payload.as_ref(), b"21.5");

    let records = runtime().block_on(async {
        let client = NativeClient::connect(&broker.address(), ClientConfig::default())
            .await
            .expect("native connect");
        // A keyed mapping topic spreads over the shards: the record is in
        // its key's partition.
        let partitions = client
            .describe_topic("sensor-temperature")
            .await
            .expect("describe")
            .partitions
            .len() as u32;
        let partition = rill_protocol::partitioner::partition_for_key(b"dev7", partitions);
        let fetched = client
            .fetch("sensor-temperature", partition, 0, 1 << 20, 1, 5_000)
            .await
            .expect("fetch");
        let records = records_of(&fetched.batches).expect("records");
        // A native produce without MQTT headers: mapped back through the rule.
        let mut builder = RecordBuilder::new();
        builder.push(1_700_000_000_000, Some(b"dev9"), Some(b"19.0"), &[]);
        client
            .produce(
                "sensor-temperature",
                Target::Key(b"dev9"),
                Acks::Durable,
                &builder.finish(),
            )
            .await
            .expect("native produce");
        records
    });
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(
        record.key.as_deref(),
        Some(&b"dev7"[..]),
        "keyed by the + level"
    );
    assert_eq!(record.value.as_deref(), Some(&b"21.5"[..]));
    assert_eq!(
        header(&record.headers, "mqtt.topic"),
        Some(&b"sensors/dev7/temperature"[..])
    );
    assert_eq!(
        header(&record.headers, "mqtt.client_id"),
        Some(&b"device-7"[..])
    );
    assert_eq!(header(&record.headers, "mqtt.qos"), Some(&b"1"[..]));

    let native = subscriber.receive();
    assert_eq!(native.topic, "sensors/dev9/temperature");
    assert_eq!(native.payload.as_ref(), b"19.0");

    // A compressed batch, as Kafka producers send them: delivered too.
    runtime().block_on(async {
        use rill_edge_bridge::replicator::batch::{
            BatchBuilder, BatchLimits, Provenance, SourceRecord,
        };
        let limits = BatchLimits {
            batch_bytes_max: 1 << 20,
            batch_records_max: 16,
            linger_ms: 0,
        };
        let mut builder = BatchBuilder::new(rill_core::batch::Compression::Zstd, limits);
        let provenance = Provenance {
            edge_id: "test".into(),
            topic: "elsewhere".into(),
            partition: 0,
            offset: 0,
        };
        let record = SourceRecord {
            offset: 0,
            timestamp_ms: 1_700_000_000_000,
            key: Some(b"dev11"),
            value: Some(b"17.25"),
            headers: Vec::new(),
        };
        builder.push(&record, &provenance, 0).expect("record fits");
        let batch = builder.finish().expect("compressed batch");
        let client = NativeClient::connect(&broker.address(), ClientConfig::default())
            .await
            .expect("native connect");
        client
            .produce(
                "sensor-temperature",
                Target::Key(b"dev11"),
                Acks::Durable,
                &batch.bytes,
            )
            .await
            .expect("native produce of a zstd batch");
    });
    let compressed = subscriber.receive();
    assert_eq!(compressed.topic, "sensors/dev11/temperature");
    assert_eq!(compressed.payload.as_ref(), b"17.25");
    publisher.disconnect();
    subscriber.disconnect();
}

#[test]
fn retained_messages_are_sent_on_subscribe_and_cleared_by_an_empty_payload() {
    let broker = start_broker(&[]);
    let mut publisher = Mqtt::connect(options(&broker, "retain-publisher"));
    publisher.publish("status/pump", QoS::AtLeastOnce, true, b"running");
    publisher.publish("status/valve", QoS::AtLeastOnce, true, b"open");

    let mut first = Mqtt::connect(options(&broker, "retain-first"));
    first.subscribe("status/#", QoS::AtLeastOnce);
    let mut retained: Vec<(String, Vec<u8>, bool)> = (0..2)
        .map(|_| {
            let publish = first.receive();
            (publish.topic, publish.payload.to_vec(), publish.retain)
        })
        .collect();
    retained.sort();
    assert_eq!(
        retained,
        [
            ("status/pump".to_string(), b"running".to_vec(), true),
            ("status/valve".to_string(), b"open".to_vec(), true),
        ]
    );

    // Cleared; it survives nothing, not even a restart.
    publisher.publish("status/pump", QoS::AtLeastOnce, true, b"");
    publisher.disconnect();
    first.disconnect();
    let mut broker = broker;
    broker.restart();
    let mut second = Mqtt::connect(options(&broker, "retain-second"));
    second.subscribe("status/#", QoS::AtLeastOnce);
    let mut marker = Mqtt::connect(options(&broker, "retain-marker"));
    marker.publish("status/zz-marker", QoS::AtLeastOnce, false, b"end");
    let seen = second.publishes_until("status/zz-marker");
    let topics: Vec<(&str, bool)> = seen
        .iter()
        .map(|publish| (publish.topic.as_str(), publish.retain))
        .collect();
    assert_eq!(
        topics,
        [("status/valve", true)],
        "pump was cleared; valve kept across the restart"
    );
    second.disconnect();
    marker.disconnect();
}

#[test]
fn wills_go_out_on_an_unclean_disconnect_only() {
    let broker = start_broker(&[]);
    let mut watcher = Mqtt::connect(options(&broker, "will-watcher"));
    watcher.subscribe("wills/#", QoS::AtLeastOnce);

    // A clean DISCONNECT: no will.
    let mut polite = options(&broker, "will-polite");
    polite.set_last_will(LastWill::new(
        "wills/polite",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    Mqtt::connect(polite).disconnect();

    // The socket just closes: the will goes.
    let mut rude = options(&broker, "will-rude");
    rude.set_last_will(LastWill::new("wills/rude", "lost", QoS::AtLeastOnce, false));
    drop(Mqtt::connect(rude));

    let will = watcher.receive();
    assert_eq!(
        (will.topic.as_str(), will.payload.as_ref()),
        ("wills/rude", &b"lost"[..]),
        "the clean disconnect sent no will"
    );
    // The counter moves once the will's append is acknowledged, which
    // may be just after the watcher saw it.
    rill_tests::wait_until("the will in /metrics", DEADLINE, || {
        rill_tests::http_get(broker.admin, "/metrics").is_ok_and(|(status, metrics)| {
            status == 200
                && metrics.contains("rill_mqtt_wills_published_total 1\n")
                && metrics.contains("rill_mqtt_sessions_connected 1\n")
        })
    });
    watcher.disconnect();
}

#[test]
fn a_persistent_session_resumes_after_a_reconnect_and_a_restart() {
    let mut broker = start_broker(&[]);
    let persistent = |broker: &Broker| {
        let mut options = options(broker, "persistent-reader");
        options.set_clean_session(false);
        options
    };
    let mut reader = Mqtt::connect(persistent(&broker));
    reader.subscribe("plant/#", QoS::AtLeastOnce);
    reader.disconnect();

    let mut publisher = Mqtt::connect(options(&broker, "plant-publisher"));
    for index in 0..5 {
        publisher.publish(
            &format!("plant/line{index}"),
            QoS::AtLeastOnce,
            false,
            format!("away-{index}").as_bytes(),
        );
    }
    let (client, connection) = Client::new(persistent(&broker), 100);
    let mut reader = Mqtt { client, connection };
    let present = reader.expect("CONNACK", |event| match event {
        Event::Incoming(Packet::ConnAck(ack)) => Some(ack.session_present),
        _ => None,
    });
    assert!(present, "the session was kept");
    let mut payloads: Vec<Vec<u8>> = (0..5).map(|_| reader.receive().payload.to_vec()).collect();
    payloads.sort();
    let expected: Vec<Vec<u8>> = (0..5)
        .map(|index| format!("away-{index}").into_bytes())
        .collect();
    assert_eq!(payloads, expected);
    reader.disconnect();

    for index in 0..3 {
        publisher.publish(
            &format!("plant/restart{index}"),
            QoS::AtLeastOnce,
            false,
            format!("restart-{index}").as_bytes(),
        );
    }
    publisher.disconnect();
    broker.restart();

    let (client, connection) = Client::new(persistent(&broker), 100);
    let mut reader = Mqtt { client, connection };
    let present = reader.expect("CONNACK", |event| match event {
        Event::Incoming(Packet::ConnAck(ack)) => Some(ack.session_present),
        _ => None,
    });
    assert!(present, "the session survived the restart");
    let mut payloads: Vec<Vec<u8>> = (0..3).map(|_| reader.receive().payload.to_vec()).collect();
    payloads.sort();
    let expected: Vec<Vec<u8>> = (0..3)
        .map(|index| format!("restart-{index}").into_bytes())
        .collect();
    assert_eq!(payloads, expected);
    // Nothing taken before comes again.
    let mut marker = Mqtt::connect(options(&broker, "plant-marker"));
    marker.publish("plant/zz-marker", QoS::AtLeastOnce, false, b"end");
    assert!(reader.publishes_until("plant/zz-marker").is_empty());
    reader.disconnect();
    marker.disconnect();
}

#[test]
fn stored_sessions_are_bounded_and_a_refused_one_is_reported_in_connack() {
    let broker = start_broker(&["mqtt.stored_sessions_max=2"]);
    let persistent = |client_id: &str| {
        let mut options = options(&broker, client_id);
        options.set_clean_session(false);
        options
    };
    let reconnect = |client_id: &str| {
        let (client, connection) = Client::new(persistent(client_id), 100);
        let mut again = Mqtt { client, connection };
        let present = again.expect("CONNACK", |event| match event {
            Event::Incoming(Packet::ConnAck(ack)) => Some(ack.session_present),
            _ => None,
        });
        again.disconnect();
        present
    };
    for client_id in ["kept-1", "kept-2", "one-too-many"] {
        let mut client = Mqtt::connect(persistent(client_id));
        client.subscribe("plant/#", QoS::AtLeastOnce);
        client.disconnect();
        // Settled before the next one comes: its reconnect says whether
        // it was kept.
        let expected = client_id != "one-too-many";
        assert_eq!(reconnect(client_id), expected, "{client_id}");
    }
    let refused = rill_tests::http_get(broker.admin, "/metrics")
        .ok()
        .and_then(|(_, body)| {
            body.lines()
                .find_map(|line| line.strip_prefix("rill_mqtt_sessions_refused_total "))
                .and_then(|value| value.trim().parse::<f64>().ok())
        });
    assert!(
        refused.is_some_and(|count| count >= 1.0),
        "the refusal is counted: {refused:?}"
    );
    // The kept sessions still work.
    assert!(reconnect("kept-1"));
}

// Raw packets, for what a client library will not send.

fn string(out: &mut Vec<u8>, text: &[u8]) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut length = body.len();
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn connect_packet(client_id: &str, v5: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(if v5 { 5 } else { 4 });
    body.push(0x02);
    body.extend_from_slice(&60u16.to_be_bytes());
    if v5 {
        body.push(0);
    }
    string(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

fn publish_packet(topic: &str, packet_id: u16, payload: &[u8], v5: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// Reads one packet: its first byte and body. `None` once the broker
/// closed the connection.
fn read_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).ok()?;
    let mut length = 0usize;
    for shift in 0..4 {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).ok()?;
        length |= usize::from(byte[0] & 0x7f) << (7 * shift);
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).ok()?;
    Some((first[0], body))
}

fn raw_connect(address: SocketAddr, client_id: &str, v5: bool) -> TcpStream {
    let mut stream = TcpStream::connect(address).expect("connect");
    // Generous: under an emulator a thousand of these share two cores.
    stream
        .set_read_timeout(Some(rill_tests::BROKER_DEADLINE))
        .expect("read timeout");
    stream
        .write_all(&connect_packet(client_id, v5))
        .expect("send CONNECT");
    let (first, body) = read_packet(&mut stream).expect("CONNACK");
    assert_eq!(first, 0x20, "CONNACK");
    assert_eq!(body[1], 0, "accepted");
    stream
}

/// Reads until the broker closes; returns the packets it sent first.
fn read_until_closed(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut packets = Vec::new();
    while let Some(packet) = read_packet(stream) {
        packets.push(packet);
    }
    packets
}

#[test]
fn bad_packets_close_only_their_own_connection() {
    let broker = start_broker(&["mqtt.packet_bytes_max=4096"]);
    let mut bystander = Mqtt::connect(options(&broker, "bystander"));
    bystander.subscribe("bad/#", QoS::AtLeastOnce);

    // Garbage instead of CONNECT: closed without an answer.
    let mut garbage = TcpStream::connect(broker.mqtt).expect("connect");
    garbage.set_read_timeout(Some(DEADLINE)).expect("timeout");
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("send");
    assert!(read_until_closed(&mut garbage).is_empty());

    // A second CONNECT (3.1.1): closed.
    let mut twice = raw_connect(broker.mqtt, "twice", false);
    twice
        .write_all(&connect_packet("twice", false))
        .expect("send");
    assert!(read_until_closed(&mut twice).is_empty());

    // Too large (5.0): DISCONNECT 0x95 Packet too large, then closed.
    let mut large = raw_connect(broker.mqtt, "large", true);
    large
        .write_all(&publish_packet("bad/large", 1, &vec![b'x'; 8192], true))
        .expect("send");
    let packets = read_until_closed(&mut large);
    assert_eq!(packets.len(), 1, "{packets:?}");
    assert_eq!(packets[0].0, 0xE0, "DISCONNECT");
    assert_eq!(packets[0].1.first(), Some(&0x95), "Packet too large");

    // A malformed remaining length (5.0): DISCONNECT 0x81 Malformed Packet.
    let mut malformed = raw_connect(broker.mqtt, "malformed", true);
    malformed
        .write_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01])
        .expect("send");
    let packets = read_until_closed(&mut malformed);
    assert_eq!(packets.first().map(|packet| packet.0), Some(0xE0));

    // The well-behaved client never noticed.
    let mut publisher = Mqtt::connect(options(&broker, "bad-publisher"));
    publisher.publish("bad/fine", QoS::AtLeastOnce, false, b"still here");
    assert_eq!(bystander.receive().payload.as_ref(), b"still here");
    publisher.disconnect();
    bystander.disconnect();
}

/// Raises this process's open-file limit to its hard limit (the broker
/// inherits it): a thousand clients need two descriptors each here.
fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

#[test]
fn a_thousand_clients_connect_publish_and_are_acknowledged_at_once() {
    const CLIENTS: usize = 1000;
    const THREADS: usize = 4;
    let files = raise_file_limit();
    assert!(
        files >= 2 * CLIENTS as u64 + 100,
        "the open-file limit ({files}) is too low for {CLIENTS} clients"
    );
    let broker = start_broker(&["limits.connections_max=2000"]);
    let address = broker.mqtt;
    // Every client is connected before any publishes, and all publish
    // before any closes: a thousand sessions at once.
    let connected = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let connected = connected.clone();
            std::thread::spawn(move || {
                let per_thread = CLIENTS / THREADS;
                let mut streams: Vec<TcpStream> = (0..per_thread)
                    .map(|index| {
                        raw_connect(address, &format!("crowd-{thread}-{index}"), index % 2 == 0)
                    })
                    .collect();
                connected.wait();
                for (index, stream) in streams.iter_mut().enumerate() {
                    let payload = format!("{thread}-{index}");
                    stream
                        .write_all(&publish_packet(
                            &format!("crowd/{thread}/{index}"),
                            7,
                            payload.as_bytes(),
                            index % 2 == 0,
                        ))
                        .expect("send PUBLISH");
                }
                for stream in &mut streams {
                    let (first, body) = read_packet(stream).expect("PUBACK");
                    assert_eq!(first, 0x40, "PUBACK");
                    assert_eq!(&body[..2], &7u16.to_be_bytes());
                }
                connected.wait();
                streams.len()
            })
        })
        .collect();
    let total: usize = threads
        .into_iter()
        .map(|thread| thread.join().expect("client thread"))
        .sum();
    assert_eq!(total, CLIENTS);
    // Acknowledged means appended: every message is in the log.
    let latest = runtime().block_on(async {
        let client = NativeClient::connect(&broker.address(), ClientConfig::default())
            .await
            .expect("native connect");
        let partitions = client
            .describe_topic("mqtt")
            .await
            .expect("describe")
            .partitions
            .len() as u32;
        let mut total = 0;
        for partition in 0..partitions {
            total += client
                .list_offsets("mqtt", partition, rill_protocol::OffsetSpec::Latest)
                .await
                .expect("list offsets")
                .expect("an end offset");
        }
        total
    });
    assert_eq!(latest, CLIENTS as i64);
}

#[test]
fn a_users_file_lets_in_the_right_password_only() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let users = directory.path().join("users");
    let line = rill_node::cli::passwd_line("pump", b"s3cret", 1_000).expect("a users line");
    std::fs::write(&users, format!("# MQTT users\n{line}\n")).expect("write the users file");
    let users_setting = format!("mqtt.users_file={}", users.display());
    let broker = start_broker(&[&users_setting, "mqtt.allow_anonymous=false"]);

    let mut good = options(&broker, "pump-1");
    good.set_credentials("pump", "s3cret");
    let mut pump = Mqtt::connect(good);
    pump.publish("auth/ok", QoS::AtLeastOnce, false, b"in");
    pump.disconnect();

    for (name, credentials) in [
        ("wrong password", Some(("pump", "guess"))),
        ("unknown user", Some(("valve", "s3cret"))),
        ("anonymous", None),
    ] {
        let mut refused = options(&broker, "pump-2");
        if let Some((user, password)) = credentials {
            refused.set_credentials(user, password);
        }
        let (_client, mut connection) = Client::new(refused, 10);
        let outcome = connection.recv_timeout(DEADLINE);
        assert!(
            matches!(
                outcome,
                Ok(Err(rumqttc::ConnectionError::ConnectionRefused(_)))
            ),
            "{name}: {outcome:?}"
        );
    }
}

/// One Fetch (v4) over the Kafka listener with raw requests, as
/// tests/kafka_wire.rs does: the records of `topic` partition 0 from 0.
fn kafka_fetch(address: SocketAddr, topic: &str) -> Vec<rill_node::client::ConsumedRecord> {
    use bytes::{Buf, BytesMut};
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{
        FetchRequest, FetchResponse, RequestHeader, ResponseHeader, TopicName,
    };
    use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

    const VERSION: i16 = 4;
    let request = FetchRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_max_wait_ms(1_000)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.into())))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(1 << 20),
                ]),
        ]);
    let header = RequestHeader::default()
        .with_request_api_key(FetchRequest::KEY)
        .with_request_api_version(VERSION)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("mqtt-test")));
    let mut body = BytesMut::new();
    header
        .encode(&mut body, FetchRequest::header_version(VERSION))
        .expect("encode header");
    request.encode(&mut body, VERSION).expect("encode request");
    let mut stream = TcpStream::connect(address).expect("connect to the Kafka listener");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    stream.write_all(&frame).expect("send Fetch");
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).expect("response size");
    let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut response).expect("response");
    let mut response = bytes::Bytes::from(response);
    let header = ResponseHeader::decode(&mut response, FetchResponse::header_version(VERSION))
        .expect("response header");
    assert_eq!(header.correlation_id, 1);
    let fetched = FetchResponse::decode(&mut response, VERSION).expect("Fetch response");
    assert_eq!(response.remaining(), 0);
    let partition = &fetched.responses[0].partitions[0];
    assert_eq!(partition.error_code, 0);
    records_of(partition.records.as_deref().unwrap_or_default()).expect("records")
}

#[test]
fn mqtt_publishes_are_read_over_kafka() {
    let broker = start_broker(&[]);
    let mut publisher = Mqtt::connect(options(&broker, "kafka-device"));
    publisher.publish("plant/boiler/pressure", QoS::AtLeastOnce, false, b"3.2 bar");
    publisher.disconnect();
    let records = kafka_fetch(broker.kafka, "mqtt");
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(
        record.key.as_deref(),
        Some(&b"plant/boiler/pressure"[..]),
        "the catch-all topic is keyed by the MQTT topic"
    );
    assert_eq!(record.value.as_deref(), Some(&b"3.2 bar"[..]));
    assert_eq!(
        header(&record.headers, "mqtt.client_id"),
        Some(&b"kafka-device"[..])
    );
}

#[test]
fn a_shared_subscription_gives_each_message_to_one_member() {
    let broker = start_broker(&[]);
    let mut members: Vec<Mqtt> = ["worker-a", "worker-b"]
        .into_iter()
        .map(|id| {
            let mut member = Mqtt::connect(options(&broker, id));
            member.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce);
            member
        })
        .collect();
    let mut publisher = Mqtt::connect(options(&broker, "jobs-publisher"));
    const JOBS: usize = 10;
    for index in 0..JOBS {
        publisher.publish(
            &format!("jobs/{index}"),
            QoS::AtLeastOnce,
            false,
            format!("job-{index}").as_bytes(),
        );
    }
    let mut received: Vec<Vec<String>> = vec![Vec::new(); members.len()];
    let started = Instant::now();
    while received.iter().map(Vec::len).sum::<usize>() < JOBS {
        assert!(started.elapsed() < DEADLINE, "received {received:?}");
        for (member, seen) in members.iter_mut().zip(&mut received) {
            if let Ok(Ok(Event::Incoming(Packet::Publish(publish)))) =
                member.connection.recv_timeout(Duration::from_millis(20))
            {
                seen.push(String::from_utf8_lossy(&publish.payload).into_owned());
            }
        }
    }
    let mut all: Vec<String> = received.iter().flatten().cloned().collect();
    assert_eq!(all.len(), JOBS, "{received:?}");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), JOBS, "each job exactly once: {received:?}");
    assert!(
        received.iter().all(|seen| !seen.is_empty()),
        "both members got work: {received:?}"
    );
    publisher.disconnect();
    for member in members {
        member.disconnect();
    }
}
