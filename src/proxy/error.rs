//! Responses tokenrelay makes itself: small JSON bodies naming the upstream and
//! credential, never a token.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

use crate::metrics::UpstreamErrorKind;

/// Why a request was not (successfully) forwarded.
#[derive(Debug)]
pub enum ProxyError {
    /// `CONNECT` is refused: a listener is not a general proxy.
    Connect,
    /// Absolute-form request for a host other than the upstream.
    ForeignHost(String),
    /// The app sent its own Authorization under `inbound_authorization: reject`.
    InboundAuthorization,
    /// No valid token (never forward without one).
    NoToken(String),
    /// Upstream connect/TLS/protocol failure.
    Upstream(UpstreamErrorKind, String),
    /// No response headers within `timeout`.
    Timeout,
    /// Reading the app's request body failed.
    BadRequestBody(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ForeignHost(_)
            | ProxyError::InboundAuthorization
            | ProxyError::BadRequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoToken(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(UpstreamErrorKind::Timeout, _) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(..) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::Connect => "CONNECT is not supported: this listener forwards only to its configured upstream".into(),
            ProxyError::ForeignHost(h) => format!("request for host {h:?} refused: this listener forwards only to its configured upstream"),
            ProxyError::InboundAuthorization => "the request carries its own Authorization header, which this listener is configured to reject".into(),
            ProxyError::NoToken(why) => why.clone(),
            ProxyError::Upstream(kind, why) => format!("upstream {} error: {why}", kind_str(*kind)),
            ProxyError::Timeout => "upstream did not answer in time".into(),
            ProxyError::BadRequestBody(why) => format!("reading the request body failed: {why}"),
        }
    }

    /// The JSON response for this error.
    pub fn into_response(&self, upstream: &str, credential: &str) -> Response<Full<Bytes>> {
        json_response(self.status(), &self.message(), upstream, credential)
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

/// `{"error": ..., "upstream": ..., "credential": ...}`.
pub fn json_body(error: &str, upstream: &str, credential: &str) -> String {
    serde_json::json!({ "error": error, "upstream": upstream, "credential": credential })
        .to_string()
}

/// [`json_body`] as a response with the given status.
pub fn json_response(
    status: StatusCode,
    error: &str,
    upstream: &str,
    credential: &str,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(json_body(
        error, upstream, credential,
    ))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(
            header::ALLOW,
            header::HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    }
    resp
}
