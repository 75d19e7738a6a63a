//! The four codecs Kafka batches use, on their maintained crates:
//! gzip (`flate2` on `miniz_oxide`), snappy (`snap`, in the xerial framing
//! Kafka's Java client writes; raw snappy is read too), lz4 (`lz4_flex`,
//! the LZ4 frame format with independent 64 KiB blocks, as Kafka's Java
//! client writes it) and zstd (`zstd`, the reference library).
//!
//! Decompression is bounded: nothing produces more than the caller's
//! `bytes_max`, and no length read from the input sizes an allocation
//! before it is checked against that bound, so a hostile or corrupt batch
//! costs at most the bound.

use std::io::{Read, Write};

use rill_core::batch::Compression;

/// zstd level 3: zstd's default, the same as Kafka's Java client.
const ZSTD_LEVEL: i32 = 3;
/// A zstd frame may ask for a window of up to 2^WINDOW_LOG bytes of
/// decoder memory; 16 MiB is plenty for batches of a few MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;
/// Xerial snappy blocks, as snappy-java writes them.
const SNAPPY_BLOCK_BYTES: usize = 32 * 1024;
const SNAPPY_XERIAL_MAGIC: &[u8; 16] = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";

/// Why a records section could not be compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("{codec:?} data decompresses to more than {bytes_max} bytes")]
    TooLarge {
        codec: Compression,
        bytes_max: usize,
    },
    #[error("{codec:?} data is corrupt: {reason}")]
    Corrupt { codec: Compression, reason: String },
    #[error("{codec:?} compression failed: {reason}")]
    Compress { codec: Compression, reason: String },
}

pub(crate) fn compress(codec: Compression, input: &[u8]) -> Result<Vec<u8>, CodecError> {
    let failed = |error: &dyn std::fmt::Display| CodecError::Compress {
        codec,
        reason: error.to_string(),
    };
    match codec {
        Compression::None => Ok(input.to_vec()),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(input).map_err(|e| failed(&e))?;
            encoder.finish().map_err(|e| failed(&e))
        }
        Compression::Snappy => {
            let mut output = SNAPPY_XERIAL_MAGIC.to_vec();
            let mut encoder = snap::raw::Encoder::new();
            for block in input.chunks(SNAPPY_BLOCK_BYTES) {
                let compressed = encoder.compress_vec(block).map_err(|e| failed(&e))?;
                let length = u32::try_from(compressed.len()).map_err(|e| failed(&e))?;
                output.extend_from_slice(&length.to_be_bytes());
                output.extend_from_slice(&compressed);
            }
            Ok(output)
        }
        Compression::Lz4 => {
            let info = lz4_flex::frame::FrameInfo::new()
                .block_size(lz4_flex::frame::BlockSize::Max64KB)
                .block_mode(lz4_flex::frame::BlockMode::Independent);
            let mut encoder = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
            encoder.write_all(input).map_err(|e| failed(&e))?;
            encoder.finish().map_err(|e| failed(&e))
        }
        Compression::Zstd => zstd::bulk::compress(input, ZSTD_LEVEL).map_err(|e| failed(&e)),
    }
}

/// Reads at most `bytes_max` bytes from `reader`; more is an error.
fn read_bounded(
    codec: Compression,
    reader: impl Read,
    bytes_max: usize,
) -> Result<Vec<u8>, CodecError> {
    let mut output = Vec::new();
    let limit = u64::try_from(bytes_max)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut output)
        .map_err(|e| CodecError::Corrupt {
            codec,
            reason: e.to_string(),
        })?;
    if output.len() > bytes_max {
        return Err(CodecError::TooLarge { codec, bytes_max });
    }
    Ok(output)
}

fn snappy_block(
    codec: Compression,
    block: &[u8],
    output: &mut Vec<u8>,
    bytes_max: usize,
) -> Result<(), CodecError> {
    let corrupt = |e: snap::Error| CodecError::Corrupt {
        codec,
        reason: e.to_string(),
    };
    let length = snap::raw::decompress_len(block).map_err(corrupt)?;
    if output.len().saturating_add(length) > bytes_max {
        return Err(CodecError::TooLarge { codec, bytes_max });
    }
    let start = output.len();
    output.resize(start + length, 0);
    let written = snap::raw::Decoder::new()
        .decompress(block, &mut output[start..])
        .map_err(corrupt)?;
    output.truncate(start + written);
    Ok(())
}

pub(crate) fn decompress(
    codec: Compression,
    input: &[u8],
    bytes_max: usize,
) -> Result<Vec<u8>, CodecError> {
    let corrupt = |reason: &str| CodecError::Corrupt {
        codec,
        reason: reason.to_owned(),
    };
    match codec {
        Compression::None => {
            if input.len() > bytes_max {
                return Err(CodecError::TooLarge { codec, bytes_max });
            }
            Ok(input.to_vec())
        }
        Compression::Gzip => {
            read_bounded(codec, flate2::read::MultiGzDecoder::new(input), bytes_max)
        }
        Compression::Lz4 => {
            read_bounded(codec, lz4_flex::frame::FrameDecoder::new(input), bytes_max)
        }
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| corrupt(&e.to_string()))?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| corrupt(&e.to_string()))?;
            read_bounded(codec, decoder, bytes_max)
        }
        Compression::Snappy => {
            let mut output = Vec::new();
            let Some(mut rest) = input.strip_prefix(SNAPPY_XERIAL_MAGIC.as_slice()) else {
                // Raw snappy, as some clients write it.
                snappy_block(codec, input, &mut output, bytes_max)?;
                return Ok(output);
            };
            while !rest.is_empty() {
                let Some((length, after)) = rest.split_first_chunk::<4>() else {
                    return Err(corrupt("xerial block length cut short"));
                };
                let length = u32::from_be_bytes(*length) as usize;
                if length > after.len() {
                    return Err(corrupt("xerial block runs past the end"));
                }
                let (block, after) = after.split_at(length);
                snappy_block(codec, block, &mut output, bytes_max)?;
                rest = after;
            }
            Ok(output)
        }
    }
}
