//! WebSocket tunnels, for both engines: after the app and the upstream both switched
//! protocols, bytes are copied both ways until either side closes, nothing moves for
//! the listener's `idle_timeout`, or shutdown begins. A tunnel runs inside the app
//! connection's task, so it counts against the connection cap until it ends.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Upstream;

/// Carries bytes between the app's and the upstream's connections until the tunnel
/// ends; counts it and its bytes.
pub(super) async fn carry<A, U>(up: &Upstream, app: A, upstream: U, shutdown: &CancellationToken)
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &up.recorder.metrics;
    metrics.tunnels_open.inc();
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut app = Active::new(app, start, last.clone());
    let mut upstream = Active::new(upstream, start, last.clone());
    let idle = up.config.limits.idle_timeout.0;
    let watchdog = async {
        loop {
            let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    };
    let (app_read, upstream_read) = (app.read.clone(), upstream.read.clone());
    let why = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut app, &mut upstream) => {
            if r.is_ok() { "closed" } else { "failed" }
        }
        () = watchdog => "idle timeout",
        () = shutdown.cancelled() => "shutdown",
    };
    let to_upstream = app_read.load(Ordering::Relaxed);
    let to_app = upstream_read.load(Ordering::Relaxed);
    metrics.tunnels_open.dec();
    metrics.tunnel_to_upstream.inc_by(to_upstream);
    metrics.tunnel_to_app.inc_by(to_app);
    debug!(upstream = %up.config.name, to_upstream, to_app, ended = why, "websocket tunnel ended");
}

/// One side of a tunnel: notes when bytes last moved, and counts what it read.
struct Active<T> {
    io: T,
    start: Instant,
    last: Arc<AtomicU64>,
    /// Bytes read from this side.
    read: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn new(io: T, start: Instant, last: Arc<AtomicU64>) -> Active<T> {
        Active {
            io,
            start,
            last,
            read: Arc::default(),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_ready() {
            let n = (buf.filled().len() - before) as u64;
            self.read.fetch_add(n, Ordering::Relaxed);
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if r.is_ready() {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
