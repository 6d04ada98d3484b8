//! Strict parsing of token endpoint answers (RFC 6749 §5.1, §5.2).

use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// A usable token answer.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: Secret,
    /// Lifetime from `expires_in`, or the configured default when absent.
    pub expires_in: Duration,
    /// A rotated refresh token, when the server issued one (RFC 6749 §6: absent means
    /// "keep using the one you have").
    pub refresh_token: Option<Secret>,
    pub scope: Option<String>,
}

/// Why a token request did not yield a token. Messages never include token values.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The server answered an OAuth error (`invalid_grant`, `invalid_client`, ...).
    #[error("token endpoint answered {status} {error}{}", description.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    OAuth {
        status: u16,
        error: String,
        description: Option<String>,
    },
    /// Network failure, timeout, 5xx, or a reply that is not a usable token; retried.
    #[error("{0}")]
    Transient(String),
}

impl TokenError {
    /// The refresh token (or code) was rejected: only a re-read of the store or a human can help.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, TokenError::OAuth { error, .. } if error == "invalid_grant")
    }
}

#[derive(Deserialize)]
struct Raw {
    access_token: Option<serde_json::Value>,
    token_type: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<serde_json::Value>,
    scope: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
    error_description: Option<serde_json::Value>,
}

fn as_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Keeps a server-provided description printable and short.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// Parses a token endpoint answer given its HTTP status and body.
pub fn parse(
    status: u16,
    body: &[u8],
    default_expires_in: Duration,
) -> Result<TokenResponse, TokenError> {
    let raw: Option<Raw> = serde_json::from_slice(body).ok();
    if let Some(raw) = &raw {
        if let Some(err) = raw.error.as_ref().and_then(as_text) {
            return Err(TokenError::OAuth {
                status,
                error: clean(&err),
                description: raw
                    .error_description
                    .as_ref()
                    .and_then(as_text)
                    .map(|d| clean(&d)),
            });
        }
    }
    if status == 429 || status >= 500 {
        return Err(TokenError::Transient(format!(
            "token endpoint answered {status}"
        )));
    }
    if !(200..300).contains(&status) {
        return Err(TokenError::Transient(format!(
            "token endpoint answered {status} without an OAuth error body"
        )));
    }
    let Some(raw) = raw else {
        return Err(TokenError::Transient(format!(
            "token endpoint answered {status} with a body that is not JSON ({} bytes)",
            body.len()
        )));
    };
    let access_token = match raw.access_token {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s,
        Some(_) => {
            return Err(TokenError::Transient(
                "token endpoint answered with an empty or non-string access_token".into(),
            ))
        }
        None => {
            return Err(TokenError::Transient(
                "token endpoint answer has no access_token".into(),
            ))
        }
    };
    if http::HeaderValue::from_str(&access_token).is_err() {
        return Err(TokenError::Transient(
            "access_token contains characters not allowed in a header".into(),
        ));
    }
    // RFC 6749 §7.1: the client must understand the type. Absent is tolerated as
    // several providers omit it; anything but bearer (any case, RFC 6750) is refused.
    if let Some(tt) = &raw.token_type {
        match tt.as_str() {
            Some(t) if t.eq_ignore_ascii_case("bearer") => {}
            _ => {
                return Err(TokenError::Transient(format!(
                    "token_type {} is not supported (only Bearer)",
                    tt.as_str()
                        .map(clean)
                        .unwrap_or_else(|| "non-string".into())
                )))
            }
        }
    }
    // Some providers send expires_in as a string; accept "3600" as well as 3600.
    let expires_in = match &raw.expires_in {
        None | Some(serde_json::Value::Null) => default_expires_in,
        Some(v) => match as_text(v).and_then(|s| s.trim().parse::<f64>().ok()) {
            Some(secs) if secs.is_finite() && secs >= 1.0 => Duration::from_secs_f64(secs.min(1e9)),
            _ => {
                return Err(TokenError::Transient(
                    "expires_in is not a positive number of seconds".into(),
                ))
            }
        },
    };
    let refresh_token = match raw.refresh_token {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(Secret::new(s)),
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(_)) => None,
        Some(_) => {
            return Err(TokenError::Transient(
                "refresh_token is not a string".into(),
            ))
        }
    };
    Ok(TokenResponse {
        access_token: Secret::new(access_token),
        expires_in,
        refresh_token,
        scope: raw.scope.as_ref().and_then(as_text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(3600);

    #[test]
    fn accepts_standard_and_lenient_forms() {
        let r = parse(
            200,
            br#"{"access_token":"a","token_type":"bearer","expires_in":"120","refresh_token":"r"}"#,
            D,
        )
        .unwrap();
        assert_eq!(r.expires_in, Duration::from_secs(120));
        assert_eq!(r.refresh_token.unwrap().expose(), "r");
        let r = parse(200, br#"{"access_token":"a","token_type":"Bearer"}"#, D).unwrap();
        assert_eq!(r.expires_in, D);
        assert!(r.refresh_token.is_none());
    }

    #[test]
    fn garbage_is_transient_and_never_echoed() {
        for body in [
            &b"<html>oops secret-xyz</html>"[..],
            b"",
            br#"{"token_type":"Bearer"}"#,
            br#"{"access_token":""}"#,
        ] {
            let e = parse(200, body, D).unwrap_err();
            assert!(matches!(e, TokenError::Transient(_)), "{e}");
            assert!(!e.to_string().contains("secret-xyz"));
        }
        assert!(parse(200, br#"{"access_token":"a","token_type":"mac"}"#, D).is_err());
    }

    #[test]
    fn oauth_errors() {
        let e = parse(
            400,
            br#"{"error":"invalid_grant","error_description":"expired"}"#,
            D,
        )
        .unwrap_err();
        assert!(e.is_invalid_grant());
        assert_eq!(
            e.to_string(),
            "token endpoint answered 400 invalid_grant: expired"
        );
        assert!(!parse(503, b"busy", D).unwrap_err().is_invalid_grant());
    }
}
