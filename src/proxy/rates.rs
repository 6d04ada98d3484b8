//! Per-minute request counters of one upstream over the last hour, by status class, for
//! the status page's sparkline (no Prometheus needed). Written by every answered request,
//! so lock-free and allocation-free: 60 slots indexed by minute % 60, each stamped with
//! its minute. A request reads the stamp and adds one to a counter; the first request
//! of a new minute claims the slot and clears it. A request racing that claim may be
//! lost or land in the cleared slot: the counts are for a picture, not for billing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

/// Minutes kept.
pub const MINUTES: usize = 60;

/// Status classes: below 400 (`2xx`, with the rare 1xx/3xx), `4xx`, `5xx` (all, the
/// upstream's and tokenrelay's own), and `own_5xx` (tokenrelay's own answers, counted
/// on top of `5xx`; [`Snapshot`] separates them).
#[derive(Clone, Copy)]
enum Class {
    Ok = 0,
    Client = 1,
    Server = 2,
    Own = 3,
}

#[derive(Default)]
struct Slot {
    /// Minutes since `Rates::base`, plus one (0: never used).
    minute: AtomicU64,
    counts: [AtomicU64; 4],
}

/// The ring of one upstream.
pub struct Rates {
    base: Instant,
    base_wall: SystemTime,
    slots: [Slot; MINUTES],
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            base: Instant::now(),
            base_wall: SystemTime::now(),
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

/// The last hour, oldest minute first (the last one is the current, partial minute).
#[derive(Debug, Default, serde::Serialize)]
pub struct Snapshot {
    /// When the oldest minute began (RFC 3339).
    pub from: String,
    #[serde(rename = "2xx")]
    pub ok: Vec<u64>,
    #[serde(rename = "4xx")]
    pub client: Vec<u64>,
    /// The upstream's own 5xx answers (without tokenrelay's).
    #[serde(rename = "5xx")]
    pub upstream: Vec<u64>,
    /// tokenrelay's own 5xx answers (no token, upstream unreachable or too slow).
    pub own_5xx: Vec<u64>,
}

impl Rates {
    fn minute(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_secs() / 60 + 1
    }

    fn add(&self, at: Instant, class: Class) {
        let minute = self.minute(at);
        let slot = &self.slots[minute as usize % MINUTES];
        let stamp = slot.minute.load(Relaxed);
        if stamp != minute {
            if stamp > minute {
                // A request of an older minute answered late: its slot is gone.
                return;
            }
            if slot
                .minute
                .compare_exchange(stamp, minute, Relaxed, Relaxed)
                .is_ok()
            {
                for c in &slot.counts {
                    c.store(0, Relaxed);
                }
            } else if slot.minute.load(Relaxed) != minute {
                return;
            }
        }
        slot.counts[class as usize].fetch_add(1, Relaxed);
    }

    /// One answered request of a request that started at `started`.
    pub fn count(&self, status: u16, started: Instant) {
        let class = match status {
            ..=399 => Class::Ok,
            400..=499 => Class::Client,
            _ => Class::Server,
        };
        self.add(started, class);
    }

    /// One of tokenrelay's own 5xx answers (also counted by [`Rates::count`]).
    pub fn count_own_5xx(&self, started: Instant) {
        self.add(started, Class::Own);
    }

    /// The last hour as of now.
    pub fn snapshot(&self) -> Snapshot {
        let now = self.minute(Instant::now());
        let current_began = self.base_wall + Duration::from_secs((now - 1) * 60);
        let first_began = current_began
            .checked_sub(Duration::from_secs((MINUTES as u64 - 1) * 60))
            .unwrap_or(current_began);
        let mut s = Snapshot {
            from: humantime::format_rfc3339_seconds(first_began).to_string(),
            ..Snapshot::default()
        };
        for minute in (now + 1).saturating_sub(MINUTES as u64)..=now {
            let slot = &self.slots[minute as usize % MINUTES];
            let n = |class: Class| {
                if minute > 0 && slot.minute.load(Relaxed) == minute {
                    slot.counts[class as usize].load(Relaxed)
                } else {
                    0
                }
            };
            let own = n(Class::Own);
            s.ok.push(n(Class::Ok));
            s.client.push(n(Class::Client));
            s.upstream.push(n(Class::Server).saturating_sub(own));
            s.own_5xx.push(own);
        }
        // Minutes before the process started count as none.
        let pad = MINUTES - s.ok.len();
        for v in [&mut s.ok, &mut s.client, &mut s.upstream, &mut s.own_5xx] {
            v.splice(0..0, std::iter::repeat_n(0, pad));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_minute_by_class() {
        let r = Rates::default();
        let now = Instant::now();
        r.count(200, now);
        r.count(304, now);
        r.count(404, now);
        r.count(502, now);
        r.count(503, now);
        r.count_own_5xx(now);
        let s = r.snapshot();
        assert_eq!(s.ok.len(), MINUTES);
        assert_eq!(s.ok[MINUTES - 1], 2);
        assert_eq!(s.client[MINUTES - 1], 1);
        assert_eq!(s.upstream[MINUTES - 1], 1);
        assert_eq!(s.own_5xx[MINUTES - 1], 1);
        assert_eq!(s.ok.iter().sum::<u64>(), 2);
    }

    /// An hour later the slot is reused: the old minute's counts are gone.
    #[test]
    fn a_slot_is_cleared_when_its_minute_comes_round_again() {
        let r = Rates::default();
        let start = Instant::now();
        r.count(200, start);
        r.count(200, start + Duration::from_secs(61));
        let later = start + Duration::from_secs(3600);
        r.count(404, later);
        let slot = &r.slots[r.minute(later) as usize % MINUTES];
        assert_eq!(slot.counts[Class::Ok as usize].load(Relaxed), 0);
        assert_eq!(slot.counts[Class::Client as usize].load(Relaxed), 1);
        // A late request of an older minute does not count into the newer one.
        r.count(500, start);
        assert_eq!(slot.counts[Class::Server as usize].load(Relaxed), 0);
    }
}
