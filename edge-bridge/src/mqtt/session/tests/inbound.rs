//! PUBLISH from the client: appends, acknowledgement order, QoS 2 exactly
//! once, Receive Maximum, packet identifiers in use, topic aliases,
//! refusals.

use super::*;
use crate::mqtt::reason;
use crate::mqtt::topic::TopicLimits;

fn token_of(actions: &[Action]) -> u64 {
    let appends = appends(actions);
    assert_eq!(appends.len(), 1, "{actions:?}");
    appends[0].token
}

#[test]
fn qos_0_is_appended_with_headers_and_not_acknowledged() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let actions = client.packet(publish(
        "sensors/dev7/temperature",
        QoS::AtMostOnce,
        0,
        b"21.5",
    ));
    let [Action::Append(append)] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert_eq!(append.topic, "sensor-temperature");
    assert_eq!(append.key.as_deref(), Some(&b"dev7"[..]));
    assert_eq!(append.value, Bytes::from_static(b"21.5"));
    assert!(!append.durable);
    assert_eq!(append.retain, None);
    let names: Vec<&str> = append
        .headers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        names,
        ["mqtt.topic", "mqtt.client_id", "mqtt.qos", "mqtt.retain"]
    );
    let token = append.token;
    assert!(
        client
            .connection
            .handle_append_result(token, Err(AppendError::QuotaExceeded), client.now_ms)
            .is_empty()
    );
    assert_eq!(client.connection.stats().append_failures, 1);
}

#[test]
fn qos_1_is_acknowledged_only_after_a_durable_append() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let actions = client.packet(publish("a/b", QoS::AtLeastOnce, 3, b"x"));
    let appended = appends(&actions);
    assert_eq!(kinds(&actions), ["Append"]);
    assert!(appended[0].durable);
    assert_eq!(appended[0].topic, "mqtt-other");
    assert_eq!(
        sent(&client.append_ok(appended[0].token)),
        [Packet::PubAck(ack(3))]
    );
}

#[test]
fn acknowledgements_go_out_in_the_order_publishes_came() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let first = token_of(&client.packet(publish("a", QoS::AtLeastOnce, 1, b"1")));
    let second = token_of(&client.packet(publish("a", QoS::ExactlyOnce, 2, b"2")));
    let third = token_of(&client.packet(publish("a", QoS::AtLeastOnce, 3, b"3")));
    // Appends to different partitions finish out of order.
    assert!(client.append_ok(third).is_empty());
    assert!(client.append_ok(second).is_empty());
    assert_eq!(
        sent(&client.append_ok(first)),
        [
            Packet::PubAck(ack(1)),
            Packet::PubRec(ack(2)),
            Packet::PubAck(ack(3))
        ]
    );
}

#[test]
fn qos_2_is_appended_exactly_once() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let token = token_of(&client.packet(publish("a", QoS::ExactlyOnce, 7, b"x")));
    // The client resends before PUBREC: nothing is appended again.
    let mut again = publish("a", QoS::ExactlyOnce, 7, b"x");
    if let Packet::Publish(publish) = &mut again {
        publish.dup = true;
    }
    assert!(client.packet(again.clone()).is_empty());
    assert_eq!(sent(&client.append_ok(token)), [Packet::PubRec(ack(7))]);
    // And after PUBREC: PUBREC again, still no append.
    let actions = client.packet(again);
    assert_eq!(sent(&actions), [Packet::PubRec(ack(7))]);
    assert!(appends(&actions).is_empty());
    assert_eq!(
        sent(&client.packet(Packet::PubRel(ack(7)))),
        [Packet::PubComp(ack(7))]
    );
    // Released: the identifier is free for a new message.
    assert_eq!(
        kinds(&client.packet(publish("a", QoS::ExactlyOnce, 7, b"y"))),
        ["Append"]
    );
    // A PUBREL for nothing: 5.0 says the identifier is not found.
    let actions = client.packet(Packet::PubRel(ack(99)));
    let [Action::Send(Packet::PubComp(response))] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert_eq!(response.reason_code, reason::PACKET_IDENTIFIER_NOT_FOUND);
}

#[test]
fn a_failed_append_is_reported_in_v5_and_closes_v311() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let token = token_of(&client.packet(publish("a", QoS::AtLeastOnce, 1, b"x")));
    let actions = client.connection.handle_append_result(
        token,
        Err(AppendError::QuotaExceeded),
        client.now_ms,
    );
    let [Action::Send(Packet::PubAck(response))] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert_eq!(response.reason_code, reason::QUOTA_EXCEEDED);

    let mut client = Client::connect(V311, SessionConfig::default());
    let token = token_of(&client.packet(publish("a", QoS::ExactlyOnce, 1, b"x")));
    let actions =
        client
            .connection
            .handle_append_result(token, Err(AppendError::Unavailable), client.now_ms);
    assert!(sent(&actions).is_empty());
    assert_eq!(kinds(&actions), ["EndSession", "Close"]);
}

#[test]
fn more_than_receive_maximum_in_flight_is_a_disconnect() {
    let config = SessionConfig {
        inflight_inbound_max: 2,
        ..SessionConfig::default()
    };
    let mut client = Client::connect(V5, config);
    let first = token_of(&client.packet(publish("a", QoS::AtLeastOnce, 1, b"1")));
    assert!(client.connection.wants_input());
    token_of(&client.packet(publish("a", QoS::ExactlyOnce, 2, b"2")));
    assert!(!client.connection.wants_input());
    // QoS 0 does not count.
    token_of(&client.packet(publish("a", QoS::AtMostOnce, 0, b"0")));
    // Once one is acknowledged there is room again.
    client.append_ok(first);
    assert!(client.connection.wants_input());
    token_of(&client.packet(publish("a", QoS::AtLeastOnce, 3, b"3")));
    let actions = client.packet(publish("a", QoS::AtLeastOnce, 4, b"4"));
    assert_eq!(kinds(&actions), ["DISCONNECT", "EndSession", "Close"]);
    assert_eq!(
        close_reason(&actions),
        Some(reason::RECEIVE_MAXIMUM_EXCEEDED)
    );
}

#[test]
fn a_qos_2_awaiting_release_holds_its_place_in_the_window() {
    let config = SessionConfig {
        inflight_inbound_max: 1,
        ..SessionConfig::default()
    };
    let mut client = Client::connect(V5, config);
    let token = token_of(&client.packet(publish("a", QoS::ExactlyOnce, 1, b"1")));
    client.append_ok(token);
    assert!(!client.connection.wants_input());
    client.packet(Packet::PubRel(ack(1)));
    assert!(client.connection.wants_input());
}

#[test]
fn a_packet_identifier_in_use_is_refused() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let token = token_of(&client.packet(publish("a", QoS::ExactlyOnce, 4, b"x")));
    client.append_ok(token);
    // QoS 1 with the identifier of a QoS 2 awaiting PUBREL.
    let actions = client.packet(publish("a", QoS::AtLeastOnce, 4, b"y"));
    let [Action::Send(Packet::PubAck(response))] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert_eq!(response.reason_code, reason::PACKET_IDENTIFIER_IN_USE);
    // 3.1.1 cannot say so: the connection closes.
    let mut client = Client::connect(V311, SessionConfig::default());
    token_of(&client.packet(publish("a", QoS::ExactlyOnce, 4, b"x")));
    let actions = client.packet(publish("a", QoS::AtLeastOnce, 4, b"y"));
    assert_eq!(close_reason(&actions), Some(reason::PROTOCOL_ERROR));
}

fn aliased(topic: &str, alias: u16) -> Packet {
    let mut packet = publish(topic, QoS::AtMostOnce, 0, b"x");
    if let Packet::Publish(publish) = &mut packet {
        publish.properties.topic_alias = Some(alias);
    }
    packet
}

#[test]
fn topic_aliases_resolve_within_the_maximum() {
    let config = SessionConfig {
        topic_aliases_max: 2,
        ..SessionConfig::default()
    };
    let mut client = Client::connect(V5, config);
    let set = appends(&client.packet(aliased("sensors/d1/temperature", 2)));
    assert_eq!(set[0].topic, "sensor-temperature");
    let used = appends(&client.packet(aliased("", 2)));
    assert_eq!(used[0].topic, "sensor-temperature");
    assert_eq!(used[0].key.as_deref(), Some(&b"d1"[..]));
    assert_eq!(used[0].headers[0].1, b"sensors/d1/temperature");
    // Reassigned to another topic.
    let moved = appends(&client.packet(aliased("x/y", 2)));
    assert_eq!(moved[0].topic, "mqtt-other");
    assert_eq!(
        appends(&client.packet(aliased("", 2)))[0].headers[0].1,
        b"x/y"
    );
    // An alias never set is a protocol error.
    let actions = client.packet(aliased("", 1));
    assert_eq!(close_reason(&actions), Some(reason::PROTOCOL_ERROR));
    // Over the maximum: Topic Alias invalid.
    let mut client = Client::connect(
        V5,
        SessionConfig {
            topic_aliases_max: 2,
            ..SessionConfig::default()
        },
    );
    let actions = client.packet(aliased("a", 3));
    assert_eq!(kinds(&actions), ["DISCONNECT", "EndSession", "Close"]);
    assert_eq!(close_reason(&actions), Some(reason::TOPIC_ALIAS_INVALID));
}

fn refusing() -> SessionConfig {
    SessionConfig {
        topic_limits: TopicLimits {
            topic_bytes_max: 64,
            topic_levels_max: 3,
        },
        ..SessionConfig::default()
    }
}

#[test]
fn refused_publishes_get_0x90_in_v5_and_a_plain_ack_in_v311() {
    let mut client = Client::connect(V5, refusing());
    // Over the level limit.
    let actions = client.packet(publish("a/b/c/d", QoS::AtLeastOnce, 1, b"x"));
    let [Action::Send(Packet::PubAck(response))] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert_eq!(response.reason_code, reason::TOPIC_NAME_INVALID);
    assert!(
        client
            .packet(publish("a/b/c/d", QoS::AtMostOnce, 0, b"x"))
            .is_empty()
    );
    assert_eq!(client.connection.stats().publishes_refused, 2);

    let mut client = Client::connect(V311, refusing());
    let actions = client.packet(publish("a/b/c/d", QoS::ExactlyOnce, 1, b"x"));
    assert_eq!(sent(&actions), [Packet::PubRec(ack(1))]);
    assert!(appends(&actions).is_empty());
}

#[test]
fn the_mapping_can_refuse_unmatched_topics() {
    let context = Arc::new(ServerContext {
        config: SessionConfig::default(),
        mapping: Mapping::new(
            vec![Rule {
                filter: "sensors/#".into(),
                topic: "sensors".into(),
                key: KeySource::Topic,
            }],
            Unmatched::Refuse,
        )
        .expect("valid"),
        authenticator: Box::new(AcceptAll),
    });
    let mut connection = Connection::new(context, 1, 0);
    connection.handle_packet(Packet::Connect(Box::new(connect_packet(V5, "c"))), 0);
    connection.handle_session_opened(None, 0);
    let actions = connection.handle_packet(publish("other", QoS::ExactlyOnce, 1, b"x"), 0);
    let [Action::Send(Packet::PubRec(response))] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert_eq!(response.reason_code, reason::TOPIC_NAME_INVALID);
    // A refusal waits behind an acknowledgement still pending.
    let pending =
        appends(&connection.handle_packet(publish("sensors/a", QoS::AtLeastOnce, 2, b"x"), 0));
    assert!(
        connection
            .handle_packet(publish("other", QoS::AtLeastOnce, 3, b"x"), 0)
            .is_empty()
    );
    let actions = connection.handle_append_result(pending[0].token, Ok(()), 0);
    assert_eq!(sent(&actions).len(), 2);
}

#[test]
fn a_retained_publish_asks_the_node_to_retain_it() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let mut packet = publish("status/dev7", QoS::AtLeastOnce, 1, b"online");
    if let Packet::Publish(publish) = &mut packet {
        publish.retain = true;
        publish.properties.message_expiry_interval_s = Some(60);
    }
    let appended = appends(&client.packet(packet));
    let retained = appended[0].retain.as_ref().expect("retained");
    assert_eq!(retained.topic, "status/dev7");
    assert!(retained.retain);
    assert_eq!(
        retained.properties.expires_at_ms,
        Some(client.now_ms + 60_000)
    );
}
