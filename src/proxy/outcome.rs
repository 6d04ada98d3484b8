//! How a request ends, for both engines: why it was not forwarded ([`ProxyError`]), the
//! status and small JSON body that says so (never a token), and [`Recorder::record`],
//! the one place that counts an answered request and writes its access-log line.

use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use tracing::{debug, info, warn};

use crate::config::url_template::Unresolved;
use crate::metrics::{UpstreamErrorKind, UpstreamMetrics};

/// Why a request was not (successfully) forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("CONNECT is not supported: this listener forwards only to its configured upstream")]
    Connect,
    #[error(
        "request for host {0:?} refused: this listener forwards only to its configured upstream"
    )]
    ForeignHost(String),
    #[error("unusable request target: {0}")]
    BadTarget(String),
    #[error("the request path climbs out of the upstream's base path with '..' segments")]
    PathEscape,
    #[error("the request carries its own Authorization header, which this listener is configured to reject")]
    InboundAuthorization,
    #[error("the request head is larger than limits.max_header_size ({0} bytes)")]
    HeadTooLarge(u64),
    #[error("the request body did not arrive within body_timeout")]
    BodyTimeout,
    #[error("a WebSocket handshake must not carry a body (Content-Length or Transfer-Encoding)")]
    HandshakeWithBody,
    #[error("the upstream answered the WebSocket handshake with a 101 switching to {0:?}, not to websocket")]
    SwitchedToOtherProtocol(String),
    /// No valid token (never forward without one).
    #[error("{0}")]
    NoToken(String),
    /// A templated upstream url (`{token.FIELD}`) whose field no token answer carried yet.
    #[error("{0}")]
    NoUpstreamUrl(Unresolved),
    /// A templated upstream url whose field does not make a usable url.
    #[error("{0}")]
    BadUpstreamUrl(Unresolved),
    #[error("upstream {kind} error: {1}", kind = kind_str(*.0))]
    Upstream(UpstreamErrorKind, String),
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("reading the request body failed: {0}")]
    BadRequestBody(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ForeignHost(_)
            | ProxyError::BadTarget(_)
            | ProxyError::PathEscape
            | ProxyError::InboundAuthorization
            | ProxyError::HandshakeWithBody
            | ProxyError::BadRequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoToken(_) | ProxyError::NoUpstreamUrl(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BadUpstreamUrl(_) | ProxyError::SwitchedToOtherProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Upstream(UpstreamErrorKind::Timeout, _) | ProxyError::Timeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Upstream(..) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The app's connection cannot carry another request after this answer.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::HeadTooLarge(_)
                | ProxyError::BodyTimeout
                | ProxyError::BadRequestBody(_)
                // Its body was never read.
                | ProxyError::HandshakeWithBody
        )
    }

    /// The error metric this counts under, if any.
    fn kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::Upstream(kind, _) => Some(*kind),
            ProxyError::Timeout => Some(UpstreamErrorKind::Timeout),
            ProxyError::SwitchedToOtherProtocol(_) => Some(UpstreamErrorKind::Other),
            _ => None,
        }
    }
}

fn kind_str(k: UpstreamErrorKind) -> &'static str {
    match k {
        UpstreamErrorKind::Connect => "connect",
        UpstreamErrorKind::Timeout => "timeout",
        UpstreamErrorKind::Tls => "tls",
        UpstreamErrorKind::Other => "protocol",
    }
}

/// One of our own answers: status, headers, JSON body.
pub struct Rendered {
    pub status: StatusCode,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
    pub body: String,
}

/// The one renderer of our own answers: `{"error", "upstream", "credential"}` as JSON,
/// `no-store`, a `Date`, and `Allow` for 405.
pub fn render(status: StatusCode, error: &str, upstream: &str, credential: &str) -> Rendered {
    let body =
        serde_json::json!({ "error": error, "upstream": upstream, "credential": credential })
            .to_string();
    let mut headers = vec![
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
        headers.push((header::DATE, date));
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.push((
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        ));
    }
    Rendered {
        status,
        headers,
        body,
    }
}

impl Rendered {
    /// As a hyper response.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body)));
        *resp.status_mut() = self.status;
        resp.headers_mut().extend(self.headers);
        resp
    }

    /// As raw HTTP/1.1 bytes (the fast path); `body` false for HEAD.
    pub fn write_to(&self, out: &mut Vec<u8>, close: bool, body: bool) {
        use std::io::Write;
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or("")
        );
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let _ = write!(out, "content-length: {}\r\n", self.body.len());
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if body {
            out.extend_from_slice(self.body.as_bytes());
        }
    }
}

/// Counts answered requests and writes the access log of one upstream.
pub struct Recorder {
    pub name: String,
    pub credential: String,
    pub metrics: UpstreamMetrics,
    pub access_log: bool,
    /// The last hour per minute, for the status page.
    pub rates: super::rates::Rates,
}

impl Recorder {
    /// Metrics and the access-log line of one answered request. The path comes without
    /// its query: query strings may carry app data.
    pub fn record(&self, method: &str, path: &str, status: u16, started: Instant) {
        self.record_until(method, path, status, started, Instant::now());
    }

    /// [`record`](Self::record) of a request answered at `now`, a time the caller has
    /// just read (the fast path reads the clock once for this and its next deadline).
    pub fn record_until(
        &self,
        method: &str,
        path: &str,
        status: u16,
        started: Instant,
        now: Instant,
    ) {
        let elapsed = now.saturating_duration_since(started);
        self.metrics.count(status);
        self.rates.count(status, started);
        self.metrics.duration.observe(elapsed.as_secs_f64());
        if self.access_log {
            info!(target: "tokenrelay::access", upstream = %self.name, method, path,
                status, duration_ms = elapsed.as_secs_f64() * 1e3, "request");
        }
    }

    /// Counts and logs a request that was not (successfully) forwarded, and renders
    /// the answer.
    pub fn refuse(&self, e: &ProxyError) -> Rendered {
        if e.status().is_server_error() {
            self.rates.count_own_5xx(Instant::now());
        }
        if let Some(kind) = e.kind() {
            self.metrics.error(kind);
        }
        if let ProxyError::NoToken(_)
        | ProxyError::NoUpstreamUrl(_)
        | ProxyError::BadUpstreamUrl(_) = e
        {
            // The refresher (or the credential, for an unresolved url) already logs why;
            // one line per refused request would flood the log during an outage.
            debug!(upstream = %self.name, error = %e, "request refused: no valid token or upstream url");
        } else {
            warn!(upstream = %self.name, status = e.status().as_u16(), error = %e, "request not forwarded");
        }
        render(e.status(), &e.to_string(), &self.name, &self.credential)
    }

    /// A response body cut short after its head was sent (the app sees it truncated).
    pub fn body_cut(&self, kind: UpstreamErrorKind, why: &str) {
        self.metrics.error(kind);
        warn!(upstream = %self.name, reason = why, "upstream response body cut short");
    }
}
