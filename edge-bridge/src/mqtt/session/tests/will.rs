//! Wills and the end of a connection: which closes publish the will, the
//! will delay, session storage at close, takeover, DISCONNECT rules.

use super::*;
use crate::mqtt::packet::{Disconnect, Will};
use crate::mqtt::reason;

fn with_will(delay_s: Option<u32>, expiry_s: u32) -> Client {
    let mut connect = connect_packet(V5, "dev7");
    connect.clean_start = false;
    connect.properties.session_expiry_interval_s = Some(expiry_s);
    let properties = Properties {
        will_delay_interval_s: delay_s,
        ..Properties::default()
    };
    connect.will = Some(Will {
        topic: "status/dev7".into(),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties,
    });
    Client::connect_with(SessionConfig::default(), connect, None)
}

fn disconnect(reason_code: u8) -> Packet {
    Packet::Disconnect(Disconnect {
        reason_code,
        properties: Properties::default(),
    })
}

#[test]
fn the_will_is_set_at_connect() {
    let client = with_will(Some(30), 60);
    let will = client.opened.iter().find_map(|action| match action {
        Action::SetWill { will, delay_ms } => Some((will.topic.clone(), *delay_ms)),
        _ => None,
    });
    assert_eq!(will, Some(("status/dev7".into(), 30_000)));
}

#[test]
fn a_normal_disconnect_clears_the_will() {
    let mut client = with_will(None, 60);
    let actions = client.packet(disconnect(reason::NORMAL_DISCONNECTION));
    assert_eq!(kinds(&actions), ["ClearWill", "PersistSession", "Close"]);
    assert!(client.connection.is_closed());
}

#[test]
fn disconnect_with_will_message_publishes_it() {
    let mut client = with_will(None, 60);
    let actions = client.packet(disconnect(reason::DISCONNECT_WITH_WILL_MESSAGE));
    assert_eq!(kinds(&actions), ["PublishWill", "PersistSession", "Close"]);
}

#[test]
fn a_lost_connection_publishes_the_will_after_its_delay_capped_by_expiry() {
    let mut client = with_will(Some(30), 60);
    let actions = client.connection.handle_connection_lost(client.now_ms);
    assert_eq!(actions[0], Action::PublishWill { delay_ms: 30_000 });
    // The session ends first: the will goes then.
    let mut client = with_will(Some(300), 60);
    let actions = client.connection.handle_connection_lost(client.now_ms);
    assert_eq!(actions[0], Action::PublishWill { delay_ms: 60_000 });
    // No DISCONNECT is sent on a socket that is gone.
    assert!(sent(&actions).is_empty());
}

#[test]
fn protocol_errors_and_keep_alive_timeouts_publish_the_will() {
    let mut client = with_will(None, 60);
    let actions = client.packet(Packet::PingResp);
    assert_eq!(
        kinds(&actions),
        ["DISCONNECT", "PublishWill", "PersistSession", "Close"]
    );
}

#[test]
fn a_takeover_disconnects_with_0x8e_and_keeps_the_session() {
    let mut client = with_will(None, 60);
    let actions = client.connection.handle_takeover(client.now_ms);
    assert_eq!(
        kinds(&actions),
        ["DISCONNECT", "PublishWill", "PersistSession", "Close"]
    );
    assert_eq!(close_reason(&actions), Some(reason::SESSION_TAKEN_OVER));
}

#[test]
fn disconnect_may_shorten_but_not_create_a_session_expiry() {
    let mut client = with_will(None, 60);
    let mut packet = disconnect(reason::NORMAL_DISCONNECTION);
    if let Packet::Disconnect(disconnect) = &mut packet {
        disconnect.properties.session_expiry_interval_s = Some(0);
    }
    // Expiry 0 now: the session ends with the connection.
    assert_eq!(
        kinds(&client.packet(packet.clone())),
        ["ClearWill", "EndSession", "Close"]
    );

    let mut client = Client::connect(V5, SessionConfig::default());
    if let Packet::Disconnect(disconnect) = &mut packet {
        disconnect.properties.session_expiry_interval_s = Some(10);
    }
    let actions = client.packet(packet);
    assert_eq!(close_reason(&actions), Some(reason::PROTOCOL_ERROR));
}

#[test]
fn a_clean_session_ends_with_its_connection() {
    let mut client = Client::connect(V311, SessionConfig::default());
    assert_eq!(
        kinds(&client.packet(disconnect(reason::NORMAL_DISCONNECTION))),
        ["EndSession", "Close"]
    );
}
