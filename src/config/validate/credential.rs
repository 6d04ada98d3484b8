//! One `credentials.<name>` entry.

use std::time::Duration;

use crate::secret::Secret;

use super::super::raw::RawCredential;
use super::super::*;
use super::*;

pub(super) fn validate_credential(
    p: &mut Problems,
    name: &str,
    mut c: RawCredential,
) -> Option<CredentialConfig> {
    let path = format!("credentials.{name}");
    let at = |key: &str| format!("{path}.{key}");
    let grant = match c.grant.as_deref() {
        Some("refresh_token") => Grant::RefreshToken,
        Some("client_credentials") => Grant::ClientCredentials,
        Some("password") => Grant::Password,
        Some("static") => Grant::Static,
        Some("jwt_bearer") => Grant::JwtBearer,
        None => {
            p.add(
                &at("grant"),
                "is required: refresh_token, client_credentials, password, jwt_bearer or static",
            );
            return None;
        }
        Some(other) => {
            p.add(
                &at("grant"),
                format!(
                    "must be refresh_token, client_credentials, password, jwt_bearer or static, got {other:?}"
                ),
            );
            return None;
        }
    };
    let before = p.0.len();
    let mut token_url = match (&c.token_url, grant) {
        (None, Grant::Static) => None,
        (Some(_), Grant::Static) => {
            p.add(&at("token_url"), "not used by grant static; remove it");
            None
        }
        // A service account names its token endpoint.
        (None, Grant::JwtBearer) if c.service_account_file.is_some() => None,
        // Discovery fills it in (the jwt_bearer grant's assertion needs its audience now).
        (None, g) if c.issuer.is_some() && g != Grant::JwtBearer => None,
        (None, _) => {
            p.add(&at("token_url"), "is required");
            None
        }
        (Some(u), _) => parse_url(p, &at("token_url"), u, c.allow_insecure_http),
    };
    let authorize_url = c
        .authorize_url
        .as_deref()
        .and_then(|u| parse_url(p, &at("authorize_url"), u, c.allow_insecure_http));
    let device_authorization_url = c
        .device_authorization_url
        .as_deref()
        .and_then(|u| parse_url(p, &at("device_authorization_url"), u, c.allow_insecure_http));
    let issuer = c
        .issuer
        .as_deref()
        .and_then(|i| issuer(p, &at("issuer"), i, grant, c.allow_insecure_http));
    // An assertion grant identifies the client by the assertion's issuer.
    if !matches!(grant, Grant::Static | Grant::JwtBearer)
        && c.client_id.as_deref().unwrap_or("").is_empty()
    {
        p.add(&at("client_id"), "is required");
    }
    let client_secret = secret_from(
        p,
        &path,
        "client_secret",
        c.client_secret.take(),
        c.client_secret_file.take(),
    );
    let auth = client_auth::client_auth(p, &path, &mut c, client_secret.as_ref());
    // ... unless the client authenticates itself as well: then client_id names it (the
    // client assertion's iss and sub, the id sent with a certificate or a secret).
    if grant == Grant::JwtBearer && c.client_id.as_deref().unwrap_or("").is_empty() {
        let by = match auth.method {
            ClientAuth::RequestBody if client_secret.is_none() => None,
            ClientAuth::RequestBody => Some("client_secret".to_string()),
            m => Some(format!("client_auth {}", m.as_str())),
        };
        if let Some(by) = by {
            p.add(
                &at("client_id"),
                format!("is required for grant jwt_bearer with {by}"),
            );
        }
    }
    let jwt_bearer = client_auth::jwt_bearer(p, &path, &mut c, grant, &mut token_url);
    let request_format = match c.request_format.as_deref() {
        None | Some("form") => RequestFormat::Form,
        Some("json") => RequestFormat::Json,
        Some(o) => {
            p.add(
                &at("request_format"),
                format!("must be form or json, got {o:?}"),
            );
            RequestFormat::Form
        }
    };
    let refresh_at = c.refresh_at.unwrap_or(DEFAULT_REFRESH_AT);
    if !(refresh_at > 0.0 && refresh_at < 1.0) {
        p.add(
            &at("refresh_at"),
            format!("must be a fraction between 0 and 1 (exclusive), got {refresh_at}"),
        );
    }
    let token_timeout = c
        .token_timeout
        .unwrap_or(HumanDuration(DEFAULT_TOKEN_TIMEOUT));
    if token_timeout.0 < Duration::from_millis(100) || token_timeout.0 > Duration::from_secs(300) {
        p.add(&at("token_timeout"), "must be between 100ms and 5m");
    }
    let default_expires_in = c
        .default_expires_in
        .unwrap_or(HumanDuration(DEFAULT_EXPIRES_IN));
    if default_expires_in.0 < Duration::from_secs(1) {
        p.add(&at("default_expires_in"), "must be at least 1s");
    }
    for (k, v) in &c.token_headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            p.add(
                &at(&format!("token_headers.{k}")),
                "is not a valid header name",
            );
        } else if http::HeaderValue::from_str(v).is_err() {
            p.add(
                &at(&format!("token_headers.{k}")),
                "value is not a valid header value",
            );
        }
    }
    for k in c.extra_params.keys() {
        if RESERVED_PARAMS.contains(&k.as_str()) {
            p.add(
                &at(&format!("extra_params.{k}")),
                "is set by tokenrelay itself and cannot be overridden",
            );
        }
    }
    check_ca_file(p, &at("ca_file"), &c.ca_file);

    let password = secret_from(p, &path, "password", c.password, c.password_file);
    let static_token_file = c.token_file.clone();
    let static_token =
        secret_from(p, &path, "token", c.token, c.token_file).and_then(|t| match t.check_token() {
            Ok(()) => Some(t),
            Err(e) => {
                let (key, origin) = match &static_token_file {
                    Some(f) => ("token_file", format!("{}: ", f.display())),
                    None => ("token", String::new()),
                };
                p.add(&at(key), format!("{origin}{e}"));
                None
            }
        });
    match grant {
        Grant::Password => {
            if c.username.as_deref().unwrap_or("").is_empty() {
                p.add(&at("username"), "is required for grant password");
            }
            if password.is_none() && !p.0.iter().any(|e| e.starts_with(&at("password"))) {
                p.add(
                    &at("password"),
                    "password or password_file is required for grant password",
                );
            }
        }
        Grant::Static
            if static_token.is_none() && !p.0.iter().any(|e| e.starts_with(&at("token"))) =>
        {
            p.add(
                &at("token_file"),
                "token or token_file is required for grant static",
            );
        }
        _ => {}
    }
    if grant != Grant::Password && (c.username.is_some() || password.is_some()) {
        p.add(
            &at("username"),
            "username/password are only used by grant password",
        );
    }
    if grant != Grant::Static && static_token.is_some() {
        p.add(
            &at("token"),
            "token/token_file are only used by grant static",
        );
    }
    if p.0.len() > before {
        return None;
    }
    let token_request_method = c.token_request_method.unwrap_or_default();
    let token_params_in = match (token_request_method, c.token_params_in) {
        (TokenMethod::Get, Some(ParamsIn::Body)) => {
            p.add(
                &at("token_params_in"),
                "must be query when token_request_method is get",
            );
            ParamsIn::Query
        }
        (TokenMethod::Get, _) => ParamsIn::Query,
        (TokenMethod::Post, p_in) => p_in.unwrap_or_default(),
    };
    let mut answer_fields = c.answer_fields.unwrap_or_default();
    if grant == Grant::Static && !answer_fields.is_empty() {
        p.add(
            &at("answer_fields"),
            "not used by grant static (there is no token answer)",
        );
    }
    for f in &answer_fields {
        if let Err(e) = url_template::check_field_name(f) {
            p.add(&at("answer_fields"), e);
        }
    }
    answer_fields.sort();
    answer_fields.dedup();
    let token_types = token_types(p, &at("token_types"), grant, c.token_types);
    let sinks = super::super::sink::validate(p, &path, c.sinks);
    provider_rules::check_dead_grant(p, &path, &c.dead_grant_answers);
    provider_rules::check_rate_limit(p, &at("refresh_rate_limit"), &c.refresh_rate_limit);
    if grant == Grant::Static && c.refresh_mode.is_some() {
        p.add(
            &at("refresh_mode"),
            "not used by grant static (there is nothing to refresh)",
        );
    }
    Some(CredentialConfig {
        name: name.to_string(),
        provider: c.provider,
        grant,
        token_url,
        authorize_url,
        device_authorization_url,
        issuer,
        // Filled in by `Config::from_yaml`, which knows what the file itself sets.
        discover: Vec::new(),
        preset_sunset: None,
        client_id: c.client_id,
        client_secret,
        client_auth: auth.method,
        client_assertion: auth.assertion,
        client_cert: auth.cert,
        jwt_bearer,
        request_format,
        redirect_uri: c.redirect_uri,
        scopes: c.scopes,
        extra_params: c.extra_params,
        refresh_at,
        refresh_before: c
            .refresh_before
            .unwrap_or(HumanDuration(DEFAULT_REFRESH_BEFORE)),
        refresh_mode: c.refresh_mode.unwrap_or_default(),
        token_timeout,
        default_expires_in,
        token_headers: c
            .token_headers
            .into_iter()
            .map(|(k, v)| (k, Secret::new(v)))
            .collect(),
        ca_file: c.ca_file,
        allow_insecure_http: c.allow_insecure_http,
        username: c.username,
        password,
        static_token,
        static_token_file,
        token_request_method,
        token_params_in,
        redirect_uri_on_refresh: c.redirect_uri_on_refresh.unwrap_or(true),
        scopes_on_refresh: c.scopes_on_refresh.unwrap_or(false),
        refresh_token: RefreshTokenRules {
            rotating: c.rotating_refresh_token.unwrap_or(true),
            idle_lifetime: c.refresh_token_idle_lifetime,
            absolute_lifetime: c.refresh_token_absolute_lifetime,
            rate_limit: c.refresh_rate_limit,
            min_token_age: c.min_token_age,
        },
        dead_grant_answers: c.dead_grant_answers,
        answer_fields,
        token_types,
        sinks,
        url_templates: Vec::new(),
    })
}

/// `token_types`, lowercase, sorted, without repeats: each a type name of RFC 6749 §11.1
/// (letters, digits, `-`, `.`, `_`), and only for grants that get token answers; Bearer,
/// always accepted, is left out.
fn token_types(
    p: &mut Problems,
    at: &str,
    grant: Grant,
    types: Option<Vec<String>>,
) -> Vec<String> {
    let Some(types) = types else {
        return Vec::new();
    };
    if grant == Grant::Static {
        p.add(at, "not used by grant static (there is no token answer)");
    }
    let mut kept = Vec::new();
    for t in types {
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
        if t.is_empty() || !t.chars().all(name_char) {
            p.add(
                at,
                format!("{t:?} is not a token type name (letters, digits, '-', '.', '_')"),
            );
        } else if !t.eq_ignore_ascii_case("bearer") {
            // Bearer is always accepted; listing it changes nothing.
            kept.push(t.to_ascii_lowercase());
        }
    }
    kept.sort();
    kept.dedup();
    kept
}

/// Token request parameters tokenrelay owns; `extra_params` may not replace them.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "refresh_token",
    "code",
    "username",
    "password",
    "client_assertion",
    "client_assertion_type",
    "assertion",
];

/// An `issuer`: an http(s) URL (https unless `allow_insecure_http`) without query or
/// fragment (RFC 8414 §2), kept exactly as written, since the metadata's `issuer` must
/// equal it character for character.
fn issuer(p: &mut Problems, path: &str, s: &str, grant: Grant, insecure: bool) -> Option<String> {
    if grant == Grant::Static {
        p.add(path, "not used by grant static; remove it");
        return None;
    }
    let url = parse_url(p, path, s, insecure)?;
    if url.query().is_some() || url.fragment().is_some() {
        p.add(
            path,
            format!(
                "{s:?} has a query or fragment; an issuer identifier has neither (RFC 8414 §2)"
            ),
        );
        return None;
    }
    Some(s.to_string())
}
