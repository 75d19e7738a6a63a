//! The storage conformance suite: the same log behaviour checked over every
//! I/O driver.
//!
//! Each check takes a storage and a fresh directory and panics with a message
//! when the log misbehaves. `rill-core`'s tests run them over the portable and
//! in-memory drivers; `rill-node`'s tests run them over compio, both on
//! io_uring and on the forced polling fallback. Compiled only with the
//! `conformance` feature.

use std::path::{Path, PathBuf};

use crate::batch::{BATCH_HEADER_BYTES, BatchHeader, Record, RecordIter, encode_batch};
use crate::log::{FsyncPolicy, LogConfig, PartitionLog, Protection, ReadError, TimestampType};
use crate::segment;
use crate::storage::{AlignedBuf, OpenMode, Storage, StorageFile, read_exact_at};

/// A named check, generic over the storage.
pub type Check<S> =
    fn(S, PathBuf, LogConfig) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// A batch of `count` records of `value_bytes` each, with timestamps from `timestamp_ms`.
pub fn make_batch(count: usize, value_bytes: usize, timestamp_ms: i64, tag: u64) -> Vec<u8> {
    let records: Vec<Record> = (0..count)
        .map(|index| {
            let mut value = vec![0u8; value_bytes];
            for (position, byte) in value.iter_mut().enumerate() {
                *byte = (tag as usize)
                    .wrapping_mul(31)
                    .wrapping_add(index * 7 + position) as u8;
            }
            Record {
                timestamp_ms: timestamp_ms + index as i64,
                key: Some(format!("key-{tag}-{index}").into_bytes()),
                value: Some(value),
                headers: vec![(b"tag".to_vec(), Some(tag.to_le_bytes().to_vec()))],
            }
        })
        .collect();
    encode_batch(&records)
}

/// Small segments and dense indexes, so a few batches exercise rolls and lookups.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 16 * 1024,
        segment_age_ms_max: None,
        index_interval_bytes: 512,
        batch_bytes_max: 1024 * 1024,
        fsync: FsyncPolicy::EveryBatch,
        timestamp_type: TimestampType::CreateTime,
        retention_ms: None,
        retention_bytes: None,
        direct_io: true,
        preallocate: true,
        // Smaller than a segment, larger than a batch: appends collect in
        // memory and reach the file in several-batch writes.
        write_buffer_bytes: 8 * 1024,
    }
}

/// Splits owned read bytes into batches, asserting each is whole.
pub fn split_batches(bytes: &[u8]) -> Vec<(BatchHeader, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = BatchHeader::parse(&bytes[at..]).expect("header");
        let total = header.total_bytes().expect("length");
        out.push((header, &bytes[at..at + total]));
        at += total;
    }
    out
}

/// Asserts that a stored batch equals what was appended, apart from the
/// broker-assigned base offset and leader epoch.
pub fn assert_same_batch(stored: &[u8], appended: &[u8]) {
    assert_eq!(
        stored.len(),
        appended.len(),
        "stored batch has another length"
    );
    assert_eq!(
        &stored[16..],
        &appended[16..],
        "stored batch bytes differ from the appended ones"
    );
}

async fn open<S: Storage>(storage: &S, directory: &Path, config: LogConfig) -> PartitionLog<S> {
    PartitionLog::open(storage.clone(), directory, config)
        .await
        .unwrap_or_else(|error| panic!("open failed: {error}"))
        .0
}

async fn read_all<S: Storage>(log: &PartitionLog<S>, from: i64) -> Vec<u8> {
    let (bytes, _) = log.read_owned(from, u64::MAX).await.expect("read_owned");
    bytes
}

/// Appends batches across several segments, reads each offset back, and finds
/// the same bytes after a clean reopen, where offsets continue.
pub async fn append_read_reopen<S: Storage>(storage: S, directory: &Path, config: LogConfig) {
    let mut log = open(&storage, directory, config).await;
    let mut appended = Vec::new();
    for tag in 0..40u64 {
        let batch = make_batch(
            1 + (tag as usize % 4),
            200 + tag as usize * 13,
            1000 + tag as i64 * 10,
            tag,
        );
        let info = log.append(&batch, 5000).await.expect("append");
        assert_eq!(
            info.last_offset - info.base_offset + 1,
            1 + (tag as i64 % 4)
        );
        appended.push((info.base_offset, batch));
    }
    assert!(
        log.segment_count() > 3,
        "segments should have rolled, got {}",
        log.segment_count()
    );
    log.sync().await.expect("sync");
    for (base, batch) in &appended {
        let (bytes, slice) = log.read_owned(*base, 1).await.expect("read one batch");
        let batches = split_batches(&bytes);
        assert_eq!(
            batches.len(),
            1,
            "a tiny budget still returns one whole batch"
        );
        assert_eq!(batches[0].0.base_offset, *base);
        assert_same_batch(batches[0].1, batch);
        assert_eq!(slice.high_watermark, log.next_offset());
    }
    // An offset inside a batch returns the whole batch holding it.
    let (bytes, _) = log
        .read_owned(appended[5].0 + 1, 1)
        .await
        .expect("read mid-batch");
    assert_eq!(split_batches(&bytes)[0].0.base_offset, appended[5].0);
    let everything = read_all(&log, 0).await;
    let next = log.next_offset();
    log.close().await.expect("close");
    drop(log);

    let (mut log, report) = PartitionLog::open(storage.clone(), directory, config)
        .await
        .expect("reopen");
    assert!(
        report.truncations.is_empty(),
        "clean reopen cut something: {report:?}"
    );
    assert_eq!(
        report.bytes_checked, 0,
        "a clean reopen should trust the checkpoint"
    );
    assert_eq!(log.next_offset(), next);
    assert_eq!(read_all(&log, 0).await, everything);
    let info = log
        .append(&make_batch(2, 10, 9000, 99), 6000)
        .await
        .expect("append after reopen");
    assert_eq!(info.base_offset, next);
}

/// Batches whose timestamps never grow (a burst within one millisecond, or
/// a producer stamping old times) still seal segments a clean reopen trusts
/// without reading them, and seeking by time still finds the first record.
pub async fn flat_timestamps_reopen_without_rescan<S: Storage>(
    storage: S,
    directory: &Path,
    config: LogConfig,
) {
    let mut log = open(&storage, directory, config).await;
    for tag in 0..40u64 {
        // Every record of every batch carries the same timestamp.
        let batch = make_batch(1, 1500 + tag as usize * 13, 7_000, tag);
        log.append(&batch, 5000).await.expect("append");
    }
    assert!(log.segment_count() > 3, "segments should have rolled");
    let next = log.next_offset();
    log.close().await.expect("close");
    drop(log);
    let (log, report) = PartitionLog::open(storage.clone(), directory, config)
        .await
        .expect("reopen");
    assert_eq!(
        report.bytes_checked, 0,
        "sealed segments with flat timestamps were read again: {report:?}"
    );
    assert_eq!(log.next_offset(), next);
    assert_eq!(
        log.offset_for_timestamp(7_000).await.expect("by time"),
        Some(0)
    );
    assert_eq!(
        log.offset_for_timestamp(7_001).await.expect("by time"),
        None
    );
}

/// A batch that fails a check is refused and leaves the log as it was.
pub async fn bad_batches_write_nothing<S: Storage>(
    storage: S,
    directory: &Path,
    config: LogConfig,
) {
    let mut log = open(&storage, directory, config).await;
    log.append(&make_batch(3, 50, 1, 1), 0)
        .await
        .expect("append");
    let size_before = log.size_bytes();
    let mut flipped = make_batch(3, 50, 1, 2);
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    let error = log
        .append(&flipped, 0)
        .await
        .expect_err("corrupt batch accepted");
    assert!(
        error.to_string().contains("CRC-32C"),
        "error should name the check: {error}"
    );
    let mut magic = make_batch(1, 50, 1, 3);
    magic[16] = 1;
    assert!(log.append(&magic, 0).await.is_err());
    assert!(log.append(&[0u8; 10], 0).await.is_err());
    let config = LogConfig {
        batch_bytes_max: 100,
        ..config
    };
    log.set_config(config);
    let error = log
        .append(&make_batch(3, 100, 1, 4), 0)
        .await
        .expect_err("oversized");
    assert!(error.to_string().contains("batch_bytes_max"), "{error}");
    assert_eq!(log.size_bytes(), size_before);
    assert_eq!(log.next_offset(), 3);
}

/// Garbage after the last batch (a torn write) is cut on reopen, and the log
/// continues from the last good batch.
pub async fn torn_tail_is_cut<S: Storage>(storage: S, directory: &Path, config: LogConfig) {
    let mut log = open(&storage, directory, config).await;
    for tag in 0..3 {
        log.append(&make_batch(2, 100, 10, tag), 0)
            .await
            .expect("append");
    }
    log.sync().await.expect("sync");
    let active_base = log.next_offset() - 6;
    let good_bytes = log.size_bytes();
    let next = log.next_offset();
    drop(log);
    // Half a batch after the good data, as a power cut during a write leaves it.
    let path = directory.join(segment::log_file_name(active_base));
    let file = storage.open(&path, OpenMode::WRITE).expect("open segment");
    let torn = make_batch(2, 100, 10, 7);
    let mut buffer = AlignedBuf::with_capacity(torn.len(), 1);
    buffer.extend_from_slice(&torn[..torn.len() / 2]);
    file.write_at(std::rc::Rc::new(buffer), good_bytes)
        .await
        .expect("write torn tail");
    file.sync_data().await.expect("sync");
    drop(file);

    // Without a checkpoint, recovery checks every batch from the start.
    storage
        .remove_file(&directory.join(crate::checkpoint::CHECKPOINT_FILE_NAME))
        .expect("remove checkpoint");
    let (mut log, report) = PartitionLog::open(storage.clone(), directory, config)
        .await
        .expect("recover");
    assert_eq!(report.truncations.len(), 1, "{report:?}");
    assert_eq!(report.truncations[0].position, good_bytes);
    assert_eq!(log.next_offset(), next);
    let info = log
        .append(&make_batch(1, 10, 10, 8), 0)
        .await
        .expect("append after recovery");
    assert_eq!(info.base_offset, next);
    assert_eq!(split_batches(&read_all(&log, 0).await).len(), 4);
}

/// Missing or damaged index files are rebuilt from the log, and lookups work.
pub async fn indexes_are_rebuilt<S: Storage>(storage: S, directory: &Path, config: LogConfig) {
    let mut log = open(&storage, directory, config).await;
    for tag in 0..30 {
        log.append(&make_batch(3, 300, 100 + tag as i64 * 100, tag), 0)
            .await
            .expect("append");
    }
    log.close().await.expect("close");
    let expected = read_all(&log, 0).await;
    let bases: Vec<i64> = split_batches(&expected)
        .iter()
        .map(|(header, _)| header.base_offset)
        .collect();
    drop(log);
    let mut removed = 0;
    for name in storage.list_dir(directory).expect("list") {
        let name = name.to_string_lossy().into_owned();
        if name.ends_with(".index") || name.ends_with(".timeindex") {
            storage
                .remove_file(&directory.join(&name))
                .expect("remove index");
            removed += 1;
        }
    }
    assert!(removed >= 4);
    let (log, report) = PartitionLog::open(storage.clone(), directory, config)
        .await
        .expect("reopen");
    assert!(report.indexes_rebuilt >= 1, "{report:?}");
    for base in bases {
        let (bytes, _) = log.read_owned(base + 1, 1).await.expect("lookup");
        assert_eq!(split_batches(&bytes)[0].0.base_offset, base);
    }
    assert_eq!(read_all(&log, 0).await, expected);
}

/// Offsets by timestamp find the first record at or after the time.
pub async fn offsets_by_timestamp<S: Storage>(storage: S, directory: &Path, config: LogConfig) {
    let mut log = open(&storage, directory, config).await;
    // Batch `tag` holds records at 1000*tag + 0..4.
    for tag in 0..40 {
        log.append(&make_batch(4, 200, 1000 * tag as i64, tag), 0)
            .await
            .expect("append");
    }
    assert_eq!(log.offset_for_timestamp(-5).await.expect("lookup"), Some(0));
    assert_eq!(log.offset_for_timestamp(0).await.expect("lookup"), Some(0));
    assert_eq!(log.offset_for_timestamp(2).await.expect("lookup"), Some(2));
    assert_eq!(
        log.offset_for_timestamp(17_003).await.expect("lookup"),
        Some(17 * 4 + 3)
    );
    assert_eq!(
        log.offset_for_timestamp(17_004).await.expect("lookup"),
        Some(18 * 4)
    );
    assert_eq!(
        log.offset_for_timestamp(39_003).await.expect("lookup"),
        Some(159)
    );
    assert_eq!(
        log.offset_for_timestamp(39_004).await.expect("lookup"),
        None
    );
}

/// Retention by bytes and time and delete-records advance the log start;
/// the active segment survives everything.
pub async fn retention_and_delete_records<S: Storage>(
    storage: S,
    directory: &Path,
    config: LogConfig,
) {
    let mut log = open(&storage, directory, config).await;
    for tag in 0..60 {
        log.append(&make_batch(2, 500, 1000 * tag as i64, tag), 0)
            .await
            .expect("append");
    }
    let total = log.size_bytes();
    let segments = log.segment_count();
    assert!(segments >= 5);
    log.set_config(LogConfig {
        retention_bytes: Some(total / 2),
        ..config
    });
    let report = log.apply_retention(0).await.expect("retention");
    assert!(report.segments_deleted > 0);
    assert!(
        log.size_bytes() >= total / 2,
        "retention deleted past its limit"
    );
    let start = log.log_start_offset();
    assert!(start > 0);
    match log.read(start - 1, 100).await {
        Err(ReadError::OffsetOutOfRange { .. }) => {}
        other => panic!("read below the log start should be out of range, got {other:?}"),
    }
    assert_eq!(
        split_batches(&read_all(&log, start).await)[0].0.base_offset,
        start
    );

    log.set_config(LogConfig {
        retention_ms: Some(1000),
        ..config
    });
    let report = log
        .apply_retention(1_000_000)
        .await
        .expect("retention by time");
    assert!(report.segments_deleted > 0);
    assert_eq!(log.segment_count(), 1, "only the active segment may remain");

    let next = log.next_offset();
    log.delete_records_before(next - 1)
        .await
        .expect("delete records");
    assert_eq!(log.log_start_offset(), next - 1);
    assert!(log.delete_records_before(next + 5).await.is_err());
    log.close().await.expect("close");
    drop(log);
    let log = open(&storage, directory, config).await;
    assert_eq!(
        log.log_start_offset(),
        next - 1,
        "log start must survive a reopen"
    );
    assert_eq!(log.next_offset(), next);
}

/// Retention keeps segments with protected (unmirrored) records while they
/// fit the protection's budget, and takes the oldest of them beyond it.
pub async fn retention_keeps_protected_records<S: Storage>(
    storage: S,
    directory: &Path,
    config: LogConfig,
) {
    let mut log = open(&storage, directory, config).await;
    for tag in 0..60 {
        log.append(&make_batch(2, 500, 1000 * tag as i64, tag), 0)
            .await
            .expect("append");
    }
    assert!(log.segment_count() >= 5);
    log.set_config(LogConfig {
        retention_ms: Some(1000),
        ..config
    });
    let everything = Protection {
        from_offset: 0,
        bytes_max: log.size_bytes(),
    };
    let report = log
        .apply_retention_protected(1_000_000, Some(everything))
        .await
        .expect("retention");
    assert_eq!(report.segments_deleted, 0, "all of it fits the budget");
    assert_eq!(log.log_start_offset(), 0);
    assert!(!log.may_evict_oldest(Some(everything)));
    // Mirrored up to offset 40: what is below may go, the rest stays.
    let mirrored = Protection {
        from_offset: 40,
        bytes_max: log.size_bytes(),
    };
    assert!(log.may_evict_oldest(Some(mirrored)));
    log.apply_retention_protected(1_000_000, Some(mirrored))
        .await
        .expect("retention");
    let start = log.log_start_offset();
    assert!(start > 0 && start <= 40, "log start {start}");
    // A budget smaller than the unmirrored bytes: the oldest go until the
    // rest fits.
    let tight = Protection {
        from_offset: 40,
        bytes_max: log.bytes_from(40) / 2,
    };
    log.apply_retention_protected(1_000_000, Some(tight))
        .await
        .expect("retention");
    assert!(log.log_start_offset() > 40);
    assert!(log.bytes_from(40) > 0);
}

/// With log-append time, the stored batch carries the broker's time and a valid CRC.
pub async fn log_append_time<S: Storage>(storage: S, directory: &Path, config: LogConfig) {
    let config = LogConfig {
        timestamp_type: TimestampType::LogAppendTime,
        ..config
    };
    let mut log = open(&storage, directory, config).await;
    let info = log
        .append(&make_batch(3, 20, 5, 1), 777_000)
        .await
        .expect("append");
    assert_eq!(info.log_append_time_ms, Some(777_000));
    let bytes = read_all(&log, 0).await;
    let (header, _) = split_batches(&bytes)[0];
    assert!(header.is_log_append_time());
    assert_eq!(header.max_timestamp, 777_000);
    let records: Vec<_> = RecordIter::new(&bytes[BATCH_HEADER_BYTES..]).collect();
    assert_eq!(records.len(), 3);
}

/// File ranges returned by reads hold exactly the batches, readable through
/// the file handle they carry, across segments and within a byte budget.
pub async fn file_ranges_cover_whole_batches<S: Storage>(
    storage: S,
    directory: &Path,
    config: LogConfig,
) {
    let mut log = open(&storage, directory, config).await;
    for tag in 0..20 {
        log.append(&make_batch(2, 1000, tag as i64, tag), 0)
            .await
            .expect("append");
    }
    let slice = log.read(0, 10_000).await.expect("read");
    assert!(slice.bytes <= 10_000 && slice.bytes > 0);
    let joined = join_slice(&slice).await;
    assert_eq!(joined.len() as u64, slice.bytes);
    let batches = split_batches(&joined);
    let after_last = batches.last().map(|(header, _)| header.last_offset() + 1);
    assert_eq!(after_last, Some(slice.next_fetch_offset));

    let slice = log.read(0, u64::MAX).await.expect("read all");
    assert!(
        slice.ranges.len() > 1,
        "a read spanning segments returns a range per segment"
    );
    assert_eq!(slice.next_fetch_offset, log.next_offset());
    assert!(
        !slice.memory_tail.is_empty(),
        "the newest appends should still be buffered"
    );
    let everything = read_all(&log, 0).await;
    assert_eq!(
        join_slice(&slice).await,
        everything,
        "ranges and memory tail make up the log"
    );

    // After a sync everything is in the file.
    log.sync().await.expect("sync");
    let slice = log.read(0, u64::MAX).await.expect("read all after sync");
    assert!(
        slice.memory_tail.len() < 4096,
        "only the partial last block stays in memory"
    );
    assert_eq!(join_slice(&slice).await, everything);

    let empty = log
        .read(log.next_offset(), 1000)
        .await
        .expect("read at the end");
    assert!(empty.ranges.is_empty() && empty.memory_tail.is_empty());
}

async fn join_slice<F: StorageFile>(slice: &crate::log::ReadSlice<F>) -> Vec<u8> {
    let mut joined = Vec::new();
    for range in &slice.ranges {
        let bytes = read_exact_at(&range.file, range.position, range.length as usize).await;
        joined.extend(bytes.expect("range"));
    }
    joined.extend_from_slice(&slice.memory_tail);
    joined
}

/// Every check in the suite, by name.
pub fn all<S: Storage + 'static>() -> Vec<(&'static str, Check<S>)> {
    macro_rules! checks {
        ($($name:ident),* $(,)?) => {
            vec![$((
                stringify!($name),
                (|storage, directory, config| Box::pin(async move { $name(storage, &directory, config).await })) as Check<S>,
            )),*]
        };
    }
    checks![
        append_read_reopen,
        flat_timestamps_reopen_without_rescan,
        bad_batches_write_nothing,
        torn_tail_is_cut,
        indexes_are_rebuilt,
        offsets_by_timestamp,
        retention_and_delete_records,
        retention_keeps_protected_records,
        log_append_time,
        file_ranges_cover_whole_batches,
    ]
}
