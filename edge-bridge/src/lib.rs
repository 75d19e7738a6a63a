//! Rill's bridges between the log and the outside world, as pure protocol
//! code that `rill-node` runs: bytes and events in, values and actions out,
//! time passed in, no sockets and no runtime.
//!
//! It holds MQTT 3.1.1 and 5.0 ([`mqtt`]): the packet codec and topic
//! rules, and the server's pure parts on top of them (the per-connection
//! session state machine, the topic mapping, the subscription index, the
//! retained store, authentication) and the upstream MQTT bridge (Rill as a
//! client of another broker); and the replicator to central Kafka clusters
//! ([`replicator`]): what to mirror and how fast, the uplink's record
//! batches, progress and reconciliation, and the Kafka producer connection;
//! and SASL on the server side ([`sasl`]) for Rill's Kafka listener.

pub mod mqtt;
pub mod replicator;
pub mod sasl;
mod stored;

pub use stored::StoredDecodeError;
