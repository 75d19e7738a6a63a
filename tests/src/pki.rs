//! A throwaway PKI for TLS tests: a CA and two leaf certificates it signs,
//! one for a server and one for a client, as PEM text.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// PEM text: the CA certificate, and (certificate, key) of each leaf.
pub struct Pki {
    pub ca: String,
    pub server: (String, String),
    pub client: (String, String),
}

/// A fresh CA, a server certificate for `server_names` and a client
/// certificate for `client_name`, both signed by it.
pub fn generate(server_names: &[&str], client_name: &str) -> Pki {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca certificate");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("leaf key");
        let certificate = CertificateParams::new(names)
            .expect("leaf params")
            .signed_by(&key, &issuer)
            .expect("leaf certificate");
        (certificate.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(server_names.iter().map(|name| name.to_string()).collect()),
        client: leaf(vec![client_name.to_string()]),
    }
}

impl Pki {
    /// Writes the five PEM files into `directory`; their paths in the order
    /// (ca, server cert, server key, client cert, client key).
    pub fn write(&self, directory: &Path) -> [String; 5] {
        let write = |name: &str, contents: &str| {
            let path = directory.join(name);
            std::fs::write(&path, contents).expect("write pem");
            path.display().to_string()
        };
        [
            write("ca.pem", &self.ca),
            write("server.pem", &self.server.0),
            write("server.key", &self.server.1),
            write("client.pem", &self.client.0),
            write("client.key", &self.client.1),
        ]
    }
}
