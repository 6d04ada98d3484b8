//! Several tokenrelay processes sharing one credential through a real Redis or etcd
//! store: `redis-server` and `etcd` processes started by the tests on free loopback ports
//! (temporary data directories, killed when the test ends), tokenrelay as child processes,
//! and the demo authorization server (rotating single-use refresh tokens with reuse
//! detection) in this test process.
//!
//! Covered, for Redis and for etcd where it applies:
//! - three replicas under concurrent load with 2 s tokens and a token endpoint that takes
//!   200 ms (so refreshes fall due while another replica's is in flight): no refresh token
//!   is ever presented twice, clients never see a 401 or 5xx, the fleet rotates about as
//!   often as one process would (one refresh per rotation, the others adopt), and every
//!   replica serves the newest token soon after each rotation (adoption latency, measured
//!   by polling every replica's `/status` every 50 ms, so ±50 ms);
//! - SIGKILL of the lease holder while its refresh is in flight at the token endpoint:
//!   the next process waits for the lease to expire (never earlier), takes over, and
//!   redeems the unspent refresh token;
//! - Redis down for 4.5 s under load (SIGKILL, restarted on the same port from its
//!   `appendfsync always` log): no client-visible error while the token is valid,
//!   `/status` says degraded, nothing stored is lost, and rotations resume by themselves;
//! - a three-member etcd cluster losing its leader (SIGKILL) under load: the replicas
//!   move on to the surviving members and stay healthy.
//! - kept token-answer fields (`instance_url`) written and read back whole by each
//!   backend.
//!
//! Each test prints its measurements (`--nocapture`); REPLICAS_SHOW_LOGS=1 adds the
//! replicas' logs. `scripts/test.sh` installs `redis-server` and `etcd` (listed in
//! `scripts/test-tools.txt`); run alone without them, the tests say so and skip, unless
//! TOKENRELAY_REQUIRE_TOOLS=1. The etcd tests need
//! the `etcd` cargo feature (`cargo test --features etcd --test replicas`).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(feature = "etcd")]
use support::stores::EtcdCluster;
use support::stores::RedisServer;
use support::{free_ports, metric, metrics_text, wait_ready, ChildProc, Load, LoadReport};
use testkit::{ApiServer, AuthServer, AuthServerOptions, AuthStats};

// ---------------------------------------------------------------------------------------
// Store processes (`RedisServer`, `EtcdCluster`: tests/support/stores.rs).
// ---------------------------------------------------------------------------------------

/// True if `name` is installed; otherwise the test skips (or fails under
/// TOKENRELAY_REQUIRE_TOOLS=1), see `support::tools`.
fn have_tool(name: &str) -> bool {
    support::tools::tool(name).is_some()
}

/// The `store:` section for a Redis server or etcd endpoints (poll interval 250 ms).
fn redis_store_yaml(url: &str) -> String {
    format!("  type: redis\n  url: {url}\n  poll_interval: 250ms\n")
}

#[cfg(feature = "etcd")]
fn etcd_store_yaml(endpoints: &[String]) -> String {
    format!(
        "  type: etcd\n  endpoints: [{}]\n  poll_interval: 250ms\n",
        endpoints.join(", ")
    )
}

// ---------------------------------------------------------------------------------------
// tokenrelay replicas.
// ---------------------------------------------------------------------------------------

/// Credential `crm` (rotating refresh token) and upstream `crm`, per replica.
struct ReplicaSpec<'a> {
    store_yaml: &'a str,
    token_url: &'a str,
    api_url: &'a str,
    token_timeout: &'a str,
}

/// One tokenrelay child process with its ports and config.
struct Replica {
    name: String,
    admin: u16,
    listen: u16,
    config: PathBuf,
    log: PathBuf,
    proc: Option<ChildProc>,
}

impl Replica {
    fn new(dir: &Path, name: &str, spec: &ReplicaSpec) -> Replica {
        let ports = free_ports(2);
        let yaml = format!(
            "admin:
  listen: 127.0.0.1:{admin}
store:
{store}runtime:
  instance_id: {name}
  shutdown_grace: 5s
credentials:
  crm:
    grant: refresh_token
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
    token_timeout: {token_timeout}
upstreams:
  crm:
    listen: 127.0.0.1:{listen}
    url: {api_url}
    credential: crm
    allow_insecure_http: true
",
            admin = ports[0],
            listen = ports[1],
            store = spec.store_yaml,
            token_url = spec.token_url,
            token_timeout = spec.token_timeout,
            api_url = spec.api_url,
        );
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, yaml).unwrap();
        Replica {
            name: name.to_string(),
            admin: ports[0],
            listen: ports[1],
            config,
            log: dir.join(format!("{name}.log")),
            proc: None,
        }
    }

    fn spawn(&mut self) {
        assert!(self.proc.is_none());
        self.proc = Some(ChildProc::spawn(&self.config, &self.log, &[]));
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listen)
    }

    async fn ready(&self, within: Duration) {
        if !wait_ready(&format!("{}/readyz", self.admin_url()), within).await {
            panic!(
                "{} did not become ready; log:\n{}",
                self.name,
                self.log_tail(40)
            );
        }
    }

    fn kill9(&mut self) {
        if let Some(p) = &mut self.proc {
            p.kill9();
        }
    }

    /// SIGTERM and wait; the exit code.
    async fn terminate(&mut self) -> Option<i32> {
        let mut p = self.proc.take()?;
        tokio::task::spawn_blocking(move || p.terminate())
            .await
            .unwrap()
    }

    fn log_tail(&self, lines: usize) -> String {
        support::log_tail(&self.log, lines)
    }

    /// (success, adopted, failure) refreshes from the replica's metrics.
    async fn refresh_counts(&self) -> (f64, f64, f64) {
        let m = metrics_text(&self.admin_url()).await;
        let by = |result: &str| {
            metric(
                &m,
                "tokenrelay_token_refresh_total",
                &[("credential", "crm"), ("result", result)],
            )
        };
        (by("success"), by("adopted"), by("failure"))
    }
}

/// `n` replicas named `<prefix><i>` sharing one seeded credential, all ready.
async fn start_fleet(
    n: usize,
    dir: &Path,
    prefix: &str,
    spec: &ReplicaSpec<'_>,
    auth: &AuthServer,
) -> Vec<Replica> {
    let mut replicas: Vec<Replica> = (0..n)
        .map(|i| Replica::new(dir, &format!("{prefix}{i}"), spec))
        .collect();
    seed(&replicas[0], auth);
    for r in &mut replicas {
        r.spawn();
    }
    for r in &replicas {
        r.ready(Duration::from_secs(20)).await;
    }
    replicas
}

fn seed(replica: &Replica, auth: &AuthServer) {
    let out = support::seed_cli(&replica.config, "crm", &auth.new_grant());
    assert!(
        out.status.success(),
        "seed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stored state of credential `crm`, read through the store API with `replica`'s
/// config.
async fn stored(replica: &Replica) -> Option<tokenrelay::store::StoredState> {
    store_of(replica).load("crm").await.unwrap()
}

/// The store `replica`'s config names, opened in this process.
fn store_of(replica: &Replica) -> Arc<dyn tokenrelay::store::Store> {
    let yaml = std::fs::read_to_string(&replica.config).unwrap();
    let config = tokenrelay::config::Config::from_yaml(&yaml, &|_| None).unwrap();
    tokenrelay::store::open(&config.store).unwrap()
}

fn rotating(access_ttl: Duration) -> AuthServerOptions {
    AuthServerOptions {
        access_ttl,
        rotate_refresh_tokens: true,
        ..AuthServerOptions::default()
    }
}

/// Prints every replica's log tail when REPLICAS_SHOW_LOGS is set.
fn show_logs(replicas: &[Replica]) {
    if std::env::var_os("REPLICAS_SHOW_LOGS").is_some() {
        eprintln!("{}", logs(replicas));
    }
}

/// Every log tail, for failure messages.
fn logs(replicas: &[Replica]) -> String {
    replicas
        .iter()
        .map(|r| format!("--- {} ---\n{}", r.name, r.log_tail(40)))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// `/status` polling and adoption latency.
// ---------------------------------------------------------------------------------------

/// One look at a replica's `/status` (the time is when the answer arrived).
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    /// `None` when the admin listener did not answer.
    generation: Option<u64>,
    state: String,
    store_error: bool,
}

/// Polls every replica's `/status` every 50 ms in the background.
struct StatusPoller {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Vec<Sample>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl StatusPoller {
    fn start(admins: Vec<String>) -> StatusPoller {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(vec![Vec::new(); admins.len()]));
        let tasks = admins
            .into_iter()
            .enumerate()
            .map(|(i, admin)| {
                let stop = stop.clone();
                let samples = samples.clone();
                let c = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .unwrap();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(50));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let v: Option<serde_json::Value> =
                            match c.get(format!("{admin}/status")).send().await {
                                Ok(r) => r.json().await.ok(),
                                Err(_) => None,
                            };
                        let crm = v.as_ref().map(|v| &v["credentials"]["crm"]);
                        let sample = Sample {
                            at: Instant::now(),
                            generation: crm.and_then(|c| c["generation"].as_u64()),
                            state: crm
                                .and_then(|c| c["state"].as_str())
                                .unwrap_or_default()
                                .to_string(),
                            store_error: crm.is_some_and(|c| !c["store_error"].is_null()),
                        };
                        samples.lock().unwrap()[i].push(sample);
                    }
                })
            })
            .collect();
        StatusPoller {
            stop,
            samples,
            tasks,
        }
    }

    /// The latest sample of every replica.
    fn latest(&self) -> Vec<Option<Sample>> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.last().cloned())
            .collect()
    }

    async fn stop(self) -> Vec<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let s = self.samples.lock().unwrap().clone();
        s
    }
}

/// How long each new generation took from first seen on any replica to seen on all.
#[derive(Debug, Default)]
struct Adoption {
    /// (generation, latency), for generations first seen while polling.
    latencies: Vec<(u64, Duration)>,
    /// Generations some replica never reached (first seen before `settled_by`).
    never: Vec<u64>,
}

impl Adoption {
    /// Generations first seen after `settled_by` are left out (the window may have
    /// closed before every replica had a chance).
    fn measure(samples: &[Vec<Sample>], settled_by: Instant) -> Adoption {
        let initial = samples
            .iter()
            .filter_map(|s| s.iter().find_map(|x| x.generation))
            .max()
            .unwrap_or(0);
        let newest = samples
            .iter()
            .flat_map(|s| s.iter().filter_map(|x| x.generation))
            .max()
            .unwrap_or(0);
        let mut out = Adoption::default();
        for g in initial + 1..=newest {
            // When each replica first served generation g or newer.
            let firsts: Vec<Option<Instant>> = samples
                .iter()
                .map(|s| {
                    s.iter()
                        .find(|x| x.generation.is_some_and(|x| x >= g))
                        .map(|x| x.at)
                })
                .collect();
            let Some(first_any) = firsts.iter().flatten().min().copied() else {
                continue;
            };
            if first_any > settled_by {
                continue;
            }
            if firsts.iter().any(Option::is_none) {
                out.never.push(g);
                continue;
            }
            let all = firsts.iter().flatten().max().copied().unwrap();
            out.latencies.push((g, all - first_any));
        }
        out
    }

    fn sorted(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.latencies.iter().map(|l| l.1).collect();
        v.sort();
        v
    }

    fn max(&self) -> Duration {
        self.sorted().last().copied().unwrap_or_default()
    }

    fn median(&self) -> Duration {
        let v = self.sorted();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
}

fn assert_clean_load(report: &LoadReport, replicas: &[Replica]) {
    assert_eq!(
        report.unauthorized,
        0,
        "clients saw 401: {report:?}\n{}",
        logs(replicas)
    );
    assert_eq!(
        report.server_errors,
        0,
        "clients saw 5xx: {report:?}\n{}",
        logs(replicas)
    );
    assert_eq!(report.transport_errors, 0, "transport errors: {report:?}");
    assert_eq!(report.other, 0, "unexpected statuses: {report:?}");
}

fn assert_no_reuse(stats: &AuthStats, replicas: &[Replica]) {
    assert_eq!(
        stats.refresh_reuse_detected,
        0,
        "a refresh token was presented twice: {stats:?}\n{}",
        logs(replicas)
    );
    assert_eq!(
        stats.invalid_grant,
        0,
        "a refresh token was rejected: {stats:?}\n{}",
        logs(replicas)
    );
}

// ---------------------------------------------------------------------------------------
// 1. Three replicas, one credential, concurrent load, 2 s tokens.
// ---------------------------------------------------------------------------------------

/// Three replicas share one credential through `store_yaml` under 16 concurrent clients
/// for 15 s with 2 s access tokens (refreshed about once a second). The token endpoint
/// takes 200 ms per request, longer than the replicas' schedules differ (jitter of at most
/// 100 ms), so their refreshes fall due while another one's is in flight: without mutual
/// exclusion two of them would present the same refresh token.
async fn three_replicas_under_load(backend: &str, store_yaml: &str) {
    const DURATION: Duration = Duration::from_secs(15);
    const N: usize = 3;
    const TOKEN_ENDPOINT_DELAY: Duration = Duration::from_millis(200);
    let auth = AuthServer::start(AuthServerOptions {
        response_delay: TOKEN_ENDPOINT_DELAY,
        ..rotating(Duration::from_secs(2))
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (token_url, api_url) = (auth.token_url(), api.url());
    let spec = ReplicaSpec {
        store_yaml,
        token_url: &token_url,
        api_url: &api_url,
        token_timeout: "1s",
    };
    let mut replicas = start_fleet(N, dir.path(), backend, &spec, &auth).await;

    let poller = StatusPoller::start(replicas.iter().map(Replica::admin_url).collect());
    let before = auth.stats();
    let started = Instant::now();
    let load = Load::start(
        replicas.iter().map(|r| r.url("/api/v4/leads")).collect(),
        16,
        Duration::from_millis(5),
    );
    tokio::time::sleep(DURATION).await;
    let report = load.stop().await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = auth.stats();
    let samples = poller.stop().await;
    let settled_by = Instant::now() - Duration::from_millis(1500);
    let mut per_process = Vec::new();
    for r in &replicas {
        per_process.push(r.refresh_counts().await);
    }
    let mut codes = Vec::new();
    for r in &mut replicas {
        codes.push(r.terminate().await);
    }

    let adoption = Adoption::measure(&samples, settled_by);
    show_logs(&replicas);
    let refreshes = after.refreshes - before.refreshes;
    let rotations = after.rotations - before.rotations;
    // One process alone: a 2 s token is refreshed 1 s before expiry, minus on average
    // 2.5 % of its lifetime of jitter, i.e. ≈ 0.95 s after the previous refresh ended,
    // and each refresh takes the token endpoint's delay.
    let expected = elapsed / (0.95 + TOKEN_ENDPOINT_DELAY.as_secs_f64());
    let ratio = rotations as f64 / expected;
    eprintln!(
        "{backend}: {N} replicas, {elapsed:.1}s under load: {rotations} rotations fleet-wide \
         (one process alone ≈ {expected:.1}; ratio {ratio:.2}), {:.2} refreshes per rotation, \
         reuse detected {}, invalid_grant {}; per replica (success, adopted, failure) \
         {per_process:?}; adoption latency over {} generations: median {:?}, max {:?}, \
         never adopted {:?}; clients {} ok {:?}, {} 401, {} 5xx, {} transport errors",
        refreshes as f64 / rotations.max(1) as f64,
        after.refresh_reuse_detected,
        after.invalid_grant,
        adoption.latencies.len(),
        adoption.median(),
        adoption.max(),
        adoption.never,
        report.ok,
        report.ok_per_target,
        report.unauthorized,
        report.server_errors,
        report.transport_errors,
    );
    assert_no_reuse(&after, &replicas);
    assert_eq!(refreshes, rotations, "one refresh per rotation");
    assert!(
        ratio <= 1.5,
        "{rotations} rotations in {elapsed:.1}s: the replicas do not coordinate (one process \
         alone would do ≈ {expected:.0}); per replica {per_process:?}"
    );
    assert!(
        ratio >= 0.5,
        "only {rotations} rotations in {elapsed:.1}s (expected ≈ {expected:.0})\n{}",
        logs(&replicas)
    );
    assert_clean_load(&report, &replicas);
    let mean = report.ok as f64 / N as f64;
    for (i, ok) in report.ok_per_target.iter().enumerate() {
        assert!(
            *ok as f64 > mean * 0.2,
            "replica {i} served only {ok} requests: {report:?}"
        );
    }
    let adopted: f64 = per_process.iter().map(|p| p.1).sum();
    assert!(
        adopted >= rotations as f64 * (N - 1) as f64 * 0.5,
        "the other replicas adopt each rotation: {per_process:?}"
    );
    assert!(
        adoption.never.is_empty(),
        "generations some replica never served: {:?}",
        adoption.never
    );
    assert!(
        adoption.latencies.len() as f64 >= rotations as f64 * 0.5,
        "too few generations observed ({}) for {rotations} rotations",
        adoption.latencies.len()
    );
    assert!(
        adoption.max() < Duration::from_secs(3),
        "a replica served a superseded token for {:?} after a rotation: {:?}",
        adoption.max(),
        adoption.latencies
    );
    assert!(codes.iter().all(|c| *c == Some(0)), "exit codes {codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_a_redis_store_under_load() {
    if !have_tool("redis-server") {
        return;
    }
    let redis = RedisServer::start().await;
    three_replicas_under_load("redis", &redis_store_yaml(&redis.url())).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_an_etcd_store_under_load() {
    if !have_tool("etcd") {
        return;
    }
    let etcd = EtcdCluster::start(1).await;
    three_replicas_under_load("etcd", &etcd_store_yaml(&etcd.endpoints())).await;
}

// ---------------------------------------------------------------------------------------
// 1a. Kept token-answer fields go through each backend with the token.
// ---------------------------------------------------------------------------------------

/// A state carrying `instance_url` (what a Salesforce answer leaves) is written and read
/// back whole through the backend, so a replica adopting it routes the same way.
async fn answer_fields_round_trip(store_yaml: &str) {
    let yaml = format!(
        "store:\n{store_yaml}credentials:\n  crm: {{ grant: refresh_token, token_url: https://login.example.com/token, client_id: i, client_secret: s }}\nupstreams:\n  crm: {{ listen: 127.0.0.1:0, url: \"{{token.instance_url}}/v1\", credential: crm }}\n"
    );
    let cfg = tokenrelay::config::Config::from_yaml(&yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&cfg.store).unwrap();
    let state = tokenrelay::store::StoredState {
        generation: 1,
        refresh_token: Some(tokenrelay::secret::Secret::new("rt")),
        updated_by: "test".into(),
        answer_fields: [(
            "instance_url".to_string(),
            "https://na1.example.com".to_string(),
        )]
        .into(),
        ..Default::default()
    };
    let outcome = store.compare_and_swap("crm", 0, &state).await.unwrap();
    assert_eq!(outcome, tokenrelay::store::CasOutcome::Swapped);
    assert_eq!(store.load("crm").await.unwrap(), Some(state));
}

#[tokio::test]
async fn answer_fields_round_trip_through_redis() {
    if !have_tool("redis-server") {
        return;
    }
    let redis = RedisServer::start().await;
    answer_fields_round_trip(&redis_store_yaml(&redis.url())).await;
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn answer_fields_round_trip_through_etcd() {
    if !have_tool("etcd") {
        return;
    }
    let etcd = EtcdCluster::start(1).await;
    answer_fields_round_trip(&etcd_store_yaml(&etcd.endpoints())).await;
}

// ---------------------------------------------------------------------------------------
// 1b. A token endpoint slower than the lease TTL: the lease is renewed while held.
// ---------------------------------------------------------------------------------------

/// Three replicas, `store.lease_ttl: 2s`, and a token endpoint that takes 3 s to answer:
/// with the lease as taken, the holder's lease would expire mid-request and another
/// replica would spend the same refresh token. Secured for the whole request before the
/// refresh token is sent (extended past the TTL) and renewed every third of the TTL, it
/// outlives the refresh: exactly one refresh per rotation, no reuse, no client-visible
/// error.
async fn slow_endpoint_outlasting_the_lease_ttl(backend: &str, store_yaml: &str) {
    const N: usize = 3;
    const DURATION: Duration = Duration::from_secs(22);
    let auth = AuthServer::start(AuthServerOptions {
        response_delay: Duration::from_secs(3),
        ..rotating(Duration::from_secs(10))
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (token_url, api_url) = (auth.token_url(), api.url());
    let store_yaml = format!("{store_yaml}  lease_ttl: 2s\n");
    let spec = ReplicaSpec {
        store_yaml: &store_yaml,
        token_url: &token_url,
        api_url: &api_url,
        token_timeout: "6s",
    };
    let mut replicas = start_fleet(N, dir.path(), backend, &spec, &auth).await;
    let before = auth.stats();
    let load = Load::start(
        replicas.iter().map(|r| r.url("/api/v4/leads")).collect(),
        6,
        Duration::from_millis(10),
    );
    tokio::time::sleep(DURATION).await;
    let report = load.stop().await;
    let after = auth.stats();
    let mut lost = 0.0;
    for r in &replicas {
        let m = metrics_text(&r.admin_url()).await;
        lost += metric(&m, "tokenrelay_refresh_lease_lost_total", &[]);
    }
    for r in &mut replicas {
        r.terminate().await;
    }
    show_logs(&replicas);
    let refreshes = after.refreshes - before.refreshes;
    let rotations = after.rotations - before.rotations;
    eprintln!(
        "{backend}: lease_ttl 2s, token endpoint 3s: {rotations} rotations, {refreshes} refreshes, \
         reuse detected {}, leases lost {lost}; clients {} ok, {} 401, {} 5xx",
        after.refresh_reuse_detected, report.ok, report.unauthorized, report.server_errors
    );
    assert_no_reuse(&after, &replicas);
    assert!(rotations >= 2, "too few rotations ({rotations}) to tell");
    assert_eq!(refreshes, rotations, "one refresh per rotation");
    assert_eq!(lost, 0.0, "a lease was lost although its store was up");
    assert_eq!(report.server_errors + report.unauthorized, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_lease_outlasts_a_slow_token_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "  type: file\n  path: {}\n  poll_interval: 250ms\n",
        dir.path().display()
    );
    slow_endpoint_outlasting_the_lease_ttl("file", &yaml).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_is_renewed_while_a_slow_refresh_holds_it() {
    if !have_tool("redis-server") {
        return;
    }
    let redis = RedisServer::start().await;
    slow_endpoint_outlasting_the_lease_ttl("redis", &redis_store_yaml(&redis.url())).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lease_is_renewed_while_a_slow_refresh_holds_it() {
    if !have_tool("etcd") {
        return;
    }
    let etcd = EtcdCluster::start(1).await;
    slow_endpoint_outlasting_the_lease_ttl("etcd", &etcd_store_yaml(&etcd.endpoints())).await;
}

// ---------------------------------------------------------------------------------------
// 2. The lease holder is SIGKILLed while its refresh is in flight.
// ---------------------------------------------------------------------------------------

/// Process A starts alone; its startup refresh takes the lease and waits 3 s at the token
/// endpoint (which processes a request only after the delay, so a request whose client
/// dies consumes nothing). A is SIGKILLed 1 s into that delay and B starts at once. B must not
/// send the refresh token before A's lease has expired, must take over right after, and
/// must redeem the refresh token A never spent.
async fn lease_holder_killed_mid_refresh(backend: &str, store_yaml: &str) {
    const DELAY: Duration = Duration::from_secs(3);
    const TOKEN_TIMEOUT: Duration = Duration::from_secs(4);
    let ttl = tokenrelay::lease_ttl(TOKEN_TIMEOUT);
    let auth = AuthServer::start(rotating(Duration::from_secs(10)))
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let relay = support::Relay::start(auth.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_url = format!("{}/oauth2/token", relay.url());
    let api_url = api.url();
    let spec = ReplicaSpec {
        store_yaml,
        token_url: &token_url,
        api_url: &api_url,
        token_timeout: "4s",
    };
    let mut a = Replica::new(dir.path(), &format!("{backend}-a"), &spec);
    let mut b = Replica::new(dir.path(), &format!("{backend}-b"), &spec);
    seed(&a, &auth);
    let seeded_generation = stored(&a).await.expect("seeded").generation;

    auth.set_mode(testkit::FailureMode::Slow(DELAY));
    let a_spawned = Instant::now();
    a.spawn();
    let t0 = Instant::now();
    while relay.pending_since().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "A sent no token request; log:\n{}",
            a.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let a_request = relay.pending_since().unwrap();
    tokio::time::sleep_until((a_request + Duration::from_secs(1)).into()).await;
    assert!(
        relay.pending_since().is_some(),
        "A's token request is still in flight"
    );
    a.kill9();
    let killed = Instant::now();
    // B starts at once and contends for the lease A's corpse still holds.
    auth.set_mode(testkit::FailureMode::Normal);
    let b_spawned = Instant::now();
    b.spawn();
    b.ready(ttl + Duration::from_secs(15)).await;
    let b_ready = Instant::now();
    let status = support::client()
        .get(b.url("/api/v4/leads"))
        .send()
        .await
        .unwrap()
        .status();
    let requests = relay.requests();
    let stats = auth.stats();
    let state = stored(&b).await.expect("state");
    let code = b.terminate().await;

    let b_request = *requests.get(1).expect("B sent a token request");
    let earliest_expiry = a_spawned + ttl;
    eprintln!(
        "{backend}: lease holder SIGKILLed {:?} into its refresh; lease TTL {ttl:?}; B started \
         {:?} after the kill, sent its token request {:?} after A's (lease expired at the \
         earliest {:?} after A's), ready {:?} after the kill; token requests {}, rotations {}, \
         reuse detected {}; generation {seeded_generation} → {}",
        killed - a_request,
        b_spawned - killed,
        b_request - a_request,
        earliest_expiry.saturating_duration_since(a_request),
        b_ready - killed,
        requests.len(),
        stats.rotations,
        stats.refresh_reuse_detected,
        state.generation,
    );
    assert_no_reuse(&stats, std::slice::from_ref(&b));
    assert!(
        b_request + Duration::from_millis(100) >= earliest_expiry,
        "B sent the refresh token {:?} before A's lease could have expired",
        earliest_expiry - b_request
    );
    assert!(
        b_request <= a_request + ttl + Duration::from_secs(3),
        "B took over only {:?} after A's request (lease TTL {ttl:?}); log:\n{}",
        b_request - a_request,
        b.log_tail(30)
    );
    assert_eq!(requests.len(), 2, "A's request and B's");
    assert_eq!(
        (stats.refreshes, stats.rotations),
        (1, 1),
        "the server dropped A's request unprocessed; B redeemed the refresh token A never spent"
    );
    assert_eq!(status, 200, "B serves");
    assert_eq!(
        state.generation,
        seeded_generation + 1,
        "B's rotation is stored"
    );
    assert!(state
        .refresh_token
        .as_ref()
        .is_some_and(|t| auth.is_valid_refresh_token(t.expose())));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_holder_killed_mid_refresh_is_taken_over_after_the_ttl() {
    if !have_tool("redis-server") {
        return;
    }
    let redis = RedisServer::start().await;
    lease_holder_killed_mid_refresh("redis", &redis_store_yaml(&redis.url())).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lease_holder_killed_mid_refresh_is_taken_over_after_the_ttl() {
    if !have_tool("etcd") {
        return;
    }
    let etcd = EtcdCluster::start(1).await;
    lease_holder_killed_mid_refresh("etcd", &etcd_store_yaml(&etcd.endpoints())).await;
}

// ---------------------------------------------------------------------------------------
// 3. Redis down for a while under load.
// ---------------------------------------------------------------------------------------

/// Two replicas, 14 s tokens (refreshed 6.3–7 s in, usable until 12 s), Redis SIGKILLed
/// 3 s after the startup refresh and restarted 4.5 s later on the same port: the
/// scheduled refresh falls into the outage and fails, the token stays valid, clients see
/// nothing; `/status` says degraded meanwhile; afterwards the refresh succeeds without
/// anyone's help, and nothing written before the kill is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_under_load_degrades_and_recovers() {
    if !have_tool("redis-server") {
        return;
    }
    const N: usize = 2;
    const OUTAGE: Duration = Duration::from_millis(4500);
    let mut redis = RedisServer::start().await;
    let auth = AuthServer::start(rotating(Duration::from_secs(14)))
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (token_url, api_url, store_yaml) =
        (auth.token_url(), api.url(), redis_store_yaml(&redis.url()));
    let spec = ReplicaSpec {
        store_yaml: &store_yaml,
        token_url: &token_url,
        api_url: &api_url,
        token_timeout: "1s",
    };
    let mut replicas = start_fleet(N, dir.path(), "outage", &spec, &auth).await;
    let startup_refresh = auth.requests_log().last().expect("startup refresh").at;
    let poller = StatusPoller::start(replicas.iter().map(Replica::admin_url).collect());
    let load = Load::start(
        replicas.iter().map(|r| r.url("/api/v4/leads")).collect(),
        8,
        Duration::from_millis(5),
    );

    tokio::time::sleep_until((startup_refresh + Duration::from_secs(3)).into()).await;
    let generation_before = stored(&replicas[0]).await.expect("state").generation;
    let rotations_before = auth.stats().rotations;
    redis.kill9();
    let down = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    let rotations_during = auth.stats().rotations - rotations_before;
    let errors_during = load.snapshot();
    redis.spawn().await;
    let up = Instant::now();
    let persisted = stored(&replicas[0])
        .await
        .expect("state survived")
        .generation;

    // Recovery: every replica serves a newer generation and is ready (not degraded) again.
    let recovered = support::eventually(Duration::from_secs(20), || {
        let latest = poller.latest();
        async move {
            latest.iter().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s.generation.is_some_and(|g| g > generation_before)
                        && s.state == "ready"
                        && !s.store_error
                })
            })
        }
    })
    .await;
    let recovered_after = up.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.stop().await;
    let samples = poller.stop().await;
    let stats = auth.stats();
    let stored_after = stored(&replicas[0]).await.expect("state");
    let mut per_process = Vec::new();
    for r in &replicas {
        per_process.push(r.refresh_counts().await);
    }
    let mut codes = Vec::new();
    for r in &mut replicas {
        codes.push(r.terminate().await);
    }

    show_logs(&replicas);
    let degraded: Vec<bool> = samples
        .iter()
        .map(|s| {
            s.iter()
                .any(|x| x.at > down && x.at < up && (x.state == "degraded" || x.store_error))
        })
        .collect();
    let newest = samples
        .iter()
        .filter_map(|s| s.last().and_then(|x| x.generation))
        .max()
        .unwrap_or(0);
    eprintln!(
        "redis outage: {OUTAGE:?} down ({rotations_during} rotations meanwhile); generation \
         {generation_before} before, {persisted} after the restart (from the append-only \
         log), {} at the end; degraded seen per replica {degraded:?}; recovered (newer \
         generation everywhere, ready) {recovered_after:?} after the restart; per replica \
         (success, adopted, failure) {per_process:?}; rotations {}, reuse detected {}; \
         clients {} ok, {} 401, {} 5xx, {} transport errors (during the outage: {} 401, {} \
         5xx)",
        stored_after.generation,
        stats.rotations,
        stats.refresh_reuse_detected,
        report.ok,
        report.unauthorized,
        report.server_errors,
        report.transport_errors,
        errors_during.unauthorized,
        errors_during.server_errors,
    );
    assert_no_reuse(&stats, &replicas);
    assert_eq!(stats.refreshes, stats.rotations, "one refresh per rotation");
    assert!(
        persisted >= generation_before,
        "the stored state survived the SIGKILL: generation {persisted} after, {generation_before} before"
    );
    assert_eq!(rotations_during, 0, "no rotation without the store");
    assert_eq!(
        stored_after.generation,
        generation_before + (stats.rotations - rotations_before),
        "every rotation is stored, none lost"
    );
    let failures: f64 = per_process.iter().map(|p| p.2).sum();
    assert!(
        failures >= 1.0,
        "the scheduled refresh fell into the outage and failed: {per_process:?}"
    );
    assert!(
        degraded.iter().all(|d| *d),
        "/status showed the outage: {degraded:?}"
    );
    assert!(
        recovered,
        "recovered after the restart: latest {:?}\n{}",
        samples.iter().map(|s| s.last()).collect::<Vec<_>>(),
        logs(&replicas)
    );
    assert!(
        stored_after.generation > generation_before && stored_after.generation >= newest,
        "the new generation is stored: {} (served {newest})",
        stored_after.generation
    );
    assert_clean_load(&report, &replicas);
    assert!(report.ok > 100, "{report:?}");
    assert!(codes.iter().all(|c| *c == Some(0)), "exit codes {codes:?}");
}

// ---------------------------------------------------------------------------------------
// 4. A three-member etcd cluster loses its leader under load.
// ---------------------------------------------------------------------------------------

/// Three replicas on a three-member etcd cluster, 12 s tokens (refreshed 5.4–6 s in,
/// usable until 10 s): the leader is SIGKILLed just before a scheduled refresh. The
/// replicas move on to the surviving members, the refresh waits out the election (a write
/// sent to a follower meanwhile waits out the 3 s request timeout before it is sent to the
/// next member), clients see nothing, and rotations carry on with two members.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_member_killed_under_load() {
    if !have_tool("etcd") {
        return;
    }
    const N: usize = 3;
    const AFTER_KILL: Duration = Duration::from_secs(14);
    let mut etcd = EtcdCluster::start(3).await;
    let auth = AuthServer::start(rotating(Duration::from_secs(12)))
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (token_url, api_url, store_yaml) = (
        auth.token_url(),
        api.url(),
        etcd_store_yaml(&etcd.endpoints()),
    );
    let spec = ReplicaSpec {
        store_yaml: &store_yaml,
        token_url: &token_url,
        api_url: &api_url,
        token_timeout: "1s",
    };
    let mut replicas = start_fleet(N, dir.path(), "cluster", &spec, &auth).await;
    let startup_refresh = auth.requests_log().last().expect("startup refresh").at;
    let poller = StatusPoller::start(replicas.iter().map(Replica::admin_url).collect());
    let load = Load::start(
        replicas.iter().map(|r| r.url("/api/v4/leads")).collect(),
        12,
        Duration::from_millis(5),
    );

    // The next refresh is due 5.4–6 s after the startup one.
    tokio::time::sleep_until((startup_refresh + Duration::from_millis(5100)).into()).await;
    let leader = etcd.leader().await;
    let victim = leader.unwrap_or(0);
    let rotations_before = auth.stats().rotations;
    let generation_before = stored(&replicas[0]).await.expect("state").generation;
    etcd.kill9(victim);
    let killed = Instant::now();
    tokio::time::sleep(AFTER_KILL).await;
    let report = load.stop().await;
    let samples = poller.stop().await;
    let settled_by = Instant::now() - Duration::from_millis(1500);
    let stats = auth.stats();
    let stored_after = stored(&replicas[0]).await.expect("state");
    let mut per_process = Vec::new();
    for r in &replicas {
        per_process.push(r.refresh_counts().await);
    }
    let mut codes = Vec::new();
    for r in &mut replicas {
        codes.push(r.terminate().await);
    }

    let rotations_after = stats.rotations - rotations_before;
    let adoption = Adoption::measure(&samples, settled_by);
    show_logs(&replicas);
    // Once the election is over and the replicas have moved on to the surviving members,
    // every replica stays ready: no store error, not degraded.
    let settled = killed + Duration::from_secs(6);
    let unhealthy: Vec<usize> = samples
        .iter()
        .map(|s| {
            s.iter()
                .filter(|x| x.at > settled && (x.state != "ready" || x.store_error))
                .count()
        })
        .collect();
    let first_rotation_after_kill = auth
        .requests_log()
        .iter()
        .find(|r| r.at > killed && r.status == 200)
        .map(|r| r.at - killed);
    eprintln!(
        "etcd cluster: killed member {victim} (leader {leader:?}); {rotations_after} rotations \
         in the {AFTER_KILL:?} after (first {first_rotation_after_kill:?} after the kill); generation \
         {generation_before} → {}; per replica (success, adopted, failure) {per_process:?}; \
         adoption latency over {} generations: median {:?}, max {:?}; /status samples not \
         ready from 6 s after the kill on {unhealthy:?}; reuse detected {}; clients {} ok, \
         {} 401, {} 5xx, {} transport errors",
        stored_after.generation,
        adoption.latencies.len(),
        adoption.median(),
        adoption.max(),
        stats.refresh_reuse_detected,
        report.ok,
        report.unauthorized,
        report.server_errors,
        report.transport_errors,
    );
    assert!(leader.is_some(), "the leader was found");
    assert_no_reuse(&stats, &replicas);
    assert_eq!(stats.refreshes, stats.rotations, "one refresh per rotation");
    assert!(
        rotations_after >= 2,
        "rotations continue after the kill: {rotations_after}\n{}",
        logs(&replicas)
    );
    assert!(
        stored_after.generation >= generation_before + rotations_after,
        "every rotation is stored"
    );
    assert_clean_load(&report, &replicas);
    assert!(
        unhealthy.iter().all(|n| *n == 0),
        "replicas still saw store errors after the election: {unhealthy:?}\n{}",
        logs(&replicas)
    );
    assert!(
        adoption.never.is_empty() && adoption.max() < Duration::from_secs(3),
        "adoption: {adoption:?}"
    );
    assert!(codes.iter().all(|c| *c == Some(0)), "exit codes {codes:?}");
}

// ---------------------------------------------------------------------------------------
// 5. Store down: a fallback self-refresh only where refresh tokens do not rotate.
// ---------------------------------------------------------------------------------------

/// What a credential did while its store was down past its token's expiry.
struct StoreDown {
    /// Statuses of the requests made after the token expired.
    statuses: Vec<u16>,
    /// Refresh requests the token endpoint saw while the store was down.
    refreshes: u64,
    /// How long after the token in use was issued the first of them was sent.
    first_refresh_after_issue: Option<Duration>,
}

/// One tokenrelay on Redis with 8 s tokens refreshed half-way (4 s), which are usable
/// until 2 s before they expire (6 s); Redis is SIGKILLed and stays down while the token
/// expires.
async fn store_down_past_expiry(rotates: bool) -> StoreDown {
    let mut redis = RedisServer::start().await;
    let auth = AuthServer::start(AuthServerOptions {
        rotate_refresh_tokens: rotates,
        ..rotating(Duration::from_secs(8))
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}
store:
{store}credentials:
  crm: {{ grant: refresh_token, token_url: {token_url}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true, token_timeout: 1s, refresh_at: 0.5, rotating_refresh_token: {rotates} }}
upstreams:
  crm: {{ listen: 127.0.0.1:0, url: {api_url}, credential: crm, allow_insecure_http: true }}
",
        store = redis_store_yaml(&redis.url()),
        token_url = auth.token_url(),
        api_url = api.url(),
    );
    let config = tokenrelay::config::Config::from_yaml(&yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&config.store).unwrap();
    let seeded = tokenrelay::store::StoredState {
        generation: 1,
        refresh_token: Some(tokenrelay::secret::Secret::new(auth.new_grant())),
        obtained_at_ms: tokenrelay::store::now_ms(),
        ..Default::default()
    };
    store.compare_and_swap("crm", 0, &seeded).await.unwrap();
    let relay = support::start(&yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    let c = support::client();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    redis.kill9();
    let refreshes_before = auth.stats().refreshes;
    let issued = auth.requests_log().last().expect("the first refresh").at;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            c.get(&url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let refreshes = auth.stats().refreshes - refreshes_before;
    relay.stop().await;
    let first_refresh_after_issue = auth
        .requests_log()
        .iter()
        .find(|r| r.at > issued)
        .map(|r| r.at - issued);
    StoreDown {
        statuses,
        refreshes,
        first_refresh_after_issue,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_rotating_credentials_refresh_alone_while_the_store_is_down() {
    if !have_tool("redis-server") {
        return;
    }
    let down = store_down_past_expiry(false).await;
    let StoreDown {
        statuses,
        refreshes,
        first_refresh_after_issue,
    } = &down;
    eprintln!("non-rotating, store down: statuses {statuses:?}, refreshes {refreshes}");
    assert!(*refreshes >= 1, "no fallback refresh");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Not at the refresh time drawn (4 s): only once the token is no longer usable (6 s).
    let first = first_refresh_after_issue.expect("a fallback refresh");
    assert!(
        first >= Duration::from_millis(5_900),
        "refreshed without the store {first:?} after the token was issued, while it was usable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_credentials_wait_for_the_store() {
    if !have_tool("redis-server") {
        return;
    }
    let StoreDown {
        statuses,
        refreshes,
        ..
    } = store_down_past_expiry(true).await;
    eprintln!("rotating, store down: statuses {statuses:?}, refreshes {refreshes}");
    assert_eq!(
        refreshes, 0,
        "a rotating refresh token was spent without the store"
    );
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
}

// ---------------------------------------------------------------------------------------
// 1c. The lease is lost while a refresh holds it; a rolled-back Redis state.
// ---------------------------------------------------------------------------------------

async fn redis_connection(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The lease key vanishes (a Redis failover that lost it, say) while the holder's token
/// request is in flight: its renewal fails, the holder still writes what it got under the
/// compare-and-swap on the generation, and logs and counts that the lease was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_lost_mid_refresh_is_counted_and_the_generation_decides() {
    if !have_tool("redis-server") {
        return;
    }
    let redis = RedisServer::start().await;
    let auth = AuthServer::start(AuthServerOptions {
        response_delay: Duration::from_secs(3),
        ..rotating(Duration::from_secs(60))
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (token_url, api_url) = (auth.token_url(), api.url());
    let store_yaml = format!("{}  lease_ttl: 2s\n", redis_store_yaml(&redis.url()));
    let spec = ReplicaSpec {
        store_yaml: &store_yaml,
        token_url: &token_url,
        api_url: &api_url,
        token_timeout: "6s",
    };
    let mut a = Replica::new(dir.path(), "lost-lease", &spec);
    seed(&a, &auth);
    let seeded = stored(&a).await.expect("seeded").generation;
    let mut conn = redis_connection(&redis).await;
    a.spawn();
    // The startup refresh takes the lease and waits 3 s at the token endpoint.
    let lease_key = "tokenrelay/crm:lease";
    let t0 = Instant::now();
    loop {
        let held: bool = redis::cmd("EXISTS")
            .arg(lease_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if held {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no refresh under the lease; log:\n{}",
            a.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Well into the 3 s the token endpoint takes (the request went out right after the
    // lease was taken and confirmed).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(auth.stats().refreshes, 0, "answered already");
    let _: i64 = redis::cmd("DEL")
        .arg(lease_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    a.ready(Duration::from_secs(20)).await;
    let status = support::client()
        .get(a.url("/api/v4/leads"))
        .send()
        .await
        .unwrap()
        .status();
    let m = metrics_text(&a.admin_url()).await;
    let lost = metric(&m, "tokenrelay_refresh_lease_lost_total", &[]);
    let state = stored(&a).await.expect("state");
    let stats = auth.stats();
    a.terminate().await;
    let log = a.log_tail(200);
    eprintln!(
        "lease deleted mid-refresh: leases lost {lost}, refreshes {}, generation {} -> {}",
        stats.refreshes, seeded, state.generation
    );
    assert_eq!(status, 200);
    assert!(lost >= 1.0, "the lost lease was not counted; log:\n{log}");
    assert!(
        log.contains("lease could not be renewed"),
        "the lost lease was not logged; log:\n{log}"
    );
    assert_eq!(state.generation, seeded + 1, "the new token was written");
    assert_eq!(stats.refreshes, 1);
    assert_eq!(stats.refresh_reuse_detected, 0);
}

/// A Redis state rolled back under a running replica (an older RDB/AOF restored, a
/// lagging replica promoted): the replica has seen a newer generation, so it refuses the
/// older state instead of sending its spent refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_redis_state_is_refused_by_a_replica_that_saw_newer() {
    if !have_tool("redis-server") {
        return;
    }
    let redis = RedisServer::start().await;
    let auth = AuthServer::start(rotating(Duration::from_secs(2)))
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (token_url, api_url) = (auth.token_url(), api.url());
    let store_yaml = redis_store_yaml(&redis.url());
    let spec = ReplicaSpec {
        store_yaml: &store_yaml,
        token_url: &token_url,
        api_url: &api_url,
        token_timeout: "2s",
    };
    let mut replicas = start_fleet(1, dir.path(), "rollback", &spec, &auth).await;
    let a = &replicas[0];
    let mut conn = redis_connection(&redis).await;
    let backup: std::collections::HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
        .arg("tokenrelay/crm")
        .query_async(&mut conn)
        .await
        .unwrap();
    let backed_up = stored(a).await.expect("state").generation;
    assert!(
        support::eventually(Duration::from_secs(20), || async {
            stored(a)
                .await
                .is_some_and(|s| s.generation >= backed_up + 2)
        })
        .await,
        "no rotations; log:\n{}",
        a.log_tail(30)
    );
    // Restore the backup.
    let mut hset = redis::cmd("HSET");
    hset.arg("tokenrelay/crm");
    for (field, value) in &backup {
        hset.arg(field).arg(value.as_slice());
    }
    let _: i64 = hset.query_async(&mut conn).await.unwrap();
    let restored = auth.stats();
    assert!(
        support::eventually(Duration::from_secs(20), || async {
            support::status_json(&a.admin_url()).await["credentials"]["crm"]["state"]
                == "reauthorization_required"
        })
        .await,
        "the rolled-back state was not refused; log:\n{}",
        a.log_tail(30)
    );
    let status = support::status_json(&a.admin_url()).await;
    let after = auth.stats();
    replicas[0].terminate().await;
    let text = status.to_string();
    assert!(
        text.contains("older than"),
        "/status does not say why: {text}"
    );
    assert_eq!(
        after.refreshes, restored.refreshes,
        "a refresh token was sent after the rollback"
    );
    assert_eq!(after.refresh_reuse_detected, 0);
}

/// The lease primitive the refresher relies on before sending a refresh token, on a real
/// store: `secure_for` extends a lease shorter than the request so that nobody else can
/// take it meanwhile, and refuses (so nothing is sent) once the lease is not ours; and
/// renewals every third of the TTL keep a lease for as long as they go on.
async fn lease_is_secured_for_the_request_or_refused(backend: &str, store_yaml: &str) {
    let auth = AuthServer::start(rotating(Duration::from_secs(60)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_url = auth.token_url();
    let spec = ReplicaSpec {
        store_yaml,
        token_url: &token_url,
        api_url: "http://127.0.0.1:9",
        token_timeout: "2s",
    };
    let replica = Replica::new(dir.path(), backend, &spec);
    let (ours, theirs) = (store_of(&replica), store_of(&replica));
    let ttl = Duration::from_secs(2);
    let needed = Duration::from_secs(5);

    let lease = ours.try_lease("crm", ttl).await.unwrap().expect("free");
    assert!(lease.secure_for(needed).await, "{backend}: not secured");
    // Past the TTL it was taken with, with no renewal since: still held.
    tokio::time::sleep(ttl + Duration::from_secs(2)).await;
    assert!(
        theirs.try_lease("crm", ttl).await.unwrap().is_none(),
        "{backend}: the lease ran out under a request it was secured for"
    );
    assert!(lease.renew().await, "{backend}: renewal failed");
    lease.release().await;

    // Renewed every third of its TTL, a lease outlives the TTL many times over.
    let lease = ours.try_lease("crm", ttl).await.unwrap().expect("free");
    for _ in 0..9 {
        tokio::time::sleep(ttl / 3).await;
        assert!(lease.renew().await, "{backend}: renewal failed");
    }
    assert!(
        theirs.try_lease("crm", ttl).await.unwrap().is_none(),
        "{backend}: a renewed lease ran out"
    );
    lease.release().await;

    // Taken by someone else after it ran out: not secured, so nothing would be sent.
    let lease = ours.try_lease("crm", ttl).await.unwrap().expect("free");
    tokio::time::sleep(ttl + Duration::from_secs(2)).await;
    let other = theirs
        .try_lease("crm", ttl)
        .await
        .unwrap()
        .expect("expired");
    assert!(
        !lease.secure_for(needed).await,
        "{backend}: secured a lease held by another"
    );
    assert!(
        !lease.renew().await,
        "{backend}: renewed a lease held by another"
    );
    other.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_is_secured_for_the_request_or_refused() {
    if !have_tool("redis-server") {
        return;
    }
    let redis = RedisServer::start().await;
    lease_is_secured_for_the_request_or_refused("redis", &redis_store_yaml(&redis.url())).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lease_is_secured_for_the_request_or_refused() {
    if !have_tool("etcd") {
        return;
    }
    let etcd = EtcdCluster::start(1).await;
    lease_is_secured_for_the_request_or_refused("etcd", &etcd_store_yaml(&etcd.endpoints())).await;
}

// ---------------------------------------------------------------------------------------
// Stopping never abandons a rotated token.
// ---------------------------------------------------------------------------------------

/// The demo servers (rotating refresh tokens) and a directory, for one replica on a
/// Redis store with a 10 s token timeout.
struct OneRedisReplica {
    auth: AuthServer,
    _api: ApiServer,
    dir: tempfile::TempDir,
    token_url: String,
    api_url: String,
    store_yaml: String,
}

impl OneRedisReplica {
    /// The Redis server and the rest, tokens living `access_ttl`.
    async fn start(access_ttl: Duration) -> (RedisServer, OneRedisReplica) {
        let redis = RedisServer::start().await;
        let auth = AuthServer::start(rotating(access_ttl)).await.unwrap();
        let api = ApiServer::start(Some(auth.validator())).await.unwrap();
        let f = OneRedisReplica {
            token_url: auth.token_url(),
            api_url: api.url(),
            store_yaml: redis_store_yaml(&redis.url()),
            auth,
            _api: api,
            dir: tempfile::tempdir().unwrap(),
        };
        (redis, f)
    }

    fn spec(&self) -> ReplicaSpec<'_> {
        ReplicaSpec {
            store_yaml: &self.store_yaml,
            token_url: &self.token_url,
            api_url: &self.api_url,
            token_timeout: "10s",
        }
    }
}

/// Lets the next rotation be made at once and answered 4 s later, waits until the
/// server has made it, and kills Redis while the answer is on its way.
async fn rotate_then_lose_the_store(auth: &AuthServer, redis: &mut RedisServer) {
    auth.lose_next_answers(1, testkit::LostAnswer::Hang(Duration::from_secs(4)));
    let acted = support::eventually(Duration::from_secs(20), || {
        let n = auth.stats().answers_lost;
        async move { n >= 1 }
    })
    .await;
    assert!(acted, "no rotation: {:?}", auth.stats());
    redis.kill9();
}

/// SIGTERM while a rotation's answer is on its way and the store is down: the process
/// does not exit (for longer than any grace period) until the store is back and the new
/// refresh token is stored; then it exits cleanly, and the stored token is the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_waits_for_the_store_to_keep_a_rotated_token() {
    if !have_tool("redis-server") {
        return;
    }
    let (mut redis, f) = OneRedisReplica::start(Duration::from_secs(6)).await;
    let auth = &f.auth;
    let mut replicas = start_fleet(1, f.dir.path(), "stopping", &f.spec(), auth).await;
    rotate_then_lose_the_store(auth, &mut redis).await;
    let mut p = replicas[0].proc.take().unwrap();
    support::sigterm(&p.child);
    // Past every bound the old code had (10 s), the process must still be waiting.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let waiting = p.child.try_wait().unwrap().is_none();
    redis.spawn().await;
    let exit = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = p.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        p.kill9();
        None
    })
    .await
    .unwrap();
    let log = replicas[0].log_tail(30);
    assert!(waiting, "exited with the rotated token unstored:\n{log}");
    assert_eq!(exit, Some(0), "{log}");
    let state = stored(&replicas[0]).await.expect("state");
    let token = state.refresh_token.expect("a refresh token is stored");
    assert!(
        auth.is_valid_refresh_token(token.expose()),
        "the stored refresh token is not the live one:\n{log}"
    );
    assert!(log.contains("waiting for the store"), "{log}");
}

/// What a reload during a store outage does to the credential whose rotated refresh
/// token is waiting to be stored.
#[derive(Clone, Copy, PartialEq)]
enum ReloadChange {
    /// Changes a setting but keeps its token endpoint, client and grant.
    Setting,
    /// Moves it to another grant: nobody refreshes with the stored token any more.
    Grant,
}

/// A reload that changes a credential while the store cannot keep its just-rotated
/// refresh token: the new refresher takes the pending write over, and once the store
/// is back it holds the live token and serves it.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_takes_over_a_rotated_token_the_store_has_not_kept() {
    reload_during_a_pending_write(ReloadChange::Setting).await;
}

/// A reload that moves a credential off the refresh-token grant while its rotated
/// token waits for the store: the write is finished in the background, as soon as the
/// store is back (shutdown waits for it: `stopping_waits_for_the_store_…`).
#[tokio::test(flavor = "multi_thread")]
async fn a_credential_moved_off_its_grant_still_gets_its_rotated_token_stored() {
    reload_during_a_pending_write(ReloadChange::Grant).await;
}

/// The reload is not held up by the outage, and the store ends up with the live token.
async fn reload_during_a_pending_write(change: ReloadChange) {
    if !have_tool("redis-server") {
        return;
    }
    // 30 s tokens refreshed after 3 s: the token in use stays valid through the outage.
    let (mut redis, f) = OneRedisReplica::start(Duration::from_secs(30)).await;
    let auth = &f.auth;
    let mut replica = Replica::new(f.dir.path(), "handover", &f.spec());
    let yaml = std::fs::read_to_string(&replica.config).unwrap();
    std::fs::write(
        &replica.config,
        yaml.replace(
            "    token_timeout: 10s\n",
            "    token_timeout: 10s\n    refresh_at: 0.1\n",
        ),
    )
    .unwrap();
    seed(&replica, auth);
    replica.spawn();
    replica.ready(Duration::from_secs(20)).await;
    let mut replicas = [replica];
    rotate_then_lose_the_store(auth, &mut redis).await;
    let pending = support::eventually(Duration::from_secs(20), || {
        let log = replicas[0].log_tail(20);
        async move { log.contains("cannot persist the rotated token yet") }
    })
    .await;
    assert!(pending, "no pending write:\n{}", replicas[0].log_tail(30));

    let yaml = std::fs::read_to_string(&replicas[0].config).unwrap();
    let changed = match change {
        ReloadChange::Setting => yaml.replace(
            "    token_timeout: 10s\n",
            "    token_timeout: 10s\n    refresh_before: 2s\n",
        ),
        ReloadChange::Grant => yaml.replace("grant: refresh_token", "grant: client_credentials"),
    };
    assert_ne!(yaml, changed);
    std::fs::write(&replicas[0].config, changed).unwrap();
    let reload = reqwest::Client::new()
        .post(format!("{}/reload", replicas[0].admin_url()))
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    let reloaded_in_outage = reload.is_ok_and(|r| r.status().as_u16() == 200);
    // The changed credential serves the token in use until its own is stored.
    let served_in_outage = reqwest::Client::new()
        .get(replicas[0].url("/api/v4/leads"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| r.status().as_u16());
    redis.spawn().await;
    let kept = support::eventually(Duration::from_secs(30), || {
        let r = &replicas[0];
        async move {
            matches!(stored(r).await, Some(s) if s.refresh_token.as_ref()
                .is_some_and(|t| auth.is_valid_refresh_token(t.expose())))
        }
    })
    .await;
    let log = replicas[0].log_tail(40);
    assert!(
        reloaded_in_outage,
        "the reload waited for the store:\n{log}"
    );
    assert!(kept, "the stored refresh token is not the live one:\n{log}");
    assert_eq!(auth.stats().refresh_reuse_detected, 0, "{:?}", auth.stats());
    match change {
        ReloadChange::Setting => {
            assert!(log.contains("takes over"), "{log}");
            assert!(
                matches!(served_in_outage, Ok(200)),
                "during the outage: {served_in_outage:?}\n{log}"
            );
            let served = support::eventually(Duration::from_secs(20), || {
                let url = replicas[0].url("/api/v4/leads");
                async move {
                    reqwest::get(url)
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            })
            .await;
            assert!(served, "{}", replicas[0].log_tail(40));
            assert_eq!(replicas[0].terminate().await, Some(0));
        }
        ReloadChange::Grant => {
            assert!(log.contains("written in the background"), "{log}");
            assert_eq!(replicas[0].terminate().await, Some(0));
        }
    }
}
