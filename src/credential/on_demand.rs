//! The on-demand path: a request that finds no usable token (or whose token the
//! upstream rejected) asks the credential's single refresher for a new one and waits for
//! the outcome of that one attempt, shared by every waiter.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Instant;

use super::policy::{self, millis};
use super::{ActiveToken, Credential, Trigger};

/// A request for a refresh, coalesced: only the newest is kept.
#[derive(Clone, Copy, Debug)]
pub(super) struct Demand {
    pub(super) trigger: Trigger,
    /// Generation the requester saw; a refresh already past it satisfies the demand.
    pub(super) generation: u64,
}

impl Demand {
    /// One demand standing for a pending one and a newer one: the demand about the
    /// newest generation, and at the same generation a 401, which the refresher treats
    /// by its own policy (a plain expiry demand would skip the 401 spacing).
    fn merged(self, newer: Demand) -> Demand {
        let newer_wins = newer.generation > self.generation
            || (newer.generation == self.generation && newer.trigger == Trigger::Upstream401);
        if newer_wins {
            newer
        } else {
            self
        }
    }
}

/// Why a request cannot get a token.
#[derive(Debug, Clone, PartialEq)]
pub enum NoToken {
    ReauthorizationRequired(String),
    Unavailable(String),
    /// Handed over to another environment.
    Moved(String),
}

impl std::fmt::Display for NoToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoToken::ReauthorizationRequired(why) => {
                write!(f, "credential needs re-authorization: {why}")
            }
            NoToken::Unavailable(why) => write!(f, "no valid access token: {why}"),
            NoToken::Moved(to) => write!(
                f,
                "the credential was moved to {to}; this environment no longer uses it"
            ),
        }
    }
}

impl Credential {
    /// A usable token, waiting for the single in-flight refresh when the current one has
    /// expired. Fails promptly when no token can be had (backoff, re-authorization).
    pub async fn acquire(&self) -> Result<Arc<ActiveToken>, NoToken> {
        self.acquire_at(Instant::now()).await
    }

    /// [`acquire`](Self::acquire) judged at `now`, a time the caller has just read.
    pub async fn acquire_at(&self, now: Instant) -> Result<Arc<ActiveToken>, NoToken> {
        if let Some(t) = self.usable(now) {
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
        if let Some(m) = self.moved() {
            return Err(NoToken::Moved(m.to));
        }
        if let Some(why) = self.reauthorization() {
            return Err(NoToken::ReauthorizationRequired(why));
        }
        // Wait for the next attempt if one can start within token_timeout (bringing a
        // backed-off retry forward where allowed); else answer at once.
        let timeout = self.config.token_timeout.0;
        let now_ms = crate::store::now_ms();
        let backoff = self.backoff();
        if !policy::waits_for_attempt(now_ms, backoff, timeout) {
            return Err(NoToken::Unavailable(self.unavailable_reason()));
        }
        let until_attempt =
            Duration::from_millis(policy::earliest_attempt(now_ms, backoff) - now_ms);
        let seen = self.current().map(|t| t.generation).unwrap_or(0);
        let demand = Demand {
            trigger,
            generation: rejected_generation.unwrap_or(seen),
        };
        self.demand(demand);
        self.metrics.waiters.inc();
        // The wait budget: the attempt starts within `until_attempt`, and its token
        // request times out after token_timeout; allow for the lease and the store write
        // on top. A failed attempt does not end the wait while a next one can still
        // finish within it.
        let bound = until_attempt + timeout * 2 + Duration::from_secs(2);
        let deadline_ms = now_ms + millis(bound);
        let mut failure_seen = backoff.last_failure_ms;
        let waited = tokio::time::timeout(bound, async {
            loop {
                if rx.changed().await.is_err() {
                    return;
                }
                if self.usable(Instant::now()).filter(newer).is_some() {
                    return;
                }
                if self.demand.lock().unwrap().is_some() {
                    continue;
                }
                // An attempt ended without a newer token (or the refresher decided not to
                // refresh): keep waiting only for a retry after a new failure.
                let b = self.backoff();
                if b.retry_at_ms.is_none() || b.last_failure_ms == failure_seen {
                    return;
                }
                failure_seen = b.last_failure_ms;
                let now_ms = crate::store::now_ms();
                if !policy::attempt_finishes_by(now_ms, b, timeout, deadline_ms)
                    || self.reauthorization().is_some()
                    || self.moved().is_some()
                {
                    return;
                }
                self.demand(demand);
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

    pub(super) fn demand(&self, d: Demand) {
        let mut demand = self.demand.lock().unwrap();
        *demand = Some(match *demand {
            Some(pending) => pending.merged(d),
            None => d,
        });
        drop(demand);
        self.demand_notify.notify_one();
    }

    /// Takes the pending demand, if any (refresher side).
    pub(super) fn take_demand(&self) -> Option<Demand> {
        self.demand.lock().unwrap().take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(trigger: Trigger, generation: u64) -> Demand {
        Demand {
            trigger,
            generation,
        }
    }

    #[test]
    fn a_401_merged_into_a_pending_expiry_demand_stays_a_401() {
        // A request waited for the startup token (Expired, generation 0); the next one got
        // that token rejected before the refresher took the demand. The 401 must reach
        // the 401 policy, or its spacing is skipped.
        let m = demand(Trigger::Expired, 0).merged(demand(Trigger::Upstream401, 1));
        assert_eq!((m.trigger, m.generation), (Trigger::Upstream401, 1));
        // A 401 pending for the newest generation stays one.
        let m = demand(Trigger::Upstream401, 1).merged(demand(Trigger::Expired, 1));
        assert_eq!((m.trigger, m.generation), (Trigger::Upstream401, 1));
        // An older 401 is superseded by a demand for a newer generation.
        let m = demand(Trigger::Upstream401, 1).merged(demand(Trigger::Expired, 2));
        assert_eq!((m.trigger, m.generation), (Trigger::Expired, 2));
    }
}
