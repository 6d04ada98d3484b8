//! Live config reload: SIGHUP, `tokenrelay reload` and `--watch-config` (through a
//! Kubernetes-style ConfigMap symlink swap) on a real tokenrelay process, under load.
//! Upstreams are added, changed and removed without a failed request on the untouched
//! ones; an invalid file or a busy port changes nothing; unchanged credentials make no
//! token request; a changed credential keeps its stored refresh token unless its token
//! endpoint identity changed; `POST /reload` from IPv4-mapped loopback on a dual-stack
//! admin listener is a loopback reload.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{demo_servers, ChildProc, Load};
use testkit::{ApiServer, AuthServerOptions};

const WITHIN: Duration = Duration::from_secs(30);

fn sighup(p: &ChildProc) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(p.child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
}

/// `/status` of the process whose admin listener is on `admin_port`.
async fn status(admin_port: u16) -> serde_json::Value {
    support::status_json(&format!("http://127.0.0.1:{admin_port}")).await
}

/// Waits until the config generation reaches `generation`; returns the last reload.
async fn reloaded(admin_port: u16, generation: u64) -> serde_json::Value {
    let ok = support::eventually(WITHIN, || async move {
        status(admin_port).await["config"]["generation"] == generation
    })
    .await;
    let s = status(admin_port).await;
    assert!(
        ok,
        "config generation {generation} within {WITHIN:?}: {s:#}"
    );
    s["config"]["last_reload"].clone()
}

/// Waits until a failed reload is recorded.
/// Waits for credential `crm` to reach `state`; the `/status` body then.
async fn crm_state_becomes(admin_port: u16, state: &str) -> String {
    assert!(
        support::eventually(WITHIN, || async {
            status(admin_port).await["credentials"]["crm"]["state"] == state
        })
        .await,
        "{:#}",
        status(admin_port).await
    );
    status(admin_port).await.to_string()
}

async fn failed_reload(admin_port: u16) -> serde_json::Value {
    let ok = support::eventually(WITHIN, || async move {
        status(admin_port).await["config"]["last_reload"]["result"] == "failure"
    })
    .await;
    let s = status(admin_port).await;
    assert!(ok, "a failed reload within {WITHIN:?}: {s:#}");
    s["config"]["last_reload"].clone()
}

/// SIGTERM ends the process with exit code 0.
fn stops_cleanly(proc: &mut ChildProc) {
    assert_eq!(
        proc.terminate(),
        Some(0),
        "{}",
        support::log_tail(&proc.log, 30)
    );
}

/// `tokenrelay_config_reloads_total{result}` of the process at `admin_port`.
async fn reloads_counted(admin_port: u16, result: &str) -> f64 {
    let metrics = support::metrics_text(&format!("http://127.0.0.1:{admin_port}")).await;
    support::metric(
        &metrics,
        "tokenrelay_config_reloads_total",
        &[("result", result)],
    )
}

async fn get(url: &str) -> reqwest::Result<reqwest::Response> {
    support::client().get(url).send().await
}

/// The admin listener and `credentials` (YAML of the credential entries), up to the
/// `upstreams:` key.
fn head_yaml(admin: u16, credentials: &str) -> String {
    format!("admin: {{ listen: \"127.0.0.1:{admin}\" }}\ncredentials:\n{credentials}upstreams:\n")
}

fn credential_yaml(token_url: &str) -> String {
    named_credential_yaml("api", token_url)
}

fn named_credential_yaml(name: &str, token_url: &str) -> String {
    format!(
        r#"  {name}:
    grant: client_credentials
    token_url: "{token_url}"
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
"#
    )
}

fn upstream_yaml(name: &str, port: u16, url: &str, extra: &str) -> String {
    format!(
        "  {name}: {{ listen: \"127.0.0.1:{port}\", url: \"{url}\", credential: api, allow_insecure_http: true{extra} }}\n"
    )
}

fn write(path: &Path, text: &str) {
    // Write-then-rename, as editors and config management do: never a half file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_added_changed_and_removed_under_load_without_a_failed_request_or_token_request(
) {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let plain = ApiServer::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenrelay.yaml");
    let ports = support::free_ports(4);
    let (admin, pa, pb, pc) = (ports[0], ports[1], ports[2], ports[3]);
    let token_url = demo.auth.token_url();
    let head = head_yaml(
        admin,
        &(credential_yaml(&token_url) + &named_credential_yaml("other", &token_url)),
    );
    let api = demo.api.url();
    let v1 = format!(
        "{head}{}{}",
        upstream_yaml("a", pa, &api, ""),
        upstream_yaml("b", pb, &api, "").replace("credential: api", "credential: other")
    );
    write(&config, &v1);
    let mut proc = ChildProc::spawn(&config, &dir.path().join("log"), &[]);
    assert!(
        support::wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), WITHIN).await,
        "ready: {}",
        support::log_tail(&proc.log, 30)
    );
    let load = Load::start(
        vec![format!("http://127.0.0.1:{pa}/v1/echo")],
        4,
        Duration::from_millis(2),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // v2 (SIGHUP): add c (another API, another header format, same credential) and change
    // b's base path.
    let v2 = format!(
        "{head}{}{}{}",
        upstream_yaml("a", pa, &api, ""),
        upstream_yaml("b", pb, &format!("{api}/v1"), "")
            .replace("credential: api", "credential: other"),
        upstream_yaml(
            "c",
            pc,
            &plain.url(),
            ", header: X-Api-Key, format: \"Token {token}\""
        )
    );
    write(&config, &v2);
    sighup(&proc);
    let r = reloaded(admin, 2).await;
    assert_eq!(r["trigger"], "signal", "{r:#}");
    assert_eq!(r["changes"]["upstreams_added"], serde_json::json!(["c"]));
    assert_eq!(r["changes"]["upstreams_changed"], serde_json::json!(["b"]));
    assert_eq!(r["changes"]["credentials_changed"], serde_json::json!([]));
    // b now prefixes /v1: a request for /echo reaches the API's /v1/echo.
    let resp = get(&format!("http://127.0.0.1:{pb}/echo")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(demo.api.last_request().unwrap().uri, "/v1/echo");
    // c carries the unchanged credential's current token in its own format.
    let resp = get(&format!("http://127.0.0.1:{pc}/echo")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = plain.last_request_headers();
    let key = headers
        .iter()
        .find(|(n, _)| n == "x-api-key")
        .map(|(_, v)| v.clone())
        .expect("c sends X-Api-Key");
    let token = key.strip_prefix("Token ").expect("the Token format");
    assert!(demo.auth.is_valid_access_token(token));

    // v3 (`tokenrelay reload`): remove b and its credential.
    let head = head.replace(&named_credential_yaml("other", &token_url), "");
    let v3 = format!(
        "{head}{}{}",
        upstream_yaml("a", pa, &api, ""),
        upstream_yaml(
            "c",
            pc,
            &plain.url(),
            ", header: X-Api-Key, format: \"Token {token}\""
        )
    );
    write(&config, &v3);
    let out = support::cli(&["reload", "--config", config.to_str().unwrap()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("config generation 3"), "{stdout}");
    assert!(stdout.contains("upstreams removed: b"), "{stdout}");
    assert!(stdout.contains("credentials removed: other"), "{stdout}");
    let s = status(admin).await;
    assert!(s["credentials"].get("other").is_none(), "{s:#}");
    let metrics = support::metrics_text(&format!("http://127.0.0.1:{admin}")).await;
    for gauge in ["tokenrelay_credential_ready", "tokenrelay_credential_state"] {
        assert!(
            !metrics.contains(&format!("{gauge}{{credential=\"other\"")),
            "a removed credential's {gauge} is gone"
        );
    }
    assert!(
        support::eventually(WITHIN, || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", pb))
                .await
                .is_err()
        })
        .await,
        "b's port closes"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let report = load.stop().await;
    assert!(report.ok > 50, "{report:?}");
    assert_eq!(
        (
            report.server_errors,
            report.transport_errors,
            report.unauthorized,
            report.other
        ),
        (0, 0, 0, 0),
        "a stayed untouched: {report:?}"
    );
    // No credential changed: one token each served every reload.
    assert_eq!(demo.auth.stats().client_credentials, 2);
    assert_eq!(reloads_counted(admin, "success").await, 2.0);
    stops_cleanly(&mut proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_or_a_busy_port_changes_nothing_and_says_why() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenrelay.yaml");
    let ports = support::free_ports(3);
    let (admin, pa, pc) = (ports[0], ports[1], ports[2]);
    let head = head_yaml(admin, &credential_yaml(&demo.auth.token_url()));
    let api = demo.api.url();
    let v1 = format!("{head}{}", upstream_yaml("a", pa, &api, ""));
    write(&config, &v1);
    let mut proc = ChildProc::spawn(&config, &dir.path().join("log"), &[]);
    assert!(support::wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), WITHIN).await);

    // Invalid: a new upstream names a credential that does not exist.
    let bad = format!(
        "{}  c: {{ listen: \"127.0.0.1:{pc}\", url: \"{api}\", credential: nope, allow_insecure_http: true }}\n",
        v1
    );
    write(&config, &bad);
    sighup(&proc);
    let r = failed_reload(admin).await;
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("upstreams.c.credential"), "{error}");
    let s = status(admin).await;
    assert_eq!(s["config"]["generation"], 1);
    assert!(s["upstreams"].get("c").is_none(), "{s:#}");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", pc))
        .await
        .is_err());
    // `tokenrelay reload` checks the file first and refuses it with the same words.
    let out = support::cli(&["reload", "--config", config.to_str().unwrap()]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("upstreams.c.credential"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Valid but not applicable: c is fine, d's port is taken. Neither is applied.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pd = busy.local_addr().unwrap().port();
    let v2 = format!(
        "{v1}{}{}",
        upstream_yaml("c", pc, &api, ""),
        upstream_yaml("d", pd, &api, "")
    );
    write(&config, &v2);
    let out = support::cli(&["reload", "--config", config.to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("upstreams.d.listen"), "{stderr}");
    assert!(stderr.contains("running config is kept"), "{stderr}");
    let s = status(admin).await;
    assert_eq!(s["config"]["generation"], 1, "{s:#}");
    assert!(s["upstreams"].get("c").is_none(), "{s:#}");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", pc))
        .await
        .is_err());
    let resp = get(&format!("http://127.0.0.1:{pa}/v1/echo"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(reloads_counted(admin, "failure").await, 2.0);

    // A restart-only setting is reported and kept; the rest applies.
    drop(busy);
    let moved_admin = support::free_port();
    let v3 = v2.replace(
        &format!("127.0.0.1:{admin}"),
        &format!("127.0.0.1:{moved_admin}"),
    );
    write(&config, &v3);
    sighup(&proc);
    let r = reloaded(admin, 2).await;
    assert_eq!(r["restart_needed"], serde_json::json!(["admin"]), "{r:#}");
    assert_eq!(
        r["changes"]["upstreams_added"],
        serde_json::json!(["c", "d"])
    );
    assert_eq!(demo.auth.stats().client_credentials, 1);
    stops_cleanly(&mut proc);
}

/// Lays out `dir` as the kubelet does for a mounted ConfigMap: the file is a symlink to
/// `..data/<file>`, and `..data` a symlink to a timestamped directory. An update writes
/// a new directory and swaps `..data` atomically.
struct ConfigMapDir {
    dir: PathBuf,
    version: u32,
}

impl ConfigMapDir {
    fn new(dir: &Path, text: &str) -> ConfigMapDir {
        let mut m = ConfigMapDir {
            dir: dir.to_path_buf(),
            version: 0,
        };
        m.update(text);
        std::os::unix::fs::symlink("..data/tokenrelay.yaml", dir.join("tokenrelay.yaml")).unwrap();
        m
    }

    fn path(&self) -> PathBuf {
        self.dir.join("tokenrelay.yaml")
    }

    fn update(&mut self, text: &str) {
        let old = format!("..2026_12_02_{:02}", self.version);
        self.version += 1;
        let new = format!("..2026_12_02_{:02}", self.version);
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        std::fs::write(self.dir.join(&new).join("tokenrelay.yaml"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.dir.join(old));
    }
}

/// `tokenrelay run --watch-config --config <config>`, its log in `log`, once ready on
/// the admin port.
async fn run_watching(config: &Path, log: &Path, admin: u16) -> ChildProc {
    let file = std::fs::File::create(log).unwrap();
    let child = std::process::Command::new(support::binary())
        .args(["run", "--watch-config", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let proc = ChildProc {
        child,
        log: log.to_path_buf(),
    };
    assert!(support::wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), WITHIN).await);
    proc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_follows_a_configmap_symlink_swap() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_ports(3);
    let (admin, pa, pb) = (ports[0], ports[1], ports[2]);
    let head = head_yaml(admin, &credential_yaml(&demo.auth.token_url()));
    let api = demo.api.url();
    let mut map = ConfigMapDir::new(
        dir.path(),
        &format!("{head}{}", upstream_yaml("a", pa, &api, "")),
    );
    let mut proc = run_watching(&map.path(), &dir.path().join("log"), admin).await;

    map.update(&format!(
        "{head}{}{}",
        upstream_yaml("a", pa, &api, ""),
        upstream_yaml("b", pb, &api, "")
    ));
    let r = reloaded(admin, 2).await;
    assert_eq!(r["trigger"], "watch", "{r:#}");
    assert_eq!(r["changes"]["upstreams_added"], serde_json::json!(["b"]));
    let resp = get(&format!("http://127.0.0.1:{pb}/v1/echo"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A second swap (the old target directory is gone by now) is seen too.
    map.update(&format!("{head}{}", upstream_yaml("b", pb, &api, "")));
    let r = reloaded(admin, 3).await;
    assert_eq!(r["changes"]["upstreams_removed"], serde_json::json!(["a"]));
    assert_eq!(demo.auth.stats().client_credentials, 1);
    stops_cleanly(&mut proc);
}

fn rotating_yaml(
    admin: u16,
    port: u16,
    state: &Path,
    token_url: &str,
    api: &str,
    extra: &str,
) -> String {
    format!(
        r#"admin: {{ listen: "127.0.0.1:{admin}" }}
store: {{ type: file, path: "{state}" }}
credentials:
  crm:
    grant: refresh_token
    token_url: "{token_url}"
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
{extra}upstreams:
  crm: {{ listen: "127.0.0.1:{port}", url: "{api}", credential: crm, allow_insecure_http: true }}
"#,
        state = state.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_credential_keeps_its_stored_refresh_token_unless_its_identity_changed() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("tokenrelay.yaml");
    let ports = support::free_ports(2);
    let (admin, port) = (ports[0], ports[1]);
    let (token_url, api) = (demo.auth.token_url(), format!("{}/v1", demo.api.url()));
    let v1 = rotating_yaml(admin, port, &state, &token_url, &api, "");
    write(&config, &v1);
    support::seed_refresh_token(&v1, "crm", &demo.auth.new_grant()).await;
    let mut proc = ChildProc::spawn(&config, &dir.path().join("log"), &[]);
    assert!(support::wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), WITHIN).await);
    let url = format!("http://127.0.0.1:{port}/echo");
    assert_eq!(get(&url).await.unwrap().status(), 200);
    let before = demo.auth.stats();
    assert_eq!(before.refreshes, 1, "{before:?}");

    // Same token endpoint and client, other settings: the new refresher adopts the
    // stored token (no token request) and the refresh token stays in use.
    write(
        &config,
        &rotating_yaml(
            admin,
            port,
            &state,
            &token_url,
            &api,
            "    scopes: [leads]\n",
        ),
    );
    sighup(&proc);
    let r = reloaded(admin, 2).await;
    assert_eq!(
        r["changes"]["credentials_changed"],
        serde_json::json!(["crm"])
    );
    assert_eq!(
        r["changes"]["upstreams_changed"],
        serde_json::json!(["crm"])
    );
    assert!(
        support::eventually(WITHIN, || async {
            status(admin).await["credentials"]["crm"]["state"] == "ready"
        })
        .await
    );
    assert_eq!(get(&url).await.unwrap().status(), 200);
    let after = demo.auth.stats();
    assert_eq!(after.refreshes, before.refreshes, "{after:?}");
    assert_eq!(after.refresh_reuse_detected, 0);

    // Another client_id: the stored refresh token belongs to demo-client and is never
    // sent on behalf of another.
    let token_requests = demo.auth.stats().token_requests;
    write(
        &config,
        &rotating_yaml(admin, port, &state, &token_url, &api, "")
            .replace("client_id: demo-client", "client_id: other-client"),
    );
    sighup(&proc);
    reloaded(admin, 3).await;
    let body = crm_state_becomes(admin, "reauthorization_required").await;
    assert!(
        body.contains(r#"issued to client_id \"demo-client\""#),
        "{body}"
    );
    // Requests are refused rather than sent with a token of the old client.
    assert_ne!(get(&url).await.unwrap().status(), 200);
    assert_eq!(
        demo.auth.stats().token_requests,
        token_requests,
        "no token request without a new grant for the new client"
    );
    assert_eq!(demo.auth.stats().refreshes, before.refreshes);

    // Back to the client it was issued to by a reload (A → B → A): ready again with the
    // stored token, without a restart.
    write(&config, &v1);
    sighup(&proc);
    reloaded(admin, 4).await;
    crm_state_becomes(admin, "ready").await;
    assert_eq!(get(&url).await.unwrap().status(), 200);
    assert_eq!(demo.auth.stats().refresh_reuse_detected, 0);
    assert_eq!(demo.auth.stats().invalid_grant, 0);

    // And to the other client once more.
    write(
        &config,
        &rotating_yaml(admin, port, &state, &token_url, &api, "")
            .replace("client_id: demo-client", "client_id: other-client"),
    );
    sighup(&proc);
    reloaded(admin, 5).await;
    crm_state_becomes(admin, "reauthorization_required").await;
    let token_requests = demo.auth.stats().token_requests;
    stops_cleanly(&mut proc);

    // Restarted with the other client: the stored state says whom its refresh token was
    // issued to, so a fresh process does not send it either.
    let mut proc = ChildProc::spawn(&config, &dir.path().join("log2"), &[]);
    assert!(support::wait_ready(&format!("http://127.0.0.1:{admin}/healthz"), WITHIN).await);
    let body = crm_state_becomes(admin, "reauthorization_required").await;
    assert!(
        body.contains(r#"issued to client_id \"demo-client\""#),
        "{body}"
    );
    assert_ne!(get(&url).await.unwrap().status(), 200);
    assert_eq!(
        demo.auth.stats().token_requests,
        token_requests,
        "no token request for the other client after a restart"
    );
    stops_cleanly(&mut proc);

    // Back to the client it was issued to: used again, nothing was lost.
    write(&config, &v1);
    let mut proc = ChildProc::spawn(&config, &dir.path().join("log3"), &[]);
    assert!(support::wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), WITHIN).await);
    assert_eq!(get(&url).await.unwrap().status(), 200);
    assert_eq!(demo.auth.stats().refresh_reuse_detected, 0);
    assert_eq!(demo.auth.stats().invalid_grant, 0);
    stops_cleanly(&mut proc);
}

/// Upstream `name` in block style with its URL last, so that a file cut off mid-URL
/// still parses (and would send the token to another port).
fn upstream_yaml_url_last(name: &str, port: u16, url: &str) -> String {
    format!(
        "  {name}:\n    listen: \"127.0.0.1:{port}\"\n    credential: api\n    allow_insecure_http: true\n    url: {url}\n"
    )
}

/// A writer rewrites the config in place and stalls for 3 s mid-URL, holding the file
/// open: neither `--watch-config` nor a SIGHUP in the meantime applies the half that
/// parses; the whole file is applied once the writer closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_held_open_mid_write_is_never_applied() {
    use std::io::Write;
    let demo = demo_servers(AuthServerOptions::default()).await;
    let next_api = ApiServer::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenrelay.yaml");
    let ports = support::free_ports(3);
    let (admin, pa, pb) = (ports[0], ports[1], ports[2]);
    let head = head_yaml(admin, &credential_yaml(&demo.auth.token_url()));
    let a = upstream_yaml("a", pa, &demo.api.url(), "");
    write(
        &config,
        &format!(
            "{head}{a}{}",
            upstream_yaml_url_last("b", pb, &demo.api.url())
        ),
    );
    let mut proc = run_watching(&config, &dir.path().join("log"), admin).await;

    // b moves to the next API; the writer stalls with its port cut short.
    let whole = format!(
        "{head}{a}{}",
        upstream_yaml_url_last("b", pb, &next_api.url())
    );
    let cut = whole.len() - 2;
    let mut writer = std::fs::File::create(&config).unwrap();
    writer.write_all(&whole.as_bytes()[..cut]).unwrap();
    writer.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sighup(&proc);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = status(admin).await["config"].clone();
    writer.write_all(&whole.as_bytes()[cut..]).unwrap();
    drop(writer);
    assert_eq!(
        during["generation"], 1,
        "a half-written file was applied: {during:#}"
    );

    reloaded(admin, 2).await;
    let resp = get(&format!("http://127.0.0.1:{pb}/echo")).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", support::log_tail(&proc.log, 30));
    assert_eq!(next_api.stats().requests, 1, "b reaches the next API");
    assert_eq!(reloads_counted(admin, "failure").await, 0.0);
    stops_cleanly(&mut proc);
}

/// Reloads that change upstream `a` while apps keep sending on keep-alive connections:
/// every request already sent is answered (the old connection serves what it has read,
/// tells the app it closes, and closes), none fails. `general`: an upstream the general
/// engine serves (a token in the query) rather than the fast path.
async fn reloads_changing_an_upstream_under_keep_alive_load(general: bool) {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let plain = ApiServer::start(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenrelay.yaml");
    let ports = support::free_ports(2);
    let (admin, pa) = (ports[0], ports[1]);
    let head = head_yaml(admin, &credential_yaml(&demo.auth.token_url()));
    let engine = if general {
        ", token_query_param: access_token"
    } else {
        ""
    };
    let version = |n: u32| {
        let extra = format!("{engine}, timeout: {}s", 30 + n);
        format!("{head}{}", upstream_yaml("a", pa, &plain.url(), &extra))
    };
    write(&config, &version(0));
    let mut proc = ChildProc::spawn(&config, &dir.path().join("log"), &[]);
    assert!(support::wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), WITHIN).await);
    let load = Load::start(
        vec![format!("http://127.0.0.1:{pa}/echo")],
        8,
        Duration::ZERO,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1..=6 {
        write(&config, &version(n));
        sighup(&proc);
        let r = reloaded(admin, u64::from(n) + 1).await;
        assert_eq!(r["changes"]["upstreams_changed"], serde_json::json!(["a"]));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = load.stop().await;
    eprintln!("{report:?}");
    assert!(report.ok > 100, "{report:?}");
    assert_eq!(
        (report.transport_errors, report.server_errors, report.other),
        (0, 0, 0),
        "requests failed across reloads: {report:?}\n{}",
        support::log_tail(&proc.log, 20)
    );
    stops_cleanly(&mut proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_changing_an_upstream_fail_no_request_on_keep_alive_connections() {
    reloads_changing_an_upstream_under_keep_alive_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_changing_a_general_engine_upstream_fail_no_request_on_keep_alive_connections() {
    reloads_changing_an_upstream_under_keep_alive_load(true).await;
}

/// On a dual-stack admin listener (`[::]:PORT`) an IPv4 client on loopback arrives as
/// `::ffff:127.0.0.1`, as does an IPv6 client connecting to that mapped address: both are
/// loopback peers for `POST /reload`, like `::1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_from_ipv4_mapped_loopback_on_a_dual_stack_admin_listener_is_applied() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenrelay.yaml");
    let ports = support::free_ports(5);
    let (admin, pa) = (ports[0], ports[1]);
    let head = head_yaml(admin, &credential_yaml(&demo.auth.token_url())).replace(
        &format!("\"127.0.0.1:{admin}\""),
        &format!("\"[::]:{admin}\""),
    );
    let api = demo.api.url();
    let mut upstreams = upstream_yaml("a", pa, &api, "");
    write(&config, &format!("{head}{upstreams}"));
    let mut proc = ChildProc::spawn(&config, &dir.path().join("log"), &[]);
    assert!(support::wait_ready(&format!("http://127.0.0.1:{admin}/readyz"), WITHIN).await);

    // Each reload adds an upstream, so each is a new config generation.
    let peers = ["127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"];
    for (generation, (from, port)) in (2u64..).zip(peers.into_iter().zip(&ports[2..])) {
        upstreams += &upstream_yaml(&format!("u{generation}"), *port, &api, "");
        write(&config, &format!("{head}{upstreams}"));
        let resp = support::client()
            .post(format!("http://{from}:{admin}/reload"))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 200, "POST /reload from {from}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["result"], "success", "{body}");
        assert_eq!(v["generation"], generation, "{body}");
    }
    stops_cleanly(&mut proc);
}
