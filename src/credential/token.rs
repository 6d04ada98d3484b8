//! The access token in the cell: its header values, built once per refresh, and the
//! facts the hot path reads or sets about it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::Instant;

use http::HeaderValue;

use crate::config::url_template::{
    without_secret_looking, TemplatedUpstream, Unresolved, UrlRule, ValueRule,
};
use crate::secret::{InvalidToken, Secret};
use crate::target::Target;

/// A token is treated as expired this long before its stated expiry (clock skew and the
/// time the request spends in flight), capped at a quarter of its lifetime.
pub(crate) const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// What stands in for "never" as the expiry of a token whose expiry is unknown.
const NO_EXPIRY: Duration = Duration::from_secs(100 * 365 * 86400);

/// The access token currently in use, with its header values built once per refresh.
pub struct ActiveToken {
    pub generation: u64,
    /// Kept so a header format added by a reload can be built without a refresh.
    access_token: Secret,
    /// One value per header format of the upstreams using this credential, marked
    /// sensitive so HTTP/2 never indexes it.
    headers: Box<[HeaderValue]>,
    pub expires_at: Instant,
    pub expires_at_wall: SystemTime,
    /// `expires_at` minus the safety margin: after this the token is not sent.
    usable_until: Instant,
    pub lifetime: Duration,
    /// False for tokens without a known expiry (static tokens, long-lived tokens stored
    /// without `expires_in`): they are treated as valid for a century.
    pub expiry_known: bool,
    /// Set once the upstream answered a request carrying this token with anything but
    /// 401: a later 401 then means revocation, not a permission problem.
    accepted: AtomicBool,
    /// Extra fields of the token answers kept with this token (`answer_fields`), e.g.
    /// Salesforce's `instance_url`. Not secret.
    pub fields: BTreeMap<String, String>,
    /// The base of each upstream whose url is a template over `fields`, by the index of
    /// the credential's `url_templates`, resolved when the token is published.
    targets: Box<[Result<Arc<Target>, Unresolved>]>,
}

impl std::fmt::Debug for ActiveToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveToken")
            .field("generation", &self.generation)
            .field("expires_at", &self.expires_at)
            .field("value", &crate::secret::REDACTED)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ActiveToken {
    /// The token with its header value for each of `formats`; refused when it cannot
    /// make a valid header, so no request ever carries an empty or partial credential.
    pub(crate) fn new(
        access_token: &Secret,
        formats: &[String],
        generation: u64,
        expires_at_wall: Option<SystemTime>,
    ) -> Result<ActiveToken, InvalidToken> {
        let expiry_known = expires_at_wall.is_some();
        let expires_at_wall =
            expires_at_wall.unwrap_or_else(|| crate::clock::wall_now() + NO_EXPIRY);
        access_token.check_token()?;
        let headers = header_values(access_token, formats)?;
        let remaining = expires_at_wall
            .duration_since(crate::clock::wall_now())
            .unwrap_or_default();
        let expires_at = Instant::now() + remaining;
        let margin = EXPIRY_MARGIN.min(remaining / 4);
        Ok(ActiveToken {
            generation,
            access_token: access_token.clone(),
            headers,
            expires_at,
            expires_at_wall,
            usable_until: expires_at - margin,
            lifetime: remaining,
            expiry_known,
            accepted: AtomicBool::new(false),
            fields: BTreeMap::new(),
            targets: Box::default(),
        })
    }

    /// The access token itself.
    pub(crate) fn secret(&self) -> &Secret {
        &self.access_token
    }

    /// The same token with header values for `formats` (a superset of the formats it
    /// was built for: formats already handed out keep their index).
    pub(crate) fn with_formats(&self, formats: &[String]) -> Result<ActiveToken, InvalidToken> {
        Ok(ActiveToken {
            generation: self.generation,
            access_token: self.access_token.clone(),
            headers: header_values(&self.access_token, formats)?,
            expires_at: self.expires_at,
            expires_at_wall: self.expires_at_wall,
            usable_until: self.usable_until,
            lifetime: self.lifetime,
            expiry_known: self.expiry_known,
            accepted: AtomicBool::new(self.was_accepted()),
            fields: self.fields.clone(),
            targets: self.targets.clone(),
        })
    }

    /// The token with the answer fields it came with (never a secret-looking one, even
    /// from an older stored state), and the upstream base of each of `templates`
    /// resolved from them; `refused` names the fields the last answer carried with a
    /// value not kept, and why.
    pub(crate) fn with_fields(
        mut self,
        fields: BTreeMap<String, String>,
        refused: &BTreeMap<String, ValueRule>,
        templates: &[TemplatedUpstream],
    ) -> ActiveToken {
        let fields = without_secret_looking(fields);
        self.targets = templates
            .iter()
            .map(|t| {
                let url = t
                    .template
                    .resolve(&fields, refused, t.allow_insecure_http)?;
                Target::of(&url)
                    .map(Arc::new)
                    .map_err(|e| Unresolved::Unusable {
                        field: t.template.field.clone(),
                        template: t.template.source.clone(),
                        origin: None,
                        rule: UrlRule::Authority(e.to_string()),
                    })
            })
            .collect();
        self.fields = fields;
        self
    }

    /// The base of the templated upstream at template `index`, or why there is none for this token.
    pub fn target(&self, index: usize) -> Result<&Arc<Target>, Unresolved> {
        match self.targets.get(index) {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(e.clone()),
            None => Err(Unresolved::NotResolved),
        }
    }

    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    pub fn remaining(&self, now: Instant) -> Duration {
        self.usable_until.saturating_duration_since(now)
    }

    /// The bare token, for an upstream that takes it as a query parameter.
    pub(crate) fn value(&self) -> &str {
        self.access_token.expose()
    }

    /// The header value for format `index`.
    pub fn header(&self, index: usize) -> HeaderValue {
        self.headers[index].clone()
    }

    /// The header value for format `index`, as bytes.
    pub fn header_bytes(&self, index: usize) -> &[u8] {
        self.headers[index].as_bytes()
    }

    /// Records that the upstream accepted this token (any answer but 401). Read first so
    /// the hot path writes the shared cache line once per token, not per request.
    pub fn mark_accepted(&self) {
        if !self.accepted.load(Ordering::Relaxed) {
            self.accepted.store(true, Ordering::Relaxed);
        }
    }

    /// Forgets that the upstream accepted this token (after it rejected it), so a later
    /// acceptance can be told apart.
    pub(crate) fn reset_accepted(&self) {
        self.accepted.store(false, Ordering::Relaxed);
    }

    /// Whether the upstream ever accepted this token.
    pub fn was_accepted(&self) -> bool {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// One sensitive header value per format.
fn header_values(
    access_token: &Secret,
    formats: &[String],
) -> Result<Box<[HeaderValue]>, InvalidToken> {
    formats
        .iter()
        .map(|f| {
            let mut v = HeaderValue::from_str(&f.replace("{token}", access_token.expose()))
                .map_err(|_| InvalidToken::Control)?;
            v.set_sensitive(true);
            Ok(v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_one_sensitive_header_per_format_and_refuses_broken_tokens() {
        let later = Some(crate::clock::wall_now() + Duration::from_secs(60));
        let formats = ["Bearer {token}".to_string(), "{token}".to_string()];
        let t = ActiveToken::new(&Secret::new("abc"), &formats, 3, later).unwrap();
        assert_eq!(t.header(0), "Bearer abc");
        assert_eq!(t.header_bytes(1), b"abc");
        assert!(t.header(0).is_sensitive());
        assert!(t.is_usable(Instant::now()));
        assert!(!format!("{t:?}").contains("abc"));
        assert!(!t.was_accepted());
        t.mark_accepted();
        assert!(t.was_accepted());
        for bad in ["", "a\nb", "a\u{7f}"] {
            assert!(ActiveToken::new(&Secret::new(bad), &formats, 1, later).is_err());
        }
    }

    #[test]
    fn a_format_added_later_keeps_the_old_indexes_and_the_token_facts() {
        let later = Some(crate::clock::wall_now() + Duration::from_secs(60));
        let t =
            ActiveToken::new(&Secret::new("abc"), &["Bearer {token}".into()], 7, later).unwrap();
        t.mark_accepted();
        let more = ["Bearer {token}".to_string(), "Token {token}".to_string()];
        let u = t.with_formats(&more).unwrap();
        assert_eq!(u.header(0), "Bearer abc");
        assert_eq!(u.header(1), "Token abc");
        assert!(u.header(1).is_sensitive());
        assert_eq!(
            (u.generation, u.expires_at, u.expiry_known),
            (7, t.expires_at, true)
        );
        assert!(u.was_accepted());
        assert!(!format!("{u:?}").contains("abc"));
    }
}
