//! Keys and certificates made fresh for each test (never committed): a private CA and a
//! server certificate for localhost/127.0.0.1 signed by it, signing keys.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A server config offering `alpn`, and the CA's PEM for the client to trust.
pub fn localhost_server(alpn: &[&[u8]]) -> (rustls::ServerConfig, String) {
    tokenrelay::install_crypto_provider();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (server, ca.pem())
}

/// A private key (PKCS#8 PEM) and its public key (SubjectPublicKeyInfo PEM).
pub struct Key {
    pub private: String,
    pub public: String,
}

pub fn key(alg: &'static rcgen::SignatureAlgorithm) -> Key {
    let k = KeyPair::generate_for(alg).unwrap();
    Key {
        private: k.serialize_pem(),
        public: k.public_key_pem(),
    }
}

/// A 2048-bit RSA key from openssl (ring cannot generate RSA keys); `None` skips.
pub fn rsa_key(dir: &Path) -> Option<Key> {
    let path = dir.join("rsa.pem");
    let out = super::tools::command("openssl")?
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl genpkey failed");
    let public = super::tools::command("openssl")?
        .args(["pkey", "-pubout", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(public.status.success());
    Some(Key {
        private: std::fs::read_to_string(&path).unwrap(),
        public: String::from_utf8(public.stdout).unwrap(),
    })
}
