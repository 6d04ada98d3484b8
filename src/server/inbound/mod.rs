//! One inbound HTTP/1.1 connection served by hyper: header-read and idle timeouts, the
//! header buffer limit, and graceful shutdown (drain, close).
//! Used by the proxy's general path and by the admin and demo listeners.

mod rewind;
mod timeouts;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderValue;

use http_body::{Body, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::Limits;
use crate::shutdown::RETIRE_GRACE;
pub use rewind::Rewind;
pub use timeouts::InFlight;
use timeouts::{ConnTimeouts, RequestCounter};

/// Found in the extensions of a request that asks for an upgrade: whoever carries the
/// upgraded connection on holds it, so the connection's header-read and idle timeouts
/// leave the tunnel alone (the tunnel keeps its own idle timeout).
#[derive(Clone)]
pub struct Upgrading {
    /// Held for its `Drop`: the request counts as in flight while the tunnel lives.
    _in_flight: Arc<InFlight>,
}

/// The hyper connection settings of one listener. The buffer leaves room above
/// `max_header_size` so that heads a little over the limit reach the handler, which
/// answers them with its own exact 431.
pub fn builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Header-read and idle timeouts are ConnTimeouts' (hyper's single timer would
        // close idle keep-alive connections after the header timeout).
        .header_read_timeout(None)
        .max_buf_size((limits.max_header_size.0 as usize).saturating_add(64 * 1024))
        .keep_alive(true);
    builder
}

/// The app's address, in each request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl Peer {
    /// Whether the peer is on this host's loopback (see [`is_loopback`]).
    pub fn is_loopback(&self) -> bool {
        is_loopback(self.0.ip())
    }
}

/// Whether `ip` is a loopback address in any spelling. A dual-stack listener (`[::]`)
/// sees an IPv4 client as `::ffff:127.0.0.1`, which `Ipv6Addr::is_loopback` alone does
/// not count, so the address is canonicalised first.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Serves one connection with hyper; on `shutdown`, drains: finishes the request in
/// flight, answers what arrives within [`RETIRE_GRACE`] with `Connection: close`, and
/// closes. Upgraded connections (WebSocket) are carried on by the handler.
pub async fn serve<H, Fut, B>(
    io: Rewind,
    builder: &http1::Builder,
    limits: &Limits,
    handler: H,
    local: SocketAddr,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) where
    H: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let requests = Arc::new(RequestCounter::default());
    let io = ConnTimeouts::new(
        TokioIo::new(io),
        limits.header_read_timeout.0,
        limits.idle_timeout.0,
        requests.clone(),
    );
    let draining = Arc::new(AtomicBool::new(false));
    let announce = draining.clone();
    let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let handler = handler.clone();
        let announce = announce.clone();
        req.extensions_mut().insert(Peer(peer));
        let guard = InFlight::enter(requests.clone());
        if req.headers().contains_key(http::header::UPGRADE) {
            let held = Upgrading {
                _in_flight: Arc::new(InFlight::enter(requests.clone())),
            };
            req.extensions_mut().insert(held);
        }
        async move {
            let mut resp = handler(req, local).await;
            // While draining, the app learns this connection ends here (hyper closes it
            // after this answer).
            if announce.load(Ordering::Relaxed) && !resp.status().is_informational() {
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            // The request counts as in flight until its response body is sent: a
            // streaming body is timed by its own rule, not the idle timeout.
            Ok::<_, Infallible>(resp.map(|body| Guarded {
                body,
                _guard: guard,
            }))
        }
    });
    let mut conn = pin!(builder.serve_connection(io, svc).with_upgrades());
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            // The app may be sending its next request on this keep-alive connection as
            // the shutdown lands: what arrives within the grace is answered, with
            // `Connection: close`; then the connection closes once its request is done.
            draining.store(true, Ordering::Relaxed);
            match tokio::time::timeout(RETIRE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct Guarded<B> {
    body: B,
    _guard: InFlight,
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_in_every_spelling_and_nothing_else() {
        for (ip, loopback) in [
            ("127.0.0.1", true),
            ("127.255.255.254", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:127.9.9.9", true),
            ("10.0.0.1", false),
            ("0.0.0.0", false),
            ("::", false),
            ("::ffff:10.0.0.1", false),
            // IPv4-compatible (deprecated, RFC 4291 §2.5.5.1): no socket reports it.
            ("::127.0.0.1", false),
            ("2001:db8::1", false),
            ("fe80::1", false),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(is_loopback(ip), loopback, "{ip}");
        }
    }
}
