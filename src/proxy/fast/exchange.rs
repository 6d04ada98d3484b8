//! One exchange on the fast path: the credential header added, the request sent on a
//! pooled connection (replaced once if it turns out closed and the request is safe to
//! repeat), one retry after a 401, and the response relayed to the app as it arrives.

use std::time::Instant;

use bytes::Buf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::buffers::reserve;
use super::framing::Framing;
use super::head::{self, BadResponse, Redirects, RequestPlan, ResponseHead, WebSocket};
use super::pool::UpstreamConn;
use super::{Conn, COALESCE_LIMIT, HELD_401_LIMIT, MAX_RESPONSE_HEAD};
use crate::credential::ActiveToken;
use crate::metrics::UpstreamErrorKind;
use crate::proxy::outcome::ProxyError;
use crate::proxy::policy::retry;

/// An exchange that could not be completed; what the app gets depends on whether the
/// response head had been sent.
enum Failed {
    /// Nothing sent to the app yet: answer with this error.
    Before(ProxyError),
    /// The app's connection is unusable (response cut short, app gone).
    After,
}

/// The fast path's side of the 401 sequence: the request is in `conn.out` up to
/// `auth_at`, and the credential header and body are appended for each token.
struct Resend<'r, 'c> {
    conn: &'r mut Conn<'c>,
    plan: &'r mut RequestPlan,
    auth_at: usize,
    /// Bytes of the token put in the query (`plan.token_at`) by the last send.
    in_query: usize,
    /// Where the held 401's body ends in its connection's buffer.
    held_end: usize,
}

impl retry::Resend for Resend<'_, '_> {
    type Answer = (UpstreamConn, ResponseHead);

    fn status((_, resp): &Self::Answer) -> u16 {
        resp.status
    }

    async fn send(&mut self, token: &ActiveToken) -> Result<Self::Answer, ProxyError> {
        if self.conn.reroute(token, self.plan)? {
            self.auth_at = self.conn.out.len();
            self.in_query = 0;
        }
        self.in_query = self
            .conn
            .add_credential(token, self.plan, self.auth_at, self.in_query);
        self.conn.send(self.plan, token).await
    }

    async fn hold(&mut self, (conn, resp): &mut Self::Answer) -> bool {
        // The 401's body is held whole, unless it is too large to wait with.
        match self.conn.hold_body(conn, resp).await {
            Ok(Some(end)) => {
                self.held_end = end;
                true
            }
            Ok(None) | Err(_) => false,
        }
    }

    fn discard(&mut self, (conn, resp): Self::Answer) {
        if resp.reusable && self.held_end == conn.buf.len() && !self.plan.close_upstream {
            self.conn.check_in(conn, &resp, Instant::now());
        }
    }
}

impl Conn<'_> {
    /// Forwards one request and relays its response. Returns whether the app's
    /// connection can carry another request. When the upstream switched a WebSocket
    /// handshake, its connection is left in `self.switched` for the tunnel (and this
    /// returns `false`).
    pub(super) async fn exchange(&mut self, plan: &mut RequestPlan) -> bool {
        let started = Instant::now();
        let up = self.up;
        if plan.websocket == WebSocket::WithBody {
            return self
                .refuse(ProxyError::HandshakeWithBody, plan, started)
                .await;
        }
        let token = match up.credential.acquire_at(started.into()).await {
            Ok(t) => t,
            Err(e) => {
                return self
                    .refuse(ProxyError::NoToken(e.to_string()), plan, started)
                    .await
            }
        };
        let auth_at = self.out.len();
        let mut request = Resend {
            conn: &mut *self,
            plan,
            auth_at,
            in_query: 0,
            held_end: 0,
        };
        let ((conn, resp), _) = match retry::send_with_retry(up, &mut request, token).await {
            Ok(r) => r,
            Err(e) => return self.refuse(e, plan, started).await,
        };
        let plan = &*plan;
        if resp.status == 101 {
            return self.switch(conn, &resp, plan, started).await;
        }
        match self.relay(conn, resp, plan, started).await {
            Ok(keep_open) => keep_open,
            Err(Failed::Before(e)) => self.refuse(e, plan, started).await,
            Err(Failed::After) => false,
        }
    }

    /// For a templated upstream: when `token` names another target than the request was
    /// planned for (a refresh in between, or the 401 retry's newer token), takes that
    /// route and plans the request again for it. Returns whether it did.
    fn reroute(&mut self, token: &ActiveToken, plan: &mut RequestPlan) -> Result<bool, ProxyError> {
        let Some(target) = self.up.token_target(token) else {
            return Ok(false);
        };
        let target = target?;
        if self
            .route
            .as_ref()
            .is_some_and(|r| std::sync::Arc::ptr_eq(&r.target, target))
        {
            return Ok(false);
        }
        self.route = self.fast.routes.to_target(target);
        let Some(route) = &self.route else {
            return Err(ProxyError::Upstream(
                UpstreamErrorKind::Connect,
                "the new token's upstream is reached through an egress proxy; the request was not sent".into(),
            ));
        };
        let rules = super::rules(self.up, self.fast, &route.target);
        match head::plan_request(&self.inbuf, &rules, &mut self.out) {
            head::Parsed::Fast(again) => {
                *plan = again;
                Ok(true)
            }
            _ => Err(ProxyError::BadTarget(
                "the request cannot be sent to the new token's upstream url".into(),
            )),
        }
    }

    /// Returns a connection whose exchange ended cleanly to its route's pool.
    fn check_in(&self, conn: UpstreamConn, resp: &ResponseHead, now: Instant) {
        if let Some(route) = &self.route {
            route.pool.checkin(self.worker, conn, resp.keep_alive, now);
        }
    }

    /// Completes the upstream request in `out`: the token in the query where it goes
    /// there (replacing the `in_query` bytes a previous send put), credential header, end
    /// of head, body. Returns the bytes now in the query.
    fn add_credential(
        &mut self,
        token: &ActiveToken,
        plan: &RequestPlan,
        auth_at: usize,
        in_query: usize,
    ) -> usize {
        let up = self.up;
        self.out.truncate(auth_at + in_query);
        let mut now_in_query = 0;
        if let Some(at) = plan.token_at {
            let tail = self.out.split_off(at + in_query);
            self.out.truncate(at);
            crate::proxy::policy::push_encoded_token(&mut self.out, token.value());
            now_in_query = self.out.len() - at;
            self.out.extend_from_slice(&tail);
        }
        self.out
            .extend_from_slice(up.header_name.as_str().as_bytes());
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(token.header_bytes(up.format));
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out
            .extend_from_slice(&self.inbuf[plan.head_len..plan.head_len + plan.body_len]);
        now_in_query
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
        token: &ActiveToken,
    ) -> Result<(UpstreamConn, ResponseHead), ProxyError> {
        let up = self.up;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(route) = &self.route else {
                return Err(ProxyError::BadTarget("no upstream route".into()));
            };
            let now = Instant::now();
            let (mut conn, now) = match route.pool.checkout(self.worker, now) {
                Some(c) => (c, now),
                None => {
                    let c = route
                        .pool
                        .connect()
                        .await
                        .map_err(|e| ProxyError::Upstream(e.kind(), e.to_string()))?;
                    (c, Instant::now())
                }
            };
            let may_retry = conn.reused && attempt == 1;
            self.dl.set(now + up.config.timeout.0);
            match self.dl.within(conn.stream.send(&self.out)).await {
                None => return Err(ProxyError::Timeout),
                Some(Err(_)) if may_retry => continue,
                Some(Err(e)) => return Err(protocol(format!("sending the request failed: {e}"))),
                Some(Ok(())) => {}
            }
            match self.read_response_head(&mut conn, plan, token).await {
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
        token: &ActiveToken,
    ) -> Result<ResponseHead, HeadError> {
        let host = plan
            .host
            .clone()
            .and_then(|r| std::str::from_utf8(&self.inbuf[r]).ok());
        let local = self.local;
        let local_prefix = || crate::proxy::policy::local_prefix(host, local);
        let upstream_prefix = self
            .route
            .as_ref()
            .map_or("", |r| r.target.upstream_prefix.as_str());
        let redirects = Redirects {
            upstream_prefix,
            local_prefix: &local_prefix,
            query_token: self.up.query_param().map(|p| (p, token.value())),
        };
        let mut any_byte = false;
        loop {
            if !conn.buf.is_empty() {
                any_byte = true;
                // While draining, the app learns this connection ends here.
                let close = self.announce_close() || plan.close;
                match head::rewrite_response(
                    &conn.buf,
                    plan.is_head,
                    close,
                    plan.websocket == WebSocket::Handshake,
                    &redirects,
                    &mut self.head,
                ) {
                    Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                        // Interim responses are not passed on (nothing we send asks for one).
                        conn.buf.advance(h.head_len);
                        continue;
                    }
                    Ok(Some(h)) => {
                        if h.token_header_dropped {
                            crate::proxy::policy::warn_token_header_dropped(&self.up.config.name);
                        }
                        return Ok(h);
                    }
                    Ok(None) if conn.buf.len() > MAX_RESPONSE_HEAD => {
                        return Err(HeadError::Failed(protocol(
                            "response head too large".into(),
                        )))
                    }
                    Ok(None) => {}
                    Err(BadResponse::NotWebSocket(e)) => return Err(HeadError::Failed(e)),
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
    /// connection goes back to the pool if it ended cleanly. A body that goes quiet for
    /// `body_idle_timeout` is cut: the app's connection closes mid-body.
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
        let (emit, crlf) = resp.framing.emit(n, done);
        // One clock read serves the metrics, the write's deadline and the pool.
        let mut now = Instant::now();
        self.record(plan, resp.status, started, now);
        self.dl.set(now + limits.idle_timeout.0);
        let sent = if emit <= COALESCE_LIMIT {
            self.head.extend_from_slice(&body[..emit]);
            if crlf {
                self.head.extend_from_slice(b"\r\n");
            }
            self.dl.within(self.client.write_all(&self.head)).await
        } else {
            match self.dl.within(self.client.write_all(&self.head)).await {
                Some(Ok(())) => self.dl.within(self.client.write_all(&body[..emit])).await,
                other => other,
            }
        };
        if !matches!(sent, Some(Ok(()))) {
            return Err(Failed::After);
        }
        while !done {
            conn.buf.clear();
            reserve(&mut conn.buf);
            self.dl.after(up.config.body_idle_timeout.0);
            let read = self.dl.within(conn.stream.read_buf(&mut conn.buf)).await;
            now = Instant::now();
            match read {
                Some(Ok(0)) if matches!(resp.framing, Framing::UntilClose) => {
                    done = true;
                    continue;
                }
                Some(Ok(n)) if n > 0 => {}
                None => {
                    up.recorder.body_cut(
                        UpstreamErrorKind::Timeout,
                        "no bytes within body_idle_timeout",
                    );
                    return Err(Failed::After);
                }
                _ => {
                    up.recorder
                        .body_cut(UpstreamErrorKind::Other, "the upstream closed or failed");
                    return Err(Failed::After);
                }
            }
            let (n, d) = resp.framing.advance(&conn.buf).map_err(|_| Failed::After)?;
            clean = n == conn.buf.len();
            done = d;
            let (emit, crlf) = resp.framing.emit(n, done);
            if crlf {
                conn.buf.truncate(emit);
                conn.buf.extend_from_slice(b"\r\n");
            }
            let end = if crlf { emit + 2 } else { emit };
            self.dl.set(now + limits.idle_timeout.0);
            match self
                .dl
                .within(self.client.write_all(&conn.buf[..end]))
                .await
            {
                Some(Ok(())) => {}
                _ => return Err(Failed::After),
            }
        }
        if resp.reusable && clean && !plan.close_upstream {
            // Idle from before the last write: its usable time errs short.
            self.check_in(conn, &resp, now);
        }
        Ok(!plan.close && !matches!(resp.framing, Framing::UntilClose))
    }

    /// Sends the app the 101 (with what the upstream sent after its own, the tunnel's
    /// first bytes) and leaves the upstream connection for the tunnel; it is never
    /// pooled. Returns `false`: no request follows on the app's connection.
    async fn switch(
        &mut self,
        conn: UpstreamConn,
        resp: &ResponseHead,
        plan: &RequestPlan,
        started: Instant,
    ) -> bool {
        let now = Instant::now();
        self.record(plan, resp.status, started, now);
        self.head.extend_from_slice(&conn.buf[resp.head_len..]);
        self.dl.set(now + self.up.config.limits.idle_timeout.0);
        if matches!(
            self.dl.within(self.client.write_all(&self.head)).await,
            Some(Ok(()))
        ) {
            self.switched = Some(conn);
        }
        false
    }

    /// Answers with one of our own errors (the shared renderer). Returns whether the
    /// connection stays open.
    pub(super) async fn refuse(
        &mut self,
        e: ProxyError,
        plan: &RequestPlan,
        started: Instant,
    ) -> bool {
        let up = self.up;
        let rendered = up.recorder.refuse(&e);
        let close = self.announce_close() || plan.close || e.closes_connection();
        self.head.clear();
        rendered.write_to(&mut self.head, close, !plan.is_head);
        let now = Instant::now();
        self.record(plan, rendered.status.as_u16(), started, now);
        self.dl.set(now + up.config.limits.idle_timeout.0);
        let sent = self.dl.within(self.client.write_all(&self.head)).await;
        matches!(sent, Some(Ok(()))) && !close
    }

    /// Metrics and the access log line of one answered request.
    fn record(&self, plan: &RequestPlan, status: u16, started: Instant, now: Instant) {
        let recorder = &self.up.recorder;
        if recorder.access_log {
            let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&self.inbuf[r]);
            recorder.record_until(
                &text(plan.method.clone()),
                &text(plan.path.clone()),
                status,
                started,
                now,
            );
        } else {
            recorder.record_until("", "", status, started, now);
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
