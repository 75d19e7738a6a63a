//! CONNECT, CONNACK, client identifiers, authentication, keep alive,
//! session expiry, restoring a session, decode errors.

use super::*;
use crate::mqtt::auth::{PasswordFile, hash_password};
use crate::mqtt::packet::Will;
use crate::mqtt::reason;

fn refused(config: SessionConfig, connect: Connect) -> Vec<Action> {
    refused_with(context(config), connect)
}

fn refused_with(context: Arc<ServerContext>, connect: Connect) -> Vec<Action> {
    let mut connection = Connection::new(context, 1, 0);
    let actions = connection.handle_packet(Packet::Connect(Box::new(connect)), 0);
    assert!(connection.is_closed());
    actions
}

#[test]
fn v5_connack_advertises_the_limits() {
    let config = SessionConfig {
        inflight_inbound_max: 10,
        topic_aliases_max: 5,
        packet_bytes_max: 4096,
        ..SessionConfig::default()
    };
    let client = Client::connect(V5, config);
    assert_eq!(kinds(&client.opened), ["CONNACK"]);
    let answer = connack(&client.opened);
    assert!(!answer.session_present);
    assert_eq!(answer.reason_code, reason::SUCCESS);
    assert_eq!(answer.properties.receive_maximum, Some(10));
    assert_eq!(answer.properties.topic_alias_maximum, Some(5));
    assert_eq!(answer.properties.maximum_packet_bytes, Some(4096));
    assert_eq!(answer.properties.assigned_client_identifier, None);
    // Under 3.1.1 there are no properties to send.
    let client = Client::connect(V311, SessionConfig::default());
    assert_eq!(connack(&client.opened).properties, Properties::default());
}

#[test]
fn empty_client_id_is_assigned_in_v5_and_refused_in_v311_without_clean_session() {
    let client = Client::connect_with(SessionConfig::default(), connect_packet(V5, ""), None);
    assert_eq!(client.connection.client_id(), "rill-abc");
    assert_eq!(
        connack(&client.opened)
            .properties
            .assigned_client_identifier
            .as_deref(),
        Some("rill-abc")
    );

    let mut connect = connect_packet(V311, "");
    connect.clean_start = false;
    let actions = refused(SessionConfig::default(), connect);
    assert_eq!(kinds(&actions), ["CONNACK", "Close"]);
    assert_eq!(
        connack(&actions).reason_code,
        reason::CLIENT_IDENTIFIER_NOT_VALID
    );

    // With a clean session 3.1.1 gets one too, without being told.
    let client = Client::connect_with(SessionConfig::default(), connect_packet(V311, ""), None);
    assert_eq!(client.connection.client_id(), "rill-abc");

    let config = SessionConfig {
        client_id_bytes_max: 4,
        ..SessionConfig::default()
    };
    let actions = refused(config, connect_packet(V5, "too-long"));
    assert_eq!(
        connack(&actions).reason_code,
        reason::CLIENT_IDENTIFIER_NOT_VALID
    );
}

#[test]
fn anonymous_access_can_be_switched_off() {
    let config = SessionConfig {
        allow_anonymous: false,
        ..SessionConfig::default()
    };
    let actions = refused(config.clone(), connect_packet(V5, "c"));
    assert_eq!(connack(&actions).reason_code, reason::NOT_AUTHORIZED);
    // 3.1.1 says it as return code 5 (encoded from the same code).
    let actions = refused(config, connect_packet(V311, "c"));
    assert_eq!(connack(&actions).reason_code, reason::NOT_AUTHORIZED);
}

#[test]
fn passwords_are_checked_by_the_authenticator() {
    let line = format!("dev7:{}", hash_password(b"s3cret", b"12345678", 1_000));
    let context = Arc::new(ServerContext {
        config: SessionConfig {
            allow_anonymous: false,
            ..SessionConfig::default()
        },
        mapping: mapping(),
        authenticator: Box::new(PasswordFile::parse(&line).expect("users file")),
    });
    let with = |password: &'static [u8]| {
        let mut connect = connect_packet(V5, "c");
        connect.username = Some("dev7".into());
        connect.password = Some(Bytes::from_static(password));
        connect
    };
    let actions = refused_with(Arc::clone(&context), with(b"wrong"));
    assert_eq!(
        connack(&actions).reason_code,
        reason::BAD_USER_NAME_OR_PASSWORD
    );
    let mut enhanced = with(b"s3cret");
    enhanced.properties.authentication_method = Some("SCRAM-SHA-256".into());
    let actions = refused_with(Arc::clone(&context), enhanced);
    assert_eq!(
        connack(&actions).reason_code,
        reason::BAD_AUTHENTICATION_METHOD
    );

    let mut connection = Connection::new(context, 1, 0);
    let actions = connection.handle_packet(Packet::Connect(Box::new(with(b"s3cret"))), 0);
    assert_eq!(kinds(&actions), ["OpenSession"]);
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let mut client = Client::connect(V5, SessionConfig::default());
    let actions = client.packet(Packet::Connect(Box::new(connect_packet(V5, "dev7"))));
    assert_eq!(kinds(&actions), ["DISCONNECT", "EndSession", "Close"]);
    assert_eq!(close_reason(&actions), Some(reason::PROTOCOL_ERROR));
    assert!(client.connection.is_closed());
    assert!(client.packet(Packet::PingReq).is_empty());
}

#[test]
fn keep_alive_times_out_after_one_and_a_half_intervals() {
    let mut connect = connect_packet(V5, "dev7");
    connect.keep_alive_s = 10;
    let mut client = Client::connect_with(SessionConfig::default(), connect, None);
    assert!(client.tick(14_999).is_empty());
    // Any packet counts as activity.
    assert_eq!(sent(&client.packet(Packet::PingReq)), [Packet::PingResp]);
    assert!(client.tick(14_999).is_empty());
    let actions = client.tick(1);
    assert_eq!(kinds(&actions), ["DISCONNECT", "EndSession", "Close"]);
    assert_eq!(close_reason(&actions), Some(reason::KEEP_ALIVE_TIMEOUT));
}

#[test]
fn server_keep_alive_caps_a_v5_client() {
    let config = SessionConfig {
        keep_alive_max_s: 30,
        ..SessionConfig::default()
    };
    let mut connect = connect_packet(V5, "dev7");
    connect.keep_alive_s = 0;
    let mut client = Client::connect_with(config, connect, None);
    assert_eq!(
        connack(&client.opened).properties.server_keep_alive_s,
        Some(30)
    );
    assert!(client.tick(44_999).is_empty());
    assert_eq!(
        close_reason(&client.tick(1)),
        Some(reason::KEEP_ALIVE_TIMEOUT)
    );
}

#[test]
fn a_connection_without_connect_times_out() {
    let config = SessionConfig {
        connect_timeout_ms: 5_000,
        ..SessionConfig::default()
    };
    let mut connection = Connection::new(context(config), 1, 0);
    assert!(connection.handle_tick(4_999).is_empty());
    assert_eq!(
        connection.handle_tick(5_000),
        [Action::Close {
            reason_code: reason::MAXIMUM_CONNECT_TIME
        }]
    );
}

#[test]
fn session_expiry_is_capped_and_3_1_1_persistent_sessions_get_the_cap() {
    let config = SessionConfig {
        session_expiry_max_s: 60,
        ..SessionConfig::default()
    };
    let mut connect = connect_packet(V5, "dev7");
    connect.clean_start = false;
    connect.properties.session_expiry_interval_s = Some(u32::MAX);
    let client = Client::connect_with(config.clone(), connect, None);
    assert_eq!(
        connack(&client.opened).properties.session_expiry_interval_s,
        Some(60)
    );
    // A persistent session is stored as soon as it opens.
    assert_eq!(kinds(&client.opened), ["CONNACK", "PersistSession"]);

    let mut connect = connect_packet(V311, "dev7");
    connect.clean_start = false;
    let client = Client::connect_with(config, connect, None);
    let Some(Action::PersistSession(state)) = client.opened.last() else {
        panic!("persisted: {:?}", client.opened);
    };
    assert_eq!(state.session_expiry_s, 60);
}

fn stored_state() -> SessionState {
    SessionState {
        client_id: "dev7".into(),
        session_expiry_s: 600,
        saved_at_ms: 1,
        subscriptions: vec![StoredSubscription {
            filter: "cmd/#".into(),
            options: SubscriptionOptions::with_qos(QoS::ExactlyOnce),
            identifier: None,
        }],
        outbound: vec![
            OutboundMessage {
                packet_id: 5,
                stage: OutboundStage::Published {
                    message: message("cmd/a", QoS::AtLeastOnce, b"x"),
                    subscription_identifiers: Vec::new(),
                },
            },
            OutboundMessage {
                packet_id: 6,
                stage: OutboundStage::Released,
            },
        ],
        inbound_awaiting_release: vec![9],
        cursors: vec![Cursor {
            topic: "commands".into(),
            partition: 0,
            next_offset: 17,
        }],
    }
}

#[test]
fn a_stored_session_is_restored_and_its_messages_resent_with_dup() {
    let mut connect = connect_packet(V5, "dev7");
    connect.clean_start = false;
    connect.properties.session_expiry_interval_s = Some(600);
    let mut client = Client::connect_with(SessionConfig::default(), connect, Some(stored_state()));
    assert_eq!(
        kinds(&client.opened),
        [
            "Subscribe",
            "CONNACK",
            "PUBLISH",
            "PUBREL",
            "ResumeDeliveries",
            "PersistSession"
        ]
    );
    assert!(connack(&client.opened).session_present);
    let packets = sent(&client.opened);
    let Packet::Publish(resent) = &packets[1] else {
        panic!("{packets:?}");
    };
    assert!(resent.dup);
    assert_eq!((resent.packet_id, resent.topic.as_str()), (5, "cmd/a"));
    assert_eq!(packets[2], Packet::PubRel(ack(6)));
    assert!(client.opened.contains(&Action::ResumeDeliveries {
        cursors: vec![Cursor {
            topic: "commands".into(),
            partition: 0,
            next_offset: 17
        }]
    }));
    // The restored QoS 2 id still awaits its PUBREL.
    assert_eq!(
        sent(&client.packet(Packet::PubRel(ack(9)))),
        [Packet::PubComp(ack(9))]
    );
    // New messages get identifiers the restored ones do not hold.
    let (_, actions) = client.deliver(delivery("cmd/b", QoS::AtLeastOnce, None));
    let Some(Packet::Publish(publish)) = sent(&actions).pop() else {
        panic!("{actions:?}");
    };
    assert_eq!(publish.packet_id, 7);
}

#[test]
fn restored_subscriptions_the_index_refuses_leave_the_session() {
    let mut connect = connect_packet(V5, "dev7");
    connect.clean_start = false;
    connect.properties.session_expiry_interval_s = Some(600);
    let mut client = Client::connect_with(SessionConfig::default(), connect, Some(stored_state()));
    let actions = client.connection.handle_subscribe_result(
        None,
        vec![Err(crate::mqtt::subscriptions::IndexFull {
            subscriptions_max: 0,
        })],
        client.now_ms,
    );
    let [Action::PersistSession(state)] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert!(state.subscriptions.is_empty());
}

#[test]
fn a_clean_start_ignores_the_stored_session() {
    let client = Client::connect_with(
        SessionConfig::default(),
        connect_packet(V5, "dev7"),
        Some(stored_state()),
    );
    assert_eq!(kinds(&client.opened), ["CONNACK"]);
    assert!(!connack(&client.opened).session_present);
}

#[test]
fn decode_errors_are_answered_by_version() {
    let error = DecodeError::UnsupportedProtocolLevel { level: 3 };
    // Before CONNECT, an unknown level gets the 3.1.1 refusal.
    let mut connection = Connection::new(context(SessionConfig::default()), 1, 0);
    let actions = connection.handle_decode_error(&error, None, 0);
    assert_eq!(kinds(&actions), ["CONNACK", "Close"]);
    assert_eq!(connection.protocol_version(), V311);
    // A malformed 5.0 CONNECT gets a 5.0 CONNACK with its reason code.
    let mut connection = Connection::new(context(SessionConfig::default()), 1, 0);
    let malformed = DecodeError::InvalidProtocolName;
    let actions = connection.handle_decode_error(&malformed, Some(V5), 0);
    assert_eq!(
        connack(&actions).reason_code,
        reason::UNSUPPORTED_PROTOCOL_VERSION
    );
    // A malformed 3.1.1 CONNECT whose error has no return code: closed.
    let mut connection = Connection::new(context(SessionConfig::default()), 1, 0);
    let bad = DecodeError::RemainingLengthTooLong;
    assert_eq!(
        kinds(&connection.handle_decode_error(&bad, Some(V311), 0)),
        ["Close"]
    );

    // After CONNECT: DISCONNECT with the code, and the will goes.
    let mut connect = connect_packet(V5, "dev7");
    connect.will = Some(Will {
        topic: "status/dev7".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    let mut client = Client::connect_with(SessionConfig::default(), connect, None);
    assert_eq!(kinds(&client.opened), ["CONNACK", "SetWill"]);
    let too_large = DecodeError::PacketTooLarge {
        packet_bytes: 10,
        max_packet_bytes: 5,
    };
    let actions = client
        .connection
        .handle_decode_error(&too_large, None, client.now_ms);
    assert_eq!(
        kinds(&actions),
        ["DISCONNECT", "PublishWill", "EndSession", "Close"]
    );
    assert_eq!(close_reason(&actions), Some(reason::PACKET_TOO_LARGE));
}

#[test]
fn a_will_topic_over_the_limits_is_refused() {
    let config = SessionConfig {
        topic_limits: crate::mqtt::topic::TopicLimits {
            topic_bytes_max: 8,
            topic_levels_max: 2,
        },
        ..SessionConfig::default()
    };
    let mut connect = connect_packet(V5, "dev7");
    connect.will = Some(Will {
        topic: "a/b/c".into(),
        payload: Bytes::new(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    let actions = refused(config, connect);
    assert_eq!(connack(&actions).reason_code, reason::TOPIC_NAME_INVALID);
}
