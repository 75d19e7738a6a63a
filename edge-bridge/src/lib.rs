//! Rill's bridges between the log and the outside world, as pure protocol
//! code that `rill-node` runs: bytes and events in, values and actions out,
//! time passed in, no sockets and no runtime.
//!
//! Today it holds MQTT 3.1.1 and 5.0 ([`mqtt`]): the packet codec and topic
//! rules, and the server's pure parts on top of them (the per-connection
//! session state machine, the topic mapping, the subscription index, the
//! retained store, authentication). The upstream MQTT bridge and the
//! replicator to central Kafka clusters come later.

pub mod mqtt;
