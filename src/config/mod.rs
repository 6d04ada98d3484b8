//! Configuration: YAML file → `${VAR}` expansion → raw shape (unknown keys rejected) →
//! validated, typed [`Config`]. Every problem names its key path, and all problems are
//! reported together. Secret files are read here; the network is never contacted.

mod client_auth;
mod compare;
mod expand;
mod param_shape;
pub(crate) mod preset;
pub(crate) mod provider_rules;
mod raw;
mod secrets;
pub(crate) mod sink;
mod sunset;
pub(crate) mod units;
mod unknown_keys;
pub(crate) mod url_template;
mod validate;
mod warnings;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use url::Url;

use crate::secret::Secret;
pub use client_auth::{
    AssertionKey, ClientAssertion, ClientCertConfig, JwtBearer, CERT_EXPIRY_WARNING,
    DEFAULT_ASSERTION_LIFETIME,
};
pub use compare::{IssuedTo, RESTART_ONLY};
pub use provider_rules::{
    DeadGrantAnswer, ParamsIn, RateLimit, RefreshMode, RefreshTokenRules, TokenMethod,
};
use raw::RawConfig;
use secrets::{check_ca_file, secret_from};
pub use secrets::{read_secret, read_static_token, SecretFileError};
pub use sink::{FileMode, SinkConfig, SinkFormat};
pub use sunset::{Day, Sunset, SUNSET_WARNING};
use units::{ByteSize, HumanDuration};
pub use url_template::{TemplatedUpstream, UpstreamUrl, UrlTemplate};
use validate::validate;

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_STORE_PATH: &str = "./state";
pub const DEFAULT_REFRESH_AT: f64 = 0.8;
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Quiet time allowed inside a response body (as nginx's proxy_read_timeout).
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed for a whole request body to arrive.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RETRY_BODY_LIMIT: u64 = 64 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub const DEFAULT_MAX_HEADER_SIZE: u64 = 64 * 1024;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
pub const DEFAULT_STORE_POLL: Duration = Duration::from_secs(1);

/// Why a config was refused: one line per problem, each starting with its key path.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(msg: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![msg.into()],
        }
    }
}

/// The whole validated configuration.
#[derive(Debug, Serialize)]
pub struct Config {
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    pub credentials: BTreeMap<String, CredentialConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub notify: NotifyConfig,
    /// Values filled in by provider presets: key path → `preset NAME` (for `check`).
    #[serde(skip)]
    pub origins: preset::Origins,
}

#[derive(Debug, Serialize)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Where the bearer token of the admin actions comes from (`admin.token_file`).
    pub token_file: Option<PathBuf>,
    /// That token: the status page's actions require it when set.
    #[serde(skip)]
    pub token: Option<Secret>,
}

#[derive(Debug, Serialize)]
pub struct StoreConfig {
    #[serde(flatten)]
    pub backend: StoreBackend,
    /// 32-byte AEAD key for tokens at rest, read from `encryption_key_file`.
    #[serde(skip)]
    pub encryption_key: Option<Secret>,
    pub encryption_key_file: Option<PathBuf>,
    /// Upper bound on how long another process's rotation takes to be noticed.
    pub poll_interval: HumanDuration,
    /// TTL of the refresh lease; renewed every third of it while a refresh holds it.
    /// Unset: derived from each credential's `token_timeout` (3 × + 5 s), so the lease
    /// outlasts the token request even without renewals.
    pub lease_ttl: Option<HumanDuration>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StoreBackend {
    File {
        path: PathBuf,
        /// A second directory keeping the generation marks, where a restore of `path`
        /// (a whole-volume snapshot) does not reach.
        mark_path: Option<PathBuf>,
        /// Open the store even on a network or FUSE filesystem (NFS, CIFS/SMB, FUSE),
        /// where flock and rename are not reliable; refused by default.
        allow_network_filesystem: bool,
    },
    Redis {
        url: Secret,
        key_prefix: String,
        /// Replicas that must acknowledge each write (the lease, a compare-and-swap)
        /// before it counts (`WAIT`, and `WAITAOF` on Redis 7.2+); 0: none.
        wait_replicas: u32,
    },
    Etcd {
        endpoints: Vec<String>,
        key_prefix: String,
        username: Option<String>,
        password: Option<Secret>,
        ca_file: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: Option<String>,
    pub access_log: bool,
}

/// Who hears about credentials that need a person (`notify`).
#[derive(Clone, Debug, Serialize)]
pub struct NotifyConfig {
    pub webhook: Option<WebhookConfig>,
    pub expiring_before: HumanDuration,
}

/// A URL that gets a JSON POST for each event.
#[derive(Clone, Debug, Serialize)]
pub struct WebhookConfig {
    pub url: WebhookUrl,
    /// The HMAC-SHA256 key read from `secret_file`.
    #[serde(skip)]
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
    pub events: BTreeSet<NotifyEvent>,
}

/// A webhook's URL. Many carry their secret in the path (Slack's) or the query, so it
/// is shown (`Debug`, `check`) as its scheme and host only.
#[derive(Clone)]
pub struct WebhookUrl(Url);

impl WebhookUrl {
    pub fn new(url: Url) -> WebhookUrl {
        WebhookUrl(url)
    }

    /// The whole URL, for delivery only.
    pub fn as_url(&self) -> &Url {
        &self.0
    }

    /// `scheme://host[:port]/…`.
    pub fn shown(&self) -> String {
        format!("{}/…", self.0.origin().ascii_serialization())
    }
}

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

impl Serialize for WebhookUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shown())
    }
}

/// What a notification tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyEvent {
    ReauthorizationRequired,
    Unavailable,
    Recovered,
    Moved,
    RefreshTokenExpiring,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 5] = [
        NotifyEvent::ReauthorizationRequired,
        NotifyEvent::Unavailable,
        NotifyEvent::Recovered,
        NotifyEvent::Moved,
        NotifyEvent::RefreshTokenExpiring,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::ReauthorizationRequired => "reauthorization_required",
            NotifyEvent::Unavailable => "unavailable",
            NotifyEvent::Recovered => "recovered",
            NotifyEvent::Moved => "moved",
            NotifyEvent::RefreshTokenExpiring => "refresh_token_expiring",
        }
    }
}

/// Default of `notify.expiring_before`.
pub const DEFAULT_EXPIRING_BEFORE: Duration = Duration::from_secs(72 * 3600);

#[derive(Debug, Serialize)]
pub struct RuntimeConfig {
    pub worker_threads: Option<usize>,
    pub shutdown_grace: HumanDuration,
    pub instance_id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    RefreshToken,
    ClientCredentials,
    Password,
    Static,
    /// RFC 7523 §2.1: a signed assertion is the grant; nothing is stored.
    JwtBearer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    RequestBody,
    Basic,
    PrivateKeyJwt,
    ClientSecretJwt,
    TlsClientAuth,
    SelfSignedTlsClientAuth,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::RequestBody => "request_body",
            ClientAuth::Basic => "basic",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::ClientSecretJwt => "client_secret_jwt",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestFormat {
    Form,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundAuthorization {
    Strip,
    Reject,
}

/// One OAuth2 credential: how to obtain and refresh its access token.
#[derive(Clone, Debug, Serialize)]
pub struct CredentialConfig {
    pub name: String,
    /// The provider preset it starts from, if any.
    pub provider: Option<String>,
    pub grant: Grant,
    pub token_url: Option<Url>,
    pub authorize_url: Option<Url>,
    /// RFC 8628 §3.1's device authorization endpoint, for `authorize --device`.
    pub device_authorization_url: Option<Url>,
    /// The authorization server's issuer identifier, exactly as written: its metadata
    /// fills the endpoints named in `discover`.
    pub issuer: Option<String>,
    /// The endpoints the file leaves to discovery (unset, or set only by a preset).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub discover: Vec<Endpoint>,
    /// The sunset its preset records (see [`CredentialConfig::sunset`]).
    #[serde(skip)]
    pub preset_sunset: Option<Sunset>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
    /// `private_key_jwt` / `client_secret_jwt`: how the client assertion is signed.
    pub client_assertion: Option<ClientAssertion>,
    /// Client certificate presented to the token endpoint only (RFC 8705).
    pub client_cert: Option<ClientCertConfig>,
    /// `grant: jwt_bearer`: the assertion that is the grant.
    pub jwt_bearer: Option<JwtBearer>,
    pub request_format: RequestFormat,
    pub redirect_uri: Option<String>,
    pub scopes: Vec<String>,
    pub extra_params: BTreeMap<String, String>,
    pub refresh_at: f64,
    pub refresh_before: HumanDuration,
    /// Whether the access token is refreshed before it expires or only when needed.
    pub refresh_mode: RefreshMode,
    pub token_timeout: HumanDuration,
    pub default_expires_in: HumanDuration,
    /// Values may carry API keys, so `check` and `Debug` show only the names.
    pub token_headers: BTreeMap<String, Secret>,
    pub ca_file: Option<PathBuf>,
    pub allow_insecure_http: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub static_token: Option<Secret>,
    /// Where a static token came from; re-read when it changes (mounted secrets rotate).
    pub static_token_file: Option<PathBuf>,
    pub token_request_method: TokenMethod,
    pub token_params_in: ParamsIn,
    /// Whether `redirect_uri` is also sent on refresh (amoCRM requires it).
    pub redirect_uri_on_refresh: bool,
    /// Whether `scopes` are also sent on refresh. Off by default: without `scope` a
    /// refresh keeps the granted scope (RFC 6749 §6), and with it some providers narrow
    /// the grant (Auth0); Microsoft's preset turns it on, as there `scope` picks the API.
    pub scopes_on_refresh: bool,
    pub refresh_token: RefreshTokenRules,
    /// Answers besides `invalid_grant` that mean the grant is dead.
    pub dead_grant_answers: Vec<DeadGrantAnswer>,
    /// Extra string fields of token answers kept with the token (stored with it, shown
    /// by `/status`): the configured `answer_fields` (or the preset's) plus every field
    /// an upstream's url template names. Secret-looking names are never kept.
    pub answer_fields: Vec<String>,
    /// `token_type` values of token answers accepted besides Bearer, lowercase (Slack's
    /// `bot` and `user`). RFC 6749 §7.1 has a client refuse types it does not understand;
    /// these are types a provider documents for tokens used as configured by the
    /// upstream's `header` and `format`.
    pub token_types: Vec<String>,
    /// Files written with each new access token (`sinks`).
    pub sinks: Vec<SinkConfig>,
    /// Upstreams using this credential whose url comes from a token-answer field; each
    /// is resolved when a token is published (filled in by validation).
    #[serde(skip)]
    pub url_templates: Vec<TemplatedUpstream>,
}

/// An endpoint of an authorization server that its metadata may give.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    TokenUrl,
    AuthorizeUrl,
    DeviceAuthorizationUrl,
}

impl Endpoint {
    pub const ALL: [Endpoint; 3] = [
        Endpoint::TokenUrl,
        Endpoint::AuthorizeUrl,
        Endpoint::DeviceAuthorizationUrl,
    ];

    /// The config key.
    pub fn key(self) -> &'static str {
        match self {
            Endpoint::TokenUrl => "token_url",
            Endpoint::AuthorizeUrl => "authorize_url",
            Endpoint::DeviceAuthorizationUrl => "device_authorization_url",
        }
    }

    /// The metadata field (RFC 8414 §2, RFC 8628 §4).
    pub fn metadata_field(self) -> &'static str {
        match self {
            Endpoint::TokenUrl => "token_endpoint",
            Endpoint::AuthorizeUrl => "authorization_endpoint",
            Endpoint::DeviceAuthorizationUrl => "device_authorization_endpoint",
        }
    }
}

impl CredentialConfig {
    /// The configured value of `endpoint`.
    pub fn endpoint(&self, endpoint: Endpoint) -> Option<&Url> {
        match endpoint {
            Endpoint::TokenUrl => self.token_url.as_ref(),
            Endpoint::AuthorizeUrl => self.authorize_url.as_ref(),
            Endpoint::DeviceAuthorizationUrl => self.device_authorization_url.as_ref(),
        }
    }

    /// The configured value of `endpoint`, to fill in.
    pub fn endpoint_mut(&mut self, endpoint: Endpoint) -> &mut Option<Url> {
        match endpoint {
            Endpoint::TokenUrl => &mut self.token_url,
            Endpoint::AuthorizeUrl => &mut self.authorize_url,
            Endpoint::DeviceAuthorizationUrl => &mut self.device_authorization_url,
        }
    }
}

/// Inbound connection limits of one listener.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: HumanDuration,
    pub idle_timeout: HumanDuration,
    pub max_header_size: ByteSize,
}

/// One upstream API and the local listener that fronts it.
#[derive(Debug, Serialize)]
pub struct UpstreamConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// A fixed URL, or `{token.FIELD}` plus an optional path (taken from the token answer).
    pub url: UpstreamUrl,
    pub credential: String,
    pub header: String,
    pub format: String,
    /// Also passes the bare token as this query parameter (Bitrix24's `auth`), replacing
    /// any the app sent.
    pub token_query_param: Option<String>,
    /// The provider reads query parameter names case-insensitively: the app's `AUTH` or
    /// `Auth` is removed along with its `auth`.
    pub token_query_param_ignore_case: bool,
    pub inbound_authorization: InboundAuthorization,
    pub retry_on_401: bool,
    pub retry_body_limit: ByteSize,
    pub timeout: HumanDuration,
    /// Longest quiet time within a response body before it is cut (SSE, long-poll).
    pub body_idle_timeout: HumanDuration,
    /// Longest time for a whole request body to arrive.
    pub body_timeout: HumanDuration,
    pub connect_timeout: HumanDuration,
    pub ca_file: Option<PathBuf>,
    /// Client certificate presented to the upstream (mutual TLS on every call).
    pub client_cert: Option<ClientCertConfig>,
    pub allow_insecure_http: bool,
    /// Offer HTTP/2 to an https upstream (ALPN). Off: HTTP/1.1 on pooled keep-alive
    /// connections, served by the fast engine.
    pub http2: bool,
    pub limits: Limits,
}

impl Config {
    /// Reads, expands and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read: {e}", path.display())))?;
        Self::from_yaml(&text, &|k| std::env::var(k).ok())
    }

    /// Parses config text, looking `${VAR}` up with `env`. Relative file paths in it are
    /// relative to the working directory.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::one(yaml_error(text, &e)))?;
        if value.is_null() {
            value = serde_yaml::Value::Mapping(Default::default());
        }
        let mut problems = Vec::new();
        expand::expand_env(&mut value, "", env, &mut problems);
        let origins = preset::apply(&mut value, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let raw: RawConfig =
            unknown_keys::deserialize(value).map_err(|problems| ConfigError { problems })?;
        let mut config = validate(raw, env)?;
        config.origins = origins;
        plan_discovery(&mut config);
        for c in config.credentials.values_mut() {
            c.preset_sunset = c
                .provider
                .as_deref()
                .and_then(preset::get)
                .and_then(|p| p.sunset);
        }
        Ok(config)
    }

    /// Problems that do not stop tokenrelay (see [`warnings`]): client certificates that
    /// expire within [`CERT_EXPIRY_WARNING`], a listener other hosts can reach, and
    /// settings that weaken the promise.
    pub fn warnings(&self) -> Vec<String> {
        warnings::of(self)
    }

    /// The config file's JSON Schema (draft 2020-12), derived from the types it is read
    /// into, with their documentation as descriptions (`tokenrelay schema`). Keys a
    /// provider preset fills in are not required by the schema; `check` judges the rest.
    pub fn json_schema() -> serde_json::Value {
        let mut schema = schemars::schema_for!(raw::RawConfig);
        schema.insert("title".into(), "tokenrelay configuration".into());
        schema.to_value()
    }

    /// The resolved config as YAML with every secret replaced by `<redacted>`.
    pub fn to_redacted_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Decides, per credential with an `issuer`, which endpoints its metadata fills: those
/// the file does not set (explicit keys win over discovery, discovery over a preset). An
/// issuer that only a preset gives is dropped when the file sets `token_url` itself: the
/// credential was pointed elsewhere (a gateway, a test server), and the preset's
/// authorization server is then not the one to ask.
fn plan_discovery(config: &mut Config) {
    for (name, c) in config.credentials.iter_mut() {
        let from_preset = |key: &str| {
            config
                .origins
                .get(&format!("credentials.{name}.{key}"))
                .is_some_and(|o| o.starts_with("preset "))
        };
        if c.issuer.is_none() {
            continue;
        }
        if from_preset("issuer") && c.token_url.is_some() && !from_preset("token_url") {
            c.issuer = None;
            config.origins.remove(&format!("credentials.{name}.issuer"));
            continue;
        }
        c.discover = Endpoint::ALL
            .into_iter()
            .filter(|e| c.endpoint_mut(*e).is_none() || from_preset(e.key()))
            .collect();
    }
}

/// Why the text is not YAML; a tab (YAML indents with spaces only) is named with its
/// line, since the parser's own words do not say it.
fn yaml_error(text: &str, e: &serde_yaml::Error) -> String {
    let tab_line = e.location().and_then(|at| {
        let line = text.lines().nth(at.line().saturating_sub(1))?;
        line[..line.len().min(at.column())]
            .contains('\t')
            .then_some(at.line())
            .or_else(|| line.starts_with('\t').then_some(at.line()))
    });
    match tab_line {
        Some(line) => format!(
            "config is not valid YAML: line {line} is indented with a tab; YAML indents with spaces only"
        ),
        None => format!("config is not valid YAML: {e}"),
    }
}

/// Turns serde's message into `path: message`; for unknown fields the path names the
/// unknown key itself, as users search their file for it.
fn describe_serde_error(path: &str, inner: &str) -> String {
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            let field = &rest[..end];
            // serde_path_to_error has usually recorded the unknown key as the last
            // path segment already; name it once.
            let full = if path.is_empty() || path == "." {
                field.to_string()
            } else if path == field || path.ends_with(&format!(".{field}")) {
                path.to_string()
            } else {
                format!("{path}.{field}")
            };
            return format!("{full}: unknown key ({})", inner.trim_end_matches('.'));
        }
    }
    let path = if path.is_empty() || path == "." {
        "config"
    } else {
        path
    };
    // serde_yaml appends a position that refers to the expanded document; keep it short.
    let msg = inner.split(" at line ").next().unwrap_or(inner);
    format!("{path}: {msg}")
}

/// Collects problems, each prefixed by a key path.
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, path: &str, msg: impl fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }
}
