//! Fetch: every requested partition read in request order within the
//! response's byte budget (the first batch always fits, as KIP-74 has it),
//! waiting up to `max_wait_ms` for `min_bytes` across them all. Rill keeps
//! no incremental fetch sessions: it answers session id 0, which tells a
//! client to send full fetch requests, as the protocol allows.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::oneshot;
use futures_util::future::{Either, select, select_all};
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::messages::fetch_response::{
    FetchResponse, FetchableTopicResponse, PartitionData,
};
use rill_protocol::OffsetSpec;

use super::connection::Context;
use super::errors;
use super::produce::encode;
use crate::broker::Shared;
use crate::broker::connection::{Outgoing, owner_of, read_fetch_ranges, send_as_ranges};
use crate::broker::shard::{FetchData, SendRange, ShardOp};

struct Wanted {
    /// The topic's segments are written with direct I/O (see
    /// [`send_as_ranges`]).
    direct_io: bool,
    topic: usize,
    partition: i32,
    offset: i64,
    partition_max_bytes: u64,
    /// The owning shard, or the error code the partition gets.
    owner: Result<usize, i16>,
}

struct Got {
    error_code: i16,
    high_watermark: i64,
    log_start_offset: i64,
    next_offset: i64,
    records: Option<Bytes>,
    /// Segment ranges to splice to the socket (then `tail` from memory),
    /// when the fetch is sent without copying; else the batches are all in
    /// `tail`. `records` is only the marker that stands in for them.
    ranges: Vec<SendRange>,
    tail: Vec<u8>,
}

impl Got {
    fn error(error_code: i16) -> Self {
        Self {
            error_code,
            high_watermark: -1,
            log_start_offset: -1,
            next_offset: -1,
            records: None,
            ranges: Vec::new(),
            tail: Vec::new(),
        }
    }

    fn bytes(&self) -> u64 {
        self.ranges.iter().map(|range| range.length).sum::<u64>() + self.tail.len() as u64
    }
}

/// Answers a fetch as the pieces to write: one frame, or (sent without
/// copying) frame bytes with segment ranges spliced in between.
pub(crate) async fn fetch(
    context: &Context,
    correlation_id: i32,
    version: i16,
    request: FetchRequest,
) -> Vec<Outgoing> {
    let shared = &context.shared;
    let limits = &shared.config.limits;
    if request.session_id != 0 {
        let response = FetchResponse::default()
            .with_error_code(errors::FETCH_SESSION_ID_NOT_FOUND)
            .with_session_id(0);
        return encode(correlation_id, version, &response)
            .map(Outgoing::Frame)
            .into_iter()
            .collect();
    }
    let response_max = u64::try_from(request.max_bytes)
        .unwrap_or(0)
        .clamp(1, u64::from(limits.fetch_bytes_max));
    let max_wait = Duration::from_millis(
        u64::try_from(request.max_wait_ms)
            .unwrap_or(0)
            .min(limits.fetch_wait_ms_max),
    );
    let min_bytes = u64::try_from(request.min_bytes).unwrap_or(0);
    let deadline = Instant::now() + max_wait;

    let mut names = Vec::with_capacity(request.topics.len());
    let mut wanted = Vec::new();
    for (topic_index, topic) in request.topics.iter().enumerate() {
        let name = topic.topic.0.as_str();
        names.push(topic.topic.clone());
        for partition in &topic.partitions {
            let owner = u32::try_from(partition.partition)
                .map_err(|_| errors::UNKNOWN_TOPIC_OR_PARTITION)
                .and_then(|index| {
                    owner_of(shared, &context.view, name, index)
                        .map_err(|error| errors::code_of(&error))
                });
            let direct_io = context
                .view
                .table
                .get(name)
                .is_none_or(|meta| meta.settings.direct_io);
            wanted.push(Wanted {
                direct_io,
                topic: topic_index,
                partition: partition.partition,
                offset: partition.fetch_offset,
                partition_max_bytes: u64::try_from(partition.partition_max_bytes)
                    .unwrap_or(0)
                    .max(1),
                owner,
            });
        }
    }

    // The answer's bytes count against the broker's buffer budget while
    // they are gathered.
    shared.buffers.take(response_max);
    let started = Instant::now();
    let got = loop {
        let got = read_all(context, &names, &wanted, response_max).await;
        let total: u64 = got.iter().map(Got::bytes).sum();
        let any_error = got.iter().any(|got| got.error_code != errors::NONE);
        let remaining = deadline.saturating_duration_since(Instant::now());
        if total >= min_bytes.max(1)
            || any_error
            || remaining.is_zero()
            || shared.is_shutting_down()
        {
            break got;
        }
        if !wait_for_any(context, &names, &wanted, &got, remaining).await {
            break read_all(context, &names, &wanted, response_max).await;
        }
    };
    shared.metrics.fetch_latency.record(started.elapsed());

    let mut responses: Vec<FetchableTopicResponse> = names
        .iter()
        .map(|name| FetchableTopicResponse::default().with_topic(name.clone()))
        .collect();
    // Records are stood in for by a marker while the answer is encoded,
    // then cut out and replaced by the segment ranges (spliced) or the
    // batches in memory (written as they are): never copied into the answer.
    let mut spliced = Vec::new();
    for (wanted, mut got) in wanted.iter().zip(got) {
        if got.bytes() > 0 {
            let marker = splice_marker(spliced.len());
            got.records = Some(Bytes::copy_from_slice(&marker));
            spliced.push(Spliced {
                marker,
                ranges: std::mem::take(&mut got.ranges),
                tail: std::mem::take(&mut got.tail),
            });
        }
        let data = PartitionData::default()
            .with_partition_index(wanted.partition)
            .with_error_code(got.error_code)
            .with_high_watermark(got.high_watermark)
            .with_last_stable_offset(got.high_watermark)
            .with_log_start_offset(got.log_start_offset)
            .with_aborted_transactions(Some(Vec::new()))
            .with_preferred_read_replica((-1).into())
            .with_records(got.records.or_else(|| Some(Bytes::new())));
        responses[wanted.topic].partitions.push(data);
    }
    let response = FetchResponse::default()
        .with_session_id(0)
        .with_responses(responses);
    let frame = encode(correlation_id, version, &response);
    shared.buffers.give_back(response_max);
    let Some(frame) = frame else {
        return Vec::new();
    };
    if spliced.is_empty() {
        return vec![Outgoing::Frame(frame)];
    }
    splice_pieces(&frame, spliced, version >= FLEXIBLE_VERSION).unwrap_or_else(|| {
        tracing::error!("a splice marker was not found in an encoded fetch answer");
        Vec::new()
    })
}

/// Fetch v12 and later encode with compact (varint-length) fields.
const FLEXIBLE_VERSION: i16 = 12;
/// Bytes of a splice marker: long and odd enough never to occur by chance
/// in the rest of an answer, which holds no record bytes.
const MARKER_BYTES: usize = 24;

/// One partition's records: segment ranges to splice, then bytes in memory.
struct Spliced {
    marker: [u8; MARKER_BYTES],
    ranges: Vec<SendRange>,
    tail: Vec<u8>,
}

fn splice_marker(index: usize) -> [u8; MARKER_BYTES] {
    let mut marker = *b"\xffrill-splice-marker\xff\0\0\0\0";
    marker[MARKER_BYTES - 4..].copy_from_slice(&(index as u32).to_be_bytes());
    marker
}

/// An unsigned varint as Kafka's compact fields write it.
fn unsigned_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Cuts each marker (and its length field) out of the encoded answer and
/// puts the records' real length, their segment ranges and memory tail in
/// its place, then fixes the frame's size. `None` if a marker is missing.
fn splice_pieces(frame: &[u8], spliced: Vec<Spliced>, flexible: bool) -> Option<Vec<Outgoing>> {
    // The marker's own length: 4 bytes, or varint(24 + 1), one byte.
    let length_field = if flexible { 1 } else { 4 };
    let mut pieces = Vec::with_capacity(spliced.len() + 1);
    let mut total = 0u64;
    let mut position = 0;
    for Spliced {
        marker,
        ranges,
        tail,
    } in spliced
    {
        let found = frame
            .get(position..)?
            .windows(MARKER_BYTES)
            .position(|window| window == marker)?
            + position;
        let records = ranges.iter().map(|range| range.length).sum::<u64>() + tail.len() as u64;
        let mut header = frame
            .get(position..found.checked_sub(length_field)?)?
            .to_vec();
        if flexible {
            unsigned_varint(records + 1, &mut header);
        } else {
            header.extend_from_slice(&u32::try_from(records).ok()?.to_be_bytes());
        }
        total += header.len() as u64 + records;
        pieces.push(if ranges.is_empty() {
            // Batches in memory go out after the header in one vectored
            // write: never copied into the answer's buffer.
            Outgoing::HeaderAndPayload(header, tail)
        } else {
            Outgoing::Ranges {
                header,
                ranges,
                tail,
            }
        });
        position = found + MARKER_BYTES;
    }
    let rest = frame.get(position..)?.to_vec();
    total += rest.len() as u64;
    pieces.push(Outgoing::Frame(rest));
    // The size prefix counts everything after itself.
    let size = u32::try_from(total - 4).ok()?.to_be_bytes();
    match pieces.first_mut() {
        Some(Outgoing::Ranges { header, .. } | Outgoing::HeaderAndPayload(header, _)) => {
            header.get_mut(..4)?.copy_from_slice(&size)
        }
        _ => return None,
    }
    Some(pieces)
}

/// Reads every wanted partition once, in order, within the response budget.
async fn read_all(
    context: &Context,
    names: &[kafka_protocol::messages::TopicName],
    wanted: &[Wanted],
    response_max: u64,
) -> Vec<Got> {
    let shared = &context.shared;
    let mut used = 0u64;
    let mut all = Vec::with_capacity(wanted.len());
    for want in wanted {
        let owner = match want.owner {
            Ok(owner) => owner,
            Err(code) => {
                all.push(Got::error(code));
                continue;
            }
        };
        let key = (
            names[want.topic].0.as_str().to_string(),
            want.partition as u32,
        );
        let budget = want
            .partition_max_bytes
            .min(response_max.saturating_sub(used));
        if budget == 0 {
            // The response is full: report the partition's state only.
            let latest = shared
                .call(owner, |reply| ShardOp::ListOffsets {
                    key,
                    at: OffsetSpec::Latest,
                    reply,
                })
                .await;
            all.push(match latest {
                Ok(Ok(high_watermark)) => Got {
                    error_code: errors::NONE,
                    high_watermark: high_watermark.unwrap_or(-1),
                    log_start_offset: -1,
                    next_offset: want.offset,
                    records: None,
                    ranges: Vec::new(),
                    tail: Vec::new(),
                },
                Ok(Err(error)) | Err(error) => Got::error(errors::code_of(&error)),
            });
            continue;
        }
        let fetched = shared
            .call(owner, |reply| ShardOp::Fetch {
                key,
                offset: want.offset,
                max_bytes: budget,
                read_direct: false,
                reply,
            })
            .await;
        let got = match fetched {
            Ok(Ok(data)) if send_as_ranges(shared, want.direct_io, &data.ranges) => Got {
                error_code: errors::NONE,
                high_watermark: data.high_watermark,
                log_start_offset: data.log_start_offset,
                next_offset: data.next_offset,
                records: None,
                ranges: data.ranges,
                tail: data.bytes,
            },
            Ok(Ok(data)) => gather(shared, data).await,
            Ok(Err(error)) | Err(error) => Got::error(errors::code_of(&error)),
        };
        used += got.bytes();
        all.push(got);
    }
    all
}

/// One fetch's batches in memory: file ranges read, then the buffered tail.
async fn gather(shared: &Shared, mut data: FetchData) -> Got {
    let mut bytes = if data.ranges.is_empty() {
        Vec::new()
    } else {
        match read_fetch_ranges(shared, std::mem::take(&mut data.ranges)).await {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(%error, "reading a segment for a Kafka fetch failed");
                return Got::error(errors::KAFKA_STORAGE_ERROR);
            }
        }
    };
    if bytes.is_empty() {
        bytes = data.bytes;
    } else {
        bytes.extend_from_slice(&data.bytes);
    }
    Got {
        error_code: errors::NONE,
        high_watermark: data.high_watermark,
        log_start_offset: data.log_start_offset,
        next_offset: data.next_offset,
        records: None,
        ranges: Vec::new(),
        tail: bytes,
    }
}

/// Waits until any wanted partition has data past what was read, or the
/// time is up. Returns `false` when the wait ended by time.
async fn wait_for_any(
    context: &Context,
    names: &[kafka_protocol::messages::TopicName],
    wanted: &[Wanted],
    got: &[Got],
    remaining: Duration,
) -> bool {
    let mut waits = Vec::new();
    for (want, got) in wanted.iter().zip(got) {
        let Ok(owner) = want.owner else {
            continue;
        };
        let (reply, woken) = oneshot::channel();
        let op = ShardOp::WaitForData {
            key: (
                names[want.topic].0.as_str().to_string(),
                want.partition as u32,
            ),
            offset: got.next_offset.max(want.offset),
            reply,
        };
        if context.shared.send(owner, op).is_ok() {
            waits.push(woken);
        }
    }
    if waits.is_empty() {
        compio::time::sleep(remaining).await;
        return false;
    }
    let timer = Box::pin(compio::time::sleep(remaining));
    matches!(select(select_all(waits), timer).await, Either::Left(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Decodable;
    use std::io::Write;

    /// Writes the pieces as the connection's writer would, reading each
    /// file range from its descriptor.
    fn assemble(pieces: Vec<Outgoing>) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                Outgoing::Frame(bytes) => out.extend_from_slice(&bytes),
                Outgoing::HeaderAndPayload(header, payload) => {
                    out.extend_from_slice(&header);
                    out.extend_from_slice(&payload);
                }
                Outgoing::Ranges {
                    header,
                    ranges,
                    tail,
                } => {
                    out.extend_from_slice(&header);
                    for range in ranges {
                        let file = std::fs::File::from(range.fd);
                        let mut bytes = vec![0; range.length as usize];
                        file.read_exact_at(&mut bytes, range.position)
                            .expect("read range");
                        out.extend_from_slice(&bytes);
                    }
                    out.extend_from_slice(&tail);
                }
                _ => panic!("unexpected piece"),
            }
        }
        out
    }

    #[test]
    fn spliced_answers_decode_like_copied_ones_at_every_version() {
        let mut segment = tempfile::tempfile().expect("temporary file");
        let content: Vec<u8> = (0..200_000u32).map(|index| (index % 251) as u8).collect();
        segment.write_all(&content).expect("write segment");
        for version in [4, 11, 12] {
            // The last partition's batches are all in memory (no ranges).
            let records = [
                (100u64, 150_000u64, &b"tail-one"[..]),
                (7, 0, &b""[..]),
                (0, 300, &b"t2"[..]),
            ];
            let mut partitions = Vec::new();
            let mut spliced = Vec::new();
            for (index, (position, length, tail)) in records.iter().enumerate() {
                let marker = splice_marker(spliced.len());
                let fd = std::os::fd::OwnedFd::from(segment.try_clone().expect("dup"));
                let in_memory = index == 2;
                let ranges = if in_memory {
                    Vec::new()
                } else {
                    vec![SendRange {
                        fd,
                        position: *position,
                        length: *length,
                        direct: false,
                    }]
                };
                let mut bytes = Vec::new();
                if in_memory {
                    bytes.extend_from_slice(
                        &content[*position as usize..(*position + *length) as usize],
                    );
                }
                bytes.extend_from_slice(tail);
                spliced.push(Spliced {
                    marker,
                    ranges,
                    tail: bytes,
                });
                partitions.push(
                    PartitionData::default()
                        .with_partition_index(index as i32)
                        .with_high_watermark(1000 + index as i64)
                        .with_records(Some(Bytes::copy_from_slice(&marker))),
                );
            }
            let response = FetchResponse::default().with_responses(vec![
                FetchableTopicResponse::default()
                    .with_topic(kafka_protocol::messages::TopicName(
                        kafka_protocol::protocol::StrBytes::from_static_str("t"),
                    ))
                    .with_partitions(partitions),
            ]);
            let frame =
                super::super::codec::encode_response(9, version, &response).expect("encode");
            let pieces =
                splice_pieces(&frame, spliced, version >= FLEXIBLE_VERSION).expect("markers found");
            let bytes = assemble(pieces);
            let size = u32::from_be_bytes(bytes[..4].try_into().expect("size")) as usize;
            assert_eq!(size + 4, bytes.len(), "v{version}: size prefix");
            let mut body = Bytes::from(bytes[4..].to_vec());
            let header_version =
                <FetchResponse as kafka_protocol::protocol::HeaderVersion>::header_version(version);
            kafka_protocol::messages::ResponseHeader::decode(&mut body, header_version)
                .expect("header");
            let decoded = FetchResponse::decode(&mut body, version).expect("decodes");
            for (index, (position, length, tail)) in records.iter().enumerate() {
                let partition = &decoded.responses[0].partitions[index];
                assert_eq!(partition.high_watermark, 1000 + index as i64);
                let mut expected =
                    content[*position as usize..(*position + *length) as usize].to_vec();
                expected.extend_from_slice(tail);
                assert_eq!(
                    partition.records.as_deref(),
                    Some(&expected[..]),
                    "v{version} partition {index}"
                );
            }
        }
    }
}
