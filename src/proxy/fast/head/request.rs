//! The app's request head, rewritten for the upstream by the rules of
//! [`crate::proxy::policy`]: hop-by-hop and credential headers dropped, `Host` from the
//! upstream, the target joined to the base path.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::{parse_length, range_in, MAX_HEADERS};
use crate::proxy::policy;

/// What the fast path needs to know about an upstream to rewrite heads.
pub struct Rules<'a> {
    /// Path prefix of the upstream URL without trailing slash.
    pub base_path: &'a str,
    /// `host[:port]` of the upstream, sent as `Host`.
    pub authority: &'a str,
    /// The credential header's name (also dropped from the app's request).
    pub credential_header: &'a str,
    /// `inbound_authorization: reject`.
    pub reject_authorization: bool,
    /// Largest request body taken on the fast path (it is held whole, for a 401 retry).
    pub body_limit: u64,
    /// `token_query_param`: the token also goes in the query, in place of the app's.
    pub query: Option<policy::QueryParam<'a>>,
}

/// A request the fast path forwards.
#[derive(Debug)]
pub struct RequestPlan {
    /// Bytes of the head in the read buffer; the body follows.
    pub head_len: usize,
    pub body_len: usize,
    /// Safe to send again on a fresh connection if a reused one turns out dead.
    pub idempotent: bool,
    /// HEAD: the response has no body whatever its headers say.
    pub is_head: bool,
    /// The upstream connection is not reused after this exchange.
    pub close_upstream: bool,
    /// The app asked to close the connection after this exchange.
    pub close: bool,
    /// The app waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// The app's `Host` value, in the read buffer (for rewriting redirects).
    pub host: Option<Range<usize>>,
    /// Method and path (without query) in the read buffer, for the access log.
    pub method: Range<usize>,
    pub path: Range<usize>,
    /// With `token_query_param`: where in the upstream head the token's query value goes.
    pub token_at: Option<usize>,
    pub websocket: WebSocket,
}

/// Whether a request asks to switch to WebSocket ([`policy::asks_websocket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebSocket {
    No,
    /// A handshake: sent with the upgrade headers, and a 101 starts a tunnel.
    Handshake,
    /// A handshake with a body, which cannot be forwarded: refused.
    WithBody,
}

/// Result of looking at the start of the read buffer.
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// Forward it; the upstream head (without credential header and final CRLF) is in `out`.
    Fast(RequestPlan),
    /// Something the general path handles (or rejects with the right status).
    Declined,
}

/// Parses a request head from `buf` and writes the upstream's version of it to `out`.
pub fn plan_request(buf: &[u8], rules: &Rules<'_>, out: &mut Vec<u8>) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Declined,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Declined;
    };
    if method == "CONNECT" {
        return Parsed::Declined;
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    // Refusals (a path escaping the base path, other targets) are the general path's.
    if policy::write_upstream_target(rules.base_path, method, target, out).is_err() {
        return Parsed::Declined;
    }
    let token_at = match rules.query {
        Some(param) => {
            let start = method.len() + 1;
            let Ok(joined) = String::from_utf8(out.split_off(start)) else {
                return Parsed::Declined;
            };
            policy::push_target_before_token(out, &joined, param);
            Some(out.len())
        }
        None => None,
    };
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(rules.authority.as_bytes());
    out.extend_from_slice(b"\r\n");

    let mut body_len: Option<u64> = None;
    let mut close = false;
    let mut expect_continue = false;
    let mut host = None;
    let mut offers_websocket = false;
    for h in req.headers.iter() {
        let name = h.name;
        match name.len() {
            4 if name.eq_ignore_ascii_case("host") => {
                host = Some(range_in(buf, h.value));
                continue;
            }
            10 if name.eq_ignore_ascii_case("connection") => {
                for token in policy::list_items(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !names_a_hop_by_hop_header(token) {
                        // Other headers named in Connection must be dropped too: general path.
                        return Parsed::Declined;
                    }
                }
                continue;
            }
            14 if name.eq_ignore_ascii_case("content-length") => {
                let Some(n) = parse_length(h.value) else {
                    return Parsed::Declined;
                };
                match body_len {
                    Some(b) if b != n => return Parsed::Declined,
                    // Equal repeats are sent once.
                    Some(_) => continue,
                    None => body_len = Some(n),
                }
            }
            // The general engine refuses it.
            13 if rules.reject_authorization && name.eq_ignore_ascii_case("authorization") => {
                return Parsed::Declined;
            }
            _ => {}
        }
        if name.eq_ignore_ascii_case("expect") {
            // 100-continue is answered here, as nginx does; other expectations are not.
            if !policy::is_100_continue(h.value) {
                return Parsed::Declined;
            }
            expect_continue = true;
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Declined;
        }
        // Looked at whole below when it offers WebSocket; any other upgrade (h2c) is
        // ignored. Either way its hop-by-hop headers are dropped here.
        if name.eq_ignore_ascii_case("upgrade") && policy::lists_websocket(h.value) {
            offers_websocket = true;
        }
        if policy::is_hop_by_hop(name) || policy::is_app_credential(name, rules.credential_header) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > rules.body_limit {
        return Parsed::Declined;
    }
    let fields = || req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let websocket = if !offers_websocket || !policy::asks_websocket(fields()) {
        WebSocket::No
    } else if policy::carries_body(fields()) {
        WebSocket::WithBody
    } else {
        WebSocket::Handshake
    };
    // A handshake asks for the upgrade instead of a close (as the general engine sends it).
    let close_upstream = policy::closes_after(method) && websocket == WebSocket::No;
    if close_upstream {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if websocket == WebSocket::Handshake {
        for (name, value) in policy::WEBSOCKET_UPGRADE {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    let path_end = target.find(['?', '#']).unwrap_or(target.len());
    let path = range_in(buf, target.as_bytes());
    Parsed::Fast(RequestPlan {
        head_len,
        body_len: body_len as usize,
        idempotent: policy::is_idempotent(method),
        is_head: method == "HEAD",
        close_upstream,
        close,
        expect_continue: expect_continue && body_len > 0,
        host,
        method: range_in(buf, method.as_bytes()),
        path: path.start..path.start + path_end,
        token_at,
        websocket,
    })
}

/// A `Connection` token naming a header that is dropped anyway (`keep-alive`,
/// `upgrade`, `http2-settings`, ...): it asks nothing more of the fast path.
fn names_a_hop_by_hop_header(token: &[u8]) -> bool {
    std::str::from_utf8(token).is_ok_and(policy::is_hop_by_hop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules<'static> {
        Rules {
            base_path: "/v1",
            authority: "api.example.com",
            credential_header: "authorization",
            reject_authorization: false,
            body_limit: 1024,
            query: None,
        }
    }

    fn plan(head: &str) -> (Option<RequestPlan>, String) {
        let mut out = Vec::new();
        match plan_request(head.as_bytes(), &rules(), &mut out) {
            Parsed::Fast(p) => (Some(p), String::from_utf8(out).unwrap()),
            Parsed::Partial => panic!("partial"),
            Parsed::Declined => (None, String::new()),
        }
    }

    #[test]
    fn request_head_is_rewritten_for_the_upstream() {
        let (p, out) = plan(
            "POST /a%2Fb?q=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAuthorization: Basic x\r\n\
             Connection: keep-alive\r\nKeep-Alive: 5\r\nProxy-Authorization: y\r\nTE: trailers\r\n\
             X-Kept: yes\r\nContent-Length: 3\r\n\r\nabc",
        );
        let p = p.expect("fast");
        assert_eq!(
            out,
            "POST /v1/a%2Fb?q=1 HTTP/1.1\r\nhost: api.example.com\r\nX-Kept: yes\r\nContent-Length: 3\r\n"
        );
        assert_eq!(p.body_len, 3);
        assert!(!p.idempotent && !p.close && !p.is_head);
    }

    /// Java's default client asks every request to upgrade to h2c: the upgrade is
    /// ignored here too, so such a connection stays on the fast path.
    #[test]
    fn an_h2c_upgrade_stays_on_the_fast_path_without_its_headers() {
        let (p, out) = plan(
            "GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Kept: yes\r\n\r\n",
        );
        assert!(p.is_some(), "handed over");
        assert_eq!(
            out,
            "GET /v1/a HTTP/1.1\r\nhost: api.example.com\r\nX-Kept: yes\r\n"
        );
    }

    /// The app's own `auth` pairs are dropped and the token's place is after `auth=`.
    #[test]
    fn a_query_token_has_its_place_in_the_target() {
        let rules = Rules {
            query: Some(policy::QueryParam {
                name: "auth",
                ignore_case: false,
            }),
            ..rules()
        };
        let mut out = Vec::new();
        let head = b"GET /rest/x.json?start=5&auth=app&y=1 HTTP/1.1\r\nHost: h\r\n\r\n";
        let Parsed::Fast(plan) = plan_request(head, &rules, &mut out) else {
            panic!("declined");
        };
        let at = plan.token_at.expect("a place for the token");
        assert_eq!(&out[..at], b"GET /v1/rest/x.json?start=5&y=1&auth=");
        assert_eq!(&out[at..], b" HTTP/1.1\r\nhost: api.example.com\r\n");
    }

    /// A WebSocket handshake is sent with the upgrade headers as the general engine sends
    /// them; one with a body is marked for refusal; `Upgrade` without `Connection:
    /// upgrade` is an ordinary hop-by-hop header.
    #[test]
    fn a_websocket_handshake_keeps_its_upgrade() {
        let (p, out) = plan(
            "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
             Upgrade: h2c, WebSocket\r\nSec-WebSocket-Key: k\r\n\r\n",
        );
        assert_eq!(p.expect("fast").websocket, WebSocket::Handshake);
        assert_eq!(
            out,
            "GET /v1/chat HTTP/1.1\r\nhost: api.example.com\r\nSec-WebSocket-Key: k\r\n\
             connection: upgrade\r\nupgrade: websocket\r\n"
        );
        let (p, _) = plan(
            "GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\nx",
        );
        assert_eq!(p.expect("fast").websocket, WebSocket::WithBody);
        let (p, out) = plan("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(p.expect("fast").websocket, WebSocket::No);
        assert_eq!(out, "GET /v1/ HTTP/1.1\r\nhost: api.example.com\r\n");
    }

    #[test]
    fn unusual_requests_are_declined() {
        for head in [
            "GET http://other/ HTTP/1.1\r\n\r\n",
            "GET /../x HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 99999\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: something-else\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: x-secret\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\n\r\n",
        ] {
            assert!(plan(head).0.is_none(), "{head:?}");
        }
        let mut out = Vec::new();
        let reject = Rules {
            reject_authorization: true,
            ..rules()
        };
        let head = b"GET / HTTP/1.1\r\nauthorization: x\r\n\r\n";
        assert!(matches!(
            plan_request(head, &reject, &mut out),
            Parsed::Declined
        ));
    }
}
