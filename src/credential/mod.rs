//! A credential at run time: the lock-free cell holding the current access token (read by
//! every proxied request), its state for `/status` and metrics, and the on-demand path by
//! which requests ask the credential's single refresher for a new token and wait for it.
//!
//! - [`token`]: the token in the cell and its prebuilt header values;
//! - [`on_demand`]: requests waiting for a refresh;
//! - [`status`]: `/status` and the gauges;
//! - [`sink`]: the files each new token is written to, off the refresh path;
//! - [`schedule`] and [`policy`]: the decisions, as pure functions of time and state;
//! - [`refresher`]: one task per credential, per grant family; its own decisions are pure
//!   functions too (`refresher/decide/`).

mod error;
mod events;
mod on_demand;
pub mod policy;
pub mod refresher;
pub mod schedule;
mod sink;
mod status;
mod token;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::clock::Instant;

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::config::url_template::{Unresolved, ValueRule};
use crate::config::CredentialConfig;
use crate::metrics::{CredentialMetrics, Metrics, STATES};
use crate::secret::{InvalidToken, Secret};

pub use error::RefreshError;
use on_demand::Demand;
pub use status::LastRefresh;
pub use token::ActiveToken;
pub(crate) use token::EXPIRY_MARGIN;

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
    /// The request may have reached the token endpoint and no usable answer came back
    /// (DESIGN.md): a failure whose outcome at the server is unknown. `/status` shows it
    /// as `in_doubt`; the refresh metric counts it as a failure.
    InDoubt,
}

impl RefreshResult {
    /// The `result` label of `tokenrelay_token_refresh_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshResult::Success => "success",
            RefreshResult::Failure | RefreshResult::InDoubt => "failure",
            RefreshResult::Adopted => "adopted",
        }
    }

    pub fn is_failure(self) -> bool {
        matches!(self, RefreshResult::Failure | RefreshResult::InDoubt)
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
    /// Handed over to another environment (`tokenrelay export`): not refreshed here.
    Moved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        STATES[self as usize]
    }
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
    /// When the current refresh token dies (Unix ms), when known.
    refresh_expires_at_ms: Option<u64>,
    /// That expiry is an estimate (counted from a seed time standing in for the grant's
    /// unknown issue time).
    refresh_expires_estimated: bool,
    /// A new access token can be had when a request asks (a refresh token is stored, or
    /// the grant needs none): with `refresh_mode: on_demand` an expired token is then
    /// not a fault.
    refreshable: bool,
    /// Where and when the credential was handed over (`tokenrelay export`).
    moved: Option<crate::store::Moved>,
    /// The state last observed, and since when (wall time).
    state_since: Option<(State, SystemTime)>,
    /// When the refresher wakes by itself next (Unix ms), and after how many failures
    /// in a row (the backoff step); `None` when it waits for something else.
    next_attempt_ms: Option<u64>,
    failures: u32,
    /// When the current refresh token was obtained and the grant authorized (Unix ms),
    /// from the stored state: where the refresh token's idle and absolute lifetimes start.
    refresh_obtained_ms: Option<u64>,
    authorized_ms: Option<u64>,
    /// A static token the upstream answered 401 to, since when; cleared by a new token.
    static_rejected: Option<SystemTime>,
}

/// One credential: its cell, state, and the channel to its refresher.
pub struct Credential {
    pub name: String,
    pub config: Arc<CredentialConfig>,
    /// Header formats of the upstreams using this credential, indexed by format index;
    /// only ever appended to. Held while the cell is written, so every published token
    /// has a header value for every format handed out.
    formats: Mutex<Vec<String>>,
    /// Written only by the refresher; read lock-free by every request.
    cell: ArcSwapOption<ActiveToken>,
    facts: Mutex<Facts>,
    demand: Mutex<Option<Demand>>,
    demand_notify: Notify,
    /// Incremented when a refresh attempt finishes, whatever its result.
    attempts: watch::Sender<u64>,
    /// The refresher's backoff step, read by requests deciding whether to wait.
    backoff: Mutex<policy::Backoff>,
    pub metrics: CredentialMetrics,
    registry: Arc<Metrics>,
    /// The files each new token is written to (`sinks`), by a writer of their own.
    sinks: sink::Sinks,
    /// Recent refreshes, state changes and 401 replays, for the status page.
    events: events::Events,
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
    /// A credential with no token yet and no header formats; each upstream using it adds
    /// its own ([`Credential::add_format`]).
    pub fn new(config: Arc<CredentialConfig>, metrics: Arc<Metrics>) -> Self {
        let (attempts, _) = watch::channel(0);
        let c = Credential {
            name: config.name.clone(),
            metrics: metrics.credential(&config.name),
            sinks: sink::Sinks::new(&config.name, &config.sinks, &metrics),
            config,
            formats: Mutex::new(Vec::new()),
            cell: ArcSwapOption::empty(),
            facts: Mutex::new(Facts::default()),
            demand: Mutex::new(None),
            demand_notify: Notify::new(),
            attempts,
            backoff: Mutex::new(policy::Backoff::default()),
            registry: metrics,
            events: events::Events::default(),
        };
        c.update_gauges();
        c
    }

    /// Index of `format` among this credential's header formats, adding it when it is
    /// new (an upstream using this credential was added, at startup or by a reload); the
    /// current token, if any, gets its value at once, with no token request.
    pub fn add_format(&self, format: &str) -> Result<usize, InvalidToken> {
        let mut formats = self.formats.lock().unwrap();
        if let Some(index) = formats.iter().position(|f| f == format) {
            return Ok(index);
        }
        let mut more = formats.clone();
        more.push(format.to_string());
        if let Some(t) = self.cell.load_full() {
            self.cell.store(Some(Arc::new(t.with_formats(&more)?)));
        }
        *formats = more;
        Ok(formats.len() - 1)
    }

    /// Index of `upstream`'s url template among this credential's (see
    /// [`ActiveToken::target`]); `None` for an upstream with a fixed url.
    pub fn template_index(&self, upstream: &str) -> Option<usize> {
        self.config
            .url_templates
            .iter()
            .position(|t| t.upstream == upstream)
    }

    /// The upstreams whose url template the current token does not resolve, and why
    /// (none without a token: the credential's state says so).
    pub fn unresolved_upstreams(&self) -> Vec<(&str, Unresolved)> {
        let Some(token) = self.current() else {
            return Vec::new();
        };
        self.config
            .url_templates
            .iter()
            .enumerate()
            .filter_map(|(index, t)| Some((t.upstream.as_str(), token.target(index).err()?)))
            .collect()
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

    /// Publishes a new token to the cell (refresher side). The store write, when there
    /// is one, has already completed. A token that cannot make a valid header for every
    /// format is refused and the cell keeps what it has.
    pub(crate) fn publish(
        &self,
        access_token: &Secret,
        generation: u64,
        expires_at_wall: Option<SystemTime>,
    ) -> Result<(), InvalidToken> {
        self.publish_with_fields(
            access_token,
            generation,
            expires_at_wall,
            BTreeMap::new(),
            &BTreeMap::new(),
        )
    }

    /// [`Credential::publish`] with the token answers' kept fields (`answer_fields`),
    /// from which the url of each templated upstream is resolved here, once per token;
    /// `refused` names the fields the answer carried with a value not kept, and why.
    pub(crate) fn publish_with_fields(
        &self,
        access_token: &Secret,
        generation: u64,
        expires_at_wall: Option<SystemTime>,
        fields: BTreeMap<String, String>,
        refused: &BTreeMap<String, ValueRule>,
    ) -> Result<(), InvalidToken> {
        for (field, rule) in refused {
            let kept = if fields.contains_key(field) {
                "the previous value is kept"
            } else {
                "no value is known"
            };
            tracing::warn!(credential = %self.name, field = %field, %rule, "a token answer field was not kept ({kept})");
        }
        let formats = self.formats.lock().unwrap();
        let token = ActiveToken::new(access_token, &formats, generation, expires_at_wall)?
            .with_fields(fields, refused, &self.config.url_templates);
        self.log_target_changes(self.current().as_deref(), &token);
        self.cell.store(Some(Arc::new(token)));
        drop(formats);
        self.sinks.offer(access_token, generation, expires_at_wall);
        self.update_gauges();
        Ok(())
    }

    /// Serves `from`'s current token until this credential's refresher publishes one of
    /// its own: a reload that changes a credential's settings, but not whom its tokens
    /// are issued to, keeps requests served, also while the store is unreachable.
    pub fn carry_over(&self, from: &Credential) {
        let Some(t) = from.current() else { return };
        let expiry = t.expiry_known.then_some(t.expires_at_wall);
        // The token made valid headers before; it makes them again.
        let _ = self.publish_with_fields(
            t.secret(),
            t.generation,
            expiry,
            t.fields.clone(),
            &BTreeMap::new(),
        );
    }

    /// The fields kept with the current token (for a refresh answer to update: a field
    /// it omits keeps its value).
    pub(crate) fn current_fields(&self) -> BTreeMap<String, String> {
        self.current().map(|t| t.fields.clone()).unwrap_or_default()
    }

    /// Logs where each templated upstream goes with `next`, when that changes.
    fn log_target_changes(&self, previous: Option<&ActiveToken>, next: &ActiveToken) {
        for (index, t) in self.config.url_templates.iter().enumerate() {
            let before = previous.map(|p| p.target(index).map(|t| t.upstream_prefix.clone()));
            let after = next.target(index).map(|t| t.upstream_prefix.clone());
            if before.as_ref() == Some(&after) {
                continue;
            }
            match after {
                Ok(url) => {
                    tracing::info!(credential = %self.name, upstream = %t.upstream, %url, "upstream url resolved from the token answer")
                }
                Err(e) => {
                    tracing::warn!(credential = %self.name, upstream = %t.upstream, error = %e, "upstream url cannot be resolved; its requests are refused until a token answer provides it")
                }
            }
        }
    }

    /// Removes the token (after the grant was rejected).
    pub(crate) fn clear(&self) {
        self.cell.store(None);
        self.update_gauges();
    }

    /// Records a finished attempt and, unless it failed, wakes waiting requests.
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
        self.events.push(
            crate::clock::now_ms(),
            events::Kind::Refresh(trigger, result),
        );
        {
            let mut f = self.facts.lock().unwrap();
            f.attempted = true;
            f.failing = result.is_failure();
            if !result.is_failure() {
                f.last_success = Some(crate::clock::wall_now());
                f.unavailable_reason = None;
            }
            f.last_refresh = Some(LastRefresh {
                at: crate::clock::wall_now(),
                trigger,
                result,
                error,
            });
        }
        self.update_gauges();
        // A failure wakes waiters once the refresher has set its backoff (see
        // `Refresher::after`): they judge whether to wait for the retry by it.
        if !result.is_failure() {
            self.attempts.send_modify(|n| *n += 1);
        }
        if result == RefreshResult::InDoubt {
            self.registry.in_doubt(&self.name);
        }
    }

    /// Wakes waiters without recording an attempt (e.g. a demand already satisfied).
    pub(crate) fn wake_waiters(&self) {
        self.attempts.send_modify(|n| *n += 1);
    }

    /// The refresher's backoff step (refresher side: after each attempt).
    pub(crate) fn set_backoff(&self, b: policy::Backoff) {
        *self.backoff.lock().unwrap() = b;
    }

    pub(crate) fn backoff(&self) -> policy::Backoff {
        *self.backoff.lock().unwrap()
    }

    pub(crate) fn set_store_error(&self, e: Option<String>) {
        self.facts.lock().unwrap().store_error = e;
        self.update_gauges();
    }

    pub(crate) fn set_reauthorization(&self, why: Option<String>) {
        self.facts.lock().unwrap().reauthorization = why;
        self.update_gauges();
    }

    /// When the current refresh token dies (refresher side, from the stored state).
    pub(crate) fn set_refresh_expiry(&self, at_ms: Option<u64>, estimated: bool) {
        let mut facts = self.facts.lock().unwrap();
        facts.refresh_expires_at_ms = at_ms;
        facts.refresh_expires_estimated = estimated && at_ms.is_some();
        drop(facts);
        self.update_gauges();
    }

    /// Whether a new access token can be had on request (refresher side).
    pub(crate) fn set_refreshable(&self, refreshable: bool) {
        self.facts.lock().unwrap().refreshable = refreshable;
        self.update_gauges();
    }

    pub(crate) fn set_unavailable_reason(&self, why: Option<String>) {
        self.facts.lock().unwrap().unavailable_reason = why;
    }

    /// When the refresher wakes by itself next (Unix ms), and its backoff step
    /// (refresher side, each time it goes to sleep).
    pub(crate) fn set_schedule(&self, next_attempt_ms: Option<u64>, failures: u32) {
        let mut f = self.facts.lock().unwrap();
        f.next_attempt_ms = next_attempt_ms;
        f.failures = failures;
    }

    /// When the current refresh token was obtained and its grant authorized (refresher
    /// side, from the stored state).
    pub(crate) fn set_refresh_life(&self, obtained_ms: Option<u64>, authorized_ms: Option<u64>) {
        let mut f = self.facts.lock().unwrap();
        f.refresh_obtained_ms = obtained_ms;
        f.authorized_ms = authorized_ms;
    }

    /// The upstream answered 401 to the static token (`Some`), or a new static token
    /// was published (`None`). Until the upstream accepts the token again, the
    /// credential is not ready.
    pub(crate) fn set_static_rejected(&self, rejected: bool) {
        let mut f = self.facts.lock().unwrap();
        match (rejected, f.static_rejected) {
            (true, None) => f.static_rejected = Some(crate::clock::wall_now()),
            (false, _) => f.static_rejected = None,
            (true, Some(_)) => {}
        }
        drop(f);
        self.update_gauges();
    }

    /// A request was sent again after a 401 with a newer token; `status` is its answer.
    pub(crate) fn note_401_replay(&self, status: u16) {
        self.events
            .push(crate::clock::now_ms(), events::Kind::Replay401(status));
    }

    /// Marks the credential as handed over to another environment, or not.
    pub(crate) fn set_moved(&self, moved: Option<crate::store::Moved>) {
        self.facts.lock().unwrap().moved = moved;
        self.update_gauges();
    }

    /// Where and when the credential was handed over, if it was.
    pub fn moved(&self) -> Option<crate::store::Moved> {
        self.facts.lock().unwrap().moved.clone()
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
}
