//! What tokenrelay sends to token endpoints, per grant and per provider quirk: HTTP Basic
//! with RFC 6749 §2.3.1 encoding, JSON bodies, scopes, extra parameters and headers, the
//! password and static grants, and the configured lifetime when `expires_in` is absent.
//! Checked against the demo authorization server's record of each request.

mod support;

use std::time::Duration;

use support::demo_servers;
use testkit::AuthServerOptions;

async fn get_ok(relay: &support::Running) {
    let resp = support::client()
        .get(format!("{}/echo", relay.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_json_body_scopes_extra_params_and_headers_are_sent_as_configured() {
    // A secret with characters that form-encoding changes: Basic must encode them.
    let secret = "s3cr3t:+/=& ü";
    let demo = demo_servers(AuthServerOptions {
        client_secret: secret.into(),
        ..Default::default()
    })
    .await;
    let relay = support::start_with_env(
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  api:
    grant: client_credentials
    token_url: "{}"
    client_id: demo-client
    client_secret: ${{SECRET}}
    client_auth: basic
    request_format: json
    scopes: [leads.read, leads.write]
    extra_params: {{ audience: "https://api.example" }}
    token_headers: {{ X-Api-Version: "2" }}
    allow_insecure_http: true
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{}", credential: api, allow_insecure_http: true }}
"#,
            demo.auth.token_url(),
            demo.api.url()
        ),
        &[("SECRET", secret)],
    )
    .await;
    get_ok(&relay).await;
    let log = demo.auth.requests_log();
    let r = log.last().expect("a token request");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.grant_type, "client_credentials");
    assert_eq!(r.client_auth, "basic");
    assert_eq!(r.content_type, "json");
    assert_eq!(r.param("scope"), Some("leads.read leads.write"));
    assert_eq!(r.param("audience"), Some("https://api.example"));
    assert_eq!(
        r.param("client_secret"),
        None,
        "the secret travels only in the header"
    );
    assert!(r.has_header("x-api-version"));
    assert!(r.query_params.is_empty(), "nothing in the URL");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_client_auth_sends_form_parameters() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let relay = support::start(&support::one_upstream_yaml(
        &demo.auth.token_url(),
        &demo.api.url(),
        "",
        "",
    ))
    .await;
    get_ok(&relay).await;
    let r = demo.auth.requests_log().last().cloned().unwrap();
    assert_eq!(
        (r.client_auth.as_str(), r.content_type.as_str()),
        ("body", "form")
    );
    assert_eq!(r.param("client_id"), Some("demo-client"));
    assert_eq!(
        r.param("client_secret"),
        Some("<redacted>"),
        "sent, and redacted by the test server's log"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_grant_obtains_and_uses_a_token() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "demo-password\n").unwrap();
    let relay = support::start(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  api:
    grant: password
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    username: demo-user
    password_file: "{}"
    allow_insecure_http: true
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{}", credential: api, allow_insecure_http: true }}
"#,
        demo.auth.token_url(),
        password_file.display(),
        demo.api.url()
    ))
    .await;
    get_ok(&relay).await;
    let r = demo.auth.requests_log().last().cloned().unwrap();
    assert_eq!((r.grant_type.as_str(), r.status), ("password", 200));
    assert_eq!(r.param("username"), Some("demo-user"));
    assert_eq!(demo.auth.stats().password, 1);
    relay.stop().await;
}

/// tokenrelay with one static credential read from `token_file`, in front of the demo API.
async fn start_static(
    token_file: &std::path::Path,
    demo: &support::DemoServers,
) -> support::Running {
    support::start(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  api: {{ grant: static, token_file: "{}" }}
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{}", credential: api, allow_insecure_http: true }}
"#,
        token_file.display(),
        demo.api.url()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_token_is_attached_without_any_token_request() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", demo.auth.new_access_token())).unwrap();
    let relay = start_static(&token_file, &demo).await;
    get_ok(&relay).await;
    assert_eq!(demo.auth.stats().token_requests, 0);
    assert_eq!(demo.api.stats().authorized, 1);
    let status = support::status_json(&relay.admin_url("")).await;
    assert_eq!(status["credentials"]["api"]["state"], "ready");
    assert!(
        status["credentials"]["api"]["expires_in_seconds"].is_null(),
        "a static token has no expiry: {status}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_expires_in_the_configured_default_lifetime_applies() {
    let demo = demo_servers(AuthServerOptions {
        omit_expires_in: true,
        access_ttl: Duration::from_secs(3600),
        ..Default::default()
    })
    .await;
    let relay = support::start(&support::one_upstream_yaml(
        &demo.auth.token_url(),
        &demo.api.url(),
        "default_expires_in: 2h",
        "",
    ))
    .await;
    get_ok(&relay).await;
    let status = support::status_json(&relay.admin_url("")).await;
    let left = status["credentials"]["api"]["expires_in_seconds"]
        .as_i64()
        .unwrap();
    assert!(
        (7000..=7200).contains(&left),
        "expires in {left}s, expected about 2h"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_token_file_is_reread_after_a_401_and_when_it_changes() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "revoked-or-never-valid\n").unwrap();
    let relay = start_static(&token_file, &demo).await;
    let get = || {
        support::client()
            .get(format!("{}/echo", relay.url("api")))
            .send()
    };
    let generation = || async {
        support::status_json(&relay.admin_url("")).await["credentials"]["api"]["generation"]
            .as_u64()
            .unwrap_or(0)
    };

    // The upstream refuses the token and the file holds nothing newer: the 401 is
    // passed on at once (not after a token-request timeout).
    let started = std::time::Instant::now();
    assert_eq!(get().await.unwrap().status(), 401);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a 401 with no newer static token took {:?}",
        started.elapsed()
    );
    assert_eq!(generation().await, 1);

    // The mounted secret is replaced: the next 401 re-reads it and the retry succeeds.
    std::fs::write(&token_file, format!("{}\n", demo.auth.new_access_token())).unwrap();
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(generation().await, 2);

    // Replaced again with no request failing: picked up by the periodic re-read.
    std::fs::write(&token_file, format!("{}\n", demo.auth.new_access_token())).unwrap();
    assert!(
        support::eventually(Duration::from_secs(30), || async {
            generation().await == 3
        })
        .await,
        "the changed token file was not re-read"
    );
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(demo.auth.stats().token_requests, 0);
    relay.stop().await;
}

/// The `scope` parameter of the refresh requests of a refresh_token credential with
/// `scopes` and `extra` settings.
async fn scope_sent_on_refresh(extra: &str) -> Option<String> {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
store: {{ type: file, path: "{}" }}
credentials:
  api:
    grant: refresh_token
    token_url: "{}"
    client_id: demo-client
    client_secret: demo-secret
    scopes: [leads.read, offline_access]
    allow_insecure_http: true{extra}
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{}", credential: api, allow_insecure_http: true }}
"#,
        dir.path().join("state").display(),
        demo.auth.token_url(),
        demo.api.url()
    );
    support::seed_refresh_token(&yaml, "api", &demo.auth.new_grant()).await;
    let relay = support::start(&yaml).await;
    get_ok(&relay).await;
    relay.stop().await;
    let log = demo.auth.requests_log();
    let r = log.last().expect("a refresh");
    assert_eq!((r.grant_type.as_str(), r.status), ("refresh_token", 200));
    r.param("scope").map(str::to_owned)
}

/// RFC 6749 §6: a refresh without `scope` keeps the granted scope, and one with it may
/// narrow it (Auth0 documents this): `scopes` go on refresh only where the provider
/// needs them (`scopes_on_refresh`, Microsoft's preset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_are_sent_on_refresh_only_when_asked() {
    assert_eq!(scope_sent_on_refresh("").await, None);
    assert_eq!(
        scope_sent_on_refresh("\n    scopes_on_refresh: true")
            .await
            .as_deref(),
        Some("leads.read offline_access")
    );
}
