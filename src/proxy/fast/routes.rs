//! Where the fast path sends a request: a fixed url's one target and pool, or, for a
//! url template (`{token.instance_url}/...`), the target the current token resolved to
//! and a pool per origin, made when a token first names it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::pool::{Endpoint, Pool};
use crate::config::UpstreamConfig;
use crate::target::Target;

/// Origins a templated upstream keeps pools for; the oldest goes when a token names
/// yet another (a credential's instance changes rarely, if ever).
const KEPT_ORIGINS: usize = 4;

/// A target and the pool of connections to its origin.
#[derive(Clone)]
pub struct Route {
    pub target: Arc<Target>,
    pub pool: Arc<Pool>,
}

pub enum Routes {
    Fixed(Route),
    Templated(Origins),
}

/// How a templated upstream reaches whatever origin a token names.
pub struct Origins {
    /// For https origins (ALPN http/1.1), built once; none for a fixed http url.
    tls: Option<Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
    max_idle: usize,
    workers: usize,
    /// By `scheme://authority`; `None`: the general engine's (an egress proxy tunnels it).
    pools: Mutex<Vec<(String, Option<Arc<Pool>>)>>,
}

impl Routes {
    /// The routes of an upstream spoken to in HTTP/1.1, directly; `None` for one the
    /// general engine serves (HTTP/2, or an egress proxy for its fixed url).
    pub fn for_upstream(
        up: &UpstreamConfig,
        workers: usize,
    ) -> Result<Option<Routes>, crate::tls::TlsError> {
        if up.http2 {
            return Ok(None);
        }
        // A template may name an https origin with any token.
        let may_use_tls = up.url.fixed().is_none_or(|url| url.scheme() == "https");
        let tls = if may_use_tls {
            Some(Arc::new(crate::tls::client_config_with_cert(
                up.ca_file.as_deref(),
                &[b"http/1.1"],
                up.client_cert.as_ref().map(|c| &c.files),
            )?))
        } else {
            None
        };
        let origins = Origins {
            tls,
            connect_timeout: up.connect_timeout.0,
            // Each app connection holds at most one upstream connection at a time.
            max_idle: up.limits.max_connections,
            workers,
            pools: Mutex::new(Vec::new()),
        };
        let Some(url) = up.url.fixed() else {
            return Ok(Some(Routes::Templated(origins)));
        };
        let Ok(target) = Target::of(url) else {
            return Ok(None);
        };
        Ok(origins.route(Arc::new(target)).map(Routes::Fixed))
    }

    pub fn is_templated(&self) -> bool {
        matches!(self, Routes::Templated(_))
    }

    /// The route to `target` (a token's, for a templated upstream); `None`: the
    /// general engine's.
    pub fn to_target(&self, target: &Arc<Target>) -> Option<Route> {
        match self {
            Routes::Fixed(route) => Some(route.clone()),
            Routes::Templated(origins) => origins.route(target.clone()),
        }
    }

    /// The fixed url's route, if the upstream has one.
    pub fn fixed(&self) -> Option<&Route> {
        match self {
            Routes::Fixed(route) => Some(route),
            Routes::Templated(_) => None,
        }
    }
}

impl Origins {
    fn route(&self, target: Arc<Target>) -> Option<Route> {
        let origin = origin_of(&target);
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let pool = match pools.iter().find(|(o, _)| *o == origin) {
            Some((_, pool)) => pool.clone(),
            None => {
                let pool = self.pool_for(&target).map(Arc::new);
                if pools.len() == KEPT_ORIGINS {
                    pools.remove(0);
                }
                pools.push((origin, pool.clone()));
                pool
            }
        };
        Some(Route {
            target,
            pool: pool?,
        })
    }

    fn pool_for(&self, target: &Target) -> Option<Pool> {
        let url = url::Url::parse(&target.upstream_prefix).ok()?;
        let tls = match url.scheme() {
            "http" => None,
            "https" if !super::super::hyper::EgressConnector::tunnels(&url) => {
                Some(self.tls.clone()?)
            }
            _ => return None,
        };
        let endpoint = Endpoint {
            host: url.host_str()?,
            port: url.port_or_known_default()?,
            tls,
            connect_timeout: self.connect_timeout,
        };
        Pool::new(endpoint, self.max_idle, self.workers)
    }
}

fn origin_of(target: &Target) -> String {
    format!("{}://{}", target.scheme, target.authority)
}
