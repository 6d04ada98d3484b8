//! Encryption of tokens at rest: AES-256-GCM (ring, the provider rustls already uses),
//! a fresh random 96-bit nonce per write, and the credential name and generation bound
//! in as associated data so a file copied to another credential or generation fails to
//! open instead of being silently accepted.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::keys::encryption::key_bytes;
use crate::secret::Secret;

/// Why sealing or opening failed. AEAD cannot tell a wrong key from altered bytes, so
/// opening has one error for both.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("encryption key is not 32 bytes")]
    KeyLength,
    #[error("invalid AES-256 key")]
    InvalidKey,
    #[error("system random number generator failed")]
    Random,
    #[error("encryption failed")]
    Seal,
    #[error("cannot decrypt: wrong encryption key, or the file was altered or copied from another credential")]
    Open,
}

/// An AEAD key ready to seal and open stored states.
pub struct Cipher {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(AES-256-GCM, key redacted)")
    }
}

/// A sealed value: base64 nonce and ciphertext (with tag).
pub struct Sealed {
    pub nonce: String,
    pub ciphertext: String,
}

impl Cipher {
    /// Builds a cipher from a key read by [`crate::keys::encryption::read_key_file`].
    pub fn new(key: &Secret) -> Result<Cipher, CryptoError> {
        let raw = key_bytes(key).ok_or(CryptoError::KeyLength)?;
        let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| CryptoError::InvalidKey)?;
        Ok(Cipher {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        })
    }

    /// Encrypts `plain`, binding `aad` (credential name and generation).
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Sealed, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| CryptoError::Seal)?;
        Ok(Sealed {
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(buf),
        })
    }

    /// Decrypts; any mismatch (wrong key, altered bytes, other credential or generation)
    /// is one clear error, as AEAD cannot tell them apart.
    pub fn open(&self, aad: &[u8], sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
        let bad = || CryptoError::Open;
        let nonce: [u8; NONCE_LEN] = B64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(bad)?;
        let mut buf = B64.decode(&sealed.ciphertext).map_err(|_| bad())?;
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| bad())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(byte: u8) -> Cipher {
        let key = crate::keys::encryption::hex_encode(&[byte; 32]);
        Cipher::new(&Secret::new(key)).unwrap()
    }

    /// Debug output names the cipher and never shows the key.
    #[test]
    fn debug_output_redacts_the_key() {
        let shown = format!("{:?}", cipher(0xab));
        assert_eq!(shown, "Cipher(AES-256-GCM, key redacted)");
        assert!(!shown.to_lowercase().contains("abab"));
    }

    #[test]
    fn round_trip_and_failures() {
        let c = cipher(7);
        let sealed = c.seal(b"crm:3", b"hello").unwrap();
        assert_eq!(c.open(b"crm:3", &sealed).unwrap(), b"hello");
        assert!(c.open(b"crm:4", &sealed).is_err(), "aad binds generation");
        assert!(cipher(8).open(b"crm:3", &sealed).is_err(), "wrong key");
        let again = c.seal(b"crm:3", b"hello").unwrap();
        assert_ne!(again.nonce, sealed.nonce, "fresh nonce per write");
    }
}
