//! Writes Kafka record batches (magic 2, uncompressed) into a caller's buffer,
//! without allocating: what a device needs to produce. The broker checks every
//! batch it receives (length, magic, CRC-32C, record framing), so a device
//! gets a clear error for anything this writer did not make.

/// Bytes of the fixed batch header.
pub const BATCH_HEADER_BYTES: usize = 61;

/// The buffer cannot hold another record (or the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchFull;

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut index = 0;
    while index < 256 {
        let mut crc = index as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[index] = crc;
        index += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

/// CRC-32C (Castagnoli), table-driven: small and dependency-free for devices.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc = CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Builds one batch in a fixed buffer.
#[derive(Debug)]
pub struct BatchWriter<'b> {
    buffer: &'b mut [u8],
    length: usize,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
}

fn varint_bytes(value: i64) -> usize {
    let mut raw = ((value << 1) ^ (value >> 63)) as u64;
    let mut bytes = 1;
    while raw >= 0x80 {
        raw >>= 7;
        bytes += 1;
    }
    bytes
}

impl<'b> BatchWriter<'b> {
    pub fn new(buffer: &'b mut [u8]) -> Result<Self, BatchFull> {
        if buffer.len() < BATCH_HEADER_BYTES {
            return Err(BatchFull);
        }
        Ok(Self {
            buffer,
            length: BATCH_HEADER_BYTES,
            count: 0,
            base_timestamp: 0,
            max_timestamp: 0,
        })
    }

    pub fn record_count(&self) -> i32 {
        self.count
    }

    fn put(&mut self, bytes: &[u8]) {
        self.buffer[self.length..self.length + bytes.len()].copy_from_slice(bytes);
        self.length += bytes.len();
    }

    fn put_varint(&mut self, value: i64) {
        let mut raw = ((value << 1) ^ (value >> 63)) as u64;
        loop {
            let byte = (raw & 0x7f) as u8;
            raw >>= 7;
            if raw == 0 {
                self.put(&[byte]);
                return;
            }
            self.put(&[byte | 0x80]);
        }
    }

    fn put_nullable(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            None => self.put_varint(-1),
            Some(bytes) => {
                self.put_varint(bytes.len() as i64);
                self.put(bytes);
            }
        }
    }

    /// Adds a record; on `BatchFull` the batch is unchanged.
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), BatchFull> {
        if self.count == 0 {
            self.base_timestamp = timestamp_ms;
            self.max_timestamp = timestamp_ms;
        }
        let timestamp_delta = timestamp_ms - self.base_timestamp;
        let nullable_bytes = |bytes: Option<&[u8]>| match bytes {
            None => varint_bytes(-1),
            Some(bytes) => varint_bytes(bytes.len() as i64) + bytes.len(),
        };
        let mut body = 1 + varint_bytes(timestamp_delta) + varint_bytes(i64::from(self.count));
        body += nullable_bytes(key) + nullable_bytes(value) + varint_bytes(headers.len() as i64);
        for (header_key, header_value) in headers {
            body += nullable_bytes(Some(header_key)) + nullable_bytes(*header_value);
        }
        let total = varint_bytes(body as i64) + body;
        if self.length + total > self.buffer.len() || self.count == i32::MAX {
            return Err(BatchFull);
        }
        self.put_varint(body as i64);
        self.put(&[0]);
        self.put_varint(timestamp_delta);
        self.put_varint(i64::from(self.count));
        self.put_nullable(key);
        self.put_nullable(value);
        self.put_varint(headers.len() as i64);
        for (header_key, header_value) in headers {
            self.put_nullable(Some(header_key));
            self.put_nullable(*header_value);
        }
        self.count += 1;
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
        Ok(())
    }

    /// Writes the header and checksum; returns the finished batch, or `None`
    /// when no record was pushed.
    pub fn finish(self) -> Option<&'b [u8]> {
        self.finish_with_crc(crc32c)
    }

    /// [`BatchWriter::finish`] with another CRC-32C implementation: a host
    /// with a hardware instruction for it (SSE 4.2, ARMv8 CRC) passes a
    /// faster one than the table this crate carries for devices.
    pub fn finish_with_crc(self, crc32c: impl FnOnce(&[u8]) -> u32) -> Option<&'b [u8]> {
        if self.count == 0 {
            return None;
        }
        let length = self.length;
        let header = &mut self.buffer[..BATCH_HEADER_BYTES];
        header[0..8].copy_from_slice(&0i64.to_be_bytes());
        header[8..12].copy_from_slice(&((length - 12) as i32).to_be_bytes());
        header[12..16].copy_from_slice(&0i32.to_be_bytes());
        header[16] = 2;
        header[21..23].copy_from_slice(&0i16.to_be_bytes());
        header[23..27].copy_from_slice(&(self.count - 1).to_be_bytes());
        header[27..35].copy_from_slice(&self.base_timestamp.to_be_bytes());
        header[35..43].copy_from_slice(&self.max_timestamp.to_be_bytes());
        header[43..51].copy_from_slice(&(-1i64).to_be_bytes());
        header[51..53].copy_from_slice(&(-1i16).to_be_bytes());
        header[53..57].copy_from_slice(&(-1i32).to_be_bytes());
        header[57..61].copy_from_slice(&self.count.to_be_bytes());
        let crc = crc32c(&self.buffer[21..length]);
        self.buffer[17..21].copy_from_slice(&crc.to_be_bytes());
        Some(&self.buffer[..length])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn full_buffer_leaves_the_batch_unchanged() {
        let mut buffer = [0u8; 100];
        let mut writer = BatchWriter::new(&mut buffer).expect("header fits");
        writer
            .push(5, Some(b"k"), Some(b"small"), &[])
            .expect("fits");
        assert_eq!(writer.push(6, None, Some(&[7u8; 64]), &[]), Err(BatchFull));
        assert_eq!(writer.record_count(), 1);
        let batch = writer.finish().expect("one record");
        assert_eq!(batch[16], 2);
    }

    #[test]
    fn a_hardware_crc_gives_the_same_batch_and_core_accepts_it() {
        let build = |buffer: &mut [u8], hardware: bool| {
            let mut writer = BatchWriter::new(buffer).expect("header fits");
            for index in 0..20u8 {
                writer
                    .push(i64::from(index), Some(&[index]), Some(&[index; 33]), &[])
                    .expect("fits");
            }
            let batch = if hardware {
                writer.finish_with_crc(rill_core::batch::crc32c)
            } else {
                writer.finish()
            };
            batch.expect("records").to_vec()
        };
        let table = build(&mut [0u8; 2048], false);
        let hardware = build(&mut [0u8; 2048], true);
        assert_eq!(table, hardware);
        let header = rill_core::batch::check_batch(&hardware).expect("a valid batch");
        assert_eq!(header.record_count, 20);
    }
}
