//! The pooled upstream HTTP client: hyper-util legacy client over hyper-rustls
//! (TLS 1.2+, verified, ALPN h2 and http/1.1).

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::UpstreamBody;
use crate::config::UpstreamConfig;
use crate::metrics::UpstreamErrorKind;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// Builds the client of one upstream.
pub fn build(config: &UpstreamConfig) -> Result<UpstreamClient, String> {
    // hyper-rustls sets ALPN (h2, http/1.1) itself from the enabled protocols.
    let tls = crate::tls::client_config(config.ca_file.as_deref(), &[])?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout.0));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    // Plain http only where the config explicitly allowed it (validated earlier).
    let https = if config.allow_insecure_http {
        builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http)
    } else {
        builder
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http)
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
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        if s.downcast_ref::<rustls::Error>().is_some() {
            tls = true;
        }
        // io::Error hides its inner error from `source()`; look inside.
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
            {
                tls = true;
            }
        }
        source = s.source();
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
