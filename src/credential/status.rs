//! What a credential shows: its state (DESIGN.md), the `/status` entry and the gauges.

use std::time::SystemTime;

use crate::clock::Instant;

use serde::Serialize;

use super::{Credential, RefreshResult, State, Trigger};
use crate::metrics::STATES;

/// The last refresh, as shown by `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct LastRefresh {
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    pub trigger: Trigger,
    pub result: RefreshResult,
    pub error: Option<String>,
}

/// How far back the timeline of `/status` reaches.
const TIMELINE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string())
}

impl Credential {
    /// The state per DESIGN.md, derived from the cell and the facts.
    pub fn state(&self) -> State {
        let f = self.facts.lock().unwrap();
        if f.moved.is_some() {
            return State::Moved;
        }
        if f.reauthorization.is_some() {
            return State::ReauthorizationRequired;
        }
        // On demand, an access token left to expire is refreshed by the next request:
        // ready, as long as nothing is failing.
        let waits_for_demand = self.config.refresh_mode == crate::config::RefreshMode::OnDemand
            && f.refreshable
            && self.current().is_some()
            && !f.failing
            && f.store_error.is_none();
        match self.usable(Instant::now()) {
            Some(_) if f.failing || f.store_error.is_some() => State::Degraded,
            // A static token the upstream rejects is not ready, though requests still
            // carry it: only a new token (or the upstream accepting it again) helps.
            Some(t) if f.static_rejected.is_some() && !t.was_accepted() => State::Degraded,
            Some(_) => State::Ready,
            None if waits_for_demand => State::Ready,
            None if !f.attempted && f.unavailable_reason.is_none() => State::Initializing,
            None => State::Unavailable,
        }
    }

    /// Notes `state` as observed now: a change is an event of the timeline, and
    /// "since" moves. Returns since when the credential is in `state`. (States also
    /// change without an event, by expiry: such a change is seen at the next look.)
    fn observe(&self, state: State) -> SystemTime {
        let now = crate::clock::wall_now();
        let mut f = self.facts.lock().unwrap();
        match f.state_since {
            Some((seen, since)) if seen == state => since,
            _ => {
                f.state_since = Some((state, now));
                drop(f);
                let ms = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                self.events.push(ms, super::events::Kind::State(state));
                now
            }
        }
    }

    /// The `/status` entry; never a token value. `config_file` is the file this process
    /// runs from, named in the commands the entry suggests (`FILE` when unknown).
    pub fn status(&self, config_file: Option<&std::path::Path>) -> serde_json::Value {
        let config = config_file.map_or_else(|| "FILE".into(), |p| p.display().to_string());
        let state = self.state();
        let since = self.observe(state);
        let token = self.current();
        let now_wall = crate::clock::wall_now();
        let expiring = token.as_ref().filter(|t| t.expiry_known);
        let backoff = self.backoff();
        let now_ms = crate::clock::now_ms();
        let timeline: Vec<serde_json::Value> = self
            .events
            .since(now_ms.saturating_sub(TIMELINE.as_millis() as u64))
            .iter()
            .map(super::events::Event::json)
            .collect();
        let f = self.facts.lock().unwrap();
        let mut detail = if state == State::Unavailable || state == State::Initializing {
            f.unavailable_reason.clone()
        } else {
            None
        };
        if let (State::Degraded, Some(at)) = (state, f.static_rejected) {
            detail = Some(format!(
                "the upstream rejects this static token (401 since {}); replace the token",
                rfc3339(at)
            ));
        }
        let next = f.next_attempt_ms.map(|at| {
            let retry = backoff.retry_at_ms == Some(at);
            serde_json::json!({
                "at": rfc3339(crate::clock::from_ms(at)),
                "in_seconds": (at as i64 - now_ms as i64) / 1000,
                "kind": if retry { "retry" } else { "scheduled" },
                "backoff_step": retry.then_some(f.failures),
            })
        });
        serde_json::json!({
            "state": state,
            "state_since": rfc3339(since),
            "next_attempt": next,
            "refresh_token_death": self.refresh_token_death(&f, now_ms),
            "timeline": timeline,
            "grant": self.config.grant,
            "generation": token.as_ref().map(|t| t.generation),
            // Static and long-lived tokens may have no known expiry: none is shown.
            "expiry_known": token.as_ref().map(|t| t.expiry_known),
            "expires_in_seconds": expiring.map(|t| {
                t.expires_at_wall.duration_since(now_wall).map(|d| d.as_secs() as i64).unwrap_or(0)
            }),
            "expires_at": expiring.map(|t| humantime::format_rfc3339_seconds(t.expires_at_wall).to_string()),
            "refresh_token_expires_at": f.refresh_expires_at_ms.map(|ms| humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()),
            "refresh_token_expires_in_seconds": f.refresh_expires_at_ms.map(|ms| (ms as i64 - crate::store::now_ms() as i64) / 1000),
            // Counted from the seed time because the grant's issue time is unknown: the
            // token may die earlier (seed --refresh-token-issued-at gives the real time).
            "refresh_token_expiry_estimated": f.refresh_expires_at_ms.map(|_| f.refresh_expires_estimated),
            "last_refresh": f.last_refresh,
            "last_success_at": f.last_success.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "store_error": f.store_error,
            "moved": f.moved.as_ref().map(|m| serde_json::json!({
                "to": m.to,
                "at": humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(m.at_ms)).to_string(),
                "action": format!("this environment no longer refreshes the credential; to take it back run tokenrelay import --config {config} --credential {} --in BUNDLE with a bundle exported from where it went", self.name),
            })),
            "client_certificate": self.config.client_cert.as_ref().map(|c| c.status()),
            "reauthorization_required": f.reauthorization.as_ref().map(|why| serde_json::json!({
                "reason": why,
                "action": format!("obtain a new token and run: tokenrelay authorize --config {config} --credential {0} (or tokenrelay seed --config {config} --credential {0} --refresh-token-file FILE, or --access-token-file FILE for a long-lived access token); running instances pick it up within seconds", self.name),
            })),
            "detail": detail,
            // Kept token-answer fields (instance addresses, never secrets) and where each
            // upstream with a url template goes with the current token.
            "answer_fields": token.as_ref().filter(|_| !self.config.answer_fields.is_empty()).map(|t| &t.fields),
            "upstream_urls": self.upstream_urls(token.as_deref()),
            // Token sink files: when each was last written, or why not.
            "sinks": self.sinks.status(),
            // An endpoint of its preset that the provider shuts down within 90 days.
            "sunset": self.config.sunset().filter(|s| s.is_near(now_wall)).map(|s| s.status(now_wall)),
        })
    }

    /// When the refresh token dies, which lifetime ends it (`idle`, `absolute`, or
    /// `reported` by the token endpoint), since when it has been running (for a bar),
    /// and whether it is an `estimate` (from the configured lifetimes: the provider
    /// does not say; or counted from a seed time standing in for the unknown issue time).
    fn refresh_token_death(&self, f: &super::Facts, now_ms: u64) -> Option<serde_json::Value> {
        let at = f.refresh_expires_at_ms?;
        let rules = &self.config.refresh_token;
        let ends = |start: Option<u64>, life: Option<std::time::Duration>| {
            start
                .zip(life)
                .is_some_and(|(s, l)| (s + l.as_millis() as u64).abs_diff(at) < 1000)
        };
        let (kind, from, estimate) =
            if ends(f.refresh_obtained_ms, rules.idle_lifetime.map(|d| d.0)) {
                ("idle", f.refresh_obtained_ms, true)
            } else if ends(f.authorized_ms, rules.absolute_lifetime.map(|d| d.0)) {
                ("absolute", f.authorized_ms, true)
            } else {
                ("reported", f.refresh_obtained_ms, false)
            };
        Some(serde_json::json!({
            "at": rfc3339(crate::clock::from_ms(at)),
            "in_seconds": (at as i64 - now_ms as i64) / 1000,
            "kind": kind,
            "from": from.map(|ms| rfc3339(crate::clock::from_ms(ms))),
            "lifetime_seconds": from.map(|ms| at.saturating_sub(ms) / 1000),
            "estimate": estimate || f.refresh_expires_estimated,
        }))
    }

    /// Per upstream with a url template: the template, the url resolved for `token`,
    /// or why there is none.
    fn upstream_urls(&self, token: Option<&super::ActiveToken>) -> Option<serde_json::Value> {
        let templates = &self.config.url_templates;
        if templates.is_empty() {
            return None;
        }
        let urls: serde_json::Map<String, serde_json::Value> = templates
            .iter()
            .enumerate()
            .map(|(index, t)| {
                let (url, error) = match token.map(|tok| tok.target(index)) {
                    Some(Ok(target)) => (Some(target.upstream_prefix.clone()), None),
                    Some(Err(e)) => (None, Some(e.to_string())),
                    None => (None, Some("no token yet".to_string())),
                };
                (
                    t.upstream.clone(),
                    serde_json::json!({ "template": t.template.source, "url": url, "error": error }),
                )
            })
            .collect();
        Some(serde_json::Value::Object(urls))
    }

    /// Sets the state-derived gauges (also called before each scrape, since expiry
    /// changes the state without any event).
    pub fn update_gauges(&self) {
        let m = &self.registry;
        let state = self.state();
        self.observe(state);
        for s in STATES {
            m.state
                .with_label_values(&[&self.name, s])
                .set(i64::from(s == state.as_str()));
        }
        match self.config.sunset() {
            Some(s) => m
                .preset_sunset_timestamp
                .with_label_values(&[&self.name])
                .set(s.date.unix_seconds()),
            None => {
                let _ = m.preset_sunset_timestamp.remove_label_values(&[&self.name]);
            }
        }
        let ready = matches!(state, State::Ready | State::Degraded);
        m.ready
            .with_label_values(&[&self.name])
            .set(i64::from(ready));
        if let Some(t) = self.current() {
            let exp = t
                .expires_at_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            if t.expiry_known {
                m.expiry_timestamp.with_label_values(&[&self.name]).set(exp);
            } else {
                // No expiry known: no series, rather than a made-up date.
                let _ = m.expiry_timestamp.remove_label_values(&[&self.name]);
            }
            m.generation
                .with_label_values(&[&self.name])
                .set(t.generation as i64);
        }
        let refresh_expiry = self.facts.lock().unwrap().refresh_expires_at_ms;
        match refresh_expiry {
            Some(ms) => m
                .refresh_expiry_timestamp
                .with_label_values(&[&self.name])
                .set((ms / 1000) as i64),
            None => {
                let _ = m
                    .refresh_expiry_timestamp
                    .remove_label_values(&[&self.name]);
            }
        }
        if let Some(t) = self.facts.lock().unwrap().last_success {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            m.last_success.with_label_values(&[&self.name]).set(secs);
        }
    }
}
