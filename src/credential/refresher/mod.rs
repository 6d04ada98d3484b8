//! The refresher: one task per credential, the only writer of its cell.
//!
//! It refreshes proactively (see [`schedule`]), on demand (expired token, upstream 401),
//! adopts changes other processes wrote to the store, and backs off on failure. For the
//! rotating `refresh_token` grant it follows the store protocol of DESIGN.md: take the
//! lease, re-read, adopt if the generation moved, else call the token endpoint, write the
//! new state with compare-and-swap durably, and only then publish it.
//!
//! What to do at each step is decided in [`decide`], by pure functions of the facts
//! gathered here; this module and its grant modules gather them and do the I/O.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

mod decide;
pub mod handover;
mod in_doubt;
mod local;
mod rotating;
mod static_file;

pub use decide::lease_ttl;

use super::policy::{self, On401};
use super::{Credential, RefreshError, RefreshResult, Trigger};
use crate::config::Grant;
use crate::metrics::Metrics;
use crate::oauth::{GrantRequest, TokenClient, TokenClientError, TokenEndpoint};
use crate::store::{now_ms, Store, StoredState};
use decide::{Ended, Hold, OnDemand, Unadopted, Wakeup};

/// Outcome of one attempt, as the loop needs it.
enum Attempt {
    /// A new or adopted token is published.
    Done,
    /// Failed; retry with backoff.
    Failed,
    /// Nothing to do until the stored state changes (nothing stored, or rejected).
    Idle,
}

/// Drives one credential.
pub struct Refresher {
    cred: Arc<Credential>,
    client: Option<Arc<dyn TokenEndpoint>>,
    store: Option<Arc<dyn Store>>,
    /// TTL of the refresh lease (renewed every third of it while held).
    lease_ttl: Duration,
    instance_id: String,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Newest stored generation this process has seen or written.
    known_generation: u64,
    /// When the newest authorization (`seed`, `authorize`) this process saw was made.
    newest_authorization_ms: Option<u64>,
    /// Consecutive failures, for backoff (the step itself is kept in the credential,
    /// where waiting requests read it).
    failures: u32,
    /// Proactive refresh time of the current token: (generation, when).
    scheduled: Option<(u64, Instant)>,
    idle: bool,
    /// The last 401-driven refresh of a token that never worked, and the gap before the next.
    last_401_refresh: Option<policy::Spacing>,
    /// The published token is a long-lived access token with no refresh token: it is
    /// never refreshed, and re-authorization is needed when it expires or keeps being
    /// rejected.
    long_lived: bool,
    /// Consecutive upstream 401s to the long-lived token with no acceptance between.
    long_lived_rejections: u32,
    /// When the stored refresh token was obtained (Unix ms), for the keep-alive refresh
    /// of refresh tokens with an idle lifetime.
    refresh_obtained_ms: Option<u64>,
    /// When this process sent its recent refreshes, oldest first (for the provider's
    /// refresh rate limit).
    sent: std::collections::VecDeque<Instant>,
    /// Set when the provider's limits forbid a refresh until then; the retry waits.
    not_before: Option<Instant>,
    /// The last refresh token seen in the store, for the store-less fallback refresh of
    /// credentials whose refresh tokens do not rotate.
    remembered_refresh_token: Option<crate::secret::Secret>,
    /// Set when a reload changed the credential's token endpoint or client_id: what the
    /// store holds at startup, if it does not record whom it was issued to, is taken as
    /// issued for the previous ones and never sent here.
    set_aside_stored: bool,
    /// Stored generations up to this one are set aside (see `set_aside_stored`).
    foreign_up_to: Option<u64>,
    /// Spreads refreshes and retries of the fleet; seeded in a simulation so that a
    /// history can be replayed.
    jitter: StdRng,
    /// Where a write this refresher cannot finish before it stops is left for the
    /// credential's next refresher, and where it finds one its predecessor left.
    handover: Option<Arc<handover::PendingWrites>>,
}

impl Refresher {
    pub fn new(
        cred: Arc<Credential>,
        store: Option<Arc<dyn Store>>,
        lease_ttl: Option<Duration>,
        instance_id: String,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Refresher, TokenClientError> {
        let client = match cred.config.grant {
            Grant::Static => None,
            _ => Some(Arc::new(TokenClient::new(cred.config.clone())?) as Arc<dyn TokenEndpoint>),
        };
        let store = if cred.config.grant == Grant::RefreshToken {
            store
        } else {
            None
        };
        let lease_ttl = lease_ttl.unwrap_or_else(|| decide::lease_ttl(cred.config.token_timeout.0));
        Ok(Refresher {
            cred,
            client,
            store,
            lease_ttl,
            instance_id,
            metrics,
            shutdown,
            known_generation: 0,
            newest_authorization_ms: None,
            failures: 0,
            scheduled: None,
            idle: false,
            last_401_refresh: None,
            long_lived: false,
            long_lived_rejections: 0,
            refresh_obtained_ms: None,
            sent: Default::default(),
            not_before: None,
            remembered_refresh_token: None,
            set_aside_stored: false,
            foreign_up_to: None,
            jitter: StdRng::from_entropy(),
            handover: None,
        })
    }

    /// Sends token requests to `endpoint` instead of the configured token endpoint (a
    /// simulation's scripted one).
    pub fn with_token_endpoint(mut self, endpoint: Arc<dyn TokenEndpoint>) -> Self {
        self.client = Some(endpoint);
        self
    }

    /// Draws the jitter of refresh times and retries from `seed` (a simulation).
    pub fn with_jitter_seed(mut self, seed: u64) -> Self {
        self.jitter = StdRng::seed_from_u64(seed);
        self
    }

    /// Hands a write it cannot finish when stopped to `pending`, and takes over the one
    /// its predecessor left there (a reload).
    pub fn with_handover(mut self, pending: Arc<handover::PendingWrites>) -> Self {
        self.handover = Some(pending);
        self
    }

    /// The credential's token endpoint identity changed (a reload): the stored state
    /// found at startup belongs to the old one. It is not used, and the credential waits
    /// for a new `seed` or `authorize`.
    pub fn set_aside_stored_state(mut self) -> Self {
        self.set_aside_stored = true;
        self
    }

    /// Checks the provider's refresh limits before a token request, and records the send
    /// when allowed.
    fn may_send_refresh(&mut self) -> Result<(), RefreshError> {
        let rules = &self.cred.config.refresh_token;
        let now = Instant::now();
        let obtained = self
            .refresh_obtained_ms
            .map(|ms| now - Duration::from_millis(now_ms().saturating_sub(ms)));
        self.sent.make_contiguous();
        let limit = rules.rate_limit.map(|r| (r.count, r.per.0));
        if let Some(at) = policy::refresh_not_before(
            now,
            self.sent.as_slices().0,
            limit,
            obtained,
            rules.min_token_age.map(|d| d.0),
        ) {
            self.not_before = Some(at);
            return Err(RefreshError::ProviderLimit(at - now));
        }
        self.sent.push_back(now);
        let keep = limit.map(|(n, _)| n as usize).unwrap_or(0);
        while self.sent.len() > keep {
            self.sent.pop_front();
        }
        Ok(())
    }

    fn name(&self) -> &str {
        &self.cred.name
    }

    /// Runs until shutdown. An attempt in progress is always finished (never abandoned
    /// between the token endpoint's answer and the durable write).
    pub async fn run(mut self) {
        if self.cred.config.grant == Grant::Static {
            return self.run_static().await;
        }
        // Grants without a store can always get a new token when asked.
        self.cred.set_refreshable(self.store.is_none());
        if self.take_over_pending_write().await.is_err() {
            return;
        }
        let outcome = self.startup().await;
        self.after(outcome);
        let mut store_rx = self.store.as_ref().map(|s| s.watch(&self.cred.name));
        loop {
            let wake = self.next_wakeup();
            self.cred.set_schedule(
                wake.map(|at| {
                    now_ms() + at.saturating_duration_since(Instant::now()).as_millis() as u64
                }),
                self.failures,
            );
            let store_changed = async {
                match &mut store_rx {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                // Stopping wins over a refresh that is due at the same moment.
                biased;
                _ = self.shutdown.cancelled() => return,
                _ = sleep_until(wake) => {
                    if self.cred.usable(Instant::now()).is_some() { Trigger::Scheduled } else { Trigger::Expired }
                }
                _ = self.cred.demand_notify.notified() => {
                    let Some(d) = self.cred.take_demand() else { continue };
                    match self.on_demand(d.trigger, d.generation) {
                        Some(trigger) => trigger,
                        None => continue,
                    }
                }
                ok = store_changed => {
                    if !ok {
                        store_rx = None;
                        continue;
                    }
                    let signal = store_rx.as_mut().map(|rx| rx.borrow_and_update().clone()).unwrap_or_default();
                    if let Some(e) = signal.error {
                        warn!(credential = %self.name(), error = %e, "store unreachable");
                        self.cred.set_store_error(Some(e));
                        continue;
                    }
                    if signal.generation <= self.known_generation {
                        // Reachable again, nothing new.
                        self.cred.set_store_error(None);
                        continue;
                    }
                    let outcome = self.on_store_change().await;
                    self.after(outcome);
                    continue;
                }
            };
            let outcome = self.attempt(trigger).await;
            self.after(outcome);
        }
    }

    /// A request asked for a refresh: the trigger of the attempt to make now, or `None`
    /// (waiters are woken when they should stop waiting; a retry brought forward keeps
    /// them waiting for its outcome).
    fn on_demand(&mut self, trigger: Trigger, generation: u64) -> Option<Trigger> {
        let current = self.cred.usable(Instant::now());
        let decision = decide::on_demand(&decide::Demand {
            trigger,
            generation,
            current: current.as_ref().map(|t| (t.generation, t.was_accepted())),
            idle: self.idle,
            long_lived: self.long_lived,
            backoff: self.cred.backoff(),
            last_401_refresh: self.last_401_refresh,
            now: Instant::now(),
            now_ms: now_ms(),
        });
        match decision {
            OnDemand::WakeWaiters => {
                self.cred.wake_waiters();
                None
            }
            OnDemand::KeepBackoff(moved) => {
                if let Some(moved) = moved {
                    info!(credential = %self.name(), trigger = trigger.as_str(), "requests are waiting for a token: the next refresh attempt is brought forward");
                    self.cred.set_backoff(moved);
                }
                None
            }
            OnDemand::LongLivedRejected => {
                self.long_lived_rejected(current.as_deref());
                None
            }
            OnDemand::Refresh => Some(trigger),
            OnDemand::Upstream401(decision, spacing) => {
                self.last_401_refresh = spacing;
                self.on_401(decision, trigger, generation)
            }
        }
    }

    /// Logs what an upstream 401 set off; the trigger of the attempt to make now, if any.
    fn on_401(&self, decision: On401, trigger: Trigger, generation: u64) -> Option<Trigger> {
        match decision {
            On401::RefreshRevoked => {
                info!(credential = %self.name(), generation, "upstream rejected a token it had accepted before (revoked or expired early): refreshing now");
                Some(trigger)
            }
            On401::RefreshUnproven => {
                info!(credential = %self.name(), generation, "upstream rejected a token it never accepted: refreshing now; repeated rejections of new tokens point to a permission problem and are spaced out");
                Some(trigger)
            }
            On401::Spaced => {
                warn!(credential = %self.name(), generation, "upstream rejected newly issued tokens before ever accepting one (a permission problem rather than an expired token?): not refreshing again yet; the 401 passes through");
                self.cred.wake_waiters();
                None
            }
        }
    }

    /// The upstream answered 401 to the long-lived token: after
    /// [`decide::demand::LONG_LIVED_REJECTIONS`] in a row with no acceptance between, it
    /// is taken as revoked and the credential needs re-authorization.
    fn long_lived_rejected(&mut self, token: Option<&super::ActiveToken>) {
        let accepted_since = token.is_some_and(|t| t.was_accepted());
        let rejections = decide::rejected_long_lived(self.long_lived_rejections, accepted_since);
        self.long_lived_rejections = rejections.in_a_row;
        if let Some(t) = token {
            t.reset_accepted();
        }
        if rejections.revoked {
            self.enter_reauthorization(format!(
                "the upstream rejected the long-lived access token {} times in a row (revoked or expired); obtain a new one",
                decide::demand::LONG_LIVED_REJECTIONS
            ));
            self.idle = true;
        } else {
            warn!(credential = %self.name(), rejections = self.long_lived_rejections, "upstream rejected the long-lived access token; it has no refresh token, so the 401 passes through");
        }
        self.cred.wake_waiters();
    }

    /// When the loop should wake by itself: the earlier of the proactive refresh and
    /// the backoff retry; never while idle.
    fn next_wakeup(&mut self) -> Option<Instant> {
        let (now, now_ms) = (Instant::now(), now_ms());
        let wake = decide::Wake {
            idle: self.idle,
            retry_at_ms: self.cred.backoff().retry_at_ms,
            token: self.cred.current().map(|t| decide::TokenTimes {
                generation: t.generation,
                expires_at: t.expires_at,
                lifetime: t.lifetime,
                expiry_known: t.expiry_known,
            }),
            long_lived: self.long_lived,
            scheduled: self.scheduled,
            now,
            now_ms,
        };
        match decide::wakeup(&wake) {
            Wakeup::Never => None,
            Wakeup::At(at) => Some(at),
            Wakeup::Schedule(token) => {
                let config = &self.cred.config;
                let rules = decide::Proactive {
                    refresh_at: config.refresh_at,
                    refresh_before: config.refresh_before.0,
                    idle_lifetime: config.refresh_token.idle_lifetime.map(|d| d.0),
                    refresh_obtained_ms: self.refresh_obtained_ms,
                    on_demand: config.refresh_mode == crate::config::RefreshMode::OnDemand,
                };
                let jitter01 = self.jitter.gen::<f64>();
                // On demand without a keep-alive: wake only when asked.
                let at = decide::proactive_refresh_at(token, rules, jitter01, now, now_ms)?;
                self.scheduled = Some((token.generation, at));
                Some(at)
            }
        }
    }

    fn after(&mut self, outcome: Attempt) {
        let ended = match outcome {
            Attempt::Done => Ended::Done,
            Attempt::Idle => Ended::Idle,
            Attempt::Failed => {
                let now = Instant::now();
                Ended::Failed(decide::Failed {
                    remaining: self.cred.usable(now).map(|t| t.remaining(now)),
                    jitter01: self.jitter.gen::<f64>(),
                    limits_allow_in: self
                        .not_before
                        .take()
                        .map(|at| at.saturating_duration_since(now)),
                    now_ms: now_ms(),
                })
            }
        };
        let pace = decide::Pace {
            failures: self.failures,
            idle: self.idle,
            backoff: self.cred.backoff(),
        };
        let next = decide::after_attempt(pace, ended);
        self.failures = next.pace.failures;
        self.idle = next.pace.idle;
        self.cred.set_backoff(next.pace.backoff);
        if next.wake_waiters {
            // Now waiting requests can tell whether the retry comes in time for them.
            self.cred.wake_waiters();
        }
    }

    /// Writes the state a stopped predecessor could not (a reload during a store
    /// outage) before anything else: it may hold the only live refresh token. `Err`
    /// when this refresher was stopped in turn and handed it on.
    async fn take_over_pending_write(&mut self) -> Result<(), Failure> {
        let (Some(store), Some(pending)) = (self.store.clone(), self.handover.clone()) else {
            return Ok(());
        };
        let Some(state) = pending.take(self.name()) else {
            return Ok(());
        };
        warn!(credential = %self.name(), generation = state.generation, "the new refresher takes over the write of a rotated refresh token the store has not kept yet");
        match self.write_durably(&store, state).await {
            Ok(written) => {
                info!(credential = %self.name(), generation = written.generation, "the rotated refresh token handed over is stored");
                Ok(())
            }
            Err(Failure::HandedOver) => Err(Failure::HandedOver),
            // Superseded by a seed or authorize: startup reads what won.
            Err(_) => Ok(()),
        }
    }

    async fn startup(&mut self) -> Attempt {
        if self.store.is_none() {
            return self.attempt(Trigger::Startup).await;
        }
        match self.load().await {
            None => Attempt::Failed,
            Some(None) => {
                self.cred.set_unavailable_reason(Some(format!(
                    "no refresh token stored yet: run `tokenrelay seed --credential {0}` or `tokenrelay authorize --credential {0}`",
                    self.name()
                )));
                warn!(credential = %self.name(), "no refresh token stored; waiting for seed or authorize");
                self.cred.wake_waiters();
                Attempt::Idle
            }
            Some(Some(state)) => {
                self.known_generation = state.generation;
                self.note_state(&state);
                if self.stays_idle(&state) {
                    return Attempt::Idle;
                }
                if self.publish_stored(&state) {
                    info!(credential = %self.name(), generation = state.generation, "using the stored access token");
                    self.cred
                        .record(Trigger::Startup, RefreshResult::Adopted, None, None);
                    return Attempt::Done;
                }
                self.attempt(Trigger::Startup).await
            }
        }
    }

    /// Loads the stored state; `None` when the store failed (recorded as degraded).
    async fn load(&mut self) -> Option<Option<StoredState>> {
        let store = self.store.as_ref()?;
        match store.load(self.name()).await {
            Ok(s) => {
                // The first state read after an identity change is the old identity's.
                if self.set_aside_stored && self.foreign_up_to.is_none() {
                    self.foreign_up_to = Some(s.as_ref().map_or(0, |s| s.generation));
                }
                self.metrics.store_op("load", true);
                self.cred.set_store_error(None);
                Some(s)
            }
            Err(e) => {
                self.metrics.store_op("load", false);
                warn!(credential = %self.name(), error = %e, "store unavailable");
                self.cred.set_store_error(Some(e.to_string()));
                None
            }
        }
    }

    /// Takes note of a stored state's refresh-token facts (its expiry for `/status` and
    /// the metrics, when it was obtained for the keep-alive refresh).
    fn note_state(&mut self, s: &StoredState) {
        self.newest_authorization_ms = self.newest_authorization_ms.max(s.authorized_at_ms);
        self.cred
            .set_refresh_expiry(s.refresh_expires_at_ms, s.refresh_expires_estimated);
        self.cred.set_refresh_life(
            s.refresh_token.as_ref().map(|_| s.obtained_at_ms),
            s.authorized_at_ms,
        );
        self.refresh_obtained_ms = s.refresh_token.as_ref().map(|_| s.obtained_at_ms);
        self.cred.set_refreshable(s.refresh_token.is_some());
        if !self.cred.config.refresh_token.rotating {
            self.remembered_refresh_token = s.refresh_token.clone();
        }
    }

    /// Publishes a stored access token if it is worth adopting; true if it did.
    fn publish_stored(&mut self, s: &StoredState) -> bool {
        self.note_state(s);
        let (Some(adoptable), Some(tok)) = (decide::worth_adopting(s, now_ms()), &s.access_token)
        else {
            return false;
        };
        if let Err(e) = self.cred.publish_with_fields(
            tok,
            s.generation,
            adoptable.expires,
            s.answer_fields.clone(),
            // Adopted from the store: what the answer refused was logged where
            // it arrived.
            &Default::default(),
        ) {
            warn!(credential = %self.name(), generation = s.generation, error = %e, "the stored access token is unusable");
            return false;
        }
        self.long_lived = s.is_long_lived();
        self.long_lived_rejections = 0;
        self.cred.set_reauthorization(None);
        true
    }

    /// Whether a stored state leaves nothing to do until the store changes again (see
    /// [`decide::hold`]); acts on it.
    fn stays_idle(&self, s: &StoredState) -> bool {
        let ours = self.cred.config.token_endpoint_identity();
        self.hold(decide::hold(s, self.foreign_up_to, &ours))
    }

    /// Acts on what [`decide::hold`] said; true if there is nothing to do. A handed-over
    /// credential (`tokenrelay export`) shows `moved`; a state without the marker (an
    /// import) lifts it.
    fn hold(&self, hold: Option<Hold>) -> bool {
        match hold {
            None => {
                self.cred.set_moved(None);
                false
            }
            Some(Hold::Moved(m)) => {
                warn!(credential = %self.name(), to = %m.to, "credential moved to another environment; this one stops using and refreshing it");
                self.cred.clear();
                self.cred.set_moved(Some(m));
                true
            }
            Some(h) => {
                if matches!(h, Hold::Reauthorization(_)) {
                    self.cred.set_moved(None);
                }
                if let Some(why) = h.reauthorization_reason(self.name()) {
                    self.enter_reauthorization(why);
                }
                true
            }
        }
    }

    fn enter_reauthorization(&self, why: String) {
        error!(credential = %self.name(), reason = %why, "re-authorization required (run `tokenrelay seed` or `tokenrelay authorize`)");
        self.cred.clear();
        self.cred.set_reauthorization(Some(why));
    }

    /// Another process (replica, `seed`, `authorize`) changed the stored state.
    async fn on_store_change(&mut self) -> Attempt {
        let unchanged = if self.idle {
            Attempt::Idle
        } else {
            Attempt::Done
        };
        let Some(Some(state)) = self.load().await else {
            return unchanged;
        };
        if state.generation <= self.known_generation {
            return unchanged;
        }
        self.known_generation = state.generation;
        if self.stays_idle(&state) {
            return Attempt::Idle;
        }
        if self.publish_stored(&state) {
            info!(credential = %self.name(), generation = state.generation, by = %state.updated_by, "adopted token rotated elsewhere");
            self.cred
                .record(Trigger::Scheduled, RefreshResult::Adopted, None, None);
            return Attempt::Done;
        }
        match decide::unadopted(&state) {
            Unadopted::Redeem => {
                self.cred.set_reauthorization(None);
                self.cred.set_unavailable_reason(None);
                self.idle = false;
                self.attempt(Trigger::Startup).await
            }
            Unadopted::Wait => Attempt::Idle,
        }
    }

    /// One refresh attempt for `trigger`, recorded in metrics and `/status`.
    async fn attempt(&mut self, trigger: Trigger) -> Attempt {
        let started = Instant::now();
        let outcome = match self.cred.config.grant {
            Grant::RefreshToken => self.refresh_rotating(trigger).await,
            Grant::ClientCredentials => self.refresh_local(GrantRequest::ClientCredentials).await,
            Grant::Password => self.refresh_local(GrantRequest::Password).await,
            Grant::JwtBearer => self.refresh_local(GrantRequest::JwtBearer).await,
            Grant::Static => Ok(RefreshResult::Success),
        };
        let took = started.elapsed();
        match outcome {
            Ok(result) => {
                let t = self.cred.current();
                info!(
                    credential = %self.name(),
                    trigger = trigger.as_str(),
                    result = result.as_str(),
                    duration_ms = took.as_millis() as u64,
                    generation = t.as_ref().map(|t| t.generation),
                    expires_at = %t.as_ref().map(|t| humantime::format_rfc3339_seconds(t.expires_at_wall).to_string()).unwrap_or_default(),
                    "token refresh"
                );
                self.cred.record(trigger, result, None, Some(took));
                Attempt::Done
            }
            Err(Failure::Idle | Failure::HandedOver) => Attempt::Idle,
            Err(Failure::Error(e)) => {
                warn!(
                    credential = %self.name(),
                    trigger = trigger.as_str(),
                    result = "failure",
                    duration_ms = took.as_millis() as u64,
                    error = %e,
                    "token refresh"
                );
                self.cred.record(
                    trigger,
                    RefreshResult::Failure,
                    Some(e.to_string()),
                    Some(took),
                );
                Attempt::Failed
            }
        }
    }
}

enum Failure {
    /// Logged and retried with backoff.
    Error(RefreshError),
    /// Nothing to do until the store changes; already reported.
    Idle,
    /// Stopping: the durable write of this attempt is left to the next refresher.
    HandedOver,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::IssuedTo;

    /// A refresher of credential `crm` whose token endpoint identity a reload changed,
    /// having found generation 5 in the store.
    fn after_identity_change() -> Refresher {
        let yaml = "credentials:\n  crm: { grant: refresh_token, token_url: \"https://idp.example/token\", client_id: b }\nupstreams:\n  crm: { listen: \"127.0.0.1:0\", url: \"https://api.example\", credential: crm }\n";
        let config = crate::config::Config::from_yaml(yaml, &|_| None).unwrap();
        let metrics = Arc::new(Metrics::new());
        let cred = Arc::new(Credential::new(
            Arc::new(config.credentials["crm"].clone()),
            metrics.clone(),
        ));
        let mut r = Refresher::new(cred, None, None, "test".into(), metrics, Default::default())
            .unwrap()
            .set_aside_stored_state();
        r.foreign_up_to = Some(5);
        r
    }

    fn stored(generation: u64, client_id: Option<&str>) -> StoredState {
        StoredState {
            generation,
            refresh_token: Some(crate::secret::Secret::new("r")),
            issued_to: client_id.map(|id| IssuedTo {
                token_url: "https://idp.example/token".into(),
                client_id: id.into(),
            }),
            ..Default::default()
        }
    }

    /// A state that records whom it was issued to is judged by that, so a reload back
    /// to the identity it names (A → B → A) uses it; one that does not is set aside.
    #[test]
    fn stored_states_after_an_identity_change() {
        let r = after_identity_change();
        assert!(
            !r.stays_idle(&stored(5, Some("b"))),
            "issued to this client"
        );
        assert!(
            r.stays_idle(&stored(5, Some("a"))),
            "issued to another client"
        );
        assert!(r.stays_idle(&stored(5, None)), "an older version's state");
        assert!(!r.stays_idle(&stored(6, None)), "written after the change");
    }
}
