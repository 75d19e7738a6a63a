//! Where log errors become wire error codes: one place, so every protocol
//! answers the same failure the same way.

use rill_core::log::{AppendError, ReadError};
use rill_protocol::ErrorCode;

/// A failed operation: the code a client branches on and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{:?}: {}", self.code, self.message)
    }
}

pub fn append_error(error: &AppendError) -> OpError {
    let code = match error {
        AppendError::InvalidBatch(_) => ErrorCode::InvalidBatch,
        AppendError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
        AppendError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        AppendError::DiskFull { .. } => ErrorCode::DiskFull,
        AppendError::Io { .. } | AppendError::Poisoned { .. } => ErrorCode::StorageError,
    };
    OpError::new(code, error.to_string())
}

pub fn read_error(error: &ReadError) -> OpError {
    let code = match error {
        ReadError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        ReadError::Corrupt { .. } | ReadError::Io { .. } => ErrorCode::StorageError,
    };
    OpError::new(code, error.to_string())
}
