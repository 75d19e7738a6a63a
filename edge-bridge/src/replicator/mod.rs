//! The replicator: mirrors selected Rill topics to central Kafka-protocol
//! clusters, exactly once at the destination, through long outages.
//!
//! Its pure parts live here; `rill-node` runs them, one task per
//! destination. [`plan`] decides what goes where, in which order and how
//! fast; [`batch`] builds the uplink's record batches with a provenance
//! header on every record and reads the provenance back from a
//! destination's tail; [`progress`] keeps what a destination has
//! acknowledged, its checkpoint format, and the reconciliation that turns
//! a checkpoint and the destination's tail into where to resume (its
//! module documentation holds the exactly-once argument); [`client`] is
//! the Kafka producer connection as a state machine (its module
//! documentation holds the socket-level contract).
//!
//! # How a node task drives one destination
//!
//! 1. **Start.** Read the destination's checkpoint
//!    ([`progress::Checkpoint::decode`], bounded) into
//!    [`progress::Progress::from_checkpoint`], or start a
//!    [`progress::Progress::new`]. Track every selected source partition
//!    ([`plan::TopicSelection`]; a partition the checkpoint does not know
//!    starts at its log start). Make the [`client::Client`] and give it the
//!    destination topics ([`plan::RenamePolicy`]).
//! 2. **Before sending to a destination partition**, after
//!    [`client::Action::TopicReady`] (its partition count makes the
//!    [`plan::PartitionMap`]) and [`client::Action::ProducerReady`]:
//!    reconcile it. [`client::Client::list_offsets`], then
//!    [`progress::TailScan`] fetch by fetch, then
//!    [`progress::Progress::reconcile`] with what it found; log and count a
//!    [`progress::TailFound::truncated`] partition. After a process
//!    restart, start the scans no sooner than the destination's
//!    `replica.lag.time.max.ms` after the previous process could last have
//!    sent (see [`progress`]).
//! 3. **Send.** [`plan::DrainScheduler`] picks the next source partition
//!    (highest priority with a backlog, peers in turn) among those whose
//!    destination partitions have room ([`client::Client::has_room`]).
//!    Read it from [`progress::Progress::read_position`] (decode stored
//!    batches with [`batch::decode_batch`]); map each record
//!    ([`plan::PartitionMap`]); skip it when
//!    [`progress::Progress::is_present`]; otherwise push it into the
//!    [`batch::BatchBuilder`] of its (source partition, destination
//!    partition) pair, calling [`progress::Progress::open_batch`] when that
//!    builder was empty. Call [`progress::Progress::read_through`] after
//!    each chunk read. Finish a builder at its
//!    [`batch::BatchBuilder::ready_at_ms`], take its bytes from the
//!    [`plan::TokenBucket`] (wait until the time it names when it
//!    refuses), and hand it to [`client::Client::produce`] with a token
//!    that remembers the source partition and offsets.
//! 4. **Acknowledged.** [`progress::Progress::acknowledged`] with the
//!    batch's offsets and the destination end (base offset + record
//!    count). Persist [`progress::Progress::checkpoint`] whenever it suits
//!    (a checkpoint may be stale: reconciliation covers what it misses),
//!    replacing the previous one atomically. The frontier of each source
//!    partition is what retention must keep (up to the unmirrored-data
//!    budget); records evicted below it are lost to the mirror, and are
//!    counted.
//! 5. **Session reset** ([`client::Action::SessionReset`]): empty the
//!    builders, [`progress::Progress::discard_unacknowledged`], and go back
//!    to step 2 for every destination partition. Connection losses need
//!    nothing from the driver: the client resends with the same sequences.
//! 6. **Refused** ([`client::Action::Refused`]): stop the source partition
//!    and report it; never skip the batch.

pub mod batch;
pub mod client;
pub mod plan;
pub mod progress;
