//! Idempotent producers: the per-partition sequence state Kafka brokers keep,
//! and the broker-wide producer-id allocator.
//!
//! # Per-partition state ([`ProducerStates`])
//!
//! An idempotent producer numbers its records per partition, starting at 0
//! for each producer epoch. For every producer id the partition remembers the
//! epoch and the last [`BATCHES_PER_PRODUCER`] batches it appended (sequence
//! range and offsets). A produce batch is then checked before it is appended
//! ([`ProducerStates::check`]), with the semantics of Kafka's
//! `ProducerStateManager` for idempotent (non-transactional) producers:
//!
//! - no producer id (`producer_id < 0`): appended, nothing checked;
//! - an epoch older than the remembered one: `INVALID_PRODUCER_EPOCH`, a newer
//!   instance of the producer has fenced this one;
//! - a newer epoch: the producer bumped it, so the batch must start at
//!   sequence 0, else `OUT_OF_ORDER_SEQUENCE_NUMBER`;
//! - the same epoch: a batch with exactly the sequence range of a remembered
//!   batch is a retry, answered with that batch's offsets and not appended
//!   again; a batch starting right after the last sequence is appended;
//!   anything else is `OUT_OF_ORDER_SEQUENCE_NUMBER`;
//! - an unknown producer must start at sequence 0, else
//!   `UNKNOWN_PRODUCER_ID` (its state expired or left with the log's start;
//!   clients reset their sequence on it).
//!
//! Sequences wrap from `i32::MAX` to 0, as Kafka's do. Memory is bounded three
//! ways: idle producers expire ([`ProducerStates::expire`], Kafka's
//! `producer.id.expiration.ms`), batches below the log start are dropped with
//! the producers left without batches ([`ProducerStates::truncate_before`]),
//! and the number of producers per partition is capped (the least recently
//! updated one goes first, counted in [`ProducerStates::evicted`]).
//!
//! # Snapshot
//!
//! [`ProducerStates::encode_snapshot`] writes the state of every batch with
//! offsets below `upto_offset`; on open the broker decodes it and replays the
//! batch headers of the log from `upto_offset` on ([`ProducerStates::replay`]).
//! Like every structure that is Rill's own, it is little-endian and fixed
//! width, and its checksum is CRC-32 (IEEE, the `crc32fast` crate rill-node
//! already uses; not CRC-32C, which rill-node does not depend on):
//!
//! ```text
//! offset  size  field
//!      0     8  magic           "RILLPST1"
//!      8     2  version         u16 LE = 1
//!     10     2  reserved        u16 LE = 0
//!     12     4  body_length     u32 LE  bytes of the body
//!     16     -  body
//!    end-4   4  crc32           u32 LE  CRC-32 of every byte before it
//!
//! body:
//!      0     8  upto_offset     i64 LE  the state covers batches below it
//!      8     4  producer_count  u32 LE
//!     12     -  producers, by ascending producer id:
//!                 8  producer_id     i64 LE (>= 0)
//!                 2  epoch           i16 LE
//!                 8  last_update_ms  i64 LE
//!                 1  batch_count     u8 (1..=5)
//!                 -  batches, oldest first, 32 bytes each:
//!                      4  first_seq          i32 LE
//!                      4  last_seq           i32 LE
//!                      8  base_offset        i64 LE
//!                      8  last_offset        i64 LE
//!                      8  last_timestamp_ms  i64 LE
//! ```
//!
//! Decoding refuses anything damaged (magic, version, length, CRC, counts that
//! do not fit the bytes, values out of range) with a [`SnapshotError`]; it
//! never panics and sizes no allocation from a count before checking it
//! against the bytes present.
//!
//! # Producer ids ([`ProducerIdAllocator`])
//!
//! Ids are unique across restarts and crashes: the allocator reserves blocks
//! of [`PRODUCER_ID_BLOCK`] ids by durably recording the block's end in
//! `DATA_DIR/producer-ids` (temporary file, fsync, rename, fsync of the
//! directory) before it hands out any id of the block, and starts from the
//! recorded end on open. A crash loses at most the rest of a block. The file
//! is three text lines, the last a CRC-32 over the others:
//!
//! ```text
//! rill producer-ids 1
//! reserved_until 2000
//! crc32 1a2b3c4d
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use kafka_protocol::ResponseError;

/// Kafka's OUT_OF_ORDER_SEQUENCE_NUMBER (45).
pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = ResponseError::OutOfOrderSequenceNumber.code();
/// Kafka's INVALID_PRODUCER_EPOCH (47).
pub const INVALID_PRODUCER_EPOCH: i16 = ResponseError::InvalidProducerEpoch.code();
/// Kafka's UNKNOWN_PRODUCER_ID (59).
pub const UNKNOWN_PRODUCER_ID: i16 = ResponseError::UnknownProducerId.code();
/// Kafka's INVALID_RECORD (87): a batch header no producer could have sent.
pub const INVALID_RECORD: i16 = ResponseError::InvalidRecord.code();

/// Batches remembered per producer for duplicate detection (Kafka keeps 5,
/// the most in-flight requests an idempotent producer may have).
pub const BATCHES_PER_PRODUCER: usize = 5;
/// Kafka's default `producer.id.expiration.ms`: one day.
pub const PRODUCER_ID_EXPIRATION_MS_DEFAULT: i64 = 24 * 60 * 60 * 1000;
/// Producers a decoded snapshot may hold before the caller sets its own cap
/// with [`ProducerStates::set_max_producers`].
pub const PRODUCERS_MAX_DEFAULT: usize = 1_000;
/// The highest cap on producers per partition; it keeps a snapshot's body
/// (at most 179 bytes a producer) far below the 4 GiB its length field allows.
pub const PRODUCERS_MAX_LIMIT: usize = 10_000_000;

/// The sequence following `sequence`, wrapping from `i32::MAX` to 0.
fn next_sequence(sequence: i32) -> i32 {
    if sequence == i32::MAX {
        0
    } else {
        sequence + 1
    }
}

/// The last sequence of a batch of `record_count` records starting at
/// `first_seq`, wrapping past `i32::MAX` to 0 as Kafka does.
fn last_sequence(first_seq: i32, record_count: i32) -> i32 {
    let last = (i64::from(first_seq) + i64::from(record_count) - 1).rem_euclid(1 << 31);
    // rem_euclid(2^31) is within 0..=i32::MAX.
    last as i32
}

/// One appended batch a producer's retry may repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMetadata {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: i64,
    pub last_offset: i64,
    pub last_timestamp_ms: i64,
}

/// What a partition remembers of one producer. It always holds at least one
/// batch, all of the entry's epoch, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<BatchMetadata>,
    last_update_ms: i64,
}

impl ProducerEntry {
    pub fn epoch(&self) -> i16 {
        self.epoch
    }

    /// The remembered batches, oldest first.
    pub fn batches(&self) -> &VecDeque<BatchMetadata> {
        &self.batches
    }

    pub fn last_update_ms(&self) -> i64 {
        self.last_update_ms
    }

    /// The last sequence appended in the current epoch.
    pub fn last_seq(&self) -> Option<i32> {
        self.batches.back().map(|batch| batch.last_seq)
    }

    fn last_offset(&self) -> Option<i64> {
        self.batches.back().map(|batch| batch.last_offset)
    }

    fn push(&mut self, batch: BatchMetadata) {
        if self.batches.len() >= BATCHES_PER_PRODUCER {
            self.batches.pop_front();
        }
        self.batches.push_back(batch);
    }
}

/// The verdict on a produce batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Append the batch, then [`ProducerStates::record`] it.
    Append,
    /// A retry of a batch already in the log: answer with its offsets and do
    /// not append it again.
    Duplicate { base_offset: i64, last_offset: i64 },
    /// Refuse the batch with this Kafka error code.
    Error { code: i16, message: String },
}

/// Idempotent-producer state of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerEntry>,
    max_producers: usize,
    evicted: u64,
}

impl Default for ProducerStates {
    fn default() -> Self {
        Self::new(PRODUCERS_MAX_DEFAULT)
    }
}

impl ProducerStates {
    /// Empty state keeping at most `max_producers` producers (at least 1, at
    /// most [`PRODUCERS_MAX_LIMIT`]).
    pub fn new(max_producers: usize) -> Self {
        Self {
            producers: HashMap::new(),
            max_producers: max_producers.clamp(1, PRODUCERS_MAX_LIMIT),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    pub fn max_producers(&self) -> usize {
        self.max_producers
    }

    /// Producers dropped because the cap was reached, since creation.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Changes the cap, dropping the least recently updated producers when
    /// more are held.
    pub fn set_max_producers(&mut self, max_producers: usize) {
        self.max_producers = max_producers.clamp(1, PRODUCERS_MAX_LIMIT);
        while self.producers.len() > self.max_producers {
            self.evict_oldest();
        }
    }

    /// Checks a produce batch's header against the producer's state; changes
    /// nothing. `record_count` is the batch's `last_offset_delta + 1`.
    pub fn check(
        &self,
        producer_id: i64,
        epoch: i16,
        first_seq: i32,
        record_count: i32,
    ) -> SequenceCheck {
        if producer_id < 0 {
            return SequenceCheck::Append;
        }
        if first_seq < 0 || record_count < 1 {
            return SequenceCheck::Error {
                code: INVALID_RECORD,
                message: format!(
                    "the batch of producer {producer_id} has sequence {first_seq} and {record_count} records; an idempotent batch needs a sequence of 0 or more and at least one record"
                ),
            };
        }
        let Some(entry) = self.producers.get(&producer_id) else {
            if first_seq == 0 {
                return SequenceCheck::Append;
            }
            return SequenceCheck::Error {
                code: UNKNOWN_PRODUCER_ID,
                message: format!(
                    "producer {producer_id} is unknown to this partition (its state expired or was removed with the start of the log) and its batch starts at sequence {first_seq}, not 0"
                ),
            };
        };
        if epoch < entry.epoch {
            return SequenceCheck::Error {
                code: INVALID_PRODUCER_EPOCH,
                message: format!(
                    "producer {producer_id} sent epoch {epoch}, older than its current epoch {}: a newer instance of the producer fenced this one",
                    entry.epoch
                ),
            };
        }
        if epoch > entry.epoch {
            if first_seq == 0 {
                return SequenceCheck::Append;
            }
            return SequenceCheck::Error {
                code: OUT_OF_ORDER_SEQUENCE_NUMBER,
                message: format!(
                    "producer {producer_id} moved to epoch {epoch} (from {}) but its batch starts at sequence {first_seq}; a new epoch starts at 0",
                    entry.epoch
                ),
            };
        }
        let last_seq = last_sequence(first_seq, record_count);
        if let Some(batch) = entry
            .batches
            .iter()
            .find(|batch| batch.first_seq == first_seq && batch.last_seq == last_seq)
        {
            return SequenceCheck::Duplicate {
                base_offset: batch.base_offset,
                last_offset: batch.last_offset,
            };
        }
        // An entry always holds a batch; 0 is what an empty one would expect.
        let expected = entry.last_seq().map_or(0, next_sequence);
        if first_seq == expected {
            return SequenceCheck::Append;
        }
        SequenceCheck::Error {
            code: OUT_OF_ORDER_SEQUENCE_NUMBER,
            message: format!(
                "producer {producer_id} epoch {epoch}: expected sequence {expected}, got {first_seq}"
            ),
        }
    }

    /// Records a batch appended at `base_offset..=last_offset` after
    /// [`check`](Self::check) said [`SequenceCheck::Append`]. A new epoch
    /// replaces the producer's remembered batches. `timestamp_ms` is the
    /// batch's max timestamp; `now_ms` ages the producer for expiry.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        producer_id: i64,
        epoch: i16,
        first_seq: i32,
        record_count: i32,
        base_offset: i64,
        last_offset: i64,
        timestamp_ms: i64,
        now_ms: i64,
    ) {
        if producer_id < 0 {
            return;
        }
        let batch = BatchMetadata {
            first_seq,
            last_seq: last_sequence(first_seq, record_count),
            base_offset,
            last_offset,
            last_timestamp_ms: timestamp_ms,
        };
        if let Some(entry) = self.producers.get_mut(&producer_id) {
            if entry.epoch != epoch {
                entry.epoch = epoch;
                entry.batches.clear();
            }
            entry.push(batch);
            entry.last_update_ms = now_ms;
            return;
        }
        while self.producers.len() >= self.max_producers {
            self.evict_oldest();
        }
        let mut batches = VecDeque::with_capacity(BATCHES_PER_PRODUCER);
        batches.push_back(batch);
        self.producers.insert(
            producer_id,
            ProducerEntry {
                epoch,
                batches,
                last_update_ms: now_ms,
            },
        );
    }

    /// Rebuilds state from a batch header read back from the log (no check).
    /// The batch's max timestamp stands for the time of the update. A batch at
    /// or below the producer's last remembered offset is already accounted
    /// for and ignored, so replaying from before a snapshot's `upto_offset`
    /// does no harm.
    #[allow(clippy::too_many_arguments)]
    pub fn replay(
        &mut self,
        producer_id: i64,
        epoch: i16,
        first_seq: i32,
        record_count: i32,
        base_offset: i64,
        last_offset: i64,
        max_timestamp_ms: i64,
    ) {
        if producer_id < 0 {
            return;
        }
        let update_ms = match self.producers.get(&producer_id) {
            Some(entry) if entry.last_offset().is_some_and(|last| base_offset <= last) => return,
            Some(entry) => entry.last_update_ms.max(max_timestamp_ms),
            None => max_timestamp_ms,
        };
        self.record(
            producer_id,
            epoch,
            first_seq,
            record_count,
            base_offset,
            last_offset,
            max_timestamp_ms,
            update_ms,
        );
    }

    /// Drops producers not updated for longer than `idle_ms`; returns how many.
    pub fn expire(&mut self, now_ms: i64, idle_ms: i64) -> usize {
        let before = self.producers.len();
        self.producers
            .retain(|_, entry| now_ms.saturating_sub(entry.last_update_ms) <= idle_ms);
        before - self.producers.len()
    }

    /// Drops batches that end below `log_start_offset` (retention or
    /// delete-records removed them), and producers left without any, as Kafka
    /// does; returns how many producers went.
    pub fn truncate_before(&mut self, log_start_offset: i64) -> usize {
        let before = self.producers.len();
        self.producers.retain(|_, entry| {
            entry
                .batches
                .retain(|batch| batch.last_offset >= log_start_offset);
            !entry.batches.is_empty()
        });
        before - self.producers.len()
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .producers
            .iter()
            .min_by_key(|(producer_id, entry)| (entry.last_update_ms, **producer_id))
            .map(|(producer_id, _)| *producer_id);
        if let Some(producer_id) = oldest {
            self.producers.remove(&producer_id);
            self.evicted += 1;
        }
    }

    /// Encodes the state of every batch with offsets below `upto_offset`
    /// (normally the log end offset); producers with no such batch are left
    /// out, replay from `upto_offset` brings them back.
    pub fn encode_snapshot(&self, upto_offset: i64) -> Vec<u8> {
        let mut entries: Vec<(i64, &ProducerEntry)> = self
            .producers
            .iter()
            .map(|(producer_id, entry)| (*producer_id, entry))
            .collect();
        entries.sort_unstable_by_key(|(producer_id, _)| *producer_id);
        let mut body = Vec::with_capacity(12 + entries.len() * ENTRY_BYTES_MIN);
        body.extend_from_slice(&upto_offset.to_le_bytes());
        let count_at = body.len();
        body.extend_from_slice(&0u32.to_le_bytes());
        let mut count: u32 = 0;
        for (producer_id, entry) in entries {
            let kept: Vec<&BatchMetadata> = entry
                .batches
                .iter()
                .filter(|batch| batch.last_offset < upto_offset)
                .collect();
            if kept.is_empty() {
                continue;
            }
            count = count.saturating_add(1);
            body.extend_from_slice(&producer_id.to_le_bytes());
            body.extend_from_slice(&entry.epoch.to_le_bytes());
            body.extend_from_slice(&entry.last_update_ms.to_le_bytes());
            // At most BATCHES_PER_PRODUCER.
            body.push(kept.len() as u8);
            for batch in kept {
                body.extend_from_slice(&batch.first_seq.to_le_bytes());
                body.extend_from_slice(&batch.last_seq.to_le_bytes());
                body.extend_from_slice(&batch.base_offset.to_le_bytes());
                body.extend_from_slice(&batch.last_offset.to_le_bytes());
                body.extend_from_slice(&batch.last_timestamp_ms.to_le_bytes());
            }
        }
        body[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        seal_snapshot(&body)
    }

    /// Decodes a snapshot into its `upto_offset` and state. The state's cap
    /// is [`PRODUCERS_MAX_DEFAULT`] or the number of producers held, whichever
    /// is larger; set the configured one with [`set_max_producers`](Self::set_max_producers).
    pub fn decode_snapshot(bytes: &[u8]) -> Result<(i64, ProducerStates), SnapshotError> {
        let body = open_snapshot(bytes)?;
        let mut reader = Reader { bytes: body };
        let upto_offset = reader.i64()?;
        if upto_offset < 0 {
            return Err(SnapshotError::Invalid(format!(
                "upto_offset {upto_offset} is negative"
            )));
        }
        let count = reader.u32()? as usize;
        if count > PRODUCERS_MAX_LIMIT || count > reader.bytes.len() / ENTRY_BYTES_MIN {
            return Err(SnapshotError::Invalid(format!(
                "{count} producers do not fit in {} bytes",
                reader.bytes.len()
            )));
        }
        let mut producers = HashMap::with_capacity(count);
        let mut previous_id = -1;
        for _ in 0..count {
            let producer_id = reader.i64()?;
            if producer_id <= previous_id {
                return Err(SnapshotError::Invalid(format!(
                    "producer id {producer_id} is negative or not above the previous one, {previous_id}"
                )));
            }
            previous_id = producer_id;
            let epoch = reader.i16()?;
            let last_update_ms = reader.i64()?;
            let batch_count = usize::from(reader.u8()?);
            if !(1..=BATCHES_PER_PRODUCER).contains(&batch_count) {
                return Err(SnapshotError::Invalid(format!(
                    "producer {producer_id} has {batch_count} batches, not 1 to {BATCHES_PER_PRODUCER}"
                )));
            }
            let mut batches = VecDeque::with_capacity(BATCHES_PER_PRODUCER);
            let mut previous_offset = -1;
            for _ in 0..batch_count {
                let batch = BatchMetadata {
                    first_seq: reader.i32()?,
                    last_seq: reader.i32()?,
                    base_offset: reader.i64()?,
                    last_offset: reader.i64()?,
                    last_timestamp_ms: reader.i64()?,
                };
                let in_range = batch.first_seq >= 0
                    && batch.last_seq >= 0
                    && previous_offset < batch.base_offset
                    && batch.base_offset <= batch.last_offset
                    && batch.last_offset < upto_offset;
                if !in_range {
                    return Err(SnapshotError::Invalid(format!(
                        "producer {producer_id} has a batch out of range: {batch:?} (previous offset {previous_offset}, upto {upto_offset})"
                    )));
                }
                previous_offset = batch.last_offset;
                batches.push_back(batch);
            }
            producers.insert(
                producer_id,
                ProducerEntry {
                    epoch,
                    batches,
                    last_update_ms,
                },
            );
        }
        if !reader.bytes.is_empty() {
            return Err(SnapshotError::Invalid(format!(
                "{} bytes follow the last producer",
                reader.bytes.len()
            )));
        }
        let states = ProducerStates {
            max_producers: count.max(PRODUCERS_MAX_DEFAULT),
            producers,
            evicted: 0,
        };
        Ok((upto_offset, states))
    }
}

const SNAPSHOT_MAGIC: &[u8; 8] = b"RILLPST1";
const SNAPSHOT_VERSION: u16 = 1;
/// magic, version, reserved, body_length.
const SNAPSHOT_HEADER_BYTES: usize = 16;
const SNAPSHOT_TRAILER_BYTES: usize = 4;
/// A producer with one batch: id, epoch, last update, batch count, batch.
const ENTRY_BYTES_MIN: usize = 8 + 2 + 8 + 1 + BATCH_BYTES;
const BATCH_BYTES: usize = 32;

/// Why a producer-state snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// Not a producer-state snapshot.
    BadMagic,
    /// Written by a newer Rill.
    UnsupportedVersion(u16),
    /// Shorter than its header or its recorded length.
    Truncated { expected: usize, actual: usize },
    /// The bytes changed after they were written.
    ChecksumMismatch { stored: u32, computed: u32 },
    /// Checksummed but inconsistent (a bug or a forged file).
    Invalid(String),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => formatter.write_str("not a producer-state snapshot (bad magic)"),
            Self::UnsupportedVersion(version) => write!(
                formatter,
                "producer-state snapshot version {version} is not supported (this Rill reads version {SNAPSHOT_VERSION})"
            ),
            Self::Truncated { expected, actual } => write!(
                formatter,
                "producer-state snapshot is truncated: {actual} bytes of {expected}"
            ),
            Self::ChecksumMismatch { stored, computed } => write!(
                formatter,
                "producer-state snapshot is damaged: crc32 {computed:08x}, recorded {stored:08x}"
            ),
            Self::Invalid(reason) => {
                write!(formatter, "producer-state snapshot is invalid: {reason}")
            }
        }
    }
}

impl std::error::Error for SnapshotError {}

/// Header, body and CRC trailer around `body`.
fn seal_snapshot(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + body.len() + SNAPSHOT_TRAILER_BYTES);
    bytes.extend_from_slice(SNAPSHOT_MAGIC);
    bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    // Within u32 by PRODUCERS_MAX_LIMIT; were it not, decoding would refuse
    // the saturated length rather than misread the body.
    let length = u32::try_from(body.len()).unwrap_or(u32::MAX);
    bytes.extend_from_slice(&length.to_le_bytes());
    bytes.extend_from_slice(body);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Checks header, length and CRC; returns the body.
fn open_snapshot(bytes: &[u8]) -> Result<&[u8], SnapshotError> {
    let minimum = SNAPSHOT_HEADER_BYTES + SNAPSHOT_TRAILER_BYTES;
    let Some((header, rest)) = bytes.split_first_chunk::<SNAPSHOT_HEADER_BYTES>() else {
        return Err(SnapshotError::Truncated {
            expected: minimum,
            actual: bytes.len(),
        });
    };
    if !header.starts_with(SNAPSHOT_MAGIC) {
        return Err(SnapshotError::BadMagic);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    let reserved = u16::from_le_bytes([header[10], header[11]]);
    if reserved != 0 {
        return Err(SnapshotError::Invalid(format!(
            "reserved field is {reserved}, not 0"
        )));
    }
    let body_length = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    let expected = body_length.saturating_add(minimum);
    if bytes.len() < expected {
        return Err(SnapshotError::Truncated {
            expected,
            actual: bytes.len(),
        });
    }
    if bytes.len() > expected {
        return Err(SnapshotError::Invalid(format!(
            "{} bytes follow the checksum",
            bytes.len() - expected
        )));
    }
    let (body, trailer) = rest.split_at(body_length);
    let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let computed = crc32fast::hash(&bytes[..bytes.len() - SNAPSHOT_TRAILER_BYTES]);
    if stored != computed {
        return Err(SnapshotError::ChecksumMismatch { stored, computed });
    }
    Ok(body)
}

/// Little-endian reads from a checksummed body; running out is an error.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<N>() else {
            return Err(SnapshotError::Invalid(
                "the body ends inside a producer entry".into(),
            ));
        };
        self.bytes = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, SnapshotError> {
        Ok(i16::from_le_bytes(self.take()?))
    }

    fn i32(&mut self) -> Result<i32, SnapshotError> {
        Ok(i32::from_le_bytes(self.take()?))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(self.take()?))
    }
}

/// Name of the allocator's file in the data directory.
pub const PRODUCER_IDS_FILE: &str = "producer-ids";
/// The first producer id handed out on a fresh data directory.
pub const FIRST_PRODUCER_ID: i64 = 1_000;
/// Ids reserved with one durable write.
pub const PRODUCER_ID_BLOCK: i64 = 1_000;
const PRODUCER_IDS_HEADER: &str = "rill producer-ids 1";
/// Longest file the allocator reads; its real size is under 64 bytes.
const PRODUCER_IDS_BYTES_MAX: u64 = 4_096;

/// Hands out producer ids unique across restarts and crashes.
#[derive(Debug)]
pub struct ProducerIdAllocator {
    directory: PathBuf,
    next: i64,
    /// Ids below this are reserved durably.
    reserved_until: i64,
}

impl ProducerIdAllocator {
    /// Opens the allocator of a data directory, continuing after the last
    /// reserved block. A damaged file is an error naming it.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let path = data_dir.join(PRODUCER_IDS_FILE);
        let start = match std::fs::File::open(&path) {
            Ok(file) => {
                let mut text = String::new();
                file.take(PRODUCER_IDS_BYTES_MAX)
                    .read_to_string(&mut text)
                    .map_err(|error| anyhow::anyhow!("{error}"))
                    .and_then(|_| decode_reserved(&text).map_err(anyhow::Error::msg))
                    .with_context(|| {
                        format!(
                            "the producer-id file {} is damaged; it records the end of the last reserved block of producer ids, and guessing it could hand out an id twice",
                            path.display()
                        )
                    })?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => FIRST_PRODUCER_ID,
            Err(error) => {
                return Err(error).with_context(|| format!("opening {}", path.display()));
            }
        };
        Ok(Self {
            directory: data_dir.to_path_buf(),
            next: start,
            reserved_until: start,
        })
    }

    /// The next producer id, reserving a new block durably first when the
    /// current one is used up. On error no id is handed out.
    pub fn next_id(&mut self) -> anyhow::Result<i64> {
        if self.next >= self.reserved_until {
            let end = self
                .next
                .checked_add(PRODUCER_ID_BLOCK)
                .ok_or_else(|| anyhow::anyhow!("producer ids are exhausted"))?;
            self.persist(end)?;
            self.reserved_until = end;
        }
        let id = self.next;
        self.next += 1;
        Ok(id)
    }

    /// The allocator's file.
    pub fn path(&self) -> PathBuf {
        self.directory.join(PRODUCER_IDS_FILE)
    }

    fn persist(&self, reserved_until: i64) -> anyhow::Result<()> {
        let path = self.path();
        let temporary = self.directory.join(format!("{PRODUCER_IDS_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(encode_reserved(reserved_until).as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            std::fs::File::open(&self.directory)?.sync_all()
        };
        write().with_context(|| {
            format!(
                "reserving producer ids up to {reserved_until} in {}",
                path.display()
            )
        })
    }
}

fn encode_reserved(reserved_until: i64) -> String {
    let mut text = format!("{PRODUCER_IDS_HEADER}\nreserved_until {reserved_until}\n");
    let crc = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("crc32 {crc:08x}\n"));
    text
}

fn decode_reserved(text: &str) -> Result<i64, String> {
    let mut lines = text.split_inclusive('\n');
    let (Some(header), Some(value), Some(trailer), None) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return Err("expected three lines".into());
    };
    if header != format!("{PRODUCER_IDS_HEADER}\n") {
        return Err(format!("unexpected first line `{}`", header.trim_end()));
    }
    let stored = trailer
        .strip_prefix("crc32 ")
        .and_then(|hex| hex.strip_suffix('\n'))
        .filter(|hex| hex.len() == 8)
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or("missing crc32 line")?;
    let computed = crc32fast::hash(format!("{header}{value}").as_bytes());
    if stored != computed {
        return Err(format!(
            "crc32 mismatch (recorded {stored:08x}, computed {computed:08x})"
        ));
    }
    let reserved_until = value
        .strip_prefix("reserved_until ")
        .and_then(|number| number.strip_suffix('\n'))
        .and_then(|number| number.parse::<i64>().ok())
        .ok_or_else(|| format!("malformed line `{}`", value.trim_end()))?;
    if reserved_until < FIRST_PRODUCER_ID {
        return Err(format!(
            "reserved_until {reserved_until} is below the first producer id {FIRST_PRODUCER_ID}"
        ));
    }
    Ok(reserved_until)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records a batch of `count` records at `base_offset`, stamped `now`.
    fn append(
        states: &mut ProducerStates,
        producer_id: i64,
        epoch: i16,
        first_seq: i32,
        count: i32,
        base_offset: i64,
        now: i64,
    ) {
        assert_eq!(
            states.check(producer_id, epoch, first_seq, count),
            SequenceCheck::Append,
            "producer {producer_id} epoch {epoch} seq {first_seq}"
        );
        states.record(
            producer_id,
            epoch,
            first_seq,
            count,
            base_offset,
            base_offset + i64::from(count) - 1,
            now,
            now,
        );
    }

    fn error_code(check: SequenceCheck) -> i16 {
        match check {
            SequenceCheck::Error { code, message } => {
                assert!(!message.is_empty());
                code
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn error_codes_are_kafkas() {
        assert_eq!(OUT_OF_ORDER_SEQUENCE_NUMBER, 45);
        assert_eq!(INVALID_PRODUCER_EPOCH, 47);
        assert_eq!(UNKNOWN_PRODUCER_ID, 59);
        assert_eq!(INVALID_RECORD, 87);
    }

    #[test]
    fn in_order_appends_are_accepted_and_gaps_refused() {
        let mut states = ProducerStates::new(10);
        append(&mut states, 7, 0, 0, 3, 0, 100);
        append(&mut states, 7, 0, 3, 1, 3, 101);
        append(&mut states, 7, 0, 4, 10, 4, 102);
        let entry = states.get(7).expect("entry");
        assert_eq!(entry.last_seq(), Some(13));
        assert_eq!(entry.epoch(), 0);
        assert_eq!(entry.last_update_ms(), 102);
        assert_eq!(entry.batches().len(), 3);
        // A gap, a restart of the sequence and an overlap are all out of order.
        for first_seq in [15, 0, 10, 13] {
            assert_eq!(
                error_code(states.check(7, 0, first_seq, 1)),
                OUT_OF_ORDER_SEQUENCE_NUMBER,
                "seq {first_seq}"
            );
        }
        assert_eq!(states.check(7, 0, 14, 1), SequenceCheck::Append);
        // Another producer is independent.
        append(&mut states, 8, 0, 0, 1, 14, 103);
        assert_eq!(states.len(), 2);
    }

    #[test]
    fn no_producer_id_is_never_checked() {
        let mut states = ProducerStates::new(10);
        assert_eq!(states.check(-1, -1, -1, 5), SequenceCheck::Append);
        assert_eq!(states.check(-1, 0, 42, 0), SequenceCheck::Append);
        states.record(-1, -1, -1, 5, 0, 4, 1, 1);
        states.replay(-1, -1, -1, 5, 0, 4, 1);
        assert!(states.is_empty());
    }

    #[test]
    fn malformed_idempotent_headers_are_invalid_records() {
        let states = ProducerStates::new(10);
        assert_eq!(error_code(states.check(1, 0, -1, 1)), INVALID_RECORD);
        assert_eq!(error_code(states.check(1, 0, 0, 0)), INVALID_RECORD);
        assert_eq!(error_code(states.check(1, 0, 0, -3)), INVALID_RECORD);
    }

    #[test]
    fn retries_of_the_last_five_batches_are_duplicates_and_older_ones_out_of_order() {
        let mut states = ProducerStates::new(10);
        // Six batches of 2 records at offsets 100, 110, ... (other producers'
        // records sit in between).
        for batch in 0..6 {
            append(
                &mut states,
                1,
                3,
                batch * 2,
                2,
                100 + i64::from(batch) * 10,
                1,
            );
        }
        assert_eq!(
            states.get(1).expect("entry").batches().len(),
            BATCHES_PER_PRODUCER
        );
        for batch in 1..6 {
            let base = 100 + i64::from(batch) * 10;
            assert_eq!(
                states.check(1, 3, batch * 2, 2),
                SequenceCheck::Duplicate {
                    base_offset: base,
                    last_offset: base + 1
                },
                "batch {batch}"
            );
        }
        // The sixth-oldest batch is forgotten: its retry is out of order.
        assert_eq!(
            error_code(states.check(1, 3, 0, 2)),
            OUT_OF_ORDER_SEQUENCE_NUMBER
        );
        // Same first sequence but another length is no duplicate.
        assert_eq!(
            error_code(states.check(1, 3, 4, 1)),
            OUT_OF_ORDER_SEQUENCE_NUMBER
        );
        assert_eq!(states.check(1, 3, 12, 2), SequenceCheck::Append);
    }

    #[test]
    fn an_older_epoch_is_fenced() {
        let mut states = ProducerStates::new(10);
        append(&mut states, 5, 3, 0, 1, 0, 1);
        append(&mut states, 5, 3, 1, 1, 1, 2);
        for first_seq in [0, 1, 2] {
            assert_eq!(
                error_code(states.check(5, 2, first_seq, 1)),
                INVALID_PRODUCER_EPOCH,
                "seq {first_seq}"
            );
        }
        assert_eq!(
            error_code(states.check(5, i16::MIN, 2, 1)),
            INVALID_PRODUCER_EPOCH
        );
    }

    #[test]
    fn a_new_epoch_starts_at_sequence_zero_and_replaces_the_batches() {
        let mut states = ProducerStates::new(10);
        append(&mut states, 5, 3, 0, 4, 0, 1);
        append(&mut states, 5, 3, 4, 4, 4, 2);
        assert_eq!(
            error_code(states.check(5, 4, 8, 1)),
            OUT_OF_ORDER_SEQUENCE_NUMBER
        );
        assert_eq!(
            error_code(states.check(5, 4, 4, 4)),
            OUT_OF_ORDER_SEQUENCE_NUMBER,
            "not a duplicate across epochs"
        );
        append(&mut states, 5, 4, 0, 2, 8, 3);
        let entry = states.get(5).expect("entry");
        assert_eq!(entry.epoch(), 4);
        assert_eq!(entry.batches().len(), 1);
        assert_eq!(entry.last_seq(), Some(1));
        // The old epoch is fenced now, even for a retry of its own batch.
        assert_eq!(error_code(states.check(5, 3, 4, 4)), INVALID_PRODUCER_EPOCH);
        assert_eq!(
            states.check(5, 4, 0, 2),
            SequenceCheck::Duplicate {
                base_offset: 8,
                last_offset: 9
            }
        );
        assert_eq!(states.check(5, 4, 2, 1), SequenceCheck::Append);
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        assert_eq!(last_sequence(i32::MAX, 1), i32::MAX);
        assert_eq!(last_sequence(i32::MAX, 2), 0);
        assert_eq!(last_sequence(i32::MAX - 1, 5), 2);
        assert_eq!(last_sequence(0, i32::MAX), i32::MAX - 1);
        assert_eq!(next_sequence(i32::MAX), 0);

        let mut states = ProducerStates::new(10);
        // State rebuilt from the log late in the sequence space: MAX-10..=MAX-3.
        states.replay(9, 0, i32::MAX - 10, 8, 0, 7, 1);
        assert_eq!(states.get(9).expect("entry").last_seq(), Some(i32::MAX - 3));
        append(&mut states, 9, 0, i32::MAX - 2, 3, 8, 2);
        assert_eq!(states.get(9).expect("entry").last_seq(), Some(i32::MAX));
        assert_eq!(
            error_code(states.check(9, 0, i32::MAX, 1)),
            OUT_OF_ORDER_SEQUENCE_NUMBER
        );
        assert_eq!(
            states.check(9, 0, i32::MAX - 2, 3),
            SequenceCheck::Duplicate {
                base_offset: 8,
                last_offset: 10
            }
        );
        // After i32::MAX comes 0.
        append(&mut states, 9, 0, 0, 1, 11, 3);
        assert_eq!(states.get(9).expect("entry").last_seq(), Some(0));
        assert_eq!(states.check(9, 0, 1, 1), SequenceCheck::Append);
        // A batch straddling the wrap.
        let mut straddling = ProducerStates::new(10);
        straddling.replay(9, 0, i32::MAX - 5, 1, 0, 0, 1);
        append(&mut straddling, 9, 0, i32::MAX - 4, 10, 1, 2);
        assert_eq!(straddling.get(9).expect("entry").last_seq(), Some(4));
        assert_eq!(
            straddling.check(9, 0, i32::MAX - 4, 10),
            SequenceCheck::Duplicate {
                base_offset: 1,
                last_offset: 10
            }
        );
        assert_eq!(straddling.check(9, 0, 5, 1), SequenceCheck::Append);
    }

    #[test]
    fn an_unknown_producer_must_start_at_zero() {
        let states = ProducerStates::new(10);
        assert_eq!(error_code(states.check(3, 0, 1, 1)), UNKNOWN_PRODUCER_ID);
        assert_eq!(error_code(states.check(3, 2, 500, 4)), UNKNOWN_PRODUCER_ID);
        assert_eq!(states.check(3, 0, 0, 1), SequenceCheck::Append);
        assert_eq!(states.check(3, 7, 0, 9), SequenceCheck::Append);
    }

    #[test]
    fn idle_producers_expire() {
        let mut states = ProducerStates::new(10);
        append(&mut states, 1, 0, 0, 1, 0, 1_000);
        append(&mut states, 2, 0, 0, 1, 1, 5_000);
        assert_eq!(states.expire(11_000, 10_000), 0, "exactly idle_ms is kept");
        assert_eq!(states.expire(11_001, 10_000), 1);
        assert!(states.get(1).is_none());
        assert!(states.get(2).is_some());
        assert_eq!(error_code(states.check(1, 0, 1, 1)), UNKNOWN_PRODUCER_ID);
        // Updating a producer keeps it alive.
        append(&mut states, 2, 0, 1, 1, 2, 14_000);
        assert_eq!(states.expire(20_000, 10_000), 0);
        // A clock stepping back expires nothing.
        assert_eq!(states.expire(i64::MIN, 0), 0);
        assert_eq!(
            states.expire(
                14_000 + PRODUCER_ID_EXPIRATION_MS_DEFAULT + 1,
                PRODUCER_ID_EXPIRATION_MS_DEFAULT
            ),
            1
        );
        assert!(states.is_empty());
    }

    #[test]
    fn truncation_drops_batches_below_the_log_start() {
        let mut states = ProducerStates::new(10);
        append(&mut states, 1, 0, 0, 5, 0, 1); // offsets 0..=4
        append(&mut states, 2, 0, 0, 5, 5, 1); // 5..=9
        append(&mut states, 1, 0, 5, 5, 10, 1); // 10..=14
        assert_eq!(states.truncate_before(5), 0);
        assert_eq!(states.get(1).expect("entry").batches().len(), 1);
        assert_eq!(
            error_code(states.check(1, 0, 0, 5)),
            OUT_OF_ORDER_SEQUENCE_NUMBER,
            "a retry of a removed batch is no longer a duplicate"
        );
        assert_eq!(states.check(1, 0, 10, 1), SequenceCheck::Append);
        assert_eq!(states.truncate_before(10), 1, "producer 2 had nothing left");
        assert!(states.get(2).is_none());
        assert_eq!(states.truncate_before(15), 1);
        assert!(states.is_empty());
    }

    #[test]
    fn the_producer_cap_drops_the_least_recently_updated() {
        let mut states = ProducerStates::new(3);
        append(&mut states, 1, 0, 0, 1, 0, 10);
        append(&mut states, 2, 0, 0, 1, 1, 20);
        append(&mut states, 3, 0, 0, 1, 2, 30);
        append(&mut states, 1, 0, 1, 1, 3, 40); // 2 is now the oldest
        assert_eq!(states.evicted(), 0);
        append(&mut states, 4, 0, 0, 1, 4, 50);
        assert_eq!(states.len(), 3);
        assert_eq!(states.evicted(), 1);
        assert!(states.get(2).is_none());
        for producer_id in [1, 3, 4] {
            assert!(states.get(producer_id).is_some(), "{producer_id}");
        }
        states.set_max_producers(1);
        assert_eq!(states.len(), 1);
        assert_eq!(states.evicted(), 3);
        assert!(states.get(4).is_some());
        assert_eq!(ProducerStates::new(0).max_producers(), 1);
    }

    #[test]
    fn replay_rebuilds_what_record_built() {
        let mut live = ProducerStates::new(10);
        let mut rebuilt = ProducerStates::new(10);
        let batches = [
            (1, 0, 0, 3, 0),
            (2, 5, 0, 1, 3),
            (1, 0, 3, 2, 4),
            (2, 6, 0, 4, 6),
            (1, 0, 5, 1, 10),
        ];
        for (producer_id, epoch, first_seq, count, base) in batches {
            let last = base + i64::from(count) - 1;
            append(
                &mut live,
                producer_id,
                epoch,
                first_seq,
                count,
                base,
                1_000 + base,
            );
            rebuilt.replay(
                producer_id,
                epoch,
                first_seq,
                count,
                base,
                last,
                1_000 + base,
            );
        }
        assert_eq!(live, rebuilt);
        // Replaying an overlap changes nothing.
        let copy = rebuilt.clone();
        for (producer_id, epoch, first_seq, count, base) in batches {
            let last = base + i64::from(count) - 1;
            rebuilt.replay(
                producer_id,
                epoch,
                first_seq,
                count,
                base,
                last,
                1_000 + base,
            );
        }
        assert_eq!(rebuilt, copy);
    }

    fn sample_states() -> ProducerStates {
        let mut states = ProducerStates::new(100);
        let mut offset = 0;
        for batch in 0..7 {
            append(
                &mut states,
                1_000,
                2,
                batch * 3,
                3,
                offset,
                10 + i64::from(batch),
            );
            offset += 3;
            if batch % 2 == 0 {
                append(&mut states, 1_001, 0, batch / 2, 1, offset, 20);
                offset += 1;
            }
        }
        append(&mut states, i64::MAX, i16::MAX, 0, 1, offset, -5);
        states
    }

    #[test]
    fn snapshots_round_trip() {
        let states = sample_states();
        let end = 100;
        let bytes = states.encode_snapshot(end);
        let (upto, decoded) = ProducerStates::decode_snapshot(&bytes).expect("decode");
        assert_eq!(upto, end);
        assert_eq!(decoded.producers, states.producers);
        assert_eq!(decoded.max_producers(), PRODUCERS_MAX_DEFAULT);
        assert_eq!(decoded.encode_snapshot(end), bytes, "encoding is canonical");

        let (_, empty) =
            ProducerStates::decode_snapshot(&ProducerStates::new(1).encode_snapshot(0))
                .expect("empty");
        assert!(empty.is_empty());
    }

    #[test]
    fn snapshots_leave_out_batches_at_or_after_upto() {
        let mut states = ProducerStates::new(10);
        append(&mut states, 1, 0, 0, 2, 0, 1); // 0..=1
        append(&mut states, 2, 0, 0, 2, 2, 1); // 2..=3
        append(&mut states, 1, 0, 2, 2, 4, 1); // 4..=5
        let (upto, mut decoded) =
            ProducerStates::decode_snapshot(&states.encode_snapshot(4)).expect("decode");
        assert_eq!(upto, 4);
        assert_eq!(decoded.get(1).expect("1").batches().len(), 1);
        assert_eq!(decoded.get(2).expect("2").batches().len(), 1);
        let (_, partial) =
            ProducerStates::decode_snapshot(&states.encode_snapshot(2)).expect("decode");
        assert!(partial.get(2).is_none());
        // Replaying the log from upto restores the rest.
        decoded.replay(1, 0, 2, 2, 4, 5, 1);
        assert_eq!(decoded.producers, states.producers);
    }

    #[test]
    fn every_damaged_byte_and_every_truncation_is_refused() {
        let bytes = sample_states().encode_snapshot(1 << 40);
        assert!(bytes.len() > 300, "{}", bytes.len());
        let mut damaged = bytes.clone();
        for index in 0..bytes.len() {
            for value in 0..=u8::MAX {
                if value == bytes[index] {
                    continue;
                }
                damaged[index] = value;
                assert!(
                    ProducerStates::decode_snapshot(&damaged).is_err(),
                    "byte {index} set to {value} was accepted"
                );
            }
            damaged[index] = bytes[index];
        }
        for length in 0..bytes.len() {
            let error = ProducerStates::decode_snapshot(&bytes[..length])
                .expect_err("a truncated snapshot was accepted");
            assert!(
                matches!(error, SnapshotError::Truncated { .. }),
                "{length}: {error}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(ProducerStates::decode_snapshot(&longer).is_err());
        assert_eq!(
            ProducerStates::decode_snapshot(b"RILLCKP1\x01\0\0\0\0\0\0\0\0\0\0\0"),
            Err(SnapshotError::BadMagic)
        );
        let mut newer = bytes.clone();
        newer[8] = 2;
        assert_eq!(
            ProducerStates::decode_snapshot(&newer),
            Err(SnapshotError::UnsupportedVersion(2))
        );
    }

    /// A body built by hand, sealed with a correct header and CRC.
    struct Body(Vec<u8>);

    impl Body {
        fn new(upto: i64, count: u32) -> Self {
            let mut bytes = upto.to_le_bytes().to_vec();
            bytes.extend_from_slice(&count.to_le_bytes());
            Self(bytes)
        }

        fn producer(mut self, producer_id: i64, batches: &[(i32, i32, i64, i64)]) -> Self {
            self.0.extend_from_slice(&producer_id.to_le_bytes());
            self.0.extend_from_slice(&0i16.to_le_bytes());
            self.0.extend_from_slice(&0i64.to_le_bytes());
            self.0.push(batches.len() as u8);
            for (first_seq, last_seq, base, last) in batches {
                self.0.extend_from_slice(&first_seq.to_le_bytes());
                self.0.extend_from_slice(&last_seq.to_le_bytes());
                self.0.extend_from_slice(&base.to_le_bytes());
                self.0.extend_from_slice(&last.to_le_bytes());
                self.0.extend_from_slice(&0i64.to_le_bytes());
            }
            self
        }

        fn decode(&self) -> Result<(i64, ProducerStates), SnapshotError> {
            ProducerStates::decode_snapshot(&seal_snapshot(&self.0))
        }
    }

    #[test]
    fn checksummed_but_inconsistent_snapshots_are_refused() {
        let good = [(0, 0, 0, 0)];
        assert!(Body::new(10, 1).producer(1, &good).decode().is_ok());
        let invalid = |body: Body| match body.decode() {
            Err(SnapshotError::Invalid(reason)) => reason,
            other => panic!("expected Invalid, got {other:?}"),
        };
        // Counts that do not fit the bytes, without allocating for them.
        invalid(Body::new(10, u32::MAX));
        invalid(Body::new(10, 2).producer(1, &good));
        invalid(Body::new(10, 0).producer(1, &good));
        // Ids out of order, repeated or negative.
        invalid(Body::new(10, 2).producer(2, &good).producer(1, &good));
        invalid(Body::new(10, 2).producer(1, &good).producer(1, &good));
        invalid(Body::new(10, 1).producer(-1, &good));
        // Batch counts and values out of range.
        invalid(Body::new(10, 1).producer(1, &[]));
        invalid(Body::new(10, 1).producer(1, &[(0, 0, 0, 0); 6]));
        invalid(Body::new(10, 1).producer(1, &[(-1, 0, 0, 0)]));
        invalid(Body::new(10, 1).producer(1, &[(0, 0, 5, 4)]));
        invalid(Body::new(10, 1).producer(1, &[(0, 0, 0, 10)]));
        invalid(Body::new(10, 1).producer(1, &[(0, 0, 0, 3), (1, 1, 3, 3)]));
        invalid(Body::new(-1, 0));
        // A batch count claiming a batch the body does not hold.
        let mut short = Body::new(10, 1).producer(1, &good);
        short.0[12 + 18] = 2;
        short.0.extend_from_slice(&[0; 20]);
        let reason = invalid(short);
        assert!(reason.contains("ends inside"), "{reason}");
    }

    #[test]
    fn producer_ids_are_unique_across_reopens() {
        let data = tempfile::tempdir().expect("tempdir");
        let mut seen = std::collections::HashSet::new();
        let mut allocator = ProducerIdAllocator::open(data.path()).expect("open");
        let first = allocator.next_id().expect("id");
        assert_eq!(first, FIRST_PRODUCER_ID);
        assert!(seen.insert(first));
        for _ in 0..1_500 {
            assert!(seen.insert(allocator.next_id().expect("id")));
        }
        let path = allocator.path();
        assert_eq!(path, data.path().join(PRODUCER_IDS_FILE));
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            decode_reserved(&text),
            Ok(FIRST_PRODUCER_ID + 2 * PRODUCER_ID_BLOCK)
        );
        // Dropping the allocator is what a crash looks like to the file.
        drop(allocator);
        for _ in 0..3 {
            let mut allocator = ProducerIdAllocator::open(data.path()).expect("reopen");
            let id = allocator.next_id().expect("id");
            assert!(
                seen.iter().all(|old| *old < id),
                "{id} not above the old ones"
            );
            assert!(seen.insert(id));
            assert!(seen.insert(allocator.next_id().expect("id")));
        }
        assert!(!data.path().join("producer-ids.tmp").exists());
    }

    #[test]
    fn a_damaged_producer_id_file_is_an_error_naming_it() {
        let data = tempfile::tempdir().expect("tempdir");
        let mut allocator = ProducerIdAllocator::open(data.path()).expect("open");
        allocator.next_id().expect("id");
        let path = allocator.path();
        let good = std::fs::read_to_string(&path).expect("read");
        let damaged = [
            good.replace("2000", "2001"),
            good.replace("reserved_until", "reserved"),
            good.lines().take(2).collect::<Vec<_>>().join("\n"),
            String::new(),
            format!("{good}extra\n"),
            encode_reserved(5),
            "x".repeat(10_000),
        ];
        for text in damaged {
            std::fs::write(&path, &text).expect("damage");
            let error = ProducerIdAllocator::open(data.path()).expect_err("damaged file opened");
            let message = format!("{error:#}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        std::fs::write(&path, &good).expect("restore");
        let mut allocator = ProducerIdAllocator::open(data.path()).expect("reopen");
        assert_eq!(
            allocator.next_id().expect("id"),
            FIRST_PRODUCER_ID + PRODUCER_ID_BLOCK
        );
    }
}
