//! Records inside an uncompressed v2 batch: walking them and building batches.
//!
//! Records use zig-zag varints (Kafka's `varint`/`varlong`). The walker never
//! trusts a length it read: every length is checked against the bytes left, so a
//! hostile or corrupt batch yields an error, never a panic or a large allocation.

use super::{
    BATCH_HEADER_BYTES, BATCH_LENGTH_PREFIX_BYTES, BatchError, MAGIC_V2, OFFSET_ATTRIBUTES,
    OFFSET_CRC, compute_crc,
};

/// One header of a record, borrowed from the batch bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
}

/// One record, borrowed from the batch bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub timestamp_delta: i64,
    pub offset_delta: i32,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<Header<'a>>,
}

/// Iterates the records section of an uncompressed batch.
pub struct RecordIter<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> RecordIter<'a> {
    pub fn new(records_section: &'a [u8]) -> Self {
        Self {
            rest: records_section,
            failed: false,
        }
    }
}

fn malformed(reason: &'static str) -> BatchError {
    BatchError::MalformedRecords { reason }
}

/// Reads one zig-zag varint of at most `max_bytes` bytes.
fn read_varlong(input: &mut &[u8], max_bytes: usize) -> Result<i64, BatchError> {
    let mut raw: u64 = 0;
    for index in 0..max_bytes {
        let Some((&byte, rest)) = input.split_first() else {
            return Err(malformed("varint runs past the end of the batch"));
        };
        *input = rest;
        raw |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
        }
    }
    Err(malformed("varint is longer than its type allows"))
}

fn read_varint(input: &mut &[u8]) -> Result<i32, BatchError> {
    let value = read_varlong(input, 5)?;
    i32::try_from(value).map_err(|_| malformed("varint does not fit 32 bits"))
}

fn take<'a>(input: &mut &'a [u8], length: usize) -> Result<&'a [u8], BatchError> {
    if input.len() < length {
        return Err(malformed("a length points past the end of its record"));
    }
    let (head, rest) = input.split_at(length);
    *input = rest;
    Ok(head)
}

/// Reads a nullable byte string: length -1 is null.
fn read_nullable<'a>(input: &mut &'a [u8]) -> Result<Option<&'a [u8]>, BatchError> {
    let length = read_varint(input)?;
    if length < -1 {
        return Err(malformed("negative length other than -1"));
    }
    if length == -1 {
        return Ok(None);
    }
    take(input, length as usize).map(Some)
}

fn parse_record<'a>(mut body: &'a [u8]) -> Result<RecordView<'a>, BatchError> {
    let input = &mut body;
    let _attributes = take(input, 1)?;
    let timestamp_delta = read_varlong(input, 10)?;
    let offset_delta = read_varint(input)?;
    let key = read_nullable(input)?;
    let value = read_nullable(input)?;
    let header_count = read_varint(input)?;
    if header_count < 0 {
        return Err(malformed("negative header count"));
    }
    // Each header takes at least two bytes, which bounds the allocation by the input.
    if header_count as usize > input.len() / 2 {
        return Err(malformed("header count larger than the record could hold"));
    }
    let mut headers = Vec::with_capacity(header_count as usize);
    for _ in 0..header_count {
        let key = read_nullable(input)?.ok_or_else(|| malformed("null header key"))?;
        let value = read_nullable(input)?;
        headers.push(Header { key, value });
    }
    if !input.is_empty() {
        return Err(malformed("record has bytes after its last header"));
    }
    Ok(RecordView {
        timestamp_delta,
        offset_delta,
        key,
        value,
        headers,
    })
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordView<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        let result = (|| {
            let length = read_varint(&mut self.rest)?;
            if length < 0 {
                return Err(malformed("negative record length"));
            }
            let body = take(&mut self.rest, length as usize)?;
            parse_record(body)
        })();
        self.failed = result.is_err();
        Some(result)
    }
}

/// An owned record, for building batches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Appends a zigzag varlong, as record fields are encoded.
pub fn write_varlong(out: &mut Vec<u8>, value: i64) {
    let mut raw = ((value << 1) ^ (value >> 63)) as u64;
    loop {
        let byte = (raw & 0x7f) as u8;
        raw >>= 7;
        if raw == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends a varlong length (-1 for none) and the bytes.
pub fn write_nullable(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => write_varlong(out, -1),
        Some(bytes) => {
            write_varlong(out, bytes.len() as i64);
            out.extend_from_slice(bytes);
        }
    }
}

/// Builds uncompressed v2 batches. Used by clients, tests and benchmarks; the
/// broker itself never re-encodes what a producer sent.
#[derive(Debug, Default)]
pub struct RecordBuilder {
    records: Vec<u8>,
    count: i32,
    base_timestamp: Option<i64>,
    max_timestamp: i64,
    scratch: Vec<u8>,
}

impl RecordBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record_count(&self) -> i32 {
        self.count
    }

    /// Bytes the batch will take once finished.
    pub fn encoded_bytes(&self) -> usize {
        BATCH_HEADER_BYTES + self.records.len()
    }

    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) {
        let base_timestamp = *self.base_timestamp.get_or_insert(timestamp_ms);
        self.max_timestamp = if self.count == 0 {
            timestamp_ms
        } else {
            self.max_timestamp.max(timestamp_ms)
        };
        let body = &mut self.scratch;
        body.clear();
        body.push(0); // record attributes: unused in v2
        write_varlong(body, timestamp_ms - base_timestamp);
        write_varlong(body, i64::from(self.count));
        write_nullable(body, key);
        write_nullable(body, value);
        write_varlong(body, headers.len() as i64);
        for (header_key, header_value) in headers {
            write_nullable(body, Some(header_key));
            write_nullable(body, *header_value);
        }
        write_varlong(&mut self.records, body.len() as i64);
        self.records.extend_from_slice(body);
        self.count += 1;
    }

    /// Finishes the batch with base offset 0 and no producer id, and resets the builder.
    pub fn finish(&mut self) -> Vec<u8> {
        assert!(self.count > 0, "a batch holds at least one record");
        let mut batch = Vec::with_capacity(self.encoded_bytes());
        let batch_length =
            (BATCH_HEADER_BYTES - BATCH_LENGTH_PREFIX_BYTES + self.records.len()) as i32;
        batch.extend_from_slice(&0i64.to_be_bytes()); // base offset: the log assigns it
        batch.extend_from_slice(&batch_length.to_be_bytes());
        batch.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
        batch.push(MAGIC_V2);
        batch.extend_from_slice(&0u32.to_be_bytes()); // CRC, filled below
        batch.extend_from_slice(&0i16.to_be_bytes()); // attributes: no compression
        batch.extend_from_slice(&(self.count - 1).to_be_bytes());
        batch.extend_from_slice(&self.base_timestamp.unwrap_or(0).to_be_bytes());
        batch.extend_from_slice(&self.max_timestamp.to_be_bytes());
        batch.extend_from_slice(&(-1i64).to_be_bytes()); // producer id: none
        batch.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
        batch.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
        batch.extend_from_slice(&self.count.to_be_bytes());
        debug_assert_eq!(batch.len(), BATCH_HEADER_BYTES);
        debug_assert_eq!(OFFSET_ATTRIBUTES, 21);
        batch.extend_from_slice(&self.records);
        let crc = compute_crc(&batch);
        batch[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        self.records.clear();
        self.count = 0;
        self.base_timestamp = None;
        self.max_timestamp = 0;
        batch
    }
}

/// Encodes owned records as one uncompressed batch.
pub fn encode_batch(records: &[Record]) -> Vec<u8> {
    let mut builder = RecordBuilder::new();
    for record in records {
        let headers: Vec<(&[u8], Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(key, value)| (key.as_slice(), value.as_deref()))
            .collect();
        builder.push(
            record.timestamp_ms,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
    }
    builder.finish()
}
