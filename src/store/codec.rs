//! Encoding of [`StoredState`] to bytes and back, shared by every backend: JSON with the
//! generation in clear (so CAS and watch need no key) and the tokens either plain or
//! sealed with [`Cipher`].

use serde::{Deserialize, Serialize};

use super::crypto::{Cipher, CryptoError, Sealed};
use super::StoredState;
use crate::secret::Secret;

const FORMAT_VERSION: u32 = 1;

/// Encodes and decodes stored states; holds the optional at-rest key.
#[derive(Debug)]
pub struct Codec {
    cipher: Option<Cipher>,
}

/// On-disk envelope.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    version: u32,
    generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<Payload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encrypted: Option<EncryptedPayload>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptedPayload {
    alg: String,
    nonce: String,
    ciphertext: String,
}

/// The fields of a state, with secrets as plain strings. Private to this module so the
/// exposed values exist only on their way to and from the backend.
#[derive(Serialize, Deserialize)]
struct Payload {
    access_token: Option<String>,
    access_expires_at_ms: Option<u64>,
    refresh_token: Option<String>,
    obtained_at_ms: u64,
    updated_at_ms: u64,
    updated_by: String,
    #[serde(default)]
    reauthorization_required: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authorized_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_expires_at_ms: Option<u64>,
    /// Absent unless true (older versions ignore these three).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    refresh_expires_estimated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    issued_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    issued_at_unknown: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    moved: Option<super::Moved>,
    /// Absent in states written before answer fields were kept (and ignored by such
    /// versions, so a rollback still reads newer states).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    answer_fields: std::collections::BTreeMap<String, String>,
    /// Absent in states written before it was recorded (and ignored by such versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    issued_to: Option<super::IssuedTo>,
    /// Absent unless an attempt is in doubt (older versions ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    in_doubt: Option<super::InDoubt>,
}

/// Why a state cannot be encoded or decoded. Messages never contain token material.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a tokenrelay state file (line {line}, column {column})")]
    NotState { line: usize, column: usize },
    #[error("not a tokenrelay state file: {0}")]
    NoGeneration(#[source] serde_json::Error),
    #[error("unsupported state format version {0}")]
    Version(u32),
    #[error("state is encrypted but no store.encryption_key_file is configured")]
    NoKey,
    #[error("unsupported encryption algorithm {0:?}")]
    Algorithm(String),
    #[error("state must hold exactly one of state or encrypted")]
    Shape,
    #[error("decrypted state is not valid")]
    DecryptedInvalid,
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("cannot serialize the state: {0}")]
    Serialize(#[source] serde_json::Error),
}

fn aad(name: &str, generation: u64) -> Vec<u8> {
    format!("tokenrelay/v{FORMAT_VERSION}/{name}/{generation}").into_bytes()
}

impl Codec {
    /// A codec that encrypts when `key` is given.
    pub fn new(key: Option<&Secret>) -> Result<Codec, CodecError> {
        Ok(Codec {
            cipher: key.map(Cipher::new).transpose()?,
        })
    }

    /// Serializes (and seals) a state.
    pub fn encode(&self, name: &str, s: &StoredState) -> Result<Vec<u8>, CodecError> {
        let payload = Payload {
            access_token: s.access_token.as_ref().map(|t| t.expose().to_string()),
            access_expires_at_ms: s.access_expires_at_ms,
            refresh_token: s.refresh_token.as_ref().map(|t| t.expose().to_string()),
            obtained_at_ms: s.obtained_at_ms,
            updated_at_ms: s.updated_at_ms,
            updated_by: s.updated_by.clone(),
            reauthorization_required: s.reauthorization_required.clone(),
            authorized_at_ms: s.authorized_at_ms,
            refresh_expires_at_ms: s.refresh_expires_at_ms,
            refresh_expires_estimated: s.refresh_expires_estimated,
            issued_at_ms: s.issued_at_ms,
            issued_at_unknown: s.issued_at_unknown,
            moved: s.moved.clone(),
            answer_fields: s.answer_fields.clone(),
            issued_to: s.issued_to.clone(),
            in_doubt: s.in_doubt.clone(),
        };
        let mut env = Envelope {
            version: FORMAT_VERSION,
            generation: s.generation,
            state: None,
            encrypted: None,
        };
        match &self.cipher {
            None => env.state = Some(payload),
            Some(c) => {
                let plain = serde_json::to_vec(&payload).map_err(CodecError::Serialize)?;
                let sealed = c.seal(&aad(name, s.generation), &plain)?;
                env.encrypted = Some(EncryptedPayload {
                    alg: "AES-256-GCM".into(),
                    nonce: sealed.nonce,
                    ciphertext: sealed.ciphertext,
                });
            }
        }
        let mut out = serde_json::to_vec_pretty(&env).map_err(CodecError::Serialize)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Reads only the generation (no key needed).
    pub fn generation(bytes: &[u8]) -> Result<u64, CodecError> {
        #[derive(Deserialize)]
        struct Gen {
            generation: u64,
        }
        serde_json::from_slice::<Gen>(bytes)
            .map(|g| g.generation)
            .map_err(CodecError::NoGeneration)
    }

    /// Parses (and opens) a state; errors never contain token material.
    pub fn decode(&self, name: &str, bytes: &[u8]) -> Result<StoredState, CodecError> {
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| CodecError::NotState {
            line: e.line(),
            column: e.column(),
        })?;
        if env.version != FORMAT_VERSION {
            return Err(CodecError::Version(env.version));
        }
        let payload = match (env.state, env.encrypted, &self.cipher) {
            (Some(p), None, _) => p,
            (None, Some(_), None) => return Err(CodecError::NoKey),
            (None, Some(e), Some(c)) => {
                if e.alg != "AES-256-GCM" {
                    return Err(CodecError::Algorithm(e.alg));
                }
                let plain = c.open(
                    &aad(name, env.generation),
                    &Sealed {
                        nonce: e.nonce,
                        ciphertext: e.ciphertext,
                    },
                )?;
                serde_json::from_slice(&plain).map_err(|_| CodecError::DecryptedInvalid)?
            }
            _ => return Err(CodecError::Shape),
        };
        Ok(StoredState {
            generation: env.generation,
            access_token: payload.access_token.map(Secret::new),
            access_expires_at_ms: payload.access_expires_at_ms,
            refresh_token: payload.refresh_token.map(Secret::new),
            obtained_at_ms: payload.obtained_at_ms,
            updated_at_ms: payload.updated_at_ms,
            updated_by: payload.updated_by,
            reauthorization_required: payload.reauthorization_required,
            authorized_at_ms: payload.authorized_at_ms,
            refresh_expires_at_ms: payload.refresh_expires_at_ms,
            refresh_expires_estimated: payload.refresh_expires_estimated,
            issued_at_ms: payload.issued_at_ms,
            issued_at_unknown: payload.issued_at_unknown,
            moved: payload.moved,
            answer_fields: payload.answer_fields,
            issued_to: payload.issued_to,
            in_doubt: payload.in_doubt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_fields() -> StoredState {
        StoredState {
            generation: 3,
            access_token: Some(Secret::new("at-value")),
            refresh_token: Some(Secret::new("rt-value")),
            updated_by: "test".into(),
            answer_fields: [(
                "instance_url".to_string(),
                "https://na1.example.com".to_string(),
            )]
            .into(),
            issued_to: Some(super::super::IssuedTo {
                token_url: "https://auth.example.com/token".into(),
                client_id: "crm-client".into(),
            }),
            ..Default::default()
        }
    }

    /// Kept answer fields and who the token was issued to go through every backend's
    /// codec, plain and encrypted; a state written before they existed still loads.
    #[test]
    fn answer_fields_and_issued_to_round_trip_and_old_states_load() {
        let key = Secret::new("11".repeat(32));
        for codec in [Codec::new(None).unwrap(), Codec::new(Some(&key)).unwrap()] {
            let bytes = codec.encode("crm", &with_fields()).unwrap();
            assert_eq!(codec.decode("crm", &bytes).unwrap(), with_fields());
            let none = StoredState {
                answer_fields: Default::default(),
                ..with_fields()
            };
            let bytes = codec.encode("crm", &none).unwrap();
            assert!(!String::from_utf8_lossy(&bytes).contains("answer_fields"));
            assert_eq!(codec.decode("crm", &bytes).unwrap(), none);
        }
        let old = br#"{"version":1,"generation":2,"state":{"access_token":null,"access_expires_at_ms":null,"refresh_token":"r","obtained_at_ms":1,"updated_at_ms":1,"updated_by":"old"}}"#;
        let s = Codec::new(None).unwrap().decode("crm", old).unwrap();
        assert_eq!(s.generation, 2);
        assert!(s.answer_fields.is_empty());
        assert_eq!(s.issued_to, None);
    }
}
