//! The store's encryption key file: 32 random bytes, raw, hex or base64.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use crate::secret::Secret;

/// Why an encryption key file cannot be used; names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} must hold exactly 32 random bytes: raw (head -c 32 /dev/urandom), 64 hex characters (openssl rand -hex 32) or base64 (openssl rand -base64 32)")]
    NotAKey { path: String },
}

/// Reads a 32-byte key: raw bytes (`head -c 32 /dev/urandom`), 64 hex characters
/// (`openssl rand -hex 32`) or base64 (`openssl rand -base64 32`).
pub fn read_key_file(path: &Path) -> Result<Secret, KeyFileError> {
    let data = std::fs::read(path).map_err(|source| KeyFileError::Unreadable {
        path: path.display().to_string(),
        source,
    })?;
    let key = decode_key(&data).ok_or_else(|| KeyFileError::NotAKey {
        path: path.display().to_string(),
    })?;
    // Secret holds text, so carry the key as hex; `key_bytes` decodes it again.
    Ok(Secret::new(hex_encode(&key)))
}

/// The 32 bytes of a key read by [`read_key_file`].
pub fn key_bytes(key: &Secret) -> Option<[u8; 32]> {
    hex_decode(key.expose())
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

/// Lower-case hex, as keys are carried in a [`Secret`].
pub fn hex_encode(b: &[u8]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_formats() {
        assert!(decode_key(&[1u8; 32]).is_some());
        assert!(decode_key(hex_encode(&[2u8; 32]).as_bytes()).is_some());
        assert!(decode_key(format!("{}\n", B64.encode([3u8; 32])).as_bytes()).is_some());
        assert!(decode_key(b"short").is_none());
    }
}
