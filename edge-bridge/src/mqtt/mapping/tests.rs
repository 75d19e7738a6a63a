use bytes::Bytes;

use super::*;
use crate::mqtt::topic::TopicError;

fn rule(filter: &str, topic: &str, key: KeySource) -> Rule {
    Rule {
        filter: filter.into(),
        topic: topic.into(),
        key,
    }
}

fn sensors() -> Mapping {
    Mapping::new(
        vec![
            rule(
                "sensors/+/temperature",
                "sensor-temperature",
                KeySource::Level(1),
            ),
            rule("sensors/#", "sensors-other", KeySource::Topic),
            rule("plant/status", "plant", KeySource::ClientId),
            rule("$SYS/+/load", "sys", KeySource::None),
        ],
        Unmatched::Topic("mqtt-other".into()),
    )
    .expect("valid rules")
}

#[test]
fn first_matching_rule_wins_with_its_key() {
    let mapping = sensors();
    let table: [(&str, &str, Option<&[u8]>); 5] = [
        (
            "sensors/dev7/temperature",
            "sensor-temperature",
            Some(b"dev7"),
        ),
        (
            "sensors/dev7/humidity",
            "sensors-other",
            Some(b"sensors/dev7/humidity"),
        ),
        ("plant/status", "plant", Some(b"client-1")),
        ("$SYS/a/load", "sys", None),
        ("elsewhere/x", "mqtt-other", Some(b"elsewhere/x")),
    ];
    for (mqtt_topic, topic, key) in table {
        assert_eq!(
            mapping.route(mqtt_topic, "client-1"),
            Ok(Route {
                topic: topic.into(),
                key: key.map(<[u8]>::to_vec),
            }),
            "{mqtt_topic}"
        );
    }
}

#[test]
fn unmatched_can_be_refused() {
    let mapping =
        Mapping::new(vec![rule("a/+", "a", KeySource::None)], Unmatched::Refuse).expect("valid");
    assert_eq!(mapping.route("b", "c"), Err(Refused));
    // `$` topics are not matched by a leading wildcard.
    let mapping =
        Mapping::new(vec![rule("#", "all", KeySource::None)], Unmatched::Refuse).expect("valid");
    assert_eq!(mapping.route("$SYS/x", "c"), Err(Refused));
    assert!(mapping.route("x", "c").is_ok());
}

#[test]
fn invalid_rules_are_named() {
    let table = [
        (
            rule("a/#/b", "t", KeySource::None),
            "rule 0: filter \"a/#/b\" is not a valid MQTT topic filter: '#' is not the last level",
        ),
        (
            rule("$share/g/a", "t", KeySource::None),
            "rule 0: filter \"$share/g/a\" is a shared subscription, not a topic filter",
        ),
        (
            rule("a", "", KeySource::None),
            "rule 0: topic name is empty",
        ),
        (
            rule("a", "bad/topic", KeySource::None),
            "rule 0: topic name \"bad/topic\" has '/'; only [a-zA-Z0-9._-] are allowed",
        ),
        (
            rule("a", "..", KeySource::None),
            "rule 0: topic name \"..\" may not be '.' or '..'",
        ),
        (
            rule("a", &"x".repeat(250), KeySource::None),
            "rule 0: topic name has 250 characters, over the 249 allowed",
        ),
        (
            rule("a/+", "t", KeySource::Level(2)),
            "rule 0: key level 2 is past the filter's 2 levels",
        ),
        (
            rule("a/#", "t", KeySource::Level(1)),
            "rule 0: key level 1 is the multi-level wildcard '#'",
        ),
    ];
    for (rule, message) in table {
        let error = Mapping::new(vec![rule], Unmatched::Refuse).expect_err("invalid");
        assert_eq!(error.to_string(), message);
    }
    assert_eq!(
        Mapping::new(Vec::new(), Unmatched::Topic("a b".into())),
        Err(MappingError::InvalidCatchAllTopic(
            TopicNameError::InvalidCharacter {
                name: "a b".into(),
                character: ' '
            }
        ))
    );
    assert!(matches!(
        Mapping::new(vec![rule("", "t", KeySource::None)], Unmatched::Refuse),
        Err(MappingError::InvalidFilter {
            error: TopicError::Empty,
            ..
        })
    ));
    assert_eq!(validate_rill_topic(&"x".repeat(249)), Ok(()));
    assert_eq!(validate_rill_topic("a.b_c-D9"), Ok(()));
}

#[test]
fn records_without_mqtt_topic_map_back_through_rules() {
    let mapping = sensors();
    type Case<'a> = (&'a str, Option<&'a [u8]>, Option<&'a str>);
    let table: [Case; 9] = [
        // The example of the issue: key from level 1.
        (
            "sensor-temperature",
            Some(b"dev7"),
            Some("sensors/dev7/temperature"),
        ),
        // A key that is not one level cannot be put in a level.
        ("sensor-temperature", Some(b"a/b"), None),
        ("sensor-temperature", Some(b"+"), None),
        ("sensor-temperature", Some(&[0xFF]), None),
        ("sensor-temperature", None, None),
        // Key is the topic: it must match the rule's filter.
        ("sensors-other", Some(b"sensors/x/y"), Some("sensors/x/y")),
        ("sensors-other", Some(b"other/x"), None),
        // No wildcard: the filter is the topic.
        ("plant", Some(b"anything"), Some("plant/status")),
        // No rule sends to this topic.
        ("unknown", Some(b"dev7"), None),
    ];
    for (rill_topic, key, expected) in table {
        assert_eq!(
            mapping
                .mqtt_topic_of_record(rill_topic, &[], key)
                .as_deref(),
            expected,
            "{rill_topic} {key:?}"
        );
    }
    // A filter keeping another wildcard cannot be rebuilt from one key.
    let rule = rule("a/+/+", "t", KeySource::Level(1));
    assert_eq!(rule.reverse_topic(Some(b"x")), None);
    let rule = Rule {
        filter: "a/+".into(),
        ..rule
    };
    assert_eq!(rule.reverse_topic(Some(b"x")).as_deref(), Some("a/x"));
}

#[test]
fn later_rules_map_back_when_earlier_ones_cannot() {
    let mapping = Mapping::new(
        vec![
            rule("a/+/b", "shared", KeySource::Level(1)),
            rule("c/#", "shared", KeySource::Topic),
        ],
        Unmatched::Refuse,
    )
    .expect("valid");
    assert_eq!(
        mapping.mqtt_topic_of_record("shared", &[], Some(b"c/d")),
        Some("c/d".into())
    );
    assert_eq!(
        mapping.mqtt_topic_of_record("shared", &[], Some(b"x")),
        Some("a/x/b".into())
    );
}

#[test]
fn headers_round_trip() {
    let message = Message {
        topic: "sensors/dev7/temperature".into(),
        payload: Bytes::from_static(b"21.5"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: MessageProperties {
            payload_format: Some(PayloadFormat::Utf8),
            expires_at_ms: Some(90_000),
            content_type: Some("text/plain".into()),
            response_topic: Some("replies/dev7".into()),
            correlation_data: Some(Bytes::from_static(&[1, 2])),
            user_properties: vec![
                ("unit".into(), "C".into()),
                ("unit".into(), "celsius".into()),
            ],
        },
    };
    let headers = record_headers(&message, "dev7-client");
    assert_eq!(publisher_of_record(&headers), Some("dev7-client"));
    let text: Vec<String> = headers
        .iter()
        .map(|(name, value)| format!("{name}={}", String::from_utf8_lossy(value)))
        .collect();
    assert_eq!(
        text,
        [
            "mqtt.topic=sensors/dev7/temperature",
            "mqtt.client_id=dev7-client",
            "mqtt.qos=1",
            "mqtt.retain=1",
            "mqtt.content_type=text/plain",
            "mqtt.payload_format=1",
            "mqtt.message_expiry=90000",
            "mqtt.response_topic=replies/dev7",
            "mqtt.correlation_data=\u{1}\u{2}",
            "mqtt.user.unit=C",
            "mqtt.user.unit=celsius",
        ]
    );
    let mapping = sensors();
    let back = mapping.message_from_record(
        "sensor-temperature",
        &headers,
        Some(b"dev7"),
        message.payload.clone(),
        89_999,
    );
    assert_eq!(back, Some(message.clone()));
    // Expired by the time it is read: not delivered.
    assert_eq!(
        mapping.message_from_record(
            "sensor-temperature",
            &headers,
            Some(b"dev7"),
            message.payload,
            90_000
        ),
        None
    );
}

#[test]
fn foreign_records_are_qos_2_and_not_retained() {
    let mapping = sensors();
    let headers = vec![
        ("mqtt.qos".to_owned(), b"7".to_vec()),
        ("mqtt.payload_format".to_owned(), b"x".to_vec()),
        ("mqtt.user.bad\0name".to_owned(), b"v".to_vec()),
        ("other".to_owned(), b"v".to_vec()),
    ];
    let message = mapping
        .message_from_record(
            "sensor-temperature",
            &headers,
            Some(b"dev9"),
            Bytes::from_static(b"x"),
            0,
        )
        .expect("maps back");
    assert_eq!(message.topic, "sensors/dev9/temperature");
    assert_eq!(message.qos, QoS::ExactlyOnce);
    assert!(!message.retain);
    assert_eq!(message.properties, MessageProperties::default());
    // A bad `mqtt.topic` header falls back to the rules.
    let headers = vec![("mqtt.topic".to_owned(), b"a/+".to_vec())];
    assert_eq!(
        mapping.mqtt_topic_of_record("sensor-temperature", &headers, Some(b"d")),
        Some("sensors/d/temperature".into())
    );
}

#[test]
fn overlap_table() {
    let table = [
        ("a/+/c", "a/b/c", true),
        ("a/+/c", "a/b/d", false),
        ("a/#", "a", true),
        ("a/#", "+/x/y", true),
        ("+", "a/b", false),
        ("#", "$SYS/x", false),
        ("$SYS/#", "+/x", false),
        ("$SYS/#", "$SYS/x", true),
        ("a/b", "a/b/c", false),
        ("a/+", "+/b", true),
    ];
    for (first, second, expected) in table {
        assert_eq!(filters_overlap(first, second), expected, "{first} {second}");
        assert_eq!(filters_overlap(second, first), expected, "{second} {first}");
    }
}

#[test]
fn source_topics_of_a_subscription() {
    let mapping = sensors();
    assert_eq!(
        mapping.source_topics("sensors/dev7/+"),
        ["sensor-temperature", "sensors-other", "mqtt-other"]
    );
    assert_eq!(mapping.source_topics("plant/#"), ["plant", "mqtt-other"]);
    assert_eq!(mapping.source_topics("$SYS/#"), ["sys", "mqtt-other"]);
}
