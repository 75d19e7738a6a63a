//! SASL client messages: PLAIN (RFC 4616) and SCRAM-SHA-256/512
//! (RFC 5802, RFC 7677), the client side only.
//!
//! The password is used as its UTF-8 bytes without SASLprep, as Kafka's
//! own client and broker do. The client nonce comes from the caller (the
//! connection derives it from the random seed the driver passed in), the
//! server's iteration count is bounded below (4096, as Kafka requires) and
//! above (a hostile server must not make the salting run for minutes),
//! and the server's final signature is checked in constant time before
//! the exchange counts as done.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};
use subtle::ConstantTimeEq;

/// The mechanisms the replicator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// The name SaslHandshake carries.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Why a SASL exchange failed on the client side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("server's SCRAM message is malformed: {0}")]
    Malformed(&'static str),
    #[error("server's nonce does not extend the client's")]
    NonceMismatch,
    #[error("server asks for {iterations} iterations, outside {min}..={max}")]
    Iterations { iterations: u32, min: u32, max: u32 },
    #[error("server reports a SCRAM error: {0}")]
    ServerError(String),
    #[error("server's signature is wrong: it does not know the password")]
    BadServerSignature,
}

/// The PLAIN message: no authorization identity, user, password.
pub fn plain_message(username: &str, password: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(username.len() + password.len() + 2);
    message.push(0);
    message.extend_from_slice(username.as_bytes());
    message.push(0);
    message.extend_from_slice(password.as_bytes());
    message
}

/// The fewest iterations accepted (RFC 7677's minimum, Kafka's too).
pub const SCRAM_ITERATIONS_MIN: u32 = 4096;

enum Step {
    SentFirst,
    SentFinal { server_signature: Vec<u8> },
    Done,
}

/// One SCRAM exchange from the client side.
pub struct ScramClient {
    mechanism: SaslMechanism,
    password: String,
    client_nonce: String,
    client_first_bare: String,
    iterations_max: u32,
    step: Step,
}

fn escape_username(username: &str) -> String {
    username.replace('=', "=3D").replace(',', "=2C")
}

pub(crate) fn hmac(mechanism: SaslMechanism, key: &[u8], data: &[u8]) -> Vec<u8> {
    match mechanism {
        SaslMechanism::ScramSha512 => {
            let mut mac =
                hmac::Hmac::<sha2::Sha512>::new_from_slice(key).expect("HMAC takes any key");
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        _ => {
            let mut mac =
                hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
    }
}

pub(crate) fn hash(mechanism: SaslMechanism, data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    match mechanism {
        SaslMechanism::ScramSha512 => sha2::Sha512::digest(data).to_vec(),
        _ => sha2::Sha256::digest(data).to_vec(),
    }
}

fn salted_password(
    mechanism: SaslMechanism,
    password: &[u8],
    salt: &[u8],
    iterations: u32,
) -> Vec<u8> {
    match mechanism {
        SaslMechanism::ScramSha512 => {
            let mut out = [0u8; 64];
            pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, &mut out);
            out.to_vec()
        }
        _ => {
            let mut out = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, &mut out);
            out.to_vec()
        }
    }
}

/// The value of attribute `name` (`name=value`) in a SCRAM message.
pub(crate) fn attribute(message: &str, name: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(name) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

impl ScramClient {
    /// Starts an exchange; `client_nonce` must be printable ASCII without
    /// commas, and fresh random for every exchange.
    pub fn new(
        mechanism: SaslMechanism,
        username: &str,
        password: &str,
        client_nonce: &str,
        iterations_max: u32,
    ) -> ScramClient {
        assert!(mechanism != SaslMechanism::Plain, "PLAIN is not SCRAM");
        assert!(
            !client_nonce.is_empty()
                && client_nonce
                    .bytes()
                    .all(|b| (0x21..=0x7e).contains(&b) && b != b','),
            "a SCRAM nonce is printable ASCII without commas"
        );
        ScramClient {
            mechanism,
            password: password.to_owned(),
            client_nonce: client_nonce.to_owned(),
            client_first_bare: format!("n={},r={client_nonce}", escape_username(username)),
            iterations_max: iterations_max.max(SCRAM_ITERATIONS_MIN),
            step: Step::SentFirst,
        }
    }

    /// The client-first message (no channel binding, no authzid).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Takes the server-first message and gives the client-final one.
    pub fn handle_server_first(&mut self, message: &[u8]) -> Result<Vec<u8>, SaslError> {
        let message =
            std::str::from_utf8(message).map_err(|_| SaslError::Malformed("not UTF-8"))?;
        if let Some(error) = attribute(message, 'e') {
            return Err(SaslError::ServerError(error.to_owned()));
        }
        let nonce = attribute(message, 'r').ok_or(SaslError::Malformed("no nonce"))?;
        let salt = attribute(message, 's').ok_or(SaslError::Malformed("no salt"))?;
        let iterations = attribute(message, 'i').ok_or(SaslError::Malformed("no iterations"))?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(SaslError::NonceMismatch);
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| SaslError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| SaslError::Malformed("iterations is not a number"))?;
        if !(SCRAM_ITERATIONS_MIN..=self.iterations_max).contains(&iterations) {
            return Err(SaslError::Iterations {
                iterations,
                min: SCRAM_ITERATIONS_MIN,
                max: self.iterations_max,
            });
        }
        let mechanism = self.mechanism;
        let salted = salted_password(mechanism, self.password.as_bytes(), &salt, iterations);
        let client_key = hmac(mechanism, &salted, b"Client Key");
        let stored_key = hash(mechanism, &client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{message},{without_proof}", self.client_first_bare);
        let client_signature = hmac(mechanism, &stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(key, signature)| key ^ signature)
            .collect();
        let server_key = hmac(mechanism, &salted, b"Server Key");
        let server_signature = hmac(mechanism, &server_key, auth_message.as_bytes());
        self.step = Step::SentFinal { server_signature };
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message.
    pub fn handle_server_final(&mut self, message: &[u8]) -> Result<(), SaslError> {
        let Step::SentFinal { server_signature } = &self.step else {
            return Err(SaslError::Malformed("server-final out of turn"));
        };
        let message =
            std::str::from_utf8(message).map_err(|_| SaslError::Malformed("not UTF-8"))?;
        if let Some(error) = attribute(message, 'e') {
            return Err(SaslError::ServerError(error.to_owned()));
        }
        let verifier = attribute(message, 'v').ok_or(SaslError::Malformed("no verifier"))?;
        let verifier = BASE64
            .decode(verifier)
            .map_err(|_| SaslError::Malformed("verifier is not base64"))?;
        if !bool::from(verifier.ct_eq(server_signature)) {
            return Err(SaslError::BadServerSignature);
        }
        self.step = Step::Done;
        Ok(())
    }

    /// Whether the client-final message went out (server-final is next).
    pub fn sent_final(&self) -> bool {
        matches!(self.step, Step::SentFinal { .. })
    }

    pub fn is_done(&self) -> bool {
        matches!(self.step, Step::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_sha_256_matches_the_rfc_7677_example() {
        let mut client = ScramClient::new(
            SaslMechanism::ScramSha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO",
            100_000,
        );
        assert_eq!(client.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
            s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = client
            .handle_server_first(server_first)
            .expect("valid server-first");
        assert_eq!(
            String::from_utf8(client_final).expect("ASCII"),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert!(!client.is_done());
        client
            .handle_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect("the server knows the password");
        assert!(client.is_done());
    }

    #[test]
    fn scram_refuses_a_wrong_signature_a_foreign_nonce_and_weak_iterations() {
        let start =
            || ScramClient::new(SaslMechanism::ScramSha256, "user", "pencil", "abc", 100_000);
        let mut client = start();
        client
            .handle_server_first(b"r=abcdef,s=QSXCR+Q6sek8bf92,i=4096")
            .expect("valid");
        assert_eq!(
            client.handle_server_final(b"v=AAAA"),
            Err(SaslError::BadServerSignature)
        );
        assert_eq!(
            start().handle_server_first(b"r=xyz123,s=QSXCR+Q6sek8bf92,i=4096"),
            Err(SaslError::NonceMismatch)
        );
        assert!(matches!(
            start().handle_server_first(b"r=abcdef,s=QSXCR+Q6sek8bf92,i=1"),
            Err(SaslError::Iterations { .. })
        ));
        assert!(matches!(
            start().handle_server_first(b"r=abcdef,s=QSXCR+Q6sek8bf92,i=999999999"),
            Err(SaslError::Iterations { .. })
        ));
        assert_eq!(
            start().handle_server_first(b"e=unknown-user"),
            Err(SaslError::ServerError("unknown-user".into()))
        );
    }

    #[test]
    fn scram_sha_512_completes_against_a_server_computed_signature() {
        // The server side of the exchange, computed with the same
        // primitives, for SHA-512's sizes.
        let mut client = ScramClient::new(
            SaslMechanism::ScramSha512,
            "a=b,c",
            "secret",
            "n0nce",
            10_000,
        );
        assert_eq!(client.client_first(), b"n,,n=a=3Db=2Cc,r=n0nce");
        let server_first = b"r=n0nceSERVER,s=c2FsdA==,i=4096";
        let client_final = client.handle_server_first(server_first).expect("valid");
        let salted = salted_password(SaslMechanism::ScramSha512, b"secret", b"salt", 4096);
        let auth = format!(
            "n=a=3Db=2Cc,r=n0nce,{},c=biws,r=n0nceSERVER",
            std::str::from_utf8(server_first).expect("ASCII")
        );
        let server_key = hmac(SaslMechanism::ScramSha512, &salted, b"Server Key");
        let signature = hmac(SaslMechanism::ScramSha512, &server_key, auth.as_bytes());
        let client_final = String::from_utf8(client_final).expect("ASCII");
        let proof = BASE64
            .decode(attribute(&client_final, 'p').expect("proof"))
            .expect("base64");
        assert_eq!(proof.len(), 64);
        client
            .handle_server_final(format!("v={}", BASE64.encode(signature)).as_bytes())
            .expect("matching signature");
    }

    #[test]
    fn plain_message_is_nul_separated() {
        assert_eq!(plain_message("alice", "s3cret"), b"\0alice\0s3cret");
    }
}
