//! `rill log verify DIR` against a real data directory: clean, then damaged.

mod support;

use rill_core::conformance::{make_batch, small_config};
use rill_core::log::PartitionLog;
use rill_core::logset::partition_directory;
use rill_core::storage::block_on_ready;
use rill_core::storage::portable::PortableStorage;

fn verify(directory: &std::path::Path) -> (bool, String, String) {
    let output = support::rill_command()
        .args(["log", "verify"])
        .arg(directory)
        .output()
        .expect("run rill log verify");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn verify_reports_damage_with_file_and_position() {
    let data = tempfile::tempdir().expect("tempdir");
    let directory = partition_directory(data.path(), "sensors", 0);
    let mut positions = Vec::new();
    block_on_ready(async {
        let (mut log, _) = PartitionLog::open(PortableStorage, &directory, small_config())
            .await
            .expect("open");
        for tag in 0..6 {
            positions.push(log.size_bytes());
            log.append(&make_batch(3, 200, tag, tag as u64), 0)
                .await
                .expect("append");
        }
        log.close().await.expect("close");
    });
    let (ok, stdout, _) = verify(data.path());
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("1 partitions, 1 segments, 6 batches, 18 records"),
        "{stdout}"
    );
    assert!(stdout.contains("0 problems"), "{stdout}");

    let segment = directory.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).expect("read segment");
    bytes[positions[4] as usize + 90] ^= 0x40;
    std::fs::write(&segment, &bytes).expect("write damaged segment");
    let (ok, stdout, _) = verify(data.path());
    assert!(!ok, "damage must fail the command");
    let expected = format!("BAD {} at byte {}", segment.display(), positions[4]);
    assert!(stdout.contains(&expected), "{stdout}");
    assert!(stdout.contains("CRC-32C mismatch"), "{stdout}");
    assert!(stdout.contains("1 problems"), "{stdout}");

    let (ok, _, stderr) = verify(&data.path().join("missing"));
    assert!(!ok);
    assert!(stderr.contains("is not a directory"), "{stderr}");
}
