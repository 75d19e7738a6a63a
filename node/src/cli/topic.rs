//! `rill topic create|list|describe|alter|delete`: topic administration.

use anyhow::Context;

use super::format::{Align, table};
use crate::client::{Client, PartitionInfo, TopicInfo};

fn records_in(partition: &PartitionInfo) -> i64 {
    (partition.next_offset - partition.log_start_offset).max(0)
}

/// One line per topic: partitions, records held and bytes on disk.
pub fn format_topic_list(topics: &[TopicInfo]) -> String {
    if topics.is_empty() {
        return "no topics; create one with `rill topic create NAME`\n".to_owned();
    }
    let rows: Vec<Vec<String>> = topics
        .iter()
        .map(|topic| {
            let records: i64 = topic.partitions.iter().map(records_in).sum();
            let bytes: u64 = topic
                .partitions
                .iter()
                .map(|partition| partition.size_bytes)
                .sum();
            vec![
                topic.name.clone(),
                topic.partitions.len().to_string(),
                records.to_string(),
                bytes.to_string(),
            ]
        })
        .collect();
    table(
        &[
            ("TOPIC", Align::Left),
            ("PARTITIONS", Align::Right),
            ("RECORDS", Align::Right),
            ("BYTES", Align::Right),
        ],
        &rows,
    )
}

/// A topic's partitions (offsets, size, shard) and its settings.
pub fn format_topic_describe(topic: &TopicInfo) -> String {
    let records: i64 = topic.partitions.iter().map(records_in).sum();
    let bytes: u64 = topic
        .partitions
        .iter()
        .map(|partition| partition.size_bytes)
        .sum();
    let mut text = format!(
        "topic {}: {} partitions, {records} records, {bytes} bytes\n",
        topic.name,
        topic.partitions.len()
    );
    let rows: Vec<Vec<String>> = topic
        .partitions
        .iter()
        .map(|partition| {
            vec![
                partition.partition.to_string(),
                partition.log_start_offset.to_string(),
                partition.next_offset.to_string(),
                records_in(partition).to_string(),
                partition.size_bytes.to_string(),
                partition.shard.to_string(),
            ]
        })
        .collect();
    text.push_str(&table(
        &[
            ("PARTITION", Align::Right),
            ("LOG START", Align::Right),
            ("NEXT OFFSET", Align::Right),
            ("RECORDS", Align::Right),
            ("BYTES", Align::Right),
            ("SHARD", Align::Right),
        ],
        &rows,
    ));
    let settings: Vec<&str> = topic
        .settings
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    if settings.is_empty() {
        text.push_str("settings: the broker's defaults\n");
    } else {
        text.push_str("settings:\n");
        for line in settings {
            text.push_str("  ");
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

pub async fn topic_create(
    client: &Client,
    name: &str,
    partitions: u32,
    settings: &[(String, String)],
) -> anyhow::Result<()> {
    client
        .create_topic(name, partitions, settings)
        .await
        .with_context(|| format!("creating topic `{name}`"))?;
    println!("created topic {name} with {partitions} partitions");
    Ok(())
}

pub async fn topic_list(client: &Client) -> anyhow::Result<()> {
    let topics = client.metadata(None).await.context("listing topics")?;
    print!("{}", format_topic_list(&topics));
    Ok(())
}

pub async fn topic_describe(client: &Client, name: &str) -> anyhow::Result<()> {
    let topic = client
        .describe_topic(name)
        .await
        .with_context(|| format!("describing topic `{name}`"))?;
    print!("{}", format_topic_describe(&topic));
    Ok(())
}

/// Changes settings and, when `partitions` is larger, adds partitions.
pub async fn topic_alter(
    client: &Client,
    name: &str,
    partitions: Option<u32>,
    settings: &[(String, String)],
) -> anyhow::Result<()> {
    client
        .alter_topic(name, partitions, settings)
        .await
        .with_context(|| format!("altering topic `{name}`"))?;
    let mut changes = Vec::new();
    if let Some(partitions) = partitions {
        changes.push(format!("{partitions} partitions"));
    }
    changes.extend(settings.iter().map(|(key, value)| format!("{key}={value}")));
    if changes.is_empty() {
        println!("altered topic {name}: nothing to change");
    } else {
        println!("altered topic {name}: {}", changes.join(", "));
    }
    Ok(())
}

pub async fn topic_delete(client: &Client, name: &str) -> anyhow::Result<()> {
    client
        .delete_topic(name)
        .await
        .with_context(|| format!("deleting topic `{name}`"))?;
    println!("deleted topic {name}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> TopicInfo {
        TopicInfo {
            name: "sensors".into(),
            partitions: vec![
                PartitionInfo {
                    partition: 0,
                    shard: 0,
                    log_start_offset: 0,
                    next_offset: 1_000,
                    size_bytes: 65_536,
                },
                PartitionInfo {
                    partition: 1,
                    shard: 1,
                    log_start_offset: 20,
                    next_offset: 30,
                    size_bytes: 700,
                },
            ],
            settings: "retention_ms=60000\nfsync=always\n".into(),
        }
    }

    #[test]
    fn list_sums_records_and_bytes_per_topic() {
        assert_eq!(
            format_topic_list(&[topic()]),
            "TOPIC    PARTITIONS  RECORDS  BYTES\n\
             sensors           2     1010  66236\n"
        );
        assert!(format_topic_list(&[]).starts_with("no topics"));
    }

    #[test]
    fn describe_shows_partitions_and_settings() {
        assert_eq!(
            format_topic_describe(&topic()),
            "topic sensors: 2 partitions, 1010 records, 66236 bytes\n\
             PARTITION  LOG START  NEXT OFFSET  RECORDS  BYTES  SHARD\n\
             \x20       0          0         1000     1000  65536      0\n\
             \x20       1         20           30       10    700      1\n\
             settings:\n  retention_ms=60000\n  fsync=always\n"
        );
    }
}
