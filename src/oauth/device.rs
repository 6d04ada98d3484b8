//! RFC 8628, the device authorization grant: the device authorization request (§3.1)
//! and its answer (§3.2), and the rules of polling the token endpoint for the outcome
//! (§3.4, §3.5), as pure decisions of time.

use std::time::{Duration, Instant};

use super::client::TokenClient;
use super::response::{TokenAnswer, TokenError, ANSWER_LIMIT};
use crate::secret::Secret;

/// The polling interval when the answer names none (§3.2: "If no value is provided,
/// clients MUST use 5 as the default").
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// How much each `slow_down` adds to the interval (§3.5: "the interval MUST be
/// increased by 5 seconds for this and all subsequent requests").
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// The longest wait after failed polls (connection refused, 5xx): §3.5 asks for
/// exponential backoff on connection timeouts; this bounds it.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The longest device-code lifetime believed: a larger `expires_in` is cut to it, so a
/// careless or hostile answer cannot keep the command polling for days.
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// A device authorization answer (§3.2): what the user is shown, and the device code
/// the client polls with.
#[derive(Debug)]
pub struct DeviceAuthorization {
    /// The code the client polls with; a credential until it expires.
    pub device_code: Secret,
    /// The short code the user types at `verification_uri`.
    pub user_code: String,
    /// Where the user goes (Google names it `verification_url`).
    pub verification_uri: String,
    /// `verification_uri` with the user code in it, when the server gives one.
    pub verification_uri_complete: Option<String>,
    /// How long the codes live (at most [`MAX_LIFETIME`]).
    pub expires_in: Duration,
    /// The least time between polls (at least one second).
    pub interval: Duration,
}

/// Why the device authorization request brought no usable answer. Messages never hold
/// the device code.
#[derive(Debug, thiserror::Error)]
pub enum DeviceAuthorizationError {
    #[error("credential has no device_authorization_url")]
    NoEndpoint,
    /// The server answered an OAuth error (`invalid_client`, `unauthorized_client`, ...).
    #[error("the device authorization endpoint answered {status} {error}{}", description.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    OAuth {
        status: u16,
        error: String,
        description: Option<String>,
    },
    #[error("the device authorization endpoint answered {0} without an OAuth error body")]
    Status(u16),
    /// A `2xx` answer without what §3.2 requires, or with a value unfit to show.
    #[error("the device authorization endpoint's answer is unusable: {0}")]
    Answer(&'static str),
    /// The request failed, or the client could not authenticate (a signing key).
    #[error("the device authorization request failed: {0}")]
    Request(#[source] TokenError),
}

impl TokenClient {
    /// Sends the device authorization request (§3.1: `client_id` and the credential's
    /// client authentication, `scope`) to the credential's `device_authorization_url`.
    pub async fn device_authorization(
        &self,
    ) -> Result<DeviceAuthorization, DeviceAuthorizationError> {
        let c = self.config();
        let url = c
            .device_authorization_url
            .clone()
            .ok_or(DeviceAuthorizationError::NoEndpoint)?;
        let mut params = Vec::new();
        if !c.scopes.is_empty() {
            params.push(("scope", c.scopes.join(" ")));
        }
        let raw = self
            .post_form(url, params)
            .await
            .map_err(DeviceAuthorizationError::Request)?;
        parse_authorization(raw.status, &raw.body)
    }
}

/// Judges a device authorization answer (§3.2; §3.1 errors are RFC 6749 §5.2's).
pub fn parse_authorization(
    status: u16,
    body: &[u8],
) -> Result<DeviceAuthorization, DeviceAuthorizationError> {
    use serde_json::Value;
    let doc = (body.len() <= ANSWER_LIMIT)
        .then(|| serde_json::from_slice::<serde_json::Map<String, Value>>(body).ok())
        .flatten();
    let text = |name: &str| match doc.as_ref().and_then(|d| d.get(name)) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    if let Some(error) = text("error") {
        return Err(DeviceAuthorizationError::OAuth {
            status,
            error: printable(&error),
            description: text("error_description").map(|d| printable(&d)),
        });
    }
    if !(200..300).contains(&status) {
        return Err(DeviceAuthorizationError::Status(status));
    }
    let Some(doc) = &doc else {
        return Err(DeviceAuthorizationError::Answer("not a JSON object"));
    };
    let seconds = |name: &str| match doc.get(name) {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    let device_code = text("device_code")
        .filter(|c| Secret::new(c.as_str()).check_token().is_ok())
        .ok_or(DeviceAuthorizationError::Answer(
            "no usable device_code string",
        ))?;
    let user_code =
        text("user_code")
            .filter(|c| shown_safely(c))
            .ok_or(DeviceAuthorizationError::Answer(
                "no printable user_code string",
            ))?;
    let verification_uri = text("verification_uri")
        .or_else(|| text("verification_url"))
        .filter(|u| shown_safely(u) && is_web_address(u))
        .ok_or(DeviceAuthorizationError::Answer(
            "no http(s) verification_uri",
        ))?;
    let verification_uri_complete = text("verification_uri_complete")
        .or_else(|| text("verification_url_complete"))
        .filter(|u| shown_safely(u) && is_web_address(u));
    let expires_in = seconds("expires_in")
        .filter(|s| *s > 0)
        .ok_or(DeviceAuthorizationError::Answer("no positive expires_in"))?;
    let interval = seconds("interval")
        .map(|s| Duration::from_secs(s.max(1)))
        .unwrap_or(DEFAULT_INTERVAL);
    Ok(DeviceAuthorization {
        device_code: Secret::new(device_code),
        user_code,
        verification_uri,
        verification_uri_complete,
        expires_in: Duration::from_secs(expires_in).min(MAX_LIFETIME),
        interval,
    })
}

/// A value printed to the user's terminal: short, with no control characters (no
/// escape sequences from a server reach the terminal).
fn shown_safely(s: &str) -> bool {
    !s.trim().is_empty() && s.len() <= 2048 && !s.chars().any(char::is_control)
}

fn is_web_address(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "https" | "http"))
}

/// A server-provided text kept printable and short.
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// What one poll of the token endpoint said, when it brought no token (§3.5).
#[derive(Debug)]
pub enum Poll {
    /// `authorization_pending`: the user has not finished yet.
    Pending,
    /// `slow_down`: still pending, and the client polls too often.
    SlowDown,
    /// `access_denied` (Microsoft: `authorization_declined`): the user refused.
    Denied(Option<String>),
    /// `expired_token`: the device code expired before the user approved.
    Expired,
    /// No answer, or one that says nothing (connection refused, timeout, 5xx, 429):
    /// polled again after a backoff.
    Unanswered(TokenError),
    /// Any other refusal (`invalid_grant`, `invalid_client`, ...): the flow ends.
    Refused(TokenError),
}

/// Sorts a poll's outcome: the answer, or what it says instead.
pub fn classify(result: Result<TokenAnswer, TokenError>) -> Result<TokenAnswer, Poll> {
    let e = match result {
        Ok(answer) => return Ok(answer),
        Err(e) => e,
    };
    Err(match &e {
        TokenError::OAuth {
            error, description, ..
        } => match error.as_str() {
            "authorization_pending" => Poll::Pending,
            "slow_down" => Poll::SlowDown,
            "access_denied" | "authorization_declined" => Poll::Denied(description.clone()),
            "expired_token" => Poll::Expired,
            _ => Poll::Refused(e),
        },
        TokenError::Transient(_) | TokenError::InDoubt(_) => Poll::Unanswered(e),
        TokenError::DeadGrant { .. } => Poll::Refused(e),
    })
}

/// What to do after a poll (or before the first one).
#[derive(Debug)]
pub enum Next {
    /// Wait this long, then poll.
    Poll(Duration),
    /// The user refused, with the server's description when it gave one.
    Denied(Option<String>),
    /// The device code expired (the server said so, or its lifetime ran out here).
    Expired,
    /// The token endpoint refused the device code for another reason.
    Refused(TokenError),
}

/// The polling schedule of one device authorization: the interval, grown by each
/// `slow_down`; a backoff after polls that brought no answer; and the end of the device
/// code's life, after which polling stops.
#[derive(Debug)]
pub struct Polling {
    interval: Duration,
    deadline: Instant,
    /// Polls in a row that brought no answer.
    unanswered: u32,
}

impl Polling {
    /// The schedule of `auth`, received at `now`.
    pub fn new(auth: &DeviceAuthorization, now: Instant) -> Polling {
        Polling {
            interval: auth.interval,
            deadline: now + auth.expires_in,
            unanswered: 0,
        }
    }

    /// The interval between polls now.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// When the device code expires.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Before the first poll: one interval's wait (§3.4 polls "at the interval").
    pub fn first(&self, now: Instant) -> Next {
        self.wait(self.interval, now)
    }

    /// After a poll that brought no token, at `now`.
    pub fn after(&mut self, poll: Poll, now: Instant) -> Next {
        if !matches!(poll, Poll::Unanswered(_)) {
            self.unanswered = 0;
        }
        match poll {
            Poll::Pending => self.wait(self.interval, now),
            Poll::SlowDown => {
                self.interval += SLOW_DOWN_STEP;
                self.wait(self.interval, now)
            }
            Poll::Unanswered(_) => {
                self.unanswered = self.unanswered.saturating_add(1);
                let factor = 1u32 << self.unanswered.min(6);
                let backoff = self.interval.saturating_mul(factor).min(MAX_BACKOFF);
                self.wait(backoff.max(self.interval), now)
            }
            Poll::Denied(why) => Next::Denied(why),
            Poll::Expired => Next::Expired,
            Poll::Refused(e) => Next::Refused(e),
        }
    }

    /// Poll after `wait`, unless the device code is dead by then.
    fn wait(&self, wait: Duration, now: Instant) -> Next {
        if now + wait >= self.deadline {
            Next::Expired
        } else {
            Next::Poll(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(expires_in: u64, interval: u64) -> DeviceAuthorization {
        DeviceAuthorization {
            device_code: Secret::new("dc"),
            user_code: "ABCD-EFGH".into(),
            verification_uri: "https://idp.example.com/device".into(),
            verification_uri_complete: None,
            expires_in: Duration::from_secs(expires_in),
            interval: Duration::from_secs(interval),
        }
    }

    fn oauth(error: &str) -> TokenError {
        TokenError::OAuth {
            status: 400,
            error: error.into(),
            description: None,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn waits(next: &Next) -> Option<Duration> {
        match next {
            Next::Poll(d) => Some(*d),
            _ => None,
        }
    }

    /// §3.5: pending keeps the interval; each slow_down adds 5 s for good.
    #[test]
    fn slow_down_grows_the_interval_for_all_later_polls() {
        let t0 = Instant::now();
        let mut p = Polling::new(&auth(600, 5), t0);
        assert_eq!(waits(&p.first(t0)), Some(secs(5)));
        assert_eq!(waits(&p.after(Poll::Pending, t0)), Some(secs(5)));
        assert_eq!(waits(&p.after(Poll::SlowDown, t0)), Some(secs(10)));
        assert_eq!(waits(&p.after(Poll::Pending, t0)), Some(secs(10)));
        assert_eq!(waits(&p.after(Poll::SlowDown, t0)), Some(secs(15)));
        assert_eq!(p.interval(), secs(15));
    }

    /// Polls that bring no answer back off exponentially, up to a minute, and the
    /// interval returns after the next answer.
    #[test]
    fn unanswered_polls_back_off() {
        let t0 = Instant::now();
        let mut p = Polling::new(&auth(3600, 5), t0);
        let down = || Poll::Unanswered(TokenError::Transient("connection failed".into()));
        assert_eq!(waits(&p.after(down(), t0)), Some(secs(10)));
        assert_eq!(waits(&p.after(down(), t0)), Some(secs(20)));
        assert_eq!(waits(&p.after(down(), t0)), Some(secs(40)));
        assert_eq!(waits(&p.after(down(), t0)), Some(secs(60)));
        assert_eq!(waits(&p.after(down(), t0)), Some(secs(60)));
        assert_eq!(waits(&p.after(Poll::Pending, t0)), Some(secs(5)));
    }

    /// Polling stops at expires_in: no poll is scheduled past it.
    #[test]
    fn polling_stops_when_the_device_code_expires() {
        let t0 = Instant::now();
        let mut p = Polling::new(&auth(12, 5), t0);
        assert_eq!(waits(&p.first(t0)), Some(secs(5)));
        assert_eq!(waits(&p.after(Poll::Pending, t0 + secs(5))), Some(secs(5)));
        assert!(matches!(
            p.after(Poll::Pending, t0 + secs(10)),
            Next::Expired
        ));
        // A slow_down that pushes the next poll past the end stops it too.
        let mut p = Polling::new(&auth(12, 5), t0);
        assert!(matches!(
            p.after(Poll::SlowDown, t0 + secs(2)),
            Next::Expired
        ));
    }

    /// Denial, expiry and other refusals end the flow, each as itself.
    #[test]
    fn final_answers_end_polling() {
        let t0 = Instant::now();
        let mut p = Polling::new(&auth(600, 5), t0);
        let next = |p: &mut Polling, e: &str| p.after(classify(Err(oauth(e))).unwrap_err(), t0);
        assert!(matches!(next(&mut p, "access_denied"), Next::Denied(None)));
        assert!(matches!(
            next(&mut p, "authorization_declined"),
            Next::Denied(None)
        ));
        assert!(matches!(next(&mut p, "expired_token"), Next::Expired));
        assert!(
            matches!(next(&mut p, "invalid_grant"), Next::Refused(TokenError::OAuth { ref error, .. }) if error == "invalid_grant")
        );
        assert!(matches!(
            classify(Err(TokenError::InDoubt("503".into()))),
            Err(Poll::Unanswered(_))
        ));
    }

    /// §3.2's answer, with Google's `verification_url` spelling and the defaults.
    #[test]
    fn authorization_answers_are_judged() {
        let ok = parse_authorization(
            200,
            br#"{"device_code":"GmRh","user_code":"WDJB-MJHT","verification_uri":"https://idp.example.com/device","verification_uri_complete":"https://idp.example.com/device?user_code=WDJB-MJHT","expires_in":1800,"interval":7}"#,
        )
        .unwrap();
        assert_eq!(ok.device_code.expose(), "GmRh");
        assert_eq!(ok.user_code, "WDJB-MJHT");
        assert_eq!(ok.interval, secs(7));
        assert_eq!(ok.expires_in, secs(1800));
        assert!(ok.verification_uri_complete.is_some());
        assert!(
            !format!("{ok:?}").contains("GmRh"),
            "Debug hides the device code"
        );

        let google = parse_authorization(
            200,
            br#"{"device_code":"d","user_code":"GQVQ-JKEC","verification_url":"https://www.google.com/device","expires_in":"1800"}"#,
        )
        .unwrap();
        assert_eq!(google.verification_uri, "https://www.google.com/device");
        assert_eq!(google.interval, DEFAULT_INTERVAL);
        assert_eq!(google.expires_in, secs(1800));

        for (status, body, why) in [
            (200, &br#"{"user_code":"A","verification_uri":"https://x","expires_in":5}"#[..], "device_code"),
            (200, br#"{"device_code":"d","user_code":"A\u001b[2J","verification_uri":"https://x","expires_in":5}"#, "user_code"),
            (200, br#"{"device_code":"d","user_code":"A","verification_uri":"javascript:alert(1)","expires_in":5}"#, "verification_uri"),
            (200, br#"{"device_code":"d","user_code":"A","verification_uri":"https://x","expires_in":0}"#, "expires_in"),
            (200, b"<html>", "JSON"),
            (400, br#"{"error":"invalid_client","error_description":"unknown client"}"#, "400 invalid_client: unknown client"),
            (502, b"bad gateway", "502 without an OAuth error body"),
        ] {
            let e = parse_authorization(status, body).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }
}
