//! Encryption of tokens at rest: AES-256-GCM (ring, the provider rustls already uses),
//! a fresh random 96-bit nonce per write, and the credential name and generation bound
//! in as associated data so a file copied to another credential or generation fails to
//! open instead of being silently accepted.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::secret::Secret;

/// Reads a 32-byte key: raw bytes (`head -c 32 /dev/urandom`), 64 hex characters
/// (`openssl rand -hex 32`) or base64 (`openssl rand -base64 32`).
pub fn read_key_file(path: &Path) -> Result<Secret, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = decode_key(&data).ok_or_else(|| {
        format!(
            "{} must hold exactly 32 random bytes: raw (head -c 32 /dev/urandom), 64 hex characters (openssl rand -hex 32) or base64 (openssl rand -base64 32)",
            path.display()
        )
    })?;
    // Secret holds text, so carry the key as hex; it is decoded again in `Cipher::new`.
    Ok(Secret::new(hex_encode(&key)))
}

fn decode_key(data: &[u8]) -> Option<[u8; 32]> {
    if data.len() == 32 {
        return data.try_into().ok();
    }
    let text = std::str::from_utf8(data).ok()?.trim();
    if text.len() == 64 {
        return hex_decode(text);
    }
    let bytes = B64.decode(text).ok()?;
    bytes.try_into().ok()
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        *out.get_mut(i)? = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
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
    /// Builds a cipher from a key read by [`read_key_file`].
    pub fn new(key: &Secret) -> Result<Cipher, String> {
        let raw = hex_decode(key.expose()).ok_or("encryption key is not 32 bytes")?;
        let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| "invalid AES-256 key")?;
        Ok(Cipher {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        })
    }

    /// Encrypts `plain`, binding `aad` (credential name and generation).
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Sealed, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| "system random number generator failed")?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| "encryption failed")?;
        Ok(Sealed {
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(buf),
        })
    }

    /// Decrypts; any mismatch (wrong key, altered bytes, other credential or generation)
    /// is one clear error, as AEAD cannot tell them apart.
    pub fn open(&self, aad: &[u8], sealed: &Sealed) -> Result<Vec<u8>, String> {
        let bad = || {
            "cannot decrypt: wrong encryption key, or the file was altered or copied from another credential".to_string()
        };
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
        Cipher::new(&Secret::new(hex_encode(&[byte; 32]))).unwrap()
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

    #[test]
    fn key_formats() {
        assert!(decode_key(&[1u8; 32]).is_some());
        assert!(decode_key(hex_encode(&[2u8; 32]).as_bytes()).is_some());
        assert!(decode_key(format!("{}\n", B64.encode([3u8; 32])).as_bytes()).is_some());
        assert!(decode_key(b"short").is_none());
    }
}
