//! The config file's shape, exactly as written in YAML. Unknown keys are rejected
//! (`deny_unknown_fields`); meaning and cross-checks come in `validate`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use super::provider_rules::{DeadGrantAnswer, ParamsIn, RateLimit, RefreshMode, TokenMethod};
use super::sink::RawSink;

use super::units::{ByteSize, HumanDuration};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub notify: RawNotify,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub webhook: Option<RawWebhook>,
    /// `refresh_token_expiring` fires once when a refresh token's known expiry is nearer.
    pub expiring_before: Option<HumanDuration>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    /// HMAC-SHA256 key: the body's signature goes in `X-Tokenrelay-Signature`.
    pub secret_file: Option<PathBuf>,
    pub events: Option<Vec<String>>,
    pub allow_insecure_http: Option<bool>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    /// A file holding a bearer token: the status page's actions (POSTs) then require
    /// it, from any address; without it they are allowed from loopback only.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<PathBuf>,
    pub mark_path: Option<PathBuf>,
    pub allow_network_filesystem: Option<bool>,
    pub url: Option<String>,
    pub endpoints: Option<Vec<String>>,
    pub key_prefix: Option<String>,
    pub wait_replicas: Option<u32>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub encryption_key_file: Option<PathBuf>,
    pub poll_interval: Option<HumanDuration>,
    pub lease_ttl: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub worker_threads: Option<usize>,
    pub shutdown_grace: Option<HumanDuration>,
    pub instance_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub provider: Option<String>,
    /// Consumed by the preset step before typing (see `preset::apply`).
    #[serde(default, rename = "provider_params")]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub _provider_params: BTreeMap<String, serde_yaml::Value>,
    pub grant: Option<String>,
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub client_auth: Option<String>,
    pub request_format: Option<String>,
    pub redirect_uri: Option<String>,
    pub authorize_url: Option<String>,
    /// The device authorization endpoint (RFC 8628 §3.1) for `tokenrelay authorize
    /// --device`; presets of providers that offer the flow set it.
    pub device_authorization_url: Option<String>,
    /// The authorization server's issuer identifier: `token_url`, `authorize_url` and
    /// `device_authorization_url` that are not set are read from its metadata (RFC 8414,
    /// then OpenID Connect Discovery) at start and reload.
    pub issuer: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub extra_params: BTreeMap<String, String>,
    pub refresh_at: Option<f64>,
    pub refresh_before: Option<HumanDuration>,
    /// `proactive` (default): before the access token expires; `on_demand`: when a
    /// request needs a fresh token, and before the refresh token's idle lifetime ends.
    pub refresh_mode: Option<RefreshMode>,
    pub token_timeout: Option<HumanDuration>,
    pub default_expires_in: Option<HumanDuration>,
    #[serde(default)]
    pub token_headers: BTreeMap<String, String>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token_request_method: Option<TokenMethod>,
    pub token_params_in: Option<ParamsIn>,
    pub redirect_uri_on_refresh: Option<bool>,
    pub scopes_on_refresh: Option<bool>,
    pub rotating_refresh_token: Option<bool>,
    pub refresh_token_idle_lifetime: Option<HumanDuration>,
    pub refresh_token_absolute_lifetime: Option<HumanDuration>,
    pub refresh_rate_limit: Option<RateLimit>,
    pub min_token_age: Option<HumanDuration>,
    #[serde(default)]
    pub dead_grant_answers: Vec<DeadGrantAnswer>,
    /// Token-answer fields to keep (`instance_url`, ...); presets set it.
    pub answer_fields: Option<Vec<String>>,
    /// `token_type` values accepted besides Bearer (Slack's `bot`, `user`).
    pub token_types: Option<Vec<String>>,
    // Client authentication without a shared secret, and the jwt_bearer grant
    // (validated in client_auth.rs).
    pub client_assertion_key_file: Option<PathBuf>,
    pub client_assertion_alg: Option<String>,
    pub client_assertion_kid: Option<String>,
    pub client_assertion_audience: Option<String>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub assertion_issuer: Option<String>,
    /// `subject` is what Google's service-account guides call it (domain-wide delegation).
    #[serde(alias = "subject")]
    pub assertion_subject: Option<String>,
    pub assertion_audience: Option<String>,
    pub assertion_key_file: Option<PathBuf>,
    pub assertion_alg: Option<String>,
    pub assertion_kid: Option<String>,
    #[serde(default)]
    pub assertion_claims: BTreeMap<String, serde_json::Value>,
    pub assertion_lifetime: Option<HumanDuration>,
    pub service_account_file: Option<PathBuf>,
    /// Files that get the access token each time a new one is published (token sinks).
    #[serde(default)]
    pub sinks: Vec<RawSink>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub listen: Option<String>,
    pub url: Option<String>,
    pub credential: Option<String>,
    pub header: Option<String>,
    pub format: Option<String>,
    pub token_query_param: Option<String>,
    #[serde(default)]
    pub token_query_param_ignore_case: bool,
    pub inbound_authorization: Option<String>,
    pub retry_on_401: Option<bool>,
    pub retry_body_limit: Option<ByteSize>,
    pub timeout: Option<HumanDuration>,
    pub body_idle_timeout: Option<HumanDuration>,
    pub body_timeout: Option<HumanDuration>,
    pub connect_timeout: Option<HumanDuration>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    #[serde(default)]
    pub http2: bool,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub header_read_timeout: Option<HumanDuration>,
    pub idle_timeout: Option<HumanDuration>,
    pub max_header_size: Option<ByteSize>,
}
