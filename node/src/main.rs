//! The `rill` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rill_node::io::{IoDriverSetting, build_runtime, select_driver};

#[derive(Debug, Parser)]
#[command(
    name = "rill",
    version,
    about = "Rill: a streaming log broker for edge and IoT boxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with the log files of a data directory.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Show which I/O driver Rill would use here, and why.
    Io {
        #[command(subcommand)]
        command: IoCommand,
    },
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Check every batch of every segment under DIR (length, magic, CRC-32C,
    /// offsets) and list each bad one with its file and position. Changes nothing.
    Verify {
        /// A data directory, or any directory below it.
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum IoCommand {
    /// Probe io_uring and print the driver `io_driver` would select.
    Probe {
        /// auto, io-uring or portable.
        #[arg(long, env = "RILL_IO_DRIVER", default_value = "auto")]
        io_driver: IoDriverSetting,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RILL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Io {
            command: IoCommand::Probe { io_driver },
        } => {
            let mut selection = select_driver(io_driver).map_err(anyhow::Error::msg)?;
            let runtime = build_runtime(&mut selection).context("starting the I/O runtime")?;
            println!("driver: {}", selection.driver);
            println!("reason: {}", selection.reason);
            println!("runtime: {:?}", runtime.driver_type());
            Ok(ExitCode::SUCCESS)
        }
        Command::Log {
            command: LogCommand::Verify { dir },
        } => verify(&dir),
    }
}

fn verify(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    use rill_core::storage::portable::PortableStorage;
    use rill_core::storage::{Storage, block_on_ready};
    if !PortableStorage.is_dir(dir) {
        anyhow::bail!(
            "{} is not a directory; pass a Rill data directory",
            dir.display()
        );
    }
    let started = std::time::Instant::now();
    let report = block_on_ready(rill_core::verify::verify_data_dir(
        &PortableStorage,
        dir,
        |path| {
            eprintln!("checking {}", path.display());
        },
    ))
    .with_context(|| format!("reading {}", dir.display()))?;
    for problem in &report.problems {
        match problem.position {
            Some(position) => println!(
                "BAD {} at byte {}: {}",
                problem.path.display(),
                position,
                problem.reason
            ),
            None => println!("BAD {}: {}", problem.path.display(), problem.reason),
        }
    }
    println!(
        "{} partitions, {} segments, {} batches, {} records, {} bytes checked in {:.2?}: {} problems",
        report.partitions,
        report.segments,
        report.batches,
        report.records,
        report.bytes,
        started.elapsed(),
        report.problems.len()
    );
    if report.partitions == 0 {
        eprintln!("note: no segment files (*.log) under {}", dir.display());
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
