//! Message heads on the fast path: a request head from the app becomes the upstream's
//! request head (hop-by-hop and credential headers dropped, `Host` from the upstream),
//! and the upstream's response head becomes the app's (hop-by-hop dropped, redirects
//! rewritten). Anything unusual is declined, and the general path handles it.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::framing::{ChunkedScanner, Framing};
use crate::proxy::headers::rewrite_location_value;

/// httparse's header slots; more than this many headers goes to the general path.
const MAX_HEADERS: usize = 100;

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
    /// The app asked to close the connection after this exchange.
    pub close: bool,
    /// The app waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// The app's `Host` value, in the read buffer (for rewriting redirects).
    pub host: Option<Range<usize>>,
    /// Method and path (without query) in the read buffer, for the access log.
    pub method: Range<usize>,
    pub path: Range<usize>,
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
    if method == "CONNECT" || !target.starts_with('/') {
        return Parsed::Declined;
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(rules.base_path.as_bytes());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(rules.authority.as_bytes());
    out.extend_from_slice(b"\r\n");

    let mut body_len: Option<u64> = None;
    let mut close = false;
    let mut expect_continue = false;
    let mut host = None;
    for h in req.headers.iter() {
        let name = h.name;
        match name.len() {
            4 if name.eq_ignore_ascii_case("host") => {
                host = Some(range_in(buf, h.value));
                continue;
            }
            10 if name.eq_ignore_ascii_case("connection") => {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        // Headers named in Connection must be dropped too: general path.
                        return Parsed::Declined;
                    }
                }
                continue;
            }
            14 if name.eq_ignore_ascii_case("content-length") => {
                let Some(n) = parse_length(h.value) else {
                    return Parsed::Declined;
                };
                if body_len.is_some_and(|b| b != n) {
                    return Parsed::Declined;
                }
                body_len = Some(n);
            }
            13 if name.eq_ignore_ascii_case("authorization") => {
                if rules.reject_authorization {
                    return Parsed::Declined;
                }
                continue;
            }
            _ => {}
        }
        if name.eq_ignore_ascii_case("expect") {
            // 100-continue is answered here, as nginx does; other expectations are not.
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                return Parsed::Declined;
            }
            expect_continue = true;
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("upgrade") {
            return Parsed::Declined;
        }
        if is_hop_by_hop(name) || name.eq_ignore_ascii_case(rules.credential_header) {
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
    let path_end = target.find('?').unwrap_or(target.len());
    let path = range_in(buf, target.as_bytes());
    Parsed::Fast(RequestPlan {
        head_len,
        body_len: body_len as usize,
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        is_head: method == "HEAD",
        close,
        expect_continue: expect_continue && body_len > 0,
        host,
        method: range_in(buf, method.as_bytes()),
        path: path.start..path.start + path_end,
    })
}

/// An upstream response head, rewritten for the app.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the upstream's head, before its body.
    pub head_len: usize,
    pub framing: Framing,
    /// The upstream connection may carry another request afterwards.
    pub reusable: bool,
    /// How long the upstream keeps the connection open when idle (`Keep-Alive: timeout=N`).
    pub keep_alive: Option<std::time::Duration>,
}

/// Why an upstream response head could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum BadResponse {
    /// httparse's error, or a missing/invalid piece.
    Malformed(String),
    /// `101 Switching Protocols` without our asking.
    UnexpectedUpgrade,
}

impl std::fmt::Display for BadResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadResponse::Malformed(why) => write!(f, "invalid response head: {why}"),
            BadResponse::UnexpectedUpgrade => f.write_str("unexpected 101 Switching Protocols"),
        }
    }
}

/// Where the app's redirects should point instead of the upstream.
pub struct Redirects<'a> {
    /// `scheme://authority/base` as the upstream spells its own URLs.
    pub upstream_prefix: &'a str,
    /// The app's `Host` (if any) and the listener's address, to build `http://host`.
    pub local_prefix: &'a (dyn Fn() -> String + Sync),
}

/// Parses a response head from `buf`. `Ok(None)`: incomplete. Interim (1xx) responses
/// are reported with `Framing::Empty` and an empty `out`; the caller skips them.
pub fn rewrite_response(
    buf: &[u8],
    is_head_request: bool,
    app_wants_close: bool,
    redirects: &Redirects<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(BadResponse::Malformed(e.to_string())),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(BadResponse::Malformed("no status".into()));
    };
    out.clear();
    if status == 101 {
        return Err(BadResponse::UnexpectedUpgrade);
    }
    if (100..200).contains(&status) {
        return Ok(Some(ResponseHead {
            status,
            head_len,
            framing: Framing::Empty,
            reusable: true,
            keep_alive: None,
        }));
    }

    // First pass: framing and connection semantics.
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut length: Option<u64> = None;
    let mut upstream_close = version == 0;
    let mut named_by_connection: Vec<&[u8]> = Vec::new();
    let mut keep_alive = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            // Chunked only counts as the last coding (RFC 9112 §6.3).
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value)
                .ok_or_else(|| BadResponse::Malformed("invalid Content-Length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(BadResponse::Malformed("conflicting Content-Length".into()));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("keep-alive") {
            keep_alive = keep_alive_timeout(h.value);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                } else if version == 0 && token.eq_ignore_ascii_case(b"keep-alive") {
                    upstream_close = false;
                } else if !token.is_empty() {
                    named_by_connection.push(token);
                }
            }
        }
    }
    let framing = if is_head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked(ChunkedScanner::default())
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let client_close = app_wants_close || matches!(framing, Framing::UntilClose);

    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let name = h.name;
        let keep_te = chunked && name.eq_ignore_ascii_case("transfer-encoding");
        if (is_hop_by_hop(name) && !keep_te)
            || named_by_connection
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            || (transfer_encoding && name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        if name.eq_ignore_ascii_case("location") || name.eq_ignore_ascii_case("content-location") {
            let rewritten = std::str::from_utf8(h.value).ok().and_then(|v| {
                rewrite_location_value(v, redirects.upstream_prefix, &(redirects.local_prefix)())
            });
            match rewritten {
                Some(v) => out.extend_from_slice(v.as_bytes()),
                None => out.extend_from_slice(h.value),
            }
        } else {
            out.extend_from_slice(h.value);
        }
        out.extend_from_slice(b"\r\n");
    }
    if client_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        status,
        head_len,
        reusable: !upstream_close && !matches!(framing, Framing::UntilClose),
        keep_alive,
        framing,
    }))
}

/// Dropped in both directions: the fixed hop-by-hop set and every `Proxy-*` header.
fn is_hop_by_hop(name: &str) -> bool {
    const FIXED: [&str; 7] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    FIXED.iter().any(|h| h.eq_ignore_ascii_case(name))
        || name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
}

/// `timeout=N` of a `Keep-Alive` header, in seconds.
fn keep_alive_timeout(v: &[u8]) -> Option<std::time::Duration> {
    std::str::from_utf8(v)
        .ok()?
        .split(',')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("timeout"))
        .and_then(|(_, n)| n.trim().parse().ok())
        .map(std::time::Duration::from_secs)
}

/// A Content-Length value: digits only (a list of equal values is declined).
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The position of `part` (a subslice) within `whole`.
fn range_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
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

    #[test]
    fn unusual_requests_are_declined() {
        for head in [
            "GET http://other/ HTTP/1.1\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 99999\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: something-else\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
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

    fn respond(head: &str, is_head: bool) -> (ResponseHead, String) {
        let local = || "http://127.0.0.1:8081".to_string();
        let redirects = Redirects {
            upstream_prefix: "https://api.example.com/v1",
            local_prefix: &local,
        };
        let mut out = Vec::new();
        let h = rewrite_response(head.as_bytes(), is_head, false, &redirects, &mut out)
            .unwrap()
            .unwrap();
        (h, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_head_is_rewritten_for_the_app() {
        let (h, out) = respond(
            "HTTP/1.1 302 Found\r\nLocation: https://api.example.com/v1/next?x=1\r\n\
             Connection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert_eq!(
            out,
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:8081/next?x=1\r\nContent-Length: 0\r\n\r\n"
        );
        assert!(!h.reusable);
        assert!(h.framing.is_done());

        let (h, out) = respond(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(h.framing, Framing::Chunked(_)) && h.reusable);

        let (h, _) = respond(
            "HTTP/1.1 200 OK\r\nKeep-Alive: max=100, timeout=5\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert_eq!(h.keep_alive, Some(std::time::Duration::from_secs(5)));

        let (h, out) = respond("HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(out.ends_with("connection: close\r\n\r\n"));
        assert!(matches!(h.framing, Framing::UntilClose) && !h.reusable);

        let (h, _) = respond("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true);
        assert!(h.framing.is_done());
        let (h, out) = respond("HTTP/1.1 100 Continue\r\n\r\n", false);
        assert_eq!((h.status, out.as_str()), (100, ""));
    }

    #[test]
    fn bad_response_heads_are_named() {
        let local = String::new;
        let redirects = Redirects {
            upstream_prefix: "",
            local_prefix: &local,
        };
        let mut out = Vec::new();
        for head in [
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(
                rewrite_response(head.as_bytes(), false, false, &redirects, &mut out).is_err(),
                "{head:?}"
            );
        }
    }
}
