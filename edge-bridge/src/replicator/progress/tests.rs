//! Progress and reconciliation against a simulated destination partition
//! that stores real batches and answers fetches in chunks.

use rill_core::batch::{BATCH_HEADER_BYTES, BatchHeader};

use super::*;
use crate::replicator::batch::{BatchBuilder, BatchLimits, Compression, Provenance, SourceRecord};
use crate::replicator::plan::PartitionMap;

const EDGE: &str = "truck-17";

/// One destination partition: batches with their base offsets.
#[derive(Default)]
struct Destination {
    batches: Vec<Vec<u8>>,
    end: i64,
}

impl Destination {
    fn append(&mut self, mut batch: Vec<u8>) -> i64 {
        let header = BatchHeader::parse(&batch).expect("a batch");
        batch[0..8].copy_from_slice(&self.end.to_be_bytes());
        self.batches.push(batch);
        let base = self.end;
        self.end += i64::from(header.record_count);
        base
    }

    /// What a fetch at `offset` returns: whole batches up to `bytes_max`
    /// (at least one), the last one cut short when it does not fit.
    fn fetch(&self, offset: i64, bytes_max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for batch in &self.batches {
            let header = BatchHeader::parse(batch).expect("a batch");
            if header.last_offset() < offset {
                continue;
            }
            if !out.is_empty() && out.len() + batch.len() > bytes_max {
                out.extend_from_slice(&batch[..batch.len() / 2]);
                break;
            }
            out.extend_from_slice(batch);
        }
        out
    }

    fn scan(&self, progress: &Progress, partition: &TopicPartition) -> TailFound {
        let mut scan = TailScan::new(progress, partition.clone(), 1 << 20);
        for _ in 0..1000 {
            let offset = scan.next_fetch_offset().expect("scan not done");
            let records = self.fetch(offset, 300);
            let chunk = TailChunk {
                fetch_offset: offset,
                log_start_offset: 0,
                high_watermark: self.end,
                records: &records,
            };
            if let Some(found) = scan.observe(chunk).expect("scan goes on") {
                assert_eq!(scan.next_fetch_offset(), None);
                return found;
            }
        }
        panic!("scan did not finish");
    }

    /// Source offsets of `source` this destination holds, in order.
    fn source_offsets(&self, source: &TopicPartition) -> Vec<u64> {
        let mut offsets = Vec::new();
        for batch in &self.batches {
            let decoded = crate::replicator::batch::decode_batch(batch, 1 << 20).expect("valid");
            for record in decoded.records() {
                let record = record.expect("valid record");
                let provenance = record
                    .headers
                    .iter()
                    .rev()
                    .find(|h| h.key == b"rill.source")
                    .and_then(|h| h.value)
                    .and_then(Provenance::parse)
                    .expect("provenance");
                if provenance.topic == source.topic && provenance.partition == source.partition {
                    offsets.push(provenance.offset);
                }
            }
        }
        offsets
    }
}

fn source(partition: u32) -> TopicPartition {
    TopicPartition::new("gps", partition)
}

fn destination(partition: u32) -> TopicPartition {
    TopicPartition::new("truck-17.gps", partition)
}

/// A batch of the given source offsets, as the replicator writes it.
fn batch_of(edge: &str, source: &TopicPartition, offsets: &[u64]) -> Vec<u8> {
    let mut builder = BatchBuilder::new(Compression::Lz4, BatchLimits::default());
    for &offset in offsets {
        let key = format!("key-{offset}");
        let record = SourceRecord {
            offset,
            timestamp_ms: offset as i64,
            key: Some(key.as_bytes()),
            value: Some(b"v"),
            headers: vec![],
        };
        let provenance = Provenance {
            edge_id: edge.into(),
            topic: source.topic.clone(),
            partition: source.partition,
            offset,
        };
        builder.push(&record, &provenance, 0).expect("fits");
    }
    builder.finish().expect("compresses").bytes
}

/// Sends `offsets` of `source` to `partition` as one batch and, when
/// `acknowledge`, tells the progress.
fn send(
    progress: &mut Progress,
    destination_partition: &mut Destination,
    partition: &TopicPartition,
    source: &TopicPartition,
    offsets: &[u64],
    acknowledge: bool,
) {
    let first = offsets[0];
    let last = *offsets.last().expect("offsets");
    progress
        .open_batch(source, partition, first)
        .expect("tracked");
    progress.read_through(source, last).expect("tracked");
    let base = destination_partition.append(batch_of(EDGE, source, offsets));
    if acknowledge {
        let end = base + offsets.len() as i64;
        progress
            .acknowledged(source, first, last, Some(end))
            .expect("open batch");
    }
}

fn restart(checkpoint: &Checkpoint) -> Progress {
    let bytes = checkpoint.encode();
    Progress::from_checkpoint(&Checkpoint::decode(&bytes, 1 << 16).expect("valid checkpoint"))
}

/// Resumes `source` as a driver would after reconciliation: reads from the
/// read position to `end` and returns the offsets it would send.
fn resume(
    progress: &Progress,
    source: &TopicPartition,
    map: impl Fn(u64) -> TopicPartition,
    end: u64,
) -> Vec<u64> {
    let from = progress.read_position(source).expect("tracked");
    (from..end)
        .filter(|&offset| !progress.is_present(source, &map(offset), offset))
        .collect()
}

#[test]
fn checkpoint_round_trips_and_refuses_damage() {
    let mut progress = Progress::new(EDGE);
    let mut dest = Destination::default();
    progress.track(source(0), 0);
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[0, 1, 2],
        true,
    );
    let checkpoint = progress.checkpoint();
    assert_eq!(
        checkpoint,
        Checkpoint {
            edge_id: EDGE.into(),
            sources: vec![SourceCheckpoint {
                source: source(0),
                frontier: 3,
                present_through: vec![],
            }],
            acknowledged_ends: vec![(destination(0), 3)],
        }
    );
    let bytes = checkpoint.encode();
    assert_eq!(Checkpoint::decode(&bytes, 1 << 16), Ok(checkpoint));
    let mut damaged = bytes.clone();
    damaged[5] ^= 0x40;
    assert!(matches!(
        Checkpoint::decode(&damaged, 1 << 16),
        Err(StoredDecodeError::ChecksumMismatch { .. })
    ));
    assert!(matches!(
        Checkpoint::decode(&bytes, 8),
        Err(StoredDecodeError::TooLarge { .. })
    ));
    // A count far larger than the bytes present is refused before it
    // sizes anything.
    let mut writer = StoredWriter::new(CHECKPOINT_VERSION);
    writer.string(EDGE);
    writer.u32(u32::MAX);
    assert!(matches!(
        Checkpoint::decode(&writer.finish(), 1 << 16),
        Err(StoredDecodeError::Truncated { .. })
    ));
}

#[test]
fn frontier_moves_only_past_acknowledged_or_skipped_records() {
    let mut progress = Progress::new(EDGE);
    let mut dest = Destination::default();
    progress.track(source(0), 10);
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[10, 11],
        false,
    );
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[12, 13],
        true,
    );
    // 12 and 13 are acknowledged but 10 and 11 are not: the frontier waits.
    assert_eq!(progress.frontier(&source(0)), Some(10));
    progress
        .acknowledged(&source(0), 10, 11, Some(2))
        .expect("open batch");
    assert_eq!(progress.frontier(&source(0)), Some(14));
    // Offsets 14 to 19 hold no record to send (control records): reading
    // through them moves the frontier.
    progress.read_through(&source(0), 19).expect("tracked");
    assert_eq!(progress.frontier(&source(0)), Some(20));
    assert_eq!(
        progress.acknowledged(&source(0), 10, 11, None),
        Err(ProgressError::UnknownBatch {
            source_partition: source(0),
            first_offset: 10
        })
    );
}

#[test]
fn empty_destination_without_checkpoint_starts_at_the_beginning() {
    let mut progress = Progress::new(EDGE);
    progress.track(source(0), 0);
    let dest = Destination::default();
    let found = dest.scan(&progress, &destination(0));
    assert_eq!(found.last_offsets, BTreeMap::new());
    assert_eq!((found.scanned_to, found.truncated), (0, None));
    progress.reconcile(&found);
    assert_eq!(
        resume(&progress, &source(0), |_| destination(0), 5),
        vec![0, 1, 2, 3, 4]
    );
}

#[test]
fn stale_checkpoint_resumes_after_what_arrived_since() {
    let mut progress = Progress::new(EDGE);
    let mut dest = Destination::default();
    progress.track(source(0), 0);
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[0, 1, 2, 3],
        true,
    );
    let stale = progress.checkpoint();
    // Acknowledged after the last checkpoint was written, then a crash.
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[4, 5, 6],
        true,
    );
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[7, 8],
        true,
    );
    let mut progress = restart(&stale);
    assert_eq!(progress.read_position(&source(0)), Some(4));
    let found = dest.scan(&progress, &destination(0));
    assert_eq!(found.last_offsets, BTreeMap::from([(source(0), 8)]));
    progress.reconcile(&found);
    let to_send = resume(&progress, &source(0), |_| destination(0), 12);
    assert_eq!(to_send, vec![9, 10, 11]);
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &to_send,
        true,
    );
    assert_eq!(dest.source_offsets(&source(0)), (0..12).collect::<Vec<_>>());
}

#[test]
fn lost_acknowledgement_is_found_at_the_tail() {
    let mut progress = Progress::new(EDGE);
    let mut dest = Destination::default();
    progress.track(source(0), 0);
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[0, 1],
        true,
    );
    // Written, but the answer was lost with the connection; the producer
    // session is reset, so the batch cannot be resent for deduplication.
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[2, 3, 4],
        false,
    );
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[5],
        false,
    );
    // The second one never arrived: take it back out.
    dest.batches.pop();
    dest.end -= 1;
    progress.discard_unacknowledged();
    assert_eq!(progress.read_position(&source(0)), Some(2));
    let found = dest.scan(&progress, &destination(0));
    progress.reconcile(&found);
    let to_send = resume(&progress, &source(0), |_| destination(0), 7);
    assert_eq!(to_send, vec![5, 6]);
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &to_send,
        true,
    );
    assert_eq!(dest.source_offsets(&source(0)), (0..7).collect::<Vec<_>>());
    // Checkpoint after the resumed sends: a restart scans only past them.
    let progress = restart(&progress.checkpoint());
    assert_eq!(progress.scan_from(&destination(0)), dest.end);
    assert_eq!(progress.read_position(&source(0)), Some(7));
}

#[test]
fn destination_ahead_with_several_sources_mapped_by_key() {
    // Four source partitions into two destination partitions, by key.
    let map = PartitionMap::new(4, 2);
    let sources: Vec<_> = (0..4).map(source).collect();
    let dest_of = |offset: u64| {
        let key = format!("key-{offset}");
        destination(map.destination_partition(0, Some(key.as_bytes())))
    };
    let mut progress = Progress::new(EDGE);
    for s in &sources {
        progress.track(s.clone(), 0);
    }
    let mut dests = [Destination::default(), Destination::default()];
    // Another edge writes into the same destination partitions.
    dests[0].append(batch_of("bus-3", &source(0), &[500, 501]));
    // Mirror offsets 0..40 of every source in batches of up to five
    // offsets per destination partition, acknowledging as we go;
    // checkpoint half way.
    let mut checkpoint = None;
    for chunk_start in (0..40u64).step_by(5) {
        for s in &sources {
            for partition in 0..2u32 {
                let offsets: Vec<u64> = (chunk_start..chunk_start + 5)
                    .filter(|&o| dest_of(o).partition == partition)
                    .collect();
                if offsets.is_empty() {
                    continue;
                }
                // Destination partition 1 loses the acknowledgements of the
                // last round: written, never confirmed.
                let acknowledge = !(chunk_start == 35 && partition == 1);
                send(
                    &mut progress,
                    &mut dests[partition as usize],
                    &destination(partition),
                    s,
                    &offsets,
                    acknowledge,
                );
            }
            progress.read_through(s, chunk_start + 4).expect("tracked");
        }
        dests[1].append(batch_of("bus-3", &source(1), &[900 + chunk_start]));
        if chunk_start == 15 {
            checkpoint = Some(progress.checkpoint());
        }
    }
    // Crash: back to the checkpoint taken at offset 20.
    let mut progress = restart(&checkpoint.expect("taken"));
    for s in &sources {
        assert_eq!(progress.read_position(s), Some(20));
    }
    for partition in 0..2u32 {
        let found = dests[partition as usize].scan(&progress, &destination(partition));
        // Every source partition is found in both destination partitions,
        // and the other edge's records are not taken for ours.
        assert_eq!(found.last_offsets.len(), 4, "partition {partition}");
        progress.reconcile(&found);
    }
    for s in &sources {
        let to_send = resume(&progress, s, dest_of, 50);
        assert_eq!(to_send, (40..50).collect::<Vec<_>>(), "{s:?}");
        for &offset in &to_send {
            let partition = dest_of(offset).partition;
            send(
                &mut progress,
                &mut dests[partition as usize],
                &destination(partition),
                s,
                &[offset],
                true,
            );
        }
    }
    // Exactly once and in order, per source partition and key.
    for s in &sources {
        let mut all: Vec<u64> = dests
            .iter()
            .flat_map(|d| d.source_offsets(s))
            .filter(|&o| o < 500)
            .collect();
        for partition in 0..2u32 {
            let in_partition = dests[partition as usize].source_offsets(s);
            let ours: Vec<_> = in_partition.iter().filter(|&&o| o < 500).collect();
            assert!(ours.windows(2).all(|w| w[0] < w[1]), "{s:?} in order");
        }
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<_>>(), "{s:?}");
    }
}

#[test]
fn one_destination_partition_ahead_of_another_is_checkpointed() {
    // Source 0 spreads over two destination partitions; partition 1
    // acknowledges 91..=100 while partition 0 still owes 85..=90.
    let mut progress = Progress::new(EDGE);
    let mut dests = [Destination::default(), Destination::default()];
    progress.track(source(0), 85);
    let owed: Vec<u64> = (85..=90).collect();
    let ahead: Vec<u64> = (91..=100).collect();
    send(
        &mut progress,
        &mut dests[0],
        &destination(0),
        &source(0),
        &owed,
        false,
    );
    send(
        &mut progress,
        &mut dests[1],
        &destination(1),
        &source(0),
        &ahead,
        true,
    );
    dests[0].batches.clear();
    dests[0].end = 0;
    let checkpoint = progress.checkpoint();
    assert_eq!(checkpoint.sources[0].frontier, 85);
    assert_eq!(
        checkpoint.sources[0].present_through,
        vec![(destination(1), 100)]
    );
    let mut progress = restart(&checkpoint);
    for partition in 0..2 {
        let found = dests[partition as usize].scan(&progress, &destination(partition));
        assert!(found.last_offsets.is_empty());
        progress.reconcile(&found);
    }
    let map = |offset: u64| destination(u32::from(offset > 90));
    assert_eq!(
        resume(&progress, &source(0), map, 103),
        vec![85, 86, 87, 88, 89, 90, 101, 102]
    );
}

#[test]
fn truncated_destination_is_reported_and_scanning_restarts_at_its_end() {
    let mut progress = Progress::new(EDGE);
    let mut dest = Destination::default();
    progress.track(source(0), 0);
    send(
        &mut progress,
        &mut dest,
        &destination(0),
        &source(0),
        &[0, 1, 2],
        true,
    );
    let mut progress = restart(&progress.checkpoint());
    // The topic was deleted and recreated.
    let dest = Destination::default();
    let found = dest.scan(&progress, &destination(0));
    assert_eq!(found.truncated, Some((3, 0)));
    progress.reconcile(&found);
    assert_eq!(progress.scan_from(&destination(0)), 0);
    // Acknowledged records are not sent again.
    assert_eq!(
        resume(&progress, &source(0), |_| destination(0), 5),
        vec![3, 4]
    );
}

#[test]
fn tail_scan_refuses_a_fetch_that_makes_no_progress() {
    let mut progress = Progress::new(EDGE);
    progress.track(source(0), 0);
    let mut scan = TailScan::new(&progress, destination(0), 1 << 20);
    let mut dest = Destination::default();
    dest.append(batch_of(EDGE, &source(0), &[0, 1]));
    let cut = &dest.batches[0][..BATCH_HEADER_BYTES];
    let chunk = TailChunk {
        fetch_offset: 0,
        log_start_offset: 0,
        high_watermark: 2,
        records: cut,
    };
    assert!(matches!(
        scan.observe(chunk),
        Err(TailScanError::NoProgress { .. })
    ));
    progress.track(source(1), 0);
}

mod hostile {
    use proptest::prelude::*;

    use super::*;

    /// `body` behind the version byte with a valid CRC, so the field
    /// parser itself meets hostile bytes.
    fn sealed(body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![CHECKPOINT_VERSION];
        bytes.extend_from_slice(body);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    proptest! {
        #[test]
        fn checkpoint_decode_never_panics_and_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            let _ = Checkpoint::decode(&body, 1 << 16);
            if let Ok(checkpoint) = Checkpoint::decode(&sealed(&body), 1 << 16) {
                prop_assert_eq!(checkpoint.encode(), sealed(&body));
            }
        }

        #[test]
        fn batch_readers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            for batch in split_batches(&body).flatten() {
                let _ = last_provenance(batch, 1 << 16);
            }
            let _ = crate::replicator::batch::decode_batch(&body, 1 << 16)
                .map(|decoded| decoded.records().count());
        }
    }
}
