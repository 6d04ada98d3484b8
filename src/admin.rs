//! The admin listener: `/healthz`, `/readyz`, `/status` (JSON), `/metrics` (Prometheus).
//! Nothing here ever includes a token or secret value.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::credential::Credential;
use crate::metrics::Metrics;
use crate::proxy::Upstream;

/// What the admin endpoints report on.
pub struct Admin {
    pub credentials: Vec<Arc<Credential>>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub metrics: Arc<Metrics>,
    pub store_kind: &'static str,
}

impl Admin {
    /// Routes one admin request.
    pub fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readyz(),
            "/status" => json(StatusCode::OK, &self.status()),
            "/metrics" => self.metrics(),
            "/" => html(&crate::status_page::render(&self.status())),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /status, /metrics, /healthz, /readyz\n",
            ),
        }
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        let not_ready: Vec<String> = self
            .credentials
            .iter()
            .filter(|c| {
                !matches!(
                    c.state(),
                    crate::credential::State::Ready | crate::credential::State::Degraded
                )
            })
            .map(|c| format!("{}: {}", c.name, c.state().as_str()))
            .collect();
        if not_ready.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {}\n", not_ready.join(", ")),
            )
        }
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let credentials: serde_json::Map<String, serde_json::Value> = self
            .credentials
            .iter()
            .map(|c| (c.name.clone(), c.status()))
            .collect();
        let upstreams: serde_json::Map<String, serde_json::Value> = self
            .upstreams
            .iter()
            .map(|u| {
                let counts = u.request_counts();
                (
                    u.config.name.clone(),
                    serde_json::json!({
                        "listen": u.listen.to_string(),
                        "url": u.config.url.as_str(),
                        "credential": u.config.credential,
                        "client_certificate": u.config.client_cert.as_ref().map(|c| c.status()),
                        "requests_total": counts.iter().map(|(_, n)| n).sum::<u64>(),
                        "requests": counts.iter().map(|(c, n)| (c.to_string(), serde_json::json!(n))).collect::<serde_json::Map<_, _>>(),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "store": self.store_kind,
            "credentials": credentials,
            "upstreams": upstreams,
        })
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        for c in &self.credentials {
            c.update_gauges();
        }
        let certs = self
            .credentials
            .iter()
            .map(|c| ("credential", &c.name, &c.config.client_cert))
            .chain(
                self.upstreams
                    .iter()
                    .map(|u| ("upstream", &u.config.name, &u.config.client_cert)),
            );
        for (scope, name, cert) in certs {
            let expiry = cert.as_ref().and_then(|c| c.files.cert_not_after());
            if let Some(t) = expiry.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
                self.metrics
                    .client_cert_expiry
                    .with_label_values(&[scope, name])
                    .set(t.as_secs() as i64);
            }
        }
        let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn html(body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{v:#}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}
