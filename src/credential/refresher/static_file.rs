//! The static grant: a long-lived token from the config or a `token_file`.

use std::time::Duration;

use tracing::{info, warn};

use super::Refresher;
use crate::config::SecretFileError;
use crate::credential::{RefreshResult, Trigger};

/// How often a static token's `token_file` is re-read (mounted secrets are replaced in
/// place when rotated).
const STATIC_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

impl Refresher {
    /// A static token: published at once; a `token_file` is re-read every
    /// [`STATIC_RELOAD_INTERVAL`] and after an upstream 401, and a changed token becomes
    /// the next generation. A 401 with nothing new is passed through without waiting.
    pub(super) async fn run_static(self) {
        let mut token = self.cred.config.static_token.clone().expect("validated");
        let mut generation = 1;
        if let Err(e) = self.cred.publish(&token, generation, None) {
            // Checked by the config already; reported rather than trusted.
            self.cred.record(
                Trigger::Startup,
                RefreshResult::Failure,
                Some(e.to_string()),
                None,
            );
            self.cred.wake_waiters();
        } else {
            self.cred
                .record(Trigger::Startup, RefreshResult::Success, None, None);
        }
        let file = self.cred.config.static_token_file.clone();
        let mut last_error: Option<String> = None;
        loop {
            let trigger = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(STATIC_RELOAD_INTERVAL), if file.is_some() => Trigger::Scheduled,
                _ = self.cred.demand_notify.notified() => {
                    if self.cred.take_demand().is_none() {
                        continue;
                    }
                    Trigger::Upstream401
                }
            };
            let read = file.as_deref().map(|f| {
                crate::config::read_static_token(f).and_then(|fresh| {
                    if fresh.expose() == token.expose() {
                        return Ok(None);
                    }
                    self.cred
                        .publish(&fresh, generation + 1, None)
                        .map(|()| Some(fresh))
                        .map_err(|reason| SecretFileError::NotAToken {
                            file: f.to_path_buf(),
                            reason,
                        })
                })
            });
            match read {
                Some(Ok(Some(fresh))) => {
                    token = fresh;
                    generation += 1;
                    self.cred.set_static_rejected(false);
                    self.cred
                        .record(trigger, RefreshResult::Success, None, None);
                    info!(credential = %self.name(), generation, trigger = trigger.as_str(), "static token reloaded from its token_file");
                    last_error = None;
                    continue;
                }
                Some(Err(e)) => {
                    // Reported once per distinct problem; the previous token stays in use.
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        warn!(credential = %self.name(), error = %e, "cannot use the static token file; keeping the current token");
                        let why = format!("token_file {e}; keeping the previous token");
                        self.cred
                            .record(trigger, RefreshResult::Failure, Some(why), None);
                        last_error = Some(e);
                    }
                }
                Some(Ok(None)) | None => {}
            }
            if trigger == Trigger::Upstream401 {
                // The upstream rejects the token: not ready until it accepts it again
                // (any answer but 401 marks it accepted) or a new token comes.
                if let Some(t) = self.cred.current() {
                    t.reset_accepted();
                }
                self.cred.set_static_rejected(true);
            }
            // Nothing newer: requests waiting after a 401 pass it on now.
            self.cred.wake_waiters();
        }
    }
}
