//! `rill-core`: Rill's log.
//!
//! Kafka record batches (magic 2) stored in segments with sparse offset and time
//! indexes, per-partition recovery checkpoints, retention, a data-directory disk
//! quota, and a verifier. Pure logic over the narrow I/O traits in [`storage`]:
//! this crate opens no socket, spawns no thread and imports no async runtime. Its
//! `async` functions complete under any executor; the node runs them on compio.

pub mod batch;
pub mod checkpoint;
pub mod index;
pub mod log;
pub mod segment;
pub mod storage;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod logset;
pub mod verify;
