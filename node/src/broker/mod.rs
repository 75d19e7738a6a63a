//! The broker: shards, listeners and the shared state between them.
//!
//! `serve` binds the listeners (so a busy port is a clear error before anything
//! starts), loads topic metadata and group offsets, then starts one shard
//! thread per configured core. Each shard runs its own compio runtime on the
//! selected I/O driver, owns the partitions [`topics::shard_of`] assigns it,
//! and accepts connections from the shared listening socket. A request for a
//! partition owned elsewhere is forwarded to the owner's inbox.

pub mod admin;
pub mod connection;
pub mod errors;
pub mod groups;
pub mod metrics;
pub mod producers;
pub mod shard;
pub mod topics;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use futures_channel::{mpsc, oneshot};
use rill_core::logset::DiskUsage;
use rill_protocol::ErrorCode;

use crate::config::{Config, TopicSettings};
use crate::io::{DriverSelection, build_runtime, select_driver};
use errors::OpError;
use groups::GroupStore;
use metrics::Metrics;
use shard::{PartitionStats, ShardOp};
use topics::{TopicDirectory, TopicMeta, check_topic_name, shard_of};

/// Milliseconds since the Unix epoch: the time the log stamps and ages by.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Bytes held in connection buffers (read buffers and answers waiting to be
/// written) across the whole broker, against `limits.buffer_memory_bytes_max`.
/// Connections stop reading new requests while it is exceeded.
#[derive(Debug, Default)]
pub struct BufferBudget {
    used: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl BufferBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            used: std::sync::atomic::AtomicU64::new(0),
            limit,
        }
    }

    pub fn take(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn give_back(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn exceeded(&self) -> bool {
        self.used() > self.limit
    }
}

/// State every shard and the admin thread share.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub driver: DriverSelection,
    pub topics: TopicDirectory,
    pub groups: GroupStore,
    /// The Kafka protocol's broker-wide state (groups, producer ids).
    pub kafka: crate::kafka::KafkaState,
    /// The MQTT listener's broker-wide state (sessions, subscriptions,
    /// retained messages, wills).
    pub mqtt: crate::mqtt::MqttState,
    /// The replicator's frontiers and figures.
    pub mirror: crate::mirror::MirrorState,
    pub usage: DiskUsage,
    pub metrics: Metrics,
    /// TLS for the listeners, when `tls.cert_file` is set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub buffers: BufferBudget,
    inboxes: Vec<mpsc::UnboundedSender<ShardOp>>,
    /// Where each shard takes in native and Kafka connections moved to it.
    arrivals: Vec<mpsc::UnboundedSender<connection::MovedConnection>>,
    connections: AtomicU32,
    stats: Vec<Mutex<Vec<PartitionStats>>>,
    shutting_down: AtomicBool,
    /// Set when connections did not finish within the shutdown grace period.
    forced: AtomicBool,
    shards_ready: AtomicU32,
    started: Instant,
    changes: futures_util::lock::Mutex<()>,
}

impl Shared {
    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    pub fn connections_open(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// Counts a new connection unless `connections_max` is reached.
    pub fn try_add_connection(&self) -> bool {
        let limit = self.config.limits.connections_max;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < limit).then_some(open + 1)
            })
            .is_ok()
    }

    pub fn remove_connection(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    /// Hands a connection to `shard`'s acceptor. A shard that has stopped
    /// drops it, which closes the socket and frees its count.
    pub(crate) fn move_connection(&self, shard: usize, moved: connection::MovedConnection) {
        if let Some(arrivals) = self.arrivals.get(shard) {
            let _ = arrivals.unbounded_send(moved);
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Whether shards stop without waiting for connections any longer.
    pub fn is_forced(&self) -> bool {
        self.forced.load(Ordering::Acquire)
    }

    /// Gives up on connections that did not finish within the grace period.
    pub fn force_stop(&self) {
        self.forced.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down()
            && self.shards_ready.load(Ordering::Acquire) as usize == self.shards()
    }

    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Starts a graceful shutdown: every shard stops accepting, finishes what
    /// is in flight, syncs and checkpoints.
    pub fn begin_shutdown(&self) {
        if !self.shutting_down.swap(true, Ordering::AcqRel) {
            for inbox in &self.inboxes {
                let _ = inbox.unbounded_send(ShardOp::Shutdown);
            }
        }
    }

    pub fn publish_stats(&self, shard: u32, stats: Vec<PartitionStats>) {
        if let Some(slot) = self.stats.get(shard as usize) {
            *slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = stats;
        }
    }

    /// The statistics shards published on their last tick.
    pub fn published_stats(&self) -> Vec<PartitionStats> {
        self.stats
            .iter()
            .flat_map(|slot| {
                slot.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone()
            })
            .collect()
    }

    /// Sends an operation to a shard and waits for its answer.
    pub async fn call<T>(
        &self,
        shard: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> ShardOp,
    ) -> Result<T, OpError> {
        let (reply, answer) = oneshot::channel();
        self.inboxes[shard]
            .unbounded_send(make(reply))
            .map_err(|_| OpError::new(ErrorCode::ShuttingDown, "the broker is shutting down"))?;
        answer.await.map_err(|_| {
            OpError::new(
                ErrorCode::ShuttingDown,
                "the shard stopped before answering",
            )
        })
    }

    /// Sends an operation without waiting (the reply channel is inside it).
    pub fn send(&self, shard: usize, op: ShardOp) -> Result<(), OpError> {
        self.inboxes[shard]
            .unbounded_send(op)
            .map_err(|_| OpError::new(ErrorCode::ShuttingDown, "the broker is shutting down"))
    }

    /// Fresh statistics of every partition, asked of every shard.
    pub async fn partition_stats(&self) -> Vec<PartitionStats> {
        let mut all = Vec::new();
        for shard in 0..self.shards() {
            if let Ok(stats) = self.call(shard, |reply| ShardOp::Stats { reply }).await {
                all.extend(stats);
            }
        }
        all.sort_by(|left, right| {
            (&left.topic, left.partition).cmp(&(&right.topic, right.partition))
        });
        all
    }
}

/// Parses `key=value` lines (the protocol's settings field).
pub fn parse_settings(text: &str) -> Result<Vec<(String, String)>, OpError> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.split_once('=')
                .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
                .ok_or_else(|| {
                    OpError::new(
                        ErrorCode::InvalidConfig,
                        format!("setting `{line}` is not key=value"),
                    )
                })
        })
        .collect()
}

fn settings_with(
    overrides: &[(String, String)],
    base: &TopicSettings,
) -> Result<TopicSettings, OpError> {
    let mut settings = base.clone();
    settings
        .apply_overrides(overrides)
        .map_err(|error| OpError::new(ErrorCode::InvalidConfig, error.to_string()))?;
    settings
        .log_config()
        .check()
        .map_err(|error| OpError::new(ErrorCode::InvalidConfig, error.to_string()))?;
    Ok(settings)
}

/// Creates a topic: metadata persisted first, then its partitions opened on
/// their shards, then the table published.
pub async fn create_topic(
    shared: &Shared,
    name: &str,
    partitions: u32,
    overrides: &[(String, String)],
) -> Result<TopicMeta, OpError> {
    check_topic_name(name).map_err(|reason| OpError::new(ErrorCode::InvalidRequest, reason))?;
    if partitions == 0 || partitions > topics::PARTITIONS_MAX {
        return Err(OpError::new(
            ErrorCode::InvalidRequest,
            format!(
                "a topic has 1 to {} partitions, not {partitions}",
                topics::PARTITIONS_MAX
            ),
        ));
    }
    let settings = settings_with(overrides, &shared.config.topic_defaults)?;
    let _changes = shared.changes.lock().await;
    let view = shared.topics.snapshot();
    if let Some(existing) = view.table.get(name) {
        return Err(OpError::new(
            ErrorCode::TopicExists,
            format!(
                "topic {name} exists already with {} partitions",
                existing.partitions
            ),
        ));
    }
    let meta = TopicMeta {
        partitions,
        settings,
    };
    topics::persist(&shared.config.data_dir, name, &meta)
        .map_err(|error| OpError::new(ErrorCode::StorageError, format!("{error:#}")))?;
    open_partitions(shared, name, 0..partitions, &meta.settings).await?;
    let mut table = (*view.table).clone();
    table.insert(name.to_string(), meta.clone());
    shared.topics.publish(table);
    tracing::info!(topic = name, partitions, "topic created");
    Ok(meta)
}

async fn open_partitions(
    shared: &Shared,
    name: &str,
    partitions: std::ops::Range<u32>,
    settings: &TopicSettings,
) -> Result<(), OpError> {
    for partition in partitions {
        let owner = shard_of(name, partition, shared.shards());
        let key = (name.to_string(), partition);
        let settings = Box::new(settings.clone());
        shared
            .call(owner, |reply| ShardOp::OpenPartition {
                key,
                settings,
                reply,
            })
            .await??;
    }
    Ok(())
}

/// The topic, created with the broker's defaults when it is missing and the
/// setting allows it.
pub async fn ensure_topic(shared: &Shared, name: &str) -> Result<TopicMeta, OpError> {
    if let Some(meta) = shared.topics.snapshot().table.get(name) {
        return Ok(meta.clone());
    }
    if !shared.config.topics.auto_create {
        return Err(OpError::new(
            ErrorCode::UnknownTopic,
            format!(
                "topic {name} does not exist and topics.auto_create is off; create it with `rill topic create {name}`"
            ),
        ));
    }
    match create_topic(shared, name, shared.config.topics.default_partitions, &[]).await {
        Ok(meta) => Ok(meta),
        // Another connection created it first.
        Err(error) if error.code == ErrorCode::TopicExists => shared
            .topics
            .snapshot()
            .table
            .get(name)
            .cloned()
            .ok_or(error),
        Err(error) => Err(error),
    }
}

/// Deletes a topic: unpublished first (new requests fail), then its
/// partitions closed and removed, then its directory.
pub async fn delete_topic(shared: &Shared, name: &str) -> Result<(), OpError> {
    let _changes = shared.changes.lock().await;
    let view = shared.topics.snapshot();
    let Some(meta) = view.table.get(name).cloned() else {
        return Err(OpError::new(
            ErrorCode::UnknownTopic,
            format!("topic {name} does not exist"),
        ));
    };
    let mut table = (*view.table).clone();
    table.remove(name);
    shared.topics.publish(table);
    for partition in 0..meta.partitions {
        let owner = shard_of(name, partition, shared.shards());
        let key = (name.to_string(), partition);
        shared
            .call(owner, |reply| ShardOp::ClosePartition {
                key,
                delete: true,
                reply,
            })
            .await??;
    }
    topics::remove(&shared.config.data_dir, name)
        .map_err(|error| OpError::new(ErrorCode::StorageError, format!("{error:#}")))?;
    tracing::info!(topic = name, "topic deleted");
    Ok(())
}

/// Changes a topic's settings and, when larger, its partition count.
pub async fn alter_topic(
    shared: &Shared,
    name: &str,
    partitions: Option<u32>,
    overrides: &[(String, String)],
) -> Result<(), OpError> {
    let _changes = shared.changes.lock().await;
    let view = shared.topics.snapshot();
    let Some(old) = view.table.get(name).cloned() else {
        return Err(OpError::new(
            ErrorCode::UnknownTopic,
            format!("topic {name} does not exist"),
        ));
    };
    let settings = settings_with(overrides, &old.settings)?;
    let partitions = partitions.unwrap_or(old.partitions);
    if partitions < old.partitions || partitions > topics::PARTITIONS_MAX {
        return Err(OpError::new(
            ErrorCode::InvalidRequest,
            format!(
                "partitions can grow from {} up to {}, not become {partitions}",
                old.partitions,
                topics::PARTITIONS_MAX
            ),
        ));
    }
    let meta = TopicMeta {
        partitions,
        settings,
    };
    topics::persist(&shared.config.data_dir, name, &meta)
        .map_err(|error| OpError::new(ErrorCode::StorageError, format!("{error:#}")))?;
    for partition in 0..old.partitions {
        let owner = shard_of(name, partition, shared.shards());
        let key = (name.to_string(), partition);
        let settings = Box::new(meta.settings.clone());
        shared
            .call(owner, |reply| ShardOp::AlterPartition {
                key,
                settings,
                reply,
            })
            .await??;
    }
    open_partitions(shared, name, old.partitions..partitions, &meta.settings).await?;
    let mut table = (*view.table).clone();
    table.insert(name.to_string(), meta);
    shared.topics.publish(table);
    tracing::info!(topic = name, partitions, "topic altered");
    Ok(())
}

/// Serialises one topic's settings as `key=value` lines.
pub fn settings_text(settings: &TopicSettings) -> String {
    match toml::to_string(settings) {
        Ok(text) => text
            .lines()
            .map(|line| line.replace(" = ", "="))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(error) => format!("# settings could not be encoded: {error}"),
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts), and
/// handles them on a thread of their own: the first starts a graceful
/// shutdown, the second exits at once.
fn install_signal_handling(shared: Arc<Shared>) -> anyhow::Result<()> {
    // SAFETY: plain libc calls on a local, initialised signal set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            anyhow::bail!("could not block SIGINT/SIGTERM for orderly shutdown");
        }
        set
    };
    std::thread::Builder::new()
        .name("rill-signals".into())
        .spawn(move || {
            let mut received = 0;
            loop {
                let mut signal = 0;
                // SAFETY: `set` is a valid signal set; `signal` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    continue;
                }
                received += 1;
                if received == 1 {
                    tracing::info!(signal, "shutting down: finishing in-flight requests, syncing, writing checkpoints (signal again to exit at once)");
                    shared.begin_shutdown();
                } else {
                    eprintln!("rill: second signal, exiting now without a clean shutdown");
                    std::process::exit(130);
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Takes the data directory's lock so two brokers never share it.
fn lock_data_dir(config: &Config) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let path = config.data_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "the data directory {} is in use by another rill process; stop it or choose another data_dir",
            config.data_dir.display()
        );
    }
    Ok(file)
}

fn pin_to_core(index: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(index % cores, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(shard = index, "could not pin the shard thread to a core");
        }
    }
}

/// How long a start keeps trying a listener address that is still in use.
/// After a crash the kernel releases an io_uring process's sockets a moment
/// after the process is gone, so an immediate restart can find them busy.
const BIND_RETRY_MS: u64 = 5_000;

fn bind_listener(
    address: std::net::SocketAddr,
    name: &str,
    key: &str,
) -> anyhow::Result<std::net::TcpListener> {
    let started = Instant::now();
    let mut announced = false;
    loop {
        match std::net::TcpListener::bind(address) {
            Ok(listener) => return Ok(listener),
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < std::time::Duration::from_millis(BIND_RETRY_MS) =>
            {
                if !announced {
                    tracing::warn!(%address, "{name} listener address in use; retrying for {} s", BIND_RETRY_MS / 1000);
                    announced = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("binding the {name} listener on {address}: is another broker using the port? ({key})")
                });
            }
        }
    }
}

/// Runs the broker until a signal stops it.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let mut driver = select_driver(config.node.io_driver).map_err(anyhow::Error::msg)?;
    drop(build_runtime(&mut driver).context("starting the I/O runtime")?);
    tracing::info!(driver = %driver.driver, reason = %driver.reason, "I/O driver selected");
    let _lock = lock_data_dir(&config)?;
    let table = topics::load_all(&config.data_dir)?;
    let groups = GroupStore::open(&config.data_dir)?;
    let kafka_state = crate::kafka::KafkaState::open(&config.data_dir, &config.kafka)?;
    let mqtt_state = crate::mqtt::MqttState::open(
        &config.data_dir,
        &config.mqtt,
        config.topic_defaults.batch_bytes_max,
    )?;
    let bridge = crate::mqtt::bridge::prepare(&config)?;
    let mirror = crate::mirror::prepare(&config)?;
    let native = bind_listener(config.listeners.native, "native", "listeners.native")?;
    native.set_nonblocking(true)?;
    let kafka = bind_listener(config.listeners.kafka, "Kafka", "listeners.kafka")?;
    kafka.set_nonblocking(true)?;
    let admin = bind_listener(config.listeners.admin, "admin", "listeners.admin")?;
    let mqtt = bind_listener(config.listeners.mqtt, "MQTT", "listeners.mqtt")?;
    mqtt.set_nonblocking(true)?;
    let tls = if config.tls.enabled() {
        let client_ca = (!config.tls.client_ca_file.is_empty())
            .then(|| std::path::Path::new(&config.tls.client_ca_file));
        let server = crate::tls::server_config(
            std::path::Path::new(&config.tls.cert_file),
            std::path::Path::new(&config.tls.key_file),
            client_ca,
        )
        .context("setting up TLS (tls.cert_file, tls.key_file, tls.client_ca_file)")?;
        tracing::info!(
            client_certificates = client_ca.is_some(),
            "TLS on every listener"
        );
        Some(server)
    } else {
        None
    };
    let shards = config.node.shards.max(1);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::unbounded()).unzip();
    let (arrivals, arrived): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::unbounded()).unzip();
    let shared = Arc::new(Shared {
        metrics: Metrics::new(shards),
        tls,
        buffers: BufferBudget::new(config.limits.buffer_memory_bytes_max),
        driver,
        topics: TopicDirectory::new(table),
        groups,
        kafka: kafka_state,
        mqtt: mqtt_state,
        mirror: crate::mirror::MirrorState::default(),
        usage: DiskUsage::default(),
        inboxes: senders,
        arrivals,
        connections: AtomicU32::new(0),
        stats: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
        shutting_down: AtomicBool::new(false),
        forced: AtomicBool::new(false),
        shards_ready: AtomicU32::new(0),
        started: Instant::now(),
        changes: futures_util::lock::Mutex::new(()),
        config,
    });
    install_signal_handling(shared.clone())?;
    admin::spawn(admin, shared.clone())?;
    let mut threads = Vec::new();
    for (index, (inbox, arrived)) in receivers.into_iter().zip(arrived).enumerate() {
        let shared = shared.clone();
        let listener = native.try_clone().context("sharing the native listener")?;
        let kafka = kafka.try_clone().context("sharing the Kafka listener")?;
        let mqtt = mqtt.try_clone().context("sharing the MQTT listener")?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("rill-shard-{index}"))
                .spawn(move || {
                    let result = connection::shard_main(
                        index,
                        shared.clone(),
                        inbox,
                        connection::Listeners {
                            native: listener,
                            kafka,
                            mqtt,
                            arrived,
                        },
                    );
                    if let Err(error) = &result {
                        // The other shards must not run on half-alive.
                        tracing::error!(shard = index, error = %format!("{error:#}"), "shard failed; stopping the broker");
                        shared.begin_shutdown();
                        shared.force_stop();
                    }
                    result
                })
                .context("starting a shard thread")?,
        );
    }
    // Its appends go through the shards' inboxes, served once they run.
    let mut failure = None;
    let bridge = match bridge.map(|bridge| crate::mqtt::bridge::spawn(shared.clone(), bridge)) {
        Some(Ok(thread)) => Some(thread),
        Some(Err(error)) => {
            shared.begin_shutdown();
            failure = Some(error);
            None
        }
        None => None,
    };
    let mirror = match crate::mirror::spawn(shared.clone(), mirror) {
        Ok(thread) => thread,
        Err(error) => {
            shared.begin_shutdown();
            failure.get_or_insert(error);
            None
        }
    };
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                shared.begin_shutdown();
                failure.get_or_insert(error);
            }
            Err(_) => {
                shared.begin_shutdown();
                failure.get_or_insert(anyhow::anyhow!("a shard thread panicked"));
            }
        }
    }
    if let Some(bridge) = bridge
        && bridge.join().is_err()
    {
        failure.get_or_insert(anyhow::anyhow!("the MQTT bridge thread panicked"));
    }
    if let Some(mirror) = mirror
        && mirror.join().is_err()
    {
        failure.get_or_insert(anyhow::anyhow!("the replicator thread panicked"));
    }
    match failure {
        Some(error) => Err(error),
        None => {
            tracing::info!("rill stopped cleanly");
            Ok(())
        }
    }
}

/// Marks one more shard as ready; logs once all are.
pub fn shard_ready(shared: &Shared) {
    let ready = shared.shards_ready.fetch_add(1, Ordering::AcqRel) + 1;
    if ready as usize == shared.shards() {
        tracing::info!(
            native = %shared.config.listeners.native,
            kafka = %shared.config.listeners.kafka,
            admin = %shared.config.listeners.admin,
            mqtt = %shared.config.listeners.mqtt,
            shards = shared.shards(),
            profile = %shared.config.profile,
            data_dir = %shared.config.data_dir.display(),
            "rill is ready"
        );
    }
}
