//! Header rules of the request path: hop-by-hop and `Connection`-named headers (RFC 9110
//! §7.6.1), WebSocket upgrades, bodies and expectations, `Content-Length` repeats, and
//! the head size limit.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::http_names::{connection_may_drop, list_items, HOP_BY_HOP};
use crate::proxy::outcome::ProxyError;

/// Whether a header the app sent is one of the app's own credentials, which never reach
/// the upstream: `Authorization`, and the header tokenrelay puts the credential in.
/// (Where `inbound_authorization: reject`, an app `Authorization` refuses the request
/// instead; the general engine applies that.)
pub fn is_app_credential(name: &str, credential_header: &str) -> bool {
    name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case(credential_header)
}

/// Removes the app's own credentials (see [`is_app_credential`]).
pub fn strip_app_credentials(headers: &mut HeaderMap, credential_header: &HeaderName) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(credential_header);
}

/// Removes hop-by-hop headers: the fixed set, every `Proxy-*` header, and the headers
/// named in `Connection` (framing headers excepted, see [`connection_may_drop`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| list_items(v.as_bytes()))
            .filter(|t| connection_may_drop(t))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if headers.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy {
            headers.remove(name);
        }
    }
}

/// A header field as bytes, name and value: how the rules below also read a head the
/// fast engine parsed itself.
pub type Field<'a> = (&'a [u8], &'a [u8]);

/// The fields of `headers`.
fn fields(headers: &HeaderMap) -> impl Iterator<Item = Field<'_>> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
}

/// Whether an app's request asks to switch to WebSocket: `Connection` lists `upgrade`
/// and `Upgrade` lists `websocket` (RFC 9110 §7.8). Any other upgrade (`h2c`, as Java's
/// default client asks of every http:// request) is ignored, as §7.8 lets a server do:
/// `Upgrade` and `HTTP2-Settings` are hop-by-hop, so they are dropped, and the request is
/// served over HTTP/1.1.
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    asks_websocket(fields(headers))
}

/// [`wants_websocket`] over a head's fields.
pub fn asks_websocket<'a>(fields: impl IntoIterator<Item = Field<'a>>) -> bool {
    let (mut listed, mut offered) = (false, false);
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"connection") {
            listed |= list_items(value).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            offered |= lists_websocket(value);
        }
    }
    listed && offered
}

/// Whether an `Upgrade` value offers WebSocket among its protocols (`name[/version]`).
pub fn lists_websocket(upgrade: &[u8]) -> bool {
    list_items(upgrade).any(is_websocket)
}

fn is_websocket(protocol: &[u8]) -> bool {
    let name = protocol.split(|&b| b == b'/').next().unwrap_or_default();
    name.trim_ascii().eq_ignore_ascii_case(b"websocket")
}

/// Whether an upstream's `101` switched to WebSocket, the one protocol tokenrelay asks
/// for: its `Upgrade` names websocket and nothing else (RFC 9110 §7.8, RFC 6455 §4.1).
/// A 101 to anything else must not be tunnelled as if it were WebSocket.
pub fn switched_to_websocket(headers: &HeaderMap) -> bool {
    upgraded_to_websocket(fields(headers))
}

/// [`switched_to_websocket`] over a head's fields.
pub fn upgraded_to_websocket<'a>(fields: impl IntoIterator<Item = Field<'a>>) -> bool {
    let mut protocols = fields
        .into_iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"upgrade"))
        .flat_map(|(_, value)| list_items(value));
    matches!((protocols.next(), protocols.next()), (Some(p), None) if is_websocket(p))
}

/// The refusal of a 101 that did not switch to WebSocket: it names the first `Upgrade`
/// value of the upstream's answer.
pub fn not_websocket<'a>(fields: impl IntoIterator<Item = Field<'a>>) -> ProxyError {
    let to = fields
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(b"upgrade"))
        .map(|(_, value)| value);
    ProxyError::SwitchedToOtherProtocol(
        String::from_utf8_lossy(to.unwrap_or_default()).into_owned(),
    )
}

/// [`not_websocket`] for a parsed answer.
pub fn not_websocket_in(headers: &HeaderMap) -> ProxyError {
    not_websocket(fields(headers))
}

/// Whether a request carries a body: a `Transfer-Encoding`, or a `Content-Length` other
/// than 0 (RFC 9112 §6.3). A WebSocket handshake cannot forward one.
pub fn has_body(headers: &HeaderMap) -> bool {
    carries_body(fields(headers))
}

/// [`has_body`] over a head's fields.
pub fn carries_body<'a>(fields: impl IntoIterator<Item = Field<'a>>) -> bool {
    fields.into_iter().any(|(name, value)| {
        name.eq_ignore_ascii_case(b"transfer-encoding")
            || (name.eq_ignore_ascii_case(b"content-length") && value.trim_ascii() != b"0")
    })
}

/// Removes `Expect: 100-continue`: the listener answers it itself before reading the
/// body (RFC 9110 §10.1.1), so the upstream gets the body without waiting. Other
/// expectations are the upstream's to answer.
pub fn drop_answered_expectation(headers: &mut HeaderMap) {
    if headers
        .get(header::EXPECT)
        .is_some_and(|v| is_100_continue(v.as_bytes()))
    {
        headers.remove(header::EXPECT);
    }
}

/// Whether an `Expect` value is `100-continue`, the one expectation a listener answers.
pub fn is_100_continue(expect: &[u8]) -> bool {
    expect.trim_ascii().eq_ignore_ascii_case(b"100-continue")
}

/// The two headers of a WebSocket upgrade as tokenrelay sends them, in the handshake to
/// the upstream and in its 101 to the app (hop-by-hop stripping removed the peer's own).
pub const WEBSOCKET_UPGRADE: [(&str, &str); 2] =
    [("connection", "upgrade"), ("upgrade", "websocket")];

/// Puts back the two headers of a WebSocket upgrade ([`WEBSOCKET_UPGRADE`]).
pub fn ask_websocket(headers: &mut HeaderMap) {
    for (name, value) in WEBSOCKET_UPGRADE {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
}

/// Several `Content-Length` values that all agree are sent as one (RFC 9112 §6.3);
/// conflicting ones never get this far (both engines refuse them).
pub fn collapse_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    if let (Some(first), Some(_)) = (values.next(), values.next()) {
        let first = first.clone();
        headers.insert(header::CONTENT_LENGTH, first);
    }
}

/// The size of a request head as sent in its usual form (request line, `name: value`
/// lines, final CRLF), for the exact `max_header_size` check where only the parsed
/// head is at hand.
pub fn head_size(method: &str, target: &str, headers: &HeaderMap) -> usize {
    let line = method.len() + 1 + target.len() + " HTTP/1.1\r\n".len();
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + fields + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_named_and_proxy_headers_but_never_framing() {
        let mut h = HeaderMap::new();
        h.insert(
            "Connection",
            HeaderValue::from_static("keep-alive, X-Custom, content-length"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("Keep-Alive", HeaderValue::from_static("timeout=5"));
        h.insert("TE", HeaderValue::from_static("trailers"));
        h.insert("Upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "HTTP2-Settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        h.insert("Proxy-Authorization", HeaderValue::from_static("Basic x"));
        h.insert("Proxy-Foo", HeaderValue::from_static("x"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.insert("content-length", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x-kept") && h.contains_key("content-length"));
    }

    #[test]
    fn only_a_websocket_upgrade_is_taken_up() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, HeaderValue::from_static(v));
            }
            h
        };
        let upgrade = |connection, upgrade| {
            wants_websocket(&headers(&[
                ("connection", connection),
                ("upgrade", upgrade),
            ]))
        };
        assert!(upgrade("Upgrade", "websocket"));
        assert!(upgrade("keep-alive, UPGRADE", "WebSocket/13"));
        assert!(upgrade("upgrade", "h2c, websocket"));
        assert!(!upgrade("Upgrade, HTTP2-Settings", "h2c"));
        assert!(!upgrade("keep-alive", "websocket"));
        assert!(!wants_websocket(&headers(&[("upgrade", "websocket")])));
    }

    #[test]
    fn a_101_counts_only_for_websocket_and_a_handshake_has_no_body() {
        let one = |name: &'static str, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            h
        };
        assert!(switched_to_websocket(&one("upgrade", "WebSocket")));
        for other in ["h2c", "websocket, h2c", "tls/1.3", ""] {
            assert!(!switched_to_websocket(&one("upgrade", other)), "{other}");
        }
        assert!(!switched_to_websocket(&HeaderMap::new()));
        assert!(has_body(&one("content-length", "5")));
        assert!(has_body(&one("transfer-encoding", "chunked")));
        assert!(!has_body(&one("content-length", "0")));
        assert!(!has_body(&HeaderMap::new()));
    }
}
