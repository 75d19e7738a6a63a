//! Arbitrary bytes as what an MQTT connection buffered, in both protocol
//! versions and as a first packet: decoding never panics, and whatever
//! decodes re-encodes, measures what it writes, and decodes to the same
//! packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_edge_bridge::mqtt::{
    Packet, ProtocolVersion, decode, decode_connect, encode, encoded_len,
};

fn check_reencodes(packet: Packet, version: ProtocolVersion) {
    // A CONNECT carries its own version.
    let version = match &packet {
        Packet::Connect(connect) => connect.protocol_version,
        _ => version,
    };
    let mut out = Vec::new();
    assert!(encode(&packet, version, &mut out).is_ok(), "{packet:?}");
    assert_eq!(encoded_len(&packet, version), Ok(out.len()));
    assert_eq!(
        decode(&out, version, u32::MAX),
        Ok(Some((packet, out.len())))
    );
}

fuzz_target!(|bytes: &[u8]| {
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut rest = bytes;
        while let Ok(Some((packet, used))) = decode(rest, version, u32::MAX) {
            check_reencodes(packet, version);
            rest = &rest[used..];
        }
        // A small limit is refused from the fixed header, never a panic.
        let _ = decode(bytes, version, 64);
    }
    if let Ok(Some((connect, _))) = decode_connect(bytes, u32::MAX) {
        let version = connect.protocol_version;
        check_reencodes(Packet::Connect(Box::new(connect)), version);
    }
});
