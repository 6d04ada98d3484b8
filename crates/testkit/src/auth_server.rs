//! A demo OAuth2 authorization server (RFC 6749) for tests and `tokenrelay demo`.
//!
//! It implements the token endpoint (`POST /oauth2/token`) for the
//! `client_credentials`, `password`, `refresh_token`, `authorization_code` and
//! `device_code` grants, a minimal authorization endpoint (`GET /oauth2/authorize`) that
//! hands out authorization codes by redirecting to the client's `redirect_uri`, and the
//! device authorization grant of RFC 8628 ([`device`]: a device authorization endpoint,
//! a verification page, `slow_down` for clients that poll too often).
//!
//! It is deliberately as strict as the providers tokenrelay has to survive:
//!
//! * **Rotation with reuse detection.** Every grant (a "family" of tokens descended
//!   from one authorization) has exactly one live refresh token. With
//!   [`AuthServerOptions::rotate_refresh_tokens`] on, each refresh returns a new
//!   refresh token and retires the presented one; presenting a retired token again
//!   revokes the whole family, so a client that double-spends a refresh token loses
//!   the grant just like it would against a real provider.
//! * **Single-use authorization codes** valid for ten minutes; a second redemption
//!   also revokes the tokens issued for the first (RFC 6749 §4.1.2).
//! * **Client authentication** by HTTP Basic with form-urlencoded credentials
//!   (RFC 6749 §2.3.1) or by `client_id`/`client_secret` in the body, never both; by a
//!   signed client assertion (RFC 7523 §2.2: `private_key_jwt` with registered public
//!   keys, `client_secret_jwt` with HS256 over the secret), verified with a JOSE library
//!   including `aud`, `exp` and `jti` replay; or, on a TLS listener
//!   ([`AuthServer::start_tls`]) whose verifier required a client certificate, by that
//!   certificate (RFC 8705).
//! * **The `jwt-bearer` grant** (RFC 7523 §2.1) for assertions signed by registered keys.
//! * Form-urlencoded or JSON request bodies (some CRMs accept only JSON).
//!
//! Everything it is sent is recorded (secret values redacted, see
//! [`TokenRequestRecord`]) and counted ([`AuthStats`]), and failures can be injected
//! at runtime ([`FailureMode`]). Token values are never logged.

mod device;
mod discovery;

pub use discovery::DiscoveryDocs;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, request::Parts, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rand::RngCore;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::assertions::{self, ReplayCache};
use super::{
    full, json_bytes_response, json_response, Body, PeerCertificate, Server, TokenValidator,
};

/// The client assertion type of RFC 7523 §2.2 (`client_assertion_type`). Defined here,
/// not taken from tokenrelay: the test kit does not depend on the product it tests.
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The grant type of RFC 7523 §2.1 (`grant_type`).
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Path of the token endpoint.
const TOKEN_PATH: &str = "/oauth2/token";
/// Path of the authorization endpoint.
const AUTHORIZE_PATH: &str = "/oauth2/authorize";
/// How long an authorization code may be exchanged (RFC 6749 §4.1.2 recommends ≤ 10 min).
const CODE_TTL: Duration = Duration::from_secs(600);
/// Token requests are tiny; anything bigger is refused rather than buffered.
const MAX_TOKEN_REQUEST_BODY: usize = 64 * 1024;
/// How many token requests [`AuthServer::requests_log`] keeps (oldest dropped first).
const MAX_LOG_ENTRIES: usize = 10_000;
/// Expired access tokens and codes are swept after this many issuances, so that long
/// soak tests with short lifetimes do not grow memory without bound.
const PRUNE_EVERY: u32 = 256;
/// Description sent for any unusable authorization code (unknown, expired or used):
/// real providers do not tell these apart either.
const CODE_UNUSABLE: &str = "authorization code expired or already used";
/// Replaces secret parameter values in [`TokenRequestRecord::params`].
const REDACTED: &str = "<redacted>";

/// Configuration of an [`AuthServer`].
#[derive(Clone)]
pub struct AuthServerOptions {
    /// The only client this server knows.
    pub client_id: String,
    /// That client's secret.
    pub client_secret: String,
    /// Lifetime of access tokens, also returned as `expires_in` (whole seconds,
    /// rounded down so that clients never believe a token lives longer than it does).
    pub access_ttl: Duration,
    /// `true`: every refresh returns a new refresh token and retires the presented one
    /// (presenting a retired token revokes the grant). `false`: refresh tokens stay
    /// valid and are returned unchanged.
    pub rotate_refresh_tokens: bool,
    /// Leave `expires_in` out of token responses (to test a client's configured default).
    pub omit_expires_in: bool,
    /// Delay before answering each token request, simulating a slow endpoint. The
    /// request is processed only after the delay, so a client that gives up during it
    /// consumes nothing.
    pub response_delay: Duration,
    /// Resource owner name accepted by the `password` grant.
    pub username: String,
    /// Resource owner password accepted by the `password` grant.
    pub password: String,
    /// How the token endpoint departs from RFC 6749, as a real provider documents it.
    pub profile: ProviderProfile,
    /// Public keys (PEM) that may sign the client's assertions (`private_key_jwt`).
    /// `client_secret_jwt` (HS256 over `client_secret`) is always accepted.
    pub client_assertion_keys: Vec<String>,
    /// Public keys (PEM) whose assertions are accepted as `jwt-bearer` grants.
    pub grant_assertion_keys: Vec<String>,
    /// The `aud` assertions must name; `None`: this server's token URL.
    pub assertion_audience: Option<String>,
    /// Accept `client_id` alone from a connection whose client certificate the TLS
    /// verifier accepted (RFC 8705 `tls_client_auth`).
    pub tls_client_auth: bool,
    /// A reuse grace window, as Okta, Auth0 and Django OAuth Toolkit offer: a rotated
    /// refresh token presented again this soon after its rotation is answered with the
    /// same successor refresh token (and a new access token) instead of revoking the
    /// grant. Zero: no grace, any reuse revokes.
    pub reuse_grace: Duration,
    /// The device authorization grant's polling `interval` (RFC 8628 §3.2, whole
    /// seconds); polls sooner than it are answered `slow_down`.
    pub device_interval: Duration,
    /// How long a device code and its user code live (`expires_in`).
    pub device_code_ttl: Duration,
}

/// A real provider's documented token-endpoint behaviour, emulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProviderProfile {
    /// RFC 6749 as written.
    #[default]
    Standard,
    /// amoCRM/Kommo: JSON bodies only, `redirect_uri` required on refresh too, and a
    /// revoked, reused or unknown refresh token answered `401 application/problem+json`
    /// with the hint "Token has been revoked" instead of `400 invalid_grant`.
    AmoCrm,
    /// Bitrix24: `GET` with every parameter in the query string; a refresh also ends the
    /// grant's current access tokens.
    Bitrix24,
    /// YooMoney: the code exchange returns only a long-lived `access_token` (no
    /// `refresh_token`, no `expires_in`, no `token_type`).
    YooMoney,
    /// ELMA365: form bodies only; refresh tokens die 14 days after the authorization.
    Elma365,
    /// Zendesk: JSON bodies only (`/oauth/tokens` with its own JSON format); rotating,
    /// and a dead refresh token is `400 invalid_grant`.
    Zendesk,
    /// Pipedrive: form bodies only, the client authenticated by HTTP Basic only; a
    /// refused refresh token is answered `400` with the documented message "Invalid
    /// grant: refresh_token is invalid" (the body's other fields are not documented: the
    /// emulation carries the message in `error`, so only the preset's rule can tell it is
    /// a dead grant).
    Pipedrive,
    /// T-Bank (T-ID): form bodies only, the client authenticated by HTTP Basic only.
    TBank,
    /// Zoom: form bodies only, the client authenticated by HTTP Basic only; a superseded
    /// or revoked refresh token is answered with the documented message "Invalid Token!"
    /// (the status and the other fields are not documented: the emulation answers `400`
    /// with `error` `invalid_request`, so only the preset's rule can tell it is a dead
    /// grant).
    Zoom,
    /// Intuit (QuickBooks Online): form bodies, the client authenticated by HTTP Basic
    /// only; every answer states the refresh token's rolling
    /// lifetime (`x_refresh_token_expires_in`, 100 days), and its absolute expiry
    /// (`x_refresh_token_hard_expires_in`, [`INTUIT_HARD_EXPIRES_IN`] here) only when the
    /// request carries `x-include-refresh-token-hard-expires-in: true`.
    Intuit,
}

/// The `x_refresh_token_hard_expires_in` the Intuit emulation states: shorter than the
/// preset's 1825-day estimate and the 100-day rolling lifetime, so a client that uses it
/// shows it.
pub const INTUIT_HARD_EXPIRES_IN: Duration = Duration::from_secs(30 * 86400);

/// ELMA365's absolute refresh-token lifetime.
const ELMA365_REFRESH_LIFETIME: Duration = Duration::from_secs(14 * 86400);

impl Default for AuthServerOptions {
    fn default() -> Self {
        AuthServerOptions {
            client_id: "demo-client".into(),
            client_secret: "demo-secret".into(),
            access_ttl: Duration::from_secs(60),
            rotate_refresh_tokens: true,
            omit_expires_in: false,
            response_delay: Duration::ZERO,
            username: "demo-user".into(),
            password: "demo-password".into(),
            profile: ProviderProfile::Standard,
            client_assertion_keys: Vec::new(),
            grant_assertion_keys: Vec::new(),
            assertion_audience: None,
            tls_client_auth: false,
            reuse_grace: Duration::ZERO,
            device_interval: Duration::from_secs(5),
            device_code_ttl: Duration::from_secs(600),
        }
    }
}

// Hand-written so that secrets never reach logs or panic messages.
impl fmt::Debug for AuthServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthServerOptions")
            .field("client_id", &self.client_id)
            .field("client_secret", &REDACTED)
            .field("access_ttl", &self.access_ttl)
            .field("rotate_refresh_tokens", &self.rotate_refresh_tokens)
            .field("omit_expires_in", &self.omit_expires_in)
            .field("response_delay", &self.response_delay)
            .field("username", &self.username)
            .field("password", &REDACTED)
            .field("profile", &self.profile)
            .field("client_assertion_keys", &self.client_assertion_keys.len())
            .field("grant_assertion_keys", &self.grant_assertion_keys.len())
            .field("assertion_audience", &self.assertion_audience)
            .field("tls_client_auth", &self.tls_client_auth)
            .field("reuse_grace", &self.reuse_grace)
            .field("device_interval", &self.device_interval)
            .field("device_code_ttl", &self.device_code_ttl)
            .finish()
    }
}

/// Faults the token endpoint can be told to produce, see [`AuthServer::set_mode`].
///
/// Injected failures are decided before the request is processed, so they never
/// consume a refresh token or authorization code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// Behave correctly.
    #[default]
    Normal,
    /// `500` with `{"error":"server_error",...}`.
    ServerError,
    /// `200` whose body is HTML, not JSON.
    Garbage200,
    /// `200` with a JSON body that lacks `access_token`.
    EmptyAccessToken,
    /// `400 {"error":"invalid_grant"}` for every request.
    InvalidGrantAlways,
    /// Wait this long (on top of [`AuthServerOptions::response_delay`]), then behave
    /// correctly.
    Slow(Duration),
    /// `200` with `{"error": CODE}` and no token: how Zoho answers a revoked refresh
    /// token (`invalid_code`).
    ErrorIn200(&'static str),
    /// This status and JSON body for every token request: a provider's own error shape
    /// (HubSpot's `{"status": "BAD_REFRESH_TOKEN", ...}` with no `error` field).
    Answer(u16, &'static str),
}

/// How an answer is lost after the server acted, see [`AuthServer::lose_next_answers`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LostAnswer {
    /// `502 Bad Gateway`, as a proxy in front of the server answers when the server's
    /// connection broke after it processed the request.
    #[default]
    BadGateway,
    /// No answer for this long (longer than the client's timeout), then the real one.
    Hang(Duration),
}

/// Counters of a running [`AuthServer`] (a snapshot, see [`AuthServer::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthStats {
    /// Token requests processed, whatever their outcome.
    pub token_requests: u64,
    /// Requests with `grant_type=client_credentials`, whatever their outcome.
    pub client_credentials: u64,
    /// Requests with `grant_type=password`, whatever their outcome.
    pub password: u64,
    /// Requests with `grant_type=refresh_token`, whatever their outcome.
    pub refreshes: u64,
    /// Requests with `grant_type=authorization_code`, whatever their outcome.
    pub authorization_codes: u64,
    /// Retired refresh tokens presented again (each revoked its grant).
    pub refresh_reuse_detected: u64,
    /// `invalid_grant` responses of any cause (unknown, revoked or reused refresh
    /// token, bad code, bad password, [`FailureMode::InvalidGrantAlways`]).
    pub invalid_grant: u64,
    /// `invalid_client` responses.
    pub invalid_client: u64,
    /// Refresh tokens rotated (new refresh token issued, old one retired).
    pub rotations: u64,
    /// Successful token responses (access token issued).
    pub issued: u64,
    /// Requests with the `jwt-bearer` grant type, whatever their outcome.
    pub jwt_bearer: u64,
    /// Rotated refresh tokens presented again within the reuse grace window (answered,
    /// see [`AuthServerOptions::reuse_grace`]).
    pub grace_reuses: u64,
    /// Answers processed and then lost on their way back (see
    /// [`AuthServer::lose_next_answers`]).
    pub answers_lost: u64,
    /// Device authorization requests (RFC 8628 §3.1), whatever their outcome.
    pub device_authorizations: u64,
    /// Token requests with the `device_code` grant from authenticated clients,
    /// whatever their outcome.
    pub device_polls: u64,
}

/// What one token request looked like, with secret values redacted.
#[derive(Clone, Debug)]
pub struct TokenRequestRecord {
    /// When the request was processed (after any configured delay).
    pub at: Instant,
    /// The `grant_type` parameter; empty if there was none.
    pub grant_type: String,
    /// How the client authenticated: `"basic"`, `"body"`, `"assertion"`, `"tls"` or
    /// `"none"`.
    pub client_auth: String,
    /// Assertions verified for this request (client assertion, grant assertion): the
    /// header's `alg` and `kid` and the claims, never the signature.
    pub assertions: Vec<Value>,
    /// Body format: `"form"`, `"json"`, `"none"` (no `Content-Type`) or the media type sent.
    pub content_type: String,
    /// Body parameters in the order sent (JSON bodies: alphabetical). Values of secret
    /// parameters (`client_secret`, `refresh_token`, `code`, `device_code`, `password`,
    /// anything named like a secret, token, assertion or verifier) are replaced by
    /// `"<redacted>"`; other values (`scope`, `redirect_uri`, `audience`, ...) are kept.
    pub params: Vec<(String, String)>,
    /// Names of query-string parameters (credentials belong in the body, never the URL).
    pub query_params: Vec<String>,
    /// Names of the request headers, lowercase, in the order received.
    pub header_names: Vec<String>,
    /// Request headers with their values, lowercase names, except those that carry
    /// credentials (`authorization`, `proxy-authorization`, `cookie`).
    pub headers: Vec<(String, String)>,
    /// Status code of the answer.
    pub status: u16,
    /// The OAuth2 `error` code answered, if any.
    pub error: Option<String>,
}

impl TokenRequestRecord {
    /// The (possibly redacted) value of body parameter `name`, if it was sent.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of request header `name` (any case), unless it carries credentials.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether request header `name` (any case) was sent.
    pub fn has_header(&self, name: &str) -> bool {
        self.header_names
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
    }
}

/// A running demo authorization server. Dropping it stops the server abruptly;
/// [`AuthServer::shutdown`] lets in-flight requests finish first.
pub struct AuthServer {
    shared: Arc<Shared>,
    server: Server,
}

impl fmt::Debug for AuthServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthServer")
            .field("addr", &self.server.addr)
            .finish_non_exhaustive()
    }
}

impl AuthServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub async fn start(opts: AuthServerOptions) -> io::Result<AuthServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
    }

    /// Starts a server on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr, opts: AuthServerOptions) -> io::Result<AuthServer> {
        Self::start_with(addr, opts, None).await
    }

    /// Starts an https server on `addr` with `tls`; its client-certificate verifier
    /// decides which clients may connect (see [`AuthServerOptions::tls_client_auth`]).
    pub async fn start_tls(
        addr: SocketAddr,
        opts: AuthServerOptions,
        tls: rustls::ServerConfig,
    ) -> io::Result<AuthServer> {
        Self::start_with(addr, opts, Some(Arc::new(tls))).await
    }

    async fn start_with(
        addr: SocketAddr,
        opts: AuthServerOptions,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<AuthServer> {
        let listener = TcpListener::bind(addr).await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let origin = format!("{scheme}://{}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            audience: opts
                .assertion_audience
                .clone()
                .unwrap_or_else(|| format!("{origin}{TOKEN_PATH}")),
            client_keys: assertions::decoding_keys(&opts.client_assertion_keys)?,
            grant_keys: assertions::decoding_keys(&opts.grant_assertion_keys)?,
            origin,
            opts,
            state: Mutex::new(State::default()),
            held: tokio::sync::watch::Sender::new(false),
        });
        let handler_shared = Arc::clone(&shared);
        let server = Server::start(listener, tls, move |req| {
            handle(Arc::clone(&handler_shared), req)
        })?;
        tracing::info!(addr = %server.addr, "demo auth server: listening");
        Ok(AuthServer { shared, server })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://ADDR` (`https://` for [`AuthServer::start_tls`]), the server's origin.
    pub fn url(&self) -> String {
        self.shared.origin.clone()
    }

    /// `http://ADDR/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.url())
    }

    /// `http://ADDR/oauth2/authorize`.
    pub fn authorize_url(&self) -> String {
        format!("{}{AUTHORIZE_PATH}", self.url())
    }

    /// Creates a new grant, as if a user had just authorized the client, and returns
    /// its refresh token.
    pub fn new_grant(&self) -> String {
        let mut state = self.shared.lock();
        let grant = state.new_grant(None);
        state.new_refresh_token(grant)
    }

    /// Issues a valid access token on a new grant without a request (e.g. for a
    /// `static` credential in tests).
    pub fn new_access_token(&self) -> String {
        let mut state = self.shared.lock();
        let grant = state.new_grant(None);
        state.new_access_token(grant, self.shared.opts.access_ttl)
    }

    /// Issues a single-use authorization code bound to `redirect_uri`, valid for ten
    /// minutes, as if a user had approved the client.
    pub fn new_authorization_code(&self, redirect_uri: &str) -> String {
        self.shared.lock().new_code(redirect_uri, None)
    }

    /// Makes `code` expired (exchanging it then fails with `invalid_grant`).
    pub fn expire_authorization_code(&self, code: &str) {
        if let Some(entry) = self.shared.lock().codes.get_mut(code) {
            entry.expires_at = Instant::now();
        }
    }

    /// Revokes every grant issued so far: their refresh tokens get `invalid_grant`
    /// and their access tokens stop validating. Later grants are unaffected.
    pub fn revoke_all(&self) {
        let mut state = self.shared.lock();
        for grant in state.grants.values_mut() {
            grant.revoked = true;
        }
        tracing::info!("demo auth server: all grants revoked");
    }

    /// Makes every access token issued so far stop validating, as if each had expired
    /// early (a provider restarted, rotated its signing key, or revoked sessions), while
    /// grants and refresh tokens stay untouched: the next request carrying one of these
    /// access tokens gets `401`, and a client recovers by refreshing.
    pub fn expire_access_tokens(&self) {
        let mut state = self.shared.lock();
        let now = Instant::now();
        for entry in state.access_tokens.values_mut() {
            entry.expires_at = entry.expires_at.min(now);
        }
        tracing::info!("demo auth server: all access tokens expired");
    }

    /// Whether `token` is an access token issued by this server that has not expired
    /// and whose grant has not been revoked.
    pub fn is_valid_access_token(&self, token: &str) -> bool {
        self.shared.is_valid_access_token(token)
    }

    /// Whether `token` is the live refresh token of a grant (issued, not retired, grant
    /// not revoked): the one a correct client must currently hold.
    pub fn is_valid_refresh_token(&self, token: &str) -> bool {
        let state = self.shared.lock();
        state
            .refresh_tokens
            .get(token)
            .is_some_and(|entry| !entry.retired && !state.grants[&entry.grant].revoked)
    }

    /// [`AuthServer::is_valid_access_token`] as a shareable closure, for
    /// [`ApiServer::start`](super::ApiServer::start). It stays usable after shutdown.
    pub fn validator(&self) -> TokenValidator {
        let shared = Arc::clone(&self.shared);
        Arc::new(move |token: &str| shared.is_valid_access_token(token))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> AuthStats {
        self.shared.lock().stats.clone()
    }

    /// Changes how the token endpoint behaves from the next request on.
    /// Holds every token request before it is processed until
    /// [`release_token_requests`](Self::release_token_requests): a refresh stays in
    /// flight for as long as a test needs, however fast the machine is.
    pub fn hold_token_requests(&self) {
        tracing::info!("demo auth server: token requests held");
        self.shared.held.send_replace(true);
    }

    /// Lets held and later token requests proceed.
    pub fn release_token_requests(&self) {
        tracing::info!("demo auth server: token requests released");
        self.shared.held.send_replace(false);
    }

    pub fn set_mode(&self, mode: FailureMode) {
        tracing::info!(?mode, "demo auth server: failure mode set");
        self.shared.lock().mode = mode;
    }

    /// Processes the next successful token request normally (a refresh rotates: the
    /// presented refresh token is retired and a new one issued), then alters its answer
    /// once: each field of `patch` replaces the answer's field, and a `null` removes it.
    /// This is how a provider answers a 200 that carries a new refresh token but an
    /// unusable access-token part (`expires_in: 0`, `token_type: "mac"`, ...).
    pub fn alter_next_answer(&self, patch: serde_json::Map<String, Value>) {
        tracing::info!(fields = ?patch.keys().collect::<Vec<_>>(), "demo auth server: next answer will be altered");
        self.shared.lock().next_answer_patch = Some(patch);
    }

    /// Processes the next successful token request normally, then rewrites its
    /// serialized answer once with `rewrite`: how a provider sends a 200 that is not
    /// strict JSON (a byte-order mark, a duplicate key, trailing bytes, a huge body).
    pub fn rewrite_next_answer(&self, rewrite: impl FnOnce(Vec<u8>) -> Vec<u8> + Send + 'static) {
        tracing::info!("demo auth server: next answer's bytes will be rewritten");
        self.shared.lock().next_answer_rewrite = Some(Box::new(rewrite));
    }

    /// Adds `fields` to every successful answer from the next request on, as providers
    /// add their own (Salesforce's `instance_url`, Zoho's `api_domain`, Bitrix24's
    /// `client_endpoint`); replaces what an earlier call set. An empty map stops adding
    /// any, so later answers omit them.
    pub fn set_answer_fields(&self, fields: serde_json::Map<String, Value>) {
        tracing::info!(fields = ?fields.keys().collect::<Vec<_>>(), "demo auth server: answers carry extra fields");
        self.shared.lock().answer_fields = fields;
    }

    /// Answers the next `count` token requests `500 server_error` after waiting `delay`
    /// each (consuming nothing), then behaves as the failure mode says: one failed
    /// attempt among working ones.
    pub fn fail_next(&self, count: u32, delay: Duration) {
        tracing::info!(
            count,
            ?delay,
            "demo auth server: next token requests will fail"
        );
        let mut state = self.shared.lock();
        state.fail_next = count;
        state.fail_next_delay = delay;
    }

    /// Processes the next `count` token requests normally (a refresh rotates), then
    /// loses each answer as `how` says: the server acted, and the client cannot know.
    pub fn lose_next_answers(&self, count: u32, how: LostAnswer) {
        tracing::info!(count, ?how, "demo auth server: next answers will be lost");
        let mut state = self.shared.lock();
        state.lose_next = count;
        state.lose_how = how;
    }

    /// The current failure mode.
    pub fn mode(&self) -> FailureMode {
        self.shared.lock().mode.clone()
    }

    /// The most recent token requests (up to 10 000), oldest first.
    pub fn requests_log(&self) -> Vec<TokenRequestRecord> {
        self.shared.lock().log.iter().cloned().collect()
    }

    /// When each refresh-token request was processed, oldest first.
    pub fn refresh_request_times(&self) -> Vec<Instant> {
        let shared = self.shared.lock();
        shared
            .log
            .iter()
            .filter(|r| r.grant_type == "refresh_token")
            .map(|r| r.at)
            .collect()
    }

    /// Stops accepting, lets in-flight requests finish (up to two seconds) and closes
    /// all connections. Token state stays readable through validators handed out.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// State shared by the server task, the [`AuthServer`] handle and validators.
struct Shared {
    opts: AuthServerOptions,
    origin: String,
    /// The `aud` assertions must name.
    audience: String,
    client_keys: Vec<jsonwebtoken::DecodingKey>,
    grant_keys: Vec<jsonwebtoken::DecodingKey>,
    // A plain mutex: it is never held across an await, and every token operation
    // (check, retire, issue) must be atomic for rotation to be race-free.
    state: Mutex<State>,
    /// True while token requests are held before processing, see
    /// [`AuthServer::hold_token_requests`].
    held: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not poison the server for the others.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_valid_access_token(&self, token: &str) -> bool {
        let state = self.lock();
        state.access_tokens.get(token).is_some_and(|entry| {
            entry.expires_at > Instant::now() && !state.grants[&entry.grant].revoked
        })
    }
}

/// Rewrites a serialized answer's bytes.
type AnswerRewrite = Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send>;

/// Everything the server knows; guarded by [`Shared::state`].
#[derive(Default)]
struct State {
    mode: FailureMode,
    /// Field overrides for the next successful answer, see [`AuthServer::alter_next_answer`].
    next_answer_patch: Option<serde_json::Map<String, Value>>,
    /// Token requests still to fail, see [`AuthServer::fail_next`].
    fail_next: u32,
    fail_next_delay: Duration,
    /// Answers still to lose after processing, see [`AuthServer::lose_next_answers`].
    lose_next: u32,
    lose_how: LostAnswer,
    /// Byte rewrite of the next successful answer, see [`AuthServer::rewrite_next_answer`].
    next_answer_rewrite: Option<AnswerRewrite>,
    /// Extra fields of every successful answer, see [`AuthServer::set_answer_fields`].
    answer_fields: serde_json::Map<String, Value>,
    stats: AuthStats,
    log: VecDeque<TokenRequestRecord>,
    next_grant: u64,
    grants: HashMap<u64, Grant>,
    /// Live and retired refresh tokens. Retired ones are kept for the server's
    /// lifetime (a few dozen bytes each) so that reuse can be told apart from garbage.
    refresh_tokens: HashMap<String, RefreshEntry>,
    access_tokens: HashMap<String, AccessEntry>,
    codes: HashMap<String, CodeEntry>,
    /// Device authorizations by device code (RFC 8628).
    devices: HashMap<String, device::DeviceEntry>,
    /// Metadata documents (RFC 8414, OpenID Connect Discovery).
    discovery: discovery::DiscoveryState,
    issued_since_prune: u32,
    /// `jti` values of assertions already accepted.
    replay: ReplayCache,
    /// Assertions verified for the request being processed, for its record.
    verified: Vec<Value>,
}

/// One authorization and every token descended from it.
struct Grant {
    revoked: bool,
    rotations: u64,
    authorized_at: Instant,
    /// Scope granted originally; a refresh may narrow it but not widen it.
    scope: Option<String>,
}

struct RefreshEntry {
    grant: u64,
    retired: bool,
    /// When it was rotated, and the token that replaced it (for the reuse grace window).
    rotated: Option<(Instant, String)>,
}

struct AccessEntry {
    grant: u64,
    expires_at: Instant,
}

struct CodeEntry {
    redirect_uri: String,
    scope: Option<String>,
    expires_at: Instant,
    /// The grant created by redeeming this code; a second redemption revokes it.
    redeemed_by: Option<u64>,
}

impl State {
    fn new_grant(&mut self, scope: Option<String>) -> u64 {
        self.next_grant += 1;
        let id = self.next_grant;
        self.grants.insert(
            id,
            Grant {
                revoked: false,
                rotations: 0,
                scope,
                authorized_at: Instant::now(),
            },
        );
        id
    }

    fn new_refresh_token(&mut self, grant: u64) -> String {
        let token = random_token();
        self.refresh_tokens.insert(
            token.clone(),
            RefreshEntry {
                grant,
                retired: false,
                rotated: None,
            },
        );
        token
    }

    fn new_access_token(&mut self, grant: u64, ttl: Duration) -> String {
        let now = Instant::now();
        self.issued_since_prune += 1;
        if self.issued_since_prune >= PRUNE_EVERY {
            self.prune(now);
        }
        let token = random_token();
        self.access_tokens.insert(
            token.clone(),
            AccessEntry {
                grant,
                expires_at: now + ttl,
            },
        );
        token
    }

    fn new_code(&mut self, redirect_uri: &str, scope: Option<String>) -> String {
        let code = random_token();
        self.codes.insert(
            code.clone(),
            CodeEntry {
                redirect_uri: redirect_uri.to_owned(),
                scope,
                expires_at: Instant::now() + CODE_TTL,
                redeemed_by: None,
            },
        );
        code
    }

    /// Drops expired access tokens and codes. (A redeemed code is forgotten once it
    /// expires; presenting it afterwards is still `invalid_grant`, just without
    /// revoking the grant, which matches what providers do after their retention.)
    fn prune(&mut self, now: Instant) {
        self.issued_since_prune = 0;
        self.access_tokens.retain(|_, entry| entry.expires_at > now);
        self.codes.retain(|_, entry| entry.expires_at > now);
        self.devices.retain(|_, entry| entry.kept_at(now));
    }

    fn revoke(&mut self, grant: u64) {
        if let Some(grant) = self.grants.get_mut(&grant) {
            grant.revoked = true;
        }
    }
}

/// An OAuth2 error response (RFC 6749 §5.2).
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// Set when the client tried HTTP Basic: §5.2 then requires a `WWW-Authenticate`.
    basic_challenge: bool,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status,
            error,
            description: description.into(),
            basic_challenge: false,
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    fn invalid_client(basic_challenge: bool) -> Self {
        OAuthError {
            basic_challenge,
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            )
        }
    }

    fn into_response(self) -> Response<Body> {
        let mut resp = json_response(
            self.status,
            &json!({"error": self.error, "error_description": self.description}),
        );
        no_store(resp.headers_mut());
        if self.basic_challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tokenrelay-demo\""),
            );
        }
        resp
    }
}

/// amoCRM's answer to a revoked, reused or unknown refresh token.
fn amocrm_revoked() -> Response<Body> {
    let body = json!({
        "hint": "Token has been revoked",
        "title": "Unauthorized",
        "type": "https://httpstatus.es/401",
        "status": 401,
        "detail": "The refresh token is invalid."
    });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    no_store(resp.headers_mut());
    resp
}

/// Pipedrive's answer to a refresh token that is unknown, revoked or already exchanged:
/// `400` with the message of its OAuth status-code table.
fn pipedrive_invalid_grant() -> Response<Body> {
    let mut resp = json_response(
        StatusCode::BAD_REQUEST,
        &json!({"success": false, "error": "Invalid grant: refresh_token is invalid"}),
    );
    no_store(resp.headers_mut());
    resp
}

/// Zoom's answer to a refresh token that is superseded or revoked: its documented
/// message "Invalid Token!".
fn zoom_invalid_token() -> Response<Body> {
    let mut resp = json_response(
        StatusCode::BAD_REQUEST,
        &json!({"reason": "Invalid Token!", "error": "invalid_request"}),
    );
    no_store(resp.headers_mut());
    resp
}

/// Token responses carry credentials: RFC 6749 §5.1 forbids caching them.
fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if path == TOKEN_PATH {
        let (method, allow) = match shared.opts.profile {
            ProviderProfile::Bitrix24 => (Method::GET, "GET"),
            _ => (Method::POST, "POST"),
        };
        if req.method() == method {
            token_endpoint(shared, req).await
        } else {
            method_not_allowed(allow)
        }
    } else if path == AUTHORIZE_PATH {
        if req.method() == Method::GET {
            authorize_endpoint(&shared, req.uri().query().unwrap_or(""))
        } else {
            method_not_allowed("GET")
        }
    } else if path == device::DEVICE_AUTHORIZATION_PATH {
        if req.method() == Method::POST {
            device::device_authorization_endpoint(shared, req).await
        } else {
            method_not_allowed("POST")
        }
    } else if discovery::is_metadata_path(path) {
        if req.method() == Method::GET {
            discovery::metadata(&shared, path)
        } else {
            method_not_allowed("GET")
        }
    } else if path == device::VERIFICATION_PATH {
        if req.method() == Method::GET {
            device::verification_page(&shared, req.uri().query().unwrap_or(""))
        } else {
            method_not_allowed("GET")
        }
    } else {
        json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"}))
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": "method_not_allowed"}),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

async fn token_endpoint(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let _ = shared.held.subscribe().wait_for(|held| !held).await;
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_TOKEN_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return OAuthError::invalid_request("request body too large or unreadable")
                .into_response()
        }
    };
    let mut delay = shared.opts.response_delay;
    let forced_failure = {
        let mut state = shared.lock();
        if let FailureMode::Slow(extra) = state.mode {
            delay += extra;
        }
        let fail = state.fail_next > 0;
        if fail {
            state.fail_next -= 1;
            delay += state.fail_next_delay;
        }
        fail
    };
    if !delay.is_zero() {
        // Processing happens only after the delay: if the client hangs up meanwhile,
        // hyper drops this future and nothing (no refresh token) is consumed.
        tokio::time::sleep(delay).await;
    }
    let response = process_token_request(&shared, &parts, &body, forced_failure);
    let lost = {
        let mut state = shared.lock();
        let lose = state.lose_next > 0 && response.status() == StatusCode::OK;
        if lose {
            state.lose_next -= 1;
            state.stats.answers_lost += 1;
        }
        lose.then_some(state.lose_how)
    };
    match lost {
        None => response,
        Some(LostAnswer::BadGateway) => json_response(
            StatusCode::BAD_GATEWAY,
            &json!({"message": "upstream connection reset"}),
        ),
        Some(LostAnswer::Hang(d)) => {
            tokio::time::sleep(d).await;
            response
        }
    }
}

/// A token request's body, decoded.
struct TokenRequest {
    /// As reported in [`TokenRequestRecord::content_type`].
    format: String,
    /// Parameters in order, or why the body could not be decoded.
    params: Result<Vec<(String, String)>, String>,
}

impl TokenRequest {
    fn parse(headers: &HeaderMap, body: &Bytes) -> TokenRequest {
        let media_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        match media_type.as_deref() {
            Some("application/x-www-form-urlencoded") => TokenRequest {
                format: "form".into(),
                params: Ok(form_urlencoded::parse(body).into_owned().collect()),
            },
            Some("application/json") => TokenRequest {
                format: "json".into(),
                params: json_params(body),
            },
            Some(other) => TokenRequest {
                format: other.to_owned(),
                params: Err(format!("unsupported content type {other}")),
            },
            None => TokenRequest {
                format: "none".into(),
                params: Err("missing content type".into()),
            },
        }
    }
}

/// Flattens a JSON object body into parameters. Numbers and booleans are accepted
/// as their text (clients serialize e.g. `expires` flags that way); nested values
/// are not OAuth2 parameters.
fn json_params(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return Err("body is not a JSON object".into());
    };
    map.into_iter()
        .map(|(name, value)| match value {
            Value::String(s) => Ok((name, s)),
            Value::Number(n) => Ok((name, n.to_string())),
            Value::Bool(b) => Ok((name, b.to_string())),
            _ => Err(format!("parameter {name} must be a string")),
        })
        .collect()
}

/// Whether a parameter's value must not be kept in the request log.
fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if name == "client_assertion_type" {
        return false;
    }
    name == "code"
        || name == "device_code"
        || ["secret", "token", "password", "assertion", "verifier"]
            .iter()
            .any(|s| name.contains(s))
}

/// Looks up a parameter. RFC 6749 §3.1: parameters sent without a value are treated
/// as omitted.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, v)| n == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// Answers one token request; `forced_failure`: `500` whatever the mode (see
/// [`AuthServer::fail_next`]).
fn process_token_request(
    shared: &Shared,
    parts: &Parts,
    body: &Bytes,
    forced_failure: bool,
) -> Response<Body> {
    let request = match shared.opts.profile {
        ProviderProfile::Bitrix24 => TokenRequest {
            format: "query".into(),
            params: Ok(
                form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect(),
            ),
        },
        _ => TokenRequest::parse(&parts.headers, body),
    };
    let params: &[(String, String)] = request.params.as_deref().unwrap_or_default();
    let grant_type = param(params, "grant_type").unwrap_or("").to_owned();
    let basic = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"));
    let peer_cert = parts.extensions.get::<PeerCertificate>().is_some();
    let client_auth = if basic {
        "basic"
    } else if param(params, "client_assertion").is_some() {
        "assertion"
    } else if param(params, "client_secret").is_some() {
        "body"
    } else if peer_cert && param(params, "client_id").is_some() {
        "tls"
    } else if param(params, "client_id").is_some() {
        "body"
    } else {
        "none"
    };

    let mut state = shared.lock();
    state.stats.token_requests += 1;
    match grant_type.as_str() {
        "client_credentials" => state.stats.client_credentials += 1,
        "password" => state.stats.password += 1,
        "refresh_token" => state.stats.refreshes += 1,
        "authorization_code" => state.stats.authorization_codes += 1,
        JWT_BEARER_GRANT => state.stats.jwt_bearer += 1,
        _ => {}
    }

    let mode = if forced_failure {
        FailureMode::ServerError
    } else {
        state.mode.clone()
    };
    let (response, error) = match mode {
        FailureMode::ServerError => {
            let mut resp = json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "server_error", "error_description": "injected failure"}),
            );
            no_store(resp.headers_mut());
            (resp, Some("server_error".to_owned()))
        }
        FailureMode::Garbage200 => {
            let mut resp = Response::new(full(
                "<html><body>Service temporarily unavailable</body></html>",
            ));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            (resp, None)
        }
        FailureMode::ErrorIn200(code) => {
            let resp = json_response(StatusCode::OK, &json!({ "error": code }));
            (resp, Some(code.to_owned()))
        }
        FailureMode::Answer(status, body) => {
            let value: serde_json::Value =
                serde_json::from_str(body).expect("FailureMode::Answer takes a JSON body");
            let status = StatusCode::from_u16(status).expect("FailureMode::Answer status");
            (
                json_response(status, &value),
                Some(format!("answer {status}")),
            )
        }
        FailureMode::EmptyAccessToken => {
            let mut resp = json_response(
                StatusCode::OK,
                &json!({"token_type": "Bearer", "expires_in": shared.opts.access_ttl.as_secs()}),
            );
            no_store(resp.headers_mut());
            (resp, None)
        }
        _ => {
            let outcome = if state.mode == FailureMode::InvalidGrantAlways {
                Err(OAuthError::invalid_grant("injected failure"))
            } else {
                request
                    .params
                    .as_deref()
                    .map_err(|e| OAuthError::invalid_request(e.clone()))
                    .and_then(|params| grant(shared, &mut state, parts, params))
            };
            match outcome {
                Ok(mut body) => {
                    state.stats.issued += 1;
                    if !state.answer_fields.is_empty() {
                        apply_patch(&mut body, state.answer_fields.clone());
                    }
                    if shared.opts.profile == ProviderProfile::Intuit {
                        intuit_lifetimes(&mut body, parts);
                    }
                    if let Some(patch) = state.next_answer_patch.take() {
                        apply_patch(&mut body, patch);
                    }
                    let mut resp = match state.next_answer_rewrite.take() {
                        Some(rewrite) => json_bytes_response(
                            StatusCode::OK,
                            rewrite(body.to_string().into_bytes()),
                        ),
                        None => json_response(StatusCode::OK, &body),
                    };
                    no_store(resp.headers_mut());
                    (resp, None)
                }
                Err(err) => {
                    match err.error {
                        "invalid_grant" => state.stats.invalid_grant += 1,
                        "invalid_client" => state.stats.invalid_client += 1,
                        _ => {}
                    }
                    tracing::debug!(
                        grant_type = %grant_type,
                        error = err.error,
                        description = %err.description,
                        "demo auth server: token request refused"
                    );
                    let error = err.error.to_owned();
                    let resp = if shared.opts.profile == ProviderProfile::AmoCrm
                        && err.error == "invalid_grant"
                        && grant_type == "refresh_token"
                    {
                        amocrm_revoked()
                    } else if shared.opts.profile == ProviderProfile::Pipedrive
                        && err.error == "invalid_grant"
                        && grant_type == "refresh_token"
                    {
                        pipedrive_invalid_grant()
                    } else if shared.opts.profile == ProviderProfile::Zoom
                        && err.error == "invalid_grant"
                        && grant_type == "refresh_token"
                    {
                        zoom_invalid_token()
                    } else {
                        err.into_response()
                    };
                    (resp, Some(error))
                }
            }
        }
    };

    let record = TokenRequestRecord {
        at: Instant::now(),
        grant_type,
        client_auth: client_auth.to_owned(),
        assertions: std::mem::take(&mut state.verified),
        content_type: request.format,
        params: params
            .iter()
            .map(|(name, value)| {
                let value = if is_secret_param(name) {
                    REDACTED.to_owned()
                } else {
                    value.clone()
                };
                (name.clone(), value)
            })
            .collect(),
        query_params: form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .map(|(name, _)| name.into_owned())
            .collect(),
        header_names: parts
            .headers
            .keys()
            .map(|h| h.as_str().to_owned())
            .collect(),
        headers: parts
            .headers
            .iter()
            .filter(|(h, _)| {
                ![
                    header::AUTHORIZATION,
                    header::PROXY_AUTHORIZATION,
                    header::COOKIE,
                ]
                .contains(h)
            })
            .map(|(h, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (h.as_str().to_owned(), v)
            })
            .collect(),
        status: response.status().as_u16(),
        error,
    };
    if state.log.len() >= MAX_LOG_ENTRIES {
        state.log.pop_front();
    }
    state.log.push_back(record);
    response
}

/// Intuit's refresh-token lifetimes in a success answer: the rolling one always, the
/// absolute one when asked for.
fn intuit_lifetimes(body: &mut Value, parts: &Parts) {
    let asked = parts
        .headers
        .get("x-include-refresh-token-hard-expires-in")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let mut patch = serde_json::Map::new();
    patch.insert("x_refresh_token_expires_in".into(), 8_640_000.into());
    if asked {
        patch.insert(
            "x_refresh_token_hard_expires_in".into(),
            INTUIT_HARD_EXPIRES_IN.as_secs().into(),
        );
    }
    apply_patch(body, patch);
}

/// Validates the request and runs the grant; the JSON success body on success.
fn grant(
    shared: &Shared,
    state: &mut State,
    parts: &Parts,
    params: &[(String, String)],
) -> Result<Value, OAuthError> {
    // RFC 6749 §3.2: parameters must not be repeated.
    for (i, (name, _)) in params.iter().enumerate() {
        if params[..i].iter().any(|(n, _)| n == name) {
            return Err(OAuthError::invalid_request(format!(
                "parameter {name} repeated"
            )));
        }
    }
    // Credentials in a URL end up in access logs and proxies' caches (Bitrix24 wants
    // them there all the same).
    let query = parts.uri.query().unwrap_or("");
    if shared.opts.profile != ProviderProfile::Bitrix24
        && form_urlencoded::parse(query.as_bytes()).any(|(name, _)| is_secret_param(&name))
    {
        return Err(OAuthError::invalid_request(
            "credentials must be sent in the request body, not the URL",
        ));
    }
    let grant_type = param(params, "grant_type");
    // RFC 7523 §3.1: client authentication is optional with an assertion grant.
    let anonymous = parts.headers.get(header::AUTHORIZATION).is_none()
        && ["client_id", "client_secret", "client_assertion"]
            .iter()
            .all(|n| param(params, n).is_none());
    if !(grant_type == Some(JWT_BEARER_GRANT) && anonymous) {
        authenticate_client(shared, state, parts, params)?;
    }
    profile_rules(shared.opts.profile, parts, params)?;

    let opts = &shared.opts;
    let requested_scope = param(params, "scope");
    match grant_type {
        None => Err(OAuthError::invalid_request("missing grant_type")),
        Some(JWT_BEARER_GRANT) => {
            let assertion = param(params, "assertion")
                .ok_or_else(|| OAuthError::invalid_request("missing assertion"))?;
            let verified = assertions::verify(
                assertion,
                &shared.grant_keys,
                None,
                &shared.audience,
                &mut state.replay,
            )
            .map_err(OAuthError::invalid_grant)?;
            state.verified.push(verified.summary);
            // Google-style: the scope is a claim; RFC 7521 §4.1 also allows the parameter.
            let scope = verified
                .claims
                .get("scope")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or(requested_scope.map(str::to_owned));
            let id = state.new_grant(scope.clone());
            Ok(token_body(opts, state, id, None, scope.as_deref()))
        }
        Some("client_credentials") => {
            // §4.4.3: no refresh token for client credentials.
            let id = state.new_grant(requested_scope.map(str::to_owned));
            Ok(token_body(opts, state, id, None, requested_scope))
        }
        Some("password") => {
            let (Some(username), Some(password)) =
                (param(params, "username"), param(params, "password"))
            else {
                return Err(OAuthError::invalid_request("missing username or password"));
            };
            if username != opts.username || password != opts.password {
                return Err(OAuthError::invalid_grant(
                    "invalid resource owner credentials",
                ));
            }
            let id = state.new_grant(requested_scope.map(str::to_owned));
            let refresh = state.new_refresh_token(id);
            Ok(token_body(opts, state, id, Some(refresh), requested_scope))
        }
        Some("refresh_token") => refresh_grant(opts, state, params, requested_scope),
        Some(device::DEVICE_CODE_GRANT) => device::device_code_grant(opts, state, params),
        Some("authorization_code") => code_grant(opts, state, params, requested_scope),
        Some(_) => Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant type not supported",
        )),
    }
}

/// What a provider profile demands of every token request beyond RFC 6749.
fn profile_rules(
    profile: ProviderProfile,
    parts: &Parts,
    params: &[(String, String)],
) -> Result<(), OAuthError> {
    let media = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match profile {
        ProviderProfile::AmoCrm if !media.starts_with("application/json") => {
            Err(OAuthError::invalid_request("a JSON body is required"))
        }
        ProviderProfile::AmoCrm
            if param(params, "grant_type") == Some("refresh_token")
                && param(params, "redirect_uri").is_none() =>
        {
            Err(OAuthError::invalid_request("redirect_uri is required"))
        }
        ProviderProfile::Elma365
        | ProviderProfile::Pipedrive
        | ProviderProfile::TBank
        | ProviderProfile::Zoom
        | ProviderProfile::Intuit
            if !media.starts_with("application/x-www-form-urlencoded") =>
        {
            Err(OAuthError::invalid_request("a form body is required"))
        }
        ProviderProfile::Zendesk if !media.starts_with("application/json") => {
            Err(OAuthError::invalid_request("a JSON body is required"))
        }
        ProviderProfile::Pipedrive
        | ProviderProfile::TBank
        | ProviderProfile::Zoom
        | ProviderProfile::Intuit
            if param(params, "client_secret").is_some()
                || parts.headers.get(header::AUTHORIZATION).is_none() =>
        {
            Err(OAuthError::invalid_client(true))
        }
        _ => Ok(()),
    }
}

fn refresh_grant(
    opts: &AuthServerOptions,
    state: &mut State,
    params: &[(String, String)],
    requested_scope: Option<&str>,
) -> Result<Value, OAuthError> {
    let presented = param(params, "refresh_token")
        .ok_or_else(|| OAuthError::invalid_request("missing refresh_token"))?;
    let Some(entry) = state.refresh_tokens.get(presented) else {
        return Err(OAuthError::invalid_grant("unknown refresh token"));
    };
    let (id, retired) = (entry.grant, entry.retired);
    let in_grace = match &entry.rotated {
        Some((at, successor)) if at.elapsed() < opts.reuse_grace => Some(successor.clone()),
        _ => None,
    };
    let grant = &state.grants[&id];
    if grant.revoked {
        return Err(OAuthError::invalid_grant("grant revoked"));
    }
    if opts.profile == ProviderProfile::Elma365
        && grant.authorized_at.elapsed() >= ELMA365_REFRESH_LIFETIME
    {
        return Err(OAuthError::invalid_grant("refresh token expired"));
    }
    if let (true, Some(successor)) = (retired, in_grace) {
        // Within the reuse grace window: the answer the client may have missed, again.
        state.stats.grace_reuses += 1;
        tracing::info!(
            grant = id,
            "demo auth server: rotated refresh token presented again within the grace window"
        );
        let scope = grant.scope.clone();
        return Ok(token_body(
            opts,
            state,
            id,
            Some(successor),
            scope.as_deref(),
        ));
    }
    if retired {
        // A retired token came back: either it leaked or a client double-spent it.
        // Either way the whole family is suspect (OAuth 2.0 Security BCP §4.14.2).
        state.revoke(id);
        state.stats.refresh_reuse_detected += 1;
        tracing::warn!(
            grant = id,
            "demo auth server: refresh token reuse detected; revoked grant {id}"
        );
        return Err(OAuthError::invalid_grant(
            "refresh token reuse detected; grant revoked",
        ));
    }
    // §6: the requested scope must not exceed the original grant.
    if let (Some(requested), Some(original)) = (requested_scope, grant.scope.as_deref()) {
        if !requested
            .split(' ')
            .all(|s| original.split(' ').any(|o| o == s))
        {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "requested scope exceeds the original grant",
            ));
        }
    }
    let scope = requested_scope
        .map(str::to_owned)
        .or_else(|| grant.scope.clone());

    let refresh = if opts.rotate_refresh_tokens {
        let new = state.new_refresh_token(id);
        if let Some(entry) = state.refresh_tokens.get_mut(presented) {
            entry.retired = true;
            entry.rotated = Some((Instant::now(), new.clone()));
        }
        let grant = state
            .grants
            .get_mut(&id)
            .expect("grant of a known refresh token");
        grant.rotations += 1;
        let rotation = grant.rotations;
        state.stats.rotations += 1;
        tracing::info!(
            grant = id,
            rotation,
            "demo auth server: rotated refresh token for grant {id} (rotation {rotation})"
        );
        new
    } else {
        presented.to_owned()
    };
    if opts.profile == ProviderProfile::Bitrix24 {
        // "Both [the refresh token] and the jointly issued access_token become invalid."
        let now = Instant::now();
        for entry in state.access_tokens.values_mut().filter(|e| e.grant == id) {
            entry.expires_at = entry.expires_at.min(now);
        }
    }
    Ok(token_body(opts, state, id, Some(refresh), scope.as_deref()))
}

fn code_grant(
    opts: &AuthServerOptions,
    state: &mut State,
    params: &[(String, String)],
    requested_scope: Option<&str>,
) -> Result<Value, OAuthError> {
    let code = param(params, "code").ok_or_else(|| OAuthError::invalid_request("missing code"))?;
    let Some(entry) = state.codes.get(code) else {
        return Err(OAuthError::invalid_grant(CODE_UNUSABLE));
    };
    if let Some(earlier) = entry.redeemed_by {
        // §4.1.2: a code used twice SHOULD revoke the tokens issued for it.
        state.revoke(earlier);
        tracing::warn!(
            grant = earlier,
            "demo auth server: authorization code reused; revoked grant {earlier}"
        );
        return Err(OAuthError::invalid_grant(CODE_UNUSABLE));
    }
    if entry.expires_at <= Instant::now() {
        return Err(OAuthError::invalid_grant(CODE_UNUSABLE));
    }
    // §4.1.3: redirect_uri is required and must be identical when the authorization
    // request carried one (ours always do). A mismatch does not consume the code.
    if param(params, "redirect_uri") != Some(entry.redirect_uri.as_str()) {
        return Err(OAuthError::invalid_grant(
            "redirect_uri does not match the authorization request",
        ));
    }
    let scope = entry
        .scope
        .clone()
        .or_else(|| requested_scope.map(str::to_owned));
    let id = state.new_grant(scope.clone());
    if let Some(entry) = state.codes.get_mut(code) {
        entry.redeemed_by = Some(id);
    }
    tracing::info!(
        grant = id,
        "demo auth server: authorization code exchanged for grant {id}"
    );
    if opts.profile == ProviderProfile::YooMoney {
        // Only a long-lived access token: three years stands in for "until revoked".
        let access_token = state.new_access_token(id, Duration::from_secs(3 * 365 * 86400));
        return Ok(json!({ "access_token": access_token }));
    }
    let refresh = state.new_refresh_token(id);
    Ok(token_body(opts, state, id, Some(refresh), scope.as_deref()))
}

/// Replaces (or, for `null`, removes) the fields of `body` named in `patch`.
fn apply_patch(body: &mut Value, patch: serde_json::Map<String, Value>) {
    let Some(fields) = body.as_object_mut() else {
        return;
    };
    for (name, value) in patch {
        if value.is_null() {
            fields.remove(&name);
        } else {
            fields.insert(name, value);
        }
    }
}

/// Issues an access token on grant `id` and builds the §5.1 success body.
fn token_body(
    opts: &AuthServerOptions,
    state: &mut State,
    id: u64,
    refresh_token: Option<String>,
    scope: Option<&str>,
) -> Value {
    let access_token = state.new_access_token(id, opts.access_ttl);
    let mut body = json!({"access_token": access_token, "token_type": "Bearer"});
    if !opts.omit_expires_in {
        body["expires_in"] = json!(opts.access_ttl.as_secs());
    }
    if let Some(refresh_token) = refresh_token {
        body["refresh_token"] = json!(refresh_token);
    }
    if let Some(scope) = scope {
        body["scope"] = json!(scope);
    }
    body
}

/// Checks the client's credentials (RFC 6749 §2.3.1, RFC 7523 §3, RFC 8705 §2).
fn authenticate_client(
    shared: &Shared,
    state: &mut State,
    parts: &Parts,
    params: &[(String, String)],
) -> Result<(), OAuthError> {
    let (opts, headers) = (&shared.opts, &parts.headers);
    if param(params, "client_assertion").is_some()
        || param(params, "client_assertion_type").is_some()
    {
        return authenticate_assertion(shared, state, parts, params);
    }
    let body_id = param(params, "client_id");
    if opts.tls_client_auth
        && parts.extensions.get::<PeerCertificate>().is_some()
        && headers.get(header::AUTHORIZATION).is_none()
        && param(params, "client_secret").is_none()
    {
        // The TLS verifier required and accepted the certificate; it stands for the client.
        return if body_id == Some(opts.client_id.as_str()) {
            Ok(())
        } else {
            Err(OAuthError::invalid_client(false))
        };
    }
    let body_secret = param(params, "client_secret");
    let Some(authorization) = headers.get(header::AUTHORIZATION) else {
        return match (body_id, body_secret) {
            (Some(id), Some(secret)) if id == opts.client_id && secret == opts.client_secret => {
                Ok(())
            }
            _ => Err(OAuthError::invalid_client(false)),
        };
    };
    // §2.3: "The client MUST NOT use more than one authentication method in each request."
    if body_secret.is_some() {
        return Err(OAuthError::invalid_request(
            "more than one client authentication method",
        ));
    }
    let (id, secret) = decode_basic(authorization).ok_or(OAuthError::invalid_client(true))?;
    if body_id.is_some_and(|body_id| body_id != id) {
        return Err(OAuthError::invalid_request(
            "client_id in body differs from the authenticated client",
        ));
    }
    if id == opts.client_id && secret == opts.client_secret {
        Ok(())
    } else {
        Err(OAuthError::invalid_client(true))
    }
}

/// A client assertion: one method only, the right type, verified, naming the client.
fn authenticate_assertion(
    shared: &Shared,
    state: &mut State,
    parts: &Parts,
    params: &[(String, String)],
) -> Result<(), OAuthError> {
    if parts.headers.get(header::AUTHORIZATION).is_some()
        || param(params, "client_secret").is_some()
    {
        return Err(OAuthError::invalid_request(
            "more than one client authentication method",
        ));
    }
    if param(params, "client_assertion_type") != Some(CLIENT_ASSERTION_TYPE) {
        return Err(OAuthError::invalid_request(
            "unsupported client_assertion_type",
        ));
    }
    let assertion = param(params, "client_assertion")
        .ok_or_else(|| OAuthError::invalid_request("missing client_assertion"))?;
    let opts = &shared.opts;
    let refuse = |why: String| {
        tracing::debug!(reason = %why, "demo auth server: client assertion refused");
        let mut e = OAuthError::invalid_client(false);
        e.description = why;
        e
    };
    let verified = assertions::verify(
        assertion,
        &shared.client_keys,
        Some(&opts.client_secret),
        &shared.audience,
        &mut state.replay,
    )
    .map_err(refuse)?;
    let claim = |n: &str| verified.claims.get(n).and_then(Value::as_str);
    if claim("iss") != Some(opts.client_id.as_str())
        || claim("sub") != Some(opts.client_id.as_str())
    {
        return Err(refuse("iss and sub must be the client_id".into()));
    }
    if param(params, "client_id").is_some_and(|id| id != opts.client_id) {
        return Err(OAuthError::invalid_request(
            "client_id differs from the assertion's subject",
        ));
    }
    state.verified.push(verified.summary);
    Ok(())
}

/// Decodes `Basic base64(urlencode(id) ":" urlencode(secret))`. §2.3.1 requires the
/// form-urlencoding, so a client that skips it fails for ids or secrets with
/// reserved characters, as it would against a strict provider.
fn decode_basic(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_urldecode(id)?, form_urldecode(secret)?))
}

/// Strict `application/x-www-form-urlencoded` decoding of one component: `+` is a
/// space, `%XX` a byte; a malformed escape or non-UTF-8 result is an error.
fn form_urldecode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// 32 random bytes, base64url: shaped like the opaque tokens real providers issue.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `GET /oauth2/authorize`: a consent page, or with `auto=1` an immediate approval.
fn authorize_endpoint(shared: &Shared, query: &str) -> Response<Body> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    // §4.1.2.1: with a bad client or redirect URI the user must not be redirected.
    if param(&params, "client_id") != Some(shared.opts.client_id.as_str()) {
        return html(StatusCode::BAD_REQUEST, "<p>Unknown client_id.</p>");
    }
    let redirect_uri = param(&params, "redirect_uri").unwrap_or("");
    let Some(redirect) = url::Url::parse(redirect_uri)
        .ok()
        .filter(|uri| matches!(uri.scheme(), "http" | "https"))
    else {
        return html(
            StatusCode::BAD_REQUEST,
            "<p>Missing or invalid redirect_uri.</p>",
        );
    };
    let state = param(&params, "state");
    let flag = |name: &str| matches!(param(&params, name), Some("1" | "true" | "yes"));

    let redirect_with = |pairs: &[(&str, &str)]| {
        let mut target = redirect.clone();
        {
            let mut query = target.query_pairs_mut();
            for (name, value) in pairs {
                query.append_pair(name, value);
            }
            if let Some(state) = state {
                query.append_pair("state", state);
            }
        }
        let mut resp = Response::new(full(""));
        *resp.status_mut() = StatusCode::FOUND;
        no_store(resp.headers_mut());
        match HeaderValue::from_str(target.as_str()) {
            Ok(location) => {
                resp.headers_mut().insert(header::LOCATION, location);
                resp
            }
            Err(_) => html(StatusCode::BAD_REQUEST, "<p>Invalid redirect_uri.</p>"),
        }
    };

    if param(&params, "response_type") != Some("code") {
        return redirect_with(&[("error", "unsupported_response_type")]);
    }
    if flag("deny") {
        return redirect_with(&[("error", "access_denied")]);
    }
    if flag("auto") {
        let scope = param(&params, "scope").map(str::to_owned);
        // Bind the code to the URI exactly as sent (not the parsed, normalized form):
        // the token request must repeat it byte for byte.
        let code = shared.lock().new_code(redirect_uri, scope);
        return redirect_with(&[("code", &code)]);
    }

    // The consent page links back here with auto=1 (approve) or deny=1.
    let approve = format!("{AUTHORIZE_PATH}?{query}&auto=1");
    let deny = format!("{AUTHORIZE_PATH}?{query}&deny=1");
    let scope = param(&params, "scope").unwrap_or("(default)");
    html(
        StatusCode::OK,
        &format!(
            "<h1>tokenrelay demo authorization server</h1>\n\
             <p>Client <b>{client}</b> asks for access (scope: {scope}).</p>\n\
             <p>You will be sent back to <code>{redirect}</code>.</p>\n\
             <p><a href=\"{approve}\">Approve</a> &middot; <a href=\"{deny}\">Deny</a></p>",
            client = esc(&shared.opts.client_id),
            scope = esc(scope),
            redirect = esc(redirect.as_str()),
            approve = esc(&approve),
            deny = esc(&deny),
        ),
    )
}

/// `s` escaped for HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html(status: StatusCode, content: &str) -> Response<Body> {
    let page = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\
         <title>tokenrelay demo</title></head>\n<body>\n{content}\n</body></html>\n"
    );
    let mut resp = Response::new(full(page));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    no_store(resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::super::test_client as client;
    use super::*;

    /// Posts a form with body client authentication (the default client).
    async fn post_form(server: &AuthServer, params: &[(&str, &str)]) -> reqwest::Response {
        let mut form = vec![
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ];
        form.extend_from_slice(params);
        client()
            .post(server.token_url())
            .form(&form)
            .send()
            .await
            .expect("token request")
    }

    async fn refresh(server: &AuthServer, refresh_token: &str) -> (StatusCode, Value) {
        let resp = post_form(
            server,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ],
        )
        .await;
        (resp.status(), resp.json().await.expect("JSON body"))
    }

    fn str_field<'a>(body: &'a Value, name: &str) -> &'a str {
        body[name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} in {body}"))
    }

    #[tokio::test]
    async fn rotation_and_reuse_detection() {
        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let rt1 = server.new_grant();

        let resp = post_form(
            &server,
            &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 60);
        assert!(body.get("scope").is_none());
        let access1 = str_field(&body, "access_token").to_owned();
        let rt2 = str_field(&body, "refresh_token").to_owned();
        assert_ne!(rt1, rt2);
        assert_eq!(access1.len(), 43, "32 bytes of base64url");
        assert!(server.is_valid_access_token(&access1));
        assert!(!server.is_valid_refresh_token(&rt1));
        assert!(server.is_valid_refresh_token(&rt2));

        let (status, body) = refresh(&server, &rt2).await;
        assert_eq!(status, 200);
        let rt3 = str_field(&body, "refresh_token").to_owned();

        // Presenting the retired rt1 again revokes the whole family.
        let (status, body) = refresh(&server, &rt1).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        assert_eq!(
            body["error_description"],
            "refresh token reuse detected; grant revoked"
        );
        assert!(!server.is_valid_access_token(&access1));
        assert!(!server.is_valid_refresh_token(&rt3));
        let (status, body) = refresh(&server, &rt3).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");

        let (status, _) = refresh(&server, "never-issued").await;
        assert_eq!(status, 400);

        let stats = server.stats();
        assert_eq!(stats.refreshes, 5);
        assert_eq!(stats.rotations, 2);
        assert_eq!(stats.refresh_reuse_detected, 1);
        assert_eq!(stats.invalid_grant, 3);
        assert_eq!(stats.issued, 2);
        assert_eq!(stats.token_requests, 5);

        // Other grants are unaffected.
        let other = server.new_grant();
        assert_eq!(refresh(&server, &other).await.0, 200);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_refreshes_with_one_token_spend_it_once() {
        let server = Arc::new(
            AuthServer::start(AuthServerOptions::default())
                .await
                .unwrap(),
        );
        let rt = server.new_grant();
        let attempts: Vec<_> = (0..8)
            .map(|_| {
                let (server, rt) = (Arc::clone(&server), rt.clone());
                tokio::spawn(async move { refresh(&server, &rt).await.0 })
            })
            .collect();
        let mut successes = 0;
        for attempt in attempts {
            if attempt.await.unwrap() == StatusCode::OK {
                successes += 1;
            }
        }
        // Exactly one caller wins; the others double-spend and get the grant revoked.
        assert_eq!(successes, 1);
        let stats = server.stats();
        assert_eq!(stats.rotations, 1);
        assert!(stats.refresh_reuse_detected >= 1);
        assert_eq!(stats.invalid_grant, 7);
    }

    #[tokio::test]
    async fn without_rotation_the_refresh_token_stays_valid() {
        let server = AuthServer::start(AuthServerOptions {
            rotate_refresh_tokens: false,
            ..Default::default()
        })
        .await
        .unwrap();
        let rt = server.new_grant();
        for _ in 0..3 {
            let (status, body) = refresh(&server, &rt).await;
            assert_eq!(status, 200);
            assert_eq!(body["refresh_token"], rt.as_str());
        }
        assert_eq!(server.stats().rotations, 0);
        assert_eq!(server.stats().refresh_reuse_detected, 0);
        assert!(server.is_valid_refresh_token(&rt));
    }

    #[tokio::test]
    async fn authorization_code_is_single_use() {
        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let redirect_uri = "http://127.0.0.1:9999/callback";
        let code = server.new_authorization_code(redirect_uri);
        let exchange = |redirect: &'static str| {
            let code = code.clone();
            let server = &server;
            async move {
                let resp = post_form(
                    server,
                    &[
                        ("grant_type", "authorization_code"),
                        ("code", &code),
                        ("redirect_uri", redirect),
                    ],
                )
                .await;
                (resp.status(), resp.json::<Value>().await.unwrap())
            }
        };

        // A mismatching redirect_uri is refused without consuming the code.
        let (status, body) = exchange("http://127.0.0.1:9999/other").await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");

        let (status, body) = exchange("http://127.0.0.1:9999/callback").await;
        assert_eq!(status, 200);
        let access = str_field(&body, "access_token").to_owned();
        let refresh_token = str_field(&body, "refresh_token").to_owned();
        assert!(server.is_valid_access_token(&access));

        let (status, body) = exchange("http://127.0.0.1:9999/callback").await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        assert_eq!(body["error_description"], CODE_UNUSABLE);
        // RFC 6749 §4.1.2: reuse revokes what the code produced.
        assert!(!server.is_valid_access_token(&access));
        assert!(!server.is_valid_refresh_token(&refresh_token));

        let expired = server.new_authorization_code(redirect_uri);
        server.expire_authorization_code(&expired);
        let resp = post_form(
            &server,
            &[
                ("grant_type", "authorization_code"),
                ("code", &expired),
                ("redirect_uri", redirect_uri),
            ],
        )
        .await;
        assert_eq!(resp.status(), 400);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error_description"], CODE_UNUSABLE);
        assert_eq!(server.stats().authorization_codes, 4);
        assert_eq!(server.stats().invalid_grant, 3);
    }

    #[tokio::test]
    async fn basic_and_body_client_authentication() {
        let secret = "s3cr:t&x=y+%z é";
        let server = AuthServer::start(AuthServerOptions {
            client_secret: secret.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let form = [
            ("grant_type", "client_credentials"),
            ("scope", "leads:read"),
        ];

        // RFC 6749 §2.3.1: form-urlencode id and secret, then base64.
        let encoded: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let credentials = STANDARD.encode(format!("demo-client:{encoded}"));
        let resp = client()
            .post(server.token_url())
            .header("authorization", format!("Basic {credentials}"))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["scope"], "leads:read");
        assert!(body.get("refresh_token").is_none());

        // Without the urlencoding step the secret does not survive.
        let resp = client()
            .post(server.token_url())
            .basic_auth("demo-client", Some(secret))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers().contains_key("www-authenticate"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client");

        // Body authentication; form encoding is reqwest's job here.
        let mut with_secret = form.to_vec();
        with_secret.extend([("client_id", "demo-client"), ("client_secret", secret)]);
        let resp = client()
            .post(server.token_url())
            .form(&with_secret)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);

        let mut wrong = form.to_vec();
        wrong.extend([("client_id", "demo-client"), ("client_secret", "nope")]);
        let resp = client()
            .post(server.token_url())
            .form(&wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert!(!resp.headers().contains_key("www-authenticate"));

        // Two methods at once is a protocol error (§2.3).
        let resp = client()
            .post(server.token_url())
            .header("authorization", format!("Basic {credentials}"))
            .form(&with_secret)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);

        let log = server.requests_log();
        assert_eq!(log.len(), 5);
        assert_eq!(log[0].client_auth, "basic");
        assert!(log[0].has_header("Authorization"));
        assert_eq!(log[0].param("client_secret"), None);
        assert_eq!(log[0].param("scope"), Some("leads:read"));
        assert_eq!(log[0].content_type, "form");
        assert_eq!(log[0].status, 200);
        assert_eq!(log[1].error.as_deref(), Some("invalid_client"));
        assert_eq!(log[2].client_auth, "body");
        assert_eq!(log[2].param("client_secret"), Some(REDACTED));
        assert_eq!(log[2].grant_type, "client_credentials");
        assert!(!log[2].has_header("authorization"));
        let stats = server.stats();
        assert_eq!(stats.invalid_client, 2);
        assert_eq!(stats.client_credentials, 5);
    }

    #[tokio::test]
    async fn json_bodies_are_accepted_and_recorded() {
        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let rt = server.new_grant();
        let resp = client()
            .post(server.token_url())
            .json(&json!({
                "client_id": "demo-client",
                "client_secret": "demo-secret",
                "grant_type": "refresh_token",
                "refresh_token": rt,
                "redirect_uri": "https://example.com/cb",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert!(server.is_valid_refresh_token(str_field(&body, "refresh_token")));

        let log = server.requests_log();
        assert_eq!(log[0].content_type, "json");
        assert_eq!(log[0].param("refresh_token"), Some(REDACTED));
        assert_eq!(log[0].param("redirect_uri"), Some("https://example.com/cb"));

        let resp = client()
            .post(server.token_url())
            .header("content-type", "text/plain")
            .body("grant_type=client_credentials")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(server.requests_log()[1].content_type, "text/plain");
    }

    #[tokio::test]
    async fn password_and_unsupported_grants() {
        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let resp = post_form(
            &server,
            &[
                ("grant_type", "password"),
                ("username", "demo-user"),
                ("password", "demo-password"),
            ],
        )
        .await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert!(server.is_valid_refresh_token(str_field(&body, "refresh_token")));

        let resp = post_form(
            &server,
            &[
                ("grant_type", "password"),
                ("username", "demo-user"),
                ("password", "wrong"),
            ],
        )
        .await;
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.json::<Value>().await.unwrap()["error"],
            "invalid_grant"
        );

        let resp = post_form(&server, &[("grant_type", "urn:example:magic")]).await;
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.json::<Value>().await.unwrap()["error"],
            "unsupported_grant_type"
        );

        let resp = post_form(&server, &[]).await;
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.json::<Value>().await.unwrap()["error"],
            "invalid_request"
        );

        // Secrets in the URL are refused even when otherwise valid.
        let resp = client()
            .post(format!("{}?client_secret=demo-secret", server.token_url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "demo-client"),
                ("client_secret", "demo-secret"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(
            server.requests_log().last().unwrap().query_params,
            vec!["client_secret".to_owned()]
        );
        assert_eq!(server.stats().password, 2);
    }

    #[tokio::test]
    async fn failure_modes_do_not_consume_refresh_tokens() {
        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let rt = server.new_grant();
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.as_str()),
        ];

        server.set_mode(FailureMode::ServerError);
        let resp = post_form(&server, &form).await;
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], "server_error");

        server.set_mode(FailureMode::Garbage200);
        let resp = post_form(&server, &form).await;
        assert_eq!(resp.status(), 200);
        assert!(serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).is_err());

        server.set_mode(FailureMode::EmptyAccessToken);
        let resp = post_form(&server, &form).await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert!(body.get("access_token").is_none());

        server.set_mode(FailureMode::InvalidGrantAlways);
        assert_eq!(post_form(&server, &form).await.status(), 400);

        server.set_mode(FailureMode::Slow(Duration::from_millis(300)));
        let started = Instant::now();
        let (status, _) = refresh(&server, &rt).await;
        assert_eq!(status, 200);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(server.mode(), FailureMode::Slow(Duration::from_millis(300)));

        let stats = server.stats();
        assert_eq!(stats.refreshes, 5);
        assert_eq!(stats.rotations, 1);
        assert_eq!(stats.refresh_reuse_detected, 0);
        assert_eq!(stats.invalid_grant, 1);
    }

    #[tokio::test]
    async fn access_tokens_expire_and_revoke_all_kills_grants() {
        let server = AuthServer::start(AuthServerOptions {
            access_ttl: Duration::from_millis(300),
            omit_expires_in: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let rt = server.new_grant();
        let (status, body) = refresh(&server, &rt).await;
        assert_eq!(status, 200);
        assert!(body.get("expires_in").is_none());
        let access = str_field(&body, "access_token").to_owned();
        let rt2 = str_field(&body, "refresh_token").to_owned();
        let validator = server.validator();
        assert!(validator(&access));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!validator(&access));

        let (_, body) = refresh(&server, &rt2).await;
        let access = str_field(&body, "access_token").to_owned();
        let rt3 = str_field(&body, "refresh_token").to_owned();
        let static_token = server.new_access_token();
        assert!(server.is_valid_access_token(&static_token));
        server.revoke_all();
        assert!(!server.is_valid_access_token(&access));
        assert!(!server.is_valid_access_token(&static_token));
        let (status, body) = refresh(&server, &rt3).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "invalid_grant");
        assert_eq!(server.stats().refresh_reuse_detected, 0);
    }

    #[tokio::test]
    async fn authorize_endpoint_redirects_with_a_code() {
        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let redirect_uri = "http://127.0.0.1:8765/callback";
        let query = |extra: &[(&str, &str)]| {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("client_id", "demo-client")
                .append_pair("redirect_uri", redirect_uri)
                .append_pair("state", "xyz <&>")
                .append_pair("response_type", "code");
            for (name, value) in extra {
                q.append_pair(name, value);
            }
            format!("{}?{}", server.authorize_url(), q.finish())
        };

        let resp = client().get(query(&[])).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let page = resp.text().await.unwrap();
        assert!(page.contains("Approve") && page.contains("auto=1"));
        assert!(!page.contains("xyz <&>"), "state must be escaped");

        let resp = client().get(query(&[("auto", "1")])).send().await.unwrap();
        assert_eq!(resp.status(), 302);
        let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
        assert!(location.as_str().starts_with(redirect_uri));
        let pairs: HashMap<_, _> = location.query_pairs().into_owned().collect();
        assert_eq!(pairs["state"], "xyz <&>");
        let resp = post_form(
            &server,
            &[
                ("grant_type", "authorization_code"),
                ("code", &pairs["code"]),
                ("redirect_uri", redirect_uri),
            ],
        )
        .await;
        assert_eq!(resp.status(), 200);

        let resp = client().get(query(&[("deny", "1")])).send().await.unwrap();
        assert_eq!(resp.status(), 302);
        assert!(resp.headers()["location"]
            .to_str()
            .unwrap()
            .contains("error=access_denied"));

        let bad_client = query(&[]).replace("demo-client", "intruder");
        assert_eq!(client().get(bad_client).send().await.unwrap().status(), 400);
        let resp = client().post(server.authorize_url()).send().await.unwrap();
        assert_eq!(resp.status(), 405);
    }

    #[tokio::test]
    async fn shutdown_frees_the_port_and_drop_stops_the_server() {
        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let url = server.token_url();
        let http = client();
        assert_eq!(http.get(&url).send().await.unwrap().status(), 405);
        server.shutdown().await;
        // The pooled keep-alive connection was closed too.
        assert!(http.get(&url).send().await.is_err());

        let server = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let url = server.token_url();
        drop(server);
        tokio::task::yield_now().await;
        assert!(client().get(&url).send().await.is_err());
    }

    #[test]
    fn form_urldecode_is_strict() {
        assert_eq!(form_urldecode("a+b%3A%25").as_deref(), Some("a b:%"));
        assert_eq!(form_urldecode("50%"), None);
        assert_eq!(form_urldecode("%zz"), None);
        assert_eq!(form_urldecode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(form_urldecode("%C3"), None);
    }

    #[test]
    fn options_debug_hides_secrets() {
        let debug = format!("{:?}", AuthServerOptions::default());
        assert!(!debug.contains("demo-secret") && !debug.contains("demo-password"));
        assert!(debug.contains("demo-client"));
    }

    #[test]
    fn esc_escapes_html_specials() {
        assert_eq!(
            esc(r#"<a href="x?a=1&b='2'">"#),
            "&lt;a href=&quot;x?a=1&amp;b=&#39;2&#39;&quot;&gt;"
        );
        assert_eq!(esc("plain é"), "plain é");
    }
}
