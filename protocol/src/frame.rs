//! Frames: a little-endian `u32` body length, then the body.
//!
//! The reader never trusts a length: a frame longer than the receiver's
//! `frame_bytes_max` is an error before any byte of it is buffered, so a
//! hostile peer cannot make the other side allocate.

use serde::Serialize;

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Why bytes could not be framed or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The declared body is larger than the limit.
    TooLarge {
        body_bytes: u32,
        frame_bytes_max: u32,
    },
    /// The body is not a valid message.
    Malformed,
    /// The output buffer is too small for the frame.
    BufferFull,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLarge {
                body_bytes,
                frame_bytes_max,
            } => write!(
                formatter,
                "frame of {body_bytes} bytes exceeds the limit of {frame_bytes_max} bytes (frame_bytes_max)"
            ),
            Self::Malformed => formatter.write_str("frame body is not a valid message"),
            Self::BufferFull => formatter.write_str("output buffer too small for the frame"),
        }
    }
}

/// Finds the first whole frame in `buffer`. Returns its body and the bytes it
/// took, `None` when more bytes are needed, or an error for an oversized frame.
pub fn split_frame(
    buffer: &[u8],
    frame_bytes_max: u32,
) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buffer.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let body_bytes = u32::from_le_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
    if body_bytes > frame_bytes_max {
        return Err(FrameError::TooLarge {
            body_bytes,
            frame_bytes_max,
        });
    }
    let total = FRAME_HEADER_BYTES + body_bytes as usize;
    if buffer.len() < total {
        return Ok(None);
    }
    Ok(Some((&buffer[FRAME_HEADER_BYTES..total], total)))
}

/// Encodes `message` as a whole frame into `out`; returns the frame length.
/// `trailing_bytes` are bytes the caller will send right after the frame and
/// that count in its length (a fetch response's raw batches).
pub fn encode_frame_into<T: Serialize>(
    message: &T,
    trailing_bytes: u32,
    out: &mut [u8],
) -> Result<usize, FrameError> {
    if out.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::BufferFull);
    }
    let (header, body) = out.split_at_mut(FRAME_HEADER_BYTES);
    let used = postcard::to_slice(message, body)
        .map_err(|_| FrameError::BufferFull)?
        .len();
    let length = u32::try_from(used)
        .ok()
        .and_then(|used| used.checked_add(trailing_bytes))
        .ok_or(FrameError::BufferFull)?;
    header.copy_from_slice(&length.to_le_bytes());
    Ok(FRAME_HEADER_BYTES + used)
}

/// Encodes `message` as a whole frame into a heapless buffer.
pub fn encode_frame_heapless<T: Serialize, const N: usize>(
    message: &T,
    out: &mut heapless::Vec<u8, N>,
) -> Result<(), FrameError> {
    out.clear();
    out.resize(N, 0).map_err(|_| FrameError::BufferFull)?;
    let length = encode_frame_into(message, 0, out)?;
    out.truncate(length);
    Ok(())
}

/// Encodes `message` as a whole frame, appended to `out`.
#[cfg(feature = "alloc")]
pub fn encode_frame_vec<T: Serialize>(
    message: &T,
    trailing_bytes: u32,
    out: &mut alloc::vec::Vec<u8>,
) {
    let start = out.len();
    // Measured first, then written straight into `out`: a produce request's
    // batch is copied once, into the frame, not grown and copied again.
    // Encoding to a Vec cannot run out of room; a failure is a bug in a type.
    let body_bytes =
        postcard::experimental::serialized_size(message).expect("message types always serialise");
    out.reserve(FRAME_HEADER_BYTES + body_bytes);
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    *out =
        postcard::to_extend(message, core::mem::take(out)).expect("message types always serialise");
    let length = ((out.len() - start - FRAME_HEADER_BYTES) as u32).saturating_add(trailing_bytes);
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&length.to_le_bytes());
}
