//! Strict parsing of token endpoint answers (RFC 6749 §5.1, §5.2).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::lenient::Document;
use crate::config::url_template::ValueRule;
use crate::config::DeadGrantAnswer;
use crate::secret::Secret;

/// The access-token part of an answer, judged usable.
#[derive(Debug)]
pub struct AccessToken {
    pub token: Secret,
    /// Lifetime from `expires_in`, or the configured default when absent.
    pub expires_in: Duration,
    /// Whether the answer stated `expires_in` (a long-lived token may have none).
    pub expires_in_stated: bool,
    pub scope: Option<String>,
}

/// A `2xx` token answer, judged in two steps. The refresh token it carries is taken
/// first: once the server has rotated, it may be the only live refresh token, so it is
/// kept (and made durable) even when the access-token part is unusable.
#[derive(Debug)]
pub struct TokenAnswer {
    /// A rotated refresh token, when the server issued one (RFC 6749 §6: absent means
    /// "keep using the one you have").
    pub refresh_token: Option<Secret>,
    /// The access-token part, or why it cannot be used.
    pub access: Result<AccessToken, TokenError>,
    /// How long the new refresh token lives, when the answer says (`refresh_expires_in`
    /// from Keycloak, `refresh_token_expires_in` from Microsoft, `x_refresh_token_expires_in`
    /// from Intuit); 0 or absent is unknown.
    pub refresh_expires_in: Option<Duration>,
    /// How long the new refresh token lives at most, when the answer says (Intuit's
    /// `x_refresh_token_hard_expires_in`, sent when the request asks for it with
    /// `x-include-refresh-token-hard-expires-in: true`); 0 or absent is unknown.
    pub refresh_hard_expires_in: Option<Duration>,
    /// The answer's extra string fields the credential keeps (`answer_fields`, e.g.
    /// Salesforce's `instance_url`); never a secret-looking one.
    pub fields: BTreeMap<String, String>,
    /// Fields of `answer_fields` the answer carried with a value not kept, and why.
    pub refused_fields: BTreeMap<String, ValueRule>,
}

/// A usable answer: both parts.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: Secret,
    pub expires_in: Duration,
    pub refresh_token: Option<Secret>,
    pub scope: Option<String>,
    /// See [`TokenAnswer::fields`].
    pub fields: BTreeMap<String, String>,
    /// See [`TokenAnswer::refused_fields`].
    pub refused_fields: BTreeMap<String, ValueRule>,
}

impl TokenAnswer {
    /// Both parts, when the access-token part is usable (the refresh token is lost
    /// otherwise: only for answers that spend nothing, e.g. `client_credentials`).
    pub fn into_response(self) -> Result<TokenResponse, TokenError> {
        let access = self.access?;
        Ok(TokenResponse {
            access_token: access.token,
            expires_in: access.expires_in,
            refresh_token: self.refresh_token,
            scope: access.scope,
            fields: self.fields,
            refused_fields: self.refused_fields,
        })
    }
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
    /// A failure that certainly spent nothing: the request never left (connect refused,
    /// DNS, a TLS handshake failure), or the server refused it without acting (429, a
    /// 4xx without an OAuth error body, `"ok": false`). Retried.
    #[error("{0}")]
    Transient(String),
    /// The request may have reached the token endpoint and no usable answer came back
    /// (timeout, reset after the request was written, 5xx, a 2xx that is unusable and
    /// carries no refresh token): it may have spent the refresh token (DESIGN.md,
    /// "in doubt").
    #[error("{0} (outcome unknown: the token endpoint may have acted on it)")]
    InDoubt(String),
    /// An answer the credential's `dead_grant_answers` name: the provider's own way of
    /// saying the refresh token (the grant) is dead, e.g. amoCRM's 401 problem+json.
    #[error("token endpoint answered {status}, which this provider uses for a dead grant{}", detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    DeadGrant { status: u16, detail: Option<String> },
}

impl TokenError {
    /// The refresh token (or code) was rejected: only a re-read of the store or a human can help.
    pub fn is_invalid_grant(&self) -> bool {
        match self {
            TokenError::OAuth { error, .. } => error == "invalid_grant",
            TokenError::DeadGrant { .. } => true,
            TokenError::Transient(_) | TokenError::InDoubt(_) => false,
        }
    }

    /// The request may have spent the refresh token without an answer saying so.
    pub fn is_in_doubt(&self) -> bool {
        matches!(self, TokenError::InDoubt(_))
    }
}

/// A token endpoint's raw answer.
pub struct Answer<'a> {
    pub status: u16,
    pub content_type: &'a str,
    pub body: &'a [u8],
}

/// The largest answer judged; real ones are a few KiB.
pub const ANSWER_LIMIT: usize = 256 * 1024;
/// The largest answer read: one over [`ANSWER_LIMIT`] is read this far only to salvage
/// the refresh token it may carry.
pub const SALVAGE_LIMIT: usize = 4 * 1024 * 1024;

/// The members of an answer that are read.
#[derive(Deserialize, Default)]
struct Raw {
    access_token: Option<serde_json::Value>,
    token_type: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<serde_json::Value>,
    /// The refresh token's lifetime under its three names (Keycloak, Microsoft, Intuit).
    refresh_expires_in: Option<serde_json::Value>,
    refresh_token_expires_in: Option<serde_json::Value>,
    x_refresh_token_expires_in: Option<serde_json::Value>,
    /// Intuit's absolute expiry of the refresh token (five years at most).
    x_refresh_token_hard_expires_in: Option<serde_json::Value>,
    scope: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
    error_description: Option<serde_json::Value>,
    /// Slack's success flag: `false` is a failure whatever else the answer says.
    ok: Option<serde_json::Value>,
    /// problem+json (RFC 9457) and amoCRM's explanation fields.
    hint: Option<serde_json::Value>,
    detail: Option<serde_json::Value>,
    title: Option<serde_json::Value>,
}

/// An answer's body as far as it could be read.
struct Body {
    raw: Raw,
    doc: Document,
}

impl Body {
    fn read(body: &[u8]) -> Option<Body> {
        let doc = Document::read(body, ANSWER_LIMIT)?;
        let raw = serde_json::from_value(serde_json::Value::Object(doc.to_map())).ok()?;
        Some(Body { raw, doc })
    }

    /// The refresh token's lifetime: the shortest one stated (0 is unknown).
    fn refresh_expires_in(&self) -> Option<Duration> {
        let r = &self.raw;
        [
            &r.refresh_expires_in,
            &r.refresh_token_expires_in,
            &r.x_refresh_token_expires_in,
        ]
        .into_iter()
        .filter_map(seconds)
        .min()
    }

    /// The refresh token's absolute expiry as a lifetime (0 is unknown).
    fn refresh_hard_expires_in(&self) -> Option<Duration> {
        seconds(&self.raw.x_refresh_token_hard_expires_in)
    }
}

/// A positive number of seconds, given as a number or a string.
fn seconds(v: &Option<serde_json::Value>) -> Option<Duration> {
    v.as_ref()
        .and_then(as_text)
        .and_then(|t| t.trim().parse::<u64>().ok())
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
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

/// Parses a token endpoint answer. `Err` when it carries nothing usable; a `2xx` JSON
/// object yields a [`TokenAnswer`] whose refresh token is taken whatever the rest says.
/// An answer matching one of `dead_grant` is [`TokenError::DeadGrant`]. Of a `2xx`
/// answer's other top-level fields, the string ones named in `keep` are kept.
/// `token_types` are the `token_type` values accepted besides Bearer (the credential's
/// `token_types`, e.g. Slack's `bot` and `user`).
pub fn parse(
    answer: &Answer<'_>,
    default_expires_in: Duration,
    dead_grant: &[DeadGrantAnswer],
    keep: &[String],
    token_types: &[String],
) -> Result<TokenAnswer, TokenError> {
    let Answer { status, body, .. } = *answer;
    let read = Body::read(body);
    let raw = read.as_ref().map(|b| &b.raw);
    let success = (200..300).contains(&status);
    // Step one: a new refresh token in a 2xx answer is never thrown away, even from an
    // answer that is not strict JSON, as long as it names one value.
    let refresh_token = match (&read, success) {
        (Some(b), true) => salvage_refresh_token(&b.doc),
        _ => None,
    };
    // A provider's own dead-grant answer, whatever its status (Zoho's is a 200); one
    // that hands over a new refresh token does not say the grant is dead.
    if refresh_token.is_none() {
        if let Some(e) = dead_grant_error(answer, raw, dead_grant) {
            return Err(e);
        }
    }
    let access = judge(
        status,
        read.as_ref(),
        body.len(),
        default_expires_in,
        token_types,
    );
    match (access, refresh_token) {
        // A 2xx means the server acted; one that is unusable and hands over no refresh
        // token leaves unknown whether it spent the presented one. `"ok": false` is a
        // refusal, not an unknown.
        (Err(TokenError::Transient(why)), None)
            if success && !raw.is_some_and(|r| r.ok == Some(serde_json::Value::Bool(false))) =>
        {
            Err(TokenError::InDoubt(why))
        }
        (Err(e), None) => Err(e),
        (access, refresh_token) => {
            let read = read.as_ref();
            let (fields, refused_fields) =
                read.map(|b| kept_fields(&b.doc, keep)).unwrap_or_default();
            Ok(TokenAnswer {
                refresh_token,
                access,
                refresh_expires_in: read.and_then(Body::refresh_expires_in),
                refresh_hard_expires_in: read.and_then(Body::refresh_hard_expires_in),
                fields,
                refused_fields,
            })
        }
    }
}

/// The string fields named in `keep` (never a secret-looking one, whatever the config
/// says), each a printable value of bounded length; and those the answer carried with a
/// value not kept, with the rule it broke (`null` counts as absent).
fn kept_fields(
    doc: &Document,
    keep: &[String],
) -> (BTreeMap<String, String>, BTreeMap<String, ValueRule>) {
    use crate::config::url_template::{check_value, secret_looking};
    let mut kept = BTreeMap::new();
    let mut refused = BTreeMap::new();
    for name in keep.iter().filter(|name| !secret_looking(name)) {
        let judged = match doc.get(name) {
            Ok(None | Some(serde_json::Value::Null)) => continue,
            Ok(Some(serde_json::Value::String(v))) => check_value(v).map(|()| v.clone()),
            Ok(Some(_)) => Err(ValueRule::NotAString),
            Err(_) => Err(ValueRule::Ambiguous),
        };
        match judged {
            Ok(v) => {
                kept.insert(name.clone(), v);
            }
            Err(rule) => {
                refused.insert(name.clone(), rule);
            }
        }
    }
    (kept, refused)
}

/// The dead-grant error for an answer one of the rules names, with the provider's short
/// explanation when it gives one (never the body itself).
fn dead_grant_error(
    answer: &Answer<'_>,
    raw: Option<&Raw>,
    rules: &[DeadGrantAnswer],
) -> Option<TokenError> {
    let error = raw.and_then(|r| r.error.as_ref()).and_then(as_text);
    if !rules.iter().any(|r| {
        r.matches(
            answer.status,
            answer.content_type,
            answer.body,
            error.as_deref(),
        )
    }) {
        return None;
    }
    let detail = raw.and_then(|r| {
        [&r.hint, &r.error_description, &r.detail, &r.title, &r.error]
            .into_iter()
            .find_map(|v| v.as_ref().and_then(as_text))
            .map(|d| clean(&d))
    });
    Some(TokenError::DeadGrant {
        status: answer.status,
        detail,
    })
}

/// The refresh token of an answer: one non-empty string, whatever else is wrong with it.
/// Two different values name no token: neither can be trusted to be the live one.
fn salvage_refresh_token(doc: &Document) -> Option<Secret> {
    match doc.get("refresh_token") {
        Ok(Some(serde_json::Value::String(s))) if !s.is_empty() => Some(Secret::new(s.clone())),
        _ => None,
    }
}

/// Step two: the status, the OAuth error and the access-token part.
fn judge(
    status: u16,
    read: Option<&Body>,
    body_len: usize,
    default_expires_in: Duration,
    token_types: &[String],
) -> Result<AccessToken, TokenError> {
    if let Some(Body { raw, .. }) = read {
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
    if status >= 500 {
        return Err(TokenError::InDoubt(format!(
            "token endpoint answered {status}"
        )));
    }
    if status == 429 {
        return Err(TokenError::Transient(format!(
            "token endpoint answered {status}"
        )));
    }
    if !(200..300).contains(&status) {
        return Err(TokenError::Transient(format!(
            "token endpoint answered {status} without an OAuth error body"
        )));
    }
    if read.is_some_and(|b| b.raw.ok == Some(serde_json::Value::Bool(false))) {
        return Err(TokenError::Transient(format!(
            "token endpoint answered {status} with \"ok\": false"
        )));
    }
    let Some(Body { raw, doc }) = read else {
        return Err(TokenError::Transient(format!(
            "token endpoint answered {status} with a body that is not a JSON object ({body_len} bytes)"
        )));
    };
    if !doc.is_strict() {
        let flaws: Vec<String> = doc.flaws.iter().map(ToString::to_string).collect();
        return Err(TokenError::Transient(format!(
            "token endpoint answered {status} with a body that is not strict JSON: {}",
            flaws.join("; ")
        )));
    }
    let token = access_token(raw)?;
    check_token_type(raw, token_types)?;
    let expires_in = expires_in(raw, default_expires_in)?;
    if matches!(&raw.refresh_token, Some(v) if !v.is_string() && !v.is_null()) {
        return Err(TokenError::Transient(
            "refresh_token is not a string".into(),
        ));
    }
    Ok(AccessToken {
        token: Secret::new(token),
        expires_in,
        expires_in_stated: !matches!(raw.expires_in, None | Some(serde_json::Value::Null)),
        scope: raw.scope.as_ref().and_then(as_text),
    })
}

fn access_token(raw: &Raw) -> Result<String, TokenError> {
    let token = match &raw.access_token {
        // Empty and blank strings are refused by the token check below, with the rest.
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(TokenError::Transient(
                "token endpoint answered with a non-string access_token".into(),
            ))
        }
        None => {
            return Err(TokenError::Transient(
                "token endpoint answer has no access_token".into(),
            ))
        }
    };
    Secret::new(token.as_str())
        .check_token()
        .map_err(|e| TokenError::Transient(format!("access_token is unusable: {e}")))?;
    Ok(token)
}

/// RFC 6749 §7.1: the client must understand the type. Absent is tolerated as several
/// providers omit it; anything but bearer (any case, RFC 6750) or one of `accepted` (the
/// credential's `token_types`: types a provider documents for tokens used like bearer
/// tokens, e.g. Slack's `bot`) is refused.
fn check_token_type(raw: &Raw, accepted: &[String]) -> Result<(), TokenError> {
    match &raw.token_type {
        None => Ok(()),
        Some(tt) => match tt.as_str() {
            Some(t)
                if t.eq_ignore_ascii_case("bearer")
                    || accepted.iter().any(|a| a.eq_ignore_ascii_case(t)) =>
            {
                Ok(())
            }
            _ => Err(TokenError::Transient(format!(
                "token_type {} is not supported (only Bearer{})",
                tt.as_str()
                    .map(clean)
                    .unwrap_or_else(|| "non-string".into()),
                accepted
                    .iter()
                    .map(|a| format!(", {a}"))
                    .collect::<String>()
            ))),
        },
    }
}

fn expires_in(raw: &Raw, default: Duration) -> Result<Duration, TokenError> {
    match &raw.expires_in {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => match as_text(v).and_then(|s| s.trim().parse::<f64>().ok()) {
            Some(secs) if secs.is_finite() && secs >= 1.0 => {
                Ok(Duration::from_secs_f64(secs.min(1e9)))
            }
            _ => Err(TokenError::Transient(
                "expires_in is not a positive number of seconds".into(),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(3600);

    fn p(status: u16, body: &[u8], default: Duration) -> Result<TokenAnswer, TokenError> {
        let answer = Answer {
            status,
            content_type: "application/json",
            body,
        };
        parse(&answer, default, &[], &[], &[])
    }

    /// Only named, non-secret string fields are kept, whatever else the answer holds
    /// and whether or not its access-token part is usable.
    #[test]
    fn keeps_named_string_fields_only() {
        let keep: Vec<String> = ["instance_url", "api_domain", "access_token", "n", "ctl"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let body = br#"{"access_token":"a","refresh_token":"r","instance_url":"https://na1.example.com","id":"https://login/id/1","n":7,"ctl":"a\nb"}"#;
        let answer = Answer {
            status: 200,
            content_type: "application/json",
            body,
        };
        let a = parse(&answer, D, &[], &keep, &[]).unwrap();
        assert_eq!(
            a.fields.into_iter().collect::<Vec<_>>(),
            vec![(
                "instance_url".to_string(),
                "https://na1.example.com".to_string()
            )]
        );
        // Named fields with a value not kept are reported with the rule (a secret-looking
        // name is not even looked at).
        assert_eq!(
            a.refused_fields.into_iter().collect::<Vec<_>>(),
            vec![
                ("ctl".to_string(), ValueRule::ControlCharacters),
                ("n".to_string(), ValueRule::NotAString)
            ]
        );
        let body =
            br#"{"refresh_token":"r","expires_in":0,"api_domain":"https://www.zohoapis.eu"}"#;
        let answer = Answer { body, ..answer };
        let a = parse(&answer, D, &[], &keep, &[]).unwrap();
        assert!(a.access.is_err());
        assert_eq!(a.fields["api_domain"], "https://www.zohoapis.eu");
        assert!(parse(&answer, D, &[], &[], &[]).unwrap().fields.is_empty());
    }

    #[test]
    fn refresh_token_lifetime_fields() {
        for (field, want) in [
            ("refresh_expires_in", Some(1800)),
            ("refresh_token_expires_in", Some(7776000)),
            ("x_refresh_token_expires_in", Some(8726400)),
        ] {
            let n = want.unwrap();
            let body = format!(r#"{{"access_token":"a","refresh_token":"r","{field}":{n}}}"#);
            let a = p(200, body.as_bytes(), D).unwrap();
            assert_eq!(
                a.refresh_expires_in,
                want.map(Duration::from_secs),
                "{field}"
            );
        }
        // Keycloak's offline tokens say 0: unknown, not expired.
        let a = p(
            200,
            br#"{"access_token":"a","refresh_token":"r","refresh_expires_in":0}"#,
            D,
        )
        .unwrap();
        assert_eq!(a.refresh_expires_in, None);
        // Intuit's hard expiry is read apart from the rolling one.
        let a = p(
            200,
            br#"{"access_token":"a","refresh_token":"r","x_refresh_token_expires_in":8726400,"x_refresh_token_hard_expires_in":"157680000"}"#,
            D,
        )
        .unwrap();
        assert_eq!(a.refresh_expires_in, Some(Duration::from_secs(8726400)));
        assert_eq!(
            a.refresh_hard_expires_in,
            Some(Duration::from_secs(157680000))
        );
    }

    /// amoCRM answers a revoked or reused refresh token with 401 problem+json; with the
    /// rule configured that is a dead grant, without it a transient failure.
    #[test]
    fn dead_grant_answers_are_recognised() {
        let body = br#"{"hint":"Token has been revoked","title":"Unauthorized","type":"https://httpstatus.es/401","status":401,"detail":"The refresh token is invalid."}"#;
        let answer = Answer {
            status: 401,
            content_type: "application/problem+json",
            body,
        };
        let rules = [DeadGrantAnswer {
            status: Some(401),
            content_type: Some("application/problem+json".into()),
            ..Default::default()
        }];
        let e = parse(&answer, D, &rules, &[], &[]).unwrap_err();
        assert!(e.is_invalid_grant(), "{e}");
        assert_eq!(
            e.to_string(),
            "token endpoint answered 401, which this provider uses for a dead grant: Token has been revoked"
        );
        let e = parse(&answer, D, &[], &[], &[]).unwrap_err();
        assert!(!e.is_invalid_grant(), "{e}");
    }

    #[test]
    fn accepts_standard_and_lenient_forms() {
        let r = p(
            200,
            br#"{"access_token":"a","token_type":"bearer","expires_in":"120","refresh_token":"r"}"#,
            D,
        )
        .unwrap()
        .into_response()
        .unwrap();
        assert_eq!(r.expires_in, Duration::from_secs(120));
        assert_eq!(r.refresh_token.unwrap().expose(), "r");
        let r = p(200, br#"{"access_token":"a","token_type":"Bearer"}"#, D)
            .unwrap()
            .into_response()
            .unwrap();
        assert_eq!(r.expires_in, D);
        assert!(r.refresh_token.is_none());
    }

    /// A 2xx that is unusable and hands over no refresh token may have spent the
    /// presented one: in doubt. A 5xx is in doubt too; a 429, a 4xx without an OAuth
    /// error and `"ok": false` are refusals.
    #[test]
    fn garbage_is_in_doubt_and_never_echoed() {
        for body in [
            &b"<html>oops secret-xyz</html>"[..],
            b"",
            br#"{"token_type":"Bearer"}"#,
            br#"{"access_token":""}"#,
            br#"{"access_token":"  "}"#,
            br#"{"access_token":"\t"}"#,
        ] {
            let e = p(200, body, D).unwrap_err();
            assert!(e.is_in_doubt(), "{e}");
            assert!(!e.to_string().contains("secret-xyz"));
        }
        for status in [500, 502, 503, 504] {
            assert!(p(status, b"<html>busy</html>", D)
                .unwrap_err()
                .is_in_doubt());
        }
        for (status, body) in [
            (429, &b"slow down"[..]),
            (404, b"<html>not found</html>"),
            (200, br#"{"ok":false}"#),
            (400, br#"{"error":"invalid_client"}"#),
        ] {
            let e = p(status, body, D).unwrap_err();
            assert!(!e.is_in_doubt(), "{status}: {e}");
        }
        assert!(p(200, br#"{"access_token":"a","token_type":"mac"}"#, D).is_err());
        assert!(p(200, br#"{"access_token":"a","refresh_token":7}"#, D).is_err());
    }

    /// A 2xx answer's new refresh token survives whatever is wrong with the rest.
    #[test]
    fn refresh_token_is_taken_before_the_rest_is_judged() {
        for rest in [
            r#""access_token":"a","expires_in":0"#,
            r#""access_token":"a","expires_in":-5"#,
            r#""access_token":"a","expires_in":"soon""#,
            r#""access_token":"a","token_type":"mac""#,
            r#""expires_in":60"#,
            r#""access_token":"""#,
            r#""access_token":"two\nlines""#,
            r#""error":"server_error""#,
        ] {
            let body = format!(r#"{{"refresh_token":"r2",{rest}}}"#);
            let answer = p(200, body.as_bytes(), D).unwrap();
            assert_eq!(answer.refresh_token.unwrap().expose(), "r2", "{rest}");
            let e = answer.access.unwrap_err();
            assert!(!e.to_string().contains("r2"), "{e}");
        }
        // Not a 2xx, or an empty refresh token: nothing to keep.
        assert!(p(400, br#"{"refresh_token":"r2","error":"invalid_grant"}"#, D).is_err());
        assert!(p(200, br#"{"refresh_token":"","expires_in":0}"#, D).is_err());
    }

    /// A 200 that is not strict JSON: its one refresh token is taken, the access-token
    /// part refused naming the flaw; a byte-order mark is no flaw.
    #[test]
    fn refresh_token_is_salvaged_from_answers_that_are_not_strict_json() {
        let good = r#"{"access_token":"a","expires_in":60,"refresh_token":"r2"}"#;
        let padded = format!(
            r#"{{"pad":"{}","access_token":"a","refresh_token":"r2"}}"#,
            "x".repeat(ANSWER_LIMIT)
        );
        for (body, flaw) in [
            (format!("{good} trailing"), "bytes follow"),
            (
                r#"{"expires_in":1,"access_token":"a","expires_in":60,"refresh_token":"r2"}"#
                    .to_string(),
                "\"expires_in\" appears twice",
            ),
            (padded, "larger than"),
        ] {
            let answer = p(200, body.as_bytes(), D).unwrap();
            assert_eq!(answer.refresh_token.unwrap().expose(), "r2", "{flaw}");
            let e = answer.access.unwrap_err().to_string();
            assert!(e.contains("not strict JSON") && e.contains(flaw), "{e}");
            assert!(!e.contains("r2"), "{e}");
        }
        let bom = format!("\u{feff}{good}");
        let r = p(200, bom.as_bytes(), D).unwrap().into_response().unwrap();
        assert_eq!(r.refresh_token.unwrap().expose(), "r2");
        // Two different refresh tokens: neither is trusted.
        let two = br#"{"refresh_token":"r2","access_token":"a","refresh_token":"r3"}"#;
        assert!(p(200, two, D).is_err());
        // The same one twice is one.
        let same = br#"{"refresh_token":"r2","access_token":"a","refresh_token":"r2"}"#;
        let r = p(200, same, D).unwrap().into_response().unwrap();
        assert_eq!(r.refresh_token.unwrap().expose(), "r2");
    }

    /// Real answers carry long JWTs (Entra ID and Keycloak tokens run to several KiB):
    /// an answer of up to the limit is judged whole; one byte more is not strict JSON,
    /// and its refresh token is still kept.
    #[test]
    fn answers_up_to_the_limit_are_judged_whole() {
        let long_jwt = "e".repeat(16 * 1024);
        let real = format!(r#"{{"access_token":"{long_jwt}","expires_in":60}}"#);
        let r = p(200, real.as_bytes(), D).unwrap().into_response().unwrap();
        assert_eq!(r.access_token.expose(), long_jwt);
        let frame = r#"{"access_token":"","expires_in":60,"refresh_token":"r2"}"#;
        let jwt = "e".repeat(ANSWER_LIMIT - frame.len());
        let at_limit =
            format!(r#"{{"access_token":"{jwt}","expires_in":60,"refresh_token":"r2"}}"#);
        assert_eq!(at_limit.len(), ANSWER_LIMIT);
        let r = p(200, at_limit.as_bytes(), D)
            .unwrap()
            .into_response()
            .unwrap();
        assert_eq!(r.access_token.expose().len(), jwt.len());
        assert_eq!(r.expires_in, Duration::from_secs(60));
        let over = format!(r#"{{"access_token":"{jwt}e","expires_in":60,"refresh_token":"r2"}}"#);
        let answer = p(200, over.as_bytes(), D).unwrap();
        assert_eq!(answer.refresh_token.unwrap().expose(), "r2");
        let e = answer.access.unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }

    /// Two names for the refresh token's lifetime: the shorter one holds.
    #[test]
    fn two_names_for_the_refresh_lifetime_take_the_shorter() {
        let body = br#"{"access_token":"a","refresh_token":"r","refresh_expires_in":1800,"refresh_token_expires_in":7776000}"#;
        let a = p(200, body, D).unwrap();
        assert_eq!(a.refresh_expires_in, Some(Duration::from_secs(1800)));
        assert!(a.access.is_ok());
    }

    /// Errors carried in 2xx answers: an `error` field or `"ok": false` is a failure,
    /// and a dead-grant rule may name a 200.
    #[test]
    fn errors_in_2xx_answers() {
        let e = p(200, br#"{"error":"invalid_code"}"#, D).unwrap_err();
        assert!(!e.is_invalid_grant(), "no rule names it: {e}");
        let e = p(200, br#"{"ok":false,"access_token":"a"}"#, D).unwrap_err();
        assert!(e.to_string().contains("\"ok\": false"), "{e}");
        let rules = [DeadGrantAnswer {
            status: Some(200),
            error: Some("invalid_code".into()),
            ..Default::default()
        }];
        let answer = Answer {
            status: 200,
            content_type: "application/json;charset=UTF-8",
            body: br#"{"error":"invalid_code"}"#,
        };
        let e = parse(&answer, D, &rules, &[], &[]).unwrap_err();
        assert!(e.is_invalid_grant(), "{e}");
        assert!(e.to_string().contains("invalid_code"), "{e}");
        // A new refresh token in it is kept, and the grant is not taken as dead.
        let answer = Answer {
            body: br#"{"error":"invalid_code","refresh_token":"r2"}"#,
            ..answer
        };
        let a = parse(&answer, D, &rules, &[], &[]).unwrap();
        assert_eq!(a.refresh_token.unwrap().expose(), "r2");
        assert!(!a.access.unwrap_err().is_invalid_grant());
    }

    /// `token_type` values other than Bearer are accepted only where the credential names
    /// them (Slack's `bot` and `user`), in any case; others stay refused, and the refresh
    /// token of a refused answer is still taken.
    #[test]
    fn token_types_named_by_the_credential_are_accepted() {
        let slack = br#"{"ok":true,"access_token":"xoxe.xoxb-1","token_type":"bot","expires_in":43200,"refresh_token":"xoxe-1-r2"}"#;
        let answer = |body: &'static [u8]| Answer {
            status: 200,
            content_type: "application/json; charset=utf-8",
            body,
        };
        let slack_types = ["bot".to_string(), "user".to_string()];

        let a = parse(&answer(slack), D, &[], &[], &[]).unwrap();
        assert_eq!(a.refresh_token.as_ref().unwrap().expose(), "xoxe-1-r2");
        let e = a.access.unwrap_err();
        assert!(matches!(e, TokenError::Transient(_)), "{e}");
        assert!(e.to_string().contains("token_type bot"), "{e}");

        let r = parse(&answer(slack), D, &[], &[], &slack_types)
            .unwrap()
            .into_response()
            .unwrap();
        assert_eq!(r.access_token.expose(), "xoxe.xoxb-1");
        assert_eq!(r.expires_in, Duration::from_secs(43200));
        assert_eq!(r.refresh_token.unwrap().expose(), "xoxe-1-r2");
        for body in [
            &br#"{"access_token":"a","token_type":"User"}"#[..],
            br#"{"access_token":"a","token_type":"BEARER"}"#,
        ] {
            let answer = Answer {
                body,
                ..answer(b"")
            };
            assert!(parse(&answer, D, &[], &[], &slack_types)
                .unwrap()
                .access
                .is_ok());
        }
        let mac = Answer {
            body: br#"{"access_token":"a","token_type":"mac"}"#,
            ..answer(b"")
        };
        let e = parse(&mac, D, &[], &[], &slack_types).unwrap_err();
        assert!(e.to_string().contains("only Bearer, bot, user"), "{e}");
    }

    /// Slack answers errors with HTTP 200 and `"ok": false`; a revoked refresh token
    /// (`invalid_refresh_token`) is a dead grant only where a rule names it.
    #[test]
    fn slack_errors_in_200_answers() {
        let answer = Answer {
            status: 200,
            content_type: "application/json; charset=utf-8",
            body: br#"{"ok":false,"error":"invalid_refresh_token"}"#,
        };
        let types = ["bot".to_string()];
        let e = parse(&answer, D, &[], &[], &types).unwrap_err();
        assert!(!e.is_invalid_grant(), "{e}");
        assert!(!e.is_in_doubt(), "{e}");
        let rules = [DeadGrantAnswer {
            error: Some("invalid_refresh_token".into()),
            ..Default::default()
        }];
        let e = parse(&answer, D, &rules, &[], &types).unwrap_err();
        assert!(e.is_invalid_grant(), "{e}");
        assert!(e.to_string().contains("invalid_refresh_token"), "{e}");
    }

    #[test]
    fn oauth_errors() {
        let e = p(
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
        assert!(!p(503, b"busy", D).unwrap_err().is_invalid_grant());
    }
}
