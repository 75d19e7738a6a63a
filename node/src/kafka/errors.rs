//! Kafka error codes for Rill's typed errors: one table, so every Kafka API
//! answers the same failure the same way.

use rill_protocol::ErrorCode;

use crate::broker::errors::OpError;

pub const NONE: i16 = 0;
pub const UNKNOWN_SERVER_ERROR: i16 = -1;
pub const OFFSET_OUT_OF_RANGE: i16 = 1;
pub const CORRUPT_MESSAGE: i16 = 2;
pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
pub const REQUEST_TIMED_OUT: i16 = 7;
pub const MESSAGE_TOO_LARGE: i16 = 10;
pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
pub const INVALID_REQUIRED_ACKS: i16 = 21;
pub const UNSUPPORTED_VERSION: i16 = 35;
pub const TOPIC_ALREADY_EXISTS: i16 = 36;
pub const INVALID_PARTITIONS: i16 = 37;
pub const INVALID_REPLICATION_FACTOR: i16 = 38;
pub const INVALID_CONFIG: i16 = 40;
pub const INVALID_REQUEST: i16 = 42;
pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
pub const INVALID_PRODUCER_EPOCH: i16 = 47;
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
pub const KAFKA_STORAGE_ERROR: i16 = 56;
pub const UNKNOWN_PRODUCER_ID: i16 = 59;
pub const GROUP_ID_NOT_FOUND: i16 = 69;
pub const FETCH_SESSION_ID_NOT_FOUND: i16 = 70;
pub const UNKNOWN_LEADER_EPOCH: i16 = 74;
pub const INVALID_RECORD: i16 = 87;

/// The Kafka code for a Rill error. Storage trouble and a full disk are
/// retriable there too (KAFKA_STORAGE_ERROR), so producers keep their data
/// and try again while retention or eviction makes room.
pub fn code_of(error: &OpError) -> i16 {
    match error.code {
        ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => UNKNOWN_TOPIC_OR_PARTITION,
        ErrorCode::OffsetOutOfRange => OFFSET_OUT_OF_RANGE,
        ErrorCode::InvalidBatch => CORRUPT_MESSAGE,
        ErrorCode::BatchTooLarge => MESSAGE_TOO_LARGE,
        ErrorCode::QuotaExceeded | ErrorCode::DiskFull | ErrorCode::StorageError => {
            KAFKA_STORAGE_ERROR
        }
        ErrorCode::TopicExists => TOPIC_ALREADY_EXISTS,
        ErrorCode::InvalidRequest | ErrorCode::HandshakeRequired => INVALID_REQUEST,
        ErrorCode::InvalidConfig => INVALID_CONFIG,
        ErrorCode::UnsupportedVersion => UNSUPPORTED_VERSION,
        ErrorCode::TooManyRequests => REQUEST_TIMED_OUT,
        // Clients refresh metadata and retry: what a restarting broker wants.
        ErrorCode::ShuttingDown => NOT_LEADER_OR_FOLLOWER,
        ErrorCode::Internal => UNKNOWN_SERVER_ERROR,
        ErrorCode::UnknownGroup => GROUP_ID_NOT_FOUND,
        ErrorCode::OutOfOrderSequence => OUT_OF_ORDER_SEQUENCE_NUMBER,
        ErrorCode::InvalidProducerEpoch => INVALID_PRODUCER_EPOCH,
        ErrorCode::UnknownProducerId => UNKNOWN_PRODUCER_ID,
    }
}
