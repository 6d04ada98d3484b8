//! Authorization server discovery: a credential's `issuer` names the server, and its
//! metadata fills the endpoints the config leaves open. Read from
//! `{issuer}/.well-known/oauth-authorization-server` (RFC 8414), then, when that is not
//! a metadata document, `{issuer}/.well-known/openid-configuration` (OpenID Connect
//! Discovery 1.0 §4). Both are appended to the issuer as written, path included
//! (`https://sso.example.com/realms/acme/.well-known/...`), as Keycloak, Okta and Auth0
//! serve them. The document's `issuer` must equal the configured one exactly (RFC 8414
//! §3.3), or a document from elsewhere could redirect the client's secrets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::config::{Config, ConfigError, CredentialConfig, Endpoint};

/// Metadata documents are small; a bigger answer is not one.
const MAX_DOCUMENT: usize = 256 * 1024;
/// The whole fetch of one document, and the connection within it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// RFC 8414 §3's well-known suffix, tried first.
pub const OAUTH_SUFFIX: &str = "/.well-known/oauth-authorization-server";
/// OpenID Connect Discovery 1.0 §4's, tried when the first is not a metadata document.
pub const OIDC_SUFFIX: &str = "/.well-known/openid-configuration";

/// Why an issuer's metadata gave no endpoints.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot build an HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("{url}: {source}")]
    Fetch {
        url: String,
        #[source]
        source: FetchError,
    },
    #[error(
        "no metadata document: {first} answered {first_error}; {second} answered {second_error}"
    )]
    NoDocument {
        first: String,
        first_error: FetchError,
        second: String,
        second_error: FetchError,
    },
    #[error("{url} names issuer {found:?}, not the configured {expected:?}; they must be equal exactly (RFC 8414 §3.3)")]
    IssuerMismatch {
        url: String,
        found: String,
        expected: String,
    },
    #[error("{url}: {field} {value:?} {why}")]
    BadEndpoint {
        url: String,
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{url} has no token_endpoint")]
    NoTokenEndpoint { url: String },
}

/// Why one document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("{0}")]
    Transport(#[source] reqwest::Error),
    #[error("a body over {MAX_DOCUMENT} bytes")]
    TooLarge,
    #[error("a body that is not a metadata document ({0})")]
    NotMetadata(#[source] serde_json::Error),
}

impl FetchError {
    /// Whether the other well-known document is worth asking for: this one is missing or
    /// not metadata (an error page, a web app's catch-all), rather than the server being
    /// unreachable.
    fn try_the_other(&self) -> bool {
        matches!(self, FetchError::Status(_) | FetchError::NotMetadata(_))
    }
}

/// The fields tokenrelay uses (RFC 8414 §2, RFC 8628 §4).
#[derive(Debug, Deserialize)]
struct Document {
    issuer: String,
    token_endpoint: Option<String>,
    authorization_endpoint: Option<String>,
    device_authorization_endpoint: Option<String>,
}

impl Document {
    fn field(&self, e: Endpoint) -> Option<&str> {
        match e {
            Endpoint::TokenUrl => self.token_endpoint.as_deref(),
            Endpoint::AuthorizeUrl => self.authorization_endpoint.as_deref(),
            Endpoint::DeviceAuthorizationUrl => self.device_authorization_endpoint.as_deref(),
        }
    }
}

/// What one credential's discovery found: the document read and the endpoints it gave.
#[derive(Debug, Clone)]
pub struct Discovered {
    pub document_url: String,
    pub endpoints: BTreeMap<Endpoint, Url>,
}

/// Reads `issuer`'s metadata with the credential's CA settings and checks it.
pub async fn discover(cred: &CredentialConfig, issuer: &str) -> Result<Discovered, DiscoveryError> {
    crate::tls::install_crypto_provider();
    let tls = crate::tls::client_config_with_cert(cred.ca_file.as_deref(), &[b"http/1.1"], None)?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        // A document is the issuer's own; a redirect elsewhere is not followed.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("tokenrelay/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(DiscoveryError::Client)?;
    let base = issuer.trim_end_matches('/');
    let first = format!("{base}{OAUTH_SUFFIX}");
    let (url, doc) = match fetch(&http, &first).await {
        Ok(doc) => (first, doc),
        Err(e) if e.try_the_other() => {
            let second = format!("{base}{OIDC_SUFFIX}");
            match fetch(&http, &second).await {
                Ok(doc) => (second, doc),
                Err(second_error) => {
                    return Err(DiscoveryError::NoDocument {
                        first,
                        first_error: e,
                        second,
                        second_error,
                    })
                }
            }
        }
        Err(source) => return Err(DiscoveryError::Fetch { url: first, source }),
    };
    if doc.issuer != issuer {
        return Err(DiscoveryError::IssuerMismatch {
            url,
            found: doc.issuer,
            expected: issuer.to_string(),
        });
    }
    let mut endpoints = BTreeMap::new();
    for e in Endpoint::ALL {
        let Some(value) = doc.field(e) else { continue };
        let bad = |why| DiscoveryError::BadEndpoint {
            url: url.clone(),
            field: e.metadata_field(),
            value: value.to_string(),
            why,
        };
        let parsed = Url::parse(value).map_err(|_| bad("is not a URL"))?;
        match parsed.scheme() {
            "https" => {}
            "http" if cred.allow_insecure_http => {}
            _ => return Err(bad("is not https (allow_insecure_http: true allows http)")),
        }
        endpoints.insert(e, parsed);
    }
    if cred.discover.contains(&Endpoint::TokenUrl) && !endpoints.contains_key(&Endpoint::TokenUrl) {
        return Err(DiscoveryError::NoTokenEndpoint { url });
    }
    Ok(Discovered {
        document_url: url,
        endpoints,
    })
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Document, FetchError> {
    let mut resp = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(FetchError::Transport)?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(FetchError::Transport)? {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(FetchError::NotMetadata)
}

/// A credential that kept its previous endpoints because discovery failed on reload.
#[derive(Debug)]
pub struct KeptEndpoints {
    pub credential: String,
    pub issuer: String,
    pub error: DiscoveryError,
}

/// Fills the endpoints of every credential with an `issuer` from its metadata, and
/// records their origin for `check`. When a credential's discovery fails, `previous`
/// may hold the running config of that credential: if it names the same issuer and
/// leaves the same endpoints to discovery, its endpoints are kept (a reload must not
/// fail because the authorization server's metadata is briefly unreachable); otherwise
/// the failure is a config error naming the issuer.
pub async fn resolve(
    config: &mut Config,
    previous: &BTreeMap<String, Arc<CredentialConfig>>,
) -> Result<Vec<KeptEndpoints>, ConfigError> {
    let found = futures_util::future::join_all(
        config
            .credentials
            .values()
            .filter_map(|c| Some((c, c.issuer.clone()?)))
            .map(|(c, issuer)| async move {
                (c.name.clone(), issuer.clone(), discover(c, &issuer).await)
            }),
    )
    .await;
    let mut problems = Vec::new();
    let mut kept = Vec::new();
    for (name, issuer, outcome) in found {
        let cred = config.credentials.get_mut(&name).expect("discovered above");
        match outcome {
            Ok(d) => {
                for e in cred.discover.clone() {
                    if let Some(url) = d.endpoints.get(&e) {
                        *cred.endpoint_mut(e) = Some(url.clone());
                        config.origins.insert(
                            format!("credentials.{name}.{}", e.key()),
                            format!("discovered from {}", d.document_url),
                        );
                    }
                }
            }
            Err(error) => match previous.get(&name).filter(|old| {
                old.issuer.as_deref() == Some(&issuer) && old.discover == cred.discover
            }) {
                Some(old) => {
                    for e in cred.discover.clone() {
                        *cred.endpoint_mut(e) = old.endpoint(e).cloned();
                    }
                    kept.push(KeptEndpoints {
                        credential: name,
                        issuer,
                        error,
                    });
                }
                None => problems.push(format!(
                    "credentials.{name}.issuer: discovery of {issuer} failed: {error}"
                )),
            },
        }
    }
    if problems.is_empty() {
        Ok(kept)
    } else {
        Err(ConfigError { problems })
    }
}
