//! An application message as the server keeps it between a PUBLISH in and
//! the PUBLISHes out: the topic, payload, QoS and retain flag it was
//! published with, and the PUBLISH properties that travel with it (user
//! properties, content type, ...). The message expiry interval is kept as
//! an absolute deadline in milliseconds, so a message that waits in a
//! queue, a session or the retained store counts down its remaining life
//! as MQTT 5.0 asks (section 3.3.2.3.3).

use bytes::Bytes;

use super::packet::{Publish, QoS, Will};
use super::properties::{PayloadFormat, Properties};

/// The PUBLISH properties an application message carries end to end.
/// Topic alias and subscription identifiers are per connection and are
/// not part of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    pub payload_format: Option<PayloadFormat>,
    /// When the message expires, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl MessageProperties {
    /// The message's properties from a PUBLISH's (or a will's) properties
    /// received at `now_ms`.
    pub fn from_properties(properties: &Properties, now_ms: u64) -> MessageProperties {
        MessageProperties {
            payload_format: properties.payload_format,
            expires_at_ms: properties
                .message_expiry_interval_s
                .map(|interval_s| now_ms.saturating_add(u64::from(interval_s) * 1000)),
            content_type: properties.content_type.clone(),
            response_topic: properties.response_topic.clone(),
            correlation_data: properties.correlation_data.clone(),
            user_properties: properties.user_properties.clone(),
        }
    }

    /// Whether the message has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at_ms| at_ms <= now_ms)
    }

    /// PUBLISH properties for sending at `now_ms`: the expiry interval is
    /// what remains of it, rounded up so that a live message never says 0.
    pub fn to_properties(&self, now_ms: u64) -> Properties {
        Properties {
            payload_format: self.payload_format,
            message_expiry_interval_s: self.expires_at_ms.map(|at_ms| {
                let remaining_ms = at_ms.saturating_sub(now_ms);
                u32::try_from(remaining_ms.div_ceil(1000)).unwrap_or(u32::MAX)
            }),
            content_type: self.content_type.clone(),
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone(),
            user_properties: self.user_properties.clone(),
            ..Properties::default()
        }
    }
}

/// One application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The MQTT topic name it was published on (never an alias).
    pub topic: String,
    pub payload: Bytes,
    /// The QoS it was published with: the most a subscriber gets.
    pub qos: QoS,
    /// The retain flag it was published with.
    pub retain: bool,
    pub properties: MessageProperties,
}

impl Message {
    /// The message a PUBLISH carries, received at `now_ms`; `topic` is the
    /// topic name after alias resolution.
    pub fn from_publish(publish: &Publish, topic: &str, now_ms: u64) -> Message {
        Message {
            topic: topic.to_owned(),
            payload: publish.payload.clone(),
            qos: publish.qos,
            retain: publish.retain,
            properties: MessageProperties::from_properties(&publish.properties, now_ms),
        }
    }

    /// The message a will becomes when it is published at `now_ms`.
    pub fn from_will(will: &Will, now_ms: u64) -> Message {
        Message {
            topic: will.topic.clone(),
            payload: will.payload.clone(),
            qos: will.qos,
            retain: will.retain,
            properties: MessageProperties::from_properties(&will.properties, now_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_counts_down_and_rounds_up() {
        let properties = Properties {
            message_expiry_interval_s: Some(10),
            ..Properties::default()
        };
        let message = MessageProperties::from_properties(&properties, 5_000);
        assert_eq!(message.expires_at_ms, Some(15_000));
        assert_eq!(
            message.to_properties(5_000).message_expiry_interval_s,
            Some(10)
        );
        assert_eq!(
            message.to_properties(14_001).message_expiry_interval_s,
            Some(1)
        );
        assert!(!message.is_expired(14_999));
        assert!(message.is_expired(15_000));
        let none = MessageProperties::default();
        assert!(!none.is_expired(u64::MAX));
        assert_eq!(none.to_properties(0), Properties::default());
    }
}
