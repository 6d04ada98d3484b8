//! The status page's actions: exchanging a pasted authorization code, and the browser
//! flow ("Authorize again") whose `redirect_uri` is served by the admin listener. Both
//! store the grant through [`super::grant`], the code path of `tokenrelay authorize`.
//! POSTs only, from loopback or with the `admin.token_file` token, each with the page's
//! CSRF token; the flow's callback is a GET (the provider redirects the browser), matched
//! by the unguessable, single-use `state` a guarded POST started.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::admin::{html_status, text, Admin};
use super::grant;
use super::status_page::action_result;

/// A browser authorization is forgotten after this long (codes expire in minutes).
const PENDING_FOR: Duration = Duration::from_secs(15 * 60);
/// At most this many are remembered at once (the oldest goes first).
const MAX_PENDING: usize = 16;

/// A browser authorization started from the page.
pub struct Pending {
    state: String,
    verifier: String,
    credential: String,
    /// The callback path (`redirect_uri`'s).
    path: String,
    started: Instant,
}

type Form = std::collections::HashMap<String, String>;

/// The largest action form read.
const MAX_FORM: usize = 16 * 1024;

/// A fresh random CSRF token.
pub fn new_csrf() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Admin {
    /// A status page action (`POST /actions/NAME`, a form). Who may act: a loopback
    /// peer, or, with `admin.token_file` set, whoever presents that token (as a bearer
    /// header or the form's `admin_token`). Either way the form carries the page's
    /// CSRF token.
    pub(super) async fn action<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "actions are POSTs\n");
        }
        let peer_is_loopback = req
            .extensions()
            .get::<crate::server::inbound::Peer>()
            .is_some_and(crate::server::inbound::Peer::is_loopback);
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|v| v.trim().to_string());
        if self.token.is_none() && !peer_is_loopback {
            return html_status(
                StatusCode::FORBIDDEN,
                &action_result(false, "actions are allowed from loopback addresses only (set admin.token_file to allow them from elsewhere with a token)"),
            );
        }
        let path = req.uri().path().to_string();
        let body = match http_body_util::BodyExt::collect(http_body_util::Limited::new(
            req.into_body(),
            MAX_FORM,
        ))
        .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return html_status(
                    StatusCode::BAD_REQUEST,
                    &action_result(false, "the form could not be read (too large?)"),
                )
            }
        };
        let form: Form = url::form_urlencoded::parse(&body).into_owned().collect();
        if let Some(token) = &self.token {
            let given = bearer
                .or_else(|| form.get("admin_token").cloned())
                .unwrap_or_default();
            if !same(given.as_bytes(), token.expose().as_bytes()) {
                return html_status(
                    StatusCode::UNAUTHORIZED,
                    &action_result(
                        false,
                        "this action requires the admin token (admin.token_file)",
                    ),
                );
            }
        }
        let csrf = form.get("csrf").map(String::as_str).unwrap_or_default();
        if !same(csrf.as_bytes(), self.csrf.as_bytes()) {
            return html_status(
                StatusCode::FORBIDDEN,
                &action_result(false, "the form's CSRF token is missing or stale: reload the status page and try again"),
            );
        }
        match path.as_str() {
            "/actions/authorize-code" => {
                let (ok, status, message) = self.authorize_code(&form).await;
                html_status(status, &action_result(ok, &message))
            }
            "/actions/authorize-start" => self.authorize_start(&form),
            _ => text(StatusCode::NOT_FOUND, "no such action\n"),
        }
    }

    /// Exchanges the form's authorization code for the form's credential, as
    /// `tokenrelay authorize --code` does, and stores the answer as the next generation;
    /// the credential's refresher adopts it through the store's watch.
    async fn authorize_code(&self, form: &Form) -> (bool, StatusCode, String) {
        let name = form
            .get("credential")
            .map(String::as_str)
            .unwrap_or_default();
        let code = form.get("code").map(|c| c.trim()).unwrap_or_default();
        let view = self.view.load();
        let Some(cred) = view.credentials.iter().find(|c| c.name == name) else {
            return (
                false,
                StatusCode::NOT_FOUND,
                format!("no credential {name:?}"),
            );
        };
        if cred.config.grant != crate::config::Grant::RefreshToken {
            return (false, StatusCode::CONFLICT, format!("credential {name} does not use grant refresh_token; an authorization code does not apply"));
        }
        if code.is_empty() {
            return (
                false,
                StatusCode::BAD_REQUEST,
                "paste the authorization code into the form".into(),
            );
        }
        self.exchange_and_store(cred, code, None).await
    }

    /// Exchanges `code` (with the PKCE `verifier` of a browser flow) for `cred` and
    /// stores the answer as the next generation: what happened, in words.
    async fn exchange_and_store(
        &self,
        cred: &crate::credential::Credential,
        code: &str,
        verifier: Option<&str>,
    ) -> (bool, StatusCode, String) {
        let name = cred.name.as_str();
        let view = self.view.load();
        let Some(store) = view.store.clone() else {
            return (
                false,
                StatusCode::CONFLICT,
                "this instance has no store to keep the grant in".into(),
            );
        };
        let client = match crate::oauth::TokenClient::new(cred.config.clone()) {
            Ok(c) => c,
            Err(e) => return (false, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        use crate::instance::grant;
        let stored = async {
            let answer = grant::exchange_code(&client, code, verifier).await?;
            let (obtained, notes) = grant::Obtained::from_answer(answer, "the authorization code")?;
            for note in &notes {
                tracing::warn!(credential = %name, "{note}");
            }
            let by = format!("{} (status page)", view.instance_id);
            let generation =
                grant::store_grant(&*store, name, Some(&cred.config), &by, obtained).await?;
            Ok::<_, grant::GrantError>((generation, notes))
        }
        .await;
        match stored {
            Ok((generation, notes)) => {
                tracing::info!(credential = %name, generation, "authorized from the status page: tokens stored");
                let mut message = format!("authorized credential {name}: tokens stored (generation {generation}); the refresher picks them up within seconds");
                for note in notes {
                    message.push_str("; ");
                    message.push_str(&note);
                }
                (true, StatusCode::OK, message)
            }
            Err(e) => {
                tracing::warn!(credential = %name, error = %e, "authorizing from the status page failed");
                let status = match e {
                    grant::GrantError::CodeRejected(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::BAD_GATEWAY,
                };
                (false, status, e.to_string())
            }
        }
    }

    /// The credentials whose `redirect_uri` points at this admin listener (loopback,
    /// same port) and that have an `authorize_url`: the page offers "Authorize again".
    pub(super) fn authorize_again(&self) -> Vec<String> {
        let Some(address) = self.address else {
            return Vec::new();
        };
        let view = self.view.load();
        view.credentials
            .iter()
            .filter(|c| c.config.grant == crate::config::Grant::RefreshToken)
            .filter(|c| c.config.authorize_url.is_some())
            .filter(|c| {
                let Some(uri) = c.config.redirect_uri.as_deref() else {
                    return false;
                };
                url::Url::parse(uri).is_ok_and(|u| {
                    u.scheme() == "http"
                        && matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"))
                        && u.port_or_known_default() == Some(address.port())
                        && !u.path().starts_with("/actions/")
                })
            })
            .map(|c| c.name.clone())
            .collect()
    }

    /// `POST /actions/authorize-start`: remembers a new `state` and PKCE verifier and
    /// sends the browser to the provider, which sends it back to the callback.
    fn authorize_start(&self, form: &Form) -> Response<Full<Bytes>> {
        let name = form
            .get("credential")
            .map(String::as_str)
            .unwrap_or_default();
        if !self.authorize_again().iter().any(|n| n == name) {
            return html_status(
                StatusCode::CONFLICT,
                &action_result(false, &format!("credential {name:?} cannot be authorized from this page: its redirect_uri must point at this admin listener and it needs an authorize_url")),
            );
        }
        let view = self.view.load();
        let Some(cred) = view.credentials.iter().find(|c| c.name == name) else {
            return html_status(
                StatusCode::NOT_FOUND,
                &action_result(false, &format!("no credential {name:?}")),
            );
        };
        let pkce = grant::Pkce::new();
        let url = match grant::authorize_url(&cred.config, &pkce) {
            Ok(url) => url,
            Err(e) => {
                return html_status(StatusCode::CONFLICT, &action_result(false, &e.to_string()))
            }
        };
        let path = cred
            .config
            .redirect_uri
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .map(|u| u.path().to_string())
            .unwrap_or_default();
        {
            let mut pending = self.pending.lock().unwrap();
            pending.retain(|p| p.started.elapsed() < PENDING_FOR);
            if pending.len() >= MAX_PENDING {
                pending.remove(0);
            }
            pending.push(Pending {
                state: pkce.state,
                verifier: pkce.verifier,
                credential: name.to_string(),
                path,
                started: Instant::now(),
            });
        }
        tracing::info!(credential = %name, "authorization started from the status page");
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        if let Ok(location) = header::HeaderValue::from_str(url.as_str()) {
            r.headers_mut().insert(header::LOCATION, location);
        }
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        r
    }

    /// The provider's redirect back to a pending authorization's callback path, if
    /// `req` is one: its code is exchanged with that authorization's verifier. `None`
    /// for any other request.
    pub(super) async fn callback<B>(&self, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
        if req.method() != Method::GET {
            return None;
        }
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or("");
        let state: Option<String> = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "state")
            .map(|(_, v)| v.into_owned());
        let found = {
            let mut pending = self.pending.lock().unwrap();
            pending.retain(|p| p.started.elapsed() < PENDING_FOR);
            if !pending.iter().any(|p| p.path == path) {
                return None;
            }
            // Single use: a replayed callback finds nothing.
            let at = pending
                .iter()
                .position(|p| p.path == path && Some(&p.state) == state.as_ref());
            at.map(|i| pending.remove(i))
        };
        let Some(found) = found else {
            return Some(html_status(
                StatusCode::BAD_REQUEST,
                &action_result(false, "the callback's state does not match a pending authorization (stale or forged): start again from the status page"),
            ));
        };
        let code = match grant::callback_code(query, &found.state) {
            Ok(code) => code,
            Err(e) => {
                return Some(html_status(
                    StatusCode::BAD_REQUEST,
                    &action_result(false, &format!("authorization failed: {e}")),
                ))
            }
        };
        let view = self.view.load();
        let Some(cred) = view.credentials.iter().find(|c| c.name == found.credential) else {
            return Some(html_status(
                StatusCode::NOT_FOUND,
                &action_result(false, "the credential is gone"),
            ));
        };
        let (ok, status, message) = self
            .exchange_and_store(cred, &code, Some(&found.verifier))
            .await;
        Some(html_status(status, &action_result(ok, &message)))
    }
}
