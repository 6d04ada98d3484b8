//! Configuration: YAML file → `${VAR}` expansion → raw shape (unknown keys rejected) →
//! validated, typed [`Config`]. Every problem names its key path, and all problems are
//! reported together. Secret files are read here; the network is never contacted.

mod client_auth;
mod expand;
pub mod preset;
pub mod provider_rules;
mod raw;
pub mod units;

use std::collections::{BTreeMap, HashMap};
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
pub use provider_rules::{DeadGrantAnswer, ParamsIn, RateLimit, RefreshTokenRules, TokenMethod};
use raw::{RawConfig, RawCredential, RawStore, RawUpstream};
use units::{ByteSize, HumanDuration};

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
    /// Values filled in by provider presets: key path → `preset NAME` (for `check`).
    #[serde(skip)]
    pub origins: preset::Origins,
}

#[derive(Debug, Serialize)]
pub struct AdminConfig {
    pub listen: SocketAddr,
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
    },
    Redis {
        url: Secret,
        key_prefix: String,
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
    pub refresh_token: RefreshTokenRules,
    /// Answers besides `invalid_grant` that mean the grant is dead.
    pub dead_grant_answers: Vec<DeadGrantAnswer>,
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
    pub url: Url,
    pub credential: String,
    pub header: String,
    pub format: String,
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
        let mut value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::one(format!("config is not valid YAML: {e}")))?;
        if value.is_null() {
            value = serde_yaml::Value::Mapping(Default::default());
        }
        let mut problems = Vec::new();
        expand::expand_env(&mut value, "", env, &mut problems);
        let origins = preset::apply(&mut value, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            ConfigError::one(describe_serde_error(&path, &inner))
        })?;
        let mut config = validate(raw, env)?;
        config.origins = origins;
        Ok(config)
    }

    /// Problems that do not stop tokenrelay yet: client certificates that expire within
    /// [`CERT_EXPIRY_WARNING`].
    pub fn warnings(&self) -> Vec<String> {
        let creds = self.credentials.iter().filter_map(|(n, c)| {
            c.client_cert
                .as_ref()
                .and_then(|cc| cc.expiry_warning(&format!("credentials.{n}.client_cert_file")))
        });
        let ups = self.upstreams.iter().filter_map(|(n, u)| {
            u.client_cert
                .as_ref()
                .and_then(|cc| cc.expiry_warning(&format!("upstreams.{n}.client_cert_file")))
        });
        creds.chain(ups).collect()
    }

    /// The resolved config as YAML with every secret replaced by `<redacted>`.
    pub fn to_redacted_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
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

fn validate(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut p = Problems(Vec::new());

    let admin_listen = raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
    let admin = AdminConfig {
        listen: parse_listen(&mut p, "admin.listen", admin_listen),
    };
    let store = validate_store(&mut p, raw.store);
    let log = LogConfig {
        format: match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.add("log.format", format!("must be text or json, got {other:?}"));
                LogFormat::Text
            }
        },
        level: raw.log.level,
        access_log: raw.log.access_log.unwrap_or(false),
    };
    if raw.runtime.worker_threads == Some(0) {
        p.add("runtime.worker_threads", "must be at least 1");
    }
    let runtime = RuntimeConfig {
        worker_threads: raw.runtime.worker_threads,
        shutdown_grace: raw
            .runtime
            .shutdown_grace
            .unwrap_or(HumanDuration(DEFAULT_SHUTDOWN_GRACE)),
        instance_id: raw
            .runtime
            .instance_id
            .unwrap_or_else(|| default_instance_id(env)),
    };

    if raw.credentials.is_empty() {
        p.add("credentials", "at least one credential is required");
    }
    let mut credentials = BTreeMap::new();
    for (name, c) in raw.credentials {
        check_name(&mut p, &format!("credentials.{name}"), &name);
        if let Some(c) = validate_credential(&mut p, &name, c) {
            credentials.insert(name, c);
        }
    }

    if raw.upstreams.is_empty() {
        p.add("upstreams", "at least one upstream is required");
    }
    let mut upstreams = BTreeMap::new();
    let mut listens: HashMap<SocketAddr, String> = HashMap::new();
    listens.insert(admin.listen, "admin.listen".into());
    for (name, u) in raw.upstreams {
        let path = format!("upstreams.{name}");
        check_name(&mut p, &path, &name);
        if let Some(u) = validate_upstream(&mut p, &name, u, &credentials) {
            // Port 0 (any free port, used by tests) never collides.
            let taken = (u.listen.port() != 0)
                .then(|| listens.insert(u.listen, format!("{path}.listen")))
                .flatten();
            if let Some(other) = taken {
                p.add(
                    &format!("{path}.listen"),
                    format!("{} is already used by {other}", u.listen),
                );
            }
            upstreams.insert(name, u);
        }
    }

    if !p.0.is_empty() {
        return Err(ConfigError { problems: p.0 });
    }
    Ok(Config {
        admin,
        store,
        log,
        runtime,
        credentials,
        upstreams,
        origins: preset::Origins::new(),
    })
}

fn default_instance_id(env: &dyn Fn(&str) -> Option<String>) -> String {
    let host = env("HOSTNAME")
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tokenrelay".into());
    format!("{host}/{}", std::process::id())
}

/// Names become metric labels, file names and store keys: keep them plain.
fn check_name(p: &mut Problems, path: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        p.add(
            path,
            "name must be 1-64 characters of letters, digits, '-' or '_'",
        );
    }
}

fn parse_listen(p: &mut Problems, path: &str, s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| {
        p.add(
            path,
            format!("{s:?} is not an address like 127.0.0.1:8081 or [::1]:8081"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// Parses an http(s) URL, enforcing https unless `allow_insecure_http`.
fn parse_url(p: &mut Problems, path: &str, s: &str, allow_insecure_http: bool) -> Option<Url> {
    let url = match Url::parse(s) {
        Ok(u) => u,
        Err(e) => {
            p.add(path, format!("{s:?} is not a valid URL ({e})"));
            return None;
        }
    };
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http => {}
        "http" => {
            p.add(
                path,
                format!("must use https:// (got {s:?}); set allow_insecure_http: true on this entry only for local development or tests"),
            );
            return None;
        }
        other => {
            p.add(
                path,
                format!("scheme {other:?} is not supported; use https://"),
            );
            return None;
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        p.add(path, format!("{s:?} has no host"));
        return None;
    }
    if !url.username().is_empty() || url.password().is_some() {
        p.add(
            path,
            "credentials in the URL are not allowed; use the credential settings",
        );
        return None;
    }
    Some(url)
}

/// Reads a secret from a file, trimming one trailing newline as editors and `echo` add it.
fn read_secret_file(p: &mut Problems, path: &str, file: &Path) -> Option<Secret> {
    read_secret(file).map_err(|e| p.add(path, e)).ok()
}

/// A static token file's content: [`read_secret`], then the token rule
/// ([`Secret::check_token`]); errors name the file, never the token.
pub fn read_static_token(file: &Path) -> Result<Secret, String> {
    let token = read_secret(file)?;
    token
        .check_token()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(token)
}

/// A secret file's content without its final line break; errors name the file.
pub fn read_secret(file: &Path) -> Result<Secret, String> {
    let s = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let v = s.strip_suffix('\n').unwrap_or(&s);
    let v = v.strip_suffix('\r').unwrap_or(v);
    if v.is_empty() {
        return Err(format!("{} is empty", file.display()));
    }
    Ok(Secret::new(v))
}

/// Exactly one of an inline secret or a `*_file`; `None` when neither is set.
fn secret_from(
    p: &mut Problems,
    path: &str,
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Option<Secret> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            p.add(
                &format!("{path}.{key}"),
                format!("set either {key} or {key}_file, not both"),
            );
            None
        }
        (Some(v), None) if v.is_empty() => {
            p.add(&format!("{path}.{key}"), "is empty");
            None
        }
        (Some(v), None) => Some(Secret::new(v)),
        (None, Some(f)) => read_secret_file(p, &format!("{path}.{key}_file"), &f),
        (None, None) => None,
    }
}

fn check_ca_file(p: &mut Problems, path: &str, file: &Option<PathBuf>) {
    if let Some(f) = file {
        if let Err(e) = crate::tls::read_ca_file(f) {
            p.add(path, e);
        }
    }
}

fn validate_store(p: &mut Problems, raw: RawStore) -> StoreConfig {
    let kind = raw.kind.as_deref().unwrap_or("file");
    let prefix = raw.key_prefix.unwrap_or_else(|| "tokenrelay/".to_string());
    let password = secret_from(p, "store", "password", raw.password, raw.password_file);
    let backend = match kind {
        "file" => StoreBackend::File {
            path: raw
                .path
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH)),
        },
        "redis" => {
            let url = raw.url.unwrap_or_default();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                p.add(
                    "store.url",
                    "a redis:// or rediss:// URL is required for store type redis",
                );
            }
            StoreBackend::Redis {
                url: Secret::new(url),
                key_prefix: prefix,
            }
        }
        "etcd" => {
            let endpoints = raw.endpoints.unwrap_or_default();
            if endpoints.is_empty() {
                p.add(
                    "store.endpoints",
                    "at least one endpoint is required for store type etcd",
                );
            }
            for (i, e) in endpoints.iter().enumerate() {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    p.add(
                        &format!("store.endpoints[{i}]"),
                        format!("{e:?} must start with http:// or https://"),
                    );
                }
            }
            check_ca_file(p, "store.ca_file", &raw.ca_file);
            StoreBackend::Etcd {
                endpoints,
                key_prefix: prefix,
                username: raw.username,
                password,
                ca_file: raw.ca_file,
            }
        }
        other => {
            p.add(
                "store.type",
                format!("must be file, redis or etcd, got {other:?}"),
            );
            StoreBackend::File {
                path: PathBuf::from(DEFAULT_STORE_PATH),
            }
        }
    };
    let encryption_key = raw.encryption_key_file.as_ref().and_then(|f| {
        crate::store::crypto::read_key_file(f)
            .map_err(|e| p.add("store.encryption_key_file", e))
            .ok()
    });
    let poll_interval = raw
        .poll_interval
        .unwrap_or(HumanDuration(DEFAULT_STORE_POLL));
    if poll_interval.0 < Duration::from_millis(50) || poll_interval.0 > Duration::from_secs(60) {
        p.add("store.poll_interval", "must be between 50ms and 60s");
    }
    if raw
        .lease_ttl
        .is_some_and(|t| t.0 < Duration::from_secs(1) || t.0 > Duration::from_secs(600))
    {
        p.add("store.lease_ttl", "must be between 1s and 10m");
    }
    StoreConfig {
        backend,
        encryption_key,
        encryption_key_file: raw.encryption_key_file,
        poll_interval,
        lease_ttl: raw.lease_ttl,
    }
}

fn validate_credential(
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
    provider_rules::check_dead_grant(p, &path, &c.dead_grant_answers);
    provider_rules::check_rate_limit(p, &at("refresh_rate_limit"), &c.refresh_rate_limit);
    Some(CredentialConfig {
        name: name.to_string(),
        provider: c.provider,
        grant,
        token_url,
        authorize_url,
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
        refresh_token: RefreshTokenRules {
            rotating: c.rotating_refresh_token.unwrap_or(true),
            idle_lifetime: c.refresh_token_idle_lifetime,
            absolute_lifetime: c.refresh_token_absolute_lifetime,
            rate_limit: c.refresh_rate_limit,
            min_token_age: c.min_token_age,
        },
        dead_grant_answers: c.dead_grant_answers,
    })
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

fn validate_upstream(
    p: &mut Problems,
    name: &str,
    u: RawUpstream,
    credentials: &BTreeMap<String, CredentialConfig>,
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
        Some(s) => parse_url(p, &at("url"), s, u.allow_insecure_http),
        None => {
            p.add(&at("url"), "is required");
            None
        }
    };
    if let Some(url) = &url {
        if url.query().is_some() || url.fragment().is_some() {
            p.add(&at("url"), "must not have a query or fragment");
        }
    }
    let credential = match u.credential {
        Some(c) if credentials.contains_key(&c) => c,
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
    } else if let Some(why) = crate::proxy::policy::unusable_credential_header(&header) {
        p.add(&at("header"), format!("{header:?} {why}"));
    }
    let format = u.format.unwrap_or_else(|| "Bearer {token}".into());
    if format.matches("{token}").count() != 1 {
        p.add(&at("format"), "must contain {token} exactly once");
    } else if http::HeaderValue::from_str(&format.replace("{token}", "x")).is_err() {
        p.add(&at("format"), "is not a valid header value");
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
    if let Some(url) = url.as_ref().filter(|u| u.scheme() != "https") {
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
        limits,
    })
}
