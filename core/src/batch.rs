//! Kafka record batches, magic 2: the unit Rill stores, checks and serves.
//!
//! A segment file is a sequence of these batches byte for byte as a Kafka client
//! sends and receives them, so a fetch can be answered with file ranges. This module
//! parses and checks batch headers, stamps the broker-assigned fields (base offset,
//! leader epoch, log-append time) and walks the records of uncompressed batches.
//! All integers here are big-endian, as Kafka defines them.
//!
//! Layout of the 61-byte header (offsets in bytes):
//!
//! ```text
//!  0 base_offset i64 | 8 batch_length i32 | 12 partition_leader_epoch i32 | 16 magic i8
//! 17 crc u32 (CRC-32C of bytes 21..end) | 21 attributes i16 | 23 last_offset_delta i32
//! 27 base_timestamp i64 | 35 max_timestamp i64 | 43 producer_id i64
//! 51 producer_epoch i16 | 53 base_sequence i32 | 57 record_count i32 | 61 records...
//! ```

mod records;

pub use records::{
    Header, Record, RecordBuilder, RecordIter, RecordView, encode_batch, write_nullable,
    write_varlong,
};

/// Size of the fixed batch header.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes before the `batch_length` field counts from: base offset and length itself.
pub const BATCH_LENGTH_PREFIX_BYTES: usize = 12;
/// The only batch format Rill stores.
pub const MAGIC_V2: u8 = 2;

const OFFSET_BASE_OFFSET: usize = 0;
const OFFSET_BATCH_LENGTH: usize = 8;
const OFFSET_LEADER_EPOCH: usize = 12;
const OFFSET_MAGIC: usize = 16;
const OFFSET_CRC: usize = 17;
const OFFSET_ATTRIBUTES: usize = 21;
const OFFSET_LAST_OFFSET_DELTA: usize = 23;
const OFFSET_BASE_TIMESTAMP: usize = 27;
const OFFSET_MAX_TIMESTAMP: usize = 35;
const OFFSET_PRODUCER_ID: usize = 43;
const OFFSET_PRODUCER_EPOCH: usize = 51;
const OFFSET_BASE_SEQUENCE: usize = 53;
const OFFSET_RECORD_COUNT: usize = 57;

const ATTRIBUTE_COMPRESSION_MASK: i16 = 0x07;
const ATTRIBUTE_LOG_APPEND_TIME: i16 = 0x08;
const ATTRIBUTE_TRANSACTIONAL: i16 = 0x10;
const ATTRIBUTE_CONTROL: i16 = 0x20;

/// Compression codec named by a batch's attributes. Rill stores batches as they came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    fn from_attributes(attributes: i16) -> Option<Self> {
        match attributes & ATTRIBUTE_COMPRESSION_MASK {
            0 => Some(Self::None),
            1 => Some(Self::Gzip),
            2 => Some(Self::Snappy),
            3 => Some(Self::Lz4),
            4 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// Why a batch was refused. Each variant names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch is {actual} bytes, shorter than the {BATCH_HEADER_BYTES}-byte v2 header")]
    TooShort { actual: usize },
    #[error("batch_length says {declared} bytes follow the length field, but {actual} do")]
    LengthMismatch { declared: i64, actual: usize },
    #[error("magic byte is {found}, only record batch v2 (magic 2) is accepted")]
    BadMagic { found: u8 },
    #[error("CRC-32C mismatch: header says {stored:#010x}, bytes give {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("record_count is {record_count}; a batch holds at least one record")]
    BadRecordCount { record_count: i32 },
    #[error(
        "last_offset_delta is {last_offset_delta} but record_count is {record_count}; \
         they must differ by one"
    )]
    OffsetDeltaMismatch {
        last_offset_delta: i32,
        record_count: i32,
    },
    #[error("compression codec {codec} in attributes is not one Kafka defines")]
    UnknownCompression { codec: i16 },
    #[error("records section is malformed: {reason}")]
    MalformedRecords { reason: &'static str },
}

/// The parsed fixed header of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: u8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

fn be_i16(bytes: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([bytes[at], bytes[at + 1]])
}
fn be_i32(bytes: &[u8], at: usize) -> i32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    i32::from_be_bytes(raw)
}
fn be_i64(bytes: &[u8], at: usize) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    i64::from_be_bytes(raw)
}

impl BatchHeader {
    /// Parses the fixed header without checking anything but its size.
    pub fn parse(bytes: &[u8]) -> Result<Self, BatchError> {
        if bytes.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::TooShort {
                actual: bytes.len(),
            });
        }
        Ok(Self {
            base_offset: be_i64(bytes, OFFSET_BASE_OFFSET),
            batch_length: be_i32(bytes, OFFSET_BATCH_LENGTH),
            partition_leader_epoch: be_i32(bytes, OFFSET_LEADER_EPOCH),
            magic: bytes[OFFSET_MAGIC],
            crc: be_i32(bytes, OFFSET_CRC) as u32,
            attributes: be_i16(bytes, OFFSET_ATTRIBUTES),
            last_offset_delta: be_i32(bytes, OFFSET_LAST_OFFSET_DELTA),
            base_timestamp: be_i64(bytes, OFFSET_BASE_TIMESTAMP),
            max_timestamp: be_i64(bytes, OFFSET_MAX_TIMESTAMP),
            producer_id: be_i64(bytes, OFFSET_PRODUCER_ID),
            producer_epoch: be_i16(bytes, OFFSET_PRODUCER_EPOCH),
            base_sequence: be_i32(bytes, OFFSET_BASE_SEQUENCE),
            record_count: be_i32(bytes, OFFSET_RECORD_COUNT),
        })
    }

    /// Whole size of the batch on disk and on the wire, if the length field is sane.
    pub fn total_bytes(&self) -> Option<usize> {
        let length = usize::try_from(self.batch_length).ok()?;
        let total = length.checked_add(BATCH_LENGTH_PREFIX_BYTES)?;
        (total >= BATCH_HEADER_BYTES).then_some(total)
    }

    pub fn last_offset(&self) -> i64 {
        self.base_offset
            .saturating_add(i64::from(self.last_offset_delta))
    }

    pub fn compression(&self) -> Option<Compression> {
        Compression::from_attributes(self.attributes)
    }

    pub fn is_log_append_time(&self) -> bool {
        self.attributes & ATTRIBUTE_LOG_APPEND_TIME != 0
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTRIBUTE_TRANSACTIONAL != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & ATTRIBUTE_CONTROL != 0
    }
}

/// CRC-32C over the bytes the v2 checksum covers (attributes to the end).
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c(&batch[OFFSET_ATTRIBUTES..])
}

/// CRC-32C (Castagnoli) of `bytes`, with the CPU's instruction where it has
/// one (SSE 4.2, ARMv8 CRC).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Checks the structure and checksum of one batch that must fill `bytes` exactly.
///
/// This is the check every append runs before a byte reaches the disk, and the
/// check recovery and `verify` run on what they read back.
pub fn check_batch(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(bytes)?;
    let declared = i64::from(header.batch_length);
    match header.total_bytes() {
        Some(total) if total == bytes.len() => {}
        _ => {
            return Err(BatchError::LengthMismatch {
                declared,
                actual: bytes.len() - BATCH_LENGTH_PREFIX_BYTES,
            });
        }
    }
    if header.magic != MAGIC_V2 {
        return Err(BatchError::BadMagic {
            found: header.magic,
        });
    }
    let computed = compute_crc(bytes);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    if header.record_count < 1 {
        return Err(BatchError::BadRecordCount {
            record_count: header.record_count,
        });
    }
    if i64::from(header.last_offset_delta) + 1 != i64::from(header.record_count) {
        return Err(BatchError::OffsetDeltaMismatch {
            last_offset_delta: header.last_offset_delta,
            record_count: header.record_count,
        });
    }
    let Some(compression) = header.compression() else {
        return Err(BatchError::UnknownCompression {
            codec: header.attributes & ATTRIBUTE_COMPRESSION_MASK,
        });
    };
    // Uncompressed records can be walked cheaply; this catches a producer whose
    // record framing disagrees with its header before the batch is stored.
    if compression == Compression::None {
        let mut count = 0i64;
        for record in RecordIter::new(&bytes[BATCH_HEADER_BYTES..]) {
            let record = record?;
            if i64::from(record.offset_delta) != count {
                return Err(BatchError::MalformedRecords {
                    reason: "record offset deltas are not 0, 1, 2, ...",
                });
            }
            count += 1;
        }
        if count != i64::from(header.record_count) {
            return Err(BatchError::MalformedRecords {
                reason: "number of records differs from record_count",
            });
        }
    }
    Ok(header)
}

/// Writes the broker-assigned fields into a checked batch.
///
/// The base offset and leader epoch are outside the checksum. Log-append time
/// changes the attributes and max timestamp, which are inside it, so the CRC is
/// computed again, as Kafka does.
pub fn stamp_batch(batch: &mut [u8], base_offset: i64, log_append_time_ms: Option<i64>) {
    assert!(
        batch.len() >= BATCH_HEADER_BYTES,
        "stamp on an unchecked batch"
    );
    batch[OFFSET_BASE_OFFSET..OFFSET_BASE_OFFSET + 8].copy_from_slice(&base_offset.to_be_bytes());
    batch[OFFSET_LEADER_EPOCH..OFFSET_LEADER_EPOCH + 4].copy_from_slice(&0i32.to_be_bytes());
    if let Some(now_ms) = log_append_time_ms {
        let attributes = be_i16(batch, OFFSET_ATTRIBUTES) | ATTRIBUTE_LOG_APPEND_TIME;
        batch[OFFSET_ATTRIBUTES..OFFSET_ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
        batch[OFFSET_MAX_TIMESTAMP..OFFSET_MAX_TIMESTAMP + 8]
            .copy_from_slice(&now_ms.to_be_bytes());
        let crc = compute_crc(batch);
        batch[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    }
}

#[cfg(test)]
mod tests;
