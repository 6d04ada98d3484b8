//! Header rules of a forwarding proxy: hop-by-hop removal (RFC 9110 §7.6.1) and
//! `Location`/`Content-Location` rewriting (as nginx's `proxy_redirect default`).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers that never cross a proxy, whatever `Connection` says
/// (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and `Proxy-Connection`).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers: the fixed set, every `Proxy-*` header, and the headers
/// named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
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

/// Rewrites `Location` and `Content-Location` values that start with `upstream_prefix`
/// (the upstream's origin and base path) to start with `local_prefix` instead, so an app
/// following a redirect stays behind the proxy. Other values are left alone.
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
    use super::*;

    #[test]
    fn strips_fixed_named_and_proxy_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "Connection",
            HeaderValue::from_static("keep-alive, X-Custom"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("Keep-Alive", HeaderValue::from_static("timeout=5"));
        h.insert("TE", HeaderValue::from_static("trailers"));
        h.insert("Upgrade", HeaderValue::from_static("websocket"));
        h.insert("Proxy-Authorization", HeaderValue::from_static("Basic x"));
        h.insert("Proxy-Foo", HeaderValue::from_static("x"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
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
