//! Sparse offset and timestamp indexes of one segment.
//!
//! Indexes are hints, never the truth: the log file is. Each entry carries its
//! own CRC-32 so a torn or flipped entry is noticed; loading keeps the longest
//! prefix of entries that check out and are in order, and recovery rebuilds the
//! rest from the log. Entries are little-endian (see `docs/format.md`):
//!
//! ```text
//! offset index entry (12 bytes): relative_offset u32 | position u32 | crc32 u32
//! time index entry   (16 bytes): timestamp i64 | relative_offset u32 | crc32 u32
//! ```
//! The CRC-32 (IEEE) covers the entry's bytes before it.

/// One offset index entry: the batch holding `relative_offset` starts at `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

/// One time index entry: at `relative_offset` the largest timestamp so far is `timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    pub timestamp: i64,
    pub relative_offset: u32,
}

pub const OFFSET_ENTRY_BYTES: usize = 12;
pub const TIME_ENTRY_BYTES: usize = 16;

impl OffsetEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.relative_offset.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let field = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        (crc32fast::hash(&bytes[..8]) == field(8)).then(|| Self {
            relative_offset: field(0),
            position: field(4),
        })
    }
}

impl TimeEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.timestamp.to_le_bytes());
        out.extend_from_slice(&self.relative_offset.to_le_bytes());
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut timestamp = [0u8; 8];
        timestamp.copy_from_slice(&bytes[..8]);
        let relative_offset = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        (crc32fast::hash(&bytes[..12]) == crc).then(|| Self {
            timestamp: i64::from_le_bytes(timestamp),
            relative_offset,
        })
    }
}

/// Decodes offset entries, keeping the valid, strictly increasing prefix whose
/// positions lie inside `log_bytes`. Returns the entries and whether all were kept.
pub fn decode_offset_index(bytes: &[u8], log_bytes: u64) -> (Vec<OffsetEntry>, bool) {
    let mut entries: Vec<OffsetEntry> = Vec::with_capacity(bytes.len() / OFFSET_ENTRY_BYTES);
    for chunk in bytes.chunks(OFFSET_ENTRY_BYTES) {
        let Some(entry) = (chunk.len() == OFFSET_ENTRY_BYTES)
            .then(|| OffsetEntry::decode(chunk))
            .flatten()
        else {
            return (entries, false);
        };
        let ordered = entries.last().is_none_or(|last| {
            entry.relative_offset > last.relative_offset && entry.position > last.position
        });
        if !ordered || u64::from(entry.position) >= log_bytes {
            return (entries, false);
        }
        entries.push(entry);
    }
    (entries, true)
}

/// Decodes time entries, keeping the valid prefix with non-decreasing timestamps
/// and increasing offsets. Returns the entries and whether all were kept.
pub fn decode_time_index(bytes: &[u8]) -> (Vec<TimeEntry>, bool) {
    let mut entries: Vec<TimeEntry> = Vec::with_capacity(bytes.len() / TIME_ENTRY_BYTES);
    for chunk in bytes.chunks(TIME_ENTRY_BYTES) {
        let Some(entry) = (chunk.len() == TIME_ENTRY_BYTES)
            .then(|| TimeEntry::decode(chunk))
            .flatten()
        else {
            return (entries, false);
        };
        let ordered = entries.last().is_none_or(|last| {
            entry.timestamp >= last.timestamp && entry.relative_offset >= last.relative_offset
        });
        if !ordered {
            return (entries, false);
        }
        entries.push(entry);
    }
    (entries, true)
}

/// The entry with the largest relative offset at or below `relative_offset`.
pub fn floor_offset(entries: &[OffsetEntry], relative_offset: u32) -> Option<OffsetEntry> {
    let after = entries.partition_point(|entry| entry.relative_offset <= relative_offset);
    after.checked_sub(1).map(|index| entries[index])
}

/// The last time entry whose timestamp is below `timestamp`: scanning for the
/// first record at or after `timestamp` can start from its offset.
pub fn time_floor(entries: &[TimeEntry], timestamp: i64) -> Option<TimeEntry> {
    let after = entries.partition_point(|entry| entry.timestamp < timestamp);
    after.checked_sub(1).map(|index| entries[index])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_entries_cut_the_index_there() {
        let mut bytes = Vec::new();
        for (relative_offset, position) in [(0, 0), (10, 4096), (20, 8192)] {
            OffsetEntry {
                relative_offset,
                position,
            }
            .encode(&mut bytes);
        }
        let (entries, complete) = decode_offset_index(&bytes, 10_000);
        assert!(complete);
        assert_eq!(entries.len(), 3);
        assert_eq!(
            floor_offset(&entries, 15).map(|entry| entry.position),
            Some(4096)
        );

        bytes[OFFSET_ENTRY_BYTES + 2] ^= 1;
        let (entries, complete) = decode_offset_index(&bytes, 10_000);
        assert!(!complete);
        assert_eq!(entries.len(), 1);

        let (entries, complete) = decode_offset_index(&bytes[..OFFSET_ENTRY_BYTES + 5], 10_000);
        assert!(!complete);
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn positions_past_the_log_are_not_trusted() {
        let mut bytes = Vec::new();
        OffsetEntry {
            relative_offset: 0,
            position: 0,
        }
        .encode(&mut bytes);
        OffsetEntry {
            relative_offset: 5,
            position: 9000,
        }
        .encode(&mut bytes);
        let (entries, complete) = decode_offset_index(&bytes, 8000);
        assert_eq!((entries.len(), complete), (1, false));
    }

    #[test]
    fn time_floor_finds_the_scan_start() {
        let mut bytes = Vec::new();
        for (timestamp, relative_offset) in [(100, 0), (200, 5), (300, 9)] {
            TimeEntry {
                timestamp,
                relative_offset,
            }
            .encode(&mut bytes);
        }
        let (entries, complete) = decode_time_index(&bytes);
        assert!(complete);
        assert_eq!(
            time_floor(&entries, 250).map(|entry| entry.relative_offset),
            Some(5)
        );
        assert_eq!(time_floor(&entries, 50), None);
    }
}
