//! The request-path rules of both engines, over bytes and `HeaderMap`s: hop-by-hop and
//! `Connection`-named headers (RFC 9110 §7.6.1), credential header names, the request
//! target joined to the base path (dot-segments removed, RFC 3986 §5.2.4), own-authority
//! checks, idempotency, `Location` rewriting, and the head size limit. The fast path
//! and the hyper path both call these, so a rule changed here changes in both.

use std::borrow::Cow;
use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

use super::outcome::ProxyError;
use crate::http_names::HOP_BY_HOP;
pub use crate::http_names::{connection_may_drop, is_hop_by_hop, list_items};

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

/// Whether an app's request asks to switch to WebSocket: `Connection` lists `upgrade`
/// and `Upgrade` lists `websocket` (RFC 9110 §7.8). Any other upgrade (`h2c`, as Java's
/// default client asks of every http:// request) is ignored, as §7.8 lets a server do:
/// `Upgrade` and `HTTP2-Settings` are hop-by-hop, so they are dropped, and the request is
/// served over HTTP/1.1.
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    let listed = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()))
        .any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    listed
        && headers
            .get_all(header::UPGRADE)
            .iter()
            .any(|v| lists_websocket(v.as_bytes()))
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
    let mut protocols = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()));
    matches!((protocols.next(), protocols.next()), (Some(p), None) if is_websocket(p))
}

/// Whether a request carries a body: a `Transfer-Encoding`, or a `Content-Length` other
/// than 0 (RFC 9112 §6.3). A WebSocket handshake cannot forward one.
pub fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes().trim_ascii() != b"0")
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

/// Puts back the two headers of a WebSocket upgrade (after hop-by-hop stripping
/// removed them): in the handshake to the upstream and in its 101 to the app.
pub fn ask_websocket(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
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

/// The query parameter that carries the token (`token_query_param`), and whether the
/// provider reads parameter names case-insensitively.
#[derive(Clone, Copy, Debug)]
pub struct QueryParam<'a> {
    pub name: &'a str,
    pub ignore_case: bool,
}

impl QueryParam<'_> {
    /// Whether `raw`, a name as spelt in a query (percent-encoded, `+` for a space),
    /// names this parameter: `%61uth` is `auth` to any server that decodes the query.
    fn is_named_by(&self, raw: &str) -> bool {
        let decoded = if raw.contains(['%', '+']) {
            url::form_urlencoded::parse(raw.as_bytes())
                .next()
                .map_or(Cow::Borrowed(""), |(name, _)| name)
        } else {
            Cow::Borrowed(raw)
        };
        if self.ignore_case {
            decoded.eq_ignore_ascii_case(self.name)
        } else {
            decoded == self.name
        }
    }

    /// The pairs of `query` that do not name this parameter, as they were spelt (empty
    /// pairs dropped).
    fn other_pairs<'q>(self, query: &'q str) -> impl Iterator<Item = &'q str> + 'q
    where
        Self: 'q,
    {
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(move |p| !self.is_named_by(p.split_once('=').map_or(p, |(n, _)| n)))
    }
}

/// `target` with the token as query parameter `param`: pairs naming it that the app
/// sent, in any spelling, are dropped (its own token must not reach the upstream, and
/// the upstream sees exactly one), and `name=<token>`, form encoded, is appended.
pub fn with_query_token(target: &str, param: QueryParam<'_>, token: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = String::with_capacity(target.len() + param.name.len() + token.len() + 2);
    out.push_str(path);
    out.push('?');
    for pair in param.other_pairs(query) {
        out.push_str(pair);
        out.push('&');
    }
    out.push_str(param.name);
    out.push('=');
    out.extend(url::form_urlencoded::byte_serialize(token.as_bytes()));
    out
}

/// `url` without the pairs of its query that name `param`; `None` when it has none.
pub fn without_query_param(url: &str, param: QueryParam<'_>) -> Option<String> {
    let (head, rest) = url.split_once('?')?;
    let (query, fragment) = rest.split_at(rest.find('#').unwrap_or(rest.len()));
    let named = |p: &str| param.is_named_by(p.split_once('=').map_or(p, |(n, _)| n));
    if !query.split('&').any(named) {
        return None;
    }
    let kept: Vec<&str> = param.other_pairs(query).collect();
    let mut out = head.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    out.push_str(fragment);
    Some(out)
}

/// Keeps a token sent in the query out of the app's `Location` and `Content-Location`
/// (an upstream redirect that keeps the query would hand it over): pairs naming `param`
/// are removed before the value is rewritten to the listener, and a value that still
/// carries the token elsewhere (another parameter, the path, a fragment) is dropped,
/// never passed on or rewritten. Returns whether a header was dropped.
pub fn keep_query_token_out(headers: &mut HeaderMap, param: QueryParam<'_>, token: &str) -> bool {
    let mut dropped = false;
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name) else {
            continue;
        };
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let stripped = without_query_param(&text, param);
        let now = stripped.as_deref().unwrap_or(&text);
        if carries_token(now, token) {
            headers.remove(&name);
            dropped = true;
        } else if let Some(stripped) = stripped {
            match HeaderValue::from_str(&stripped) {
                Ok(v) => {
                    headers.insert(name, v);
                }
                Err(_) => {
                    headers.remove(&name);
                }
            }
        }
    }
    dropped
}

/// Whether `text` holds `token`, as it is or form encoded as it went in the query.
fn carries_token(text: &str, token: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    let encoded: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
    text.contains(token) || text.contains(&encoded)
}

/// The request target for the upstream: `*` as it is (only `OPTIONS` may use it), else
/// the path with its dot-segments removed, joined to `base_path`. A path whose `..`
/// segments would climb out of the base path is refused, also where only a lenient
/// server would read them as such (see [`climbs_out_when_read_leniently`]). A
/// `#fragment` is dropped.
pub fn upstream_target<'a>(
    base_path: &str,
    method: &str,
    target: &'a str,
) -> Result<Cow<'a, str>, ProxyError> {
    let target = without_fragment(target);
    Ok(match split_target(method, target)? {
        None => Cow::Borrowed(target),
        Some((Cow::Borrowed(_), _)) if base_path.is_empty() => Cow::Borrowed(target),
        Some((path, query)) => Cow::Owned(format!("{base_path}{path}{query}")),
    })
}

/// [`upstream_target`], written to `out` (no allocation unless dot-segments are removed).
pub fn write_upstream_target(
    base_path: &str,
    method: &str,
    target: &str,
    out: &mut Vec<u8>,
) -> Result<(), ProxyError> {
    let target = without_fragment(target);
    match split_target(method, target)? {
        None => out.extend_from_slice(target.as_bytes()),
        Some((path, query)) => {
            out.extend_from_slice(base_path.as_bytes());
            out.extend_from_slice(path.as_bytes());
            out.extend_from_slice(query.as_bytes());
        }
    }
    Ok(())
}

/// `None` for `OPTIONS *`; else the normalised path and the query (with its `?`).
fn split_target<'a>(
    method: &str,
    target: &'a str,
) -> Result<Option<(Cow<'a, str>, &'a str)>, ProxyError> {
    if target == "*" && method == "OPTIONS" {
        return Ok(None);
    }
    if !target.starts_with('/') {
        return Err(ProxyError::BadTarget(
            "the request target must be a path".into(),
        ));
    }
    let (path, query) = match target.find('?') {
        Some(i) => target.split_at(i),
        None => (target, ""),
    };
    let path = remove_dot_segments(path).ok_or(ProxyError::PathEscape)?;
    if climbs_out_when_read_leniently(&path) {
        return Err(ProxyError::PathEscape);
    }
    Ok(Some((path, query)))
}

/// `target` without its `#fragment`, which is no part of a request target (RFC 9112
/// §3.2). hyper's URI parser drops it silently; the fast path does the same here, so
/// both engines forward (and check) the same target.
pub fn without_fragment(target: &str) -> &str {
    target.split_once('#').map_or(target, |(t, _)| t)
}

/// Whether `path` (free of dot-segments as RFC 3986 reads them) climbs above its root
/// as some servers read it: a segment's `;parameters` dropped (`..;` is `..` to Tomcat
/// and Spring), `%2f`, `%2F`, `%5c`, `%5C` and `\` taken as separators, and empty
/// segments merged. Such a path could leave the base path on the upstream, so it is
/// refused; one that stays inside under this reading too is forwarded as it is.
fn climbs_out_when_read_leniently(path: &str) -> bool {
    // The common path has none of these and costs one scan.
    if !path.bytes().any(|b| matches!(b, b'%' | b';' | b'\\')) {
        return false;
    }
    let mut depth = 0usize;
    let mut climbs_out = false;
    for_each_lenient_segment(path, |segment| {
        let name = segment.split(';').next().unwrap_or_default();
        match dots(name) {
            2 if depth == 0 => climbs_out = true,
            2 => depth -= 1,
            1 => {}
            _ if name.is_empty() => {}
            _ => depth += 1,
        }
        !climbs_out
    });
    climbs_out
}

/// Calls `f` with each segment of `path` split at `/`, `\`, `%2f` and `%5c` (any case),
/// until it returns false.
fn for_each_lenient_segment(path: &str, mut f: impl FnMut(&str) -> bool) {
    let bytes = path.as_bytes();
    let separator_len = |i: usize| -> usize {
        match bytes[i] {
            b'/' | b'\\' => 1,
            b'%' if matches!(
                bytes.get(i + 1..i + 3),
                Some([b'2', b'f' | b'F'] | [b'5', b'c' | b'C'])
            ) =>
            {
                3
            }
            _ => 0,
        }
    };
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        match separator_len(i) {
            0 => i += 1,
            n => {
                if !f(&path[start..i]) {
                    return;
                }
                i += n;
                start = i;
            }
        }
    }
    f(&path[start..]);
}

/// A dot-segment, also percent-encoded: 1 for `.`, 2 for `..`, 0 otherwise.
fn dots(segment: &str) -> u8 {
    let s = segment.as_bytes();
    // The length of a dot (`.` or `%2e`) starting at `i`.
    let dot_len = |i: usize| -> Option<usize> {
        match s.get(i)? {
            b'.' => Some(1),
            b'%' if s.get(i + 1) == Some(&b'2')
                && s.get(i + 2).is_some_and(|c| *c == b'e' || *c == b'E') =>
            {
                Some(3)
            }
            _ => None,
        }
    };
    let Some(a) = dot_len(0) else { return 0 };
    if a == s.len() {
        return 1;
    }
    match dot_len(a) {
        Some(b) if a + b == s.len() => 2,
        _ => 0,
    }
}

/// RFC 3986 §5.2.4 on an absolute path; `None` if a `..` would climb above the root.
/// Borrowed when the path has no dot-segment (the common case costs no allocation).
pub fn remove_dot_segments(path: &str) -> Option<Cow<'_, str>> {
    if !path.split('/').any(|s| dots(s) > 0) {
        return Some(Cow::Borrowed(path));
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match dots(seg) {
            1 => {
                if i == last {
                    out.push("");
                }
            }
            2 => {
                out.pop()?;
                if i == last {
                    out.push("");
                }
            }
            _ => out.push(seg),
        }
    }
    Some(Cow::Owned(format!("/{}", out.join("/"))))
}

/// Safe to send again on a fresh connection when a reused one turns out closed.
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// HEAD asks the upstream to close afterwards, and its connection is never reused:
/// a body some servers send after a HEAD response would otherwise be read as the
/// next request's response.
pub fn closes_after(method: &str) -> bool {
    method == "HEAD"
}

/// An absolute-form target is accepted only for the upstream itself or this listener
/// (`upstream` is `None` while a templated upstream's authority is not known).
pub fn is_own_authority(a: &Authority, upstream: Option<&Authority>, local: SocketAddr) -> bool {
    if upstream.is_some_and(|u| a.as_str().eq_ignore_ascii_case(u.as_str())) {
        return true;
    }
    let port_ok = a.port_u16() == Some(local.port());
    let host = a.host().trim_start_matches('[').trim_end_matches(']');
    port_ok
        && (host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                // A dual-stack listener sees its IPv4 address as ::ffff:a.b.c.d.
                .is_ok_and(|ip| ip.to_canonical() == local.ip().to_canonical()))
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

/// `http://<host the app used>` for rewritten redirects; falls back to the socket address.
pub fn local_prefix(host: Option<&str>, local: SocketAddr) -> String {
    host.filter(|h| h.parse::<Authority>().is_ok())
        .map(|h| format!("http://{h}"))
        .unwrap_or_else(|| format!("http://{local}"))
}

/// Rewrites `Location` and `Content-Location` values that start with `upstream_prefix`
/// (the upstream's origin and base path) to start with `local_prefix` instead, so an app
/// following a redirect stays behind the proxy (as nginx's `proxy_redirect default`).
pub fn rewrite_locations(headers: &mut HeaderMap, upstream_prefix: &str, local_prefix: &str) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(rewritten) = rewrite_location_value(value, upstream_prefix, local_prefix) {
            if let Ok(v) = HeaderValue::from_str(&rewritten) {
                headers.insert(name, v);
            }
        }
    }
}

pub fn rewrite_location_value(
    value: &str,
    upstream_prefix: &str,
    local_prefix: &str,
) -> Option<String> {
    // Scheme and host compare case-insensitively; the path part exactly.
    let head = value.get(..upstream_prefix.len())?;
    if !head.eq_ignore_ascii_case(upstream_prefix) {
        return None;
    }
    let rest = &value[upstream_prefix.len()..];
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        // `https://api.example.com.evil` or `/v1beta` under base `/v1`: not ours.
        return None;
    }
    let rest = if rest.is_empty() { "/" } else { rest };
    let rest = if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    };
    Some(format!("{local_prefix}{rest}"))
}

#[cfg(test)]
mod tests {
    /// An absolute-form target naming this listener is its own authority, also on a
    /// dual-stack listener, which sees its IPv4 address in mapped form.
    #[test]
    fn own_authority_on_a_dual_stack_listener() {
        let a: Authority = "127.0.0.1:8081".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:8081".parse().unwrap();
        assert!(is_own_authority(&a, None, mapped));
        let plain: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        assert!(is_own_authority(&a, None, plain));
        let other: SocketAddr = "[::ffff:127.0.0.2]:8081".parse().unwrap();
        assert!(!is_own_authority(&a, None, other));
    }

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

    #[test]
    fn targets_are_joined_without_dot_segments() {
        let t = |base, target| upstream_target(base, "GET", target).map(|c| c.into_owned());
        assert_eq!(t("", "/a/b?x=/../").unwrap(), "/a/b?x=/../");
        assert_eq!(t("/v1", "/a").unwrap(), "/v1/a");
        assert_eq!(t("/v1", "/a/./b/../c").unwrap(), "/v1/a/c");
        assert_eq!(t("/v1", "/a/%2E%2e/c").unwrap(), "/v1/c");
        assert_eq!(t("/v1", "/a/..").unwrap(), "/v1/");
        assert_eq!(t("/v1", "/.").unwrap(), "/v1/");
        assert_eq!(t("/v1", "/a..b/.c").unwrap(), "/v1/a..b/.c");
        for escape in ["/..", "/../x", "/a/../../x", "/%2e%2e/x", "/.%2E/x"] {
            assert!(
                matches!(t("/v1", escape), Err(ProxyError::PathEscape)),
                "{escape}"
            );
        }
        for escape in [
            "/..;/x",
            "/a/..;/..;/x",
            "/%2f../x",
            "/a%2F..%2F..%2Fx",
            "/%5c..%5Cx",
            "/a\\..\\..\\x",
            "/a//b%2f..%2f..%2f..%2fx",
        ] {
            assert!(
                matches!(t("/v1", escape), Err(ProxyError::PathEscape)),
                "{escape}"
            );
        }
        for inside in ["/a/..;/b", "/a/b%2f..%2fc", "/a;v=1/b", "/a%2fb", "/50%25"] {
            assert_eq!(
                t("/v1", inside).unwrap(),
                format!("/v1{inside}"),
                "{inside}"
            );
        }
        assert_eq!(t("/v1", "/a#/../../x").unwrap(), "/v1/a");
        assert_eq!(t("", "/a?q=1#f").unwrap(), "/a?q=1");
        assert_eq!(upstream_target("/v1", "OPTIONS", "*").unwrap(), "*");
        assert!(upstream_target("/v1", "GET", "*").is_err());
    }

    #[test]
    fn the_token_goes_in_the_query_in_place_of_the_apps() {
        let auth = QueryParam {
            name: "auth",
            ignore_case: false,
        };
        assert_eq!(
            with_query_token("/rest/profile.json", auth, "t0k"),
            "/rest/profile.json?auth=t0k"
        );
        assert_eq!(
            with_query_token("/rest/crm.deal.list?start=50&auth=app&filter=x", auth, "t"),
            "/rest/crm.deal.list?start=50&filter=x&auth=t"
        );
        // Bare and empty names are dropped too; other names that merely start alike stay.
        assert_eq!(
            with_query_token("/r?auth&auth=&author=me&", auth, "a b+c/="),
            "/r?author=me&auth=a+b%2Bc%2F%3D"
        );
        // Any spelling a server decodes to the name; case variants only where the
        // provider ignores case.
        assert_eq!(
            with_query_token("/r?%61uth=1&au%74h=2&AUTH=3&auth%3D=4", auth, "t"),
            "/r?AUTH=3&auth%3D=4&auth=t"
        );
        let any_case = QueryParam {
            ignore_case: true,
            ..auth
        };
        assert_eq!(
            with_query_token("/r?AUTH=3&%41uth=4&x=1", any_case, "t"),
            "/r?x=1&auth=t"
        );
    }

    #[test]
    fn a_query_token_is_kept_out_of_redirects() {
        let auth = QueryParam {
            name: "auth",
            ignore_case: false,
        };
        assert_eq!(
            without_query_param("https://api/x?a=1&auth=T&b=2#f", auth).unwrap(),
            "https://api/x?a=1&b=2#f"
        );
        assert_eq!(without_query_param("/x?%61uth=T", auth).unwrap(), "/x");
        assert!(without_query_param("/x?a=1", auth).is_none());
        assert!(without_query_param("/x", auth).is_none());

        let mut h = HeaderMap::new();
        h.insert(
            "location",
            HeaderValue::from_static("https://api/v1/next?auth=T0K&a=1"),
        );
        // Not ours to rewrite, and still carrying the token in another parameter.
        h.insert(
            "content-location",
            HeaderValue::from_static("https://cdn.example/x?sig=T0K"),
        );
        assert!(keep_query_token_out(&mut h, auth, "T0K"));
        assert_eq!(h["location"], "https://api/v1/next?a=1");
        assert!(!h.contains_key("content-location"));
        // A token that needed form encoding is found in that form.
        let mut h = HeaderMap::new();
        h.insert("location", HeaderValue::from_static("/next#t=a%2Bb"));
        assert!(keep_query_token_out(&mut h, auth, "a+b"));
        assert!(h.is_empty());
    }

    #[test]
    fn rewrites_only_upstream_prefixed_locations() {
        let up = "https://api.example.com/v1";
        let local = "http://127.0.0.1:8081";
        assert_eq!(
            rewrite_location_value("https://api.example.com/v1/x?y=1", up, local).unwrap(),
            "http://127.0.0.1:8081/x?y=1"
        );
        assert_eq!(
            rewrite_location_value("HTTPS://API.example.com/v1", up, local).unwrap(),
            "http://127.0.0.1:8081/"
        );
        assert!(rewrite_location_value("https://api.example.com/v1beta/x", up, local).is_none());
        assert!(rewrite_location_value("https://api.example.com.evil/v1/x", up, local).is_none());
        assert!(rewrite_location_value("https://other.example.com/v1/x", up, local).is_none());
        assert!(rewrite_location_value("/relative", up, local).is_none());
    }
}
