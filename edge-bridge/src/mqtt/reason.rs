//! MQTT 5.0 reason codes (specification section 2.4), which packets may
//! carry each, and how the 3.1.1 CONNACK return codes map onto them.
//!
//! Codes are plain `u8` constants because one value means different things
//! in different packets (0x00 is Success, Normal disconnection and Granted
//! QoS 0). Codes below 0x80 report success, 0x80 and above failure.

use super::packet::PacketType;

pub const SUCCESS: u8 = 0x00;
pub const NORMAL_DISCONNECTION: u8 = 0x00;
pub const GRANTED_QOS_0: u8 = 0x00;
pub const GRANTED_QOS_1: u8 = 0x01;
pub const GRANTED_QOS_2: u8 = 0x02;
pub const DISCONNECT_WITH_WILL_MESSAGE: u8 = 0x04;
pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
pub const RE_AUTHENTICATE: u8 = 0x19;
pub const UNSPECIFIED_ERROR: u8 = 0x80;
pub const MALFORMED_PACKET: u8 = 0x81;
pub const PROTOCOL_ERROR: u8 = 0x82;
pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
pub const NOT_AUTHORIZED: u8 = 0x87;
pub const SERVER_UNAVAILABLE: u8 = 0x88;
pub const SERVER_BUSY: u8 = 0x89;
pub const BANNED: u8 = 0x8A;
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
pub const TOPIC_NAME_INVALID: u8 = 0x90;
pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
pub const PACKET_TOO_LARGE: u8 = 0x95;
pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
pub const QUOTA_EXCEEDED: u8 = 0x97;
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
pub const USE_ANOTHER_SERVER: u8 = 0x9C;
pub const SERVER_MOVED: u8 = 0x9D;
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

/// The 3.1.1 SUBACK failure return code (the same value as 5.0's
/// Unspecified error).
pub const V311_SUBSCRIBE_FAILURE: u8 = 0x80;

const CONNACK: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_PUBREC: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_PUBCOMP: &[u8] = &[0x00, 0x92];
const SUBACK: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH: &[u8] = &[0x00, 0x18, 0x19];

/// Whether MQTT 5.0 lets `packet_type` carry `code` (the tables of
/// sections 3.2.2.2 to 3.15.2.1). Packets without a reason code carry none.
pub fn allowed_in(packet_type: PacketType, code: u8) -> bool {
    let allowed = match packet_type {
        PacketType::ConnAck => CONNACK,
        PacketType::PubAck | PacketType::PubRec => PUBACK_PUBREC,
        PacketType::PubRel | PacketType::PubComp => PUBREL_PUBCOMP,
        PacketType::SubAck => SUBACK,
        PacketType::UnsubAck => UNSUBACK,
        PacketType::Disconnect => DISCONNECT,
        PacketType::Auth => AUTH,
        _ => &[],
    };
    allowed.contains(&code)
}

/// The 3.1.1 CONNACK return code for a 5.0 CONNACK reason code, where
/// 3.1.1 has one. Other refusals have no 3.1.1 form: the server closes the
/// connection instead.
pub fn connack_v311_return_code(code: u8) -> Option<u8> {
    Some(match code {
        SUCCESS => 0,
        UNSUPPORTED_PROTOCOL_VERSION => 1,
        CLIENT_IDENTIFIER_NOT_VALID => 2,
        SERVER_UNAVAILABLE => 3,
        BAD_USER_NAME_OR_PASSWORD => 4,
        NOT_AUTHORIZED => 5,
        _ => return None,
    })
}

/// The 5.0 reason code for a 3.1.1 CONNACK return code (0 to 5).
pub fn connack_from_v311_return_code(return_code: u8) -> Option<u8> {
    Some(match return_code {
        0 => SUCCESS,
        1 => UNSUPPORTED_PROTOCOL_VERSION,
        2 => CLIENT_IDENTIFIER_NOT_VALID,
        3 => SERVER_UNAVAILABLE,
        4 => BAD_USER_NAME_OR_PASSWORD,
        5 => NOT_AUTHORIZED,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connack_return_codes_map_both_ways() {
        for return_code in 0..=5 {
            let code = connack_from_v311_return_code(return_code);
            assert!(code.is_some_and(|code| allowed_in(PacketType::ConnAck, code)));
            assert_eq!(code.and_then(connack_v311_return_code), Some(return_code));
        }
        assert_eq!(connack_from_v311_return_code(6), None);
        assert_eq!(connack_v311_return_code(BANNED), None);
    }

    #[test]
    fn tables_hold_their_packets_codes() {
        assert!(allowed_in(PacketType::PubAck, NO_MATCHING_SUBSCRIBERS));
        assert!(!allowed_in(PacketType::PubRel, NO_MATCHING_SUBSCRIBERS));
        assert!(allowed_in(
            PacketType::Disconnect,
            DISCONNECT_WITH_WILL_MESSAGE
        ));
        assert!(!allowed_in(
            PacketType::ConnAck,
            DISCONNECT_WITH_WILL_MESSAGE
        ));
        assert!(allowed_in(PacketType::Auth, RE_AUTHENTICATE));
        assert!(!allowed_in(PacketType::Publish, SUCCESS));
    }
}
