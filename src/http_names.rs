//! Rules about HTTP names that both the config check and the request path apply: which
//! headers are hop-by-hop, how a `Connection`-style list is read, and which names can
//! carry a credential. A leaf, so config validation need not reach into the proxy.

/// Hop-by-hop headers that never cross a proxy, whatever `Connection` says (plus the
/// legacy `Keep-Alive` and `Proxy-Connection`, and `HTTP2-Settings`, which belongs to an
/// h2c upgrade of the one connection, RFC 7540 §3.2.1); every `Proxy-*` header too.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Whether `name` is hop-by-hop by itself (not counting those `Connection` names).
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
        || name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
}

/// Whether a header named in `Connection` is dropped. The framing headers and `Host`
/// are never dropped that way: the message's framing and routing do not depend on
/// what a peer lists there.
pub fn connection_may_drop(name: &[u8]) -> bool {
    !(name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding")
        || name.eq_ignore_ascii_case(b"host"))
}

/// The items of a comma-separated header value such as `Connection` or `Upgrade`
/// (RFC 9110 §5.6.1), trimmed; empty items are skipped.
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Why a configured credential header name cannot be used, if it cannot: names that
/// carry framing, routing or connection semantics would break the request.
pub fn unusable_credential_header(name: &str) -> Option<&'static str> {
    const RESERVED: [&str; 3] = ["host", "content-length", "expect"];
    if is_hop_by_hop(name) {
        Some("is a hop-by-hop header, which never reaches the upstream")
    } else if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        Some("is a header the request itself needs (framing or routing)")
    } else {
        None
    }
}

/// Why `name` cannot be the query parameter that carries the token, if it cannot: it
/// must be a plain name that needs no percent-encoding.
pub fn unusable_query_param(name: &str) -> Option<&'static str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '~');
    if name.is_empty() || !name.chars().all(plain) {
        Some("must be a name of letters, digits, '_', '-', '.' or '~'")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_items_are_trimmed_and_empty_ones_skipped() {
        let items: Vec<&[u8]> = list_items(b" a ,, b,").collect();
        assert_eq!(items, [b"a".as_slice(), b"b"]);
    }

    #[test]
    fn query_param_names_are_plain() {
        assert_eq!(unusable_query_param("auth"), None);
        assert_eq!(unusable_query_param("access_token"), None);
        assert!(unusable_query_param("").is_some());
        assert!(unusable_query_param("a&b").is_some());
        assert!(unusable_query_param("a=b").is_some());
    }

    #[test]
    fn credential_header_names_are_checked() {
        for bad in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-X",
            "TE",
        ] {
            assert!(unusable_credential_header(bad).is_some(), "{bad}");
        }
        for good in ["Authorization", "X-Api-Key"] {
            assert!(unusable_credential_header(good).is_none(), "{good}");
        }
    }
}
