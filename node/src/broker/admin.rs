//! The admin HTTP listener: `/metrics` (Prometheus text format), `/health`
//! (the process is up) and `/ready` (every shard has opened its partitions and
//! the broker is not shutting down). It runs on a small thread of its own,
//! off the shards, and answers one short request per connection.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::Shared;
use super::metrics::ProcessFacts;

/// A byte stream: plain TCP or TLS over it.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Largest request head the admin listener reads.
const REQUEST_BYTES_MAX: usize = 8 * 1024;

pub fn spawn(listener: TcpListener, shared: Arc<Shared>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("rill-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else {
                    continue;
                };
                let result = stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(2))))
                    .and_then(|()| match &shared.tls {
                        Some(config) => {
                            let session = rustls::ServerConnection::new(config.clone())
                                .map_err(std::io::Error::other)?;
                            let mut tls = rustls::StreamOwned::new(session, stream);
                            answer(&mut tls, &shared)?;
                            tls.conn.send_close_notify();
                            tls.flush()
                        }
                        None => {
                            let mut stream = stream;
                            answer(&mut stream, &shared)
                        }
                    });
                if let Err(error) = result {
                    tracing::debug!(%error, "admin request failed");
                }
            }
        })
        .context("starting the admin thread")?;
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn disk_free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into the zeroed struct we pass.
    unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut stats) == 0)
            .then(|| stats.f_bavail as u64 * stats.f_frsize as u64)
    }
}

fn answer(stream: &mut impl ReadWrite, shared: &Shared) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < REQUEST_BYTES_MAX {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            let facts = ProcessFacts {
                io_driver: &shared.driver.driver.to_string(),
                connections: shared.connections_open(),
                disk_used_bytes: shared.usage.bytes(),
                disk_quota_bytes: shared.config.storage.disk_quota_bytes,
                disk_free_bytes: disk_free_bytes(&shared.config.data_dir),
                buffer_bytes: shared.buffers.used(),
                buffer_bytes_max: shared.config.limits.buffer_memory_bytes_max,
            };
            let mut page = shared.metrics.render(&shared.published_stats(), &facts);
            shared.mqtt.render_metrics(&mut page);
            shared.mirror.render_metrics(&mut page);
            ("200 OK", "text/plain; version=0.0.4", page)
        }
        ("GET", "/mirror") => ("200 OK", "application/json", shared.mirror.render_json()),
        ("GET", "/health") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/ready") if shared.is_ready() => ("200 OK", "text/plain", "ready\n".to_string()),
        ("GET", "/ready") if shared.is_shutting_down() => (
            "503 Service Unavailable",
            "text/plain",
            "shutting down\n".to_string(),
        ),
        ("GET", "/ready") => (
            "503 Service Unavailable",
            "text/plain",
            "starting\n".to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /mirror, /health or /ready\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}
