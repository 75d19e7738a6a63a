//! `rill consume`: prints a topic's records, from one partition or all.
//!
//! Each partition keeps one fetch in flight, so a busy partition is not held
//! up by a quiet one's long-poll. Without `--follow` each partition stops at
//! the end it had when the command started; with it, fetches wait up to a
//! second for new records and the command runs until `max_records` or an
//! error. With a group, the offset after each printed chunk is committed, so
//! the next run picks up where this one stopped.

use std::io::{self, Write};
use std::rc::Rc;

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;

use crate::client::{
    Client, ClientError, ConsumedRecord, ErrorCode, Fetched, OffsetSpec, records_of,
};

/// How long a following fetch waits for new records.
const FOLLOW_WAIT_MS: u32 = 1000;
/// Bytes asked for per fetch, at most.
const FETCH_BYTES_MAX: u32 = 1024 * 1024;
/// Room in a response frame for everything but the batches.
const FRAME_OVERHEAD_BYTES: u32 = 1024;

/// How records are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// The value (UTF-8, invalid bytes replaced), after `key<TAB>` when there is a key.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The arguments of `rill consume`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsumeOptions {
    /// One partition; `None` reads every partition.
    pub partition: Option<u32>,
    pub from_beginning: bool,
    pub offset: Option<i64>,
    pub group: Option<String>,
    pub follow: bool,
    pub max_records: Option<u64>,
    pub output: Output,
}

/// Where a partition's reading starts, before it is resolved to an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Offset(i64),
    Earliest,
    Latest,
}

/// The start rule: an explicit offset, else the group's committed offset,
/// else the earliest offset with `--from-beginning`, else the latest.
pub fn start_at(explicit: Option<i64>, committed: Option<i64>, from_beginning: bool) -> StartAt {
    match (explicit, committed) {
        (Some(offset), _) | (None, Some(offset)) => StartAt::Offset(offset),
        (None, None) if from_beginning => StartAt::Earliest,
        (None, None) => StartAt::Latest,
    }
}

async fn offset_of(
    client: &Client,
    topic: &str,
    partition: u32,
    at: OffsetSpec,
) -> anyhow::Result<i64> {
    let offset = client
        .list_offsets(topic, partition, at)
        .await
        .with_context(|| format!("finding the {at:?} offset of {topic}/{partition}"))?;
    // Earliest and latest always exist; an empty answer means an empty log.
    Ok(offset.unwrap_or(0))
}

/// The offset `rill consume` starts `partition` at, by [`start_at`].
pub async fn start_offset(
    client: &Client,
    topic: &str,
    partition: u32,
    options: &ConsumeOptions,
) -> anyhow::Result<i64> {
    let committed = match (&options.group, options.offset) {
        (Some(group), None) => client
            .fetch_offset(group, topic, partition)
            .await
            .with_context(|| format!("reading group `{group}`'s offset"))?,
        _ => None,
    };
    match start_at(options.offset, committed, options.from_beginning) {
        StartAt::Offset(offset) => Ok(offset),
        StartAt::Earliest => offset_of(client, topic, partition, OffsetSpec::Earliest).await,
        StartAt::Latest => offset_of(client, topic, partition, OffsetSpec::Latest).await,
    }
}

/// Bytes as text when they are UTF-8, else as hex with a flag saying so.
fn text_or_hex(bytes: &[u8]) -> (String, Option<&'static str>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), None),
        Err(_) => (
            bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
            Some("hex"),
        ),
    }
}

#[derive(Serialize)]
struct JsonHeader {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    topic: &'a str,
    partition: u32,
    offset: i64,
    timestamp: i64,
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
    headers: Vec<JsonHeader>,
}

/// `value`, or `key<TAB>value`; invalid UTF-8 is replaced, a null value is empty.
pub fn format_record_text(record: &ConsumedRecord) -> String {
    let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default());
    match &record.key {
        Some(key) => format!("{}\t{value}", String::from_utf8_lossy(key)),
        None => value.into_owned(),
    }
}

/// One JSON object: topic, partition, offset, timestamp (ms), key, value,
/// headers. Keys and values are strings when UTF-8; otherwise hex, with
/// `key_encoding` / `value_encoding` set to `"hex"`.
pub fn format_record_json(topic: &str, partition: u32, record: &ConsumedRecord) -> String {
    let split = |bytes: Option<&[u8]>| match bytes.map(text_or_hex) {
        Some((text, encoding)) => (Some(text), encoding),
        None => (None, None),
    };
    let (key, key_encoding) = split(record.key.as_deref());
    let (value, value_encoding) = split(record.value.as_deref());
    let headers = record
        .headers
        .iter()
        .map(|(header_key, header_value)| {
            let (key, key_encoding) = text_or_hex(header_key);
            let (value, value_encoding) = split(header_value.as_deref());
            JsonHeader {
                key,
                key_encoding,
                value,
                value_encoding,
            }
        })
        .collect();
    let json = JsonRecord {
        topic,
        partition,
        offset: record.offset,
        timestamp: record.timestamp_ms,
        key,
        key_encoding,
        value,
        value_encoding,
        headers,
    };
    // Strings, numbers and options only: serialising cannot fail.
    serde_json::to_string(&json).unwrap_or_default()
}

/// One partition's reading position.
struct Cursor {
    partition: u32,
    position: i64,
    /// Where to stop; `None` when following.
    end: Option<i64>,
    committed: Option<i64>,
}

async fn fetch_chunk(
    client: Client,
    topic: Rc<str>,
    partition: u32,
    offset: i64,
    max_bytes: u32,
    follow: bool,
) -> (u32, Result<Fetched, ClientError>) {
    let max_wait_ms = if follow { FOLLOW_WAIT_MS } else { 0 };
    let result = client
        .fetch(&topic, partition, offset, max_bytes, 1, max_wait_ms)
        .await;
    (partition, result)
}

/// Writes a line, treating a closed pipe (`rill consume | head`) as the reader
/// being done rather than as an error.
fn write_line(out: &mut dyn Write, line: &str) -> io::Result<bool> {
    match writeln!(out, "{line}") {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(error),
    }
}

/// The position to continue from after an out-of-range offset: the log
/// start when retention removed what we wanted, else the log end.
async fn recover_position(
    client: &Client,
    topic: &str,
    partition: u32,
    position: i64,
) -> anyhow::Result<i64> {
    let earliest = offset_of(client, topic, partition, OffsetSpec::Earliest).await?;
    let latest = offset_of(client, topic, partition, OffsetSpec::Latest).await?;
    let resumed = position.clamp(earliest, latest.max(earliest));
    if resumed != position {
        eprintln!(
            "partition {partition}: offset {position} is outside the log ({earliest}..{latest}); continuing from {resumed}"
        );
    }
    Ok(resumed)
}

/// [`consume`], printing to `out`. Returns the number of records printed.
pub async fn consume_into(
    client: &Client,
    topic: &str,
    options: &ConsumeOptions,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let limit = options.max_records.unwrap_or(u64::MAX);
    if limit == 0 {
        return Ok(0);
    }
    let partitions: Vec<u32> = match options.partition {
        Some(partition) => vec![partition],
        None => client
            .describe_topic(topic)
            .await
            .with_context(|| format!("finding the partitions of `{topic}`"))?
            .partitions
            .iter()
            .map(|partition| partition.partition)
            .collect(),
    };
    let max_bytes = FETCH_BYTES_MAX.min(
        client
            .config()
            .frame_bytes_max
            .saturating_sub(FRAME_OVERHEAD_BYTES)
            .max(1),
    );
    let shared_topic: Rc<str> = Rc::from(topic);
    let mut cursors = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    for partition in partitions {
        let position = start_offset(client, topic, partition, options).await?;
        let end = if options.follow {
            None
        } else {
            Some(offset_of(client, topic, partition, OffsetSpec::Latest).await?)
        };
        if end.is_none_or(|end| position < end) {
            in_flight.push(fetch_chunk(
                client.clone(),
                Rc::clone(&shared_topic),
                partition,
                position,
                max_bytes,
                options.follow,
            ));
        }
        cursors.push(Cursor {
            partition,
            position,
            end,
            committed: None,
        });
    }
    let mut printed: u64 = 0;
    while let Some((partition, result)) = in_flight.next().await {
        let Some(cursor) = cursors
            .iter_mut()
            .find(|cursor| cursor.partition == partition)
        else {
            continue;
        };
        let fetched = match result {
            Ok(fetched) => fetched,
            Err(ClientError::Broker {
                code: ErrorCode::OffsetOutOfRange,
                ..
            }) => {
                cursor.position =
                    recover_position(client, topic, partition, cursor.position).await?;
                if cursor.end.is_none_or(|end| cursor.position < end) {
                    in_flight.push(fetch_chunk(
                        client.clone(),
                        Rc::clone(&shared_topic),
                        partition,
                        cursor.position,
                        max_bytes,
                        options.follow,
                    ));
                }
                continue;
            }
            Err(error) => {
                return Err(error).with_context(|| format!("fetching {topic}/{partition}"));
            }
        };
        let records = records_of(&fetched.batches)
            .map_err(|problem| anyhow::anyhow!("reading {topic}/{partition}: {problem}"))?;
        let mut stopped = false;
        let mut advanced_to = cursor.position;
        for record in records
            .iter()
            .filter(|record| record.offset >= cursor.position)
        {
            if cursor.end.is_some_and(|end| record.offset >= end) {
                break;
            }
            let line = match options.output {
                Output::Text => format_record_text(record),
                Output::Json => format_record_json(topic, partition, record),
            };
            if !write_line(out, &line)? {
                return Ok(printed);
            }
            printed += 1;
            advanced_to = record.offset + 1;
            if printed >= limit {
                stopped = true;
                break;
            }
        }
        if !stopped {
            // Past everything returned, records filtered out or not.
            advanced_to = advanced_to.max(fetched.next_offset);
        }
        let progressed = advanced_to > cursor.position;
        cursor.position = cursor.position.max(advanced_to);
        match out.flush() {
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => return Ok(printed),
            other => other?,
        }
        if let Some(group) = &options.group
            && cursor.committed != Some(cursor.position)
            && progressed
        {
            client
                .commit_offset(group, topic, partition, cursor.position)
                .await
                .with_context(|| format!("committing group `{group}`'s offset"))?;
            cursor.committed = Some(cursor.position);
        }
        if stopped {
            break;
        }
        let reached_end = cursor.end.is_some_and(|end| cursor.position >= end);
        // Without --follow an empty answer means nothing more is there now.
        let exhausted = !options.follow && !progressed;
        if !reached_end && !exhausted {
            in_flight.push(fetch_chunk(
                client.clone(),
                Rc::clone(&shared_topic),
                partition,
                cursor.position,
                max_bytes,
                options.follow,
            ));
        }
    }
    Ok(printed)
}

/// `rill consume`: prints records to stdout, one per line.
pub async fn consume(client: &Client, topic: &str, options: ConsumeOptions) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    consume_into(client, topic, &options, &mut out).await?;
    match out.flush() {
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use rill_core::batch::RecordBuilder;

    use super::*;
    use crate::client::ClientConfig;
    use crate::client::fake_broker::{FakeBroker, run};

    fn batch(values: &[&str]) -> Vec<u8> {
        let mut builder = RecordBuilder::new();
        for value in values {
            builder.push(1_000, None, Some(value.as_bytes()), &[]);
        }
        builder.finish()
    }

    /// A broker with topic `t`: partition 0 holds a..e (offsets 0..5) in two
    /// batches, partition 1 holds x, y.
    async fn broker_with_records() -> (FakeBroker, Client) {
        let broker = FakeBroker::start().await;
        {
            let mut state = broker.state.borrow_mut();
            state.create_topic("t", 2);
            state.append("t", 0, &batch(&["a", "b", "c"]));
            state.append("t", 0, &batch(&["d", "e"]));
            state.append("t", 1, &batch(&["x", "y"]));
        }
        let client = Client::connect(&broker.address, ClientConfig::default())
            .await
            .expect("connects");
        (broker, client)
    }

    async fn consumed(client: &Client, options: &ConsumeOptions) -> String {
        let mut out = Vec::new();
        consume_into(client, "t", options, &mut out)
            .await
            .expect("consumed");
        String::from_utf8(out).expect("text")
    }

    #[test]
    fn start_rule_prefers_explicit_then_committed_then_beginning() {
        assert_eq!(start_at(Some(5), Some(9), true), StartAt::Offset(5));
        assert_eq!(start_at(None, Some(9), true), StartAt::Offset(9));
        assert_eq!(start_at(None, None, true), StartAt::Earliest);
        assert_eq!(start_at(None, None, false), StartAt::Latest);
    }

    #[test]
    fn start_offsets_resolve_against_the_broker() {
        run(|| async {
            let (broker, client) = broker_with_records().await;
            broker.state.borrow_mut().trim("t", 0, 3);
            broker.state.borrow_mut().set_committed("g", "t", 0, 4);
            let options = |offset, group: Option<&str>, from_beginning| ConsumeOptions {
                offset,
                group: group.map(str::to_owned),
                from_beginning,
                ..ConsumeOptions::default()
            };
            let start = |options| {
                let client = client.clone();
                async move {
                    start_offset(&client, "t", 0, &options)
                        .await
                        .expect("start")
                }
            };
            assert_eq!(start(options(Some(1), Some("g"), true)).await, 1);
            assert_eq!(start(options(None, Some("g"), false)).await, 4);
            assert_eq!(start(options(None, Some("new-group"), true)).await, 3);
            assert_eq!(start(options(None, None, true)).await, 3);
            assert_eq!(start(options(None, None, false)).await, 5);
        });
    }

    #[test]
    fn from_beginning_reads_every_partition_to_its_end() {
        run(|| async {
            let (_broker, client) = broker_with_records().await;
            let options = ConsumeOptions {
                from_beginning: true,
                ..ConsumeOptions::default()
            };
            let text = consumed(&client, &options).await;
            let mut lines: Vec<&str> = text.lines().collect();
            lines.sort_unstable();
            assert_eq!(lines, ["a", "b", "c", "d", "e", "x", "y"]);
            // Without --from-beginning a new reader starts at the end: nothing.
            assert_eq!(consumed(&client, &ConsumeOptions::default()).await, "");
        });
    }

    #[test]
    fn an_offset_inside_a_batch_skips_the_records_before_it() {
        run(|| async {
            let (broker, client) = broker_with_records().await;
            let options = ConsumeOptions {
                partition: Some(0),
                offset: Some(1),
                max_records: Some(3),
                ..ConsumeOptions::default()
            };
            assert_eq!(consumed(&client, &options).await, "b\nc\nd\n");
            let fetched_from: Vec<i64> = broker
                .state
                .borrow()
                .fetches
                .iter()
                .map(|fetch| fetch.1)
                .collect();
            assert_eq!(fetched_from[0], 1);
        });
    }

    #[test]
    fn a_group_commits_and_the_next_run_continues_from_there() {
        run(|| async {
            let (broker, client) = broker_with_records().await;
            let options = ConsumeOptions {
                partition: Some(0),
                from_beginning: true,
                group: Some("g".into()),
                max_records: Some(2),
                ..ConsumeOptions::default()
            };
            assert_eq!(consumed(&client, &options).await, "a\nb\n");
            assert_eq!(broker.state.borrow().committed("g", "t", 0), Some(2));
            let rest = ConsumeOptions {
                max_records: None,
                ..options
            };
            assert_eq!(consumed(&client, &rest).await, "c\nd\ne\n");
            assert_eq!(broker.state.borrow().committed("g", "t", 0), Some(5));
        });
    }

    #[test]
    fn a_committed_offset_removed_by_retention_resumes_at_the_log_start() {
        run(|| async {
            let (broker, client) = broker_with_records().await;
            {
                let mut state = broker.state.borrow_mut();
                state.trim("t", 0, 3);
                state.set_committed("g", "t", 0, 1);
            }
            let options = ConsumeOptions {
                partition: Some(0),
                group: Some("g".into()),
                ..ConsumeOptions::default()
            };
            assert_eq!(consumed(&client, &options).await, "d\ne\n");
        });
    }

    #[test]
    fn follow_long_polls_and_stops_at_max_records() {
        run(|| async {
            let (broker, client) = broker_with_records().await;
            let options = ConsumeOptions {
                partition: Some(1),
                from_beginning: true,
                follow: true,
                max_records: Some(2),
                ..ConsumeOptions::default()
            };
            assert_eq!(consumed(&client, &options).await, "x\ny\n");
            let waits: Vec<u32> = broker
                .state
                .borrow()
                .fetches
                .iter()
                .map(|fetch| fetch.2)
                .collect();
            assert_eq!(waits, [FOLLOW_WAIT_MS]);
        });
    }

    #[test]
    fn records_print_as_text_or_json() {
        let record = ConsumedRecord {
            offset: 42,
            timestamp_ms: 1_700_000_000_000,
            key: Some(b"dev-1".to_vec()),
            value: Some(vec![0xff, 0x00]),
            headers: vec![
                (b"unit".to_vec(), Some(b"C".to_vec())),
                (b"n".to_vec(), None),
            ],
        };
        assert_eq!(format_record_text(&record), "dev-1\t\u{fffd}\u{0}");
        assert_eq!(
            format_record_json("sensors", 3, &record),
            r#"{"topic":"sensors","partition":3,"offset":42,"timestamp":1700000000000,"key":"dev-1","value":"ff00","value_encoding":"hex","headers":[{"key":"unit","value":"C"},{"key":"n","value":null}]}"#
        );
        let bare = ConsumedRecord {
            key: None,
            value: Some(b"21.5".to_vec()),
            headers: Vec::new(),
            ..record
        };
        assert_eq!(format_record_text(&bare), "21.5");
        assert_eq!(
            format_record_json("t", 0, &bare),
            r#"{"topic":"t","partition":0,"offset":42,"timestamp":1700000000000,"key":null,"value":"21.5","headers":[]}"#
        );
    }
}
