//! `rill produce`: one record per input line, from stdin or files.
//!
//! Lines are read on a blocking thread (stdin may be a terminal or a slow
//! pipe, and reading it must not stall the connection's tasks), gathered into
//! batches, and produced with several batches in flight at once; the client
//! sends them in order, so the records land in input order. A batch is sent as
//! soon as the input has nothing more buffered, so a slow live source is not
//! held back waiting for a full batch.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rill_core::batch::RecordBuilder;

use crate::client::{Acks, Client, PendingProduce, Target};

/// Produces kept in flight before waiting for the oldest.
const PRODUCES_IN_FLIGHT_MAX: usize = 8;
/// The batch size aimed at when lines are small and plenty.
const BATCH_BYTES_TARGET: usize = 1024 * 1024;
/// Room in a request frame for everything but the batch.
const FRAME_OVERHEAD_BYTES: usize = 1024;
/// Bytes read from the input at a time.
const INPUT_BUFFER_BYTES: usize = 256 * 1024;
/// How often a long run reports progress on stderr.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The arguments of `rill produce`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceOptions {
    /// A key for every record; records then go to the key's partition.
    pub key: Option<String>,
    /// A fixed partition; wins over the key's.
    pub partition: Option<u32>,
    pub acks: Acks,
    /// Files to read, one record per line; empty reads stdin.
    pub files: Vec<PathBuf>,
    pub batch_records_max: usize,
}

impl Default for ProduceOptions {
    fn default() -> Self {
        Self {
            key: None,
            partition: None,
            acks: Acks::Durable,
            files: Vec::new(),
            batch_records_max: 500,
        }
    }
}

/// What a produce run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceReport {
    pub records: u64,
    pub batches: u64,
}

pub fn format_produce_summary(records: u64, topic: &str, elapsed: Duration) -> String {
    format!(
        "produced {records} records to {topic} in {:.2} s",
        elapsed.as_secs_f64()
    )
}

pub fn format_produce_progress(records: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        records as f64 / seconds
    } else {
        0.0
    };
    format!("produced {records} records so far ({rate:.0} records/s)")
}

type LineReader = BufReader<Box<dyn Read + Send>>;

/// Reads up to `lines_max` lines, stopping early once the reader has nothing
/// buffered (more input would block). Returns the lines, without their line
/// ends, and whether the input ended.
fn read_lines<R: Read>(
    reader: &mut BufReader<R>,
    lines_max: usize,
) -> io::Result<(Vec<Vec<u8>>, bool)> {
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok((lines, true));
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        lines.push(line);
        if lines.len() >= lines_max || reader.buffer().is_empty() {
            return Ok((lines, false));
        }
    }
}

/// `read_lines` on a blocking thread; gives the reader back with the lines.
async fn read_chunk(
    mut reader: LineReader,
    lines_max: usize,
) -> anyhow::Result<(LineReader, Vec<Vec<u8>>, bool)> {
    let (reader, result) = compio::runtime::spawn_blocking(move || {
        let result = read_lines(&mut reader, lines_max);
        (reader, result)
    })
    .await
    .map_err(|_| anyhow::anyhow!("the thread reading the input stopped"))?;
    let (lines, ended) = result?;
    Ok((reader, lines, ended))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// The produces in flight, and what has been acknowledged.
struct Pipeline<'a> {
    client: &'a Client,
    topic: &'a str,
    target: Target<'a>,
    acks: Acks,
    in_flight: VecDeque<(PendingProduce, u64)>,
    report: ProduceReport,
    started: Instant,
    last_progress: Instant,
    progress: &'a mut dyn FnMut(u64, Duration),
}

impl Pipeline<'_> {
    async fn send(&mut self, batch: &[u8], records: u64) -> anyhow::Result<()> {
        while self.in_flight.len() >= PRODUCES_IN_FLIGHT_MAX {
            self.complete_oldest().await?;
        }
        let pending = self
            .client
            .start_produce(self.topic, self.target, self.acks, batch)
            .with_context(|| format!("producing to `{}`", self.topic))?;
        self.in_flight.push_back((pending, records));
        Ok(())
    }

    async fn complete_oldest(&mut self) -> anyhow::Result<()> {
        let Some((pending, records)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        pending
            .wait()
            .await
            .with_context(|| format!("producing to `{}`", self.topic))?;
        self.report.records += records;
        self.report.batches += 1;
        if self.last_progress.elapsed() >= PROGRESS_INTERVAL {
            self.last_progress = Instant::now();
            (self.progress)(self.report.records, self.started.elapsed());
        }
        Ok(())
    }
}

/// Produces every line of `inputs` (in order) to `topic`. `progress` is
/// called about once a second with the records acknowledged so far.
pub async fn produce_lines(
    client: &Client,
    topic: &str,
    options: &ProduceOptions,
    inputs: Vec<Box<dyn Read + Send>>,
    progress: &mut dyn FnMut(u64, Duration),
) -> anyhow::Result<ProduceReport> {
    let records_max = options.batch_records_max.max(1);
    let broker_limit = client.broker_frame_bytes_max() as usize;
    let batch_bytes_max = if broker_limit == 0 {
        BATCH_BYTES_TARGET
    } else {
        BATCH_BYTES_TARGET.min(broker_limit.saturating_sub(FRAME_OVERHEAD_BYTES + topic.len()))
    };
    let key = options.key.as_deref().map(str::as_bytes);
    let target = match (options.partition, key) {
        (Some(partition), _) => Target::Partition(partition),
        (None, Some(key)) => Target::Key(key),
        (None, None) => Target::Any,
    };
    let started = Instant::now();
    let mut pipeline = Pipeline {
        client,
        topic,
        target,
        acks: options.acks,
        in_flight: VecDeque::new(),
        report: ProduceReport {
            records: 0,
            batches: 0,
        },
        started,
        last_progress: started,
        progress,
    };
    let mut builder = RecordBuilder::new();
    for input in inputs {
        let mut reader: LineReader = BufReader::with_capacity(INPUT_BUFFER_BYTES, input);
        loop {
            let (returned, lines, ended) = read_chunk(reader, records_max).await?;
            reader = returned;
            let timestamp_ms = now_ms();
            for line in &lines {
                let count = builder.record_count() as usize;
                // Room for the record's own framing (lengths, deltas) too.
                let record_bytes = line.len() + key.map_or(0, <[u8]>::len) + 32;
                if count > 0
                    && (count >= records_max
                        || builder.encoded_bytes() + record_bytes > batch_bytes_max)
                {
                    pipeline.send(&builder.finish(), count as u64).await?;
                }
                builder.push(timestamp_ms, key, Some(line), &[]);
            }
            // Send what the input had; a live source should not wait for a full batch.
            let count = builder.record_count();
            if count > 0 {
                pipeline.send(&builder.finish(), count as u64).await?;
            }
            if ended {
                break;
            }
        }
    }
    while !pipeline.in_flight.is_empty() {
        pipeline.complete_oldest().await?;
    }
    Ok(pipeline.report)
}

/// `rill produce`: reads stdin or `options.files` and produces each line.
pub async fn produce(client: &Client, topic: &str, options: ProduceOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut inputs: Vec<Box<dyn Read + Send>> = Vec::new();
    // Open every file first, so a typo fails before anything is produced.
    for path in &options.files {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        inputs.push(Box::new(file));
    }
    if inputs.is_empty() {
        inputs.push(Box::new(io::stdin()));
    }
    let mut progress =
        |records, elapsed| eprintln!("{}", format_produce_progress(records, elapsed));
    let report = produce_lines(client, topic, &options, inputs, &mut progress).await?;
    println!(
        "{}",
        format_produce_summary(report.records, topic, started.elapsed())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::client::fake_broker::{FakeBroker, run};
    use crate::client::{ClientConfig, records_of};

    #[test]
    fn lines_lose_their_line_ends_and_chunks_stop_at_the_limit() {
        let mut reader = BufReader::new(Cursor::new(b"a\r\nb\n\nc".to_vec()));
        let (lines, ended) = read_lines(&mut reader, 2).expect("read");
        assert_eq!((lines, ended), (vec![b"a".to_vec(), b"b".to_vec()], false));
        let (lines, ended) = read_lines(&mut reader, 10).expect("read");
        assert_eq!(lines, vec![b"".to_vec(), b"c".to_vec()]);
        assert!(!ended, "stopped because nothing more was buffered");
        let (lines, ended) = read_lines(&mut reader, 10).expect("read");
        assert_eq!((lines.len(), ended), (0, true));
    }

    #[test]
    fn summary_and_progress_lines() {
        assert_eq!(
            format_produce_summary(1000, "sensors", Duration::from_millis(120)),
            "produced 1000 records to sensors in 0.12 s"
        );
        assert_eq!(
            format_produce_progress(5000, Duration::from_secs(2)),
            "produced 5000 records so far (2500 records/s)"
        );
    }

    #[test]
    fn every_line_of_every_input_lands_in_order_in_batches() {
        run(|| async {
            let broker = FakeBroker::start().await;
            broker.state.borrow_mut().create_topic("t", 3);
            let client = Client::connect(&broker.address, ClientConfig::default())
                .await
                .expect("connects");
            let lines: String = (0..25).map(|index| format!("line {index}\n")).collect();
            let inputs: Vec<Box<dyn Read + Send>> = vec![
                Box::new(Cursor::new(lines.into_bytes())),
                Box::new(Cursor::new(b"last without newline".to_vec())),
            ];
            let options = ProduceOptions {
                key: Some("device-7".into()),
                batch_records_max: 10,
                ..ProduceOptions::default()
            };
            let mut progress_calls = 0;
            let mut progress = |_, _| progress_calls += 1;
            let report = produce_lines(&client, "t", &options, inputs, &mut progress)
                .await
                .expect("produced");
            assert_eq!(report.records, 26);
            assert!(report.batches >= 3, "{report:?}");

            let partition = rill_protocol::partitioner::partition_for_key(b"device-7", 3);
            let fetched = client
                .fetch("t", partition, 0, 1 << 20, 1, 0)
                .await
                .expect("fetch");
            let records = records_of(&fetched.batches).expect("valid");
            let values: Vec<String> = records
                .iter()
                .map(|record| {
                    String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
                        .into_owned()
                })
                .collect();
            let mut expected: Vec<String> = (0..25).map(|index| format!("line {index}")).collect();
            expected.push("last without newline".into());
            assert_eq!(values, expected);
            assert!(
                records
                    .iter()
                    .all(|record| record.key.as_deref() == Some(&b"device-7"[..]))
            );
            let offsets: Vec<i64> = records.iter().map(|record| record.offset).collect();
            assert_eq!(offsets, (0..26).collect::<Vec<i64>>());
        });
    }

    #[test]
    fn a_fixed_partition_wins_over_the_key_and_acks_none_still_counts() {
        run(|| async {
            let broker = FakeBroker::start().await;
            broker.state.borrow_mut().create_topic("t", 3);
            let client = Client::connect(&broker.address, ClientConfig::default())
                .await
                .expect("connects");
            let options = ProduceOptions {
                key: Some("device-7".into()),
                partition: Some(2),
                acks: Acks::None,
                ..ProduceOptions::default()
            };
            let inputs: Vec<Box<dyn Read + Send>> = vec![Box::new(Cursor::new(b"x\ny\n".to_vec()))];
            let report = produce_lines(&client, "t", &options, inputs, &mut |_, _| {})
                .await
                .expect("produced");
            assert_eq!(report.records, 2);
            client
                .ping()
                .await
                .expect("the broker has read the produces");
            let latest = client
                .list_offsets("t", 2, crate::client::OffsetSpec::Latest)
                .await
                .expect("offsets");
            assert_eq!(latest, Some(2));
        });
    }

    #[test]
    fn producing_to_a_missing_topic_names_it() {
        run(|| async {
            let broker = FakeBroker::start().await;
            let client = Client::connect(&broker.address, ClientConfig::default())
                .await
                .expect("connects");
            let inputs: Vec<Box<dyn Read + Send>> = vec![Box::new(Cursor::new(b"x\n".to_vec()))];
            let error = produce_lines(
                &client,
                "nope",
                &ProduceOptions::default(),
                inputs,
                &mut |_, _| {},
            )
            .await
            .expect_err("unknown topic");
            let text = format!("{error:#}");
            assert!(
                text.contains("producing to `nope`") && text.contains("UnknownTopic"),
                "{text}"
            );
        });
    }
}
