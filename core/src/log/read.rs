//! Reading a partition log: whole batches from an offset up to a byte budget,
//! as file ranges a network layer can send without copying, or as owned bytes
//! checked batch by batch; and offsets by timestamp.

use std::io;

use super::{PartitionLog, ReadError};
use crate::batch::{self, BATCH_HEADER_BYTES, BatchHeader, Compression, RecordIter};
use crate::segment::Segment;
use crate::storage::{Storage, StorageFile, read_exact_at};

/// A byte range of one segment file holding whole batches.
#[derive(Debug, Clone)]
pub struct FileRange<F> {
    pub file: F,
    pub segment_base_offset: i64,
    pub position: u64,
    pub length: u64,
}

/// The answer to a read: file ranges, then possibly bytes from memory.
#[derive(Debug, Clone)]
pub struct ReadSlice<F> {
    /// Whole batches, in offset order; empty when the log has nothing at the offset yet.
    pub ranges: Vec<FileRange<F>>,
    /// Bytes that continue the last range (or stand alone) and are still in the
    /// active segment's write buffer, not yet in the file. Send them after the ranges.
    pub memory_tail: Vec<u8>,
    /// Total bytes of the ranges.
    pub bytes: u64,
    /// One past the last offset of the batches returned (the next offset to read).
    pub next_fetch_offset: i64,
    pub high_watermark: i64,
    pub log_start_offset: i64,
}

/// How far ahead of a sequential reader read-ahead was already asked for.
///
/// A reader that comes back for what follows its last read needs only the
/// part of the window past what the last hint covered. Hinting the whole
/// window every time makes the kernel look up every page twice (with a
/// window of two reads), which on data already cached is all the hint does.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadAheadMark {
    /// The segment the last hint was in, where the read it followed ended,
    /// and where the hint ended.
    last: Option<(i64, u64, u64)>,
}

impl ReadAheadMark {
    /// The range to hint for a read of segment `segment_base_offset` that
    /// ended at `read_end`, with a window of `window_bytes`, as (position,
    /// length); `None` when the last hint covers it already. A reader that
    /// moved elsewhere (another segment, back, or past the hint) gets the
    /// whole window.
    pub fn advance(
        &mut self,
        segment_base_offset: i64,
        read_end: u64,
        window_bytes: u64,
    ) -> Option<(u64, u64)> {
        let window_end = read_end.saturating_add(window_bytes);
        let start = match self.last {
            Some((segment, last_read_end, hinted_end))
                if segment == segment_base_offset
                    && (last_read_end..=hinted_end).contains(&read_end) =>
            {
                hinted_end
            }
            _ => read_end,
        };
        if window_end <= start {
            return None;
        }
        self.last = Some((segment_base_offset, read_end, window_end));
        Some((start, window_end - start))
    }
}

impl<S: Storage> PartitionLog<S> {
    fn read_io_error(segment: &Segment<S::File>) -> impl FnOnce(io::Error) -> ReadError + '_ {
        move |source| ReadError::Io {
            path: segment.log_path(),
            source,
        }
    }

    fn check_offset(&self, offset: i64) -> Result<(), ReadError> {
        if offset < self.log_start_offset || offset > self.next_offset() {
            return Err(ReadError::OffsetOutOfRange {
                requested: offset,
                log_start_offset: self.log_start_offset,
                next_offset: self.next_offset(),
            });
        }
        Ok(())
    }

    /// Whole batches from the one holding `offset`, up to `max_bytes`. The first
    /// batch is returned even when it alone exceeds the budget, so a consumer
    /// always makes progress (Kafka's rule since KIP-74).
    pub async fn read(&self, offset: i64, max_bytes: u64) -> Result<ReadSlice<S::File>, ReadError> {
        self.check_offset(offset)?;
        let mut slice = ReadSlice {
            ranges: Vec::new(),
            memory_tail: Vec::new(),
            bytes: 0,
            next_fetch_offset: offset,
            high_watermark: self.next_offset(),
            log_start_offset: self.log_start_offset,
        };
        let mut wanted = offset;
        let start_key = self
            .segments
            .range(..=offset)
            .next_back()
            .map_or(i64::MIN, |(&base, _)| base);
        'segments: for segment in self.segments.range(start_key..).map(|(_, segment)| segment) {
            if wanted >= segment.next_offset {
                continue;
            }
            let located = segment
                .locate(wanted)
                .await
                .map_err(Self::read_io_error(segment))?;
            let Some((mut position, mut header)) = located else {
                continue;
            };
            // The first span is the batch holding the offset; later spans
            // jump along the offset index (its entries are batch starts), so
            // a fetch reads a header only where the index has a gap.
            let mut span = batch_total(&header, segment, position)?;
            let mut span_next_offset = header.last_offset() + 1;
            loop {
                if slice.bytes > 0 && slice.bytes + span > max_bytes {
                    break 'segments;
                }
                let (file_position, file_length) = segment.file_part(position, span);
                match slice.ranges.last_mut() {
                    _ if file_length == 0 => {}
                    Some(range)
                        if range.segment_base_offset == segment.base_offset
                            && range.position + range.length == file_position =>
                    {
                        range.length += file_length;
                    }
                    _ => slice.ranges.push(FileRange {
                        file: segment.reader().clone(),
                        segment_base_offset: segment.base_offset,
                        position: file_position,
                        length: file_length,
                    }),
                }
                for part in segment.memory_bytes(position, span) {
                    slice.memory_tail.extend_from_slice(part);
                }
                slice.bytes += span;
                wanted = span_next_offset;
                slice.next_fetch_offset = wanted;
                position += span;
                if position >= segment.size_bytes || slice.bytes >= max_bytes {
                    break;
                }
                let budget_end = position.saturating_add(max_bytes - slice.bytes);
                match segment.index_jump(position, budget_end) {
                    Some((batch_start, offset)) => {
                        span = batch_start - position;
                        span_next_offset = offset;
                    }
                    None => {
                        header = segment
                            .read_header(position)
                            .await
                            .map_err(Self::read_io_error(segment))?;
                        span = batch_total(&header, segment, position)?;
                        span_next_offset = header.last_offset() + 1;
                    }
                }
            }
            if slice.bytes >= max_bytes {
                break;
            }
        }
        Ok(slice)
    }

    /// Hints the OS to read ahead what a sequential consumer of `slice` will
    /// ask for next: `window_bytes` after its last file range, less what
    /// `mark` says was already asked for.
    pub fn advise_sequential(
        &self,
        slice: &ReadSlice<S::File>,
        window_bytes: u64,
        mark: &mut ReadAheadMark,
    ) {
        if let Some(range) = slice.ranges.last()
            && let Some((position, length)) = mark.advance(
                range.segment_base_offset,
                range.position + range.length,
                window_bytes,
            )
        {
            range.file.will_need(position, length);
        }
    }

    /// Like [`Self::read`], but copies the batches into memory and checks every
    /// one (length, magic, CRC-32C) right after reading it.
    pub async fn read_owned(
        &self,
        offset: i64,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, ReadSlice<S::File>), ReadError> {
        let slice = self.read(offset, max_bytes).await?;
        let mut out = Vec::with_capacity(slice.bytes as usize);
        for range in &slice.ranges {
            let segment = &self.segments[&range.segment_base_offset];
            let bytes = read_exact_at(&range.file, range.position, range.length as usize)
                .await
                .map_err(Self::read_io_error(segment))?;
            out.extend_from_slice(&bytes);
        }
        out.extend_from_slice(&slice.memory_tail);
        // Check every batch right after reading it, and that offsets follow on.
        let segment = slice.ranges.first().map_or_else(
            || self.active(),
            |range| &self.segments[&range.segment_base_offset],
        );
        let mut expected_offset: Option<i64> = None;
        let mut at = 0usize;
        while at < out.len() {
            let header = BatchHeader::parse(&out[at..])
                .map_err(|error| corrupt(segment, at as u64, error.to_string()))?;
            let total = header
                .total_bytes()
                .filter(|&total| at + total <= out.len())
                .ok_or_else(|| {
                    corrupt(segment, at as u64, "batch length runs past the read".into())
                })?;
            batch::check_batch(&out[at..at + total])
                .map_err(|error| corrupt(segment, at as u64, error.to_string()))?;
            if expected_offset.is_some_and(|expected| expected != header.base_offset) {
                let reason = format!("offset discontinuity: batch says {}", header.base_offset);
                return Err(corrupt(segment, at as u64, reason));
            }
            expected_offset = Some(header.last_offset() + 1);
            at += total;
        }
        Ok((out, slice))
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`, or
    /// `None` when every record is older. Exact to the record for uncompressed
    /// batches; for compressed ones, the batch's base offset.
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<i64>, ReadError> {
        for segment in self.segments.values() {
            if segment.next_offset <= self.log_start_offset
                || segment.is_empty()
                || segment.max_timestamp < timestamp_ms
            {
                continue;
            }
            let mut position = segment.time_scan_start(timestamp_ms);
            while position < segment.size_bytes {
                let header = segment
                    .read_header(position)
                    .await
                    .map_err(Self::read_io_error(segment))?;
                let total = batch_total(&header, segment, position)?;
                if header.max_timestamp >= timestamp_ms
                    && header.last_offset() >= self.log_start_offset
                {
                    let offset = self
                        .first_record_at_or_after(segment, position, &header, total, timestamp_ms)
                        .await?;
                    return Ok(Some(offset.max(self.log_start_offset)));
                }
                position += total;
            }
        }
        Ok(None)
    }

    async fn first_record_at_or_after(
        &self,
        segment: &Segment<S::File>,
        position: u64,
        header: &BatchHeader,
        total: u64,
        timestamp_ms: i64,
    ) -> Result<i64, ReadError> {
        if header.is_log_append_time() || header.compression() != Some(Compression::None) {
            return Ok(header.base_offset);
        }
        let bytes = segment
            .read_bytes(position, total as usize)
            .await
            .map_err(Self::read_io_error(segment))?;
        batch::check_batch(&bytes)
            .map_err(|error| corrupt(segment, position, error.to_string()))?;
        for record in RecordIter::new(&bytes[BATCH_HEADER_BYTES..]) {
            let record = record.map_err(|error| corrupt(segment, position, error.to_string()))?;
            if header.base_timestamp.saturating_add(record.timestamp_delta) >= timestamp_ms {
                return Ok(header.base_offset + i64::from(record.offset_delta));
            }
        }
        Ok(header.base_offset)
    }
}

fn corrupt<F: StorageFile>(segment: &Segment<F>, position: u64, reason: String) -> ReadError {
    ReadError::Corrupt {
        path: segment.log_path(),
        position,
        reason,
    }
}

/// A batch's size, refusing a header whose length would leave the segment.
fn batch_total<F: StorageFile>(
    header: &BatchHeader,
    segment: &Segment<F>,
    position: u64,
) -> Result<u64, ReadError> {
    match header.total_bytes() {
        Some(total) if position + total as u64 <= segment.size_bytes => Ok(total as u64),
        _ => Err(corrupt(
            segment,
            position,
            format!("batch_length {} is not plausible here", header.batch_length),
        )),
    }
}

#[cfg(test)]
mod read_ahead_tests {
    use super::ReadAheadMark;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_sequential_reader_asks_for_each_page_once() {
        let mut mark = ReadAheadMark::default();
        // 4 MiB reads with an 8 MiB window: the whole window first, then
        // only the 4 MiB past what was asked for.
        assert_eq!(mark.advance(0, 4 * MIB, 8 * MIB), Some((4 * MIB, 8 * MIB)));
        assert_eq!(mark.advance(0, 8 * MIB, 8 * MIB), Some((12 * MIB, 4 * MIB)));
        assert_eq!(
            mark.advance(0, 12 * MIB, 8 * MIB),
            Some((16 * MIB, 4 * MIB))
        );
        // A short read inside what was asked for asks for the little past it.
        assert_eq!(
            mark.advance(0, 12 * MIB + 10, 8 * MIB),
            Some((20 * MIB, 10))
        );
        // The same read again: nothing new.
        assert_eq!(mark.advance(0, 12 * MIB + 10, 8 * MIB), None);
    }

    #[test]
    fn a_reader_that_moves_elsewhere_gets_the_whole_window() {
        let mut mark = ReadAheadMark::default();
        assert_eq!(mark.advance(0, 4 * MIB, 8 * MIB), Some((4 * MIB, 8 * MIB)));
        // Another segment.
        assert_eq!(mark.advance(500, MIB, 8 * MIB), Some((MIB, 8 * MIB)));
        // Back in the same segment, before the last read.
        assert_eq!(mark.advance(500, 0, 8 * MIB), Some((0, 8 * MIB)));
        // Past everything asked for.
        assert_eq!(
            mark.advance(500, 40 * MIB, 8 * MIB),
            Some((40 * MIB, 8 * MIB))
        );
    }
}
