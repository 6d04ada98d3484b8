//! When to refresh, and how long to back off: pure functions of time, unit-tested.

use std::time::Duration;

/// How long before expiry a proactive refresh starts (DESIGN.md):
/// `lead = max(lifetime × (1 − refresh_at), min(refresh_before, lifetime / 2))`.
pub fn lead(lifetime: Duration, refresh_at: f64, refresh_before: Duration) -> Duration {
    let by_fraction = lifetime.mul_f64(1.0 - refresh_at);
    by_fraction.max(refresh_before.min(lifetime / 2))
}

/// Time from token issue to the proactive refresh, given `jitter01` in [0, 1): the lead
/// plus up to 5% of the lifetime of random jitter, so replicas do not refresh in lockstep.
pub fn refresh_after(
    lifetime: Duration,
    refresh_at: f64,
    refresh_before: Duration,
    jitter01: f64,
) -> Duration {
    let early = lead(lifetime, refresh_at, refresh_before) + lifetime.mul_f64(0.05 * jitter01);
    lifetime.saturating_sub(early)
}

/// Exponential backoff with jitter for failed refreshes: 0.5 s, 1 s, 2 s … capped at 60 s
/// while a valid token remains, and at 5 s once none does (requests are failing, so the
/// endpoint's recovery should be noticed quickly); each scaled by a factor in
/// [0.75, 1.25); never later than half the remaining validity of the current token (so
/// retries happen while it still works), and never under 200 ms.
pub fn backoff(failures: u32, remaining_validity: Option<Duration>, jitter01: f64) -> Duration {
    let cap = if remaining_validity.is_some() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    };
    let base = Duration::from_millis(500).saturating_mul(1u32 << failures.min(7));
    let mut d = base.min(cap).mul_f64(0.75 + 0.5 * jitter01);
    if let Some(rem) = remaining_validity {
        d = d.min(rem / 2);
    }
    d.max(Duration::from_millis(200))
}

/// Whether an access token another process just stored (obtained at `obtained_ms`,
/// expiring at `expires_ms`, Unix ms) is itself due for refresh at `now_ms`, so the
/// lease holder refreshes it rather than adopting it: within half the lead of its
/// expiry, or with no expiry known.
pub fn rotated_token_due(
    now_ms: u64,
    obtained_ms: u64,
    expires_ms: Option<u64>,
    refresh_at: f64,
    refresh_before: Duration,
) -> bool {
    let Some(exp) = expires_ms else {
        return true;
    };
    let left = Duration::from_millis(exp.saturating_sub(now_ms));
    let life = Duration::from_millis(exp.saturating_sub(obtained_ms));
    left <= lead(life, refresh_at, refresh_before) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn how_long_before_expiry_a_refresh_starts() {
        #[rustfmt::skip]
        let cases = [
            ("24 h token: the fraction (20%)", S(86_400), 0.8, MIN, S(17_280)),
            ("10 min token: the fraction (2 min)", S(600), 0.8, MIN, S(120)),
            ("4 min token: refresh_before over the fraction", S(240), 0.8, MIN, S(60)),
            ("4 s token: refresh_before capped at half the lifetime", S(4), 0.8, MIN, S(2)),
            ("refresh_at 0.5: half the lifetime", S(600), 0.5, MIN, S(300)),
            ("refresh_at 1.0: refresh_before alone", S(600), 1.0, MIN, S(60)),
        ];
        for (case, lifetime, refresh_at, refresh_before, expected) in cases {
            assert_eq!(
                lead(lifetime, refresh_at, refresh_before),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn design_examples() {
        #[rustfmt::skip]
        let cases = [
            ("24 h token refreshes ~19 h in", S(86_400), 0.0, S(69_120)),
            ("10 min token ~8 min in", S(600), 0.0, S(480)),
            ("4 s token ~2 s in", S(4), 0.0, S(2)),
            ("full jitter moves it 5% of the lifetime earlier", S(600), 1.0, S(450)),
            ("half jitter: 2.5% earlier", S(600), 0.5, S(465)),
        ];
        for (case, lifetime, jitter01, expected) in cases {
            assert_eq!(
                refresh_after(lifetime, 0.8, MIN, jitter01),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let ms = Duration::from_millis;
        #[rustfmt::skip]
        let cases = [
            ("first failure: 0.5 s", 0, None, 0.5, ms(500)),
            ("doubling: 4 s after three", 3, None, 0.5, S(4)),
            ("no token left: capped at 5 s", 30, None, 0.5, S(5)),
            ("a token left: capped at 60 s", 30, Some(S(1_000)), 0.5, S(60)),
            ("half the remaining validity", 5, Some(S(4)), 0.5, S(2)),
            ("never under 200 ms", 5, Some(Duration::ZERO), 0.5, ms(200)),
            ("jitter low: x0.75", 1, None, 0.0, ms(750)),
            ("jitter high: up to x1.25", 1, None, 1.0, ms(1_250)),
            ("the shift stops growing after 7", 60, Some(S(100_000)), 0.5, S(60)),
        ];
        for (case, failures, remaining, jitter01, expected) in cases {
            assert_eq!(backoff(failures, remaining, jitter01), expected, "{case}");
        }
    }

    #[test]
    fn a_token_rotated_elsewhere_is_adopted_unless_itself_due() {
        // A 10 min token obtained at 0 (lead 2 min, half of it 1 min).
        #[rustfmt::skip]
        let cases = [
            ("5 min left: adopted", 300_000, 0, Some(600_000), false),
            ("61 s left: adopted", 539_000, 0, Some(600_000), false),
            ("60 s left: refreshed", 540_000, 0, Some(600_000), true),
            ("30 s left: refreshed", 570_000, 0, Some(600_000), true),
            ("already expired: refreshed", 700_000, 0, Some(600_000), true),
            ("no expiry known: refreshed", 0, 0, None, true),
        ];
        for (case, now_ms, obtained_ms, expires_ms, due) in cases {
            assert_eq!(
                rotated_token_due(now_ms, obtained_ms, expires_ms, 0.8, MIN),
                due,
                "{case}"
            );
        }
    }
}
