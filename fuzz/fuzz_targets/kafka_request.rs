//! Arbitrary bytes as the body of a Kafka request frame, through the same
//! decoding the Kafka listener runs: never a panic, never an allocation
//! sized by a count on the wire, and a decoded request re-encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_node::kafka::codec::{Decoded, decode_request_frame};

fuzz_target!(|bytes: &[u8]| {
    if let Decoded::Request {
        version, request, ..
    } = decode_request_frame(&bytes::Bytes::copy_from_slice(bytes))
    {
        let mut out = bytes::BytesMut::new();
        // Whatever decoded must encode again at the same version.
        assert!(request.encode(&mut out, version).is_ok());
    }
});
