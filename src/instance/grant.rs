//! Storing a grant a human just obtained: the one code path of `tokenrelay authorize`
//! (and `seed`) and of the status page's code form. An authorization code is exchanged
//! once; the answer is stored as the next generation, which running instances adopt
//! through the store's watch.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::config::CredentialConfig;
use crate::oauth::{GrantRequest, TokenAnswer, TokenClient, TokenError};
use crate::secret::Secret;
use crate::store::{now_ms, CasOutcome, NewGrant, Store, StoreError, StoredState};

/// Why a grant was not stored.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("the authorization code was rejected ({0}). Codes work once and expire within minutes: obtain a new one and try again promptly")]
    CodeRejected(#[source] TokenError),
    #[error("exchanging the authorization code failed: {0}")]
    Exchange(#[source] TokenError),
    #[error("exchanging {what} failed: {reason}")]
    NoToken { what: String, reason: String },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the stored state kept changing; try again")]
    Busy,
    #[error("credentials.{0}.authorize_url is not set: set it to the provider's authorization endpoint, or use a code obtained in the provider's UI")]
    NoAuthorizeUrl(String),
    #[error("credentials.{0}.redirect_uri is required to authorize")]
    NoRedirectUri(String),
}

/// The `state` and PKCE verifier of one browser authorization (RFC 7636, S256).
pub struct Pkce {
    pub state: String,
    pub verifier: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        Pkce {
            state: random_b64(16),
            verifier: random_b64(32),
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
}

fn random_b64(n: usize) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The provider's authorization URL for `c`, with `state` and the PKCE challenge.
pub fn authorize_url(c: &CredentialConfig, pkce: &Pkce) -> Result<url::Url, GrantError> {
    use base64::Engine;
    let Some(authorize_url) = &c.authorize_url else {
        return Err(GrantError::NoAuthorizeUrl(c.name.clone()));
    };
    let Some(redirect) = &c.redirect_uri else {
        return Err(GrantError::NoRedirectUri(c.name.clone()));
    };
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        pkce.verifier.as_bytes(),
    ));
    let mut url = authorize_url.clone();
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", c.client_id.as_deref().unwrap_or_default())
            .append_pair("redirect_uri", redirect)
            .append_pair("state", &pkce.state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        if !c.scopes.is_empty() {
            q.append_pair("scope", &c.scopes.join(" "));
        }
    }
    Ok(url)
}

/// Why the authorization callback brought no usable code.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("the provider answered {error}{description}")]
    Provider { error: String, description: String },
    #[error("the callback's state does not match (stale or forged request)")]
    State,
    #[error("the callback carries no code")]
    NoCode,
}

/// The code of a callback whose query is `query`, if its state is `state`.
pub fn callback_code(query: &str, state: &str) -> Result<String, CallbackError> {
    let q: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
    if let Some(err) = q.get("error") {
        let description = q
            .get("error_description")
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        return Err(CallbackError::Provider {
            error: err.clone(),
            description,
        });
    }
    if q.get("state").map(String::as_str) != Some(state) {
        return Err(CallbackError::State);
    }
    match q.get("code") {
        Some(code) if !code.is_empty() => Ok(code.clone()),
        _ => Err(CallbackError::NoCode),
    }
}

/// Exchanges an authorization code (with its PKCE verifier, when the flow made one).
pub async fn exchange_code(
    client: &TokenClient,
    code: &str,
    verifier: Option<&str>,
) -> Result<TokenAnswer, GrantError> {
    client
        .request(GrantRequest::AuthorizationCode {
            code: code.trim(),
            code_verifier: verifier,
        })
        .await
        .map_err(|e| {
            if e.is_invalid_grant() {
                GrantError::CodeRejected(e)
            } else {
                GrantError::Exchange(e)
            }
        })
}

/// What a grant stores: tokens, and when they die.
pub struct Obtained {
    pub refresh_token: Option<Secret>,
    /// The access token and its expiry (Unix ms) when known.
    pub access: Option<(Secret, Option<u64>)>,
    /// What the answer said of the refresh token's life (nothing for a seeded one).
    pub stated: crate::credential::policy::Lifetimes,
    /// When the refresh token was issued.
    pub issued: IssuedAt,
    pub answer_fields: BTreeMap<String, String>,
}

/// When a stored grant was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssuedAt {
    /// Just now (`authorize`: the answer came from the token endpoint).
    Now,
    /// At this time (Unix ms), as `seed --refresh-token-issued-at` said.
    At(u64),
    /// Some time before now (`seed` without its issue time): lifetimes counted from now
    /// are estimates.
    Unknown,
}

impl Obtained {
    /// From a token answer; `what` names what was exchanged ("the authorization code").
    /// Also returns notes for the operator (what was not kept, and why).
    pub fn from_answer(
        answer: TokenAnswer,
        what: &str,
    ) -> Result<(Obtained, Vec<String>), GrantError> {
        let mut notes = Vec::new();
        // A refresh token is kept even when the access-token part is unusable: the grant
        // is spent, and running instances redeem the refresh token for an access token.
        let access = match answer.access {
            Ok(a) => {
                let expires = SystemTime::now() + a.expires_in;
                let expires_ms = expires
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                // A long-lived token without `expires_in` has no known expiry (YooMoney).
                let known = a.expires_in_stated || answer.refresh_token.is_some();
                Some((a.token, known.then_some(expires_ms)))
            }
            Err(e) if answer.refresh_token.is_some() => {
                notes.push(format!("warning: the answer's access token is unusable ({e}); storing the refresh token only"));
                None
            }
            Err(e) => {
                return Err(GrantError::NoToken {
                    what: what.to_string(),
                    reason: e.to_string(),
                })
            }
        };
        if answer.refresh_token.is_none() {
            // YooMoney and long-lived-token integrations: the access token is the grant.
            notes.push("note: the token endpoint issued no refresh_token; the access token is stored as a long-lived token and will not be refreshed (re-authorize when it expires)".into());
        }
        for (field, rule) in &answer.refused_fields {
            notes.push(format!(
                "warning: the answer's field {field} was not kept: {rule}"
            ));
        }
        Ok((
            Obtained {
                refresh_token: answer.refresh_token,
                access,
                stated: crate::credential::policy::Lifetimes {
                    stated: answer.refresh_expires_in,
                    stated_hard: answer.refresh_hard_expires_in,
                    ..Default::default()
                },
                issued: IssuedAt::Now,
                answer_fields: answer.fields,
            },
            notes,
        ))
    }
}

/// Stores `grant` for credential `name` (configured as `c`, when it is) as the next
/// generation, written `by` this process; returns the generation.
pub async fn store_grant(
    store: &dyn Store,
    name: &str,
    c: Option<&CredentialConfig>,
    by: &str,
    grant: Obtained,
) -> Result<u64, GrantError> {
    let rules = c.map(|c| c.refresh_token.clone());
    // A lost race with a running refresher is retried on the newer generation.
    for _ in 0..10 {
        let current = store.load(name).await?;
        let expected = current.as_ref().map(|s| s.generation).unwrap_or(0);
        let now = now_ms();
        let (from, exact) = match grant.issued {
            IssuedAt::Now => (now, true),
            IssuedAt::At(ms) => (ms, true),
            IssuedAt::Unknown => (now, false),
        };
        let expiry = grant
            .refresh_token
            .as_ref()
            .and(rules.as_ref())
            .and_then(|r| {
                use crate::credential::policy;
                let issued = policy::Issued {
                    obtained_ms: from,
                    obtained_exact: exact,
                    authorized_at_ms: Some(from),
                    authorized_exact: exact,
                };
                let lifetimes = policy::Lifetimes {
                    idle: r.idle_lifetime.map(|d| d.0),
                    absolute: r.absolute_lifetime.map(|d| d.0),
                    ..grant.stated
                };
                policy::refresh_token_expiry(issued, lifetimes)
            });
        let new = NewGrant {
            access_expires_at_ms: grant.access.as_ref().and_then(|a| a.1),
            access_token: grant.access.as_ref().map(|a| a.0.clone()),
            refresh_token: grant.refresh_token.clone(),
            refresh_expires_at_ms: expiry.map(|e| e.at_ms),
            refresh_expires_estimated: expiry.is_some_and(|e| e.estimate),
            issued_at_ms: matches!(grant.issued, IssuedAt::At(_)).then_some(from),
            issued_at_unknown: grant.issued == IssuedAt::Unknown,
            answer_fields: grant.answer_fields.clone(),
            issued_to: c.map(|c| c.token_endpoint_identity()),
        };
        let state = StoredState::new_grant(expected, new, now, by);
        match store.compare_and_swap(name, expected, &state).await? {
            CasOutcome::Swapped => return Ok(state.generation),
            CasOutcome::Conflict { .. } => continue,
        }
    }
    Err(GrantError::Busy)
}
