//! `rill status`: what the broker runs on and holds, in a few lines.

use std::time::Duration;

use anyhow::Context;

use super::format::{format_bytes, format_duration};
use crate::client::{Client, StatusInfo};

pub fn format_status(status: &StatusInfo) -> String {
    let data = match status.disk_quota_bytes {
        Some(quota) if quota > 0 => format!(
            "{} of a {} quota ({:.0}%)",
            format_bytes(status.data_bytes),
            format_bytes(quota),
            status.data_bytes as f64 * 100.0 / quota as f64
        ),
        _ => format!("{} (no disk quota)", format_bytes(status.data_bytes)),
    };
    let rows = [
        ("version", status.version.clone()),
        (
            "io driver",
            format!("{} ({})", status.io_driver, status.io_driver_reason),
        ),
        ("shards", status.shards.to_string()),
        ("profile", status.profile.clone()),
        (
            "topics",
            format!("{} ({} partitions)", status.topics, status.partitions),
        ),
        ("connections", status.connections.to_string()),
        ("data", data),
        (
            "uptime",
            format_duration(Duration::from_millis(status.uptime_ms)),
        ),
    ];
    rows.iter()
        .map(|(name, value)| format!("{name:<12} {value}\n"))
        .collect()
}

pub async fn status(client: &Client) -> anyhow::Result<()> {
    let status = client
        .status()
        .await
        .context("asking the broker for its status")?;
    print!("{}", format_status(&status));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_as_name_value_lines() {
        let status = StatusInfo {
            version: "0.1.0".into(),
            io_driver: "io-uring".into(),
            io_driver_reason: "io_uring available".into(),
            shards: 2,
            profile: "pi4".into(),
            topics: 3,
            partitions: 7,
            connections: 4,
            data_bytes: 512 * 1024 * 1024,
            disk_quota_bytes: Some(2 * 1024 * 1024 * 1024),
            uptime_ms: 3_725_000,
        };
        assert_eq!(
            format_status(&status),
            "version      0.1.0\n\
             io driver    io-uring (io_uring available)\n\
             shards       2\n\
             profile      pi4\n\
             topics       3 (7 partitions)\n\
             connections  4\n\
             data         512.0 MiB of a 2.0 GiB quota (25%)\n\
             uptime       1h 2m 5s\n"
        );
    }
}
