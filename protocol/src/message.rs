//! The messages of the native protocol.
//!
//! Requests borrow their strings and batch bytes from the frame, so the broker
//! decodes a produce without copying its records. Variant order is the wire
//! format: new variants go at the end, never in between.

use serde::{Deserialize, Serialize};

use crate::frame::FrameError;

/// The protocol version this crate speaks. A broker answers a handshake with
/// the highest version both sides know.
pub const PROTOCOL_VERSION: u16 = 1;

/// How long a producer waits before its produce is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acks {
    /// No response at all (fire and forget).
    None,
    /// Once the batch is appended to the log (readable, maybe not synced).
    Written,
    /// Once the batch is durable by the topic's fsync policy.
    Durable,
}

/// Writes a byte field as bytes: a length, then the bytes in one copy.
/// Serde's default for `[u8]` is a sequence, serialised one `u8` at a time;
/// postcard puts the same bytes on the wire either way, but a produce's
/// 64 KiB batch cost a call per byte, twice (sizing the frame, then writing
/// it): two thirds of a producer's CPU. Decoding borrows bytes already.
fn as_bytes<S: serde::Serializer>(bytes: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// Which partition a produce goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target<'a> {
    Partition(u32),
    /// Kafka's default partitioner: murmur2 of the key, so a key lands on the
    /// same partition whichever protocol wrote it.
    Key(#[serde(serialize_with = "as_bytes")] &'a [u8]),
    /// The broker picks, spreading batches over the partitions.
    Any,
}

/// Which offset a list-offsets asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OffsetSpec {
    Earliest,
    Latest,
    /// The first offset whose timestamp is at or after this time (ms).
    Timestamp(i64),
}

/// Typed error codes; the message beside them is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    UnknownTopic,
    UnknownPartition,
    OffsetOutOfRange,
    InvalidBatch,
    BatchTooLarge,
    QuotaExceeded,
    DiskFull,
    StorageError,
    TopicExists,
    InvalidRequest,
    InvalidConfig,
    UnsupportedVersion,
    HandshakeRequired,
    TooManyRequests,
    ShuttingDown,
    Internal,
    UnknownGroup,
    /// An idempotent producer's batch is not the next in its sequence.
    OutOfOrderSequence,
    /// An idempotent producer was fenced by a newer epoch of itself.
    InvalidProducerEpoch,
    /// The broker has no sequence state for this producer (expired).
    UnknownProducerId,
}

impl ErrorCode {
    /// Whether the same request may succeed if sent again later.
    pub fn retriable(self) -> bool {
        matches!(
            self,
            Self::QuotaExceeded
                | Self::DiskFull
                | Self::StorageError
                | Self::TooManyRequests
                | Self::ShuttingDown
        )
    }
}

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request<'a> {
    /// The first request on a connection.
    Handshake {
        protocol_version: u16,
        client_id: &'a str,
    },
    Ping,
    /// Appends one Kafka record batch (magic 2) to a topic.
    Produce {
        topic: &'a str,
        target: Target<'a>,
        acks: Acks,
        #[serde(serialize_with = "as_bytes")]
        batch: &'a [u8],
    },
    /// Reads whole batches from `offset`; waits up to `max_wait_ms` for at
    /// least `min_bytes` when the partition has less.
    Fetch {
        topic: &'a str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        min_bytes: u32,
        max_wait_ms: u32,
    },
    ListOffsets {
        topic: &'a str,
        partition: u32,
        at: OffsetSpec,
    },
    /// Topics and partitions; all topics when `topic` is `None`.
    Metadata {
        topic: Option<&'a str>,
    },
    /// `settings` holds `key=value` lines overriding the broker's topic defaults.
    CreateTopic {
        name: &'a str,
        partitions: u32,
        settings: &'a str,
    },
    DescribeTopic {
        name: &'a str,
    },
    /// Changes settings (`key=value` lines) and, when larger, the partition count.
    AlterTopic {
        name: &'a str,
        partitions: Option<u32>,
        settings: &'a str,
    },
    DeleteTopic {
        name: &'a str,
    },
    CommitOffset {
        group: &'a str,
        topic: &'a str,
        partition: u32,
        offset: i64,
    },
    FetchOffset {
        group: &'a str,
        topic: &'a str,
        partition: u32,
    },
    ListGroups,
    Status,
}

/// A partition as metadata describes it.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u32,
    pub shard: u32,
    pub log_start_offset: i64,
    pub next_offset: i64,
    pub size_bytes: u64,
}

/// A topic as metadata describes it.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: alloc::string::String,
    pub partitions: alloc::vec::Vec<PartitionInfo>,
    /// The topic's settings as `key=value` lines.
    pub settings: alloc::string::String,
}

/// A group's committed offsets.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub group: alloc::string::String,
    /// (topic, partition, committed offset)
    pub offsets: alloc::vec::Vec<(alloc::string::String, u32, i64)>,
}

/// The broker's state, for `rill status`.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: alloc::string::String,
    pub io_driver: alloc::string::String,
    pub io_driver_reason: alloc::string::String,
    pub shards: u32,
    pub profile: alloc::string::String,
    pub topics: u32,
    pub partitions: u32,
    pub connections: u32,
    pub data_bytes: u64,
    pub disk_quota_bytes: Option<u64>,
    pub uptime_ms: u64,
}

/// A response from the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response<'a> {
    HandshakeOk {
        protocol_version: u16,
        broker_version: &'a str,
        frame_bytes_max: u32,
    },
    Pong,
    Produced {
        partition: u32,
        base_offset: i64,
        last_offset: i64,
        log_append_time_ms: Option<i64>,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
    },
    /// Followed, inside the same frame, by `records_bytes` of raw batches.
    Fetched {
        partition: u32,
        high_watermark: i64,
        log_start_offset: i64,
        next_offset: i64,
        records_bytes: u32,
    },
    Offset {
        offset: Option<i64>,
    },
    Done,
    CommittedOffset {
        offset: Option<i64>,
    },
    #[cfg(feature = "alloc")]
    Metadata {
        topics: alloc::vec::Vec<TopicInfo>,
    },
    #[cfg(feature = "alloc")]
    Groups {
        groups: alloc::vec::Vec<GroupInfo>,
    },
    #[cfg(feature = "alloc")]
    Status(StatusInfo),
}

/// A request with its correlation id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame<'a> {
    pub correlation_id: u32,
    #[serde(borrow)]
    pub request: Request<'a>,
}

/// A response with the correlation id of its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseFrame<'a> {
    pub correlation_id: u32,
    #[serde(borrow)]
    pub response: Response<'a>,
}

impl<'a> RequestFrame<'a> {
    /// Decodes a frame body. Bytes after the message are an error.
    pub fn decode(body: &'a [u8]) -> Result<Self, FrameError> {
        match postcard::take_from_bytes::<Self>(body) {
            Ok((frame, [])) => Ok(frame),
            _ => Err(FrameError::Malformed),
        }
    }
}

impl<'a> ResponseFrame<'a> {
    /// Decodes a frame body; returns the message and the raw bytes after it
    /// (the batches of a fetch response, empty otherwise).
    pub fn decode(body: &'a [u8]) -> Result<(Self, &'a [u8]), FrameError> {
        postcard::take_from_bytes::<Self>(body).map_err(|_| FrameError::Malformed)
    }
}
