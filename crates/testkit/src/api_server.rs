//! A demo upstream API for tests and `tokenrelay demo`.
//!
//! With a validator (usually [`AuthServer::validator`](super::AuthServer::validator)),
//! every request must carry `Authorization: Bearer <token>` with an acceptable token,
//! otherwise it gets `401` and a `WWW-Authenticate: Bearer` challenge (RFC 6750 §3).
//!
//! Routes (any method; each may also be reached under a leading `/v1`, e.g.
//! `/v1/echo`, to test upstream base paths):
//!
//! | route | answer |
//! |---|---|
//! | `/echo` | JSON `{"method","path","query","version","headers":{name:[values]},"body_len","body"}` (`body` only for UTF-8 bodies under 64 KiB) |
//! | `/stream-echo` | the request body streamed back chunk by chunk (`application/octet-stream`) |
//! | `/bytes/{n}` | `n` bytes of [`pattern_byte`], chunked transfer encoding, 16 KiB chunks |
//! | `/sleep/{ms}` | `200 slept` after `ms` milliseconds |
//! | `/status/{code}` | that status (200–599) with a small JSON body |
//! | `/redirect` | `302` to this server's `/echo?from=redirect`, with `Content-Location` |
//! | `/moved` | `301` to this server's `/echo` with the request's query kept (as a server that adds a trailing slash does), `Content-Location` the same |
//! | `/hop` | `200` with hop-by-hop response headers a proxy must strip |
//! | `/api/v4/leads` | a JSON list of three CRM leads (for the demo) |
//! | anything else | `404` JSON |
//!
//! The server logs nothing about requests, so no token can leak through it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use super::{full, json_response, Body, BoxError, Server, TokenValidator};

/// Bodies up to this size are echoed back in `/echo`'s `body` field.
const ECHO_BODY_LIMIT: usize = 64 * 1024;
/// Chunk size of `/bytes/{n}`.
const PATTERN_CHUNK: u64 = 16 * 1024;

/// Byte `i` of the deterministic stream served by `/bytes/{n}`: `(i * 31 + 7) % 251`.
///
/// 251 is prime, so the pattern only repeats every 251 bytes and a dropped, duplicated
/// or reordered 16 KiB chunk is detectable.
pub fn pattern_byte(i: u64) -> u8 {
    // Reduce first so that the multiplication cannot overflow for any `i`.
    (((i % 251) * 31 + 7) % 251) as u8
}

/// Counters of a running [`ApiServer`] (a snapshot, see [`ApiServer::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiStats {
    /// Requests received.
    pub requests: u64,
    /// Requests let through: they carried an acceptable token, or no validator is set.
    pub authorized: u64,
    /// Requests answered `401` for a missing or unacceptable token.
    pub unauthorized: u64,
}

/// The head of a request as received, see [`ApiServer::last_request`].
///
/// It includes the `Authorization` header verbatim, so treat it as secret outside tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path and query as received, e.g. `/v1/echo?a=1`.
    pub uri: String,
    /// Headers in the order received; names lowercase, values lossily UTF-8.
    pub headers: Vec<(String, String)>,
}

/// A running demo upstream API. Dropping it stops the server abruptly;
/// [`ApiServer::shutdown`] lets in-flight requests finish first.
pub struct ApiServer {
    shared: Arc<Shared>,
    server: Server,
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.server.addr)
            .field("checks_tokens", &self.shared.validator.is_some())
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1. With `None` every request is
    /// accepted without looking at its credentials.
    pub async fn start(validator: Option<TokenValidator>) -> io::Result<ApiServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), validator).await
    }

    /// Starts a server on `addr` (port 0 picks a free port).
    pub async fn start_on(
        addr: SocketAddr,
        validator: Option<TokenValidator>,
    ) -> io::Result<ApiServer> {
        Self::start_with(addr, validator, None).await
    }

    /// Starts an https server on an ephemeral port of 127.0.0.1 with `tls` (whose
    /// client-certificate verifier decides who may connect).
    pub async fn start_tls(
        validator: Option<TokenValidator>,
        tls: rustls::ServerConfig,
    ) -> io::Result<ApiServer> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_with(addr, validator, Some(Arc::new(tls))).await
    }

    /// Starts a server that takes the token only from the query parameter `param`, as
    /// Bitrix24's REST API documents (`/rest/profile.json?auth=TOKEN`); an Authorization
    /// header is ignored.
    pub async fn start_with_query_token(
        validator: TokenValidator,
        param: &'static str,
    ) -> io::Result<ApiServer> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_inner(addr, Some(validator), None, Some(param)).await
    }

    async fn start_with(
        addr: SocketAddr,
        validator: Option<TokenValidator>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<ApiServer> {
        Self::start_inner(addr, validator, tls, None).await
    }

    async fn start_inner(
        addr: SocketAddr,
        validator: Option<TokenValidator>,
        tls: Option<Arc<rustls::ServerConfig>>,
        token_param: Option<&'static str>,
    ) -> io::Result<ApiServer> {
        let listener = TcpListener::bind(addr).await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let origin = format!("{scheme}://{}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            validator,
            token_param,
            origin,
            record: Mutex::default(),
        });
        let handler_shared = Arc::clone(&shared);
        let server = Server::start(listener, tls, move |req| {
            handle(Arc::clone(&handler_shared), req)
        })?;
        tracing::info!(addr = %server.addr, "demo API server: listening");
        Ok(ApiServer { shared, server })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://ADDR`, the base URL to configure as an upstream.
    pub fn url(&self) -> String {
        self.shared.origin.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ApiStats {
        self.shared.lock().stats.clone()
    }

    /// Headers of the most recent request (empty before the first one), including
    /// `Authorization` verbatim: for tests of what a proxy forwards.
    pub fn last_request_headers(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .last
            .as_ref()
            .map(|r| r.headers.clone())
            .unwrap_or_default()
    }

    /// Method, path and headers of the most recent request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.lock().last.clone()
    }

    /// Stops accepting, lets in-flight requests finish (up to two seconds) and closes
    /// all connections.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

struct Shared {
    validator: Option<TokenValidator>,
    /// Where the token is taken from: this query parameter, or else the bearer header.
    token_param: Option<&'static str>,
    /// `http://ADDR`, for the absolute URLs of `/redirect`.
    origin: String,
    record: Mutex<Record>,
}

#[derive(Default)]
struct Record {
    stats: ApiStats,
    last: Option<RecordedRequest>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Record> {
        // A panicking test thread must not poison the server for the others.
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a request was refused.
enum AuthFailure {
    Missing,
    Invalid,
}

/// Extracts the bearer token; `Err` if there is none or it is malformed.
fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthFailure::Missing)?;
    if values.next().is_some() {
        // Two credentials: ambiguous, refuse rather than pick one.
        return Err(AuthFailure::Invalid);
    }
    let value = value.to_str().map_err(|_| AuthFailure::Invalid)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::Invalid)?;
    // RFC 9110 §11.1: the auth scheme is case-insensitive.
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthFailure::Invalid);
    }
    Ok(token.trim())
}

/// The token in query parameter `param`; `Err` if there is none, or more than one.
fn query_token(query: Option<&str>, param: &str) -> Result<String, AuthFailure> {
    let mut values = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(name, _)| name == param)
        .map(|(_, value)| value.into_owned());
    let token = values.next().ok_or(AuthFailure::Missing)?;
    if values.next().is_some() || token.is_empty() {
        return Err(AuthFailure::Invalid);
    }
    Ok(token)
}

fn unauthorized(failure: AuthFailure) -> Response<Body> {
    // RFC 6750 §3.1: no error code when the request carried no credentials at all.
    let (challenge, description) = match failure {
        AuthFailure::Missing => ("Bearer realm=\"tokenrelay-demo\"", "missing bearer token"),
        AuthFailure::Invalid => (
            "Bearer error=\"invalid_token\"",
            "the access token is invalid, expired or revoked",
        ),
    };
    let mut resp = json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"error": "invalid_token", "error_description": description}),
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    resp
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let recorded = RecordedRequest {
        method: req.method().to_string(),
        uri: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: req
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    {
        let mut record = shared.lock();
        record.stats.requests += 1;
        record.last = Some(recorded);
    }

    if let Some(validator) = &shared.validator {
        // The validator may take the auth server's lock: call it without ours.
        let token = match shared.token_param {
            Some(param) => query_token(req.uri().query(), param),
            None => bearer_token(req.headers()).map(str::to_owned),
        };
        let verdict = token.and_then(|token| {
            if validator(&token) {
                Ok(())
            } else {
                Err(AuthFailure::Invalid)
            }
        });
        if let Err(failure) = verdict {
            shared.lock().stats.unauthorized += 1;
            return unauthorized(failure);
        }
    }
    shared.lock().stats.authorized += 1;

    route(&shared, req).await
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let full_path = req.uri().path().to_owned();
    // Optional base path, so tests can configure upstream URLs like http://host/v1.
    let path = match full_path.strip_prefix("/v1") {
        Some(rest) if rest.starts_with('/') => rest,
        _ => full_path.as_str(),
    };
    let (route, arg) = match path[1..].split_once('/') {
        Some((route, arg)) => (route, Some(arg)),
        None => (&path[1..], None),
    };
    match (route, arg) {
        ("echo", None) => echo(req).await,
        ("stream-echo", None) => stream_echo(req),
        ("bytes", Some(n)) => match n.parse() {
            Ok(n) => pattern_response(n),
            Err(_) => bad_request("n must be a non-negative integer"),
        },
        ("sleep", Some(ms)) => match ms.parse() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, "slept")
            }
            Err(_) => bad_request("ms must be a non-negative integer"),
        },
        ("status", Some(code)) => match code.parse().map(StatusCode::from_u16) {
            // Informational codes cannot be a final response.
            Ok(Ok(status)) if (200..=599).contains(&status.as_u16()) => status_response(status),
            _ => bad_request("code must be a status between 200 and 599"),
        },
        ("redirect", None) => redirect(shared),
        ("moved", None) => moved(shared, req.uri().query()),
        ("hop", None) => hop(),
        ("api", Some("v4/leads")) => leads(),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "path": full_path}),
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn bad_request(description: &str) -> Response<Body> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "bad_request", "error_description": description}),
    )
}

/// `/echo`: describes the request. The body is read frame by frame and only kept
/// while small, so large uploads are counted without being buffered.
async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let values = headers
            .entry(name.as_str())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(values) = values {
            values.push(Value::String(
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ));
        }
    }

    let mut body_len = 0usize;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) => return bad_request("request body could not be read"),
        };
        if let Some(data) = frame.data_ref() {
            body_len += data.len();
            if body_len < ECHO_BODY_LIMIT {
                kept.extend_from_slice(data);
            }
        }
    }
    let body_text = (body_len < ECHO_BODY_LIMIT)
        .then(|| String::from_utf8(kept).ok())
        .flatten();

    let mut value = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body_len,
    });
    if let Some(body_text) = body_text {
        value["body"] = Value::String(body_text);
    }
    json_response(StatusCode::OK, &value)
}

/// `/stream-echo`: the request body becomes the response body, frame by frame, so
/// memory stays flat whatever the upload size and the first bytes come back before the
/// upload ends.
fn stream_echo(req: Request<Incoming>) -> Response<Body> {
    let body = req.into_body().map_err(BoxError::from).boxed_unsync();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// `/bytes/{n}`.
fn pattern_response(len: u64) -> Response<Body> {
    let mut resp = Response::new(PatternBody { next: 0, end: len }.boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// Generates [`pattern_byte`]s lazily, one chunk per poll, so hyper's backpressure
/// applies and no response is ever held in memory whole.
struct PatternBody {
    next: u64,
    end: u64,
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.next >= this.end {
            return Poll::Ready(None);
        }
        let chunk_end = this.end.min(this.next + PATTERN_CHUNK);
        let chunk: Vec<u8> = (this.next..chunk_end).map(pattern_byte).collect();
        this.next = chunk_end;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.end
    }

    // `size_hint` is deliberately left unknown: without a known length hyper uses
    // chunked transfer encoding, which is what this route exists to exercise.
}

/// `/status/{code}`.
fn status_response(status: StatusCode) -> Response<Body> {
    // 204 and 304 must not have a body (RFC 9110 §15.3.5, §15.4.5).
    if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
        let mut resp = Response::new(full(""));
        *resp.status_mut() = status;
        return resp;
    }
    json_response(
        status,
        &json!({"status": status.as_u16(), "reason": status.canonical_reason()}),
    )
}

/// `/redirect`: absolute URLs on this server's own origin, which a proxy must
/// rewrite to its listener's address.
fn redirect(shared: &Shared) -> Response<Body> {
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::FOUND;
    let headers = resp.headers_mut();
    for (name, target) in [
        (
            header::LOCATION,
            format!("{}/echo?from=redirect", shared.origin),
        ),
        (header::CONTENT_LOCATION, format!("{}/echo", shared.origin)),
    ] {
        let value = HeaderValue::from_str(&target).expect("origin is a valid header value");
        headers.insert(name, value);
    }
    resp
}

/// `/moved`: a permanent redirect that keeps the query, whatever it carries (a token
/// in the query too), as servers that canonicalise a path do.
fn moved(shared: &Shared, query: Option<&str>) -> Response<Body> {
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
    let target = match query {
        Some(q) => format!("{}/echo?{q}", shared.origin),
        None => format!("{}/echo", shared.origin),
    };
    let value = HeaderValue::from_str(&target).expect("origin and query are valid header text");
    resp.headers_mut().insert(header::LOCATION, value.clone());
    resp.headers_mut().insert(header::CONTENT_LOCATION, value);
    resp
}

/// `/hop`: hop-by-hop headers (RFC 9110 §7.6.1), including one nominated by
/// `Connection`, next to an end-to-end header that must survive.
fn hop() -> Response<Body> {
    let mut resp = json_response(StatusCode::OK, &json!({"hop": true}));
    let headers = resp.headers_mut();
    for (name, value) in [
        ("connection", "X-Secret-Hop, keep-alive"),
        ("x-secret-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic"),
        ("x-normal", "yes"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    resp
}

/// `/api/v4/leads`: amoCRM-shaped sample data for `tokenrelay demo`.
fn leads() -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({
            "_page": 1,
            "_embedded": {
                "leads": [
                    {"id": 1001, "name": "Website redesign", "price": 12000,
                     "status_id": 142, "pipeline_id": 1, "responsible_user_id": 7},
                    {"id": 1002, "name": "Annual support contract", "price": 4800,
                     "status_id": 143, "pipeline_id": 1, "responsible_user_id": 7},
                    {"id": 1003, "name": "Mobile app pilot", "price": 25000,
                     "status_id": 142, "pipeline_id": 2, "responsible_user_id": 9}
                ]
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::super::{test_client as client, AuthServer, AuthServerOptions};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn pattern_matches_its_definition() {
        for i in [0u64, 1, 250, 251, 16_383, 16_384, 1 << 40, u64::MAX] {
            assert_eq!(u128::from(pattern_byte(i)), (u128::from(i) * 31 + 7) % 251);
        }
    }

    #[tokio::test]
    async fn validator_rejects_missing_and_bad_tokens() {
        let auth = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let api = ApiServer::start(Some(auth.validator())).await.unwrap();
        let echo = format!("{}/echo", api.url());

        let resp = client().get(&echo).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Bearer realm=\"tokenrelay-demo\""
        );
        assert_eq!(
            resp.json::<Value>().await.unwrap()["error"],
            "invalid_token"
        );

        let resp = client()
            .get(&echo)
            .bearer_auth("forged")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );

        let token = auth.new_access_token();
        let resp = client()
            .get(&echo)
            .header("authorization", format!("bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "the scheme is case-insensitive");

        auth.revoke_all();
        let resp = client()
            .get(&echo)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);

        assert_eq!(
            api.stats(),
            ApiStats {
                requests: 4,
                authorized: 1,
                unauthorized: 3
            }
        );
        let headers = api.last_request_headers();
        assert!(headers
            .iter()
            .any(|(name, value)| name == "authorization" && value.ends_with(&token)));
        api.shutdown().await;
    }

    #[tokio::test]
    async fn echo_describes_the_request() {
        let api = ApiServer::start(None).await.unwrap();
        let resp = client()
            .post(format!("{}/v1/echo?a=1&b=two", api.url()))
            .header("x-multi", "one")
            .header("x-multi", "two")
            .body("hello body")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["method"], "POST");
        assert_eq!(body["path"], "/v1/echo");
        assert_eq!(body["query"], "a=1&b=two");
        assert_eq!(body["headers"]["x-multi"], json!(["one", "two"]));
        assert_eq!(body["body_len"], 10);
        assert_eq!(body["body"], "hello body");
        assert_eq!(body["version"], "HTTP/1.1");

        // Large bodies are counted, not echoed.
        let big = vec![b'x'; 3 * ECHO_BODY_LIMIT];
        let resp = client()
            .put(format!("{}/echo", api.url()))
            .body(big)
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["body_len"], 3 * ECHO_BODY_LIMIT);
        assert!(body.get("body").is_none());
        assert!(body["query"].is_null());

        // HTTP/2 with prior knowledge is served too.
        let _ = client(); // installs the TLS provider reqwest insists on
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let resp = h2.get(format!("{}/echo", api.url())).send().await.unwrap();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["version"], "HTTP/2.0");

        let last = api.last_request().unwrap();
        assert_eq!(last.method, "GET");
        assert_eq!(last.uri, "/echo");
        assert_eq!(api.stats().authorized, 3);
    }

    #[tokio::test]
    async fn bytes_are_streamed_chunked() {
        let api = ApiServer::start(None).await.unwrap();
        let n = 5 * PATTERN_CHUNK + 123;
        let resp = client()
            .get(format!("{}/bytes/{n}", api.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("content-length").is_none());
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len() as u64, n);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(i as u64)));

        let resp = client()
            .get(format!("{}/v1/bytes/0", api.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn stream_echo_answers_before_the_upload_ends() {
        let api = ApiServer::start(None).await.unwrap();
        let mut conn = tokio::net::TcpStream::connect(api.addr()).await.unwrap();
        conn.write_all(
            b"POST /stream-echo HTTP/1.1\r\nHost: demo\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n",
        )
        .await
        .unwrap();
        // The first chunk must come back while the request body is still open.
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("hello") {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("echo of the first chunk before the upload ended")
                .unwrap();
            assert!(n > 0, "connection closed early");
            seen.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&seen).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"));
        assert!(head.contains("content-type: application/octet-stream"));
        conn.write_all(b"0\r\n\r\n").await.unwrap();

        // A larger body round-trips intact.
        let data: Vec<u8> = (0..1_000_000u64).map(pattern_byte).collect();
        let resp = client()
            .post(format!("{}/stream-echo", api.url()))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.bytes().await.unwrap(), data);
    }

    #[tokio::test]
    async fn status_sleep_redirect_hop_leads_and_not_found() {
        let api = ApiServer::start(None).await.unwrap();
        let get = |path: &str| client().get(format!("{}{path}", api.url())).send();

        let resp = get("/status/418").await.unwrap();
        assert_eq!(resp.status(), 418);
        assert_eq!(resp.json::<Value>().await.unwrap()["status"], 418);
        assert_eq!(get("/status/204").await.unwrap().status(), 204);
        assert_eq!(get("/status/101").await.unwrap().status(), 400);
        assert_eq!(get("/v1/status/503").await.unwrap().status(), 503);

        let started = std::time::Instant::now();
        let resp = get("/sleep/200").await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(resp.text().await.unwrap(), "slept");

        let resp = get("/redirect").await.unwrap();
        assert_eq!(resp.status(), 302);
        assert_eq!(
            resp.headers()["location"].to_str().unwrap(),
            format!("{}/echo?from=redirect", api.url())
        );
        assert_eq!(
            resp.headers()["content-location"].to_str().unwrap(),
            format!("{}/echo", api.url())
        );

        let resp = get("/hop").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-secret-hop"], "1");
        assert_eq!(resp.headers()["proxy-authenticate"], "Basic");
        assert_eq!(resp.headers()["x-normal"], "yes");
        assert_eq!(resp.headers()["connection"], "X-Secret-Hop, keep-alive");

        let resp = get("/api/v4/leads").await.unwrap();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["_embedded"]["leads"].as_array().unwrap().len(), 3);

        let resp = get("/nope").await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.json::<Value>().await.unwrap()["path"], "/nope");
        assert_eq!(get("/v1").await.unwrap().status(), 404);
        assert_eq!(get("/bytes/x").await.unwrap().status(), 400);
    }
}
