//! The upstream MQTT bridge of the real `rill` binary against a real
//! Mosquitto (Debian package `mosquitto`, which scripts/test.sh installs):
//! what a client publishes to Mosquitto at QoS 1 lands in the mapped Rill
//! topic, read back over the native protocol, through outages of either
//! side. Mosquitto runs on a free loopback port with persistence in a
//! temporary directory and is killed at the end of each test.
//!
//! Every test counts duplicates. Where nothing crashed between an append
//! and its PUBACK (Rill stopped gracefully) there must be none; where Rill
//! was killed, at most the in-flight window of messages appended and not
//! yet acknowledged comes again; where Mosquitto stopped, what it had sent
//! before may come again (at least once). Counts are printed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rill_node::client::{Client as NativeClient, ClientConfig, records_of};
use rill_tests::{Broker, free_port, http_get, wait_until};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// How long any one expected event may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// The Rill topic the bridged sensors land in.
const TOPIC: &str = "bridged";

/// Messages in flight between Mosquitto and the bridge at most: what may
/// come twice when an acknowledgement is lost.
const INFLIGHT_MAX: usize = 20;

/// A Mosquitto process with persistence in its own directory.
struct Mosquitto {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
    directory: tempfile::TempDir,
}

impl Mosquitto {
    fn binary() -> PathBuf {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
            .map(|directory| directory.join("mosquitto"))
            .find(|candidate| candidate.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "the bridge tests need Mosquitto and found no `mosquitto` binary on PATH, \
                     /usr/sbin or /usr/local/sbin: install the Debian package `mosquitto` \
                     (scripts/test.sh installs it)"
                )
            })
    }

    fn start() -> Mosquitto {
        Mosquitto::start_with(|_| String::new())
    }

    /// Mosquitto with more configuration lines, written by `extra` with
    /// the temporary directory at hand.
    fn start_with(extra: impl FnOnce(&std::path::Path) -> String) -> Mosquitto {
        let directory = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let store = directory.path().join("store");
        std::fs::create_dir(&store).expect("store directory");
        // As root, Mosquitto drops to user `mosquitto`, which cannot write
        // into this test's directory: keep root.
        // SAFETY: geteuid has no preconditions.
        let keep_root = if unsafe { libc::geteuid() } == 0 {
            "user root\n"
        } else {
            ""
        };
        let config = directory.path().join("mosquitto.conf");
        let extra = extra(directory.path());
        let anonymous = !extra.contains("password_file");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous {anonymous}\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\n\
                 max_inflight_messages {INFLIGHT_MAX}\n{keep_root}{extra}",
                store.display()
            ),
        )
        .expect("write mosquitto.conf");
        let mut mosquitto = Mosquitto {
            child: None,
            port,
            config,
            directory,
        };
        mosquitto.spawn();
        mosquitto
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.directory.path().join("mosquitto.log"))
            .expect("mosquitto log");
        let child = Command::new(Self::binary())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let child = self.child.as_mut().expect("running");
        wait_until("Mosquitto to listen", DEADLINE, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mosquitto exited at start: {status}");
            }
            std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
        });
    }

    /// SIGTERM: Mosquitto saves its sessions and queues, then exits.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_until("Mosquitto to exit", DEADLINE, || {
            child.try_wait().ok().flatten().is_some()
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Rill broker whose bridge follows `sensors/#` on `mosquitto`.
fn start_rill(mosquitto: &Mosquitto, version: &str) -> Broker {
    start_rill_with(mosquitto, version, &[])
}

fn start_rill_with(mosquitto: &Mosquitto, version: &str, extra: &[&str]) -> Broker {
    let mut settings = vec![
        format!(
            r#"mqtt.rules=[{{filter="sensors/+/temperature", topic="{TOPIC}", key="level:1"}}]"#
        ),
        "mqtt.bridge.enabled=true".into(),
        format!("mqtt.bridge.address=127.0.0.1:{}", mosquitto.port),
        format!("mqtt.bridge.protocol_version={version}"),
        r#"mqtt.bridge.filters=["sensors/#"]"#.into(),
        "mqtt.bridge.reconnect_backoff_ms_min=50".into(),
        "mqtt.bridge.reconnect_backoff_ms_max=500".into(),
        "mqtt.bridge.keep_alive_ms=5000".into(),
        // Mosquitto's own window for 3.1.1 clients (max_inflight_messages).
        format!("mqtt.bridge.inflight_max={INFLIGHT_MAX}"),
    ];
    settings.extend(extra.iter().map(|setting| setting.to_string()));
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    Broker::start(&settings)
}

/// The bridge's figures from `/metrics`.
fn bridge_metrics(broker: &Broker) -> BTreeMap<String, u64> {
    let Ok((200, page)) = http_get(broker.admin, "/metrics") else {
        return BTreeMap::new();
    };
    page.lines()
        .filter(|line| line.starts_with("rill_mqtt_bridge_"))
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn wait_connected(broker: &Broker, connected: bool) {
    let want = u64::from(connected);
    wait_until(
        &format!("rill_mqtt_bridge_connected {want}"),
        DEADLINE,
        || bridge_metrics(broker).get("rill_mqtt_bridge_connected") == Some(&want),
    );
}

/// Every value in the bridged topic, in offset order.
fn bridged_values(broker: &Broker) -> Vec<String> {
    let runtime = compio::runtime::Runtime::new().expect("client runtime");
    runtime.block_on(async {
        let Ok(client) = NativeClient::connect(&broker.address(), ClientConfig::default()).await
        else {
            return Vec::new();
        };
        let mut values = Vec::new();
        // A keyed mapping topic has one partition per shard: read them all.
        let partitions = match client.describe_topic(TOPIC).await {
            Ok(description) => description.partitions.len() as u32,
            Err(_) => return Vec::new(),
        };
        for partition in 0..partitions {
            let mut offset = 0;
            while let Ok(fetched) = client.fetch(TOPIC, partition, offset, 1 << 20, 1, 0).await {
                for record in records_of(&fetched.batches).expect("records") {
                    let value = record.value.unwrap_or_default();
                    values.push(String::from_utf8(value).expect("UTF-8 payload"));
                }
                if fetched.next_offset <= offset || fetched.next_offset >= fetched.high_watermark {
                    break;
                }
                offset = fetched.next_offset;
            }
        }
        values
    })
}

/// Waits until every one of `expected` is in the topic and nothing else
/// is; returns the values that are there more than once.
fn wait_all_bridged(broker: &Broker, expected: &BTreeSet<String>) -> BTreeSet<String> {
    let mut values = Vec::new();
    let started = Instant::now();
    wait_until("every message in the bridged topic", DEADLINE * 2, || {
        values = bridged_values(broker);
        let seen: BTreeSet<&String> = values.iter().collect();
        let arrived = expected.iter().filter(|value| seen.contains(value)).count();
        if started.elapsed() > DEADLINE {
            eprintln!("{arrived} of {} arrived so far", expected.len());
        }
        arrived == expected.len()
    });
    let mut seen = BTreeSet::new();
    let duplicates: BTreeSet<String> = values
        .iter()
        .filter(|value| !seen.insert(*value))
        .cloned()
        .collect();
    assert_eq!(
        seen.len(),
        expected.len(),
        "nothing but the published messages"
    );
    duplicates
}

fn payload(index: usize) -> String {
    format!("m-{index:05}")
}

/// Publishes `range` at QoS 1 to Mosquitto, each waited for (PUBACK),
/// counting them in `published`.
fn publish(port: u16, client_id: &str, range: std::ops::Range<usize>, published: &AtomicUsize) {
    publish_paced(port, client_id, range, published, None, |_| {});
}

/// [`publish`], at most one message per `pace` (a rate, so that Rill can
/// be stopped while messages still flow), calling `before` ahead of each.
fn publish_paced(
    port: u16,
    client_id: &str,
    range: std::ops::Range<usize>,
    published: &AtomicUsize,
    pace: Option<Duration>,
    mut before: impl FnMut(usize),
) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, 10);
    for index in range {
        before(index);
        if let Some(pace) = pace {
            std::thread::sleep(pace);
        }
        let topic = format!("sensors/dev{}/temperature", index % 3);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload(index))
            .expect("queue PUBLISH");
        let started = Instant::now();
        loop {
            let left = DEADLINE
                .checked_sub(started.elapsed())
                .expect("PUBACK from Mosquitto in time");
            match connection.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(error)) => panic!("publisher connection failed: {error}"),
                Err(_) => panic!("timed out waiting for a PUBACK from Mosquitto"),
            }
        }
        published.fetch_add(1, Ordering::SeqCst);
    }
    let _ = client.disconnect();
    let started = Instant::now();
    while started.elapsed() < DEADLINE {
        match connection.recv_timeout(DEADLINE) {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
}

fn expected(range: std::ops::Range<usize>) -> BTreeSet<String> {
    range.map(payload).collect()
}

#[test]
fn qos_1_messages_published_upstream_land_in_the_mapped_topic_with_mqtt_headers() {
    let mosquitto = Mosquitto::start();
    let broker = start_rill(&mosquitto, "5.0");
    wait_connected(&broker, true);
    let published = AtomicUsize::new(0);
    publish(mosquitto.port, "bridge-publisher", 0..100, &published);
    assert_eq!(wait_all_bridged(&broker, &expected(0..100)).len(), 0);

    // Keys and headers as the MQTT listener writes them.
    let runtime = compio::runtime::Runtime::new().expect("client runtime");
    let first = runtime.block_on(async {
        let client = NativeClient::connect(&broker.address(), ClientConfig::default())
            .await
            .expect("native connect");
        // The first record of dev0 is in its key's partition.
        let partitions = client
            .describe_topic(TOPIC)
            .await
            .expect("describe")
            .partitions
            .len();
        let partition = rill_protocol::partitioner::partition_for_key(b"dev0", partitions as u32);
        let fetched = client
            .fetch(TOPIC, partition, 0, 1 << 20, 1, 0)
            .await
            .expect("fetch");
        records_of(&fetched.batches)
            .expect("records")
            .into_iter()
            .find(|record| record.key.as_deref() == Some(&b"dev0"[..]))
            .expect("a record of dev0")
    });
    assert_eq!(first.key.as_deref(), Some(&b"dev0"[..]));
    let header = |name: &str| {
        first
            .headers
            .iter()
            .find(|(key, _)| key == name.as_bytes())
            .and_then(|(_, value)| value.clone())
    };
    assert_eq!(
        header("mqtt.topic").as_deref(),
        Some(&b"sensors/dev0/temperature"[..])
    );
    assert_eq!(header("mqtt.qos").as_deref(), Some(&b"1"[..]));
    assert_eq!(
        header("mqtt.client_id").as_deref(),
        Some(&b"rill-bridge"[..])
    );
    let metrics = bridge_metrics(&broker);
    assert_eq!(
        metrics.get("rill_mqtt_bridge_messages_appended_total"),
        Some(&100)
    );
    assert_eq!(metrics.get("rill_mqtt_bridge_connections_total"), Some(&1));
    assert!(
        mosquitto.log().contains("as rill-bridge (p5, c0"),
        "a 5.0 persistent session: {}",
        mosquitto.log()
    );
}

/// Publishes `0..TOTAL` from a thread, a message every millisecond; once
/// a sixth is in Rill (the bridge busy with the first half), stops or
/// kills Rill, and only then lets the publisher go past the first half,
/// so the second half waits in Mosquitto for the bridge's session.
/// Restarts Rill once the publisher is done. Returns duplicates.
fn rill_away_mid_stream(version: &str, crash: bool, extra: &[&str]) -> usize {
    const TOTAL: usize = 600;
    let mosquitto = Mosquitto::start();
    let mut broker = start_rill_with(&mosquitto, version, extra);
    wait_connected(&broker, true);
    let published = Arc::new(AtomicUsize::new(0));
    let (away, gate) = std::sync::mpsc::channel::<()>();
    let publisher = {
        let published = published.clone();
        let port = mosquitto.port;
        std::thread::spawn(move || {
            let pace = Some(Duration::from_millis(1));
            publish_paced(
                port,
                "bridge-publisher",
                0..TOTAL,
                &published,
                pace,
                |index| {
                    if index == TOTAL / 2 {
                        gate.recv_timeout(DEADLINE).expect("Rill went away in time");
                    }
                },
            );
        })
    };
    wait_until("a sixth of the messages in Rill", DEADLINE, || {
        bridged_values(&broker).len() >= TOTAL / 6
    });
    if crash {
        broker.kill();
    } else {
        assert!(broker.stop().success(), "a clean stop");
    }
    let at_stop = published.load(Ordering::SeqCst);
    away.send(()).expect("publisher waiting");
    publisher.join().expect("publisher thread");
    broker.restart();
    wait_connected(&broker, true);
    let duplicates = wait_all_bridged(&broker, &expected(0..TOTAL)).len();
    eprintln!(
        "bridge ({version}, {}): {} of {TOTAL} published while Rill was away, {duplicates} duplicates",
        if crash { "killed" } else { "stopped" },
        TOTAL - at_stop
    );
    duplicates
}

#[test]
fn messages_published_while_rill_is_stopped_arrive_once_after_its_restart() {
    assert_eq!(
        rill_away_mid_stream("5.0", false, &[]),
        0,
        "a clean stop acknowledges what it appended before it disconnects"
    );
}

#[test]
fn messages_published_while_rill_is_killed_arrive_at_least_once_after_its_restart() {
    // On the portable I/O driver: the bridge's sockets on the poll runtime.
    let duplicates = rill_away_mid_stream("3.1.1", true, &["node.io_driver=portable"]);
    // Only what was appended and not yet acknowledged when Rill died can
    // come twice: at most the in-flight window.
    assert!(duplicates <= INFLIGHT_MAX, "{duplicates} duplicates");
}

#[test]
fn the_bridge_reconnects_after_mosquitto_restarts_and_loses_nothing() {
    for version in ["3.1.1", "5.0"] {
        let mut mosquitto = Mosquitto::start();
        let broker = start_rill(&mosquitto, version);
        wait_connected(&broker, true);
        let published = AtomicUsize::new(0);
        publish(mosquitto.port, "bridge-publisher", 0..300, &published);
        // Stopped right away: the bridge is still taking messages, and
        // Mosquitto saves what it holds for the bridge's session.
        let before_stop = bridged_values(&broker).len();
        mosquitto.stop();
        wait_connected(&broker, false);
        mosquitto.spawn();
        wait_connected(&broker, true);
        publish(mosquitto.port, "bridge-publisher", 300..400, &published);
        let duplicates = wait_all_bridged(&broker, &expected(0..400));
        let metrics = bridge_metrics(&broker);
        eprintln!(
            "bridge ({version}) across a Mosquitto restart: {before_stop} of 300 in Rill when \
             Mosquitto stopped, {} duplicates, {metrics:?}",
            duplicates.len()
        );
        assert!(
            metrics
                .get("rill_mqtt_bridge_reconnects_total")
                .is_some_and(|reconnects| *reconnects >= 1)
        );
        assert_eq!(metrics.get("rill_mqtt_bridge_connections_total"), Some(&2));
        assert_eq!(
            mosquitto.log().matches("as rill-bridge").count(),
            2,
            "{}",
            mosquitto.log()
        );
        // At least once: what Mosquitto had sent before it stopped may
        // come again (it does not save acknowledgements it had not
        // processed, and 2.0 saves more than its in-flight window), but
        // nothing published after the restart comes twice.
        let late: Vec<&String> = duplicates
            .iter()
            .filter(|value| !expected(0..300).contains(*value))
            .collect();
        assert!(late.is_empty(), "duplicated after the restart: {late:?}");
    }
}

#[test]
fn the_bridge_logs_in_with_the_password_from_its_file_and_retries_a_refusal() {
    let mosquitto = Mosquitto::start_with(|directory| {
        let passwords = directory.join("passwords");
        let status = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg("-c")
            .arg(&passwords)
            .args(["rill", "s3cret"])
            .status()
            .unwrap_or_else(|error| {
                panic!("mosquitto_passwd (Debian package `mosquitto`) did not run: {error}")
            });
        assert!(status.success(), "mosquitto_passwd failed");
        format!("password_file {}\n", passwords.display())
    });
    let secrets = tempfile::tempdir().expect("temporary directory");
    let right = secrets.path().join("right");
    let wrong = secrets.path().join("wrong");
    std::fs::write(&right, "s3cret\n").expect("password file");
    std::fs::write(&wrong, "guess\n").expect("password file");

    for version in ["3.1.1", "5.0"] {
        let refused = start_rill_with(
            &mosquitto,
            version,
            &[
                "mqtt.bridge.username=rill",
                &format!("mqtt.bridge.password_file={}", wrong.display()),
            ],
        );
        wait_until("the refused bridge to retry", DEADLINE, || {
            bridge_metrics(&refused)
                .get("rill_mqtt_bridge_reconnects_total")
                .is_some_and(|reconnects| *reconnects >= 2)
        });
        let metrics = bridge_metrics(&refused);
        assert_eq!(metrics.get("rill_mqtt_bridge_connected"), Some(&0));
        assert_eq!(metrics.get("rill_mqtt_bridge_connections_total"), Some(&0));
        drop(refused);

        let accepted = start_rill_with(
            &mosquitto,
            version,
            &[
                "mqtt.bridge.username=rill",
                &format!("mqtt.bridge.password_file={}", right.display()),
            ],
        );
        wait_connected(&accepted, true);
    }
}
