//! Arbitrary bytes as a segment file (after some valid batches) and as a
//! checkpoint: recovery completes without a panic and serves only batches
//! that pass their checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rill_core::batch::check_batch;
use rill_core::conformance::{make_batch, small_config, split_batches};
use rill_core::log::{LogConfig, PartitionLog};
use rill_core::storage::memory::MemoryStorage;
use rill_core::storage::{AlignedBuf, OpenMode, Storage, StorageFile, block_on_ready};

fuzz_target!(|input: &[u8]| {
    let (checkpoint, tail) = input.split_at(input.len().min(48));
    block_on_ready(async {
        let storage = MemoryStorage::new();
        let directory = Path::new("/data/t/0");
        let config = LogConfig { direct_io: false, ..small_config() };
        let (mut log, _) = PartitionLog::open(storage.clone(), directory, config).await.expect("open empty");
        for tag in 0..3 {
            log.append(&make_batch(2, 40, tag, tag as u64), 0).await.expect("append");
        }
        log.close().await.expect("close");
        let end = log.size_bytes();
        drop(log);
        let write = |path: &Path, bytes: &[u8], position: u64| {
            let file = storage.open(path, OpenMode::WRITE).expect("open file");
            let mut buffer = AlignedBuf::with_capacity(bytes.len(), 1);
            buffer.extend_from_slice(bytes);
            async move {
                file.write_at(std::rc::Rc::new(buffer), position)
                    .await
                    .expect("write")
            }
        };
        write(&directory.join("00000000000000000000.log"), tail, end).await;
        if checkpoint.len() == 48 {
            write(&directory.join("partition.checkpoint"), checkpoint, 0).await;
        }
        let (log, _) = PartitionLog::open(storage, directory, config).await.expect("recovery completes");
        if let Ok((bytes, _)) = log.read_owned(log.log_start_offset(), u64::MAX).await {
            for (_, batch) in split_batches(&bytes) {
                check_batch(batch).expect("only checked batches are served");
            }
        }
    });
});
