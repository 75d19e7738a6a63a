//! `rill mirror status`: each destination of the replicator, its state,
//! last error and per-partition lag, read from the admin listener's
//! `/mirror` (JSON) endpoint.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;

use super::format::format_bytes;
use crate::mirror::DestinationStatus;

/// The largest `/mirror` answer read.
const RESPONSE_BYTES_MAX: u64 = 64 << 20;

/// Fetches `/mirror` from the admin listener at `admin` (plain HTTP).
pub fn fetch_mirror_status(admin: &str) -> anyhow::Result<String> {
    let address = admin
        .to_socket_addrs()
        .with_context(|| format!("resolving {admin}"))?
        .next()
        .with_context(|| format!("{admin} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .with_context(|| format!("connecting to the admin listener at {admin}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /mirror HTTP/1.1\r\nHost: rill\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .take(RESPONSE_BYTES_MAX)
        .read_to_string(&mut response)
        .context("reading the admin listener's answer")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the admin listener's answer has no body")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "the admin listener answered {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(body.to_string())
}

/// The status as a table per destination.
pub fn format_mirror_status(json: &str) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Page {
        destinations: Vec<DestinationStatus>,
        evicted_unmirrored_records: u64,
    }
    let page: Page = serde_json::from_str(json).context("decoding /mirror")?;
    if page.destinations.is_empty() {
        return Ok("the replicator is off (no mirror.destinations)\n".into());
    }
    let mut out = String::new();
    for destination in &page.destinations {
        out.push_str(&format!(
            "destination {} ({}): {}\n",
            destination.name,
            destination.bootstrap_servers.join(","),
            destination.state
        ));
        if let Some(error) = &destination.last_error {
            out.push_str(&format!("  last error: {error}\n"));
        }
        out.push_str(&format!(
            "  sent: {} records, {} in {} batches; {} connection failures, {} session resets, {} truncated partitions\n",
            destination.records_sent,
            format_bytes(destination.bytes_sent),
            destination.batches_sent,
            destination.connection_failures,
            destination.session_resets,
            destination.truncated_partitions,
        ));
        out.push_str(&format!(
            "  {:<30} {:>9} {:>12} {:>12} {:>12} {:>10} {:>8}\n",
            "TOPIC/PARTITION", "", "FRONTIER", "END", "LAG", "LAG BYTES", "LAG S"
        ));
        for partition in &destination.partitions {
            out.push_str(&format!(
                "  {:<30} {:>9} {:>12} {:>12} {:>12} {:>10} {:>8}\n",
                format!("{}/{}", partition.topic, partition.partition),
                if partition.stopped { "STOPPED" } else { "" },
                partition.frontier,
                partition.end,
                partition.lag_records,
                format_bytes(partition.lag_bytes),
                partition.lag_seconds,
            ));
        }
    }
    if page.evicted_unmirrored_records > 0 {
        out.push_str(&format!(
            "records deleted before they were mirrored: {}\n",
            page.evicted_unmirrored_records
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::PartitionLag;

    #[test]
    fn status_reads_as_a_table_per_destination() {
        let destinations = vec![DestinationStatus {
            name: "central".into(),
            bootstrap_servers: vec!["127.0.0.1:9092".into()],
            state: "mirroring".into(),
            last_error: Some("connecting to 127.0.0.1:9092: refused".into()),
            records_sent: 10,
            bytes_sent: 2048,
            batches_sent: 2,
            partitions: vec![PartitionLag {
                topic: "gps".into(),
                partition: 0,
                destination_topic: "edge.gps".into(),
                frontier: 10,
                end: 15,
                lag_records: 5,
                lag_bytes: 500,
                lag_seconds: 3,
                stopped: false,
            }],
            ..DestinationStatus::default()
        }];
        let json = serde_json::json!({
            "destinations": destinations,
            "evicted_unmirrored_records": 0,
        })
        .to_string();
        let text = format_mirror_status(&json).expect("formats");
        assert!(
            text.starts_with("destination central (127.0.0.1:9092): mirroring\n"),
            "{text}"
        );
        assert!(text.contains("last error: connecting"), "{text}");
        assert!(text.contains("gps/0"), "{text}");
        assert!(
            format_mirror_status("{\"destinations\":[],\"evicted_unmirrored_records\":0}")
                .expect("off")
                .contains("off")
        );
        assert!(format_mirror_status("not json").is_err());
    }
}
