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
    #[test]
    fn a_token_rotated_elsewhere_is_adopted_unless_itself_due() {
        let min = Duration::from_secs(60);
        // 10 min token (lead 2 min): adopted with 5 min left, refreshed with 30 s left.
        assert!(!rotated_token_due(300_000, 0, Some(600_000), 0.8, min));
        assert!(rotated_token_due(570_000, 0, Some(600_000), 0.8, min));
        // Already expired, or no expiry known: refreshed.
        assert!(rotated_token_due(700_000, 0, Some(600_000), 0.8, min));
        assert!(rotated_token_due(0, 0, None, 0.8, min));
    }

    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn design_examples() {
        let h = |s: u64| Duration::from_secs(s);
        // 24 h token refreshes ~19 h in; 10 min ~8 min in; 4 s ~2 s in (no jitter).
        assert_eq!(refresh_after(h(86400), 0.8, MIN, 0.0), h(69120));
        assert_eq!(refresh_after(h(600), 0.8, MIN, 0.0), h(480));
        assert_eq!(refresh_after(h(4), 0.8, MIN, 0.0), h(2));
        // Jitter moves it earlier by at most 5% of the lifetime.
        assert_eq!(refresh_after(h(600), 0.8, MIN, 1.0), h(450));
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(0, None, 0.5), Duration::from_millis(500));
        assert_eq!(backoff(3, None, 0.5), Duration::from_secs(4));
        assert_eq!(
            backoff(30, Some(Duration::from_secs(1000)), 0.5),
            Duration::from_secs(60)
        );
        assert_eq!(backoff(30, None, 0.5), Duration::from_secs(5));
        assert_eq!(
            backoff(5, Some(Duration::from_secs(4)), 0.5),
            Duration::from_secs(2)
        );
        assert_eq!(
            backoff(5, Some(Duration::ZERO), 0.5),
            Duration::from_millis(200)
        );
    }
}
