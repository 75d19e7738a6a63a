use super::*;
use expect_test::expect;

fn sample_batch() -> Vec<u8> {
    encode_batch(&[
        Record {
            timestamp_ms: 1_700_000_000_000,
            key: Some(b"k1".to_vec()),
            value: Some(b"hello".to_vec()),
            headers: vec![(b"h".to_vec(), Some(b"v".to_vec()))],
        },
        Record {
            timestamp_ms: 1_700_000_000_005,
            key: None,
            value: Some(b"world".to_vec()),
            headers: vec![],
        },
    ])
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| {
            line.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn encoded_batch_matches_the_kafka_layout() {
    expect![[r#"
        00 00 00 00 00 00 00 00 00 00 00 4f 00 00 00 00
        02 4b f4 2f 08 00 00 00 00 00 01 00 00 01 8b cf
        e5 68 00 00 00 01 8b cf e5 68 05 ff ff ff ff ff
        ff ff ff ff ff ff ff ff ff 00 00 00 02 22 00 00
        00 04 6b 31 0a 68 65 6c 6c 6f 02 02 68 02 76 16
        00 0a 02 01 0a 77 6f 72 6c 64 00"#]]
    .assert_eq(&hex(&sample_batch()));
}

#[test]
fn checked_batch_reports_its_header_and_records() {
    let batch = sample_batch();
    let header = check_batch(&batch).expect("valid batch");
    assert_eq!(header.record_count, 2);
    assert_eq!(header.last_offset_delta, 1);
    assert_eq!(header.max_timestamp, 1_700_000_000_005);
    let records: Vec<_> = RecordIter::new(&batch[BATCH_HEADER_BYTES..])
        .collect::<Result<_, _>>()
        .expect("records");
    assert_eq!(records[0].key, Some(&b"k1"[..]));
    assert_eq!(records[0].headers[0].value, Some(&b"v"[..]));
    assert_eq!(records[1].timestamp_delta, 5);
    assert_eq!(records[1].value, Some(&b"world"[..]));
}

#[test]
fn every_check_names_what_failed() {
    let good = sample_batch();
    assert!(matches!(
        check_batch(&good[..40]),
        Err(BatchError::TooShort { actual: 40 })
    ));

    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        check_batch(&longer),
        Err(BatchError::LengthMismatch { .. })
    ));

    let mut magic = good.clone();
    magic[16] = 1;
    assert_eq!(check_batch(&magic), Err(BatchError::BadMagic { found: 1 }));

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    let error = check_batch(&flipped).expect_err("bit flip");
    assert!(matches!(error, BatchError::CrcMismatch { .. }));
    assert!(error.to_string().contains("CRC-32C mismatch"), "{error}");
}

#[test]
fn record_framing_that_disagrees_with_the_header_is_refused() {
    // Claim three records while two are present, with a correct CRC.
    let mut batch = sample_batch();
    batch[57..61].copy_from_slice(&3i32.to_be_bytes());
    batch[23..27].copy_from_slice(&2i32.to_be_bytes());
    let crc = compute_crc(&batch);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    assert!(matches!(
        check_batch(&batch),
        Err(BatchError::MalformedRecords { .. })
    ));
}

#[test]
fn stamping_sets_offset_and_keeps_the_checksum_valid() {
    let mut batch = sample_batch();
    stamp_batch(&mut batch, 42, None);
    let header = check_batch(&batch).expect("still valid");
    assert_eq!(header.base_offset, 42);
    assert_eq!(header.last_offset(), 43);
    assert!(!header.is_log_append_time());

    stamp_batch(&mut batch, 7, Some(1_800_000_000_000));
    let header = check_batch(&batch).expect("valid after log-append time");
    assert!(header.is_log_append_time());
    assert_eq!(header.max_timestamp, 1_800_000_000_000);
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_checker(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
        let _ = check_batch(&bytes);
        for record in RecordIter::new(&bytes) {
            if record.is_err() { break; }
        }
    }

    #[test]
    fn built_batches_round_trip(values in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 1..20)) {
        let records: Vec<Record> = values.iter().enumerate().map(|(index, value)| Record {
            timestamp_ms: 1000 + index as i64,
            key: (index % 2 == 0).then(|| vec![index as u8]),
            value: Some(value.clone()),
            headers: vec![],
        }).collect();
        let batch = encode_batch(&records);
        let header = check_batch(&batch).expect("built batch is valid");
        proptest::prop_assert_eq!(header.record_count as usize, records.len());
        let decoded: Vec<_> = RecordIter::new(&batch[BATCH_HEADER_BYTES..]).collect::<Result<_, _>>().expect("decode");
        for (view, record) in decoded.iter().zip(&records) {
            proptest::prop_assert_eq!(view.value, record.value.as_deref());
            proptest::prop_assert_eq!(view.key, record.key.as_deref());
        }
    }
}
