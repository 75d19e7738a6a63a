//! Messages to the client: QoS downgrade, the in-flight window, QoS 2
//! handshake, topic aliases, Maximum Packet Size, the queue policy, log
//! cursors, retain flags and subscription identifiers.

use super::*;

fn publishes(actions: &[Action]) -> Vec<Publish> {
    sent(actions)
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::Publish(publish) => Some(publish),
            _ => None,
        })
        .collect()
}

fn client_with(receive_maximum: Option<u16>, config: SessionConfig) -> Client {
    let mut connect = connect_packet(V5, "dev7");
    connect.properties.receive_maximum = receive_maximum;
    Client::connect_with(config, connect, None)
}

#[test]
fn qos_is_the_lower_of_published_and_subscribed() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let (outcome, actions) = client.deliver(delivery("a", QoS::AtLeastOnce, None));
    assert_eq!(outcome, DeliveryOutcome::Taken);
    let sent = publishes(&actions);
    assert_eq!((sent[0].qos, sent[0].packet_id), (QoS::AtLeastOnce, 1));
    let mut low = delivery("a", QoS::ExactlyOnce, None);
    low.message.qos = QoS::AtMostOnce;
    let sent = publishes(&client.deliver(low).1);
    assert_eq!((sent[0].qos, sent[0].packet_id), (QoS::AtMostOnce, 0));
    assert_eq!(client.connection.stats().messages_sent, 2);
}

#[test]
fn the_clients_receive_maximum_bounds_messages_in_flight() {
    // Two go out; the third waits for an acknowledgement.
    let mut client = client_with(Some(2), SessionConfig::default());
    let sent: Vec<u16> = (0..3)
        .flat_map(|_| publishes(&client.deliver(delivery("a", QoS::AtLeastOnce, None)).1))
        .map(|publish| publish.packet_id)
        .collect();
    assert_eq!(sent, [1, 2]);
    // An acknowledgement for something not in flight frees nothing.
    assert!(client.packet(Packet::PubAck(ack(9))).is_empty());
    let released = publishes(&client.packet(Packet::PubAck(ack(1))));
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].packet_id, 3);
}

#[test]
fn qos_0_is_not_held_back_by_the_window_but_keeps_queue_order() {
    let mut client = client_with(Some(1), SessionConfig::default());
    client.deliver(delivery("a", QoS::AtLeastOnce, None));
    client.deliver(delivery("a", QoS::AtLeastOnce, None));
    let mut qos0 = delivery("a", QoS::AtMostOnce, None);
    qos0.message.payload = Bytes::from_static(b"zero");
    // Queued behind the second QoS 1 message: order is kept.
    assert!(publishes(&client.deliver(qos0).1).is_empty());
    let released = publishes(&client.packet(Packet::PubAck(ack(1))));
    assert_eq!(released.len(), 2);
    assert_eq!(released[1].payload, Bytes::from_static(b"zero"));
}

#[test]
fn qos_2_outbound_handshake() {
    let mut client = client_with(Some(1), SessionConfig::default());
    client.deliver(delivery("a", QoS::ExactlyOnce, None));
    client.deliver(delivery("a", QoS::ExactlyOnce, None));
    assert_eq!(
        sent(&client.packet(Packet::PubRec(ack(1)))),
        [Packet::PubRel(ack(1))]
    );
    // A repeated PUBREC gets PUBREL again; the window stays full.
    assert_eq!(
        sent(&client.packet(Packet::PubRec(ack(1)))),
        [Packet::PubRel(ack(1))]
    );
    let next = publishes(&client.packet(Packet::PubComp(ack(1))));
    assert_eq!(next[0].packet_id, 2);
    // A PUBREC refusing the message ends its flow.
    let refused = PublishResponse {
        packet_id: 2,
        reason_code: crate::mqtt::reason::QUOTA_EXCEEDED,
        properties: Properties::default(),
    };
    assert!(client.packet(Packet::PubRec(refused)).is_empty());
    assert!(client.connection.snapshot(0).outbound.is_empty());
}

#[test]
fn topic_aliases_are_set_up_to_the_clients_maximum() {
    let mut connect = connect_packet(V5, "dev7");
    connect.properties.topic_alias_maximum = Some(1);
    let mut client = Client::connect_with(SessionConfig::default(), connect, None);
    let mut send = |topic: &str| {
        let mut offer = delivery(topic, QoS::AtMostOnce, None);
        offer.message.topic = topic.into();
        publishes(&client.deliver(offer).1).remove(0)
    };
    let first = send("sensors/a");
    assert_eq!(
        (first.topic.as_str(), first.properties.topic_alias),
        ("sensors/a", Some(1))
    );
    let second = send("sensors/a");
    assert_eq!(
        (second.topic.as_str(), second.properties.topic_alias),
        ("", Some(1))
    );
    let other = send("sensors/b");
    assert_eq!(
        (other.topic.as_str(), other.properties.topic_alias),
        ("sensors/b", None)
    );
    // Without a maximum from the client, no aliases.
    let mut plain = Client::connect(V5, SessionConfig::default());
    let sent = publishes(&plain.deliver(delivery("a", QoS::AtMostOnce, None)).1);
    assert_eq!(sent[0].properties.topic_alias, None);
}

#[test]
fn a_message_over_the_clients_maximum_packet_size_is_dropped() {
    let mut connect = connect_packet(V5, "dev7");
    connect.properties.maximum_packet_bytes = Some(32);
    let mut client = Client::connect_with(SessionConfig::default(), connect, None);
    let mut large = delivery("a", QoS::AtLeastOnce, None);
    large.message.payload = Bytes::from(vec![0; 64]);
    let (outcome, actions) = client.deliver(large);
    assert_eq!(outcome, DeliveryOutcome::Taken);
    assert!(publishes(&actions).is_empty());
    assert_eq!(client.connection.stats().dropped_too_large, 1);
    // Dropped as if sent: it holds no packet identifier.
    assert!(client.connection.snapshot(0).outbound.is_empty());
    let small = publishes(&client.deliver(delivery("a", QoS::AtLeastOnce, None)).1);
    assert_eq!(small[0].packet_id, 1);
}

#[test]
fn a_full_queue_drops_qos_0_and_pauses_for_qos_1() {
    let config = SessionConfig {
        queued_messages_max: 2,
        ..SessionConfig::default()
    };
    let mut client = client_with(Some(1), config);
    // In flight: offset 0. Queued: offsets 1 and 2.
    for offset in 0..3 {
        let (outcome, _) = client.deliver(delivery("a", QoS::AtLeastOnce, Some(offset)));
        assert_eq!(outcome, DeliveryOutcome::Taken);
    }
    let mut qos0 = delivery("a", QoS::AtMostOnce, Some(3));
    qos0.message.qos = QoS::AtMostOnce;
    assert_eq!(client.deliver(qos0).0, DeliveryOutcome::Dropped);
    assert_eq!(client.connection.stats().dropped_queue_full, 1);
    let (outcome, actions) = client.deliver(delivery("a", QoS::AtLeastOnce, Some(4)));
    assert_eq!(outcome, DeliveryOutcome::Refused);
    assert_eq!(actions, [Action::PauseDeliveries]);
    // Paused: later offsets are refused too, whatever their QoS, so the
    // cursor stays on the first refused one.
    assert_eq!(
        client.deliver(delivery("a", QoS::AtMostOnce, Some(5))).0,
        DeliveryOutcome::Refused
    );
    // Even an expired message does not move the cursor past offset 4.
    let mut expired = delivery("a", QoS::AtLeastOnce, Some(6));
    expired.message.properties.expires_at_ms = Some(0);
    assert_eq!(client.deliver(expired).0, DeliveryOutcome::Refused);
    // A shared or retained message (no position) is refused, not paused.
    assert_eq!(
        client.deliver(delivery("a", QoS::AtLeastOnce, None)),
        (DeliveryOutcome::Refused, Vec::new())
    );
    // Draining to half the queue resumes from offset 4.
    let actions = client.packet(Packet::PubAck(ack(1)));
    assert_eq!(kinds(&actions), ["PUBLISH", "ResumeDeliveries"]);
    assert_eq!(
        actions[1],
        Action::ResumeDeliveries {
            cursors: vec![Cursor {
                topic: "t".into(),
                partition: 0,
                next_offset: 4
            }]
        }
    );
    assert_eq!(
        client.deliver(delivery("a", QoS::AtLeastOnce, Some(4))).0,
        DeliveryOutcome::Taken
    );
}

#[test]
fn positions_already_taken_and_expired_messages_are_skipped() {
    let mut client = client_with(Some(1), SessionConfig::default());
    assert_eq!(
        client.deliver(delivery("a", QoS::AtLeastOnce, Some(5))).0,
        DeliveryOutcome::Taken
    );
    assert_eq!(
        client.deliver(delivery("a", QoS::AtLeastOnce, Some(5))).0,
        DeliveryOutcome::Duplicate
    );
    assert_eq!(
        client.deliver(delivery("a", QoS::AtLeastOnce, Some(2))).0,
        DeliveryOutcome::Duplicate
    );
    let mut expired = delivery("a", QoS::AtLeastOnce, Some(6));
    expired.message.properties.expires_at_ms = Some(client.now_ms);
    assert_eq!(client.deliver(expired).0, DeliveryOutcome::Expired);
    // Queued, then expired before its turn.
    let mut expiring = delivery("a", QoS::AtLeastOnce, Some(7));
    expiring.message.properties.expires_at_ms = Some(client.now_ms + 10);
    assert_eq!(client.deliver(expiring).0, DeliveryOutcome::Taken);
    client.now_ms += 10;
    assert!(publishes(&client.packet(Packet::PubAck(ack(1)))).is_empty());
    assert_eq!(client.connection.stats().dropped_expired, 1);
}

#[test]
fn snapshot_cursors_point_at_the_first_queued_message() {
    let mut connect = connect_packet(V5, "dev7");
    connect.properties.receive_maximum = Some(1);
    connect.clean_start = false;
    connect.properties.session_expiry_interval_s = Some(60);
    let mut client = Client::connect_with(SessionConfig::default(), connect, None);
    for offset in 10..13 {
        client.deliver(delivery("a", QoS::AtLeastOnce, Some(offset)));
    }
    let state = client.connection.snapshot(client.now_ms);
    // Offset 10 is in flight (stored with the session); 11 and 12 are only
    // queued, so a restart reads them again from 11.
    assert_eq!(state.outbound.len(), 1);
    assert_eq!(state.cursors[0].next_offset, 11);
    // Persisted on a tick once the interval has passed.
    let actions = client.tick(1_000);
    assert_eq!(kinds(&actions), ["PersistSession"]);
    assert!(client.tick(1_000).is_empty(), "nothing changed since");
}

#[test]
fn retain_flags_follow_the_subscription_options() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let mut retained_message = delivery("a", QoS::AtMostOnce, None);
    retained_message.message.retain = true;
    let flag =
        |client: &mut Client, delivery: Delivery| publishes(&client.deliver(delivery).1)[0].retain;
    assert!(!flag(&mut client, retained_message.clone()));
    let mut as_published = retained_message.clone();
    as_published.retain_as_published = true;
    assert!(flag(&mut client, as_published));
    let mut on_subscribe = delivery("a", QoS::AtMostOnce, None);
    on_subscribe.kind = DeliveryKind::Retained;
    assert!(flag(&mut client, on_subscribe));
}

#[test]
fn subscription_identifiers_and_properties_only_in_v5() {
    let mut offer = delivery("a", QoS::AtLeastOnce, None);
    offer.subscription_identifiers = vec![3, 8];
    offer.message.properties.content_type = Some("text/plain".into());
    offer.message.properties.expires_at_ms = Some(1_000_000 + 5_500);
    let mut client = Client::connect(V5, SessionConfig::default());
    let sent = publishes(&client.deliver(offer.clone()).1);
    assert_eq!(sent[0].properties.subscription_identifiers, [3, 8]);
    assert_eq!(
        sent[0].properties.content_type.as_deref(),
        Some("text/plain")
    );
    assert_eq!(sent[0].properties.message_expiry_interval_s, Some(6));
    let mut client = Client::connect(V311, SessionConfig::default());
    let sent = publishes(&client.deliver(offer).1);
    assert_eq!(sent[0].properties, Properties::default());
}

#[test]
fn catch_up_matches_the_sessions_own_subscriptions() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let mut own = SubscriptionOptions::with_qos(QoS::AtLeastOnce);
    own.no_local = true;
    let actions = client.packet(subscribe(
        1,
        &[
            ("a/+", SubscriptionOptions::with_qos(QoS::AtMostOnce)),
            ("a/#", own),
            (
                "$share/g/a/b",
                SubscriptionOptions::with_qos(QoS::ExactlyOnce),
            ),
        ],
    ));
    assert_eq!(kinds(&actions), ["Subscribe"]);
    client
        .connection
        .handle_subscribe_result(Some(1), vec![Ok(()), Ok(()), Ok(())], client.now_ms);
    let position = LogPosition {
        topic: "t".into(),
        partition: 0,
        offset: 0,
    };
    let from_other = client
        .connection
        .catch_up_delivery(
            message("a/b", QoS::ExactlyOnce, b"x"),
            Some("other"),
            position.clone(),
        )
        .expect("matches");
    assert_eq!(from_other.qos, QoS::AtLeastOnce);
    let from_self = client
        .connection
        .catch_up_delivery(
            message("a/b", QoS::ExactlyOnce, b"x"),
            Some("dev7"),
            position.clone(),
        )
        .expect("matches a/+");
    assert_eq!(from_self.qos, QoS::AtMostOnce);
    assert_eq!(
        client
            .connection
            .catch_up_delivery(message("b", QoS::ExactlyOnce, b"x"), None, position),
        None
    );
}
