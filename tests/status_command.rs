//! `tokenrelay status` as an operator runs it: the binary against a running instance
//! (its admin listener), against the store alone when no instance answers, and against
//! neither; its exit codes (0 every credential ready, 1 some needs action, 2 nothing
//! readable), `--json`, and a reader that goes away (`| head`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use testkit::{ApiServer, AuthServer, AuthServerOptions};
use tokenrelay::secret::Secret;
use tokenrelay::store::{now_ms, CasOutcome, StoredState};

struct Setup {
    auth: AuthServer,
    _api: ApiServer,
    dir: tempfile::TempDir,
    yaml: String,
    config: PathBuf,
}

async fn setup() -> Setup {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = support::free_ports(1)[0];
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:{admin} }}
store: {{ type: file, path: {state} }}
credentials:
  crm:
    grant: refresh_token
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
upstreams:
  crm: {{ listen: 127.0.0.1:0, url: {api_url}, credential: crm, allow_insecure_http: true }}
",
        state = dir.path().join("state").display(),
        token_url = auth.token_url(),
        api_url = api.url(),
    );
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, &yaml).unwrap();
    Setup {
        auth,
        _api: api,
        dir,
        yaml,
        config,
    }
}

async fn status(config: &Path, json: bool) -> Output {
    let mut cmd = Command::new(support::binary());
    cmd.args(["status", "--config"]).arg(config);
    if json {
        cmd.arg("--json");
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn doc(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

async fn store_state(yaml: &str, state: StoredState) {
    let cfg = tokenrelay::config::Config::from_yaml(yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&cfg.store).unwrap();
    let expected = store.load("crm").await.unwrap().map_or(0, |s| s.generation);
    let state = StoredState {
        generation: expected + 1,
        ..state
    };
    let swapped = store
        .compare_and_swap("crm", expected, &state)
        .await
        .unwrap();
    assert_eq!(swapped, CasOutcome::Swapped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_asks_the_running_instance() {
    let s = setup().await;
    support::seed_refresh_token(&s.yaml, "crm", &s.auth.new_grant()).await;
    let relay = support::start(&s.yaml).await;
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    assert_eq!(
        support::client().get(&url).send().await.unwrap().status(),
        200
    );

    let human = status(&s.config, false).await;
    let json = status(&s.config, true).await;
    relay.stop().await;

    assert_eq!(human.status.code(), Some(0), "{}", text(&human));
    let t = text(&human);
    assert!(t.starts_with("from the running instance\n"), "{t}");
    assert!(t.contains("crm: ready (grant refresh_token)"), "{t}");
    assert!(t.contains("last refresh:"), "{t}");
    assert_eq!(json.status.code(), Some(0));
    let d = doc(&json);
    assert_eq!(d["source"], "instance");
    assert_eq!(d["credentials"]["crm"]["state"], "ready");
    assert!(
        d["upstreams"]["crm"].is_object(),
        "the whole /status document: {d}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_instance_the_store_answers() {
    let s = setup().await;
    store_state(
        &s.yaml,
        StoredState {
            access_token: Some(Secret::new("still-valid-access-token")),
            access_expires_at_ms: Some(now_ms() + 3_600_000),
            refresh_token: Some(Secret::new("the-refresh-token")),
            obtained_at_ms: now_ms(),
            updated_by: "test".into(),
            ..Default::default()
        },
    )
    .await;
    let ready = status(&s.config, false).await;
    assert_eq!(ready.status.code(), Some(0), "{}", text(&ready));
    assert!(
        text(&ready).starts_with("from the store (no running instance answered: "),
        "{}",
        text(&ready)
    );
    assert!(text(&ready).contains("crm: ready (grant refresh_token)"));

    store_state(
        &s.yaml,
        StoredState {
            reauthorization_required: Some("token endpoint answered 400 invalid_grant".into()),
            updated_by: "test".into(),
            ..Default::default()
        },
    )
    .await;
    let dead = status(&s.config, false).await;
    let dead_json = status(&s.config, true).await;
    assert_eq!(dead.status.code(), Some(1), "{}", text(&dead));
    assert!(text(&dead).contains("crm: reauthorization_required"));
    assert!(
        text(&dead).contains("why:                  token endpoint answered 400 invalid_grant"),
        "{}",
        text(&dead)
    );
    assert_eq!(dead_json.status.code(), Some(1));
    let d = doc(&dead_json);
    assert_eq!(d["source"], "store");
    assert_eq!(d["credentials"]["crm"]["state"], "reauthorization_required");
    for o in [&ready, &dead, &dead_json] {
        let t = text(o);
        assert!(
            !t.contains("still-valid-access-token") && !t.contains("the-refresh-token"),
            "{t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_readable_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_ports(2);
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{ listen: 127.0.0.1:{admin} }}
store: {{ type: redis, url: \"redis://127.0.0.1:{redis}/0\" }}
credentials:
  crm: {{ grant: refresh_token, token_url: \"https://idp.example/token\", client_id: x }}
upstreams:
  crm: {{ listen: 127.0.0.1:0, url: \"https://api.example\", credential: crm }}
",
            admin = ports[0],
            redis = ports[1]
        ),
    )
    .unwrap();
    let o = status(&config, false).await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}{}",
        text(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text(&o).starts_with("no running instance answered"),
        "{}",
        text(&o)
    );
    let j = status(&config, true).await;
    assert_eq!(j.status.code(), Some(2));
    assert!(doc(&j)["store_error"].is_string());
}

/// `tokenrelay status | head -1`: the reader is gone before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly() {
    let s = setup().await;
    support::seed_refresh_token(&s.yaml, "crm", &s.auth.new_grant()).await;
    let config = s.config.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(support::binary())
            .args(["status", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        matches!(out.status.code(), Some(0..=2)),
        "{:?}: {stderr}",
        out.status
    );
    drop(s.dir);
}

#[test]
fn the_command_documents_its_exit_codes() {
    let o = Command::new(support::binary())
        .args(["status", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--json") && help.contains("Exit 0"), "{help}");
}

/// The commands `/status` suggests name the file the process runs from (absolute), not a
/// placeholder, so an operator can paste them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suggested_command_names_this_processs_config_file() {
    let s = setup().await;
    support::seed_refresh_token(&s.yaml, "crm", &s.auth.new_grant()).await;
    s.auth.set_mode(testkit::FailureMode::InvalidGrantAlways);
    let mut relay = support::ChildProc::spawn(&s.config, &s.dir.path().join("log"), &[]);
    let admin = s.yaml.lines().next().unwrap();
    let port = admin.rsplit(':').next().unwrap().trim_end_matches(" }");
    let admin = format!("http://127.0.0.1:{port}");
    let healthz = format!("{admin}/healthz");
    let up = support::wait_ready(&healthz, std::time::Duration::from_secs(20)).await;
    assert!(up, "the instance did not start");
    let dead = support::eventually(std::time::Duration::from_secs(20), || async {
        let st = support::status_json(&admin).await;
        st["credentials"]["crm"]["state"] == "reauthorization_required"
    })
    .await;
    let st = support::status_json(&admin).await;
    relay.terminate();
    assert!(dead, "{st}");
    let action = st["credentials"]["crm"]["reauthorization_required"]["action"]
        .as_str()
        .unwrap()
        .to_owned();
    let expected = format!(
        "tokenrelay authorize --config {} --credential crm",
        s.config.display()
    );
    assert!(action.contains(&expected), "{action}");
    assert!(!action.contains("--config FILE"), "{action}");
}
