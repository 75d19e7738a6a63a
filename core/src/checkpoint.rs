//! The per-partition recovery checkpoint: where the log starts and how far it is
//! known durable.
//!
//! Recovery trusts everything before the recovery point and checks every batch
//! after it. The file is replaced atomically (write, sync, rename, sync
//! directory) and carries a CRC-32 so a damaged checkpoint is noticed and
//! treated as absent, which only makes recovery check more. Layout, little-endian
//! (48 bytes; see `docs/format.md`):
//!
//! ```text
//!  0 magic "RILLCKP1" | 8 version u16 = 1 | 10 reserved u16 = 0
//! 12 log_start_offset i64 | 20 recovery_segment_base i64
//! 28 recovery_position u64 | 36 recovery_next_offset i64 | 44 crc32 u32 of bytes 0..44
//! ```

pub const CHECKPOINT_FILE_NAME: &str = "partition.checkpoint";
pub const CHECKPOINT_BYTES: usize = 48;
const MAGIC: &[u8; 8] = b"RILLCKP1";
const VERSION: u16 = 1;

/// What the checkpoint records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// First offset readers may see (advanced by retention and delete-records).
    pub log_start_offset: i64,
    /// Segment holding the recovery point.
    pub recovery_segment_base: i64,
    /// Byte position in that segment of the first batch not known durable.
    pub recovery_position: u64,
    /// Offset of the first batch not known durable.
    pub recovery_next_offset: i64,
}

/// Why a checkpoint file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint is {0} bytes, expected {CHECKPOINT_BYTES}")]
    WrongSize(usize),
    #[error("checkpoint magic is wrong")]
    BadMagic,
    #[error("checkpoint version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    #[error("checkpoint CRC-32 mismatch")]
    CrcMismatch,
    #[error("checkpoint fields are inconsistent")]
    Inconsistent,
}

impl Checkpoint {
    pub fn encode(&self) -> [u8; CHECKPOINT_BYTES] {
        let mut out = [0u8; CHECKPOINT_BYTES];
        out[0..8].copy_from_slice(MAGIC);
        out[8..10].copy_from_slice(&VERSION.to_le_bytes());
        out[12..20].copy_from_slice(&self.log_start_offset.to_le_bytes());
        out[20..28].copy_from_slice(&self.recovery_segment_base.to_le_bytes());
        out[28..36].copy_from_slice(&self.recovery_position.to_le_bytes());
        out[36..44].copy_from_slice(&self.recovery_next_offset.to_le_bytes());
        let crc = crc32fast::hash(&out[..44]);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CheckpointError> {
        if bytes.len() != CHECKPOINT_BYTES {
            return Err(CheckpointError::WrongSize(bytes.len()));
        }
        if &bytes[0..8] != MAGIC {
            return Err(CheckpointError::BadMagic);
        }
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        let stored_crc = u32::from_le_bytes([bytes[44], bytes[45], bytes[46], bytes[47]]);
        if crc32fast::hash(&bytes[..44]) != stored_crc {
            return Err(CheckpointError::CrcMismatch);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(CheckpointError::UnsupportedVersion(version));
        }
        let checkpoint = Self {
            log_start_offset: u64_at(12) as i64,
            recovery_segment_base: u64_at(20) as i64,
            recovery_position: u64_at(28),
            recovery_next_offset: u64_at(36) as i64,
        };
        let consistent = checkpoint.log_start_offset >= 0
            && checkpoint.recovery_segment_base >= 0
            && checkpoint.recovery_next_offset >= checkpoint.recovery_segment_base;
        consistent
            .then_some(checkpoint)
            .ok_or(CheckpointError::Inconsistent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let checkpoint = Checkpoint {
            log_start_offset: 5,
            recovery_segment_base: 100,
            recovery_position: 4096,
            recovery_next_offset: 140,
        };
        let mut bytes = checkpoint.encode();
        assert_eq!(Checkpoint::decode(&bytes), Ok(checkpoint));
        bytes[30] ^= 4;
        assert_eq!(
            Checkpoint::decode(&bytes),
            Err(CheckpointError::CrcMismatch)
        );
        assert_eq!(
            Checkpoint::decode(&bytes[..10]),
            Err(CheckpointError::WrongSize(10))
        );
    }
}
