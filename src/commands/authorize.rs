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
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::config::{Config, CredentialConfig, Grant};
use crate::oauth::{TokenAnswer, TokenClient};

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
    let answer = crate::instance::grant::exchange_code(client, &code, verifier.as_deref())
        .await
        .map_err(|e| match e {
            crate::instance::grant::GrantError::CodeRejected(e) => anyhow::anyhow!("the authorization code was rejected ({e}). Codes work once and expire within minutes: obtain a new one and run authorize again promptly"),
            e => e.into(),
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
    let (grant, notes) = crate::instance::grant::Obtained::from_answer(answer, what)?;
    for note in notes {
        eprintln!("{note}");
    }
    super::seed::store_obtained(cfg, credential, grant).await
}

/// Prints the authorize URL and waits for the provider to redirect back with a code.
async fn obtain_code(c: &CredentialConfig) -> anyhow::Result<(String, Option<String>)> {
    let pkce = crate::instance::grant::Pkce::new();
    let url = crate::instance::grant::authorize_url(c, &pkce).map_err(|e| match e {
        crate::instance::grant::GrantError::NoAuthorizeUrl(name) => anyhow::anyhow!("credentials.{name}.authorize_url is not set: set it to the provider's authorization endpoint, or pass --code with a code obtained in the provider's UI"),
        e => e.into(),
    })?;
    let Some(redirect) = &c.redirect_uri else {
        bail!(
            "credentials.{}.redirect_uri is required to authorize",
            c.name
        );
    };
    let redirect_url = url::Url::parse(redirect).context("redirect_uri is not a URL")?;
    let crate::instance::grant::Pkce { state, verifier } = pkce;
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

use crate::instance::grant::CallbackError;

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
    Some(crate::instance::grant::callback_code(
        req.uri().query().unwrap_or(""),
        state,
    ))
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
