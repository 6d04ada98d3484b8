//! The 401 sequence, once for both engines (and for WebSocket handshakes). Any answer
//! but a 401 proves the token works. After a 401, where the upstream retries
//! (`retry_on_401`) and the request and the 401 can both be held, the request goes once
//! more with a newer token; otherwise the 401 goes to the app as it is, and a refresh
//! starts in the background so the next request finds a fresh token.

use std::sync::Arc;

use tracing::warn;

use crate::credential::ActiveToken;
use crate::proxy::outcome::ProxyError;
use crate::proxy::Upstream;

/// How an engine sends one request again with another token.
pub(crate) trait Resend {
    /// What came back (a response, or its head).
    type Answer;

    fn status(answer: &Self::Answer) -> u16;

    /// Sends the request with `token`.
    async fn send(&mut self, token: &ActiveToken) -> Result<Self::Answer, ProxyError>;

    /// Readies a retry after the 401 `answer`: whether the request can be sent again
    /// while the 401 is kept, to be passed on if no newer token comes.
    async fn hold(&mut self, answer: &mut Self::Answer) -> bool;

    /// Lets go of the held 401 once the retry goes out.
    fn discard(&mut self, answer: Self::Answer);
}

/// The upstream's side of the sequence: whether it retries, where a newer token comes
/// from, and what is counted.
pub(crate) trait RetryPolicy {
    fn retries_on_401(&self) -> bool;

    /// After a 401 to `token`, a newer token to retry with, or `None` (the 401 goes to
    /// the app as it is).
    async fn newer_token(&self, token: &ActiveToken) -> Option<Arc<ActiveToken>>;

    /// A 401 that cannot be retried goes to the app; a refresh still starts.
    fn pass_through(&self, generation: u64);

    /// The retry's answer was `status`.
    fn retried(&self, status: u16);
}

impl RetryPolicy for Upstream {
    fn retries_on_401(&self) -> bool {
        self.config.retry_on_401
    }

    async fn newer_token(&self, token: &ActiveToken) -> Option<Arc<ActiveToken>> {
        token_after_401(self, token).await
    }

    fn pass_through(&self, generation: u64) {
        pass_401_through(self, generation)
    }

    fn retried(&self, status: u16) {
        self.credential.note_401_replay(status);
        if status == 401 {
            self.metrics().retry_failure.inc();
        } else {
            self.metrics().retry_success.inc();
        }
    }
}

/// Sends with `token`, and once more with a newer token after a 401 (see the module
/// comment). Returns the answer and the token it answered.
pub(crate) async fn send_with_retry<R: Resend>(
    up: &impl RetryPolicy,
    request: &mut R,
    token: Arc<ActiveToken>,
) -> Result<(R::Answer, Arc<ActiveToken>), ProxyError> {
    let mut answer = request.send(&token).await?;
    let status = R::status(&answer);
    note_acceptance(&token, status);
    if status != 401 || !up.retries_on_401() {
        return Ok((answer, token));
    }
    if !request.hold(&mut answer).await {
        up.pass_through(token.generation);
        return Ok((answer, token));
    }
    let Some(fresh) = up.newer_token(&token).await else {
        return Ok((answer, token));
    };
    request.discard(answer);
    let answer = request.send(&fresh).await?;
    let status = R::status(&answer);
    note_acceptance(&fresh, status);
    up.retried(status);
    Ok((answer, fresh))
}

/// After a 401 to `token`, a newer token to retry with, or `None` (the 401 goes to the
/// app as it is).
async fn token_after_401(up: &Upstream, token: &ActiveToken) -> Option<Arc<ActiveToken>> {
    match up.credential.after_401(token.generation).await {
        Ok(t) => Some(t),
        Err(e) => {
            up.metrics().retry_failure.inc();
            warn!(upstream = %up.config.name, error = %e, "upstream answered 401 and no newer token is available; passing it through");
            None
        }
    }
}

/// A 401 that cannot be retried goes to the app as it is; a refresh still starts in the
/// background, so the next request finds a fresh token.
fn pass_401_through(up: &Upstream, generation: u64) {
    up.metrics().retry_skipped.inc();
    let cred = up.credential.clone();
    tokio::spawn(async move {
        let _ = cred.after_401(generation).await;
    });
}

/// Both engines report each upstream answer here: any status but 401 proves the token
/// worked, so a later 401 to it means revocation (refreshed at once), not a permission
/// problem (spaced out).
fn note_acceptance(token: &ActiveToken, status: u16) {
    if status != 401 {
        token.mark_accepted();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::secret::Secret;

    fn token(generation: u64) -> Arc<ActiveToken> {
        let formats = ["Bearer {token}".to_string()];
        Arc::new(ActiveToken::new(&Secret::new("t0k"), &formats, generation, None).unwrap())
    }

    /// An upstream that retries or not, and has a newer token (generation 2) or not.
    struct Policy {
        retries: bool,
        newer: bool,
        seen: Mutex<Vec<String>>,
    }

    impl RetryPolicy for Policy {
        fn retries_on_401(&self) -> bool {
            self.retries
        }
        async fn newer_token(&self, _: &ActiveToken) -> Option<Arc<ActiveToken>> {
            self.seen.lock().unwrap().push("asked".into());
            self.newer.then(|| token(2))
        }
        fn pass_through(&self, generation: u64) {
            self.seen
                .lock()
                .unwrap()
                .push(format!("passed {generation}"));
        }
        fn retried(&self, status: u16) {
            self.seen.lock().unwrap().push(format!("retried {status}"));
        }
    }

    /// Answers `statuses` in turn; `holds` says whether a 401 can be held.
    struct Script {
        statuses: Vec<u16>,
        holds: bool,
        sent_with: Vec<u64>,
        discarded: usize,
    }

    impl Resend for Script {
        type Answer = u16;
        fn status(answer: &u16) -> u16 {
            *answer
        }
        async fn send(&mut self, token: &ActiveToken) -> Result<u16, ProxyError> {
            self.sent_with.push(token.generation);
            Ok(self.statuses.remove(0))
        }
        async fn hold(&mut self, _: &mut u16) -> bool {
            self.holds
        }
        fn discard(&mut self, _: u16) {
            self.discarded += 1;
        }
    }

    /// Each case of the sequence: what was sent with which token, what the app gets, and
    /// what the upstream was asked and counted.
    #[tokio::test]
    async fn the_401_sequence() {
        for (name, retries, holds, newer, statuses, sent, answer, seen) in [
            (
                "a 200 is the answer",
                true,
                true,
                true,
                vec![200],
                vec![1],
                (200, 1),
                vec![],
            ),
            (
                "a 401 without retry_on_401 goes through untouched",
                false,
                true,
                true,
                vec![401],
                vec![1],
                (401, 1),
                vec![],
            ),
            (
                "a 401 that cannot be held goes through, and a refresh starts",
                true,
                false,
                true,
                vec![401],
                vec![1],
                (401, 1),
                vec!["passed 1"],
            ),
            (
                "no newer token: the 401 goes through",
                true,
                true,
                false,
                vec![401],
                vec![1],
                (401, 1),
                vec!["asked"],
            ),
            (
                "a newer token: sent again, once",
                true,
                true,
                true,
                vec![401, 200],
                vec![1, 2],
                (200, 2),
                vec!["asked", "retried 200"],
            ),
            (
                "the retry's 401 is the answer: no third try",
                true,
                true,
                true,
                vec![401, 401],
                vec![1, 2],
                (401, 2),
                vec!["asked", "retried 401"],
            ),
        ] {
            let policy = Policy {
                retries,
                newer,
                seen: Mutex::default(),
            };
            let mut script = Script {
                statuses,
                holds,
                sent_with: vec![],
                discarded: 0,
            };
            let (status, by) = send_with_retry(&policy, &mut script, token(1))
                .await
                .unwrap();
            assert_eq!(script.sent_with, sent, "{name}: sent with");
            assert_eq!((status, by.generation), answer, "{name}: answer");
            assert_eq!(*policy.seen.lock().unwrap(), seen, "{name}: upstream");
            assert_eq!(script.discarded, sent.len() - 1, "{name}: held 401 let go");
        }
    }
}
