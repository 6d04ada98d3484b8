//! Own-authority checks and `Location` rewriting: redirects that point at the upstream
//! point back at this listener.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Authority;

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
    use super::*;

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
