//! Human units in the config file: durations (`30s`, `5m`, `1h30m`, `250ms`) and byte
//! sizes (`64KiB`, `1MiB`, `65536`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written as `30s`, `5m`, `1h30m` or `250ms`; a bare integer means seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

/// A byte size written as `64KiB`, `1MiB`, `10KB` or a bare integer of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A duration or size the config cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid duration {input:?} ({reason}); use forms like 30s, 5m, 1h30m, 250ms")]
    Duration { input: String, reason: String },
    #[error("invalid size {0:?}; use forms like 64KiB, 1MiB, 65536")]
    Size(String),
}

/// Parses `30s`, `5m`, `1h 30m`, `250ms`; bare digits are seconds.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let t = s.trim();
    let bad = |reason: String| UnitError::Duration {
        input: s.to_string(),
        reason,
    };
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| bad(e.to_string()));
    }
    humantime::parse_duration(t).map_err(|e| bad(e.to_string()))
}

/// Parses `64KiB`, `1MiB`, `2GiB`, `10KB`, `512B` or a bare byte count.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || UnitError::Size(s.to_string());
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// Formats a duration the way the config accepts it back.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

struct UnitVisitor<F>(F, &'static str);

impl<T, F: Fn(&str) -> Result<T, UnitError>> Visitor<'_> for UnitVisitor<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v < 0 {
            return Err(E::custom(format!("{v} must not be negative")));
        }
        self.visit_u64(v as u64)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor(
            |s: &str| parse_duration(s).map(HumanDuration),
            "a duration such as 30s or 5m",
        ))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor(
            |s: &str| parse_size(s).map(ByteSize),
            "a size such as 64KiB",
        ))
    }
}

impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        let text = match n {
            0 => "0".to_string(),
            n if n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
            n if n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
            n if n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
            n => n.to_string(),
        };
        s.serialize_str(&text)
    }
}

/// Written as a string with units (`30s`, `5m`, `1h30m`, `7d`, `250ms`; humantime's forms)
/// or a number of seconds.
impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "a duration such as 30s, 5m, 1h, 7d or 250ms, or a number of seconds",
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "integer", "minimum": 0}
            ]
        })
    }
}

/// Written as a string with a unit (`64KiB`, `1MiB`) or a number of bytes.
impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "a size such as 64KiB or 1MiB, or a number of bytes",
            "anyOf": [
                {"type": "string", "pattern": "^\\s*[0-9]+\\s*(B|KiB|MiB|GiB|KB|kB|MB|GB)?\\s*$"},
                {"type": "integer", "minimum": 0}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("12").unwrap(), Duration::from_secs(12));
        assert!(parse_duration("soon")
            .unwrap_err()
            .to_string()
            .contains("\"soon\""));
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("10KB").unwrap(), 10_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("64 parsecs").is_err());
        assert!(parse_size("KiB").is_err());
    }
}
