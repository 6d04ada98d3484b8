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
            Some(_) => State::Ready,
            None if waits_for_demand => State::Ready,
            None if !f.attempted && f.unavailable_reason.is_none() => State::Initializing,
            None => State::Unavailable,
        }
    }

    /// The `/status` entry; never a token value. `config_file` is the file this process
    /// runs from, named in the commands the entry suggests (`FILE` when unknown).
    pub fn status(&self, config_file: Option<&std::path::Path>) -> serde_json::Value {
        let config = config_file.map_or_else(|| "FILE".into(), |p| p.display().to_string());
        let state = self.state();
        let token = self.current();
        let now_wall = crate::clock::wall_now();
        let expiring = token.as_ref().filter(|t| t.expiry_known);
        let f = self.facts.lock().unwrap();
        serde_json::json!({
            "state": state,
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
            "detail": if state == State::Unavailable || state == State::Initializing { f.unavailable_reason.clone() } else { None },
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
