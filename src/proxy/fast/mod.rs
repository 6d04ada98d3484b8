//! The fast path for plain-http upstreams: each app connection is served by one task
//! that parses request heads itself (httparse), writes them to a pooled upstream
//! connection with the credential header added, and relays the response as it comes,
//! tracking where its body ends. No per-request allocation beyond buffers kept for the
//! connection's life, no task per request, one timer per connection.
//!
//! It takes the common case only: HTTP/1.1, origin-form targets, no body or a
//! `Content-Length` body up to the retry limit (held whole, so a 401 can be retried;
//! `Expect: 100-continue` is answered here). At the first request that is anything
//! else (chunked or large uploads, other expectations, upgrades, HTTP/1.0,
//! absolute-form, `CONNECT`, malformed or oversized heads) the connection is handed,
//! with the bytes already read, to the general hyper path for the rest of its life,
//! which forwards or refuses it exactly as it always does.

mod deadline;
pub mod framing;
pub mod head;
pub mod pool;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::error::ProxyError;
use super::Upstream;
use crate::credential::ActiveToken;
use crate::metrics::UpstreamErrorKind;
use deadline::Deadline;
use framing::Framing;
use head::{Parsed, Redirects, RequestPlan, ResponseHead, Rules};
use pool::{Pool, UpstreamConn};

/// A 401's body is held up to this size so it can still be passed on when no newer
/// token can be had; a larger one is passed through without a retry.
const HELD_401_LIMIT: usize = 64 * 1024;
/// Response heads larger than this are refused (hyper's client limit is similar).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Below this, a response head and the first body bytes are sent in one write.
const COALESCE_LIMIT: usize = 16 * 1024;

/// The fast path's per-upstream state.
pub struct FastPath {
    pool: Pool,
    /// Largest request body taken on the fast path.
    body_limit: u64,
}

impl FastPath {
    /// For `http://` upstreams; `None` otherwise (TLS and HTTP/2 stay with hyper).
    pub fn for_upstream(up: &crate::config::UpstreamConfig) -> Option<FastPath> {
        let url = &up.url;
        if url.scheme() != "http" {
            return None;
        }
        let port = url.port_or_known_default()?;
        Some(FastPath {
            // Each app connection holds at most one upstream connection at a time.
            pool: Pool::new(
                url.host_str()?,
                port,
                up.connect_timeout.0,
                up.limits.max_connections,
            ),
            body_limit: if up.retry_on_401 {
                up.retry_body_limit.0
            } else {
                64 * 1024
            },
        })
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
pub async fn serve(
    up: Arc<Upstream>,
    client: TcpStream,
    local: SocketAddr,
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
        inbuf: BytesMut::with_capacity(8 * 1024),
        out: Vec::with_capacity(1024),
        head: Vec::with_capacity(1024),
        opened: now,
        dl: Deadline::new(now + limits.header_read_timeout.0),
    };
    let mut cancelled = pin!(shutdown.cancelled());
    let mut first = true;
    loop {
        let plan = match conn.next_request(first, cancelled.as_mut()).await {
            Next::Request(plan) => plan,
            Next::Closed => return End::Closed,
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
        if !keep_open || plan.close || shutdown.is_cancelled() {
            return End::Closed;
        }
    }
}

enum Next {
    Request(RequestPlan),
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
    dl: Deadline,
}

/// An exchange that could not be completed; what the app gets depends on whether the
/// response head had been sent.
enum Failed {
    /// Nothing sent to the app yet: answer with this error.
    Before(ProxyError),
    /// The app's connection is unusable (response cut short, app gone).
    After,
}

impl Conn<'_> {
    /// Waits for the next request head (and its body), or decides the connection ends.
    async fn next_request(
        &mut self,
        first: bool,
        mut cancelled: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ) -> Next {
        let limits = &self.up.config.limits;
        let rules = Rules {
            base_path: &self.up.base_path,
            authority: self.up.authority.as_str(),
            credential_header: self.up.header_name.as_str(),
            reject_authorization: self.up.config.inbound_authorization
                == crate::config::InboundAuthorization::Reject,
            body_limit: self.fast.body_limit,
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
            match head_started {
                Some(t) => self.dl.set(t + limits.header_read_timeout.0),
                None => self.dl.after(limits.idle_timeout.0),
            }
            reserve(&mut self.inbuf);
            let read = {
                let read = pin!(self.client.read_buf(&mut self.inbuf));
                let dl = &mut self.dl;
                let cancelled = cancelled.as_mut();
                read_unless(read, dl, idle.then_some(cancelled)).await
            };
            match read {
                Some(Ok(n)) if n > 0 => {
                    head_started.get_or_insert_with(Instant::now);
                }
                _ => return Next::Closed,
            }
        };
        let whole = plan.head_len + plan.body_len;
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
            self.dl.after(limits.idle_timeout.0);
            self.inbuf.reserve(whole - self.inbuf.len());
            match self.dl.within(self.client.read_buf(&mut self.inbuf)).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return Next::Closed,
            }
        }
        Next::Request(plan)
    }

    /// Forwards one request and relays its response. Returns whether the app's
    /// connection can carry another request.
    async fn exchange(&mut self, plan: &RequestPlan) -> bool {
        let started = Instant::now();
        let up = self.up;
        let token = match up.credential.acquire().await {
            Ok(t) => t,
            Err(e) => {
                return self
                    .answer_error(ProxyError::NoToken(e.to_string()), plan, started)
                    .await
            }
        };
        let auth_at = self.out.len();
        self.add_credential(&token, plan, auth_at);
        let (mut conn, mut resp) = match self.send(plan).await {
            Ok(r) => r,
            Err(e) => return self.answer_error(e, plan, started).await,
        };

        if resp.status == 401 && up.config.retry_on_401 {
            match self
                .retry_after_401(&token, plan, auth_at, conn, resp)
                .await
            {
                Ok(r) => (conn, resp) = r,
                Err(e) => return self.answer_error(e, plan, started).await,
            }
        }
        match self.relay(conn, resp, plan, started).await {
            Ok(keep_open) => keep_open,
            Err(Failed::Before(e)) => self.answer_error(e, plan, started).await,
            Err(Failed::After) => false,
        }
    }

    /// Completes the upstream request in `out`: credential header, end of head, body.
    fn add_credential(&mut self, token: &ActiveToken, plan: &RequestPlan, auth_at: usize) {
        let up = self.up;
        self.out.truncate(auth_at);
        self.out
            .extend_from_slice(up.header_name.as_str().as_bytes());
        self.out.extend_from_slice(b": ");
        self.out
            .extend_from_slice(crate::credential::Credential::header_bytes(token, up.slot));
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out
            .extend_from_slice(&self.inbuf[plan.head_len..plan.head_len + plan.body_len]);
    }

    /// After a 401: a newer token and the request sent again, or the 401 itself when no
    /// newer token comes (or its body is too large to hold while waiting).
    async fn retry_after_401(
        &mut self,
        token: &ActiveToken,
        plan: &RequestPlan,
        auth_at: usize,
        mut conn: UpstreamConn,
        resp: ResponseHead,
    ) -> Result<(UpstreamConn, ResponseHead), ProxyError> {
        let up = self.up;
        let held_end = match self.hold_body(&mut conn, &resp).await {
            Ok(Some(end)) => end,
            Ok(None) | Err(_) => {
                // Pass the 401 through; the next request should find a fresh token.
                up.metrics.retry_skipped.inc();
                let cred = up.credential.clone();
                let generation = token.generation;
                tokio::spawn(async move {
                    let _ = cred.after_401(generation).await;
                });
                return Ok((conn, resp));
            }
        };
        let fresh = match up.credential.after_401(token.generation).await {
            Ok(t) => t,
            Err(e) => {
                up.metrics.retry_failure.inc();
                warn!(upstream = %up.config.name, error = %e, "upstream answered 401 and no newer token is available; passing it through");
                return Ok((conn, resp));
            }
        };
        if resp.reusable && held_end == conn.buf.len() {
            self.fast.pool.checkin(conn, resp.keep_alive);
        }
        self.add_credential(&fresh, plan, auth_at);
        let (conn, resp) = self.send(plan).await?;
        if resp.status == 401 {
            up.metrics.retry_failure.inc();
        } else {
            up.metrics.retry_success.inc();
        }
        Ok((conn, resp))
    }

    /// Reads a response's whole body into `conn.buf` if it fits in [`HELD_401_LIMIT`]:
    /// `Some(end)` with the offset where it ends, `None` if it does not fit.
    async fn hold_body(
        &mut self,
        conn: &mut UpstreamConn,
        resp: &ResponseHead,
    ) -> Result<Option<usize>, ()> {
        let mut framing = resp.framing.clone();
        let mut scanned = resp.head_len;
        loop {
            let (n, done) = framing.advance(&conn.buf[scanned..]).map_err(|_| ())?;
            scanned += n;
            if done {
                return Ok(Some(scanned));
            }
            if conn.buf.len() - resp.head_len > HELD_401_LIMIT {
                return Ok(None);
            }
            self.dl.after(self.up.config.timeout.0);
            reserve(&mut conn.buf);
            match self.dl.within(conn.stream.read_buf(&mut conn.buf)).await {
                Some(Ok(n)) if n > 0 => {}
                // The end of a close-delimited body: it is all here.
                Some(Ok(_)) if matches!(framing, Framing::UntilClose) => return Ok(Some(scanned)),
                _ => return Err(()),
            }
        }
    }

    /// Sends `out` upstream and reads the response head. A reused connection that turns
    /// out closed before answering is replaced once, for requests safe to repeat.
    async fn send(
        &mut self,
        plan: &RequestPlan,
    ) -> Result<(UpstreamConn, ResponseHead), ProxyError> {
        let up = self.up;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut conn = match self.fast.pool.checkout() {
                Some(c) => c,
                None => self.fast.pool.connect().await.map_err(|e| {
                    let kind = if e.kind() == std::io::ErrorKind::TimedOut {
                        UpstreamErrorKind::Timeout
                    } else {
                        UpstreamErrorKind::Connect
                    };
                    ProxyError::Upstream(kind, e.to_string())
                })?,
            };
            let may_retry = conn.reused && attempt == 1;
            self.dl.after(up.config.timeout.0);
            match self.dl.within(conn.stream.write_all(&self.out)).await {
                None => return Err(ProxyError::Timeout),
                Some(Err(_)) if may_retry => continue,
                Some(Err(e)) => return Err(protocol(format!("sending the request failed: {e}"))),
                Some(Ok(())) => {}
            }
            match self.read_response_head(&mut conn, plan).await {
                Ok(resp) => return Ok((conn, resp)),
                Err(HeadError::ClosedEarly) if may_retry && plan.idempotent => continue,
                Err(HeadError::ClosedEarly) => {
                    return Err(protocol(
                        "the upstream closed the connection before answering".into(),
                    ))
                }
                Err(HeadError::Failed(e)) => return Err(e),
            }
        }
    }

    async fn read_response_head(
        &mut self,
        conn: &mut UpstreamConn,
        plan: &RequestPlan,
    ) -> Result<ResponseHead, HeadError> {
        let up = self.up;
        let host = plan
            .host
            .clone()
            .and_then(|r| std::str::from_utf8(&self.inbuf[r]).ok());
        let local = self.local;
        let local_prefix = || super::local_prefix(host, local);
        let redirects = Redirects {
            upstream_prefix: &up.upstream_prefix,
            local_prefix: &local_prefix,
        };
        let mut any_byte = false;
        loop {
            if !conn.buf.is_empty() {
                any_byte = true;
                match head::rewrite_response(
                    &conn.buf,
                    plan.is_head,
                    plan.close,
                    &redirects,
                    &mut self.head,
                ) {
                    Ok(Some(h)) if (100..200).contains(&h.status) => {
                        // Interim responses are not passed on (nothing we send asks for one).
                        conn.buf.advance(h.head_len);
                        continue;
                    }
                    Ok(Some(h)) => return Ok(h),
                    Ok(None) if conn.buf.len() > MAX_RESPONSE_HEAD => {
                        return Err(HeadError::Failed(protocol(
                            "response head too large".into(),
                        )))
                    }
                    Ok(None) => {}
                    Err(e) => return Err(HeadError::Failed(protocol(e.to_string()))),
                }
            }
            reserve(&mut conn.buf);
            match self.dl.within(conn.stream.read_buf(&mut conn.buf)).await {
                None => return Err(HeadError::Failed(ProxyError::Timeout)),
                Some(Ok(n)) if n > 0 => {}
                Some(Ok(_)) | Some(Err(_)) if !any_byte => return Err(HeadError::ClosedEarly),
                Some(Ok(_)) => {
                    return Err(HeadError::Failed(protocol(
                        "the upstream closed the connection in the middle of the response head"
                            .into(),
                    )))
                }
                Some(Err(e)) => {
                    return Err(HeadError::Failed(protocol(format!(
                        "reading the response failed: {e}"
                    ))))
                }
            }
        }
    }

    /// Sends the response head and relays the body until its end; the upstream
    /// connection goes back to the pool if it ended cleanly.
    async fn relay(
        &mut self,
        mut conn: UpstreamConn,
        mut resp: ResponseHead,
        plan: &RequestPlan,
        started: Instant,
    ) -> Result<bool, Failed> {
        let up = self.up;
        let limits = &up.config.limits;
        let body = &conn.buf[resp.head_len..];
        let (n, mut done) = resp
            .framing
            .advance(body)
            .map_err(|_| Failed::Before(protocol("invalid chunked response body".into())))?;
        let mut clean = n == body.len();
        self.record(plan, resp.status, started);
        self.dl.after(limits.idle_timeout.0);
        let sent = if n <= COALESCE_LIMIT {
            self.head.extend_from_slice(&body[..n]);
            self.dl.within(self.client.write_all(&self.head)).await
        } else {
            match self.dl.within(self.client.write_all(&self.head)).await {
                Some(Ok(())) => self.dl.within(self.client.write_all(&body[..n])).await,
                other => other,
            }
        };
        if !matches!(sent, Some(Ok(()))) {
            return Err(Failed::After);
        }
        while !done {
            conn.buf.clear();
            reserve(&mut conn.buf);
            self.dl.after(up.config.timeout.0);
            match self.dl.within(conn.stream.read_buf(&mut conn.buf)).await {
                Some(Ok(0)) if matches!(resp.framing, Framing::UntilClose) => {
                    done = true;
                    continue;
                }
                Some(Ok(n)) if n > 0 => {}
                _ => {
                    warn!(upstream = %up.config.name, "upstream response body cut short");
                    up.metrics.error(UpstreamErrorKind::Other);
                    return Err(Failed::After);
                }
            }
            let (n, d) = resp.framing.advance(&conn.buf).map_err(|_| Failed::After)?;
            clean = n == conn.buf.len();
            done = d;
            self.dl.after(limits.idle_timeout.0);
            match self.dl.within(self.client.write_all(&conn.buf[..n])).await {
                Some(Ok(())) => {}
                _ => return Err(Failed::After),
            }
        }
        if resp.reusable && clean {
            self.fast.pool.checkin(conn, resp.keep_alive);
        }
        Ok(!plan.close && !matches!(resp.framing, Framing::UntilClose))
    }

    /// Answers with one of our JSON errors. Returns whether the connection stays open.
    async fn answer_error(&mut self, e: ProxyError, plan: &RequestPlan, started: Instant) -> bool {
        let up = self.up;
        up.report_error(&e);
        let status = e.status();
        let body = super::error::json_body(&e.message(), &up.config.name, &up.credential.name);
        self.head.clear();
        self.head.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\n{}\r\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                body.len(),
                if plan.close { "connection: close\r\n" } else { "" },
            )
            .as_bytes(),
        );
        if !plan.is_head {
            self.head.extend_from_slice(body.as_bytes());
        }
        self.record(plan, status.as_u16(), started);
        self.dl.after(up.config.limits.idle_timeout.0);
        matches!(
            self.dl.within(self.client.write_all(&self.head)).await,
            Some(Ok(()))
        )
    }

    /// Metrics and the access log line of one answered request.
    fn record(&self, plan: &RequestPlan, status: u16, started: Instant) {
        let up = self.up;
        let elapsed = started.elapsed();
        up.metrics.count(status);
        up.metrics.duration.observe(elapsed.as_secs_f64());
        if up.access_log {
            let text =
                |r: std::ops::Range<usize>| String::from_utf8_lossy(&self.inbuf[r]).into_owned();
            info!(target: "tokenrelay::access", upstream = %up.config.name, method = %text(plan.method.clone()),
                path = %text(plan.path.clone()), status, duration_ms = elapsed.as_secs_f64() * 1e3, "request");
        }
    }
}

enum HeadError {
    /// The connection closed before a single byte of response.
    ClosedEarly,
    Failed(ProxyError),
}

fn protocol(detail: String) -> ProxyError {
    ProxyError::Upstream(UpstreamErrorKind::Other, detail)
}

/// Makes room to read into.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
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
