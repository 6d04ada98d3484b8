//! One timer per connection, re-armed lazily: moving a deadline later costs a clock read,
//! not a timer-wheel update. The timer re-arms itself when it fires early.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

pub struct Deadline {
    sleep: Pin<Box<Sleep>>,
    /// When the timer is set to fire; never later than `at`.
    armed: Instant,
    /// The deadline that counts.
    at: Instant,
}

impl Deadline {
    pub fn new(at: Instant) -> Deadline {
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(at.into())),
            armed: at,
            at,
        }
    }

    /// Sets the deadline to `now + d`.
    pub fn after(&mut self, d: Duration) {
        self.set(Instant::now() + d);
    }

    pub fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.armed {
            self.armed = at;
            self.sleep.as_mut().reset(at.into());
        }
    }

    /// Ready once the deadline has passed.
    pub fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            self.armed = self.at;
            self.sleep.as_mut().reset(self.at.into());
        }
    }

    /// Runs `fut` to completion unless the deadline passes first (`None`).
    pub async fn within<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            self.poll_passed(cx).map(|()| None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn later_deadlines_are_honoured_and_earlier_ones_fire() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut d = Deadline::new(start + ms(50));
        d.set(start + ms(300));
        assert_eq!(d.within(std::future::pending::<()>()).await, None);
        assert!(start.elapsed() >= ms(300));

        d.after(Duration::from_secs(60));
        d.after(ms(100));
        let t = Instant::now();
        assert_eq!(d.within(std::future::pending::<()>()).await, None);
        assert!(t.elapsed() >= ms(100) && t.elapsed() < Duration::from_secs(30));

        d.after(ms(50));
        assert_eq!(d.within(async { 7 }).await, Some(7));
    }
}
