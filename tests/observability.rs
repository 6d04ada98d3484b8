//! Metrics, logs and the status page, checked with the real tools: `promtool`, a real
//! Prometheus server scraping the admin listener, JSON log parsing, headless Chromium.
//! `scripts/test.sh` installs the tools; run alone without them, the tool-specific
//! tests say so and skip, unless TOKENRELAY_REQUIRE_TOOLS=1 (set by scripts/test.sh).

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::{ApiServer, AuthServer, AuthServerOptions};

/// Every metric DESIGN.md names.
const DESIGN_METRICS: &[&str] = &[
    "tokenrelay_requests_total",
    "tokenrelay_request_duration_seconds",
    "tokenrelay_upstream_errors_total",
    "tokenrelay_token_refresh_total",
    "tokenrelay_token_refresh_duration_seconds",
    "tokenrelay_token_expiry_timestamp_seconds",
    "tokenrelay_token_generation",
    "tokenrelay_credential_ready",
    "tokenrelay_credential_state",
    "tokenrelay_last_refresh_success_timestamp_seconds",
    "tokenrelay_refresh_waiters_total",
    "tokenrelay_upstream_401_retries_total",
    "tokenrelay_store_operations_total",
    "tokenrelay_build_info",
];

use support::get_text;
use support::tools::tool;

struct Env {
    auth: AuthServer,
    api: ApiServer,
    relay: support::Running,
    _state: tempfile::TempDir,
}

/// A rotating credential (seeded) and a client_credentials one, each with an upstream.
async fn start_env() -> Env {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
store: {{ type: file, path: "{state}" }}
credentials:
  crm: {{ grant: refresh_token, token_url: "{t}", client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}
  billing: {{ grant: client_credentials, token_url: "{t}", client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}
upstreams:
  crm: {{ listen: "127.0.0.1:0", url: "{u}", credential: crm, allow_insecure_http: true }}
  billing: {{ listen: "127.0.0.1:0", url: "{u}", credential: billing, allow_insecure_http: true }}
"#,
        state = state.path().display(),
        t = auth.token_url(),
        u = api.url()
    );
    let config = tokenrelay::config::Config::from_yaml(&yaml, &|_| None).unwrap();
    let generation = seed(&config, &auth.new_grant()).await;
    assert_eq!(generation, 1);
    let relay = support::start(&yaml).await;
    assert!(support::wait_ready(&relay.admin_url("/readyz"), Duration::from_secs(10)).await);
    Env {
        auth,
        api,
        relay,
        _state: state,
    }
}

async fn seed(config: &tokenrelay::config::Config, refresh: &str) -> u64 {
    use tokenrelay::store::{CasOutcome, StoredState};
    let store = tokenrelay::store::open(&config.store).unwrap();
    let state = StoredState {
        generation: 1,
        access_token: None,
        access_expires_at_ms: None,
        refresh_token: Some(tokenrelay::secret::Secret::new(refresh)),
        obtained_at_ms: tokenrelay::store::now_ms(),
        updated_at_ms: tokenrelay::store::now_ms(),
        updated_by: "test".into(),
        reauthorization_required: None,
        ..Default::default()
    };
    assert_eq!(
        store.compare_and_swap("crm", 0, &state).await.unwrap(),
        CasOutcome::Swapped
    );
    1
}

/// Value of the first sample line starting with `series` (name plus exact labels).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_the_design_and_counters_move() {
    let env = start_env().await;
    let c = support::client();
    for _ in 0..5 {
        let r = c
            .get(format!("{}/echo", env.relay.url("crm")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // A 401 to the current token: one refresh, one successful retry.
    env.auth.expire_access_tokens();
    let r = c
        .post(format!("{}/echo", env.relay.url("crm")))
        .body("small body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = get_text(&env.relay.admin_url("/metrics")).await;
    for name in DESIGN_METRICS {
        assert!(
            m.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics:\n{m}"
        );
    }
    let get = |s: &str| sample(&m, s).unwrap_or_else(|| panic!("no sample {s} in:\n{m}"));
    assert_eq!(
        get(r#"tokenrelay_requests_total{code="200",upstream="crm"}"#),
        6.0
    );
    assert_eq!(
        get(
            r#"tokenrelay_token_refresh_total{credential="crm",result="success",trigger="startup"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            r#"tokenrelay_token_refresh_total{credential="crm",result="success",trigger="upstream_401"}"#
        ),
        1.0
    );
    assert_eq!(
        get(r#"tokenrelay_upstream_401_retries_total{result="success",upstream="crm"}"#),
        1.0
    );
    assert_eq!(get(r#"tokenrelay_token_generation{credential="crm"}"#), 3.0);
    assert_eq!(
        get(r#"tokenrelay_credential_ready{credential="billing"}"#),
        1.0
    );
    assert_eq!(
        get(r#"tokenrelay_credential_state{credential="crm",state="ready"}"#),
        1.0
    );
    assert_eq!(
        get(r#"tokenrelay_credential_state{credential="crm",state="unavailable"}"#),
        0.0
    );
    assert!(
        get(r#"tokenrelay_store_operations_total{op="compare_and_swap",result="success"}"#) >= 2.0
    );
    assert!(get(r#"tokenrelay_token_expiry_timestamp_seconds{credential="crm"}"#) > 1.7e9);

    if let Some(promtool) = tool("promtool") {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    env.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_admin_listener() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let env = start_env().await;
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: tokenrelay\n    static_configs: [{{ targets: ['{}'] }}]\n",
            env.relay.admin
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut child = Command::new(prometheus)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let c = support::client();
    let query = format!("http://127.0.0.1:{port}/api/v1/query?query=tokenrelay_credential_ready");
    let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let found = support::eventually(Duration::from_secs(60), || {
        let c = c.clone();
        let q = query.clone();
        let last = last.clone();
        async move {
            let Ok(r) = c.get(&q).send().await else {
                return false;
            };
            let Ok(v) = r.json::<serde_json::Value>().await else {
                return false;
            };
            *last.lock().unwrap() = v.to_string();
            v["data"]["result"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|s| s["metric"]["credential"] == "crm" && s["value"][1] == "1")
            })
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found,
        "Prometheus never returned tokenrelay_credential_ready{{credential=\"crm\"}} == 1; last answer: {}\nlog: {}",
        last.lock().unwrap(),
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    env.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_hold_no_secret() {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(4),
        ..Default::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (support::free_port(), support::free_port());
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ access_log: true }}
credentials:
  api: {{ grant: client_credentials, token_url: "{t}", client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}
upstreams:
  api: {{ listen: "127.0.0.1:{proxy}", url: "{u}", credential: api, allow_insecure_http: true }}
"#,
            t = auth.token_url(),
            u = api.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("tokenrelay.log");
    let mut child = std::process::Command::new(support::binary())
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    assert!(
        support::wait_ready(
            &format!("http://127.0.0.1:{admin}/readyz"),
            Duration::from_secs(10)
        )
        .await
    );
    let c = support::client();
    let mut tokens = Vec::new();
    // Two token lifetimes: scheduled refreshes happen and get logged.
    for _ in 0..12 {
        let r = c
            .get(format!("http://127.0.0.1:{proxy}/echo?x=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if let Some((_, v)) = api
            .last_request_headers()
            .into_iter()
            .find(|(k, _)| k == "authorization")
        {
            tokens.push(v.trim_start_matches("Bearer ").to_string());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    support::sigterm(&child);
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let mut refresh_lines = 0;
    let mut access_lines = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["message"] == "token refresh" {
            refresh_lines += 1;
            for field in [
                "credential",
                "trigger",
                "result",
                "duration_ms",
                "expires_at",
            ] {
                assert!(!v[field].is_null(), "refresh line lacks {field}: {line}");
            }
        }
        if v["message"] == "request" {
            access_lines += 1;
            assert_eq!(
                v["path"], "/echo",
                "access log carries the path without query: {line}"
            );
        }
    }
    assert!(
        refresh_lines >= 2,
        "expected startup and scheduled refresh lines:\n{text}"
    );
    assert_eq!(access_lines, 12);
    tokens.sort();
    tokens.dedup();
    assert!(tokens.len() >= 2, "the token rotated during the test");
    for secret in tokens.iter().map(String::as_str).chain(["demo-secret"]) {
        assert!(!text.contains(secret), "a secret value reached the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium() {
    let Some(chromium) = tool("chromium") else {
        return;
    };
    let env = start_env().await;
    let c = support::client();
    c.get(format!("{}/echo", env.relay.url("billing")))
        .send()
        .await
        .unwrap();
    let url = env.relay.admin_url("/");
    let profile = tempfile::tempdir().unwrap();
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let base = |cmd: &mut Command| {
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,800",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()));
    };
    let mut dump = Command::new(&chromium);
    base(&mut dump);
    let out = dump.arg("--dump-dom").arg(&url).output().unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in ["<td>crm</td>", "<td>billing</td>", "ready", "200: 1"] {
        assert!(
            dom.contains(needle),
            "rendered page lacks {needle:?}:\n{dom}"
        );
    }
    let mut screenshot = Command::new(&chromium);
    base(&mut screenshot);
    let out = screenshot
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(out.status.success());
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "screenshot at {}",
        shot.display()
    );
    drop(env.api);
    drop(env.auth);
    env.relay.stop().await;
}
