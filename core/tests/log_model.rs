//! Property test: random appends, reads, rolls, retention, delete-records and
//! reopenings, checked against a simple model (a map from offset to batch).

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use rill_core::conformance::{assert_same_batch, make_batch, small_config, split_batches};
use rill_core::log::{LogConfig, PartitionLog, ReadError};
use rill_core::storage::block_on_ready;
use rill_core::storage::memory::MemoryStorage;

#[derive(Debug, Clone)]
enum Operation {
    Append { records: usize, value_bytes: usize },
    Read { offset_pick: u16, budget: u32 },
    ReadByTime { time_pick: u16 },
    Roll,
    RetainBytes { keep: u32 },
    DeleteBefore { offset_pick: u16 },
    Reopen,
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        4 => (1usize..6, 0usize..700).prop_map(|(records, value_bytes)| Operation::Append { records, value_bytes }),
        3 => (any::<u16>(), 1u32..20_000).prop_map(|(offset_pick, budget)| Operation::Read { offset_pick, budget }),
        1 => any::<u16>().prop_map(|time_pick| Operation::ReadByTime { time_pick }),
        1 => Just(Operation::Roll),
        1 => (4_000u32..40_000).prop_map(|keep| Operation::RetainBytes { keep }),
        1 => any::<u16>().prop_map(|offset_pick| Operation::DeleteBefore { offset_pick }),
        1 => Just(Operation::Reopen),
    ]
}

fn pick(range_start: i64, range_end: i64, pick: u16) -> i64 {
    if range_end <= range_start {
        return range_start;
    }
    range_start + i64::from(pick) % (range_end - range_start + 1)
}

async fn run(operations: Vec<Operation>, write_delay_polls: u32) {
    let storage = MemoryStorage::new();
    // Writes left in flight while later appends and reads go on.
    storage.set_write_delay_polls(write_delay_polls);
    let directory = Path::new("/data/p/0");
    let config = LogConfig {
        direct_io: false,
        ..small_config()
    };
    let open = || PartitionLog::open(storage.clone(), directory, config);
    let mut log = open().await.expect("open").0;
    // Model: base offset -> (batch bytes, first record timestamp).
    let mut model: BTreeMap<i64, (Vec<u8>, i64)> = BTreeMap::new();
    let mut next = 0i64;
    let mut start = 0i64;
    let mut clock = 0i64;
    for operation in operations {
        match operation {
            Operation::Append {
                records,
                value_bytes,
            } => {
                clock += 10;
                let batch = make_batch(records, value_bytes, clock, next as u64);
                let info = log.append(&batch, 0).await.expect("append");
                assert_eq!(info.base_offset, next);
                model.insert(next, (batch, clock));
                next += records as i64;
            }
            Operation::Read {
                offset_pick,
                budget,
            } => {
                let offset = pick(start, next, offset_pick);
                let (bytes, slice) = log
                    .read_owned(offset, u64::from(budget))
                    .await
                    .expect("read");
                let batches = split_batches(&bytes);
                if offset == next {
                    assert!(batches.is_empty());
                    continue;
                }
                let (&first_base, _) = model.range(..=offset).next_back().expect("model batch");
                assert_eq!(batches[0].0.base_offset, first_base);
                assert!(batches.len() == 1 || bytes.len() as u64 <= u64::from(budget));
                for (header, stored) in &batches {
                    assert_same_batch(stored, &model[&header.base_offset].0);
                }
                assert_eq!(
                    slice.next_fetch_offset,
                    batches.last().expect("batch").0.last_offset() + 1
                );
            }
            Operation::ReadByTime { time_pick } => {
                let target = i64::from(time_pick) % (clock + 20);
                let expected = model
                    .iter()
                    .flat_map(|(&base, (batch, first_time))| {
                        let count = split_batches(batch)[0].0.record_count as i64;
                        (0..count).map(move |index| (base + index, first_time + index))
                    })
                    .find(|&(offset, time)| offset >= start && time >= target)
                    .map(|(offset, _)| offset);
                assert_eq!(
                    log.offset_for_timestamp(target).await.expect("by time"),
                    expected
                );
            }
            Operation::Roll => log.roll().await.expect("roll"),
            Operation::RetainBytes { keep } => {
                log.set_config(LogConfig {
                    retention_bytes: Some(u64::from(keep)),
                    ..config
                });
                log.apply_retention(0).await.expect("retention");
                log.set_config(config);
                start = log.log_start_offset();
                model.retain(|&base, (batch, _)| {
                    base + split_batches(batch)[0].0.record_count as i64 > start
                });
            }
            Operation::DeleteBefore { offset_pick } => {
                let offset = pick(start, next, offset_pick);
                log.delete_records_before(offset)
                    .await
                    .expect("delete records");
                start = start.max(offset);
                assert_eq!(log.log_start_offset(), start);
                model.retain(|&base, (batch, _)| {
                    base + split_batches(batch)[0].0.record_count as i64 > start
                });
                if start > 0 {
                    assert!(matches!(
                        log.read(start - 1, 10).await,
                        Err(ReadError::OffsetOutOfRange { .. })
                    ));
                }
            }
            Operation::Reopen => {
                log.close().await.expect("close");
                drop(log);
                log = open().await.expect("reopen").0;
                assert_eq!(log.log_start_offset(), start);
            }
        }
        assert_eq!(log.next_offset(), next);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn log_behaves_like_the_model(
        operations in proptest::collection::vec(operation(), 1..80),
        write_delay_polls in 0u32..3,
    ) {
        block_on_ready(run(operations, write_delay_polls));
    }
}
