//! Reads a token endpoint's JSON object tolerantly, noting where it departs from strict
//! JSON. A rotated refresh token may be the only live one, so it must be found in any
//! answer that states it unambiguously; whether the rest of a flawed answer can be
//! trusted is decided separately (see [`super::response`]).

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

/// The UTF-8 byte-order mark some servers put before a JSON body. RFC 8259 §8.1 lets a
/// parser ignore it, so it is not a flaw.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// How an answer departs from strict JSON (RFC 8259).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flaw {
    /// Bytes other than whitespace after the object.
    TrailingBytes,
    /// A member name given twice with different values.
    DuplicateKey(String),
    /// Longer than the answer limit (read this far only to salvage a refresh token).
    OverLimit(usize),
}

impl fmt::Display for Flaw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flaw::TrailingBytes => f.write_str("bytes follow the JSON object"),
            Flaw::DuplicateKey(name) => {
                write!(f, "field {name:?} appears twice with different values")
            }
            Flaw::OverLimit(limit) => write!(f, "it is larger than {limit} bytes"),
        }
    }
}

/// A JSON object's members in the order sent, duplicates included.
pub struct Document {
    members: Vec<(String, Value)>,
    /// Departures from strict JSON, in the order found.
    pub flaws: Vec<Flaw>,
}

impl Document {
    /// Reads `body` as one JSON object, allowing a byte-order mark, trailing bytes and
    /// duplicate member names; `None` when no object can be read from its start.
    /// `limit` is the size of a strict answer: a longer body is flawed.
    pub fn read(body: &[u8], limit: usize) -> Option<Document> {
        let text = body.strip_prefix(BOM).unwrap_or(body);
        let mut values = serde_json::Deserializer::from_slice(text).into_iter::<Members>();
        let Members(members) = values.next()?.ok()?;
        let rest = &text[values.byte_offset()..];
        let mut flaws = Vec::new();
        if body.len() > limit {
            flaws.push(Flaw::OverLimit(limit));
        }
        if rest.iter().any(|b| !b.is_ascii_whitespace()) {
            flaws.push(Flaw::TrailingBytes);
        }
        let mut doc = Document { members, flaws };
        let mut names: Vec<&str> = doc.members.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let ambiguous: Vec<String> = names
            .into_iter()
            .filter(|name| doc.get(name).is_err())
            .map(str::to_owned)
            .collect();
        doc.flaws
            .extend(ambiguous.into_iter().map(Flaw::DuplicateKey));
        Some(doc)
    }

    /// The value of member `name`: `Ok(None)` when absent, `Err` when it is given more
    /// than once with different values.
    pub fn get(&self, name: &str) -> Result<Option<&Value>, Ambiguous> {
        let mut found: Option<&Value> = None;
        for (k, v) in &self.members {
            if k != name {
                continue;
            }
            match found {
                Some(earlier) if earlier != v => return Err(Ambiguous),
                _ => found = Some(v),
            }
        }
        Ok(found)
    }

    /// The members as one map; of a name given several times, the last value.
    pub fn to_map(&self) -> Map<String, Value> {
        self.members.iter().cloned().collect()
    }

    /// Whether the answer is strict JSON.
    pub fn is_strict(&self) -> bool {
        self.flaws.is_empty()
    }
}

/// A member given more than once with different values: none of them can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ambiguous;

/// An object's members, duplicates kept (serde_json's own map keeps the last one).
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &[u8]) -> Document {
        Document::read(body, 64).expect("an object")
    }

    #[test]
    fn strict_objects_have_no_flaws() {
        let d = read(b" {\"a\":1,\"b\":\"x\"}\r\n");
        assert!(d.is_strict());
        assert_eq!(d.get("b").unwrap(), Some(&Value::from("x")));
        assert_eq!(d.get("c").unwrap(), None);
    }

    #[test]
    fn a_byte_order_mark_is_not_a_flaw() {
        let d = read(b"\xEF\xBB\xBF{\"a\":1}");
        assert!(d.is_strict());
        assert_eq!(d.get("a").unwrap(), Some(&Value::from(1)));
    }

    #[test]
    fn flaws_are_named() {
        let d = read(b"{\"a\":1} <html>");
        assert_eq!(d.flaws, vec![Flaw::TrailingBytes]);
        let d = read(b"{\"a\":1,\"b\":2,\"a\":3}");
        assert_eq!(d.flaws, vec![Flaw::DuplicateKey("a".into())]);
        assert_eq!(d.get("a"), Err(Ambiguous));
        assert_eq!(d.get("b").unwrap(), Some(&Value::from(2)));
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(100));
        let d = read(big.as_bytes());
        assert_eq!(d.flaws, vec![Flaw::OverLimit(64)]);
    }

    /// The same value twice says nothing new: not ambiguous.
    #[test]
    fn an_identical_repeat_is_not_a_flaw() {
        let d = read(b"{\"a\":\"x\",\"a\":\"x\"}");
        assert!(d.is_strict());
        assert_eq!(d.get("a").unwrap(), Some(&Value::from("x")));
    }

    #[test]
    fn non_objects_are_not_read() {
        for body in [&b""[..], b"<html>", b"[1]", b"\"x\"", b"{\"a\":", b"null"] {
            assert!(Document::read(body, 64).is_none(), "{body:?}");
        }
    }
}
