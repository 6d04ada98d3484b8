//! RFC 8628, the device authorization grant, for the demo authorization server: the
//! device authorization endpoint (`POST /oauth2/device_authorization`, §3.1–3.2), a
//! verification page where a person approves or denies a user code (`GET
//! /oauth2/device`, §3.3), the `device_code` grant at the token endpoint with its
//! errors (§3.4–3.5: `authorization_pending`, `slow_down` for polls that come sooner
//! than the interval, `access_denied`, `expired_token`), and controls for tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rand::Rng;
use serde_json::{json, Value};

use super::{
    authenticate_client, esc, html, no_store, param, random_token, AuthServer, AuthServerOptions,
    OAuthError, Shared, State, TokenRequest, MAX_TOKEN_REQUEST_BODY,
};
use crate::{json_response, Body};

/// Path of the device authorization endpoint.
pub(super) const DEVICE_AUTHORIZATION_PATH: &str = "/oauth2/device_authorization";
/// Path of the verification page (the `verification_uri`).
pub(super) const VERIFICATION_PATH: &str = "/oauth2/device";
/// RFC 8628 §3.4's `grant_type`.
pub(super) const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// How much sooner than the interval a poll may come and still be on time (timers
/// and scheduling jitter); anything sooner is answered `slow_down`.
const POLL_LEEWAY: Duration = Duration::from_millis(250);
/// What §3.5 says a `slow_down` adds to the interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// User-code characters: §6.1's base-20 set, no vowels (no words) and no look-alikes.
const USER_CODE_CHARS: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// One device authorization and what became of it.
pub(super) struct DeviceEntry {
    user_code: String,
    scope: Option<String>,
    expires_at: Instant,
    /// The least time between polls; each `slow_down` adds five seconds.
    interval: Duration,
    last_poll: Option<Instant>,
    decision: Decision,
    /// Polls still to answer `slow_down` whatever their timing, see
    /// [`AuthServer::demand_slow_down`].
    slow_downs_demanded: u32,
}

impl DeviceEntry {
    /// Whether a sweep keeps it: until well after it expired, so that a late poll still
    /// hears `expired_token` rather than "unknown".
    pub(super) fn kept_at(&self, now: Instant) -> bool {
        self.expires_at + super::CODE_TTL > now
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    Pending,
    Approved,
    Denied,
    /// Tokens were issued for it; the device code is spent.
    Redeemed,
}

/// `XXXX-XXXX` from [`USER_CODE_CHARS`] (§6.1: 8 characters, about 34 bits).
fn user_code() -> String {
    let mut rng = rand::thread_rng();
    let mut code: String = (0..8)
        .map(|_| USER_CODE_CHARS[rng.gen_range(0..USER_CODE_CHARS.len())] as char)
        .collect();
    code.insert(4, '-');
    code
}

/// A user code as typed: case and dashes or spaces do not matter (§6.1).
fn normalize(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

impl State {
    fn device_by_user_code(&mut self, code: &str) -> Option<&mut DeviceEntry> {
        let wanted = normalize(code);
        self.devices
            .values_mut()
            .find(|d| normalize(&d.user_code) == wanted)
    }
}

// === impl AuthServer ===

impl AuthServer {
    /// `http://ADDR/oauth2/device_authorization`, the device authorization endpoint.
    pub fn device_authorization_url(&self) -> String {
        format!("{}{DEVICE_AUTHORIZATION_PATH}", self.url())
    }

    /// `http://ADDR/oauth2/device`, the verification page users are sent to.
    pub fn verification_url(&self) -> String {
        format!("{}{VERIFICATION_PATH}", self.url())
    }

    /// Approves the device authorization with `user_code`, as its user would on the
    /// verification page; `false` when there is none (unknown or already decided).
    pub fn approve_device(&self, user_code: &str) -> bool {
        self.decide(user_code, Decision::Approved)
    }

    /// Denies the device authorization with `user_code`; the next poll gets
    /// `access_denied`.
    pub fn deny_device(&self, user_code: &str) -> bool {
        self.decide(user_code, Decision::Denied)
    }

    /// Makes the device code of `user_code` expired: the next poll gets `expired_token`.
    pub fn expire_device_code(&self, user_code: &str) -> bool {
        let mut state = self.shared.lock();
        match state.device_by_user_code(user_code) {
            Some(d) => {
                d.expires_at = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Answers the next poll for `user_code` `slow_down` whatever its timing (and adds
    /// five seconds to that device code's interval, as every `slow_down` does).
    pub fn demand_slow_down(&self, user_code: &str) -> bool {
        let mut state = self.shared.lock();
        match state.device_by_user_code(user_code) {
            Some(d) => {
                d.slow_downs_demanded += 1;
                true
            }
            None => false,
        }
    }

    fn decide(&self, user_code: &str, decision: Decision) -> bool {
        let mut state = self.shared.lock();
        match state.device_by_user_code(user_code) {
            Some(d) if d.decision == Decision::Pending && d.expires_at > Instant::now() => {
                d.decision = decision;
                tracing::info!(?decision, "demo auth server: device authorization decided");
                true
            }
            _ => false,
        }
    }
}

/// `POST /oauth2/device_authorization`: a client (authenticated as at the token
/// endpoint) asks for a device code and a user code.
pub(super) async fn device_authorization_endpoint(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_TOKEN_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return OAuthError::invalid_request("request body too large or unreadable")
                .into_response()
        }
    };
    let request = TokenRequest::parse(&parts.headers, &body);
    let params = match request.params {
        Ok(p) => p,
        Err(e) => return OAuthError::invalid_request(e).into_response(),
    };
    let opts = &shared.opts;
    let mut state = shared.lock();
    state.stats.device_authorizations += 1;
    if let Err(e) = authenticate_client(&shared, &mut state, &parts, &params) {
        return e.into_response();
    }
    let device_code = random_token();
    let user_code = user_code();
    state.devices.insert(
        device_code.clone(),
        DeviceEntry {
            user_code: user_code.clone(),
            scope: param(&params, "scope").map(str::to_owned),
            expires_at: Instant::now() + opts.device_code_ttl,
            interval: opts.device_interval,
            last_poll: None,
            decision: Decision::Pending,
            slow_downs_demanded: 0,
        },
    );
    drop(state);
    let verification_uri = format!("{}{VERIFICATION_PATH}", shared.origin);
    let complete = format!("{verification_uri}?user_code={user_code}");
    let mut resp = json_response(
        StatusCode::OK,
        &json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verification_uri,
            "verification_uri_complete": complete,
            "expires_in": opts.device_code_ttl.as_secs(),
            "interval": opts.device_interval.as_secs(),
        }),
    );
    no_store(resp.headers_mut());
    resp
}

/// The `device_code` grant (§3.4–3.5), once the client is authenticated.
pub(super) fn device_code_grant(
    opts: &AuthServerOptions,
    state: &mut State,
    params: &[(String, String)],
) -> Result<Value, OAuthError> {
    state.stats.device_polls += 1;
    let code = param(params, "device_code")
        .ok_or_else(|| OAuthError::invalid_request("missing device_code"))?;
    let now = Instant::now();
    let Some(entry) = state.devices.get_mut(code) else {
        return Err(OAuthError::invalid_grant("unknown device code"));
    };
    if entry.decision == Decision::Redeemed {
        return Err(OAuthError::invalid_grant("device code already used"));
    }
    if entry.expires_at <= now {
        return Err(error("expired_token", "the device code has expired"));
    }
    let too_soon = entry
        .last_poll
        .is_some_and(|last| now.duration_since(last) + POLL_LEEWAY < entry.interval);
    entry.last_poll = Some(now);
    if too_soon || entry.slow_downs_demanded > 0 {
        entry.slow_downs_demanded = entry.slow_downs_demanded.saturating_sub(1);
        entry.interval += SLOW_DOWN_STEP;
        return Err(error("slow_down", "polling too often"));
    }
    match entry.decision {
        Decision::Pending => Err(error(
            "authorization_pending",
            "the user has not approved the request yet",
        )),
        Decision::Denied => Err(error("access_denied", "the user denied the request")),
        Decision::Redeemed => Err(OAuthError::invalid_grant("device code already used")),
        Decision::Approved => {
            entry.decision = Decision::Redeemed;
            let scope = entry.scope.clone();
            let id = state.new_grant(scope.clone());
            let refresh = state.new_refresh_token(id);
            tracing::info!(
                grant = id,
                "demo auth server: device code exchanged for grant {id}"
            );
            Ok(super::token_body(
                opts,
                state,
                id,
                Some(refresh),
                scope.as_deref(),
            ))
        }
    }
}

/// A §3.5 error (`400`).
fn error(code: &'static str, description: &str) -> OAuthError {
    OAuthError::new(StatusCode::BAD_REQUEST, code, description)
}

/// `GET /oauth2/device`: a form asking for the user code; with `user_code` and
/// `approve=1` or `deny=1`, the decision.
pub(super) fn verification_page(shared: &Shared, query: &str) -> Response<Body> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let flag = |name: &str| matches!(param(&params, name), Some("1" | "true" | "yes"));
    let Some(code) = param(&params, "user_code") else {
        return html(
            StatusCode::OK,
            &format!(
                "<h1>tokenrelay demo: connect a device</h1>\n\
                 <form action=\"{VERIFICATION_PATH}\">Code: <input name=\"user_code\"> \
                 <button name=\"approve\" value=\"1\">Approve</button> \
                 <button name=\"deny\" value=\"1\">Deny</button></form>"
            ),
        );
    };
    let decision = if flag("approve") {
        Some(Decision::Approved)
    } else if flag("deny") {
        Some(Decision::Denied)
    } else {
        None
    };
    let mut state = shared.lock();
    let Some(entry) = state
        .device_by_user_code(code)
        .filter(|d| d.decision == Decision::Pending && d.expires_at > Instant::now())
    else {
        return html(
            StatusCode::NOT_FOUND,
            "<p>Unknown, expired or already used code.</p>",
        );
    };
    let code = esc(&entry.user_code);
    match decision {
        Some(d) => {
            entry.decision = d;
            let what = if d == Decision::Approved {
                "approved"
            } else {
                "denied"
            };
            html(
                StatusCode::OK,
                &format!("<p>Request {code} {what}. You can close this window.</p>"),
            )
        }
        None => html(
            StatusCode::OK,
            &format!(
                "<h1>tokenrelay demo: connect a device</h1>\n\
                 <p>Client <b>{client}</b> asks for access with code <b>{code}</b>.</p>\n\
                 <p><a href=\"{VERIFICATION_PATH}?user_code={code}&amp;approve=1\">Approve</a> \
                 &middot; <a href=\"{VERIFICATION_PATH}?user_code={code}&amp;deny=1\">Deny</a></p>",
                client = esc(&shared.opts.client_id),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::test_client as client;
    use super::*;

    /// A device authorization from `server`: its answer, device code and user code.
    async fn authorize(server: &AuthServer) -> (Value, String, String) {
        let resp = client()
            .post(server.device_authorization_url())
            .form(&[
                ("client_id", "demo-client"),
                ("client_secret", "demo-secret"),
                ("scope", "read"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        let text = |k: &str| body[k].as_str().unwrap().to_string();
        let (device_code, user_code) = (text("device_code"), text("user_code"));
        (body, device_code, user_code)
    }

    async fn poll(server: &AuthServer, device_code: &str) -> (StatusCode, Value) {
        let resp = client()
            .post(server.token_url())
            .form(&[
                ("client_id", "demo-client"),
                ("client_secret", "demo-secret"),
                ("grant_type", DEVICE_CODE_GRANT),
                ("device_code", device_code),
            ])
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    /// A server whose device codes may be polled without waiting.
    async fn fast() -> AuthServer {
        AuthServer::start(AuthServerOptions {
            device_interval: Duration::ZERO,
            ..AuthServerOptions::default()
        })
        .await
        .unwrap()
    }

    /// Pending until approved, then tokens once; the code is spent afterwards.
    #[tokio::test]
    async fn a_device_code_is_pending_until_approved_then_redeemed_once() {
        let server = fast().await;
        let (body, device_code, user_code) = authorize(&server).await;
        assert_eq!(user_code.len(), 9, "{user_code}");
        assert_eq!(body["interval"], 0);
        assert!(body["verification_uri_complete"]
            .as_str()
            .unwrap()
            .ends_with(&user_code));
        let (status, err) = poll(&server, &device_code).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("authorization_pending"))
        );
        assert!(server.approve_device(&user_code.to_lowercase()));
        let (status, tokens) = poll(&server, &device_code).await;
        assert_eq!(status, 200, "{tokens}");
        assert!(server.is_valid_refresh_token(tokens["refresh_token"].as_str().unwrap()));
        assert_eq!(tokens["scope"], "read");
        let (_, again) = poll(&server, &device_code).await;
        assert_eq!(again["error"], "invalid_grant");
        let stats = server.stats();
        assert_eq!((stats.device_authorizations, stats.device_polls), (1, 3));
    }

    /// A poll sooner than the interval gets slow_down, and the interval grows by 5 s.
    #[tokio::test]
    async fn polling_too_fast_is_told_to_slow_down() {
        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let (_, device_code, _) = authorize(&server).await;
        assert_eq!(
            poll(&server, &device_code).await.1["error"],
            "authorization_pending"
        );
        assert_eq!(poll(&server, &device_code).await.1["error"], "slow_down");
        assert_eq!(poll(&server, &device_code).await.1["error"], "slow_down");
    }

    /// Denial, expiry and a demanded slow_down, each answered as §3.5 says (each on its
    /// own device code: a slow_down makes the next poll wait five seconds).
    #[tokio::test]
    async fn denial_expiry_and_demanded_slow_down() {
        let server = fast().await;
        let (_, slowed, slowed_user) = authorize(&server).await;
        assert!(server.demand_slow_down(&slowed_user));
        assert_eq!(poll(&server, &slowed).await.1["error"], "slow_down");

        let (_, denied, denied_user) = authorize(&server).await;
        assert!(server.deny_device(&denied_user));
        assert!(!server.approve_device(&denied_user), "decided once");
        assert_eq!(poll(&server, &denied).await.1["error"], "access_denied");

        let (_, expired, expired_user) = authorize(&server).await;
        assert!(server.expire_device_code(&expired_user));
        assert_eq!(poll(&server, &expired).await.1["error"], "expired_token");

        assert!(!server.approve_device("BCDF-GHJK"), "unknown code");
    }

    /// The verification page approves by user code, as a person would.
    #[tokio::test]
    async fn the_verification_page_approves() {
        let server = fast().await;
        let (_, device_code, user_code) = authorize(&server).await;
        let page = client()
            .get(format!(
                "{}?user_code={user_code}&approve=1",
                server.verification_url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains("approved"));
        assert_eq!(poll(&server, &device_code).await.0, 200);
    }
}
