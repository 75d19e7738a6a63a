//! Disk quota and a full disk: clear errors, nothing corrupted, reads keep
//! working, eviction order, and appends resume by themselves when space returns.

use std::path::Path;

use rill_core::conformance::{make_batch, small_config, split_batches};
use rill_core::log::{AppendError, LogConfig, PartitionLog};
use rill_core::logset::{DiskFullPolicy, DiskUsage, EvictionSettings, LogSet};
use rill_core::storage::block_on_ready;
use rill_core::storage::memory::MemoryStorage;

const REJECT: EvictionSettings = EvictionSettings {
    disk_full: DiskFullPolicy::Reject,
    eviction_priority: 0,
};

fn evict(priority: i32) -> EvictionSettings {
    EvictionSettings {
        disk_full: DiskFullPolicy::EvictOldest,
        eviction_priority: priority,
    }
}

#[test]
fn enospc_refuses_the_append_keeps_reads_and_recovers_when_space_returns() {
    block_on_ready(async {
        let storage = MemoryStorage::new();
        let directory = Path::new("/data/t/0");
        // Write-through, so the append itself meets the full disk.
        let config = LogConfig {
            write_buffer_bytes: 0,
            ..small_config()
        };
        let (mut log, _) = PartitionLog::open(storage.clone(), directory, config)
            .await
            .expect("open");
        for tag in 0..5 {
            log.append(&make_batch(2, 300, tag, tag as u64), 0)
                .await
                .expect("append");
        }
        log.sync().await.expect("sync");
        let before = log.read_owned(0, u64::MAX).await.expect("read").0;
        storage.set_space_bytes_max(Some(storage.used_bytes() + 100));
        let error = log
            .append(&make_batch(2, 300, 9, 9), 0)
            .await
            .expect_err("disk is full");
        assert!(matches!(error, AppendError::DiskFull { .. }), "{error}");
        assert!(error.to_string().contains("disk full"), "{error}");
        assert_eq!(
            log.read_owned(0, u64::MAX)
                .await
                .expect("reads keep working")
                .0,
            before
        );
        storage.set_space_bytes_max(None);
        let info = log
            .append(&make_batch(2, 300, 9, 9), 0)
            .await
            .expect("append once space is back");
        assert_eq!(info.base_offset, 10);
        log.sync().await.expect("sync");
        drop(log);
        let (log, report) = PartitionLog::open(storage, directory, config)
            .await
            .expect("reopen");
        assert_eq!(log.next_offset(), 12, "{report:?}");
        assert_eq!(
            split_batches(&log.read_owned(0, u64::MAX).await.expect("read").0).len(),
            6
        );
    });
}

#[test]
fn quota_rejects_or_evicts_by_topic_policy_and_priority() {
    block_on_ready(async {
        let storage = MemoryStorage::new();
        let root = Path::new("/data");
        let quota = 60 * 1024;
        let mut set = LogSet::new(storage.clone(), root, Some(quota), DiskUsage::default());
        set.open_partition("alarms", 0, small_config(), REJECT)
            .await
            .expect("open");
        set.open_partition("telemetry", 0, small_config(), evict(0))
            .await
            .expect("open");
        set.open_partition("diagnostics", 0, small_config(), evict(5))
            .await
            .expect("open");
        // Fill with evictable data, diagnostics first (older), then telemetry.
        for (topic, count) in [("diagnostics", 25), ("telemetry", 25)] {
            for tag in 0..count {
                let batch = make_batch(1, 900, tag, tag as u64);
                set.append(topic, 0, &batch, 0)
                    .await
                    .expect("partition")
                    .expect("append");
            }
        }
        // Alarms never evict: past the quota they get a clear error.
        let mut rejected = None;
        for tag in 0..200 {
            let batch = make_batch(1, 900, tag, tag as u64);
            if let Err(error) = set.append("alarms", 0, &batch, 0).await.expect("partition") {
                rejected = Some(error);
                break;
            }
        }
        let error = rejected.expect("the reject policy must refuse once the quota is reached");
        assert!(
            matches!(error, AppendError::QuotaExceeded { .. }),
            "{error}"
        );
        assert!(set.usage().bytes() <= quota);
        assert!(
            set.log("alarms", 0)
                .expect("log")
                .read_owned(0, u64::MAX)
                .await
                .is_ok()
        );

        // Telemetry (priority 0) is evicted before diagnostics (priority 5).
        let telemetry_segments = set.log("telemetry", 0).expect("log").segment_count();
        let diagnostics_segments = set.log("diagnostics", 0).expect("log").segment_count();
        for tag in 0..10 {
            let batch = make_batch(1, 900, 100 + tag, tag as u64);
            set.append("telemetry", 0, &batch, 0)
                .await
                .expect("partition")
                .expect("evict-oldest makes room");
        }
        let evictions = set.take_evictions();
        assert!(!evictions.evicted.is_empty());
        assert!(
            evictions
                .evicted
                .iter()
                .all(|((topic, _), _)| topic == "telemetry"),
            "{evictions:?}"
        );
        assert!(set.log("telemetry", 0).expect("log").segment_count() <= telemetry_segments);
        assert_eq!(
            set.log("diagnostics", 0).expect("log").segment_count(),
            diagnostics_segments
        );
        assert!(set.usage().bytes() <= quota);
        assert!(set.log("telemetry", 0).expect("log").log_start_offset() > 0);
    });
}
