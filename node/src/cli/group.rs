//! `rill group list|describe|reset-offsets`: consumer groups' committed
//! offsets, how far behind they are, and moving them.

use std::collections::BTreeMap;

use anyhow::Context;

use super::format::{Align, table};
use crate::client::{Client, ClientError, ErrorCode, GroupInfo, OffsetSpec, TopicInfo};

/// Where `group reset-offsets` moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    Earliest,
    Latest,
    /// This offset, clamped to what the partition holds.
    Offset(i64),
    /// The first offset at or after this time (ms since the epoch); the end
    /// of the partition when nothing is that recent.
    Timestamp(i64),
}

/// A committed offset next to its partition's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOffset {
    pub topic: String,
    pub partition: u32,
    pub committed: i64,
    /// The partition's next offset; `None` when the topic or partition is gone.
    pub next_offset: Option<i64>,
}

impl GroupOffset {
    /// Records the group has yet to read.
    pub fn lag(&self) -> Option<i64> {
        self.next_offset
            .map(|next_offset| (next_offset - self.committed).max(0))
    }
}

pub fn format_group_list(groups: &[GroupInfo]) -> String {
    if groups.is_empty() {
        return "no consumer groups; `rill consume --group NAME` makes one\n".to_owned();
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|group| {
            let mut topics: Vec<&str> = group
                .offsets
                .iter()
                .map(|(topic, _, _)| topic.as_str())
                .collect();
            topics.sort_unstable();
            topics.dedup();
            vec![
                group.group.clone(),
                group.offsets.len().to_string(),
                topics.join(","),
            ]
        })
        .collect();
    table(
        &[
            ("GROUP", Align::Left),
            ("PARTITIONS", Align::Right),
            ("TOPICS", Align::Left),
        ],
        &rows,
    )
}

pub fn format_group_offsets(group: &str, offsets: &[GroupOffset]) -> String {
    if offsets.is_empty() {
        return format!("group {group} has no committed offsets\n");
    }
    let total_lag: i64 = offsets.iter().filter_map(GroupOffset::lag).sum();
    let rows: Vec<Vec<String>> = offsets
        .iter()
        .map(|offset| {
            let missing = || "-".to_owned();
            vec![
                offset.topic.clone(),
                offset.partition.to_string(),
                offset.committed.to_string(),
                offset
                    .next_offset
                    .map_or_else(missing, |next| next.to_string()),
                offset.lag().map_or_else(missing, |lag| lag.to_string()),
            ]
        })
        .collect();
    let mut text = format!("group {group}: total lag {total_lag}\n");
    text.push_str(&table(
        &[
            ("TOPIC", Align::Left),
            ("PARTITION", Align::Right),
            ("COMMITTED", Align::Right),
            ("NEXT OFFSET", Align::Right),
            ("LAG", Align::Right),
        ],
        &rows,
    ));
    text
}

/// Rows of (partition, old committed offset, new offset, clamped).
pub fn format_reset(group: &str, topic: &str, moves: &[(u32, Option<i64>, i64, bool)]) -> String {
    let rows: Vec<Vec<String>> = moves
        .iter()
        .map(|(partition, old, new, clamped)| {
            vec![
                partition.to_string(),
                old.map_or_else(|| "-".to_owned(), |old| old.to_string()),
                if *clamped {
                    format!("{new} (clamped)")
                } else {
                    new.to_string()
                },
            ]
        })
        .collect();
    let mut text = format!("reset group {group} on {topic}:\n");
    text.push_str(&table(
        &[
            ("PARTITION", Align::Right),
            ("OLD", Align::Right),
            ("NEW", Align::Right),
        ],
        &rows,
    ));
    text
}

pub async fn group_list(client: &Client) -> anyhow::Result<()> {
    let groups = client.list_groups().await.context("listing groups")?;
    print!("{}", format_group_list(&groups));
    Ok(())
}

/// The topic's metadata, or `None` when the broker no longer has it.
async fn topic_if_exists(client: &Client, topic: &str) -> anyhow::Result<Option<TopicInfo>> {
    match client.describe_topic(topic).await {
        Ok(found) => Ok(Some(found)),
        Err(ClientError::Broker {
            code: ErrorCode::UnknownTopic,
            ..
        }) => Ok(None),
        Err(error) => Err(error).with_context(|| format!("describing topic `{topic}`")),
    }
}

/// A group's committed offsets with each partition's end, for the lag.
pub(crate) async fn group_offsets(
    client: &Client,
    group: &str,
) -> anyhow::Result<Vec<GroupOffset>> {
    let groups = client.list_groups().await.context("listing groups")?;
    let Some(found) = groups.into_iter().find(|found| found.group == group) else {
        anyhow::bail!("no group `{group}`; see the groups with `rill group list`");
    };
    let mut topics: BTreeMap<String, Option<TopicInfo>> = BTreeMap::new();
    for (topic, _, _) in &found.offsets {
        if !topics.contains_key(topic) {
            let info = topic_if_exists(client, topic).await?;
            topics.insert(topic.clone(), info);
        }
    }
    let mut offsets: Vec<GroupOffset> = found
        .offsets
        .iter()
        .map(|(topic, partition, committed)| GroupOffset {
            topic: topic.clone(),
            partition: *partition,
            committed: *committed,
            next_offset: topics.get(topic).and_then(Option::as_ref).and_then(|info| {
                info.partitions
                    .iter()
                    .find(|candidate| candidate.partition == *partition)
                    .map(|candidate| candidate.next_offset)
            }),
        })
        .collect();
    offsets
        .sort_by(|left, right| (&left.topic, left.partition).cmp(&(&right.topic, right.partition)));
    Ok(offsets)
}

pub async fn group_describe(client: &Client, group: &str) -> anyhow::Result<()> {
    let offsets = group_offsets(client, group).await?;
    print!("{}", format_group_offsets(group, &offsets));
    Ok(())
}

/// Commits a new offset for every partition of `topic`; returns the moves
/// as (partition, old, new, clamped).
pub(crate) async fn reset_offsets(
    client: &Client,
    group: &str,
    topic: &str,
    to: ResetTo,
) -> anyhow::Result<Vec<(u32, Option<i64>, i64, bool)>> {
    let info = client
        .describe_topic(topic)
        .await
        .with_context(|| format!("describing topic `{topic}`"))?;
    let mut moves = Vec::new();
    for partition in &info.partitions {
        let (start, end) = (partition.log_start_offset, partition.next_offset);
        let wanted = match to {
            ResetTo::Earliest => start,
            ResetTo::Latest => end,
            ResetTo::Offset(offset) => offset,
            ResetTo::Timestamp(time_ms) => client
                .list_offsets(topic, partition.partition, OffsetSpec::Timestamp(time_ms))
                .await
                .with_context(|| format!("finding the offset at {time_ms} ms"))?
                .unwrap_or(end),
        };
        // An offset outside the log would only fail the group's next fetch.
        let new = wanted.clamp(start, end.max(start));
        let old = client
            .fetch_offset(group, topic, partition.partition)
            .await
            .context("reading the committed offset")?;
        client
            .commit_offset(group, topic, partition.partition, new)
            .await
            .context("committing the new offset")?;
        moves.push((partition.partition, old, new, new != wanted));
    }
    Ok(moves)
}

pub async fn group_reset_offsets(
    client: &Client,
    group: &str,
    topic: &str,
    to: ResetTo,
) -> anyhow::Result<()> {
    let moves = reset_offsets(client, group, topic, to).await?;
    print!("{}", format_reset(group, topic, &moves));
    Ok(())
}

#[cfg(test)]
mod tests {
    use rill_core::batch::RecordBuilder;

    use super::*;
    use crate::client::ClientConfig;
    use crate::client::fake_broker::{FakeBroker, run};

    fn batch(timestamp_ms: i64, count: usize) -> Vec<u8> {
        let mut builder = RecordBuilder::new();
        for _ in 0..count {
            builder.push(timestamp_ms, None, Some(b"v"), &[]);
        }
        builder.finish()
    }

    #[test]
    fn offsets_show_lag_and_a_missing_topic_as_dashes() {
        let offsets = [
            GroupOffset {
                topic: "sensors".into(),
                partition: 0,
                committed: 40,
                next_offset: Some(100),
            },
            GroupOffset {
                topic: "gone".into(),
                partition: 0,
                committed: 5,
                next_offset: None,
            },
        ];
        assert_eq!(
            format_group_offsets("dashboard", &offsets),
            "group dashboard: total lag 60\n\
             TOPIC    PARTITION  COMMITTED  NEXT OFFSET  LAG\n\
             sensors          0         40          100   60\n\
             gone             0          5            -    -\n"
        );
    }

    #[test]
    fn describe_computes_lag_against_the_partitions_end() {
        run(|| async {
            let broker = FakeBroker::start().await;
            {
                let mut state = broker.state.borrow_mut();
                state.create_topic("sensors", 2);
                state.append("sensors", 0, &batch(1, 10));
                state.append("sensors", 1, &batch(1, 4));
                state.set_committed("g", "sensors", 0, 3);
                state.set_committed("g", "sensors", 1, 4);
                state.set_committed("g", "gone", 0, 9);
            }
            let client = Client::connect(&broker.address, ClientConfig::default())
                .await
                .expect("connects");
            let offsets = group_offsets(&client, "g").await.expect("offsets");
            let lags: Vec<(String, u32, Option<i64>)> = offsets
                .iter()
                .map(|offset| (offset.topic.clone(), offset.partition, offset.lag()))
                .collect();
            assert_eq!(
                lags,
                [
                    ("gone".to_owned(), 0, None),
                    ("sensors".to_owned(), 0, Some(7)),
                    ("sensors".to_owned(), 1, Some(0)),
                ]
            );
            let missing = group_offsets(&client, "nobody")
                .await
                .expect_err("no group");
            assert!(missing.to_string().contains("rill group list"));
        });
    }

    #[test]
    fn reset_moves_every_partition_by_the_rule() {
        run(|| async {
            let broker = FakeBroker::start().await;
            {
                let mut state = broker.state.borrow_mut();
                state.create_topic("t", 2);
                state.append("t", 0, &batch(1_000, 5)); // offsets 0..5
                state.append("t", 0, &batch(2_000, 5)); // offsets 5..10
                state.append("t", 1, &batch(1_000, 2));
                state.set_committed("g", "t", 0, 7);
            }
            let client = Client::connect(&broker.address, ClientConfig::default())
                .await
                .expect("connects");
            let committed = |partition| broker.state.borrow().committed("g", "t", partition);

            let moves = reset_offsets(&client, "g", "t", ResetTo::Earliest)
                .await
                .expect("reset");
            assert_eq!(moves, [(0, Some(7), 0, false), (1, None, 0, false)]);

            reset_offsets(&client, "g", "t", ResetTo::Latest)
                .await
                .expect("reset");
            assert_eq!((committed(0), committed(1)), (Some(10), Some(2)));

            reset_offsets(&client, "g", "t", ResetTo::Timestamp(1_500))
                .await
                .expect("reset");
            assert_eq!((committed(0), committed(1)), (Some(5), Some(2)));

            let moves = reset_offsets(&client, "g", "t", ResetTo::Offset(8))
                .await
                .expect("reset");
            assert_eq!(moves[0], (0, Some(5), 8, false));
            assert_eq!(moves[1], (1, Some(2), 2, true));
            assert!(format_reset("g", "t", &moves).contains("2 (clamped)"));
        });
    }
}
