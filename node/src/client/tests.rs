//! The client against scripted brokers on loopback: handshake, pipelining with
//! answers out of order, error mapping, and every way a connection can end.

use compio::net::TcpListener;
use futures_util::future::join_all;
use rill_core::batch::{RecordBuilder, stamp_batch};
use rill_protocol::{Request, RequestFrame, Response};

use super::fake_broker::{FakeBroker, RawPeer, listen, response_frame, run};
use super::*;

fn config() -> ClientConfig {
    ClientConfig {
        client_id: "test-client".into(),
        ..ClientConfig::default()
    }
}

/// Connects a client to `listener` and accepts it with a scripted peer.
async fn connected(
    listener: &TcpListener,
    address: &str,
    config: ClientConfig,
) -> (Client, RawPeer) {
    let accepting = async {
        let mut peer = RawPeer::accept(listener).await;
        peer.handshake(1 << 20).await;
        peer
    };
    let (client, peer) =
        futures_util::future::join(Client::connect(address, config), accepting).await;
    (client.expect("connects"), peer)
}

#[test]
fn handshake_sends_version_and_client_id() {
    run(|| async {
        let (listener, address) = listen().await;
        let accepting = async {
            let mut peer = RawPeer::accept(&listener).await;
            let body = peer.read_request().await.expect("handshake");
            let frame = RequestFrame::decode(&body).expect("decodes");
            assert_eq!(
                frame.request,
                Request::Handshake {
                    protocol_version: rill_protocol::PROTOCOL_VERSION,
                    client_id: "test-client",
                }
            );
            peer.send(&response_frame(
                frame.correlation_id,
                Response::HandshakeOk {
                    protocol_version: 1,
                    broker_version: "fake-9.9",
                    frame_bytes_max: 4096,
                },
                &[],
            ))
            .await;
            peer
        };
        let (client, _peer) =
            futures_util::future::join(Client::connect(&address, config()), accepting).await;
        let client = client.expect("connects");
        assert_eq!(client.broker_version(), "fake-9.9");
        assert_eq!(client.broker_frame_bytes_max(), 4096);
        assert_eq!(client.address(), address);
    });
}

#[test]
fn refused_handshake_is_a_broker_error() {
    run(|| async {
        let (listener, address) = listen().await;
        let accepting = async {
            let mut peer = RawPeer::accept(&listener).await;
            let body = peer.read_request().await.expect("handshake");
            let frame = RequestFrame::decode(&body).expect("decodes");
            peer.send(&response_frame(
                frame.correlation_id,
                Response::Error {
                    code: ErrorCode::UnsupportedVersion,
                    message: "protocol 1 is not supported",
                },
                &[],
            ))
            .await;
            peer
        };
        let (client, _peer) =
            futures_util::future::join(Client::connect(&address, config()), accepting).await;
        match client {
            Err(ClientError::Broker { code, message }) => {
                assert_eq!(code, ErrorCode::UnsupportedVersion);
                assert_eq!(message, "protocol 1 is not supported");
            }
            other => panic!("expected a broker error, got {other:?}"),
        }
    });
}

#[test]
fn nobody_listening_is_a_connect_error_naming_the_address() {
    run(|| async {
        let (listener, address) = listen().await;
        drop(listener);
        match Client::connect(&address, config()).await {
            Err(error @ ClientError::Connect { .. }) => {
                let text = error.to_string();
                assert!(text.contains(&address), "{text}");
                assert!(text.contains("rill serve"), "{text}");
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    });
}

#[test]
fn pipelined_requests_answered_out_of_order_reach_their_callers() {
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let broker = async {
            let mut requests = Vec::new();
            for _ in 0..3 {
                let body = peer.read_request().await.expect("request");
                let frame = RequestFrame::decode(&body).expect("decodes");
                let Request::ListOffsets { partition, .. } = frame.request else {
                    panic!("unexpected {frame:?}");
                };
                requests.push((frame.correlation_id, partition));
            }
            // All three are in flight at once; answer the newest first.
            for (correlation_id, partition) in requests.into_iter().rev() {
                let offset = Some(i64::from(partition) * 100);
                peer.send(&response_frame(
                    correlation_id,
                    Response::Offset { offset },
                    &[],
                ))
                .await;
            }
        };
        let calls = join_all(
            (0..3).map(|partition| client.list_offsets("t", partition, OffsetSpec::Latest)),
        );
        let (results, ()) = futures_util::future::join(calls, broker).await;
        let offsets: Vec<Option<i64>> = results
            .into_iter()
            .map(|result| result.expect("answered"))
            .collect();
        assert_eq!(offsets, [Some(0), Some(100), Some(200)]);
    });
}

#[test]
fn broker_errors_map_to_typed_errors_and_the_connection_stays_usable() {
    run(|| async {
        let broker = FakeBroker::start().await;
        broker.state.borrow_mut().create_topic("sensors", 1);
        let client = Client::connect(&broker.address, config())
            .await
            .expect("connects");
        match client.create_topic("sensors", 1, &[]).await {
            Err(ClientError::Broker { code, message }) => {
                assert_eq!(code, ErrorCode::TopicExists);
                assert!(message.contains("sensors"));
            }
            other => panic!("expected TopicExists, got {other:?}"),
        }
        match client.fetch("missing", 0, 0, 1024, 1, 0).await {
            Err(ClientError::Broker { code, .. }) => assert_eq!(code, ErrorCode::UnknownTopic),
            other => panic!("expected UnknownTopic, got {other:?}"),
        }
        client.ping().await.expect("still connected");
    });
}

#[test]
fn topic_admin_and_group_offsets_round_trip() {
    run(|| async {
        let broker = FakeBroker::start().await;
        let client = Client::connect(&broker.address, config())
            .await
            .expect("connects");
        let settings = [("retention_ms".to_owned(), "60000".to_owned())];
        client
            .create_topic("a", 2, &settings)
            .await
            .expect("create");
        let described = client.describe_topic("a").await.expect("describe");
        assert_eq!(described.partitions.len(), 2);
        assert_eq!(described.settings, "retention_ms=60000\n");
        client.alter_topic("a", Some(3), &[]).await.expect("alter");
        assert_eq!(
            client.metadata(Some("a")).await.expect("metadata")[0]
                .partitions
                .len(),
            3
        );
        client.commit_offset("g", "a", 1, 42).await.expect("commit");
        assert_eq!(
            client
                .fetch_offset("g", "a", 1)
                .await
                .expect("fetch offset"),
            Some(42)
        );
        assert_eq!(
            client
                .fetch_offset("g", "a", 0)
                .await
                .expect("fetch offset"),
            None
        );
        let groups = client.list_groups().await.expect("groups");
        assert_eq!(groups[0].offsets, vec![("a".to_owned(), 1, 42)]);
        assert_eq!(client.status().await.expect("status").partitions, 3);
        client.delete_topic("a").await.expect("delete");
        assert!(client.metadata(None).await.expect("metadata").is_empty());

        let bad = [("a\nb".to_owned(), "1".to_owned())];
        assert!(matches!(
            client.create_topic("b", 1, &bad).await,
            Err(ClientError::InvalidArgument(_))
        ));
    });
}

#[test]
fn connection_drop_fails_every_waiter_with_closed() {
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let broker = async move {
            // Read both requests, then hang up without answering.
            peer.read_request().await.expect("first");
            peer.read_request().await.expect("second");
            drop(peer);
        };
        let (results, ()) =
            futures_util::future::join(join_all([client.ping(), client.ping()]), broker).await;
        for result in results {
            match result {
                Err(ClientError::Closed { reason }) => {
                    assert_eq!(reason, "the broker hung up")
                }
                other => panic!("expected Closed, got {other:?}"),
            }
        }
        assert!(matches!(
            client.ping().await,
            Err(ClientError::Closed { .. })
        ));
    });
}

#[test]
fn oversized_response_frame_closes_with_a_protocol_error() {
    run(|| async {
        let (listener, address) = listen().await;
        let small = ClientConfig {
            frame_bytes_max: 1024,
            ..config()
        };
        let (client, mut peer) = connected(&listener, &address, small).await;
        let broker = async {
            peer.read_request().await.expect("ping");
            // Only the length prefix: the client must refuse before the body.
            peer.send(&4096u32.to_le_bytes()).await;
        };
        let (result, ()) = futures_util::future::join(client.ping(), broker).await;
        match result {
            Err(ClientError::Protocol(detail)) => {
                assert!(
                    detail.contains("4096") && detail.contains("1024"),
                    "{detail}"
                )
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
        match client.ping().await {
            Err(ClientError::Closed { reason }) => assert!(reason.contains("protocol error")),
            other => panic!("expected Closed, got {other:?}"),
        }
        // The client hung up: the broker side reads the end of the stream.
        assert!(peer.read_request().await.is_none());
    });
}

#[test]
fn response_to_an_unknown_correlation_id_closes_with_a_protocol_error() {
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let broker = async {
            let body = peer.read_request().await.expect("ping");
            let frame = RequestFrame::decode(&body).expect("decodes");
            peer.send(&response_frame(
                frame.correlation_id + 1000,
                Response::Pong,
                &[],
            ))
            .await;
        };
        let (result, ()) = futures_util::future::join(client.ping(), broker).await;
        match result {
            Err(ClientError::Protocol(detail)) => assert!(detail.contains("correlation id")),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    });
}

#[test]
fn undecodable_frame_closes_with_a_protocol_error() {
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let broker = async {
            peer.read_request().await.expect("ping");
            // A correlation id, then a variant number no response has.
            peer.send(&[2, 0, 0, 0, 1, 99]).await;
        };
        let (result, ()) = futures_util::future::join(client.ping(), broker).await;
        assert!(
            matches!(result, Err(ClientError::Protocol(_))),
            "{result:?}"
        );
    });
}

#[test]
fn unanswered_request_times_out_and_a_late_answer_is_ignored() {
    run(|| async {
        let (listener, address) = listen().await;
        let quick = ClientConfig {
            request_timeout_ms: 50,
            ..config()
        };
        let (client, mut peer) = connected(&listener, &address, quick).await;
        let body = {
            let (result, body) =
                futures_util::future::join(client.ping(), peer.read_request()).await;
            match result {
                Err(ClientError::Timeout { request, after_ms }) => {
                    assert_eq!((request, after_ms), ("ping", 50));
                }
                other => panic!("expected a timeout, got {other:?}"),
            }
            body.expect("ping reached the broker")
        };
        // The late answer goes nowhere; the connection carries on.
        let late = RequestFrame::decode(&body).expect("decodes").correlation_id;
        peer.send(&response_frame(late, Response::Pong, &[])).await;
        let broker = async {
            let body = peer.read_request().await.expect("second ping");
            let frame = RequestFrame::decode(&body).expect("decodes");
            assert_ne!(frame.correlation_id, late);
            peer.send(&response_frame(frame.correlation_id, Response::Pong, &[]))
                .await;
        };
        let (result, ()) = futures_util::future::join(client.ping(), broker).await;
        result.expect("pong");
    });
}

#[test]
fn produce_without_acks_returns_once_written() {
    run(|| async {
        let broker = FakeBroker::start().await;
        broker.state.borrow_mut().create_topic("t", 1);
        let client = Client::connect(&broker.address, config())
            .await
            .expect("connects");
        let mut builder = RecordBuilder::new();
        builder.push(1, None, Some(b"x"), &[]);
        let batch = builder.finish();
        let answer = client
            .produce("t", Target::Any, Acks::None, &batch)
            .await
            .expect("written");
        assert_eq!(answer, None);
        let produced = client
            .produce("t", Target::Partition(0), Acks::Durable, &batch)
            .await
            .expect("acknowledged")
            .expect("a response");
        // The fire-and-forget batch was appended first.
        assert_eq!((produced.base_offset, produced.last_offset), (1, 1));
    });
}

#[test]
fn request_larger_than_the_brokers_limit_is_refused_locally() {
    run(|| async {
        let (listener, address) = listen().await;
        let accepting = async {
            let mut peer = RawPeer::accept(&listener).await;
            peer.handshake(100).await;
            peer
        };
        let (client, mut peer) =
            futures_util::future::join(Client::connect(&address, config()), accepting).await;
        let client = client.expect("connects");
        let result = client
            .produce("t", Target::Any, Acks::Written, &[0u8; 200])
            .await;
        match result {
            Err(ClientError::RequestTooLarge {
                frame_bytes,
                frame_bytes_max,
            }) => {
                assert!(frame_bytes > 200);
                assert_eq!(frame_bytes_max, 100);
            }
            other => panic!("expected RequestTooLarge, got {other:?}"),
        }
        // Nothing was sent: the next thing the broker reads is the ping.
        let broker = async {
            let body = peer.read_request().await.expect("ping");
            let frame = RequestFrame::decode(&body).expect("decodes");
            assert_eq!(frame.request, Request::Ping);
            peer.send(&response_frame(frame.correlation_id, Response::Pong, &[]))
                .await;
        };
        let (result, ()) = futures_util::future::join(client.ping(), broker).await;
        result.expect("pong");
    });
}

#[test]
fn fetched_raw_batches_decode_with_records_of() {
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let mut raw = Vec::new();
        for (base_offset, values) in [(7, ["a", "b"]), (9, ["c", "d"])] {
            let mut builder = RecordBuilder::new();
            for value in values {
                builder.push(5_000, Some(b"k"), Some(value.as_bytes()), &[]);
            }
            let mut batch = builder.finish();
            stamp_batch(&mut batch, base_offset, None);
            raw.extend_from_slice(&batch);
        }
        let broker = async {
            let body = peer.read_request().await.expect("fetch");
            let frame = RequestFrame::decode(&body).expect("decodes");
            assert_eq!(
                frame.request,
                Request::Fetch {
                    topic: "t",
                    partition: 3,
                    offset: 7,
                    max_bytes: 65536,
                    min_bytes: 1,
                    max_wait_ms: 100,
                }
            );
            peer.send(&response_frame(
                frame.correlation_id,
                Response::Fetched {
                    partition: 3,
                    high_watermark: 11,
                    log_start_offset: 0,
                    next_offset: 11,
                    records_bytes: raw.len() as u32,
                },
                &raw,
            ))
            .await;
        };
        let (fetched, ()) =
            futures_util::future::join(client.fetch("t", 3, 7, 65536, 1, 100), broker).await;
        let fetched = fetched.expect("fetched");
        assert_eq!(
            (
                fetched.partition,
                fetched.high_watermark,
                fetched.next_offset
            ),
            (3, 11, 11)
        );
        let records = records_of(&fetched.batches).expect("valid batches");
        let seen: Vec<(i64, &[u8])> = records
            .iter()
            .map(|record| (record.offset, record.value.as_deref().unwrap_or_default()))
            .collect();
        assert_eq!(
            seen,
            [
                (7, &b"a"[..]),
                (8, &b"b"[..]),
                (9, &b"c"[..]),
                (10, &b"d"[..])
            ]
        );
    });
}

#[test]
fn large_fetch_answers_arriving_back_to_back_each_reach_their_caller_intact() {
    // Answers of 256 KiB and more are handed over with the read buffer
    // itself; the bytes after such an answer (the start of the next one)
    // must move to the next buffer unharmed, and small answers in between
    // are copied out as before.
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let sizes = [700 * 1024, 10, 300 * 1024, 256 * 1024, 3];
        let payload = |index: usize| -> Vec<u8> {
            (0..sizes[index])
                .map(|byte| (byte * 31 + index * 7) as u8)
                .collect()
        };
        let broker = async {
            let mut answers = Vec::new();
            for _ in 0..sizes.len() {
                let body = peer.read_request().await.expect("fetch");
                let frame = RequestFrame::decode(&body).expect("decodes");
                let Request::Fetch { partition, .. } = frame.request else {
                    panic!("unexpected {frame:?}");
                };
                let raw = payload(partition as usize);
                answers.extend_from_slice(&response_frame(
                    frame.correlation_id,
                    Response::Fetched {
                        partition,
                        high_watermark: 1,
                        log_start_offset: 0,
                        next_offset: 1,
                        records_bytes: raw.len() as u32,
                    },
                    &raw,
                ));
            }
            // Every answer in one write, so frames share reads.
            peer.send(&answers).await;
        };
        let fetches = join_all(
            (0..sizes.len() as u32).map(|partition| client.fetch("t", partition, 0, 1 << 20, 1, 0)),
        );
        let (results, ()) = futures_util::future::join(fetches, broker).await;
        for (index, result) in results.into_iter().enumerate() {
            let fetched = result.expect("fetched");
            assert_eq!(fetched.partition, index as u32);
            assert!(
                fetched.batches[..] == payload(index)[..],
                "answer {index} differs"
            );
        }
    });
}

#[test]
fn the_low_water_mark_never_asks_for_more_than_the_frame_still_lacks() {
    assert_eq!(connection::low_water_mark(0), 0);
    assert_eq!(connection::low_water_mark(100 * 1024), 0);
    assert_eq!(connection::low_water_mark(200 * 1024), 200 * 1024);
    assert_eq!(connection::low_water_mark(64 << 20), 1 << 20);
}

/// A fake broker's answer to the next fetch: `raw` bytes of batches.
async fn fetch_answer(peer: &mut RawPeer, raw: &[u8]) -> Vec<u8> {
    let body = peer.read_request().await.expect("fetch");
    let frame = RequestFrame::decode(&body).expect("decodes");
    let Request::Fetch { partition, .. } = frame.request else {
        panic!("unexpected {frame:?}");
    };
    response_frame(
        frame.correlation_id,
        Response::Fetched {
            partition,
            high_watermark: 1,
            log_start_offset: 0,
            next_offset: 1,
            records_bytes: raw.len() as u32,
        },
        raw,
    )
}

#[test]
fn a_large_answer_that_arrives_in_pieces_is_delivered_whole() {
    // While the rest of a large frame is on its way the reader raises the
    // socket's low-water mark; pieces of every size, the last one far
    // below the mark it had when the frame began, must still complete it.
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let raw: Vec<u8> = (0..3 * 1024 * 1024 + 5)
            .map(|byte| (byte * 13) as u8)
            .collect();
        let broker = async {
            let answer = fetch_answer(&mut peer, &raw).await;
            let mut at = 0;
            for piece in [10, 300 * 1024, 1024 * 1024 + 7, 200 * 1024, 1, 64 * 1024] {
                peer.send(&answer[at..at + piece]).await;
                at += piece;
            }
            peer.send(&answer[at..]).await;
        };
        let (fetched, ()) =
            futures_util::future::join(client.fetch("t", 0, 0, 4 << 20, 1, 0), broker).await;
        let fetched = fetched.expect("fetched");
        assert!(fetched.batches[..] == raw[..], "the answer differs");
        // The connection goes on with small answers after it.
        let (fetched, ()) =
            futures_util::future::join(client.fetch("t", 0, 1, 1024, 1, 0), async {
                let answer = fetch_answer(&mut peer, b"small").await;
                peer.send(&answer).await;
            })
            .await;
        assert_eq!(&fetched.expect("fetched").batches[..], b"small");
    });
}

#[test]
fn a_large_answer_cut_off_by_a_hang_up_fails_instead_of_waiting() {
    // The low-water mark must not keep the reader asleep once the broker
    // is gone: the fetch fails with the connection closed.
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let raw = vec![7u8; 2 * 1024 * 1024];
        let broker = async {
            let answer = fetch_answer(&mut peer, &raw).await;
            peer.send(&answer[..512 * 1024]).await;
            drop(peer);
        };
        let (fetched, ()) =
            futures_util::future::join(client.fetch("t", 0, 0, 4 << 20, 1, 0), broker).await;
        assert!(
            matches!(fetched, Err(ClientError::Closed { .. })),
            "{fetched:?}"
        );
    });
}

#[test]
fn a_fetch_answers_head_arrives_before_its_batches() {
    // The broker sends the head and a little of a large answer, and sends
    // the rest only once the caller has the head: without early heads this
    // would never finish (the timeout turns that into a failure).
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let raw: Vec<u8> = (0..1024 * 1024).map(|byte| (byte * 7) as u8).collect();
        let (got_head, head_seen) = futures_channel::oneshot::channel::<()>();
        let broker = async {
            let answer = fetch_answer(&mut peer, &raw).await;
            peer.send(&answer[..64 * 1024]).await;
            head_seen.await.expect("the caller reports the head");
            peer.send(&answer[64 * 1024..]).await;
        };
        let consumer = async {
            let mut pending = client.start_fetch("t", 0, 0, 4 << 20, 1, 0).expect("sent");
            let head = pending.head().await.expect("a head");
            assert_eq!(head.next_offset, 1);
            assert_eq!(head.records_bytes, raw.len() as u32);
            got_head.send(()).expect("broker listens");
            assert_eq!(pending.head().await, None, "the head comes once");
            pending.wait().await.expect("fetched")
        };
        let (fetched, ()) = compio::time::timeout(
            std::time::Duration::from_secs(30),
            futures_util::future::join(consumer, broker),
        )
        .await
        .expect("the head arrived before the batches");
        assert!(fetched.batches[..] == raw[..], "the answer differs");
    });
}

#[test]
fn a_small_answer_gives_its_head_too_and_an_error_gives_none() {
    run(|| async {
        let broker = FakeBroker::start().await;
        broker.state.borrow_mut().create_topic("sensors", 1);
        let client = Client::connect(&broker.address, config())
            .await
            .expect("connects");
        let mut batch = {
            let mut builder = RecordBuilder::new();
            builder.push(5_000, Some(b"k"), Some(b"v"), &[]);
            builder.finish()
        };
        stamp_batch(&mut batch, 0, None);
        client
            .produce("sensors", Target::Partition(0), Acks::Written, &batch)
            .await
            .expect("produced");
        let mut pending = client
            .start_fetch("sensors", 0, 0, 1 << 20, 1, 0)
            .expect("sent");
        let head = pending.head().await.expect("a head");
        assert_eq!(
            (head.partition, head.next_offset, head.high_watermark),
            (0, 1, 1)
        );
        let fetched = pending.wait().await.expect("fetched");
        assert_eq!(fetched.batches.len() as u32, head.records_bytes);
        let mut missing = client
            .start_fetch("missing", 0, 0, 1 << 20, 1, 0)
            .expect("sent");
        assert_eq!(missing.head().await, None);
        match missing.wait().await {
            Err(ClientError::Broker { code, .. }) => assert_eq!(code, ErrorCode::UnknownTopic),
            other => panic!("expected UnknownTopic, got {other:?}"),
        }
    });
}

#[test]
fn dropping_the_last_handle_closes_the_connection() {
    run(|| async {
        let (listener, address) = listen().await;
        let (client, mut peer) = connected(&listener, &address, config()).await;
        let clone = client.clone();
        drop(client);
        // Still alive through the clone.
        let broker = async {
            let body = peer.read_request().await.expect("ping");
            let frame = RequestFrame::decode(&body).expect("decodes");
            peer.send(&response_frame(frame.correlation_id, Response::Pong, &[]))
                .await;
        };
        let (result, ()) = futures_util::future::join(clone.ping(), broker).await;
        result.expect("pong");
        drop(clone);
        assert!(peer.read_request().await.is_none());
    });
}
