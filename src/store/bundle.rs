//! A credential bundle: one credential's stored state, sealed for moving it to another
//! environment (`tokenrelay export` / `import`). AES-256-GCM under a key derived from a
//! passphrase with scrypt (N = 2^15, r = 8, p = 1, a random salt per bundle), or under the
//! store's own key file. The header (format, version, key source) is bound as associated
//! data, so an altered bundle fails to open. Version 2 adds the handover id; version 1
//! bundles (without it) still open. The scrypt parameters are read from the
//! header before it can be authenticated, so they are bounded first.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::crypto::{Cipher, Sealed};
use super::StoredState;
use crate::secret::Secret;

const FORMAT: &str = "tokenrelay-credential-bundle";
/// The version [`seal`] writes; [`open`] reads 1 to this.
const VERSION: u32 = 2;
const SCRYPT_LOG_N: u8 = 15;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;
/// The most memory a bundle's scrypt parameters may ask for (128·r·2^log_n bytes), four
/// times what [`seal`] uses. The parameters come from the file and are authenticated only
/// by the key they derive, so they are bounded before deriving it.
const MAX_SCRYPT_MEMORY: u64 = 128 << 20;
/// scrypt also allocates 128·r·p bytes, and its time grows with p.
const MAX_SCRYPT_R: u32 = 32;
const MAX_SCRYPT_P: u32 = 4;

/// What a bundle holds once opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Contents {
    pub credential: String,
    /// The token endpoint identity: an import into a credential with another identity is
    /// refused (its tokens would be useless there, or worse, sent to the wrong server).
    pub token_url: String,
    pub client_id: String,
    pub exported_at_ms: u64,
    pub exported_by: String,
    /// A backup (`--copy`): the source kept running, so its refresh token may have been
    /// spent since.
    pub copy: bool,
    /// A handover's id, also kept in the source's moved marker, so the bundle brought
    /// back to its source is recognised. `None` for a backup and in version 1 bundles.
    pub handover_id: Option<String>,
    pub state: StoredState,
}

/// How the bundle key is obtained.
pub enum Key {
    /// A passphrase (from `--passphrase-file`).
    Passphrase(Secret),
    /// The store's 32-byte key (`store.encryption_key_file`).
    StoreKey(Secret),
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a tokenrelay credential bundle (or an unsupported version)")]
    NotABundle,
    #[error("the bundle has format version {0}; this tokenrelay reads versions 1 to {VERSION}: import it with a newer tokenrelay")]
    UnsupportedVersion(u32),
    #[error("the bundle was sealed with {0}; give that instead")]
    WrongKeyKind(&'static str),
    #[error("cannot open the bundle: wrong passphrase or key, or the file was altered")]
    CannotOpen,
    #[error("cannot seal the bundle: {0}")]
    Seal(#[from] crate::store::crypto::CryptoError),
    #[error("cannot serialize the bundle: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("refusing the bundle's key derivation parameters (the bundle was not sealed by tokenrelay, or it was altered)")]
    KdfParams(#[from] KdfParamsError),
}

/// Why scrypt parameters read from a bundle were refused (before any use).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KdfParamsError {
    #[error("scrypt with log_n {log_n} and r {r} needs 128·r·2^log_n bytes, over the {} MiB allowed", MAX_SCRYPT_MEMORY >> 20)]
    Memory { log_n: u8, r: u32 },
    #[error("scrypt r {0} is outside 1..={MAX_SCRYPT_R}")]
    BlockSize(u32),
    #[error("scrypt p {0} is outside 1..={MAX_SCRYPT_P}")]
    Parallelism(u32),
    #[error("scrypt parameters log_n {log_n}, r {r}, p {p} are invalid")]
    Invalid { log_n: u8, r: u32, p: u32 },
}

/// scrypt parameters read from a bundle, checked before any memory is spent on them.
fn bounded_scrypt_params(log_n: u8, r: u32, p: u32) -> Result<scrypt::Params, KdfParamsError> {
    if !(1..=MAX_SCRYPT_R).contains(&r) {
        return Err(KdfParamsError::BlockSize(r));
    }
    if !(1..=MAX_SCRYPT_P).contains(&p) {
        return Err(KdfParamsError::Parallelism(p));
    }
    let memory = 1u64
        .checked_shl(log_n.into())
        .and_then(|n| n.checked_mul(128 * u64::from(r)));
    if memory.is_none_or(|m| m > MAX_SCRYPT_MEMORY) {
        return Err(KdfParamsError::Memory { log_n, r });
    }
    scrypt::Params::new(log_n, r, p, 32).map_err(|_| KdfParamsError::Invalid { log_n, r, p })
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    version: u32,
    key: KeySource,
    nonce: String,
    ciphertext: String,
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
enum KeySource {
    Scrypt {
        salt: String,
        log_n: u8,
        r: u32,
        p: u32,
    },
    StoreKey,
}

/// The sealed plaintext: secrets as plain strings only inside this module.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain {
    credential: String,
    token_url: String,
    client_id: String,
    exported_at_ms: u64,
    exported_by: String,
    copy: bool,
    /// Version 2 on, and only for a handover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handover_id: Option<String>,
    generation: u64,
    access_token: Option<String>,
    access_expires_at_ms: Option<u64>,
    refresh_token: Option<String>,
    obtained_at_ms: u64,
    authorized_at_ms: Option<u64>,
    refresh_expires_at_ms: Option<u64>,
    /// Absent unless set (older bundles), as `answer_fields`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    refresh_expires_estimated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    issued_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    issued_at_unknown: bool,
    /// Kept token-answer fields (`instance_url`, ...); absent in older bundles.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    answer_fields: std::collections::BTreeMap<String, String>,
}

fn aad(version: u32, key: &KeySource) -> Vec<u8> {
    let key = serde_json::to_string(key).unwrap_or_default();
    format!("{FORMAT}/v{version}/{key}").into_bytes()
}

fn cipher(key: &Key, source: &KeySource) -> Result<Cipher, BundleError> {
    let secret = match (key, source) {
        (
            Key::Passphrase(p),
            KeySource::Scrypt {
                salt,
                log_n,
                r,
                p: par,
            },
        ) => {
            let salt = B64.decode(salt).map_err(|_| BundleError::NotABundle)?;
            let params = bounded_scrypt_params(*log_n, *r, *par)?;
            let mut derived = [0u8; 32];
            scrypt::scrypt(p.expose().as_bytes(), &salt, &params, &mut derived)
                .map_err(|_| BundleError::NotABundle)?;
            Secret::new(
                derived
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            )
        }
        (Key::StoreKey(k), KeySource::StoreKey) => k.clone(),
        (Key::Passphrase(_), KeySource::StoreKey) => {
            return Err(BundleError::WrongKeyKind("the store's key file"))
        }
        (Key::StoreKey(_), KeySource::Scrypt { .. }) => {
            return Err(BundleError::WrongKeyKind(
                "a passphrase (--passphrase-file)",
            ))
        }
    };
    Cipher::new(&secret).map_err(BundleError::Seal)
}

/// Seals `contents` under `key`.
pub fn seal(contents: &Contents, key: &Key) -> Result<Vec<u8>, BundleError> {
    let source = match key {
        Key::Passphrase(_) => KeySource::Scrypt {
            salt: B64.encode(rand::random::<[u8; 16]>()),
            log_n: SCRYPT_LOG_N,
            r: SCRYPT_R,
            p: SCRYPT_P,
        },
        Key::StoreKey(_) => KeySource::StoreKey,
    };
    let s = &contents.state;
    let plain = Plain {
        credential: contents.credential.clone(),
        token_url: contents.token_url.clone(),
        client_id: contents.client_id.clone(),
        exported_at_ms: contents.exported_at_ms,
        exported_by: contents.exported_by.clone(),
        copy: contents.copy,
        handover_id: contents.handover_id.clone(),
        generation: s.generation,
        access_token: s.access_token.as_ref().map(|t| t.expose().to_string()),
        access_expires_at_ms: s.access_expires_at_ms,
        refresh_token: s.refresh_token.as_ref().map(|t| t.expose().to_string()),
        obtained_at_ms: s.obtained_at_ms,
        authorized_at_ms: s.authorized_at_ms,
        refresh_expires_at_ms: s.refresh_expires_at_ms,
        refresh_expires_estimated: s.refresh_expires_estimated,
        issued_at_ms: s.issued_at_ms,
        issued_at_unknown: s.issued_at_unknown,
        answer_fields: s.answer_fields.clone(),
    };
    let bytes = serde_json::to_vec(&plain).map_err(BundleError::Serialize)?;
    let sealed = cipher(key, &source)?
        .seal(&aad(VERSION, &source), &bytes)
        .map_err(BundleError::Seal)?;
    let envelope = Envelope {
        format: FORMAT.into(),
        version: VERSION,
        key: source,
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
    };
    let mut out = serde_json::to_vec_pretty(&envelope).map_err(BundleError::Serialize)?;
    out.push(b'\n');
    Ok(out)
}

/// Opens a bundle sealed by [`seal`].
pub fn open(bytes: &[u8], key: &Key) -> Result<Contents, BundleError> {
    let env: Envelope = serde_json::from_slice(bytes).map_err(|_| BundleError::NotABundle)?;
    if env.format != FORMAT {
        return Err(BundleError::NotABundle);
    }
    if !(1..=VERSION).contains(&env.version) {
        return Err(BundleError::UnsupportedVersion(env.version));
    }
    let sealed = Sealed {
        nonce: env.nonce,
        ciphertext: env.ciphertext,
    };
    let plain = cipher(key, &env.key)?
        .open(&aad(env.version, &env.key), &sealed)
        .map_err(|_| BundleError::CannotOpen)?;
    let p: Plain = serde_json::from_slice(&plain).map_err(|_| BundleError::NotABundle)?;
    Ok(Contents {
        credential: p.credential,
        token_url: p.token_url,
        client_id: p.client_id,
        exported_at_ms: p.exported_at_ms,
        exported_by: p.exported_by,
        copy: p.copy,
        handover_id: p.handover_id,
        state: StoredState {
            generation: p.generation,
            access_token: p.access_token.map(Secret::new),
            access_expires_at_ms: p.access_expires_at_ms,
            refresh_token: p.refresh_token.map(Secret::new),
            obtained_at_ms: p.obtained_at_ms,
            authorized_at_ms: p.authorized_at_ms,
            refresh_expires_at_ms: p.refresh_expires_at_ms,
            refresh_expires_estimated: p.refresh_expires_estimated,
            issued_at_ms: p.issued_at_ms,
            issued_at_unknown: p.issued_at_unknown,
            answer_fields: p.answer_fields,
            ..Default::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents() -> Contents {
        Contents {
            credential: "crm".into(),
            token_url: "https://example.com/token".into(),
            client_id: "id".into(),
            exported_at_ms: 1,
            exported_by: "host/1".into(),
            copy: false,
            handover_id: Some("5f0c".into()),
            // Every field a bundle carries has a value of its own, so that a field
            // lost on the way shows in the round trip.
            state: StoredState {
                generation: 7,
                access_token: Some(Secret::new("at-secret-value")),
                access_expires_at_ms: Some(2_000),
                refresh_token: Some(Secret::new("rt-secret-value")),
                obtained_at_ms: 3_000,
                authorized_at_ms: Some(4_000),
                refresh_expires_at_ms: Some(5_000),
                refresh_expires_estimated: true,
                issued_at_ms: Some(6_000),
                issued_at_unknown: true,
                answer_fields: [(
                    "instance_url".to_string(),
                    "https://na1.example.com".to_string(),
                )]
                .into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn round_trip_with_a_passphrase_and_with_the_store_key() {
        let pass = Key::Passphrase(Secret::new("correct horse battery staple"));
        let sealed = seal(&contents(), &pass).unwrap();
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("rt-secret-value") && !text.contains("at-secret-value"));
        assert_eq!(open(&sealed, &pass).unwrap(), contents());
        let wrong = Key::Passphrase(Secret::new("wrong"));
        assert!(matches!(
            open(&sealed, &wrong),
            Err(BundleError::CannotOpen)
        ));
        let key = Key::StoreKey(Secret::new("00".repeat(32)));
        assert!(matches!(
            open(&sealed, &key),
            Err(BundleError::WrongKeyKind(_))
        ));
        let sealed = seal(&contents(), &key).unwrap();
        assert_eq!(open(&sealed, &key).unwrap(), contents());
    }

    #[test]
    fn altered_or_foreign_bytes_are_refused() {
        let pass = Key::Passphrase(Secret::new("p"));
        let mut sealed = seal(&contents(), &pass).unwrap();
        let text = String::from_utf8(sealed.clone()).unwrap();
        let altered = text.replace("\"log_n\": 15", "\"log_n\": 14");
        assert!(open(altered.as_bytes(), &pass).is_err());
        sealed.truncate(10);
        assert!(matches!(open(&sealed, &pass), Err(BundleError::NotABundle)));
        let e = open(b"{}", &pass).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("rt-secret"));
    }

    /// Sealed by the version before handover ids, with the store key `"00".repeat(32)`.
    const VERSION_1_BUNDLE: &str = r#"{
  "format": "tokenrelay-credential-bundle",
  "version": 1,
  "key": {
    "source": "store_key"
  },
  "nonce": "5XSLlsRZfv6IpzOR",
  "ciphertext": "uVz9N8LUKX8g4XTfPeIYJVgr9/mNpZc9iVE0ALLosleGFA86UbGjpkeSfMdwqIgAgGq3OBnidwF2I1RXyrxYUzR6cEb212FtcZN7RZbG2z7gmFzwfSa2KxbDxqQ6SJYoE0RWgp1Umd1S9yNy/2mVySfPHUPpSjUTM/51AnXeN0UleRiThBD/ZHeWiRUKy040PAQkVsmkPABsM/sfeqjzhmNFvu/PXIYrTssdTAvyzTNq0k4XrWF7L5UmMqm8QPIrCuZ+XpLXUiR0Y9izY4jlFZ1hIYlgbMIdrrlYnQZMp1p4XxJ6DpoVIYSm6OR+tosDvKFUJmO3P9iXBFDNY7hbs0AahuKgqEyHLbBI1H3b1Y3x6uZ1wtxbRnZFNek6WguYlUoaGKDqQmkkJjjlsaBiQE/ulm0cdGXJCGiNK9vSy72zuTX2sOnBUW1b9s3mtBie7l0sLO80qmTtfOzinrM="
}
"#;

    #[test]
    fn version_1_bundles_still_open_without_a_handover_id() {
        let key = Key::StoreKey(Secret::new("00".repeat(32)));
        let c = open(VERSION_1_BUNDLE.as_bytes(), &key).unwrap();
        assert_eq!((c.credential.as_str(), c.handover_id), ("crm", None));
        assert_eq!(c.state.refresh_token, Some(Secret::new("rt-secret-value")));
        let sealed = String::from_utf8(seal(&contents(), &key).unwrap()).unwrap();
        assert!(sealed.contains("\"version\": 2"), "{sealed}");
        let newer = sealed.replace("\"version\": 2", "\"version\": 3");
        assert!(matches!(
            open(newer.as_bytes(), &key),
            Err(BundleError::UnsupportedVersion(3))
        ));
        // The version is authenticated: a version 2 bundle relabelled 1 does not open.
        let relabelled = sealed.replace("\"version\": 2", "\"version\": 1");
        assert!(matches!(
            open(relabelled.as_bytes(), &key),
            Err(BundleError::CannotOpen)
        ));
    }

    #[test]
    fn scrypt_parameters_are_bounded_before_use() {
        use KdfParamsError::*;
        let cases = [
            ((SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P), None),
            ((17, 8, 1), None),
            ((16, 2, 4), None),
            ((18, 8, 1), Some(Memory { log_n: 18, r: 8 })),
            ((40, 8, 1), Some(Memory { log_n: 40, r: 8 })),
            ((255, 8, 1), Some(Memory { log_n: 255, r: 8 })),
            ((15, 0, 1), Some(BlockSize(0))),
            ((10, 33, 1), Some(BlockSize(33))),
            ((15, 8, 0), Some(Parallelism(0))),
            ((15, 8, 5), Some(Parallelism(5))),
            (
                (17, 1, 1),
                Some(Invalid {
                    log_n: 17,
                    r: 1,
                    p: 1,
                }),
            ),
        ];
        for ((log_n, r, p), refused) in cases {
            let got = bounded_scrypt_params(log_n, r, p).err();
            assert_eq!(got, refused, "log_n {log_n}, r {r}, p {p}");
        }
    }

    /// A bundle altered to ask for a petabyte is refused without deriving (which would
    /// abort the process), whatever the passphrase.
    #[test]
    fn a_bundle_asking_for_too_much_memory_is_refused_before_deriving() {
        let pass = Key::Passphrase(Secret::new("p"));
        let text = String::from_utf8(seal(&contents(), &pass).unwrap()).unwrap();
        let altered = text.replace("\"log_n\": 15", "\"log_n\": 40");
        let e = open(altered.as_bytes(), &pass).unwrap_err();
        assert!(
            matches!(
                e,
                BundleError::KdfParams(KdfParamsError::Memory { log_n: 40, r: 8 })
            ),
            "{e:?}"
        );
        let why = std::error::Error::source(&e).unwrap().to_string();
        assert!(why.contains("128 MiB"), "{why}");
    }
}
