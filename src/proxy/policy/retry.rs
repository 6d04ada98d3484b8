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

/// Sends with `token`, and once more with a newer token after a 401 (see the module
/// comment). Returns the answer and the token it answered.
pub(crate) async fn send_with_retry<R: Resend>(
    up: &Upstream,
    request: &mut R,
    token: Arc<ActiveToken>,
) -> Result<(R::Answer, Arc<ActiveToken>), ProxyError> {
    let mut answer = request.send(&token).await?;
    let status = R::status(&answer);
    note_acceptance(&token, status);
    if status != 401 || !up.config.retry_on_401 {
        return Ok((answer, token));
    }
    if !request.hold(&mut answer).await {
        pass_401_through(up, token.generation);
        return Ok((answer, token));
    }
    let Some(fresh) = token_after_401(up, &token).await else {
        return Ok((answer, token));
    };
    request.discard(answer);
    let answer = request.send(&fresh).await?;
    let status = R::status(&answer);
    note_acceptance(&fresh, status);
    if status == 401 {
        up.metrics().retry_failure.inc();
    } else {
        up.metrics().retry_success.inc();
    }
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
