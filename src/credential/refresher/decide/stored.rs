//! What a stored state leaves to do here: nothing until it changes again (handed over,
//! issued to another client, waiting for a human), adopt its access token, or redeem its
//! refresh token.

use std::time::{Duration, SystemTime};

use crate::credential::EXPIRY_MARGIN;
use crate::store::{IssuedTo, Moved, StoredState};

/// Why a stored state leaves nothing to do until the store changes again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Written before a reload changed the token endpoint or client, by a version that
    /// did not record whom its refresh token was issued to: taken as the old identity's.
    SetAside,
    /// Its refresh token was issued to another token endpoint or client.
    IssuedToAnother { to: IssuedTo, ours: IssuedTo },
    /// Handed over to another environment (`tokenrelay export`).
    Moved(Moved),
    /// Marked as needing re-authorization, for this reason.
    Reauthorization(String),
}

impl Hold {
    /// Why a human must re-authorize `credential`; `None` for a handover, which waits for
    /// an import instead.
    pub fn reauthorization_reason(&self, credential: &str) -> Option<String> {
        match self {
            Hold::SetAside => Some(format!(
                "token_url or client_id changed by a config reload; the stored refresh token was issued for the previous ones and is not sent to others: run `tokenrelay seed --credential {credential}` or `tokenrelay authorize --credential {credential}`"
            )),
            Hold::IssuedToAnother { to, ours } => Some(format!(
                "the stored refresh token was issued to client_id {:?} at {}, but the config names client_id {:?} at {}; it is not sent to another token endpoint or client: run `tokenrelay seed --credential {credential}` or `tokenrelay authorize --credential {credential}` (or restore the previous token_url and client_id)",
                to.client_id, to.token_url, ours.client_id, ours.token_url
            )),
            Hold::Moved(_) => None,
            Hold::Reauthorization(why) => Some(why.clone()),
        }
    }
}

/// Whether `s` leaves nothing to do. `set_aside_up_to`: after a reload changed the
/// token endpoint identity (to `ours`), the stored generations that belong to the old one.
pub fn hold(s: &StoredState, set_aside_up_to: Option<u64>, ours: &IssuedTo) -> Option<Hold> {
    // A state that records whom its refresh token was issued to is judged by that, so a
    // reload back to that token endpoint and client uses it again; one from an older
    // version, which does not, is set aside after any change.
    if s.issued_to.is_none() && set_aside_up_to.is_some_and(|g| s.generation <= g) {
        return Some(Hold::SetAside);
    }
    if let Some(to) = &s.issued_to {
        if s.refresh_token.is_some() && to != ours {
            return Some(Hold::IssuedToAnother {
                to: to.clone(),
                ours: ours.clone(),
            });
        }
    }
    if let Some(m) = &s.moved {
        return Some(Hold::Moved(m.clone()));
    }
    s.reauthorization_required
        .clone()
        .map(Hold::Reauthorization)
}

/// A stored access token worth publishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredToken {
    /// `None`: a long-lived token stored without an expiry, used until rejected.
    pub expires: Option<SystemTime>,
}

/// Whether the access token of `s` is worth publishing at `now_ms`: only if it outlives
/// the margin the cell applies anyway.
pub fn worth_adopting(s: &StoredState, now_ms: u64) -> Option<StoredToken> {
    s.access_token.as_ref()?;
    match s.access_expires_at_ms {
        Some(exp) => {
            let lifetime = Duration::from_millis(exp.saturating_sub(s.obtained_at_ms));
            let margin = EXPIRY_MARGIN.min(lifetime / 4);
            (exp > now_ms + margin.as_millis() as u64).then(|| StoredToken {
                expires: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(exp)),
            })
        }
        None if s.is_long_lived() => Some(StoredToken { expires: None }),
        None => None,
    }
}

/// What a newer state written elsewhere asks for when its access token was not adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unadopted {
    /// A seeded refresh token without an access token: redeem it now.
    Redeem,
    /// Nothing to redeem: wait for the next change.
    Wait,
}

pub fn unadopted(s: &StoredState) -> Unadopted {
    if s.refresh_token.is_some() {
        Unadopted::Redeem
    } else {
        Unadopted::Wait
    }
}

/// Whether a refresh may be sent while the store is unreachable: only for a credential
/// whose refresh tokens do not rotate (nothing is spent, so nothing can be lost) and
/// that holds no usable token. A rotating credential waits for the store.
pub fn refresh_without_store(rotating: bool, holds_usable_token: bool) -> bool {
    !rotating && !holds_usable_token
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    const NOW: u64 = 1_700_000_000_000;

    fn issued(client_id: &str) -> IssuedTo {
        IssuedTo {
            token_url: "https://idp.example/token".into(),
            client_id: client_id.into(),
        }
    }

    fn moved() -> Moved {
        Moved {
            to: "staging".into(),
            at_ms: NOW,
            handover_id: None,
        }
    }

    fn refresh_only(generation: u64) -> StoredState {
        StoredState {
            generation,
            refresh_token: Some(Secret::new("r")),
            ..Default::default()
        }
    }

    #[test]
    fn which_stored_states_leave_nothing_to_do() {
        let ours = issued("b");
        let with = |f: &dyn Fn(&mut StoredState)| {
            let mut s = refresh_only(5);
            f(&mut s);
            s
        };
        let cases: Vec<(&str, StoredState, Option<u64>, Option<Hold>)> = vec![
            ("plain state, no reload", refresh_only(5), None, None),
            (
                "issued to this client, after a reload",
                with(&|s| s.issued_to = Some(issued("b"))),
                Some(5),
                None,
            ),
            (
                "issuer unrecorded, from before the reload",
                refresh_only(5),
                Some(5),
                Some(Hold::SetAside),
            ),
            (
                "issuer unrecorded, written after the reload",
                refresh_only(6),
                Some(5),
                None,
            ),
            (
                "issued to another client",
                with(&|s| s.issued_to = Some(issued("a"))),
                None,
                Some(Hold::IssuedToAnother {
                    to: issued("a"),
                    ours: issued("b"),
                }),
            ),
            (
                "issued to another client, but no refresh token to send",
                StoredState {
                    issued_to: Some(issued("a")),
                    access_token: Some(Secret::new("a")),
                    ..Default::default()
                },
                None,
                None,
            ),
            (
                "handed over",
                with(&|s| s.moved = Some(moved())),
                None,
                Some(Hold::Moved(moved())),
            ),
            (
                "marked for re-authorization",
                with(&|s| s.reauthorization_required = Some("dead".into())),
                None,
                Some(Hold::Reauthorization("dead".into())),
            ),
            (
                "handed over wins over a re-authorization mark",
                with(&|s| {
                    s.moved = Some(moved());
                    s.reauthorization_required = Some("dead".into());
                }),
                None,
                Some(Hold::Moved(moved())),
            ),
        ];
        for (case, state, set_aside_up_to, expected) in cases {
            assert_eq!(hold(&state, set_aside_up_to, &ours), expected, "{case}");
        }
    }

    #[test]
    fn a_hold_names_the_credential_when_a_human_must_act() {
        let cases = [
            (
                "set aside",
                Hold::SetAside,
                Some("token_url or client_id changed"),
            ),
            (
                "issued to another",
                Hold::IssuedToAnother {
                    to: issued("a"),
                    ours: issued("b"),
                },
                Some("issued to client_id \"a\""),
            ),
            ("handed over", Hold::Moved(moved()), None),
            (
                "marked",
                Hold::Reauthorization("rejected".into()),
                Some("rejected"),
            ),
        ];
        for (case, h, says) in cases {
            let why = h.reauthorization_reason("crm");
            assert_eq!(why.is_some(), says.is_some(), "{case}");
            if let (Some(why), Some(says)) = (why, says) {
                assert!(why.contains(says), "{case}: {why}");
                if !matches!(h, Hold::Reauthorization(_)) {
                    assert!(why.contains("--credential crm"), "{case}: {why}");
                }
            }
        }
    }

    #[test]
    fn which_stored_access_tokens_are_worth_adopting() {
        let at = |ms: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let token = |expires: Option<u64>, refresh: bool| StoredState {
            access_token: Some(Secret::new("a")),
            access_expires_at_ms: expires,
            refresh_token: refresh.then(|| Secret::new("r")),
            obtained_at_ms: NOW - 600_000,
            ..Default::default()
        };
        let cases = [
            ("no access token", refresh_only(3), None),
            (
                "valid for minutes",
                token(Some(NOW + 300_000), true),
                Some(StoredToken {
                    expires: at(NOW + 300_000),
                }),
            ),
            (
                "just past the margin",
                token(Some(NOW + 2_001), true),
                Some(StoredToken {
                    expires: at(NOW + 2_001),
                }),
            ),
            ("within the margin", token(Some(NOW + 2_000), true), None),
            ("expired", token(Some(NOW - 1), true), None),
            (
                "long-lived without expiry",
                token(None, false),
                Some(StoredToken { expires: None }),
            ),
            ("no expiry, with a refresh token", token(None, true), None),
            (
                "no expiry, marked for re-authorization",
                StoredState {
                    reauthorization_required: Some("dead".into()),
                    ..token(None, false)
                },
                None,
            ),
        ];
        for (case, state, expected) in cases {
            assert_eq!(worth_adopting(&state, NOW), expected, "{case}");
        }
    }

    #[test]
    fn an_unadopted_change_is_redeemed_only_with_a_refresh_token() {
        let cases = [
            ("seeded refresh token", refresh_only(2), Unadopted::Redeem),
            (
                "expired long-lived token",
                StoredState {
                    access_token: Some(Secret::new("a")),
                    ..Default::default()
                },
                Unadopted::Wait,
            ),
            ("nothing", StoredState::default(), Unadopted::Wait),
        ];
        for (case, state, expected) in cases {
            assert_eq!(unadopted(&state), expected, "{case}");
        }
    }

    #[test]
    fn only_non_rotating_credentials_without_a_token_refresh_without_the_store() {
        let cases = [
            ("rotating, no token", true, false, false),
            ("rotating, usable token", true, true, false),
            ("non-rotating, usable token", false, true, false),
            ("non-rotating, no token", false, false, true),
        ];
        for (case, rotating, usable, expected) in cases {
            assert_eq!(refresh_without_store(rotating, usable), expected, "{case}");
        }
    }
}
