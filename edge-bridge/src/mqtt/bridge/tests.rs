//! The bridge driven by bytes, append results and ticks, with the actions
//! it gives checked rule by rule.

use bytes::Bytes;

use super::*;
use crate::mqtt::codec::encode;
use crate::mqtt::mapping::{KeySource, Rule, Unmatched};
use crate::mqtt::packet::Publish;

use ProtocolVersion::{V5, V311};

const FILTERS: [&str; 2] = ["sensors/#", "alarms/#"];

fn config(version: ProtocolVersion) -> BridgeConfig {
    BridgeConfig {
        address: "127.0.0.1:1883".into(),
        protocol_version: version,
        client_id: "rill-bridge".into(),
        username: Some("bridge".into()),
        password: Some(Bytes::from_static(b"s3cret")),
        filters: FILTERS.iter().map(|filter| filter.to_string()).collect(),
        keep_alive_s: 10,
        session_expiry_s: 3600,
        connect_timeout_ms: 5_000,
        inflight_max: 4,
        packet_bytes_max: 1 << 20,
        backoff_min_ms: 100,
        backoff_max_ms: 1_600,
    }
}

fn mapping(unmatched: Unmatched) -> Mapping {
    Mapping::new(
        vec![Rule {
            filter: "sensors/+/temperature".into(),
            topic: "sensor-temperature".into(),
            key: KeySource::Level(1),
        }],
        unmatched,
    )
    .expect("valid mapping")
}

fn bridge_with(config: BridgeConfig, unmatched: Unmatched) -> Bridge {
    Bridge::new(config, mapping(unmatched), 7)
}

fn new_bridge(version: ProtocolVersion) -> Bridge {
    bridge_with(config(version), Unmatched::Topic("mqtt".into()))
}

fn bytes(packet: Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&packet, version, &mut out).expect("encodable");
    out
}

fn feed(bridge: &mut Bridge, packet: Packet, now_ms: u64) -> Vec<Action> {
    let version = bridge.protocol_version();
    bridge.handle_bytes(&bytes(packet, version), now_ms)
}

fn connack(session_present: bool, reason_code: u8) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        reason_code,
        properties: Properties::default(),
    })
}

fn publish(packet_id: u16, qos: QoS, dup: bool, topic: &str, payload: &str) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: Properties::default(),
    })
}

fn sent(actions: &[Action]) -> Vec<Packet> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send(packet) => Some(packet.clone()),
            _ => None,
        })
        .collect()
}

fn appends(actions: &[Action]) -> Vec<Append> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Append(append) => Some(append.clone()),
            _ => None,
        })
        .collect()
}

fn puback(packet_id: u16) -> Packet {
    Packet::PubAck(PublishResponse::success(packet_id))
}

fn disconnected(actions: &[Action]) -> Option<(DisconnectReason, Option<u64>)> {
    actions.iter().find_map(|action| match action {
        Action::Notice(Notice::Disconnected {
            reason,
            reconnect_in_ms,
        }) => Some((reason.clone(), *reconnect_in_ms)),
        _ => None,
    })
}

fn reconnect_at(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|action| match action {
        Action::ScheduleReconnect { at_ms } => Some(*at_ms),
        _ => None,
    })
}

/// A bridge through CONNECT, CONNACK (with `session_present`) and SUBACK
/// at `now_ms`.
fn connected_at(bridge: &mut Bridge, session_present: bool, now_ms: u64) {
    let version = bridge.protocol_version();
    if matches!(bridge.phase, Phase::Idle) {
        bridge.start(now_ms);
    }
    assert_eq!(sent(&bridge.handle_connected(now_ms)).len(), 1);
    let actions = feed(bridge, connack(session_present, reason::SUCCESS), now_ms);
    let Some(Packet::Subscribe(subscribe)) = sent(&actions).pop() else {
        panic!("no SUBSCRIBE in {actions:?}");
    };
    let granted = vec![reason::GRANTED_QOS_1; subscribe.subscriptions.len()];
    let ack = Packet::SubAck(SubAck {
        packet_id: subscribe.packet_id,
        reason_codes: granted,
        properties: Properties::default(),
    });
    feed(bridge, ack, now_ms);
    assert!(bridge.is_connected(), "{version}");
}

fn connected(version: ProtocolVersion) -> Bridge {
    let mut bridge = new_bridge(version);
    connected_at(&mut bridge, false, 0);
    bridge
}

#[test]
fn start_connects_and_sends_a_persistent_connect() {
    for version in [V311, V5] {
        let mut bridge = new_bridge(version);
        assert_eq!(
            bridge.start(0),
            [Action::Connect {
                address: "127.0.0.1:1883".into()
            }]
        );
        assert!(bridge.start(0).is_empty(), "once");
        assert!(!bridge.wants_input(), "no socket yet");
        let actions = bridge.handle_connected(5);
        let packets = sent(&actions);
        let [Packet::Connect(connect)] = packets.as_slice() else {
            panic!("{actions:?}");
        };
        assert!(!connect.clean_start, "a persistent session");
        assert_eq!(connect.client_id, "rill-bridge");
        assert_eq!(connect.keep_alive_s, 10);
        assert_eq!(connect.username.as_deref(), Some("bridge"));
        assert_eq!(connect.password.as_deref(), Some(&b"s3cret"[..]));
        assert_eq!(connect.protocol_version, version);
        let properties = &connect.properties;
        match version {
            V311 => assert!(properties.is_empty()),
            V5 => {
                assert_eq!(properties.session_expiry_interval_s, Some(3600));
                assert_eq!(properties.receive_maximum, Some(4));
                assert_eq!(properties.maximum_packet_bytes, Some(1 << 20));
                assert_eq!(properties.topic_alias_maximum, None);
            }
        }
        // What the node writes encodes at the version.
        bytes(Packet::Connect(connect.clone()), version);
        assert!(bridge.wants_input());
    }
}

#[test]
fn an_accepted_connack_subscribes_every_filter_at_qos_1() {
    for version in [V311, V5] {
        let mut bridge = new_bridge(version);
        bridge.start(0);
        bridge.handle_connected(0);
        let actions = feed(&mut bridge, connack(true, reason::SUCCESS), 10);
        assert_eq!(
            actions[0],
            Action::Notice(Notice::Connected {
                session_present: true
            })
        );
        let packets = sent(&actions);
        let [Packet::Subscribe(subscribe)] = packets.as_slice() else {
            panic!("{actions:?}");
        };
        let filters: Vec<&str> = subscribe
            .subscriptions
            .iter()
            .map(|subscription| subscription.filter.as_str())
            .collect();
        assert_eq!(filters, FILTERS);
        for subscription in &subscribe.subscriptions {
            assert_eq!(subscription.options.qos, QoS::AtLeastOnce);
            if version == V5 {
                assert_eq!(
                    subscription.options.retain_handling,
                    RetainHandling::SendAtSubscribeIfNew,
                    "no retained messages again for a subscription the session has"
                );
                assert!(subscription.options.retain_as_published);
            }
        }
        bytes(Packet::Subscribe(subscribe.clone()), version);
        assert!(bridge.is_connected());
        assert_eq!(bridge.stats().connections, 1);
    }
}

#[test]
fn refused_filters_are_reported_and_the_others_stay() {
    let mut bridge = new_bridge(V5);
    bridge.start(0);
    bridge.handle_connected(0);
    let actions = feed(&mut bridge, connack(false, reason::SUCCESS), 0);
    let Some(Packet::Subscribe(subscribe)) = sent(&actions).pop() else {
        panic!("{actions:?}");
    };
    let ack = |packet_id, reason_codes| {
        Packet::SubAck(SubAck {
            packet_id,
            reason_codes,
            properties: Properties::default(),
        })
    };
    let actions = feed(
        &mut bridge,
        ack(
            subscribe.packet_id,
            vec![reason::GRANTED_QOS_0, reason::NOT_AUTHORIZED],
        ),
        1,
    );
    assert_eq!(
        actions,
        [
            Action::Notice(Notice::Subscribed {
                filter: "sensors/#".into(),
                granted: QoS::AtMostOnce
            }),
            Action::Notice(Notice::FilterRefused {
                filter: "alarms/#".into(),
                reason_code: reason::NOT_AUTHORIZED
            }),
        ]
    );
    assert_eq!(bridge.stats().filters_refused, 1);
    assert!(bridge.is_connected(), "the granted filter still flows");

    // A SUBACK nobody asked for is a protocol error.
    let actions = feed(&mut bridge, ack(999, vec![0, 0]), 2);
    assert!(matches!(
        disconnected(&actions),
        Some((DisconnectReason::ProtocolError(_), Some(_)))
    ));
}

#[test]
fn a_refused_connack_closes_and_retries_later() {
    for version in [V311, V5] {
        let mut bridge = new_bridge(version);
        bridge.start(0);
        bridge.handle_connected(0);
        let actions = feed(&mut bridge, connack(false, reason::NOT_AUTHORIZED), 3);
        assert_eq!(actions[0], Action::Close);
        let (reason, delay) = disconnected(&actions).expect("reported");
        assert_eq!(
            reason,
            DisconnectReason::Refused {
                reason_code: reason::NOT_AUTHORIZED,
                reason_string: None
            }
        );
        assert!(reason.to_string().contains("not authorized"), "{reason}");
        assert_eq!(delay, Some(100), "the first retry waits the minimum");
        assert_eq!(reconnect_at(&actions), Some(103));
        assert!(!bridge.is_connected());
        assert!(!bridge.wants_input());
    }
}

#[test]
fn a_qos_1_publish_is_acknowledged_only_after_its_append() {
    for version in [V311, V5] {
        let mut bridge = connected(version);
        let actions = feed(
            &mut bridge,
            publish(
                7,
                QoS::AtLeastOnce,
                false,
                "sensors/dev7/temperature",
                "21.5",
            ),
            100,
        );
        assert!(sent(&actions).is_empty(), "no PUBACK before the append");
        let [append] = appends(&actions).try_into().expect("one append");
        assert_eq!(append.topic, "sensor-temperature");
        assert_eq!(append.key.as_deref(), Some(&b"dev7"[..]));
        assert_eq!(append.value.as_ref(), b"21.5");
        assert!(append.durable);
        let header = |name: &str| {
            append
                .headers
                .iter()
                .find(|(header, _)| header == name)
                .map(|(_, value)| value.clone())
        };
        assert_eq!(
            header("mqtt.topic").as_deref(),
            Some(&b"sensors/dev7/temperature"[..])
        );
        assert_eq!(
            header("mqtt.client_id").as_deref(),
            Some(&b"rill-bridge"[..])
        );
        assert_eq!(header("mqtt.qos").as_deref(), Some(&b"1"[..]));

        let actions = bridge.handle_append_result(append.token, Ok(()), 101);
        assert_eq!(sent(&actions), [puback(7)]);
        assert_eq!(bridge.stats().messages_appended, 1);
        // A late or unknown result changes nothing.
        assert!(
            bridge
                .handle_append_result(append.token, Ok(()), 102)
                .is_empty()
        );
    }
}

#[test]
fn acknowledgements_leave_in_the_order_the_publishes_came() {
    let mut bridge = connected(V311);
    let first = appends(&feed(
        &mut bridge,
        publish(1, QoS::AtLeastOnce, false, "sensors/a/temperature", "1"),
        0,
    ));
    let second = appends(&feed(
        &mut bridge,
        publish(2, QoS::AtLeastOnce, false, "alarms/b", "2"),
        0,
    ));
    assert_eq!(second[0].topic, "mqtt", "unmatched goes to the catch-all");
    assert!(sent(&bridge.handle_append_result(second[0].token, Ok(()), 1)).is_empty());
    let actions = bridge.handle_append_result(first[0].token, Ok(()), 2);
    assert_eq!(sent(&actions), [puback(1), puback(2)]);
}

#[test]
fn a_failed_append_closes_without_acknowledging() {
    let mut bridge = connected(V5);
    let append = appends(&feed(
        &mut bridge,
        publish(3, QoS::AtLeastOnce, false, "alarms/x", "x"),
        0,
    ));
    let actions = bridge.handle_append_result(append[0].token, Err(AppendError::QuotaExceeded), 10);
    assert!(
        sent(&actions).is_empty(),
        "no PUBACK for what is not stored"
    );
    assert_eq!(actions[0], Action::Close);
    assert_eq!(
        disconnected(&actions).map(|(reason, _)| reason),
        Some(DisconnectReason::AppendFailed(AppendError::QuotaExceeded))
    );
    assert_eq!(bridge.stats().append_failures, 1);
}

#[test]
fn qos_0_is_appended_without_durability_or_acknowledgement() {
    let mut bridge = connected(V311);
    let actions = feed(
        &mut bridge,
        publish(0, QoS::AtMostOnce, false, "alarms/x", "x"),
        0,
    );
    let [append] = appends(&actions).try_into().expect("one append");
    assert!(!append.durable);
    assert!(
        bridge
            .handle_append_result(append.token, Ok(()), 1)
            .is_empty()
    );
    // A failed QoS 0 append is counted; the connection goes on.
    let append = appends(&feed(
        &mut bridge,
        publish(0, QoS::AtMostOnce, false, "alarms/y", "y"),
        2,
    ));
    assert!(
        bridge
            .handle_append_result(append[0].token, Err(AppendError::Unavailable), 3)
            .is_empty()
    );
    assert_eq!(bridge.stats().append_failures, 1);
    assert!(bridge.is_connected());
}

#[test]
fn qos_2_is_appended_once_pubrec_after_the_append_and_pubcomp_on_pubrel() {
    for version in [V311, V5] {
        let mut bridge = connected(version);
        let message = || publish(9, QoS::ExactlyOnce, false, "alarms/fire", "hot");
        let append = appends(&feed(&mut bridge, message(), 0));
        assert_eq!(append.len(), 1);
        let actions = bridge.handle_append_result(append[0].token, Ok(()), 1);
        assert_eq!(
            sent(&actions),
            [Packet::PubRec(PublishResponse::success(9))]
        );
        // Sent again before PUBREL (after a reconnect, say): PUBREC
        // again, no second append.
        let again = publish(9, QoS::ExactlyOnce, true, "alarms/fire", "hot");
        let actions = feed(&mut bridge, again, 2);
        assert!(appends(&actions).is_empty());
        assert_eq!(
            sent(&actions),
            [Packet::PubRec(PublishResponse::success(9))]
        );
        let release = Packet::PubRel(PublishResponse::success(9));
        let actions = feed(&mut bridge, release.clone(), 3);
        assert_eq!(
            sent(&actions),
            [Packet::PubComp(PublishResponse::success(9))]
        );
        // A PUBREL for an identifier not awaiting one.
        let actions = feed(&mut bridge, release, 4);
        let expected_code = match version {
            V311 => reason::SUCCESS,
            V5 => reason::PACKET_IDENTIFIER_NOT_FOUND,
        };
        let packets = sent(&actions);
        let [Packet::PubComp(complete)] = packets.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(complete.reason_code, expected_code);
        // After PUBCOMP the identifier is free: a new message.
        assert_eq!(appends(&feed(&mut bridge, message(), 5)).len(), 1);
    }
}

#[test]
fn a_dup_of_a_message_in_flight_is_not_appended_twice() {
    let mut bridge = connected(V311);
    let first = appends(&feed(
        &mut bridge,
        publish(4, QoS::AtLeastOnce, false, "alarms/a", "a"),
        0,
    ));
    let again = feed(
        &mut bridge,
        publish(4, QoS::AtLeastOnce, true, "alarms/a", "a"),
        1,
    );
    assert!(again.is_empty());
    assert_eq!(bridge.stats().duplicates_skipped, 1);
    assert_eq!(
        sent(&bridge.handle_append_result(first[0].token, Ok(()), 2)),
        [puback(4)],
        "one PUBACK for both copies"
    );
    // Without DUP, an identifier in use is a broken broker.
    let _ = feed(
        &mut bridge,
        publish(5, QoS::AtLeastOnce, false, "alarms/a", "a"),
        3,
    );
    let actions = feed(
        &mut bridge,
        publish(5, QoS::AtLeastOnce, false, "alarms/b", "b"),
        4,
    );
    assert!(matches!(
        disconnected(&actions),
        Some((DisconnectReason::ProtocolError(_), _))
    ));
}

/// A message appended whose PUBACK never left: its connection is lost
/// while an earlier message's append holds the PUBACK back, or (with
/// `orphan`) before its own append finishes.
fn appended_then_lost(bridge: &mut Bridge, packet_id: u16, payload: &str, orphan: bool) {
    let _blocker = appends(&feed(
        bridge,
        publish(packet_id + 100, QoS::AtLeastOnce, false, "alarms/z", "z"),
        0,
    ));
    let append = appends(&feed(
        bridge,
        publish(packet_id, QoS::AtLeastOnce, false, "alarms/a", payload),
        0,
    ));
    if !orphan {
        let actions = bridge.handle_append_result(append[0].token, Ok(()), 1);
        assert!(sent(&actions).is_empty(), "held back by the first");
    }
    let actions = bridge.handle_connection_lost("reset by peer", 2);
    assert_eq!(actions[0], Action::Close);
    if orphan {
        assert!(
            bridge
                .handle_append_result(append[0].token, Ok(()), 3)
                .is_empty()
        );
    }
}

#[test]
fn a_redelivery_of_an_appended_message_is_acknowledged_without_a_second_append() {
    for orphan in [false, true] {
        let mut bridge = connected(V5);
        appended_then_lost(&mut bridge, 11, "once", orphan);
        let actions = bridge.handle_tick(10_000);
        assert!(matches!(actions.as_slice(), [Action::Connect { .. }]));
        connected_at(&mut bridge, true, 10_000);
        // The upstream broker sends both again, in their order.
        let blocker = appends(&feed(
            &mut bridge,
            publish(111, QoS::AtLeastOnce, true, "alarms/z", "z"),
            10_001,
        ));
        assert_eq!(blocker.len(), 1, "never appended: appended now");
        let actions = feed(
            &mut bridge,
            publish(11, QoS::AtLeastOnce, true, "alarms/a", "once"),
            10_001,
        );
        assert!(appends(&actions).is_empty(), "already in the log");
        assert!(sent(&actions).is_empty(), "behind the first");
        let actions = bridge.handle_append_result(blocker[0].token, Ok(()), 10_002);
        assert_eq!(sent(&actions), [puback(111), puback(11)]);
        assert_eq!(bridge.stats().duplicates_skipped, 1);
        // The same identifier later is a new message.
        let actions = feed(
            &mut bridge,
            publish(11, QoS::AtLeastOnce, true, "alarms/a", "once"),
            10_003,
        );
        assert_eq!(appends(&actions).len(), 1);
    }
}

#[test]
fn a_redelivery_is_appended_again_when_anything_differs() {
    // Other contents under the identifier: a new message.
    let mut bridge = connected(V5);
    appended_then_lost(&mut bridge, 12, "first", false);
    bridge.handle_tick(10_000);
    connected_at(&mut bridge, true, 10_000);
    let actions = feed(
        &mut bridge,
        publish(12, QoS::AtLeastOnce, true, "alarms/a", "other"),
        10_001,
    );
    assert_eq!(appends(&actions).len(), 1);

    // Without DUP: not a redelivery.
    let mut bridge = connected(V311);
    appended_then_lost(&mut bridge, 13, "same", true);
    bridge.handle_tick(10_000);
    connected_at(&mut bridge, true, 10_000);
    let actions = feed(
        &mut bridge,
        publish(13, QoS::AtLeastOnce, false, "alarms/a", "same"),
        10_001,
    );
    assert_eq!(appends(&actions).len(), 1);

    // The upstream session is gone: whatever comes is new.
    let mut bridge = connected(V311);
    appended_then_lost(&mut bridge, 14, "same", false);
    bridge.handle_tick(10_000);
    connected_at(&mut bridge, false, 10_000);
    let actions = feed(
        &mut bridge,
        publish(14, QoS::AtLeastOnce, true, "alarms/a", "same"),
        10_001,
    );
    assert_eq!(appends(&actions).len(), 1);
}

#[test]
fn input_stops_at_the_inflight_limit_and_buffered_packets_resume() {
    let mut bridge = connected(V311);
    let mut stream = Vec::new();
    for packet_id in 1..=6 {
        stream.extend(bytes(
            publish(packet_id, QoS::AtLeastOnce, false, "alarms/a", "m"),
            V311,
        ));
    }
    // Whole and partial packets in one read.
    let actions = bridge.handle_bytes(&stream[..stream.len() - 3], 0);
    let first = appends(&actions);
    assert_eq!(first.len(), 4, "inflight_max");
    assert!(!bridge.wants_input());
    let actions = bridge.handle_append_result(first[0].token, Ok(()), 1);
    assert_eq!(sent(&actions), [puback(1)]);
    let fifth = appends(&actions);
    assert_eq!(fifth.len(), 1, "the buffered fifth");
    assert!(!bridge.wants_input());
    let actions = bridge.handle_append_result(first[1].token, Ok(()), 2);
    assert_eq!(sent(&actions), [puback(2)]);
    assert!(appends(&actions).is_empty(), "the sixth is not whole yet");
    assert!(bridge.wants_input());
    let actions = bridge.handle_bytes(&stream[stream.len() - 3..], 3);
    assert_eq!(appends(&actions).len(), 1);
}

#[test]
fn keep_alive_pings_when_idle_and_a_missing_pingresp_ends_the_connection() {
    let mut bridge = connected(V311);
    assert!(bridge.handle_tick(9_999).is_empty());
    assert_eq!(sent(&bridge.handle_tick(10_000)), [Packet::PingReq]);
    assert!(
        bridge.handle_tick(15_000).is_empty(),
        "one PINGREQ at a time"
    );
    feed(&mut bridge, Packet::PingResp, 15_001);
    assert!(bridge.handle_tick(19_999).is_empty());
    assert_eq!(sent(&bridge.handle_tick(20_000)), [Packet::PingReq]);
    let actions = bridge.handle_tick(30_000);
    assert_eq!(actions[0], Action::Close);
    assert_eq!(
        disconnected(&actions).map(|(reason, _)| reason),
        Some(DisconnectReason::KeepAliveTimeout)
    );

    // Acknowledgements count as traffic: no PINGREQ while they flow.
    let mut bridge = connected(V311);
    let append = appends(&feed(
        &mut bridge,
        publish(1, QoS::AtLeastOnce, false, "alarms/a", "a"),
        9_000,
    ));
    bridge.handle_append_result(append[0].token, Ok(()), 9_000);
    assert!(bridge.handle_tick(10_000).is_empty());

    // A 5.0 Server Keep Alive replaces the configured one.
    let mut bridge = new_bridge(V5);
    bridge.start(0);
    bridge.handle_connected(0);
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        reason_code: reason::SUCCESS,
        properties: Properties {
            server_keep_alive_s: Some(2),
            ..Properties::default()
        },
    });
    feed(&mut bridge, ack, 0);
    assert_eq!(sent(&bridge.handle_tick(2_000)), [Packet::PingReq]);
}

#[test]
fn no_connack_in_time_or_no_socket_means_a_retry() {
    let mut bridge = new_bridge(V5);
    bridge.start(0);
    let actions = bridge.handle_connect_failed("connection refused", 10);
    assert!(!actions.contains(&Action::Close), "there is no socket");
    let (reason, _) = disconnected(&actions).expect("reported");
    assert!(reason.to_string().contains("connection refused"));
    assert_eq!(reconnect_at(&actions), Some(110));
    assert!(bridge.handle_tick(109).is_empty());
    assert_eq!(
        bridge.handle_tick(110),
        [Action::Connect {
            address: "127.0.0.1:1883".into()
        }]
    );
    assert_eq!(bridge.stats().reconnects, 1);
    bridge.handle_connected(120);
    assert!(bridge.handle_tick(5_119).is_empty());
    let actions = bridge.handle_tick(5_120);
    assert_eq!(actions[0], Action::Close);
    assert_eq!(
        disconnected(&actions).map(|(reason, _)| reason),
        Some(DisconnectReason::ConnectTimeout)
    );

    // A PUBLISH before CONNACK is a protocol error.
    let mut bridge = new_bridge(V311);
    bridge.start(0);
    bridge.handle_connected(0);
    let actions = feed(
        &mut bridge,
        publish(1, QoS::AtLeastOnce, false, "alarms/a", "a"),
        1,
    );
    assert!(appends(&actions).is_empty());
    assert!(matches!(
        disconnected(&actions),
        Some((DisconnectReason::ProtocolError(_), _))
    ));
}

#[test]
fn backoff_grows_with_jitter_inside_its_bounds_up_to_the_maximum() {
    for seed in 0..200 {
        let mut backoff = Backoff::new(100, 1_600, seed);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = backoff.ceiling_ms();
            let delay = backoff.next_delay_ms();
            assert!(
                delay >= (ceiling / 2).max(100) && delay <= ceiling,
                "seed {seed}: {delay} outside [{}, {ceiling}]",
                (ceiling / 2).max(100)
            );
            ceilings.push(ceiling);
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1_600, 1_600, 1_600, 1_600]);
        backoff.reset();
        assert_eq!(
            backoff.next_delay_ms(),
            100,
            "the first retry waits the minimum"
        );
    }
    // The jitter spreads: many seeds, many delays.
    let delays: BTreeSet<u64> = (0..200)
        .map(|seed| {
            let mut backoff = Backoff::new(100, 1_600, seed);
            for _ in 0..3 {
                backoff.next_delay_ms();
            }
            backoff.next_delay_ms()
        })
        .collect();
    assert!(delays.len() > 50, "{} distinct delays", delays.len());
    assert!(delays.iter().all(|delay| (400..=800).contains(delay)));
    // Huge failure counts neither overflow nor pass the maximum.
    let mut backoff = Backoff::new(1 << 40, u64::MAX - 1, 1);
    for _ in 0..100 {
        assert!(backoff.next_delay_ms() >= 1 << 40);
    }
    assert_eq!(backoff.ceiling_ms(), u64::MAX - 1);
}

#[test]
fn failures_in_a_row_wait_longer_and_a_good_connection_resets_the_backoff() {
    let mut bridge = new_bridge(V311);
    bridge.start(0);
    let mut now = 0;
    let mut delays = Vec::new();
    for _ in 0..6 {
        let actions = bridge.handle_connect_failed("refused", now);
        let (_, delay) = disconnected(&actions).expect("reported");
        let delay = delay.expect("a retry");
        delays.push(delay);
        now = reconnect_at(&actions).expect("scheduled");
        assert_eq!(bridge.handle_tick(now).len(), 1);
    }
    assert_eq!(delays[0], 100);
    for (index, delay) in delays.iter().enumerate() {
        let ceiling = (100u64 << index).min(1_600);
        assert!(
            *delay >= (ceiling / 2).max(100) && *delay <= ceiling,
            "{delays:?}"
        );
    }

    // A connection that drops right after CONNACK does not reset it.
    connected_at(&mut bridge, false, now);
    let actions = bridge.handle_connection_lost("reset", now + 10);
    let (_, delay) = disconnected(&actions).expect("reported");
    assert!(
        delay.expect("a retry") >= 800,
        "still backing off: {delay:?}"
    );
    now = reconnect_at(&actions).expect("scheduled");
    bridge.handle_tick(now);

    // One that lived the backoff maximum does.
    connected_at(&mut bridge, true, now);
    let actions = bridge.handle_connection_lost("reset", now + 1_600);
    assert_eq!(
        disconnected(&actions).and_then(|(_, delay)| delay),
        Some(100)
    );
}

#[test]
fn the_upstream_broker_disconnecting_or_sending_garbage_means_a_retry() {
    let mut bridge = connected(V5);
    let disconnect = Packet::Disconnect(Disconnect {
        reason_code: reason::SESSION_TAKEN_OVER,
        properties: Properties {
            reason_string: Some("another client".into()),
            ..Properties::default()
        },
    });
    let actions = feed(&mut bridge, disconnect, 5);
    assert_eq!(actions[0], Action::Close);
    let (reason, _) = disconnected(&actions).expect("reported");
    let text = reason.to_string();
    assert!(
        text.contains("0x8e") && text.contains("another client uses this client id"),
        "{text}"
    );

    let mut bridge = connected(V311);
    let actions = bridge.handle_bytes(&[0x00, 0x00], 5);
    assert!(matches!(
        disconnected(&actions),
        Some((DisconnectReason::Malformed(_), Some(_)))
    ));
    assert!(bridge.handle_bytes(&[0x30], 6).is_empty(), "stale bytes");
}

#[test]
fn unmatched_messages_under_refuse_are_acknowledged_and_dropped() {
    let mut bridge = bridge_with(config(V5), Unmatched::Refuse);
    connected_at(&mut bridge, false, 0);
    let actions = feed(
        &mut bridge,
        publish(3, QoS::AtLeastOnce, false, "alarms/a", "a"),
        1,
    );
    assert!(appends(&actions).is_empty());
    assert_eq!(sent(&actions), [puback(3)]);
    assert_eq!(bridge.stats().messages_unmatched, 1);
}

#[test]
fn a_topic_alias_is_refused_since_none_was_allowed() {
    let mut bridge = connected(V5);
    let aliased = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "alarms/a".into(),
        packet_id: 1,
        payload: Bytes::from_static(b"a"),
        properties: Properties {
            topic_alias: Some(1),
            ..Properties::default()
        },
    });
    let actions = feed(&mut bridge, aliased, 1);
    assert!(appends(&actions).is_empty());
    assert!(matches!(
        disconnected(&actions),
        Some((DisconnectReason::ProtocolError(_), _))
    ));
}

#[test]
fn shutdown_waits_for_acknowledgements_then_disconnects() {
    let mut bridge = connected(V5);
    let append = appends(&feed(
        &mut bridge,
        publish(8, QoS::AtLeastOnce, false, "alarms/a", "a"),
        0,
    ));
    assert!(
        bridge.handle_shutdown(1).is_empty(),
        "an append is in flight"
    );
    assert!(!bridge.wants_input());
    assert!(!bridge.is_stopped());
    let actions = bridge.handle_append_result(append[0].token, Ok(()), 2);
    assert_eq!(
        sent(&actions),
        [
            puback(8),
            Packet::Disconnect(Disconnect {
                reason_code: reason::NORMAL_DISCONNECTION,
                properties: Properties::default()
            })
        ]
    );
    assert!(actions.contains(&Action::Close));
    assert_eq!(
        disconnected(&actions),
        Some((DisconnectReason::ShuttingDown, None))
    );
    assert!(bridge.is_stopped());
    assert!(bridge.handle_tick(100_000).is_empty(), "no reconnect");

    // An append that never finishes: closed at the drain deadline.
    let mut bridge = connected(V311);
    feed(
        &mut bridge,
        publish(8, QoS::AtLeastOnce, false, "alarms/a", "a"),
        0,
    );
    bridge.handle_shutdown(10);
    assert!(bridge.handle_tick(10 + SHUTDOWN_DRAIN_MS - 1).is_empty());
    let actions = bridge.handle_tick(10 + SHUTDOWN_DRAIN_MS);
    assert_eq!(actions[0], Action::Close);
    assert!(sent(&actions).is_empty(), "no PUBACK, no DISCONNECT");
    assert!(bridge.is_stopped());

    // Waiting for a reconnect: stops at once.
    let mut bridge = new_bridge(V311);
    bridge.start(0);
    bridge.handle_connect_failed("refused", 0);
    assert!(bridge.handle_shutdown(1).is_empty());
    assert!(bridge.is_stopped());
}

#[test]
fn bytes_split_anywhere_decode_the_same() {
    let mut bridge = connected(V311);
    let stream = bytes(
        publish(
            21,
            QoS::AtLeastOnce,
            false,
            "sensors/d/temperature",
            "split",
        ),
        V311,
    );
    let mut actions = Vec::new();
    for byte in &stream {
        actions.extend(bridge.handle_bytes(std::slice::from_ref(byte), 1));
    }
    let append = appends(&actions);
    assert_eq!(append.len(), 1);
    assert_eq!(append[0].value.as_ref(), b"split");
}

proptest::proptest! {
    /// Whatever the upstream broker sends, in whatever pieces, before or
    /// after CONNACK, the bridge neither panics nor buffers more than a
    /// packet and a read, and appends only on an accepted connection.
    #[test]
    fn any_bytes_from_upstream_are_handled(
        chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            0..32,
        ),
        v5 in proptest::bool::ANY,
        accepted in proptest::bool::ANY,
    ) {
        let version = if v5 { V5 } else { V311 };
        let mut bridge = new_bridge(version);
        if accepted {
            connected_at(&mut bridge, false, 0);
        } else {
            bridge.start(0);
            bridge.handle_connected(0);
        }
        let mut now = 0;
        for chunk in chunks {
            now += 10;
            let connected_before = bridge.is_connected();
            let actions = bridge.handle_bytes(&chunk, now);
            let appended = actions
                .iter()
                .any(|action| matches!(action, Action::Append(_)));
            proptest::prop_assert!(!appended || connected_before || bridge.stats().connections > 0);
            proptest::prop_assert!(bridge.buffer.len() <= (1 << 20) + 64);
            for action in appends(&actions) {
                bridge.handle_append_result(action.token, Ok(()), now);
            }
            for action in bridge.handle_tick(now) {
                if let Action::Connect { .. } = action {
                    bridge.handle_connected(now);
                }
            }
        }
    }
}
