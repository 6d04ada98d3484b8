//! The refresher's decisions, as pure functions of the facts it gathers: no I/O, no
//! async, no clock reads (the times are arguments). The async code in the parent module
//! gathers the facts, asks here, and performs what the answer says. Each decision is
//! table-tested, one named row per case.
//!
//! - [`stored`]: what a stored state leaves to do here (hold, adopt, redeem);
//! - [`rotation`]: the rotating protocol (lease busy, under the lease, after the answer);
//! - [`pace`]: when the loop wakes, and what the end of an attempt does to the backoff;
//! - [`demand`]: what a request asking for a token sets off.
//!
//! The in-doubt rule is in `super::in_doubt`; the rules shared with waiting requests are
//! in `credential::policy` and `credential::schedule`.

pub mod demand;
pub mod pace;
pub mod rotation;
pub mod stored;

pub use demand::{on_demand, rejected_long_lived, Demand, OnDemand};
pub use pace::{
    after_attempt, proactive_refresh_at, wakeup, Ended, Failed, Pace, Proactive, TokenTimes, Wake,
    Wakeup,
};
pub use rotation::{
    after_answer, after_rejection, lease_busy, lease_ttl, lease_wait_deadline, spend, under_lease,
    AfterAnswer, AfterRejection, LeaseBusy, Loaded, Spend, UnderLease,
};
pub use stored::{hold, refresh_without_store, unadopted, worth_adopting, Hold, Unadopted};
