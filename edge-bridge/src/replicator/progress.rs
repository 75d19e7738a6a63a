//! What one destination has acknowledged, per source partition, and where
//! to resume after a start or a reconnect so that nothing is lost and
//! nothing is written twice.
//!
//! # State
//!
//! For each source partition `s` (source topic and partition) a
//! [`Progress`] keeps:
//!
//! - the **frontier** `F(s)`: every record of `s` below it is at the
//!   destination (acknowledged, or found there by reconciliation) or was
//!   not to be sent (an offset with no record);
//! - for each destination partition `P`, **present-through** `T(s, P)`:
//!   the highest offset of `s` known to be in `P`. Records of `s` that map
//!   to `P` with offsets up to `T(s, P)` are there; the driver skips them
//!   ([`Progress::is_present`]).
//!
//! and for each destination partition `P` the **acknowledged end**
//! `E(P)`: the destination offset just past the last batch `P`
//! acknowledged. Those three are the checkpoint ([`Checkpoint`]), written
//! by the node whenever it likes and read back on start. In memory only:
//! the read position of each source partition and the batches opened but
//! not yet acknowledged (a batch holds records of one source partition for
//! one destination partition, see [`super::batch`]); the frontier is the
//! lowest of the read position and the first offsets of those batches, so
//! it only passes a record once the record is acknowledged or skipped.
//!
//! # Why resuming this way makes no gap and no duplicate
//!
//! Two facts about one destination partition `P` carry the argument.
//! (1) The replicator writes the records of `s` that map to `P` in
//! increasing source order: it reads `s` in order, and a batch goes to `P`
//! only after the batches of `s` before it were sent there, with an
//! idempotent producer (sequence numbers per partition: the broker accepts
//! a batch only right after its predecessor and drops a resent duplicate).
//! (2) Every batch it writes to `P` after the checkpoint's `E(P)` lies at
//! destination offsets `>= E(P)`, because `P` acknowledged everything
//! before `E(P)` in order.
//!
//! Reconciliation ([`TailScan`], on every start and after every producer
//! session reset) reads `P` from `E(P)` to its end and takes, for each
//! source partition, the provenance of the last record of each batch this
//! edge wrote; by (2) that is every batch written after the checkpoint,
//! whether its acknowledgement arrived, was lost with the connection, or
//! arrived after the last checkpoint was written (a stale checkpoint). So
//! afterwards `T(s, P)` is the highest offset of `s` in `P`, and by (1)
//! every record of `s` mapped to `P` up to it is there and none above it
//! is. Resuming reads `s` from `F(s)` (all below are there) and sends a
//! record mapped to `P` exactly when its offset is above `T(s, P)`: no
//! record is sent twice and none is skipped.
//!
//! **Several source partitions in one destination partition.** When the
//! destination has fewer partitions, records are placed by key (see
//! [`super::plan::PartitionMap`]): one source partition spreads over
//! several destination partitions and one destination partition mixes
//! several source partitions. Nothing above needs one-to-one: `T` is per
//! pair, fact (1) holds per pair (batches are per pair), and the scan of
//! `P` finds every source partition that wrote to it after `E(P)`, since
//! each batch names its own. One destination partition may run ahead of
//! another for the same source partition (`P1` acknowledged offsets 91 to
//! 100 of `s` while `P2` still owes 85 to 90): the frontier stays at 85,
//! `T(s, P1) = 100` is checkpointed with it, and a resume re-reads from 85
//! but sends only what `P2` lacks. The mapping must stay the same while
//! records are in flight: if the destination's partition count changes,
//! the node reconciles every partition of the topic before sending again.
//!
//! **What it relies on.** The edge id is this box's alone (records of
//! other edges in `P` are ignored by it). The scan reads what the
//! destination serves to consumers, up to its high watermark; a batch a
//! previous process sent that the leader has appended but not yet
//! replicated is not seen, so after a restart the node starts the scan
//! once such a batch would be replicated or dropped (Kafka's
//! `replica.lag.time.max.ms`, 30 s by default, after the previous process
//! could last have sent). A destination partition whose end is below
//! `E(P)` lost acknowledged records (an unclean leader election, a deleted
//! and recreated topic); the scan reports it ([`TailFound::truncated`]) and
//! the node logs and counts it: the replicator does not send again what a
//! destination acknowledged.

use std::collections::BTreeMap;

use super::batch::{BatchDecodeError, last_provenance, split_batches};
use crate::stored::{StoredDecodeError, StoredReader, StoredWriter, open};

#[cfg(test)]
mod tests;

/// A partition of a topic, at the source or at a destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: u32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SourceProgress {
    frontier: u64,
    present_through: BTreeMap<TopicPartition, u64>,
    read_next: u64,
    /// Batches opened and not yet acknowledged: first offset to their
    /// destination partition.
    open_batches: BTreeMap<u64, TopicPartition>,
}

impl SourceProgress {
    fn starting_at(offset: u64) -> SourceProgress {
        SourceProgress {
            frontier: offset,
            read_next: offset,
            ..SourceProgress::default()
        }
    }

    fn recompute_frontier(&mut self) {
        let oldest_open = self.open_batches.keys().next().copied();
        let frontier = oldest_open.map_or(self.read_next, |first| first.min(self.read_next));
        // The frontier never moves back: what it passed is at the
        // destination for good.
        self.frontier = self.frontier.max(frontier);
        let frontier = self.frontier;
        self.present_through
            .retain(|_, &mut through| through >= frontier);
    }
}

/// A misuse of the progress API by its driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    #[error("source partition {0:?} is not tracked")]
    UnknownSource(TopicPartition),
    #[error("no open batch of {source_partition:?} starts at offset {first_offset}")]
    UnknownBatch {
        source_partition: TopicPartition,
        first_offset: u64,
    },
}

/// The progress of one destination (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    edge_id: String,
    sources: BTreeMap<TopicPartition, SourceProgress>,
    acked_end: BTreeMap<TopicPartition, i64>,
}

impl Progress {
    pub fn new(edge_id: impl Into<String>) -> Progress {
        Progress {
            edge_id: edge_id.into(),
            sources: BTreeMap::new(),
            acked_end: BTreeMap::new(),
        }
    }

    /// The state a checkpoint saved; nothing is open or in flight.
    pub fn from_checkpoint(checkpoint: &Checkpoint) -> Progress {
        let mut progress = Progress::new(checkpoint.edge_id.clone());
        for source in &checkpoint.sources {
            let mut state = SourceProgress::starting_at(source.frontier);
            state.present_through = source.present_through.iter().cloned().collect();
            progress.sources.insert(source.source.clone(), state);
        }
        progress.acked_end = checkpoint.acknowledged_ends.iter().cloned().collect();
        progress
    }

    pub fn edge_id(&self) -> &str {
        &self.edge_id
    }

    /// Starts tracking a source partition at `offset` (where mirroring
    /// begins for a partition no checkpoint knows); a tracked one is left
    /// as it is.
    pub fn track(&mut self, source: TopicPartition, offset: u64) {
        self.sources
            .entry(source)
            .or_insert_with(|| SourceProgress::starting_at(offset));
    }

    pub fn sources(&self) -> impl Iterator<Item = &TopicPartition> {
        self.sources.keys()
    }

    fn source_mut(
        &mut self,
        source: &TopicPartition,
    ) -> Result<&mut SourceProgress, ProgressError> {
        self.sources
            .get_mut(source)
            .ok_or_else(|| ProgressError::UnknownSource(source.clone()))
    }

    /// Every record of `source` below this is at the destination.
    pub fn frontier(&self, source: &TopicPartition) -> Option<u64> {
        self.sources.get(source).map(|state| state.frontier)
    }

    /// Where to read `source` next.
    pub fn read_position(&self, source: &TopicPartition) -> Option<u64> {
        self.sources.get(source).map(|state| state.read_next)
    }

    /// Whether the record of `source` at `offset`, which maps to
    /// `destination`, is already there: skip it.
    pub fn is_present(
        &self,
        source: &TopicPartition,
        destination: &TopicPartition,
        offset: u64,
    ) -> bool {
        self.sources.get(source).is_some_and(|state| {
            offset < state.frontier
                || state
                    .present_through
                    .get(destination)
                    .is_some_and(|&through| offset <= through)
        })
    }

    /// A batch of `source` for `destination` got its first record at
    /// `first_offset`: the frontier stays below it until it is
    /// acknowledged.
    pub fn open_batch(
        &mut self,
        source: &TopicPartition,
        destination: &TopicPartition,
        first_offset: u64,
    ) -> Result<(), ProgressError> {
        let state = self.source_mut(source)?;
        state.open_batches.insert(first_offset, destination.clone());
        Ok(())
    }

    /// Every record of `source` up to `offset` was read and put in a batch
    /// or skipped.
    pub fn read_through(
        &mut self,
        source: &TopicPartition,
        offset: u64,
    ) -> Result<(), ProgressError> {
        let state = self.source_mut(source)?;
        state.read_next = state.read_next.max(offset.saturating_add(1));
        state.recompute_frontier();
        Ok(())
    }

    /// The destination acknowledged the batch of `source` that starts at
    /// `first_offset` and ends at `last_offset`; `destination_end` is the
    /// destination offset just past it (base offset + record count), when
    /// the broker said.
    pub fn acknowledged(
        &mut self,
        source: &TopicPartition,
        first_offset: u64,
        last_offset: u64,
        destination_end: Option<i64>,
    ) -> Result<(), ProgressError> {
        let state = self.source_mut(source)?;
        let Some(destination) = state.open_batches.remove(&first_offset) else {
            return Err(ProgressError::UnknownBatch {
                source_partition: source.clone(),
                first_offset,
            });
        };
        let through = state
            .present_through
            .entry(destination.clone())
            .or_insert(0);
        *through = (*through).max(last_offset);
        state.recompute_frontier();
        if let Some(end) = destination_end {
            let acked = self.acked_end.entry(destination).or_insert(0);
            *acked = (*acked).max(end);
        }
        Ok(())
    }

    /// Forgets every batch not yet acknowledged (the producer session was
    /// reset, or the process restarts): reading starts again at each
    /// frontier, and reconciliation must run before anything is sent.
    pub fn discard_unacknowledged(&mut self) {
        for state in self.sources.values_mut() {
            state.open_batches.clear();
            state.read_next = state.frontier;
        }
    }

    /// Where the tail scan of `destination` starts: just past what was
    /// acknowledged there, or the start of the partition.
    pub fn scan_from(&self, destination: &TopicPartition) -> i64 {
        self.acked_end.get(destination).copied().unwrap_or(0)
    }

    /// Takes in what a tail scan of one destination partition found.
    pub fn reconcile(&mut self, found: &TailFound) {
        for (source, &offset) in &found.last_offsets {
            let Some(state) = self.sources.get_mut(source) else {
                continue;
            };
            if offset < state.frontier {
                continue;
            }
            let through = state
                .present_through
                .entry(found.partition.clone())
                .or_insert(offset);
            *through = (*through).max(offset);
        }
        // Nothing is in flight to the partition while it is reconciled, so
        // its end is now exactly where the scan stopped (lower than before
        // if it was truncated: later batches land below the old end).
        self.acked_end
            .insert(found.partition.clone(), found.scanned_to);
    }

    /// What to persist now.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            edge_id: self.edge_id.clone(),
            sources: self
                .sources
                .iter()
                .map(|(source, state)| SourceCheckpoint {
                    source: source.clone(),
                    frontier: state.frontier,
                    present_through: state
                        .present_through
                        .iter()
                        .filter(|&(_, &through)| through >= state.frontier)
                        .map(|(partition, &through)| (partition.clone(), through))
                        .collect(),
                })
                .collect(),
            acknowledged_ends: self
                .acked_end
                .iter()
                .map(|(partition, &end)| (partition.clone(), end))
                .collect(),
        }
    }
}

/// One source partition in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCheckpoint {
    pub source: TopicPartition,
    pub frontier: u64,
    pub present_through: Vec<(TopicPartition, u64)>,
}

/// The persisted progress of one destination (layout in
/// `docs/format.md`, "Replicator progress").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub edge_id: String,
    pub sources: Vec<SourceCheckpoint>,
    pub acknowledged_ends: Vec<(TopicPartition, i64)>,
}

/// The checkpoint format's version byte.
pub const CHECKPOINT_VERSION: u8 = 1;

fn put_partition(writer: &mut StoredWriter, partition: &TopicPartition) {
    writer.string(&partition.topic);
    writer.u32(partition.partition);
}

fn get_partition(
    reader: &mut StoredReader<'_>,
    field: &'static str,
) -> Result<TopicPartition, StoredDecodeError> {
    let topic = reader.string(field)?;
    if topic.is_empty() {
        return Err(StoredDecodeError::Invalid { field });
    }
    Ok(TopicPartition {
        topic,
        partition: reader.u32(field)?,
    })
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = StoredWriter::new(CHECKPOINT_VERSION);
        writer.string(&self.edge_id);
        writer.len32(self.sources.len());
        for source in &self.sources {
            put_partition(&mut writer, &source.source);
            writer.u64(source.frontier);
            writer.len32(source.present_through.len());
            for (partition, through) in &source.present_through {
                put_partition(&mut writer, partition);
                writer.u64(*through);
            }
        }
        writer.len32(self.acknowledged_ends.len());
        for (partition, end) in &self.acknowledged_ends {
            put_partition(&mut writer, partition);
            writer.u64(*end as u64);
        }
        writer.finish()
    }

    /// Reads what [`Checkpoint::encode`] wrote: at most `bytes_max` bytes,
    /// CRC and version checked first, every count checked against the
    /// bytes left.
    pub fn decode(bytes: &[u8], bytes_max: usize) -> Result<Checkpoint, StoredDecodeError> {
        let mut reader = open(bytes, CHECKPOINT_VERSION, bytes_max)?;
        let edge_id = reader.string("edge id")?;
        // A partition is at least a 4-byte length and a 4-byte number.
        const PARTITION_BYTES_MIN: usize = 8;
        let source_count = reader.count(PARTITION_BYTES_MIN + 8 + 4, "sources")?;
        let mut sources = Vec::with_capacity(source_count);
        for _ in 0..source_count {
            let source = get_partition(&mut reader, "source partition")?;
            let frontier = reader.u64("frontier")?;
            let count = reader.count(PARTITION_BYTES_MIN + 8, "present-through entries")?;
            let mut present_through = Vec::with_capacity(count);
            for _ in 0..count {
                let partition = get_partition(&mut reader, "destination partition")?;
                present_through.push((partition, reader.u64("present-through offset")?));
            }
            sources.push(SourceCheckpoint {
                source,
                frontier,
                present_through,
            });
        }
        let end_count = reader.count(PARTITION_BYTES_MIN + 8, "acknowledged ends")?;
        let mut acknowledged_ends = Vec::with_capacity(end_count);
        for _ in 0..end_count {
            let partition = get_partition(&mut reader, "destination partition")?;
            let end = i64::try_from(reader.u64("acknowledged end")?).map_err(|_| {
                StoredDecodeError::Invalid {
                    field: "acknowledged end",
                }
            })?;
            acknowledged_ends.push((partition, end));
        }
        reader.finish()?;
        Ok(Checkpoint {
            edge_id,
            sources,
            acknowledged_ends,
        })
    }
}

/// One fetched piece of a destination partition.
#[derive(Debug, Clone, Copy)]
pub struct TailChunk<'a> {
    /// The offset the fetch asked for.
    pub fetch_offset: i64,
    pub log_start_offset: i64,
    pub high_watermark: i64,
    /// Concatenated batches as the fetch returned them.
    pub records: &'a [u8],
}

/// Why a tail scan could not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TailScanError {
    #[error(transparent)]
    Batch(#[from] BatchDecodeError),
    #[error("fetch at {offset} returned no whole batch below the high watermark {high_watermark}")]
    NoProgress { offset: i64, high_watermark: i64 },
}

/// What a scan of one destination partition found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailFound {
    pub partition: TopicPartition,
    /// Per source partition of this edge: the highest source offset found.
    pub last_offsets: BTreeMap<TopicPartition, u64>,
    /// The destination offset the scan reached: the high watermark when it
    /// started. The next scan starts there.
    pub scanned_to: i64,
    /// The partition ends below what it acknowledged: `(acknowledged end,
    /// high watermark)`.
    pub truncated: Option<(i64, i64)>,
    /// Batches of this edge that were looked at.
    pub batches_read: u64,
}

/// Reads a destination partition from [`Progress::scan_from`] to its high
/// watermark, fetch by fetch, collecting the provenance of this edge's
/// batches. The driver fetches at [`TailScan::next_fetch_offset`] and
/// feeds each answer to [`TailScan::observe`] until it returns `None`.
#[derive(Debug, Clone)]
pub struct TailScan {
    edge_id: String,
    next_offset: i64,
    end_offset: Option<i64>,
    uncompressed_bytes_max: usize,
    found: TailFound,
    done: bool,
}

impl TailScan {
    pub fn new(
        progress: &Progress,
        partition: TopicPartition,
        uncompressed_bytes_max: usize,
    ) -> TailScan {
        TailScan {
            edge_id: progress.edge_id.clone(),
            next_offset: progress.scan_from(&partition),
            end_offset: None,
            uncompressed_bytes_max,
            found: TailFound {
                partition,
                last_offsets: BTreeMap::new(),
                scanned_to: 0,
                truncated: None,
                batches_read: 0,
            },
            done: false,
        }
    }

    pub fn partition(&self) -> &TopicPartition {
        &self.found.partition
    }

    /// Where to fetch next; `None` once the scan is complete.
    pub fn next_fetch_offset(&self) -> Option<i64> {
        (!self.done).then_some(self.next_offset)
    }

    /// Takes one fetch answer; gives the result once the scan is done.
    pub fn observe(&mut self, chunk: TailChunk<'_>) -> Result<Option<TailFound>, TailScanError> {
        let first_chunk = self.end_offset.is_none();
        let end = *self.end_offset.get_or_insert(chunk.high_watermark);
        if first_chunk && self.next_offset > chunk.high_watermark {
            // Acknowledged records are gone: scanning restarts from here
            // next time, and what was lost is the node's to report.
            self.found.truncated = Some((self.next_offset, chunk.high_watermark));
            return Ok(Some(self.complete(chunk.high_watermark)));
        }
        if self.next_offset < chunk.log_start_offset {
            // Retention removed the start; nothing of ours can be there.
            self.next_offset = chunk.log_start_offset;
        }
        let mut progressed = false;
        for batch in split_batches(chunk.records) {
            let batch = batch?;
            let header =
                rill_core::batch::BatchHeader::parse(batch).map_err(BatchDecodeError::from)?;
            let last = header.last_offset();
            if last < self.next_offset {
                continue; // a fetch may start inside an earlier batch
            }
            if header.base_offset >= end {
                break;
            }
            if let Some(provenance) = last_provenance(batch, self.uncompressed_bytes_max)?
                && provenance.edge_id == self.edge_id
            {
                let source = TopicPartition::new(provenance.topic, provenance.partition);
                let offset = self.found.last_offsets.entry(source).or_insert(0);
                *offset = (*offset).max(provenance.offset);
                self.found.batches_read += 1;
            }
            self.next_offset = last + 1;
            progressed = true;
        }
        if self.next_offset >= end {
            return Ok(Some(self.complete(end)));
        }
        if !progressed {
            return Err(TailScanError::NoProgress {
                offset: self.next_offset,
                high_watermark: end,
            });
        }
        Ok(None)
    }

    fn complete(&mut self, scanned_to: i64) -> TailFound {
        self.done = true;
        self.found.scanned_to = scanned_to;
        self.found.clone()
    }
}
