//! Authorization server metadata for the demo authorization server: RFC 8414's
//! `/.well-known/oauth-authorization-server` and OpenID Connect Discovery's
//! `/.well-known/openid-configuration`, under any issuer path (`{origin}/realms/x` is
//! served at `{origin}/realms/x/.well-known/...`, as Keycloak and Okta do), and controls
//! for tests: which documents answer, and an `issuer` other than the true one.

use http::{Response, StatusCode};
use serde_json::json;

use super::device::DEVICE_AUTHORIZATION_PATH;
use super::{AuthServer, Shared, AUTHORIZE_PATH, TOKEN_PATH};
use crate::{json_response, Body};

/// RFC 8414 §3's well-known suffix.
pub(super) const OAUTH_SUFFIX: &str = "/.well-known/oauth-authorization-server";
/// OpenID Connect Discovery 1.0 §4's well-known suffix.
pub(super) const OIDC_SUFFIX: &str = "/.well-known/openid-configuration";

/// Which metadata documents the server answers; the others are 404.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscoveryDocs {
    /// Both (the default).
    #[default]
    Both,
    /// Only `openid-configuration` (an OpenID provider without RFC 8414's document).
    OidcOnly,
    /// Neither.
    None,
}

/// Test controls of the documents.
#[derive(Default)]
pub(super) struct DiscoveryState {
    docs: DiscoveryDocs,
    /// The `issuer` the documents claim instead of the true one.
    issuer: Option<String>,
    /// Paths of the metadata requests received, in order.
    requests: Vec<String>,
}

impl AuthServer {
    /// Chooses which metadata documents answer.
    pub fn set_discovery_docs(&self, docs: DiscoveryDocs) {
        self.shared.lock().discovery.docs = docs;
    }

    /// Makes the documents claim `issuer` (a mismatch a client must refuse); `None`
    /// restores the true issuer.
    pub fn set_discovery_issuer(&self, issuer: Option<&str>) {
        self.shared.lock().discovery.issuer = issuer.map(str::to_owned);
    }

    /// Paths of the metadata requests received so far.
    pub fn discovery_requests(&self) -> Vec<String> {
        self.shared.lock().discovery.requests.clone()
    }
}

/// Whether `path` asks for a metadata document.
pub(super) fn is_metadata_path(path: &str) -> bool {
    path.ends_with(OAUTH_SUFFIX) || path.ends_with(OIDC_SUFFIX)
}

/// The metadata document at `path`: the issuer is the origin plus whatever precedes the
/// well-known suffix; the endpoints are the server's own.
pub(super) fn metadata(shared: &Shared, path: &str) -> Response<Body> {
    let (prefix, oidc) = match path.strip_suffix(OIDC_SUFFIX) {
        Some(p) => (p, true),
        None => (path.strip_suffix(OAUTH_SUFFIX).unwrap_or(""), false),
    };
    let claimed = {
        let mut state = shared.lock();
        state.discovery.requests.push(path.to_string());
        let served = match state.discovery.docs {
            DiscoveryDocs::Both => true,
            DiscoveryDocs::OidcOnly => oidc,
            DiscoveryDocs::None => false,
        };
        if !served {
            return json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"}));
        }
        state.discovery.issuer.clone()
    };
    let origin = &shared.origin;
    let issuer = claimed.unwrap_or_else(|| format!("{origin}{prefix}"));
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{origin}{AUTHORIZE_PATH}"),
            "token_endpoint": format!("{origin}{TOKEN_PATH}"),
            "device_authorization_endpoint": format!("{origin}{DEVICE_AUTHORIZATION_PATH}"),
            "grant_types_supported": [
                "authorization_code", "refresh_token", "client_credentials", "password",
                "urn:ietf:params:oauth:grant-type:device_code"
            ],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        }),
    )
}
