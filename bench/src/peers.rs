//! Peer brokers in the same run, with the same load shape: NATS JetStream
//! with file storage (persisted, acknowledged publish) and Mosquitto (MQTT).
//! The harness installs the Debian package when it is missing and it can
//! (root), starts the server on a loopback port with its own store, and says
//! clearly when a peer is unavailable instead of skipping it silently.
//!
//! The NATS client is the protocol's text form over a blocking socket: one
//! thread writes publishes (many per write), another reads acknowledgements.
//! Mosquitto is driven by the MQTT load generator (`crate::mqtt`), the same
//! one that drives Rill's MQTT listener.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Unacknowledged publishes a NATS publisher keeps in flight.
const NATS_WINDOW_MESSAGES: u64 = 4096;

/// A running nats-server with JetStream, killed when dropped.
pub struct NatsServer {
    child: Child,
    pub port: u16,
}

fn installed(program: &str) -> bool {
    // Daemons such as mosquitto live in /usr/sbin, which not every PATH has.
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {program} || test -x /usr/sbin/{program}"),
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Makes sure `program` exists, installing `package` with apt-get when root.
pub fn ensure_installed(program: &str, package: &str) -> anyhow::Result<()> {
    if installed(program) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "{program} is not installed and this is not root; install it with `apt-get install {package}`"
        );
    }
    eprintln!("installing {package} (apt-get) for the peer comparison");
    let status = Command::new("sh")
        .args([
            "-c",
            &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}"),
        ])
        .stdout(Stdio::null())
        .status()
        .context("running apt-get")?;
    anyhow::ensure!(
        status.success() && installed(program),
        "installing {package} failed"
    );
    Ok(())
}

impl NatsServer {
    pub fn start(store: &Path) -> anyhow::Result<Self> {
        ensure_installed("nats-server", "nats-server")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        let server = Self { child, port };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(15),
                "nats-server did not listen within 15 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mosquitto's settings for a benchmark: a loopback listener, anonymous
/// clients, in-flight and queue limits that the load never reaches, and
/// persistence as the Debian package ships it (`persistence true`, the
/// default `autosave_interval` of 1800 s): the in-memory store is saved
/// every half hour and at shutdown, so nothing is written, let alone
/// synced, per message. Everything else is Mosquitto's default, Nagle's
/// algorithm included (`set_tcp_nodelay false`) unless `nodelay` asks to
/// turn it off, as Rill does on its sockets: that halves Mosquitto's QoS 1
/// throughput under many pipelining clients (each PUBACK leaves in a
/// segment of its own, and each client answers with one PUBLISH at a time)
/// without improving its PUBACK latency at 20 000 msg/s.
pub fn mosquitto_config(port: u16, store: &Path, nodelay: bool) -> String {
    let nodelay = if nodelay {
        "set_tcp_nodelay true\n"
    } else {
        ""
    };
    format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         max_inflight_messages 1000\n\
         max_queued_messages 1000000\n\
         persistence true\n\
         persistence_location {}/\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         user root\n\
         {nodelay}",
        store.display()
    )
}

/// A running Mosquitto on a loopback port, killed when dropped.
pub struct MosquittoServer {
    child: Child,
    pub address: String,
    log: std::path::PathBuf,
}

impl MosquittoServer {
    /// Installs Mosquitto when missing (root), writes its configuration in
    /// `directory` (Nagle off when `nodelay`) and starts it there; waits
    /// (bounded) until it listens.
    pub fn start(directory: &Path, nodelay: bool) -> anyhow::Result<Self> {
        ensure_installed("mosquitto", "mosquitto")?;
        let binary = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = directory.join("mosquitto.conf");
        std::fs::write(&config, mosquitto_config(port, directory, nodelay))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = directory.join("mosquitto.log");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting mosquitto")?;
        let mut server = Self {
            child,
            address: format!("127.0.0.1:{port}"),
            log,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!(
                    "mosquitto exited during start ({status}): {}",
                    server.log_text().trim()
                );
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(15),
                "mosquitto did not listen within 15 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What Mosquitto logged (errors and warnings).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The installed Debian package version.
    pub fn version() -> String {
        Command::new("sh")
            .args(["-c", "dpkg-query -W -f '${Version}' mosquitto 2>/dev/null"])
            .output()
            .ok()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
            .filter(|version| !version.is_empty())
            .unwrap_or_else(|| "unknown version".into())
    }
}

impl Drop for MosquittoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one protocol line (without CRLF).
fn read_line(reader: &mut impl BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    anyhow::ensure!(
        reader.read_line(&mut line)? > 0,
        "nats-server closed the connection"
    );
    Ok(line.trim_end().to_string())
}

/// Reads until a `MSG` arrives; returns its payload. Answers PINGs.
fn read_message(reader: &mut impl BufRead, writer: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    loop {
        let line = read_line(reader)?;
        if line == "PING" {
            writer.write_all(b"PONG\r\n")?;
            continue;
        }
        if let Some(error) = line.strip_prefix("-ERR") {
            anyhow::bail!("nats-server: {}", error.trim());
        }
        if let Some(rest) = line.strip_prefix("MSG ") {
            let length: usize = rest
                .split_whitespace()
                .last()
                .and_then(|length| length.parse().ok())
                .context("MSG line without a length")?;
            let mut payload = vec![0u8; length + 2];
            reader.read_exact(&mut payload)?;
            payload.truncate(length);
            return Ok(payload);
        }
    }
}

/// Publishes `total_bytes` of `message_bytes` messages to a JetStream stream
/// with file storage, each acknowledged once stored, and returns payload
/// bytes per second.
pub fn jetstream_publish(
    server: &NatsServer,
    total_bytes: u64,
    message_bytes: usize,
) -> anyhow::Result<f64> {
    let stream =
        TcpStream::connect(("127.0.0.1", server.port)).context("connecting to nats-server")?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let info = read_line(&mut reader)?;
    anyhow::ensure!(
        info.starts_with("INFO"),
        "unexpected greeting from nats-server: {info}"
    );
    writer.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\nSUB _INBOX.bench.> 1\r\n")?;
    let config = r#"{"name":"BENCH","subjects":["bench"],"storage":"file","retention":"limits"}"#;
    write!(
        writer,
        "PUB $JS.API.STREAM.CREATE.BENCH _INBOX.bench.create {}\r\n{config}\r\n",
        config.len()
    )?;
    let created = read_message(&mut reader, &mut writer)?;
    let created = String::from_utf8_lossy(&created);
    anyhow::ensure!(
        !created.contains("\"error\""),
        "creating the JetStream stream failed: {created}"
    );

    let messages = total_bytes / message_bytes as u64;
    let acknowledged = Arc::new(AtomicU64::new(0));
    let ack_reader = {
        let acknowledged = acknowledged.clone();
        let mut pong_writer = writer.try_clone()?;
        std::thread::spawn(move || -> anyhow::Result<()> {
            while acknowledged.load(Ordering::Acquire) < messages {
                let ack = read_message(&mut reader, &mut pong_writer)?;
                anyhow::ensure!(
                    !String::from_utf8_lossy(&ack).contains("\"error\""),
                    "JetStream refused a publish: {}",
                    String::from_utf8_lossy(&ack)
                );
                acknowledged.fetch_add(1, Ordering::Release);
            }
            Ok(())
        })
    };
    let payload = vec![b'x'; message_bytes];
    let started = Instant::now();
    let mut sent = 0u64;
    let mut chunk = Vec::with_capacity(1 << 20);
    while sent < messages {
        // Keep the window: wait while too many are unacknowledged.
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent - acknowledged.load(Ordering::Acquire) >= NATS_WINDOW_MESSAGES {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server stopped acknowledging"
            );
            std::thread::yield_now();
        }
        chunk.clear();
        while sent < messages
            && chunk.len() < (1 << 20)
            && sent - acknowledged.load(Ordering::Relaxed) < NATS_WINDOW_MESSAGES
        {
            write!(chunk, "PUB bench _INBOX.bench.a {message_bytes}\r\n")?;
            chunk.extend_from_slice(&payload);
            chunk.extend_from_slice(b"\r\n");
            sent += 1;
        }
        writer.write_all(&chunk)?;
    }
    ack_reader
        .join()
        .map_err(|_| anyhow::anyhow!("the NATS acknowledgement reader panicked"))??;
    let elapsed = started.elapsed();
    Ok((messages * message_bytes as u64) as f64 / elapsed.as_secs_f64())
}
