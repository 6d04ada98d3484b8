//! Values of the extra token-request headers (`token_headers`): fixed text, or a value
//! generated per request. Some providers want a fresh request id on each token request
//! (Sber's `RqUID`), so `{uuid}` in a value becomes a new random UUID (RFC 9562 version 4,
//! 36 characters) and `{uuid_hex}` the same without hyphens (32 hex digits).

use crate::secret::Secret;

/// The value to send for one request: `template` with each placeholder filled anew.
pub fn value(template: &Secret) -> String {
    let text = template.expose();
    if !text.contains("{uuid") {
        return text.to_string();
    }
    let mut out = text.to_string();
    while let Some(at) = out.find("{uuid_hex}") {
        out.replace_range(at..at + "{uuid_hex}".len(), &uuid_v4().replace('-', ""));
    }
    while let Some(at) = out.find("{uuid}") {
        out.replace_range(at..at + "{uuid}".len(), &uuid_v4());
    }
    out
}

/// A random version-4 UUID, lowercase, with hyphens.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // variant 10
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_values_are_sent_as_written() {
        assert_eq!(value(&Secret::new("true")), "true");
        assert_eq!(value(&Secret::new("{other}")), "{other}");
    }

    #[test]
    fn uuids_are_generated_per_request() {
        let t = Secret::new("{uuid}");
        let (a, b) = (value(&t), value(&t));
        assert_ne!(a, b, "a new value per request");
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "version 4: {a}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{a}");
        // Sber's RqUID: 32 hex digits, no hyphens.
        let hex = value(&Secret::new("{uuid_hex}"));
        assert_eq!(hex.len(), 32);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{hex}");
        let two = value(&Secret::new("req-{uuid_hex}/{uuid_hex}"));
        let (x, y) = two["req-".len()..].split_once('/').unwrap();
        assert_ne!(x, y);
    }
}
