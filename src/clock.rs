//! The time the refresher decides by: tokio's clock, and the wall clock moved along with
//! it. In a running process tokio's clock is the monotonic clock, so the wall clock is
//! the system's; under a test's paused clock (tokio `test-util`), the wall clock jumps
//! as far as the test advances time, so that expiries stored as Unix time and deadlines
//! kept as instants agree, and a simulation can run hours of refreshes in milliseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

/// The wall clock, advanced with tokio's clock when a test pauses it.
pub fn wall_now() -> SystemTime {
    let real = SystemTime::now();
    let tokio_now = Instant::now().into_std();
    let std_now = std::time::Instant::now();
    match tokio_now.checked_duration_since(std_now) {
        Some(ahead) => real + ahead,
        None => real - std_now.saturating_duration_since(tokio_now),
    }
}

/// Milliseconds since the Unix epoch, by [`wall_now`].
pub fn now_ms() -> u64 {
    wall_now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wall time `ms` milliseconds after the epoch.
pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_wall_clock_follows_a_paused_clock() {
        let before = now_ms();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let after = now_ms();
        assert!(
            (3_600_000..3_601_000).contains(&(after - before)),
            "{}",
            after - before
        );
    }

    /// A paused clock stands still while real time passes: so does the wall clock.
    #[tokio::test(start_paused = true)]
    async fn the_wall_clock_stands_still_with_a_paused_clock() {
        let before = now_ms();
        std::thread::sleep(Duration::from_millis(300));
        let after = now_ms();
        assert!(
            after.abs_diff(before) < 100,
            "moved {} ms",
            after.abs_diff(before)
        );
    }

    #[test]
    fn milliseconds_count_from_the_epoch() {
        assert_eq!(from_ms(1_500), UNIX_EPOCH + Duration::from_millis(1_500));
    }

    #[test]
    fn outside_a_paused_clock_it_is_the_system_clock() {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now_ms().abs_diff(system) < 1000);
    }
}
