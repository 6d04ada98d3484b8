//! Provider presets: data, not code. One YAML file per provider under
//! `src/config/presets/`, embedded at build time, stating its sources, its parameters and
//! the defaults it gives a credential (`credentials.<name>.provider: amocrm`).
//!
//! A preset is applied to the config document before it is typed: its `credential`
//! mapping, with `{param}` placeholders filled from `provider_params`, supplies every key
//! the user's entry does not set (whatever the user sets wins), and its `header` and
//! `header_format` become the `header` and `format` of upstreams using that credential
//! unless they set their own. Each value taken from a preset is recorded with its origin,
//! for `check`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use super::param_shape::ParamShape;
use super::sunset::{Day, Sunset};

/// The embedded preset files, by name.
const FILES: &[(&str, &str)] = &[
    ("amocrm", include_str!("presets/amocrm.yaml")),
    ("kommo", include_str!("presets/kommo.yaml")),
    ("bitrix24", include_str!("presets/bitrix24.yaml")),
    ("elma365", include_str!("presets/elma365.yaml")),
    ("yoomoney", include_str!("presets/yoomoney.yaml")),
    ("hubspot", include_str!("presets/hubspot.yaml")),
    ("salesforce", include_str!("presets/salesforce.yaml")),
    ("zoho", include_str!("presets/zoho.yaml")),
    ("google", include_str!("presets/google.yaml")),
    ("microsoft", include_str!("presets/microsoft.yaml")),
    ("xero", include_str!("presets/xero.yaml")),
    ("intuit", include_str!("presets/intuit.yaml")),
    ("atlassian", include_str!("presets/atlassian.yaml")),
    ("dropbox", include_str!("presets/dropbox.yaml")),
    ("okta", include_str!("presets/okta.yaml")),
    ("keycloak", include_str!("presets/keycloak.yaml")),
    ("auth0", include_str!("presets/auth0.yaml")),
    ("zendesk", include_str!("presets/zendesk.yaml")),
    ("pipedrive", include_str!("presets/pipedrive.yaml")),
    ("tbank", include_str!("presets/tbank.yaml")),
    ("sber_business", include_str!("presets/sber_business.yaml")),
    ("yandex", include_str!("presets/yandex.yaml")),
    ("github_app", include_str!("presets/github_app.yaml")),
    ("shopify", include_str!("presets/shopify.yaml")),
    ("slack", include_str!("presets/slack.yaml")),
    ("zoom", include_str!("presets/zoom.yaml")),
    (
        "google_service_account",
        include_str!("presets/google_service_account.yaml"),
    ),
    (
        "salesforce_jwt",
        include_str!("presets/salesforce_jwt.yaml"),
    ),
];

/// One provider preset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub title: String,
    /// The provider's main OAuth documentation.
    pub docs: String,
    /// Every URL a fact of the preset comes from.
    pub sources: Vec<String>,
    #[serde(default)]
    pub params: BTreeMap<String, Param>,
    /// Defaults for `credentials.<name>`: the same keys as the config.
    #[serde(default)]
    pub credential: Mapping,
    /// Default `header` (the header name) of upstreams using the credential, for
    /// providers whose APIs do not take `Authorization` (Shopify's
    /// `X-Shopify-Access-Token`).
    pub header: Option<String>,
    /// Default `format` of upstreams using the credential.
    pub header_format: Option<String>,
    /// Default `token_query_param` of upstreams using the credential.
    pub token_query_param: Option<String>,
    /// Facts the sources do not settle, and the safe default chosen.
    pub uncertain: Option<String>,
    /// Credential keys the provider needs that the preset cannot fill in (amoCRM's
    /// `redirect_uri`, sent on every refresh too).
    #[serde(default)]
    pub requires: Vec<String>,
    /// When the preset's facts were last checked against its sources.
    pub verified: Day,
    /// An endpoint or behaviour the provider announced it will end.
    pub sunset: Option<Sunset>,
}

/// A `provider_params` entry a preset takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Param {
    pub description: String,
    #[serde(default = "yes")]
    pub required: bool,
    pub default: Option<String>,
    /// What the value must look like (checked before it is put into a URL).
    #[serde(default)]
    pub shape: ParamShape,
}

fn yes() -> bool {
    true
}

/// Every embedded preset, in a stable order.
pub fn all() -> Vec<Preset> {
    FILES
        .iter()
        .map(|(name, _)| get(name).expect("embedded"))
        .collect()
}

/// The preset called `name`.
pub fn get(name: &str) -> Option<Preset> {
    let (_, text) = FILES.iter().find(|(n, _)| *n == name)?;
    Some(serde_yaml::from_str(text).unwrap_or_else(|e| {
        // Embedded data: a malformed file is a build defect, caught by the unit tests.
        panic!("preset {name} is malformed: {e}")
    }))
}

/// Names of the embedded presets.
pub fn names() -> Vec<&'static str> {
    FILES.iter().map(|(n, _)| *n).collect()
}

/// Where a resolved value came from, for `check`: `credentials.crm.token_url` →
/// `preset amocrm`.
pub type Origins = BTreeMap<String, String>;

impl Preset {
    /// The preset's credential defaults with `params` filled in; errors name what is
    /// wrong (relative to `path`, the credential's key path).
    pub fn resolve(
        &self,
        path: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<Mapping, Vec<String>> {
        let mut problems = Vec::new();
        for key in params.keys() {
            if !self.params.contains_key(key) {
                problems.push(format!(
                    "{path}.provider_params.{key}: unknown parameter of preset {} (it takes: {})",
                    self.name,
                    self.param_list()
                ));
            }
        }
        let mut values = BTreeMap::new();
        for (key, p) in &self.params {
            match (params.get(key), &p.default) {
                (Some(v), _) if v.trim().is_empty() => {
                    problems.push(format!("{path}.provider_params.{key}: is empty"))
                }
                (Some(v), _) => match p.shape.check(key, v) {
                    Ok(()) => {
                        values.insert(key.clone(), v.clone());
                    }
                    Err(e) => problems.push(format!("{path}.provider_params.{key}: {e}")),
                },
                (None, Some(d)) => {
                    values.insert(key.clone(), d.clone());
                }
                (None, None) if p.required => problems.push(format!(
                    "{path}.provider_params.{key}: required by preset {} ({})",
                    self.name, p.description
                )),
                (None, None) => {}
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut resolved = self.credential.clone();
        for (_, v) in resolved.iter_mut() {
            fill(v, &values);
        }
        // A key that needs an optional parameter the user did not give (Bitrix24's
        // authorize URL needs `portal`) is left out rather than filled half.
        let unfilled: Vec<String> = self
            .params
            .keys()
            .filter(|k| !values.contains_key(*k))
            .map(|k| format!("{{{k}}}"))
            .collect();
        resolved.retain(|_, v| !mentions_any(v, &unfilled));
        Ok(resolved)
    }

    fn param_list(&self) -> String {
        if self.params.is_empty() {
            "none".into()
        } else {
            self.params.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }
}

/// Whether any string in `v` contains one of `needles`.
fn mentions_any(v: &Value, needles: &[String]) -> bool {
    match v {
        Value::String(s) => needles.iter().any(|n| s.contains(n.as_str())),
        Value::Sequence(items) => items.iter().any(|i| mentions_any(i, needles)),
        Value::Mapping(m) => m.iter().any(|(_, i)| mentions_any(i, needles)),
        _ => false,
    }
}

/// Replaces `{param}` placeholders in every string of `v`.
fn fill(v: &mut Value, values: &BTreeMap<String, String>) {
    match v {
        Value::String(s) => {
            for (k, val) in values {
                *s = s.replace(&format!("{{{k}}}"), val);
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|i| fill(i, values)),
        Value::Mapping(m) => m.iter_mut().for_each(|(_, i)| fill(i, values)),
        _ => {}
    }
}

/// What a preset fills in for the upstreams of its credential: (key, value) pairs, and
/// the preset's name.
type UpstreamDefaults = (Vec<(&'static str, String)>, String);

/// Applies the presets named by `credentials.*.provider` to the config document: fills
/// in what each entry does not set, and the header format of upstreams using it.
/// Returns where each filled value came from; problems are pushed as messages.
pub fn apply(doc: &mut Value, problems: &mut Vec<String>) -> Origins {
    let mut origins = Origins::new();
    let mut upstream_defaults: BTreeMap<String, UpstreamDefaults> = BTreeMap::new();
    if let Some(creds) = doc.get_mut("credentials").and_then(Value::as_mapping_mut) {
        for (name, entry) in creds.iter_mut() {
            let (Some(name), Some(entry)) = (name.as_str(), entry.as_mapping_mut()) else {
                continue;
            };
            let path = format!("credentials.{name}");
            let Some(provider) = entry.get("provider") else {
                continue;
            };
            let Some(provider) = provider.as_str().map(str::to_owned) else {
                problems.push(format!("{path}.provider: must be a preset name"));
                continue;
            };
            let Some(preset) = get(&provider) else {
                problems.push(format!(
                    "{path}.provider: unknown preset {provider:?} (known: {}; `tokenrelay providers` lists them)",
                    names().join(", ")
                ));
                continue;
            };
            for key in &preset.requires {
                if !entry.contains_key(key.as_str()) {
                    problems.push(format!(
                        "{path}.{key}: required by preset {provider} (see `tokenrelay providers {provider}`)"
                    ));
                }
            }
            let params = match params_of(entry, &path) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            let defaults = match preset.resolve(&path, &params) {
                Ok(d) => d,
                Err(e) => {
                    problems.extend(e);
                    continue;
                }
            };
            for (key, value) in defaults {
                if entry.contains_key(&key) {
                    continue;
                }
                if let Some(k) = key.as_str() {
                    origins.insert(format!("{path}.{k}"), format!("preset {provider}"));
                }
                entry.insert(key, value);
            }
            let defaults: Vec<(&'static str, String)> = [
                ("header", preset.header),
                ("format", preset.header_format),
                ("token_query_param", preset.token_query_param),
            ]
            .into_iter()
            .filter_map(|(key, value)| Some((key, value?)))
            .collect();
            upstream_defaults.insert(name.to_string(), (defaults, provider));
        }
    }
    if let Some(ups) = doc.get_mut("upstreams").and_then(Value::as_mapping_mut) {
        for (name, entry) in ups.iter_mut() {
            let (Some(name), Some(entry)) = (name.as_str(), entry.as_mapping_mut()) else {
                continue;
            };
            let cred = entry.get("credential").and_then(Value::as_str);
            let Some((defaults, provider)) = cred.and_then(|c| upstream_defaults.get(c)) else {
                continue;
            };
            for (key, value) in defaults {
                if !entry.contains_key(*key) {
                    entry.insert((*key).into(), Value::String(value.clone()));
                    origins.insert(
                        format!("upstreams.{name}.{key}"),
                        format!("preset {provider}"),
                    );
                }
            }
        }
    }
    origins
}

/// A `provider_params` entry that is not a string; `key` is its whole path.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {why}")]
struct BadParams {
    key: String,
    why: &'static str,
}

/// A credential's `provider_params`, by name.
type Params = BTreeMap<String, String>;

/// `provider_params` of a credential entry as strings.
fn params_of(entry: &Mapping, path: &str) -> Result<Params, BadParams> {
    let Some(v) = entry.get("provider_params") else {
        return Ok(BTreeMap::new());
    };
    let Some(m) = v.as_mapping() else {
        return Err(BadParams {
            key: format!("{path}.provider_params"),
            why: "must be a mapping of names to values",
        });
    };
    m.iter()
        .map(|(k, v)| {
            let k = k.as_str().unwrap_or_default().to_string();
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => {
                    return Err(BadParams {
                        key: format!("{path}.provider_params.{k}"),
                        why: "must be a string",
                    })
                }
            };
            Ok((k, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every preset file loads, names itself, cites sources, and yields a credential the
    /// config validation accepts once its required parameters are given.
    #[test]
    fn every_preset_loads_and_validates() {
        assert!(FILES.len() >= 17);
        for p in all() {
            assert_eq!(
                p.name,
                names()[names().iter().position(|n| *n == p.name).unwrap()]
            );
            assert!(!p.sources.is_empty(), "{}: no sources", p.name);
            assert!(
                p.verified.start <= std::time::SystemTime::now(),
                "{}: verified in the future",
                p.name
            );
            if let Some(s) = &p.sunset {
                assert!(
                    s.source.starts_with("https://"),
                    "{}: sunset source",
                    p.name
                );
                assert!(
                    s.endpoint
                        .as_deref()
                        .is_none_or(|e| url::Url::parse(e).is_ok()),
                    "{}: sunset endpoint",
                    p.name
                );
            }
            assert!(p.docs.starts_with("https://"), "{}: docs", p.name);
            let params: BTreeMap<String, String> = p
                .params
                .iter()
                .filter(|(_, d)| d.required)
                .map(|(k, d)| (k.clone(), sample_value(d).to_string()))
                .collect();
            let param_yaml: String = params.iter().map(|(k, v)| format!("{k}: {v}, ")).collect();
            // An assertion grant signs with a key the user brings.
            let key_dir = tempfile::tempdir().unwrap();
            let bearer = p.credential.get("grant").and_then(|g| g.as_str()) == Some("jwt_bearer");
            let user_keys = if bearer {
                let key = key_dir.path().join("k.pem");
                std::fs::write(&key, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
                format!(
                    "assertion_issuer: i, assertion_key_file: \"{}\"",
                    key.display()
                )
            } else {
                "client_secret: s, redirect_uri: https://example.com/cb".to_string()
            };
            // A provider that requires mutual TLS (Sber) gets a certificate.
            let user_keys = if p.requires.iter().any(|k| k == "client_cert_file") {
                let ck = rcgen::generate_simple_self_signed(vec!["client".into()]).unwrap();
                let (cert, key) = (key_dir.path().join("c.pem"), key_dir.path().join("ck.pem"));
                std::fs::write(&cert, ck.cert.pem()).unwrap();
                std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
                format!(
                    "{user_keys}, client_cert_file: \"{}\", client_key_file: \"{}\"",
                    cert.display(),
                    key.display()
                )
            } else {
                user_keys
            };
            let yaml = format!(
                "credentials:\n  c: {{ provider: {}, provider_params: {{ {param_yaml} }}, client_id: id, {user_keys} }}\nupstreams:\n  u: {{ listen: 127.0.0.1:0, url: https://api.example.com, credential: c }}\n",
                p.name
            );
            let cfg = crate::config::Config::from_yaml(&yaml, &|_| None)
                .unwrap_or_else(|e| panic!("preset {}: {e}", p.name));
            let c = &cfg.credentials["c"];
            assert_eq!(c.provider.as_deref(), Some(p.name.as_str()));
            if let Some(f) = &p.header_format {
                assert_eq!(&cfg.upstreams["u"].format, f, "{}", p.name);
            }
            if let Some(h) = &p.header {
                assert!(
                    cfg.upstreams["u"].header.as_str().eq_ignore_ascii_case(h),
                    "{}",
                    p.name
                );
            }
            assert_eq!(
                cfg.upstreams["u"].token_query_param, p.token_query_param,
                "{}",
                p.name
            );
            let url = c
                .token_url
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_default();
            assert!(
                !url.contains('{'),
                "{}: unfilled placeholder in {url}",
                p.name
            );
        }
    }

    /// The credential preset `name` resolves to, with `params` and a client secret.
    fn resolved(name: &str, params: &str) -> crate::config::CredentialConfig {
        let yaml = format!(
            "credentials:\n  c: {{ provider: {name}, provider_params: {{ {params} }}, client_id: id, client_secret: s, redirect_uri: https://example.com/cb }}\nupstreams:\n  u: {{ listen: 127.0.0.1:0, url: https://api.example.com, credential: c }}\n"
        );
        let cfg = crate::config::Config::from_yaml(&yaml, &|_| None)
            .unwrap_or_else(|e| panic!("preset {name}: {e}"));
        cfg.credentials["c"].clone()
    }

    /// Discovery fills what the file does not set: explicit keys win over it, and it wins
    /// over a preset's values. A preset's issuer is dropped when the file points
    /// `token_url` elsewhere; an issuer the file sets is always used.
    #[test]
    fn discovery_fills_what_the_file_does_not_set() {
        use crate::config::Endpoint::*;
        let okta = resolved("okta", "domain: example.okta.com");
        assert_eq!(
            okta.issuer.as_deref(),
            Some("https://example.okta.com/oauth2/default")
        );
        assert_eq!(
            okta.discover,
            [TokenUrl, AuthorizeUrl, DeviceAuthorizationUrl]
        );
        assert_eq!(
            resolved("auth0", "domain: acme.eu.auth0.com")
                .issuer
                .as_deref(),
            Some("https://acme.eu.auth0.com/")
        );
        assert_eq!(
            resolved("microsoft", "tenant: contoso.onmicrosoft.com").issuer,
            None
        );
        let yaml = |cred: &str| {
            format!(
                "credentials:\n  c: {{ {cred}, client_id: id, client_secret: s }}\nupstreams:\n  u: {{ listen: 127.0.0.1:0, url: https://api.example.com, credential: c }}\n"
            )
        };
        let cred = |c: &str| {
            crate::config::Config::from_yaml(&yaml(c), &|_| None)
                .unwrap_or_else(|e| panic!("{c}: {e}"))
                .credentials["c"]
                .clone()
        };
        let c = cred("grant: client_credentials, issuer: \"https://idp.example.com/realms/x\", authorize_url: https://idp.example.com/a");
        assert_eq!(c.discover, [TokenUrl, DeviceAuthorizationUrl]);
        assert_eq!(
            c.issuer.as_deref(),
            Some("https://idp.example.com/realms/x")
        );
        let c = cred("provider: okta, provider_params: { domain: example.okta.com }, token_url: https://gateway.example.com/token");
        assert_eq!((c.issuer, c.discover), (None, vec![]));
        let c = cred("provider: okta, provider_params: { domain: example.okta.com }, token_url: https://gateway.example.com/token, issuer: https://example.okta.com/oauth2/default");
        assert_eq!(c.discover, [AuthorizeUrl, DeviceAuthorizationUrl]);
        for (bad, why) in [
            (
                "issuer: \"https://idp.example.com/?x=1\"",
                "has a query or fragment",
            ),
            ("issuer: \"http://idp.example.com\"", "must use https://"),
        ] {
            let e = crate::config::Config::from_yaml(
                &yaml(&format!("grant: client_credentials, {bad}")),
                &|_| None,
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("credentials.c.issuer: ") && e.contains(why),
                "{e}"
            );
        }
    }

    /// Values taken from the providers' own documentation (each cited in its preset).
    #[test]
    fn documented_values_of_presets() {
        use crate::config::ClientAuth;
        // Okta: an app registered without a method uses client_secret_basic.
        assert_eq!(
            resolved("okta", "domain: example.okta.com").client_auth,
            ClientAuth::Basic
        );
        // Bitrix24: the refresh token lives 180 days.
        assert_eq!(
            resolved("bitrix24", "portal: example.bitrix24.com")
                .refresh_token
                .idle_lifetime
                .map(|d| d.0),
            Some(std::time::Duration::from_secs(180 * 86400))
        );
    }

    /// The device authorization endpoints (RFC 8628) of the providers that offer the
    /// flow, each as its preset cites it; presets of others have none.
    #[test]
    fn device_authorization_urls_of_presets() {
        let device = |name: &str, params: &str| {
            resolved(name, params)
                .device_authorization_url
                .map(|u| u.to_string())
        };
        for (name, params, url) in [
            ("google", "", "https://oauth2.googleapis.com/device/code"),
            (
                "microsoft",
                "tenant: contoso.onmicrosoft.com",
                "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode",
            ),
            (
                "okta",
                "domain: example.okta.com",
                "https://example.okta.com/oauth2/default/v1/device/authorize",
            ),
            (
                "keycloak",
                "base_url: https://sso.example.com, realm: acme",
                "https://sso.example.com/realms/acme/protocol/openid-connect/auth/device",
            ),
            (
                "auth0",
                "domain: acme.eu.auth0.com",
                "https://acme.eu.auth0.com/oauth/device/code",
            ),
        ] {
            assert_eq!(device(name, params).as_deref(), Some(url), "{name}");
        }
        assert_eq!(device("amocrm", "subdomain: acme"), None);
    }

    /// A plausible value for a parameter, by its name.
    /// A value of the parameter's shape.
    fn sample_value(p: &Param) -> &'static str {
        match p.shape {
            ParamShape::BaseUrl => "https://example.com",
            ParamShape::Host => "example.com",
            ParamShape::Label | ParamShape::Name => "example",
        }
    }

    #[test]
    fn parameters_are_checked_by_name() {
        let yaml = |params: &str| {
            format!(
                "credentials:\n  crm: {{ provider: amocrm, {params} client_id: id, client_secret: s, redirect_uri: https://example.com/cb }}\nupstreams:\n  u: {{ listen: 127.0.0.1:0, url: https://api.example.com, credential: crm }}\n"
            )
        };
        let e = crate::config::Config::from_yaml(&yaml(""), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("credentials.crm.provider_params.subdomain: required by preset amocrm"),
            "{e}"
        );
        let e = crate::config::Config::from_yaml(
            &yaml("provider_params: { subdomain: x, region: eu },"),
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("credentials.crm.provider_params.region: unknown parameter"),
            "{e}"
        );
        let e = crate::config::Config::from_yaml(
            &yaml("provider_params: { subdomain: x },").replace("amocrm", "amocrn"),
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("credentials.crm.provider: unknown preset \"amocrn\""),
            "{e}"
        );
    }

    /// The whole messages for the mistakes people make with amoCRM: a pasted host, a
    /// pasted address, and no `redirect_uri` (amoCRM needs it on every refresh).
    #[test]
    fn malformed_parameters_and_missing_requirements_say_what_to_write() {
        let yaml = |subdomain: &str, redirect: &str| {
            format!(
                "credentials:\n  crm: {{ provider: amocrm, provider_params: {{ subdomain: \"{subdomain}\" }}, client_id: id, client_secret: s{redirect} }}\nupstreams:\n  u: {{ listen: 127.0.0.1:0, url: https://api.example.com, credential: crm }}\n"
            )
        };
        let problems = |yaml: &str| {
            crate::config::Config::from_yaml(yaml, &|_| None)
                .unwrap_err()
                .problems
        };
        let redirect = ", redirect_uri: https://example.com/cb";
        assert_eq!(
            problems(&yaml("mycompany.amocrm.ru", redirect)),
            ["credentials.crm.provider_params.subdomain: \"mycompany.amocrm.ru\" is a whole host name; give only the first part of the host; write subdomain: mycompany"]
        );
        assert_eq!(
            problems(&yaml("https://mycompany.amocrm.ru/", redirect)),
            ["credentials.crm.provider_params.subdomain: \"https://mycompany.amocrm.ru/\" has a scheme; give only the first part of the host; write subdomain: mycompany"]
        );
        assert_eq!(
            problems(&yaml("mycompany", "")),
            ["credentials.crm.redirect_uri: required by preset amocrm (see `tokenrelay providers amocrm`)"]
        );
    }

    /// A preset's `header` becomes the header name of the upstreams using its credential,
    /// with its `header_format`; an upstream's own `header` or `format` wins, and upstreams
    /// of other credentials are left alone.
    #[test]
    fn preset_header_applies_to_upstreams_that_set_none() {
        let yaml = "credentials:\n  shop: { provider: shopify, provider_params: { shop: acme }, client_id: id, client_secret: s }\n  other: { grant: client_credentials, token_url: https://idp.example.com/token, client_id: id, client_secret: s }\nupstreams:\n  a: { listen: 127.0.0.1:0, url: https://acme.myshopify.com, credential: shop }\n  b: { listen: 127.0.0.1:0, url: https://acme.myshopify.com, credential: shop, header: X-Other, format: \"Token {token}\" }\n  c: { listen: 127.0.0.1:0, url: https://api.example.com, credential: other }\n";
        let cfg = crate::config::Config::from_yaml(yaml, &|_| None).unwrap();
        let (a, b, c) = (
            &cfg.upstreams["a"],
            &cfg.upstreams["b"],
            &cfg.upstreams["c"],
        );
        assert!(
            a.header.eq_ignore_ascii_case("x-shopify-access-token"),
            "{}",
            a.header
        );
        assert_eq!(a.format, "{token}");
        assert!(b.header.eq_ignore_ascii_case("x-other"), "{}", b.header);
        assert_eq!(b.format, "Token {token}");
        assert!(
            c.header.eq_ignore_ascii_case("authorization"),
            "{}",
            c.header
        );
        assert_eq!(c.format, "Bearer {token}");
        assert_eq!(
            cfg.origins.get("upstreams.a.header").map(String::as_str),
            Some("preset shopify")
        );
        assert!(!cfg.origins.contains_key("upstreams.b.header"));
    }

    #[test]
    fn explicit_keys_override_the_preset_and_origins_are_recorded() {
        let yaml = "credentials:\n  crm: { provider: amocrm, provider_params: { subdomain: acme }, client_id: id, client_secret: s, redirect_uri: https://example.com/cb, token_url: \"http://127.0.0.1:9/token\", allow_insecure_http: true }\nupstreams:\n  u: { listen: 127.0.0.1:0, url: https://acme.amocrm.ru, credential: crm }\n";
        let cfg = crate::config::Config::from_yaml(yaml, &|_| None).unwrap();
        let c = &cfg.credentials["crm"];
        assert_eq!(
            c.token_url.as_ref().unwrap().as_str(),
            "http://127.0.0.1:9/token"
        );
        assert!(!cfg.origins.contains_key("credentials.crm.token_url"));
        assert_eq!(
            cfg.origins
                .get("credentials.crm.request_format")
                .map(String::as_str),
            Some("preset amocrm")
        );
    }
}
