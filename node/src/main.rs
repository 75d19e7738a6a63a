//! The `rill` command line: the broker (`rill serve`) and the tools around it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use rill_node::cli::{self as commands, ConsumeOptions, Output, ProduceOptions, ResetTo};
use rill_node::client::{Client, ClientConfig, ClientTls};
use rill_node::config::{self, MachineFacts};
use rill_node::io::{IoDriverSetting, build_runtime, select_driver};
use rill_protocol::Acks;

/// mimalloc rather than glibc's malloc: the broker allocates per message on
/// its MQTT and Kafka paths, and per-thread free lists suit one thread per
/// shard.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The native listener clients use when `--broker` is not given.
const DEFAULT_BROKER: &str = "127.0.0.1:7470";

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

#[derive(Debug, clap::Args)]
struct BrokerArgument {
    /// The broker's native listener.
    #[arg(long, global = true, env = "RILL_BROKER", default_value = DEFAULT_BROKER)]
    broker: String,
    /// Speak TLS, trusting the CA certificates in this PEM file.
    #[arg(long, global = true, env = "RILL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that require one.
    #[arg(long, global = true, env = "RILL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "RILL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the broker's certificate must carry (default: the host of --broker).
    #[arg(long, global = true)]
    tls_server_name: Option<String>,
}

impl BrokerArgument {
    fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let tls = match &self.tls_ca {
            Some(ca) => {
                let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
                let server_name = match &self.tls_server_name {
                    Some(name) => name.clone(),
                    None => self
                        .broker
                        .rsplit_once(':')
                        .map_or(self.broker.as_str(), |(host, _)| host)
                        .trim_matches(['[', ']'])
                        .to_string(),
                };
                Some(ClientTls {
                    config: rill_node::tls::client_config(ca, identity)?,
                    server_name,
                })
            }
            None => None,
        };
        Ok(ClientConfig {
            client_id: "rill-cli".into(),
            tls,
            ..ClientConfig::default()
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (embedded defaults: data in ./rill-data, listeners on loopback).
    Serve {
        /// A TOML configuration file.
        #[arg(long, env = "RILL_CONFIG")]
        config: Option<PathBuf>,
        /// Override one setting: `section.key=value` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Create, list, describe, alter and delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
        #[command(flatten)]
        broker: BrokerArgument,
    },
    /// Produce lines from stdin or files as records.
    Produce {
        topic: String,
        /// Files to read, one record per line (default: stdin).
        files: Vec<PathBuf>,
        /// A key for every record (records then go to the key's partition).
        #[arg(long)]
        key: Option<String>,
        /// A fixed partition.
        #[arg(long)]
        partition: Option<u32>,
        /// When the broker answers: none, written or durable.
        #[arg(long, value_enum, default_value_t = AcksArgument::Durable)]
        acks: AcksArgument,
        #[command(flatten)]
        broker: BrokerArgument,
    },
    /// Print records of a topic.
    Consume {
        topic: String,
        #[arg(long)]
        partition: Option<u32>,
        /// Start at the earliest offset (unless --offset or a committed group offset says otherwise).
        #[arg(long)]
        from_beginning: bool,
        #[arg(long)]
        offset: Option<i64>,
        /// Resume from and commit to this consumer group.
        #[arg(long)]
        group: Option<String>,
        /// Keep waiting for new records.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        max_records: Option<u64>,
        #[arg(long, value_enum, default_value_t = OutputArgument::Text)]
        output: OutputArgument,
        #[command(flatten)]
        broker: BrokerArgument,
    },
    /// Consumer groups and their committed offsets.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
        #[command(flatten)]
        broker: BrokerArgument,
    },
    /// Work with the log files of a data directory.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// The broker's state: driver, shards, topics, connections, data.
    Status {
        #[command(flatten)]
        broker: BrokerArgument,
    },
    /// Hardware profiles: list, show, detect.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Check a configuration file, or list every key.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The replicator's destinations, their state and lag.
    Mirror {
        #[command(subcommand)]
        command: MirrorCommand,
    },
    /// MQTT listener helpers.
    Mqtt {
        #[command(subcommand)]
        command: MqttCommand,
    },
    /// Show which I/O driver Rill would use here, and why.
    Io {
        #[command(subcommand)]
        command: IoCommand,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AcksArgument {
    None,
    Written,
    Durable,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputArgument {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// A topic setting `key=value` (repeatable), e.g. retention_ms=86400000.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
    List,
    Describe {
        name: String,
    },
    Alter {
        name: String,
        #[arg(long)]
        partitions: Option<u32>,
        #[arg(long = "config", value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    List,
    Describe {
        group: String,
    },
    /// Move a group's committed offsets for a topic.
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        /// earliest, latest, offset:N or timestamp:MS
        #[arg(long)]
        to: String,
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
enum ProfileCommand {
    List,
    Show {
        name: String,
    },
    /// Read this machine's CPU, memory and disks and say which profile fits.
    Detect,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a file; errors point at the key and line.
    Check { file: PathBuf },
    /// Every key with its default and unit.
    Keys,
}

#[derive(Debug, Subcommand)]
enum MirrorCommand {
    /// Each destination's state, last error and lag per partition.
    Status {
        /// The broker's admin listener (listeners.admin).
        #[arg(long, default_value = "127.0.0.1:7471")]
        admin: String,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum MqttCommand {
    /// Print a users-file line for USER (mqtt.users_file); the password is
    /// the first line of standard input.
    Passwd {
        user: String,
        /// PBKDF2 rounds: more is slower to guess and to check.
        #[arg(long, default_value_t = rill_node::cli::PASSWD_ROUNDS_DEFAULT)]
        rounds: u32,
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

fn key_values(settings: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    settings
        .iter()
        .map(|setting| {
            setting
                .split_once('=')
                .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
                .ok_or_else(|| anyhow::anyhow!("`{setting}` is not key=value"))
        })
        .collect()
}

/// Runs a client command on a small runtime of its own.
fn with_client<F, Fut>(broker: &BrokerArgument, command: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = compio::runtime::Runtime::new().context("starting the client runtime")?;
    runtime.block_on(async {
        let config = broker.client_config()?;
        let client = Client::connect(&broker.broker, config).await?;
        command(client).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn parse_reset(to: &str) -> anyhow::Result<ResetTo> {
    match to {
        "earliest" => Ok(ResetTo::Earliest),
        "latest" => Ok(ResetTo::Latest),
        other => {
            if let Some(offset) = other.strip_prefix("offset:") {
                return Ok(ResetTo::Offset(
                    offset.parse().context("offset:N needs a number")?,
                ));
            }
            if let Some(time) = other.strip_prefix("timestamp:") {
                return Ok(ResetTo::Timestamp(
                    time.parse().context("timestamp:MS needs milliseconds")?,
                ));
            }
            anyhow::bail!("--to must be earliest, latest, offset:N or timestamp:MS, not `{other}`")
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config, sets } => {
            let environment: Vec<(String, String)> = std::env::vars().collect();
            let machine = MachineFacts::read();
            let config = config::load(config.as_deref(), &sets, &environment, &machine)
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            rill_node::broker::serve(config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topic { command, broker } => with_client(&broker, |client| async move {
            use commands as topic;
            match command {
                TopicCommand::Create {
                    name,
                    partitions,
                    settings,
                } => topic::topic_create(&client, &name, partitions, &key_values(&settings)?).await,
                TopicCommand::List => topic::topic_list(&client).await,
                TopicCommand::Describe { name } => topic::topic_describe(&client, &name).await,
                TopicCommand::Alter {
                    name,
                    partitions,
                    settings,
                } => topic::topic_alter(&client, &name, partitions, &key_values(&settings)?).await,
                TopicCommand::Delete { name } => topic::topic_delete(&client, &name).await,
            }
        }),
        Command::Produce {
            topic,
            files,
            key,
            partition,
            acks,
            broker,
        } => with_client(&broker, |client| async move {
            let options = ProduceOptions {
                key,
                partition,
                acks: match acks {
                    AcksArgument::None => Acks::None,
                    AcksArgument::Written => Acks::Written,
                    AcksArgument::Durable => Acks::Durable,
                },
                files,
                ..ProduceOptions::default()
            };
            commands::produce(&client, &topic, options).await
        }),
        Command::Consume {
            topic,
            partition,
            from_beginning,
            offset,
            group,
            follow,
            max_records,
            output,
            broker,
        } => with_client(&broker, |client| async move {
            let options = ConsumeOptions {
                partition,
                from_beginning,
                offset,
                group,
                follow,
                max_records,
                output: match output {
                    OutputArgument::Text => Output::Text,
                    OutputArgument::Json => Output::Json,
                },
            };
            commands::consume(&client, &topic, options).await
        }),
        Command::Group { command, broker } => with_client(&broker, |client| async move {
            use commands as group;
            match command {
                GroupCommand::List => group::group_list(&client).await,
                GroupCommand::Describe { group: name } => {
                    group::group_describe(&client, &name).await
                }
                GroupCommand::ResetOffsets {
                    group: name,
                    topic,
                    to,
                } => group::group_reset_offsets(&client, &name, &topic, parse_reset(&to)?).await,
            }
        }),
        Command::Status { broker } => {
            with_client(
                &broker,
                |client| async move { commands::status(&client).await },
            )
        }
        Command::Log {
            command: LogCommand::Verify { dir },
        } => verify(&dir),
        Command::Profile { command } => profile(command),
        Command::Config { command } => match command {
            ConfigCommand::Check { file } => match config::check_file(&file) {
                Ok(checked) => {
                    println!(
                        "{}: valid (profile {}, {} shards, native listener {})",
                        file.display(),
                        checked.profile,
                        checked.node.shards,
                        checked.listeners.native
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("{error}");
                    Ok(ExitCode::FAILURE)
                }
            },
            ConfigCommand::Keys => {
                for key in config::documented_keys() {
                    println!(
                        "{:<40} {:<14} {:<8} {}",
                        key.key, key.default, key.unit, key.meaning
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Mirror {
            command: MirrorCommand::Status { admin, json },
        } => {
            let body = rill_node::cli::fetch_mirror_status(&admin)?;
            if json {
                println!("{body}");
            } else {
                print!("{}", rill_node::cli::format_mirror_status(&body)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Mqtt {
            command: MqttCommand::Passwd { user, rounds },
        } => {
            let password = rill_node::cli::read_password()?;
            println!("{}", rill_node::cli::passwd_line(&user, &password, rounds)?);
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "rill", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn profile(command: ProfileCommand) -> anyhow::Result<ExitCode> {
    match command {
        ProfileCommand::List => {
            for profile in config::builtin_profiles() {
                println!("{:<18} {}", profile.name, profile.description);
            }
        }
        ProfileCommand::Show { name } => {
            let profile = config::profile::find(&name).with_context(|| {
                let names: Vec<&str> = config::builtin_profiles()
                    .iter()
                    .map(|profile| profile.name)
                    .collect();
                format!(
                    "no profile `{name}`; built-in profiles: {}",
                    names.join(", ")
                )
            })?;
            print!("{}", profile.raw_toml);
        }
        ProfileCommand::Detect => {
            let detection = config::detect(&MachineFacts::read());
            println!("profile: {}", detection.profile);
            for reason in detection.reasons {
                println!("  {reason}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
