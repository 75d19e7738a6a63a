//! The storage conformance suite over the portable driver (on a real
//! filesystem, with direct I/O and with buffered I/O) and the in-memory driver.

use rill_core::conformance::{self, small_config};
use rill_core::log::LogConfig;
use rill_core::storage::block_on_ready;
use rill_core::storage::memory::MemoryStorage;
use rill_core::storage::portable::PortableStorage;

fn portable_suite(config: LogConfig, label: &str) {
    for (name, check) in conformance::all::<PortableStorage>() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("topic-0");
        eprintln!("{label}: {name}");
        block_on_ready(check(PortableStorage, path, config));
    }
}

#[test]
fn portable_driver_with_direct_io_passes_the_suite() {
    portable_suite(small_config(), "portable, direct I/O");
}

#[test]
fn portable_driver_with_buffered_io_passes_the_suite() {
    let config = LogConfig {
        direct_io: false,
        preallocate: false,
        ..small_config()
    };
    portable_suite(config, "portable, buffered I/O");
}

#[test]
fn portable_driver_writing_through_passes_the_suite() {
    let config = LogConfig {
        write_buffer_bytes: 0,
        ..small_config()
    };
    portable_suite(config, "portable, no write buffer");
}

#[test]
fn memory_driver_passes_the_suite() {
    for (name, check) in conformance::all::<MemoryStorage>() {
        eprintln!("memory: {name}");
        block_on_ready(check(
            MemoryStorage::new(),
            "/data/topic-0".into(),
            small_config(),
        ));
    }
}
