//! Webhook delivery: a JSON POST per event, signed with HMAC-SHA256 when a secret is
//! configured, retried with backoff for up to an hour, at most one delivery per
//! credential and event in flight. Logs name the webhook's host only: a webhook URL
//! often carries a secret of its own.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::hmac;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::Notification;
use crate::config::{NotifyEvent, WebhookConfig};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait before a retry; it doubles up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(2);
const MAX_WAIT: Duration = Duration::from_secs(300);
/// A delivery is given up this long after its first attempt.
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);

/// The header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-tokenrelay-signature";

/// Why the webhook client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("notify.webhook: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("notify.webhook: cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

pub struct Webhook {
    url: url::Url,
    secret: Option<Secret>,
    events: BTreeSet<NotifyEvent>,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    /// (credential, event) of the deliveries under way.
    in_flight: Mutex<HashSet<(String, &'static str)>>,
    deliveries: TaskTracker,
}

impl Webhook {
    pub fn new(config: &WebhookConfig, metrics: Arc<Metrics>) -> Result<Webhook, WebhookError> {
        let tls = crate::tls::client_config(None, &[b"http/1.1"])?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(ATTEMPT_TIMEOUT)
            .user_agent(concat!("tokenrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(WebhookError::Client)?;
        Ok(Webhook {
            url: config.url.as_url().clone(),
            secret: config.secret.clone(),
            events: config.events.clone(),
            client,
            metrics,
            in_flight: Mutex::new(HashSet::new()),
            deliveries: TaskTracker::new(),
        })
    }

    /// Delivers `n` in the background, unless its event is not wanted or the same
    /// credential's same event is still being delivered.
    pub fn send(self: &Arc<Self>, n: Notification) {
        if !self.events.iter().any(|e| e.as_str() == n.event) {
            return;
        }
        let key = (n.credential.clone(), n.event);
        if !self.in_flight.lock().unwrap().insert(key.clone()) {
            return;
        }
        let hook = self.clone();
        self.deliveries.spawn(async move {
            hook.deliver(&n).await;
            hook.in_flight.lock().unwrap().remove(&key);
        });
    }

    async fn deliver(&self, n: &Notification) {
        let body = serde_json::to_vec(n).unwrap_or_default();
        let signature = self.secret.as_ref().map(|s| signature(s, &body));
        let host = self.url.host_str().unwrap_or_default().to_owned();
        let started = tokio::time::Instant::now();
        let mut wait = FIRST_WAIT;
        loop {
            let mut req = self
                .client
                .post(self.url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(sig) = &signature {
                req = req.header(SIGNATURE_HEADER, sig.as_str());
            }
            let outcome = match req.send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("answered {}", r.status().as_u16())),
                // Without the URL: it may hold a secret.
                Err(e) => Err(e.without_url().to_string()),
            };
            match outcome {
                Ok(()) => {
                    self.metrics.notification(n.event, "success");
                    info!(event = n.event, credential = %n.credential, %host, "notification delivered");
                    return;
                }
                Err(why) => {
                    self.metrics.notification(n.event, "failure");
                    if started.elapsed() + wait > GIVE_UP_AFTER {
                        self.metrics.notification(n.event, "expired");
                        warn!(event = n.event, credential = %n.credential, %host, error = %why, "notification not delivered within an hour; giving up");
                        return;
                    }
                    warn!(event = n.event, credential = %n.credential, %host, error = %why, retry_in = ?wait, "notification not delivered; retrying");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_WAIT);
        }
    }

    /// Abandons deliveries under way (the process is stopping).
    pub async fn stop(&self) {
        self.deliveries.close();
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
fn signature(secret: &Secret, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    let tag = hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        let sig = signature(
            &Secret::new("Jefe".to_string()),
            b"what do ya want for nothing?",
        );
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
