//! SUBSCRIBE and UNSUBSCRIBE: the index round trip, reason codes, limits,
//! retain handling, shared subscriptions, persistence before SUBACK.

use super::*;
use crate::mqtt::packet::{RetainHandling, SubAck, UnsubAck};
use crate::mqtt::reason;
use crate::mqtt::subscriptions::IndexFull;
use crate::mqtt::topic::TopicLimits;

fn options(qos: QoS, retain_handling: RetainHandling) -> SubscriptionOptions {
    SubscriptionOptions {
        retain_handling,
        ..SubscriptionOptions::with_qos(qos)
    }
}

fn suback(actions: &[Action]) -> SubAck {
    sent(actions)
        .into_iter()
        .find_map(|packet| match packet {
            Packet::SubAck(suback) => Some(suback),
            _ => None,
        })
        .expect("a SUBACK")
}

/// Subscribes and lets the index take everything.
fn subscribed(
    client: &mut Client,
    packet_id: u16,
    filters: &[(&str, SubscriptionOptions)],
) -> Vec<Action> {
    let actions = client.packet(subscribe(packet_id, filters));
    let Some(Action::Subscribe { subscriptions, .. }) = actions.first() else {
        return actions;
    };
    let results = vec![Ok(()); subscriptions.len()];
    client
        .connection
        .handle_subscribe_result(Some(packet_id), results, client.now_ms)
}

#[test]
fn suback_follows_the_index_and_retained_messages_follow_suback() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let mut packet = subscribe(
        4,
        &[
            (
                "a/+",
                options(QoS::ExactlyOnce, RetainHandling::SendAtSubscribe),
            ),
            ("b", options(QoS::AtMostOnce, RetainHandling::DoNotSend)),
        ],
    );
    if let Packet::Subscribe(subscribe) = &mut packet {
        subscribe.properties.subscription_identifiers = vec![12];
    }
    let actions = client.packet(packet);
    let [
        Action::Subscribe {
            packet_id,
            subscriptions,
        },
    ] = actions.as_slice()
    else {
        panic!("{actions:?}");
    };
    assert_eq!(*packet_id, Some(4));
    assert_eq!(subscriptions.len(), 2);
    assert_eq!(subscriptions[0].1.identifier, Some(12));
    let actions =
        client
            .connection
            .handle_subscribe_result(Some(4), vec![Ok(()), Ok(())], client.now_ms);
    assert_eq!(kinds(&actions), ["SUBACK", "SendRetained"]);
    assert_eq!(suback(&actions).reason_codes, [2, 0]);
    assert_eq!(
        actions[1],
        Action::SendRetained {
            filter: "a/+".into(),
            qos: QoS::ExactlyOnce,
            subscription_identifier: Some(12)
        }
    );
}

#[test]
fn retain_handling_1_sends_only_for_a_new_subscription() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let if_new = options(QoS::AtLeastOnce, RetainHandling::SendAtSubscribeIfNew);
    assert_eq!(
        kinds(&subscribed(&mut client, 1, &[("a", if_new)])),
        ["SUBACK", "SendRetained"]
    );
    assert_eq!(
        kinds(&subscribed(&mut client, 2, &[("a", if_new)])),
        ["SUBACK"]
    );
    // Shared subscriptions never get retained messages.
    let always = options(QoS::AtLeastOnce, RetainHandling::SendAtSubscribe);
    assert_eq!(
        kinds(&subscribed(&mut client, 3, &[("$share/g/a", always)])),
        ["SUBACK"]
    );
}

#[test]
fn refusals_by_the_session_and_by_the_index() {
    let config = SessionConfig {
        subscriptions_max: 2,
        topic_limits: TopicLimits {
            topic_bytes_max: 32,
            topic_levels_max: 2,
        },
        ..SessionConfig::default()
    };
    let mut client = Client::connect(V5, config);
    let qos1 = SubscriptionOptions::with_qos(QoS::AtLeastOnce);
    let actions = client.packet(subscribe(
        1,
        &[("a/b/c", qos1), ("x", qos1), ("y", qos1), ("z", qos1)],
    ));
    let [Action::Subscribe { subscriptions, .. }] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    // Too deep, then two fit, then over the session's maximum.
    assert_eq!(subscriptions.len(), 2);
    let actions = client.connection.handle_subscribe_result(
        Some(1),
        vec![
            Ok(()),
            Err(IndexFull {
                subscriptions_max: 1,
            }),
        ],
        client.now_ms,
    );
    assert_eq!(
        suback(&actions).reason_codes,
        [
            reason::TOPIC_FILTER_INVALID,
            1,
            reason::QUOTA_EXCEEDED,
            reason::QUOTA_EXCEEDED
        ]
    );
    // Only what the index took is the session's.
    assert_eq!(client.connection.snapshot(0).subscriptions.len(), 1);
    // Nothing to ask the index: SUBACK at once.
    let actions = client.packet(subscribe(2, &[("a/b/c", qos1)]));
    assert_eq!(kinds(&actions), ["SUBACK"]);
}

#[test]
fn v311_suback_failures_are_0x80() {
    let config = SessionConfig {
        subscriptions_max: 0,
        ..SessionConfig::default()
    };
    let mut client = Client::connect(V311, config);
    let actions = client.packet(subscribe(
        1,
        &[("a", SubscriptionOptions::with_qos(QoS::AtMostOnce))],
    ));
    let mut bytes = Vec::new();
    crate::mqtt::encode(&sent(&actions)[0], V311, &mut bytes).expect("encodes");
    assert_eq!(bytes, [0x90, 3, 0, 1, 0x80]);
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let mut no_local = SubscriptionOptions::with_qos(QoS::AtMostOnce);
    no_local.no_local = true;
    let actions = client.packet(subscribe(1, &[("$share/g/a", no_local)]));
    assert_eq!(kinds(&actions), ["DISCONNECT", "EndSession", "Close"]);
    assert_eq!(close_reason(&actions), Some(reason::PROTOCOL_ERROR));
}

#[test]
fn unsubscribe_reports_each_filter() {
    let mut client = Client::connect(V5, SessionConfig::default());
    subscribed(
        &mut client,
        1,
        &[("a", SubscriptionOptions::with_qos(QoS::AtMostOnce))],
    );
    let actions = client.packet(unsubscribe(2, &["a", "b"]));
    assert_eq!(kinds(&actions), ["Unsubscribe", "UNSUBACK"]);
    assert_eq!(actions[0], Action::Unsubscribe { filter: "a".into() });
    assert_eq!(
        sent(&actions),
        [Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reason_codes: vec![reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED],
            properties: Properties::default(),
        })]
    );
}

#[test]
fn a_persistent_session_is_stored_before_suback_and_unsuback() {
    let mut connect = connect_packet(V5, "dev7");
    connect.clean_start = false;
    connect.properties.session_expiry_interval_s = Some(60);
    let mut client = Client::connect_with(SessionConfig::default(), connect, None);
    let actions = subscribed(
        &mut client,
        1,
        &[("a", SubscriptionOptions::with_qos(QoS::AtLeastOnce))],
    );
    assert_eq!(
        kinds(&actions),
        ["PersistSession", "SUBACK", "SendRetained"]
    );
    let Action::PersistSession(state) = &actions[0] else {
        panic!("{actions:?}");
    };
    assert_eq!(state.subscriptions[0].filter, "a");
    let actions = client.packet(unsubscribe(2, &["a"]));
    assert_eq!(
        kinds(&actions),
        ["Unsubscribe", "PersistSession", "UNSUBACK"]
    );
}
