//! How the hyper path reaches `https://` upstreams: directly, or through the HTTP
//! CONNECT proxy that `HTTPS_PROXY`/`ALL_PROXY` name (minus `NO_PROXY`), read once at
//! startup the way curl reads them. Token endpoints follow the same variables (reqwest).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A TCP connector that tunnels through a proxy where the environment says so.
#[derive(Clone)]
pub struct EgressConnector {
    direct: HttpConnector,
    proxies: Arc<Matcher>,
}

impl EgressConnector {
    pub fn new(direct: HttpConnector) -> EgressConnector {
        EgressConnector {
            direct,
            proxies: Arc::new(Matcher::from_env()),
        }
    }

    /// Whether requests to `url` go through a proxy (then the fast path, which connects
    /// directly, leaves them to this connector).
    pub fn tunnels(url: &url::Url) -> bool {
        let Ok(uri) = url.as_str().parse::<Uri>() else {
            return false;
        };
        tunnelled(&uri) && Matcher::from_env().intercept(&uri).is_some()
    }

    /// The proxy used for `url`, if any, for the startup log. The matcher keeps the
    /// proxy URL's credentials apart (see `basic_auth`), so this shows none.
    pub fn proxy_for(&self, url: &url::Url) -> Option<String> {
        let uri: Uri = url.as_str().parse().ok()?;
        let intercept = tunnelled(&uri).then(|| self.proxies.intercept(&uri))??;
        Some(intercept.uri().to_string())
    }
}

/// Only TLS destinations are tunnelled: plain http through a CONNECT proxy is refused by
/// most proxies, and plain-http upstreams are local by nature.
fn tunnelled(dst: &Uri) -> bool {
    dst.scheme_str() == Some("https")
}

impl tower_service::Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = tunnelled(&dst)
            .then(|| self.proxies.intercept(&dst))
            .flatten();
        match intercept {
            Some(proxy) => {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), self.direct.clone());
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move {
                    tower_service::Service::call(&mut tunnel, dst)
                        .await
                        .map_err(|e| format!("through the proxy: {e}").into())
                })
            }
            None => {
                let mut direct = self.direct.clone();
                Box::pin(async move {
                    tower_service::Service::call(&mut direct, dst)
                        .await
                        .map_err(Into::into)
                })
            }
        }
    }
}
