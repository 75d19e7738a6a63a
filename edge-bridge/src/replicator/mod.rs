//! The replicator: mirrors selected Rill topics to central Kafka-protocol
//! clusters, exactly once at the destination, through long outages.
//!
//! Its pure parts live here; `rill-node` runs them. [`plan`] decides what
//! goes where, in which order and how fast; [`batch`] builds the uplink's
//! record batches with a provenance header on every record and reads the
//! provenance back from a destination's tail; [`progress`] keeps what each
//! destination has acknowledged, its checkpoint format, and the
//! reconciliation that turns a checkpoint and the destination's tail into
//! where to resume; [`client`] is the Kafka producer connection as a state
//! machine (bytes in, frames and events out).

pub mod batch;
pub mod client;
pub mod plan;
pub mod progress;
