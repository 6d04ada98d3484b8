//! `issuer:` discovery (RFC 8414, then OpenID Connect Discovery) against the real demo
//! authorization server on loopback: `check` prints the endpoints, a generic IdP needs
//! only the issuer and the client, a document naming another issuer is refused, a
//! missing RFC 8414 document falls back to `openid-configuration`, `authorize --device`
//! works from discovery alone, and a reload keeps the previous endpoints when discovery
//! fails. Also preset sunset dates: the `check` warning, `/status`, the status page and
//! the metric.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::ChildProc;
use testkit::{AuthServer, AuthServerOptions, DiscoveryDocs};

const WITHIN: Duration = Duration::from_secs(30);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// The issuer the tests configure: the demo server's origin plus a realm path, as
/// Keycloak's issuers have.
fn issuer(auth: &AuthServer) -> String {
    format!("{}/realms/acme", auth.url())
}

/// Credential `api` named only by `issuer` (grant `grant`), and upstream `api` in front
/// of `api_url`.
fn issuer_yaml(dir: &Path, admin: &str, issuer: &str, grant: &str, api_url: &str) -> String {
    format!(
        r#"admin: {{ listen: "{admin}" }}
store: {{ type: file, path: "{state}" }}
credentials:
  api:
    grant: {grant}
    issuer: "{issuer}"
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{api_url}", credential: api, allow_insecure_http: true }}
"#,
        state = dir.join("state").display(),
    )
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn check(config: &Path) -> std::process::Output {
    support::cli(&["check", "--config", config.to_str().unwrap()]).await
}

/// A generic IdP needs only `issuer`, `client_id` and a secret: `check` prints the
/// endpoints its metadata gave (and where from), and tokenrelay serves with a token from
/// the discovered token endpoint. The issuer has a path, under which its documents are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_idp_needs_only_the_issuer_and_check_prints_what_was_discovered() {
    let demo = support::demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let iss = issuer(&demo.auth);
    let yaml = issuer_yaml(
        dir.path(),
        "127.0.0.1:0",
        &iss,
        "client_credentials",
        &demo.api.url(),
    );
    let config = dir.path().join("config.yaml");
    write(&config, &yaml);

    let out = check(&config).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let document = format!("{iss}/.well-known/oauth-authorization-server");
    for (key, value) in [
        ("token_url", demo.auth.token_url()),
        ("authorize_url", demo.auth.authorize_url()),
        (
            "device_authorization_url",
            demo.auth.device_authorization_url(),
        ),
    ] {
        assert!(
            stdout.contains(&format!("{key}: {value}")),
            "{key}: {stdout}"
        );
        assert!(
            stdout.contains(&format!(
                "#   credentials.api.{key}: discovered from {document}"
            )),
            "{key}'s origin: {stdout}"
        );
    }
    assert!(!stdout.contains("demo-secret") && !stderr.contains("demo-secret"));
    assert_eq!(
        demo.auth.discovery_requests(),
        ["/realms/acme/.well-known/oauth-authorization-server"]
    );
    assert_eq!(
        demo.auth.stats().token_requests,
        0,
        "check contacts nothing but the discovery document"
    );

    let relay = support::start(&yaml).await;
    let served = support::wait_ready(&format!("{}/echo", relay.url("api")), WITHIN).await;
    assert!(
        served,
        "tokenrelay serves with the discovered token endpoint"
    );
    relay.stop().await;
}

/// A document whose `issuer` is not the configured one exactly is refused, at `check`
/// and at start, naming the issuer and both values; no token request is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_naming_another_issuer_is_refused() {
    let demo = support::demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let iss = issuer(&demo.auth);
    demo.auth
        .set_discovery_issuer(Some("https://idp.attacker.example/realms/acme"));
    let port = support::free_port();
    let config = dir.path().join("config.yaml");
    write(
        &config,
        &issuer_yaml(
            dir.path(),
            &format!("127.0.0.1:{port}"),
            &iss,
            "client_credentials",
            &demo.api.url(),
        ),
    );

    let out = check(&config).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let expected = format!("credentials.api.issuer: discovery of {iss} failed: {iss}/.well-known/oauth-authorization-server names issuer \"https://idp.attacker.example/realms/acme\", not the configured \"{iss}\"");
    assert!(stderr.contains(&expected), "{stderr}");

    let log = dir.path().join("log");
    let mut run = ChildProc::spawn(&config, &log, &[]);
    let deadline = Instant::now() + WITHIN;
    let code = loop {
        if let Some(s) = run.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "run did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(1), "{log_text}");
    assert!(log_text.contains(&expected), "{log_text}");
    assert_eq!(demo.auth.stats().token_requests, 0);
}

/// A server without RFC 8414's document (404) is asked for `openid-configuration` next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_rfc8414_document_falls_back_to_openid_configuration() {
    let demo = support::demo_servers(AuthServerOptions::default()).await;
    demo.auth.set_discovery_docs(DiscoveryDocs::OidcOnly);
    let dir = tempfile::tempdir().unwrap();
    let iss = issuer(&demo.auth);
    let config = dir.path().join("config.yaml");
    write(
        &config,
        &issuer_yaml(
            dir.path(),
            "127.0.0.1:0",
            &iss,
            "client_credentials",
            &demo.api.url(),
        ),
    );
    let out = check(&config).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert_eq!(
        demo.auth.discovery_requests(),
        [
            "/realms/acme/.well-known/oauth-authorization-server",
            "/realms/acme/.well-known/openid-configuration"
        ]
    );
    assert!(
        stdout.contains(&format!(
            "credentials.api.token_url: discovered from {iss}/.well-known/openid-configuration"
        )),
        "{stdout}"
    );

    // Neither document: the error names both addresses and what each answered.
    demo.auth.set_discovery_docs(DiscoveryDocs::None);
    let out = check(&config).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no metadata document: {iss}/.well-known/oauth-authorization-server answered HTTP 404 Not Found; {iss}/.well-known/openid-configuration answered HTTP 404 Not Found")),
        "{stderr}"
    );
}

/// `authorize --device` with a credential that names only its issuer: the device
/// authorization and token endpoints both come from the metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_flow_works_from_discovery_alone() {
    let demo = support::demo_servers(AuthServerOptions {
        device_interval: Duration::from_secs(1),
        ..AuthServerOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    write(
        &config,
        &issuer_yaml(
            dir.path(),
            "127.0.0.1:0",
            &issuer(&demo.auth),
            "refresh_token",
            &demo.api.url(),
        ),
    );
    let mut child = Command::new(support::binary())
        .args(["authorize", "--credential", "api", "--device", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokenrelay authorize");
    // Read to the end, so the command never writes to a closed pipe.
    let stdout = child.stdout.take().unwrap();
    let (tx, codes) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(code) = line.trim().strip_prefix("code: ") {
                let _ = tx.send(code.to_owned());
            }
        }
    });
    let user_code = tokio::task::spawn_blocking(move || codes.recv_timeout(WITHIN))
        .await
        .unwrap()
        .expect("the device flow printed a user code");
    assert!(demo.auth.approve_device(&user_code));
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let state = support::stored_state(
        &issuer_yaml(
            dir.path(),
            "127.0.0.1:0",
            &issuer(&demo.auth),
            "refresh_token",
            &demo.api.url(),
        ),
        "api",
    )
    .await
    .expect("the answer is stored");
    assert_eq!(state.generation, 1);
    let issued_to = state.issued_to.expect("the token endpoint is recorded");
    assert_eq!(issued_to.token_url, demo.auth.token_url());
}

/// A reload while the metadata cannot be read keeps the credential's previous endpoints
/// (a warning is logged, the reload succeeds, requests keep being served); a credential
/// new in the reload has none to keep, so that reload fails, naming its issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_previous_endpoints_when_discovery_fails() {
    let demo = support::demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_ports(2);
    let (admin, listen) = (ports[0], ports[1]);
    let iss = issuer(&demo.auth);
    let v1 = issuer_yaml(
        dir.path(),
        &format!("127.0.0.1:{admin}"),
        &iss,
        "client_credentials",
        &demo.api.url(),
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{listen}"));
    let config: PathBuf = dir.path().join("config.yaml");
    write(&config, &v1);
    let proc = ChildProc::spawn(&config, &dir.path().join("log"), &[]);
    let admin_url = format!("http://127.0.0.1:{admin}");
    let echo = format!("http://127.0.0.1:{listen}/echo");
    assert!(
        support::wait_ready(&echo, WITHIN).await,
        "{}",
        support::log_tail(&proc.log, 30)
    );

    // The metadata is gone; the credential changes (so it is rebuilt) and keeps its
    // endpoints.
    demo.auth.set_discovery_docs(DiscoveryDocs::None);
    write(
        &config,
        &v1.replace(
            "allow_insecure_http: true\nupstreams",
            "allow_insecure_http: true\n    refresh_before: 30s\nupstreams",
        ),
    );
    let out = support::cli(&["reload", "--config", config.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = support::status_json(&admin_url).await;
    let last = &status["config"]["last_reload"];
    assert_eq!(last["result"], "success", "{status:#}");
    assert_eq!(
        last["changes"]["credentials_changed"],
        serde_json::json!(["api"])
    );
    let log = std::fs::read_to_string(&proc.log).unwrap();
    assert!(
        log.contains("discovery failed on reload; the credential keeps its previous endpoints"),
        "{log}"
    );
    assert!(!log.contains("demo-secret"), "{log}");
    assert!(support::wait_ready(&echo, WITHIN).await);
    let before = demo.auth.stats().token_requests;
    demo.auth.expire_access_tokens();
    assert!(support::wait_ready(&echo, WITHIN).await);
    assert!(
        demo.auth.stats().token_requests > before,
        "the rebuilt credential fetched a token from the kept token endpoint"
    );

    // A new credential with an issuer whose metadata cannot be read: the reload fails.
    let other = "  other:\n    grant: client_credentials\n    issuer: \"ISSUER/other\"\n    client_id: demo-client\n    client_secret: demo-secret\n    allow_insecure_http: true\nupstreams:";
    write(
        &config,
        &v1.replacen("upstreams:", &other.replace("ISSUER", &iss), 1),
    );
    let out = support::cli(&["reload", "--config", config.to_str().unwrap()]).await;
    assert!(!out.status.success());
    let status = support::status_json(&admin_url).await;
    let error = status["config"]["last_reload"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains(&format!(
            "credentials.other.issuer: discovery of {iss}/other failed"
        )),
        "{status:#}"
    );
    assert!(support::wait_ready(&echo, WITHIN).await);
}

/// HubSpot's v1 token URL, shut down on 2027-02-16.
const HUBSPOT_V1: &str = "https://api.hubapi.com/oauth/v1/token";
const HUBSPOT_SUNSET: i64 = 1_802_736_000;

/// Two hubspot credentials: `old` still sets the v1 token URL, `new` uses the preset's.
/// Neither has a stored grant, so nothing is contacted.
fn hubspot_yaml(dir: &Path) -> String {
    format!(
        r#"admin: {{ listen: "127.0.0.1:0" }}
store: {{ type: file, path: "{state}" }}
credentials:
  old: {{ provider: hubspot, client_id: id, client_secret: s, token_url: "{HUBSPOT_V1}" }}
  new: {{ provider: hubspot, client_id: id, client_secret: s }}
upstreams:
  old: {{ listen: "127.0.0.1:0", url: "https://api.hubapi.com", credential: old }}
  new: {{ listen: "127.0.0.1:0", url: "https://api.hubapi.com", credential: new }}
"#,
        state = dir.join("state").display()
    )
}

/// A credential using an endpoint its preset records as shut down: `check` warns (the
/// sunset is within 90 days now, and past after it), naming the date and the replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_of_a_sunset_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    write(&config, &hubspot_yaml(dir.path()));
    let out = check(&config).await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("shut down on 2027-02-16"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    let w = warnings[0];
    assert!(
        w.starts_with(&format!(
            "warning: credentials.old: {HUBSPOT_V1}, used by this credential, "
        )) && w.ends_with(", as hubspot announced (https://developers.hubspot.com/changelog/v1-oauth-api-deprecation); use https://api.hubapi.com/oauth/2026-03/token instead"),
        "{w}"
    );
}

/// `/status` carries the sunset of the credential it concerns (and the status page a
/// line for it); `/metrics` exposes its date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_a_sunset_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let relay = support::start(&hubspot_yaml(dir.path())).await;
    let admin = relay.admin_url("");
    let status = support::status_json(&admin).await;
    let sunset = &status["credentials"]["old"]["sunset"];
    assert_eq!(sunset["date"], "2027-02-16", "{status:#}");
    assert_eq!(sunset["endpoint"], HUBSPOT_V1);
    assert_eq!(
        sunset["replacement"],
        "https://api.hubapi.com/oauth/2026-03/token"
    );
    assert_eq!(
        sunset["source"],
        "https://developers.hubspot.com/changelog/v1-oauth-api-deprecation"
    );
    assert!(sunset["days_left"].is_i64());
    assert!(status["credentials"]["new"]["sunset"].is_null());

    let page = support::get_text(&relay.admin_url("/")).await;
    assert!(
        page.contains(&format!("old: {HUBSPOT_V1} ends on 2027-02-16")),
        "{page}"
    );

    let metrics = support::metrics_text(&admin).await;
    let name = "tokenrelay_preset_sunset_timestamp_seconds";
    assert_eq!(
        support::metric(&metrics, name, &[("credential", "old")]),
        HUBSPOT_SUNSET as f64,
        "{metrics}"
    );
    assert!(
        !metrics.contains(&format!("{name}{{credential=\"new\"}}")),
        "{metrics}"
    );
    relay.stop().await;
}
