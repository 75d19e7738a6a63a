//! Real-process crash test: a child process appends with `every-batch` on the
//! portable driver (direct I/O where the filesystem allows it) and reports
//! each durable offset on stdout; the parent kills it with SIGKILL after a
//! random number of reports, reopens the log and checks that every reported
//! offset is there and intact. The same test function is both parent and
//! child: the child is this test binary run again with `RILL_CRASH_CHILD_DIR`.
//!
//! `RILL_CRASH_ROUNDS` sets the rounds (default 50). Under an emulator, set
//! `RILL_TEST_RUNNER` (for example `qemu-aarch64-static -L /usr/aarch64-linux-gnu`)
//! so the child runs through it too.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use rill_core::conformance::{assert_same_batch, make_batch, split_batches};
use rill_core::log::{FsyncPolicy, LogConfig, PartitionLog};
use rill_core::storage::block_on_ready;
use rill_core::storage::memory::SimRng;
use rill_core::storage::portable::PortableStorage;

const CHILD_ENV: &str = "RILL_CRASH_CHILD_DIR";
const TEST_NAME: &str = "sigkill_rounds_lose_no_durable_offset";

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 256 * 1024,
        fsync: FsyncPolicy::EveryBatch,
        ..LogConfig::default()
    }
}

/// The batch stored at `base`: derived from the offset, so the parent can
/// check content without being told.
fn batch_for(base: i64) -> Vec<u8> {
    make_batch(
        1 + (base % 3) as usize,
        100 + (base % 700) as usize,
        base,
        base as u64,
    )
}

fn child(directory: &Path) -> ! {
    block_on_ready(async {
        let (mut log, _) = PartitionLog::open(PortableStorage, directory, config())
            .await
            .expect("child open");
        let mut stdout = std::io::stdout().lock();
        loop {
            let base = log.next_offset();
            log.append(&batch_for(base), 0).await.expect("child append");
            let durable = log.sync().await.expect("child sync");
            writeln!(stdout, "durable {durable}").expect("report");
            stdout.flush().expect("flush");
        }
    })
}

fn spawn_child(directory: &Path) -> std::process::Child {
    let exe = std::env::current_exe().expect("current exe");
    let runner = std::env::var("RILL_TEST_RUNNER").unwrap_or_default();
    let mut parts = runner.split_whitespace();
    let mut command = match parts.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(parts).arg(&exe);
            command
        }
        None => Command::new(&exe),
    };
    command
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, directory)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

#[test]
fn sigkill_rounds_lose_no_durable_offset() {
    if let Some(directory) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&directory));
    }
    let rounds: u64 = std::env::var("RILL_CRASH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(50);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |elapsed| elapsed.as_nanos() as u64);
    eprintln!("crash_process seed {seed}");
    let mut rng = SimRng::new(seed);
    let temporary = tempfile::tempdir().expect("tempdir");
    let directory = temporary.path().join("topic-0");
    let mut durable_reported = 0i64;
    for round in 0..rounds {
        let mut child = spawn_child(&directory);
        let stdout = child.stdout.take().expect("child stdout");
        let reports = 1 + rng.below(120);
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        while seen < reports {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("round {round}: child ended early"))
                .expect("read child line");
            // The test harness prints its own lines ("running 1 test") first.
            let Some(offset) = line
                .strip_prefix("durable ")
                .and_then(|value| value.parse::<i64>().ok())
            else {
                continue;
            };
            durable_reported = durable_reported.max(offset);
            seen += 1;
        }
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");

        block_on_ready(async {
            let (log, report) = PartitionLog::open(PortableStorage, &directory, config())
                .await
                .unwrap_or_else(|error| {
                    panic!("round {round} (seed {seed}): recovery failed: {error}")
                });
            assert!(
                log.next_offset() >= durable_reported,
                "round {round} (seed {seed}): reported durable up to {durable_reported}, log ends at {} ({report:?})",
                log.next_offset()
            );
            let (bytes, _) = log.read_owned(0, u64::MAX).await.expect("read back");
            let mut expected = 0i64;
            for (header, stored) in split_batches(&bytes) {
                assert_eq!(
                    header.base_offset, expected,
                    "round {round}: offsets not contiguous"
                );
                assert_same_batch(stored, &batch_for(expected));
                expected = header.last_offset() + 1;
            }
            assert_eq!(expected, log.next_offset());
        });
    }
}
