//! The native protocol's codecs: frames as data, and batches that the log accepts.

use expect_test::expect;
use rill_protocol::batch::BatchWriter;
use rill_protocol::frame::{encode_frame_heapless, encode_frame_vec};
use rill_protocol::{
    Acks, ErrorCode, FrameError, Request, RequestFrame, Response, ResponseFrame, Target,
    split_frame,
};

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn produce_frame_bytes() {
    let frame = RequestFrame {
        correlation_id: 7,
        request: Request::Produce {
            topic: "t",
            target: Target::Key(b"k"),
            acks: Acks::Durable,
            batch: &[1, 2, 3],
        },
    };
    let mut out = Vec::new();
    encode_frame_vec(&frame, 0, &mut out);
    // length 12 | correlation 7 | variant 2 (produce) | "t" | Key "k" | Durable | 3 bytes
    expect!["0c 00 00 00 07 02 01 74 01 01 6b 02 03 01 02 03"].assert_eq(&hex(&out));
    let (body, used) = split_frame(&out, 1024).expect("frame").expect("whole");
    assert_eq!(used, out.len());
    assert_eq!(RequestFrame::decode(body), Ok(frame.clone()));

    // The heapless encoder makes the same bytes.
    let mut fixed: heapless::Vec<u8, 64> = heapless::Vec::new();
    encode_frame_heapless(&frame, &mut fixed).expect("fits");
    assert_eq!(fixed.as_slice(), out.as_slice());
}

#[test]
fn byte_fields_keep_the_wire_format_of_a_sequence_of_bytes() {
    // Batches and keys are written as bytes (one copy) rather than as a
    // sequence of u8 (a call per byte): the bytes on the wire must be what
    // a sequence gives, so peers built before the change read them.
    let batch: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let key: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
    let frame = RequestFrame {
        correlation_id: 1,
        request: Request::Produce {
            topic: "t",
            target: Target::Key(&key),
            acks: Acks::Written,
            batch: &batch,
        },
    };
    let mut out = Vec::new();
    encode_frame_vec(&frame, 0, &mut out);
    let as_sequence = |bytes: &[u8]| {
        let items: Vec<u8> = bytes.to_vec();
        postcard::to_allocvec(&items).expect("sequence")
    };
    let key_sequence = as_sequence(&key);
    let batch_sequence = as_sequence(&batch);
    assert!(
        out.ends_with(&batch_sequence),
        "batch encoded as a sequence"
    );
    assert!(
        out.windows(key_sequence.len())
            .any(|window| window == key_sequence),
        "key encoded as a sequence"
    );
    let (body, _) = split_frame(&out, 4096).expect("frame").expect("whole");
    assert_eq!(RequestFrame::decode(body), Ok(frame));
}

#[test]
fn fetch_response_carries_raw_batches_after_the_message() {
    let frame = ResponseFrame {
        correlation_id: 9,
        response: Response::Fetched {
            partition: 0,
            high_watermark: 10,
            log_start_offset: 0,
            next_offset: 10,
            records_bytes: 4,
        },
    };
    let mut out = Vec::new();
    encode_frame_vec(&frame, 4, &mut out);
    out.extend_from_slice(b"RAW!");
    let (body, _) = split_frame(&out, 1024).expect("frame").expect("whole");
    let (decoded, rest) = ResponseFrame::decode(body).expect("decode");
    assert_eq!(decoded, frame);
    assert_eq!(rest, b"RAW!");
}

#[test]
fn oversized_and_garbage_frames_are_errors() {
    let mut out = Vec::new();
    encode_frame_vec(
        &RequestFrame {
            correlation_id: 1,
            request: Request::Ping,
        },
        0,
        &mut out,
    );
    assert_eq!(split_frame(&out[..3], 1024), Ok(None));
    assert_eq!(
        split_frame(&[0xff, 0xff, 0xff, 0x7f], 1024),
        Err(FrameError::TooLarge {
            body_bytes: 0x7fff_ffff,
            frame_bytes_max: 1024
        })
    );
    assert_eq!(
        RequestFrame::decode(&[0x01, 0x63]),
        Err(FrameError::Malformed)
    );
    let error = ResponseFrame {
        correlation_id: 1,
        response: Response::Error {
            code: ErrorCode::UnknownTopic,
            message: "no topic x",
        },
    };
    let mut out = Vec::new();
    encode_frame_vec(&error, 0, &mut out);
    let (body, _) = split_frame(&out, 1024).expect("frame").expect("whole");
    assert_eq!(ResponseFrame::decode(body).expect("decode").0, error);
}

#[test]
fn device_batches_are_accepted_by_the_log_and_match_the_std_builder() {
    let mut buffer = [0u8; 512];
    let mut writer = BatchWriter::new(&mut buffer).expect("buffer");
    writer
        .push(
            1_700_000_000_000,
            Some(b"k1"),
            Some(b"hello"),
            &[(b"h", Some(b"v"))],
        )
        .expect("fits");
    writer
        .push(1_700_000_000_005, None, Some(b"world"), &[])
        .expect("fits");
    let device = writer.finish().expect("batch").to_vec();
    let header = rill_core::batch::check_batch(&device).expect("the log accepts device batches");
    assert_eq!(header.record_count, 2);
    let std_built = rill_core::batch::encode_batch(&[
        rill_core::batch::Record {
            timestamp_ms: 1_700_000_000_000,
            key: Some(b"k1".to_vec()),
            value: Some(b"hello".to_vec()),
            headers: vec![(b"h".to_vec(), Some(b"v".to_vec()))],
        },
        rill_core::batch::Record {
            timestamp_ms: 1_700_000_000_005,
            key: None,
            value: Some(b"world".to_vec()),
            headers: vec![],
        },
    ]);
    assert_eq!(device, std_built);
}
