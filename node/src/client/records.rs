//! Turning the raw Kafka v2 batches of a fetch response into records with
//! their absolute offsets and timestamps, for consumers that want records
//! rather than batches. Every batch is checked (length, magic, CRC-32C, record
//! framing) before its records are read, so corrupt bytes are an error, never
//! garbage output.

use rill_core::batch::{BatchHeader, Compression, RecordIter, check_batch};

/// One record of a fetched batch, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// The record's absolute offset in its partition.
    pub offset: i64,
    /// Create time (base timestamp plus the record's delta), or the broker's
    /// append time when the topic stamps log-append time.
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Splits the raw batches of a fetch response into records.
///
/// Control batches (transaction markers) hold no user records and are skipped.
/// A batch cut short at the very end is skipped too, as Kafka clients do: a
/// broker may end a response inside a batch, and the next fetch starts at it.
pub fn records_of(batches: &[u8]) -> Result<Vec<ConsumedRecord>, String> {
    let mut records = Vec::new();
    let mut rest = batches;
    while !rest.is_empty() {
        let Ok(header) = BatchHeader::parse(rest) else {
            break; // fewer bytes than a header: a cut-off last batch
        };
        let Some(total_bytes) = header.total_bytes() else {
            return Err(format!(
                "batch at offset {} declares an impossible length {}",
                header.base_offset, header.batch_length
            ));
        };
        if total_bytes > rest.len() {
            break;
        }
        let (batch, after) = rest.split_at(total_bytes);
        rest = after;
        let header = check_batch(batch)
            .map_err(|error| format!("batch at offset {}: {error}", header.base_offset))?;
        if header.compression() != Some(Compression::None) {
            return Err("compressed batches are not decoded by this client".to_owned());
        }
        if header.is_control() {
            continue;
        }
        for record in RecordIter::new(&batch[rill_core::batch::BATCH_HEADER_BYTES..]) {
            let record = record
                .map_err(|error| format!("batch at offset {}: {error}", header.base_offset))?;
            let timestamp_ms = if header.is_log_append_time() {
                header.max_timestamp
            } else {
                header.base_timestamp.saturating_add(record.timestamp_delta)
            };
            records.push(ConsumedRecord {
                offset: header
                    .base_offset
                    .saturating_add(i64::from(record.offset_delta)),
                timestamp_ms,
                key: record.key.map(<[u8]>::to_vec),
                value: record.value.map(<[u8]>::to_vec),
                headers: record
                    .headers
                    .iter()
                    .map(|header| (header.key.to_vec(), header.value.map(<[u8]>::to_vec)))
                    .collect(),
            });
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use rill_core::batch::{RecordBuilder, compute_crc, stamp_batch};

    use super::*;

    fn batch_at(base_offset: i64, values: &[&str], base_timestamp_ms: i64) -> Vec<u8> {
        let mut builder = RecordBuilder::new();
        for (index, value) in values.iter().enumerate() {
            builder.push(
                base_timestamp_ms + index as i64,
                Some(b"device-1"),
                Some(value.as_bytes()),
                &[(b"unit", Some(b"celsius"))],
            );
        }
        let mut batch = builder.finish();
        stamp_batch(&mut batch, base_offset, None);
        batch
    }

    #[test]
    fn records_carry_absolute_offsets_timestamps_keys_and_headers() {
        let mut bytes = batch_at(10, &["a", "b"], 1_000);
        bytes.extend_from_slice(&batch_at(12, &["c"], 2_000));
        let records = records_of(&bytes).expect("valid batches");
        let offsets: Vec<i64> = records.iter().map(|record| record.offset).collect();
        assert_eq!(offsets, [10, 11, 12]);
        assert_eq!(records[1].timestamp_ms, 1_001);
        assert_eq!(records[2].timestamp_ms, 2_000);
        assert_eq!(records[0].key.as_deref(), Some(&b"device-1"[..]));
        assert_eq!(records[2].value.as_deref(), Some(&b"c"[..]));
        assert_eq!(
            records[0].headers,
            vec![(b"unit".to_vec(), Some(b"celsius".to_vec()))]
        );
    }

    #[test]
    fn log_append_time_uses_the_brokers_timestamp() {
        let mut batch = batch_at(0, &["a", "b"], 1_000);
        stamp_batch(&mut batch, 0, Some(9_999));
        let records = records_of(&batch).expect("valid batch");
        assert!(records.iter().all(|record| record.timestamp_ms == 9_999));
    }

    #[test]
    fn a_cut_off_last_batch_is_skipped() {
        let mut bytes = batch_at(0, &["a"], 1);
        let second = batch_at(1, &["b"], 2);
        bytes.extend_from_slice(&second[..second.len() - 3]);
        let records = records_of(&bytes).expect("first batch is whole");
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn corrupt_and_compressed_batches_are_errors() {
        let mut corrupt = batch_at(0, &["a"], 1);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        let error = records_of(&corrupt).expect_err("CRC must fail");
        assert!(error.contains("CRC-32C"), "{error}");

        let mut compressed = batch_at(0, &["a"], 1);
        compressed[22] |= 1; // attributes low byte: gzip
        let crc = compute_crc(&compressed);
        compressed[17..21].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            records_of(&compressed),
            Err("compressed batches are not decoded by this client".to_owned())
        );
    }

    #[test]
    fn control_batches_are_skipped() {
        let mut control = batch_at(5, &["marker"], 1);
        control[22] |= 0x20;
        let crc = compute_crc(&control);
        control[17..21].copy_from_slice(&crc.to_be_bytes());
        control.extend_from_slice(&batch_at(6, &["user"], 2));
        let records = records_of(&control).expect("valid");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].offset, 6);
    }
}
