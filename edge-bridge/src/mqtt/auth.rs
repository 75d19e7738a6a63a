//! Who may connect. The session asks an [`Authenticator`] about every
//! CONNECT that presents a user name, a password or an MQTT 5.0
//! authentication method; a CONNECT with none of them is anonymous and is
//! let in or refused by the session's `allow_anonymous` setting alone.
//! Authenticators take a [`Credentials`] value rather than positional
//! arguments, so methods that need more (the TLS client certificate, the
//! peer address, MQTT 5.0 enhanced authentication data) add fields without
//! changing the trait.
//!
//! [`PasswordFile`] checks user names and passwords against a users file
//! the node reads, one `user:$pbkdf2-sha256$ROUNDS$SALT$HASH` line per user
//! (salt and hash in lowercase hex, the hash 32 bytes of PBKDF2-HMAC-SHA256
//! over the password). Blank lines and lines starting with `#` are skipped.
//! [`hash_password`] makes a line's hash field. Hashes are compared in
//! constant time, and an unknown user costs the same PBKDF2 work as a
//! known one, so timing tells nothing about which user names exist.

use std::collections::HashMap;

use subtle::ConstantTimeEq;

use super::reason;

/// What a CONNECT presents to prove who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// MQTT 5.0 enhanced authentication (the Authentication Method
    /// property); `None` under 3.1.1.
    pub authentication_method: Option<&'a str>,
    pub authentication_data: Option<&'a [u8]>,
}

/// Decides whether a CONNECT may go on. The error is the MQTT 5.0 CONNACK
/// reason code to refuse it with (0x86 Bad User Name or Password, 0x87 Not
/// authorized, 0x8A Banned, 0x8C Bad authentication method, ...); under
/// 3.1.1 the session sends the matching return code, or return code 5 (not
/// authorized) when there is none.
pub trait Authenticator: Send + Sync {
    fn authenticate(&self, credentials: &Credentials<'_>) -> Result<(), u8>;
}

/// Lets everyone in: for brokers without a users file.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl Authenticator for AcceptAll {
    fn authenticate(&self, credentials: &Credentials<'_>) -> Result<(), u8> {
        match credentials.authentication_method {
            Some(_) => Err(reason::BAD_AUTHENTICATION_METHOD),
            None => Ok(()),
        }
    }
}

/// The scheme name in a users file line.
pub const PBKDF2_SHA256_SCHEME: &str = "pbkdf2-sha256";
/// Fewer rounds than this are refused when a users file is read.
pub const PBKDF2_ROUNDS_MIN: u32 = 1_000;
/// More rounds than this are refused: one CONNECT must not stall a core.
pub const PBKDF2_ROUNDS_MAX: u32 = 10_000_000;
/// Salt lengths a users file may use, in bytes.
pub const SALT_BYTES_MIN: usize = 8;
pub const SALT_BYTES_MAX: usize = 64;
const HASH_BYTES: usize = 32;

/// Why a users file line is refused. Lines count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordFileError {
    #[error("line {line}: expected user:$pbkdf2-sha256$ROUNDS$SALT$HASH")]
    Malformed { line: usize },
    #[error("line {line}: the user name is empty")]
    EmptyUser { line: usize },
    #[error("line {line}: user {user:?} appears a second time")]
    DuplicateUser { line: usize, user: String },
    #[error("line {line}: scheme {scheme:?} is not supported (use {PBKDF2_SHA256_SCHEME})")]
    UnsupportedScheme { line: usize, scheme: String },
    #[error("line {line}: rounds must be a number from {PBKDF2_ROUNDS_MIN} to {PBKDF2_ROUNDS_MAX}")]
    InvalidRounds { line: usize },
    #[error("line {line}: the salt must be {SALT_BYTES_MIN} to {SALT_BYTES_MAX} bytes in hex")]
    InvalidSalt { line: usize },
    #[error("line {line}: the hash must be 32 bytes in hex")]
    InvalidHash { line: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswordHash {
    rounds: u32,
    salt: Vec<u8>,
    hash: [u8; HASH_BYTES],
}

impl PasswordHash {
    fn verify(&self, password: &[u8]) -> bool {
        let computed = derive(password, &self.salt, self.rounds);
        bool::from(computed.ct_eq(&self.hash))
    }
}

fn derive(password: &[u8], salt: &[u8], rounds: u32) -> [u8; HASH_BYTES] {
    let mut out = [0; HASH_BYTES];
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, &mut out);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok())
        .collect()
}

/// The `$pbkdf2-sha256$ROUNDS$SALT$HASH` field for `password`. The caller
/// brings the salt (random, [`SALT_BYTES_MIN`] to [`SALT_BYTES_MAX`]
/// bytes): this crate reads no randomness.
pub fn hash_password(password: &[u8], salt: &[u8], rounds: u32) -> String {
    assert!(
        (SALT_BYTES_MIN..=SALT_BYTES_MAX).contains(&salt.len()),
        "salt of {} bytes",
        salt.len()
    );
    assert!((PBKDF2_ROUNDS_MIN..=PBKDF2_ROUNDS_MAX).contains(&rounds));
    let hash = derive(password, salt, rounds);
    format!(
        "${PBKDF2_SHA256_SCHEME}${rounds}${}${}",
        hex(salt),
        hex(&hash)
    )
}

/// Users and their password hashes, read from a users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordFile {
    users: HashMap<String, PasswordHash>,
    /// Verified against for unknown users, so they cost the same.
    decoy: PasswordHash,
}

impl PasswordFile {
    /// Parses a users file; every problem names its line.
    pub fn parse(text: &str) -> Result<PasswordFile, PasswordFileError> {
        let mut users = HashMap::new();
        let mut rounds_max = PBKDF2_ROUNDS_MIN;
        for (index, line) in text.lines().enumerate() {
            let line_number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = parse_line(line, line_number)?;
            rounds_max = rounds_max.max(hash.rounds);
            if users.insert(user.to_owned(), hash).is_some() {
                return Err(PasswordFileError::DuplicateUser {
                    line: line_number,
                    user: user.to_owned(),
                });
            }
        }
        Ok(PasswordFile {
            users,
            decoy: PasswordHash {
                rounds: rounds_max,
                salt: vec![0; SALT_BYTES_MIN],
                hash: [0; HASH_BYTES],
            },
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// `user`'s salt, PBKDF2 rounds and PBKDF2-HMAC-SHA256 hash: exactly
    /// SCRAM-SHA-256's SaltedPassword, so a SCRAM server needs nothing more.
    /// `None` for an unknown user.
    pub fn scram_sha256(&self, user: &str) -> Option<(&[u8], u32, &[u8; 32])> {
        self.users
            .get(user)
            .map(|hash| (hash.salt.as_slice(), hash.rounds, &hash.hash))
    }

    /// The most rounds any user's hash has (what a decoy answer claims).
    pub fn rounds_max(&self) -> u32 {
        self.decoy.rounds
    }

    /// Whether `password` is `user`'s.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                // The same work as a known user, and always a refusal.
                let _ = self.decoy.verify(password);
                false
            }
        }
    }
}

fn parse_line(line: &str, line_number: usize) -> Result<(&str, PasswordHash), PasswordFileError> {
    let malformed = PasswordFileError::Malformed { line: line_number };
    let (user, field) = line.split_once(':').ok_or(malformed.clone())?;
    if user.is_empty() {
        return Err(PasswordFileError::EmptyUser { line: line_number });
    }
    let mut parts = field.split('$');
    let (Some(""), Some(scheme), Some(rounds), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(malformed);
    };
    if scheme != PBKDF2_SHA256_SCHEME {
        return Err(PasswordFileError::UnsupportedScheme {
            line: line_number,
            scheme: scheme.to_owned(),
        });
    }
    let rounds = rounds
        .parse::<u32>()
        .ok()
        .filter(|rounds| (PBKDF2_ROUNDS_MIN..=PBKDF2_ROUNDS_MAX).contains(rounds))
        .ok_or(PasswordFileError::InvalidRounds { line: line_number })?;
    let salt = unhex(salt)
        .filter(|salt| (SALT_BYTES_MIN..=SALT_BYTES_MAX).contains(&salt.len()))
        .ok_or(PasswordFileError::InvalidSalt { line: line_number })?;
    let hash = unhex(hash)
        .and_then(|hash| <[u8; HASH_BYTES]>::try_from(hash).ok())
        .ok_or(PasswordFileError::InvalidHash { line: line_number })?;
    Ok((user, PasswordHash { rounds, salt, hash }))
}

impl Authenticator for PasswordFile {
    fn authenticate(&self, credentials: &Credentials<'_>) -> Result<(), u8> {
        if credentials.authentication_method.is_some() {
            return Err(reason::BAD_AUTHENTICATION_METHOD);
        }
        match (credentials.username, credentials.password) {
            (Some(user), Some(password)) if self.verify(user, password) => Ok(()),
            _ => Err(reason::BAD_USER_NAME_OR_PASSWORD),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials<'a>(username: Option<&'a str>, password: Option<&'a [u8]>) -> Credentials<'a> {
        Credentials {
            client_id: "c",
            username,
            password,
            authentication_method: None,
            authentication_data: None,
        }
    }

    #[test]
    fn known_vector() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256("passwd", "salt", 1, 64)
        // starts with these 32 bytes.
        assert_eq!(
            hex(&derive(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn users_file_verifies_passwords() {
        let line = hash_password(b"secret", b"saltsalt", 1_000);
        assert!(line.starts_with("$pbkdf2-sha256$1000$73616c7473616c74$"));
        let text = format!(
            "# devices\n\ndev7:{line}\nother:{}\n",
            hash_password(b"x", b"12345678", 1_000)
        );
        let file = PasswordFile::parse(&text).expect("parses");
        assert_eq!(file.len(), 2);
        assert_eq!(
            file.authenticate(&credentials(Some("dev7"), Some(b"secret"))),
            Ok(())
        );
        for (user, password) in [
            (Some("dev7"), Some(&b"wrong"[..])),
            (Some("nobody"), Some(&b"secret"[..])),
            (Some("dev7"), None),
            (None, Some(&b"secret"[..])),
        ] {
            assert_eq!(
                file.authenticate(&credentials(user, password)),
                Err(reason::BAD_USER_NAME_OR_PASSWORD),
                "{user:?}"
            );
        }
        let mut enhanced = credentials(Some("dev7"), Some(b"secret"));
        enhanced.authentication_method = Some("SCRAM-SHA-1");
        assert_eq!(
            file.authenticate(&enhanced),
            Err(reason::BAD_AUTHENTICATION_METHOD)
        );
        assert_eq!(
            AcceptAll.authenticate(&enhanced),
            Err(reason::BAD_AUTHENTICATION_METHOD)
        );
        assert_eq!(
            AcceptAll.authenticate(&credentials(Some("a"), None)),
            Ok(())
        );
    }

    #[test]
    fn bad_lines_are_named() {
        let good_hash = "00".repeat(32);
        let table = [
            (
                "nocolon".to_owned(),
                "line 1: expected user:$pbkdf2-sha256$ROUNDS$SALT$HASH",
            ),
            (
                ":$pbkdf2-sha256$1000$0011223344556677$h".to_owned(),
                "line 1: the user name is empty",
            ),
            (
                format!("u:$md5$1000$0011223344556677${good_hash}"),
                "line 1: scheme \"md5\" is not supported (use pbkdf2-sha256)",
            ),
            (
                format!("u:$pbkdf2-sha256$999$0011223344556677${good_hash}"),
                "line 1: rounds must be a number from 1000 to 10000000",
            ),
            (
                format!("u:$pbkdf2-sha256$1000$00112233${good_hash}"),
                "line 1: the salt must be 8 to 64 bytes in hex",
            ),
            (
                "u:$pbkdf2-sha256$1000$0011223344556677$00".to_owned(),
                "line 1: the hash must be 32 bytes in hex",
            ),
            (
                format!("u:$pbkdf2-sha256$1000$0011223344556677${good_hash}$x"),
                "line 1: expected user:$pbkdf2-sha256$ROUNDS$SALT$HASH",
            ),
            (
                format!("u:$pbkdf2-sha256$1000$00112233445566zz${good_hash}"),
                "line 1: the salt must be 8 to 64 bytes in hex",
            ),
        ];
        for (line, message) in table {
            let error = PasswordFile::parse(&line).expect_err("refused");
            assert_eq!(error.to_string(), message, "{line}");
        }
        let line = format!("u:$pbkdf2-sha256$1000$0011223344556677${good_hash}");
        assert_eq!(
            PasswordFile::parse(&format!("{line}\n{line}")),
            Err(PasswordFileError::DuplicateUser {
                line: 2,
                user: "u".into()
            })
        );
    }
}
