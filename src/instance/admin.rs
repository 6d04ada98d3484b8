//! The admin listener: `/healthz`, `/readyz`, `/status` (JSON), `/metrics` (Prometheus),
//! and `POST /reload` (loopback peers only). Nothing here ever includes a token or
//! secret value.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::mpsc;

use crate::instance::record::{ConfigStatus, ReloadTrigger};
use crate::instance::reloads::ReloadRequest;
use crate::instance::{StoreInfo, View};
use crate::metrics::Metrics;

/// What the admin endpoints report on.
pub struct Admin {
    pub view: Arc<ArcSwap<View>>,
    pub metrics: Arc<Metrics>,
    pub store: Mutex<StoreInfo>,
    pub config: Arc<Mutex<ConfigStatus>>,
    /// Where `POST /reload` sends its request.
    pub reloads: mpsc::Sender<ReloadRequest>,
}

impl Admin {
    /// Routes one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/reload" {
            return self.reload(&req).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readyz(),
            "/status" => json(StatusCode::OK, &self.status()),
            "/metrics" => self.metrics(),
            "/" => html(&crate::instance::status_page::render(&self.status())),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /status, /metrics, /healthz, /readyz\n",
            ),
        }
    }

    /// The store `/status` describes (a reload may open it).
    pub fn set_store(&self, store: StoreInfo) {
        *self.store.lock().unwrap() = store;
    }

    /// `POST /reload`: re-reads the config file and answers with what changed, or why
    /// nothing did (409). Only a loopback peer may ask: the admin listener is often
    /// exposed to Prometheus, and a reload is an operator's action.
    async fn reload<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST /reload\n");
        }
        let peer = req.extensions().get::<crate::server::inbound::Peer>();
        if !peer.is_some_and(crate::server::inbound::Peer::is_loopback) {
            return text(
                StatusCode::FORBIDDEN,
                "reload is allowed from loopback addresses only\n",
            );
        }
        let (request, outcome) = ReloadRequest::awaited(ReloadTrigger::Admin);
        if self.reloads.send(request).await.is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
        }
        match outcome.await {
            Ok(Ok(applied)) => json(
                StatusCode::OK,
                &serde_json::json!({"result": "success", "generation": self.config.lock().unwrap().generation, "applied": applied}),
            ),
            Ok(Err(error)) => json(
                StatusCode::CONFLICT,
                &serde_json::json!({"result": "failure", "error": error.to_string()}),
            ),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        }
    }

    /// 200 when every credential holds a usable token and every templated upstream
    /// resolves with it; else 503 naming what is not ready.
    fn readyz(&self) -> Response<Full<Bytes>> {
        let view = self.view.load();
        let not_ready: Vec<String> = view.credentials.iter().flat_map(|c| not_ready(c)).collect();
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
        let view = self.view.load();
        let config_file = self.config.lock().unwrap().path.clone();
        let credentials: serde_json::Map<String, serde_json::Value> = view
            .credentials
            .iter()
            .map(|c| (c.name.clone(), c.status(config_file.as_deref())))
            .collect();
        let upstreams: serde_json::Map<String, serde_json::Value> = view
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
                        "engine": u.engine(),
                        "client_certificate": u.config.client_cert.as_ref().map(|c| c.status()),
                        "requests_total": counts.iter().map(|(_, n)| n).sum::<u64>(),
                        "requests": counts.iter().map(|(c, n)| (c.to_string(), serde_json::json!(n))).collect::<serde_json::Map<_, _>>(),
                    }),
                )
            })
            .collect();
        let store = *self.store.lock().unwrap();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "store": store.kind,
            "store_rollback_detection": store.rollback_detection,
            "config": *self.config.lock().unwrap(),
            "credentials": credentials,
            "upstreams": upstreams,
        })
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let view = self.view.load();
        for c in &view.credentials {
            c.update_gauges();
        }
        let certs = view
            .credentials
            .iter()
            .map(|c| ("credential", &c.name, &c.config.client_cert))
            .chain(
                view.upstreams
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

/// What keeps `c` from serving: its state without a usable token, or each of its
/// templated upstreams the token does not resolve (requests to it would be refused).
fn not_ready(c: &crate::credential::Credential) -> Vec<String> {
    use crate::credential::State;
    let state = c.state();
    if !matches!(state, State::Ready | State::Degraded) {
        return vec![format!("{}: {}", c.name, state.as_str())];
    }
    c.unresolved_upstreams()
        .into_iter()
        .map(|(upstream, why)| format!("upstream {upstream}: {why}"))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::record::ReloadError;
    use crate::instance::ApplyError;

    fn admin() -> (Admin, mpsc::Receiver<ReloadRequest>) {
        let (tx, rx) = mpsc::channel(1);
        let admin = Admin {
            view: Arc::new(ArcSwap::from_pointee(View::default())),
            metrics: Arc::new(Metrics::new()),
            store: Mutex::new(StoreInfo::default()),
            config: Arc::new(Mutex::new(ConfigStatus::new(None))),
            reloads: tx,
        };
        (admin, rx)
    }

    fn post_reload(peer: &str) -> Request<()> {
        let mut req = Request::post("/reload").body(()).unwrap();
        req.extensions_mut()
            .insert(crate::server::inbound::Peer(peer.parse().unwrap()));
        req
    }

    #[tokio::test]
    async fn reload_is_refused_to_peers_off_loopback_and_to_get() {
        let (admin, mut rx) = admin();
        for peer in [
            "10.1.2.3:5000",
            "[2001:db8::1]:5000",
            "[::ffff:10.1.2.3]:5000",
        ] {
            let r = admin.handle(post_reload(peer)).await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{peer}");
        }
        let get = admin
            .handle(Request::get("/reload").body(()).unwrap())
            .await;
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(rx.try_recv().is_err(), "nothing reached the reload task");
    }

    /// Loopback in any spelling reaches the reload task, including an IPv4 client of a
    /// dual-stack listener (`::ffff:127.0.0.1`).
    #[tokio::test]
    async fn reload_is_accepted_from_every_loopback_spelling() {
        for peer in [
            "127.0.0.1:5000",
            "127.0.0.2:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
            "[::ffff:127.1.2.3]:5000",
        ] {
            let (admin, mut rx) = admin();
            let answer = tokio::spawn(async move {
                if let Some(request) = rx.recv().await {
                    request.answer(Err(ReloadError::NoConfigFile));
                }
            });
            let r = admin.handle(post_reload(peer)).await;
            drop(admin);
            answer.await.unwrap();
            assert_eq!(r.status(), StatusCode::CONFLICT, "{peer}");
        }
    }

    #[tokio::test]
    async fn a_loopback_reload_waits_for_the_outcome() {
        let (admin, mut rx) = admin();
        let answer = tokio::spawn(async move {
            let request = rx.recv().await.unwrap();
            assert_eq!(request.trigger, ReloadTrigger::Admin);
            request.answer(Err(ApplyError::NoCredential { name: "a".into() }.into()));
        });
        let r = admin.handle(post_reload("127.0.0.1:5000")).await;
        answer.await.unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT);
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["result"], "failure");
        assert_eq!(v["error"], "upstreams.a.credential: no such credential");
    }
}
