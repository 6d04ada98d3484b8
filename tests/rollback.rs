//! A restored older state file (a backup) never gets its spent refresh token sent.
//!
//! The file store keeps a generation high-water mark (`<credential>.generation`) next to
//! the state file; a state file older than the mark is reported as needing
//! re-authorization instead of being used. Each test rotates a credential against the
//! demo authorization server (2 s access tokens, rotating single-use refresh tokens with
//! reuse detection), restores a backup taken a few rotations earlier, and checks from the
//! provider's side that nothing was presented after the restore; then `seed` (or, in one
//! test, `authorize --code`) stores a new grant, which the running instance adopts
//! without a restart, and the mark follows it.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use support::{eventually, status_json};
use testkit::{ApiServer, AuthServer, AuthServerOptions, AuthStats};
use tokenrelay::config::Config;

/// Where `authorize --code` says the code was sent (no callback is served).
const REDIRECT_URI: &str = "http://127.0.0.1:9/callback";

struct Fixture {
    auth: AuthServer,
    // Kept alive for the proxy's upstream.
    _api: ApiServer,
    dir: tempfile::TempDir,
    yaml: String,
    config_path: PathBuf,
}

impl Fixture {
    async fn new(encrypted: bool) -> Fixture {
        Fixture::with_marks(encrypted, false).await
    }

    /// `second_mark`: the store also keeps its generation marks in `marks/`
    /// (`store.mark_path`), as on a second volume.
    async fn with_marks(encrypted: bool, second_mark: bool) -> Fixture {
        let auth = AuthServer::start(AuthServerOptions {
            access_ttl: Duration::from_secs(2),
            rotate_refresh_tokens: true,
            ..AuthServerOptions::default()
        })
        .await
        .unwrap();
        let api = ApiServer::start(Some(auth.validator())).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key = if encrypted {
            let path = dir.path().join("store.key");
            let key: [u8; 32] = rand::random();
            std::fs::write(&path, key).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            format!("  encryption_key_file: {}\n", path.display())
        } else {
            String::new()
        };
        let marks = if second_mark {
            format!("  mark_path: {}\n", dir.path().join("marks").display())
        } else {
            String::new()
        };
        let yaml = format!(
            "admin:
  listen: 127.0.0.1:0
store:
  type: file
  path: {state}
  poll_interval: 250ms
{key}{marks}credentials:
  crm:
    grant: refresh_token
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    redirect_uri: {REDIRECT_URI}
    allow_insecure_http: true
    refresh_before: 1s
    token_timeout: 2s
upstreams:
  crm:
    listen: 127.0.0.1:0
    url: {api}
    credential: crm
    allow_insecure_http: true
",
            state = dir.path().join("state").display(),
            token_url = auth.token_url(),
            api = api.url(),
        );
        let config_path = dir.path().join("tokenrelay.yaml");
        std::fs::write(&config_path, &yaml).unwrap();
        Fixture {
            auth,
            _api: api,
            dir,
            yaml,
            config_path,
        }
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state").join("crm.json")
    }

    fn mark_file(&self) -> PathBuf {
        self.dir.path().join("state").join("crm.generation")
    }

    /// The generation in the state file, read directly (the test's own view).
    fn file_generation(&self) -> u64 {
        generation_of(&std::fs::read(self.state_file()).unwrap())
    }

    /// The high-water mark, read directly.
    fn mark(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.mark_file()).ok()?;
        Some(text.trim().parse().expect("the mark is a number"))
    }

    /// `tokenrelay seed` with a new grant; returns the generation it reports.
    fn seed(&self) -> u64 {
        reported_generation(support::seed_cli(
            &self.config_path,
            "crm",
            &self.auth.new_grant(),
        ))
    }

    /// `tokenrelay authorize --code` with a new authorization code; returns the
    /// generation it reports.
    fn authorize(&self) -> u64 {
        let code = self.auth.new_authorization_code(REDIRECT_URI);
        reported_generation(support::run_cli(&[
            "authorize",
            "--config",
            self.config_path.to_str().unwrap(),
            "--credential",
            "crm",
            "--code",
            &code,
        ]))
    }

    /// Waits until the state file's generation reaches `at_least`.
    async fn wait_generation(&self, at_least: u64) -> u64 {
        let reached = eventually(Duration::from_secs(20), || async {
            self.file_generation() >= at_least
        })
        .await;
        assert!(reached, "no rotation to generation {at_least}");
        self.file_generation()
    }
}

/// The generation a successful `seed` or `authorize` reports storing.
fn reported_generation(out: std::process::Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = stdout
        .split("(generation ")
        .nth(1)
        .expect("the generation is named");
    after[..after.find(')').unwrap()].parse().unwrap()
}

fn generation_of(bytes: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    v["generation"].as_u64().unwrap()
}

/// The `reauthorization_required.reason` of credential `crm` in `/status`, if any.
fn reauthorization_reason(status: &serde_json::Value) -> Option<String> {
    status["credentials"]["crm"]["reauthorization_required"]["reason"]
        .as_str()
        .map(str::to_string)
}

async fn wait_for_reauthorization(admin: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = status_json(admin).await;
        if status["credentials"]["crm"]["state"] == "reauthorization_required" {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reauthorization_required: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_refused_as_rolled_back(status: &serde_json::Value, backup: u64, mark: u64) {
    let reason = reauthorization_reason(status).unwrap_or_default();
    assert!(reason.contains("older than"), "{status}");
    assert!(reason.contains(&format!("generation {backup}")), "{reason}");
    assert!(reason.contains(&format!("generation {mark}")), "{reason}");
    assert!(reason.contains("seed"), "says what to do: {reason}");
}

fn assert_nothing_presented_since(before: &AuthStats, after: &AuthStats) {
    assert_eq!(
        after.refresh_reuse_detected, 0,
        "a spent token was presented"
    );
    assert_eq!(after.invalid_grant, 0, "a refresh token was rejected");
    assert_eq!(
        after.refreshes, before.refreshes,
        "no refresh request after the restore"
    );
}

/// How a refused credential gets a new grant.
#[derive(Clone, Copy, Debug)]
enum Recovery {
    Seed,
    Authorize,
}

/// After the refusal, `seed` or `authorize` stores a new grant: the running instance
/// adopts it without a restart, serves again, and the mark follows the new generations.
async fn recover_and_expect_adoption(
    f: &Fixture,
    relay: &support::Running,
    mark: u64,
    how: Recovery,
) {
    let seeded = match how {
        Recovery::Seed => f.seed(),
        Recovery::Authorize => f.authorize(),
    };
    assert_eq!(
        seeded,
        mark + 1,
        "{how:?} writes the generation after the mark"
    );
    assert!(f.mark().unwrap() > mark, "{how:?} resets the mark");
    let admin = format!("http://{}", relay.admin);
    let ready = eventually(Duration::from_secs(15), || async {
        status_json(&admin).await["credentials"]["crm"]["state"] == "ready"
    })
    .await;
    assert!(ready, "new grant adopted: {}", status_json(&admin).await);
    let r = support::client()
        .get(format!("{}/echo", relay.url("crm")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let generation = f.wait_generation(seeded + 1).await;
    assert!(f.mark().unwrap() >= seeded);
    assert!(f.mark().unwrap() <= generation, "never ahead of the state");
}

/// How every restore test ends: the recovery `how` is adopted (as in
/// [`recover_and_expect_adoption`]), tokenrelay stops, and the authorization server
/// never saw a refresh token reused nor an invalid grant.
async fn recover_and_stop(f: &Fixture, relay: support::Running, mark: u64, how: Recovery) {
    recover_and_expect_adoption(f, &relay, mark, how).await;
    relay.stop().await;
    let stats = f.auth.stats();
    assert_eq!((stats.refresh_reuse_detected, stats.invalid_grant), (0, 0));
}

/// Starts tokenrelay on a restored store and waits until it refuses the backup (at
/// generation `backup`, the mark at `mark`); returns it and what `/status` says the
/// store can tell of restores.
async fn start_refusing_the_restore(
    f: &Fixture,
    backup: u64,
    mark: u64,
) -> (support::Running, String) {
    let relay = support::start(&f.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let status = wait_for_reauthorization(&admin).await;
    assert_refused_as_rolled_back(&status, backup, mark);
    let note = status["store_rollback_detection"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (relay, note)
}

/// Backup at generation N, further rotations to M, tokenrelay stopped, backup restored,
/// tokenrelay started: `reauthorization_required` naming both generations, and the
/// backup's (spent) refresh token never reaches the provider.
async fn restored_backup_at_startup(encrypted: bool, how: Recovery) {
    let f = Fixture::new(encrypted).await;
    f.seed();
    let relay = support::start(&f.yaml).await;
    f.wait_generation(3).await;
    let backup = std::fs::read(f.state_file()).unwrap();
    let backup_generation = generation_of(&backup);
    f.wait_generation(backup_generation + 2).await;
    relay.stop().await;
    let mark = f.file_generation();
    assert_eq!(f.mark(), Some(mark), "the mark follows every write");

    std::fs::write(f.state_file(), &backup).unwrap();
    let before = f.auth.stats();
    let out = support::run_cli(&["status", "--config", f.config_path.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("crm: reauthorization_required")
            && shown.contains(&format!(
                "the stored state (generation {backup_generation}) is older"
            )),
        "{shown}"
    );
    let (relay, note) = start_refusing_the_restore(&f, backup_generation, mark).await;
    // The limit is stated where the operator looks.
    assert!(
        note.contains("is not detected: set store.mark_path"),
        "{note}"
    );
    // Longer than an access token lives: still nothing sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = support::client()
        .get(format!("{}/echo", relay.url("crm")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_nothing_presented_since(&before, &f.auth.stats());
    assert_eq!(f.mark(), Some(mark), "the mark is not lowered");

    recover_and_stop(&f, relay, mark, how).await;
}

/// A whole-volume restore brings back the state file and its mark together, so the mark
/// beside it cannot tell; a second mark in `store.mark_path` (another volume) does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_volume_restore_is_refused_by_the_mark_on_another_volume() {
    let f = Fixture::with_marks(false, true).await;
    f.seed();
    let relay = support::start(&f.yaml).await;
    f.wait_generation(3).await;
    let backup = (
        std::fs::read(f.state_file()).unwrap(),
        std::fs::read(f.mark_file()).unwrap(),
    );
    let backup_generation = generation_of(&backup.0);
    f.wait_generation(backup_generation + 2).await;
    relay.stop().await;
    let mark = f.file_generation();
    let second = f.dir.path().join("marks").join("crm.generation");
    assert_eq!(
        std::fs::read_to_string(&second).unwrap().trim(),
        mark.to_string(),
        "the second mark follows every write"
    );

    // The state volume as it was: state file and mark together.
    std::fs::write(f.state_file(), &backup.0).unwrap();
    std::fs::write(f.mark_file(), &backup.1).unwrap();
    let before = f.auth.stats();
    let (relay, note) = start_refusing_the_restore(&f, backup_generation, mark).await;
    assert!(note.contains("whole restored state directory"), "{note}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_nothing_presented_since(&before, &f.auth.stats());
    recover_and_stop(&f, relay, mark, Recovery::Seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_backup_requires_reauthorization_and_spends_nothing() {
    restored_backup_at_startup(false, Recovery::Seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_encrypted_backup_requires_reauthorization_and_authorize_recovers() {
    restored_backup_at_startup(true, Recovery::Authorize).await;
}

/// The backup is restored under a running instance (holding the refresh lease while
/// copying, so no refresh is midway): its next refresh finds the older state and stops
/// there, without presenting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restored_under_a_running_instance_is_refused_at_its_next_refresh() {
    let f = Fixture::new(true).await;
    f.seed();
    let relay = support::start(&f.yaml).await;
    f.wait_generation(3).await;
    let backup = std::fs::read(f.state_file()).unwrap();
    let backup_generation = generation_of(&backup);
    f.wait_generation(backup_generation + 2).await;

    let store = tokenrelay::store::open(&parse(&f.yaml).store).unwrap();
    let lease = take_lease(store.as_ref()).await;
    let mark = f.file_generation();
    std::fs::write(f.state_file(), &backup).unwrap();
    let before = f.auth.stats();
    lease.release().await;

    let admin = format!("http://{}", relay.admin);
    let status = wait_for_reauthorization(&admin).await;
    assert_refused_as_rolled_back(&status, backup_generation, mark);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_nothing_presented_since(&before, &f.auth.stats());

    recover_and_stop(&f, relay, mark, Recovery::Seed).await;
}

fn parse(yaml: &str) -> Config {
    Config::from_yaml(yaml, &|_| None).unwrap()
}

async fn take_lease(store: &dyn tokenrelay::store::Store) -> Box<dyn tokenrelay::store::Lease> {
    for _ in 0..400 {
        if let Some(lease) = store
            .try_lease("crm", Duration::from_secs(30))
            .await
            .unwrap()
        {
            return lease;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the refresh lease stayed taken");
}
