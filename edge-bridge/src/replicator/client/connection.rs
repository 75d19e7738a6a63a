//! One connection to one broker: request frames out, response frames in,
//! matched by correlation id in order, and the handshake every connection
//! starts with (ApiVersions, then SASL when configured).

use std::collections::{BTreeMap, VecDeque};

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, CreateTopicsResponse, FetchResponse,
    InitProducerIdResponse, ListOffsetsResponse, MetadataResponse, ProduceResponse, RequestHeader,
    ResponseHeader, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::sasl::{SaslMechanism, ScramClient, plain_message};
use super::{ClientError, SaslConfig};

/// The APIs and versions this client speaks. Produce and Fetch stop below
/// the versions that name topics by id only.
pub(crate) const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 12),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// Needed on every connection; the SASL ones only with SASL, CreateTopics
/// only when a topic must be created.
const REQUIRED: &[ApiKey] = &[
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::ListOffsets,
    ApiKey::Metadata,
    ApiKey::InitProducerId,
];

const UNSUPPORTED_VERSION: i16 = 35;

/// A request this client sends. (`kafka_protocol`'s own `Request` trait
/// also needs the broker-side decoders.)
pub(crate) trait ClientRequest: Encodable + HeaderVersion {
    const API: ApiKey;
}

macro_rules! client_requests {
    ($($request:ident => $api:ident),* $(,)?) => {
        $(impl ClientRequest for kafka_protocol::messages::$request {
            const API: ApiKey = ApiKey::$api;
        })*
    };
}

client_requests! {
    ApiVersionsRequest => ApiVersions,
    SaslHandshakeRequest => SaslHandshake,
    SaslAuthenticateRequest => SaslAuthenticate,
    MetadataRequest => Metadata,
    CreateTopicsRequest => CreateTopics,
    InitProducerIdRequest => InitProducerId,
    ProduceRequest => Produce,
    FetchRequest => Fetch,
    ListOffsetsRequest => ListOffsets,
}

/// Why a request went out, so its answer can be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Purpose {
    ApiVersions,
    SaslHandshake,
    SaslAuthenticate,
    Metadata,
    CreateTopics,
    InitProducerId,
    /// The (partition, token) of each batch, in request order.
    Produce(Vec<(super::TopicPartition, u64)>),
    Fetch(super::FetchRequestInfo),
    ListOffsets(super::ListOffsetsInfo),
}

/// A decoded answer.
#[derive(Debug)]
pub(crate) enum Response {
    Metadata(MetadataResponse),
    CreateTopics(CreateTopicsResponse),
    InitProducerId(InitProducerIdResponse),
    Produce(ProduceResponse),
    Fetch(FetchResponse),
    ListOffsets(ListOffsetsResponse),
}

#[derive(Debug)]
struct InFlight {
    correlation_id: i32,
    api: ApiKey,
    version: i16,
    sent_at_ms: u64,
    purpose: Purpose,
}

enum Phase {
    /// ApiVersions sent.
    Versions,
    Handshake,
    Authenticate(Option<ScramClient>),
    Ready,
}

/// What a connection's input produced.
pub(crate) enum Incoming {
    /// The handshake finished: requests may go out.
    Ready,
    Response(Purpose, Response),
}

pub(crate) struct Connection {
    client_id: StrBytes,
    sasl: Option<SaslConfig>,
    scram_nonce: String,
    scram_iterations_max: u32,
    response_bytes_max: usize,
    phase: Phase,
    next_correlation_id: i32,
    in_flight: VecDeque<InFlight>,
    received: BytesMut,
    versions: BTreeMap<i16, i16>,
    /// Frames to write, taken by the client.
    pub(crate) outgoing: Vec<Bytes>,
}

fn encode_frame<R: ClientRequest>(
    header: &RequestHeader,
    body: &R,
    version: i16,
) -> Result<Bytes, ClientError> {
    let mut frame = BytesMut::with_capacity(64);
    frame.extend_from_slice(&[0; 4]);
    let encoded = header
        .encode(&mut frame, R::header_version(version))
        .and_then(|()| body.encode(&mut frame, version));
    encoded.map_err(|error| ClientError::Encode(error.to_string()))?;
    let size = i32::try_from(frame.len() - 4)
        .map_err(|_| ClientError::Encode("frame over 2 GiB".into()))?;
    frame[0..4].copy_from_slice(&size.to_be_bytes());
    Ok(frame.freeze())
}

fn decode<R: Decodable>(body: &mut Bytes, version: i16) -> Result<R, ClientError> {
    R::decode(body, version).map_err(|error| ClientError::Decode(error.to_string()))
}

impl Connection {
    /// A connection whose socket just opened: sends ApiVersions.
    pub(crate) fn open(
        client_id: &str,
        sasl: Option<SaslConfig>,
        scram_nonce: String,
        scram_iterations_max: u32,
        response_bytes_max: usize,
        now_ms: u64,
    ) -> Result<Connection, ClientError> {
        let mut connection = Connection {
            client_id: StrBytes::from_string(client_id.to_owned()),
            sasl,
            scram_nonce,
            scram_iterations_max,
            response_bytes_max,
            phase: Phase::Versions,
            next_correlation_id: 0,
            in_flight: VecDeque::new(),
            received: BytesMut::new(),
            versions: BTreeMap::new(),
            outgoing: Vec::new(),
        };
        connection.send_api_versions(3, now_ms)?;
        Ok(connection)
    }

    fn send_api_versions(&mut self, version: i16, now_ms: u64) -> Result<(), ClientError> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("rill-replicator"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        self.send_at(&request, version, Purpose::ApiVersions, now_ms)
    }

    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// When the oldest request was sent, if any is waiting.
    pub(crate) fn oldest_sent_at_ms(&self) -> Option<u64> {
        self.in_flight.front().map(|request| request.sent_at_ms)
    }

    /// The version both sides speak for `api`, once known.
    pub(crate) fn version(&self, api: ApiKey) -> Option<i16> {
        self.versions.get(&(api as i16)).copied()
    }

    /// The requests waiting for an answer, oldest first (for retries when
    /// the connection is lost).
    pub(crate) fn take_in_flight(&mut self) -> Vec<Purpose> {
        self.in_flight
            .drain(..)
            .map(|request| request.purpose)
            .collect()
    }

    /// Encodes and queues a request at the negotiated version.
    pub(crate) fn send<R: ClientRequest>(
        &mut self,
        body: &R,
        purpose: Purpose,
        now_ms: u64,
    ) -> Result<(), ClientError> {
        let version = self
            .version(R::API)
            .ok_or(ClientError::UnsupportedApi { api: R::API as i16 })?;
        self.send_at(body, version, purpose, now_ms)
    }

    fn send_at<R: ClientRequest>(
        &mut self,
        body: &R,
        version: i16,
        purpose: Purpose,
        now_ms: u64,
    ) -> Result<(), ClientError> {
        let api = R::API;
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1) & i32::MAX;
        let header = RequestHeader::default()
            .with_request_api_key(R::API as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(self.client_id.clone()));
        self.outgoing.push(encode_frame(&header, body, version)?);
        self.in_flight.push_back(InFlight {
            correlation_id,
            api,
            version,
            sent_at_ms: now_ms,
            purpose,
        });
        Ok(())
    }

    /// Takes bytes read from the socket; gives what they completed. An
    /// error means the connection must be closed.
    pub(crate) fn receive(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<Vec<Incoming>, ClientError> {
        self.received.extend_from_slice(bytes);
        let mut incoming = Vec::new();
        while let Some(size) = self.received.get(0..4) {
            let size = i32::from_be_bytes([size[0], size[1], size[2], size[3]]);
            let size = usize::try_from(size)
                .map_err(|_| ClientError::Decode("negative frame size".into()))?;
            if size > self.response_bytes_max {
                return Err(ClientError::FrameTooLarge {
                    bytes: size,
                    bytes_max: self.response_bytes_max,
                });
            }
            if self.received.len() < 4 + size {
                break;
            }
            self.received.advance(4);
            let frame = self.received.split_to(size).freeze();
            if let Some(item) = self.handle_frame(frame, now_ms)? {
                incoming.push(item);
            }
        }
        Ok(incoming)
    }

    fn handle_frame(
        &mut self,
        mut frame: Bytes,
        now_ms: u64,
    ) -> Result<Option<Incoming>, ClientError> {
        let request = self
            .in_flight
            .pop_front()
            .ok_or(ClientError::UnexpectedResponse)?;
        let header_version = response_header_version(request.api, request.version);
        let header: ResponseHeader = decode(&mut frame, header_version)?;
        if header.correlation_id != request.correlation_id {
            return Err(ClientError::CorrelationMismatch {
                expected: request.correlation_id,
                found: header.correlation_id,
            });
        }
        let version = request.version;
        Ok(match request.purpose {
            Purpose::ApiVersions => self.handle_api_versions(frame, version, now_ms)?,
            Purpose::SaslHandshake => {
                let response: SaslHandshakeResponse = decode(&mut frame, version)?;
                self.handle_handshake(response, now_ms)?;
                None
            }
            Purpose::SaslAuthenticate => {
                let response: SaslAuthenticateResponse = decode(&mut frame, version)?;
                self.handle_authenticate(response, now_ms)?
            }
            Purpose::Metadata => Some(Incoming::Response(
                Purpose::Metadata,
                Response::Metadata(decode(&mut frame, version)?),
            )),
            Purpose::CreateTopics => Some(Incoming::Response(
                Purpose::CreateTopics,
                Response::CreateTopics(decode(&mut frame, version)?),
            )),
            Purpose::InitProducerId => Some(Incoming::Response(
                Purpose::InitProducerId,
                Response::InitProducerId(decode(&mut frame, version)?),
            )),
            purpose @ Purpose::Produce(_) => Some(Incoming::Response(
                purpose,
                Response::Produce(decode(&mut frame, version)?),
            )),
            purpose @ Purpose::Fetch(_) => Some(Incoming::Response(
                purpose,
                Response::Fetch(decode(&mut frame, version)?),
            )),
            purpose @ Purpose::ListOffsets(_) => Some(Incoming::Response(
                purpose,
                Response::ListOffsets(decode(&mut frame, version)?),
            )),
        })
    }

    fn handle_api_versions(
        &mut self,
        mut frame: Bytes,
        version: i16,
        now_ms: u64,
    ) -> Result<Option<Incoming>, ClientError> {
        let body = frame.clone();
        let response = decode::<ApiVersionsResponse>(&mut frame, version);
        let response = match response {
            Ok(response) if response.error_code != UNSUPPORTED_VERSION => response,
            _ if version > 0 => {
                // Too new for the broker: it answers in version 0 with the
                // versions it has; ask again with the highest common one.
                let mut body = body;
                let v0: ApiVersionsResponse = decode(&mut body, 0)?;
                let ours = SUPPORTED
                    .iter()
                    .find(|(api, _, _)| *api == ApiKey::ApiVersions)
                    .map_or(0, |&(_, _, max)| max);
                let theirs = v0
                    .api_keys
                    .iter()
                    .find(|key| key.api_key == ApiKey::ApiVersions as i16)
                    .map_or(0, |key| key.max_version);
                let retry = ours.min(theirs).max(0);
                if retry >= version {
                    return Err(ClientError::Decode("ApiVersions answer unreadable".into()));
                }
                self.send_api_versions(retry, now_ms)?;
                return Ok(None);
            }
            Ok(response) => {
                return Err(ClientError::Broker {
                    api: ApiKey::ApiVersions as i16,
                    code: response.error_code,
                });
            }
            Err(error) => return Err(error),
        };
        if response.error_code != 0 {
            return Err(ClientError::Broker {
                api: ApiKey::ApiVersions as i16,
                code: response.error_code,
            });
        }
        for key in &response.api_keys {
            if let Some(&(_, min, max)) = SUPPORTED
                .iter()
                .find(|(api, _, _)| *api as i16 == key.api_key)
            {
                let high = max.min(key.max_version);
                if high >= min.max(key.min_version) {
                    self.versions.insert(key.api_key, high);
                }
            }
        }
        let mut required: Vec<ApiKey> = REQUIRED.to_vec();
        if self.sasl.is_some() {
            required.extend([ApiKey::SaslHandshake, ApiKey::SaslAuthenticate]);
        }
        if let Some(missing) = required.iter().find(|api| self.version(**api).is_none()) {
            return Err(ClientError::UnsupportedApi {
                api: *missing as i16,
            });
        }
        self.start_sasl(now_ms)
    }

    fn start_sasl(&mut self, now_ms: u64) -> Result<Option<Incoming>, ClientError> {
        let Some(sasl) = &self.sasl else {
            self.phase = Phase::Ready;
            return Ok(Some(Incoming::Ready));
        };
        let request = SaslHandshakeRequest::default()
            .with_mechanism(StrBytes::from_static_str(sasl.mechanism.name()));
        self.phase = Phase::Handshake;
        self.send(&request, Purpose::SaslHandshake, now_ms)?;
        Ok(None)
    }

    fn handle_handshake(
        &mut self,
        response: SaslHandshakeResponse,
        now_ms: u64,
    ) -> Result<(), ClientError> {
        let Some(sasl) = self.sasl.clone() else {
            return Err(ClientError::UnexpectedResponse);
        };
        if response.error_code != 0 {
            return Err(ClientError::SaslMechanismRefused {
                mechanism: sasl.mechanism.name(),
                offered: response.mechanisms.iter().map(|m| m.to_string()).collect(),
            });
        }
        let (first, scram) = match sasl.mechanism {
            SaslMechanism::Plain => (plain_message(&sasl.username, &sasl.password), None),
            mechanism => {
                let scram = ScramClient::new(
                    mechanism,
                    &sasl.username,
                    &sasl.password,
                    &self.scram_nonce,
                    self.scram_iterations_max,
                );
                (scram.client_first(), Some(scram))
            }
        };
        self.phase = Phase::Authenticate(scram);
        let request = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(first));
        self.send(&request, Purpose::SaslAuthenticate, now_ms)
    }

    fn handle_authenticate(
        &mut self,
        response: SaslAuthenticateResponse,
        now_ms: u64,
    ) -> Result<Option<Incoming>, ClientError> {
        if response.error_code != 0 {
            return Err(ClientError::Authentication(
                response.error_message.map_or_else(
                    || format!("error code {}", response.error_code),
                    |m| m.to_string(),
                ),
            ));
        }
        let Phase::Authenticate(scram) = &mut self.phase else {
            return Err(ClientError::UnexpectedResponse);
        };
        let Some(scram) = scram else {
            // PLAIN: one round.
            self.phase = Phase::Ready;
            return Ok(Some(Incoming::Ready));
        };
        if scram.is_done() {
            return Err(ClientError::UnexpectedResponse);
        }
        let sasl_failed =
            |error: super::sasl::SaslError| ClientError::Authentication(error.to_string());
        // The first answer carries server-first, the second server-final.
        let next = if scram_awaits_final(scram) {
            scram
                .handle_server_final(&response.auth_bytes)
                .map_err(sasl_failed)?;
            None
        } else {
            Some(
                scram
                    .handle_server_first(&response.auth_bytes)
                    .map_err(sasl_failed)?,
            )
        };
        match next {
            Some(client_final) => {
                let request =
                    SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(client_final));
                self.send(&request, Purpose::SaslAuthenticate, now_ms)?;
                Ok(None)
            }
            None => {
                self.phase = Phase::Ready;
                Ok(Some(Incoming::Ready))
            }
        }
    }
}

fn scram_awaits_final(scram: &ScramClient) -> bool {
    scram.sent_final()
}

/// The response header version of `api` at `version` (ApiVersions answers
/// always use version 0, so a client can read them whatever it asked).
fn response_header_version(api: ApiKey, version: i16) -> i16 {
    use kafka_protocol::messages as m;
    match api {
        ApiKey::ApiVersions => 0,
        ApiKey::Produce => m::ProduceResponse::header_version(version),
        ApiKey::Fetch => m::FetchResponse::header_version(version),
        ApiKey::ListOffsets => m::ListOffsetsResponse::header_version(version),
        ApiKey::Metadata => m::MetadataResponse::header_version(version),
        ApiKey::SaslHandshake => m::SaslHandshakeResponse::header_version(version),
        ApiKey::SaslAuthenticate => m::SaslAuthenticateResponse::header_version(version),
        ApiKey::CreateTopics => m::CreateTopicsResponse::header_version(version),
        ApiKey::InitProducerId => m::InitProducerIdResponse::header_version(version),
        _ => 0,
    }
}
