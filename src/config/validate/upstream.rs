//! One `upstreams.<name>` entry.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::super::raw::RawUpstream;
use super::super::*;
use super::*;

pub(super) fn validate_upstream(
    p: &mut Problems,
    name: &str,
    u: RawUpstream,
    credentials: &BTreeMap<String, CredentialConfig>,
    refused_credentials: &std::collections::BTreeSet<String>,
) -> Option<UpstreamConfig> {
    let path = format!("upstreams.{name}");
    let at = |key: &str| format!("{path}.{key}");
    let before = p.0.len();
    let listen = match &u.listen {
        Some(l) => parse_listen(p, &at("listen"), l),
        None => {
            p.add(&at("listen"), "is required, e.g. 127.0.0.1:8081");
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    let url = match &u.url {
        Some(s) if url_template::is_template(s) => match UrlTemplate::parse(s) {
            Ok(t) => Some(UpstreamUrl::Template(t)),
            Err(e) => {
                p.add(&at("url"), e);
                None
            }
        },
        Some(s) => parse_url(p, &at("url"), s, u.allow_insecure_http).map(UpstreamUrl::Fixed),
        None => {
            p.add(&at("url"), "is required");
            None
        }
    };
    if let Some(UpstreamUrl::Fixed(url)) = &url {
        if url.query().is_some() || url.fragment().is_some() {
            p.add(&at("url"), "must not have a query or fragment");
        }
    }
    if let (Some(UpstreamUrl::Template(t)), Some(c)) =
        (&url, u.credential.as_ref().and_then(|c| credentials.get(c)))
    {
        if c.grant == Grant::Static {
            p.add(
                &at("url"),
                format!(
                    "{{token.{}}} takes the url from a token answer, but credential {:?} uses grant static, which has none; use a grant that requests tokens (refresh_token, client_credentials, password, jwt_bearer) or a fixed url",
                    t.field, c.name
                ),
            );
        }
    }
    let credential = match u.credential {
        Some(c) if credentials.contains_key(&c) || refused_credentials.contains(&c) => c,
        Some(c) => {
            p.add(
                &at("credential"),
                format!("{c:?} is not defined under credentials"),
            );
            c
        }
        None => {
            p.add(&at("credential"), "is required");
            String::new()
        }
    };
    let header = u.header.unwrap_or_else(|| "Authorization".into());
    if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
        p.add(
            &at("header"),
            format!("{header:?} is not a valid header name"),
        );
    } else if let Some(why) = crate::http_names::unusable_credential_header(&header) {
        p.add(&at("header"), format!("{header:?} {why}"));
    }
    let format = u.format.unwrap_or_else(|| "Bearer {token}".into());
    if format.matches("{token}").count() != 1 {
        p.add(&at("format"), "must contain {token} exactly once");
    } else if http::HeaderValue::from_str(&format.replace("{token}", "x")).is_err() {
        p.add(&at("format"), "is not a valid header value");
    }
    if let Some(name) = &u.token_query_param {
        if let Some(why) = crate::http_names::unusable_query_param(name) {
            p.add(&at("token_query_param"), format!("{name:?} {why}"));
        }
    } else if u.token_query_param_ignore_case {
        p.add(
            &at("token_query_param_ignore_case"),
            "applies only with token_query_param",
        );
    }
    let inbound_authorization = match u.inbound_authorization.as_deref() {
        None | Some("strip") => InboundAuthorization::Strip,
        Some("reject") => InboundAuthorization::Reject,
        Some(o) => {
            p.add(
                &at("inbound_authorization"),
                format!("must be strip or reject, got {o:?}"),
            );
            InboundAuthorization::Strip
        }
    };
    let timeout = u.timeout.unwrap_or(HumanDuration(DEFAULT_UPSTREAM_TIMEOUT));
    if timeout.0.is_zero() {
        p.add(&at("timeout"), "must be more than 0s");
    }
    let body_idle_timeout = u
        .body_idle_timeout
        .unwrap_or(HumanDuration(DEFAULT_BODY_IDLE_TIMEOUT));
    let body_timeout = u
        .body_timeout
        .unwrap_or(HumanDuration(DEFAULT_BODY_TIMEOUT));
    if body_idle_timeout.0.is_zero() {
        p.add(&at("body_idle_timeout"), "must be more than 0s");
    }
    if body_timeout.0.is_zero() {
        p.add(&at("body_timeout"), "must be more than 0s");
    }
    let connect_timeout = u
        .connect_timeout
        .unwrap_or(HumanDuration(DEFAULT_CONNECT_TIMEOUT));
    if connect_timeout.0.is_zero() {
        p.add(&at("connect_timeout"), "must be more than 0s");
    }
    let retry_body_limit = u
        .retry_body_limit
        .unwrap_or(ByteSize(DEFAULT_RETRY_BODY_LIMIT));
    if retry_body_limit.0 > 16 << 20 {
        p.add(
            &at("retry_body_limit"),
            "must be at most 16MiB (it is held in memory)",
        );
    }
    check_ca_file(p, &at("ca_file"), &u.ca_file);
    let client_cert = client_auth::client_cert(p, &path, u.client_cert_file, u.client_key_file);
    if let Some(url) = url
        .as_ref()
        .and_then(UpstreamUrl::fixed)
        .filter(|u| u.scheme() != "https")
    {
        if client_cert.is_some() {
            p.add(
                &at("client_cert_file"),
                format!("a client certificate needs an https:// url, got {url}"),
            );
        }
    }
    let limits = Limits {
        max_connections: u.limits.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        header_read_timeout: u
            .limits
            .header_read_timeout
            .unwrap_or(HumanDuration(DEFAULT_HEADER_READ_TIMEOUT)),
        idle_timeout: u
            .limits
            .idle_timeout
            .unwrap_or(HumanDuration(DEFAULT_IDLE_TIMEOUT)),
        max_header_size: u
            .limits
            .max_header_size
            .unwrap_or(ByteSize(DEFAULT_MAX_HEADER_SIZE)),
    };
    if limits.max_connections == 0 {
        p.add(&at("limits.max_connections"), "must be at least 1");
    }
    if limits.max_header_size.0 < 8192 {
        p.add(&at("limits.max_header_size"), "must be at least 8KiB");
    }
    if limits.header_read_timeout.0.is_zero() || limits.idle_timeout.0.is_zero() {
        p.add(&at("limits"), "timeouts must be more than 0s");
    }
    if p.0.len() > before {
        return None;
    }
    Some(UpstreamConfig {
        name: name.to_string(),
        listen,
        url: url?,
        credential,
        header,
        format,
        token_query_param: u.token_query_param,
        token_query_param_ignore_case: u.token_query_param_ignore_case,
        inbound_authorization,
        retry_on_401: u.retry_on_401.unwrap_or(true),
        retry_body_limit,
        timeout,
        body_idle_timeout,
        body_timeout,
        connect_timeout,
        ca_file: u.ca_file,
        client_cert,
        allow_insecure_http: u.allow_insecure_http,
        http2: u.http2,
        limits,
    })
}
