//! `rill-protocol`: Rill's native protocol, shared by the broker, the client
//! library and devices.
//!
//! A frame is a 4-byte little-endian body length followed by the body; the body
//! is a `postcard`-encoded [`RequestFrame`] or [`ResponseFrame`] (correlation id
//! and message). A fetch response carries its record batches raw after the
//! postcard part, so the broker can send them straight from segment files.
//!
//! The crate is `no_std`. Without the `alloc` feature it still has everything
//! a microcontroller needs to publish: the handshake, produce, ping, the
//! responses to them, a Kafka v2 batch writer into a fixed buffer, and Kafka's
//! murmur2 key partitioner. Messages that carry lists need `alloc`; they are
//! the last variants of their enums, so variant numbers match in both builds.

#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod batch;
pub mod frame;
pub mod message;
pub mod partitioner;

pub use frame::{FRAME_HEADER_BYTES, FrameError, split_frame};
pub use message::{
    Acks, ErrorCode, OffsetSpec, PROTOCOL_VERSION, Request, RequestFrame, Response, ResponseFrame,
    Target,
};
