//! TLS (rustls) on the broker's listeners: clients that trust the CA produce
//! and consume, plain clients are refused, and with a client CA configured a
//! client must present a certificate. The admin listener speaks TLS too. A
//! TLS connection never moves to another shard.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use rill_core::batch::RecordBuilder;
use rill_node::client::{Client, ClientConfig, ClientTls, records_of};
use rill_protocol::{Acks, Target};
use rill_tests::Broker;
use rill_tests::pki::Pki;

fn pki() -> Pki {
    rill_tests::pki::generate(&["localhost", "127.0.0.1"], "device-17")
}

fn write(directory: &Path, name: &str, contents: &str) -> String {
    let path = directory.join(name);
    std::fs::write(&path, contents).expect("write pem");
    path.display().to_string()
}

/// A fresh PKI's files in `directory`: the CA's path, and the settings that
/// turn TLS on with the server's certificate and key.
fn server_tls(directory: &Path, pki: &Pki) -> (String, Vec<String>) {
    let ca = write(directory, "ca.pem", &pki.ca);
    let cert = write(directory, "server.pem", &pki.server.0);
    let key = write(directory, "server.key", &pki.server.1);
    let settings = vec![
        format!("tls.cert_file={cert}"),
        format!("tls.key_file={key}"),
    ];
    (ca, settings)
}

/// A broker started with `settings` as `--set` values.
fn start_with(settings: &[String]) -> Broker {
    Broker::start(&settings.iter().map(String::as_str).collect::<Vec<_>>())
}

fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTls {
    ClientTls {
        config: rill_node::tls::client_config(ca, identity).expect("client tls config"),
        server_name: "localhost".into(),
    }
}

async fn round_trip(broker: &Broker, tls: Option<ClientTls>) -> Result<usize, String> {
    let config = ClientConfig {
        tls,
        ..ClientConfig::default()
    };
    let client = Client::connect(&broker.address(), config)
        .await
        .map_err(|error| error.to_string())?;
    let mut builder = RecordBuilder::new();
    for index in 0..100u32 {
        builder.push(0, None, Some(format!("secret {index}").as_bytes()), &[]);
    }
    client
        .produce(
            "private",
            Target::Partition(0),
            Acks::Durable,
            &builder.finish(),
        )
        .await
        .map_err(|error| error.to_string())?;
    let fetched = client
        .fetch("private", 0, 0, 1024 * 1024, 1, 0)
        .await
        .map_err(|error| error.to_string())?;
    Ok(records_of(&fetched.batches)
        .map_err(|error| error.to_string())?
        .len())
}

#[test]
fn tls_listeners_serve_trusted_clients_and_refuse_plain_ones() {
    let directory = tempfile::tempdir().expect("tempdir");
    let (ca, settings) = server_tls(directory.path(), &pki());
    let broker = start_with(&settings);
    let runtime = compio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let records = round_trip(&broker, Some(client_tls(Path::new(&ca), None)))
            .await
            .expect("TLS round trip");
        assert_eq!(records, 100);
        let error = round_trip(&broker, None)
            .await
            .expect_err("plain TCP must not get through");
        assert!(!error.is_empty());
    });

    // The admin listener speaks TLS as well.
    let config = rill_node::tls::client_config(Path::new(&ca), None).expect("config");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let session = rustls::ClientConnection::new(Arc::clone(&config), name).expect("session");
    let socket = std::net::TcpStream::connect(broker.admin).expect("connect admin");
    let mut stream = rustls::StreamOwned::new(session, socket);
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: rill\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // So do the Kafka listener (an ApiVersions v0 request and its answer)...
    let tls_stream = |address: std::net::SocketAddr| {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let session = rustls::ClientConnection::new(Arc::clone(&config), name).expect("session");
        let socket = std::net::TcpStream::connect(address).expect("connect");
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .expect("timeout");
        rustls::StreamOwned::new(session, socket)
    };
    let mut kafka = tls_stream(broker.kafka);
    // size 10: api key 18, version 0, correlation id 5, null client id.
    kafka
        .write_all(&[0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 5, 0xff, 0xff])
        .expect("ApiVersions over TLS");
    let mut size = [0u8; 4];
    kafka.read_exact(&mut size).expect("answer size");
    let mut answer = vec![0u8; u32::from_be_bytes(size) as usize];
    kafka.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer[..4], &5i32.to_be_bytes(), "correlation id");
    assert_eq!(&answer[4..6], &[0, 0], "no error");

    // ...and the MQTT listener (CONNECT, then CONNACK accepted).
    let mut mqtt = tls_stream(broker.mqtt);
    let mut connect = vec![0x10, 0];
    connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 3]);
    connect.extend_from_slice(b"tls");
    connect[1] = (connect.len() - 2) as u8;
    mqtt.write_all(&connect).expect("CONNECT over TLS");
    let mut connack = [0u8; 4];
    mqtt.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(
        connack,
        [0x20, 2, 0, 0],
        "CONNACK, session not present, accepted"
    );
}

/// A TLS connection's session lives on its shard, so it never moves, even
/// when all it produces goes to the other shard's partition.
#[test]
fn tls_connections_stay_on_their_shard() {
    let directory = tempfile::tempdir().expect("tempdir");
    let (ca, mut settings) = server_tls(directory.path(), &pki());
    settings.push("node.shards=2".into());
    let broker = start_with(&settings);
    let topic = rill_tests::topic_across_two_shards("split");
    let runtime = compio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let config = ClientConfig {
            tls: Some(client_tls(Path::new(&ca), None)),
            ..ClientConfig::default()
        };
        let client = Client::connect(&broker.address(), config)
            .await
            .expect("connect over TLS");
        client.create_topic(&topic, 2, &[]).await.expect("create");
        // A run of produces to each partition: one of them is on the other
        // shard, which would move a plaintext connection.
        for partition in 0..2u32 {
            for batch in 0..12u32 {
                let mut builder = RecordBuilder::new();
                builder.push(
                    0,
                    None,
                    Some(format!("{partition}-{batch}").as_bytes()),
                    &[],
                );
                let produced = client
                    .produce(
                        &topic,
                        Target::Partition(partition),
                        Acks::Written,
                        &builder.finish(),
                    )
                    .await
                    .expect("produce over TLS")
                    .expect("acknowledged");
                assert_eq!(produced.base_offset, i64::from(batch));
            }
        }
        for partition in 0..2u32 {
            let fetched = client
                .fetch(&topic, partition, 0, 1024 * 1024, 1, 0)
                .await
                .expect("fetch over TLS");
            let values: Vec<Vec<u8>> = records_of(&fetched.batches)
                .expect("records")
                .into_iter()
                .map(|record| record.value.unwrap_or_default())
                .collect();
            let expected: Vec<Vec<u8>> = (0..12u32)
                .map(|batch| format!("{partition}-{batch}").into_bytes())
                .collect();
            assert_eq!(values, expected, "partition {partition} in order");
        }
    });
}

#[test]
fn a_client_ca_makes_client_certificates_mandatory() {
    let directory = tempfile::tempdir().expect("tempdir");
    let pki = pki();
    let (ca, mut settings) = server_tls(directory.path(), &pki);
    let client_cert = write(directory.path(), "client.pem", &pki.client.0);
    let client_key = write(directory.path(), "client.key", &pki.client.1);
    settings.push(format!("tls.client_ca_file={ca}"));
    let broker = start_with(&settings);
    let runtime = compio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let identity = (Path::new(&client_cert), Path::new(&client_key));
        let records = round_trip(&broker, Some(client_tls(Path::new(&ca), Some(identity))))
            .await
            .expect("a client with a certificate gets through");
        assert_eq!(records, 100);
        let error = round_trip(&broker, Some(client_tls(Path::new(&ca), None)))
            .await
            .expect_err("a client without a certificate is refused");
        assert!(!error.is_empty());
    });
}
