//! Segment writes left in flight, as io_uring leaves them while appends go
//! on: readers are served the bytes of a write that has not landed, and a
//! write that fails gives its bytes back to be written again, losing nothing
//! that was appended before it.

use std::path::Path;

use rill_core::conformance::{assert_same_batch, make_batch, small_config, split_batches};
use rill_core::log::{LogConfig, PartitionLog};
use rill_core::storage::block_on_ready;
use rill_core::storage::memory::MemoryStorage;

fn config() -> LogConfig {
    LogConfig {
        direct_io: false,
        segment_bytes_max: 1024 * 1024,
        write_buffer_bytes: 4096,
        ..small_config()
    }
}

/// Reads the whole log and checks it holds exactly `expected`, in order.
async fn check_holds(log: &PartitionLog<MemoryStorage>, expected: &[Vec<u8>]) {
    let (bytes, _) = log
        .read_owned(log.log_start_offset(), u64::MAX)
        .await
        .expect("read the log");
    let stored = split_batches(&bytes);
    assert_eq!(stored.len(), expected.len(), "batches in the log");
    for ((_, stored), appended) in stored.iter().zip(expected) {
        assert_same_batch(stored, appended);
    }
}

#[test]
fn bytes_in_flight_are_served_and_a_failed_write_is_written_again() {
    block_on_ready(async {
        let storage = MemoryStorage::new();
        storage.set_write_delay_polls(1);
        let directory = Path::new("/data/in-flight-0");
        let (mut log, _) = PartitionLog::open(storage.clone(), directory, config())
            .await
            .expect("open");
        let mut appended = Vec::new();
        let mut tag = 0u64;
        let mut next_batch = || {
            tag += 1;
            make_batch(3, 400, 1_000 + tag as i64, tag)
        };
        // Each batch is about 1.3 KiB against a 4 KiB buffer: every few
        // appends start a write that stays in flight until the next one.
        for _ in 0..24 {
            let batch = next_batch();
            log.append(&batch, 0).await.expect("append");
            appended.push(batch);
            check_holds(&log, &appended).await;
        }
        let written_before = storage.file_len(&directory.join("00000000000000000000.log"));

        // The next operation on the storage fails: the write in flight.
        storage.fail_after_operations(Some(0));
        let mut failed = 0;
        for _ in 0..8 {
            let batch = next_batch();
            match log.append(&batch, 0).await {
                Ok(_) => appended.push(batch),
                Err(_) => {
                    failed += 1;
                    break;
                }
            }
        }
        assert_eq!(failed, 1, "landing the failed write fails one append");
        storage.fail_after_operations(None);
        // Everything appended before the failure is still served.
        check_holds(&log, &appended).await;

        for _ in 0..12 {
            let batch = next_batch();
            log.append(&batch, 0)
                .await
                .expect("append after the failure");
            appended.push(batch);
        }
        check_holds(&log, &appended).await;
        log.close().await.expect("close");
        drop(log);

        // What the failed write held reached the file after all.
        let (log, _) = PartitionLog::open(storage.clone(), directory, config())
            .await
            .expect("reopen");
        check_holds(&log, &appended).await;
        assert!(
            storage.file_len(&directory.join("00000000000000000000.log")) > written_before,
            "the segment grew on disk"
        );
    });
}
