//! Arbitrary bytes as index files and checkpoints: decoding never panics and
//! what it keeps is ordered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_core::checkpoint::Checkpoint;
use rill_core::index::{decode_offset_index, decode_time_index};

fuzz_target!(|bytes: &[u8]| {
    let (entries, _) = decode_offset_index(bytes, 1 << 20);
    assert!(entries.windows(2).all(|pair| pair[0].relative_offset < pair[1].relative_offset));
    let (entries, _) = decode_time_index(bytes);
    assert!(entries.windows(2).all(|pair| pair[0].timestamp <= pair[1].timestamp));
    if let Ok(checkpoint) = Checkpoint::decode(bytes) {
        assert_eq!(Checkpoint::decode(&checkpoint.encode()), Ok(checkpoint));
    }
});
