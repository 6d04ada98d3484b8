//! The in-doubt rule (DESIGN.md, "Answers that are neither success nor a standard
//! error"): an attempt that may have reached the token endpoint without a usable answer
//! coming back may have spent the refresh token. The same token is presented once more
//! (a provider with a reuse grace window answers it), never a second time, by any
//! process: the mark is stored with the state.

use crate::oauth::TokenError;
use crate::store::InDoubt;

/// What to do with the stored refresh token before sending it.
#[derive(Debug, PartialEq)]
pub enum BeforeSend {
    /// No attempt with it is in doubt.
    Send,
    /// This is the one retry: store this mark first, then send.
    MarkRetry(InDoubt),
    /// Its one retry was made (or about to be when its process stopped): never sent
    /// again; a human must re-authorize, for this reason.
    GiveUp(String),
}

pub fn before_send(mark: Option<&InDoubt>) -> BeforeSend {
    match mark {
        None => BeforeSend::Send,
        Some(m) if !m.retried => BeforeSend::MarkRetry(InDoubt {
            retried: true,
            ..m.clone()
        }),
        Some(m) => BeforeSend::GiveUp(format!(
            "the stored refresh token was presented twice without a usable answer (first {} at {}), so the token endpoint may have spent it; it is not presented a third time. Run `tokenrelay seed` or `tokenrelay authorize`",
            m.cause,
            at(m.at_ms)
        )),
    }
}

/// The mark to store after an attempt whose outcome is unknown (`e`), when the one
/// retry is still to come; `None` when this attempt was that retry.
pub fn after_unknown(mark: Option<&InDoubt>, e: &TokenError, now_ms: u64) -> Option<InDoubt> {
    match mark {
        Some(_) => None,
        None => Some(InDoubt {
            at_ms: now_ms,
            cause: e.to_string(),
            retried: false,
        }),
    }
}

/// The mark to store back when the retry `mark` claims as made never left (the lease was
/// not confirmed, or the request certainly was not sent): owed again, so that nobody
/// gives the token up for a presentation that never happened. `None`: no retry claimed.
pub fn still_owed(mark: Option<&InDoubt>) -> Option<InDoubt> {
    mark.filter(|m| m.retried).map(|m| InDoubt {
        retried: false,
        ..m.clone()
    })
}

/// Why re-authorization is needed when the retry's outcome is unknown too.
pub fn second_unknown_reason(mark: Option<&InDoubt>, e: &TokenError) -> String {
    let first = mark.map_or_else(String::new, |m| {
        format!(" (first {} at {})", m.cause, at(m.at_ms))
    });
    format!(
        "two attempts with the same refresh token got no usable answer{first}, and the retry's outcome is unknown as well ({e}); the token endpoint may have spent it, so it is not presented again. Run `tokenrelay seed` or `tokenrelay authorize`"
    )
}

/// Why re-authorization is needed after `e` rejected the token as dead, naming the
/// in-doubt attempt when the rejected one was its retry.
pub fn rejection_reason(e: &TokenError, mark: Option<&InDoubt>) -> String {
    match mark {
        Some(m) => format!(
            "{e}: the refresh token was presented again after an attempt whose outcome was unknown ({} at {}); that attempt most likely spent it, and the token endpoint has no reuse grace window for it. Run `tokenrelay seed` or `tokenrelay authorize`",
            m.cause,
            at(m.at_ms)
        ),
        None => e.to_string(),
    }
}

/// What `/status` says about an attempt that ended in doubt.
pub fn explanation(e: &TokenError) -> String {
    format!("{e}; the same refresh token is presented once more, and never again if that fails too")
}

fn at(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(retried: bool) -> InDoubt {
        InDoubt {
            at_ms: 1_700_000_000_000,
            cause: "token request timed out".into(),
            retried,
        }
    }

    fn unknown() -> TokenError {
        TokenError::InDoubt("token endpoint answered 502".into())
    }

    #[test]
    fn a_token_is_presented_at_most_once_after_an_unknown_outcome() {
        assert_eq!(before_send(None), BeforeSend::Send);
        assert_eq!(
            before_send(Some(&mark(false))),
            BeforeSend::MarkRetry(mark(true))
        );
        assert!(
            matches!(before_send(Some(&mark(true))), BeforeSend::GiveUp(why) if why.contains("not presented a third time"))
        );
    }

    #[test]
    fn the_first_unknown_outcome_asks_for_one_retry_and_the_second_for_none() {
        let first = after_unknown(None, &unknown(), 5).expect("a retry is owed");
        assert!(!first.retried);
        assert_eq!(first.at_ms, 5);
        assert!(first.cause.contains("502"));
        assert_eq!(after_unknown(Some(&mark(true)), &unknown(), 6), None);
    }

    #[test]
    fn a_retry_that_never_left_is_owed_again() {
        let cases = [
            ("no mark", None, None),
            ("retry owed already", Some(mark(false)), None),
            ("retry claimed", Some(mark(true)), Some(mark(false))),
        ];
        for (case, claimed, owed) in cases {
            assert_eq!(still_owed(claimed.as_ref()), owed, "{case}");
        }
    }

    #[test]
    fn status_explains_what_happens_next() {
        let why = explanation(&unknown());
        assert!(why.starts_with("token endpoint answered 502"), "{why}");
        assert!(
            why.contains("presented once more, and never again"),
            "{why}"
        );
    }

    #[test]
    fn a_rejected_retry_names_the_attempt_in_doubt() {
        let e = TokenError::OAuth {
            status: 400,
            error: "invalid_grant".into(),
            description: None,
        };
        let why = rejection_reason(&e, Some(&mark(true)));
        assert!(
            why.contains("outcome was unknown (token request timed out at 2023-11-14T22:13:20Z)"),
            "{why}"
        );
        assert_eq!(rejection_reason(&e, None), e.to_string());
        assert!(second_unknown_reason(Some(&mark(true)), &unknown())
            .contains("first token request timed out"));
    }
}
