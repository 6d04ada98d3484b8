//! The pooled upstream HTTP client: hyper-util legacy client over hyper-rustls
//! (TLS 1.2+, verified; ALPN h2 and http/1.1 where the upstream sets `http2`).

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::UpstreamBody;
use super::egress::EgressConnector;
use crate::config::UpstreamConfig;
use crate::metrics::UpstreamErrorKind;

pub type UpstreamClient = Client<HttpsConnector<EgressConnector>, UpstreamBody>;

/// Builds the client of one upstream; `h2` false for the client that carries upgrades
/// (WebSocket needs an HTTP/1.1 connection). HTTP/2 is offered only where the upstream
/// asks for it.
pub fn build(config: &UpstreamConfig, h2: bool) -> Result<UpstreamClient, crate::tls::TlsError> {
    let h2 = h2 && config.http2;
    // hyper-rustls sets ALPN (h2, http/1.1) itself from the enabled protocols.
    let tls = crate::tls::client_config_with_cert(
        config.ca_file.as_deref(),
        &[],
        config.client_cert.as_ref().map(|c| &c.files),
    )?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout.0));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let http = EgressConnector::new(http);
    if let Some(proxy) = config.url.fixed().and_then(|u| http.proxy_for(u)) {
        tracing::info!(upstream = %config.name, %proxy, "upstream reached through an HTTP CONNECT proxy");
    }
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    // Plain http only where the config explicitly allowed it (validated earlier).
    let https = match (config.allow_insecure_http, h2) {
        (true, true) => builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
        (true, false) => builder.https_or_http().enable_http1().wrap_connector(http),
        (false, true) => builder
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
        (false, false) => builder.https_only().enable_http1().wrap_connector(http),
    };
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https))
}

/// Classifies a client error for metrics and the response status.
pub fn classify(e: &hyper_util::client::legacy::Error) -> (UpstreamErrorKind, String) {
    let mut tls = false;
    let mut detail = e.to_string();
    // Walk `source()` links, and also into io::Errors, which hide their inner error from
    // `source()` (hyper-rustls wraps rustls errors in two of them).
    let mut pending: Vec<&(dyn std::error::Error + 'static)> =
        std::error::Error::source(e).into_iter().collect();
    while let Some(err) = pending.pop() {
        detail = err.to_string();
        if err.downcast_ref::<rustls::Error>().is_some() {
            tls = true;
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            pending.push(inner);
        } else if let Some(next) = err.source() {
            pending.push(next);
        }
    }
    let kind = if tls {
        UpstreamErrorKind::Tls
    } else if e.is_connect() {
        if detail.contains("timed out") || detail.contains("timeout") {
            UpstreamErrorKind::Timeout
        } else {
            UpstreamErrorKind::Connect
        }
    } else {
        UpstreamErrorKind::Other
    };
    (kind, detail)
}
