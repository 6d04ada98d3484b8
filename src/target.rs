//! Where an upstream's requests go: scheme, authority and base path, resolved once (a
//! fixed url, at startup) or once per published token (a url template, see
//! [`crate::config::url_template`]); never per request.

use http::uri::{Authority, Scheme};
use url::Url;

/// Why a url cannot be an upstream's base.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("bad scheme")]
    Scheme,
    #[error("bad upstream authority: {0}")]
    Authority(String),
}

/// The resolved base of an upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Upstream path prefix without a trailing slash ("" for the root).
    pub base_path: String,
    /// `scheme://authority/base` as redirects from the upstream spell it (and as
    /// `/status` shows a resolved url).
    pub upstream_prefix: String,
}

impl Target {
    /// The target of an absolute http(s) URL (validated before: scheme, host).
    pub fn of(url: &Url) -> Result<Target, TargetError> {
        let scheme: Scheme = url.scheme().parse().map_err(|_| TargetError::Scheme)?;
        let host = url.host_str().unwrap_or_default();
        let authority: Authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
        .parse()
        .map_err(|e: http::uri::InvalidUri| TargetError::Authority(e.to_string()))?;
        let base_path = url.path().trim_end_matches('/').to_string();
        Ok(Target {
            upstream_prefix: format!("{scheme}://{authority}{base_path}"),
            scheme,
            authority,
            base_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_url() {
        let t = Target::of(&Url::parse("https://na1.example.com:8443/services/data/").unwrap())
            .unwrap();
        assert_eq!(t.scheme, Scheme::HTTPS);
        assert_eq!(t.authority.as_str(), "na1.example.com:8443");
        assert_eq!(t.base_path, "/services/data");
        assert_eq!(
            t.upstream_prefix,
            "https://na1.example.com:8443/services/data"
        );
        let t = Target::of(&Url::parse("http://[::1]:80/").unwrap()).unwrap();
        assert_eq!(t.base_path, "");
        assert_eq!(t.upstream_prefix, "http://[::1]");
    }
}
