//! What is stored per credential, and every way one stored state follows another.
//!
//! Each write of a state is a compare-and-swap from the generation before it, so each
//! successor below is the generation after the state it is built from (`self`), stamped
//! with when and by whom it was written. One function per transition, so that what each
//! kind of write keeps and what it drops is decided here and tested once.

use std::collections::BTreeMap;

use crate::config::IssuedTo;
use crate::secret::Secret;

/// What is stored per credential. Generation 0 means "nothing stored yet".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredState {
    /// +1 per rotation (and per seed/authorize/rejection); the CAS key.
    pub generation: u64,
    pub access_token: Option<Secret>,
    /// Unix time (milliseconds) at which the access token expires.
    pub access_expires_at_ms: Option<u64>,
    pub refresh_token: Option<Secret>,
    /// Unix time (ms) the token pair was obtained from the token endpoint.
    pub obtained_at_ms: u64,
    pub updated_at_ms: u64,
    /// Instance id of the writer (host/pid or the configured id).
    pub updated_by: String,
    /// Set when the refresh token was rejected (`invalid_grant`): why, and that a human
    /// must seed or authorize again. Never cleared except by a new seed/authorize.
    pub reauthorization_required: Option<String>,
    /// When the grant was authorized (`authorize`/`seed`); refresh tokens with an
    /// absolute lifetime die that long after it.
    pub authorized_at_ms: Option<u64>,
    /// When the current refresh token dies unless used again before (idle lifetime), or
    /// at the latest (absolute lifetime, or what the token endpoint said): the earlier.
    pub refresh_expires_at_ms: Option<u64>,
    /// `refresh_expires_at_ms` is an estimate: counted from a time that stands in for an
    /// unknown one (see `issued_at_unknown`), so the token may die earlier.
    pub refresh_expires_estimated: bool,
    /// When the grant was really issued, as `seed --refresh-token-issued-at` said:
    /// absolute lifetimes count from it. `authorized_at_ms` stays the seed time, since it
    /// orders authorizations (rollback detection).
    pub issued_at_ms: Option<u64>,
    /// The grant was seeded without its issue time: the seed time stands in for it.
    pub issued_at_unknown: bool,
    /// Set by `tokenrelay export` (a handover): the tokens went elsewhere, and no process
    /// using this store refreshes the credential until an import brings it back.
    pub moved: Option<Moved>,
    /// Extra fields of the token answers that are not secret but needed later, e.g.
    /// Salesforce's `instance_url` (see `answer_fields`): stored with the token so a
    /// replica adopting it, or a restart, routes the upstream the same way. A refresh
    /// answer that omits a field keeps its previous value.
    pub answer_fields: BTreeMap<String, String>,
    /// Who the refresh token was issued to. A config naming another token endpoint or
    /// client never sends it (after a restart as well as a reload). `None` in states
    /// written before it was recorded; the next write records it.
    pub issued_to: Option<IssuedTo>,
    /// Set when an attempt with the stored refresh token ended in doubt (it may have
    /// reached the token endpoint and no usable answer came back). Stored, so that no
    /// process presents the token more than once again. Cleared by the next write of a
    /// new state.
    pub in_doubt: Option<InDoubt>,
}

/// An attempt whose outcome is unknown, recorded with the refresh token it presented.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InDoubt {
    /// When the attempt ended (Unix ms).
    pub at_ms: u64,
    /// What happened (no token value: the error of the attempt).
    pub cause: String,
    /// The one retry the token is allowed has been made (or was about to be when the
    /// writer stopped): it is not presented again.
    pub retried: bool,
}

/// Where and when a credential was handed over.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Moved {
    /// What the operator named the destination (`export --to`), or the bundle file.
    pub to: String,
    pub at_ms: u64,
    /// The handover's random id, recorded in its bundle too: that bundle brought back
    /// here is refused, since its refresh token belongs to the destination now. `None`
    /// in markers written before it was recorded (older versions ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_id: Option<String>,
}

/// A grant obtained by `seed` or `authorize` (a refresh token, an access token, or both).
#[derive(Clone, Debug, Default)]
pub struct NewGrant {
    pub access_token: Option<Secret>,
    pub access_expires_at_ms: Option<u64>,
    pub refresh_token: Option<Secret>,
    pub refresh_expires_at_ms: Option<u64>,
    pub refresh_expires_estimated: bool,
    /// See [`StoredState::issued_at_ms`] and [`StoredState::issued_at_unknown`].
    pub issued_at_ms: Option<u64>,
    pub issued_at_unknown: bool,
    pub answer_fields: BTreeMap<String, String>,
    pub issued_to: Option<IssuedTo>,
}

/// What a successful refresh answer brought.
#[derive(Clone, Debug)]
pub struct Rotation {
    pub access_token: Secret,
    pub access_expires_at_ms: u64,
    /// `None` when the answer carried none: RFC 6749 §6, the presented one stays valid.
    pub refresh_token: Option<Secret>,
    pub refresh_expires_at_ms: Option<u64>,
    pub refresh_expires_estimated: bool,
    /// The stored fields with the answer's merged in.
    pub answer_fields: BTreeMap<String, String>,
    pub issued_to: IssuedTo,
}

impl StoredState {
    /// A long-lived access token stored without a refresh token (YooMoney; amoCRM's
    /// long-lived tokens): used as it is, never refreshed.
    pub fn is_long_lived(&self) -> bool {
        self.refresh_token.is_none()
            && self.access_token.is_some()
            && self.reauthorization_required.is_none()
            && self.moved.is_none()
    }

    /// The next generation, written at `now_ms` by `by`, otherwise unchanged.
    fn successor(&self, now_ms: u64, by: &str) -> StoredState {
        StoredState {
            generation: self.generation + 1,
            updated_at_ms: now_ms,
            updated_by: by.to_string(),
            ..self.clone()
        }
    }

    /// A fresh grant (`seed`, `authorize`) written over generation `current_generation`
    /// (0: nothing stored). Nothing of the previous state is kept: it starts a new
    /// authorization, obtained and authorized now.
    pub fn new_grant(current_generation: u64, grant: NewGrant, now_ms: u64, by: &str) -> Self {
        StoredState {
            generation: current_generation + 1,
            access_token: grant.access_token,
            access_expires_at_ms: grant.access_expires_at_ms,
            refresh_token: grant.refresh_token,
            obtained_at_ms: now_ms,
            updated_at_ms: now_ms,
            updated_by: by.to_string(),
            reauthorization_required: None,
            authorized_at_ms: Some(now_ms),
            refresh_expires_at_ms: grant.refresh_expires_at_ms,
            refresh_expires_estimated: grant.refresh_expires_estimated,
            issued_at_ms: grant.issued_at_ms,
            issued_at_unknown: grant.issued_at_unknown,
            moved: None,
            answer_fields: grant.answer_fields,
            issued_to: grant.issued_to,
            in_doubt: None,
        }
    }

    /// A refresh answered with a usable access token: the new pair, obtained now. The
    /// authorization it descends from is kept; a handover marker, a re-authorization
    /// reason or an in-doubt mark are over.
    pub fn rotated(&self, r: Rotation, now_ms: u64, by: &str) -> Self {
        StoredState {
            access_token: Some(r.access_token),
            access_expires_at_ms: Some(r.access_expires_at_ms),
            refresh_token: r.refresh_token.or_else(|| self.refresh_token.clone()),
            obtained_at_ms: now_ms,
            reauthorization_required: None,
            refresh_expires_at_ms: r.refresh_expires_at_ms,
            refresh_expires_estimated: r.refresh_expires_estimated,
            moved: None,
            answer_fields: r.answer_fields,
            issued_to: Some(r.issued_to),
            in_doubt: None,
            ..self.successor(now_ms, by)
        }
    }

    /// A refresh answer rotated the refresh token but its access token is unusable: the
    /// new refresh token is kept (the old one is spent), and the stored access token,
    /// still the one in use, with it.
    pub fn rotated_refresh_token_only(
        &self,
        refresh_token: Secret,
        (refresh_expires_at_ms, refresh_expires_estimated): (Option<u64>, bool),
        issued_to: IssuedTo,
        now_ms: u64,
        by: &str,
    ) -> Self {
        StoredState {
            refresh_token: Some(refresh_token),
            refresh_expires_at_ms,
            refresh_expires_estimated,
            reauthorization_required: None,
            issued_to: Some(issued_to),
            in_doubt: None,
            ..self.successor(now_ms, by)
        }
    }

    /// The same tokens, with the in-doubt mark `mark` (an attempt's outcome unknown, its
    /// one retry made or owed).
    pub fn marked_in_doubt(&self, mark: InDoubt, now_ms: u64, by: &str) -> Self {
        StoredState {
            in_doubt: Some(mark),
            ..self.successor(now_ms, by)
        }
    }

    /// The refresh token is dead (or must not be presented again): a marker without
    /// tokens saying why a human must re-authorize. Only when the last pair was obtained
    /// is kept; the rest of the grant's record goes with it.
    pub fn requiring_reauthorization(&self, why: String, now_ms: u64, by: &str) -> Self {
        StoredState {
            generation: self.generation + 1,
            obtained_at_ms: self.obtained_at_ms,
            updated_at_ms: now_ms,
            updated_by: by.to_string(),
            reauthorization_required: Some(why),
            ..Default::default()
        }
    }

    /// A handover (`tokenrelay export`): the tokens leave, the marker says where; the
    /// rest stays for `status` to show.
    pub fn moved_to(&self, moved: Moved, by: &str) -> Self {
        let at_ms = moved.at_ms;
        StoredState {
            access_token: None,
            access_expires_at_ms: None,
            refresh_token: None,
            moved: Some(moved),
            ..self.successor(at_ms, by)
        }
    }

    /// A handed-over state brought in (`tokenrelay import`; `self` is the bundle's), written
    /// over generation `current_generation` and beyond any generation the bundle saw, for
    /// `issued_to`: no longer moved nor awaiting re-authorization.
    pub fn imported(
        &self,
        current_generation: u64,
        issued_to: IssuedTo,
        now_ms: u64,
        by: &str,
    ) -> Self {
        StoredState {
            generation: current_generation.max(self.generation) + 1,
            updated_at_ms: now_ms,
            updated_by: by.to_string(),
            moved: None,
            reauthorization_required: None,
            issued_to: Some(issued_to),
            ..self.clone()
        }
    }

    /// What a load reports instead of `older` (or of nothing) when generation
    /// `generation` was written before: no token, and `why` a human must re-authorize.
    /// Who wrote the refused state and when stay visible; its tokens do not.
    pub fn rollback_refused(generation: u64, older: Option<StoredState>, why: String) -> Self {
        let (obtained_at_ms, updated_at_ms, updated_by) = older
            .map(|s| (s.obtained_at_ms, s.updated_at_ms, s.updated_by))
            .unwrap_or_default();
        StoredState {
            generation,
            reauthorization_required: Some(why),
            obtained_at_ms,
            updated_at_ms,
            updated_by,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const BY: &str = "host-b/2";

    fn issued(client_id: &str) -> IssuedTo {
        IssuedTo {
            token_url: "https://idp.example/token".into(),
            client_id: client_id.into(),
        }
    }

    fn mark(retried: bool) -> InDoubt {
        InDoubt {
            at_ms: NOW - 5_000,
            cause: "token request timed out".into(),
            retried,
        }
    }

    fn moved() -> Moved {
        Moved {
            to: "staging".into(),
            at_ms: NOW - 1_000,
            handover_id: Some("5f0c".into()),
        }
    }

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Generation 7 of a grant authorized a day ago, with every field set.
    fn every_field() -> StoredState {
        StoredState {
            generation: 7,
            access_token: Some(Secret::new("a7")),
            access_expires_at_ms: Some(NOW + 60_000),
            refresh_token: Some(Secret::new("r7")),
            obtained_at_ms: NOW - 540_000,
            updated_at_ms: NOW - 540_000,
            updated_by: "host-a/1".into(),
            reauthorization_required: Some("was rejected".into()),
            authorized_at_ms: Some(NOW - 86_400_000),
            refresh_expires_at_ms: Some(NOW + 86_400_000),
            refresh_expires_estimated: true,
            issued_at_ms: Some(NOW - 2 * 86_400_000),
            issued_at_unknown: false,
            moved: Some(moved()),
            answer_fields: fields(&[("instance_url", "https://na1.example.com")]),
            issued_to: Some(issued("a")),
            in_doubt: Some(mark(false)),
        }
    }

    /// Each transition is written as the next generation by `BY` at `NOW`.
    fn assert_written_next(old: &StoredState, new: &StoredState) {
        assert_eq!(new.generation, old.generation + 1);
        assert_eq!(new.updated_at_ms, NOW);
        assert_eq!(new.updated_by, BY);
    }

    #[test]
    fn a_new_grant_starts_afresh() {
        let grant = NewGrant {
            refresh_token: Some(Secret::new("seeded")),
            refresh_expires_at_ms: Some(NOW + 1_000),
            refresh_expires_estimated: true,
            issued_at_ms: Some(NOW - 86_400_000),
            issued_at_unknown: true,
            answer_fields: fields(&[("instance_url", "https://b")]),
            issued_to: Some(issued("b")),
            ..Default::default()
        };
        let new = StoredState::new_grant(7, grant, NOW, BY);
        assert_eq!(
            new,
            StoredState {
                generation: 8,
                refresh_token: Some(Secret::new("seeded")),
                obtained_at_ms: NOW,
                updated_at_ms: NOW,
                updated_by: BY.into(),
                // Authorized now, whenever the token was issued: the authorization time
                // orders grants (rollback detection), the issue time counts lifetimes.
                authorized_at_ms: Some(NOW),
                refresh_expires_at_ms: Some(NOW + 1_000),
                refresh_expires_estimated: true,
                issued_at_ms: Some(NOW - 86_400_000),
                issued_at_unknown: true,
                answer_fields: fields(&[("instance_url", "https://b")]),
                issued_to: Some(issued("b")),
                ..Default::default()
            }
        );
        assert_eq!(
            StoredState::new_grant(0, NewGrant::default(), NOW, BY).generation,
            1,
            "over nothing stored"
        );
    }

    #[test]
    fn a_rotation_stores_the_new_pair_and_keeps_the_authorization() {
        let old = every_field();
        let rotation = Rotation {
            access_token: Secret::new("a8"),
            access_expires_at_ms: NOW + 600_000,
            refresh_token: Some(Secret::new("r8")),
            refresh_expires_at_ms: Some(NOW + 5_000),
            refresh_expires_estimated: false,
            answer_fields: fields(&[("instance_url", "https://na2.example.com")]),
            issued_to: issued("b"),
        };
        let new = old.rotated(rotation.clone(), NOW, BY);
        assert_written_next(&old, &new);
        assert_eq!(
            new,
            StoredState {
                generation: 8,
                access_token: Some(Secret::new("a8")),
                access_expires_at_ms: Some(NOW + 600_000),
                refresh_token: Some(Secret::new("r8")),
                obtained_at_ms: NOW,
                updated_at_ms: NOW,
                updated_by: BY.into(),
                reauthorization_required: None,
                authorized_at_ms: old.authorized_at_ms,
                refresh_expires_at_ms: Some(NOW + 5_000),
                refresh_expires_estimated: false,
                // The grant's issue time stays: absolute lifetimes count from it.
                issued_at_ms: old.issued_at_ms,
                issued_at_unknown: false,
                moved: None,
                answer_fields: fields(&[("instance_url", "https://na2.example.com")]),
                issued_to: Some(issued("b")),
                in_doubt: None,
            }
        );
        // RFC 6749 §6: an answer without a refresh token keeps the presented one.
        let kept = old.rotated(
            Rotation {
                refresh_token: None,
                ..rotation
            },
            NOW,
            BY,
        );
        assert_eq!(kept.refresh_token, Some(Secret::new("r7")));
    }

    #[test]
    fn a_refresh_token_rotated_alone_keeps_the_access_token_in_use() {
        let old = every_field();
        let new = old.rotated_refresh_token_only(
            Secret::new("r8"),
            (Some(NOW + 5_000), false),
            issued("b"),
            NOW,
            BY,
        );
        assert_written_next(&old, &new);
        assert_eq!(
            new,
            StoredState {
                refresh_token: Some(Secret::new("r8")),
                refresh_expires_at_ms: Some(NOW + 5_000),
                refresh_expires_estimated: false,
                reauthorization_required: None,
                issued_to: Some(issued("b")),
                in_doubt: None,
                // Kept: the access token, its expiry and when it was obtained, the
                // authorization, the handover marker and the answer's fields.
                generation: 8,
                updated_at_ms: NOW,
                updated_by: BY.into(),
                ..old
            }
        );
    }

    #[test]
    fn an_in_doubt_mark_changes_nothing_else() {
        let old = every_field();
        let new = old.marked_in_doubt(mark(true), NOW, BY);
        assert_written_next(&old, &new);
        assert_eq!(
            new,
            StoredState {
                in_doubt: Some(mark(true)),
                generation: 8,
                updated_at_ms: NOW,
                updated_by: BY.into(),
                ..old
            }
        );
    }

    #[test]
    fn a_reauthorization_marker_keeps_no_token() {
        let old = every_field();
        let new = old.requiring_reauthorization("invalid_grant".into(), NOW, BY);
        assert_written_next(&old, &new);
        assert_eq!(
            new,
            StoredState {
                generation: 8,
                obtained_at_ms: old.obtained_at_ms,
                updated_at_ms: NOW,
                updated_by: BY.into(),
                reauthorization_required: Some("invalid_grant".into()),
                ..Default::default()
            }
        );
        assert!(!new.is_long_lived());
    }

    #[test]
    fn a_handover_marker_drops_the_tokens_and_says_where() {
        let old = StoredState {
            moved: None,
            ..every_field()
        };
        let new = old.moved_to(moved(), BY);
        assert_eq!(new.generation, 8);
        assert_eq!(
            new.updated_at_ms,
            moved().at_ms,
            "when the handover was made"
        );
        assert_eq!(
            new,
            StoredState {
                access_token: None,
                access_expires_at_ms: None,
                refresh_token: None,
                moved: Some(moved()),
                generation: 8,
                updated_at_ms: moved().at_ms,
                updated_by: BY.into(),
                ..old
            }
        );
    }

    #[test]
    fn an_import_is_written_past_both_generations_for_this_client() {
        let bundled = every_field();
        let cases = [
            ("store behind the bundle", 3, 8),
            ("store ahead of the bundle", 12, 13),
            ("nothing stored", 0, 8),
        ];
        for (case, current, generation) in cases {
            let new = bundled.imported(current, issued("b"), NOW, BY);
            assert_eq!(
                new,
                StoredState {
                    generation,
                    updated_at_ms: NOW,
                    updated_by: BY.into(),
                    moved: None,
                    reauthorization_required: None,
                    issued_to: Some(issued("b")),
                    ..bundled.clone()
                },
                "{case}"
            );
        }
    }

    #[test]
    fn a_refused_rollback_shows_who_wrote_it_but_no_token() {
        let older = every_field();
        let new = StoredState::rollback_refused(9, Some(older.clone()), "restored?".into());
        assert_eq!(
            new,
            StoredState {
                generation: 9,
                obtained_at_ms: older.obtained_at_ms,
                updated_at_ms: older.updated_at_ms,
                updated_by: older.updated_by,
                reauthorization_required: Some("restored?".into()),
                ..Default::default()
            }
        );
        let missing = StoredState::rollback_refused(9, None, "deleted?".into());
        assert_eq!(
            missing,
            StoredState {
                generation: 9,
                reauthorization_required: Some("deleted?".into()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn which_states_hold_a_long_lived_token() {
        let access_only = StoredState {
            access_token: Some(Secret::new("a")),
            ..Default::default()
        };
        let cases = [
            ("access token only", access_only.clone(), true),
            ("with a refresh token", every_field(), false),
            (
                "marked for re-authorization",
                StoredState {
                    reauthorization_required: Some("x".into()),
                    ..access_only.clone()
                },
                false,
            ),
            (
                "handed over",
                StoredState {
                    moved: Some(moved()),
                    ..access_only
                },
                false,
            ),
            ("nothing", StoredState::default(), false),
        ];
        for (case, state, expected) in cases {
            assert_eq!(state.is_long_lived(), expected, "{case}");
        }
    }
}
