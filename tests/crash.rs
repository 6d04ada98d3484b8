//! tokenrelay as real child processes against the demo authorization server (2 s access
//! tokens, rotating single-use refresh tokens with reuse detection) running in this test
//! process: SIGKILL at random moments under load (including mid-refresh), several
//! processes sharing one file store directory, SIGTERM in the middle of a refresh, and a
//! store that refuses the rotated pair's write (nothing of it is served until it is
//! durable).
//!
//! Every test asserts the sacred promise from the provider's side: the authorization
//! server never saw a refresh token twice (`refresh_reuse_detected == 0`) and never
//! rejected one (`invalid_grant == 0`).
//!
//! The tests run one at a time (they measure timing on a small machine).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use support::{metric, metrics_text, wait_ready, ChildProc, Load, Relay};
use testkit::{ApiServer, AuthServer, AuthServerOptions, FailureMode};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Ports {
    admin: u16,
    listen: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            admin: support::free_port(),
            listen: support::free_port(),
        }
    }
    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listen)
    }
}

/// Writes the config of process `name` and returns its path.
fn write_config(dir: &Path, name: &str, token_url: &str, api_url: &str, ports: &Ports) -> PathBuf {
    let yaml = format!(
        "admin:
  listen: 127.0.0.1:{admin}
store:
  type: file
  path: {state}
runtime:
  instance_id: {name}
  shutdown_grace: 5s
credentials:
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
    url: {api_url}
    credential: crm
    allow_insecure_http: true
",
        admin = ports.admin,
        listen = ports.listen,
        state = state_dir(dir).display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn state_dir(dir: &Path) -> PathBuf {
    dir.join("state")
}

fn two_second_tokens() -> AuthServerOptions {
    AuthServerOptions {
        access_ttl: Duration::from_secs(2),
        rotate_refresh_tokens: true,
        ..AuthServerOptions::default()
    }
}

fn seed(config: &Path, auth: &AuthServer) {
    let out = support::seed_cli(config, "crm", &auth.new_grant());
    assert!(
        out.status.success(),
        "seed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stored generation and refresh token, read from the state file directly (the
/// test's own view, independent of tokenrelay's code).
fn stored(dir: &Path) -> Option<(u64, Option<String>)> {
    let bytes = std::fs::read(state_dir(dir).join("crm.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        v["generation"].as_u64()?,
        v["state"]["refresh_token"].as_str().map(str::to_string),
    ))
}

async fn ready(p: &ChildProc, ports: &Ports) {
    if !wait_ready(
        &format!("{}/readyz", ports.admin_url()),
        Duration::from_secs(15),
    )
    .await
    {
        panic!(
            "tokenrelay did not become ready; log:\n{}",
            support::log_tail(&p.log, 40)
        );
    }
}

async fn terminate(mut p: ChildProc) -> (ChildProc, Option<i32>) {
    tokio::task::spawn_blocking(move || {
        let code = p.terminate();
        (p, code)
    })
    .await
    .unwrap()
}

/// Polls the state file's generation every 2 ms on its own thread and records when it
/// changes (stopped on drop, so a failing test does not hang).
struct GenerationWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Instant>>>,
}

impl GenerationWatcher {
    fn start(dir: &Path) -> GenerationWatcher {
        let dir = dir.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut changes = Vec::new();
            let mut last = stored(&dir).map(|s| s.0);
            while !flag.load(Ordering::Relaxed) {
                let now = stored(&dir).map(|s| s.0);
                if now != last && now.is_some() {
                    changes.push(Instant::now());
                    last = now;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            changes
        });
        GenerationWatcher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops polling; returns when the generation changed.
    fn stop(mut self) -> Vec<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for GenerationWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where a kill landed, as measured at the token endpoint (through the relay) and in the
/// store afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// No token request in flight: between refreshes.
    Idle,
    /// Before tokenrelay had sent its startup token request.
    StartupBeforeRequest,
    /// A token request was in flight and the server had not processed it yet (it was
    /// still in its response delay): the server dropped it and rotated nothing.
    MidRefreshBeforeRotation,
    /// The server rotated, but the new pair was not durable yet: the refresh token in the
    /// store is dead. This is the one window no client can close (the answer exists only
    /// in the killed process's memory); the kill guard below keeps kills out of it.
    LossWindow,
}

/// SIGKILL tokenrelay at random moments under load, at least 20 times, restarting it each
/// time from the persisted state. Odd iterations slow the token endpoint down (300–500 ms
/// before it processes a request) and aim the kill into that delay, i.e. into a refresh
/// that is in flight (half of them into the first refresh after the start, without
/// waiting for readiness); the even ones kill at a random moment, either up to 2.5 s after
/// readiness or within 300 ms of the start.
///
/// Kills are kept out of the loss window (from the server's processing of a token request
/// to tokenrelay's durable write): a kill due within 60 ms of the server's processing or
/// within 300 ms after an answer came back is deferred until the answer is persisted.
/// Whether a kill nevertheless landed there is measured exactly afterwards (is the stored
/// refresh token still live at the server?) and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_loses_the_refresh_token() {
    let _serial = SERIAL.lock().await;
    const ITERATIONS: usize = 24;
    let auth = AuthServer::start(two_second_tokens()).await.unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let relay = Relay::start(auth.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(
        dir.path(),
        "crash",
        &format!("{}/oauth2/token", relay.url()),
        &api.url(),
        &ports,
    );
    seed(&config, &auth);
    let log = dir.path().join("crash.log");

    // Watch the state file's generation every 2 ms, to measure how long after an answer
    // arrives the new state is durable (the width of the loss window).
    let watcher = GenerationWatcher::start(dir.path());

    let load = Load::start(vec![ports.url("/api/v4/leads")], 16, Duration::ZERO);
    let mut rng = rand::thread_rng();
    let mut kills: Vec<(usize, Phase, bool)> = Vec::new();
    let mut loss_details = Vec::new();
    let mut child_ok_before_kill = 0u64;
    for i in 0..ITERATIONS {
        let slow = if i % 2 == 1 {
            Duration::from_millis(rng.gen_range(300..500))
        } else {
            Duration::ZERO
        };
        auth.set_mode(if slow.is_zero() {
            FailureMode::Normal
        } else {
            FailureMode::Slow(slow)
        });
        let requests_before = relay.requests().len();
        let mut p = ChildProc::spawn(&config, &log, &[]);
        // i % 4: 0 random moment after readiness; 1 into a refresh after readiness;
        // 2 random moment during startup; 3 into the first refresh after the start.
        let plan = i % 4;
        let startup_kill = plan >= 2;
        if plan == 2 {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
        } else {
            if plan < 2 {
                ready(&p, &ports).await;
            }
            let ok = load.snapshot().ok;
            if !slow.is_zero() {
                // Aim into a refresh: wait until its token request is in flight.
                let t0 = Instant::now();
                while relay.pending_since().is_none() && t0.elapsed() < Duration::from_secs(5) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let into = rng.gen_range(0..(slow.as_millis() as u64 - 80));
                tokio::time::sleep(Duration::from_millis(into)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(100..2500))).await;
            }
            child_ok_before_kill += load.snapshot().ok - ok;
        }
        // The guard: never kill close to the server's processing of a token request or
        // before an answer that came back is persisted.
        let mut deferred = false;
        let guard_start = Instant::now();
        loop {
            let now = Instant::now();
            let processing_soon = relay
                .pending_since()
                .is_some_and(|since| now - since + Duration::from_millis(60) >= slow);
            let answer_recent = relay
                .last_response()
                .is_some_and(|at| now - at < Duration::from_millis(300));
            if !(processing_soon || answer_recent) || guard_start.elapsed() > Duration::from_secs(5)
            {
                break;
            }
            deferred = true;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let in_flight = relay.pending_since().is_some();
        let sent_any = relay.requests().len() > requests_before;
        p.kill9();

        // Let the server settle (it drops a request whose client hung up), then check the
        // stored refresh token is still the live one.
        tokio::time::sleep(slow + Duration::from_millis(150)).await;
        let (generation, refresh) = stored(dir.path()).expect("state file");
        let live = refresh
            .as_deref()
            .is_some_and(|t| auth.is_valid_refresh_token(t));
        let phase = if !live {
            Phase::LossWindow
        } else if in_flight {
            Phase::MidRefreshBeforeRotation
        } else if startup_kill && !sent_any {
            Phase::StartupBeforeRequest
        } else {
            Phase::Idle
        };
        if phase == Phase::LossWindow {
            loss_details.push(format!(
                "iteration {i}: generation {generation}, token request in flight {in_flight}, \
                 last answer {:?} before the kill",
                relay.last_response().map(|t| t.elapsed())
            ));
            // Re-authorize so the remaining iterations still measure something; the
            // test fails below.
            seed(&config, &auth);
        }
        kills.push((i, phase, deferred));
    }

    // After the last kill: restart once more, serve, and stop cleanly.
    auth.set_mode(FailureMode::Normal);
    let p = ChildProc::spawn(&config, &log, &[]);
    ready(&p, &ports).await;
    let ok_before = load.snapshot().ok;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let final_ok = load.snapshot().ok - ok_before;
    let (p, code) = terminate(p).await;
    let report = load.stop().await;
    let changes = watcher.stop();
    let stats = auth.stats();

    // Width of the loss window: answer relayed → new state visible in the file.
    let responses = relay.responses();
    let mut widths: Vec<Duration> = changes
        .iter()
        .filter_map(|c| {
            responses
                .iter()
                .rev()
                .find(|r| *r <= c)
                .map(|r| *c - *r)
                .filter(|d| *d < Duration::from_secs(1))
        })
        .collect();
    widths.sort();
    let count = |ph: Phase| kills.iter().filter(|k| k.1 == ph).count();
    eprintln!(
        "crash loop: {ITERATIONS} SIGKILLs survived; phases: idle {}, startup before its token \
         request {}, mid-refresh before the server's rotation {}, loss window {}; deferred by \
         the guard {}; rotations {}, refreshes {}, reuse detected {}, invalid_grant {}; \
         clients: {} ok ({} while a child was up and before its kill, {} after the last \
         restart), {} 401, {} 5xx, {} transport errors (while down); answer → durable state \
         seen: median {:?}, max {:?} over {} rotations",
        count(Phase::Idle),
        count(Phase::StartupBeforeRequest),
        count(Phase::MidRefreshBeforeRotation),
        count(Phase::LossWindow),
        kills.iter().filter(|k| k.2).count(),
        stats.rotations,
        stats.refreshes,
        stats.refresh_reuse_detected,
        stats.invalid_grant,
        report.ok,
        child_ok_before_kill,
        final_ok,
        report.unauthorized,
        report.server_errors,
        report.transport_errors,
        widths.get(widths.len() / 2),
        widths.last(),
        widths.len(),
    );
    assert!(
        loss_details.is_empty(),
        "kills landed in the loss window: {loss_details:?}"
    );
    assert_eq!(
        stats.refresh_reuse_detected,
        0,
        "refresh token reused; log:\n{}",
        support::log_tail(&p.log, 60)
    );
    assert_eq!(stats.invalid_grant, 0, "a refresh token was rejected");
    assert_eq!(code, Some(0), "SIGTERM exits 0");
    assert!(
        count(Phase::MidRefreshBeforeRotation) >= 5,
        "enough kills mid-refresh: {kills:?}"
    );
    assert_eq!(report.unauthorized, 0, "{report:?}");
    assert_eq!(report.server_errors, 0, "{report:?}");
    assert!(final_ok > 100, "serves after the last restart");
    assert!(stats.rotations >= ITERATIONS as u64 / 2, "{stats:?}");
}

/// `n` tokenrelay processes share one file store directory under load for 15 s. Together
/// they refresh about as often as one process would (one refresh per rotation, ≈ one
/// rotation per second with 2 s tokens); the others adopt the rotated token from the
/// store; nobody reuses a refresh token, and every process keeps serving.
async fn processes_share_one_store(n: usize) {
    let _serial = SERIAL.lock().await;
    const DURATION: Duration = Duration::from_secs(15);
    let auth = AuthServer::start(two_second_tokens()).await.unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<Ports> = (0..n).map(|_| Ports::new()).collect();
    let configs: Vec<PathBuf> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            write_config(
                dir.path(),
                &format!("p{i}"),
                &auth.token_url(),
                &api.url(),
                p,
            )
        })
        .collect();
    seed(&configs[0], &auth);
    let procs: Vec<ChildProc> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| ChildProc::spawn(c, &dir.path().join(format!("p{i}.log")), &[]))
        .collect();
    for (p, ports) in procs.iter().zip(&ports) {
        ready(p, ports).await;
    }
    let startup = auth.stats();

    let before = auth.stats();
    let started = Instant::now();
    let load = Load::start(
        ports.iter().map(|p| p.url("/api/v4/leads")).collect(),
        32,
        Duration::ZERO,
    );
    tokio::time::sleep(DURATION).await;
    let report = load.stop().await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = auth.stats();
    let mut per_process = Vec::new();
    for p in &ports {
        let m = metrics_text(&p.admin_url()).await;
        let by = |result: &str| {
            metric(
                &m,
                "tokenrelay_token_refresh_total",
                &[("credential", "crm"), ("result", result)],
            )
        };
        per_process.push((by("success"), by("adopted"), by("failure")));
    }
    let mut codes = Vec::new();
    for p in procs {
        let (_, code) = terminate(p).await;
        codes.push(code);
    }

    let refreshes = after.refreshes - before.refreshes;
    let rotations = after.rotations - before.rotations;
    let expected = elapsed / 0.95;
    eprintln!(
        "{n} processes, one store, {elapsed:.1}s: {refreshes} refreshes, {rotations} rotations \
         (one process alone: ≈ {expected:.0}), {:.2} refreshes per rotation, fleet/single \
         ratio {:.2}; startup refreshes {}; reuse detected {}; per process (success, adopted, \
         failure) {per_process:?}; clients {} ok per process {:?}, {} 401, {} 5xx",
        refreshes as f64 / rotations.max(1) as f64,
        rotations as f64 / expected,
        startup.refreshes,
        after.refresh_reuse_detected,
        report.ok,
        report.ok_per_target,
        report.unauthorized,
        report.server_errors,
    );
    assert_eq!(after.refresh_reuse_detected, 0, "refresh token reused");
    assert_eq!(after.invalid_grant, 0, "a refresh token was rejected");
    assert_eq!(refreshes, rotations, "one refresh per rotation");
    let ratio = rotations as f64 / expected;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "{rotations} rotations in {elapsed:.1}s; a single process would do about {expected:.0}"
    );
    assert_eq!(report.unauthorized, 0, "{report:?}");
    assert_eq!(report.server_errors, 0, "{report:?}");
    let mean = report.ok as f64 / n as f64;
    for (i, ok) in report.ok_per_target.iter().enumerate() {
        assert!(
            *ok as f64 > mean * 0.2,
            "process {i} served only {ok} requests: {report:?}"
        );
    }
    let adopted: f64 = per_process.iter().map(|p| p.1).sum();
    assert!(
        adopted >= rotations as f64 * (n - 1) as f64 * 0.5,
        "the other processes adopt each rotation: {per_process:?}"
    );
    for (i, (success, adopted, _)) in per_process.iter().enumerate() {
        assert!(
            success + adopted >= rotations as f64 * 0.5,
            "process {i} follows the rotations: {per_process:?}"
        );
    }
    // Whoever refreshes, the others adopt (one process may win every race).
    let adopting = per_process.iter().filter(|p| p.1 >= 1.0).count();
    assert!(adopting >= n - 1, "processes adopting: {per_process:?}");
    assert!(codes.iter().all(|c| *c == Some(0)), "exit codes {codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_store() {
    processes_share_one_store(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_store() {
    processes_share_one_store(3).await;
}

/// SIGTERM while a refresh is in flight (the token endpoint takes 1 s): the process
/// finishes the refresh, persists the new pair, and exits 0; a restarted process carries
/// on from it without any reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_persists_the_new_token_and_exits_0() {
    let _serial = SERIAL.lock().await;
    let auth = AuthServer::start(AuthServerOptions {
        response_delay: Duration::from_secs(1),
        ..two_second_tokens()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let relay = Relay::start(auth.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(
        dir.path(),
        "term",
        &format!("{}/oauth2/token", relay.url()),
        &api.url(),
        &ports,
    );
    seed(&config, &auth);
    let log = dir.path().join("term.log");
    let p = ChildProc::spawn(&config, &log, &[]);
    ready(&p, &ports).await;
    let load = Load::start(vec![ports.url("/echo")], 8, Duration::from_millis(5));

    // Wait for the next scheduled refresh to be in flight, then SIGTERM right after.
    let t0 = Instant::now();
    while relay.pending_since().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(5), "no refresh started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (generation, _) = stored(dir.path()).unwrap();
    let rotations = auth.stats().rotations;
    let signalled = Instant::now();
    let (p, code) = terminate(p).await;
    let took = signalled.elapsed();
    let report = load.stop().await;

    let (new_generation, refresh) = stored(dir.path()).unwrap();
    let live = refresh
        .as_deref()
        .is_some_and(|t| auth.is_valid_refresh_token(t));
    eprintln!(
        "SIGTERM mid-refresh: exit {code:?} after {took:?}; generation {generation} → \
         {new_generation}; stored refresh token live {live}; clients {} ok, {} 401, {} 5xx",
        report.ok, report.unauthorized, report.server_errors
    );
    assert_eq!(
        code,
        Some(0),
        "exit code; log:\n{}",
        support::log_tail(&p.log, 30)
    );
    assert_eq!(
        auth.stats().rotations,
        rotations + 1,
        "the refresh completed"
    );
    assert_eq!(new_generation, generation + 1, "and was persisted");
    assert!(live, "the stored refresh token is the live one");
    assert!(
        took >= Duration::from_millis(700),
        "waited for the refresh: {took:?}"
    );
    assert_eq!(report.unauthorized, 0);
    assert_eq!(report.server_errors, 0, "{report:?}");

    // A restarted process continues from the persisted pair.
    let p = ChildProc::spawn(&config, &log, &[]);
    ready(&p, &ports).await;
    let c = support::client();
    for _ in 0..3 {
        assert_eq!(
            c.get(ports.url("/echo")).send().await.unwrap().status(),
            200
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    let (_, code) = terminate(p).await;
    assert_eq!(code, Some(0));
    let stats = auth.stats();
    assert_eq!(stats.refresh_reuse_detected, 0);
    assert_eq!(stats.invalid_grant, 0);
    assert!(stats.rotations >= rotations + 2, "kept rotating: {stats:?}");
}

/// The stored access token, read from the state file directly.
fn stored_access_token(dir: &Path) -> Option<String> {
    let bytes = std::fs::read(state_dir(dir).join("crm.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["state"]["access_token"].as_str().map(str::to_string)
}

/// The bearer token a request through the proxy carried, if it was answered `200`.
async fn served_token(c: &reqwest::Client, ports: &Ports) -> Option<String> {
    let resp = c.get(ports.url("/echo")).send().await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    let echo: serde_json::Value = resp.json().await.ok()?;
    echo["headers"]["authorization"][0]
        .as_str()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

/// The store refuses the write of a rotated pair (the credential's lock file is replaced
/// by a directory, so every compare-and-swap fails while reads and the lease still work):
/// the token endpoint has rotated, but until the new pair is durable nothing of it is
/// served. Every request answered meanwhile carried the stored access token (or got a
/// 503 once that expired); the pair is written once the store takes writes again, then
/// served, and no refresh token is ever presented twice. No timing in the verdict: a
/// token that is not the stored one is a failure whenever it is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_is_not_served_before_it_is_durable() {
    let _serial = SERIAL.lock().await;
    let auth = AuthServer::start(two_second_tokens()).await.unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(dir.path(), "refused", &auth.token_url(), &api.url(), &ports);
    seed(&config, &auth);
    let log = dir.path().join("refused.log");
    let p = ChildProc::spawn(&config, &log, &[]);
    ready(&p, &ports).await;
    let c = support::client();

    // Refuse writes: the compare-and-swap opens `crm.lock` for writing first.
    let lock = state_dir(dir.path()).join("crm.lock");
    std::fs::remove_file(&lock).expect("the lock file exists after the startup refresh");
    std::fs::create_dir(&lock).unwrap();
    let (generation, _) = stored(dir.path()).unwrap();
    let stored_token = stored_access_token(dir.path()).expect("an access token is stored");
    let rotations = auth.stats().rotations;

    // Until the token endpoint has rotated (at most one token lifetime away), and for as
    // long again after it, every answered request carries the stored token.
    let mut served = 0;
    let mut rotated_at = None;
    let t0 = Instant::now();
    loop {
        if rotated_at.is_none() && auth.stats().rotations > rotations {
            rotated_at = Some(Instant::now());
        }
        if rotated_at.is_some_and(|at| at.elapsed() > Duration::from_secs(2)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the token endpoint never rotated; log:\n{}",
            support::log_tail(&p.log, 30)
        );
        if let Some(token) = served_token(&c, &ports).await {
            assert!(
                token == stored_token,
                "a token was served that is not durable: the store still holds generation \
                 {generation} (it refuses writes), but the proxy sent another access token \
                 after {served} requests with the stored one; log:\n{}",
                support::log_tail(&p.log, 30)
            );
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stored(dir.path()).unwrap().0,
        generation,
        "written while the store refused writes?"
    );

    // The store takes writes again: the pair is written, then served.
    std::fs::remove_dir(&lock).unwrap();
    let durable = support::eventually(Duration::from_secs(15), || async {
        stored(dir.path()).is_some_and(|(g, _)| g > generation)
    })
    .await;
    assert!(
        durable,
        "never written; log:\n{}",
        support::log_tail(&p.log, 30)
    );
    let new_token = stored_access_token(dir.path()).unwrap();
    assert_ne!(new_token, stored_token);
    let serves_it = support::eventually(Duration::from_secs(15), || async {
        served_token(&c, &ports)
            .await
            .is_some_and(|t| t != stored_token)
    })
    .await;
    assert!(serves_it, "the written pair is not served");
    let (p, code) = terminate(p).await;
    let stats = auth.stats();
    eprintln!(
        "store refusing writes: {served} requests served with the stored token while the \
         rotated pair waited; generation {generation} -> {}; exit {code:?}",
        stored(dir.path()).unwrap().0
    );
    assert_eq!(code, Some(0), "{}", support::log_tail(&p.log, 30));
    assert_eq!(stats.refresh_reuse_detected, 0, "refresh token reused");
    assert_eq!(stats.invalid_grant, 0, "a refresh token was rejected");
}
