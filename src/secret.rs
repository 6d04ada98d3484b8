//! `Secret`: a string that never shows itself.
//!
//! Tokens, refresh tokens, client secrets and passwords are held in this type so that
//! `Debug`, `Display` and serialization can never leak them into logs, errors, panics or
//! `/status`. Reading the value takes an explicit [`Secret::expose`] call.

use std::fmt;

/// What a secret prints as, everywhere.
pub const REDACTED: &str = "<redacted>";

/// A secret string value; its `Debug`/`Display`/`Serialize` print [`REDACTED`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into().into_boxed_str())
    }

    /// The secret value itself. Call only where the value is sent to its rightful recipient
    /// (the token endpoint, the upstream header, the store).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the value is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the value can be sent as a token in a header exactly as it is: the one
    /// rule for static tokens, stored tokens and token-endpoint answers alike, so no
    /// request ever carries an empty or partial credential.
    pub fn check_token(&self) -> Result<(), InvalidToken> {
        let v = self.expose();
        if v.is_empty() {
            return Err(InvalidToken::Empty);
        }
        if v.contains(['\n', '\r']) {
            return Err(InvalidToken::LineBreak);
        }
        if v.chars().any(char::is_control) {
            return Err(InvalidToken::Control);
        }
        if !v.is_ascii() {
            return Err(InvalidToken::NonAscii);
        }
        if v.starts_with(' ') || v.ends_with(' ') {
            return Err(InvalidToken::Whitespace);
        }
        Ok(())
    }
}

/// Why a value cannot be used as a token (never showing the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    #[error("the token is empty")]
    Empty,
    #[error("the token contains a line break (only one trailing line break is allowed)")]
    LineBreak,
    #[error("the token contains a control character")]
    Control,
    #[error("the token contains a character that is not printable ASCII")]
    NonAscii,
    #[error("the token begins or ends with a space")]
    Whitespace,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("hunter2-value");
        assert_eq!(
            format!("{s:?} {s} {:?}", Some(&s)),
            "<redacted> <redacted> Some(<redacted>)"
        );
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "hunter2-value");
    }

    #[test]
    fn token_rule() {
        assert_eq!(Secret::new("a.b-c_~+/=").check_token(), Ok(()));
        for (bad, why) in [
            ("", InvalidToken::Empty),
            ("a\nb", InvalidToken::LineBreak),
            ("ab\r", InvalidToken::LineBreak),
            ("a\u{1}b", InvalidToken::Control),
            ("a\tb", InvalidToken::Control),
            ("tök", InvalidToken::NonAscii),
            (" ab", InvalidToken::Whitespace),
        ] {
            assert_eq!(Secret::new(bad).check_token(), Err(why), "{bad:?}");
        }
    }
}
