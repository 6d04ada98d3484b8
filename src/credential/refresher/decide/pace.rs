//! When the refresher's loop wakes by itself, and what the end of an attempt does to its
//! backoff.

use std::time::Duration;

use crate::clock::Instant;
use crate::credential::policy::{self, Backoff};
use crate::credential::{schedule, EXPIRY_MARGIN};

/// What the loop carries from one attempt to the next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pace {
    /// Consecutive failed backoff steps.
    pub failures: u32,
    /// Nothing to do until the stored state changes (nothing stored, or a human must act).
    pub idle: bool,
    /// The backoff step (kept in the credential, where waiting requests read it).
    pub backoff: Backoff,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ended {
    /// A new or adopted token is published.
    Done,
    /// Nothing to do until the stored state changes.
    Idle,
    /// Failed: retried with backoff.
    Failed(Failed),
}

/// What the backoff after a failure depends on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Failed {
    /// How long the current token stays usable, if there is one.
    pub remaining: Option<Duration>,
    /// In [0, 1): spreads the retries of a fleet.
    pub jitter01: f64,
    /// When the provider's refresh limits forbade the attempt: how long until they allow
    /// the next one.
    pub limits_allow_in: Option<Duration>,
    pub now_ms: u64,
}

/// The pace after an attempt, and whether waiting requests are woken (to be answered, or
/// to judge whether the retry comes in time for them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Next {
    pub pace: Pace,
    pub wake_waiters: bool,
}

pub fn after_attempt(pace: Pace, ended: Ended) -> Next {
    match ended {
        Ended::Done => Next {
            pace: Pace::default(),
            wake_waiters: false,
        },
        Ended::Idle => Next {
            pace: Pace {
                idle: true,
                backoff: Backoff::default(),
                ..pace
            },
            wake_waiters: true,
        },
        Ended::Failed(f) => {
            let mut delay = schedule::backoff(pace.failures, f.remaining, f.jitter01);
            if let Some(wait) = f.limits_allow_in {
                delay = delay.max(wait);
            }
            let (backoff, new_step) = policy::after_failure(f.now_ms, pace.backoff, delay);
            Next {
                pace: Pace {
                    failures: pace.failures.saturating_add(new_step as u32),
                    backoff,
                    ..pace
                },
                wake_waiters: true,
            }
        }
    }
}

/// The published token, as the wakeup needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTimes {
    pub generation: u64,
    pub expires_at: Instant,
    pub lifetime: Duration,
    /// False for a long-lived token stored without an expiry.
    pub expiry_known: bool,
}

/// The facts the loop's wakeup depends on.
#[derive(Clone, Copy, Debug)]
pub struct Wake {
    pub idle: bool,
    /// The backoff's retry (Unix ms).
    pub retry_at_ms: Option<u64>,
    pub token: Option<TokenTimes>,
    /// The token is a long-lived access token, never refreshed.
    pub long_lived: bool,
    /// The proactive refresh time already drawn: (generation, when).
    pub scheduled: Option<(u64, Instant)>,
    pub now: Instant,
    pub now_ms: u64,
}

/// When the loop wakes by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// Only when something happens (a request, a store change, shutdown).
    Never,
    At(Instant),
    /// At the proactive refresh time of this token, not drawn yet
    /// ([`proactive_refresh_at`]).
    Schedule(TokenTimes),
}

/// The earlier of the proactive refresh and the backoff retry; never while idle.
pub fn wakeup(w: &Wake) -> Wakeup {
    if w.idle {
        return Wakeup::Never;
    }
    if let Some(at_ms) = w.retry_at_ms {
        return Wakeup::At(w.now + Duration::from_millis(at_ms.saturating_sub(w.now_ms)));
    }
    let Some(token) = w.token else {
        return Wakeup::Never;
    };
    if w.long_lived {
        // Nothing to refresh: wake only when it expires, if that is known.
        return match token.expiry_known {
            true => Wakeup::At(token.expires_at - EXPIRY_MARGIN.min(token.lifetime / 4)),
            false => Wakeup::Never,
        };
    }
    match w.scheduled {
        Some((g, at)) if g == token.generation => Wakeup::At(at),
        _ => Wakeup::Schedule(token),
    }
}

/// The credential's rules for the proactive refresh.
#[derive(Clone, Copy, Debug)]
pub struct Proactive {
    pub refresh_at: f64,
    pub refresh_before: Duration,
    /// The refresh token's idle lifetime, if it has one.
    pub idle_lifetime: Option<Duration>,
    /// When the stored refresh token was obtained (Unix ms), if one is stored.
    pub refresh_obtained_ms: Option<u64>,
    /// `refresh_mode: on_demand`: no refresh by the access token's lifetime, only the
    /// keep-alive one (requests ask for the rest).
    pub on_demand: bool,
}

/// When to refresh `token` without being asked, given `jitter01` in [0, 1): by its
/// lifetime (see [`schedule::refresh_after`]; not in on-demand mode), or earlier to keep a
/// refresh token with an idle lifetime from dying unused. `None`: only when asked.
pub fn proactive_refresh_at(
    token: TokenTimes,
    rules: Proactive,
    jitter01: f64,
    now: Instant,
    now_ms: u64,
) -> Option<Instant> {
    let by_lifetime = (!rules.on_demand).then(|| {
        let after = schedule::refresh_after(
            token.lifetime,
            rules.refresh_at,
            rules.refresh_before,
            jitter01,
        );
        // `expires_at - lifetime` is when the token was published here.
        token.expires_at - token.lifetime + after
    });
    let keep_alive = rules
        .idle_lifetime
        .zip(rules.refresh_obtained_ms)
        .map(|(idle, obtained)| {
            let at_ms = policy::keep_alive_at(obtained, idle);
            now + Duration::from_millis(at_ms.saturating_sub(now_ms))
        });
    [by_lifetime, keep_alive].into_iter().flatten().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_700_000_000_000;
    const S: fn(u64) -> Duration = Duration::from_secs;

    fn failed(remaining: Option<Duration>, limits_allow_in: Option<Duration>) -> Ended {
        Ended::Failed(Failed {
            remaining,
            jitter01: 0.5,
            limits_allow_in,
            now_ms: NOW_MS,
        })
    }

    fn backing_off(retry_in_ms: u64) -> Backoff {
        Backoff {
            retry_at_ms: Some(NOW_MS + retry_in_ms),
            last_failure_ms: NOW_MS - 1_000,
            brought_forward: false,
            step_retry_ms: Some(NOW_MS + retry_in_ms),
        }
    }

    #[test]
    fn what_the_end_of_an_attempt_does_to_the_pace() {
        let failing = Pace {
            failures: 3,
            idle: false,
            backoff: backing_off(0),
        };
        // A step's retry brought forward by waiting requests; its own retry is 3 s away.
        let brought_forward = Pace {
            backoff: Backoff {
                brought_forward: true,
                step_retry_ms: Some(NOW_MS + 3_000),
                ..backing_off(0)
            },
            ..failing
        };
        let step_kept = Pace {
            backoff: Backoff {
                retry_at_ms: Some(NOW_MS + 3_000),
                last_failure_ms: NOW_MS,
                brought_forward: true,
                step_retry_ms: Some(NOW_MS + 3_000),
            },
            ..failing
        };
        let step = |failures: u32, in_ms: u64| Pace {
            failures,
            idle: false,
            backoff: Backoff {
                retry_at_ms: Some(NOW_MS + in_ms),
                last_failure_ms: NOW_MS,
                brought_forward: false,
                step_retry_ms: Some(NOW_MS + in_ms),
            },
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Pace, Ended, Pace, bool)> = vec![
            ("success ends the backoff", failing, Ended::Done, Pace::default(), false),
            ("success after idling", Pace { idle: true, ..Pace::default() }, Ended::Done, Pace::default(), false),
            ("idle keeps the failure count", failing, Ended::Idle, Pace { idle: true, backoff: Backoff::default(), ..failing }, true),
            ("first failure, no token: 0.5 s", Pace::default(), failed(None, None), step(1, 500), true),
            ("fourth failure, no token: 4 s", failing, failed(None, None), step(4, 4_000), true),
            ("many failures, no token: capped at 5 s", Pace { failures: 30, ..failing }, failed(None, None), step(31, 5_000), true),
            ("many failures, token valid: capped at 60 s", Pace { failures: 30, ..failing }, failed(Some(S(1_000)), None), step(31, 60_000), true),
            ("token about to expire: half its remaining validity", failing, failed(Some(S(2)), None), step(4, 1_000), true),
            ("provider limits: not before they allow", Pace::default(), failed(None, Some(S(90))), step(1, 90_000), true),
            ("provider limits shorter than the backoff", failing, failed(None, Some(S(1))), step(4, 4_000), true),
            ("a brought-forward attempt failed: the step stands", brought_forward, failed(None, None), step_kept, true),
        ];
        for (case, pace, ended, pace_after, wake_waiters) in cases {
            assert_eq!(
                after_attempt(pace, ended),
                Next {
                    pace: pace_after,
                    wake_waiters
                },
                "{case}"
            );
        }
    }

    #[test]
    fn when_the_loop_wakes() {
        let now = Instant::now();
        let token = TokenTimes {
            generation: 4,
            expires_at: now + S(600),
            lifetime: S(600),
            expiry_known: true,
        };
        let wake = Wake {
            idle: false,
            retry_at_ms: None,
            token: Some(token),
            long_lived: false,
            scheduled: None,
            now,
            now_ms: NOW_MS,
        };
        let unknown_expiry = TokenTimes {
            expiry_known: false,
            ..token
        };
        let short = TokenTimes {
            expires_at: now + S(4),
            lifetime: S(4),
            ..token
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Wake, Wakeup)> = vec![
            ("idle", Wake { idle: true, retry_at_ms: Some(NOW_MS), ..wake }, Wakeup::Never),
            ("backing off", Wake { retry_at_ms: Some(NOW_MS + 1_500), ..wake }, Wakeup::At(now + Duration::from_millis(1_500))),
            ("backing off, retry overdue", Wake { retry_at_ms: Some(NOW_MS - 1), ..wake }, Wakeup::At(now)),
            ("backing off without a token", Wake { retry_at_ms: Some(NOW_MS + 1), token: None, ..wake }, Wakeup::At(now + Duration::from_millis(1))),
            ("no token", Wake { token: None, ..wake }, Wakeup::Never),
            ("long-lived, expiry known", Wake { long_lived: true, ..wake }, Wakeup::At(now + S(598))),
            ("long-lived, 4 s: a quarter of its life before it expires", Wake { long_lived: true, token: Some(short), ..wake }, Wakeup::At(now + S(3))),
            ("long-lived, expiry unknown", Wake { long_lived: true, token: Some(unknown_expiry), ..wake }, Wakeup::Never),
            ("refresh time drawn for this token", Wake { scheduled: Some((4, now + S(450))), ..wake }, Wakeup::At(now + S(450))),
            ("refresh time drawn for an older token", Wake { scheduled: Some((3, now + S(450))), ..wake }, Wakeup::Schedule(token)),
            ("no refresh time drawn yet", wake, Wakeup::Schedule(token)),
        ];
        for (case, w, expected) in cases {
            assert_eq!(wakeup(&w), expected, "{case}");
        }
    }

    #[test]
    fn when_a_token_is_refreshed_proactively() {
        let now = Instant::now();
        // A 10-minute token published 100 s ago.
        let token = TokenTimes {
            generation: 4,
            expires_at: now + S(500),
            lifetime: S(600),
            expiry_known: true,
        };
        let rules = Proactive {
            refresh_at: 0.8,
            refresh_before: S(60),
            idle_lifetime: None,
            refresh_obtained_ms: None,
            on_demand: false,
        };
        let on_demand = Proactive {
            on_demand: true,
            ..rules
        };
        let idle = |obtained_ago_s: u64| Proactive {
            idle_lifetime: Some(S(1_000)),
            refresh_obtained_ms: Some(NOW_MS - obtained_ago_s * 1_000),
            ..rules
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Proactive, f64, Option<Instant>)> = vec![
            ("by its lifetime, 480 s after publishing", rules, 0.0, Some(now + S(380))),
            ("full jitter: 5% of the lifetime earlier", rules, 1.0, Some(now + S(350))),
            ("idle lifetime far off", idle(0), 0.0, Some(now + S(380))),
            ("idle lifetime first: a tenth before it dies", idle(700), 0.0, Some(now + S(200))),
            ("idle lifetime overdue: now", idle(2_000), 0.0, Some(now)),
            ("idle lifetime without a stored refresh token", Proactive { refresh_obtained_ms: None, ..idle(700) }, 0.0, Some(now + S(380))),
            ("on demand: never by the lifetime", on_demand, 0.0, None),
            ("on demand: the keep-alive only, though far off", Proactive { on_demand: true, ..idle(0) }, 0.0, Some(now + S(900))),
            ("on demand: the keep-alive when due", Proactive { on_demand: true, ..idle(700) }, 0.0, Some(now + S(200))),
        ];
        for (case, rules, jitter01, expected) in cases {
            assert_eq!(
                proactive_refresh_at(token, rules, jitter01, now, NOW_MS),
                expected,
                "{case}"
            );
        }
    }
}
