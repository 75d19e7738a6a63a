//! The client's error type. Each variant is a case a caller branches on
//! (retry, reconnect, fix the request, report a bug), and each message tells a
//! person what to do next.

use std::fmt;
use std::io;

use rill_protocol::ErrorCode;

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The TCP connection could not be made (refused, unreachable, timed out).
    Connect { address: String, source: io::Error },
    /// Writing this request to the socket failed.
    Io(io::Error),
    /// The broker sent bytes this client cannot understand: a bug or a
    /// version mismatch on one side.
    Protocol(String),
    /// The broker understood the request and refused it.
    Broker { code: ErrorCode, message: String },
    /// No answer within the configured time.
    Timeout {
        request: &'static str,
        after_ms: u64,
    },
    /// The connection is gone; in-flight and later requests fail with the reason.
    Closed { reason: String },
    /// The request frame is larger than the broker accepts; nothing was sent.
    RequestTooLarge {
        frame_bytes: usize,
        frame_bytes_max: u32,
    },
    /// An argument cannot be encoded (a setting with a newline, say); nothing was sent.
    InvalidArgument(String),
}

impl ClientError {
    /// Whether the same request may succeed if sent again later, on this
    /// connection or a new one.
    pub fn retriable(&self) -> bool {
        match self {
            Self::Broker { code, .. } => code.retriable(),
            Self::Connect { .. } | Self::Timeout { .. } | Self::Closed { .. } | Self::Io(_) => true,
            Self::Protocol(_) | Self::RequestTooLarge { .. } | Self::InvalidArgument(_) => false,
        }
    }
}

/// Short words for the connect errors people meet most, instead of the OS text.
fn describe_connect_error(source: &io::Error) -> String {
    match source.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::TimedOut => format!("timed out ({source})"),
        _ => source.to_string(),
    }
}

/// What to do about a broker error code, when there is something to say.
fn broker_hint(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::UnknownTopic => {
            "; check the name with `rill topic list` or create it with `rill topic create`"
        }
        ErrorCode::UnknownPartition => "; see the topic's partitions with `rill topic describe`",
        ErrorCode::OffsetOutOfRange => {
            "; the offset is before the log start or past its end: start from earliest or latest"
        }
        ErrorCode::BatchTooLarge => "; send fewer records per batch",
        ErrorCode::UnsupportedVersion | ErrorCode::HandshakeRequired => {
            "; client and broker versions differ: use a `rill` of the broker's version"
        }
        ErrorCode::QuotaExceeded | ErrorCode::DiskFull => {
            "; the broker's disk quota is used up: wait for retention or raise the quota"
        }
        ErrorCode::TooManyRequests | ErrorCode::ShuttingDown | ErrorCode::StorageError => {
            "; retry later"
        }
        ErrorCode::UnknownGroup => "; list groups with `rill group list`",
        ErrorCode::OutOfOrderSequence
        | ErrorCode::InvalidProducerEpoch
        | ErrorCode::UnknownProducerId => {
            "; the producer's sequence state does not match the broker's: start a new producer session"
        }
        ErrorCode::InvalidBatch
        | ErrorCode::TopicExists
        | ErrorCode::InvalidRequest
        | ErrorCode::InvalidConfig
        | ErrorCode::Internal => "",
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { address, source } => write!(
                formatter,
                "broker unreachable at {address}: {}; is `rill serve` running?",
                describe_connect_error(source)
            ),
            Self::Io(source) => write!(
                formatter,
                "sending to the broker failed: {source}; check that the broker is still running"
            ),
            Self::Protocol(detail) => write!(
                formatter,
                "protocol error: {detail}; client and broker may be different versions, or this is a bug worth reporting"
            ),
            Self::Broker { code, message } => write!(
                formatter,
                "broker refused the request ({code:?}): {message}{}",
                broker_hint(*code)
            ),
            Self::Timeout { request, after_ms } => write!(
                formatter,
                "no answer to {request} within {after_ms} ms; the broker may be overloaded (see `rill status`) or the timeout too short"
            ),
            Self::Closed { reason } => write!(
                formatter,
                "connection to the broker closed: {reason}; connect again to retry"
            ),
            Self::RequestTooLarge {
                frame_bytes,
                frame_bytes_max,
            } => write!(
                formatter,
                "request of {frame_bytes} bytes exceeds the broker's frame limit of {frame_bytes_max} bytes; send smaller batches or raise the broker's frame_bytes_max"
            ),
            Self::InvalidArgument(detail) => write!(formatter, "invalid argument: {detail}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect { source, .. } | Self::Io(source) => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_refused_says_what_to_do() {
        let error = ClientError::Connect {
            address: "127.0.0.1:7470".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(
            error.to_string(),
            "broker unreachable at 127.0.0.1:7470: connection refused; is `rill serve` running?"
        );
        assert!(error.retriable());
    }

    #[test]
    fn broker_errors_carry_code_message_and_hint() {
        let error = ClientError::Broker {
            code: ErrorCode::UnknownTopic,
            message: "no topic `sensors`".into(),
        };
        let text = error.to_string();
        assert!(
            text.starts_with("broker refused the request (UnknownTopic): no topic `sensors`; ")
        );
        assert!(text.contains("rill topic create"));
        assert!(!error.retriable());
    }
}
