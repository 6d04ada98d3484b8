//! The general path: hyper serves the app's connection, and the pooled hyper client
//! sends the request on (TLS, HTTP/2 where offered, a CONNECT proxy where configured).
//! Framing and I/O only; every rule comes from [`crate::proxy::policy`] and
//! [`crate::proxy::outcome`].

mod body;
mod client;
mod egress;
mod tunnel;

pub use egress::EgressConnector;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::outcome::ProxyError;
use super::policy::retry;
use super::{policy, Upstream};
use crate::config::{InboundAuthorization, UpstreamConfig};
use crate::server::inbound::{Rewind, Upgrading};
use crate::target::Target;
use body::{ResponseBody, UpstreamBody};
use client::UpstreamClient;

/// Response body: the upstream's, streamed, or one of our small JSON bodies.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// The general path's per-upstream state.
pub struct General {
    client: UpstreamClient,
    /// HTTP/1.1 only: WebSocket handshakes (an upgrade needs an HTTP/1.1 connection).
    upgrades: UpstreamClient,
    builder: http1::Builder,
}

impl General {
    pub fn new(config: &UpstreamConfig) -> Result<General, crate::tls::TlsError> {
        Ok(General {
            client: client::build(config, true)?,
            upgrades: client::build(config, false)?,
            builder: crate::server::inbound::builder(&config.limits),
        })
    }
}

/// What a request handler knows of its connection: where its tunnels run, and the
/// shutdown signal that ends them.
#[derive(Clone)]
struct ConnCtx {
    tunnels: TaskTracker,
    shutdown: CancellationToken,
}

/// Serves the rest of an app connection with hyper; `read` holds bytes already read
/// from it.
pub async fn serve(
    up: Arc<Upstream>,
    stream: TcpStream,
    read: Bytes,
    local: SocketAddr,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) {
    let ctx = ConnCtx {
        tunnels: TaskTracker::new(),
        shutdown: shutdown.clone(),
    };
    let handler = {
        let (up, ctx) = (up.clone(), ctx.clone());
        move |req, local| {
            let (up, ctx) = (up.clone(), ctx.clone());
            async move { handle(up, req, local, ctx).await }
        }
    };
    let io = Rewind::new(stream, read);
    crate::server::inbound::serve(
        io,
        &up.general.builder,
        &up.config.limits,
        handler,
        local,
        peer,
        shutdown,
    )
    .await;
    // Tunnels outlive hyper's part of the connection; the connection ends with them.
    ctx.tunnels.close();
    ctx.tunnels.wait().await;
}

/// Handles one request; never fails (errors become JSON responses).
async fn handle(
    up: Arc<Upstream>,
    req: Request<Incoming>,
    local: SocketAddr,
    ctx: ConnCtx,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = if up.recorder.access_log {
        req.uri().path().to_string()
    } else {
        String::new()
    };
    let resp = match forward(&up, req, local, &ctx).await {
        Ok(r) => r,
        Err(e) => {
            let mut resp = up.recorder.refuse(&e).into_response();
            if e.closes_connection() {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp.map(Either::Right)
        }
    };
    up.recorder
        .record(method.as_str(), &path, resp.status().as_u16(), started);
    resp
}

/// The request target as the app sent it.
fn target_of(uri: &Uri) -> std::borrow::Cow<'_, str> {
    if uri.authority().is_some() {
        uri.to_string().into()
    } else {
        uri.path_and_query()
            .map_or("/", PathAndQuery::as_str)
            .into()
    }
}

async fn forward(
    up: &Arc<Upstream>,
    mut req: Request<Incoming>,
    local: SocketAddr,
    ctx: &ConnCtx,
) -> Result<Response<ProxyBody>, ProxyError> {
    let limit = up.config.limits.max_header_size.0;
    let target = target_of(req.uri());
    if policy::head_size(req.method().as_str(), &target, req.headers()) as u64 > limit {
        return Err(ProxyError::HeadTooLarge(limit));
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::Connect);
    }
    if let Some(a) = req.uri().authority() {
        if !up.is_own_authority(a, local) {
            return Err(ProxyError::ForeignHost(a.to_string()));
        }
    }
    // Any other upgrade is ignored: its headers are hop-by-hop and go below.
    let wants_websocket = policy::wants_websocket(req.headers());
    if wants_websocket && policy::has_body(req.headers()) {
        return Err(ProxyError::HandshakeWithBody);
    }
    let websocket = wants_websocket.then(|| {
        (
            ::hyper::upgrade::on(&mut req),
            req.extensions_mut().remove::<Upgrading>(),
        )
    });
    let (mut parts, incoming) = req.into_parts();
    let headers = &mut parts.headers;
    if up.config.inbound_authorization == InboundAuthorization::Reject
        && headers.contains_key(header::AUTHORIZATION)
    {
        return Err(ProxyError::InboundAuthorization);
    }
    // An HTTP/1.0 app that asked for keep-alive is told it got it (hyper closes the
    // connection otherwise).
    let keep_alive_10 = parts.version == Version::HTTP_10
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| policy::list_items(v.as_bytes()))
            .any(|t| t.eq_ignore_ascii_case(b"keep-alive"));
    // Only needed to rewrite a redirect; kept cheap until then.
    let inbound_host = headers.get(header::HOST).cloned();
    policy::strip_hop_by_hop(headers);
    policy::collapse_content_length(headers);
    policy::drop_answered_expectation(headers);
    policy::strip_app_credentials(headers, &up.header_name);
    // The client derives Host (HTTP/1.1) or :authority (HTTP/2) from the URI.
    headers.remove(header::HOST);
    if policy::closes_after(parts.method.as_str()) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }

    // A fixed upstream's URI is known before the token; a templated one's base comes
    // with the token (its target is checked first all the same).
    let fixed_uri = match up.fixed_target() {
        Some(t) => Some(upstream_uri(t, &parts.method, parts.uri.path_and_query())?),
        None => {
            let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            policy::upstream_target("", parts.method.as_str(), target)?;
            None
        }
    };
    let token = up
        .credential
        .acquire()
        .await
        .map_err(|e| ProxyError::NoToken(e.to_string()))?;
    let base_uri = match fixed_uri {
        Some(uri) => uri,
        None => upstream_uri(
            up.target(&token)?,
            &parts.method,
            parts.uri.path_and_query(),
        )?,
    };
    if let Some((app_upgrade, held)) = websocket {
        policy::ask_websocket(&mut parts.headers);
        let handshake = Handshake {
            method: parts.method,
            uri: base_uri,
            path: parts.uri.path_and_query().cloned(),
            headers: parts.headers,
            inbound_host,
            local,
        };
        return websocket_handshake(up, handshake, token, app_upgrade, held, ctx).await;
    }

    let retry = up.config.retry_on_401;
    let deadline = Instant::now() + up.config.body_timeout.0;
    let expired = Arc::new(AtomicBool::new(false));
    let body = if retry {
        body::hold_up_to(
            incoming,
            up.config.retry_body_limit.0,
            deadline,
            expired.clone(),
        )
        .await
        .map_err(|e| match e.downcast::<body::BodyTimedOut>() {
            Ok(_) => ProxyError::BodyTimeout,
            Err(e) => ProxyError::BadRequestBody(e.to_string()),
        })?
    } else {
        UpstreamBody::Stream {
            prefix: Default::default(),
            rest: incoming,
            deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
            expired: expired.clone(),
        }
    };
    let replay = match &body {
        UpstreamBody::Full(b) if retry => Some((parts.headers.clone(), b.clone())),
        _ => None,
    };
    let path = parts.uri.path_and_query().cloned();
    let mut request = Resend {
        up,
        client: &up.general.client,
        method: parts.method,
        base_uri,
        path,
        first: Some((parts.headers, body)),
        replay,
        expired: &expired,
    };
    let (resp, token) = retry::send_with_retry(&**up, &mut request, token).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProxyError::Upstream(
            crate::metrics::UpstreamErrorKind::Other,
            "unexpected 101 Switching Protocols".into(),
        ));
    }
    let mut resp = filter_response(up, &token, resp, inbound_host.as_ref(), local);
    if keep_alive_10 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    Ok(resp)
}

/// The general engine's side of the 401 sequence: the request's parts, sent first as
/// the app gave them and again from `replay` (headers and held body) with a newer token.
struct Resend<'a> {
    up: &'a Upstream,
    client: &'a UpstreamClient,
    method: Method,
    /// The URI (without a query token) for the first token.
    base_uri: Uri,
    /// The app's target, for a templated upstream's URI under another token.
    path: Option<PathAndQuery>,
    /// The first request's headers and body (streamed when it is not held).
    first: Option<(http::HeaderMap, UpstreamBody)>,
    /// What a retry sends: `None` when the body could not be held.
    replay: Option<(http::HeaderMap, Option<Bytes>)>,
    expired: &'a AtomicBool,
}

impl retry::Resend for Resend<'_> {
    type Answer = Response<Incoming>;

    fn status(answer: &Self::Answer) -> u16 {
        answer.status().as_u16()
    }

    async fn send(
        &mut self,
        token: &crate::credential::ActiveToken,
    ) -> Result<Self::Answer, ProxyError> {
        let up = self.up;
        let (headers, body, base) = match (self.first.take(), &self.replay) {
            (Some((headers, body)), _) => (headers, body, self.base_uri.clone()),
            (None, Some((headers, body))) => {
                // A templated upstream may have moved with the new token.
                let base = match up.fixed_target() {
                    Some(_) => self.base_uri.clone(),
                    None => upstream_uri(up.target(token)?, &self.method, self.path.as_ref())?,
                };
                (headers.clone(), UpstreamBody::Full(body.clone()), base)
            }
            // `hold` said no, so no retry is sent.
            (None, None) => {
                return Err(ProxyError::BadTarget(
                    "the request cannot be sent again".into(),
                ))
            }
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = token_uri(up, &base, token)?;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        req.headers_mut()
            .insert(up.header_name.clone(), token.header(up.format));
        send_on(up, self.client, req, self.expired).await
    }

    async fn hold(&mut self, _: &mut Self::Answer) -> bool {
        self.replay.is_some()
    }

    fn discard(&mut self, answer: Self::Answer) {
        drop(answer);
    }
}

/// `uri` as sent with `token`: with the token as the upstream's `token_query_param`
/// where it has one, else as it is.
fn token_uri(
    up: &Upstream,
    uri: &Uri,
    token: &crate::credential::ActiveToken,
) -> Result<Uri, ProxyError> {
    let Some(param) = up.query_param() else {
        return Ok(uri.clone());
    };
    // The token was checked as a header value and is form-encoded here, so this parses;
    // the error never shows the URI, which holds the token.
    let unusable = || ProxyError::BadTarget("the token cannot be put in the query".into());
    let target = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        policy::with_query_token(target, param, token.value())
            .parse()
            .map_err(|_| unusable())?,
    );
    Uri::from_parts(parts).map_err(|_| unusable())
}

/// A WebSocket handshake, prepared for the upstream.
struct Handshake {
    method: Method,
    /// The URI (without a query token) for the token the handshake was prepared with.
    uri: Uri,
    /// The app's target, for a templated upstream's URI under another token.
    path: Option<PathAndQuery>,
    headers: http::HeaderMap,
    inbound_host: Option<HeaderValue>,
    local: SocketAddr,
}

/// Sends the handshake with the credential (again after a 401, as for any request); a
/// 101 starts the tunnel, any other answer goes to the app as it is.
async fn websocket_handshake(
    up: &Arc<Upstream>,
    h: Handshake,
    token: Arc<crate::credential::ActiveToken>,
    app_upgrade: ::hyper::upgrade::OnUpgrade,
    held: Option<Upgrading>,
    ctx: &ConnCtx,
) -> Result<Response<ProxyBody>, ProxyError> {
    let never = AtomicBool::new(false);
    let mut request = Resend {
        up,
        client: &up.general.upgrades,
        method: h.method,
        base_uri: h.uri,
        path: h.path,
        first: None,
        replay: Some((h.headers, None)),
        expired: &never,
    };
    let (mut resp, token) = retry::send_with_retry(&**up, &mut request, token).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(filter_response(
            up,
            &token,
            resp,
            h.inbound_host.as_ref(),
            h.local,
        ));
    }
    if !policy::switched_to_websocket(resp.headers()) {
        return Err(policy::not_websocket_in(resp.headers()));
    }
    let upstream_upgrade = ::hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    policy::strip_hop_by_hop(&mut parts.headers);
    policy::ask_websocket(&mut parts.headers);
    ctx.tunnels.spawn(tunnel::run(
        up.clone(),
        app_upgrade,
        upstream_upgrade,
        held,
        ctx.shutdown.clone(),
    ));
    Ok(Response::from_parts(parts, Either::Right(Full::default())))
}

async fn send_on(
    up: &Upstream,
    client: &UpstreamClient,
    req: Request<UpstreamBody>,
    body_expired: &AtomicBool,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout(up.config.timeout.0, client.request(req)).await {
        Err(_) => Err(ProxyError::Timeout),
        Ok(Err(_)) if body_expired.load(Ordering::Relaxed) => Err(ProxyError::BodyTimeout),
        Ok(Err(e)) => {
            let (kind, detail) = client::classify(&e);
            Err(ProxyError::Upstream(kind, detail))
        }
        Ok(Ok(r)) => Ok(r),
    }
}

/// The upstream's response for the app; `token` is the one whose request it answers
/// (a templated upstream's redirects are rewritten against that token's target).
fn filter_response(
    up: &Arc<Upstream>,
    token: &crate::credential::ActiveToken,
    resp: Response<Incoming>,
    inbound_host: Option<&HeaderValue>,
    local: SocketAddr,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    policy::strip_hop_by_hop(&mut parts.headers);
    policy::collapse_content_length(&mut parts.headers);
    if parts.headers.contains_key(header::LOCATION)
        || parts.headers.contains_key(header::CONTENT_LOCATION)
    {
        // The token sent in the query never comes back to the app; this runs first, so
        // only values without it are rewritten.
        if let Some(param) = up.query_param() {
            if policy::keep_query_token_out(&mut parts.headers, param, token.value()) {
                policy::warn_token_header_dropped(&up.config.name);
            }
        }
        if let Ok(target) = up.target(token) {
            let host = inbound_host.and_then(|h| h.to_str().ok());
            let local_prefix = policy::local_prefix(host, local);
            policy::rewrite_locations(&mut parts.headers, &target.upstream_prefix, &local_prefix);
        }
    }
    Response::from_parts(parts, Either::Left(ResponseBody::new(body, up.clone())))
}

/// The policy's target on the upstream's scheme and authority.
fn upstream_uri(
    up: &Target,
    method: &Method,
    pq: Option<&PathAndQuery>,
) -> Result<Uri, ProxyError> {
    let target = pq.map_or("/", PathAndQuery::as_str);
    let full: PathAndQuery = match policy::upstream_target(&up.base_path, method.as_str(), target)?
    {
        // The common case reuses the request's own (shared) bytes.
        std::borrow::Cow::Borrowed(_) if pq.is_some() => pq
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        t => t
            .parse()
            .map_err(|e| ProxyError::BadTarget(format!("{e}")))?,
    };
    Uri::builder()
        .scheme(up.scheme.clone())
        .authority(up.authority.clone())
        .path_and_query(full)
        .build()
        .map_err(|e| ProxyError::BadTarget(e.to_string()))
}
