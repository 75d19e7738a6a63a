//! `verify` reports every bad batch with its file and position.

use std::path::Path;

use rill_core::conformance::{make_batch, small_config};
use rill_core::log::PartitionLog;
use rill_core::storage::block_on_ready;
use rill_core::storage::memory::MemoryStorage;
use rill_core::verify::verify_data_dir;

#[test]
fn verify_finds_each_flipped_batch_and_keeps_walking() {
    block_on_ready(async {
        let storage = MemoryStorage::new();
        let directory = Path::new("/data/topics/t/0");
        let (mut log, _) = PartitionLog::open(storage.clone(), directory, small_config())
            .await
            .expect("open");
        let mut positions = Vec::new();
        for tag in 0..10 {
            let size = log.size_bytes();
            log.append(&make_batch(2, 300, tag, tag as u64), 0)
                .await
                .expect("append");
            positions.push(size);
        }
        log.close().await.expect("close");
        let clean = verify_data_dir(&storage, Path::new("/data"), |_| {})
            .await
            .expect("verify");
        assert_eq!(clean.problems, vec![]);
        assert_eq!(
            (clean.partitions, clean.batches, clean.records),
            (1, 10, 20)
        );

        let file = directory.join("00000000000000000000.log");
        // Damage the third and the seventh batch inside their records.
        storage
            .flip_bit(&file, positions[2] as usize + 100, 3)
            .expect("flip");
        storage
            .flip_bit(&file, positions[6] as usize + 200, 5)
            .expect("flip");
        let mut seen = Vec::new();
        let report = verify_data_dir(&storage, Path::new("/data"), |path| {
            seen.push(path.to_path_buf())
        })
        .await
        .expect("verify");
        let found: Vec<_> = report
            .problems
            .iter()
            .map(|problem| (problem.path.clone(), problem.position))
            .collect();
        assert_eq!(
            found,
            vec![
                (file.clone(), Some(positions[2])),
                (file.clone(), Some(positions[6]))
            ]
        );
        assert!(
            report.problems[0].reason.contains("CRC-32C"),
            "{:?}",
            report.problems[0]
        );
        assert_eq!(report.batches, 8);
        assert_eq!(seen, vec![file]);
    });
}
