//! Token sinks (`credentials.<name>.sinks`): files that get each new access token, for
//! consumers that are not HTTP clients through the proxy. Against the demo authorization
//! server and API on loopback, with tokenrelay in-process or as a child process:
//!
//! - the files appear with their mode, hold the current token (the demo API accepts it),
//!   follow each rotation, and never hold a refresh token, for every grant family;
//! - a reader polling a file in a tight loop across many rotations never sees a partial
//!   or unparseable file;
//! - a sink that cannot be written is counted, shown on `/status` and logged (never the
//!   token), retried, and the proxy serves on;
//! - a changed sinks list applies on reload, and the old file is left in place;
//! - the config keys are validated with their key paths, and the schema knows them.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use support::{eventually, metric, metrics_text, status_json, ChildProc};
use testkit::AuthServerOptions;
use tokenrelay::config::Config;

const WITHIN: Duration = Duration::from_secs(30);

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The access token of a json sink file, when the file is there and whole.
fn json_token(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["access_token"].as_str().map(str::to_string)
}

/// Waits for a json sink file holding a token other than `not`; returns that token.
async fn next_json_token(path: &Path, not: Option<&str>) -> String {
    let mut seen = None;
    let ok = eventually(WITHIN, || {
        seen = json_token(path).filter(|t| Some(t.as_str()) != not);
        let found = seen.is_some();
        async move { found }
    })
    .await;
    assert!(ok, "{} never held a new token", path.display());
    seen.unwrap()
}

/// Whether the demo API accepts `token` as a bearer token.
async fn api_accepts(api_url: &str, token: &str) -> bool {
    let r = support::client()
        .get(format!("{api_url}/echo"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    r.status() == 200
}

/// Whether a request through the proxy listening on `port` is answered 200.
async fn proxy_serves(port: u16) -> bool {
    let r = support::client()
        .get(format!("http://127.0.0.1:{port}/echo"))
        .send()
        .await
        .unwrap();
    r.status() == 200
}

/// Every way a secret could be spelt in a file: as is, JSON-escaped, URL-encoded, in
/// base64 (standard and URL-safe, padded or not), and reversed.
fn spellings(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    vec![
        secret.to_string(),
        serde_json::to_string(secret)
            .unwrap()
            .trim_matches('"')
            .to_string(),
        form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
        b64.clone(),
        b64.trim_end_matches('=').to_string(),
        b64url,
        secret.chars().rev().collect(),
    ]
}

/// Asserts that no file in `dir` holds any spelling of any of `secrets`, nor names a
/// refresh token.
fn assert_no_refresh_token(dir: &Path, secrets: &BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // replaced while listing
        };
        assert!(
            !text.to_ascii_lowercase().contains("refresh"),
            "{}: {text}",
            path.display()
        );
        for secret in secrets {
            for spelling in spellings(secret) {
                assert!(
                    !text.contains(&spelling),
                    "{} holds a refresh token",
                    path.display()
                );
            }
        }
    }
}

/// The names in `dir`, once no write is in progress (no temporary file).
async fn settled_names(dir: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ok = eventually(WITHIN, || {
        names = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let settled = !names.iter().any(|n| n.ends_with(".tmp"));
        async move { settled }
    })
    .await;
    assert!(ok, "temporary files stay: {names:?}");
    names
}

fn sinks_yaml(indent: &str, sinks: &[String]) -> String {
    let mut out = format!("{indent}sinks:\n");
    for s in sinks {
        out += &format!("{indent}  - {s}\n");
    }
    out
}

/// Rotating refresh tokens (2 s access tokens, refreshed about once a second) with a
/// json, a raw and an env sink: each file appears with its mode (0600 by default),
/// holds the token the demo API accepts, follows each rotation, and never holds a
/// refresh token; `/status` and the metrics show the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_files_hold_the_current_token_and_follow_each_rotation() {
    let support::DemoServers { auth, api } = support::demo_servers(AuthServerOptions {
        access_ttl: Duration::from_secs(2),
        rotate_refresh_tokens: true,
        ..AuthServerOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let (json, raw, env) = (
        tokens.join("crm.json"),
        tokens.join("crm.token"),
        tokens.join("crm.env"),
    );
    let sinks = sinks_yaml(
        "    ",
        &[
            format!("{{ file: {}, format: json }}", json.display()),
            format!("{{ file: {} }}", raw.display()),
            format!("{{ file: {}, format: env, mode: \"0640\" }}", env.display()),
        ],
    );
    let yaml = support::quick_refresh_yaml(
        &auth.token_url(),
        &api.url(),
        &dir.path().join("state"),
        &sinks,
    );
    let seeded = auth.new_grant();
    support::seed_refresh_token(&yaml, "crm", &seeded).await;
    let mut refresh_tokens = BTreeSet::from([seeded]);
    let relay = support::start(&yaml).await;

    let first = next_json_token(&json, None).await;
    assert_eq!(mode_of(&json), 0o600);
    assert!(api_accepts(&api.url(), &first).await);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        doc.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["access_token", "expires_at", "token_type"]
    );
    assert_eq!(doc["token_type"], "Bearer");
    let expires = humantime::parse_rfc3339(doc["expires_at"].as_str().unwrap()).unwrap();
    let now = SystemTime::now();
    assert!(
        expires > now - Duration::from_secs(3) && expires <= now + Duration::from_secs(3),
        "{doc}"
    );

    // Every file follows the rotations; each token it holds works at the API.
    let mut previous = first;
    for _ in 0..3 {
        let next = next_json_token(&json, Some(&previous)).await;
        assert!(api_accepts(&api.url(), &next).await);
        if let Some(s) = support::stored_state(&yaml, "crm").await {
            refresh_tokens.extend(s.refresh_token.map(|t| t.expose().to_string()));
        }
        assert_no_refresh_token(&tokens, &refresh_tokens);
        previous = next;
    }
    let ok = eventually(WITHIN, || {
        let raw_text = std::fs::read_to_string(&raw).unwrap_or_default();
        let env_text = std::fs::read_to_string(&env).unwrap_or_default();
        let token = raw_text.trim_end().to_string();
        let ok = raw_text.ends_with('\n')
            && raw_text.lines().count() == 1
            && env_text.starts_with(&format!("ACCESS_TOKEN={token}\nACCESS_TOKEN_EXPIRES_AT="))
            && json_token(&json).as_deref() == Some(token.as_str());
        async move { ok }
    })
    .await;
    assert!(ok, "the raw, env and json files hold one token");
    let raw_token = std::fs::read_to_string(&raw)
        .unwrap()
        .trim_end()
        .to_string();
    assert!(api_accepts(&api.url(), &raw_token).await);
    assert_eq!(mode_of(&raw), 0o600);
    assert_eq!(mode_of(&env), 0o640);
    assert!(auth.stats().rotations >= 3);

    let status = status_json(&relay.admin_url("")).await;
    let shown = status["credentials"]["crm"]["sinks"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(shown.len(), 3, "{status:#}");
    for s in &shown {
        assert!(s["last_error"].is_null(), "{s}");
        assert!(s["last_write_at"].is_string(), "{s}");
        assert!(s["generation"].as_u64().unwrap() >= 4, "{s}");
    }
    assert_eq!(shown[0]["file"], json.display().to_string());
    assert_eq!(shown[0]["format"], "json");
    assert!(!status.to_string().contains(&raw_token));
    let metrics = metrics_text(&relay.admin_url("")).await;
    let writes = |result| {
        metric(
            &metrics,
            "tokenrelay_sink_writes_total",
            &[("credential", "crm"), ("result", result)],
        )
    };
    assert!(writes("success") >= 12.0, "{metrics}");
    assert_eq!(writes("failure"), 0.0);
    relay.stop().await;

    // Stopped: the files stay, whole, and nothing else is left in the directory.
    assert_eq!(
        settled_names(&tokens).await,
        BTreeSet::from(["crm.env".into(), "crm.json".into(), "crm.token".into()])
    );
    assert!(json_token(&json).is_some());
    if let Some(s) = support::stored_state(&yaml, "crm").await {
        refresh_tokens.extend(s.refresh_token.map(|t| t.expose().to_string()));
    }
    assert_no_refresh_token(&tokens, &refresh_tokens);
}

/// Every grant family publishes to its sinks: client_credentials and password (tokens
/// kept in memory) and static (no known expiry: `expires_at` is null, and the env file's
/// `ACCESS_TOKEN_EXPIRES_AT` is empty). The proxy serves with the same token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grant_writes_its_sinks() {
    let demo = support::demo_servers(AuthServerOptions::default()).await;
    let static_token = demo.auth.new_access_token();
    for grant in ["client_credentials", "password", "static"] {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("token.json");
        let env = dir.path().join("token.env");
        let credential = match grant {
            "static" => format!("grant: static, token: {static_token}"),
            "password" => format!(
                "grant: password, token_url: {}, client_id: demo-client, client_secret: demo-secret, username: {}, password: {}, allow_insecure_http: true",
                demo.auth.token_url(),
                AuthServerOptions::default().username,
                AuthServerOptions::default().password,
            ),
            _ => format!(
                "grant: client_credentials, token_url: {}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true",
                demo.auth.token_url()
            ),
        };
        let yaml = format!(
            "admin: {{ listen: 127.0.0.1:0 }}\ncredentials:\n  api: {{ {credential}, sinks: [{{ file: {}, format: json }}, {{ file: {}, format: env }}] }}\nupstreams:\n  api: {{ listen: 127.0.0.1:0, url: {}, credential: api, allow_insecure_http: true }}\n",
            json.display(),
            env.display(),
            demo.api.url()
        );
        let relay = support::start(&yaml).await;
        let token = next_json_token(&json, None).await;
        assert!(demo.auth.is_valid_access_token(&token), "{grant}");
        assert!(api_accepts(&demo.api.url(), &token).await, "{grant}");
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let env_text = std::fs::read_to_string(&env).unwrap();
        if grant == "static" {
            assert_eq!(token, static_token);
            assert!(doc["expires_at"].is_null(), "{doc}");
            assert!(
                env_text.ends_with("\nACCESS_TOKEN_EXPIRES_AT=\n"),
                "{grant}"
            );
        } else {
            assert!(doc["expires_at"].is_string(), "{doc}");
        }
        assert!(
            env_text.starts_with(&format!("ACCESS_TOKEN={token}\n")),
            "{grant}"
        );
        let r = support::client()
            .get(format!("{}/echo", relay.url("api")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{grant}");
        relay.stop().await;
    }
}

/// What a reader of a sink file saw.
#[derive(Default)]
struct Seen {
    reads: u64,
    tokens: BTreeSet<String>,
    /// Reads that found the file missing, empty, partial or unparseable (after it had
    /// first appeared), with a sample.
    torn: u64,
    sample: Option<String>,
}

/// Reads `path` in a tight loop until `stop`; `whole` says whether a content is whole
/// and gives its token.
fn poll(path: PathBuf, stop: Arc<AtomicBool>, whole: fn(&[u8]) -> Option<String>) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        let read = std::fs::read(&path);
        if seen.reads == 0 && read.is_err() {
            std::thread::yield_now();
            continue; // not there yet
        }
        seen.reads += 1;
        match read.as_deref().ok().and_then(whole) {
            Some(token) => {
                seen.tokens.insert(token);
            }
            None => {
                seen.torn += 1;
                seen.sample.get_or_insert_with(|| match &read {
                    Ok(bytes) => format!("{} bytes", bytes.len()),
                    Err(e) => e.to_string(),
                });
            }
        }
    }
    seen
}

fn whole_json(bytes: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    (v["token_type"] == "Bearer" && v["expires_at"].is_string()).then_some(())?;
    let token = v["access_token"].as_str().filter(|t| !t.is_empty())?;
    Some(token.to_string())
}

fn whole_raw(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let token = text.strip_suffix('\n')?;
    (!token.is_empty() && !token.contains('\n')).then(|| token.to_string())
}

/// A reader polling the files in a tight loop while the token changes many times (1 s
/// tokens refreshed after a tenth of their life) never sees a missing, empty, partial
/// or unparseable file: each file is replaced by a rename, never written in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_a_partial_file() {
    const ROTATIONS: usize = 40;
    let demo = support::demo_servers(AuthServerOptions {
        access_ttl: Duration::from_secs(1),
        ..AuthServerOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("token.json");
    let raw = dir.path().join("token");
    let yaml = support::one_upstream_yaml(
        &demo.auth.token_url(),
        &demo.api.url(),
        &format!(
            "refresh_at: 0.1, sinks: [{{ file: {}, format: json }}, {{ file: {} }}]",
            json.display(),
            raw.display()
        ),
        "",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let readers = [
        (json.clone(), whole_json as fn(&[u8]) -> Option<String>),
        (raw, whole_raw),
    ]
    .map(|(path, whole)| {
        let stop = stop.clone();
        std::thread::spawn(move || poll(path, stop, whole))
    });
    let relay = support::start(&yaml).await;
    let before = demo.auth.stats().token_requests;
    let ok = eventually(Duration::from_secs(90), || {
        let n = demo.auth.stats().token_requests - before;
        async move { n as usize > ROTATIONS }
    })
    .await;
    // The last token reaches the files too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = readers.map(|r| r.join().unwrap());
    relay.stop().await;
    assert!(ok, "{ROTATIONS} token requests within 90 s");
    for (name, s) in ["json", "raw"].iter().zip(&seen) {
        let summary = format!(
            "{name}: {} reads, {} distinct tokens, {} torn (first: {:?})",
            s.reads,
            s.tokens.len(),
            s.torn,
            s.sample
        );
        eprintln!("{summary}");
        assert_eq!(s.torn, 0, "a reader saw a partial file: {summary}");
        assert!(
            s.tokens.len() >= ROTATIONS / 2,
            "{name}: only {} tokens seen",
            s.tokens.len()
        );
        assert!(s.reads > 1000, "{name}: {} reads", s.reads);
    }
}

/// A sink whose directory is missing (or not a directory, or read-only when the test is
/// not root) does not stop anything: the credential is ready and the proxy serves, the
/// failed writes are counted and shown on `/status` per sink, the log says why (never
/// the token), and once the directory appears a retry writes the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_cannot_be_written_is_counted_shown_and_retried() {
    let demo = support::demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing/token.json");
    let blocked = dir.path().join("a-file/token.json");
    std::fs::write(dir.path().join("a-file"), "not a directory").unwrap();
    let read_only = dir.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root writes anyway: that case is left out for it.
    let enforced = std::fs::write(read_only.join("probe"), "").is_err();
    let mut files = vec![missing.clone(), blocked.clone()];
    if enforced {
        files.push(read_only.join("token.json"));
    }
    let [admin, port] = support::free_ports(2)[..] else {
        unreachable!()
    };
    let sinks: Vec<String> = files
        .iter()
        .map(|f| format!("{{ file: {}, format: json }}", f.display()))
        .collect();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\" }}\ncredentials:\n  api:\n    grant: client_credentials\n    token_url: {}\n    client_id: demo-client\n    client_secret: demo-secret\n    allow_insecure_http: true\n{}upstreams:\n  api: {{ listen: \"127.0.0.1:{port}\", url: {}, credential: api, allow_insecure_http: true }}\n",
        demo.auth.token_url(),
        sinks_yaml("    ", &sinks),
        demo.api.url()
    );
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, yaml).unwrap();
    let log = dir.path().join("tokenrelay.log");
    let _proc = ChildProc::spawn(&config, &log, &[]);
    let admin_url = format!("http://127.0.0.1:{admin}");
    assert!(
        support::wait_ready(&format!("{admin_url}/readyz"), WITHIN).await,
        "{}",
        support::log_tail(&log, 30)
    );

    assert!(proxy_serves(port).await);
    let shown_errors = || async {
        let s = status_json(&admin_url).await;
        s["credentials"]["api"]["sinks"]
            .as_array()
            .map(|a| a.iter().filter(|s| s["last_error"].is_string()).count())
            .unwrap_or(0)
    };
    let n = files.len();
    assert!(eventually(WITHIN, || async { shown_errors().await == n }).await);
    let status = status_json(&admin_url).await;
    let c = &status["credentials"]["api"];
    assert_eq!(c["state"], "ready", "{status:#}");
    let sinks_shown = c["sinks"].as_array().unwrap();
    assert!(
        sinks_shown[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{status:#}"
    );
    assert!(sinks_shown.iter().all(|s| s["last_write_at"].is_null()));
    let metrics = metrics_text(&admin_url).await;
    let failures = metric(
        &metrics,
        "tokenrelay_sink_writes_total",
        &[("credential", "api"), ("result", "failure")],
    );
    assert!(failures >= n as f64, "{failures}");

    // The log says which file and why, and never shows the token.
    let token = demo
        .api
        .last_request_headers()
        .into_iter()
        .find(|(h, _)| h == "authorization")
        .map(|(_, v)| v.trim_start_matches("Bearer ").to_string())
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cannot write the token sink"), "{text}");
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(!text.contains(&token), "the token is in the log");

    // The directory appears: a retry writes the current token, and the error is gone.
    std::fs::create_dir(dir.path().join("missing")).unwrap();
    let written = next_json_token(&missing, None).await;
    assert!(demo.auth.is_valid_access_token(&written));
    assert_eq!(mode_of(&missing), 0o600);
    assert!(
        eventually(WITHIN, || async {
            status_json(&admin_url).await["credentials"]["api"]["sinks"][0]["last_error"].is_null()
        })
        .await
    );
    assert!(proxy_serves(port).await);
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A changed sinks list applies on reload (SIGHUP) like any credential setting: the new
/// file is written, `/status` lists only it, and the old file is left in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_sinks_list_applies_on_reload() {
    let demo = support::demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.json"), dir.path().join("new.json"));
    let [admin, port] = support::free_ports(2)[..] else {
        unreachable!()
    };
    let yaml = |sink: &Path| {
        format!(
            "admin: {{ listen: \"127.0.0.1:{admin}\" }}\ncredentials:\n  api: {{ grant: client_credentials, token_url: {}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true, sinks: [{{ file: {}, format: json }}] }}\nupstreams:\n  api: {{ listen: \"127.0.0.1:{port}\", url: {}, credential: api, allow_insecure_http: true }}\n",
            demo.auth.token_url(),
            sink.display(),
            demo.api.url()
        )
    };
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, yaml(&old)).unwrap();
    let log = dir.path().join("tokenrelay.log");
    let proc = ChildProc::spawn(&config, &log, &[]);
    let admin_url = format!("http://127.0.0.1:{admin}");
    let first = next_json_token(&old, None).await;

    let next = dir.path().join("next.yaml");
    std::fs::write(&next, yaml(&new)).unwrap();
    std::fs::rename(&next, &config).unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(proc.child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let written = next_json_token(&new, None).await;
    assert!(demo.auth.is_valid_access_token(&written));
    let status = status_json(&admin_url).await;
    let shown = &status["credentials"]["api"]["sinks"];
    assert_eq!(shown.as_array().map(Vec::len), Some(1), "{status:#}");
    assert_eq!(shown[0]["file"], new.display().to_string());
    // The old file stays, holding what it held.
    assert!(json_token(&old).is_some_and(|t| t == first || t == written));
}

/// The config, or every problem as text.
fn parse(yaml: &str) -> Result<Config, tokenrelay::config::ConfigError> {
    Config::from_yaml(yaml, &|_| None)
}

fn credential_with(sinks: &str) -> String {
    format!(
        "credentials:\n  crm:\n    grant: client_credentials\n    token_url: https://auth.example.com/token\n    client_id: app\n    client_secret: s\n    sinks:\n{sinks}upstreams:\n  crm: {{ listen: 127.0.0.1:18081, url: https://api.example.com, credential: crm }}\n"
    )
}

/// The keys of a sink are checked, each problem with its key path: `file` an absolute
/// path (one credential per file), `format` raw/json/env, `mode` a quoted octal string
/// that others cannot write; a misspelt key gets "did you mean". A world-readable mode
/// and a missing directory are warnings.
#[test]
fn sinks_are_validated_with_their_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("crm.json");
    let cfg = parse(&credential_with(&format!(
        "      - {{ file: {}, format: env, mode: \"0640\" }}\n",
        good.display()
    )))
    .unwrap();
    let sink = &cfg.credentials["crm"].sinks[0];
    assert_eq!(sink.file, good);
    assert_eq!(sink.format, tokenrelay::config::SinkFormat::Env);
    assert_eq!(sink.mode.0, 0o640);
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
    let defaults = parse(&credential_with(&format!(
        "      - file: {}\n",
        good.display()
    )))
    .unwrap();
    let sink = &defaults.credentials["crm"].sinks[0];
    assert_eq!(
        (sink.format, sink.mode.0),
        (tokenrelay::config::SinkFormat::Raw, 0o600)
    );
    let shown = defaults.to_redacted_yaml();
    assert!(
        shown.contains("format: raw") && shown.contains("0600"),
        "{shown}"
    );

    for (sinks, path, mentions) in [
        (
            "      - { file: tokens/crm.json }\n",
            "credentials.crm.sinks[0].file",
            "absolute",
        ),
        (
            "      - { file: /run/t.json, format: yaml }\n",
            "credentials.crm.sinks[0].format",
            "raw",
        ),
        (
            "      - { file: /run/t.json, mode: \"0666\" }\n",
            "credentials.crm.sinks[0].mode",
            "every user",
        ),
        (
            "      - { file: /run/t.json, mode: 600 }\n",
            "credentials.crm.sinks[0].mode",
            "quoted",
        ),
        (
            "      - { file: /run/t.json, mode: \"rw\" }\n",
            "credentials.crm.sinks[0].mode",
            "octal",
        ),
        (
            "      - { file: /run/t.json, fromat: json }\n",
            "credentials.crm.sinks[0].fromat",
            "did you mean `format`",
        ),
        (
            "      - { format: json }\n",
            "credentials.crm.sinks[0]",
            "file",
        ),
        (
            "      - { file: /run/t.json }\n      - { file: /run/t.json }\n",
            "credentials.crm.sinks[1].file",
            "already a sink",
        ),
    ] {
        let err = parse(&credential_with(sinks)).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{path}: ")) && err.contains(mentions),
            "{sinks}: {err}"
        );
    }

    // Two credentials, one file.
    let two = credential_with("      - { file: /run/t.json }\n").replace(
        "upstreams:\n",
        "  other: { grant: client_credentials, token_url: https://auth.example.com/token, client_id: a, client_secret: s, sinks: [{ file: /run/t.json }] }\nupstreams:\n  other: { listen: 127.0.0.1:18082, url: https://api.example.com, credential: other }\n",
    );
    let err = parse(&two).unwrap_err().to_string();
    assert!(
        err.contains(
            "credentials.other.sinks[0].file: /run/t.json is already a sink of credential crm"
        ),
        "{err}"
    );

    let warned = parse(&credential_with(&format!(
        "      - {{ file: {}/absent/t.json, mode: \"0644\" }}\n",
        dir.path().display()
    )))
    .unwrap()
    .warnings();
    assert!(
        warned
            .iter()
            .any(|w| w.starts_with("credentials.crm.sinks[0].mode: ")
                && w.contains("every user of the machine read")),
        "{warned:?}"
    );
    assert!(
        warned
            .iter()
            .any(|w| w.starts_with("credentials.crm.sinks[0].file: ")
                && w.contains("does not exist")),
        "{warned:?}"
    );
}

/// `tokenrelay schema` describes sinks: `file` required, `format` one of three, `mode`
/// an octal string, nothing else.
#[test]
fn the_schema_describes_sinks() {
    let schema = Config::json_schema();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let with = |sink: &str| -> Value {
        serde_yaml::from_str(&format!(
            "credentials:\n  crm: {{ grant: client_credentials, sinks: [{sink}] }}\n"
        ))
        .unwrap()
    };
    assert!(validator.is_valid(&with("{ file: /run/t.json, format: json, mode: \"0600\" }")));
    for bad in [
        "{ format: json }",
        "{ file: /run/t.json, format: yaml }",
        "{ file: /run/t.json, mode: 600 }",
        "{ file: /run/t.json, mode: \"rw\" }",
        "{ file: /run/t.json, fromat: json }",
    ] {
        assert!(!validator.is_valid(&with(bad)), "{bad}");
    }
}

/// `config.example.yaml` documents sinks in a commented block of the `crm` credential;
/// uncommented, it is valid config and valid against the schema.
#[test]
fn the_example_configs_commented_sinks_are_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "    # sinks:")
        .expect("a commented sinks block");
    let end = start
        + lines[start..]
            .iter()
            .take_while(|l| l.starts_with("    # "))
            .count();
    let mut uncommented: Vec<String> = lines[..start].iter().map(|l| l.to_string()).collect();
    uncommented.extend(lines[start..end].iter().map(|l| format!("    {}", &l[6..])));
    uncommented.extend(lines[end..].iter().map(|l| l.to_string()));
    let yaml = uncommented.join("\n");
    let config = Config::from_yaml(&yaml, &|k| Some(format!("value-of-{k}")))
        .unwrap_or_else(|e| panic!("config.example.yaml with sinks:\n{e}"));
    let sinks = &config.credentials["crm"].sinks;
    assert_eq!(sinks.len(), 2);
    assert_eq!(sinks[0].file, Path::new("/run/tokens/crm.json"));
    assert_eq!(sinks[0].format, tokenrelay::config::SinkFormat::Json);
    assert_eq!(sinks[1].format, tokenrelay::config::SinkFormat::Env);
    let schema = Config::json_schema();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let value: Value = serde_yaml::from_str(&yaml).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}
