//! `rill-node`: the broker process. Shards (one thread per core), partition
//! ownership, listeners, configuration and the `rill` CLI. The only crate that
//! opens sockets and spawns threads; it runs `rill-core`'s log on compio.

pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod io;
pub mod kafka;
pub mod mirror;
pub mod mqtt;
pub mod tls;
