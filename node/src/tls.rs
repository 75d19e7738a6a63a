//! TLS with rustls (ring provider; no OpenSSL): loading certificates and keys
//! from PEM files into server and client configurations.
//!
//! Connections drive rustls as a state machine (bytes in, bytes out) over the
//! plain TCP stream, so the same reader and writer tasks serve plain and TLS
//! connections, and reading never blocks writing.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use compio::io::{AsyncRead, AsyncReadExt};
use compio::net::TcpStream;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certificates: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(
        !certificates.is_empty(),
        "{} holds no PEM certificate",
        path.display()
    );
    Ok(certificates)
}

fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| {
        format!(
            "reading the private key from {} (PEM: PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}

fn root_store(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates(path)? {
        roots
            .add(certificate)
            .with_context(|| format!("adding a CA certificate from {}", path.display()))?;
    }
    Ok(roots)
}

/// The listeners' TLS configuration; `client_ca` makes client certificates
/// mandatory.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        Some(path) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(root_store(path)?),
                provider(),
            )
            .build()
            .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certificates(cert_file)?, private_key(key_file)?)
        .with_context(|| {
            format!(
                "{} and {} do not make a usable certificate and key",
                cert_file.display(),
                key_file.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// A client configuration trusting the CAs in `ca_file`, presenting a client
/// certificate when `identity` (certificate and key files) is given.
pub fn client_config(
    ca_file: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(root_store(ca_file)?);
    let config = match identity {
        Some((cert_file, key_file)) => builder
            .with_client_auth_cert(certificates(cert_file)?, private_key(key_file)?)
            .context("the client certificate and key do not match")?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A TLS session shared by a connection's reader (ciphertext in, plaintext
/// out) and writer (plaintext in, ciphertext out). It is never borrowed
/// across an await, so reading and writing go on at the same time.
pub type TlsSession = Rc<RefCell<rustls::Connection>>;

/// Bytes of ciphertext read from the socket at once.
const TLS_READ_BYTES: usize = 64 * 1024;

/// Encrypts plaintext (and any pending handshake or alert bytes) into ciphertext.
pub fn encrypt(session: &TlsSession, plaintext: &[&[u8]]) -> io::Result<Vec<u8>> {
    let mut session = session.borrow_mut();
    for part in plaintext {
        session.writer().write_all(part)?;
    }
    let mut ciphertext = Vec::new();
    while session.wants_write() {
        session.write_tls(&mut ciphertext)?;
    }
    Ok(ciphertext)
}

/// Reads more plaintext into `buffer`: straight from the socket, or through
/// the TLS session, calling `wants_write` when the session has bytes to send
/// (handshake messages, alerts). `Ok(0)` is the end of the stream.
pub async fn read_plaintext<B: compio::buf::IoBufMut>(
    reader: &mut TcpStream,
    tls: Option<&TlsSession>,
    wants_write: impl Fn(),
    mut buffer: B,
) -> compio::BufResult<usize, B> {
    let Some(session) = tls else {
        return reader.append(buffer).await;
    };
    let start = buffer.buf_len();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Plaintext rustls has already decrypted comes first.
        loop {
            let read = session.borrow_mut().reader().read(&mut chunk);
            match read {
                Ok(0) => return compio::BufResult(Ok(buffer.buf_len() - start), buffer),
                Ok(count) => {
                    if let Err(error) = buffer.extend_from_slice(&chunk[..count]) {
                        return compio::BufResult(Err(io::Error::other(error)), buffer);
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return compio::BufResult(Err(error), buffer),
            }
        }
        if buffer.buf_len() > start {
            return compio::BufResult(Ok(buffer.buf_len() - start), buffer);
        }
        let compio::BufResult(result, ciphertext) =
            reader.read(Vec::with_capacity(TLS_READ_BYTES)).await;
        match result {
            Ok(0) => return compio::BufResult(Ok(0), buffer),
            Ok(_) => {}
            Err(error) => return compio::BufResult(Err(error), buffer),
        }
        let mut cursor = ciphertext.as_slice();
        while !cursor.is_empty() {
            let mut state = session.borrow_mut();
            if let Err(error) = state.read_tls(&mut cursor) {
                return compio::BufResult(Err(error), buffer);
            }
            let processed = state.process_new_packets();
            let has_output = state.wants_write();
            // Drain plaintext so rustls has room for the rest of the ciphertext.
            while let Ok(count) = state.reader().read(&mut chunk) {
                if count == 0 {
                    break;
                }
                if let Err(error) = buffer.extend_from_slice(&chunk[..count]) {
                    return compio::BufResult(Err(io::Error::other(error)), buffer);
                }
            }
            drop(state);
            if has_output {
                wants_write();
            }
            if let Err(error) = processed {
                // rustls queued an alert; the writer sends it before closing.
                return compio::BufResult(
                    Err(io::Error::new(io::ErrorKind::InvalidData, error)),
                    buffer,
                );
            }
        }
    }
}
