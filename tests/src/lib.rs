//! Support for end-to-end tests: start the real `rill` binary on free loopback
//! ports with a temporary data directory, wait until it is ready, stop it with
//! a signal or kill it, and talk HTTP to its admin listener.
//!
//! Waiting is always polling a condition with a deadline, never a bare sleep.
//! [`proxy`] puts a controllable TCP hop between a client and the broker.

pub mod pki;
pub mod proxy;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to become ready or to stop.
pub const BROKER_DEADLINE: Duration = Duration::from_secs(60);

/// The `rill` binary of this workspace, built if it is missing.
pub fn rill_binary() -> PathBuf {
    // Test executables live in target/<profile>/deps; the binary one level up.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let binary = profile_dir.join("rill");
    if !binary.exists() {
        // Built with the profile the tests were: target/debug is `dev`, any
        // other directory is named after its profile.
        let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
            Some("debug") | None => "dev",
            Some(name) => name,
        };
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "rill-node",
                "--bin",
                "rill",
                "--profile",
                profile,
            ])
            .status()
            .expect("run cargo build for the rill binary");
        assert!(status.success(), "building the rill binary failed");
    }
    binary
}

/// A command running `rill`: through `RILL_TEST_RUNNER` when tests run
/// under an emulator (the aarch64 gate runs them under qemu).
pub fn rill_command() -> Command {
    let runner = std::env::var("RILL_TEST_RUNNER").unwrap_or_default();
    let mut runner = runner.split_whitespace();
    match runner.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(runner).arg(rill_binary());
            command
        }
        None => Command::new(rill_binary()),
    }
}

/// A free TCP port on 127.0.0.1, outside the kernel's ephemeral range
/// (32768 and up), so a client connection of another test cannot take a
/// broker's port while the broker restarts.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    loop {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(step.wrapping_mul(7919)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The first topic name `prefix-N` that `placed` accepts, given the shard
/// (of two) each partition lands on.
fn first_topic(prefix: &str, placed: impl Fn(&dyn Fn(u32) -> usize) -> bool) -> String {
    use rill_node::broker::topics::shard_of;
    (0..)
        .map(|index| format!("{prefix}-{index}"))
        .find(|topic| placed(&|partition| shard_of(topic, partition, 2)))
        .expect("some name lands where asked")
}

/// A topic name whose partitions 0 and 1 are on different shards of two.
pub fn topic_across_two_shards(prefix: &str) -> String {
    first_topic(prefix, |shard_of| shard_of(0) != shard_of(1))
}

/// A topic name whose partition 0 is on `shard` of two.
pub fn topic_on_shard(prefix: &str, shard: usize) -> String {
    first_topic(prefix, |shard_of| shard_of(0) == shard)
}

/// Polls `condition` until it holds or `deadline` passes.
pub fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    while !condition() {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// A GET on the admin listener: status code and body.
pub fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: rill\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    Ok((status, body))
}

/// The loopback addresses a broker listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub native: SocketAddr,
    pub admin: SocketAddr,
    pub kafka: SocketAddr,
    pub mqtt: SocketAddr,
}

impl Ports {
    /// Free ports for every listener, so a test can know them (and, say, put
    /// a proxy in front of one) before the broker starts.
    pub fn free() -> Self {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            native: loopback(free_port()),
            admin: loopback(free_port()),
            kafka: loopback(free_port()),
            mqtt: loopback(free_port()),
        }
    }
}

/// A running broker process.
pub struct Broker {
    child: Option<Child>,
    pub native: SocketAddr,
    pub admin: SocketAddr,
    /// The Kafka wire-protocol listener.
    pub kafka: SocketAddr,
    pub mqtt: SocketAddr,
    pub data_dir: PathBuf,
    settings: Vec<String>,
    _temporary: Option<tempfile::TempDir>,
}

impl Broker {
    /// Starts a broker on a fresh data directory with `settings` (`key=value`).
    pub fn start(settings: &[&str]) -> Self {
        Self::start_on(Ports::free(), settings)
    }

    /// Starts a broker on a fresh data directory, listening on `ports`.
    pub fn start_on(ports: Ports, settings: &[&str]) -> Self {
        let temporary = tempfile::tempdir().expect("temporary data directory");
        let data_dir = temporary.path().join("data");
        let mut broker = Self {
            child: None,
            native: ports.native,
            admin: ports.admin,
            kafka: ports.kafka,
            mqtt: ports.mqtt,
            data_dir,
            settings: settings.iter().map(|setting| setting.to_string()).collect(),
            _temporary: Some(temporary),
        };
        broker.spawn();
        broker
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Resident memory of the broker process, in KiB.
    pub fn resident_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|line| line.starts_with("VmRSS:"))
                    .and_then(|line| line.split_whitespace().nth(1))
                    .and_then(|value| value.parse().ok())
            })
            .unwrap_or(0)
    }

    /// The native listener as `host:port`.
    pub fn address(&self) -> String {
        self.native.to_string()
    }

    /// The Kafka listener as `host:port` (a bootstrap server).
    pub fn kafka_address(&self) -> String {
        self.kafka.to_string()
    }

    fn spawn(&mut self) {
        let mut command = rill_command();
        command
            .arg("serve")
            .arg("--set")
            .arg(format!("data_dir={}", self.data_dir.display()))
            .arg("--set")
            .arg(format!("listeners.native={}", self.native))
            .arg("--set")
            .arg(format!("listeners.admin={}", self.admin))
            .arg("--set")
            .arg(format!("listeners.kafka={}", self.kafka))
            .arg("--set")
            .arg(format!("listeners.mqtt={}", self.mqtt));
        for setting in &self.settings {
            command.arg("--set").arg(setting);
        }
        command
            .env(
                "RILL_LOG",
                std::env::var("RILL_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        let child = command.spawn().expect("start rill serve");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let admin = self.admin;
        let native = self.native;
        // With TLS on every listener, readiness is the native port accepting.
        let tls = self
            .settings
            .iter()
            .any(|setting| setting.starts_with("tls.cert_file="));
        let child = self.child.as_mut().expect("running");
        let mut exited = None;
        wait_until("the broker to be ready", BROKER_DEADLINE, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            if tls {
                return TcpStream::connect_timeout(&native, Duration::from_secs(1)).is_ok();
            }
            matches!(http_get(admin, "/ready"), Ok((200, _)))
        });
        assert!(
            exited.is_none(),
            "rill serve exited during start: {exited:?}"
        );
    }

    /// Sends a signal to the broker.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit();
    }

    /// Waits (bounded) for the broker to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let mut status = None;
        wait_until("the broker to exit", BROKER_DEADLINE, || {
            status = child.try_wait().expect("wait for rill");
            status.is_some()
        });
        status.expect("exited")
    }

    /// Starts the broker again on the same data directory and ports.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
