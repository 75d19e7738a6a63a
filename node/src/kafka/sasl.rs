//! SASL authentication of Kafka connections (SaslHandshake v1, then
//! SaslAuthenticate), when `kafka.sasl_users_file` is set. The exchange
//! itself is `rill_edge_bridge::sasl`'s; this is its place in a connection:
//! until a connection has authenticated it may send only ApiVersions,
//! SaslHandshake and SaslAuthenticate, anything else closes it (as a Kafka
//! broker does); a failed exchange is answered with
//! SASL_AUTHENTICATION_FAILED and the connection closed after the answer.

use std::io::Read;

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use rill_edge_bridge::sasl::{SaslServer, SaslStep};

use crate::broker::Shared;

/// UNSUPPORTED_SASL_MECHANISM.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
/// ILLEGAL_SASL_STATE.
const ILLEGAL_SASL_STATE: i16 = 34;
/// SASL_AUTHENTICATION_FAILED.
const SASL_AUTHENTICATION_FAILED: i16 = 58;

/// Where a connection stands.
pub(crate) enum Auth {
    /// No users file: nothing to prove.
    Open,
    /// Not yet authenticated; the exchange once a mechanism was chosen.
    Pending(Option<SaslServer>),
    Authenticated,
}

impl Auth {
    pub(crate) fn for_broker(shared: &Shared) -> Auth {
        match shared.kafka.sasl_users {
            Some(_) => Auth::Pending(None),
            None => Auth::Open,
        }
    }

    /// Whether a request of `api` may be served now.
    pub(crate) fn allows(&self, api: ApiKey) -> bool {
        match self {
            Auth::Open | Auth::Authenticated => true,
            Auth::Pending(_) => matches!(
                api,
                ApiKey::ApiVersions | ApiKey::SaslHandshake | ApiKey::SaslAuthenticate
            ),
        }
    }
}

/// Answers SaslHandshake: the mechanism is accepted when offered, and the
/// offered list is sent either way.
pub(crate) fn handshake(
    auth: &mut Auth,
    shared: &Shared,
    request: &SaslHandshakeRequest,
) -> SaslHandshakeResponse {
    let offered: Vec<String> = if shared.kafka.sasl_users.is_some() {
        shared.kafka.sasl_mechanisms.clone()
    } else {
        Vec::new()
    };
    let mechanisms = offered
        .iter()
        .map(|name| StrBytes::from_string(name.clone()))
        .collect();
    let response = SaslHandshakeResponse::default().with_mechanisms(mechanisms);
    match auth {
        Auth::Pending(None) => match SaslServer::new(request.mechanism.as_str(), &offered) {
            Ok(server) => {
                *auth = Auth::Pending(Some(server));
                response
            }
            Err(_) => response.with_error_code(UNSUPPORTED_SASL_MECHANISM),
        },
        // Without a users file no mechanism is offered.
        Auth::Open => response.with_error_code(UNSUPPORTED_SASL_MECHANISM),
        _ => response.with_error_code(ILLEGAL_SASL_STATE),
    }
}

/// Answers SaslAuthenticate; `false` with the answer when the connection
/// must close after it.
pub(crate) async fn authenticate(
    auth: &mut Auth,
    shared: &Shared,
    request: SaslAuthenticateRequest,
) -> (SaslAuthenticateResponse, bool) {
    let failed = |code: i16, message: String| {
        (
            SaslAuthenticateResponse::default()
                .with_error_code(code)
                .with_error_message(Some(StrBytes::from_string(message))),
            false,
        )
    };
    let (Auth::Pending(server), Some(users)) = (&mut *auth, shared.kafka.sasl_users.clone()) else {
        return failed(
            ILLEGAL_SASL_STATE,
            "SaslAuthenticate on a connection that needs no authentication or has it".into(),
        );
    };
    let Some(mut exchange) = server.take() else {
        return failed(
            ILLEGAL_SASL_STATE,
            "SaslAuthenticate without a SaslHandshake choosing a mechanism".into(),
        );
    };
    let nonce = match server_nonce() {
        Ok(nonce) => nonce,
        Err(error) => {
            tracing::error!(%error, "no randomness for a SCRAM nonce");
            return failed(
                SASL_AUTHENTICATION_FAILED,
                "the broker has no randomness".into(),
            );
        }
    };
    // The exchange may run PBKDF2 (PLAIN checks the password): off the shard.
    let message = request.auth_bytes;
    let result = compio::runtime::spawn_blocking(move || {
        let step = exchange.step(&users, &message, &nonce);
        (exchange, step)
    })
    .await;
    let Ok((exchange, step)) = result else {
        return failed(
            SASL_AUTHENTICATION_FAILED,
            "the authentication check failed".into(),
        );
    };
    if matches!(step, Ok(SaslStep::Continue(_))) {
        *server = Some(exchange);
    }
    match step {
        Ok(SaslStep::Continue(reply)) => (
            SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(reply)),
            true,
        ),
        Ok(SaslStep::Done { user, response }) => {
            tracing::debug!(user, "Kafka client authenticated");
            *auth = Auth::Authenticated;
            (
                SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(response)),
                true,
            )
        }
        Err(error) => {
            // Clients put their own "authentication failed" before it.
            let message = error.to_string();
            tracing::info!(%error, "Kafka client failed to authenticate");
            failed(SASL_AUTHENTICATION_FAILED, message)
        }
    }
}

/// 18 random bytes from the operating system, base64: printable, no commas.
fn server_nonce() -> std::io::Result<String> {
    use base64_nonce::encode;
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(encode(&bytes))
}

mod base64_nonce {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Base64 of a multiple of 3 bytes (no padding needed).
    pub(super) fn encode(bytes: &[u8; 18]) -> String {
        let mut out = String::with_capacity(24);
        for chunk in bytes.chunks(3) {
            let value =
                (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]);
            for shift in [18, 12, 6, 0] {
                out.push(char::from(ALPHABET[((value >> shift) & 0x3f) as usize]));
            }
        }
        out
    }
}
