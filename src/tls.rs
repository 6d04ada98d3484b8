//! TLS for every outbound connection (upstreams and token endpoints): one rustls crypto
//! provider (ring) installed as the process default, TLS 1.2+ only, certificates always
//! verified against the Mozilla roots (webpki-roots) plus an optional private CA file;
//! optionally a client certificate (mutual TLS), re-read when its files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use crate::watched_files::Reloading;

/// Installs ring as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why a TLS client config cannot be built; names the file, never shows a key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid PEM file: {source}")]
    NotPem {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
    #[error("{path}: unusable CA certificate: {source}")]
    UnusableCa { path: String, source: rustls::Error },
    #[error("TLS setup failed: {0}")]
    Setup(#[source] rustls::Error),
    #[error(transparent)]
    ClientCert(#[from] ClientCertError),
}

/// Reads a PEM file of CA certificates; an error says what was wrong with it.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = || path.display().to_string();
    let data = std::fs::read(path).map_err(|source| TlsError::Unreadable {
        path: shown(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::NotPem {
            path: shown(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: shown() });
    }
    Ok(certs)
}

/// Servers whose TLS sessions a client config remembers for resumption. Each config talks
/// to one token endpoint or one upstream host, so rustls' default of 256 (a table
/// allocated up front, about 14 KiB per config) is memory spent for nothing.
const SESSION_CACHE_SERVERS: usize = 4;

/// The Mozilla roots, built once and shared by every config without a private CA.
fn mozilla_roots() -> Arc<RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            Arc::new(roots)
        })
        .clone()
}

/// Builds a verifying client config; `alpn` lists protocols to offer (e.g. h2, http/1.1).
pub fn client_config(ca_file: Option<&Path>, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    install_crypto_provider();
    let roots = match ca_file {
        None => mozilla_roots(),
        Some(path) => {
            let mut roots = (*mozilla_roots()).clone();
            for cert in read_ca_file(path)? {
                roots.add(cert).map_err(|source| TlsError::UnusableCa {
                    path: path.display().to_string(),
                    source,
                })?;
            }
            Arc::new(roots)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE_SERVERS);
    Ok(config)
}

/// A client certificate (RFC 8705 mutual TLS) as configured: the PEM chain and its key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ClientCertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A client certificate read from its files, ready for handshakes.
pub struct ClientCert {
    pub key: Arc<CertifiedKey>,
    /// End of the leaf certificate's validity.
    pub not_after: Option<SystemTime>,
    /// `sha256:` and the hex SHA-256 of the leaf certificate's public key (DER).
    pub fingerprint: String,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("not_after", &self.not_after)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why a client certificate cannot be used; names the file, never shows the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientCertError {
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
    #[error("{path} is an encrypted private key; tokenrelay needs it unencrypted: decrypt it into a new file with `openssl pkey -in {path} -out NEW_FILE`")]
    Encrypted { path: String },
    #[error("{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")]
    NoKey { path: String },
    #[error("{path}: unusable private key: {reason}")]
    BadKey { path: String, reason: String },
    #[error("{key} does not belong to the certificate in {cert}")]
    Mismatch { cert: String, key: String },
    #[error("the certificate in {path} expired at {at}")]
    Expired { path: String, at: String },
}

impl ClientCertFiles {
    /// The leaf certificate's expiry as the file is now (rotation included).
    pub fn cert_not_after(&self) -> Option<SystemTime> {
        let pem = std::fs::read(&self.cert_file).ok()?;
        let leaf = rustls_pemfile::certs(&mut pem.as_slice()).next()?.ok()?;
        x509_not_after(&leaf)
    }

    /// Reads and checks both files: the key must match the leaf certificate, which must
    /// not have expired.
    pub fn load(&self) -> Result<ClientCert, ClientCertError> {
        install_crypto_provider();
        let (cert_path, key_path) = (
            self.cert_file.display().to_string(),
            self.key_file.display().to_string(),
        );
        let read = |p: &Path, name: &String| {
            std::fs::read(p).map_err(|e| ClientCertError::Unreadable {
                path: name.clone(),
                reason: e.to_string(),
            })
        };
        let cert_pem = read(&self.cert_file, &cert_path)?;
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .filter_map(Result::ok)
            .collect();
        let Some(leaf) = certs.first() else {
            return Err(ClientCertError::NoCertificate { path: cert_path });
        };
        let not_after = x509_not_after(leaf);
        if let Some(t) = not_after.filter(|t| *t <= SystemTime::now()) {
            return Err(ClientCertError::Expired {
                path: cert_path,
                at: humantime::format_rfc3339_seconds(t).to_string(),
            });
        }
        let key_pem = read(&self.key_file, &key_path)?;
        if String::from_utf8_lossy(&key_pem).contains("ENCRYPTED") {
            return Err(ClientCertError::Encrypted { path: key_path });
        }
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .ok()
            .flatten()
            .ok_or(ClientCertError::NoKey {
                path: key_path.clone(),
            })?;
        let provider = rustls::crypto::ring::default_provider();
        let signing =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| ClientCertError::BadKey {
                    path: key_path.clone(),
                    reason: e.to_string(),
                })?;
        let spki = signing.public_key().map(|k| k.as_ref().to_vec());
        let certified = CertifiedKey::new(certs, signing);
        if certified.keys_match().is_err() {
            return Err(ClientCertError::Mismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let fingerprint = crate::keys::fingerprint(spki.as_deref().unwrap_or_default());
        Ok(ClientCert {
            key: Arc::new(certified),
            not_after,
            fingerprint,
        })
    }
}

/// Presents the client certificate, re-reading its files when they change (so a
/// rotated certificate is used from the next handshake on, without a restart).
struct RotatingClientCert(Reloading<ClientCert>);

impl std::fmt::Debug for RotatingClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotatingClientCert")
    }
}

impl ResolvesClientCert for RotatingClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// [`client_config`], presenting `cert` when the server asks for a client certificate.
pub fn client_config_with_cert(
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
    cert: Option<&ClientCertFiles>,
) -> Result<ClientConfig, TlsError> {
    let mut config = client_config(ca_file, alpn)?;
    if let Some(files) = cert {
        let f = files.clone();
        let what = format!("client certificate {}", files.cert_file.display());
        let loaded = Reloading::new(
            what,
            vec![files.cert_file.clone(), files.key_file.clone()],
            move || f.load(),
        )?;
        config.client_auth_cert_resolver = Arc::new(RotatingClientCert(loaded));
    }
    Ok(config)
}

/// The end of a certificate's validity (`tbsCertificate.validity.notAfter`), read with
/// a minimal DER walk; `None` when the certificate is malformed.
pub fn x509_not_after(cert: &[u8]) -> Option<SystemTime> {
    let (_, cert, _) = der_tlv(cert)?;
    let (_, tbs, _) = der_tlv(cert)?;
    let (tag, _, rest) = der_tlv(tbs)?;
    // An explicit version may come first; then the serial number.
    let rest = if tag == 0xa0 { der_tlv(rest)?.2 } else { rest };
    let (_, _, rest) = der_tlv(rest)?; // signature algorithm
    let (_, _, rest) = der_tlv(rest)?; // issuer
    let (_, validity, _) = der_tlv(rest)?;
    let (_, _, after) = der_tlv(validity)?; // notBefore
    let (tag, time, _) = der_tlv(after)?;
    let time = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let full = match (tag, time.len()) {
        (0x17, 12) => {
            let yy: u32 = time[..2].parse().ok()?;
            format!("{}{time}", if yy < 50 { "20" } else { "19" })
        }
        (0x18, 14) => time.to_string(),
        _ => return None,
    };
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

/// One DER tag-length-value: (tag, content, rest).
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, head) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, x| (acc << 8) | *x as usize);
        (len, 2 + n)
    };
    let content = b.get(head..head.checked_add(len)?)?;
    Some((tag, content, &b[head + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_after_is_read_from_the_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let cert = params.self_signed(&key).unwrap();
        let t = x509_not_after(cert.der()).unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(t).to_string(),
            "2031-05-17T00:00:00Z"
        );
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2060, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        let t = x509_not_after(cert.der()).unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(t).to_string(),
            "2060-01-02T00:00:00Z"
        );
        assert_eq!(x509_not_after(b"\x30\x05abc"), None);
    }
}
