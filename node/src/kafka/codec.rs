//! Kafka framing: a 4-byte big-endian size, a request header whose version
//! depends on the API and its version, then the body. Responses mirror it.

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};
use rill_protocol::FrameError;

/// Bytes of the size prefix.
pub const SIZE_BYTES: usize = 4;

/// Splits the first whole frame off `buffer`: its body (without the size)
/// and the bytes the frame took. A negative or too-large size is an error.
pub fn split_frame(
    buffer: &[u8],
    frame_bytes_max: u32,
) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(prefix) = buffer.get(..SIZE_BYTES) else {
        return Ok(None);
    };
    let size = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if size < 0 {
        return Err(FrameError::Malformed);
    }
    let size = size as u32;
    if size > frame_bytes_max {
        return Err(FrameError::TooLarge {
            body_bytes: size,
            frame_bytes_max,
        });
    }
    let total = SIZE_BYTES + size as usize;
    if buffer.len() < total {
        return Ok(None);
    }
    Ok(Some((&buffer[SIZE_BYTES..total], total)))
}

/// The whole length of the frame `buffer` starts with, once its size is in.
pub fn declared_length(buffer: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = buffer.get(..SIZE_BYTES)?.try_into().ok()?;
    let size = i32::from_be_bytes(prefix);
    (size >= 0).then(|| size as usize + SIZE_BYTES)
}

/// The fixed start of every request header (all header versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peek {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

/// Reads the API key, version and correlation id without decoding the rest.
pub fn peek(body: &[u8]) -> Option<Peek> {
    let fixed = body.get(..8)?;
    Some(Peek {
        api_key: i16::from_be_bytes([fixed[0], fixed[1]]),
        api_version: i16::from_be_bytes([fixed[2], fixed[3]]),
        correlation_id: i32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
    })
}

/// Decodes the request header, leaving `body` at the request itself.
pub fn decode_header(
    api_key: ApiKey,
    version: i16,
    body: &mut Bytes,
) -> anyhow::Result<RequestHeader> {
    RequestHeader::decode(body, api_key.request_header_version(version))
}

/// Decodes a request of type `R` at `version` and checks nothing is left over.
pub fn decode_request<R: Decodable>(body: &mut Bytes, version: i16) -> anyhow::Result<R> {
    let request = R::decode(body, version)?;
    if body.has_remaining() {
        anyhow::bail!("{} bytes after the request", body.remaining());
    }
    Ok(request)
}

/// What a request frame's body turned out to be.
#[derive(Debug)]
pub enum Decoded {
    /// A served API at a served version, decoded.
    Request {
        api_key: ApiKey,
        version: i16,
        header: RequestHeader,
        request: Box<RequestKind>,
    },
    /// ApiVersions at a version newer than served: answered with v0 and
    /// UNSUPPORTED_VERSION so the client can retry.
    ApiVersionsTooNew { correlation_id: i32 },
    /// Anything else: the connection closes, as Kafka brokers do.
    Refused(String),
}

/// Decodes a request frame's body (the bytes after the size), checking the
/// API and version against what is served before decoding anything else.
pub fn decode_request_frame(body: &Bytes) -> Decoded {
    let Some(peek) = peek(body) else {
        return Decoded::Refused(format!(
            "request of {} bytes is shorter than its header",
            body.len()
        ));
    };
    let Ok(api_key) = ApiKey::try_from(peek.api_key) else {
        return Decoded::Refused(format!("unknown API key {}", peek.api_key));
    };
    let version = peek.api_version;
    if !super::api::serves(api_key, version) {
        if api_key == ApiKey::ApiVersions && version > 0 {
            return Decoded::ApiVersionsTooNew {
                correlation_id: peek.correlation_id,
            };
        }
        return Decoded::Refused(format!("{api_key:?} v{version} is not served"));
    }
    // A large produce's records are decoded as slices of the frame, which
    // shares the connection's read buffer: they go to their shard without a
    // copy and are dropped once appended (`batch_bytes`). Every other
    // request is decoded from a copy, since what it decodes to (names, ids)
    // may be kept for long.
    let mut bytes = if api_key == ApiKey::Produce {
        crate::broker::connection::batch_bytes(body, body)
    } else {
        Bytes::copy_from_slice(body)
    };
    let header = match decode_header(api_key, version, &mut bytes) {
        Ok(header) => header,
        Err(error) => return Decoded::Refused(format!("malformed request header: {error}")),
    };
    if api_key == ApiKey::OffsetCommit && version < 2 {
        return match legacy::offset_commit(&mut bytes, version) {
            // Answered as v2, whose answer is laid out as v0's and v1's.
            Ok(request) => Decoded::Request {
                api_key,
                version: 2,
                header,
                request: Box::new(RequestKind::OffsetCommit(request)),
            },
            Err(error) => Decoded::Refused(format!("malformed {api_key:?} v{version}: {error}")),
        };
    }
    match RequestKind::decode(api_key, &mut bytes, version) {
        Ok(request) => Decoded::Request {
            api_key,
            version,
            header,
            request: Box::new(request),
        },
        Err(error) => Decoded::Refused(format!("malformed {api_key:?} v{version}: {error}")),
    }
}

/// Request versions the codecs no longer decode (`api::LEGACY`), read by
/// hand with every count checked against the bytes left.
pub mod legacy {
    use bytes::{Buf, Bytes};
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::{GroupId, OffsetCommitRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;

    fn need(body: &Bytes, bytes: usize, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(body.remaining() >= bytes, "the request ends inside {what}");
        Ok(())
    }

    fn string(body: &mut Bytes, what: &str) -> anyhow::Result<Option<StrBytes>> {
        need(body, 2, what)?;
        let length = body.get_i16();
        if length < 0 {
            return Ok(None);
        }
        let length = length as usize;
        need(body, length, what)?;
        let bytes = body.split_to(length);
        StrBytes::from_utf8(bytes)
            .map(Some)
            .map_err(|_| anyhow::anyhow!("{what} is not UTF-8"))
    }

    /// An array's count, which must fit in what is left at `element_bytes`
    /// (the least an element takes) apiece.
    fn count(body: &mut Bytes, element_bytes: usize, what: &str) -> anyhow::Result<usize> {
        need(body, 4, what)?;
        let count = body.get_i32();
        anyhow::ensure!(count >= 0, "{what} is null");
        let count = count as usize;
        anyhow::ensure!(
            count.saturating_mul(element_bytes) <= body.remaining(),
            "{what} claims {count} entries in {} bytes",
            body.remaining()
        );
        Ok(count)
    }

    /// OffsetCommit v0 (group, topics) and v1 (with generation, member id
    /// and a per-partition timestamp, ignored as Kafka did), as the request
    /// the handler takes.
    pub fn offset_commit(body: &mut Bytes, version: i16) -> anyhow::Result<OffsetCommitRequest> {
        let group_id = string(body, "the group id")?.unwrap_or_default();
        let (generation, member_id) = if version >= 1 {
            need(body, 4, "the generation")?;
            let generation = body.get_i32();
            (
                generation,
                string(body, "the member id")?.unwrap_or_default(),
            )
        } else {
            (-1, StrBytes::default())
        };
        let partition_bytes = if version >= 1 {
            4 + 8 + 8 + 2
        } else {
            4 + 8 + 2
        };
        let topics = count(body, 2 + 4, "the topics")?;
        let mut request_topics = Vec::with_capacity(topics);
        for _ in 0..topics {
            let name = string(body, "a topic name")?.unwrap_or_default();
            let partitions = count(body, partition_bytes, "the partitions")?;
            let mut request_partitions = Vec::with_capacity(partitions);
            for _ in 0..partitions {
                need(body, 12, "a partition")?;
                let index = body.get_i32();
                let offset = body.get_i64();
                if version >= 1 {
                    need(body, 8, "a commit timestamp")?;
                    let _timestamp = body.get_i64();
                }
                let metadata = string(body, "commit metadata")?;
                request_partitions.push(
                    OffsetCommitRequestPartition::default()
                        .with_partition_index(index)
                        .with_committed_offset(offset)
                        .with_committed_metadata(metadata),
                );
            }
            request_topics.push(
                OffsetCommitRequestTopic::default()
                    .with_name(TopicName(name))
                    .with_partitions(request_partitions),
            );
        }
        anyhow::ensure!(
            !body.has_remaining(),
            "{} bytes after the request",
            body.remaining()
        );
        Ok(OffsetCommitRequest::default()
            .with_group_id(GroupId(group_id))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(member_id)
            .with_topics(request_topics))
    }
}

/// A whole response frame: size, header, body.
pub fn encode_response<R: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    response: &R,
) -> anyhow::Result<Vec<u8>> {
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let header_version = R::header_version(version);
    let size = header.compute_size(header_version)? + response.compute_size(version)?;
    let mut out = BytesMut::with_capacity(SIZE_BYTES + size);
    out.extend_from_slice(&(size as i32).to_be_bytes());
    header.encode(&mut out, header_version)?;
    response.encode(&mut out, version)?;
    // The buffer becomes the Vec without a copy.
    Ok(Vec::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_request_frame_of(body: &[u8]) -> Decoded {
        decode_request_frame(&Bytes::copy_from_slice(body))
    }

    #[test]
    fn frames_split_on_their_size_and_bad_sizes_are_refused() {
        let mut frame = 5i32.to_be_bytes().to_vec();
        frame.extend_from_slice(b"hello");
        frame.extend_from_slice(&[0, 0]);
        assert_eq!(split_frame(&frame[..6], 100), Ok(None));
        assert_eq!(split_frame(&frame, 100), Ok(Some((&b"hello"[..], 9))));
        assert_eq!(declared_length(&frame), Some(9));
        assert_eq!(
            split_frame(&(-1i32).to_be_bytes(), 100),
            Err(FrameError::Malformed)
        );
        assert!(matches!(
            split_frame(&200i32.to_be_bytes(), 100),
            Err(FrameError::TooLarge { .. })
        ));
    }

    fn request_body(api_key: i16, version: i16, rest: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&api_key.to_be_bytes());
        body.extend_from_slice(&version.to_be_bytes());
        body.extend_from_slice(&42i32.to_be_bytes());
        body.extend_from_slice(&(-1i16).to_be_bytes()); // null client id
        body.extend_from_slice(rest);
        body
    }

    #[test]
    fn requests_are_checked_against_served_versions_before_decoding() {
        // Metadata v1 asking for all topics (null array).
        let body = request_body(3, 1, &(-1i32).to_be_bytes());
        assert!(matches!(
            decode_request_frame_of(&body),
            Decoded::Request {
                api_key: ApiKey::Metadata,
                version: 1,
                ..
            }
        ));
        assert!(matches!(
            decode_request_frame_of(&request_body(18, 127, &[])),
            Decoded::ApiVersionsTooNew { correlation_id: 42 }
        ));
        assert!(matches!(
            decode_request_frame_of(&request_body(999, 0, &[])),
            Decoded::Refused(_)
        ));
        assert!(matches!(
            decode_request_frame_of(&request_body(1, 99, &[])),
            Decoded::Refused(_)
        ));
        assert!(matches!(
            decode_request_frame_of(&[0, 3]),
            Decoded::Refused(_)
        ));
        // Transactions are not served: EndTxn is refused, not decoded.
        assert!(matches!(
            decode_request_frame_of(&request_body(26, 0, &[])),
            Decoded::Refused(_)
        ));
    }

    #[test]
    fn an_array_count_beyond_the_frame_is_refused_without_allocating_it() {
        // Metadata v1 claiming i32::MAX topics in a few bytes: the patched
        // codec refuses it instead of reserving ~100 GB and aborting.
        let body = request_body(3, 1, &i32::MAX.to_be_bytes());
        assert!(matches!(
            decode_request_frame_of(&body),
            Decoded::Refused(_)
        ));
        // The same through a compact (flexible-version) array: Metadata v9.
        let mut flexible = request_body(3, 9, &[]);
        flexible.push(0); // header tagged fields
        flexible.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // varint 2^32 - 1
        assert!(matches!(
            decode_request_frame_of(&flexible),
            Decoded::Refused(_)
        ));
    }

    #[test]
    fn peek_reads_the_fixed_header() {
        let body = [0, 18, 0, 3, 0, 0, 0, 7, 0xff];
        assert_eq!(
            peek(&body),
            Some(Peek {
                api_key: 18,
                api_version: 3,
                correlation_id: 7
            })
        );
        assert_eq!(peek(&body[..7]), None);
    }
}

#[cfg(test)]
mod legacy_tests {
    use bytes::{BufMut, BytesMut};

    use super::legacy::offset_commit;

    fn string(out: &mut BytesMut, text: &str) {
        out.put_i16(text.len() as i16);
        out.put_slice(text.as_bytes());
    }

    fn v1_request(partitions: i32) -> BytesMut {
        let mut out = BytesMut::new();
        string(&mut out, "group");
        out.put_i32(7);
        string(&mut out, "member-1");
        out.put_i32(1);
        string(&mut out, "orders");
        out.put_i32(partitions);
        for index in 0..partitions.clamp(0, 2) {
            out.put_i32(index);
            out.put_i64(100 + i64::from(index));
            out.put_i64(1_700_000_000_000);
            out.put_i16(-1);
        }
        out
    }

    #[test]
    fn offset_commit_v1_and_v0_decode_into_the_request() {
        let request = offset_commit(&mut v1_request(2).freeze(), 1).expect("v1");
        assert_eq!(request.group_id.0.as_str(), "group");
        assert_eq!(request.generation_id_or_member_epoch, 7);
        assert_eq!(request.member_id.as_str(), "member-1");
        let topic = &request.topics[0];
        assert_eq!(topic.name.0.as_str(), "orders");
        let offsets: Vec<(i32, i64)> = topic
            .partitions
            .iter()
            .map(|partition| (partition.partition_index, partition.committed_offset))
            .collect();
        assert_eq!(offsets, [(0, 100), (1, 101)]);

        let mut v0 = BytesMut::new();
        string(&mut v0, "group");
        v0.put_i32(1);
        string(&mut v0, "orders");
        v0.put_i32(1);
        v0.put_i32(3);
        v0.put_i64(42);
        string(&mut v0, "meta");
        let request = offset_commit(&mut v0.freeze(), 0).expect("v0");
        assert_eq!(request.generation_id_or_member_epoch, -1);
        assert_eq!(request.topics[0].partitions[0].committed_offset, 42);
    }

    #[test]
    fn bad_legacy_requests_are_errors_not_allocations() {
        // A count far beyond the bytes that follow.
        assert!(offset_commit(&mut v1_request(i32::MAX).freeze(), 1).is_err());
        // Cut anywhere.
        let whole = v1_request(2).freeze();
        for length in 0..whole.len() {
            assert!(
                offset_commit(&mut whole.slice(..length), 1).is_err(),
                "a request cut at {length} bytes decoded"
            );
        }
        // Trailing bytes.
        let mut long = v1_request(2);
        long.put_u8(0);
        assert!(offset_commit(&mut long.freeze(), 1).is_err());
    }
}
