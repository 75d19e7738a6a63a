use rill_core::batch::{BatchHeader, Header, RecordBuilder, check_batch};

use super::*;

const LIMIT: usize = 1 << 20;

fn provenance(offset: u64) -> Provenance {
    Provenance {
        edge_id: "truck-17".into(),
        topic: "gps/raw.v2".into(),
        partition: 3,
        offset,
    }
}

fn build(compression: Compression, offsets: std::ops::Range<u64>) -> ProducerBatch {
    let mut builder = BatchBuilder::new(compression, BatchLimits::default());
    for offset in offsets {
        let key = format!("key-{offset}");
        let value = format!("value {offset} ").repeat(20);
        let record = SourceRecord {
            offset,
            timestamp_ms: 1_700_000_000_000 + offset as i64 * 10,
            key: Some(key.as_bytes()),
            value: Some(value.as_bytes()),
            headers: vec![
                Header {
                    key: b"h",
                    value: Some(b"1"),
                },
                Header {
                    key: b"h",
                    value: None,
                },
            ],
        };
        builder
            .push(&record, &provenance(offset), 5)
            .expect("test input is valid");
    }
    builder.finish().expect("test input is valid")
}

#[test]
fn provenance_text_round_trips_and_refuses_other_values() {
    let value = provenance(120_045).encode();
    assert_eq!(value, "truck-17/gps/raw.v2/3/120045");
    assert_eq!(
        Provenance::parse(value.as_bytes()),
        Some(provenance(120_045))
    );
    for bad in [
        "",
        "truck-17",
        "truck-17/gps/3",
        "/gps/3/1",
        "truck-17//3/1",
        "truck-17/gps/x/1",
        "truck-17/gps/3/-1",
        "truck-17/gps/3/99999999999999999999999",
    ] {
        assert_eq!(Provenance::parse(bad.as_bytes()), None, "{bad}");
    }
}

#[test]
fn every_codec_round_trips_records_headers_and_timestamps() {
    for compression in [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let batch = build(compression, 100..150);
        assert_eq!(batch.record_count, 50);
        assert_eq!(
            (batch.first_source_offset, batch.last_source_offset),
            (100, 149)
        );
        let header = check_batch(&batch.bytes).expect("test input is valid");
        assert_eq!(header.compression(), Some(compression));
        assert_eq!(header.producer_id, -1);
        if compression != Compression::None {
            assert!(
                batch.bytes.len() < batch.uncompressed_bytes,
                "{compression:?}"
            );
        }
        let decoded = decode_batch(&batch.bytes, LIMIT).expect("test input is valid");
        let records: Vec<_> = decoded
            .records()
            .collect::<Result<_, _>>()
            .expect("test input is valid");
        assert_eq!(records.len(), 50);
        for (index, record) in records.iter().enumerate() {
            let offset = 100 + index as u64;
            // Destination offsets are the batch's own: 0, 1, 2...
            assert_eq!(record.offset, index as u64);
            assert_eq!(record.timestamp_ms, 1_700_000_000_000 + offset as i64 * 10);
            assert_eq!(record.key, Some(format!("key-{offset}").as_bytes()));
            let value = format!("value {offset} ").repeat(20);
            assert_eq!(record.value, Some(value.as_bytes()));
            let expected_provenance = provenance(offset).encode();
            let headers: Vec<(&[u8], Option<&[u8]>)> =
                record.headers.iter().map(|h| (h.key, h.value)).collect();
            assert_eq!(
                headers,
                vec![
                    (&b"h"[..], Some(&b"1"[..])),
                    (&b"h"[..], None),
                    (
                        PROVENANCE_HEADER.as_bytes(),
                        Some(expected_provenance.as_bytes())
                    ),
                ]
            );
        }
        assert_eq!(
            last_provenance(&batch.bytes, LIMIT).expect("test input is valid"),
            Some(provenance(149))
        );
    }
}

#[test]
fn stamping_sets_the_producer_session_and_keeps_the_crc_valid() {
    let mut batch = build(Compression::Lz4, 0..10);
    stamp(&mut batch.bytes, 4_000, 2, 77);
    let header = check_batch(&batch.bytes).expect("test input is valid");
    assert_eq!(
        (
            header.producer_id,
            header.producer_epoch,
            header.base_sequence
        ),
        (4_000, 2, 77)
    );
    stamp(&mut batch.bytes, 5_000, 0, 0);
    let header: BatchHeader = check_batch(&batch.bytes).expect("test input is valid");
    assert_eq!(header.producer_id, 5_000);
}

#[test]
fn builder_bounds_bytes_and_records_and_reports_linger() {
    let limits = BatchLimits {
        batch_bytes_max: 400,
        batch_records_max: 3,
        linger_ms: 20,
    };
    let mut builder = BatchBuilder::new(Compression::None, limits);
    assert_eq!(builder.ready_at_ms(), None);
    let record = |offset, value: &'static [u8]| SourceRecord {
        offset,
        timestamp_ms: 0,
        key: None,
        value: Some(value),
        headers: vec![],
    };
    builder
        .push(&record(1, b"a"), &provenance(1), 100)
        .expect("test input is valid");
    assert_eq!(builder.ready_at_ms(), Some(120));
    assert_eq!(
        builder.push(&record(1, b"a"), &provenance(1), 101),
        Err(PushError::OutOfOrder)
    );
    builder
        .push(&record(2, b"b"), &provenance(2), 101)
        .expect("test input is valid");
    builder
        .push(&record(3, b"c"), &provenance(3), 102)
        .expect("test input is valid");
    // Three records: full, ready now.
    assert_eq!(builder.ready_at_ms(), Some(100));
    assert_eq!(
        builder.push(&record(4, b"d"), &provenance(4), 103),
        Err(PushError::Full)
    );
    assert_eq!(
        builder.finish().expect("test input is valid").record_count,
        3
    );
    let big = [0u8; 500];
    let big_record = SourceRecord {
        value: Some(&big),
        ..record(5, b"")
    };
    assert!(matches!(
        builder.push(&big_record, &provenance(5), 104),
        Err(PushError::RecordTooLarge { .. })
    ));
    let medium = [0u8; 250];
    let medium_record = |offset| SourceRecord {
        value: Some(&medium),
        ..record(offset, b"")
    };
    builder
        .push(&medium_record(6), &provenance(6), 105)
        .expect("test input is valid");
    assert_eq!(
        builder.push(&medium_record(7), &provenance(7), 105),
        Err(PushError::Full)
    );
    assert_eq!(builder.ready_at_ms(), Some(105));
}

#[test]
fn decompression_is_bounded() {
    let batch = build(Compression::Zstd, 0..50);
    let small = batch.uncompressed_bytes - 1;
    assert!(matches!(
        decode_batch(&batch.bytes, small),
        Err(BatchDecodeError::Codec(CodecError::TooLarge { .. }))
    ));
    for codec in [
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let bomb = compression::compress(codec, &vec![0u8; 1 << 20]).expect("test input is valid");
        assert!(matches!(
            compression::decompress(codec, &bomb, 1 << 16),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(compression::decompress(codec, b"\x82SNAPPY\x00garbage", 1 << 16).is_err());
    }
}

#[test]
fn split_batches_stops_at_a_cut_batch() {
    let first = build(Compression::None, 0..3).bytes;
    let second = build(Compression::Gzip, 3..6).bytes;
    let mut bytes = first.clone();
    bytes.extend_from_slice(&second);
    bytes.extend_from_slice(&second[..30]);
    let batches: Vec<_> = split_batches(&bytes)
        .collect::<Result<_, _>>()
        .expect("test input is valid");
    assert_eq!(batches, vec![&first[..], &second[..]]);
    let mut bad = first.clone();
    bad[8..12].copy_from_slice(&(-5i32).to_be_bytes());
    assert!(
        split_batches(&bad)
            .next()
            .expect("test input is valid")
            .is_err()
    );
}

#[test]
fn batches_without_provenance_have_none() {
    let mut builder = RecordBuilder::new();
    builder.push(
        1,
        None,
        Some(b"v"),
        &[(b"rill.source", Some(b"not a provenance"))],
    );
    let batch = builder.finish();
    assert_eq!(
        last_provenance(&batch, LIMIT).expect("test input is valid"),
        None
    );
    let mut corrupt = build(Compression::None, 0..2).bytes;
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    assert!(last_provenance(&corrupt, LIMIT).is_err());
}

#[test]
fn the_last_provenance_header_counts() {
    // A record mirrored before carries an older provenance; ours comes last.
    let mut builder = BatchBuilder::new(Compression::None, BatchLimits::default());
    let older = provenance(9).encode();
    let record = SourceRecord {
        offset: 40,
        timestamp_ms: 0,
        key: None,
        value: None,
        headers: vec![Header {
            key: PROVENANCE_HEADER.as_bytes(),
            value: Some(older.as_bytes()),
        }],
    };
    let ours = Provenance {
        edge_id: "hub".into(),
        topic: "truck-17.gps".into(),
        partition: 0,
        offset: 40,
    };
    builder
        .push(&record, &ours, 0)
        .expect("test input is valid");
    let batch = builder.finish().expect("test input is valid");
    assert_eq!(
        last_provenance(&batch.bytes, LIMIT).expect("test input is valid"),
        Some(ours)
    );
}

#[test]
fn sizes_worked_out_ahead_match_what_is_written() {
    let mut values = vec![0i64, 1, -1, 63, 64, -64, -65, i64::MAX, i64::MIN];
    for shift in 0..63 {
        values.extend([1i64 << shift, (1i64 << shift) - 1, -(1i64 << shift)]);
    }
    for value in values {
        let mut out = Vec::new();
        write_varlong(&mut out, value);
        assert_eq!(super::varlong_len(value), out.len(), "varlong {value}");
    }
    for (partition, offset) in [(0, 0), (9, 10), (10, 99), (u32::MAX, u64::MAX)] {
        let provenance = Provenance {
            edge_id: "edge".into(),
            topic: "a.topic".into(),
            partition,
            offset,
        };
        let text = provenance.encode();
        assert_eq!(provenance.encoded_len(), text.len());
        assert_eq!(text, format!("edge/a.topic/{partition}/{offset}"));
        assert_eq!(Provenance::parse(text.as_bytes()), Some(provenance));
    }
}
