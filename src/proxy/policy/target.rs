//! The request target joined to the base path (dot-segments removed, RFC 3986 §5.2.4),
//! and what the method says about repeating or keeping the connection.

use std::borrow::Cow;

use crate::proxy::outcome::ProxyError;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
