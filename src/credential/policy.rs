//! The refresher's on-demand decisions as pure functions of time and state, unit-tested
//! here: whether a request that finds no token waits for the next attempt, when waiting
//! requests may bring a backed-off attempt forward, and how an upstream 401 is treated.
//! (When to refresh and how long to back off are in [`super::schedule`].)

use std::time::Duration;

use crate::clock::Instant;

/// A backed-off attempt at most this far away is simply waited for.
pub const BRING_FORWARD_ABOVE: Duration = Duration::from_secs(1);
/// An attempt brought forward never starts sooner than this after the last failure, so
/// a token endpoint that stays down sees at most twice the usual attempt rate.
pub const MIN_GAP_AFTER_FAILURE: Duration = Duration::from_millis(250);

/// Spacing of 401-driven refreshes of tokens that never worked: the first is immediate,
/// then at least 1 s apart, doubling while they keep coming, up to a minute.
pub const MIN_401_GAP: Duration = Duration::from_secs(1);
pub const MAX_401_GAP: Duration = Duration::from_secs(60);

/// The backoff step the refresher is in (times are Unix milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    /// When the refresher retries by itself; `None` when it is not backing off.
    pub retry_at_ms: Option<u64>,
    /// When the last attempt failed.
    pub last_failure_ms: u64,
    /// Whether waiting requests already brought this step's retry forward.
    pub brought_forward: bool,
    /// The step's own retry time, where it stays when an attempt brought forward fails.
    pub step_retry_ms: Option<u64>,
}

/// When the next attempt can start if requests ask for one at `now_ms`.
pub fn earliest_attempt(now_ms: u64, b: Backoff) -> u64 {
    match b.retry_at_ms {
        None => now_ms,
        Some(at) if b.brought_forward || at <= now_ms + millis(BRING_FORWARD_ABOVE) => {
            at.max(now_ms)
        }
        Some(_) => (b.last_failure_ms + millis(MIN_GAP_AFTER_FAILURE)).max(now_ms),
    }
}

/// Whether a request arriving at `now_ms` waits (up to `bound`) for the next attempt;
/// otherwise it is answered at once.
pub fn waits_for_attempt(now_ms: u64, b: Backoff, bound: Duration) -> bool {
    earliest_attempt(now_ms, b) <= now_ms + millis(bound)
}

/// Whether an attempt that requests ask for at `now_ms` can start and, taking up to
/// `token_timeout`, finish by `deadline_ms`: a request waiting until then keeps waiting
/// through a failed attempt only while this holds.
pub fn attempt_finishes_by(
    now_ms: u64,
    b: Backoff,
    token_timeout: Duration,
    deadline_ms: u64,
) -> bool {
    earliest_attempt(now_ms, b) + millis(token_timeout) <= deadline_ms
}

/// The backoff step after requests asked at `now_ms`: its retry brought forward (once per
/// step) when it was more than [`BRING_FORWARD_ABOVE`] away; `None` if unchanged.
pub fn bring_forward(now_ms: u64, b: Backoff) -> Option<Backoff> {
    let at = b.retry_at_ms?;
    if b.brought_forward || at <= now_ms + millis(BRING_FORWARD_ABOVE) {
        return None;
    }
    Some(Backoff {
        retry_at_ms: Some(earliest_attempt(now_ms, b)),
        brought_forward: true,
        step_retry_ms: Some(at),
        ..b
    })
}

/// The backoff after an attempt failed at `now_ms`, and whether it is a new step (the
/// caller counts it as a further failure). A failed attempt that requests had brought
/// forward was the one extra attempt its step allows: the step keeps its own retry and
/// cannot be brought forward again, so a token endpoint that stays down sees at most
/// twice the usual attempt rate however many requests keep asking. Otherwise a new step
/// retries `delay` from now.
pub fn after_failure(now_ms: u64, b: Backoff, delay: Duration) -> (Backoff, bool) {
    match b.step_retry_ms {
        Some(at) if b.brought_forward && at > now_ms => (
            Backoff {
                retry_at_ms: Some(at),
                last_failure_ms: now_ms,
                brought_forward: true,
                step_retry_ms: Some(at),
            },
            false,
        ),
        _ => {
            let at = now_ms + millis(delay);
            (
                Backoff {
                    retry_at_ms: Some(at),
                    last_failure_ms: now_ms,
                    brought_forward: false,
                    step_retry_ms: Some(at),
                },
                true,
            )
        }
    }
}

/// How an upstream 401 to the current token is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On401 {
    /// The token had worked: it was revoked or expired early. Refresh now.
    RefreshRevoked,
    /// The token never worked; refresh now, and space the next such refresh.
    RefreshUnproven,
    /// A newly issued token was rejected again too soon: a permission problem rather
    /// than an expired token. No refresh; the 401 passes through.
    Spaced,
}

/// The last 401-driven refresh of a token that never worked, and the gap before the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spacing {
    pub at: Instant,
    pub gap: Duration,
}

/// Decides on a 401 at `now`; returns the decision and the spacing to keep.
pub fn on_401(
    now: Instant,
    token_had_worked: bool,
    last: Option<Spacing>,
) -> (On401, Option<Spacing>) {
    if token_had_worked {
        return (On401::RefreshRevoked, None);
    }
    match last {
        Some(s) if now < s.at + s.gap => (On401::Spaced, last),
        Some(s) if now < s.at + MAX_401_GAP => (
            On401::RefreshUnproven,
            Some(Spacing {
                at: now,
                gap: (s.gap * 2).clamp(MIN_401_GAP, MAX_401_GAP),
            }),
        ),
        _ => (
            On401::RefreshUnproven,
            Some(Spacing {
                at: now,
                gap: MIN_401_GAP,
            }),
        ),
    }
}

/// How often a held refresh lease is renewed: every third of its TTL, as Kubernetes
/// leader election and careful peers do, so two renewals can fail before it runs out.
pub fn lease_renew_interval(ttl: Duration) -> Duration {
    ttl / 3
}

/// Whether a stored state is a rollback (a restored backup, a store that lost writes):
/// older than the newest generation this process saw, and not from a newer
/// authorization (`seed`/`authorize` into an emptied store starts generations again).
/// Its refresh token has most likely been spent, so it must not be sent.
pub fn rolled_back(
    stored_generation: u64,
    stored_authorized_ms: Option<u64>,
    known_generation: u64,
    known_authorized_ms: Option<u64>,
) -> bool {
    stored_generation < known_generation && stored_authorized_ms <= known_authorized_ms
}

/// How long the lease must be held, from right before a refresh token is sent: the
/// whole token request plus a second for a server finishing just after the client gave
/// up. [`crate::store::Lease::secure_for`] extends a shorter lease that far, so it cannot
/// run out under the request even if every renewal after it fails.
pub fn lease_needed_to_send(token_timeout: Duration) -> Duration {
    token_timeout + Duration::from_secs(1)
}

/// What is known about a refresh token's life: what the answer that brought it stated,
/// and the credential's rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lifetimes {
    /// How long it lives unless used again, as the answer stated (`refresh_expires_in`,
    /// `x_refresh_token_expires_in`, ...).
    pub stated: Option<Duration>,
    /// How long it lives at most, as the answer stated (Intuit's
    /// `x_refresh_token_hard_expires_in`): the absolute expiry itself, so the configured
    /// absolute lifetime is not counted when the answer says it.
    pub stated_hard: Option<Duration>,
    pub idle: Option<Duration>,
    pub absolute: Option<Duration>,
}

/// When a refresh token came to be, for counting its lifetimes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Issued {
    /// When it was obtained (Unix ms).
    pub obtained_ms: u64,
    /// False when `obtained_ms` only stands in for an unknown issue time (a token
    /// seeded without `--refresh-token-issued-at` was issued some time before).
    pub obtained_exact: bool,
    /// When the grant was authorized, if known at all.
    pub authorized_at_ms: Option<u64>,
    /// False when `authorized_at_ms` is the seed time standing in for the real one.
    pub authorized_exact: bool,
}

/// A refresh token's expiry (Unix ms), and whether it is an estimate: counted from a
/// time that only stands in for the real one, so the token may die earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshExpiry {
    pub at_ms: u64,
    pub estimate: bool,
}

/// When a refresh token dies: the earliest of what the token endpoint stated, its idle
/// lifetime, and its absolute lifetime counted from the authorization (or the hard
/// expiry the answer stated instead). `None` when nothing is known.
pub fn refresh_token_expiry(issued: Issued, l: Lifetimes) -> Option<RefreshExpiry> {
    let from_obtained = |d: Duration| issued.obtained_ms + millis(d);
    let absolute = match l.stated_hard {
        Some(hard) => Some((from_obtained(hard), true)),
        None => l
            .absolute
            .zip(issued.authorized_at_ms)
            .map(|(d, at)| (at + millis(d), issued.authorized_exact)),
    };
    [
        l.stated.map(|d| (from_obtained(d), issued.obtained_exact)),
        l.idle.map(|d| (from_obtained(d), issued.obtained_exact)),
        absolute,
    ]
    .into_iter()
    .flatten()
    // At equal times an exact term wins: the expiry is then known.
    .min_by_key(|(at, exact)| (*at, !*exact))
    .map(|(at_ms, exact)| RefreshExpiry {
        at_ms,
        estimate: !exact,
    })
}

/// When to refresh only to keep a refresh token with an idle lifetime alive (even if the
/// access token lasts longer): a tenth of the idle lifetime, at most a day, before it
/// would die unused.
pub fn keep_alive_at(obtained_ms: u64, idle: Duration) -> u64 {
    obtained_ms + millis(idle) - millis((idle / 10).min(Duration::from_secs(86400)))
}

/// The earliest moment a refresh may be sent under the provider's limits: at most
/// `limit.0` refreshes per `limit.1` (Zoho: 10 per 10 minutes), and not before the token
/// is `min_age` old (Exact Online rejects early refreshes). `sent` are the past sends,
/// oldest first. `None`: now.
pub fn refresh_not_before(
    now: Instant,
    sent: &[Instant],
    limit: Option<(u32, Duration)>,
    obtained: Option<Instant>,
    min_age: Option<Duration>,
) -> Option<Instant> {
    let by_rate = limit.and_then(|(count, per)| {
        let in_window: Vec<&Instant> = sent.iter().filter(|t| now < **t + per).collect();
        (in_window.len() >= count as usize)
            .then(|| *in_window[in_window.len() - count as usize] + per)
    });
    let by_age = obtained.zip(min_age).map(|(at, age)| at + age);
    [by_rate, by_age]
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .max()
}

pub(super) fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);
    const NOW: u64 = 10_000;

    fn backing_off(retry_in: u64, failed_ago: u64, brought_forward: bool) -> Backoff {
        Backoff {
            retry_at_ms: Some(NOW + retry_in),
            last_failure_ms: NOW - failed_ago,
            brought_forward,
            step_retry_ms: Some(NOW + retry_in),
        }
    }

    /// What a request arriving at `NOW` finds: when the next attempt can start, whether
    /// it waits for it (bound 2 s), and whether it brings the retry forward.
    #[test]
    fn what_a_request_finds_while_backing_off() {
        let moved = |to: u64, from: u64, failed_ago: u64| Backoff {
            retry_at_ms: Some(to),
            last_failure_ms: NOW - failed_ago,
            brought_forward: true,
            step_retry_ms: Some(from),
        };
        #[rustfmt::skip]
        let cases = [
            ("no backoff: now", Backoff::default(), NOW, true, None),
            ("retry overdue: now", backing_off(0, 5_000, false), NOW, true, None),
            ("retry within 1 s: waited for", backing_off(800, 100, false), 10_800, true, None),
            ("retry at exactly 1 s: waited for", backing_off(1_000, 100, false), 11_000, true, None),
            ("far retry, fresh failure: 250 ms after it", backing_off(4_000, 100, false), 10_150, true, Some(moved(10_150, 14_000, 100))),
            ("far retry, old failure: now", backing_off(4_000, 3_000, false), NOW, true, Some(moved(NOW, 14_000, 3_000))),
            ("far retry brought forward already: the step's own", backing_off(4_000, 100, true), 14_000, false, None),
            ("retry brought forward, near: kept", backing_off(150, 100, true), 10_150, true, None),
        ];
        for (case, b, earliest, waits, brought) in cases {
            assert_eq!(
                earliest_attempt(NOW, b),
                earliest,
                "{case}: earliest attempt"
            );
            assert_eq!(waits_for_attempt(NOW, b, T), waits, "{case}: waits");
            assert_eq!(bring_forward(NOW, b), brought, "{case}: brought forward");
        }
    }

    /// A waiter keeps waiting through a failure only for a retry that can finish within
    /// its budget: a brought-forward retry 250 ms after the failure, or the step's own.
    #[test]
    fn waiting_through_a_failure() {
        #[rustfmt::skip]
        let cases = [
            ("not brought forward: retry 250 ms after the failure, finishes in time", backing_off(3_000, 0, false), NOW + 2_250, true),
            ("not brought forward: 1 ms too late", backing_off(3_000, 0, false), NOW + 2_249, false),
            ("brought forward already: the step's own retry 3 s away, in time", backing_off(3_000, 0, true), NOW + 5_000, true),
            ("brought forward already: 1 ms too late", backing_off(3_000, 0, true), NOW + 4_999, false),
            ("no backoff: an attempt now", Backoff::default(), NOW + 2_000, true),
        ];
        for (case, b, deadline, finishes) in cases {
            assert_eq!(attempt_finishes_by(NOW, b, T, deadline), finishes, "{case}");
        }
    }

    #[test]
    fn the_backoff_after_a_failure() {
        let d = Duration::from_secs(4);
        let step = |at: u64| Backoff {
            retry_at_ms: Some(at),
            last_failure_ms: NOW,
            brought_forward: false,
            step_retry_ms: Some(at),
        };
        let brought = Backoff {
            retry_at_ms: Some(NOW - 100),
            last_failure_ms: NOW - 400,
            brought_forward: true,
            step_retry_ms: Some(NOW + 3_000),
        };
        let kept = Backoff {
            retry_at_ms: Some(NOW + 3_000),
            last_failure_ms: NOW,
            brought_forward: true,
            step_retry_ms: Some(NOW + 3_000),
        };
        let brought_late = Backoff {
            step_retry_ms: Some(NOW),
            ..brought
        };
        #[rustfmt::skip]
        let cases = [
            ("first failure: a new step", Backoff::default(), step(NOW + 4_000), true),
            ("the step's own retry failed: a new step", backing_off(0, 4_000, false), step(NOW + 4_000), true),
            ("a brought-forward attempt failed: the step stands", brought, kept, false),
            ("brought forward, the step's own time passed: a new step", brought_late, step(NOW + 4_000), true),
        ];
        for (case, b, expected, new_step) in cases {
            assert_eq!(after_failure(NOW, b, d), (expected, new_step), "{case}");
        }
    }

    #[test]
    fn how_an_upstream_401_is_treated() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Two minutes after the start of the test's history.
        let t0 = Instant::now() + s(120);
        let spacing = |ago: Duration, gap: Duration| Some(Spacing { at: t0 - ago, gap });
        let next = |gap: Duration| Some(Spacing { at: t0, gap });
        #[rustfmt::skip]
        let cases = [
            ("worked before: refresh now", true, None, On401::RefreshRevoked, None),
            ("worked before, spaced refreshes pending: refresh now", true, spacing(ms(10), s(8)), On401::RefreshRevoked, None),
            ("never worked, first: refresh, then 1 s apart", false, None, On401::RefreshUnproven, next(MIN_401_GAP)),
            ("never worked, within the gap: spaced", false, spacing(ms(500), s(1)), On401::Spaced, spacing(ms(500), s(1))),
            ("never worked, after the gap: refresh, gap doubled", false, spacing(ms(1_500), s(1)), On401::RefreshUnproven, next(s(2))),
            ("never worked, gap at its cap", false, spacing(s(59), s(40)), On401::RefreshUnproven, next(MAX_401_GAP)),
            ("never worked, quiet for over a minute: 1 s again", false, spacing(s(120), s(8)), On401::RefreshUnproven, next(MIN_401_GAP)),
        ];
        for (case, had_worked, last, decision, spacing) in cases {
            assert_eq!(on_401(t0, had_worked, last), (decision, spacing), "{case}");
        }
    }

    #[test]
    fn lease_rules() {
        let s = Duration::from_secs;
        #[rustfmt::skip]
        let cases = [
            ("30 s TTL: renewed every 10 s, sends secured for 11 s", s(30), s(10), s(10), s(11)),
            ("a TTL shorter than the request: secured for the request", s(9), s(3), s(6), s(7)),
        ];
        for (case, ttl, renew, token_timeout, needed) in cases {
            assert_eq!(lease_renew_interval(ttl), renew, "{case}");
            // The whole request, whatever the TTL (a shorter lease is extended for it).
            assert_eq!(lease_needed_to_send(token_timeout), needed, "{case}");
        }
    }

    #[test]
    fn rollback_is_an_older_generation_of_no_newer_authorization() {
        #[rustfmt::skip]
        let cases = [
            ("older generation, same authorization", 5, Some(100), 8, Some(100), true),
            ("older generation, none recorded", 5, None, 8, None, true),
            ("older generation, an older authorization", 5, Some(50), 8, Some(100), true),
            ("the generation seen", 8, Some(100), 8, Some(100), false),
            ("a newer generation", 9, Some(100), 8, Some(100), false),
            ("seeded again into an emptied store", 1, Some(200), 8, Some(100), false),
        ];
        for (case, stored, stored_auth, known, known_auth, rolled) in cases {
            assert_eq!(
                rolled_back(stored, stored_auth, known, known_auth),
                rolled,
                "{case}"
            );
        }
    }

    #[test]
    fn refresh_token_lifetimes() {
        let d = |days: u64| Some(Duration::from_secs(days * 86400));
        let day = 86_400_000;
        let l = |stated, idle, absolute| Lifetimes {
            stated,
            idle,
            absolute,
            ..Lifetimes::default()
        };
        let exact = |authorized_at_ms| Issued {
            obtained_ms: 5 * day,
            obtained_exact: true,
            authorized_at_ms,
            authorized_exact: true,
        };
        let at = |days: u64| {
            Some(RefreshExpiry {
                at_ms: days * day,
                estimate: false,
            })
        };
        let estimated = |days: u64| {
            Some(RefreshExpiry {
                at_ms: days * day,
                estimate: true,
            })
        };
        // Seeded at day 5 without the issue time: both times stand in for unknown ones.
        let seeded = Issued {
            obtained_exact: false,
            authorized_exact: false,
            ..exact(Some(5 * day))
        };
        // Refreshed at day 5 from a grant seeded at day 1 without its issue time.
        let from_seed = Issued {
            authorized_exact: false,
            ..exact(Some(day))
        };
        let hard = |hard_days: u64, absolute| Lifetimes {
            stated: d(100),
            stated_hard: d(hard_days),
            absolute,
            ..Lifetimes::default()
        };
        #[rustfmt::skip]
        let cases = [
            ("ELMA365: 14 days after the authorization", exact(Some(day)), l(None, None, d(14)), at(15)),
            ("Xero: 60 days idle, from the last refresh", exact(None), l(None, d(60), None), at(65)),
            ("the earliest of all, stated included", exact(Some(0)), l(d(1), d(60), d(14)), at(6)),
            ("stated only", exact(None), l(d(30), None, None), at(35)),
            ("absolute lifetime, authorization unknown", exact(None), l(None, None, d(14)), None),
            ("nothing known", exact(Some(day)), l(None, None, None), None),
            ("seeded: the idle lifetime from the seed time is an estimate", seeded, l(None, d(60), None), estimated(65)),
            ("seeded: so is the absolute one", seeded, l(None, d(60), d(14)), estimated(19)),
            ("refreshed since the seed: the idle lifetime is exact", from_seed, l(None, d(60), None), at(65)),
            ("refreshed since the seed: the absolute one is not", from_seed, l(None, d(60), d(14)), estimated(15)),
            ("an exact term at the same time wins", from_seed, l(d(10), None, d(14)), at(15)),
            ("Intuit: the stated hard expiry replaces the absolute lifetime", from_seed, hard(20, d(1825)), at(25)),
            ("Intuit: a hard expiry later than the configured absolute lifetime is believed", exact(Some(0)), Lifetimes { stated_hard: d(2000), absolute: d(1825), ..Lifetimes::default() }, at(2005)),
            ("Intuit: the rolling expiry when earlier", exact(Some(0)), hard(200, None), at(105)),
        ];
        for (case, issued, lifetimes, expected) in cases {
            assert_eq!(refresh_token_expiry(issued, lifetimes), expected, "{case}");
        }
    }

    #[test]
    fn keep_alive_refreshes() {
        let day = 86_400_000;
        #[rustfmt::skip]
        let cases = [
            ("60-day idle lifetime: a day before", Duration::from_secs(60 * 86_400), 59 * day),
            ("100 s idle lifetime: a tenth before", Duration::from_secs(100), 90_000),
            ("10-day idle lifetime: a day before", Duration::from_secs(10 * 86_400), 9 * day),
        ];
        for (case, idle, expected) in cases {
            assert_eq!(keep_alive_at(0, idle), expected, "{case}");
        }
    }

    #[test]
    fn provider_refresh_limits() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let sent: Vec<Instant> = (0..10).map(|i| t0 + s(i * 10)).collect();
        let now = t0 + s(100);
        let zoho = Some((10, s(600)));
        let none: &[Instant] = &[];
        #[rustfmt::skip]
        let cases = [
            ("ten in the window: when the oldest leaves it", &sent[..], zoho, None, None, Some(t0 + s(600))),
            ("nine in the window: now", &sent[..9], zoho, None, None, None),
            ("no limit: now", &sent[..], None, None, None, None),
            ("too young a token: at its minimum age", none, None, Some(t0 + s(90)), Some(s(60)), Some(t0 + s(150))),
            ("old enough: now", none, None, Some(t0), Some(s(60)), None),
            ("both: the later", &sent[..], zoho, Some(t0 + s(90)), Some(s(60)), Some(t0 + s(600))),
        ];
        for (case, sent, limit, obtained, min_age, expected) in cases {
            assert_eq!(
                refresh_not_before(now, sent, limit, obtained, min_age),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn a_far_retry_is_brought_forward_once_and_never_within_250ms_of_the_failure() {
        let b = backing_off(4_000, 100, false);
        assert_eq!(earliest_attempt(10_000, b), 10_150);
        let moved = bring_forward(10_000, b).unwrap();
        assert_eq!(moved.retry_at_ms, Some(10_150));
        assert!(moved.brought_forward);
        // Once per step: asking again changes nothing.
        assert_eq!(bring_forward(10_000, moved), None);
        assert_eq!(earliest_attempt(10_000, moved), 10_150);
        // Long after the failure: at once.
        let old = backing_off(4_000, 3_000, false);
        assert_eq!(
            bring_forward(10_000, old).unwrap().retry_at_ms,
            Some(10_000)
        );
    }

    #[test]
    fn a_failed_attempt_brought_forward_keeps_its_step() {
        let d = Duration::from_secs(4);
        // A step's retry 4 s away is brought forward; that attempt fails at once.
        let (step, new) = after_failure(10_000, Backoff::default(), d);
        assert!(new);
        let moved = bring_forward(10_000, step).unwrap();
        assert_eq!(moved.retry_at_ms, Some(10_250));
        let (kept, new) = after_failure(10_300, moved, d);
        // Not a new step: the step's own retry stands and cannot move again, so
        // requests arriving now are answered at once.
        assert!(!new);
        assert_eq!(kept.retry_at_ms, Some(14_000));
        assert_eq!(bring_forward(10_400, kept), None);
        assert!(!waits_for_attempt(10_400, kept, T));
        // The step's own retry fails too: a new step, which may be brought forward.
        let (next, new) = after_failure(14_000, kept, d);
        assert!(new);
        assert_eq!(next.retry_at_ms, Some(18_000));
        assert!(bring_forward(14_300, next).is_some());
    }

    #[test]
    fn at_most_one_extra_attempt_per_step_whatever_the_demand() {
        // Requests ask every 10 ms for 60 s while every attempt fails at once, with 2 s
        // steps: the usual 30 attempts may at most double.
        let d = Duration::from_secs(2);
        let (mut b, _) = after_failure(0, Backoff::default(), d);
        let mut attempts = 1;
        for now in (10..60_000).step_by(10) {
            if let Some(moved) = bring_forward(now, b) {
                b = moved;
            }
            if b.retry_at_ms.is_some_and(|at| at <= now) {
                attempts += 1;
                b = after_failure(now, b, d).0;
            }
        }
        assert!((30..=61).contains(&attempts), "{attempts} attempts");
    }

    #[test]
    fn unproven_tokens_are_spaced_exponentially() {
        let t0 = Instant::now();
        let (d, s) = on_401(t0, false, None);
        assert_eq!(d, On401::RefreshUnproven);
        assert_eq!(s.unwrap().gap, MIN_401_GAP);
        assert_eq!(
            on_401(t0 + Duration::from_millis(500), false, s).0,
            On401::Spaced
        );
        let (d, s2) = on_401(t0 + Duration::from_millis(1500), false, s);
        assert_eq!(d, On401::RefreshUnproven);
        assert_eq!(s2.unwrap().gap, Duration::from_secs(2));
        // Quiet for longer than the cap: back to the first gap.
        let (_, s3) = on_401(t0 + Duration::from_secs(120), false, s2);
        assert_eq!(s3.unwrap().gap, MIN_401_GAP);
    }
}
