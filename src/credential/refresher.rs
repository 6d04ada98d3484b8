//! The refresher: one task per credential, the only writer of its cell.
//!
//! It refreshes proactively (see [`schedule`]), on demand (expired token, upstream 401),
//! adopts changes other processes wrote to the store, and backs off on failure. For the
//! rotating `refresh_token` grant it follows the store protocol of DESIGN.md: take the
//! lease, re-read, adopt if the generation moved, else call the token endpoint, write the
//! new state with compare-and-swap durably, and only then publish it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::schedule;
use super::{Credential, RefreshResult, Trigger};
use crate::config::Grant;
use crate::metrics::Metrics;
use crate::oauth::{GrantRequest, TokenAnswer, TokenClient, TokenError};
use crate::secret::Secret;
use crate::store::{now_ms, CasOutcome, Lease, Store, StoredState};

/// How long a lease is taken for: well above the token request timeout, so a lease
/// cannot expire while its holder waits for the token endpoint.
pub fn lease_ttl(token_timeout: Duration) -> Duration {
    token_timeout * 3 + Duration::from_secs(5)
}

/// Spacing of consecutive 401-driven refreshes: the first is immediate, then at least
/// 1 s apart, doubling while they keep coming, up to a minute.
const MIN_401_GAP: Duration = Duration::from_secs(1);
const MAX_401_GAP: Duration = Duration::from_secs(60);

/// How often a static token's `token_file` is re-read (mounted secrets are replaced in
/// place when rotated).
const STATIC_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

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
    client: Option<TokenClient>,
    store: Option<Arc<dyn Store>>,
    instance_id: String,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Newest stored generation this process has seen or written.
    known_generation: u64,
    /// Consecutive failures, for backoff.
    failures: u32,
    retry_at: Option<Instant>,
    /// Proactive refresh time of the current token: (generation, when).
    scheduled: Option<(u64, Instant)>,
    idle: bool,
    /// When the last 401-driven refresh started, and the gap required before the next.
    last_401_refresh: Option<(Instant, Duration)>,
}

impl Refresher {
    pub fn new(
        cred: Arc<Credential>,
        store: Option<Arc<dyn Store>>,
        instance_id: String,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Refresher, String> {
        let client = match cred.config.grant {
            Grant::Static => None,
            _ => Some(TokenClient::new(cred.config.clone())?),
        };
        let store = if cred.config.grant == Grant::RefreshToken {
            store
        } else {
            None
        };
        Ok(Refresher {
            cred,
            client,
            store,
            instance_id,
            metrics,
            shutdown,
            known_generation: 0,
            failures: 0,
            retry_at: None,
            scheduled: None,
            idle: false,
            last_401_refresh: None,
        })
    }

    /// A static token: published at once; a `token_file` is re-read every
    /// [`STATIC_RELOAD_INTERVAL`] and after an upstream 401, and a changed token becomes
    /// the next generation. A 401 with nothing new is passed through without waiting.
    async fn run_static(self) {
        // A static token does not expire; a century stands in for "never".
        let never = || SystemTime::now() + Duration::from_secs(100 * 365 * 86400);
        let mut token = self.cred.config.static_token.clone().expect("validated");
        let mut generation = 1;
        if let Err(e) = self.cred.publish(&token, generation, never()) {
            // Checked by the config already; reported rather than trusted.
            self.cred.record(
                Trigger::Startup,
                RefreshResult::Failure,
                Some(e.to_string()),
                None,
            );
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
                        .publish(&fresh, generation + 1, never())
                        .map(|()| Some(fresh))
                        .map_err(|e| format!("{}: {e}", f.display()))
                })
            });
            match read {
                Some(Ok(Some(fresh))) => {
                    token = fresh;
                    generation += 1;
                    self.cred
                        .record(trigger, RefreshResult::Success, None, None);
                    info!(credential = %self.name(), generation, trigger = trigger.as_str(), "static token reloaded from its token_file");
                    last_error = None;
                    continue;
                }
                Some(Err(e)) => {
                    // Reported once per distinct problem; the previous token stays in use.
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
            // Nothing newer: requests waiting after a 401 pass it on now.
            self.cred.wake_waiters();
        }
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
        let outcome = self.startup().await;
        self.after(outcome);
        let mut store_rx = self.store.as_ref().map(|s| s.watch(&self.cred.name));
        loop {
            let wake = self.next_wakeup();
            let store_changed = async {
                match &mut store_rx {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = sleep_until(wake) => {
                    if self.cred.usable(Instant::now()).is_some() { Trigger::Scheduled } else { Trigger::Expired }
                }
                _ = self.cred.demand_notify.notified() => {
                    let Some(d) = self.cred.take_demand() else { continue };
                    let now = Instant::now();
                    let current = self.cred.usable(now);
                    let satisfied = current.as_ref().is_some_and(|t| t.generation > d.generation);
                    // Failing refreshes keep their backoff even when requests ask.
                    let backing_off = self.failures > 0 && self.retry_at.is_some_and(|t| t > now);
                    // An upstream that rejects every token must not spin the rotation:
                    // 401-driven refreshes in quick succession are spaced out exponentially.
                    let too_soon = d.trigger == Trigger::Upstream401
                        && self.last_401_refresh.is_some_and(|(at, gap)| now < at + gap);
                    if satisfied || self.idle || backing_off || too_soon {
                        self.cred.wake_waiters();
                        continue;
                    }
                    if d.trigger == Trigger::Upstream401 {
                        let gap = match self.last_401_refresh {
                            Some((at, gap)) if now < at + MAX_401_GAP => (gap * 2).clamp(MIN_401_GAP, MAX_401_GAP),
                            _ => MIN_401_GAP,
                        };
                        self.last_401_refresh = Some((now, gap));
                    }
                    d.trigger
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

    /// When the loop should wake by itself: the earlier of the proactive refresh and
    /// the backoff retry; never while idle.
    fn next_wakeup(&mut self) -> Option<Instant> {
        if self.idle {
            return None;
        }
        if let Some(at) = self.retry_at {
            return Some(at);
        }
        let token = self.cred.current()?;
        match self.scheduled {
            Some((g, at)) if g == token.generation => Some(at),
            _ => {
                let lifetime = token.lifetime;
                let after = schedule::refresh_after(
                    lifetime,
                    self.cred.config.refresh_at,
                    self.cred.config.refresh_before.0,
                    rand::random::<f64>(),
                );
                // `expires_at - lifetime` is when the token was published here.
                let at = token.expires_at - lifetime + after;
                self.scheduled = Some((token.generation, at));
                Some(at)
            }
        }
    }

    fn after(&mut self, outcome: Attempt) {
        match outcome {
            Attempt::Done => {
                self.failures = 0;
                self.retry_at = None;
                self.idle = false;
            }
            Attempt::Idle => {
                self.retry_at = None;
                self.idle = true;
                self.cred.wake_waiters();
            }
            Attempt::Failed => {
                let remaining = self
                    .cred
                    .usable(Instant::now())
                    .map(|t| t.remaining(Instant::now()));
                let delay = schedule::backoff(self.failures, remaining, rand::random::<f64>());
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(Instant::now() + delay);
                self.cred.set_retry_not_before(delay);
            }
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
                if let Some(why) = &state.reauthorization_required {
                    self.enter_reauthorization(why.clone());
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
    async fn load(&self) -> Option<Option<StoredState>> {
        let store = self.store.as_ref()?;
        match store.load(self.name()).await {
            Ok(s) => {
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

    /// Publishes a stored access token if it is still usable; true if it did.
    fn publish_stored(&self, s: &StoredState) -> bool {
        let (Some(tok), Some(exp)) = (&s.access_token, s.access_expires_at_ms) else {
            return false;
        };
        let expires = SystemTime::UNIX_EPOCH + Duration::from_millis(exp);
        // Worth adopting only if it outlives the margin the cell applies anyway.
        let lifetime = Duration::from_millis(exp.saturating_sub(s.obtained_at_ms));
        let margin = super::EXPIRY_MARGIN.min(lifetime / 4);
        if exp <= now_ms() + margin.as_millis() as u64 {
            return false;
        }
        if let Err(e) = self.cred.publish(tok, s.generation, expires) {
            warn!(credential = %self.name(), generation = s.generation, error = %e, "the stored access token is unusable");
            return false;
        }
        self.cred.set_reauthorization(None);
        true
    }

    fn enter_reauthorization(&self, why: String) {
        error!(credential = %self.name(), reason = %why, "refresh token rejected: re-authorization required (run `tokenrelay seed` or `tokenrelay authorize`)");
        self.cred.clear();
        self.cred.set_reauthorization(Some(why));
    }

    /// Another process (replica, `seed`, `authorize`) changed the stored state.
    async fn on_store_change(&mut self) -> Attempt {
        let Some(Some(state)) = self.load().await else {
            return if self.idle {
                Attempt::Idle
            } else {
                Attempt::Done
            };
        };
        if state.generation <= self.known_generation {
            return if self.idle {
                Attempt::Idle
            } else {
                Attempt::Done
            };
        }
        self.known_generation = state.generation;
        if let Some(why) = &state.reauthorization_required {
            self.enter_reauthorization(why.clone());
            return Attempt::Idle;
        }
        if self.publish_stored(&state) {
            info!(credential = %self.name(), generation = state.generation, by = %state.updated_by, "adopted token rotated elsewhere");
            self.cred
                .record(Trigger::Scheduled, RefreshResult::Adopted, None, None);
            return Attempt::Done;
        }
        if state.refresh_token.is_some() {
            // A seeded refresh token without an access token: redeem it now.
            self.cred.set_reauthorization(None);
            self.cred.set_unavailable_reason(None);
            self.idle = false;
            return self.attempt(Trigger::Startup).await;
        }
        Attempt::Idle
    }

    /// One refresh attempt for `trigger`, recorded in metrics and `/status`.
    async fn attempt(&mut self, trigger: Trigger) -> Attempt {
        let started = Instant::now();
        let outcome = match self.cred.config.grant {
            Grant::RefreshToken => self.refresh_rotating(trigger).await,
            Grant::ClientCredentials => self.refresh_local(GrantRequest::ClientCredentials).await,
            Grant::Password => self.refresh_local(GrantRequest::Password).await,
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
            Err(Failure::Idle) => Attempt::Idle,
            Err(Failure::Error(e)) => {
                warn!(
                    credential = %self.name(),
                    trigger = trigger.as_str(),
                    result = "failure",
                    duration_ms = took.as_millis() as u64,
                    error = %e,
                    "token refresh"
                );
                self.cred
                    .record(trigger, RefreshResult::Failure, Some(e), Some(took));
                Attempt::Failed
            }
        }
    }

    /// Grants with nothing to spend (client_credentials, password): ask, publish.
    async fn refresh_local(&mut self, grant: GrantRequest<'_>) -> Result<RefreshResult, Failure> {
        let client = self.client.as_ref().expect("non-static grant has a client");
        let resp = client
            .request(grant)
            .await
            .and_then(TokenAnswer::into_response)
            .map_err(|e| Failure::Error(e.to_string()))?;
        let generation = self.cred.current().map(|t| t.generation).unwrap_or(0) + 1;
        self.cred
            .publish(
                &resp.access_token,
                generation,
                SystemTime::now() + resp.expires_in,
            )
            .map_err(|e| Failure::Error(e.to_string()))?;
        Ok(RefreshResult::Success)
    }

    /// The rotating refresh protocol; see the module docs.
    async fn refresh_rotating(&mut self, trigger: Trigger) -> Result<RefreshResult, Failure> {
        let store = self.store.clone().expect("refresh_token grant has a store");
        let ttl = lease_ttl(self.cred.config.token_timeout.0);
        let deadline = Instant::now() + ttl;
        let lease = loop {
            match store.try_lease(self.name(), ttl).await {
                Ok(Some(lease)) => {
                    self.metrics.store_op("lease", true);
                    break lease;
                }
                Ok(None) => {
                    // Another process is refreshing: adopt its result as soon as it lands.
                    if let Some(Some(s)) = self.load().await {
                        if s.generation > self.known_generation && self.publish_stored(&s) {
                            self.known_generation = s.generation;
                            return Ok(RefreshResult::Adopted);
                        }
                    }
                    if Instant::now() >= deadline || self.shutdown.is_cancelled() {
                        return Err(Failure::Error(
                            "refresh lease is held by another process".into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    self.metrics.store_op("lease", false);
                    self.cred.set_store_error(Some(e.to_string()));
                    return Err(Failure::Error(format!(
                        "cannot take the refresh lease: {e}"
                    )));
                }
            }
        };
        let result = self.refresh_holding(lease.as_ref(), trigger, &store).await;
        lease.release().await;
        result
    }

    async fn refresh_holding(
        &mut self,
        lease: &dyn Lease,
        trigger: Trigger,
        store: &Arc<dyn Store>,
    ) -> Result<RefreshResult, Failure> {
        let stored = match self.load().await {
            None => return Err(Failure::Error("store unavailable".into())),
            Some(None) => {
                self.cred.set_unavailable_reason(Some(format!(
                    "no refresh token stored yet: run `tokenrelay seed --credential {}`",
                    self.name()
                )));
                return Err(Failure::Idle);
            }
            Some(Some(s)) => s,
        };
        if let Some(why) = &stored.reauthorization_required {
            self.known_generation = stored.generation;
            self.enter_reauthorization(why.clone());
            return Err(Failure::Idle);
        }
        if stored.generation != self.known_generation {
            // Rotated by another process since we last looked: adopt unless its token is
            // itself due (then we refresh it, holding the lease).
            let due = match (stored.access_expires_at_ms, trigger) {
                (_, Trigger::Startup) => false,
                (Some(exp), _) => {
                    let left = Duration::from_millis(exp.saturating_sub(now_ms()));
                    let life = Duration::from_millis(exp.saturating_sub(stored.obtained_at_ms));
                    left <= schedule::lead(
                        life,
                        self.cred.config.refresh_at,
                        self.cred.config.refresh_before.0,
                    ) / 2
                }
                (None, _) => true,
            };
            if !due && self.publish_stored(&stored) {
                self.known_generation = stored.generation;
                return Ok(RefreshResult::Adopted);
            }
        }
        self.known_generation = stored.generation;
        let Some(refresh_token) = stored.refresh_token.clone() else {
            self.enter_reauthorization("no refresh token is stored".into());
            return Err(Failure::Idle);
        };
        let timeout = self.cred.config.token_timeout.0;
        if !lease.is_held_for(timeout + Duration::from_secs(1)).await {
            return Err(Failure::Error(
                "refresh lease is about to expire; not sending the refresh token".into(),
            ));
        }
        let client = self.client.as_ref().expect("refresh grant has a client");
        match client
            .request(GrantRequest::RefreshToken(&refresh_token))
            .await
        {
            Ok(resp) => self.commit(store, &stored, refresh_token, resp).await,
            Err(e) if e.is_invalid_grant() => self.rejected(store, &stored, e).await,
            Err(e) => Err(Failure::Error(e.to_string())),
        }
    }

    /// Makes what the answer carries durable, then publishes it. The old refresh token
    /// is dead at the server now, so the write is retried until it succeeds (bounded only
    /// by shutdown grace, after which the loss is logged loudly). A new refresh token is
    /// stored even when the answer's access-token part is unusable: the attempt then
    /// fails, the current access token keeps serving, and the next attempt presents the
    /// new refresh token.
    async fn commit(
        &mut self,
        store: &Arc<dyn Store>,
        stored: &StoredState,
        old_refresh: Secret,
        answer: TokenAnswer,
    ) -> Result<RefreshResult, Failure> {
        let now = now_ms();
        let access = match answer.access {
            Ok(access) => access,
            Err(e) => {
                let Some(refresh_token) = answer.refresh_token else {
                    // Nothing new to keep: the presented refresh token is still the live one.
                    return Err(Failure::Error(e.to_string()));
                };
                let new = StoredState {
                    generation: stored.generation + 1,
                    refresh_token: Some(refresh_token),
                    updated_at_ms: now,
                    updated_by: self.instance_id.clone(),
                    reauthorization_required: None,
                    // The stored access token is still the one in use.
                    ..stored.clone()
                };
                self.write_durably(store, stored.generation, &new).await?;
                self.known_generation = new.generation;
                warn!(credential = %self.name(), generation = new.generation,
                    "token endpoint rotated the refresh token but its access token is unusable; the new refresh token is stored, the current access token stays in use");
                return Err(Failure::Error(format!(
                    "{e} (the new refresh token was stored; the next refresh uses it)"
                )));
            }
        };
        let new = StoredState {
            generation: stored.generation + 1,
            access_expires_at_ms: Some(now + access.expires_in.as_millis() as u64),
            access_token: Some(access.token),
            // RFC 6749 §6: no refresh_token in the answer means the old one stays valid.
            refresh_token: Some(answer.refresh_token.unwrap_or(old_refresh)),
            obtained_at_ms: now,
            updated_at_ms: now,
            updated_by: self.instance_id.clone(),
            reauthorization_required: None,
        };
        self.write_durably(store, stored.generation, &new).await?;
        self.known_generation = new.generation;
        self.cred
            .publish(
                new.access_token.as_ref().expect("set above"),
                new.generation,
                SystemTime::UNIX_EPOCH
                    + Duration::from_millis(new.access_expires_at_ms.unwrap_or(now)),
            )
            .map_err(|e| Failure::Error(e.to_string()))?;
        Ok(RefreshResult::Success)
    }

    /// Compare-and-swap of `new` over generation `expected`, retried while the store
    /// fails (the answer being written may hold the only live refresh token).
    async fn write_durably(
        &mut self,
        store: &Arc<dyn Store>,
        expected: u64,
        new: &StoredState,
    ) -> Result<(), Failure> {
        let mut delay = Duration::from_millis(50);
        let mut grace_deadline: Option<Instant> = None;
        loop {
            match store.compare_and_swap(self.name(), expected, new).await {
                Ok(CasOutcome::Swapped) => {
                    self.metrics.store_op("compare_and_swap", true);
                    self.cred.set_store_error(None);
                    return Ok(());
                }
                Ok(CasOutcome::Conflict { current_generation })
                    if current_generation == new.generation
                        && self.is_our_write(store, new).await =>
                {
                    // An earlier attempt was written but its answer was lost.
                    self.metrics.store_op("compare_and_swap", true);
                    self.cred.set_store_error(None);
                    return Ok(());
                }
                Ok(CasOutcome::Conflict { current_generation }) => {
                    self.metrics.store_op("compare_and_swap", false);
                    // Only a write without the lease (seed/authorize) can get here; the
                    // operator's new state wins and is adopted through the watch.
                    error!(credential = %self.name(), expected, found = current_generation,
                        "stored state changed during a refresh (seed or authorize?); keeping the stored state");
                    return Err(Failure::Error("stored state changed during refresh".into()));
                }
                Err(e) => {
                    self.metrics.store_op("compare_and_swap", false);
                    self.cred.set_store_error(Some(e.to_string()));
                    error!(credential = %self.name(), error = %e, "cannot persist the rotated token yet; retrying");
                    if self.shutdown.is_cancelled() {
                        let d = *grace_deadline
                            .get_or_insert_with(|| Instant::now() + Duration::from_secs(10));
                        if Instant::now() >= d {
                            error!(credential = %self.name(), "giving up persisting the rotated token at shutdown; re-authorization will be needed");
                            return Err(Failure::Error(
                                "rotated token could not be persisted".into(),
                            ));
                        }
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// True if the store holds exactly `new` (same generation and refresh token).
    async fn is_our_write(&self, store: &Arc<dyn Store>, new: &StoredState) -> bool {
        matches!(store.load(self.name()).await,
            Ok(Some(s)) if s.generation == new.generation && s.refresh_token == new.refresh_token)
    }

    /// `invalid_grant`: adopt if another process rotated meanwhile, else record that a
    /// human must re-authorize, so no process presents the dead token again.
    async fn rejected(
        &mut self,
        store: &Arc<dyn Store>,
        stored: &StoredState,
        e: TokenError,
    ) -> Result<RefreshResult, Failure> {
        if let Some(Some(now)) = self.load().await {
            if now.generation != stored.generation {
                self.known_generation = now.generation;
                if self.publish_stored(&now) {
                    return Ok(RefreshResult::Adopted);
                }
                return Err(Failure::Error(format!(
                    "{e}; the stored state changed meanwhile, retrying with it"
                )));
            }
        }
        let why = e.to_string();
        let t = now_ms();
        let marker = StoredState {
            generation: stored.generation + 1,
            access_token: None,
            access_expires_at_ms: None,
            refresh_token: None,
            obtained_at_ms: stored.obtained_at_ms,
            updated_at_ms: t,
            updated_by: self.instance_id.clone(),
            reauthorization_required: Some(why.clone()),
        };
        match store
            .compare_and_swap(self.name(), stored.generation, &marker)
            .await
        {
            Ok(CasOutcome::Swapped) => {
                self.metrics.store_op("compare_and_swap", true);
                self.known_generation = marker.generation;
            }
            Ok(CasOutcome::Conflict { .. }) => {
                self.metrics.store_op("compare_and_swap", false);
                return Err(Failure::Error(format!(
                    "{e}; the stored state changed meanwhile"
                )));
            }
            Err(se) => {
                self.metrics.store_op("compare_and_swap", false);
                warn!(credential = %self.name(), error = %se, "cannot record the rejection in the store");
            }
        }
        self.enter_reauthorization(why.clone());
        self.cred
            .record(Trigger::Scheduled, RefreshResult::Failure, Some(why), None);
        Err(Failure::Idle)
    }
}

enum Failure {
    /// Logged and retried with backoff.
    Error(String),
    /// Nothing to do until the store changes; already reported.
    Idle,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
