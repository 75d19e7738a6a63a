//! A broker process for a benchmark: the release `rill` binary on loopback
//! ports with its own data directory, and the figures the OS keeps about it
//! (CPU time, resident memory).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The `rill` binary next to this `rill-bench` binary (same build profile).
pub fn rill_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let binary = exe.with_file_name("rill");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing; build it with `cargo build --release -p rill-node`",
        binary.display()
    );
    Ok(binary)
}

/// `count` distinct free loopback ports: all bound at once, so the kernel
/// cannot hand the same port out twice, then released for the broker.
fn free_ports<const COUNT: usize>() -> anyhow::Result<[u16; COUNT]> {
    let listeners = (0..COUNT)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0u16; COUNT];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// A running broker, stopped (SIGTERM) when dropped.
pub struct BrokerProcess {
    child: Child,
    pub native: String,
    /// The Kafka listener (free port), for Kafka-protocol scenarios.
    #[allow(dead_code)]
    pub kafka: String,
    /// The MQTT listener (free port), for MQTT scenarios.
    pub mqtt: String,
    pub admin: String,
}

impl BrokerProcess {
    /// Starts `rill serve` on `data_dir` with extra `--set` settings and
    /// waits (bounded) until `/ready` answers.
    pub fn start(data_dir: &Path, settings: &[String]) -> anyhow::Result<Self> {
        let [native, admin, kafka, mqtt] =
            free_ports::<4>()?.map(|port| format!("127.0.0.1:{port}"));
        let mut command = Command::new(rill_binary()?);
        command
            .arg("serve")
            .args(["--set", &format!("data_dir={}", data_dir.display())])
            .args(["--set", &format!("listeners.native={native}")])
            .args(["--set", &format!("listeners.admin={admin}")])
            .args(["--set", &format!("listeners.kafka={kafka}")])
            .args(["--set", &format!("listeners.mqtt={mqtt}")]);
        for setting in settings {
            command.args(["--set", setting]);
        }
        let child = command
            .env("RILL_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting rill serve")?;
        let mut broker = Self {
            child,
            native,
            kafka,
            mqtt,
            admin,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = broker.child.try_wait()? {
                anyhow::bail!("rill serve exited during start ({status}); see its log above");
            }
            if matches!(http_get(&broker.admin, "/ready"), Ok((200, _))) {
                return Ok(broker);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "rill serve was not ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) the broker has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        process_cpu_seconds(self.pid())
    }

    /// Bytes the broker has caused to be sent to the block layer (/proc/PID/io).
    pub fn write_bytes(&self) -> anyhow::Result<u64> {
        process_write_bytes(self.pid())
    }

    /// One series of the broker's `/metrics` (name with its labels), or
    /// `None` when it is not there.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = http_get(&self.admin, "/metrics").ok()?;
        body.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    }

    /// (current resident KiB, peak resident KiB) from /proc/PID/status.
    pub fn resident_kib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| {
            status
                .lines()
                .find(|line| line.starts_with(name))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|value| value.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// SIGTERM and wait (bounded) for the clean stop.
    pub fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while self.child.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                self.child.kill()?;
                anyhow::bail!("rill did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU seconds (user + system) process `pid` has used, from /proc/PID/stat.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0);
    // SAFETY: sysconf with a valid name.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks / ticks_per_second)
}

/// Bytes process `pid` has caused to be sent to the block layer, from
/// /proc/PID/io (needs the same user, or root).
pub fn process_write_bytes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    Ok(io
        .lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0))
}

/// CPU seconds (user + system) this process has used, all its threads
/// included: the load generator's share of the machine.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A GET on the admin listener.
pub fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
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
