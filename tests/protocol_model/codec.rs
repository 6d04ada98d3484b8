//! How a state is packed for the explorer (a state fits in fewer than 128 bits, so
//! it is kept as one `u128`) and shown in traces.

use std::fmt;

use super::model::{Event, Fate, Lease, Outcome, Phase, State, MARKER, MAX_TOKENS};

struct Bits {
    word: u128,
    at: u32,
}

impl Bits {
    fn put(&mut self, value: u8, width: u32) {
        debug_assert!(
            u32::from(value) < 1 << width,
            "{value} overflows {width} bits"
        );
        self.word |= u128::from(value) << self.at;
        self.at += width;
    }

    fn take(&mut self, width: u32) -> u8 {
        let value = (self.word >> self.at) & ((1 << width) - 1);
        self.at += width;
        value as u8
    }
}

const PHASE_BITS: u32 = 4;
const GENERATION_BITS: u32 = 3;
const TOKEN_BITS: u32 = 3;
const FATE_BITS: u32 = 3;

impl State {
    pub fn pack(&self) -> u128 {
        let mut b = Bits { word: 0, at: 0 };
        b.put(self.current, TOKEN_BITS);
        b.put(u8::from(self.revoked), 1);
        b.put(self.stored_generation, GENERATION_BITS);
        b.put(self.stored, TOKEN_BITS);
        b.put(lease_code(self.lease), 3);
        for f in self.fates {
            b.put(f as u8, FATE_BITS);
        }
        b.put(self.cut_off, MAX_TOKENS as u32);
        b.put(self.crashes, 2);
        b.put(self.renewal_failures, 2);
        for r in &self.replicas {
            let (tag, generation, token) = phase_code(r.phase);
            b.put(tag, PHASE_BITS);
            b.put(generation, GENERATION_BITS);
            b.put(token, TOKEN_BITS);
            b.put(r.known, GENERATION_BITS);
            b.put(u8::from(r.renewal_failed), 1);
        }
        b.word
    }

    pub fn unpack(word: u128) -> State {
        let mut b = Bits { word, at: 0 };
        let mut s = State::initial();
        s.current = b.take(TOKEN_BITS);
        s.revoked = b.take(1) == 1;
        s.stored_generation = b.take(GENERATION_BITS);
        s.stored = b.take(TOKEN_BITS);
        s.lease = lease_from(b.take(3));
        for f in &mut s.fates {
            *f = fate_from(b.take(FATE_BITS));
        }
        s.cut_off = b.take(MAX_TOKENS as u32);
        s.crashes = b.take(2);
        s.renewal_failures = b.take(2);
        for r in &mut s.replicas {
            let tag = b.take(PHASE_BITS);
            let generation = b.take(GENERATION_BITS);
            let token = b.take(TOKEN_BITS);
            r.phase = phase_from(tag, generation, token);
            r.known = b.take(GENERATION_BITS);
            r.renewal_failed = b.take(1) == 1;
        }
        s
    }
}

fn lease_code(lease: Lease) -> u8 {
    match lease {
        Lease::Free => 0,
        Lease::Orphaned => 1,
        Lease::Held(i) => 2 + i,
    }
}

fn lease_from(code: u8) -> Lease {
    match code {
        0 => Lease::Free,
        1 => Lease::Orphaned,
        c => Lease::Held(c - 2),
    }
}

fn fate_from(code: u8) -> Fate {
    [
        Fate::Unissued,
        Fate::Held,
        Fate::Durable,
        Fate::TimedOut,
        Fate::HolderCrashed,
        Fate::Dropped,
    ][usize::from(code)]
}

fn phase_code(p: Phase) -> (u8, u8, u8) {
    match p {
        Phase::Idle => (0, 0, 0),
        Phase::Leased => (1, 0, 0),
        Phase::Loaded { generation, token } => (2, generation, token),
        Phase::Confirmed { generation, token } => (3, generation, token),
        Phase::InFlight { generation, token } => (4, generation, token),
        Phase::Writing { generation, token } => (5, generation, token),
        Phase::Rejected { generation } => (6, generation, 0),
        Phase::MarkingRejected { generation } => (7, generation, 0),
        Phase::Reauthorization => (8, 0, 0),
        Phase::Crashed => (9, 0, 0),
    }
}

fn phase_from(tag: u8, generation: u8, token: u8) -> Phase {
    match tag {
        0 => Phase::Idle,
        1 => Phase::Leased,
        2 => Phase::Loaded { generation, token },
        3 => Phase::Confirmed { generation, token },
        4 => Phase::InFlight { generation, token },
        5 => Phase::Writing { generation, token },
        6 => Phase::Rejected { generation },
        7 => Phase::MarkingRejected { generation },
        8 => Phase::Reauthorization,
        _ => Phase::Crashed,
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Event::Adopt(i) => write!(f, "replica {i} adopts the stored state (watch)"),
            Event::TakeLease(i) => write!(f, "replica {i} takes the lease"),
            Event::Load(i) => write!(f, "replica {i} loads the store under the lease"),
            Event::Confirm(i) => write!(f, "replica {i} confirms the lease before sending"),
            Event::Send(i) => write!(f, "replica {i} sends its refresh token"),
            Event::Answer(i, o) => write!(f, "replica {i} {o}"),
            Event::Write { replica, ack_lost } => {
                let ack = if ack_lost {
                    ", acknowledgement lost"
                } else {
                    ""
                };
                write!(f, "replica {replica} compare-and-swaps{ack}")
            }
            Event::ReRead(i) => write!(f, "replica {i} re-reads the store after invalid_grant"),
            Event::WriteMarker { replica, stored } => {
                let how = if stored { "" } else { " (not stored)" };
                write!(f, "replica {replica} records reauthorization_required{how}")
            }
            Event::RenewalFails(i) => write!(f, "replica {i}'s lease renewal fails"),
            Event::Crash {
                replica,
                server_acted,
            } => {
                let acted = if server_acted {
                    ", the server acts on its request"
                } else {
                    ""
                };
                write!(f, "replica {replica} crashes{acted}")
            }
            Event::Restart(i) => write!(f, "replica {i} restarts with empty memory"),
            Event::LeaseExpires => write!(f, "the lease expires"),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Usable => "gets a new token pair",
            Outcome::UnusableAccessToken => {
                "gets a 200 with a new refresh token but an unusable access token"
            }
            Outcome::InvalidGrant => "gets invalid_grant",
            Outcome::LostAfterActing => "times out after the server acted",
            Outcome::LostBeforeActing => "times out before the server acted",
        })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Phase::Idle => write!(f, "idle"),
            Phase::Leased => write!(f, "leased"),
            Phase::Loaded { generation, token } => write!(f, "loaded g{generation} r{token}"),
            Phase::Confirmed { generation, token } => {
                write!(f, "confirmed g{generation} r{token}")
            }
            Phase::InFlight { generation, token } => {
                write!(f, "in flight g{generation} r{token}")
            }
            Phase::Writing { generation, token } => write!(f, "writing g{generation}→r{token}"),
            Phase::Rejected { generation } => write!(f, "rejected g{generation}"),
            Phase::MarkingRejected { generation } => write!(f, "marking g{generation}"),
            Phase::Reauthorization => write!(f, "reauthorization required"),
            Phase::Crashed => write!(f, "crashed"),
        }
    }
}

impl State {
    /// One line: the server, the store, the lease and the first `replicas` replicas.
    pub fn render(&self, replicas: usize) -> String {
        let revoked = if self.revoked { " REVOKED" } else { "" };
        let stored = match self.stored {
            MARKER => "marker".to_string(),
            t => format!("r{t}"),
        };
        let lease = match self.lease {
            Lease::Free => "free".to_string(),
            Lease::Orphaned => "orphaned".to_string(),
            Lease::Held(i) => format!("replica {i}"),
        };
        let mut line = format!(
            "server r{}{revoked} | store g{} {stored} | lease {lease} |",
            self.current, self.stored_generation
        );
        for t in 0..MAX_TOKENS {
            if self.cut_off & (1 << t) != 0 {
                line += &format!(" r{t} unwritten at lease loss |");
            }
        }
        for r in &self.replicas[..replicas] {
            let failed = if r.renewal_failed {
                ", renewal failed"
            } else {
                ""
            };
            line += &format!(" [{}, knows g{}{failed}]", r.phase, r.known);
        }
        line
    }
}
