//! Header-read and idle timeouts of one hyper-served connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::time::Sleep;

/// Requests of one connection that reached the handler: how many began, how many are
/// still in the handler. Read by [`ConnTimeouts`] to tell request heads from idle time.
#[derive(Default)]
pub struct RequestCounter {
    started: AtomicU64,
    in_flight: AtomicUsize,
}

/// Counts a request as in flight while alive.
pub struct InFlight(Arc<RequestCounter>);

impl InFlight {
    pub fn enter(c: Arc<RequestCounter>) -> Self {
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
/// - **idle**: between requests, with nothing read or written, at most `idle`;
/// - **stalled write**: a response (or tunnel) the app does not read, at most `idle`.
///
/// Otherwise a request in flight (handler running, response body being sent, tunnel
/// open) is not timed out here; the upstream-side timeouts cover it. The timer is re-armed lazily, so a read or write costs one `Instant::now()`.
pub struct ConnTimeouts<T> {
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
    /// Since when a write has been waiting for the app to read.
    write_blocked: Option<Instant>,
}

impl<T> ConnTimeouts<T> {
    pub fn new(inner: T, header: Duration, idle: Duration, requests: Arc<RequestCounter>) -> Self {
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
            write_blocked: None,
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

    fn write_done(&mut self) {
        self.write_blocked = None;
        self.activity();
    }

    fn write_pending(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.write_blocked.get_or_insert_with(Instant::now);
        self.check(cx)
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
                let due = match self.write_blocked {
                    Some(t) if now >= t + self.idle => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the app stopped reading the response",
                        ))
                    }
                    Some(t) => t + self.idle,
                    None => now + self.idle,
                };
                self.timer.as_mut().reset(due.into());
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

impl<T> ConnTimeouts<T> {
    /// Bookkeeping after a write attempt: a finished write clears the write timer, a
    /// pending one arms it (or reports that it ran out).
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match poll {
            Poll::Ready(r) => {
                self.write_done();
                Poll::Ready(r)
            }
            Poll::Pending => match self.write_pending(cx) {
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
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, poll)
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
