//! A credential's recent history for the status page's timeline: refresh results, state
//! changes and 401 replays, kept in memory in a small bounded ring (the oldest event
//! goes first). Events are rare (a few per token lifetime), so a mutex is fine here;
//! nothing on a request's way writes to it except a 401 replay.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::{RefreshResult, State, Trigger};

/// At most this many events are kept: a day of refreshes every few minutes, with room
/// for state changes and replays.
pub const CAPACITY: usize = 512;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Refresh(Trigger, RefreshResult),
    State(State),
    /// A request was sent again with a newer token after a 401; the retry's status.
    Replay401(u16),
}

/// One event, at a wall time in Unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub at_ms: u64,
    pub kind: Kind,
}

impl Event {
    /// As `/status` shows it: `{"at", "at_ms", "kind", …}`.
    pub fn json(&self) -> serde_json::Value {
        let at = humantime::format_rfc3339_seconds(crate::clock::from_ms(self.at_ms)).to_string();
        match self.kind {
            Kind::Refresh(trigger, result) => serde_json::json!({
                "at": at, "at_ms": self.at_ms, "kind": "refresh",
                "trigger": trigger, "result": result,
            }),
            Kind::State(state) => serde_json::json!({
                "at": at, "at_ms": self.at_ms, "kind": "state", "state": state,
            }),
            Kind::Replay401(status) => serde_json::json!({
                "at": at, "at_ms": self.at_ms, "kind": "replay_401", "status": status,
            }),
        }
    }
}

/// The bounded ring.
#[derive(Debug, Default)]
pub struct Events(Mutex<VecDeque<Event>>);

impl Events {
    pub fn push(&self, at_ms: u64, kind: Kind) {
        let mut ring = self.0.lock().unwrap();
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(Event { at_ms, kind });
    }

    /// The events at or after `since_ms`, oldest first.
    pub fn since(&self, since_ms: u64) -> Vec<Event> {
        let ring = self.0.lock().unwrap();
        ring.iter()
            .filter(|e| e.at_ms >= since_ms)
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events() {
        let events = Events::default();
        for i in 0..(CAPACITY as u64 + 10) {
            events.push(i, Kind::Replay401(200));
        }
        let kept = events.since(0);
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0].at_ms, 10);
        assert_eq!(events.since(CAPACITY as u64 + 5).len(), 5);
    }

    #[test]
    fn events_show_what_happened() {
        let e = Event {
            at_ms: 0,
            kind: Kind::Refresh(Trigger::Scheduled, RefreshResult::InDoubt),
        };
        let v = e.json();
        assert_eq!(v["kind"], "refresh");
        assert_eq!(v["result"], "in_doubt");
        assert_eq!(v["at"], "1970-01-01T00:00:00Z");
    }
}
