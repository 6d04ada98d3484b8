//! What a sink file holds, per format: pure functions of the token, unit-tested.

use std::time::SystemTime;

use serde::Serialize;

use crate::config::SinkFormat;
use crate::secret::Secret;

/// The token facts a sink file is made of (never the refresh token: it has none).
pub(crate) struct Snapshot {
    pub token: Secret,
    pub generation: u64,
    /// `None` when the expiry is unknown (static tokens, long-lived stored tokens).
    pub expires_at: Option<SystemTime>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("token", &self.token)
            .field("generation", &self.generation)
            .finish()
    }
}

/// Why a token cannot be written in a format (never showing the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("the token has characters an env file cannot hold unquoted (RFC 6750 allows letters, digits and -._~+/=); use format raw or json")]
    NotEnvSafe,
}

/// The json format, in the documented key order.
#[derive(Serialize)]
struct JsonSink<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_at: Option<String>,
}

fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

/// The file content of `s` in `format`.
pub(crate) fn render(format: SinkFormat, s: &Snapshot) -> Result<Vec<u8>, RenderError> {
    let token = s.token.expose();
    let mut out = match format {
        SinkFormat::Raw => token.as_bytes().to_vec(),
        SinkFormat::Json => serde_json::to_vec(&JsonSink {
            access_token: token,
            token_type: "Bearer",
            expires_at: rfc3339(s.expires_at),
        })
        .expect("a string map serializes"),
        SinkFormat::Env => {
            // RFC 6750's b64token: nothing a shell, systemd or docker --env-file reads
            // differently unquoted.
            let safe = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
            if !token.chars().all(safe) {
                return Err(RenderError::NotEnvSafe);
            }
            format!(
                "ACCESS_TOKEN={token}\nACCESS_TOKEN_EXPIRES_AT={}",
                rfc3339(s.expires_at).unwrap_or_default()
            )
            .into_bytes()
        }
    };
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn snapshot(token: &str, expires: Option<u64>) -> Snapshot {
        Snapshot {
            token: Secret::new(token),
            generation: 7,
            expires_at: expires.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        }
    }

    fn text(format: SinkFormat, s: &Snapshot) -> String {
        String::from_utf8(render(format, s).unwrap()).unwrap()
    }

    #[test]
    fn each_format_holds_the_token_and_its_expiry() {
        let s = snapshot("eyJ.a-b_c~d+e/f=", Some(1_800_000_000));
        assert_eq!(text(SinkFormat::Raw, &s), "eyJ.a-b_c~d+e/f=\n");
        assert_eq!(
            text(SinkFormat::Json, &s),
            "{\"access_token\":\"eyJ.a-b_c~d+e/f=\",\"token_type\":\"Bearer\",\"expires_at\":\"2027-01-15T08:00:00Z\"}\n"
        );
        assert_eq!(
            text(SinkFormat::Env, &s),
            "ACCESS_TOKEN=eyJ.a-b_c~d+e/f=\nACCESS_TOKEN_EXPIRES_AT=2027-01-15T08:00:00Z\n"
        );
    }

    #[test]
    fn an_unknown_expiry_is_null_or_empty() {
        let s = snapshot("tok", None);
        let json: serde_json::Value =
            serde_json::from_slice(&render(SinkFormat::Json, &s).unwrap()).unwrap();
        assert_eq!(json["expires_at"], serde_json::Value::Null);
        assert!(text(SinkFormat::Env, &s).ends_with("\nACCESS_TOKEN_EXPIRES_AT=\n"));
    }

    #[test]
    fn json_escapes_and_env_refuses_what_a_shell_would_read_otherwise() {
        let s = snapshot("a\"b\\c $(id) `x`", None);
        let json: serde_json::Value =
            serde_json::from_slice(&render(SinkFormat::Json, &s).unwrap()).unwrap();
        assert_eq!(json["access_token"], "a\"b\\c $(id) `x`");
        assert_eq!(render(SinkFormat::Env, &s), Err(RenderError::NotEnvSafe));
        assert!(!RenderError::NotEnvSafe.to_string().contains("$(id)"));
        assert!(!format!("{s:?}").contains("$(id)"));
    }
}
