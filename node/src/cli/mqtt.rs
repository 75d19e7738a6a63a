//! `rill mqtt passwd USER`: one users-file line for `mqtt.users_file`,
//! with a fresh random salt (from the kernel) and PBKDF2-HMAC-SHA256.

use std::io::Read;

use anyhow::Context;
use rill_edge_bridge::mqtt::auth::{PBKDF2_ROUNDS_MAX, PBKDF2_ROUNDS_MIN, hash_password};

/// Rounds when none are asked for: about 10 ms per CONNECT on a
/// Raspberry Pi 4, which a reconnect storm of a thousand devices can pay.
pub const PASSWD_ROUNDS_DEFAULT: u32 = 10_000;
const SALT_BYTES: usize = 16;

/// The `user:$pbkdf2-sha256$ROUNDS$SALT$HASH` line for `user` and
/// `password`.
pub fn passwd_line(user: &str, password: &[u8], rounds: u32) -> anyhow::Result<String> {
    anyhow::ensure!(
        !user.is_empty() && !user.contains(':') && !user.contains(char::is_whitespace),
        "the user name must be non-empty, without ':' or spaces"
    );
    anyhow::ensure!(
        (PBKDF2_ROUNDS_MIN..=PBKDF2_ROUNDS_MAX).contains(&rounds),
        "--rounds must be from {PBKDF2_ROUNDS_MIN} to {PBKDF2_ROUNDS_MAX}"
    );
    let mut salt = [0u8; SALT_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut salt))
        .context("reading a random salt from /dev/urandom")?;
    Ok(format!("{user}:{}", hash_password(password, &salt, rounds)))
}

/// The password: the first line of standard input, without its newline.
pub fn read_password() -> anyhow::Result<Vec<u8>> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    Ok(password.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use rill_edge_bridge::mqtt::auth::PasswordFile;

    use super::*;

    #[test]
    fn a_line_verifies_in_a_users_file_and_salts_differ() -> anyhow::Result<()> {
        let first = passwd_line("pump-7", b"s3cret", PBKDF2_ROUNDS_MIN)?;
        let second = passwd_line("pump-8", b"s3cret", PBKDF2_ROUNDS_MIN)?;
        let users = PasswordFile::parse(&format!("{first}\n{second}\n"))?;
        assert!(users.verify("pump-7", b"s3cret"));
        assert!(!users.verify("pump-7", b"guess"));
        assert_ne!(first.split('$').nth(3), second.split('$').nth(3));
        assert!(passwd_line("a:b", b"x", PBKDF2_ROUNDS_MIN).is_err());
        Ok(())
    }
}
