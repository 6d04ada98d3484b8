//! The upstream's response head, rewritten for the app: hop-by-hop headers dropped,
//! redirects pointed at the listener, and where the body ends.

use std::borrow::Cow;

use super::{parse_length, MAX_HEADERS};
use crate::proxy::fast::framing::{ChunkedScanner, Framing};
use crate::proxy::policy::{self, rewrite_location_value};

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
    /// A `Location` or `Content-Location` carrying the query token was dropped.
    pub token_header_dropped: bool,
}

/// Why an upstream response head could not be used.
#[derive(Debug)]
pub enum BadResponse {
    /// httparse's error, or a missing/invalid piece.
    Malformed(String),
    /// `101 Switching Protocols` without our asking.
    UnexpectedUpgrade,
    /// A 101 to a WebSocket handshake that switched to something else.
    NotWebSocket(crate::proxy::outcome::ProxyError),
}

impl std::fmt::Display for BadResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadResponse::Malformed(why) => write!(f, "invalid response head: {why}"),
            BadResponse::UnexpectedUpgrade => f.write_str("unexpected 101 Switching Protocols"),
            BadResponse::NotWebSocket(e) => e.fmt(f),
        }
    }
}

/// Where the app's redirects should point instead of the upstream.
pub struct Redirects<'a> {
    /// `scheme://authority/base` as the upstream spells its own URLs.
    pub upstream_prefix: &'a str,
    /// The app's `Host` (if any) and the listener's address, to build `http://host`.
    pub local_prefix: &'a (dyn Fn() -> String + Sync),
    /// `token_query_param` and the token sent: it never comes back to the app.
    pub query_token: Option<(policy::QueryParam<'a>, &'a str)>,
}

/// Parses a response head from `buf`. `Ok(None)`: incomplete. Interim (1xx) responses
/// are reported with `Framing::Empty` and an empty `out`; the caller skips them. To a
/// WebSocket handshake (`websocket`), a 101 that switched to WebSocket is reported with
/// its head for the app in `out`; the connection then carries the tunnel.
pub fn rewrite_response(
    buf: &[u8],
    is_head_request: bool,
    app_wants_close: bool,
    websocket: bool,
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
    if status == 101 && websocket {
        switched_head(&resp, out)?;
        return Ok(Some(ResponseHead {
            status,
            head_len,
            framing: Framing::Empty,
            reusable: false,
            keep_alive: None,
            token_header_dropped: false,
        }));
    }
    if status == 101 {
        return Err(BadResponse::UnexpectedUpgrade);
    }
    if status < 100 {
        return Err(BadResponse::Malformed(format!("status {status:03}")));
    }
    if (100..200).contains(&status) {
        return Ok(Some(ResponseHead {
            status,
            head_len,
            framing: Framing::Empty,
            reusable: true,
            keep_alive: None,
            token_header_dropped: false,
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
            for token in policy::list_items(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                } else if version == 0 && token.eq_ignore_ascii_case(b"keep-alive") {
                    upstream_close = false;
                } else if policy::connection_may_drop(token) {
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
    // httparse guarantees three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length_sent = false;
    let mut token_header_dropped = false;
    for h in resp.headers.iter() {
        let name = h.name;
        let keep_te = chunked && name.eq_ignore_ascii_case("transfer-encoding");
        let is_length = name.eq_ignore_ascii_case("content-length");
        if (policy::is_hop_by_hop(name) && !keep_te)
            || named_by_connection
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            // With chunked coding the length is ignored; equal repeats are sent once.
            || (is_length && (transfer_encoding || length_sent))
        {
            continue;
        }
        length_sent |= is_length;
        if name.eq_ignore_ascii_case("location") || name.eq_ignore_ascii_case("content-location") {
            // The token sent in the query never comes back to the app; this runs first,
            // so only values without it are rewritten.
            let value = match redirects.query_token {
                Some((param, token)) => {
                    let text = String::from_utf8_lossy(h.value);
                    match policy::location_without_token(&text, param, token) {
                        None => {
                            token_header_dropped = true;
                            continue;
                        }
                        Some(Cow::Owned(stripped)) => Cow::Owned(stripped.into_bytes()),
                        Some(Cow::Borrowed(_)) => Cow::Borrowed(h.value),
                    }
                }
                None => Cow::Borrowed(h.value),
            };
            let rewritten = std::str::from_utf8(&value).ok().and_then(|v| {
                rewrite_location_value(v, redirects.upstream_prefix, &(redirects.local_prefix)())
            });
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            match rewritten {
                Some(v) => out.extend_from_slice(v.as_bytes()),
                None => out.extend_from_slice(&value),
            }
        } else {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
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
        token_header_dropped,
    }))
}

/// The app's 101 from the upstream's, which must have switched to WebSocket: its
/// headers without the hop-by-hop ones, and the upgrade headers as tokenrelay sends
/// them (as the general engine answers).
fn switched_head(resp: &httparse::Response<'_, '_>, out: &mut Vec<u8>) -> Result<(), BadResponse> {
    let fields = || resp.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    if !policy::upgraded_to_websocket(fields()) {
        return Err(BadResponse::NotWebSocket(policy::not_websocket(fields())));
    }
    let named: Vec<&[u8]> = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| policy::list_items(h.value))
        .filter(|t| policy::connection_may_drop(t))
        .collect();
    out.extend_from_slice(b"HTTP/1.1 101 ");
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        if policy::is_hop_by_hop(h.name)
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(h.name.as_bytes()))
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in policy::WEBSOCKET_UPGRADE {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn respond(head: &str, is_head: bool) -> (ResponseHead, String) {
        let local = || "http://127.0.0.1:8081".to_string();
        let redirects = Redirects {
            upstream_prefix: "https://api.example.com/v1",
            local_prefix: &local,
            query_token: None,
        };
        let mut out = Vec::new();
        let h = rewrite_response(head.as_bytes(), is_head, false, false, &redirects, &mut out)
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

    /// Redirect rules that touch nothing (no upstream prefix, no query token).
    fn no_redirects() -> Redirects<'static> {
        Redirects {
            upstream_prefix: "",
            local_prefix: &String::new,
            query_token: None,
        }
    }

    /// To a handshake, a 101 to WebSocket goes to the app with the upgrade headers as
    /// tokenrelay sends them; a 101 to anything else is refused, naming it.
    #[test]
    fn a_101_to_a_handshake_switches_only_to_websocket() {
        let redirects = no_redirects();
        let mut out = Vec::new();
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade, X-Hop\r\n\
                    X-Hop: 1\r\nKeep-Alive: 5\r\nSec-WebSocket-Accept: a\r\n\r\nframe";
        let h = rewrite_response(head.as_bytes(), false, false, true, &redirects, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.status, h.head_len, h.reusable),
            (101, head.len() - 5, false)
        );
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: a\r\n\
             connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        let other = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n";
        match rewrite_response(other.as_bytes(), false, false, true, &redirects, &mut out) {
            Err(BadResponse::NotWebSocket(e)) => assert!(e.to_string().contains("h2c"), "{e}"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn bad_response_heads_are_named() {
        let redirects = no_redirects();
        let mut out = Vec::new();
        for head in [
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(
                rewrite_response(head.as_bytes(), false, false, false, &redirects, &mut out)
                    .is_err(),
                "{head:?}"
            );
        }
    }
}
