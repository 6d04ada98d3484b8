//! The fast path for plain-http upstreams: each app connection is served by one task
//! that parses request heads itself (httparse), writes them to a pooled upstream
//! connection with the credential header added, and relays the response as it comes,
//! tracking where its body ends. No per-request allocation beyond buffers kept for the
//! connection's life, no task per request, one timer per connection.
//!
//! It takes the common case only: HTTP/1.1, origin-form targets, no body or a
//! `Content-Length` body up to the retry limit (held whole, so a 401 can be retried;
//! `Expect: 100-continue` is answered here). At the first request that is anything
//! else (chunked or large uploads, other expectations, WebSocket handshakes, HTTP/1.0,
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
use pool::Pool;

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
    pool: Pool,
    /// The upstream's fixed target (templated upstreams never take the fast path).
    target: crate::target::Target,
    /// Largest request body taken on the fast path.
    body_limit: u64,
}

impl FastPath {
    /// For upstreams with a fixed url spoken to in HTTP/1.1, directly (plain http, or
    /// https without `http2` and without an egress proxy); `None` otherwise: HTTP/2,
    /// proxies and url templates (whose authority may change with a token) stay with
    /// hyper.
    pub fn for_upstream(
        up: &crate::config::UpstreamConfig,
        workers: usize,
    ) -> Result<Option<FastPath>, crate::tls::TlsError> {
        let Some(url) = up.url.fixed() else {
            return Ok(None);
        };
        let tls = match url.scheme() {
            "http" => None,
            "https" if !up.http2 && !super::hyper::EgressConnector::tunnels(url) => {
                Some(std::sync::Arc::new(crate::tls::client_config_with_cert(
                    up.ca_file.as_deref(),
                    &[b"http/1.1"],
                    up.client_cert.as_ref().map(|c| &c.files),
                )?))
            }
            _ => return Ok(None),
        };
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Ok(None);
        };
        let endpoint = pool::Endpoint {
            host,
            port,
            tls,
            connect_timeout: up.connect_timeout.0,
        };
        // Each app connection holds at most one upstream connection at a time.
        let Some(pool) = Pool::new(endpoint, up.limits.max_connections, workers) else {
            return Ok(None);
        };
        let Ok(target) = crate::target::Target::of(url) else {
            return Ok(None);
        };
        Ok(Some(FastPath {
            target,
            pool,
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
        let keep_open = conn.exchange(&plan).await;
        conn.inbuf.advance(plan.head_len + plan.body_len);
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
        let fast = self.fast;
        let rules = Rules {
            base_path: &fast.target.base_path,
            authority: fast.target.authority.as_str(),
            credential_header: self.up.header_name.as_str(),
            reject_authorization: self.up.config.inbound_authorization
                == crate::config::InboundAuthorization::Reject,
            body_limit: self.fast.body_limit,
            query: self.up.query_param(),
        };
        // The first request head must arrive within the header timeout of connecting;
        // later ones within it of their first byte.
        let mut head_started = if first {
            Some(self.opened)
        } else {
            (!self.inbuf.is_empty()).then(Instant::now)
        };
        let plan = loop {
            if !self.inbuf.is_empty() {
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

impl Conn<'_> {
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
