//! Kafka v2 record batches for the uplink, and reading them back.
//!
//! [`BatchBuilder`] turns source records into one destination batch: key,
//! value, headers (order and duplicates kept) and timestamp as they were,
//! plus one provenance header, [`PROVENANCE_HEADER`], naming where the
//! record came from. A batch holds records of one source partition bound
//! for one destination partition, so the provenance of a batch's last
//! record says how far that source partition had got when the batch was
//! written; that is what reconciliation reads back
//! ([`last_provenance`]). The builder bounds a batch by its uncompressed
//! bytes and its record count and says when its linger time is up; it is
//! compressed (gzip, snappy, lz4 or zstd) when finished. The producer id,
//! epoch and base sequence are written by [`stamp`] just before a batch is
//! first sent and again if the producer session changes; they sit inside
//! the CRC, which `stamp` computes again.
//!
//! The records are written here rather than with `kafka-protocol`'s
//! `records` module because that module keeps headers in a map (a record
//! with two headers of one name would lose one) and decompresses without a
//! bound; the codecs are in [`compression`] on their own crates.
//!
//! The provenance header's value is UTF-8 text, `EDGE/TOPIC/PARTITION/OFFSET`
//! (for example `truck-17/gps/3/120045`): the edge id (no `/` allowed), the
//! source topic, and the source partition and offset in decimal. It is
//! parsed from both ends (the first `/` ends the edge id, the last two
//! start the numbers), so a topic name may hold any character. Text costs
//! a few bytes more than binary before compression and almost nothing
//! after, and any consumer (kcat, a Java or Python client) can read it for
//! deduplication downstream. A record that already carries the header
//! (mirrored before, from another edge) keeps it; the replicator's own is
//! added last, and the last one is the one that counts.

use std::borrow::Cow;

use rill_core::batch::{
    BATCH_HEADER_BYTES, BATCH_LENGTH_PREFIX_BYTES, BatchError, BatchHeader, Header, MAGIC_V2,
    RecordIter, check_batch,
};
use rill_core::batch::{write_nullable, write_varlong};

pub mod compression;

pub use compression::CodecError;
pub use rill_core::batch::Compression;

/// The header that says where a mirrored record came from.
pub const PROVENANCE_HEADER: &str = "rill.source";

/// Where a mirrored record came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Provenance {
    pub edge_id: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

impl Provenance {
    /// The header value, `EDGE/TOPIC/PARTITION/OFFSET`.
    pub fn encode(&self) -> String {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        String::from_utf8(out).expect("edge ids and topic names are UTF-8")
    }

    /// Bytes of [`Provenance::encode`]'s value.
    pub fn encoded_len(&self) -> usize {
        self.edge_id.len()
            + self.topic.len()
            + decimal_len(u64::from(self.partition))
            + decimal_len(self.offset)
            + 3
    }

    /// Appends the header value without allocating.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        debug_assert!(!self.edge_id.contains('/'), "edge ids are validated");
        out.extend_from_slice(self.edge_id.as_bytes());
        out.push(b'/');
        out.extend_from_slice(self.topic.as_bytes());
        out.push(b'/');
        write_decimal(out, u64::from(self.partition));
        out.push(b'/');
        write_decimal(out, self.offset);
    }

    /// Parses a header value; `None` when it is not one.
    pub fn parse(value: &[u8]) -> Option<Provenance> {
        let text = std::str::from_utf8(value).ok()?;
        let (edge_id, rest) = text.split_once('/')?;
        let (rest, offset) = rest.rsplit_once('/')?;
        let (topic, partition) = rest.rsplit_once('/')?;
        let decimal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if edge_id.is_empty() || topic.is_empty() || !decimal(partition) || !decimal(offset) {
            return None;
        }
        Some(Provenance {
            edge_id: edge_id.to_owned(),
            topic: topic.to_owned(),
            partition: partition.parse().ok()?,
            offset: offset.parse().ok()?,
        })
    }
}

fn decimal_len(value: u64) -> usize {
    value.checked_ilog10().map_or(1, |log| log as usize + 1)
}

fn write_decimal(out: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// One record as read from the source log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord<'a> {
    /// Its offset in the source partition.
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<Header<'a>>,
}

/// Why bytes are not a usable batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchDecodeError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("batch holds {found} records but its header says {declared}")]
    RecordCountMismatch { declared: i32, found: u64 },
    #[error("batch offsets or timestamps overflow")]
    Overflow,
    #[error("batch header says {length} bytes follow, which no batch can be")]
    BadLength { length: i32 },
}

/// One checked batch with its records section decompressed.
#[derive(Debug, Clone)]
pub struct DecodedBatch<'a> {
    pub header: BatchHeader,
    records: Cow<'a, [u8]>,
}

/// Checks one batch (length, magic, CRC-32C, counts) and decompresses its
/// records into at most `uncompressed_bytes_max` bytes.
pub fn decode_batch(
    bytes: &[u8],
    uncompressed_bytes_max: usize,
) -> Result<DecodedBatch<'_>, BatchDecodeError> {
    let header = check_batch(bytes)?;
    let section = &bytes[BATCH_HEADER_BYTES..];
    let compression = header.compression().unwrap_or(Compression::None);
    let records = match compression {
        Compression::None => Cow::Borrowed(section),
        codec => Cow::Owned(compression::decompress(
            codec,
            section,
            uncompressed_bytes_max,
        )?),
    };
    Ok(DecodedBatch { header, records })
}

impl DecodedBatch<'_> {
    /// The records with their source offsets and timestamps made absolute
    /// (a log-append-time batch gives every record its max timestamp, as
    /// Kafka does). Stops at the first malformed record, and reports a
    /// count that disagrees with the header at the end.
    pub fn records(&self) -> impl Iterator<Item = Result<SourceRecord<'_>, BatchDecodeError>> {
        let header = self.header;
        let mut inner = RecordIter::new(&self.records);
        let mut found = 0u64;
        let mut done = false;
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            match inner.next() {
                None => {
                    done = true;
                    (found != header.record_count as u64).then_some(Err(
                        BatchDecodeError::RecordCountMismatch {
                            declared: header.record_count,
                            found,
                        },
                    ))
                }
                Some(Err(error)) => {
                    done = true;
                    Some(Err(error.into()))
                }
                Some(Ok(view)) => {
                    found += 1;
                    let offset = header
                        .base_offset
                        .checked_add(i64::from(view.offset_delta))
                        .and_then(|offset| u64::try_from(offset).ok());
                    let timestamp_ms = if header.is_log_append_time() {
                        Some(header.max_timestamp)
                    } else {
                        header.base_timestamp.checked_add(view.timestamp_delta)
                    };
                    let (Some(offset), Some(timestamp_ms)) = (offset, timestamp_ms) else {
                        done = true;
                        return Some(Err(BatchDecodeError::Overflow));
                    };
                    Some(Ok(SourceRecord {
                        offset,
                        timestamp_ms,
                        key: view.key,
                        value: view.value,
                        headers: view.headers,
                    }))
                }
            }
        })
    }
}

/// Splits concatenated batches (a fetch response's records, a log read)
/// into single batches. A batch cut short at the end (a fetch stops at its
/// byte limit) ends the iteration; a length no batch can have is an error.
pub fn split_batches(bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], BatchDecodeError>> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        let length = rest.get(8..12)?;
        let length = i32::from_be_bytes([length[0], length[1], length[2], length[3]]);
        let total = usize::try_from(length)
            .ok()
            .and_then(|length| length.checked_add(BATCH_LENGTH_PREFIX_BYTES))
            .filter(|&total| total >= BATCH_HEADER_BYTES);
        let Some(total) = total else {
            rest = &[];
            return Some(Err(BatchDecodeError::BadLength { length }));
        };
        if total > rest.len() {
            return None;
        }
        let (batch, after) = rest.split_at(total);
        rest = after;
        Some(Ok(batch))
    })
}

/// The provenance of a batch's last record (its last provenance header),
/// or `None` when that record has none: the batch was not written by a
/// replicator. Control batches (transaction markers) have none either.
pub fn last_provenance(
    batch: &[u8],
    uncompressed_bytes_max: usize,
) -> Result<Option<Provenance>, BatchDecodeError> {
    let decoded = decode_batch(batch, uncompressed_bytes_max)?;
    if decoded.header.is_control() {
        return Ok(None);
    }
    let mut last = None;
    for record in decoded.records() {
        last = Some(record?);
    }
    Ok(last.and_then(|record| {
        record
            .headers
            .iter()
            .rev()
            .find(|header| header.key == PROVENANCE_HEADER.as_bytes())
            .and_then(|header| header.value)
            .and_then(Provenance::parse)
    }))
}

/// Bounds on one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// The records section before compression, header excluded. Keep it
    /// below the destination's `max.message.bytes` with room to spare:
    /// incompressible data grows slightly when compressed.
    pub batch_bytes_max: usize,
    pub batch_records_max: u32,
    /// How long the first record may wait for more to join it.
    pub linger_ms: u64,
}

impl Default for BatchLimits {
    fn default() -> BatchLimits {
        BatchLimits {
            batch_bytes_max: 512 * 1024,
            batch_records_max: 10_000,
            linger_ms: 50,
        }
    }
}

/// Why a record was not added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The batch cannot take this record: finish it and push again.
    #[error("the batch is full")]
    Full,
    /// The record alone is over the batch limit: it can never be sent
    /// within these limits.
    #[error("record of {record_bytes} bytes is over the batch limit of {batch_bytes_max} bytes")]
    RecordTooLarge {
        record_bytes: usize,
        batch_bytes_max: usize,
    },
    /// Records of one batch come from one source partition, in offset
    /// order.
    #[error("record does not follow the batch's source partition in order")]
    OutOfOrder,
}

/// A finished batch, not yet stamped with a producer session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerBatch {
    /// The whole batch: base offset 0, producer id -1 until [`stamp`].
    pub bytes: Vec<u8>,
    pub record_count: u32,
    /// The source partition's offsets of the first and last record.
    pub first_source_offset: u64,
    pub last_source_offset: u64,
    /// The records section before compression.
    pub uncompressed_bytes: usize,
}

const OFFSET_CRC: usize = 17;
const OFFSET_ATTRIBUTES: usize = 21;
const OFFSET_PRODUCER_ID: usize = 43;

/// Writes the producer session into a batch and computes its CRC again.
pub fn stamp(batch: &mut [u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) {
    assert!(batch.len() >= BATCH_HEADER_BYTES, "stamp a finished batch");
    batch[OFFSET_PRODUCER_ID..OFFSET_PRODUCER_ID + 8].copy_from_slice(&producer_id.to_be_bytes());
    batch[OFFSET_PRODUCER_ID + 8..OFFSET_PRODUCER_ID + 10]
        .copy_from_slice(&producer_epoch.to_be_bytes());
    batch[OFFSET_PRODUCER_ID + 10..OFFSET_PRODUCER_ID + 14]
        .copy_from_slice(&base_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&batch[OFFSET_ATTRIBUTES..]);
    batch[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// The codec's number in a batch's attributes, as Kafka defines it.
fn codec_attribute(compression: Compression) -> i16 {
    match compression {
        Compression::None => 0,
        Compression::Gzip => 1,
        Compression::Snappy => 2,
        Compression::Lz4 => 3,
        Compression::Zstd => 4,
    }
}

/// Collects the records of one destination batch.
#[derive(Debug)]
pub struct BatchBuilder {
    compression: Compression,
    limits: BatchLimits,
    /// The batch so far: room for its header, then its records section.
    records: Vec<u8>,
    count: u32,
    base_timestamp_ms: i64,
    max_timestamp_ms: i64,
    first_source_offset: u64,
    last_source_offset: u64,
    opened_at_ms: u64,
    full: bool,
}

impl BatchBuilder {
    pub fn new(compression: Compression, limits: BatchLimits) -> BatchBuilder {
        assert!(
            limits.batch_bytes_max > 0 && limits.batch_records_max > 0,
            "a batch holds at least one record"
        );
        BatchBuilder {
            compression,
            limits,
            records: Vec::new(),
            count: 0,
            base_timestamp_ms: 0,
            max_timestamp_ms: 0,
            first_source_offset: 0,
            last_source_offset: 0,
            opened_at_ms: 0,
            full: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn record_count(&self) -> u32 {
        self.count
    }

    /// The records section so far, before compression.
    pub fn uncompressed_bytes(&self) -> usize {
        self.records.len().saturating_sub(BATCH_HEADER_BYTES)
    }

    /// The source offset of the first record, while not empty.
    pub fn first_source_offset(&self) -> Option<u64> {
        (!self.is_empty()).then_some(self.first_source_offset)
    }

    /// When the batch should be finished: now if it is full, else when the
    /// first record's linger time ends; `None` while empty.
    pub fn ready_at_ms(&self) -> Option<u64> {
        if self.is_empty() {
            None
        } else if self.full {
            Some(self.opened_at_ms)
        } else {
            Some(self.opened_at_ms.saturating_add(self.limits.linger_ms))
        }
    }

    /// Adds a record with its provenance header last. The record is
    /// written straight into the batch: its length is worked out first,
    /// so nothing is encoded twice or copied again.
    pub fn push(
        &mut self,
        record: &SourceRecord<'_>,
        provenance: &Provenance,
        now_ms: u64,
    ) -> Result<(), PushError> {
        if !self.is_empty() && record.offset <= self.last_source_offset {
            return Err(PushError::OutOfOrder);
        }
        if self.count >= self.limits.batch_records_max {
            self.full = true;
            return Err(PushError::Full);
        }
        let base_timestamp_ms = if self.is_empty() {
            record.timestamp_ms
        } else {
            self.base_timestamp_ms
        };
        let timestamp_delta = record.timestamp_ms.wrapping_sub(base_timestamp_ms);
        let offset_delta = i64::from(self.count);
        let header_count = record.headers.len() as i64 + 1;
        let provenance_len = provenance.encoded_len();
        let body_len = 1
            + varlong_len(timestamp_delta)
            + varlong_len(offset_delta)
            + nullable_len(record.key)
            + nullable_len(record.value)
            + varlong_len(header_count)
            + record
                .headers
                .iter()
                .map(|header| nullable_len(Some(header.key)) + nullable_len(header.value))
                .sum::<usize>()
            + nullable_len(Some(PROVENANCE_HEADER.as_bytes()))
            + varlong_len(provenance_len as i64)
            + provenance_len;
        let record_bytes = varlong_len(body_len as i64) + body_len;
        if record_bytes > self.limits.batch_bytes_max {
            return Err(PushError::RecordTooLarge {
                record_bytes,
                batch_bytes_max: self.limits.batch_bytes_max,
            });
        }
        if self.uncompressed_bytes() + record_bytes > self.limits.batch_bytes_max {
            self.full = true;
            return Err(PushError::Full);
        }
        if self.is_empty() {
            self.base_timestamp_ms = record.timestamp_ms;
            self.max_timestamp_ms = record.timestamp_ms;
            self.first_source_offset = record.offset;
            self.opened_at_ms = now_ms;
            if self.records.len() < BATCH_HEADER_BYTES {
                // The batch's header first; room for a whole batch, so
                // it is not moved while it grows.
                self.records
                    .reserve(BATCH_HEADER_BYTES + self.limits.batch_bytes_max.min(1 << 20));
                self.records.resize(BATCH_HEADER_BYTES, 0);
            }
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp_ms);
        self.last_source_offset = record.offset;
        let out = &mut self.records;
        let before = out.len();
        out.reserve(record_bytes);
        write_varlong(out, body_len as i64);
        out.push(0); // record attributes: unused in v2
        write_varlong(out, timestamp_delta);
        write_varlong(out, offset_delta);
        write_nullable(out, record.key);
        write_nullable(out, record.value);
        write_varlong(out, header_count);
        for header in &record.headers {
            write_nullable(out, Some(header.key));
            write_nullable(out, header.value);
        }
        write_nullable(out, Some(PROVENANCE_HEADER.as_bytes()));
        write_varlong(out, provenance_len as i64);
        provenance.encode_into(out);
        debug_assert_eq!(out.len() - before, record_bytes);
        self.count += 1;
        if self.count >= self.limits.batch_records_max {
            self.full = true;
        }
        Ok(())
    }

    /// Frames the batch (compressing its records when asked), and empties
    /// the builder. The batch carries no producer session until
    /// [`stamp`]. Uncompressed, the records are not copied: the batch is
    /// the builder's buffer, whose first bytes were kept for the header.
    pub fn finish(&mut self) -> Result<ProducerBatch, CodecError> {
        assert!(!self.is_empty(), "finish a batch with records");
        let uncompressed_bytes = self.uncompressed_bytes();
        let mut batch = match self.compression {
            Compression::None => std::mem::take(&mut self.records),
            codec => {
                let section = compression::compress(codec, &self.records[BATCH_HEADER_BYTES..])?;
                let mut batch = Vec::with_capacity(BATCH_HEADER_BYTES + section.len());
                batch.resize(BATCH_HEADER_BYTES, 0);
                batch.extend_from_slice(&section);
                self.records.truncate(BATCH_HEADER_BYTES);
                batch
            }
        };
        let batch_length = (batch.len() - BATCH_LENGTH_PREFIX_BYTES) as i32;
        let attributes = codec_attribute(self.compression);
        let count = self.count as i32;
        let mut header = [0u8; BATCH_HEADER_BYTES];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            header[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&0i64.to_be_bytes()); // base offset: the broker assigns it
        put(&batch_length.to_be_bytes());
        put(&(-1i32).to_be_bytes()); // partition leader epoch
        put(&[MAGIC_V2]);
        put(&0u32.to_be_bytes()); // CRC: stamp writes it
        put(&attributes.to_be_bytes());
        put(&(count - 1).to_be_bytes());
        put(&self.base_timestamp_ms.to_be_bytes());
        put(&self.max_timestamp_ms.to_be_bytes());
        put(&[0; 14]); // producer id, epoch, base sequence: stamp writes them
        put(&count.to_be_bytes());
        debug_assert_eq!(at, BATCH_HEADER_BYTES);
        batch[..BATCH_HEADER_BYTES].copy_from_slice(&header);
        stamp(&mut batch, -1, -1, -1);
        let finished = ProducerBatch {
            bytes: batch,
            record_count: self.count,
            first_source_offset: self.first_source_offset,
            last_source_offset: self.last_source_offset,
            uncompressed_bytes,
        };
        self.count = 0;
        self.full = false;
        Ok(finished)
    }
}

/// Bytes of a zigzag varlong.
fn varlong_len(value: i64) -> usize {
    let raw = ((value << 1) ^ (value >> 63)) as u64;
    // 7 bits a byte; zero still takes one.
    (64 - (raw | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes of a varlong length (-1 for none) and the bytes.
fn nullable_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => varlong_len(-1),
        Some(bytes) => varlong_len(bytes.len() as i64) + bytes.len(),
    }
}

#[cfg(test)]
mod tests;
