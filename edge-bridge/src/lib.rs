//! Rill's bridges between the log and the outside world, as pure protocol
//! code that `rill-node` runs: bytes and events in, values and actions out,
//! time passed in, no sockets and no runtime.
//!
//! Today it holds the MQTT 3.1.1 and 5.0 packet codec and topic rules
//! ([`mqtt`]), the ground for the MQTT session state machines. The upstream
//! MQTT bridge and the replicator to central Kafka clusters come later.

pub mod mqtt;
