//! Arbitrary bytes through the batch checker and the record walker: never a
//! panic, and whatever passes the check walks cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_core::batch::{BATCH_HEADER_BYTES, Compression, RecordIter, check_batch};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(header) = check_batch(bytes) {
        if header.compression() == Some(Compression::None) {
            let records = RecordIter::new(&bytes[BATCH_HEADER_BYTES..]).count();
            assert_eq!(records as i32, header.record_count);
        }
    }
    for record in RecordIter::new(bytes) {
        if record.is_err() {
            break;
        }
    }
});
