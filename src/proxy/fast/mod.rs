//! The fast path for upstreams spoken to in HTTP/1.1 (plain or TLS, a fixed url or a
//! url template, see [`routes`]): each app connection is served by one task
//! that parses request heads itself (httparse), writes them to a pooled upstream
//! connection with the credential header added, and relays the response as it comes,
//! tracking where its body ends. No per-request allocation beyond buffers kept for the
//! connection's life, no task per request, one timer per connection.
//!
//! It takes the common case only: HTTP/1.1, origin-form targets, no body or a
//! `Content-Length` body up to the retry limit (held whole, so a 401 can be retried;
//! `Expect: 100-continue` is answered here), and WebSocket handshakes (after the
//! upstream's 101 the connection carries the tunnel until it ends, see
//! `proxy::tunnel`). At the first request that is anything
//! else (chunked or large uploads, other expectations, HTTP/1.0,
//! absolute-form, `CONNECT`, a path escaping the base path, malformed or oversized heads)
//! the connection is handed, with the bytes already read, to the general hyper path for
//! the rest of its life, which forwards or refuses it. Both apply the rules of
//! [`crate::proxy::policy`]; this engine keeps only framing and I/O.

mod buffers;
mod deadline;
mod exchange;
pub mod framing;
pub mod head;
pub mod pool;
mod routes;
mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use std::cell::Cell;

use super::Upstream;
use crate::shutdown::RETIRE_GRACE;
use deadline::Deadline;
use head::{Parsed, RequestPlan, Rules};
use routes::{Route, Routes};

/// A 401's body is held up to this size so it can still be passed on when no newer
/// token can be had; a larger one is passed through without a retry.
const HELD_401_LIMIT: usize = 64 * 1024;
/// Response heads larger than this are refused (hyper's client limit is similar).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How long a refused connection keeps reading after answering (see `Conn::linger`).
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Below this, a response head and the first body bytes are sent in one write.
const COALESCE_LIMIT: usize = 16 * 1024;

/// The fast path's per-upstream state.
pub struct FastPath {
    routes: Routes,
    /// Largest request body taken on the fast path.
    body_limit: u64,
}

impl FastPath {
    /// For upstreams spoken to in HTTP/1.1, directly: plain http, or https without
    /// `http2`; with a fixed url or a url template (each token's origin gets a pool).
    /// `None` for HTTP/2 and for a fixed url an egress proxy tunnels: hyper's.
    pub fn for_upstream(
        up: &crate::config::UpstreamConfig,
        workers: usize,
    ) -> Result<Option<FastPath>, crate::tls::TlsError> {
        Ok(Routes::for_upstream(up, workers)?.map(|routes| FastPath {
            routes,
            body_limit: if up.retry_on_401 {
                up.retry_body_limit.0
            } else {
                64 * 1024
            },
        }))
    }
}

/// How a connection served by the fast path ended.
pub enum End {
    Closed,
    /// The rest of the connection goes to the general path; `read` holds bytes already
    /// read from it (starting with a whole or partial request head).
    Handoff {
        stream: TcpStream,
        read: Bytes,
    },
}

/// Serves one app connection until it closes, times out, or needs the general path.
/// `worker` picks the pool of idle upstream connections (one per listener worker).
pub async fn serve(
    up: Arc<Upstream>,
    client: TcpStream,
    local: SocketAddr,
    worker: usize,
    shutdown: CancellationToken,
) -> End {
    let Some(fast) = up.fast.as_ref() else {
        return End::Handoff {
            stream: client,
            read: Bytes::new(),
        };
    };
    let limits = &up.config.limits;
    let now = Instant::now();
    let mut conn = Conn {
        up: &up,
        fast,
        route: fast.routes.fixed().cloned(),
        client,
        local,
        // Taken from the worker's pool when the first bytes arrive.
        inbuf: BytesMut::new(),
        out: Vec::new(),
        head: Vec::new(),
        opened: now,
        worker,
        shutdown: &shutdown,
        drain_until: None,
        close_announced: Cell::new(false),
        switched: None,
        dl: Deadline::new(now + limits.header_read_timeout.0),
    };
    let mut cancelled = pin!(shutdown.cancelled());
    let mut first = true;
    loop {
        let plan = match conn.next_request(first, cancelled.as_mut()).await {
            Next::Request(plan) => plan,
            Next::Refuse(e, plan) => {
                conn.refuse(e, &plan, Instant::now()).await;
                conn.linger().await;
                break;
            }
            Next::Closed => break,
            Next::Handoff => {
                return End::Handoff {
                    read: conn.inbuf.freeze(),
                    stream: conn.client,
                }
            }
        };
        first = false;
        let mut plan = plan;
        let keep_open = conn.exchange(&mut plan).await;
        conn.inbuf.advance(plan.head_len + plan.body_len);
        if let Some(upstream) = conn.switched.take() {
            conn.tunnel(upstream).await;
            break;
        }
        if conn.close_announced.get() {
            // Retired: the app was told; it reads the answer, not a reset.
            conn.linger().await;
            break;
        }
        if !keep_open || plan.close {
            break;
        }
    }
    buffers::give(conn.release_buffers());
    End::Closed
}

enum Next {
    Request(RequestPlan),
    /// Answer with this error, then close.
    Refuse(crate::proxy::outcome::ProxyError, RequestPlan),
    Closed,
    Handoff,
}

struct Conn<'a> {
    up: &'a Upstream,
    fast: &'a FastPath,
    /// Where the current request goes (a templated upstream's follows the token).
    route: Option<Route>,
    client: TcpStream,
    local: SocketAddr,
    /// Bytes read from the app; the current request starts at 0.
    inbuf: BytesMut,
    /// The upstream request being sent.
    out: Vec<u8>,
    /// The response head being sent to the app.
    head: Vec<u8>,
    /// When the app connected.
    opened: Instant,
    worker: usize,
    /// Cancelled when a reload retires the settings this connection is served by.
    shutdown: &'a CancellationToken,
    /// Once retired: until when an idle connection waits for the app's next request.
    drain_until: Option<Instant>,
    /// The answer sent last said `Connection: close` because the connection is retired.
    close_announced: Cell<bool>,
    /// The upstream connection of a WebSocket handshake the upstream switched.
    switched: Option<pool::UpstreamConn>,
    dl: Deadline,
}

impl Conn<'_> {
    /// Waits for the next request head (and its body), or decides the connection ends.
    async fn next_request(
        &mut self,
        first: bool,
        mut cancelled: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ) -> Next {
        let limits = &self.up.config.limits;
        // The first request head must arrive within the header timeout of connecting;
        // later ones within it of their first byte.
        let mut head_started = if first {
            Some(self.opened)
        } else {
            (!self.inbuf.is_empty()).then(Instant::now)
        };
        let plan = loop {
            if !self.inbuf.is_empty() {
                if !self.follow_token() {
                    return Next::Handoff;
                }
                let Some(route) = &self.route else {
                    return Next::Handoff;
                };
                let rules = rules(self.up, self.fast, &route.target);
                match head::plan_request(&self.inbuf, &rules, &mut self.out) {
                    // A whole head over the limit gets hyper's 431.
                    Parsed::Fast(plan) if plan.head_len > limits.max_header_size.0 as usize => {
                        return Next::Handoff
                    }
                    Parsed::Fast(plan) => break plan,
                    Parsed::Declined => return Next::Handoff,
                    Parsed::Partial if self.inbuf.len() > limits.max_header_size.0 as usize => {
                        return Next::Handoff
                    }
                    Parsed::Partial => {}
                }
            }
            let idle = self.inbuf.is_empty();
            self.note_retired();
            match (head_started, self.drain_until) {
                (Some(t), _) => self.dl.set(t + limits.header_read_timeout.0),
                (None, None) => self.dl.after(limits.idle_timeout.0),
                (None, Some(until)) => self
                    .dl
                    .set(until.min(Instant::now() + limits.idle_timeout.0)),
            }
            // Until retired, an idle wait also ends at the retirement.
            let watch_retire = idle && self.drain_until.is_none();
            if idle {
                let cancel = watch_retire.then_some(cancelled.as_mut());
                match self.wait_without_buffer(cancel).await {
                    Some(true) => {
                        head_started.get_or_insert_with(Instant::now);
                        continue;
                    }
                    Some(false) => {}
                    None if watch_retire && self.shutdown.is_cancelled() => continue,
                    None => return Next::Closed,
                }
            }
            buffers::reserve(&mut self.inbuf);
            let read = {
                let read = pin!(self.client.read_buf(&mut self.inbuf));
                let dl = &mut self.dl;
                let cancelled = cancelled.as_mut();
                read_unless(read, dl, watch_retire.then_some(cancelled)).await
            };
            match read {
                Some(Ok(n)) if n > 0 => {
                    head_started.get_or_insert_with(Instant::now);
                }
                None if watch_retire && self.shutdown.is_cancelled() => continue,
                _ => return Next::Closed,
            }
        };
        let whole = plan.head_len + plan.body_len;
        if self.inbuf.len() >= whole {
            // Head and body are here (most requests): no clock read for a body deadline.
            return Next::Request(plan);
        }
        // The whole body must arrive within body_timeout, however it trickles in.
        let body_deadline = Instant::now() + self.up.config.body_timeout.0;
        if plan.expect_continue && self.inbuf.len() == plan.head_len {
            self.dl.after(limits.idle_timeout.0);
            let sent = self
                .dl
                .within(self.client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"))
                .await;
            if !matches!(sent, Some(Ok(()))) {
                return Next::Closed;
            }
        }
        while self.inbuf.len() < whole {
            self.dl
                .set(body_deadline.min(Instant::now() + limits.idle_timeout.0));
            self.inbuf.reserve(whole - self.inbuf.len());
            match self.dl.within(self.client.read_buf(&mut self.inbuf)).await {
                Some(Ok(n)) if n > 0 => {}
                None if Instant::now() >= body_deadline => {
                    return Next::Refuse(crate::proxy::outcome::ProxyError::BodyTimeout, plan)
                }
                _ => return Next::Closed,
            }
        }
        Next::Request(plan)
    }
}

/// How heads are rewritten for `target`.
fn rules<'r>(up: &'r Upstream, fast: &FastPath, target: &'r crate::target::Target) -> Rules<'r> {
    Rules {
        base_path: &target.base_path,
        authority: target.authority.as_str(),
        credential_header: up.header_name.as_str(),
        reject_authorization: up.config.inbound_authorization
            == crate::config::InboundAuthorization::Reject,
        body_limit: fast.body_limit,
        query: up.query_param(),
    }
}

impl Conn<'_> {
    /// For a templated upstream: takes the route of the current token's target (kept
    /// while the token's target stays the same). `false` when there is none on the fast
    /// path (no token yet, one without the template's field, an egress proxy's origin):
    /// the general engine answers those.
    fn follow_token(&mut self) -> bool {
        if !self.fast.routes.is_templated() {
            return true;
        }
        let Some(token) = self.up.credential.current() else {
            return false;
        };
        match self.up.token_target(&token) {
            Some(Ok(target)) => self.route_to(target).is_some(),
            _ => false,
        }
    }

    /// Makes `target` the current route's (a pool lookup only when it changed).
    fn route_to(&mut self, target: &Arc<crate::target::Target>) -> Option<&Route> {
        let same = self
            .route
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(&r.target, target));
        if !same {
            self.route = self.fast.routes.to_target(target);
        }
        self.route.as_ref()
    }

    /// Waits for the app's next bytes without holding a read buffer: an idle
    /// connection's buffer goes back to the pool. Tries one read first, since the next
    /// request is often there already. `Some(true)`: bytes were read; `Some(false)`: the
    /// socket is readable and `inbuf` is ready to read into; `None`: the connection ends
    /// (closed, timed out, or shutdown began).
    async fn wait_without_buffer(
        &mut self,
        cancelled: Option<std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>>,
    ) -> Option<bool> {
        if self.inbuf.capacity() > 0 {
            buffers::reserve(&mut self.inbuf);
            match self.client.try_read_buf(&mut self.inbuf) {
                Ok(0) => return None,
                Ok(_) => return Some(true),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
            buffers::give(self.release_buffers());
        }
        let ready = {
            let ready = pin!(self.client.readable());
            read_unless(ready, &mut self.dl, cancelled).await
        };
        match ready {
            Some(Ok(())) => {
                let b = buffers::take();
                (self.inbuf, self.out, self.head) = (b.read, b.out, b.head);
                Some(false)
            }
            _ => None,
        }
    }

    /// Starts draining once a reload retired this connection's settings: an idle
    /// connection waits [`RETIRE_GRACE`] more for the app's next request.
    fn note_retired(&mut self) {
        if self.drain_until.is_none() && self.shutdown.is_cancelled() {
            self.drain_until = Some(Instant::now() + RETIRE_GRACE);
        }
    }

    /// Whether the answer being written ends the connection because it is retired
    /// (remembered, so the connection then closes after it).
    fn announce_close(&self) -> bool {
        if self.shutdown.is_cancelled() {
            self.close_announced.set(true);
        }
        self.close_announced.get()
    }

    /// Carries a WebSocket tunnel on this connection until it ends: what the app sent
    /// after its handshake goes first, and the connection's buffers go back to the pool
    /// for the tunnel's life.
    async fn tunnel(&mut self, upstream: pool::UpstreamConn) {
        let mut stream = upstream.stream;
        if !self.inbuf.is_empty() {
            self.dl.after(self.up.config.limits.idle_timeout.0);
            if !matches!(self.dl.within(stream.send(&self.inbuf)).await, Some(Ok(()))) {
                return;
            }
        }
        buffers::give(self.release_buffers());
        super::tunnel::carry(self.up, &mut self.client, &mut stream, self.shutdown).await;
    }

    /// Takes the connection's buffers out, leaving none allocated.
    fn release_buffers(&mut self) -> buffers::Buffers {
        buffers::Buffers {
            read: std::mem::take(&mut self.inbuf),
            out: std::mem::take(&mut self.out),
            head: std::mem::take(&mut self.head),
        }
    }

    /// After refusing a request whose body was still arriving: closes our side first
    /// and reads (and drops) what the app still sends for a moment, so the app reads the
    /// answer instead of a reset (closing with unread bytes sends RST).
    async fn linger(&mut self) {
        let _ = self.client.shutdown().await;
        self.dl.set(Instant::now() + LINGER);
        loop {
            self.inbuf.clear();
            buffers::reserve(&mut self.inbuf);
            match self.dl.within(self.client.read_buf(&mut self.inbuf)).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    }
}

/// A read that also ends (with `None`) when the deadline passes or, if given, when
/// shutdown begins.
async fn read_unless<F: Future>(
    mut read: std::pin::Pin<&mut F>,
    dl: &mut Deadline,
    mut cancelled: Option<std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>>,
) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = read.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(v));
        }
        if let Some(c) = cancelled.as_mut() {
            if c.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(None);
            }
        }
        dl.poll_passed(cx).map(|()| None)
    })
    .await
}
