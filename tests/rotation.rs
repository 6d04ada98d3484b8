//! Rotating single-use refresh tokens, in-process: tokenrelay, the demo authorization
//! server (rotation with reuse detection) and the demo API all run in this test process
//! on loopback sockets; tokenrelay uses the real file store in a temporary directory.
//!
//! Covered: sustained load with 2 s access tokens (no reuse, no client-visible 401, a
//! sensible refresh count); startup with a stored, still valid access token (no refresh);
//! `redirect_uri` on refresh; a token response without `refresh_token` (the old one is
//! kept, RFC 6749 §6); upstream 401 → one refresh → one retry (small body), pass-through
//! (body above `retry_body_limit`) and coalescing (100 concurrent 401s, one refresh);
//! `invalid_grant` → `reauthorization_required` → `seed` → adopted without a restart.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{eventually, metric, metrics_text, status_json, Load};
use testkit::{ApiServer, AuthServer, AuthServerOptions};
use tokenrelay::config::Config;
use tokenrelay::secret::Secret;
use tokenrelay::store::{now_ms, CasOutcome, StoredState};

/// The demo servers plus a state directory and a config for them.
struct Fixture {
    auth: AuthServer,
    api: ApiServer,
    dir: tempfile::TempDir,
    yaml: String,
    /// The same config written to a file, for the `seed` command.
    config_path: PathBuf,
}

fn auth_options(access_ttl: Duration) -> AuthServerOptions {
    AuthServerOptions {
        access_ttl,
        rotate_refresh_tokens: true,
        ..AuthServerOptions::default()
    }
}

/// A config for credential and upstream `crm`; `cred_extra` / `up_extra` are extra YAML
/// lines for the credential / upstream (indented by the caller-independent 4 spaces).
fn config_yaml(
    token_url: &str,
    api_url: &str,
    state: &Path,
    cred_extra: &[&str],
    up_extra: &[&str],
) -> String {
    let indent = |lines: &[&str]| {
        lines
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        "admin:
  listen: 127.0.0.1:0
store:
  type: file
  path: {state}
credentials:
  crm:
    grant: refresh_token
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
    refresh_before: 1s
    token_timeout: 2s
{cred}upstreams:
  crm:
    listen: 127.0.0.1:0
    url: {api_url}
    credential: crm
    allow_insecure_http: true
{up}",
        state = state.display(),
        cred = indent(cred_extra),
        up = indent(up_extra),
    )
}

async fn fixture(opts: AuthServerOptions, cred_extra: &[&str], up_extra: &[&str]) -> Fixture {
    if std::env::var_os("TEST_LOG").is_some() {
        tokenrelay::init_logging(tokenrelay::config::LogFormat::Text, Some("debug"));
    }
    let auth = AuthServer::start(opts).await.unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(
        &auth.token_url(),
        &api.url(),
        &dir.path().join("state"),
        cred_extra,
        up_extra,
    );
    let config_path = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config_path, &yaml).unwrap();
    Fixture {
        auth,
        api,
        dir,
        yaml,
        config_path,
    }
}

fn parse(yaml: &str) -> Config {
    Config::from_yaml(yaml, &|_| None).unwrap()
}

/// Writes `state` as the next generation of credential `crm` through the store API
/// (what `seed`/`authorize` do); returns the generation written.
async fn store_state(yaml: &str, mut state: StoredState) -> u64 {
    let store = tokenrelay::store::open(&parse(yaml).store).unwrap();
    let current = store.load("crm").await.unwrap().map(|s| s.generation);
    state.generation = current.unwrap_or(0) + 1;
    let outcome = store
        .compare_and_swap("crm", current.unwrap_or(0), &state)
        .await
        .unwrap();
    assert_eq!(outcome, CasOutcome::Swapped);
    state.generation
}

async fn load_state(yaml: &str) -> Option<StoredState> {
    let store = tokenrelay::store::open(&parse(yaml).store).unwrap();
    store.load("crm").await.unwrap()
}

/// A freshly authorized grant: a refresh token and no access token.
fn refresh_only(refresh_token: &str) -> StoredState {
    let now = now_ms();
    StoredState {
        generation: 0,
        access_token: None,
        access_expires_at_ms: None,
        refresh_token: Some(Secret::new(refresh_token)),
        obtained_at_ms: now,
        updated_at_ms: now,
        updated_by: "test".into(),
        reauthorization_required: None,
        ..Default::default()
    }
}

async fn seeded(f: &Fixture) {
    store_state(&f.yaml, refresh_only(&f.auth.new_grant())).await;
}

fn refresh_count(metrics: &str, result: &str) -> f64 {
    metric(
        metrics,
        "tokenrelay_token_refresh_total",
        &[("credential", "crm"), ("result", result)],
    )
}

/// Load with 2 s access tokens: many concurrent clients for 20 s. The authorization
/// server never sees a refresh token twice, no client ever sees a 401 (or a 5xx), and
/// the number of refreshes is what the schedule predicts: a 2 s token with a 1 s lead
/// (`refresh_before: 1s` ≥ 20 % of the lifetime) is refreshed about once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_two_second_tokens_never_reuses_a_refresh_token() {
    let f = fixture(auth_options(Duration::from_secs(2)), &[], &[]).await;
    seeded(&f).await;
    let relay = support::start(&f.yaml).await;
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    let first = support::client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);

    const DURATION: Duration = Duration::from_secs(20);
    const CLIENTS: usize = 32;
    let before = f.auth.stats();
    let started = Instant::now();
    let load = Load::start(vec![url], CLIENTS, Duration::ZERO);
    tokio::time::sleep(DURATION).await;
    let report = load.stop().await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = f.auth.stats();
    let metrics = metrics_text(&format!("http://{}", relay.admin)).await;
    relay.stop().await;

    let refreshes = after.refreshes - before.refreshes;
    let rotations = after.rotations - before.rotations;
    // lifetime − lead = 2 s − 1 s, minus on average 2.5 % of the lifetime of jitter.
    let expected = elapsed / 0.95;
    eprintln!(
        "load: {elapsed:.1}s, {CLIENTS} clients, {} ok, {} 401, {} 5xx, {} transport errors; \
         {refreshes} refreshes, {rotations} rotations (expected ≈ {expected:.0}), \
         refreshes per rotation {:.2}, reuse detected {}, upstream 401 retries {}",
        report.ok,
        report.unauthorized,
        report.server_errors,
        report.transport_errors,
        refreshes as f64 / rotations.max(1) as f64,
        after.refresh_reuse_detected,
        metric(&metrics, "tokenrelay_upstream_401_retries_total", &[]),
    );
    assert_eq!(
        after.refresh_reuse_detected, 0,
        "a refresh token was reused"
    );
    assert_eq!(after.invalid_grant, 0, "a refresh token was rejected");
    assert_eq!(report.unauthorized, 0, "clients saw 401: {report:?}");
    assert_eq!(report.server_errors, 0, "clients saw 5xx: {report:?}");
    assert_eq!(report.transport_errors, 0, "transport errors: {report:?}");
    assert!(report.ok > 1000, "too little traffic: {report:?}");
    assert_eq!(
        refreshes, rotations,
        "every refresh is exactly one rotation"
    );
    let ratio = refreshes as f64 / expected;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "{refreshes} refreshes in {elapsed:.1}s; expected about {expected:.0}"
    );
}

/// At startup a stored access token that is still valid is used as it is: no request
/// reaches the token endpoint, and the metrics record the startup as an adoption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_uses_a_stored_valid_token_without_refreshing() {
    let f = fixture(auth_options(Duration::from_secs(60)), &[], &[]).await;
    let now = now_ms();
    let generation = store_state(
        &f.yaml,
        StoredState {
            access_token: Some(Secret::new(f.auth.new_access_token())),
            access_expires_at_ms: Some(now + 60_000),
            ..refresh_only(&f.auth.new_grant())
        },
    )
    .await;

    let relay = support::start(&f.yaml).await;
    for _ in 0..5 {
        let r = support::client()
            .get(format!("{}/echo", relay.url("crm")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let admin = format!("http://{}", relay.admin);
    let metrics = metrics_text(&admin).await;
    let status = status_json(&admin).await;
    relay.stop().await;

    assert_eq!(f.auth.stats().token_requests, 0, "no token request at all");
    assert_eq!(
        metric(
            &metrics,
            "tokenrelay_token_refresh_total",
            &[("trigger", "startup"), ("result", "adopted")]
        ),
        1.0
    );
    assert_eq!(refresh_count(&metrics, "success"), 0.0);
    assert_eq!(status["credentials"]["crm"]["state"], "ready");
    assert_eq!(status["credentials"]["crm"]["generation"], generation);
    assert_eq!(load_state(&f.yaml).await.unwrap().generation, generation);
}

/// `redirect_uri` is sent on refresh when configured (some CRMs require it), along with
/// the client credentials in the body and nothing secret in the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_sends_the_configured_redirect_uri() {
    let f = fixture(
        auth_options(Duration::from_secs(60)),
        &["redirect_uri: https://app.example.com/oauth/callback"],
        &[],
    )
    .await;
    seeded(&f).await;
    let relay = support::start(&f.yaml).await;
    let r = support::client()
        .get(format!("{}/echo", relay.url("crm")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    relay.stop().await;

    let log = f.auth.requests_log();
    assert_eq!(log.len(), 1, "one refresh: {log:?}");
    let rec = &log[0];
    assert_eq!(rec.grant_type, "refresh_token");
    assert_eq!(rec.status, 200);
    assert_eq!(
        rec.param("redirect_uri"),
        Some("https://app.example.com/oauth/callback")
    );
    assert_eq!(rec.param("refresh_token"), Some("<redacted>"));
    assert_eq!(rec.client_auth, "body");
    assert!(rec.query_params.is_empty());
}

/// A minimal token endpoint that never rotates and never returns `refresh_token`
/// (RFC 6749 §6 allows that: the client keeps using the one it has). It records every
/// refresh token presented; the access tokens it issues (2 s) are the only ones the API
/// accepts.
struct NonRotatingProvider {
    addr: SocketAddr,
    presented: Arc<Mutex<Vec<String>>>,
    issued: Arc<Mutex<HashSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NonRotatingProvider {
    async fn start() -> NonRotatingProvider {
        use http_body_util::{BodyExt, Full};
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let presented: Arc<Mutex<Vec<String>>> = Arc::default();
        let issued: Arc<Mutex<HashSet<String>>> = Arc::default();
        let (p, i) = (presented.clone(), issued.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (p, i) = (p.clone(), i.clone());
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (p, i) = (p.clone(), i.clone());
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let params: Vec<(String, String)> =
                            form_urlencoded::parse(&body).into_owned().collect();
                        let get =
                            |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                        let ok = get("grant_type").as_deref() == Some("refresh_token")
                            && get("client_secret").as_deref() == Some("demo-secret");
                        let (status, json) = if ok {
                            p.lock()
                                .unwrap()
                                .push(get("refresh_token").unwrap_or_default());
                            let token = format!("at-{}", rand::random::<u64>());
                            i.lock().unwrap().insert(token.clone());
                            (
                                200,
                                serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": 2}),
                            )
                        } else {
                            (400, serde_json::json!({"error": "invalid_request"}))
                        };
                        Ok::<_, hyper::Error>(
                            http::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(bytes::Bytes::from(json.to_string())))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        NonRotatingProvider {
            addr,
            presented,
            issued,
            task,
        }
    }
}

impl Drop for NonRotatingProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A token response without `refresh_token` keeps the stored one: every later refresh
/// presents the seeded token again, and the store still holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_without_refresh_token_keeps_the_old_one() {
    let provider = NonRotatingProvider::start().await;
    let issued = provider.issued.clone();
    let api = ApiServer::start(Some(Arc::new(move |t: &str| {
        issued.lock().unwrap().contains(t)
    })))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(
        &format!("http://{}/oauth2/token", provider.addr),
        &api.url(),
        &dir.path().join("state"),
        &[],
        &[],
    );
    let seeded_generation = store_state(&yaml, refresh_only("rt-long-lived")).await;
    let relay = support::start(&yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    // 2 s tokens: within ~4 s there are several refreshes.
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let r = support::client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status_json(&format!("http://{}", relay.admin)).await;
    relay.stop().await;

    let presented = provider.presented.lock().unwrap().clone();
    assert!(presented.len() >= 3, "refreshes: {presented:?}");
    assert!(
        presented.iter().all(|t| t == "rt-long-lived"),
        "the kept refresh token is presented every time: {presented:?}"
    );
    let stored = load_state(&yaml).await.unwrap();
    assert_eq!(
        stored.refresh_token.as_ref().map(|t| t.expose()),
        Some("rt-long-lived")
    );
    assert!(stored.generation >= seeded_generation + presented.len() as u64);
    assert_eq!(status["credentials"]["crm"]["state"], "ready");
}

fn retries(metrics: &str, result: &str) -> f64 {
    metric(
        metrics,
        "tokenrelay_upstream_401_retries_total",
        &[("upstream", "crm"), ("result", result)],
    )
}

/// The upstream answers 401 to the current token (the provider dropped it early): one
/// refresh, then the small POST is retried with the new token and its body intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_401_refreshes_and_retries_a_small_post() {
    let f = fixture(
        auth_options(Duration::from_secs(60)),
        &[],
        &["retry_body_limit: 1KiB"],
    )
    .await;
    seeded(&f).await;
    let relay = support::start(&f.yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    let c = support::client();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    let admin = format!("http://{}", relay.admin);
    let refreshes_before = f.auth.stats().refreshes;

    f.auth.expire_access_tokens();
    let body = "name=Deal&amount=100&note=".to_string() + &"x".repeat(500);
    let r = c.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200, "retried with a fresh token");
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(
        echo["body"],
        body.as_str(),
        "the retry carries the same body"
    );

    let metrics = metrics_text(&admin).await;
    let api_stats = f.api.stats();
    relay.stop().await;
    assert_eq!(f.auth.stats().refreshes, refreshes_before + 1);
    assert_eq!(retries(&metrics, "success"), 1.0);
    assert_eq!(retries(&metrics, "failure"), 0.0);
    assert_eq!(
        metric(
            &metrics,
            "tokenrelay_token_refresh_total",
            &[("trigger", "upstream_401"), ("result", "success")]
        ),
        1.0
    );
    assert_eq!(api_stats.unauthorized, 1, "one 401, then the retry");
    assert_eq!(f.auth.stats().refresh_reuse_detected, 0);
}

/// A body above `retry_body_limit` cannot be replayed: the 401 reaches the client, the
/// metrics say why, and the next request already carries a fresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_401_with_a_body_above_the_limit_is_passed_through() {
    let f = fixture(
        auth_options(Duration::from_secs(60)),
        &[],
        &["retry_body_limit: 1KiB"],
    )
    .await;
    seeded(&f).await;
    let relay = support::start(&f.yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    let c = support::client();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    let admin = format!("http://{}", relay.admin);

    let before = generation(&admin).await;
    f.auth.expire_access_tokens();
    let r = c
        .post(&url)
        .body("y".repeat(8 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "too large to replay: the 401 is passed through"
    );
    // The 401 still triggered a refresh in the background, and tokenrelay holds its
    // result before the next request.
    let refreshed = eventually(Duration::from_secs(5), || async {
        generation(&admin).await > before
    })
    .await;
    assert!(refreshed, "a refresh follows the passed-through 401");
    let r = c.post(&url).body("small").send().await.unwrap();
    assert_eq!(r.status(), 200);

    let metrics = metrics_text(&admin).await;
    relay.stop().await;
    assert_eq!(retries(&metrics, "body_too_large"), 1.0);
    assert_eq!(retries(&metrics, "success"), 0.0);
    assert_eq!(f.auth.stats().refreshes, 2, "seed redemption + one refresh");
    assert_eq!(f.auth.stats().refresh_reuse_detected, 0);
}

/// The credential's generation as `/status` shows it (0 when unreachable).
async fn generation(admin: &str) -> u64 {
    status_json(admin).await["credentials"]["crm"]["generation"]
        .as_u64()
        .unwrap_or(0)
}

/// 100 concurrent requests all get a 401 for the same token generation: exactly one
/// refresh, and every request is retried successfully with its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_401s_cause_exactly_one_refresh() {
    let f = fixture(auth_options(Duration::from_secs(60)), &[], &[]).await;
    seeded(&f).await;
    let relay = support::start(&f.yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    let c = support::client();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    let admin = format!("http://{}", relay.admin);
    let before = f.auth.stats();

    f.auth.expire_access_tokens();
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (c, url, barrier) = (c.clone(), url.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let r = c
                    .post(&url)
                    .body(format!("request {i}"))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let echo: serde_json::Value = r.json().await.unwrap_or_default();
                (status, echo["body"] == format!("request {i}").as_str())
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (status, body_ok) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(body_ok);
        ok += 1;
    }
    let metrics = metrics_text(&admin).await;
    let api_stats = f.api.stats();
    relay.stop().await;
    let after = f.auth.stats();
    let retried = retries(&metrics, "success");
    eprintln!(
        "100 concurrent requests: {ok} ok, {} upstream 401s, {retried} retried, {} refreshes",
        api_stats.unauthorized,
        after.refreshes - before.refreshes
    );
    assert_eq!(after.refreshes - before.refreshes, 1, "exactly one refresh");
    assert_eq!(after.refresh_reuse_detected, 0);
    assert!(
        api_stats.unauthorized >= 1 && retried == api_stats.unauthorized as f64,
        "every 401 was retried once: {} 401s, {retried} retries",
        api_stats.unauthorized
    );
    assert_eq!(retries(&metrics, "failure"), 0.0);
}

/// `invalid_grant`: the grant is revoked at the provider, the next refresh is rejected
/// and the credential enters `reauthorization_required` (readiness fails, `/status` says
/// what to do, requests get a 503 JSON error) without hammering the token endpoint.
/// `tokenrelay seed` with a new grant's refresh token is adopted by the running instance
/// within seconds, and the rejected refresh token is never presented again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_requires_reauthorization_until_seeded() {
    let f = fixture(auth_options(Duration::from_secs(2)), &[], &[]).await;
    seeded(&f).await;
    let relay = support::start(&f.yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    let admin = format!("http://{}", relay.admin);
    let c = support::client();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert!(support::wait_ready(&format!("{admin}/readyz"), Duration::from_secs(5)).await);

    f.auth.revoke_all();
    // The next scheduled refresh (2 s tokens: within about a second) is rejected.
    let rejected = eventually(Duration::from_secs(10), || async {
        status_json(&admin).await["credentials"]["crm"]["state"] == "reauthorization_required"
    })
    .await;
    assert!(rejected, "credential enters reauthorization_required");
    assert_eq!(f.auth.stats().invalid_grant, 1);

    let ready = c.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let status = status_json(&admin).await;
    let cred = &status["credentials"]["crm"];
    assert_eq!(cred["state"], "reauthorization_required");
    assert!(
        cred["reauthorization_required"]["action"]
            .as_str()
            .unwrap()
            .contains("tokenrelay seed"),
        "{cred}"
    );
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(err["upstream"], "crm");
    assert_eq!(err["credential"], "crm");
    assert!(
        err["error"].as_str().unwrap().contains("re-authorization"),
        "{err}"
    );
    let stored = load_state(&f.yaml).await.unwrap();
    assert!(stored.reauthorization_required.is_some());
    assert!(
        stored.refresh_token.is_none(),
        "the dead token is forgotten"
    );

    // No hammering: requests keep arriving, but the token endpoint hears nothing more.
    let token_requests = f.auth.stats().token_requests;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let extra = f.auth.stats().token_requests - token_requests;
    assert!(
        extra <= 1,
        "{extra} token requests while re-authorization is required"
    );

    // A human re-authorizes: seed the new grant's refresh token from a file.
    let token_file = f.dir.path().join("new-refresh-token");
    std::fs::write(&token_file, format!("{}\n", f.auth.new_grant())).unwrap();
    let seeded_at = Instant::now();
    let out = std::process::Command::new(support::binary())
        .args(["seed", "--config"])
        .arg(&f.config_path)
        .args(["--credential", "crm", "--refresh-token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "seed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recovered = eventually(Duration::from_secs(10), || async {
        matches!(c.get(&url).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    let adoption = seeded_at.elapsed();
    assert!(recovered, "the running instance adopts the seeded token");
    assert!(support::wait_ready(&format!("{admin}/readyz"), Duration::from_secs(2)).await);
    eprintln!("seeded refresh token adopted and serving after {adoption:?}");

    // Keep running through a few rotations of the new grant.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status_json(&admin).await;
    relay.stop().await;
    let stats = f.auth.stats();
    assert_eq!(status["credentials"]["crm"]["state"], "ready");
    assert!(stats.rotations >= 3, "the new grant rotates: {stats:?}");
    // The revoked grant answers `invalid_grant` to every presentation of its token, so a
    // count still at 1 means the rejected token was never sent again.
    assert_eq!(stats.invalid_grant, 1, "{stats:?}");
    assert_eq!(stats.refresh_reuse_detected, 0);
}
