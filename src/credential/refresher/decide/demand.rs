//! What a request asking for a token sets off: an attempt now, a backed-off retry
//! brought forward, or nothing (waiting requests are woken to go on with what they have).

use crate::clock::Instant;
use crate::credential::policy::{self, Backoff, On401, Spacing};
use crate::credential::Trigger;

/// Consecutive upstream 401s (with no accepted answer between) after which a long-lived
/// access token is taken as revoked.
pub const LONG_LIVED_REJECTIONS: u32 = 3;

/// A request's demand, and the facts it is judged by.
#[derive(Clone, Copy, Debug)]
pub struct Demand {
    pub trigger: Trigger,
    /// The generation of the token the request had (0: none).
    pub generation: u64,
    /// The usable published token: its generation, and whether the upstream ever
    /// accepted it.
    pub current: Option<(u64, bool)>,
    /// Nothing to do until the stored state changes.
    pub idle: bool,
    /// The published token is a long-lived access token, never refreshed.
    pub long_lived: bool,
    pub backoff: Backoff,
    /// The last 401-driven refresh of a token that never worked, and the gap before the next.
    pub last_401_refresh: Option<Spacing>,
    pub now: Instant,
    pub now_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDemand {
    /// Nothing to refresh (a newer token is out, the refresher is idle, a long-lived
    /// token has nothing to refresh): waiting requests are woken.
    WakeWaiters,
    /// Backing off: requests wait for the retry, brought forward to this step when `Some`
    /// (once per step).
    KeepBackoff(Option<Backoff>),
    /// The upstream rejected the long-lived token: count it ([`rejected_long_lived`]).
    LongLivedRejected,
    /// Refresh now.
    Refresh,
    /// An upstream 401, judged by [`policy::on_401`], with the spacing to keep.
    Upstream401(On401, Option<Spacing>),
}

pub fn on_demand(d: &Demand) -> OnDemand {
    if d.current.is_some_and(|(g, _)| g > d.generation) || d.idle {
        return OnDemand::WakeWaiters;
    }
    if d.backoff.retry_at_ms.is_some_and(|at| at > d.now_ms) {
        // Failing refreshes keep their backoff; waiting requests may bring its retry
        // forward once per step.
        return OnDemand::KeepBackoff(policy::bring_forward(d.now_ms, d.backoff));
    }
    if d.long_lived {
        return match d.trigger {
            Trigger::Upstream401 => OnDemand::LongLivedRejected,
            _ => OnDemand::WakeWaiters,
        };
    }
    if d.trigger != Trigger::Upstream401 {
        return OnDemand::Refresh;
    }
    let had_worked = d
        .current
        .is_some_and(|(g, accepted)| g == d.generation && accepted);
    let (decision, spacing) = policy::on_401(d.now, had_worked, d.last_401_refresh);
    OnDemand::Upstream401(decision, spacing)
}

/// The count of rejections of a long-lived token, and whether it is taken as revoked
/// (a human must provide a new one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejections {
    pub in_a_row: u32,
    pub revoked: bool,
}

/// After one more 401 to the long-lived token; `accepted_since`: the upstream accepted
/// it since the previous one, which starts the count again.
pub fn rejected_long_lived(previous: u32, accepted_since: bool) -> Rejections {
    let in_a_row = if accepted_since { 1 } else { previous + 1 };
    Rejections {
        in_a_row,
        revoked: in_a_row >= LONG_LIVED_REJECTIONS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NOW_MS: u64 = 1_700_000_000_000;

    #[test]
    fn what_a_request_asking_for_a_token_sets_off() {
        let now = Instant::now();
        let base = Demand {
            trigger: Trigger::Expired,
            generation: 4,
            current: None,
            idle: false,
            long_lived: false,
            backoff: Backoff::default(),
            last_401_refresh: None,
            now,
            now_ms: NOW_MS,
        };
        let backoff = |retry_in_ms: u64, brought_forward: bool| Backoff {
            retry_at_ms: Some(NOW_MS + retry_in_ms),
            last_failure_ms: NOW_MS - 1_000,
            brought_forward,
            step_retry_ms: Some(NOW_MS + retry_in_ms),
        };
        let brought = Backoff {
            retry_at_ms: Some(NOW_MS),
            brought_forward: true,
            ..backoff(10_000, false)
        };
        let first_gap = Some(Spacing {
            at: now,
            gap: policy::MIN_401_GAP,
        });
        let spaced = Some(Spacing {
            at: now - Duration::from_millis(500),
            gap: policy::MIN_401_GAP,
        });
        let u401 = Trigger::Upstream401;
        #[rustfmt::skip]
        let cases: Vec<(&str, Demand, OnDemand)> = vec![
            ("no token: refresh", base, OnDemand::Refresh),
            ("expired token of the current generation: refresh", Demand { current: Some((4, true)), ..base }, OnDemand::Refresh),
            ("a newer token is out already", Demand { current: Some((5, false)), ..base }, OnDemand::WakeWaiters),
            ("idle", Demand { idle: true, ..base }, OnDemand::WakeWaiters),
            ("a far retry is brought forward", Demand { backoff: backoff(10_000, false), ..base }, OnDemand::KeepBackoff(Some(brought))),
            ("a near retry is waited for", Demand { backoff: backoff(800, false), ..base }, OnDemand::KeepBackoff(None)),
            ("a retry already brought forward", Demand { backoff: backoff(10_000, true), ..base }, OnDemand::KeepBackoff(None)),
            ("a 401 while backing off keeps the backoff", Demand { trigger: u401, backoff: backoff(800, false), ..base }, OnDemand::KeepBackoff(None)),
            ("a retry that is due: refresh", Demand { backoff: backoff(0, false), ..base }, OnDemand::Refresh),
            ("long-lived, expired", Demand { long_lived: true, ..base }, OnDemand::WakeWaiters),
            ("long-lived, a 401", Demand { long_lived: true, trigger: u401, ..base }, OnDemand::LongLivedRejected),
            ("a 401 to a token that had worked", Demand { trigger: u401, current: Some((4, true)), ..base }, OnDemand::Upstream401(On401::RefreshRevoked, None)),
            ("a 401 to a token never accepted", Demand { trigger: u401, current: Some((4, false)), ..base }, OnDemand::Upstream401(On401::RefreshUnproven, first_gap)),
            ("a 401 with no usable token", Demand { trigger: u401, ..base }, OnDemand::Upstream401(On401::RefreshUnproven, first_gap)),
            ("a 401 again within the gap", Demand { trigger: u401, current: Some((4, false)), last_401_refresh: spaced, ..base }, OnDemand::Upstream401(On401::Spaced, spaced)),
        ];
        for (case, demand, expected) in cases {
            assert_eq!(on_demand(&demand), expected, "{case}");
        }
    }

    #[test]
    fn a_long_lived_token_is_revoked_after_three_rejections_in_a_row() {
        let cases = [
            ("first", 0, false, 1, false),
            ("second", 1, false, 2, false),
            ("third", 2, false, 3, true),
            ("more", 5, false, 6, true),
            ("accepted since: counting again", 2, true, 1, false),
        ];
        for (case, previous, accepted_since, in_a_row, revoked) in cases {
            assert_eq!(
                rejected_long_lived(previous, accepted_since),
                Rejections { in_a_row, revoked },
                "{case}"
            );
        }
    }
}
