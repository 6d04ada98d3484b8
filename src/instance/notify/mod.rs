//! Notifications, so a person learns about a credential that needs them without
//! Prometheus: each credential's state is looked at every second, and each change that
//! matters (a dead grant, an unavailable token, a handover, a recovery, a refresh token
//! about to die) becomes one webhook delivery ([`webhook`]).

mod webhook;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::View;
use crate::config::{NotifyConfig, NotifyEvent};
use crate::credential::State;
use crate::metrics::Metrics;
use webhook::Webhook;
pub use webhook::WebhookError;

/// How often states are looked at.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// One event, as POSTed (never a secret: the same facts `/status` shows).
#[derive(Clone, Debug, Serialize)]
pub struct Notification {
    pub event: &'static str,
    pub credential: String,
    pub state: State,
    /// RFC 3339.
    pub at: String,
    pub detail: Option<String>,
    /// The command that helps, for this process's config file.
    pub action: Option<String>,
}

/// What was last seen of one credential.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    state: State,
    /// A problem was told, so a return to ready is told too.
    told_problem: bool,
    /// The refresh-token expiry (RFC 3339) already told as near.
    told_expiring: Option<String>,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            state: State::Initializing,
            told_problem: false,
            told_expiring: None,
        }
    }
}

/// What a state change tells, if anything, and whether a problem is being told.
fn on_change(seen: &Seen, now: State) -> Option<NotifyEvent> {
    if now == seen.state {
        return None;
    }
    match now {
        State::ReauthorizationRequired => Some(NotifyEvent::ReauthorizationRequired),
        State::Moved => Some(NotifyEvent::Moved),
        State::Unavailable => Some(NotifyEvent::Unavailable),
        State::Ready | State::Degraded if seen.told_problem => Some(NotifyEvent::Recovered),
        State::Ready | State::Degraded | State::Initializing => None,
    }
}

/// Whether a refresh token dying at `expires_at`, `left_s` seconds from now, is near
/// enough to tell, and not told yet.
fn expiring(seen: &Seen, expires_at: Option<&str>, left_s: Option<i64>, before: Duration) -> bool {
    match (expires_at, left_s) {
        (Some(at), Some(left)) => {
            seen.told_expiring.as_deref() != Some(at) && left <= before.as_secs() as i64
        }
        _ => false,
    }
}

/// The command that helps after `event`.
fn action(event: NotifyEvent, credential: &str, config: &str) -> Option<String> {
    match event {
        NotifyEvent::ReauthorizationRequired | NotifyEvent::RefreshTokenExpiring => Some(
            format!("tokenrelay authorize --config {config} --credential {credential}"),
        ),
        NotifyEvent::Moved => Some(format!(
            "tokenrelay import --config {config} --credential {credential} --in BUNDLE, with a bundle exported from where it went"
        )),
        NotifyEvent::Unavailable => Some(format!("tokenrelay status --config {config}")),
        NotifyEvent::Recovered => None,
    }
}

/// The plain-words reason for `event`, from the credential's `/status` entry.
fn detail(event: NotifyEvent, status: &serde_json::Value) -> Option<String> {
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    match event {
        NotifyEvent::ReauthorizationRequired => text(&status["reauthorization_required"]["reason"]),
        NotifyEvent::Unavailable => {
            text(&status["detail"]).or_else(|| text(&status["last_refresh"]["error"]))
        }
        NotifyEvent::Moved => text(&status["moved"]["to"]).map(|to| format!("handed over to {to}")),
        NotifyEvent::RefreshTokenExpiring => text(&status["refresh_token_expires_at"])
            .map(|at| format!("the refresh token expires at {at}")),
        NotifyEvent::Recovered => None,
    }
}

/// Starts looking at the credentials `view` holds, until `stop`. Without a webhook there
/// is nobody to tell, and nothing starts.
pub fn spawn(
    config: &NotifyConfig,
    view: Arc<ArcSwap<View>>,
    metrics: Arc<Metrics>,
    config_path: Option<PathBuf>,
    stop: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, WebhookError> {
    let Some(hook) = &config.webhook else {
        return Ok(None);
    };
    let webhook = Arc::new(Webhook::new(hook, metrics)?);
    let before = config.expiring_before.0;
    let config_file = config_path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "FILE".into());
    Ok(Some(tokio::spawn(async move {
        let mut seen: HashMap<String, Seen> = HashMap::new();
        let mut tick = tokio::time::interval(LOOK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            for cred in view.load().credentials.iter() {
                let entry = seen.entry(cred.name.clone()).or_default();
                let state = cred.state();
                let status = cred.status(None);
                let mut events = Vec::new();
                if let Some(event) = on_change(entry, state) {
                    events.push(event);
                    entry.told_problem = event != NotifyEvent::Recovered;
                }
                entry.state = state;
                let expires_at = status["refresh_token_expires_at"].as_str();
                let left = status["refresh_token_expires_in_seconds"].as_i64();
                if expiring(entry, expires_at, left, before) {
                    entry.told_expiring = expires_at.map(str::to_owned);
                    events.push(NotifyEvent::RefreshTokenExpiring);
                }
                for event in events {
                    webhook.send(Notification {
                        event: event.as_str(),
                        credential: cred.name.clone(),
                        state,
                        at: humantime::format_rfc3339_seconds(crate::clock::wall_now()).to_string(),
                        detail: detail(event, &status),
                        action: action(event, &cred.name, &config_file),
                    });
                }
            }
        }
        webhook.stop().await;
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(state: State, told_problem: bool) -> Seen {
        Seen {
            state,
            told_problem,
            told_expiring: None,
        }
    }

    /// Each state change, and what it tells.
    #[test]
    fn state_changes_and_what_they_tell() {
        use NotifyEvent as E;
        use State as S;
        for (name, before, told, now, expected) in [
            ("no change", S::Ready, false, S::Ready, None),
            ("starts ready", S::Initializing, false, S::Ready, None),
            (
                "a dead grant",
                S::Ready,
                false,
                S::ReauthorizationRequired,
                Some(E::ReauthorizationRequired),
            ),
            (
                "dead at startup",
                S::Initializing,
                false,
                S::ReauthorizationRequired,
                Some(E::ReauthorizationRequired),
            ),
            (
                "no token",
                S::Ready,
                false,
                S::Unavailable,
                Some(E::Unavailable),
            ),
            ("handed over", S::Ready, false, S::Moved, Some(E::Moved)),
            (
                "back after a problem",
                S::Unavailable,
                true,
                S::Ready,
                Some(E::Recovered),
            ),
            (
                "back, degraded",
                S::ReauthorizationRequired,
                true,
                S::Degraded,
                Some(E::Recovered),
            ),
            (
                "degraded is no problem to tell",
                S::Ready,
                false,
                S::Degraded,
                None,
            ),
            (
                "ready again after degraded",
                S::Degraded,
                false,
                S::Ready,
                None,
            ),
            (
                "still unavailable",
                S::Unavailable,
                true,
                S::Unavailable,
                None,
            ),
        ] {
            assert_eq!(on_change(&seen(before, told), now), expected, "{name}");
        }
    }

    #[test]
    fn a_near_refresh_token_expiry_is_told_once() {
        let day = Duration::from_secs(86400);
        let at = Some("2027-01-01T00:00:00Z");
        let fresh = seen(State::Ready, false);
        assert!(expiring(&fresh, at, Some(3600), day));
        assert!(!expiring(&fresh, at, Some(90 * 86400), day), "far away");
        assert!(!expiring(&fresh, None, None, day), "unknown");
        let told = Seen {
            told_expiring: at.map(str::to_owned),
            ..fresh.clone()
        };
        assert!(!expiring(&told, at, Some(3600), day), "told already");
        let next = Some("2027-01-02T00:00:00Z");
        assert!(
            expiring(&told, next, Some(3600), day),
            "a new refresh token"
        );
    }

    #[test]
    fn actions_name_this_config_file() {
        let a = action(
            NotifyEvent::ReauthorizationRequired,
            "crm",
            "/etc/tokenrelay.yaml",
        );
        assert_eq!(
            a.as_deref(),
            Some("tokenrelay authorize --config /etc/tokenrelay.yaml --credential crm")
        );
        assert_eq!(action(NotifyEvent::Recovered, "crm", "f"), None);
    }
}
