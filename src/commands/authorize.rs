//! `tokenrelay authorize`: the one-time bootstrap of a `refresh_token` credential.
//!
//! With `--code`, exchanges a code pasted from the provider's UI. Without it, prints the
//! authorize URL (with `state` and PKCE S256) and, when `redirect_uri` points at this
//! machine (`http://127.0.0.1:PORT/...` or `localhost`), serves that callback itself and
//! exchanges the code it receives. With `--device`, the device flow (RFC 8628, in
//! [`device`]); with `--password`, one password grant whose password is never kept (in
//! [`password`]). Every way ends the same: the answer is stored as the next generation.

mod device;
mod password;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::config::{Config, CredentialConfig, Grant};
use crate::oauth::{GrantRequest, TokenAnswer, TokenClient};

pub use password::PasswordInput;

/// How long the callback server waits for the browser (codes expire in minutes anyway).
const CALLBACK_WAIT: Duration = Duration::from_secs(15 * 60);

/// How the grant is obtained.
pub enum Mode {
    /// An authorization code: pasted, or received on the local callback when `None`.
    Code(Option<String>),
    /// The device flow (RFC 8628).
    Device,
    /// One password grant (RFC 6749 §4.3); the password is not kept.
    Password(PasswordInput),
}

pub async fn run(cfg: Config, credential: &str, mode: Mode) -> anyhow::Result<()> {
    let Some(c) = cfg.credentials.get(credential) else {
        bail!("credential {credential:?} is not in the config");
    };
    if c.grant != Grant::RefreshToken {
        if c.grant == Grant::Password && matches!(mode, Mode::Password(_)) {
            bail!("credential {credential:?} uses grant password, which sends the configured password on every token request and stores nothing; authorize --password is for grant refresh_token credentials, where the password is used once and only the answer is kept");
        }
        bail!("credential {credential:?} uses grant {:?}; authorize applies only to grant refresh_token", c.grant);
    }
    crate::tls::install_crypto_provider();
    let client = TokenClient::new(Arc::new(c.clone()))?;
    let (answer, what) = match mode {
        Mode::Code(code) => (
            exchange_code(&client, c, code).await?,
            "the authorization code",
        ),
        Mode::Device => (device::obtain(&client, c).await?, "the device code"),
        Mode::Password(input) => (password::exchange(&client, c, input).await?, "the password"),
    };
    let generation = store_answer(&cfg, credential, answer, what).await?;
    println!("authorized credential {credential:?}: tokens stored (generation {generation}); running instances pick them up within seconds");
    Ok(())
}

/// `--code`, or the browser flow through the local callback.
async fn exchange_code(
    client: &TokenClient,
    c: &CredentialConfig,
    code: Option<String>,
) -> anyhow::Result<TokenAnswer> {
    let (code, verifier) = match code {
        Some(code) => (code.trim().to_string(), None),
        None => obtain_code(c).await?,
    };
    let answer = client
        .request(GrantRequest::AuthorizationCode { code: &code, code_verifier: verifier.as_deref() })
        .await
        .map_err(|e| {
            if e.is_invalid_grant() {
                anyhow::anyhow!("the authorization code was rejected ({e}). Codes work once and expire within minutes: obtain a new one and run authorize again promptly")
            } else {
                anyhow::anyhow!("exchanging the authorization code failed: {e}")
            }
        })?;
    Ok(answer)
}

/// Stores a grant's answer as the next generation, the same way for every bootstrap;
/// `what` names what was exchanged ("the authorization code"). Returns the generation.
async fn store_answer(
    cfg: &Config,
    credential: &str,
    answer: TokenAnswer,
    what: &str,
) -> anyhow::Result<u64> {
    // A refresh token is kept even when the access-token part is unusable: the grant is
    // spent, and running instances redeem the refresh token for an access token.
    let access = match answer.access {
        Ok(a) => {
            let expires = SystemTime::now() + a.expires_in;
            let expires_ms = expires.duration_since(SystemTime::UNIX_EPOCH)?.as_millis() as u64;
            // A long-lived token without `expires_in` has no known expiry (YooMoney).
            let known = a.expires_in_stated || answer.refresh_token.is_some();
            Some((a.token, known.then_some(expires_ms)))
        }
        Err(e) if answer.refresh_token.is_some() => {
            eprintln!("warning: the answer's access token is unusable ({e}); storing the refresh token only");
            None
        }
        Err(e) => bail!("exchanging {what} failed: {e}"),
    };
    if answer.refresh_token.is_none() {
        // YooMoney and long-lived-token integrations: the access token is the grant.
        eprintln!("note: the token endpoint issued no refresh_token; the access token is stored as a long-lived token and will not be refreshed (re-authorize when it expires)");
    }
    for (field, rule) in &answer.refused_fields {
        eprintln!("warning: the answer's field {field} was not kept: {rule}");
    }
    super::seed::store_new_grant(
        cfg,
        credential,
        answer.refresh_token,
        access,
        (
            crate::credential::policy::Lifetimes {
                stated: answer.refresh_expires_in,
                stated_hard: answer.refresh_hard_expires_in,
                ..Default::default()
            },
            super::seed::IssuedAt::Now,
        ),
        answer.fields,
    )
    .await
}

fn random_b64(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    B64URL.encode(bytes)
}

/// Prints the authorize URL and waits for the provider to redirect back with a code.
async fn obtain_code(c: &CredentialConfig) -> anyhow::Result<(String, Option<String>)> {
    let Some(authorize_url) = &c.authorize_url else {
        bail!("credentials.{}.authorize_url is not set: set it to the provider's authorization endpoint, or pass --code with a code obtained in the provider's UI", c.name);
    };
    let Some(redirect) = &c.redirect_uri else {
        bail!(
            "credentials.{}.redirect_uri is required to authorize",
            c.name
        );
    };
    let redirect_url = url::Url::parse(redirect).context("redirect_uri is not a URL")?;
    let state = random_b64(16);
    let verifier = random_b64(32);
    let challenge = B64URL.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    let mut url = authorize_url.clone();
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", c.client_id.as_deref().unwrap_or_default())
            .append_pair("redirect_uri", redirect)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        if !c.scopes.is_empty() {
            q.append_pair("scope", &c.scopes.join(" "));
        }
    }
    println!("Open this URL in a browser and approve access:\n\n  {url}\n");
    let local = matches!(
        redirect_url.host_str(),
        Some("127.0.0.1" | "localhost" | "[::1]")
    ) && redirect_url.scheme() == "http";
    if !local {
        bail!("redirect_uri {redirect} is not on this machine, so its callback cannot be served here: after approving, copy the `code` parameter from the address the browser lands on and run authorize again with --code CODE (quickly: codes expire within minutes)");
    }
    let port = redirect_url.port_or_known_default().unwrap_or(80);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the redirect_uri callback"))?;
    println!("Waiting for the callback on {redirect} ...");
    let (tx, mut rx) = mpsc::channel::<Result<String, CallbackError>>(1);
    let path = redirect_url.path().to_string();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            let state = state.clone();
            let path = path.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let result = callback_result(&req, &path, &state);
                    let tx = tx.clone();
                    async move {
                        let (status, msg) = match &result {
                            Some(Ok(_)) => (200, "Authorized. You can close this window; tokenrelay is storing the tokens."),
                            Some(Err(_)) => (400, "Authorization failed; see the terminal running tokenrelay authorize."),
                            None => (404, "Not the callback path."),
                        };
                        if let Some(r) = result {
                            let _ = tx.send(r).await;
                        }
                        let mut resp = http::Response::new(Full::new(Bytes::from(msg)));
                        *resp.status_mut() =
                            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let got = tokio::time::timeout(CALLBACK_WAIT, rx.recv()).await;
    server.abort();
    match got {
        Err(_) => bail!(
            "no callback within {} minutes",
            CALLBACK_WAIT.as_secs() / 60
        ),
        Ok(None) => bail!("callback server stopped"),
        Ok(Some(Err(e))) => bail!("authorization failed: {e}"),
        Ok(Some(Ok(code))) => Ok((code, Some(verifier))),
    }
}

/// Why the authorization callback brought no usable code.
#[derive(Debug, thiserror::Error)]
enum CallbackError {
    #[error("the provider answered {error}{description}")]
    Provider { error: String, description: String },
    #[error("the callback's state does not match (stale or forged request)")]
    State,
    #[error("the callback carries no code")]
    NoCode,
}

/// `Some(Ok(code))` for a valid callback, `Some(Err)` for a provider error or bad state,
/// `None` for unrelated requests (favicon and the like).
fn callback_result<B>(
    req: &http::Request<B>,
    path: &str,
    state: &str,
) -> Option<Result<String, CallbackError>> {
    if req.uri().path() != path {
        return None;
    }
    let q: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if let Some(err) = q.get("error") {
        let desc = q
            .get("error_description")
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        return Some(Err(CallbackError::Provider {
            error: err.clone(),
            description: desc,
        }));
    }
    if q.get("state").map(String::as_str) != Some(state) {
        return Some(Err(CallbackError::State));
    }
    match q.get("code") {
        Some(code) if !code.is_empty() => Some(Ok(code.clone())),
        _ => Some(Err(CallbackError::NoCode)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code, or the error's words.
    fn callback(uri: &str) -> Option<(bool, String)> {
        let req = http::Request::get(uri).body(()).unwrap();
        callback_result(&req, "/callback", "st4te").map(|r| match r {
            Ok(code) => (true, code),
            Err(e) => (false, e.to_string()),
        })
    }

    /// Each kind of callback, and what `authorize` makes of it.
    #[test]
    fn callbacks_are_told_apart() {
        let ok = |code: &str| Some((true, code.to_string()));
        let err = |why: &str| Some((false, why.to_string()));
        for (uri, expected) in [
            ("/callback?code=abc&state=st4te", ok("abc")),
            ("/favicon.ico", None),
            ("/callback/other?code=abc&state=st4te", None),
            (
                "/callback?error=access_denied&error_description=User%20said%20no&state=st4te",
                err("the provider answered access_denied: User said no"),
            ),
            (
                "/callback?error=server_error",
                err("the provider answered server_error"),
            ),
            (
                "/callback?code=abc&state=forged",
                err("the callback's state does not match (stale or forged request)"),
            ),
            (
                "/callback?code=abc",
                err("the callback's state does not match (stale or forged request)"),
            ),
            (
                "/callback?code=&state=st4te",
                err("the callback carries no code"),
            ),
            ("/callback?state=st4te", err("the callback carries no code")),
        ] {
            assert_eq!(callback(uri), expected, "{uri}");
        }
    }
}
