//! The native protocol under other load shapes than one producer on one
//! partition: several partitions and producers, each fsync policy, and
//! end-to-end latency (produce to consume) at a fixed offered rate.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rill_protocol::{Acks, Target};

use crate::broker::BrokerProcess;
use crate::native::{LatencyFigures, PRODUCE_WINDOW_BATCHES, connect};
use crate::storage::{RECORDS_PER_BATCH, producer_batch};

/// One produce run's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub partitions: u32,
    /// Producers, each on its own connection, running at once.
    pub producers: u32,
    /// The topic's fsync policy, as `topic_defaults.fsync` spells it.
    pub fsync: &'static str,
    pub acks: Acks,
}

/// Produce throughput (bytes per second) of `total_bytes` of 1 KiB records
/// in 64 KiB batches with `shape`, on a broker of its own.
pub fn produce(data_dir: &Path, total_bytes: u64, shape: Shape) -> anyhow::Result<f64> {
    let broker = BrokerProcess::start(
        data_dir,
        &[
            "node.shards=2".into(),
            format!("topic_defaults.fsync={}", shape.fsync),
        ],
    )?;
    let runtime = compio::runtime::Runtime::new()?;
    let batch = producer_batch();
    let speed = runtime.block_on(async {
        let admin = connect(&broker).await?;
        admin.create_topic("shapes", shape.partitions, &[]).await?;
        let mut clients = Vec::new();
        for _ in 0..shape.producers {
            clients.push(connect(&broker).await?);
        }
        let share = total_bytes / u64::from(shape.producers.max(1));
        let started = Instant::now();
        let producers = clients.iter().enumerate().map(|(index, client)| {
            let batch = &batch;
            async move {
                let mut window = std::collections::VecDeque::new();
                let mut sent = 0u64;
                // Producers start on different partitions, then go round.
                let mut next = index as u32;
                while sent < share {
                    let target = Target::Partition(next % shape.partitions);
                    window.push_back(client.start_produce("shapes", target, shape.acks, batch)?);
                    next = next.wrapping_add(1);
                    sent += batch.len() as u64;
                    if window.len() >= PRODUCE_WINDOW_BATCHES
                        && let Some(oldest) = window.pop_front()
                    {
                        oldest.wait().await?;
                    }
                }
                for pending in window {
                    pending.wait().await?;
                }
                anyhow::Ok(sent)
            }
        });
        let mut sent = 0;
        for result in futures_util::future::join_all(producers).await {
            sent += result?;
        }
        anyhow::Ok(sent as f64 / started.elapsed().as_secs_f64())
    })?;
    broker.stop()?;
    Ok(speed)
}

/// End-to-end latency at a fixed offered rate: a producer (acks=written)
/// sends 64 KiB batches on a fixed schedule while a consumer long-polls the
/// partition; a batch's latency runs from its intended send time to the
/// moment the consumer holds it, so a stall anywhere shows in full.
pub fn end_to_end_latency(
    data_dir: &Path,
    offered_bytes_per_second: f64,
    duration: Duration,
) -> anyhow::Result<LatencyFigures> {
    let broker = BrokerProcess::start(data_dir, &["node.shards=2".into()])?;
    let runtime = compio::runtime::Runtime::new()?;
    let batch = producer_batch();
    let interval = Duration::from_secs_f64(batch.len() as f64 / offered_bytes_per_second);
    let figures = runtime.block_on(async {
        let producer = connect(&broker).await?;
        let consumer = connect(&broker).await?;
        producer.create_topic("end-to-end", 1, &[]).await?;
        let histogram = Rc::new(RefCell::new(Histogram::<u64>::new_with_bounds(
            1, 60_000_000, 3,
        )?));
        // Intended send time of batch i (its base offset is i * records).
        let intended: Rc<RefCell<Vec<Instant>>> = Rc::new(RefCell::new(Vec::new()));
        let started = Instant::now();
        let batches = (duration.as_secs_f64() / interval.as_secs_f64()).ceil() as i64;
        let end_offset = batches * RECORDS_PER_BATCH as i64;
        let reader = {
            let histogram = histogram.clone();
            let intended = intended.clone();
            let consumer = &consumer;
            async move {
                let mut offset = 0i64;
                while offset < end_offset {
                    let fetched = consumer
                        .fetch("end-to-end", 0, offset, 4 * 1024 * 1024, 1, 500)
                        .await?;
                    let received = Instant::now();
                    let mut position = 0;
                    while let Some(rest) = fetched.batches.get(position..) {
                        let Ok(header) = rill_core::batch::BatchHeader::parse(rest) else {
                            break;
                        };
                        let Some(length) = header.total_bytes() else {
                            break;
                        };
                        let index = (header.base_offset / RECORDS_PER_BATCH as i64) as usize;
                        if let Some(sent) = intended.borrow().get(index) {
                            let micros = received.duration_since(*sent).as_micros().max(1);
                            histogram.borrow_mut().record(micros as u64)?;
                        }
                        position += length;
                    }
                    offset = fetched.next_offset;
                    anyhow::ensure!(
                        started.elapsed() < duration + Duration::from_secs(60),
                        "the consumer did not reach the end within a minute of the producer"
                    );
                }
                anyhow::Ok(())
            }
        };
        let writer = {
            let intended = intended.clone();
            let producer = &producer;
            let batch = &batch;
            async move {
                let mut pending = std::collections::VecDeque::new();
                for index in 0..batches {
                    let at = started + interval * index as u32;
                    let now = Instant::now();
                    if at > now {
                        compio::time::sleep(at - now).await;
                    }
                    intended.borrow_mut().push(at);
                    pending.push_back(producer.start_produce(
                        "end-to-end",
                        Target::Partition(0),
                        Acks::Written,
                        batch,
                    )?);
                    // Answers are collected as they come, without holding the schedule.
                    while pending.len() > PRODUCE_WINDOW_BATCHES {
                        if let Some(oldest) = pending.pop_front() {
                            oldest.wait().await?;
                        }
                    }
                }
                for answer in pending {
                    answer.wait().await?;
                }
                anyhow::Ok(batches as u64 * batch.len() as u64)
            }
        };
        let (sent, read) = futures_util::future::join(writer, reader).await;
        let sent = sent?;
        read?;
        anyhow::Ok(LatencyFigures::from_histogram(
            &histogram.borrow(),
            offered_bytes_per_second,
            sent as f64,
            started.elapsed(),
        ))
    })?;
    broker.stop()?;
    Ok(figures)
}
