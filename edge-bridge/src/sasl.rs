//! SASL on the server side, for Rill's Kafka listener: PLAIN (RFC 4616) and
//! SCRAM-SHA-256 (RFC 5802, RFC 7677), checked against a users file
//! ([`PasswordFile`], the same file and format MQTT uses).
//!
//! A users file line holds PBKDF2-HMAC-SHA256 of the password with its salt
//! and rounds: that is SCRAM-SHA-256's SaltedPassword, so the server never
//! needs the password itself, and one file serves both mechanisms.
//! SCRAM-SHA-512 would need a SHA-512 hash per user and is not offered.
//!
//! An unknown user gets a SCRAM server-first message like a known one (a
//! salt derived from the user name and the file's highest rounds), and the
//! exchange fails only at the proof, so the answers tell nothing about
//! which user names exist. Proofs are compared in constant time. Every
//! message is bounded ([`SASL_MESSAGE_BYTES_MAX`]); nothing in here panics
//! on what a client sends.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use subtle::ConstantTimeEq;

use crate::mqtt::auth::PasswordFile;
use crate::replicator::client::sasl::{SaslMechanism, attribute, hash, hmac};

/// The longest SASL message a client may send.
pub const SASL_MESSAGE_BYTES_MAX: usize = 4096;

/// The mechanisms the server can offer, by their SaslHandshake names.
pub const SERVER_MECHANISMS: [&str; 2] = ["PLAIN", "SCRAM-SHA-256"];

/// Why an exchange failed; the message is for the client's error text and
/// the log, never naming which of user or password was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslServerError {
    #[error("SASL mechanism {0:?} is not enabled")]
    UnsupportedMechanism(String),
    #[error("malformed SASL message: {0}")]
    Malformed(&'static str),
    #[error("bad user name or password")]
    BadCredentials,
    #[error("SASL message out of turn: the exchange is over")]
    OutOfTurn,
}

/// What the server answers one client message with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslStep {
    /// Send these bytes; the exchange goes on.
    Continue(Vec<u8>),
    /// Send these bytes; the client is authenticated as `user`.
    Done { user: String, response: Vec<u8> },
}

enum State {
    /// PLAIN: waiting for its single message.
    Plain,
    /// SCRAM: waiting for client-first.
    ScramFirst,
    /// SCRAM: server-first sent, waiting for client-final.
    ScramFinal {
        user: String,
        /// `None` for an unknown user: the proof can never match.
        stored_key: Option<Vec<u8>>,
        server_key: Vec<u8>,
        nonce: String,
        /// client-first-bare + "," + server-first.
        auth_prefix: String,
        gs2_header: String,
    },
    Over,
}

/// One client's SASL exchange.
pub struct SaslServer {
    state: State,
}

fn bounded(message: &[u8]) -> Result<&[u8], SaslServerError> {
    if message.len() > SASL_MESSAGE_BYTES_MAX {
        return Err(SaslServerError::Malformed("message too long"));
    }
    Ok(message)
}

fn text(message: &[u8]) -> Result<&str, SaslServerError> {
    std::str::from_utf8(bounded(message)?).map_err(|_| SaslServerError::Malformed("not UTF-8"))
}

/// A SCRAM user name with `=2C` and `=3D` decoded; any other `=` is an error.
fn unescape_username(name: &str) -> Result<String, SaslServerError> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3);
        match escape {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(SaslServerError::Malformed("bad escape in the user name")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

impl SaslServer {
    /// Starts an exchange for `mechanism` if it is among `enabled`.
    pub fn new(mechanism: &str, enabled: &[String]) -> Result<SaslServer, SaslServerError> {
        let known = SERVER_MECHANISMS.contains(&mechanism);
        if !known || !enabled.iter().any(|name| name == mechanism) {
            return Err(SaslServerError::UnsupportedMechanism(mechanism.to_owned()));
        }
        let state = if mechanism == "PLAIN" {
            State::Plain
        } else {
            State::ScramFirst
        };
        Ok(SaslServer { state })
    }

    pub fn is_over(&self) -> bool {
        matches!(self.state, State::Over)
    }

    /// Takes one client message. `server_nonce` is fresh randomness for this
    /// exchange (printable ASCII without commas); it is used by SCRAM's
    /// first step only. After an error or [`SaslStep::Done`] the exchange
    /// is over.
    pub fn step(
        &mut self,
        users: &PasswordFile,
        message: &[u8],
        server_nonce: &str,
    ) -> Result<SaslStep, SaslServerError> {
        let state = std::mem::replace(&mut self.state, State::Over);
        match state {
            State::Plain => plain(users, message),
            State::ScramFirst => {
                let (next, reply) = scram_first(users, message, server_nonce)?;
                self.state = next;
                Ok(SaslStep::Continue(reply))
            }
            State::ScramFinal {
                user,
                stored_key,
                server_key,
                nonce,
                auth_prefix,
                gs2_header,
            } => {
                let message = text(message)?;
                let channel = attribute(message, 'c')
                    .ok_or(SaslServerError::Malformed("no channel binding"))?;
                if BASE64.decode(channel).ok().as_deref() != Some(gs2_header.as_bytes()) {
                    return Err(SaslServerError::Malformed("channel binding does not match"));
                }
                if attribute(message, 'r') != Some(nonce.as_str()) {
                    return Err(SaslServerError::Malformed("nonce does not match"));
                }
                let (without_proof, proof) = message
                    .rsplit_once(",p=")
                    .ok_or(SaslServerError::Malformed("no proof"))?;
                let proof = BASE64
                    .decode(proof)
                    .map_err(|_| SaslServerError::Malformed("proof is not base64"))?;
                let auth_message = format!("{auth_prefix},{without_proof}");
                let mechanism = SaslMechanism::ScramSha256;
                let Some(stored_key) = stored_key else {
                    return Err(SaslServerError::BadCredentials);
                };
                let signature = hmac(mechanism, &stored_key, auth_message.as_bytes());
                if proof.len() != signature.len() {
                    return Err(SaslServerError::BadCredentials);
                }
                let client_key: Vec<u8> = proof
                    .iter()
                    .zip(&signature)
                    .map(|(proof, signature)| proof ^ signature)
                    .collect();
                if !bool::from(hash(mechanism, &client_key).ct_eq(&stored_key)) {
                    return Err(SaslServerError::BadCredentials);
                }
                let verifier = hmac(mechanism, &server_key, auth_message.as_bytes());
                Ok(SaslStep::Done {
                    user,
                    response: format!("v={}", BASE64.encode(verifier)).into_bytes(),
                })
            }
            State::Over => Err(SaslServerError::OutOfTurn),
        }
    }
}

fn plain(users: &PasswordFile, message: &[u8]) -> Result<SaslStep, SaslServerError> {
    let mut parts = bounded(message)?.split(|byte| *byte == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslServerError::Malformed(
            "PLAIN is authzid NUL user NUL password",
        ));
    };
    let user = std::str::from_utf8(user)
        .map_err(|_| SaslServerError::Malformed("the user name is not UTF-8"))?;
    if !authzid.is_empty() && authzid != user.as_bytes() {
        // Acting as someone else is not something Rill grants.
        return Err(SaslServerError::BadCredentials);
    }
    if users.verify(user, password) {
        Ok(SaslStep::Done {
            user: user.to_owned(),
            response: Vec::new(),
        })
    } else {
        Err(SaslServerError::BadCredentials)
    }
}

fn scram_first(
    users: &PasswordFile,
    message: &[u8],
    server_nonce: &str,
) -> Result<(State, Vec<u8>), SaslServerError> {
    let message = text(message)?;
    // gs2-header: no channel binding ("n" or "y"), an optional authzid.
    let mut parts = message.splitn(3, ',');
    let (Some(binding), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslServerError::Malformed("no GS2 header"));
    };
    if binding != "n" && binding != "y" {
        return Err(SaslServerError::Malformed(
            "channel binding is not supported",
        ));
    }
    let gs2_header = format!("{binding},{authzid},");
    let user =
        unescape_username(attribute(bare, 'n').ok_or(SaslServerError::Malformed("no user name"))?)?;
    if !authzid.is_empty() && authzid.strip_prefix("a=") != Some(user.as_str()) {
        return Err(SaslServerError::BadCredentials);
    }
    let client_nonce = attribute(bare, 'r').ok_or(SaslServerError::Malformed("no nonce"))?;
    if client_nonce.is_empty() || bare.starts_with("m=") {
        return Err(SaslServerError::Malformed("bad nonce or extension"));
    }
    let nonce = format!("{client_nonce}{server_nonce}");
    let mechanism = SaslMechanism::ScramSha256;
    let (salt, rounds, stored_key, server_key) = match users.scram_sha256(&user) {
        Some((salt, rounds, salted)) => {
            let client_key = hmac(mechanism, salted, b"Client Key");
            (
                salt.to_vec(),
                rounds,
                Some(hash(mechanism, &client_key)),
                hmac(mechanism, salted, b"Server Key"),
            )
        }
        None => {
            // A salt that is stable per name, so asking twice looks the same.
            let salt = hash(mechanism, format!("rill-decoy:{user}").as_bytes())[..16].to_vec();
            (salt, users.rounds_max(), None, vec![0; 32])
        }
    };
    let server_first = format!("r={nonce},s={},i={rounds}", BASE64.encode(&salt));
    let auth_prefix = format!("{bare},{server_first}");
    Ok((
        State::ScramFinal {
            user,
            stored_key,
            server_key,
            nonce,
            auth_prefix,
            gs2_header,
        },
        server_first.into_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::auth::hash_password;
    use crate::replicator::client::sasl::{ScramClient, plain_message};

    fn users() -> PasswordFile {
        let line = hash_password(b"s3cret,=", b"saltsaltsalt", 4096);
        PasswordFile::parse(&format!("dev=7,x:{line}\n")).expect("users")
    }

    fn enabled() -> Vec<String> {
        SERVER_MECHANISMS
            .iter()
            .map(|name| name.to_string())
            .collect()
    }

    fn scram(user: &str, password: &str) -> Result<SaslStep, SaslServerError> {
        let users = users();
        let mut client = ScramClient::new(
            SaslMechanism::ScramSha256,
            user,
            password,
            "clientnonce",
            100_000,
        );
        let mut server = SaslServer::new("SCRAM-SHA-256", &enabled()).expect("enabled");
        let SaslStep::Continue(server_first) =
            server.step(&users, &client.client_first(), "servernonce")?
        else {
            panic!("SCRAM has two steps");
        };
        let client_final = client
            .handle_server_first(&server_first)
            .expect("the client accepts server-first");
        let step = server.step(&users, &client_final, "unused")?;
        if let SaslStep::Done { response, .. } = &step {
            client
                .handle_server_final(response)
                .expect("the server proves it knows the password");
            assert!(client.is_done());
        }
        assert!(server.is_over());
        Ok(step)
    }

    #[test]
    fn scram_sha_256_with_rills_own_client() {
        match scram("dev=7,x", "s3cret,=") {
            Ok(SaslStep::Done { user, .. }) => assert_eq!(user, "dev=7,x"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            scram("dev=7,x", "wrong"),
            Err(SaslServerError::BadCredentials)
        );
        assert_eq!(
            scram("nobody", "s3cret,="),
            Err(SaslServerError::BadCredentials)
        );
    }

    #[test]
    fn an_unknown_user_looks_like_a_known_one_until_the_proof() {
        let users = users();
        let first = |user: &str| {
            let mut server = SaslServer::new("SCRAM-SHA-256", &enabled()).expect("enabled");
            let message = format!("n,,n={user},r=abc");
            match server.step(&users, message.as_bytes(), "xyz") {
                Ok(SaslStep::Continue(reply)) => String::from_utf8(reply).expect("text"),
                other => panic!("{other:?}"),
            }
        };
        let known = first("dev=3D7=2Cx");
        let unknown = first("nobody");
        assert!(known.starts_with("r=abcxyz,s=") && known.ends_with(",i=4096"));
        assert!(unknown.starts_with("r=abcxyz,s=") && unknown.ends_with(",i=4096"));
        assert_eq!(first("nobody"), unknown, "stable per name");
    }

    #[test]
    fn plain_checks_the_password() {
        let users = users();
        let step = |message: &[u8]| {
            SaslServer::new("PLAIN", &enabled())
                .expect("enabled")
                .step(&users, message, "")
        };
        assert!(matches!(
            step(&plain_message("dev=7,x", "s3cret,=")),
            Ok(SaslStep::Done { .. })
        ));
        assert_eq!(
            step(&plain_message("dev=7,x", "nope")),
            Err(SaslServerError::BadCredentials)
        );
        assert_eq!(
            step(b"dev=7,x\0s3cret,="),
            Err(SaslServerError::Malformed(
                "PLAIN is authzid NUL user NUL password"
            ))
        );
        assert_eq!(
            step(b"other\0dev=7,x\0s3cret,="),
            Err(SaslServerError::BadCredentials)
        );
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let users = users();
        assert!(matches!(
            SaslServer::new("SCRAM-SHA-512", &enabled()),
            Err(SaslServerError::UnsupportedMechanism(_))
        ));
        assert!(matches!(
            SaslServer::new("PLAIN", &["SCRAM-SHA-256".to_string()]),
            Err(SaslServerError::UnsupportedMechanism(_))
        ));
        for first in [
            &b""[..],
            b"n,,",
            b"p=tls-unique,,n=a,r=b",
            b"n,,n=a=41,r=b",
            b"n,,n=a,r=",
            b"\xff\xfe",
            &[b'n'; SASL_MESSAGE_BYTES_MAX + 1][..],
        ] {
            let mut server = SaslServer::new("SCRAM-SHA-256", &enabled()).expect("enabled");
            assert!(server.step(&users, first, "n").is_err(), "{first:?}");
            assert_eq!(
                server.step(&users, b"n,,n=a,r=b", "n"),
                Err(SaslServerError::OutOfTurn)
            );
        }
        for last in [
            &b""[..],
            b"c=biws,r=abcxyz",
            b"c=biws,r=wrong,p=AAAA",
            b"c=eSws,r=abcxyz,p=AAAA",
            b"c=biws,r=abcxyz,p=!!!",
            b"c=biws,r=abcxyz,p=AAAA",
        ] {
            let mut server = SaslServer::new("SCRAM-SHA-256", &enabled()).expect("enabled");
            assert!(matches!(
                server.step(&users, b"n,,n=dev=3D7=2Cx,r=abc", "xyz"),
                Ok(SaslStep::Continue(_))
            ));
            assert!(server.step(&users, last, "").is_err(), "{last:?}");
        }
    }
}
