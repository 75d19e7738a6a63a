//! The async client library for Rill's native protocol, on compio.
//!
//! A [`Client`] is a cheap, cloneable handle to one TCP connection; many tasks
//! of the same thread share it and keep many requests in flight, each matched
//! to its answer by correlation id. Its futures are `!Send`: use one client per
//! thread. The CLI's client commands are written on it, and so can devices and
//! tools that run compio.
//!
//! ```no_run
//! # async fn example() -> Result<(), rill_node::client::ClientError> {
//! use rill_node::client::{Acks, Client, ClientConfig, Target};
//! let client = Client::connect("127.0.0.1:7470", ClientConfig::default()).await?;
//! let mut builder = rill_core::batch::RecordBuilder::new();
//! builder.push(1_700_000_000_000, None, Some(b"21.5"), &[]);
//! let produced = client
//!     .produce("sensors", Target::Any, Acks::Durable, &builder.finish())
//!     .await?;
//! # let _ = produced;
//! # Ok(())
//! # }
//! ```

mod connection;
mod error;
mod records;

#[cfg(test)]
pub(crate) mod fake_broker;
#[cfg(test)]
mod tests;

use std::rc::Rc;
use std::time::{Duration, Instant};

use compio::net::TcpStream;
use rill_protocol::{PROTOCOL_VERSION, Request, Response, ResponseFrame};

pub use connection::FetchHead;
use connection::{Driver, Pending, describe_response};

pub use error::ClientError;
pub use records::{ConsumedRecord, records_of};
pub use rill_protocol::message::{GroupInfo, PartitionInfo, StatusInfo, TopicInfo};
pub use rill_protocol::{Acks, ErrorCode, OffsetSpec, Target};

/// How a client connects and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Sent in the handshake; the broker logs it.
    pub client_id: String,
    /// Largest response frame this client accepts; a larger one closes the
    /// connection before any of it is buffered.
    pub frame_bytes_max: u32,
    /// How long a request may wait for its answer (a fetch also gets its own
    /// `max_wait_ms` on top).
    pub request_timeout_ms: u64,
    /// How long connecting and the handshake may take.
    pub connect_timeout_ms: u64,
    /// TLS to the broker; `None` is plain TCP.
    pub tls: Option<ClientTls>,
}

/// How a client speaks TLS to the broker.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    /// The name the broker's certificate must carry (DNS name or IP address).
    pub server_name: String,
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for ClientTls {}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            client_id: "rill-client".to_owned(),
            frame_bytes_max: 16 * 1024 * 1024,
            request_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            tls: None,
        }
    }
}

/// Where a produced batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub partition: u32,
    pub base_offset: i64,
    pub last_offset: i64,
    /// Set when the topic stamps log-append time instead of create time.
    pub log_append_time_ms: Option<i64>,
}

/// The answer to a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub partition: u32,
    /// One past the last offset a consumer can read now.
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// The offset to fetch next: one past the last batch returned.
    pub next_offset: i64,
    /// Whole Kafka v2 batches, raw; [`records_of`] splits them into records.
    /// They share the response's buffer: no copy is made on the way here.
    pub batches: bytes::Bytes,
}

/// A produce sent and not yet answered; see [`Client::start_produce`].
#[must_use = "a produce is only known to have succeeded once `wait` says so"]
pub struct PendingProduce {
    client: Client,
    pending: Pending,
}

/// A fetch sent and not yet answered; see [`Client::start_fetch`].
#[must_use = "a fetch's batches arrive only through `wait`"]
pub struct PendingFetch {
    client: Client,
    pending: Pending,
    head: Option<futures_channel::oneshot::Receiver<FetchHead>>,
    timeout: Duration,
}

impl PendingFetch {
    /// The answer's head, as soon as it has arrived: where the answer ends
    /// and how many bytes of batches follow. `None` when the answer is not
    /// batches (an error: [`Self::wait`] returns it) or the connection
    /// ended; also `None` on a second call.
    pub async fn head(&mut self) -> Option<FetchHead> {
        let head = self.head.take()?;
        compio::time::timeout(self.timeout, head).await.ok()?.ok()
    }

    /// Waits for the whole answer.
    pub async fn wait(self) -> Result<Fetched, ClientError> {
        let body = self
            .client
            .wait(self.pending, "fetch", self.timeout)
            .await?
            .ok_or_else(|| ClientError::Protocol("fetch got no response".into()))?;
        fetched(&body)
    }
}

impl PendingProduce {
    /// Waits for the broker's acknowledgement (`None` for `Acks::None`, once
    /// the frame is in the socket).
    pub async fn wait(self) -> Result<Option<Produced>, ClientError> {
        let body = self
            .client
            .wait(self.pending, "produce", self.client.request_timeout())
            .await?;
        let Some(body) = body else {
            return Ok(None);
        };
        match decode(&body)? {
            (
                Response::Produced {
                    partition,
                    base_offset,
                    last_offset,
                    log_append_time_ms,
                },
                _,
            ) => Ok(Some(Produced {
                partition,
                base_offset,
                last_offset,
                log_append_time_ms,
            })),
            (other, _) => Err(unexpected("Produced", &other)),
        }
    }
}

struct ClientInner {
    driver: Driver,
    config: ClientConfig,
    address: String,
    broker_version: String,
}

/// A handle to one connection to a broker. Clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Rc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Client")
            .field("address", &self.inner.address)
            .field("broker_version", &self.inner.broker_version)
            .finish_non_exhaustive()
    }
}

/// Decodes a response body; a broker `Error` becomes `ClientError::Broker`.
fn decode(body: &[u8]) -> Result<(Response<'_>, &[u8]), ClientError> {
    let (frame, raw) = ResponseFrame::decode(body)
        .map_err(|error| ClientError::Protocol(format!("undecodable response: {error}")))?;
    match frame.response {
        Response::Error { code, message } => Err(ClientError::Broker {
            code,
            message: message.to_owned(),
        }),
        response => Ok((response, raw)),
    }
}

fn unexpected(expected: &str, got: &Response<'_>) -> ClientError {
    ClientError::Protocol(format!(
        "expected a {expected} response, got {}",
        describe_response(got)
    ))
}

/// `key=value` lines, as the protocol carries topic settings.
fn settings_lines(settings: &[(String, String)]) -> Result<String, ClientError> {
    let mut lines = String::new();
    for (key, value) in settings {
        if key.is_empty() || key.contains(['=', '\n', '\r']) || value.contains(['\n', '\r']) {
            return Err(ClientError::InvalidArgument(format!(
                "topic setting `{key}={value}`: the key must be non-empty without `=` or line breaks, and the value without line breaks"
            )));
        }
        lines.push_str(key);
        lines.push('=');
        lines.push_str(value);
        lines.push('\n');
    }
    Ok(lines)
}

impl Client {
    /// Connects to `address` ("host:port"), and handshakes.
    pub async fn connect(address: &str, config: ClientConfig) -> Result<Client, ClientError> {
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let connect_error = |source| ClientError::Connect {
            address: address.to_owned(),
            source,
        };
        let stream = match compio::time::timeout(connect_timeout, TcpStream::connect(address)).await
        {
            Err(_) => {
                return Err(connect_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {} ms", config.connect_timeout_ms),
                )));
            }
            Ok(Err(source)) => return Err(connect_error(source)),
            Ok(Ok(stream)) => stream,
        };
        // Requests are small and answered one by one: do not let Nagle hold them.
        stream.set_nodelay(true).map_err(connect_error)?;
        let tls = match &config.tls {
            Some(tls) => {
                let server_name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())
                    .map_err(|error| {
                        connect_error(std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!(
                                "`{}` is not a valid TLS server name: {error}",
                                tls.server_name
                            ),
                        ))
                    })?;
                let session = rustls::ClientConnection::new(tls.config.clone(), server_name)
                    .map_err(|error| connect_error(std::io::Error::other(error)))?;
                Some(std::rc::Rc::new(std::cell::RefCell::new(
                    rustls::Connection::Client(session),
                )))
            }
            None => None,
        };
        let driver = Driver::start(stream, config.frame_bytes_max, tls);
        let pending = driver.connection.send(
            Request::Handshake {
                protocol_version: PROTOCOL_VERSION,
                client_id: &config.client_id,
            },
            true,
        )?;
        let body = connection::wait(&driver.connection, pending, "handshake", connect_timeout)
            .await?
            .ok_or_else(|| ClientError::Protocol("handshake got no response".into()))?;
        let broker_version = match decode(&body)? {
            (
                Response::HandshakeOk {
                    protocol_version,
                    broker_version,
                    frame_bytes_max,
                },
                _,
            ) => {
                if protocol_version == 0 || protocol_version > PROTOCOL_VERSION {
                    return Err(ClientError::Protocol(format!(
                        "broker chose protocol version {protocol_version}, this client speaks 1 to {PROTOCOL_VERSION}"
                    )));
                }
                driver
                    .connection
                    .set_broker_frame_bytes_max(frame_bytes_max);
                broker_version.to_owned()
            }
            (other, _) => return Err(unexpected("HandshakeOk", &other)),
        };
        Ok(Client {
            inner: Rc::new(ClientInner {
                driver,
                config,
                address: address.to_owned(),
                broker_version,
            }),
        })
    }

    /// The configuration this client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The address this client connected to.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The version the broker reported in the handshake.
    pub fn broker_version(&self) -> &str {
        &self.inner.broker_version
    }

    /// The largest request frame body the broker accepts.
    pub fn broker_frame_bytes_max(&self) -> u32 {
        self.inner.driver.connection.broker_frame_bytes_max()
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.request_timeout_ms)
    }

    async fn wait(
        &self,
        pending: Pending,
        request: &'static str,
        timeout: Duration,
    ) -> Result<Option<connection::ResponseBody>, ClientError> {
        connection::wait(&self.inner.driver.connection, pending, request, timeout).await
    }

    /// Sends `request` and returns the response body.
    async fn call(
        &self,
        request: Request<'_>,
        name: &'static str,
        timeout: Duration,
    ) -> Result<connection::ResponseBody, ClientError> {
        let pending = self.inner.driver.connection.send(request, true)?;
        self.wait(pending, name, timeout)
            .await?
            .ok_or_else(|| ClientError::Protocol(format!("{name} got no response")))
    }

    /// Sends a request whose answer is `Done`.
    async fn call_done(&self, request: Request<'_>, name: &'static str) -> Result<(), ClientError> {
        let body = self.call(request, name, self.request_timeout()).await?;
        match decode(&body)? {
            (Response::Done, _) => Ok(()),
            (other, _) => Err(unexpected("Done", &other)),
        }
    }

    /// The round trip to the broker.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let started = Instant::now();
        let body = self
            .call(Request::Ping, "ping", self.request_timeout())
            .await?;
        match decode(&body)? {
            (Response::Pong, _) => Ok(started.elapsed()),
            (other, _) => Err(unexpected("Pong", &other)),
        }
    }

    /// Queues a produce now and returns a handle to wait on. Produces started
    /// one after another leave in that order, so a caller can keep several in
    /// flight and still have them appended in order.
    pub fn start_produce(
        &self,
        topic: &str,
        target: Target<'_>,
        acks: Acks,
        batch: &[u8],
    ) -> Result<PendingProduce, ClientError> {
        let pending = self.inner.driver.connection.send(
            Request::Produce {
                topic,
                target,
                acks,
                batch,
            },
            acks != Acks::None,
        )?;
        Ok(PendingProduce {
            client: self.clone(),
            pending,
        })
    }

    /// Appends one Kafka v2 batch. With `Acks::None` there is no response:
    /// `Ok(None)` once the batch is written to the socket.
    pub async fn produce(
        &self,
        topic: &str,
        target: Target<'_>,
        acks: Acks,
        batch: &[u8],
    ) -> Result<Option<Produced>, ClientError> {
        self.start_produce(topic, target, acks, batch)?.wait().await
    }

    /// Queues a fetch now and returns a handle that tells where the answer
    /// ends as soon as its head arrives ([`PendingFetch::head`]), before its
    /// batches do. A consumer that starts the next fetch then keeps the
    /// connection busy: the broker prepares the next answer while this one
    /// is still being sent, instead of waiting a round trip for the request.
    pub fn start_fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        min_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<PendingFetch, ClientError> {
        let (pending, head) = self.inner.driver.connection.send_fetch(Request::Fetch {
            topic,
            partition,
            offset,
            max_bytes,
            min_bytes,
            max_wait_ms,
        })?;
        Ok(PendingFetch {
            client: self.clone(),
            pending,
            head: Some(head),
            timeout: self.request_timeout() + Duration::from_millis(u64::from(max_wait_ms)),
        })
    }

    /// Reads whole batches from `offset`, waiting up to `max_wait_ms` for at
    /// least `min_bytes`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        min_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<Fetched, ClientError> {
        self.start_fetch(topic, partition, offset, max_bytes, min_bytes, max_wait_ms)?
            .wait()
            .await
    }

    /// The earliest or latest offset of a partition, or the first at or after
    /// a time; `None` when no record is that recent.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        at: OffsetSpec,
    ) -> Result<Option<i64>, ClientError> {
        let body = self
            .call(
                Request::ListOffsets {
                    topic,
                    partition,
                    at,
                },
                "list-offsets",
                self.request_timeout(),
            )
            .await?;
        match decode(&body)? {
            (Response::Offset { offset }, _) => Ok(offset),
            (other, _) => Err(unexpected("Offset", &other)),
        }
    }

    /// Topics with their partitions; all topics when `topic` is `None`.
    pub async fn metadata(&self, topic: Option<&str>) -> Result<Vec<TopicInfo>, ClientError> {
        let body = self
            .call(
                Request::Metadata { topic },
                "metadata",
                self.request_timeout(),
            )
            .await?;
        match decode(&body)? {
            (Response::Metadata { topics }, _) => Ok(topics),
            (other, _) => Err(unexpected("Metadata", &other)),
        }
    }

    /// Creates a topic; `settings` override the broker's topic defaults.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        settings: &[(String, String)],
    ) -> Result<(), ClientError> {
        let settings = settings_lines(settings)?;
        self.call_done(
            Request::CreateTopic {
                name,
                partitions,
                settings: &settings,
            },
            "create-topic",
        )
        .await
    }

    /// One topic with its partitions and settings.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        let body = self
            .call(
                Request::DescribeTopic { name },
                "describe-topic",
                self.request_timeout(),
            )
            .await?;
        match decode(&body)? {
            (Response::Metadata { topics }, _) => {
                let found = topics.len();
                topics.into_iter().find(|topic| topic.name == name).ok_or_else(|| {
                    ClientError::Protocol(format!(
                        "describe of `{name}` answered with {found} topics, none of them `{name}`"
                    ))
                })
            }
            (other, _) => Err(unexpected("Metadata", &other)),
        }
    }

    /// Changes settings and, when larger, the partition count.
    pub async fn alter_topic(
        &self,
        name: &str,
        partitions: Option<u32>,
        settings: &[(String, String)],
    ) -> Result<(), ClientError> {
        let settings = settings_lines(settings)?;
        self.call_done(
            Request::AlterTopic {
                name,
                partitions,
                settings: &settings,
            },
            "alter-topic",
        )
        .await
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        self.call_done(Request::DeleteTopic { name }, "delete-topic")
            .await
    }

    /// Stores `offset` (the next offset to read) for a group.
    pub async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<(), ClientError> {
        self.call_done(
            Request::CommitOffset {
                group,
                topic,
                partition,
                offset,
            },
            "commit-offset",
        )
        .await
    }

    /// A group's committed offset; `None` when it has none for the partition.
    pub async fn fetch_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<i64>, ClientError> {
        let body = self
            .call(
                Request::FetchOffset {
                    group,
                    topic,
                    partition,
                },
                "fetch-offset",
                self.request_timeout(),
            )
            .await?;
        match decode(&body)? {
            (Response::CommittedOffset { offset }, _) => Ok(offset),
            (other, _) => Err(unexpected("CommittedOffset", &other)),
        }
    }

    pub async fn list_groups(&self) -> Result<Vec<GroupInfo>, ClientError> {
        let body = self
            .call(Request::ListGroups, "list-groups", self.request_timeout())
            .await?;
        match decode(&body)? {
            (Response::Groups { groups }, _) => Ok(groups),
            (other, _) => Err(unexpected("Groups", &other)),
        }
    }

    pub async fn status(&self) -> Result<StatusInfo, ClientError> {
        let body = self
            .call(Request::Status, "status", self.request_timeout())
            .await?;
        match decode(&body)? {
            (Response::Status(status), _) => Ok(status),
            (other, _) => Err(unexpected("Status", &other)),
        }
    }
}

/// A fetch answer's batches, checked against the length its head announces.
fn fetched(body: &connection::ResponseBody) -> Result<Fetched, ClientError> {
    let (response, raw) = decode(body)?;
    let Some(head) = FetchHead::of(&response) else {
        return Err(unexpected("Fetched", &response));
    };
    if raw.len() != head.records_bytes as usize {
        return Err(ClientError::Protocol(format!(
            "fetch response announces {} bytes of batches but carries {}",
            head.records_bytes,
            raw.len()
        )));
    }
    Ok(Fetched {
        partition: head.partition,
        high_watermark: head.high_watermark,
        log_start_offset: head.log_start_offset,
        next_offset: head.next_offset,
        batches: body.slice_ref(raw),
    })
}
