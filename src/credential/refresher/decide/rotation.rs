//! The rotating protocol's decisions (DESIGN.md): while another process holds the lease,
//! what the state loaded under the lease asks for, what to do with the token endpoint's
//! answer, and what a rejection means.

use std::time::Duration;

use super::stored::{hold, Hold};
use crate::clock::Instant;
use crate::credential::refresher::in_doubt;
use crate::credential::{policy, schedule, Trigger};
use crate::oauth::{TokenAnswer, TokenError};
use crate::secret::Secret;
use crate::store::{InDoubt, IssuedTo, StoredState};

/// How often a process waiting for another's refresh looks for its result.
pub const LEASE_POLL: Duration = Duration::from_millis(50);

/// What a process does whose lease request found another holder (after looking for the
/// holder's result to adopt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseBusy {
    /// Look again in [`LEASE_POLL`].
    PollAgain,
    /// The holder's refresh should have ended by now, or this process is stopping:
    /// this attempt fails (and is retried with backoff).
    GiveUp,
}

/// How long a lease is taken for. It is renewed every third of it, so two renewal
/// periods must outlast a token request plus the durable write (each bounded by the
/// token timeout): then a lease cannot expire while its holder waits for the token
/// endpoint, even after one failed renewal.
pub fn lease_ttl(token_timeout: Duration) -> Duration {
    token_timeout * 3 + Duration::from_secs(5)
}

/// Until when a process whose lease request, made at `started`, found another holder
/// waits for that holder's result: the holder may have taken the lease just before, and
/// its refresh lasts at most the lease's TTL, its token request and the durable write.
pub fn lease_wait_deadline(started: Instant, ttl: Duration, token_timeout: Duration) -> Instant {
    started + ttl + token_timeout * 2
}

/// `deadline`: from [`lease_wait_deadline`].
pub fn lease_busy(now: Instant, deadline: Instant, stopping: bool) -> LeaseBusy {
    if now >= deadline || stopping {
        LeaseBusy::GiveUp
    } else {
        LeaseBusy::PollAgain
    }
}

/// The facts a decision under the lease takes.
#[derive(Clone, Copy, Debug)]
pub struct Loaded<'a> {
    /// The state loaded under the lease.
    pub stored: &'a StoredState,
    /// The newest generation this process had seen or written.
    pub known_generation: u64,
    /// When the newest authorization this process saw was made.
    pub newest_authorization_ms: Option<u64>,
    /// Stored generations that belong to a previous token endpoint identity.
    pub set_aside_up_to: Option<u64>,
    /// The token endpoint identity of the config.
    pub ours: &'a IssuedTo,
    pub trigger: Trigger,
    pub now_ms: u64,
    pub refresh_at: f64,
    pub refresh_before: Duration,
}

/// What the state loaded under the lease asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnderLease {
    /// Older than a state this process saw (a restored backup, a store that lost
    /// writes): its refresh token has most likely been spent, so it is not sent; a human
    /// must re-authorize, for this reason.
    RolledBack(String),
    /// Nothing to do until the store changes.
    Hold(Hold),
    /// Rotated by another process since this one looked, and not itself due: adopt its
    /// access token; if that cannot be published, go on as for [`UnderLease::Refresh`].
    Adopt,
    /// Refresh it (see [`spend`]).
    Refresh,
}

pub fn under_lease(f: &Loaded) -> UnderLease {
    let s = f.stored;
    if policy::rolled_back(
        s.generation,
        s.authorized_at_ms,
        f.known_generation,
        f.newest_authorization_ms,
    ) {
        return UnderLease::RolledBack(format!(
            "the stored state (generation {}) is older than the last one this process saw (generation {}): a backup restored, or a store that lost writes? Its refresh token has most likely been spent and is not sent",
            s.generation, f.known_generation
        ));
    }
    if let Some(h) = hold(s, f.set_aside_up_to, f.ours) {
        return UnderLease::Hold(h);
    }
    if s.generation != f.known_generation {
        // A startup has no token of its own to compare with: it adopts any usable one.
        let due = f.trigger != Trigger::Startup
            && schedule::rotated_token_due(
                f.now_ms,
                s.obtained_at_ms,
                s.access_expires_at_ms,
                f.refresh_at,
                f.refresh_before,
            );
        if !due {
            return UnderLease::Adopt;
        }
    }
    UnderLease::Refresh
}

/// What refreshing a stored state comes to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Spend<'a> {
    /// A long-lived access token, never refreshed: used while valid, then a human must
    /// provide a new one ([`LONG_LIVED_EXPIRED`]).
    LongLived,
    /// No refresh token to send: a human must re-authorize ([`NO_REFRESH_TOKEN`]).
    NothingToSend,
    /// Send its refresh token.
    Send(&'a Secret),
}

pub const LONG_LIVED_EXPIRED: &str =
    "the long-lived access token (stored without a refresh token) has expired; obtain a new one";
pub const NO_REFRESH_TOKEN: &str = "no refresh token is stored";

pub fn spend(s: &StoredState) -> Spend<'_> {
    match &s.refresh_token {
        _ if s.is_long_lived() => Spend::LongLived,
        Some(refresh_token) => Spend::Send(refresh_token),
        None => Spend::NothingToSend,
    }
}

/// What to do with the token endpoint's answer to the stored refresh token.
#[derive(Debug)]
pub enum AfterAnswer {
    /// A 2xx: make what it carries durable, then publish it. (An unusable access token
    /// with a new refresh token still stores the refresh token: the old one is spent.)
    Commit(Box<TokenAnswer>),
    /// The refresh token is dead (`invalid_grant`, or the provider's own dead-grant
    /// answer): re-read the store, adopt if another process rotated meanwhile, else
    /// record that a human must re-authorize, for this reason.
    Rejected { error: TokenError, why: String },
    /// The outcome is unknown and the one retry is still owed: store this mark, wait
    /// until the lease's secured time has passed, and present the same token once more.
    RetryOnce { error: TokenError, mark: InDoubt },
    /// The retry's outcome is unknown too: the token may be spent, so it is never sent
    /// again; a human must re-authorize, for this reason.
    GiveUp(String),
    /// A failure that spent nothing (or, for a token that does not rotate, could not
    /// lose anything): back off and try again; a retry the mark claims was made never
    /// left, so it is owed again.
    Transient(TokenError),
}

/// `mark`: the in-doubt mark the presented state carried; `now_ms`: when the answer came.
pub fn after_answer(
    answer: Result<TokenAnswer, TokenError>,
    rotating: bool,
    mark: Option<&InDoubt>,
    now_ms: u64,
) -> AfterAnswer {
    let e = match answer {
        Ok(answer) => return AfterAnswer::Commit(Box::new(answer)),
        Err(e) => e,
    };
    if e.is_invalid_grant() {
        let why = in_doubt::rejection_reason(&e, mark);
        return AfterAnswer::Rejected { error: e, why };
    }
    if e.is_in_doubt() && rotating {
        return match in_doubt::after_unknown(mark, &e, now_ms) {
            Some(mark) => AfterAnswer::RetryOnce { error: e, mark },
            None => AfterAnswer::GiveUp(in_doubt::second_unknown_reason(mark, &e)),
        };
    }
    AfterAnswer::Transient(e)
}

/// After a rejection, what the store holds now says whether it was this process's token
/// that died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterRejection {
    /// Another process rotated meanwhile: the rejection was of a token it had spent;
    /// adopt its state (or retry with it).
    Rotated,
    /// Still the generation presented (or the store cannot tell): record the dead grant.
    DeadGrant,
}

/// `presented`: the generation whose refresh token was rejected; `now_stored`: the
/// stored generation re-read after the rejection (`None` when nothing could be read).
pub fn after_rejection(presented: u64, now_stored: Option<u64>) -> AfterRejection {
    match now_stored {
        Some(g) if g != presented => AfterRejection::Rotated,
        _ => AfterRejection::DeadGrant,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::AccessToken;

    const NOW: u64 = 1_700_000_000_000;
    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_lease_held_elsewhere_is_waited_for_until_its_refresh_must_be_over() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(40);
        let cases = [
            ("before the deadline", t0, false, LeaseBusy::PollAgain),
            ("at the deadline", deadline, false, LeaseBusy::GiveUp),
            (
                "after the deadline",
                deadline + MIN,
                false,
                LeaseBusy::GiveUp,
            ),
            ("stopping", t0, true, LeaseBusy::GiveUp),
        ];
        for (case, now, stopping, expected) in cases {
            assert_eq!(lease_busy(now, deadline, stopping), expected, "{case}");
        }
    }

    #[test]
    fn a_lease_outlasts_its_holders_token_request_and_write() {
        for secs in [1, 2, 10, 30, 120] {
            let timeout = Duration::from_secs(secs);
            let ttl = lease_ttl(timeout);
            // Two renewal periods (a third of the TTL each), one renewal missed, still
            // cover a token request and the write, with seconds to spare.
            assert!(
                ttl * 2 / 3 >= timeout * 2 + Duration::from_secs(3),
                "a {timeout:?} token timeout: a {ttl:?} lease"
            );
            let started = Instant::now();
            let deadline = lease_wait_deadline(started, ttl, timeout);
            // A holder that took the lease just before us is done by the deadline, even
            // when its lease ran out and its request and write took their full time.
            assert!(
                deadline >= started + ttl + timeout * 2,
                "a {timeout:?} token timeout: waiting {:?}",
                deadline - started
            );
        }
    }

    fn state(generation: u64, expires_in_ms: Option<u64>) -> StoredState {
        StoredState {
            generation,
            access_token: Some(Secret::new("a")),
            access_expires_at_ms: expires_in_ms.map(|ms| NOW + ms),
            refresh_token: Some(Secret::new("r")),
            obtained_at_ms: NOW - 300_000,
            authorized_at_ms: Some(NOW - 86_400_000),
            ..Default::default()
        }
    }

    #[test]
    fn what_the_state_under_the_lease_asks_for() {
        let ours = IssuedTo {
            token_url: "https://idp.example/token".into(),
            client_id: "b".into(),
        };
        // A 10-minute token: fresh with 5 minutes left, due with 30 s left.
        let fresh = Some(300_000);
        let due = Some(30_000);
        let marked = StoredState {
            reauthorization_required: Some("dead".into()),
            refresh_token: None,
            access_token: None,
            ..state(7, None)
        };
        let reseeded = StoredState {
            authorized_at_ms: Some(NOW),
            ..state(1, fresh)
        };
        let unrecorded = state(4, fresh);
        #[rustfmt::skip]
        let cases = vec![
            ("the generation this process knows", state(7, due), 7, None, Trigger::Scheduled, "refresh"),
            ("rotated elsewhere, fresh", state(8, fresh), 7, None, Trigger::Scheduled, "adopt"),
            ("rotated elsewhere, itself due", state(8, due), 7, None, Trigger::Scheduled, "refresh"),
            ("rotated elsewhere, no expiry known", state(8, None), 7, None, Trigger::Expired, "refresh"),
            ("rotated elsewhere, due, at startup", state(8, due), 7, None, Trigger::Startup, "adopt"),
            ("older than the one seen", state(5, fresh), 7, None, Trigger::Scheduled, "rolled back"),
            ("older, but a newer authorization", reseeded, 7, None, Trigger::Scheduled, "adopt"),
            ("marked for re-authorization", marked, 7, None, Trigger::Scheduled, "hold"),
            ("issuer unrecorded, set aside by a reload", unrecorded, 4, Some(4), Trigger::Scheduled, "hold"),
        ];
        for (case, stored, known, set_aside_up_to, trigger, expected) in cases {
            let got = under_lease(&Loaded {
                stored: &stored,
                known_generation: known,
                newest_authorization_ms: Some(NOW - 86_400_000),
                set_aside_up_to,
                ours: &ours,
                trigger,
                now_ms: NOW,
                refresh_at: 0.8,
                refresh_before: MIN,
            });
            let got = match got {
                UnderLease::RolledBack(why) => {
                    assert!(why.contains("generation 5) is older"), "{case}: {why}");
                    "rolled back"
                }
                UnderLease::Hold(_) => "hold",
                UnderLease::Adopt => "adopt",
                UnderLease::Refresh => "refresh",
            };
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn what_refreshing_a_stored_state_comes_to() {
        let access_only = StoredState {
            access_token: Some(Secret::new("a")),
            ..Default::default()
        };
        let r = Secret::new("r");
        let cases = [
            ("a refresh token", state(3, None), Spend::Send(&r)),
            (
                "an access token only",
                access_only.clone(),
                Spend::LongLived,
            ),
            (
                "an access token only, marked",
                StoredState {
                    reauthorization_required: Some("dead".into()),
                    ..access_only
                },
                Spend::NothingToSend,
            ),
            ("nothing", StoredState::default(), Spend::NothingToSend),
        ];
        for (case, s, expected) in cases {
            assert_eq!(spend(&s), expected, "{case}");
        }
    }

    fn answer(access_usable: bool, new_refresh_token: bool) -> TokenAnswer {
        TokenAnswer {
            refresh_token: new_refresh_token.then(|| Secret::new("r2")),
            access: if access_usable {
                Ok(AccessToken {
                    token: Secret::new("a2"),
                    expires_in: Duration::from_secs(600),
                    expires_in_stated: true,
                    scope: None,
                })
            } else {
                Err(TokenError::InDoubt("no access_token".into()))
            },
            refresh_expires_in: None,
            refresh_hard_expires_in: None,
            fields: Default::default(),
            refused_fields: Default::default(),
        }
    }

    fn invalid_grant() -> TokenError {
        TokenError::OAuth {
            status: 400,
            error: "invalid_grant".into(),
            description: None,
        }
    }

    fn mark(retried: bool) -> InDoubt {
        InDoubt {
            at_ms: NOW - 10_000,
            cause: "token request timed out".into(),
            retried,
        }
    }

    /// The decision for each outcome of sending the stored refresh token.
    #[test]
    fn what_follows_each_answer() {
        let timeout = || TokenError::InDoubt("token request timed out".into());
        #[rustfmt::skip]
        let cases = vec![
            ("usable answer", Ok(answer(true, true)), true, None, "commit"),
            ("usable answer keeping the refresh token", Ok(answer(true, false)), true, None, "commit"),
            ("unusable access token, new refresh token", Ok(answer(false, true)), true, None, "commit"),
            ("unusable access token, nothing new", Ok(answer(false, false)), true, None, "commit"),
            ("usable answer to the one retry", Ok(answer(true, true)), true, Some(mark(true)), "commit"),
            ("invalid_grant", Err(invalid_grant()), true, None, "rejected"),
            ("invalid_grant to the one retry", Err(invalid_grant()), true, Some(mark(true)), "rejected"),
            ("invalid_grant, token does not rotate", Err(invalid_grant()), false, None, "rejected"),
            ("provider's dead-grant answer", Err(TokenError::DeadGrant { status: 401, detail: None }), true, None, "rejected"),
            ("first unknown outcome", Err(timeout()), true, None, "retry once"),
            ("unknown outcome of the one retry", Err(timeout()), true, Some(mark(true)), "give up"),
            ("unknown outcome, token does not rotate", Err(timeout()), false, None, "transient"),
            ("transient failure", Err(TokenError::Transient("connection refused".into())), true, None, "transient"),
            ("transient failure of the one retry", Err(TokenError::Transient("429".into())), true, Some(mark(true)), "transient"),
            ("other OAuth error", Err(TokenError::OAuth { status: 401, error: "invalid_client".into(), description: None }), true, None, "transient"),
        ];
        for (case, answer, rotating, mark, expected) in cases {
            let got = match after_answer(answer, rotating, mark.as_ref(), NOW) {
                AfterAnswer::Commit(_) => "commit",
                AfterAnswer::Rejected { why, .. } => {
                    assert!(!why.is_empty(), "{case}");
                    "rejected"
                }
                AfterAnswer::RetryOnce { mark, .. } => {
                    assert_eq!(mark.at_ms, NOW, "{case}");
                    assert!(!mark.retried, "{case}");
                    "retry once"
                }
                AfterAnswer::GiveUp(why) => {
                    assert!(why.contains("not presented again"), "{case}: {why}");
                    "give up"
                }
                AfterAnswer::Transient(_) => "transient",
            };
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn a_rejection_is_a_dead_grant_only_if_nobody_rotated_meanwhile() {
        let cases = [
            (
                "still the presented generation",
                Some(7),
                AfterRejection::DeadGrant,
            ),
            ("rotated meanwhile", Some(8), AfterRejection::Rotated),
            (
                "re-seeded from scratch meanwhile",
                Some(1),
                AfterRejection::Rotated,
            ),
            ("store unreadable or empty", None, AfterRejection::DeadGrant),
        ];
        for (case, now_stored, expected) in cases {
            assert_eq!(after_rejection(7, now_stored), expected, "{case}");
        }
    }
}
