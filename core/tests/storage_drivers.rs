//! The storage conformance suite over the portable driver (on a real
//! filesystem, with direct I/O where it allows it) and the in-memory driver.

use rill_core::conformance;
use rill_core::storage::block_on_ready;
use rill_core::storage::memory::MemoryStorage;
use rill_core::storage::portable::PortableStorage;

#[test]
fn portable_driver_passes_the_suite() {
    for (name, check) in conformance::all::<PortableStorage>() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("topic-0");
        eprintln!("portable: {name}");
        block_on_ready(check(PortableStorage, path));
    }
}

#[test]
fn memory_driver_passes_the_suite() {
    for (name, check) in conformance::all::<MemoryStorage>() {
        eprintln!("memory: {name}");
        block_on_ready(check(MemoryStorage::new(), "/data/topic-0".into()));
    }
}
