//! What one state of the model holds, and the invariants checked on it.
//!
//! A state is the whole world of one credential: the token endpoint, the store, the
//! lease and each replica's place in the refresh sequence with what it remembers.
//! `Model::steps` (steps.rs) lists every step that can lead out of a state.

/// Replicas a state can hold; a configuration may use fewer.
pub const MAX_REPLICAS: usize = 3;
/// Refresh tokens r0..r4: the seeded one and up to four rotations.
pub const MAX_TOKENS: usize = 5;
/// What the store holds instead of a refresh token once a rejection is recorded.
pub const MARKER: u8 = 7;

/// The protocol under test; each flag is one safeguard a broken variant drops.
#[derive(Clone, Copy, Debug)]
pub struct Protocol {
    /// Before sending, check the lease is held for the request timeout plus a margin.
    pub confirm_before_send: bool,
    /// A 200 with an unusable access token still has its new refresh token written.
    pub keep_unusable_answer: bool,
    /// The lease keeps being renewed after the answer, while the result is written.
    pub renew_while_writing: bool,
    /// The write is a compare-and-swap on the generation, not a blind overwrite.
    pub compare_generation: bool,
}

impl Protocol {
    /// The protocol as docs/replicas.md specifies it.
    pub const TARGET: Protocol = Protocol {
        confirm_before_send: true,
        keep_unusable_answer: true,
        renew_while_writing: true,
        compare_generation: true,
    };
}

/// What keeps the state space finite (and within the packed field widths).
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// At most [`MAX_REPLICAS`].
    pub replicas: u8,
    /// Rotations the token endpoint performs at most, below [`MAX_TOKENS`]. A send that
    /// would exceed them is not taken; sends of spent tokens stay possible, so
    /// violations remain visible.
    pub rotations: u8,
    /// Crashes in one history, at most 3.
    pub crashes: u8,
    /// Lease renewals that fail after an answer (the holder is cut off from the store),
    /// at most 3.
    pub renewal_failures: u8,
}

#[derive(Clone, Copy, Debug)]
pub struct Model {
    pub(crate) protocol: Protocol,
    pub(crate) bounds: Bounds,
}

/// Where a replica is in its refresh sequence. `generation` and `token` are what it
/// loaded from the store (or, in `Writing`, the new token it must make durable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Leased,
    Loaded { generation: u8, token: u8 },
    Confirmed { generation: u8, token: u8 },
    InFlight { generation: u8, token: u8 },
    Writing { generation: u8, token: u8 },
    Rejected { generation: u8 },
    MarkingRejected { generation: u8 },
    Reauthorization,
    Crashed,
}

impl Phase {
    /// After the token endpoint answered and before the attempt ends: only a failed
    /// renewal can let the lease expire here.
    pub fn after_answer(self) -> bool {
        matches!(
            self,
            Phase::Writing { .. } | Phase::Rejected { .. } | Phase::MarkingRejected { .. }
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    pub phase: Phase,
    /// Newest generation this replica has seen or written; 0 = nothing (fresh start).
    pub known: u8,
    /// Its lease renewal failed during this attempt.
    pub renewal_failed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    Free,
    Held(u8),
    /// Held by a replica that crashed; it expires after the TTL.
    Orphaned,
}

/// What became of the answer that issued a refresh token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Unissued,
    /// In the memory of a live replica that is writing it.
    Held,
    Durable,
    /// The client timed out after the server acted: nobody learnt the token.
    TimedOut,
    /// Its holder crashed before the durable write.
    HolderCrashed,
    /// A replica let go of it without writing it.
    Dropped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    /// The token endpoint's current refresh token (older ones are spent).
    pub current: u8,
    /// Reuse detection revoked the whole grant.
    pub revoked: bool,
    pub stored_generation: u8,
    /// The stored refresh token, or [`MARKER`].
    pub stored: u8,
    pub lease: Lease,
    pub fates: [Fate; MAX_TOKENS],
    /// Bit t: the answer that issued token t was still unwritten when its holder's
    /// lease expired (renewal failed), so the next holder may load the spent token.
    pub cut_off: u8,
    pub crashes: u8,
    pub renewal_failures: u8,
    pub replicas: [Replica; MAX_REPLICAS],
}

/// A named case in which the protocol cannot keep a token safe; counted, not a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exception {
    /// The answer carrying a new token was lost after the server acted (timeout).
    LostInTransit,
    /// The timed-out request is retried with the spent token.
    RetryAfterTimeout,
    /// A replica crashed between the server's answer and the durable write.
    LostByCrash,
    /// The stored, spent token is presented after a crash lost its successor.
    ReuseAfterCrash,
    /// A holder's renewal failed and its lease expired before its write landed.
    LeaseLostBeforeWrite,
    /// The next lease holder presented the token the cut-off holder had spent.
    ReuseAfterLeaseLoss,
}

impl Exception {
    pub const ALL: [Exception; 6] = [
        Exception::LostInTransit,
        Exception::RetryAfterTimeout,
        Exception::LostByCrash,
        Exception::ReuseAfterCrash,
        Exception::LeaseLostBeforeWrite,
        Exception::ReuseAfterLeaseLoss,
    ];
}

/// What the token endpoint's answer looks like to the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Usable,
    /// 200 with a new refresh token but an unusable access token.
    UnusableAccessToken,
    InvalidGrant,
    /// Timed out after the server acted.
    LostAfterActing,
    /// Timed out before the server acted.
    LostBeforeActing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Adopt(u8),
    TakeLease(u8),
    Load(u8),
    Confirm(u8),
    Send(u8),
    Answer(u8, Outcome),
    Write { replica: u8, ack_lost: bool },
    ReRead(u8),
    WriteMarker { replica: u8, stored: bool },
    RenewalFails(u8),
    Crash { replica: u8, server_acted: bool },
    Restart(u8),
    LeaseExpires,
}

/// What a step revealed besides its successor state.
#[derive(Clone, Copy, Debug)]
pub enum Note {
    Nothing,
    Exception(Exception),
    Violation(&'static str),
}

pub struct Step {
    pub next: State,
    pub event: Event,
    pub note: Note,
}

pub const SPENT_TOKEN_SENT: &str =
    "invariant 1/3: a refresh token is sent again for a rotation the server already made";
pub const SPENT_TOKEN_PRESENTED: &str =
    "invariant 1: the server is presented a refresh token it had already spent";
pub const TWO_IN_FLIGHT: &str = "invariant 3: two refresh requests are in flight at once";
pub const TOKEN_LOST: &str =
    "invariant 2: the server's current refresh token is neither stored nor held by a live writer";

impl State {
    pub fn initial() -> State {
        let idle = Replica {
            phase: Phase::Idle,
            known: 0,
            renewal_failed: false,
        };
        let mut fates = [Fate::Unissued; MAX_TOKENS];
        fates[0] = Fate::Durable;
        State {
            current: 0,
            revoked: false,
            stored_generation: 1,
            stored: 0,
            lease: Lease::Free,
            fates,
            cut_off: 0,
            crashes: 0,
            renewal_failures: 0,
            replicas: [idle; MAX_REPLICAS],
        }
    }

    /// Invariant 2, checked in every state: the server's current token is durable or
    /// held by a live replica that is writing it, unless a named exception lost it.
    pub fn lost_token(&self) -> Option<&'static str> {
        let held = self
            .replicas
            .iter()
            .any(|r| matches!(r.phase, Phase::Writing { token, .. } if token == self.current));
        if self.revoked || self.stored == self.current || held {
            return None;
        }
        match self.fates[usize::from(self.current)] {
            Fate::TimedOut | Fate::HolderCrashed => None,
            _ => Some(TOKEN_LOST),
        }
    }

    /// Why a spent `token` may be presented again, if a named exception explains it:
    /// the answer that spent it never reached the store.
    pub fn excuse_reuse(&self, token: u8) -> Result<Exception, &'static str> {
        let successor = token + 1;
        match self.fates[usize::from(successor)] {
            Fate::TimedOut => Ok(Exception::RetryAfterTimeout),
            Fate::HolderCrashed => Ok(Exception::ReuseAfterCrash),
            _ if self.cut_off & (1 << successor) != 0 => Ok(Exception::ReuseAfterLeaseLoss),
            _ => Err(SPENT_TOKEN_PRESENTED),
        }
    }
}

impl Model {
    pub fn new(protocol: Protocol, bounds: Bounds) -> Model {
        assert!(usize::from(bounds.replicas) <= MAX_REPLICAS);
        assert!(usize::from(bounds.rotations) < MAX_TOKENS);
        assert!(bounds.crashes <= 3 && bounds.renewal_failures <= 3);
        Model { protocol, bounds }
    }

    pub fn replicas(&self) -> usize {
        usize::from(self.bounds.replicas)
    }
}
