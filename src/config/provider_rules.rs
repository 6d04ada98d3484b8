//! Credential keys that adapt tokenrelay to a provider's non-standard behaviour (set by a
//! preset or by hand): the token request's shape, the refresh-token rules, and the
//! answers that mean the grant is dead.

use serde::{Deserialize, Serialize};

use super::units::HumanDuration;
use super::Problems;

/// HTTP method of token requests.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TokenMethod {
    #[default]
    Post,
    /// Parameters in the query string (Bitrix24).
    Get,
}

/// Where token request parameters go.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ParamsIn {
    #[default]
    Body,
    /// In the URL's query string (Bitrix24's GET, Zoho's POST). Such URLs are never logged
    /// with their query.
    Query,
}

/// When a credential's access token is refreshed.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RefreshMode {
    /// Before the access token expires (`refresh_at`, `refresh_before`), so requests never
    /// wait for a refresh.
    #[default]
    Proactive,
    /// Only when a request finds no fresh token (or the upstream rejects it), and before
    /// the refresh token would die unused (its idle lifetime): for providers that call
    /// regular refreshes excessive (Bitrix24). A request after a quiet time waits for one
    /// token request.
    OnDemand,
}

/// A refresh rate limit: at most `count` refreshes per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub count: u32,
    pub per: HumanDuration,
}

/// A token-endpoint answer that means the refresh token (the grant) is dead, beyond
/// RFC 6749's `invalid_grant`. Every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadGrantAnswer {
    pub status: Option<u16>,
    /// The OAuth `error` code.
    pub error: Option<String>,
    /// Text the body contains (e.g. amoCRM's "Token has been revoked").
    pub body_contains: Option<String>,
    /// The media type starts with this (e.g. `application/problem+json`).
    pub content_type: Option<String>,
}

impl DeadGrantAnswer {
    /// Whether an answer with this status, media type and body matches.
    pub fn matches(
        &self,
        status: u16,
        content_type: &str,
        body: &[u8],
        error: Option<&str>,
    ) -> bool {
        self.status.is_none_or(|s| s == status)
            && self.error.as_deref().is_none_or(|e| Some(e) == error)
            && self.content_type.as_deref().is_none_or(|t| {
                content_type
                    .to_ascii_lowercase()
                    .starts_with(&t.to_ascii_lowercase())
            })
            && self
                .body_contains
                .as_deref()
                .is_none_or(|needle| String::from_utf8_lossy(body).contains(needle))
    }

    fn is_empty(&self) -> bool {
        self == &DeadGrantAnswer::default()
    }
}

/// What is known about the credential's refresh tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefreshTokenRules {
    /// Each refresh issues a new, single-use refresh token (the safe assumption).
    pub rotating: bool,
    /// It dies if unused this long.
    pub idle_lifetime: Option<HumanDuration>,
    /// It dies this long after the authorization, whatever happens.
    pub absolute_lifetime: Option<HumanDuration>,
    pub rate_limit: Option<RateLimit>,
    /// The provider refuses to refresh tokens younger than this.
    pub min_token_age: Option<HumanDuration>,
}

/// Validates the dead-grant rules: each must say something.
pub(super) fn check_dead_grant(p: &mut Problems, path: &str, rules: &[DeadGrantAnswer]) {
    for (i, r) in rules.iter().enumerate() {
        if r.is_empty() {
            p.add(
                &format!("{path}.dead_grant_answers[{i}]"),
                "give at least one of status, error, body_contains, content_type",
            );
        }
    }
}

/// Validates a rate limit.
pub(super) fn check_rate_limit(p: &mut Problems, path: &str, r: &Option<RateLimit>) {
    if let Some(r) = r {
        if r.count == 0 || r.per.0.is_zero() {
            p.add(path, "count and per must be above zero");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_grant_matching() {
        let amo = DeadGrantAnswer {
            status: Some(401),
            content_type: Some("application/problem+json".into()),
            ..Default::default()
        };
        assert!(amo.matches(401, "application/problem+json; charset=utf-8", b"{}", None));
        assert!(!amo.matches(401, "application/json", b"{}", None));
        assert!(!amo.matches(500, "application/problem+json", b"{}", None));
        let hint = DeadGrantAnswer {
            status: Some(401),
            body_contains: Some("Token has been revoked".into()),
            ..Default::default()
        };
        assert!(hint.matches(
            401,
            "application/json",
            br#"{"hint":"Token has been revoked"}"#,
            None
        ));
        let code = DeadGrantAnswer {
            error: Some("invalid_token".into()),
            ..Default::default()
        };
        assert!(code.matches(400, "", b"", Some("invalid_token")));
        assert!(!code.matches(400, "", b"", Some("invalid_request")));
    }
}
