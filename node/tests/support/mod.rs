//! Shared by node's integration tests.

use std::process::Command;

/// `rill` itself, through `RILL_TEST_RUNNER` (qemu) when tests run emulated.
pub fn rill_command() -> Command {
    let runner = std::env::var("RILL_TEST_RUNNER").unwrap_or_default();
    let mut parts = runner.split_whitespace();
    match parts.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(parts).arg(env!("CARGO_BIN_EXE_rill"));
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_rill")),
    }
}
