//! Codec tests: known encodings from the specifications side by side with
//! their packets, malformed inputs with the reason code and message they
//! get, and property tests (round trips of every packet type in both
//! versions, truncations, corrupted bytes).

use bytes::Bytes;
use expect_test::expect;
use proptest::prelude::*;

use crate::mqtt::{
    Auth, ConnAck, Connect, DecodeError, Disconnect, EncodeError, Packet, PacketType,
    PayloadFormat, Properties, PropertyId, PropertyOwner, ProtocolVersion, Publish,
    PublishResponse, QoS, RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions,
    UnsubAck, Unsubscribe, Will, connect_protocol_version, decode, decode_connect, encode,
    encoded_len, reason,
};

use ProtocolVersion::{V5, V311};

/// Bytes from hex digits; spaces are for reading.
fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|byte| !byte.is_ascii_whitespace())
        .collect();
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("ASCII");
            u8::from_str_radix(pair, 16).expect("hex digits")
        })
        .collect()
}

fn encoded(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = Vec::new();
    encode(packet, version, &mut out).expect("encodes");
    out
}

/// The version a decoded packet re-encodes at: CONNECT carries its own.
fn version_of(packet: &Packet, version: ProtocolVersion) -> ProtocolVersion {
    match packet {
        Packet::Connect(connect) => connect.protocol_version,
        _ => version,
    }
}

/// What the fuzz target checks: whatever decodes re-encodes and decodes
/// to the same packet.
fn decode_and_reencode(bytes: &[u8]) {
    for version in [V311, V5] {
        let mut rest = bytes;
        while let Ok(Some((packet, used))) = decode(rest, version, u32::MAX) {
            assert!(used > 0 && used <= rest.len());
            let again = encoded(&packet, version_of(&packet, version));
            assert_eq!(
                decode(&again, version, u32::MAX),
                Ok(Some((packet, again.len())))
            );
            rest = &rest[used..];
        }
    }
    if let Ok(Some((connect, _))) = decode_connect(bytes, u32::MAX) {
        let packet = Packet::Connect(Box::new(connect));
        let again = encoded(&packet, version_of(&packet, V5));
        assert_eq!(
            decode(&again, V5, u32::MAX),
            Ok(Some((packet, again.len())))
        );
    }
}

fn connect_example(version: ProtocolVersion, properties: Properties) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol_version: version,
        clean_start: true,
        keep_alive_s: 10,
        client_id: "rill".into(),
        will: Some(Will {
            topic: "w/1".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        username: Some("u".into()),
        password: Some(Bytes::from_static(b"pw")),
        properties,
    }))
}

fn publish_example(topic: &str, properties: Properties) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: 10,
        payload: Bytes::from_static(b"hi"),
        properties,
    })
}

/// Packets next to the bytes assembled by hand from the specifications'
/// field layouts. The CONNECT variable headers are the examples of
/// sections 3.1.2.10 (3.1.1) and 3.1.2.11.10 (5.0): protocol name "MQTT",
/// flags 0xCE (user name, password, will QoS 1, will, clean), keep alive 10,
/// and under 5.0 a Session Expiry Interval of 10.
#[test]
fn known_encodings() {
    let cases: Vec<(ProtocolVersion, &str, Packet)> = vec![
        (
            V311,
            "10 21  00 04 4D 51 54 54  04  CE  00 0A
                    00 04 72 69 6C 6C  00 03 77 2F 31  00 03 62 79 65  00 01 75  00 02 70 77",
            connect_example(V311, Properties::default()),
        ),
        (
            V5,
            "10 28  00 04 4D 51 54 54  05  CE  00 0A  05 11 00 00 00 0A
                    00 04 72 69 6C 6C  00  00 03 77 2F 31  00 03 62 79 65  00 01 75  00 02 70 77",
            connect_example(
                V5,
                Properties {
                    session_expiry_interval_s: Some(10),
                    ..Properties::default()
                },
            ),
        ),
        (
            V311,
            "20 02 01 00",
            Packet::ConnAck(ConnAck {
                session_present: true,
                reason_code: reason::SUCCESS,
                properties: Properties::default(),
            }),
        ),
        (
            V311,
            "20 02 00 05",
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: reason::NOT_AUTHORIZED,
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            "20 08 00 00  05 21 00 0A 24 01",
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: reason::SUCCESS,
                properties: Properties {
                    receive_maximum: Some(10),
                    maximum_qos: Some(QoS::AtLeastOnce),
                    ..Properties::default()
                },
            }),
        ),
        (
            V311,
            "32 09  00 03 61 2F 62  00 0A  68 69",
            publish_example("a/b", Properties::default()),
        ),
        (
            V5,
            "32 0A  00 03 61 2F 62  00 0A  00  68 69",
            publish_example("a/b", Properties::default()),
        ),
        (
            V5,
            "31 07  00 00  03 23 00 03  78",
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: true,
                topic: String::new(),
                packet_id: 0,
                payload: Bytes::from_static(b"x"),
                properties: Properties {
                    topic_alias: Some(3),
                    ..Properties::default()
                },
            }),
        ),
        (
            V5,
            "40 02 00 07",
            Packet::PubAck(PublishResponse::success(7)),
        ),
        (
            V5,
            "40 03 00 07 10",
            Packet::PubAck(PublishResponse {
                packet_id: 7,
                reason_code: reason::NO_MATCHING_SUBSCRIBERS,
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            "50 09 00 07 10  05 1F 00 02 6E 6F",
            Packet::PubRec(PublishResponse {
                packet_id: 7,
                reason_code: reason::NO_MATCHING_SUBSCRIBERS,
                properties: Properties {
                    reason_string: Some("no".into()),
                    ..Properties::default()
                },
            }),
        ),
        (
            V311,
            "62 02 00 07",
            Packet::PubRel(PublishResponse::success(7)),
        ),
        (
            V311,
            "70 02 00 07",
            Packet::PubComp(PublishResponse::success(7)),
        ),
        (
            V311,
            "82 0C  00 01  00 03 61 2F 2B 01  00 01 23 00",
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![
                    Subscription {
                        filter: "a/+".into(),
                        options: SubscriptionOptions::with_qos(QoS::AtLeastOnce),
                    },
                    Subscription {
                        filter: "#".into(),
                        options: SubscriptionOptions::with_qos(QoS::AtMostOnce),
                    },
                ],
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            // Options 0x2D: QoS 1, no local, retain as published, retain handling 2.
            "82 0B  00 01  02 0B 05  00 03 61 2F 2B 2D",
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: "a/+".into(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                }],
                properties: Properties {
                    subscription_identifiers: vec![5],
                    ..Properties::default()
                },
            }),
        ),
        (
            V311,
            "90 04 00 01 01 80",
            Packet::SubAck(SubAck {
                packet_id: 1,
                reason_codes: vec![reason::GRANTED_QOS_1, reason::V311_SUBSCRIBE_FAILURE],
                properties: Properties::default(),
            }),
        ),
        (
            V311,
            "A2 05 00 02 00 01 61",
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 2,
                filters: vec!["a".into()],
                properties: Properties::default(),
            }),
        ),
        (
            V311,
            "B0 02 00 02",
            Packet::UnsubAck(UnsubAck {
                packet_id: 2,
                reason_codes: Vec::new(),
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            "B0 04 00 02 00 11",
            Packet::UnsubAck(UnsubAck {
                packet_id: 2,
                reason_codes: vec![reason::NO_SUBSCRIPTION_EXISTED],
                properties: Properties::default(),
            }),
        ),
        (V311, "C0 00", Packet::PingReq),
        (V5, "D0 00", Packet::PingResp),
        (
            V311,
            "E0 00",
            Packet::Disconnect(Disconnect {
                reason_code: reason::NORMAL_DISCONNECTION,
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            "E0 01 04",
            Packet::Disconnect(Disconnect {
                reason_code: reason::DISCONNECT_WITH_WILL_MESSAGE,
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            "F0 00",
            Packet::Auth(Auth {
                reason_code: reason::SUCCESS,
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            "F0 06 18  04 15 00 01 6D",
            Packet::Auth(Auth {
                reason_code: reason::CONTINUE_AUTHENTICATION,
                properties: Properties {
                    authentication_method: Some("m".into()),
                    ..Properties::default()
                },
            }),
        ),
    ];
    for (version, text, packet) in cases {
        let bytes = hex(text);
        assert_eq!(
            decode(&bytes, version, u32::MAX),
            Ok(Some((packet.clone(), bytes.len()))),
            "{text}"
        );
        assert_eq!(encoded(&packet, version), bytes, "{packet:?}");
        assert_eq!(encoded_len(&packet, version), Ok(bytes.len()));
    }
}

/// Malformed inputs, each with the reason code a server sends and the
/// message that names the problem.
#[test]
fn malformed_inputs() {
    let cases: &[(&str, ProtocolVersion, &str)] = &[
        ("packet type 0", V5, "00 00"),
        ("AUTH under 3.1.1", V311, "F0 00"),
        ("PUBREL without its flags", V5, "60 02 00 01"),
        (
            "SUBSCRIBE without its flags",
            V311,
            "80 06 00 01 00 01 61 00",
        ),
        (
            "UNSUBSCRIBE without its flags",
            V311,
            "A0 05 00 01 00 01 61",
        ),
        ("PINGREQ with a flag", V311, "C1 00"),
        ("PUBLISH QoS 3", V5, "36 05 00 01 61 00 01"),
        ("PUBLISH DUP with QoS 0", V5, "38 03 00 01 61"),
        ("remaining length of five bytes", V5, "30 FF FF FF FF 01"),
        ("string past the end", V311, "30 03 00 05 61"),
        ("topic not UTF-8", V311, "30 04 00 02 C3 28"),
        ("topic with U+0000", V311, "30 04 00 02 61 00"),
        ("topic with a wildcard", V311, "30 05 00 03 61 2F 2B"),
        ("empty topic under 3.1.1", V311, "30 02 00 00"),
        ("empty topic without alias", V5, "30 03 00 00 00"),
        ("PUBLISH packet id 0", V311, "32 05 00 01 61 00 00"),
        ("PUBACK packet id 0", V5, "40 02 00 00"),
        ("3.1.1 PUBACK with a reason code", V311, "40 03 00 01 00"),
        ("PUBACK with a PUBREL reason code", V5, "40 03 00 01 92"),
        ("unknown property", V5, "40 05 00 01 00 01 7F"),
        (
            "property identifier of five bytes",
            V5,
            "40 08 00 01 00 04 FF FF FF FF",
        ),
        (
            "Session Expiry Interval in PUBACK",
            V5,
            "40 09 00 01 00 05 11 00 00 00 0A",
        ),
        (
            "Payload Format Indicator twice",
            V5,
            "30 08 00 01 61 04 01 00 01 00",
        ),
        ("Payload Format Indicator 2", V5, "30 06 00 01 61 02 01 02"),
        ("property length past the end", V5, "30 04 00 01 61 05"),
        ("Subscription Identifier 0", V5, "30 06 00 01 61 02 0B 00"),
        ("Receive Maximum 0", V5, "20 06 00 00 03 21 00 00"),
        ("Maximum QoS 2", V5, "20 05 00 00 02 24 02"),
        (
            "two Subscription Identifiers in SUBSCRIBE",
            V5,
            "82 0B 00 01 04 0B 01 0B 02 00 01 61 00",
        ),
        (
            "subscription options reserved bits",
            V5,
            "82 07 00 01 00 00 01 61 C0",
        ),
        ("retain handling 3", V5, "82 07 00 01 00 00 01 61 30"),
        ("no local under 3.1.1", V311, "82 06 00 01 00 01 61 04"),
        ("subscription QoS 3", V311, "82 06 00 01 00 01 61 03"),
        ("SUBSCRIBE without filters", V311, "82 02 00 01"),
        (
            "filter with a wildcard inside a level",
            V311,
            "82 08 00 01 00 03 61 23 62 00",
        ),
        (
            "shared subscription without filter",
            V5,
            "82 0D 00 01 00 00 08 24 73 68 61 72 65 2F 67 00",
        ),
        ("UNSUBSCRIBE without filters", V5, "A2 03 00 01 00"),
        ("3.1.1 SUBACK code 3", V311, "90 03 00 01 03"),
        ("SUBACK without codes", V5, "90 03 00 01 00"),
        ("CONNACK reserved flags", V311, "20 02 02 00"),
        ("3.1.1 CONNACK return code 6", V311, "20 02 00 06"),
        (
            "MQTT 3.1 (MQIsdp, level 3)",
            V311,
            "10 0F 00 06 4D 51 49 73 64 70 03 02 00 3C 00 01 61",
        ),
        (
            "protocol level 6",
            V311,
            "10 0D 00 04 4D 51 54 54 06 02 00 3C 00 01 61",
        ),
        (
            "protocol name MQTX",
            V311,
            "10 0D 00 04 4D 51 54 58 04 02 00 3C 00 01 61",
        ),
        (
            "CONNECT reserved flag",
            V311,
            "10 0D 00 04 4D 51 54 54 04 03 00 3C 00 01 61",
        ),
        (
            "will QoS without a will",
            V311,
            "10 0D 00 04 4D 51 54 54 04 0A 00 3C 00 01 61",
        ),
        (
            "will QoS 3",
            V5,
            "10 0E 00 04 4D 51 54 54 05 1E 00 3C 00 00 01 61",
        ),
        (
            "3.1.1 password without user name",
            V311,
            "10 10 00 04 4D 51 54 54 04 42 00 3C 00 01 61 00 01 70",
        ),
        (
            "Authentication Data without Method",
            V5,
            "10 12 00 04 4D 51 54 54 05 02 00 3C 04 16 00 01 78 00 01 61",
        ),
        (
            "Request Problem Information 2",
            V5,
            "10 10 00 04 4D 51 54 54 05 02 00 3C 02 17 02 00 01 61",
        ),
        (
            "Will Delay Interval outside the will",
            V5,
            "10 13 00 04 4D 51 54 54 05 02 00 3C 05 18 00 00 00 05 00 01 61",
        ),
        (
            "will topic with a wildcard",
            V311,
            "10 13 00 04 4D 51 54 54 04 06 00 3C 00 01 61 00 01 23 00 01 78",
        ),
        ("PINGREQ with a body", V311, "C0 01 00"),
        ("3.1.1 DISCONNECT with a body", V311, "E0 01 00"),
        ("DISCONNECT reason code 0x05", V5, "E0 01 05"),
    ];
    let mut report = String::new();
    for (label, version, text) in cases {
        let bytes = hex(text);
        let outcome = match decode(&bytes, *version, u32::MAX) {
            Err(error) => {
                // The server can say any failure in the packet it answers
                // with: CONNACK to a CONNECT, DISCONNECT after.
                let answer = match bytes[0] >> 4 {
                    1 => PacketType::ConnAck,
                    _ => PacketType::Disconnect,
                };
                assert!(reason::allowed_in(answer, error.reason_code()), "{label}");
                format!("{:#04x} {error}", error.reason_code())
            }
            Ok(decoded) => format!("decoded {decoded:?}"),
        };
        report.push_str(&format!("{label}: {outcome}\n"));
    }
    expect![[r#"
        packet type 0: 0x81 packet type 0 is reserved in MQTT 5.0
        AUTH under 3.1.1: 0x81 packet type 15 is reserved in MQTT 3.1.1
        PUBREL without its flags: 0x81 PUBREL has fixed-header flags 0b0000: they must be 0b0010
        SUBSCRIBE without its flags: 0x81 SUBSCRIBE has fixed-header flags 0b0000: they must be 0b0010
        UNSUBSCRIBE without its flags: 0x81 UNSUBSCRIBE has fixed-header flags 0b0000: they must be 0b0010
        PINGREQ with a flag: 0x81 PINGREQ has fixed-header flags 0b0001: they must be 0
        PUBLISH QoS 3: 0x81 PUBLISH has fixed-header flags 0b0110: QoS 3
        PUBLISH DUP with QoS 0: 0x81 PUBLISH has fixed-header flags 0b1000: DUP set with QoS 0
        remaining length of five bytes: 0x81 remaining length runs past four bytes
        string past the end: 0x81 PUBLISH ends inside its topic name
        topic not UTF-8: 0x81 topic name is not well-formed UTF-8
        topic with U+0000: 0x81 topic name contains U+0000
        topic with a wildcard: 0x90 topic name is not valid: it has a wildcard
        empty topic under 3.1.1: 0x90 topic name is not valid: it is empty
        empty topic without alias: 0x82 PUBLISH has an empty topic name and no topic alias
        PUBLISH packet id 0: 0x82 PUBLISH has packet identifier 0
        PUBACK packet id 0: 0x82 PUBACK has packet identifier 0
        3.1.1 PUBACK with a reason code: 0x81 PUBACK has bytes left over after its last field (1)
        PUBACK with a PUBREL reason code: 0x82 PUBACK cannot carry reason code 0x92
        unknown property: 0x81 property identifier 0x7f is unknown
        property identifier of five bytes: 0x81 property identifier is a variable byte integer longer than four bytes
        Session Expiry Interval in PUBACK: 0x82 Session Expiry Interval (0x11) is not allowed in PUBACK
        Payload Format Indicator twice: 0x82 Payload Format Indicator (0x01) appears more than once
        Payload Format Indicator 2: 0x82 Payload Format Indicator (0x01) has the invalid value 2
        property length past the end: 0x81 PUBLISH ends inside its properties
        Subscription Identifier 0: 0x82 Subscription Identifier (0x0b) has the invalid value 0
        Receive Maximum 0: 0x82 Receive Maximum (0x21) has the invalid value 0
        Maximum QoS 2: 0x82 Maximum QoS (0x24) has the invalid value 2
        two Subscription Identifiers in SUBSCRIBE: 0x82 Subscription Identifier (0x0b) appears more than once
        subscription options reserved bits: 0x81 subscription options 0b11000000 have reserved bits set or QoS 3
        retain handling 3: 0x82 subscription options ask for retain handling 3
        no local under 3.1.1: 0x81 subscription options 0b00000100 have reserved bits set or QoS 3
        subscription QoS 3: 0x81 subscription options 0b00000011 have reserved bits set or QoS 3
        SUBSCRIBE without filters: 0x82 SUBSCRIBE has no topic filter
        filter with a wildcard inside a level: 0x8f topic filter is not valid: a wildcard shares its level with other characters
        shared subscription without filter: 0x8f topic filter is not valid: the shared subscription has no filter after its share name
        UNSUBSCRIBE without filters: 0x82 UNSUBSCRIBE has no topic filter
        3.1.1 SUBACK code 3: 0x82 SUBACK cannot carry reason code 0x03
        SUBACK without codes: 0x82 SUBACK has no reason code
        CONNACK reserved flags: 0x81 CONNACK flags 0b00000010 have reserved bits set
        3.1.1 CONNACK return code 6: 0x82 CONNACK cannot carry reason code 0x06
        MQTT 3.1 (MQIsdp, level 3): 0x84 protocol level 3 is not supported (4 is MQTT 3.1.1, 5 is MQTT 5.0)
        protocol level 6: 0x84 protocol level 6 is not supported (4 is MQTT 3.1.1, 5 is MQTT 5.0)
        protocol name MQTX: 0x84 protocol name is not "MQTT"
        CONNECT reserved flag: 0x81 CONNECT flags 0b00000011: the reserved bit is set
        will QoS without a will: 0x81 CONNECT flags 0b00001010: will QoS or will retain without a will
        will QoS 3: 0x81 CONNECT flags 0b00011110: will QoS 3
        3.1.1 password without user name: 0x81 CONNECT flags 0b01000010: a password without a user name in MQTT 3.1.1
        Authentication Data without Method: 0x82 CONNECT has Authentication Data without an Authentication Method
        Request Problem Information 2: 0x82 Request Problem Information (0x17) has the invalid value 2
        Will Delay Interval outside the will: 0x82 Will Delay Interval (0x18) is not allowed in CONNECT
        will topic with a wildcard: 0x90 will topic is not valid: it has a wildcard
        PINGREQ with a body: 0x81 PINGREQ has bytes left over after its last field (1)
        3.1.1 DISCONNECT with a body: 0x81 DISCONNECT has bytes left over after its last field (1)
        DISCONNECT reason code 0x05: 0x82 DISCONNECT cannot carry reason code 0x05
    "#]]
    .assert_eq(&report);
}

#[test]
fn too_large_is_refused_from_the_fixed_header() {
    // Only the fixed header of a 2 MiB PUBLISH has arrived.
    let header = hex("30 FF FF 7F");
    let error = decode(&header, V5, 1024).expect_err("too large");
    assert_eq!(
        error,
        DecodeError::PacketTooLarge {
            packet_bytes: 2_097_155,
            max_packet_bytes: 1024
        }
    );
    assert_eq!(error.reason_code(), reason::PACKET_TOO_LARGE);
    assert_eq!(
        decode_connect(&hex("10 FF 7F"), 1024),
        Err(DecodeError::PacketTooLarge {
            packet_bytes: 16_386,
            max_packet_bytes: 1024
        })
    );
    // The limit counts the whole packet, fixed header included.
    let ping = hex("C0 00");
    assert_eq!(decode(&ping, V311, 2), Ok(Some((Packet::PingReq, 2))));
    assert!(matches!(
        decode(&ping, V311, 1),
        Err(DecodeError::PacketTooLarge { .. })
    ));
}

#[test]
fn packets_follow_each_other_in_a_buffer() {
    let mut buffer = hex("C0 00");
    buffer.extend(hex("32 09 00 03 61 2F 62 00 0A 68 69"));
    buffer.extend(hex("E0"));
    assert_eq!(
        decode(&buffer, V311, u32::MAX),
        Ok(Some((Packet::PingReq, 2)))
    );
    assert_eq!(
        decode(&buffer[2..], V311, u32::MAX),
        Ok(Some((publish_example("a/b", Properties::default()), 11)))
    );
    assert_eq!(decode(&buffer[13..], V311, u32::MAX), Ok(None));
}

#[test]
fn the_first_packet_must_be_connect() {
    let bytes = encoded(&connect_example(V5, Properties::default()), V5);
    let Ok(Some((connect, used))) = decode_connect(&bytes, u32::MAX) else {
        panic!("CONNECT decodes");
    };
    assert_eq!((connect.protocol_version, used), (V5, bytes.len()));
    // A server that got CONNECT under 3.1.1 rules still reads a 5.0 one.
    assert!(matches!(
        decode(&bytes, V311, u32::MAX),
        Ok(Some((Packet::Connect(_), _)))
    ));
    assert_eq!(
        decode_connect(&hex("C0 00"), u32::MAX),
        Err(DecodeError::ExpectedConnect { packet_type: 12 })
    );
    assert_eq!(
        decode_connect(&hex("C0"), u32::MAX).map_err(|error| error.reason_code()),
        Err(0x82)
    );
    assert_eq!(decode_connect(&[], u32::MAX), Ok(None));
}

#[test]
fn connect_version_is_readable_before_decoding() {
    let v5 = encoded(&connect_example(V5, Properties::default()), V5);
    let v311 = encoded(&connect_example(V311, Properties::default()), V311);
    assert_eq!(connect_protocol_version(&v5), Some(V5));
    assert_eq!(connect_protocol_version(&v311), Some(V311));
    assert_eq!(connect_protocol_version(&v5[..8]), None);
    assert_eq!(connect_protocol_version(&v5[..9]), Some(V5));
    // A malformed 5.0 CONNECT is still known to be 5.0, so the server can
    // answer with CONNACK 0x81.
    let mut broken = v5.clone();
    broken[9] |= 1;
    assert_eq!(
        decode_connect(&broken, u32::MAX).map_err(|error| error.reason_code()),
        Err(0x81)
    );
    assert_eq!(connect_protocol_version(&broken), Some(V5));
    assert_eq!(connect_protocol_version(&hex("C0 00")), None);
}

#[test]
fn encoding_refuses_what_decoding_would() {
    let publish = |qos, packet_id, dup, topic: &str| {
        Packet::Publish(Publish {
            dup,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id,
            payload: Bytes::new(),
            properties: Properties::default(),
        })
    };
    let with_reason_string = Properties {
        reason_string: Some("why".into()),
        ..Properties::default()
    };
    let cases: Vec<(ProtocolVersion, Packet, EncodeError)> = vec![
        (
            V311,
            Packet::Auth(Auth {
                reason_code: 0,
                properties: Properties::default(),
            }),
            EncodeError::NotInVersion {
                feature: "AUTH",
                version: V311,
            },
        ),
        (
            V311,
            Packet::Disconnect(Disconnect {
                reason_code: 0,
                properties: with_reason_string.clone(),
            }),
            EncodeError::NotInVersion {
                feature: "properties",
                version: V311,
            },
        ),
        (
            V311,
            Packet::Disconnect(Disconnect {
                reason_code: reason::DISCONNECT_WITH_WILL_MESSAGE,
                properties: Properties::default(),
            }),
            EncodeError::InvalidReasonCode {
                packet_type: PacketType::Disconnect,
                code: 0x04,
            },
        ),
        (
            V311,
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: reason::BANNED,
                properties: Properties::default(),
            }),
            EncodeError::InvalidReasonCode {
                packet_type: PacketType::ConnAck,
                code: reason::BANNED,
            },
        ),
        (
            V5,
            publish(QoS::AtLeastOnce, 0, false, "a"),
            EncodeError::InvalidPacketId {
                packet_type: PacketType::Publish,
                packet_id: 0,
            },
        ),
        (
            V5,
            publish(QoS::AtMostOnce, 3, false, "a"),
            EncodeError::InvalidPacketId {
                packet_type: PacketType::Publish,
                packet_id: 3,
            },
        ),
        (
            V5,
            publish(QoS::AtMostOnce, 0, true, "a"),
            EncodeError::DupWithQos0,
        ),
        (
            V5,
            publish(QoS::AtMostOnce, 0, false, ""),
            EncodeError::EmptyTopicWithoutAlias,
        ),
        (
            V5,
            publish(QoS::AtMostOnce, 0, false, "a/#"),
            EncodeError::InvalidTopicName {
                field: "topic name",
                error: crate::mqtt::topic::TopicError::WildcardInName,
            },
        ),
        (
            V5,
            Packet::PubAck(PublishResponse {
                packet_id: 1,
                reason_code: 0,
                properties: Properties {
                    topic_alias: Some(1),
                    ..Properties::default()
                },
            }),
            EncodeError::PropertyNotAllowed {
                property: PropertyId::TopicAlias,
                owner: PropertyOwner::Packet(PacketType::PubAck),
            },
        ),
        (
            V5,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: Vec::new(),
                properties: Properties::default(),
            }),
            EncodeError::EmptyList {
                packet_type: PacketType::Subscribe,
            },
        ),
        (
            V311,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: "a".into(),
                    options: SubscriptionOptions {
                        no_local: true,
                        ..SubscriptionOptions::with_qos(QoS::AtMostOnce)
                    },
                }],
                properties: Properties::default(),
            }),
            EncodeError::NotInVersion {
                feature: "subscription options other than QoS",
                version: V311,
            },
        ),
        (
            V311,
            connect_example(V5, Properties::default()),
            EncodeError::VersionMismatch {
                connect: V5,
                requested: V311,
            },
        ),
    ];
    for (version, packet, expected) in cases {
        let mut out = vec![0xAA];
        assert_eq!(
            encode(&packet, version, &mut out),
            Err(expected.clone()),
            "{packet:?}"
        );
        assert_eq!(out, [0xAA], "nothing written for {packet:?}");
        assert_eq!(encoded_len(&packet, version), Err(expected));
    }

    let Packet::Connect(mut connect) = connect_example(V311, Properties::default()) else {
        unreachable!()
    };
    connect.client_id = "a\0b".into();
    assert_eq!(
        encoded_len(&Packet::Connect(connect.clone()), V311),
        Err(EncodeError::NullCharacter {
            field: "client identifier"
        })
    );
    connect.client_id = "x".repeat(70_000);
    assert_eq!(
        encoded_len(&Packet::Connect(connect), V311),
        Err(EncodeError::FieldTooLong {
            field: "client identifier",
            bytes: 70_000
        })
    );
}

#[test]
fn version_gaps_are_bridged_where_the_meaning_survives() {
    // A 5.0 SUBACK failure becomes the one 3.1.1 failure code.
    let suback = Packet::SubAck(SubAck {
        packet_id: 4,
        reason_codes: vec![reason::GRANTED_QOS_2, reason::NOT_AUTHORIZED],
        properties: Properties::default(),
    });
    assert_eq!(encoded(&suback, V311), hex("90 04 00 04 02 80"));
    // 3.1.1 UNSUBACK and PUBACK imply success codes.
    let unsuback = Packet::UnsubAck(UnsubAck {
        packet_id: 4,
        reason_codes: vec![reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED],
        properties: Properties::default(),
    });
    assert_eq!(encoded(&unsuback, V311), hex("B0 02 00 04"));
    let puback = Packet::PubAck(PublishResponse {
        packet_id: 4,
        reason_code: reason::NO_MATCHING_SUBSCRIBERS,
        properties: Properties::default(),
    });
    assert_eq!(encoded(&puback, V311), hex("40 02 00 04"));
    let failed = Packet::PubAck(PublishResponse {
        packet_id: 4,
        reason_code: reason::QUOTA_EXCEEDED,
        properties: Properties::default(),
    });
    assert!(encode(&failed, V311, &mut Vec::new()).is_err());
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _/é€+#-]{0,10}"
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-z0-9$é]{1,4}(/[a-z0-9]{0,4}){0,3}"
}

fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_string()), "[a-z0-9]{0,3}"];
    (
        prop::collection::vec(level, 1..4),
        any::<bool>(),
        prop::option::of("[a-z]{1,3}"),
    )
        .prop_map(|(levels, multi_level, share)| {
            let mut filter = levels.join("/");
            if multi_level {
                filter.push_str("/#");
            }
            if filter.is_empty() {
                filter.push('#');
            }
            match share {
                Some(group) => format!("$share/{group}/{filter}"),
                None => filter,
            }
        })
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

/// Any value for every property; [`properties_for`] keeps what an owner
/// may carry.
fn any_properties() -> impl Strategy<Value = Properties> {
    use prop::collection::vec;
    use prop::option::of;
    let first = (
        of(prop_oneof![
            Just(PayloadFormat::Bytes),
            Just(PayloadFormat::Utf8)
        ]),
        of(any::<u32>()),
        of(text()),
        of(topic_name()),
        of(payload()),
        vec(1..=268_435_455u32, 0..3),
        of(any::<u32>()),
        of(text()),
        of(any::<u16>()),
        of(text()),
        of(payload()),
        of(any::<bool>()),
    );
    let second = (
        of(any::<u32>()),
        of(any::<bool>()),
        of(text()),
        of(text()),
        of(text()),
        of(1..=u16::MAX),
        of(any::<u16>()),
        of(1..=u16::MAX),
        of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
        of(any::<bool>()),
        vec((text(), text()), 0..3),
        of(1..=u32::MAX),
    );
    let third = (of(any::<bool>()), of(any::<bool>()), of(any::<bool>()));
    (first, second, third).prop_map(|(first, second, third)| Properties {
        payload_format: first.0,
        message_expiry_interval_s: first.1,
        content_type: first.2,
        response_topic: first.3,
        correlation_data: first.4,
        subscription_identifiers: first.5,
        session_expiry_interval_s: first.6,
        assigned_client_identifier: first.7,
        server_keep_alive_s: first.8,
        authentication_method: first.9,
        authentication_data: first.10,
        request_problem_information: first.11,
        will_delay_interval_s: second.0,
        request_response_information: second.1,
        response_information: second.2,
        server_reference: second.3,
        reason_string: second.4,
        receive_maximum: second.5,
        topic_alias_maximum: second.6,
        topic_alias: second.7,
        maximum_qos: second.8,
        retain_available: second.9,
        user_properties: second.10,
        maximum_packet_bytes: second.11,
        wildcard_subscription_available: third.0,
        subscription_identifier_available: third.1,
        shared_subscription_available: third.2,
    })
}

/// Clears what `owner` may not carry.
fn keep_allowed(mut p: Properties, owner: PropertyOwner) -> Properties {
    use PropertyId::*;
    fn keep<T>(slot: &mut Option<T>, property: PropertyId, owner: PropertyOwner) {
        if !property.allowed_in(owner) {
            *slot = None;
        }
    }
    keep(&mut p.payload_format, PayloadFormatIndicator, owner);
    keep(
        &mut p.message_expiry_interval_s,
        MessageExpiryInterval,
        owner,
    );
    keep(&mut p.content_type, ContentType, owner);
    keep(&mut p.response_topic, ResponseTopic, owner);
    keep(&mut p.correlation_data, CorrelationData, owner);
    keep(
        &mut p.session_expiry_interval_s,
        SessionExpiryInterval,
        owner,
    );
    keep(
        &mut p.assigned_client_identifier,
        AssignedClientIdentifier,
        owner,
    );
    keep(&mut p.server_keep_alive_s, ServerKeepAlive, owner);
    keep(&mut p.authentication_method, AuthenticationMethod, owner);
    keep(&mut p.authentication_data, AuthenticationData, owner);
    keep(
        &mut p.request_problem_information,
        RequestProblemInformation,
        owner,
    );
    keep(&mut p.will_delay_interval_s, WillDelayInterval, owner);
    keep(
        &mut p.request_response_information,
        RequestResponseInformation,
        owner,
    );
    keep(&mut p.response_information, ResponseInformation, owner);
    keep(&mut p.server_reference, ServerReference, owner);
    keep(&mut p.reason_string, ReasonString, owner);
    keep(&mut p.receive_maximum, ReceiveMaximum, owner);
    keep(&mut p.topic_alias_maximum, TopicAliasMaximum, owner);
    keep(&mut p.topic_alias, TopicAlias, owner);
    keep(&mut p.maximum_qos, MaximumQos, owner);
    keep(&mut p.retain_available, RetainAvailable, owner);
    keep(&mut p.maximum_packet_bytes, MaximumPacketSize, owner);
    keep(
        &mut p.wildcard_subscription_available,
        WildcardSubscriptionAvailable,
        owner,
    );
    keep(
        &mut p.subscription_identifier_available,
        SubscriptionIdentifierAvailable,
        owner,
    );
    keep(
        &mut p.shared_subscription_available,
        SharedSubscriptionAvailable,
        owner,
    );
    if !SubscriptionIdentifier.allowed_in(owner) {
        p.subscription_identifiers.clear();
    } else if owner != PropertyOwner::Packet(PacketType::Publish) {
        p.subscription_identifiers.truncate(1);
    }
    if !UserProperty.allowed_in(owner) {
        p.user_properties.clear();
    }
    if owner == PropertyOwner::Packet(PacketType::Connect) && p.authentication_method.is_none() {
        p.authentication_data = None;
    }
    p
}

fn properties_for(version: ProtocolVersion, owner: PropertyOwner) -> BoxedStrategy<Properties> {
    match version {
        V5 => any_properties()
            .prop_map(move |p| keep_allowed(p, owner))
            .boxed(),
        V311 => Just(Properties::default()).boxed(),
    }
}

fn packet_properties(
    version: ProtocolVersion,
    packet_type: PacketType,
) -> BoxedStrategy<Properties> {
    properties_for(version, PropertyOwner::Packet(packet_type))
}

/// A reason code `packet_type` may carry in `version`, as decoding
/// returns it.
fn reason_code(version: ProtocolVersion, packet_type: PacketType) -> BoxedStrategy<u8> {
    let codes: Vec<u8> = match (version, packet_type) {
        (V311, PacketType::ConnAck) => vec![0x00, 0x84, 0x85, 0x86, 0x87, 0x88],
        (V311, PacketType::SubAck) => vec![0, 1, 2, 0x80],
        (V311, _) => vec![0],
        (V5, _) => (0..=255)
            .filter(|&code| reason::allowed_in(packet_type, code))
            .collect(),
    };
    prop::sample::select(codes).boxed()
}

fn will(version: ProtocolVersion) -> impl Strategy<Value = Will> {
    (
        topic_name(),
        payload(),
        qos(),
        any::<bool>(),
        properties_for(version, PropertyOwner::Will),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        })
}

fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let connect = (
        any::<bool>(),
        any::<u16>(),
        text(),
        prop::option::of(will(version)),
        prop::option::of(text()),
        prop::option::of(payload()),
        packet_properties(version, PacketType::Connect),
    )
        .prop_map(
            move |(clean_start, keep_alive_s, client_id, will, username, password, properties)| {
                let password = if version == V311 && username.is_none() {
                    None
                } else {
                    password
                };
                Packet::Connect(Box::new(Connect {
                    protocol_version: version,
                    clean_start,
                    keep_alive_s,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        );
    let connack = (
        any::<bool>(),
        reason_code(version, PacketType::ConnAck),
        packet_properties(version, PacketType::ConnAck),
    )
        .prop_map(|(session_present, reason_code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present,
                reason_code,
                properties,
            })
        });
    let publish = (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        1..=u16::MAX,
        payload(),
        packet_properties(version, PacketType::Publish),
    )
        .prop_map(
            move |(dup, qos, retain, topic, use_alias, packet_id, payload, properties)| {
                let aliased = version == V5 && use_alias && properties.topic_alias.is_some();
                Packet::Publish(Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos,
                    retain,
                    topic: if aliased { String::new() } else { topic },
                    packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
                    payload,
                    properties,
                })
            },
        );
    let response = |packet_type: PacketType, wrap: fn(PublishResponse) -> Packet| {
        (
            1..=u16::MAX,
            reason_code(version, packet_type),
            packet_properties(version, packet_type),
        )
            .prop_map(move |(packet_id, reason_code, properties)| {
                wrap(PublishResponse {
                    packet_id,
                    reason_code,
                    properties,
                })
            })
    };
    let options = (qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(
        move |(qos, no_local, retain_as_published, handling)| {
            if version == V311 {
                return SubscriptionOptions::with_qos(qos);
            }
            SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling: match handling {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendAtSubscribeIfNew,
                    _ => RetainHandling::DoNotSend,
                },
            }
        },
    );
    let subscribe = (
        1..=u16::MAX,
        prop::collection::vec((topic_filter(), options), 1..4),
        packet_properties(version, PacketType::Subscribe),
    )
        .prop_map(|(packet_id, subscriptions, properties)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions: subscriptions
                    .into_iter()
                    .map(|(filter, options)| Subscription { filter, options })
                    .collect(),
                properties,
            })
        });
    let suback = (
        1..=u16::MAX,
        prop::collection::vec(reason_code(version, PacketType::SubAck), 1..4),
        packet_properties(version, PacketType::SubAck),
    )
        .prop_map(|(packet_id, reason_codes, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reason_codes,
                properties,
            })
        });
    let unsubscribe = (
        1..=u16::MAX,
        prop::collection::vec(topic_filter(), 1..4),
        packet_properties(version, PacketType::Unsubscribe),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        });
    let unsuback_codes = match version {
        V5 => prop::collection::vec(reason_code(version, PacketType::UnsubAck), 1..4).boxed(),
        V311 => Just(Vec::new()).boxed(),
    };
    let unsuback = (
        1..=u16::MAX,
        unsuback_codes,
        packet_properties(version, PacketType::UnsubAck),
    )
        .prop_map(|(packet_id, reason_codes, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reason_codes,
                properties,
            })
        });
    let disconnect = (
        reason_code(version, PacketType::Disconnect),
        packet_properties(version, PacketType::Disconnect),
    )
        .prop_map(|(reason_code, properties)| {
            Packet::Disconnect(Disconnect {
                reason_code,
                properties,
            })
        });
    let common = prop_oneof![
        connect,
        connack,
        publish,
        response(PacketType::PubAck, Packet::PubAck),
        response(PacketType::PubRec, Packet::PubRec),
        response(PacketType::PubRel, Packet::PubRel),
        response(PacketType::PubComp, Packet::PubComp),
        subscribe,
        suback,
        unsubscribe,
        unsuback,
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect,
    ];
    match version {
        V311 => common.boxed(),
        V5 => {
            let auth = (
                reason_code(version, PacketType::Auth),
                packet_properties(version, PacketType::Auth),
            )
                .prop_map(|(reason_code, properties)| {
                    Packet::Auth(Auth {
                        reason_code,
                        properties,
                    })
                });
            prop_oneof![14 => common, 1 => auth].boxed()
        }
    }
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(V311), Just(V5)]
}

fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|version| (Just(version), packet(version)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_packet_round_trips((version, packet) in versioned_packet()) {
        let bytes = encoded(&packet, version);
        prop_assert_eq!(encoded_len(&packet, version), Ok(bytes.len()));
        prop_assert_eq!(decode(&bytes, version, u32::MAX), Ok(Some((packet.clone(), bytes.len()))));
        prop_assert_eq!(decode(&bytes, version, bytes.len() as u32), Ok(Some((packet.clone(), bytes.len()))));
        let too_large = decode(&bytes, version, bytes.len() as u32 - 1);
        prop_assert!(matches!(too_large, Err(DecodeError::PacketTooLarge { .. })), "{:?}", too_large);
        if let Packet::Connect(connect) = &packet {
            prop_assert_eq!(decode_connect(&bytes, u32::MAX), Ok(Some(((**connect).clone(), bytes.len()))));
            prop_assert_eq!(connect_protocol_version(&bytes), Some(version));
        }
    }

    #[test]
    fn truncated_packets_ask_for_more((version, packet) in versioned_packet()) {
        let bytes = encoded(&packet, version);
        for end in 0..bytes.len() {
            prop_assert_eq!(decode(&bytes[..end], version, u32::MAX), Ok(None), "first {} bytes", end);
        }
    }

    #[test]
    fn corrupted_packets_never_panic(
        (version, packet) in versioned_packet(),
        position in any::<prop::sample::Index>(),
        value in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encoded(&packet, version);
        let at = position.index(bytes.len());
        bytes[at] = value;
        decode_and_reencode(&bytes);
        // A corrupted length with a body cut short anywhere.
        let end = cut.index(bytes.len() + 1);
        decode_and_reencode(&bytes[..end]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        decode_and_reencode(&bytes);
    }
}
