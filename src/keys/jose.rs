//! Signed JWTs tokenrelay sends (RFC 7523): client assertions for `private_key_jwt` and
//! `client_secret_jwt` (§2.2) and the assertion of the `jwt_bearer` grant (§2.1).
//! Signing is jsonwebtoken's (on ring); this module loads keys, tells their type, checks
//! that the algorithm fits, and builds claims. Keys and signed assertions never print.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use ring::signature::{self, KeyPair};
use rustls::pki_types::PrivateKeyDer;
use serde_json::{Map, Value};

use super::fingerprint;
use crate::secret::Secret;
use crate::watched_files::Reloading;

/// The client assertion type of RFC 7523 §2.2.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The grant type of RFC 7523 §2.1.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime of a client assertion: it is used once, right away.
pub const CLIENT_ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// The kind of a private key, which decides the algorithms it can sign with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    /// The algorithm used when none is configured.
    pub fn default_alg(self) -> Algorithm {
        match self {
            KeyKind::Rsa => Algorithm::RS256,
            KeyKind::P256 => Algorithm::ES256,
            KeyKind::P384 => Algorithm::ES384,
            KeyKind::Ed25519 => Algorithm::EdDSA,
        }
    }

    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::P256 => alg == ES256,
            KeyKind::P384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::P256 => "EC P-256",
            KeyKind::P384 => "EC P-384",
            KeyKind::Ed25519 => "Ed25519",
        }
    }
}

/// Why a key cannot be used. Messages name the file, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("{path} is an encrypted private key; tokenrelay needs it unencrypted (protect the file instead, e.g. a Kubernetes Secret): decrypt it into a new file with `openssl pkey -in {path} -out NEW_FILE`")]
    Encrypted { path: String },
    #[error("{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")]
    NoKey { path: String },
    #[error("{path} is not an RSA (2048 bits or more), EC P-256/P-384 or Ed25519 private key")]
    Unsupported { path: String },
    #[error("{path} is an {kind} key, which cannot sign {alg:?}; use {expected:?} or leave the algorithm unset")]
    AlgMismatch {
        path: String,
        kind: &'static str,
        alg: Algorithm,
        expected: Algorithm,
    },
    #[error("{path} is not a Google service-account key file: {reason}")]
    ServiceAccount { path: String, reason: String },
}

/// A configured signing algorithm tokenrelay does not sign with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not supported; use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
)]
pub struct UnsupportedAlgorithm(pub String);

/// Signing failed; jsonwebtoken's message describes the key kind, never key material.
#[derive(Debug, thiserror::Error)]
#[error("cannot sign the assertion: {0}")]
pub struct SignError(#[source] jsonwebtoken::errors::Error);

/// Parses an algorithm name as configured.
pub fn parse_alg(name: &str) -> Result<Algorithm, UnsupportedAlgorithm> {
    use Algorithm::*;
    Ok(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        other => return Err(UnsupportedAlgorithm(other.to_string())),
    })
}

/// A private key read from a file, ready to sign.
pub struct SigningKey {
    pub kind: KeyKind,
    pub alg: Algorithm,
    /// `sha256:` and the hex SHA-256 of the DER public key (SubjectPublicKeyInfo), as
    /// `openssl pkey -pubout -outform DER | sha256sum` prints it.
    pub fingerprint: String,
    encoding: EncodingKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a PEM private key; `alg` is checked against the key, or chosen from it.
    pub fn from_pem_file(path: &Path, alg: Option<Algorithm>) -> Result<SigningKey, KeyError> {
        let text = std::fs::read(path).map_err(|e| KeyError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_pem(&text, &path.display().to_string(), alg)
    }

    /// Parses PEM text; `origin` names it in errors.
    pub fn from_pem(pem: &[u8], origin: &str, alg: Option<Algorithm>) -> Result<Self, KeyError> {
        let path = origin.to_string();
        let text = String::from_utf8_lossy(pem);
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err(KeyError::Encrypted { path });
        }
        let key = rustls_pemfile::private_key(&mut &pem[..])
            .ok()
            .flatten()
            .ok_or(KeyError::NoKey { path: path.clone() })?;
        let (kind, spki, encoding) = match &key {
            // cert-manager and `openssl ecparam -genkey` write SEC1; signing takes PKCS#8,
            // whose algorithm names the curve: try each supported one.
            PrivateKeyDer::Sec1(sec1) => [P256_ALG_ID, P384_ALG_ID]
                .iter()
                .find_map(|alg| {
                    let inner = [
                        &[0x02, 0x01, 0x00][..],
                        alg,
                        &der(0x04, sec1.secret_sec1_der()),
                    ]
                    .concat();
                    from_pkcs8(&der(0x30, &inner)).ok()
                })
                .ok_or(KeyError::Unsupported { path: path.clone() })?,
            PrivateKeyDer::Pkcs1(der) => {
                let pair = signature::RsaKeyPair::from_der(der.secret_pkcs1_der())
                    .map_err(|_| KeyError::Unsupported { path: path.clone() })?;
                let spki = rsa_spki(pair.public_key().as_ref());
                let enc = EncodingKey::from_rsa_der(der.secret_pkcs1_der());
                (KeyKind::Rsa, spki, enc)
            }
            PrivateKeyDer::Pkcs8(der) => from_pkcs8(der.secret_pkcs8_der())
                .map_err(|()| KeyError::Unsupported { path: path.clone() })?,
            _ => return Err(KeyError::Unsupported { path }),
        };
        let alg = match alg {
            Some(a) if !kind.fits(a) => {
                return Err(KeyError::AlgMismatch {
                    path,
                    kind: kind.name(),
                    alg: a,
                    expected: kind.default_alg(),
                })
            }
            Some(a) => a,
            None => kind.default_alg(),
        };
        Ok(SigningKey {
            kind,
            alg,
            fingerprint: fingerprint(&spki),
            encoding,
        })
    }
}

/// A PKCS#8 key's kind, public key (SubjectPublicKeyInfo) and signing key.
fn from_pkcs8(der: &[u8]) -> Result<(KeyKind, Vec<u8>, EncodingKey), ()> {
    let rng = ring::rand::SystemRandom::new();
    if let Ok(pair) = signature::RsaKeyPair::from_pkcs8(der) {
        let spki = rsa_spki(pair.public_key().as_ref());
        // jsonwebtoken signs RSA from PKCS#1; its PEM reader unwraps PKCS#8.
        let enc =
            EncodingKey::from_rsa_pem(to_pem("PRIVATE KEY", der).as_bytes()).map_err(|_| ())?;
        Ok((KeyKind::Rsa, spki, enc))
    } else if let Ok(pair) =
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
    {
        let spki = [P256_SPKI_PREFIX, pair.public_key().as_ref()].concat();
        Ok((KeyKind::P256, spki, EncodingKey::from_ec_der(der)))
    } else if let Ok(pair) =
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, der, &rng)
    {
        let spki = [P384_SPKI_PREFIX, pair.public_key().as_ref()].concat();
        Ok((KeyKind::P384, spki, EncodingKey::from_ec_der(der)))
    } else if let Ok(pair) = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
        let spki = [ED25519_SPKI_PREFIX, pair.public_key().as_ref()].concat();
        Ok((KeyKind::Ed25519, spki, EncodingKey::from_ed_der(der)))
    } else {
        Err(())
    }
}

/// The parts of a Google service-account JSON key tokenrelay uses.
#[derive(Clone)]
pub struct ServiceAccount {
    pub client_email: String,
    pub token_uri: String,
    pub private_key_id: Option<String>,
    pub key: Arc<SigningKey>,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .field("private_key_id", &self.private_key_id)
            .field("key", &self.key)
            .finish()
    }
}

impl ServiceAccount {
    /// Reads a service-account key file (`"type": "service_account"`).
    pub fn from_file(path: &Path, alg: Option<Algorithm>) -> Result<ServiceAccount, KeyError> {
        let origin = path.display().to_string();
        let bad = |reason: String| KeyError::ServiceAccount {
            path: origin.clone(),
            reason,
        };
        let text = std::fs::read(path).map_err(|e| KeyError::Unreadable {
            path: origin.clone(),
            reason: e.to_string(),
        })?;
        // Only the position is reported: serde_json's messages may quote the document.
        let doc: Map<String, Value> = serde_json::from_slice(&text).map_err(|e| {
            bad(format!(
                "not a JSON object (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let field = |name: &str| -> Result<String, KeyError> {
            match doc.get(name) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(_) => Err(bad(format!("\"{name}\" must be a non-empty string"))),
                None => Err(bad(format!("\"{name}\" is missing"))),
            }
        };
        if let Some(t) = doc.get("type").and_then(Value::as_str) {
            if t != "service_account" {
                return Err(bad(format!(
                    "\"type\" is {t:?}, expected \"service_account\""
                )));
            }
        }
        let client_email = field("client_email")?;
        let token_uri = field("token_uri")?;
        let private_key_id = doc
            .get("private_key_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let pem = Secret::new(field("private_key")?);
        let key = SigningKey::from_pem(
            pem.expose().as_bytes(),
            &format!("{origin} (private_key)"),
            alg,
        )?;
        Ok(ServiceAccount {
            client_email,
            token_uri,
            private_key_id,
            key: Arc::new(key),
        })
    }
}

/// Where an assertion's signing key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Pem(PathBuf),
    ServiceAccount(PathBuf),
}

impl KeySource {
    pub fn path(&self) -> &Path {
        match self {
            KeySource::Pem(p) | KeySource::ServiceAccount(p) => p,
        }
    }

    /// Loads the key, and the `kid` a service account names.
    pub fn load(
        &self,
        alg: Option<Algorithm>,
    ) -> Result<(Arc<SigningKey>, Option<String>), KeyError> {
        match self {
            KeySource::Pem(p) => Ok((Arc::new(SigningKey::from_pem_file(p, alg)?), None)),
            KeySource::ServiceAccount(p) => {
                let sa = ServiceAccount::from_file(p, alg)?;
                Ok((sa.key, sa.private_key_id))
            }
        }
    }
}

/// How assertions are signed: a private key (re-read when its file changes) or, for
/// `client_secret_jwt`, HS256 over the client secret.
pub enum Signer {
    Key {
        key: Reloading<(Arc<SigningKey>, Option<String>)>,
        kid: Option<String>,
    },
    Secret(Secret),
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signer::Key { key, kid } => f
                .debug_struct("Signer")
                .field("key", &key.get().0)
                .field("kid", kid)
                .finish(),
            Signer::Secret(_) => f.write_str("Signer(HS256, <redacted>)"),
        }
    }
}

impl Signer {
    /// A key signer; the key is loaded now, and again whenever its file changes.
    pub fn from_key(
        source: KeySource,
        alg: Option<Algorithm>,
        kid: Option<String>,
    ) -> Result<Signer, KeyError> {
        let path = source.path().to_path_buf();
        let what = format!("signing key {}", path.display());
        let key = Reloading::new(what, vec![path], move || source.load(alg))?;
        Ok(Signer::Key { key, kid })
    }

    /// Signs `claims` (the caller's claims plus a fresh `jti`, `iat` and `exp`).
    pub fn sign(
        &self,
        mut claims: Map<String, Value>,
        lifetime: Duration,
    ) -> Result<Secret, SignError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        claims.insert("jti".into(), Value::String(random_jti()));
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), (now + lifetime.as_secs()).into());
        let (header, key) = match self {
            Signer::Key { key, kid } => {
                let (k, file_kid) = &*key.get();
                let mut h = Header::new(k.alg);
                h.kid = kid.clone().or_else(|| file_kid.clone());
                h.typ = Some("JWT".into());
                (h, k.encoding.clone())
            }
            Signer::Secret(s) => (
                Header::new(Algorithm::HS256),
                EncodingKey::from_secret(s.expose().as_bytes()),
            ),
        };
        jsonwebtoken::encode(&header, &claims, &key)
            .map(Secret::new)
            .map_err(SignError)
    }
}

fn random_jti() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// SubjectPublicKeyInfo headers for keys whose public part has a fixed size.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P384_SPKI_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];
// EC AlgorithmIdentifiers (id-ecPublicKey with the curve), as in the prefixes above.
const P256_ALG_ID: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
const P384_ALG_ID: &[u8] = &[
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
    0x00, 0x22,
];
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// SubjectPublicKeyInfo of an RSA public key (PKCS#1 `RSAPublicKey` DER).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x00];
    bits.extend_from_slice(pkcs1);
    let bit_string = der(0x03, &bits);
    der(0x30, &[ALG, &bit_string].concat())
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec_pem(alg: &'static rcgen::SignatureAlgorithm) -> (String, rcgen::KeyPair) {
        let k = rcgen::KeyPair::generate_for(alg).unwrap();
        (k.serialize_pem(), k)
    }

    #[test]
    fn key_kind_and_algorithm_come_from_the_key() {
        for (alg, kind, default) in [
            (
                &rcgen::PKCS_ECDSA_P256_SHA256,
                KeyKind::P256,
                Algorithm::ES256,
            ),
            (
                &rcgen::PKCS_ECDSA_P384_SHA384,
                KeyKind::P384,
                Algorithm::ES384,
            ),
            (&rcgen::PKCS_ED25519, KeyKind::Ed25519, Algorithm::EdDSA),
        ] {
            let (pem, pair) = ec_pem(alg);
            let k = SigningKey::from_pem(pem.as_bytes(), "k.pem", None).unwrap();
            assert_eq!((k.kind, k.alg), (kind, default));
            // The fingerprint is over the same SubjectPublicKeyInfo rcgen writes.
            assert_eq!(k.fingerprint, fingerprint(&pair.public_key_der()));
            let err =
                SigningKey::from_pem(pem.as_bytes(), "k.pem", Some(Algorithm::RS256)).unwrap_err();
            assert!(matches!(err, KeyError::AlgMismatch { .. }), "{err}");
            assert!(err.to_string().starts_with("k.pem is an "), "{err}");
        }
    }

    #[test]
    fn bad_pem_files_are_named_and_not_shown() {
        let err = SigningKey::from_pem(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "enc.pem",
            None,
        )
        .unwrap_err();
        assert!(matches!(err, KeyError::Encrypted { .. }));
        let err = SigningKey::from_pem(b"hello", "x.pem", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.pem holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
        );
        let err = SigningKey::from_pem_file(Path::new("/nonexistent/k.pem"), None).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot read /nonexistent/k.pem"));
    }

    #[test]
    fn rsa_spki_der_lengths() {
        // Long-form lengths appear for every real RSA key.
        let d = der(0x30, &[0u8; 300]);
        assert_eq!(&d[..4], &[0x30, 0x82, 0x01, 0x2c]);
        assert_eq!(der(0x04, &[1, 2])[..2], [0x04, 2]);
    }

    #[test]
    fn signed_assertions_carry_fresh_claims_and_never_print() {
        let (pem, pair) = ec_pem(&rcgen::PKCS_ECDSA_P256_SHA256);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, &pem).unwrap();
        let signer = Signer::from_key(KeySource::Pem(path), None, Some("kid-1".into())).unwrap();
        let mut claims = Map::new();
        claims.insert("iss".into(), "me".into());
        let a = signer
            .sign(claims.clone(), Duration::from_secs(60))
            .unwrap();
        let b = signer.sign(claims, Duration::from_secs(60)).unwrap();
        assert_ne!(a.expose(), b.expose());
        let dbg = format!("{signer:?} {a:?}");
        assert!(
            !dbg.contains(a.expose()) && !dbg.contains("PRIVATE"),
            "{dbg}"
        );
        let key = jsonwebtoken::DecodingKey::from_ec_pem(pair.public_key_pem().as_bytes()).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
        v.validate_aud = false;
        let t = jsonwebtoken::decode::<Map<String, Value>>(a.expose(), &key, &v).unwrap();
        assert_eq!(t.header.kid.as_deref(), Some("kid-1"));
        assert_eq!(t.claims["iss"], "me");
        let (iat, exp) = (
            t.claims["iat"].as_u64().unwrap(),
            t.claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, 60);
    }
}
