//! Client authentication without a shared secret (RFC 7523 client assertions, RFC 8705
//! mutual TLS), the `jwt_bearer` grant (RFC 7523 §2.1, Google service accounts) and
//! upstream client certificates. Keys and certificates are read here, so `check`
//! reports a bad file by its key; what is kept is the path, the algorithm and the
//! public-key fingerprint, never the key.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use jsonwebtoken::Algorithm;
use serde::Serialize;
use serde_json::{Map, Value};
use url::Url;

use super::raw::RawCredential;
use super::units::HumanDuration;
use super::{ClientAuth, Grant, Problems};
use crate::keys::jose::{parse_alg, KeySource};
use crate::secret::Secret;
use crate::tls::ClientCertFiles;

/// Default lifetime of a `jwt_bearer` assertion (Google's maximum).
pub const DEFAULT_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// `check` warns about client certificates that expire sooner than this.
pub const CERT_EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// Claims tokenrelay sets itself; `assertion_claims` may not replace them.
const RESERVED_CLAIMS: &[&str] = &["iss", "sub", "aud", "exp", "iat", "jti"];

/// A signing key as configured and checked.
#[derive(Clone, Debug, Serialize)]
pub struct AssertionKey {
    pub file: PathBuf,
    #[serde(skip)]
    pub source: KeySource,
    /// Configured algorithm (checked against the key), or `None` to take it from the key.
    #[serde(skip)]
    pub configured_alg: Option<Algorithm>,
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// Configured `kid`; otherwise a service account's `private_key_id`, re-read with it.
    #[serde(skip)]
    pub configured_kid: Option<String>,
    pub fingerprint: String,
}

/// How `private_key_jwt` / `client_secret_jwt` sign their client assertion.
#[derive(Clone, Debug, Serialize)]
pub struct ClientAssertion {
    /// `None` for `client_secret_jwt` (HS256 over the client secret).
    pub key: Option<AssertionKey>,
    /// `aud`; `token_url` when unset.
    pub audience: Option<String>,
}

/// The `jwt_bearer` grant's assertion.
#[derive(Clone, Debug, Serialize)]
pub struct JwtBearer {
    pub issuer: String,
    pub subject: Option<String>,
    pub audience: String,
    pub key: AssertionKey,
    pub claims: Map<String, Value>,
    pub lifetime: HumanDuration,
}

/// A client certificate as configured, and when it expires.
#[derive(Clone, Debug, Serialize)]
pub struct ClientCertConfig {
    #[serde(flatten)]
    pub files: ClientCertFiles,
    pub fingerprint: String,
    #[serde(serialize_with = "rfc3339")]
    pub not_after: Option<SystemTime>,
}

fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string()),
        None => s.serialize_none(),
    }
}

impl ClientCertConfig {
    /// The `/status` entry: the certificate file as it is now (it may have been
    /// rotated since startup), its expiry and public-key fingerprint; never the key.
    pub fn status(&self) -> Value {
        let (not_after, fingerprint) = match self.files.load() {
            Ok(c) => (c.not_after, c.fingerprint),
            Err(_) => (self.not_after, self.fingerprint.clone()),
        };
        serde_json::json!({
            "cert_file": self.files.cert_file,
            "fingerprint": fingerprint,
            "not_after": not_after.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "expires_in_seconds": not_after.map(|t| t.duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0)),
        })
    }

    /// A warning when the certificate expires within [`CERT_EXPIRY_WARNING`].
    pub fn expiry_warning(&self, key: &str) -> Option<String> {
        let t = self.not_after?;
        let left = t.duration_since(SystemTime::now()).unwrap_or_default();
        (left < CERT_EXPIRY_WARNING).then(|| {
            format!(
                "{key}: the certificate in {} expires at {} (in {} days)",
                self.files.cert_file.display(),
                humantime::format_rfc3339_seconds(t),
                left.as_secs() / 86400
            )
        })
    }
}

/// Reads a `*_cert_file`/`*_key_file` pair under `path`; both or neither.
pub(super) fn client_cert(
    p: &mut Problems,
    path: &str,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> Option<ClientCertConfig> {
    let files = match (cert_file, key_file) {
        (None, None) => return None,
        (Some(cert_file), Some(key_file)) => ClientCertFiles {
            cert_file,
            key_file,
        },
        (Some(_), None) => {
            p.add(
                &format!("{path}.client_key_file"),
                "is required with client_cert_file",
            );
            return None;
        }
        (None, Some(_)) => {
            p.add(
                &format!("{path}.client_cert_file"),
                "is required with client_key_file",
            );
            return None;
        }
    };
    match files.load() {
        Ok(c) => Some(ClientCertConfig {
            files,
            fingerprint: c.fingerprint,
            not_after: c.not_after,
        }),
        Err(e) => {
            let key = match e {
                crate::tls::ClientCertError::Encrypted { .. }
                | crate::tls::ClientCertError::NoKey { .. }
                | crate::tls::ClientCertError::BadKey { .. } => "client_key_file",
                crate::tls::ClientCertError::Unreadable { ref path, .. }
                    if *path == files.key_file.display().to_string() =>
                {
                    "client_key_file"
                }
                _ => "client_cert_file",
            };
            p.add(&format!("{path}.{key}"), e);
            None
        }
    }
}

fn alg(p: &mut Problems, key: &str, v: Option<&str>) -> Option<Algorithm> {
    v.and_then(|a| parse_alg(a).map_err(|e| p.add(key, e)).ok())
}

fn load_key(
    p: &mut Problems,
    key: &str,
    source: KeySource,
    alg: Option<Algorithm>,
    kid: Option<String>,
) -> Option<AssertionKey> {
    match source.load(alg) {
        Ok((k, file_kid)) => Some(AssertionKey {
            file: source.path().to_path_buf(),
            source,
            configured_alg: alg,
            alg: k.alg,
            configured_kid: kid.clone(),
            kid: kid.or(file_kid),
            fingerprint: k.fingerprint.clone(),
        }),
        Err(e) => {
            p.add(key, e);
            None
        }
    }
}

/// What [`client_auth`] decided.
pub(super) struct ClientAuthSettings {
    pub method: ClientAuth,
    pub assertion: Option<ClientAssertion>,
    pub cert: Option<ClientCertConfig>,
}

/// Parses `client_auth` and the keys its methods need.
pub(super) fn client_auth(
    p: &mut Problems,
    path: &str,
    c: &mut RawCredential,
    client_secret: Option<&Secret>,
) -> ClientAuthSettings {
    let at = |key: &str| format!("{path}.{key}");
    let method = match c.client_auth.as_deref() {
        // The RFC 8414 registry names are accepted too, as providers' docs use them.
        None | Some("request_body" | "client_secret_post") => ClientAuth::RequestBody,
        Some("basic" | "client_secret_basic") => ClientAuth::Basic,
        Some("private_key_jwt") => ClientAuth::PrivateKeyJwt,
        Some("client_secret_jwt") => ClientAuth::ClientSecretJwt,
        Some("tls_client_auth") => ClientAuth::TlsClientAuth,
        Some("self_signed_tls_client_auth") => ClientAuth::SelfSignedTlsClientAuth,
        Some(o) => {
            p.add(
                &at("client_auth"),
                format!("must be request_body (or client_secret_post), basic (or client_secret_basic), private_key_jwt, client_secret_jwt, tls_client_auth or self_signed_tls_client_auth, got {o:?}"),
            );
            ClientAuth::RequestBody
        }
    };
    let needs_secret = matches!(method, ClientAuth::Basic | ClientAuth::ClientSecretJwt);
    if needs_secret && client_secret.is_none() {
        p.add(
            &at("client_auth"),
            format!(
                "{} needs client_secret or client_secret_file",
                method.as_str()
            ),
        );
    }
    let no_secret = matches!(
        method,
        ClientAuth::PrivateKeyJwt | ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth
    );
    if no_secret && client_secret.is_some() {
        p.add(
            &at("client_secret"),
            format!(
                "is not used with client_auth {}; remove it",
                method.as_str()
            ),
        );
    }
    let jwt = matches!(
        method,
        ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt
    );
    let assertion = match method {
        ClientAuth::PrivateKeyJwt => match c.client_assertion_key_file.take() {
            Some(f) => {
                let a = alg(
                    p,
                    &at("client_assertion_alg"),
                    c.client_assertion_alg.as_deref(),
                );
                load_key(
                    p,
                    &at("client_assertion_key_file"),
                    KeySource::Pem(f),
                    a,
                    c.client_assertion_kid.take(),
                )
                .map(|k| ClientAssertion {
                    key: Some(k),
                    audience: c.client_assertion_audience.take(),
                })
            }
            None => {
                p.add(
                    &at("client_assertion_key_file"),
                    "is required for client_auth private_key_jwt",
                );
                None
            }
        },
        ClientAuth::ClientSecretJwt => {
            if c.client_assertion_alg
                .as_deref()
                .is_some_and(|a| a != "HS256")
            {
                p.add(
                    &at("client_assertion_alg"),
                    "client_secret_jwt signs with HS256 only",
                );
            }
            Some(ClientAssertion {
                key: None,
                audience: c.client_assertion_audience.take(),
            })
        }
        _ => None,
    };
    if !jwt {
        for (key, set) in [
            (
                "client_assertion_key_file",
                c.client_assertion_key_file.is_some(),
            ),
            ("client_assertion_alg", c.client_assertion_alg.is_some()),
            ("client_assertion_kid", c.client_assertion_kid.is_some()),
            (
                "client_assertion_audience",
                c.client_assertion_audience.is_some(),
            ),
        ] {
            if set {
                p.add(
                    &at(key),
                    "is only used with client_auth private_key_jwt or client_secret_jwt",
                );
            }
        }
    } else if method == ClientAuth::ClientSecretJwt && c.client_assertion_key_file.is_some() {
        p.add(
            &at("client_assertion_key_file"),
            "is only used with client_auth private_key_jwt",
        );
    }
    let tls = matches!(
        method,
        ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth
    );
    let (cert_file, key_file) = (c.client_cert_file.take(), c.client_key_file.take());
    if tls && cert_file.is_none() && key_file.is_none() {
        p.add(
            &at("client_cert_file"),
            format!(
                "client_cert_file and client_key_file are required for client_auth {}",
                method.as_str()
            ),
        );
    }
    // A certificate may also be presented alongside another method (some providers
    // require mutual TLS on the token endpoint whatever the client authentication).
    let cert = client_cert(p, path, cert_file, key_file);
    ClientAuthSettings {
        method,
        assertion,
        cert,
    }
}

/// The `jwt_bearer` grant's keys. `token_url` may be filled from a service account's
/// `token_uri`.
pub(super) fn jwt_bearer(
    p: &mut Problems,
    path: &str,
    c: &mut RawCredential,
    grant: Grant,
    token_url: &mut Option<Url>,
) -> Option<JwtBearer> {
    let at = |key: &str| format!("{path}.{key}");
    let keys = [
        ("assertion_issuer", c.assertion_issuer.is_some()),
        ("assertion_subject", c.assertion_subject.is_some()),
        ("assertion_audience", c.assertion_audience.is_some()),
        ("assertion_key_file", c.assertion_key_file.is_some()),
        ("assertion_alg", c.assertion_alg.is_some()),
        ("assertion_kid", c.assertion_kid.is_some()),
        ("assertion_claims", !c.assertion_claims.is_empty()),
        ("assertion_lifetime", c.assertion_lifetime.is_some()),
        ("service_account_file", c.service_account_file.is_some()),
    ];
    if grant != Grant::JwtBearer {
        for (key, set) in keys {
            if set {
                p.add(&at(key), "is only used by grant jwt_bearer");
            }
        }
        return None;
    }
    let before = p.0.len();
    let a = alg(p, &at("assertion_alg"), c.assertion_alg.as_deref());
    let lifetime = c
        .assertion_lifetime
        .unwrap_or(HumanDuration(DEFAULT_ASSERTION_LIFETIME));
    if lifetime.0 < Duration::from_secs(10) || lifetime.0 > Duration::from_secs(24 * 3600) {
        p.add(&at("assertion_lifetime"), "must be between 10s and 24h");
    }
    let mut claims = Map::new();
    for (k, v) in std::mem::take(&mut c.assertion_claims) {
        if RESERVED_CLAIMS.contains(&k.as_str()) {
            p.add(
                &at(&format!("assertion_claims.{k}")),
                "is set by tokenrelay itself; use the assertion_* keys",
            );
        }
        claims.insert(k, v);
    }
    let (issuer, key) = match (c.service_account_file.take(), c.assertion_key_file.take()) {
        (Some(_), Some(_)) => {
            p.add(
                &at("service_account_file"),
                "set either service_account_file or assertion_key_file, not both",
            );
            return None;
        }
        (None, None) => {
            p.add(
                &at("assertion_key_file"),
                "assertion_key_file or service_account_file is required for grant jwt_bearer",
            );
            return None;
        }
        (Some(sa), None) => {
            let account = match crate::keys::jose::ServiceAccount::from_file(&sa, a) {
                Ok(acc) => acc,
                Err(e) => {
                    p.add(&at("service_account_file"), e);
                    return None;
                }
            };
            if token_url.is_none() {
                match Url::parse(&account.token_uri) {
                    Ok(u) if u.scheme() == "https" || c.allow_insecure_http => *token_url = Some(u),
                    _ => p.add(
                        &at("service_account_file"),
                        format!("{}: token_uri must be an https:// URL", sa.display()),
                    ),
                }
            }
            // Google takes scopes as a claim of the assertion.
            if !c.scopes.is_empty() {
                claims.insert(
                    "scope".into(),
                    Value::String(std::mem::take(&mut c.scopes).join(" ")),
                );
            }
            let configured_kid = c.assertion_kid.take();
            let key = AssertionKey {
                file: sa.clone(),
                source: KeySource::ServiceAccount(sa.clone()),
                configured_alg: a,
                alg: account.key.alg,
                kid: configured_kid.clone().or(account.private_key_id),
                configured_kid,
                fingerprint: account.key.fingerprint.clone(),
            };
            let issuer = c.assertion_issuer.take().unwrap_or(account.client_email);
            (issuer, key)
        }
        (None, Some(f)) => {
            let key = load_key(
                p,
                &at("assertion_key_file"),
                KeySource::Pem(f),
                a,
                c.assertion_kid.take(),
            );
            let Some(issuer) = c.assertion_issuer.take().filter(|s| !s.is_empty()) else {
                p.add(&at("assertion_issuer"), "is required for grant jwt_bearer");
                return None;
            };
            (issuer, key?)
        }
    };
    let audience = match c.assertion_audience.take() {
        Some(a) => a,
        None => token_url.as_ref()?.to_string(),
    };
    if p.0.len() > before {
        return None;
    }
    Some(JwtBearer {
        issuer,
        subject: c.assertion_subject.take(),
        audience,
        key,
        claims,
        lifetime,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{ClientAuth, Config};

    fn credential(extra: &str) -> Result<Config, crate::config::ConfigError> {
        let yaml = format!(
            "credentials:\n  crm:\n    grant: client_credentials\n    token_url: https://auth.example.com/token\n    client_id: app\n{extra}upstreams:\n  crm:\n    listen: 127.0.0.1:18081\n    url: https://api.example.com\n    credential: crm\n"
        );
        Config::from_yaml(&yaml, &|_| None)
    }

    /// Each `client_auth` spelling, with the secret it needs (or must not have): the
    /// method chosen, or the error naming the key.
    #[test]
    fn methods_and_the_secrets_they_need() {
        let secret = "    client_secret: s3cret\n";
        for (name, with_secret, expected) in [
            (None, true, Ok(ClientAuth::RequestBody)),
            (Some("request_body"), true, Ok(ClientAuth::RequestBody)),
            (Some("client_secret_post"), true, Ok(ClientAuth::RequestBody)),
            (Some("basic"), true, Ok(ClientAuth::Basic)),
            (Some("client_secret_basic"), true, Ok(ClientAuth::Basic)),
            (Some("client_secret_jwt"), true, Ok(ClientAuth::ClientSecretJwt)),
            (
                Some("basic"),
                false,
                Err("credentials.crm.client_auth: basic needs client_secret or client_secret_file"),
            ),
            (
                Some("client_secret_jwt"),
                false,
                Err("credentials.crm.client_auth: client_secret_jwt needs client_secret or client_secret_file"),
            ),
            (
                Some("tls_client_auth"),
                true,
                Err("credentials.crm.client_secret: is not used with client_auth tls_client_auth; remove it"),
            ),
            (
                Some("private_key_jwt"),
                true,
                Err("credentials.crm.client_secret: is not used with client_auth private_key_jwt; remove it"),
            ),
            (
                Some("digest"),
                true,
                Err("credentials.crm.client_auth: must be request_body (or client_secret_post)"),
            ),
        ] {
            let extra = format!(
                "{}{}",
                name.map(|n| format!("    client_auth: {n}\n"))
                    .unwrap_or_default(),
                if with_secret { secret } else { "" }
            );
            let got = credential(&extra).map(|c| c.credentials["crm"].client_auth);
            match (got, expected) {
                (Ok(method), Ok(want)) => assert_eq!(method, want, "{name:?}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{name:?}: {e}"),
                (got, want) => panic!("{name:?}: got {got:?}, expected {want:?}"),
            }
        }
    }
}
