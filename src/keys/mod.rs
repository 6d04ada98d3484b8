//! Key material read from files: signing keys and the JWTs signed with them ([`jose`]),
//! and the store's encryption key ([`encryption`]). A leaf: config checks keys with
//! it, the token client signs with it, the store encrypts with it.

pub mod encryption;
pub mod jose;

/// SHA-256 of a DER public key, as `sha256:<hex>`.
pub fn fingerprint(spki: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, spki);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}
