//! Sends token requests for one credential: client authentication (`request_body` or HTTP
//! Basic per RFC 6749 §2.3.1, signed client assertions per RFC 7523 §2.2, a client
//! certificate per RFC 8705), `form` or `json` bodies, scopes, extra parameters and
//! headers. Redirects are never followed, so credentials only reach `token_url`.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::response::{parse, Answer, TokenAnswer, TokenError, SALVAGE_LIMIT};
use crate::config::{
    AssertionKey, ClientAuth, CredentialConfig, ParamsIn, RequestFormat, TokenMethod,
};
use crate::keys::jose::{
    Signer, CLIENT_ASSERTION_LIFETIME, CLIENT_ASSERTION_TYPE, JWT_BEARER_GRANT,
};
use crate::secret::Secret;

/// RFC 8628 §3.4's `grant_type`.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Which grant a token request uses.
pub enum GrantRequest<'a> {
    ClientCredentials,
    Password,
    RefreshToken(&'a Secret),
    AuthorizationCode {
        code: &'a str,
        code_verifier: Option<&'a str>,
    },
    /// RFC 7523 §2.1: a freshly signed assertion is the grant.
    JwtBearer,
    /// RFC 8628 §3.4: polling for the answer to a device authorization.
    DeviceCode(&'a Secret),
    /// RFC 6749 §4.3 with the resource owner's credentials given for this one request
    /// (`tokenrelay authorize --password`), not taken from the config.
    ResourceOwner {
        username: &'a str,
        password: &'a str,
    },
}

impl GrantRequest<'_> {
    fn grant_type(&self) -> &'static str {
        match self {
            GrantRequest::ClientCredentials => "client_credentials",
            GrantRequest::Password | GrantRequest::ResourceOwner { .. } => "password",
            GrantRequest::RefreshToken(_) => "refresh_token",
            GrantRequest::AuthorizationCode { .. } => "authorization_code",
            GrantRequest::JwtBearer => JWT_BEARER_GRANT,
            GrantRequest::DeviceCode(_) => DEVICE_CODE_GRANT,
        }
    }
}

/// Token endpoint client of one credential.
pub struct TokenClient {
    http: reqwest::Client,
    config: Arc<CredentialConfig>,
    /// Signs client assertions (`private_key_jwt`, `client_secret_jwt`).
    client_signer: Option<Signer>,
    /// Signs the `jwt_bearer` grant's assertion.
    grant_signer: Option<Signer>,
}

impl std::fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClient")
            .field("credential", &self.config.name)
            .finish()
    }
}

/// Why a credential's token client cannot be built; each names the file or setting.
#[derive(Debug, thiserror::Error)]
pub enum TokenClientError {
    /// The CA file or client certificate (the TLS layer's message, naming the file).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A client-assertion or grant-assertion signing key (naming the file).
    #[error(transparent)]
    SigningKey(#[from] crate::keys::jose::KeyError),
    #[error("client_secret_jwt needs a client secret")]
    NoClientSecret,
    #[error("cannot build token client: {0}")]
    Http(#[source] reqwest::Error),
}

impl TokenClient {
    /// Builds the HTTP client (TLS 1.2+, verified, optional private CA and client
    /// certificate, no redirects) and loads signing keys.
    pub fn new(config: Arc<CredentialConfig>) -> Result<TokenClient, TokenClientError> {
        let tls = crate::tls::client_config_with_cert(
            config.ca_file.as_deref(),
            &[b"http/1.1"],
            config.client_cert.as_ref().map(|c| &c.files),
        )
        .map_err(TokenClientError::Tls)?;
        let key_signer = |k: &AssertionKey| {
            Signer::from_key(k.source.clone(), k.configured_alg, k.configured_kid.clone())
                .map_err(TokenClientError::SigningKey)
        };
        let client_signer = match &config.client_assertion {
            None => None,
            Some(a) => Some(match &a.key {
                Some(k) => key_signer(k)?,
                None => Signer::Secret(
                    config
                        .client_secret
                        .clone()
                        .ok_or(TokenClientError::NoClientSecret)?,
                ),
            }),
        };
        let grant_signer = config
            .jwt_bearer
            .as_ref()
            .map(|j| key_signer(&j.key))
            .transpose()?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.token_timeout.0)
            .connect_timeout(config.token_timeout.0.min(Duration::from_secs(5)))
            .user_agent(concat!("tokenrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(TokenClientError::Http)?;
        Ok(TokenClient {
            http,
            config,
            client_signer,
            grant_signer,
        })
    }

    fn sign(
        signer: Option<&Signer>,
        claims: serde_json::Map<String, serde_json::Value>,
        lifetime: Duration,
    ) -> Result<String, TokenError> {
        signer
            .ok_or_else(|| TokenError::Transient("no signing key configured".into()))?
            .sign(claims, lifetime)
            .map(|s| s.expose().to_owned())
            .map_err(|e| TokenError::Transient(e.to_string()))
    }

    fn token_url_string(&self) -> String {
        self.config
            .token_url
            .as_ref()
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    /// RFC 7523 §2.1's assertion: the configured claims plus `iss`, `sub`, `aud`.
    fn grant_assertion(&self) -> Result<String, TokenError> {
        let j =
            self.config.jwt_bearer.as_ref().ok_or_else(|| {
                TokenError::Transient("grant jwt_bearer is not configured".into())
            })?;
        let mut claims = j.claims.clone();
        claims.insert("iss".into(), j.issuer.clone().into());
        if let Some(sub) = &j.subject {
            claims.insert("sub".into(), sub.clone().into());
        }
        claims.insert("aud".into(), j.audience.clone().into());
        Self::sign(self.grant_signer.as_ref(), claims, j.lifetime.0)
    }

    /// RFC 7523 §3's client assertion: `iss` and `sub` are the client id.
    fn client_assertion(&self) -> Result<String, TokenError> {
        let c = &self.config;
        let id = c.client_id.clone().unwrap_or_default();
        let audience = c
            .client_assertion
            .as_ref()
            .and_then(|a| a.audience.clone())
            .unwrap_or_else(|| self.token_url_string());
        let mut claims = serde_json::Map::new();
        claims.insert("iss".into(), id.clone().into());
        claims.insert("sub".into(), id.into());
        claims.insert("aud".into(), audience.into());
        Self::sign(
            self.client_signer.as_ref(),
            claims,
            CLIENT_ASSERTION_LIFETIME,
        )
    }

    /// The request parameters, in a stable order (secrets included; never log them).
    fn params(&self, grant: &GrantRequest<'_>) -> Result<Vec<(&str, String)>, TokenError> {
        let c = &self.config;
        let mut p: Vec<(&str, String)> = vec![("grant_type", grant.grant_type().into())];
        match grant {
            GrantRequest::ClientCredentials => {}
            GrantRequest::JwtBearer => p.push(("assertion", self.grant_assertion()?)),
            GrantRequest::Password => {
                p.push(("username", c.username.clone().unwrap_or_default()));
                if let Some(pw) = &c.password {
                    p.push(("password", pw.expose().into()));
                }
            }
            GrantRequest::ResourceOwner { username, password } => {
                p.push(("username", (*username).into()));
                p.push(("password", (*password).into()));
            }
            GrantRequest::DeviceCode(code) => p.push(("device_code", code.expose().into())),
            GrantRequest::RefreshToken(rt) => p.push(("refresh_token", rt.expose().into())),
            GrantRequest::AuthorizationCode {
                code,
                code_verifier,
            } => {
                p.push(("code", (*code).into()));
                if let Some(v) = code_verifier {
                    p.push(("code_verifier", (*v).into()));
                }
            }
        }
        // Some providers (amoCRM among them) require redirect_uri on refresh too; others
        // refuse it there (`redirect_uri_on_refresh: false`).
        if let Some(r) = &c.redirect_uri {
            let wanted = match grant {
                GrantRequest::AuthorizationCode { .. } => true,
                GrantRequest::RefreshToken(_) => c.redirect_uri_on_refresh,
                GrantRequest::ClientCredentials
                | GrantRequest::Password
                | GrantRequest::ResourceOwner { .. }
                | GrantRequest::DeviceCode(_)
                | GrantRequest::JwtBearer => false,
            };
            if wanted {
                p.push(("redirect_uri", r.clone()));
            }
        }
        // RFC 8628 §3.4: the device code carries the scope of its authorization request.
        let scope_wanted = match grant {
            GrantRequest::AuthorizationCode { .. } | GrantRequest::DeviceCode(_) => false,
            GrantRequest::RefreshToken(_) => c.scopes_on_refresh,
            GrantRequest::ClientCredentials
            | GrantRequest::Password
            | GrantRequest::ResourceOwner { .. }
            | GrantRequest::JwtBearer => true,
        };
        if scope_wanted && !c.scopes.is_empty() {
            p.push(("scope", c.scopes.join(" ")));
        }
        self.client_auth_params(&mut p)?;
        for (k, v) in &c.extra_params {
            p.push((k.as_str(), v.clone()));
        }
        Ok(p)
    }

    /// The client's authentication as request parameters (RFC 6749 §2.3.1, RFC 7523 §3,
    /// RFC 8705 §2); with `basic` and a secret, none (see [`Self::basic_authorization`]).
    /// Token requests and RFC 8628's device authorization request (§3.1) share it.
    fn client_auth_params<'s>(&'s self, p: &mut Vec<(&'s str, String)>) -> Result<(), TokenError> {
        let c = &self.config;
        let id = c.client_id.iter().map(|id| ("client_id", id.clone()));
        match c.client_auth {
            ClientAuth::RequestBody => {
                p.extend(id);
                if let Some(s) = &c.client_secret {
                    p.push(("client_secret", s.expose().into()));
                }
            }
            // A public client still identifies itself.
            ClientAuth::Basic if c.client_secret.is_none() => p.extend(id),
            ClientAuth::Basic => {}
            ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt => {
                p.extend(id);
                p.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.into()));
                p.push(("client_assertion", self.client_assertion()?));
            }
            // RFC 8705 §2: the certificate authenticates, client_id names the client.
            ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth => p.extend(id),
        }
        Ok(())
    }

    /// `Authorization: Basic ...` for `client_auth: basic` with a secret (RFC 6749 §2.3.1:
    /// both parts form-urlencoded first), marked sensitive.
    fn basic_authorization(&self) -> Result<Option<http::HeaderValue>, TokenError> {
        let c = &self.config;
        let (ClientAuth::Basic, Some(secret)) = (c.client_auth, &c.client_secret) else {
            return Ok(None);
        };
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let raw = format!(
            "{}:{}",
            enc(c.client_id.as_deref().unwrap_or_default()),
            enc(secret.expose())
        );
        let mut value = http::HeaderValue::from_str(&format!("Basic {}", B64.encode(raw)))
            .map_err(|_| TokenError::Transient("client credentials not encodable".into()))?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// The credential this client sends requests for.
    pub(super) fn config(&self) -> &CredentialConfig {
        &self.config
    }

    /// POSTs `params` and the client's authentication as a form to `url` (with the
    /// credential's `extra_params` and `token_headers`); the raw answer, its body read up
    /// to [`SALVAGE_LIMIT`]. For endpoints beside the token endpoint that authenticate
    /// the client the same way (RFC 8628 §3.1).
    pub(super) async fn post_form(
        &self,
        url: url::Url,
        mut params: Vec<(&str, String)>,
    ) -> Result<RawAnswer, TokenError> {
        let c = &self.config;
        self.client_auth_params(&mut params)?;
        for (k, v) in &c.extra_params {
            params.push((k.as_str(), v.clone()));
        }
        let mut req = self
            .http
            .post(url)
            .body_params(RequestFormat::Form, &params)
            .header(http::header::ACCEPT, "application/json");
        if let Some(value) = self.basic_authorization()? {
            req = req.header(http::header::AUTHORIZATION, value);
        }
        req = with_token_headers(req, c);
        let resp = req.send().await.map_err(describe_reqwest)?;
        RawAnswer::read(resp).await
    }

    /// Sends one token request and parses the answer (see [`TokenAnswer`]: a new refresh
    /// token is returned even when the rest of a `2xx` answer is unusable).
    pub async fn request(&self, grant: GrantRequest<'_>) -> Result<TokenAnswer, TokenError> {
        self.send(grant).await
    }

    async fn send(&self, grant: GrantRequest<'_>) -> Result<TokenAnswer, TokenError> {
        let c = &self.config;
        let url = c
            .token_url
            .clone()
            .ok_or_else(|| TokenError::Transient("credential has no token_url".into()))?;
        let params = self.params(&grant)?;
        let mut req = match c.token_params_in {
            // Bitrix24 (GET) and Zoho (POST) take the parameters in the query string;
            // the URL then holds secrets, so it is never logged (errors omit it).
            ParamsIn::Query => {
                let mut url = url;
                url.query_pairs_mut()
                    .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
                let method = match c.token_request_method {
                    TokenMethod::Get => reqwest::Method::GET,
                    TokenMethod::Post => reqwest::Method::POST,
                };
                self.http.request(method, url)
            }
            ParamsIn::Body => self.http.post(url).body_params(c.request_format, &params),
        };
        req = req.header(http::header::ACCEPT, "application/json");
        if let Some(value) = self.basic_authorization()? {
            req = req.header(http::header::AUTHORIZATION, value);
        }
        req = with_token_headers(req, c);
        let resp = req.send().await.map_err(describe_reqwest)?;
        let raw = RawAnswer::read(resp).await?;
        parse(
            &raw.answer(),
            c.default_expires_in.0,
            &c.dead_grant_answers,
            &c.answer_fields,
            &c.token_types,
        )
    }
}

/// Where the refresher sends token requests: the token endpoint over HTTP
/// ([`TokenClient`]), or in a simulation a scripted one.
#[async_trait::async_trait]
pub trait TokenEndpoint: Send + Sync {
    /// One token request and its judged answer.
    async fn request(&self, grant: GrantRequest<'_>) -> Result<TokenAnswer, TokenError>;
}

#[async_trait::async_trait]
impl TokenEndpoint for TokenClient {
    async fn request(&self, grant: GrantRequest<'_>) -> Result<TokenAnswer, TokenError> {
        self.send(grant).await
    }
}

/// A body of token request parameters, as `form` or `json`.
trait BodyParams {
    fn body_params(self, format: RequestFormat, params: &[(&str, String)]) -> Self;
}

impl BodyParams for reqwest::RequestBuilder {
    fn body_params(self, format: RequestFormat, params: &[(&str, String)]) -> Self {
        match format {
            RequestFormat::Form => {
                let body = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())))
                    .finish();
                self.header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body)
            }
            RequestFormat::Json => {
                let map: serde_json::Map<String, serde_json::Value> = params
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
                    .collect();
                self.json(&map)
            }
        }
    }
}

/// An endpoint's answer as it came: status, media type and body.
pub(super) struct RawAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl RawAnswer {
    async fn read(resp: reqwest::Response) -> Result<RawAnswer, TokenError> {
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = read_limited(resp).await?;
        Ok(RawAnswer {
            status,
            content_type,
            body,
        })
    }

    pub(super) fn answer(&self) -> Answer<'_> {
        Answer {
            status: self.status,
            content_type: &self.content_type,
            body: &self.body,
        }
    }
}

/// The answer's body, up to [`SALVAGE_LIMIT`] (the parser judges the answer limit).
async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, TokenError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe_reqwest)? {
        if body.len() + chunk.len() > SALVAGE_LIMIT {
            return Err(TokenError::InDoubt(format!(
                "token endpoint answer is larger than {SALVAGE_LIMIT} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Describes a transport failure without the URL's query or any body.
/// A request that failed while connecting (refused, DNS, the TLS handshake) or before
/// it was built never left; any later failure (a timeout or reset after it was written,
/// an unreadable answer) leaves its outcome unknown.
fn describe_reqwest(e: reqwest::Error) -> TokenError {
    let never_sent = e.is_connect() || e.is_builder();
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(&e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    let message = if detail.is_empty() {
        format!("token request {kind}")
    } else {
        format!("token request {kind}: {detail}")
    };
    if never_sent {
        TokenError::Transient(message)
    } else {
        TokenError::InDoubt(message)
    }
}

/// The credential's `token_headers` on a token request, generated values made anew.
fn with_token_headers(
    mut req: reqwest::RequestBuilder,
    c: &CredentialConfig,
) -> reqwest::RequestBuilder {
    for (k, v) in &c.token_headers {
        req = req.header(k.as_str(), super::token_headers::value(v));
    }
    req
}
