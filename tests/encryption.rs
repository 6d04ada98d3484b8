//! Encryption at rest (`store.encryption_key_file`) and the file store's permissions,
//! through the real binary (`seed`, `status`, `run`) and the store API, against the demo
//! authorization server with rotating refresh tokens.
//!
//! Covered: a round trip (seed → run → rotations → restart) leaves no token in plaintext
//! on disk; a wrong key, a tampered file, an altered generation and a missing key are
//! clear errors that never lose or overwrite the stored refresh token; state files are
//! 0600 in a 0700 directory.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{status_json, wait_ready, ChildProc};
use testkit::{ApiServer, AuthServer, AuthServerOptions};
use tokenrelay::config::Config;
use tokenrelay::store::StoredState;

struct Fixture {
    auth: AuthServer,
    api: ApiServer,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let auth = AuthServer::start(AuthServerOptions {
            access_ttl: Duration::from_secs(2),
            rotate_refresh_tokens: true,
            ..AuthServerOptions::default()
        })
        .await
        .unwrap();
        let api = ApiServer::start(Some(auth.validator())).await.unwrap();
        Fixture {
            auth,
            api,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("private").join("state")
    }

    fn state_file(&self) -> PathBuf {
        self.state_dir().join("crm.json")
    }

    /// Writes a 32-byte key file: `hex` as `openssl rand -hex 32` prints it, else raw bytes
    /// as `head -c 32 /dev/urandom` writes them.
    fn key_file(&self, name: &str, hex: bool) -> PathBuf {
        let key: [u8; 32] = rand::random();
        let path = self.dir.path().join(name);
        if hex {
            let text: String = key.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&path, text + "\n").unwrap();
        } else {
            std::fs::write(&path, key).unwrap();
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// A config using `key` (or no encryption); ports 0 for in-process runs unless given.
    fn yaml(&self, key: Option<&Path>, ports: Option<(u16, u16)>) -> String {
        let (admin, listen) = ports.unwrap_or((0, 0));
        let key = key
            .map(|k| format!("  encryption_key_file: {}\n", k.display()))
            .unwrap_or_default();
        format!(
            "admin:
  listen: 127.0.0.1:{admin}
store:
  type: file
  path: {state}
{key}credentials:
  crm:
    grant: refresh_token
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
    refresh_before: 1s
    token_timeout: 2s
upstreams:
  crm:
    listen: 127.0.0.1:{listen}
    url: {api}
    credential: crm
    allow_insecure_http: true
",
            state = self.state_dir().display(),
            token_url = self.auth.token_url(),
            api = self.api.url(),
        )
    }

    fn write_config(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

fn seed(config: &Path, token: &str) -> std::process::Output {
    support::seed_cli(config, "crm", token)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn load(yaml: &str) -> Result<Option<StoredState>, String> {
    let cfg = Config::from_yaml(yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&cfg.store).unwrap();
    store.load("crm").await.map_err(|e| e.to_string())
}

fn envelope(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Asserts `bytes` contain none of `secrets`.
fn assert_absent(bytes: &[u8], secrets: &[&str], what: &str) {
    let text = String::from_utf8_lossy(bytes);
    for s in secrets {
        assert!(!s.is_empty());
        assert!(!text.contains(s), "{what} contains a token in plaintext");
    }
}

/// Seed, run the binary through several rotations, restart it: the state file is sealed
/// (AES-256-GCM, fresh nonce per write), holds no token in plaintext at any point, and
/// decrypts with the key to exactly the refresh token the provider considers live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_round_trip_keeps_no_token_in_plaintext() {
    let f = Fixture::new().await;
    let key = f.key_file("key.hex", true);
    let (admin, listen) = (support::free_port(), support::free_port());
    let yaml = f.yaml(Some(&key), Some((admin, listen)));
    let config = f.write_config("tokenrelay.yaml", &yaml);

    let first = f.auth.new_grant();
    let out = seed(&config, &first);
    assert!(out.status.success(), "{}", text(&out));
    let sealed = std::fs::read(f.state_file()).unwrap();
    assert_absent(&sealed, &[&first], "the seeded state file");
    let env = envelope(&f.state_file());
    assert_eq!(env["encrypted"]["alg"], "AES-256-GCM");
    assert!(env.get("state").is_none(), "no plaintext payload: {env}");
    let first_nonce = env["encrypted"]["nonce"].clone();

    let log = f.dir.path().join("run.log");
    let mut p = ChildProc::spawn(&config, &log, &[]);
    let admin_url = format!("http://127.0.0.1:{admin}");
    assert!(
        wait_ready(&format!("{admin_url}/readyz"), Duration::from_secs(15)).await,
        "{}",
        support::log_tail(&log, 30)
    );
    let c = support::client();
    let url = format!("http://127.0.0.1:{listen}/echo");
    let mut access_tokens = Vec::new();
    // 2 s tokens: about three rotations in 3.5 s. Check the file after each request.
    for _ in 0..14 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
        let auth_header = f
            .api
            .last_request_headers()
            .into_iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.trim_start_matches("Bearer ").to_string())
            .unwrap();
        access_tokens.push(auth_header);
        let bytes = std::fs::read(f.state_file()).unwrap();
        let secrets: Vec<&str> = access_tokens.iter().map(String::as_str).collect();
        assert_absent(&bytes, &secrets, "the state file");
        assert_absent(&bytes, &[&first], "the state file");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rotations = f.auth.stats().rotations;
    assert!(rotations >= 3, "rotated while running: {rotations}");
    let code = tokio::task::spawn_blocking(move || p.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));

    let state = load(&yaml).await.unwrap().expect("stored");
    let refresh = state.refresh_token.as_ref().unwrap().expose().to_string();
    let access = state.access_token.as_ref().unwrap().expose().to_string();
    assert!(
        f.auth.is_valid_refresh_token(&refresh),
        "decrypts to the live token"
    );
    let bytes = std::fs::read(f.state_file()).unwrap();
    assert_absent(&bytes, &[&refresh, &access, &first], "the final state file");
    let env = envelope(&f.state_file());
    assert_ne!(
        env["encrypted"]["nonce"], first_nonce,
        "a fresh nonce per write"
    );
    assert_eq!(env["generation"].as_u64(), Some(state.generation));

    // `status` decrypts with the key and prints no token.
    let out = support::run_cli(&["status", "--config", config.to_str().unwrap()]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains(&format!("{:<21} {}", "generation:", state.generation)));
    assert!(
        shown.contains(&format!("{:<21} stored", "refresh token:")),
        "{shown}"
    );
    assert_absent(shown.as_bytes(), &[&refresh, &access], "status output");
    let logged = std::fs::read(&log).unwrap();
    let secrets: Vec<&str> = access_tokens.iter().map(String::as_str).collect();
    assert_absent(&logged, &secrets, "the log");
    assert_absent(&logged, &[&refresh, &first], "the log");

    // A restart decrypts the stored pair and carries on.
    let mut p = ChildProc::spawn(&config, &log, &[]);
    assert!(wait_ready(&format!("{admin_url}/readyz"), Duration::from_secs(15)).await);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    let code = tokio::task::spawn_blocking(move || p.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let stats = f.auth.stats();
    assert_eq!(stats.refresh_reuse_detected, 0);
    assert_eq!(stats.invalid_grant, 0);
}

/// The store written with key A, read with key B: `status`, `seed` and `run` all say
/// clearly that the state cannot be decrypted; nobody overwrites the file or presents
/// anything to the token endpoint; with key A again everything works from the stored
/// refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_a_clear_error_and_loses_nothing() {
    let f = Fixture::new().await;
    let right = f.key_file("right.key", true);
    let wrong = f.key_file("wrong.key", false);
    let right_yaml = f.yaml(Some(&right), None);
    let wrong_yaml = f.yaml(Some(&wrong), None);
    let right_config = f.write_config("right.yaml", &right_yaml);
    let wrong_config = f.write_config("wrong.yaml", &wrong_yaml);
    let grant = f.auth.new_grant();
    assert!(seed(&right_config, &grant).status.success());
    let original = std::fs::read(f.state_file()).unwrap();

    let err = load(&wrong_yaml).await.unwrap_err();
    assert!(err.contains("cannot decrypt"), "{err}");
    assert!(err.contains("wrong encryption key"), "{err}");
    assert!(err.contains("crm"), "names the credential: {err}");

    let out = support::run_cli(&["status", "--config", wrong_config.to_str().unwrap()]);
    let shown = text(&out);
    assert!(
        shown.contains("cannot decrypt: wrong encryption key"),
        "{shown}"
    );
    assert_absent(shown.as_bytes(), &[&grant], "status output");

    let out = seed(&wrong_config, &f.auth.new_grant());
    assert!(
        !out.status.success(),
        "seed over an unreadable state refuses"
    );
    assert!(text(&out).contains("cannot decrypt"), "{}", text(&out));
    assert_eq!(std::fs::read(f.state_file()).unwrap(), original);

    let relay = support::start(&wrong_yaml).await;
    let admin = format!("http://{}", relay.admin);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = support::client();
    let r = c
        .get(format!("{}/echo", relay.url("crm")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let ready = c.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let status = status_json(&admin).await;
    let store_error = status["credentials"]["crm"]["store_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    relay.stop().await;
    assert!(
        store_error.contains("cannot decrypt: wrong encryption key"),
        "{status}"
    );
    assert_eq!(
        f.auth.stats().token_requests,
        0,
        "nothing sent to the token endpoint"
    );
    assert_eq!(
        std::fs::read(f.state_file()).unwrap(),
        original,
        "file untouched"
    );

    // The right key again: the stored refresh token was never lost.
    assert!(f.auth.is_valid_refresh_token(&grant));
    let relay = support::start(&right_yaml).await;
    let r = c
        .get(format!("{}/echo", relay.url("crm")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    relay.stop().await;
    // The stored token worked (a scheduled refresh of the 2 s token may follow while
    // the listener drains at shutdown).
    let stats = f.auth.stats();
    assert!(stats.refreshes >= 1, "{stats:?}");
    assert_eq!((stats.invalid_grant, stats.refresh_reuse_detected), (0, 0));
}

/// Altered ciphertext, an altered (cleartext) generation, an encrypted file without a key
/// and a file that is not a state file at all: each is a clear error naming the file, and
/// the running instance neither refreshes nor overwrites it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_file_is_a_clear_error() {
    let f = Fixture::new().await;
    let key = f.key_file("key", true);
    let yaml = f.yaml(Some(&key), None);
    let config = f.write_config("tokenrelay.yaml", &yaml);
    assert!(seed(&config, &f.auth.new_grant()).status.success());
    let original = envelope(&f.state_file());

    // One character of the ciphertext changed.
    let mut env = original.clone();
    let ct = env["encrypted"]["ciphertext"].as_str().unwrap().to_string();
    let mid = ct.len() / 2;
    let flipped = if &ct[mid..mid + 1] == "A" { "B" } else { "A" };
    env["encrypted"]["ciphertext"] = format!("{}{flipped}{}", &ct[..mid], &ct[mid + 1..]).into();
    let tampered = serde_json::to_vec_pretty(&env).unwrap();
    std::fs::write(f.state_file(), &tampered).unwrap();
    let err = load(&yaml).await.unwrap_err();
    assert!(err.contains("cannot decrypt"), "{err}");
    assert!(err.contains("altered"), "{err}");
    assert!(err.contains(&f.state_file().display().to_string()), "{err}");

    let out = support::run_cli(&["status", "--config", config.to_str().unwrap()]);
    assert!(text(&out).contains("cannot decrypt"), "{}", text(&out));

    let relay = support::start(&yaml).await;
    let admin = format!("http://{}", relay.admin);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = support::client();
    let r = c
        .get(format!("{}/echo", relay.url("crm")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let status = status_json(&admin).await;
    relay.stop().await;
    assert!(
        status["credentials"]["crm"]["store_error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot decrypt"),
        "{status}"
    );
    assert_eq!(f.auth.stats().token_requests, 0);
    assert_eq!(std::fs::read(f.state_file()).unwrap(), tampered);

    // The generation (in clear, bound into the AEAD) changed.
    let mut env = original.clone();
    env["generation"] = (original["generation"].as_u64().unwrap() + 1).into();
    std::fs::write(f.state_file(), serde_json::to_vec(&env).unwrap()).unwrap();
    let err = load(&yaml).await.unwrap_err();
    assert!(err.contains("cannot decrypt"), "{err}");

    // Encrypted state but no key configured.
    std::fs::write(f.state_file(), serde_json::to_vec(&original).unwrap()).unwrap();
    assert!(load(&yaml).await.unwrap().is_some(), "the original is fine");
    let err = load(&f.yaml(None, None)).await.unwrap_err();
    assert!(
        err.contains("encrypted but no store.encryption_key_file"),
        "{err}"
    );

    // Not a state file at all.
    std::fs::write(f.state_file(), b"refresh_token=oops\n").unwrap();
    let err = load(&yaml).await.unwrap_err();
    assert!(err.contains("not a tokenrelay state file"), "{err}");
    assert!(
        !err.contains("oops"),
        "errors never echo file content: {err}"
    );
}

/// The state directory is created 0700 and every file in it is 0600 — the state file
/// (after seeding and after rotations, i.e. after the rename of a fresh temp file), the
/// CAS lock and the lease file; no temp file is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_are_0600_in_a_0700_directory() {
    let f = Fixture::new().await;
    let yaml = f.yaml(None, None);
    let config = f.write_config("tokenrelay.yaml", &yaml);
    assert!(!f.state_dir().exists());
    assert!(seed(&config, &f.auth.new_grant()).status.success());
    assert_eq!(mode(&f.state_dir()), 0o700, "state directory");
    assert_eq!(
        mode(f.state_dir().parent().unwrap()),
        0o700,
        "created parent"
    );
    assert_eq!(mode(&f.state_file()), 0o600, "state file after seed");

    let relay = support::start(&yaml).await;
    let c = support::client();
    for _ in 0..12 {
        let r = c
            .get(format!("{}/echo", relay.url("crm")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    relay.stop().await;
    assert!(f.auth.stats().rotations >= 3);

    let mut names = Vec::new();
    for entry in std::fs::read_dir(f.state_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().to_string();
        assert_eq!(mode(&entry.path()), 0o600, "{name}");
        names.push(name);
    }
    names.sort();
    assert!(names.contains(&"crm.json".to_string()), "{names:?}");
    assert!(
        !names.iter().any(|n| n.contains(".tmp")),
        "no temp file left: {names:?}"
    );
    assert_eq!(mode(&f.state_dir()), 0o700);
}
