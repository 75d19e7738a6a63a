//! The byte layout Rill's own stored formats share (MQTT retained
//! messages and sessions, replicator progress): little-endian fixed-width
//! integers, a version byte first and a CRC-32 (IEEE, `crc32fast`) of
//! everything before it last, as `docs/format.md` draws. Decoding checks
//! the size limit, then the CRC, then the version, and reads every length
//! against the bytes left, so a damaged or hostile file costs at most its
//! own size and is refused.

/// Why stored bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoredDecodeError {
    #[error("{bytes} bytes are over the limit of {bytes_max} bytes")]
    TooLarge { bytes: usize, bytes_max: usize },
    #[error("{bytes} bytes are too short for a version byte and a checksum")]
    TooShort { bytes: usize },
    #[error("checksum {stored:#010x} does not match the contents ({computed:#010x})")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("format version {version} is not supported (expected {expected})")]
    UnsupportedVersion { version: u8, expected: u8 },
    #[error("ends inside {field}")]
    Truncated { field: &'static str },
    #[error("{field} is not valid")]
    Invalid { field: &'static str },
    #[error("{bytes} bytes are left after the last field")]
    TrailingBytes { bytes: usize },
}

/// Writes fields little-endian.
#[derive(Default)]
pub(crate) struct StoredWriter {
    bytes: Vec<u8>,
}

impl StoredWriter {
    /// A writer that starts with the format version byte.
    pub(crate) fn new(version: u8) -> StoredWriter {
        StoredWriter {
            bytes: vec![version],
        }
    }

    pub(crate) fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub(crate) fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// A count or length that the caller has bounded below `u32::MAX`.
    pub(crate) fn len32(&mut self, len: usize) {
        let len = u32::try_from(len);
        assert!(len.is_ok(), "stored lengths are bounded below 4 GiB");
        self.u32(len.unwrap_or(u32::MAX));
    }

    /// A `u32` length and the bytes.
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.len32(bytes.len());
        self.bytes.extend_from_slice(bytes);
    }

    pub(crate) fn string(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    /// Appends the CRC-32 of everything written and returns the bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.bytes);
        self.u32(crc);
        self.bytes
    }
}

/// Checks size, CRC and version of stored bytes and returns the fields
/// between the version byte and the CRC.
pub(crate) fn open(
    bytes: &[u8],
    version: u8,
    bytes_max: usize,
) -> Result<StoredReader<'_>, StoredDecodeError> {
    if bytes.len() > bytes_max {
        return Err(StoredDecodeError::TooLarge {
            bytes: bytes.len(),
            bytes_max,
        });
    }
    let Some(split) = bytes.len().checked_sub(4).filter(|&split| split >= 1) else {
        return Err(StoredDecodeError::TooShort { bytes: bytes.len() });
    };
    let (contents, crc) = bytes.split_at(split);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(contents);
    if stored != computed {
        return Err(StoredDecodeError::ChecksumMismatch { stored, computed });
    }
    if contents[0] != version {
        return Err(StoredDecodeError::UnsupportedVersion {
            version: contents[0],
            expected: version,
        });
    }
    Ok(StoredReader {
        bytes: &contents[1..],
    })
}

/// Reads fields little-endian from checked contents.
pub(crate) struct StoredReader<'a> {
    bytes: &'a [u8],
}

impl<'a> StoredReader<'a> {
    pub(crate) fn take(
        &mut self,
        count: usize,
        field: &'static str,
    ) -> Result<&'a [u8], StoredDecodeError> {
        if count > self.bytes.len() {
            return Err(StoredDecodeError::Truncated { field });
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], StoredDecodeError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, StoredDecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, StoredDecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, StoredDecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, StoredDecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, StoredDecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StoredDecodeError::Invalid { field }),
        }
    }

    /// A count of entries that each take at least `entry_bytes_min`
    /// bytes: checked against the bytes left before anything is sized by
    /// it.
    pub(crate) fn count(
        &mut self,
        entry_bytes_min: usize,
        field: &'static str,
    ) -> Result<usize, StoredDecodeError> {
        let count = self.u32(field)? as usize;
        if count.saturating_mul(entry_bytes_min.max(1)) > self.bytes.len() {
            return Err(StoredDecodeError::Truncated { field });
        }
        Ok(count)
    }

    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], StoredDecodeError> {
        let len = self.u32(field)? as usize;
        self.take(len, field)
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, StoredDecodeError> {
        let bytes = self.bytes(field)?;
        let text = std::str::from_utf8(bytes).map_err(|_| StoredDecodeError::Invalid { field })?;
        if text.len() > usize::from(u16::MAX) || text.contains('\0') {
            return Err(StoredDecodeError::Invalid { field });
        }
        Ok(text.to_owned())
    }

    pub(crate) fn finish(self) -> Result<(), StoredDecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(StoredDecodeError::TrailingBytes {
                bytes: self.bytes.len(),
            })
        }
    }
}
