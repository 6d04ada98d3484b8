//! The forwarding path of one upstream: route checks → upstream request (hop-by-hop
//! stripped, `Host` from the upstream, the credential header attached) → send with a
//! timeout → on 401, one refresh and at most one retry → response filter (hop-by-hop
//! stripped, redirects rewritten to the listener). Bodies stream both ways.

pub mod body;
pub mod client;
mod egress;
pub mod error;
pub mod fast;
pub mod headers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use crate::config::{InboundAuthorization, UpstreamConfig};
use crate::credential::{ActiveToken, Credential, NoToken};
use crate::metrics::{Metrics, UpstreamMetrics};
use body::UpstreamBody;
use client::UpstreamClient;
use error::ProxyError;

/// Response body: the upstream's, streamed, or one of our small JSON bodies.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Everything the forwarding path of one upstream needs, resolved once at startup.
pub struct Upstream {
    pub config: Arc<UpstreamConfig>,
    /// The address actually listened on (differs from the config for port 0).
    pub listen: SocketAddr,
    pub credential: Arc<Credential>,
    /// Index of this upstream's header format in the credential's prebuilt values.
    slot: usize,
    header_name: HeaderName,
    client: UpstreamClient,
    scheme: Scheme,
    authority: Authority,
    /// Upstream path prefix without a trailing slash ("" for the root).
    base_path: String,
    /// `scheme://authority/base` as redirects from the upstream spell it.
    upstream_prefix: String,
    metrics: UpstreamMetrics,
    access_log: bool,
    /// Set for plain-http upstreams: most requests take [`fast`]'s path.
    fast: Option<fast::FastPath>,
}

impl Upstream {
    /// Resolves an upstream's forwarding parameters and builds its client.
    pub fn new(
        config: Arc<UpstreamConfig>,
        listen: SocketAddr,
        credential: Arc<Credential>,
        metrics: &Metrics,
        access_log: bool,
        workers: usize,
    ) -> Result<Upstream, String> {
        let slot = credential
            .format_slot(&config.format)
            .ok_or("credential lacks this upstream's header format")?;
        let url = &config.url;
        let scheme: Scheme = url.scheme().parse().map_err(|_| "bad scheme")?;
        let host = url.host_str().unwrap_or_default();
        let authority: Authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
        .parse()
        .map_err(|e| format!("bad upstream authority: {e}"))?;
        let base_path = url.path().trim_end_matches('/').to_string();
        Ok(Upstream {
            slot,
            header_name: HeaderName::from_bytes(config.header.as_bytes())
                .map_err(|e| e.to_string())?,
            client: client::build(&config)?,
            fast: fast::FastPath::for_upstream(&config, workers),
            upstream_prefix: format!("{scheme}://{authority}{base_path}"),
            scheme,
            authority,
            base_path,
            metrics: metrics.upstream(&config.name),
            access_log,
            config,
            listen,
            credential,
        })
    }

    /// Requests answered so far by this upstream's listener, by status code.
    pub fn request_counts(&self) -> Vec<(u16, u64)> {
        self.metrics.counts()
    }

    /// Handles one request; never fails (errors become JSON responses).
    pub async fn handle(&self, req: Request<Incoming>, local: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let (method, path) = if self.access_log {
            (req.method().clone(), req.uri().path().to_string())
        } else {
            (Method::GET, String::new())
        };
        let resp = match self.forward(req, local).await {
            Ok(r) => r,
            Err(e) => {
                self.report_error(&e);
                e.into_response(&self.config.name, &self.credential.name)
                    .map(Either::Right)
            }
        };
        let elapsed = started.elapsed();
        self.metrics.count(resp.status().as_u16());
        self.metrics.duration.observe(elapsed.as_secs_f64());
        if self.access_log {
            // Path only: query strings may carry app data.
            info!(target: "tokenrelay::access", upstream = %self.config.name, %method, path = %path,
                status = resp.status().as_u16(), duration_ms = elapsed.as_secs_f64() * 1e3, "request");
        }
        resp
    }

    /// A 401 that cannot be retried goes to the app as it is; a refresh still starts in
    /// the background, so the next request finds a fresh token.
    fn pass_401_through(&self, generation: u64) {
        self.metrics.retry_skipped.inc();
        let cred = self.credential.clone();
        tokio::spawn(async move {
            let _ = cred.after_401(generation).await;
        });
    }

    /// Counts and logs a request that was not (successfully) forwarded.
    fn report_error(&self, e: &ProxyError) {
        match e {
            ProxyError::Upstream(kind, _) => self.metrics.error(*kind),
            ProxyError::Timeout => self
                .metrics
                .error(crate::metrics::UpstreamErrorKind::Timeout),
            _ => {}
        }
        if let ProxyError::NoToken(_) = e {
            // The refresher already logs why there is no token; one line per refused
            // request would flood the log during an outage.
            debug!(upstream = %self.config.name, error = %e.message(), "request refused: no valid token");
        } else {
            warn!(upstream = %self.config.name, status = e.status().as_u16(), error = %e.message(), "request not forwarded");
        }
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        local: SocketAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        if let Some(a) = req.uri().authority() {
            if !self.is_own_authority(a, local) {
                return Err(ProxyError::ForeignHost(a.to_string()));
            }
        }
        let (mut parts, incoming) = req.into_parts();
        let headers = &mut parts.headers;
        if self.config.inbound_authorization == InboundAuthorization::Reject
            && headers.contains_key(header::AUTHORIZATION)
        {
            return Err(ProxyError::InboundAuthorization);
        }
        // Only needed to rewrite a redirect; kept cheap until then.
        let inbound_host = headers.get(header::HOST).cloned();
        headers::strip_hop_by_hop(headers);
        headers.remove(header::AUTHORIZATION);
        headers.remove(&self.header_name);
        // The client derives Host (HTTP/1.1) or :authority (HTTP/2) from the URI.
        headers.remove(header::HOST);

        let token = self.credential.acquire().await.map_err(|e| no_token(&e))?;

        let uri = self.upstream_uri(parts.uri.path_and_query())?;
        let retry = self.config.retry_on_401;
        let body = if retry {
            body::hold_up_to(incoming, self.config.retry_body_limit.0)
                .await
                .map_err(|e| ProxyError::BadRequestBody(e.to_string()))?
        } else {
            UpstreamBody::Stream {
                prefix: Default::default(),
                rest: incoming,
            }
        };
        let replay = match &body {
            UpstreamBody::Full(b) if retry => {
                Some((parts.method.clone(), parts.headers.clone(), b.clone()))
            }
            _ => None,
        };

        let mut up = Request::new(body);
        *up.method_mut() = parts.method;
        *up.uri_mut() = uri.clone();
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = parts.headers;
        up.headers_mut()
            .insert(self.header_name.clone(), token.header(self.slot));

        let mut resp = self.send(up).await?;
        note_acceptance(&token, resp.status().as_u16());

        if resp.status() == StatusCode::UNAUTHORIZED && retry {
            match replay {
                Some((method, headers, body)) => {
                    resp = self
                        .retry_after_401(&token, method, uri, headers, body, resp)
                        .await?;
                }
                // Body too large to replay.
                None => self.pass_401_through(token.generation),
            }
        }
        Ok(self.filter_response(resp, inbound_host.as_ref(), local))
    }

    async fn retry_after_401(
        &self,
        token: &ActiveToken,
        method: Method,
        uri: Uri,
        headers: http::HeaderMap,
        body: Option<Bytes>,
        first: Response<Incoming>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let fresh = match self.credential.after_401(token.generation).await {
            Ok(t) => t,
            Err(e) => {
                self.metrics.retry_failure.inc();
                warn!(upstream = %self.config.name, error = %e, "upstream answered 401 and no newer token is available; passing it through");
                return Ok(first);
            }
        };
        drop(first);
        let mut up = Request::new(UpstreamBody::Full(body));
        *up.method_mut() = method;
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = headers;
        up.headers_mut()
            .insert(self.header_name.clone(), fresh.header(self.slot));
        let resp = self.send(up).await?;
        note_acceptance(&fresh, resp.status().as_u16());
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.metrics.retry_failure.inc();
        } else {
            self.metrics.retry_success.inc();
        }
        Ok(resp)
    }

    async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.config.timeout.0, self.client.request(req)).await {
            Err(_) => Err(ProxyError::Timeout),
            Ok(Err(e)) => {
                let (kind, detail) = client::classify(&e);
                Err(ProxyError::Upstream(kind, detail))
            }
            Ok(Ok(r)) => Ok(r),
        }
    }

    fn filter_response(
        &self,
        resp: Response<Incoming>,
        inbound_host: Option<&http::HeaderValue>,
        local: SocketAddr,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        if parts.headers.contains_key(header::LOCATION)
            || parts.headers.contains_key(header::CONTENT_LOCATION)
        {
            let host = inbound_host.and_then(|h| h.to_str().ok());
            let local_prefix = local_prefix(host, local);
            headers::rewrite_locations(&mut parts.headers, &self.upstream_prefix, &local_prefix);
        }
        Response::from_parts(parts, Either::Left(body))
    }

    /// `base_path` + request path and query, on the upstream's scheme and authority.
    fn upstream_uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
        let full: PathAndQuery = match pq {
            // The common case reuses the request's own (shared) bytes.
            Some(pq) if self.base_path.is_empty() && pq.as_str().starts_with('/') => pq.clone(),
            _ => {
                let pq = pq.map(|p| p.as_str()).unwrap_or("/");
                let sep = if pq.starts_with('/') { "" } else { "/" };
                format!("{}{sep}{pq}", self.base_path)
                    .parse()
                    .map_err(|e| ProxyError::ForeignHost(format!("unusable request target: {e}")))?
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(full)
            .build()
            .map_err(|e| ProxyError::ForeignHost(format!("unusable request target: {e}")))
    }

    /// An absolute-form target is accepted only for the upstream itself or this listener.
    fn is_own_authority(&self, a: &Authority, local: SocketAddr) -> bool {
        if a.as_str().eq_ignore_ascii_case(self.authority.as_str()) {
            return true;
        }
        let port_ok = a.port_u16() == Some(local.port());
        let host = a.host().trim_start_matches('[').trim_end_matches(']');
        port_ok
            && (host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip == local.ip()))
    }
}

/// Both engines report each upstream answer here: any status but 401 proves the token
/// worked, so a later 401 to it means revocation (refreshed at once), not a permission
/// problem (spaced out).
pub(crate) fn note_acceptance(token: &ActiveToken, status: u16) {
    if status != 401 {
        token.mark_accepted();
    }
}

fn no_token(e: &NoToken) -> ProxyError {
    ProxyError::NoToken(e.to_string())
}

/// `http://<host the app used>` for rewritten redirects; falls back to the socket address.
pub(crate) fn local_prefix(host: Option<&str>, local: SocketAddr) -> String {
    host.filter(|h| h.parse::<Authority>().is_ok())
        .map(|h| format!("http://{h}"))
        .unwrap_or_else(|| format!("http://{local}"))
}
