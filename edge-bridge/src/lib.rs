//! Rill's bridges between the log and the outside world, as pure protocol
//! code that `rill-node` runs: bytes and events in, values and actions out,
//! time passed in, no sockets and no runtime.
//!
//! Today it holds the MQTT topic rules ([`mqtt::topic`]), the start of the
//! MQTT session state machines. The upstream MQTT bridge and the replicator
//! to central Kafka clusters come later.

pub mod mqtt;
