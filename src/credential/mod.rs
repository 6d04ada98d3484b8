//! A credential at run time: the lock-free cell holding the current access token (read by
//! every proxied request), its state for `/status` and metrics, and the on-demand path by
//! which requests ask the credential's single refresher for a new token and wait for it.

pub mod refresher;
pub mod schedule;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::config::CredentialConfig;
use crate::metrics::{CredentialMetrics, Metrics, STATES};
use crate::secret::{InvalidToken, Secret};

/// A token is treated as expired this long before its stated expiry (clock skew and the
/// time the request spends in flight), capped at a quarter of its lifetime.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// What started a refresh (the `trigger` metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Startup,
    Scheduled,
    Expired,
    Upstream401,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Scheduled => "scheduled",
            Trigger::Expired => "expired",
            Trigger::Upstream401 => "upstream_401",
        }
    }
}

/// Result of a refresh (the `result` metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshResult {
    Success,
    Failure,
    Adopted,
}

impl RefreshResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshResult::Success => "success",
            RefreshResult::Failure => "failure",
            RefreshResult::Adopted => "adopted",
        }
    }
}

/// Credential states of `/status` (DESIGN.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Initializing,
    Ready,
    Degraded,
    Unavailable,
    ReauthorizationRequired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        STATES[self as usize]
    }
}

/// The access token currently in use, with its header values built once per refresh.
pub struct ActiveToken {
    pub generation: u64,
    /// One value per header format of the upstreams using this credential, marked
    /// sensitive so HTTP/2 never indexes it.
    headers: Box<[HeaderValue]>,
    pub expires_at: Instant,
    pub expires_at_wall: SystemTime,
    /// `expires_at` minus the safety margin: after this the token is not sent.
    usable_until: Instant,
    pub lifetime: Duration,
}

impl std::fmt::Debug for ActiveToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveToken")
            .field("generation", &self.generation)
            .field("expires_at", &self.expires_at)
            .field("value", &crate::secret::REDACTED)
            .finish()
    }
}

impl ActiveToken {
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    pub fn remaining(&self, now: Instant) -> Duration {
        self.usable_until.saturating_duration_since(now)
    }
}

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

/// Mutable, rarely-written facts behind `/status`.
#[derive(Debug, Default)]
struct Facts {
    last_refresh: Option<LastRefresh>,
    /// Set while refreshes fail; cleared by a success.
    failing: bool,
    /// Set while the store is unreachable.
    store_error: Option<String>,
    /// Why a human must seed/authorize again; the refresher stays idle until the stored
    /// state changes.
    reauthorization: Option<String>,
    /// Why there is no token yet, when known (e.g. nothing stored).
    unavailable_reason: Option<String>,
    attempted: bool,
    last_success: Option<SystemTime>,
}

/// A request for a refresh, coalesced: only the newest is kept.
#[derive(Clone, Copy, Debug)]
struct Demand {
    trigger: Trigger,
    /// Generation the requester saw; a refresh already past it satisfies the demand.
    generation: u64,
}

/// Why a request cannot get a token.
#[derive(Debug, Clone, PartialEq)]
pub enum NoToken {
    ReauthorizationRequired(String),
    Unavailable(String),
}

impl std::fmt::Display for NoToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoToken::ReauthorizationRequired(why) => {
                write!(f, "credential needs re-authorization: {why}")
            }
            NoToken::Unavailable(why) => write!(f, "no valid access token: {why}"),
        }
    }
}

/// One credential: its cell, state, and the channel to its refresher.
pub struct Credential {
    pub name: String,
    pub config: Arc<CredentialConfig>,
    /// Header formats of the upstreams using this credential, indexed by format slot.
    formats: Vec<String>,
    /// Written only by the refresher; read lock-free by every request.
    cell: ArcSwapOption<ActiveToken>,
    facts: Mutex<Facts>,
    demand: Mutex<Option<Demand>>,
    demand_notify: Notify,
    /// Incremented when a refresh attempt finishes, whatever its result.
    attempts: watch::Sender<u64>,
    /// Unix ms before which a request finding no token fails at once instead of asking
    /// for another attempt (backoff applies to on-demand refreshes too).
    retry_not_before_ms: AtomicU64,
    pub metrics: CredentialMetrics,
    registry: Arc<Metrics>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

impl Credential {
    /// A credential with no token yet; `formats` are the header formats using it.
    pub fn new(config: Arc<CredentialConfig>, formats: Vec<String>, metrics: Arc<Metrics>) -> Self {
        let (attempts, _) = watch::channel(0);
        let c = Credential {
            name: config.name.clone(),
            metrics: metrics.credential(&config.name),
            config,
            formats,
            cell: ArcSwapOption::empty(),
            facts: Mutex::new(Facts::default()),
            demand: Mutex::new(None),
            demand_notify: Notify::new(),
            attempts,
            retry_not_before_ms: AtomicU64::new(0),
            registry: metrics,
        };
        c.update_gauges();
        c
    }

    /// Index of `format` among this credential's header formats.
    pub fn format_slot(&self, format: &str) -> Option<usize> {
        self.formats.iter().position(|f| f == format)
    }

    /// The current token if it is still usable: one atomic load, no locks.
    pub fn usable(&self, now: Instant) -> Option<Arc<ActiveToken>> {
        let guard = self.cell.load();
        match &*guard {
            Some(t) if t.is_usable(now) => Some(t.clone()),
            _ => None,
        }
    }

    /// The current token, usable or not.
    pub fn current(&self) -> Option<Arc<ActiveToken>> {
        self.cell.load_full()
    }

    /// The header value for `slot` of a token.
    pub fn header(token: &ActiveToken, slot: usize) -> HeaderValue {
        token.headers[slot].clone()
    }

    /// The header value for `slot` of a token, as bytes.
    pub fn header_bytes(token: &ActiveToken, slot: usize) -> &[u8] {
        token.headers[slot].as_bytes()
    }

    /// A usable token, waiting for the single in-flight refresh when the current one has
    /// expired. Fails promptly when no token can be had (backoff, re-authorization).
    pub async fn acquire(&self) -> Result<Arc<ActiveToken>, NoToken> {
        if let Some(t) = self.usable(Instant::now()) {
            return Ok(t);
        }
        self.wait_for_refresh(Trigger::Expired, None).await
    }

    /// After an upstream 401 to `generation`: a newer token, refreshing once if nobody has
    /// yet (100 concurrent 401s to the same generation cause one refresh).
    pub async fn after_401(&self, generation: u64) -> Result<Arc<ActiveToken>, NoToken> {
        if let Some(t) = self.usable(Instant::now()) {
            if t.generation > generation {
                return Ok(t);
            }
        }
        let t = self
            .wait_for_refresh(Trigger::Upstream401, Some(generation))
            .await?;
        if t.generation > generation {
            Ok(t)
        } else {
            Err(NoToken::Unavailable(
                "the upstream rejected the token and no newer token could be obtained".into(),
            ))
        }
    }

    async fn wait_for_refresh(
        &self,
        trigger: Trigger,
        rejected_generation: Option<u64>,
    ) -> Result<Arc<ActiveToken>, NoToken> {
        let mut rx = self.attempts.subscribe();
        rx.borrow_and_update();
        let newer = |t: &Arc<ActiveToken>| rejected_generation.is_none_or(|g| t.generation > g);
        if let Some(t) = self.usable(Instant::now()).filter(newer) {
            return Ok(t);
        }
        if let Some(why) = self.reauthorization() {
            return Err(NoToken::ReauthorizationRequired(why));
        }
        if crate::store::now_ms() < self.retry_not_before_ms.load(Ordering::Relaxed) {
            return Err(NoToken::Unavailable(self.unavailable_reason()));
        }
        let seen = self.current().map(|t| t.generation).unwrap_or(0);
        self.demand(Demand {
            trigger,
            generation: rejected_generation.unwrap_or(seen),
        });
        self.metrics.waiters.inc();
        // Bounded: a token request times out after token_timeout; allow for the lease
        // and the store write on top.
        let bound = self.config.token_timeout.0 * 2 + Duration::from_secs(2);
        let waited = tokio::time::timeout(bound, async {
            loop {
                if rx.changed().await.is_err() {
                    return;
                }
                if self.usable(Instant::now()).filter(newer).is_some() {
                    return;
                }
                // An attempt ended without a newer token; if no further demand is pending, stop.
                if self.demand.lock().unwrap().is_none() {
                    return;
                }
            }
        })
        .await;
        if let Some(t) = self.usable(Instant::now()).filter(newer) {
            return Ok(t);
        }
        if let Some(why) = self.reauthorization() {
            return Err(NoToken::ReauthorizationRequired(why));
        }
        Err(NoToken::Unavailable(if waited.is_err() {
            "timed out waiting for a token refresh".into()
        } else {
            self.unavailable_reason()
        }))
    }

    fn demand(&self, d: Demand) {
        let mut slot = self.demand.lock().unwrap();
        match &mut *slot {
            Some(existing) => existing.generation = existing.generation.max(d.generation),
            None => *slot = Some(d),
        }
        drop(slot);
        self.demand_notify.notify_one();
    }

    /// Takes the pending demand, if any (refresher side).
    fn take_demand(&self) -> Option<Demand> {
        self.demand.lock().unwrap().take()
    }

    /// Publishes a new token to the cell (refresher side). The store write, when there
    /// is one, has already completed. A token that cannot make a valid header for every
    /// format is refused and the cell keeps what it has: no request ever carries an
    /// empty or partial credential.
    pub(crate) fn publish(
        &self,
        access_token: &Secret,
        generation: u64,
        expires_at_wall: SystemTime,
    ) -> Result<(), InvalidToken> {
        access_token.check_token()?;
        let headers = self
            .formats
            .iter()
            .map(|f| {
                let mut v = HeaderValue::from_str(&f.replace("{token}", access_token.expose()))
                    .map_err(|_| InvalidToken::Control)?;
                v.set_sensitive(true);
                Ok(v)
            })
            .collect::<Result<Box<[HeaderValue]>, InvalidToken>>()?;
        let now_wall = SystemTime::now();
        let now = Instant::now();
        let remaining = expires_at_wall.duration_since(now_wall).unwrap_or_default();
        let expires_at = now + remaining;
        let lifetime = remaining;
        let margin = EXPIRY_MARGIN.min(lifetime / 4);
        self.cell.store(Some(Arc::new(ActiveToken {
            generation,
            headers,
            expires_at,
            expires_at_wall,
            usable_until: expires_at - margin,
            lifetime,
        })));
        self.retry_not_before_ms.store(0, Ordering::Relaxed);
        self.update_gauges();
        Ok(())
    }

    /// Removes the token (after the grant was rejected).
    pub(crate) fn clear(&self) {
        self.cell.store(None);
        self.update_gauges();
    }

    /// Records a finished attempt and wakes waiting requests.
    pub(crate) fn record(
        &self,
        trigger: Trigger,
        result: RefreshResult,
        error: Option<String>,
        took: Option<Duration>,
    ) {
        self.registry
            .refresh_total
            .with_label_values(&[&self.name, trigger.as_str(), result.as_str()])
            .inc();
        if let Some(d) = took {
            self.metrics.refresh_duration.observe(d.as_secs_f64());
        }
        {
            let mut f = self.facts.lock().unwrap();
            f.attempted = true;
            f.failing = result == RefreshResult::Failure;
            if result != RefreshResult::Failure {
                f.last_success = Some(SystemTime::now());
                f.unavailable_reason = None;
            }
            f.last_refresh = Some(LastRefresh {
                at: SystemTime::now(),
                trigger,
                result,
                error,
            });
        }
        self.update_gauges();
        self.attempts.send_modify(|n| *n += 1);
    }

    /// Wakes waiters without recording an attempt (e.g. a demand already satisfied).
    pub(crate) fn wake_waiters(&self) {
        self.attempts.send_modify(|n| *n += 1);
    }

    pub(crate) fn set_retry_not_before(&self, after: Duration) {
        let at = crate::store::now_ms() + after.as_millis() as u64;
        self.retry_not_before_ms.store(at, Ordering::Relaxed);
    }

    pub(crate) fn set_store_error(&self, e: Option<String>) {
        self.facts.lock().unwrap().store_error = e;
        self.update_gauges();
    }

    pub(crate) fn set_reauthorization(&self, why: Option<String>) {
        self.facts.lock().unwrap().reauthorization = why;
        self.update_gauges();
    }

    pub(crate) fn set_unavailable_reason(&self, why: Option<String>) {
        self.facts.lock().unwrap().unavailable_reason = why;
    }

    /// Why re-authorization is needed, if it is.
    pub fn reauthorization(&self) -> Option<String> {
        self.facts.lock().unwrap().reauthorization.clone()
    }

    fn unavailable_reason(&self) -> String {
        let f = self.facts.lock().unwrap();
        if let Some(r) = &f.unavailable_reason {
            return r.clone();
        }
        match &f.last_refresh {
            Some(LastRefresh { error: Some(e), .. }) => format!("last refresh failed: {e}"),
            _ => "token refresh in progress or failing".into(),
        }
    }

    /// The state per DESIGN.md, derived from the cell and the facts.
    pub fn state(&self) -> State {
        let f = self.facts.lock().unwrap();
        if f.reauthorization.is_some() {
            return State::ReauthorizationRequired;
        }
        match self.usable(Instant::now()) {
            Some(_) if f.failing || f.store_error.is_some() => State::Degraded,
            Some(_) => State::Ready,
            None if !f.attempted && f.unavailable_reason.is_none() => State::Initializing,
            None => State::Unavailable,
        }
    }

    /// The `/status` entry; never a token value.
    pub fn status(&self) -> serde_json::Value {
        let state = self.state();
        let token = self.current();
        let now_wall = SystemTime::now();
        let expiring = token
            .as_ref()
            .filter(|_| self.config.grant != crate::config::Grant::Static);
        let f = self.facts.lock().unwrap();
        serde_json::json!({
            "state": state,
            "grant": self.config.grant,
            "generation": token.as_ref().map(|t| t.generation),
            // A static token never expires: no expiry to show.
            "expires_in_seconds": expiring.map(|t| {
                t.expires_at_wall.duration_since(now_wall).map(|d| d.as_secs() as i64).unwrap_or(0)
            }),
            "expires_at": expiring.map(|t| humantime::format_rfc3339_seconds(t.expires_at_wall).to_string()),
            "last_refresh": f.last_refresh,
            "last_success_at": f.last_success.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "store_error": f.store_error,
            "reauthorization_required": f.reauthorization.as_ref().map(|why| serde_json::json!({
                "reason": why,
                "action": format!("obtain a new refresh token and run: tokenrelay seed --config FILE --credential {} --refresh-token-file FILE (or tokenrelay authorize); running instances pick it up within seconds", self.name),
            })),
            "detail": if state == State::Unavailable || state == State::Initializing { f.unavailable_reason.clone() } else { None },
        })
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
            m.expiry_timestamp.with_label_values(&[&self.name]).set(exp);
            m.generation
                .with_label_values(&[&self.name])
                .set(t.generation as i64);
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
