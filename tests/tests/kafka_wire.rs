//! The Kafka listener driven with raw requests (the `kafka-protocol` codecs,
//! no client library), for what a client library hides: exact retries of an
//! idempotent batch across a broker restart, sequence errors, version
//! negotiation, and bad frames. Runs on every target (no librdkafka).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, InitProducerIdRequest, InitProducerIdResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
    SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use rill_protocol::batch::BatchWriter;
use rill_tests::Broker;

/// A blocking Kafka connection that sends one request at a time.
struct Kafka {
    stream: TcpStream,
    correlation_id: i32,
}

impl Kafka {
    fn connect(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).expect("connect to the Kafka listener");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        Self {
            stream,
            correlation_id: 0,
        }
    }

    fn send_raw(&mut self, frame: &[u8]) {
        self.stream.write_all(frame).expect("write a request");
    }

    fn request<R: Request>(&mut self, version: i16, request: &R) -> R::Response
    where
        R::Response: Decodable + HeaderVersion,
    {
        let correlation_id = self.send(version, request);
        self.receive::<R>(version, correlation_id)
    }

    /// Sends a request without waiting for its answer; returns its correlation id.
    fn send<R: Request>(&mut self, version: i16, request: &R) -> i32 {
        self.correlation_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("kafka-wire-test")));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .expect("encode header");
        request.encode(&mut body, version).expect("encode request");
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.send_raw(&frame);
        self.correlation_id
    }

    /// Reads the next answer, which must be the one to `correlation_id`.
    fn receive<R: Request>(&mut self, version: i16, correlation_id: i32) -> R::Response
    where
        R::Response: Decodable + HeaderVersion,
    {
        let mut body = self.read_frame().expect("a response");
        let header = ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .expect("response header");
        assert_eq!(header.correlation_id, correlation_id);
        let response = R::Response::decode(&mut body, version).expect("response body");
        assert_eq!(body.remaining(), 0, "bytes left after the response");
        response
    }

    /// The next response frame, or `None` once the broker closed the connection.
    fn read_frame(&mut self) -> Option<bytes::Bytes> {
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size).ok()?;
        let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut body).ok()?;
        Some(body.into())
    }
}

/// One batch of `count` records from an idempotent producer.
fn idempotent_batch(producer_id: i64, epoch: i16, first_sequence: i32, count: i32) -> Vec<u8> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut writer = BatchWriter::new(&mut buffer).expect("buffer");
    for index in 0..count {
        let value = format!("record {}", first_sequence + index);
        writer
            .push(1_700_000_000_000, None, Some(value.as_bytes()), &[])
            .expect("record fits");
    }
    let mut batch = writer.finish().expect("a batch").to_vec();
    batch[43..51].copy_from_slice(&producer_id.to_be_bytes());
    batch[51..53].copy_from_slice(&epoch.to_be_bytes());
    batch[53..57].copy_from_slice(&first_sequence.to_be_bytes());
    let crc = rill_core::batch::compute_crc(&batch);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    batch
}

fn produce(kafka: &mut Kafka, topic: &str, batch: Vec<u8>) -> (i16, i64) {
    let response: ProduceResponse = kafka.request(9, &produce_request(topic, batch));
    let partition = &response.responses[0].partition_responses[0];
    (partition.error_code, partition.base_offset)
}

/// A produce of one batch to partition 0 of `topic`, acks=all.
fn produce_request(topic: &str, batch: Vec<u8>) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.into())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(batch.into())),
                ]),
        ])
}

fn latest_offset(kafka: &mut Kafka, topic: &str) -> i64 {
    let request = ListOffsetsRequest::default()
        .with_replica_id((-1).into())
        .with_topics(vec![
            ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.into())))
                .with_partitions(vec![ListOffsetsPartition::default().with_timestamp(-1)]),
        ]);
    let response: ListOffsetsResponse = kafka.request(5, &request);
    let partition = &response.topics[0].partitions[0];
    assert_eq!(partition.error_code, 0);
    partition.offset
}

#[test]
fn a_kafka_producer_moves_to_the_shard_of_its_partition_and_loses_nothing() {
    let (broker, address) = start_broker(&["node.shards=2"]);
    // One single-partition topic on each shard: wherever the connection
    // landed, the run of produces to one of them goes to the other shard.
    let topics = [0, 1].map(|shard| rill_tests::topic_on_shard("kafka-moving", shard));
    let mut kafka = Kafka::connect(address);
    for topic in &topics {
        // Sixteen produces in flight at once, so the connection moves with
        // requests read but not yet handled.
        let sent: Vec<i32> = (0..16)
            .map(|_| kafka.send(9, &produce_request(topic, idempotent_batch(-1, -1, -1, 10))))
            .collect();
        for (index, correlation_id) in sent.into_iter().enumerate() {
            let response: ProduceResponse = kafka.receive::<ProduceRequest>(9, correlation_id);
            let partition = &response.responses[0].partition_responses[0];
            assert_eq!(partition.error_code, 0, "{topic}: produce {index}");
            assert_eq!(
                partition.base_offset,
                index as i64 * 10,
                "{topic}: in order"
            );
        }
        assert_eq!(latest_offset(&mut kafka, topic), 160);
    }
    let (_, body) = rill_tests::http_get(broker.admin, "/metrics").expect("metrics");
    let moved: f64 = body
        .lines()
        .find_map(|line| line.strip_prefix("rill_connections_moved_total "))
        .and_then(|value| value.parse().ok())
        .expect("the moves metric");
    assert!(
        moved >= 1.0,
        "a Kafka producer to the other shard moves there"
    );
}

fn start_broker(settings: &[&str]) -> (Broker, SocketAddr) {
    let broker = Broker::start(settings);
    let kafka = broker.kafka;
    (broker, kafka)
}

#[test]
fn a_retried_idempotent_batch_is_not_written_twice_even_after_a_restart() {
    // Durable acknowledgements, so the crash below cannot take acked batches.
    let (mut broker, address) = start_broker(&["topic_defaults.fsync=every-batch"]);
    let mut kafka = Kafka::connect(address);
    let ids: InitProducerIdResponse = kafka.request(
        4,
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000),
    );
    assert_eq!(ids.error_code, 0);
    let producer_id = ids.producer_id.0;
    assert!(producer_id >= 0);
    let topic = "idempotent";

    assert_eq!(
        produce(&mut kafka, topic, idempotent_batch(producer_id, 0, 0, 3)),
        (0, 0)
    );
    assert_eq!(
        produce(&mut kafka, topic, idempotent_batch(producer_id, 0, 3, 2)),
        (0, 3)
    );
    // The same batch again (a retry after a lost answer): its first offsets.
    assert_eq!(
        produce(&mut kafka, topic, idempotent_batch(producer_id, 0, 3, 2)),
        (0, 3)
    );
    assert_eq!(latest_offset(&mut kafka, topic), 5);
    // A gap in the sequence is refused.
    let (code, _) = produce(&mut kafka, topic, idempotent_batch(producer_id, 0, 9, 1));
    assert_eq!(code, 45, "OUT_OF_ORDER_SEQUENCE_NUMBER");

    // A graceful restart, then a crash: the retry is still recognised.
    drop(kafka);
    broker.restart();
    let mut kafka = Kafka::connect(address);
    assert_eq!(
        produce(&mut kafka, topic, idempotent_batch(producer_id, 0, 3, 2)),
        (0, 3)
    );
    assert_eq!(
        produce(&mut kafka, topic, idempotent_batch(producer_id, 0, 5, 1)),
        (0, 5)
    );
    drop(kafka);
    broker.kill();
    broker.restart();
    let mut kafka = Kafka::connect(address);
    assert_eq!(
        produce(&mut kafka, topic, idempotent_batch(producer_id, 0, 5, 1)),
        (0, 5)
    );
    assert_eq!(latest_offset(&mut kafka, topic), 6);
    // An older epoch is fenced once a newer one wrote.
    assert_eq!(
        produce(&mut kafka, topic, idempotent_batch(producer_id, 1, 0, 1)),
        (0, 6)
    );
    let (code, _) = produce(&mut kafka, topic, idempotent_batch(producer_id, 0, 6, 1));
    assert_eq!(code, 47, "INVALID_PRODUCER_EPOCH");
    // A new producer id is unique across the restarts.
    let ids: InitProducerIdResponse = kafka.request(
        4,
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000),
    );
    assert_ne!(ids.producer_id.0, producer_id);
    let (status, metrics) = rill_tests::http_get(broker.admin, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("rill_kafka_requests_total{api=\"Produce\"} 3"),
        "Kafka requests are counted by API since the last start:\n{metrics}"
    );
}

#[test]
fn versions_are_negotiated_and_bad_frames_close_only_their_connection() {
    let (_broker, address) = start_broker(&[]);
    let mut kafka = Kafka::connect(address);
    let versions: ApiVersionsResponse = kafka.request(3, &ApiVersionsRequest::default());
    assert_eq!(versions.error_code, 0);
    let produce = versions
        .api_keys
        .iter()
        .find(|api| api.api_key == ApiKey::Produce as i16)
        .expect("Produce is served");
    assert!(produce.min_version <= 3 && produce.max_version >= 9);
    assert!(
        versions
            .api_keys
            .iter()
            .all(|api| api.api_key != ApiKey::EndTxn as i16),
        "transactions must not be advertised"
    );

    // ApiVersions newer than served: a v0 answer with UNSUPPORTED_VERSION.
    let mut raw = Kafka::connect(address);
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes());
    body.extend_from_slice(&127i16.to_be_bytes());
    body.extend_from_slice(&7i32.to_be_bytes());
    body.extend_from_slice(&(-1i16).to_be_bytes());
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    raw.send_raw(&frame);
    let mut answer = raw.read_frame().expect("an answer");
    assert_eq!(answer.get_i32(), 7);
    let answer = ApiVersionsResponse::decode(&mut answer, 0).expect("a v0 answer");
    assert_eq!(answer.error_code, 35);
    assert!(!answer.api_keys.is_empty());

    // Garbage, a negative size, an oversized size, an unknown API: each
    // closes its own connection.
    for frame in [
        vec![0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef],
        (-5i32).to_be_bytes().to_vec(),
        (1i32 << 30).to_be_bytes().to_vec(),
        [
            &10i32.to_be_bytes()[..],
            &[0x7f, 0x7f, 0, 0, 0, 0, 0, 1, 0xff, 0xff],
        ]
        .concat(),
        // Metadata v1 claiming two billion topics in four bytes.
        [
            &14i32.to_be_bytes()[..],
            &[0, 3, 0, 1, 0, 0, 0, 9, 0xff, 0xff],
            &i32::MAX.to_be_bytes(),
        ]
        .concat(),
    ] {
        let mut bad = Kafka::connect(address);
        bad.send_raw(&frame);
        assert!(bad.read_frame().is_none(), "frame {frame:?} was answered");
    }

    // The first connection still works, and so does auto-creation.
    let request = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
            TopicName(StrBytes::from_static_str("after-garbage")),
        ))]))
        .with_allow_auto_topic_creation(true);
    let metadata: MetadataResponse = kafka.request(9, &request);
    assert_eq!(metadata.topics[0].error_code, 0);
    assert_eq!(metadata.topics[0].partitions.len(), 1);
    assert_eq!(metadata.brokers[0].port, i32::from(address.port()));
}

/// A broker whose Kafka listener wants SASL, with one user `edge` whose
/// password is `p4ss,word`.
fn start_sasl_broker(mechanisms: &str) -> (Broker, SocketAddr, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let users = directory.path().join("kafka-users");
    let line = rill_edge_bridge::mqtt::auth::hash_password(b"p4ss,word", b"salt-of-edge", 4096);
    std::fs::write(&users, format!("edge:{line}\n")).expect("users file");
    let users_setting = format!("kafka.sasl_users_file={}", users.display());
    let mechanisms_setting = format!("kafka.sasl_mechanisms={mechanisms}");
    let (broker, address) = start_broker(&[&users_setting, &mechanisms_setting]);
    (broker, address, directory)
}

fn handshake(kafka: &mut Kafka, mechanism: &str) -> SaslHandshakeResponse {
    kafka.request(
        1,
        &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_string(mechanism.into())),
    )
}

fn authenticate(kafka: &mut Kafka, bytes: Vec<u8>) -> SaslAuthenticateResponse {
    kafka.request(
        2,
        &SaslAuthenticateRequest::default().with_auth_bytes(bytes.into()),
    )
}

/// A full SCRAM-SHA-256 exchange with Rill's own client side; the answer to
/// the client-final message.
fn scram_exchange(kafka: &mut Kafka, password: &str) -> SaslAuthenticateResponse {
    use rill_edge_bridge::replicator::client::sasl::{SaslMechanism, ScramClient};
    let handshake = handshake(kafka, "SCRAM-SHA-256");
    assert_eq!(handshake.error_code, 0);
    let mut client = ScramClient::new(
        SaslMechanism::ScramSha256,
        "edge",
        password,
        "wire-test-nonce",
        100_000,
    );
    let first = authenticate(kafka, client.client_first());
    assert_eq!(first.error_code, 0, "{:?}", first.error_message);
    let last = client
        .handle_server_first(&first.auth_bytes)
        .expect("a well-formed server-first message");
    let answer = authenticate(kafka, last);
    if answer.error_code == 0 {
        client
            .handle_server_final(&answer.auth_bytes)
            .expect("the broker proves it knows the password");
    }
    answer
}

fn metadata_works(kafka: &mut Kafka) {
    let response: MetadataResponse = kafka.request(9, &MetadataRequest::default());
    assert_eq!(response.brokers.len(), 1);
}

#[test]
fn sasl_scram_and_plain_guard_the_kafka_listener() {
    let (broker, address, _users) = start_sasl_broker("PLAIN,SCRAM-SHA-256");

    // Nothing but ApiVersions and the SASL requests before authenticating:
    // the broker closes the connection.
    let mut early = Kafka::connect(address);
    let versions: ApiVersionsResponse = early.request(3, &ApiVersionsRequest::default());
    for key in [ApiKey::SaslHandshake, ApiKey::SaslAuthenticate] {
        assert!(
            versions
                .api_keys
                .iter()
                .any(|api| api.api_key == key as i16),
            "{key:?} is advertised"
        );
    }
    early.correlation_id += 1;
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(9)
        .with_correlation_id(early.correlation_id);
    let mut body = BytesMut::new();
    header.encode(&mut body, 2).expect("header");
    MetadataRequest::default()
        .encode(&mut body, 9)
        .expect("request");
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    early.send_raw(&frame);
    assert!(early.read_frame().is_none(), "closed before authentication");

    // An unknown mechanism: the error and the list, the connection stays.
    let mut kafka = Kafka::connect(address);
    let refused = handshake(&mut kafka, "GSSAPI");
    assert_eq!(refused.error_code, 33, "UNSUPPORTED_SASL_MECHANISM");
    let offered: Vec<&str> = refused
        .mechanisms
        .iter()
        .map(|name| name.as_str())
        .collect();
    assert_eq!(offered, ["PLAIN", "SCRAM-SHA-256"]);

    // SCRAM-SHA-256 with the right password, then ordinary requests.
    let done = scram_exchange(&mut kafka, "p4ss,word");
    assert_eq!(done.error_code, 0, "{:?}", done.error_message);
    metadata_works(&mut kafka);

    // The wrong password: SASL_AUTHENTICATION_FAILED, then the connection closes.
    let mut wrong = Kafka::connect(address);
    let failed = scram_exchange(&mut wrong, "guess");
    assert_eq!(failed.error_code, 58, "SASL_AUTHENTICATION_FAILED");
    assert!(
        wrong.read_frame().is_none(),
        "closed after a failed exchange"
    );

    // PLAIN, right and wrong.
    use rill_edge_bridge::replicator::client::sasl::plain_message;
    let mut plain = Kafka::connect(address);
    assert_eq!(handshake(&mut plain, "PLAIN").error_code, 0);
    let answer = authenticate(&mut plain, plain_message("edge", "p4ss,word"));
    assert_eq!(answer.error_code, 0, "{:?}", answer.error_message);
    metadata_works(&mut plain);
    let mut plain_wrong = Kafka::connect(address);
    assert_eq!(handshake(&mut plain_wrong, "PLAIN").error_code, 0);
    let answer = authenticate(&mut plain_wrong, plain_message("nobody", "p4ss,word"));
    assert_eq!(answer.error_code, 58);

    // Garbage in the exchange is an error answer, not a broken broker.
    let mut garbage = Kafka::connect(address);
    assert_eq!(handshake(&mut garbage, "SCRAM-SHA-256").error_code, 0);
    let answer = authenticate(&mut garbage, vec![0xff; 5000]);
    assert_eq!(answer.error_code, 58);
    let mut after = Kafka::connect(address);
    let versions: ApiVersionsResponse = after.request(3, &ApiVersionsRequest::default());
    assert_eq!(versions.error_code, 0, "the broker still serves");
    drop(broker);
}

#[test]
fn a_broker_offers_only_the_configured_mechanisms_and_none_without_users() {
    let (_broker, address, _users) = start_sasl_broker("SCRAM-SHA-256");
    let mut kafka = Kafka::connect(address);
    let refused = handshake(&mut kafka, "PLAIN");
    assert_eq!(refused.error_code, 33);
    let offered: Vec<&str> = refused
        .mechanisms
        .iter()
        .map(|name| name.as_str())
        .collect();
    assert_eq!(offered, ["SCRAM-SHA-256"]);

    let (_open, open_address) = start_broker(&[]);
    let mut kafka = Kafka::connect(open_address);
    let refused = handshake(&mut kafka, "PLAIN");
    assert_eq!(refused.error_code, 33);
    assert!(refused.mechanisms.is_empty());
    metadata_works(&mut kafka);
}
