//! Inbound HTTP/1.1 listeners: accept loop with a connection cap, then per connection
//! either the fast path (plain-http upstreams) or hyper, with header-read and idle
//! timeouts, a header size limit, and graceful shutdown (stop accepting, drain).

mod rewind;
mod timeouts;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::Limits;
use crate::proxy::fast;
use crate::proxy::Upstream;
use rewind::Rewind;
use timeouts::{ConnTimeouts, InFlight, RequestCounter};

/// Serves an upstream's listener until `shutdown`; connection tasks run on `tracker`,
/// which the caller waits on to drain.
pub async fn serve_upstream(
    listener: TcpListener,
    up: Arc<Upstream>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limits = up.config.limits.clone();
    let builder = hyper_builder(&limits);
    let local = local_addr(&listener);
    let handler = {
        let up = up.clone();
        move |req, local| {
            let up = up.clone();
            async move { up.handle(req, local).await }
        }
    };
    let conn_shutdown = shutdown.clone();
    let on_conn = move |stream: TcpStream, peer: SocketAddr| {
        let up = up.clone();
        let (builder, limits, handler, shutdown) = (
            builder.clone(),
            limits.clone(),
            handler.clone(),
            conn_shutdown.clone(),
        );
        async move {
            match fast::serve(up, stream, local, shutdown.clone()).await {
                fast::End::Closed => {}
                fast::End::Handoff { stream, read } => {
                    let io = Rewind::new(stream, read);
                    serve_hyper(io, &builder, &limits, handler, local, peer, &shutdown).await
                }
            }
        }
    };
    accept_loop(listener, permits, shutdown, tracker, on_conn).await
}

/// Serves `listener` with a hyper `handler` until `shutdown`; connection tasks run on
/// `tracker`.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    H: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = hyper_builder(&limits);
    let local = local_addr(&listener);
    let max = limits.max_connections;
    let conn_shutdown = shutdown.clone();
    let on_conn = move |stream: TcpStream, peer: SocketAddr| {
        let (builder, limits, handler, shutdown) = (
            builder.clone(),
            limits.clone(),
            handler.clone(),
            conn_shutdown.clone(),
        );
        let io = Rewind::new(stream, Bytes::new());
        async move { serve_hyper(io, &builder, &limits, handler, local, peer, &shutdown).await }
    };
    let permits = Arc::new(Semaphore::new(max));
    accept_loop(listener, permits, shutdown, tracker, on_conn).await
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn hyper_builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Header-read and idle timeouts are ConnTimeouts' (hyper's single timer would
        // close idle keep-alive connections after the header timeout).
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_size.0.max(8192) as usize)
        .keep_alive(true);
    builder
}

/// Accepts connections (at most one per permit at once; workers sharing a listening
/// socket share its permits) until `shutdown`, running `on_conn` for each on `tracker`.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    on_conn: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = local_addr(&listener);
    loop {
        // Waiting for a permit before accepting leaves excess connections in the
        // kernel's backlog instead of accepting and dropping them.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    warn!(%local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let conn = on_conn(stream, peer);
        tracker.spawn(async move {
            conn.await;
            drop(permit);
        });
    }
}

/// Serves one connection with hyper; on `shutdown`, finishes the request in flight and
/// closes.
async fn serve_hyper<H, Fut, B>(
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
    B: http_body::Body + Send + 'static,
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
    let svc = service_fn(move |req| {
        let handler = handler.clone();
        let guard = InFlight::enter(requests.clone());
        async move {
            let resp = handler(req, local).await;
            drop(guard);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut conn = pin!(builder.serve_connection(io, svc));
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}
