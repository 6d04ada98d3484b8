//! The token in the query (`token_query_param`): put in place of the app's, and kept
//! out of what goes back to the app.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderValue};

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
    let mut out = Vec::with_capacity(target.len() + param.name.len() + token.len() + 2);
    push_target_before_token(&mut out, target, param);
    push_encoded_token(&mut out, token);
    // Only `target`'s own bytes and ASCII were added.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `target` as the upstream gets it, up to where the token goes: the app's
/// pairs naming `param` dropped, then `name=`. [`push_encoded_token`] completes it.
pub fn push_target_before_token(out: &mut Vec<u8>, target: &str, param: QueryParam<'_>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    out.extend_from_slice(path.as_bytes());
    out.push(b'?');
    for pair in param.other_pairs(query) {
        out.extend_from_slice(pair.as_bytes());
        out.push(b'&');
    }
    out.extend_from_slice(param.name.as_bytes());
    out.push(b'=');
}

/// The token as a query value (form encoded).
pub fn push_encoded_token(out: &mut Vec<u8>, token: &str) {
    for piece in url::form_urlencoded::byte_serialize(token.as_bytes()) {
        out.extend_from_slice(piece.as_bytes());
    }
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
        match location_without_token(&text, param, token) {
            None => {
                headers.remove(&name);
                dropped = true;
            }
            Some(Cow::Borrowed(_)) => {}
            Some(Cow::Owned(stripped)) => match HeaderValue::from_str(&stripped) {
                Ok(v) => {
                    headers.insert(name, v);
                }
                Err(_) => {
                    headers.remove(&name);
                }
            },
        }
    }
    dropped
}

/// Logs that a response header was dropped by [`location_without_token`].
pub fn warn_token_header_dropped(upstream: &str) {
    tracing::warn!(
        upstream,
        "the upstream's Location or Content-Location carried the access token; dropped"
    );
}

/// A `Location` or `Content-Location` value as the app may see it: without the pairs
/// naming `param`; `None` when it still carries the token elsewhere (then it is dropped).
pub fn location_without_token<'v>(
    value: &'v str,
    param: QueryParam<'_>,
    token: &str,
) -> Option<Cow<'v, str>> {
    let stripped = without_query_param(value, param);
    let now = stripped.as_deref().unwrap_or(value);
    if carries_token(now, token) {
        return None;
    }
    Some(stripped.map_or(Cow::Borrowed(value), Cow::Owned))
}

/// Whether `text` holds `token`, as it is or form encoded as it went in the query.
fn carries_token(text: &str, token: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    let encoded: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
    text.contains(token) || text.contains(&encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
