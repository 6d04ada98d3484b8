//! Inbound HTTP/1.1 listeners: accept loop with a connection cap, header-read and idle
//! timeouts, a header size limit, and graceful shutdown (stop accepting, drain).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::Limits;

/// Serves `listener` with `handler` until `shutdown`, then drains via `graceful`.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    shutdown: CancellationToken,
    graceful: Arc<GracefulShutdown>,
) where
    H: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Header-read and idle timeouts are ConnTimeouts' (hyper's single timer would
        // close idle keep-alive connections after the header timeout).
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_size.0.max(8192) as usize)
        .keep_alive(true);
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
        let requests = Arc::new(RequestCounter::default());
        let io = ConnTimeouts::new(
            TokioIo::new(stream),
            limits.header_read_timeout.0,
            limits.idle_timeout.0,
            requests.clone(),
        );
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let handler = handler.clone();
            let guard = InFlight::enter(requests.clone());
            async move {
                let resp = handler(req, local).await;
                drop(guard);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = graceful.watch(builder.serve_connection(io, svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// Requests of one connection that reached the handler: how many began, how many are
/// still in the handler. Read by [`ConnTimeouts`] to tell request heads from idle time.
#[derive(Default)]
struct RequestCounter {
    started: AtomicU64,
    in_flight: AtomicUsize,
}

/// Counts a request as in flight while alive.
struct InFlight(Arc<RequestCounter>);

impl InFlight {
    fn enter(c: Arc<RequestCounter>) -> Self {
        c.started.fetch_add(1, Ordering::Relaxed);
        c.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connection timeouts hyper does not provide separately:
/// - **header read**: from the first byte of a request head (or the connection's start)
///   until the request reaches the handler, at most `header` (slowloris);
/// - **idle**: between requests, with nothing read or written, at most `idle`.
///
/// A request in flight (handler running) is never timed out here; the upstream timeout
/// covers it. The timer is re-armed lazily, so a read or write costs one `Instant::now()`.
struct ConnTimeouts<T> {
    inner: T,
    idle: Duration,
    header: Duration,
    last_activity: Instant,
    /// When the current request head started arriving; `None` while idle or in flight.
    head_started: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    requests: Arc<RequestCounter>,
    /// `requests.started` when last looked at; a change means a head was completed.
    seen_started: u64,
}

impl<T> ConnTimeouts<T> {
    fn new(inner: T, header: Duration, idle: Duration, requests: Arc<RequestCounter>) -> Self {
        let now = Instant::now();
        ConnTimeouts {
            inner,
            idle,
            header,
            last_activity: now,
            // The first request head must arrive within the header timeout of connecting.
            head_started: Some(now),
            timer: Box::pin(tokio::time::sleep(header.min(idle))),
            requests,
            seen_started: 0,
        }
    }

    /// Clears the head timer once the head it was timing reached the handler.
    fn note_requests(&mut self) {
        let started = self.requests.started.load(Ordering::Relaxed);
        if started != self.seen_started {
            self.seen_started = started;
            self.head_started = None;
        }
    }

    fn activity(&mut self) {
        self.last_activity = Instant::now();
        self.note_requests();
    }

    /// Bytes read while no request is in the handler begin the next request head.
    fn read_activity(&mut self) {
        self.activity();
        if self.head_started.is_none() && self.requests.in_flight.load(Ordering::Relaxed) == 0 {
            self.head_started = Some(self.last_activity);
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            self.note_requests();
            if self.requests.in_flight.load(Ordering::Relaxed) > 0 {
                self.timer.as_mut().reset((now + self.idle).into());
                continue;
            }
            let (deadline, what) = match self.head_started {
                Some(t) => (t + self.header, "request header read timed out"),
                None => (self.last_activity + self.idle, "idle connection closed"),
            };
            if now >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, what));
            }
            self.timer.as_mut().reset(deadline.into());
        }
        Ok(())
    }
}

impl<T: Read + Unpin> Read for ConnTimeouts<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read_activity();
                Poll::Ready(r)
            }
            Poll::Pending => match this.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<T: Write + Unpin> Write for ConnTimeouts<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.activity();
                Poll::Ready(r)
            }
            Poll::Pending => match this.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.activity();
                Poll::Ready(r)
            }
            Poll::Pending => match this.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
