//! Shared test harness: tokenrelay in-process or as a child process, on loopback only.
#![allow(dead_code)]

pub mod pki;
pub mod stores;
pub mod tools;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokenrelay::config::Config;
use tokenrelay::Bound;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Sends SIGTERM to a child process (as an init system or Kubernetes would to stop it).
pub fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
}

/// tokenrelay running inside the test process.
pub struct Running {
    pub admin: SocketAddr,
    pub upstreams: BTreeMap<String, SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Base URL of the named upstream's listener.
    pub fn url(&self, upstream: &str) -> String {
        format!("http://{}", self.upstreams[upstream])
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Sends the shutdown signal and waits for a clean exit.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("shutdown within 30s")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Parses `yaml` (environment lookups from `env`) and starts tokenrelay in-process.
pub async fn start(yaml: &str) -> Running {
    start_with_env(yaml, &[]).await
}

pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Running {
    tokenrelay::install_crypto_provider();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = Config::from_yaml(yaml, &move |k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    let (tx, rx) = oneshot::channel::<()>();
    let (btx, brx) = oneshot::channel::<Bound>();
    let task = tokio::spawn(tokenrelay::run(
        config,
        async move {
            let _ = rx.await;
        },
        move |b| {
            let _ = btx.send(b);
        },
    ));
    let bound = tokio::time::timeout(Duration::from_secs(10), brx)
        .await
        .expect("tokenrelay bound its listeners")
        .expect("tokenrelay started");
    Running {
        admin: bound.admin,
        upstreams: bound.upstreams,
        stop: Some(tx),
        task: Some(task),
    }
}

/// An HTTP client that never pools across tests and talks only to loopback.
pub fn client() -> reqwest::Client {
    tokenrelay::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback port that was free a moment ago (for child processes' configs).
/// `n` distinct loopback ports that were free a moment ago (bound all at once, so they
/// differ from each other).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tokenrelay binary built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tokenrelay"))
}

/// A tokenrelay child process; its stderr goes to `log`.
pub struct ChildProc {
    pub child: Child,
    pub log: PathBuf,
}

impl ChildProc {
    /// Starts `tokenrelay run --config <config>`.
    pub fn spawn(config: &Path, log: &Path, extra_env: &[(&str, &str)]) -> ChildProc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        ChildProc {
            child: cmd.spawn().expect("spawn tokenrelay"),
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        sigterm(&self.child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Waits until `GET url` answers 200.
pub async fn wait_ready(url: &str, within: Duration) -> bool {
    let c = client();
    eventually(within, || {
        let c = c.clone();
        let url = url.to_string();
        async move { matches!(c.get(&url).send().await, Ok(r) if r.status() == 200) }
    })
    .await
}

/// Demo authorization server plus an upstream API that accepts only its tokens.
pub struct DemoServers {
    pub auth: testkit::AuthServer,
    pub api: testkit::ApiServer,
}

/// Starts the demo servers on loopback (`opts` for the authorization server).
pub async fn demo_servers(opts: testkit::AuthServerOptions) -> DemoServers {
    let auth = testkit::AuthServer::start(opts).await.unwrap();
    let api = testkit::ApiServer::start(Some(auth.validator()))
        .await
        .unwrap();
    DemoServers { auth, api }
}

/// A config with one client_credentials credential `api` (demo-client/demo-secret at
/// `token_url`) and one upstream `api` in front of `upstream_url`, plain http allowed.
/// `credential_extra` and `upstream_extra` are extra YAML flow-mapping entries, e.g.
/// `"timeout: 1s, limits: { max_connections: 2 }"`.
pub fn one_upstream_yaml(
    token_url: &str,
    upstream_url: &str,
    credential_extra: &str,
    upstream_extra: &str,
) -> String {
    let ce = if credential_extra.is_empty() {
        String::new()
    } else {
        format!(", {credential_extra}")
    };
    let ue = if upstream_extra.is_empty() {
        String::new()
    } else {
        format!(", {upstream_extra}")
    };
    format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n\
         credentials:\n  \
           api: {{ grant: client_credentials, token_url: {token_url}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true{ce} }}\n\
         upstreams:\n  \
           api: {{ listen: 127.0.0.1:0, url: {upstream_url}, credential: api, allow_insecure_http: true{ue} }}\n"
    )
}

/// Writes `request` on a fresh connection to `addr` and reads until the peer closes the
/// connection or `within` passes; returns what was read (lossy UTF-8).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], within: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut buf = [0u8; 8192];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response (`HTTP/1.1 400 Bad Request` → 400).
pub fn raw_status(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

/// The body of a raw, non-chunked HTTP/1.1 response.
pub fn raw_body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}

/// The state of `credential` in the admin `/status` document (`""` when unreachable).
pub async fn credential_state(running: &Running, credential: &str) -> String {
    let Ok(resp) = client().get(running.admin_url("/status")).send().await else {
        return String::new();
    };
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    v["credentials"][credential]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Helpers for the rotation, crash and encryption suites.
// ---------------------------------------------------------------------------------------

/// Sum of the samples of metric `name` (Prometheus text format) whose labels include
/// every pair of `labels`; 0 when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let matches = labels.iter().all(|(k, v)| {
            series_labels
                .split(',')
                .any(|kv| kv == format!("{k}=\"{v}\""))
        });
        if matches {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// `GET {admin}/metrics` (admin is `http://host:port`); empty on failure.
pub async fn metrics_text(admin: &str) -> String {
    match client().get(format!("{admin}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// `GET url`: the body as text (panics when there is no answer).
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `GET {admin}/status` as JSON.
pub async fn status_json(admin: &str) -> serde_json::Value {
    client()
        .get(format!("{admin}/status"))
        .send()
        .await
        .expect("GET /status")
        .json()
        .await
        .expect("/status is JSON")
}

/// Runs the tokenrelay CLI with `args` off the async runtime (it may take a while).
pub async fn cli(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&args)
    })
    .await
    .expect("the CLI task ran")
}

/// Stores `refresh_token` as the first generation of credential `credential` through the
/// store of config `yaml`, as `seed` does.
pub async fn seed_refresh_token(yaml: &str, credential: &str, refresh_token: &str) {
    let cfg = Config::from_yaml(yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&cfg.store).unwrap();
    let state = tokenrelay::store::StoredState {
        generation: 1,
        refresh_token: Some(tokenrelay::secret::Secret::new(refresh_token)),
        obtained_at_ms: tokenrelay::store::now_ms(),
        updated_by: "test".into(),
        ..Default::default()
    };
    let outcome = store.compare_and_swap(credential, 0, &state).await.unwrap();
    assert_eq!(outcome, tokenrelay::store::CasOutcome::Swapped);
}

/// The stored state of credential `credential` in the store of config `yaml`.
pub async fn stored_state(yaml: &str, credential: &str) -> Option<tokenrelay::store::StoredState> {
    let cfg = Config::from_yaml(yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&cfg.store).unwrap();
    store.load(credential).await.unwrap()
}

/// Runs `tokenrelay seed --config <config> --credential <credential> --refresh-token-file -`
/// with `token` on standard input.
pub fn seed_cli(config: &Path, credential: &str, token: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(binary())
        .args(["seed", "--config"])
        .arg(config)
        .args(["--credential", credential, "--refresh-token-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokenrelay seed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    child.wait_with_output().expect("tokenrelay seed finished")
}

/// Runs a short `tokenrelay` command (e.g. `status`) and returns its output.
pub fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tokenrelay")
}

/// What a [`Load`] saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// 2xx answers.
    pub ok: u64,
    /// 401 answers (must be 0: tokenrelay retries them).
    pub unauthorized: u64,
    /// 5xx answers, with the first few bodies for the failure message.
    pub server_errors: u64,
    pub server_error_samples: Vec<String>,
    /// Other statuses.
    pub other: u64,
    /// Connection refused/reset etc. (expected only while a process is down).
    pub transport_errors: u64,
    /// 2xx answers per target URL, in the order given.
    pub ok_per_target: Vec<u64>,
}

#[derive(Default)]
struct LoadState {
    report: std::sync::Mutex<LoadReport>,
}

/// Concurrent clients sending `GET` requests in a loop until stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    state: std::sync::Arc<LoadState>,
}

impl Load {
    /// `tasks` clients; client `i` uses `urls[i % urls.len()]`, pausing `pause` between
    /// requests (and 20 ms after a transport error).
    pub fn start(urls: Vec<String>, tasks: usize, pause: Duration) -> Load {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        tokenrelay::install_crypto_provider();
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(LoadState::default());
        state.report.lock().unwrap().ok_per_target = vec![0; urls.len()];
        let tasks = (0..tasks)
            .map(|i| {
                let target = i % urls.len();
                let url = urls[target].clone();
                let stop = stop.clone();
                let state = state.clone();
                let c = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match c.get(&url).send().await {
                            Ok(r) => {
                                let code = r.status().as_u16();
                                let body = if code >= 500 {
                                    r.text().await.unwrap_or_default()
                                } else {
                                    // Read the body so the connection is reused.
                                    let _ = r.bytes().await;
                                    String::new()
                                };
                                let mut rep = state.report.lock().unwrap();
                                match code {
                                    200..=299 => {
                                        rep.ok += 1;
                                        rep.ok_per_target[target] += 1;
                                    }
                                    401 => rep.unauthorized += 1,
                                    500..=599 => {
                                        rep.server_errors += 1;
                                        if rep.server_error_samples.len() < 5 {
                                            rep.server_error_samples.push(format!("{code} {body}"));
                                        }
                                    }
                                    _ => rep.other += 1,
                                }
                            }
                            Err(_) => {
                                state.report.lock().unwrap().transport_errors += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, tasks, state }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> LoadReport {
        self.state.report.lock().unwrap().clone()
    }

    /// Stops every client and returns the counts.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let report = self.state.clone();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(35), t).await;
        }
        let r = report.report.lock().unwrap().clone();
        r
    }
}

#[derive(Default)]
struct RelayConn {
    /// When the request now awaiting its answer started (first byte up after the last
    /// byte down); `None` when nothing is pending.
    pending_since: Option<Instant>,
}

#[derive(Default)]
struct RelayState {
    next_id: u64,
    conns: BTreeMap<u64, RelayConn>,
    /// When answer bytes were relayed down, in order (one entry per read burst).
    responses: Vec<Instant>,
    /// When requests started (first byte up of each request).
    requests: Vec<Instant>,
}

/// A plain TCP relay in front of a server (here: the token endpoint) that records when
/// requests are in flight and when answers come back. Tests use it to time a kill or a
/// SIGTERM against the client's token request; it forwards bytes unchanged, and when the
/// client's side closes it closes the server's side too (so the server sees the hang-up).
pub struct Relay {
    pub addr: SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<RelayState>>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<RelayState>> = Arc::default();
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let id = {
                        let mut s = st.lock().unwrap();
                        s.next_id += 1;
                        let id = s.next_id;
                        s.conns.insert(id, RelayConn::default());
                        id
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let st_up = st.clone();
                    let up = async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            {
                                let mut s = st_up.lock().unwrap();
                                let now = Instant::now();
                                let mut started = false;
                                if let Some(c) = s.conns.get_mut(&id) {
                                    if c.pending_since.is_none() {
                                        c.pending_since = Some(now);
                                        started = true;
                                    }
                                }
                                if started {
                                    s.requests.push(now);
                                }
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        // The client hung up (or died): let the server see it.
                        let _ = sw.shutdown().await;
                        if let Some(c) = st_up.lock().unwrap().conns.get_mut(&id) {
                            c.pending_since = None;
                        }
                    };
                    let st_down = st.clone();
                    let down = async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            {
                                let mut s = st_down.lock().unwrap();
                                if let Some(c) = s.conns.get_mut(&id) {
                                    c.pending_since = None;
                                }
                                s.responses.push(Instant::now());
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                    st.lock().unwrap().conns.remove(&id);
                });
            }
        });
        Relay { addr, state, task }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// When the oldest request still awaiting its answer was sent, if one is.
    pub fn pending_since(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap();
        s.conns.values().filter_map(|c| c.pending_since).min()
    }

    /// When the last answer bytes were relayed.
    pub fn last_response(&self) -> Option<Instant> {
        self.state.lock().unwrap().responses.last().copied()
    }

    /// Every time answer bytes were relayed.
    pub fn responses(&self) -> Vec<Instant> {
        self.state.lock().unwrap().responses.clone()
    }

    /// Every time a request started.
    pub fn requests(&self) -> Vec<Instant> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The tail of a child's log, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Credential `crm` (rotating `refresh_token` grant against the demo authorization
/// server at `token_url`, refreshed 1 s before expiry, 2 s token timeout) with upstream
/// `crm` to `api_url`, on the file store at `state`; `cred_extra` adds credential keys.
pub fn quick_refresh_yaml(
    token_url: &str,
    api_url: &str,
    state: &Path,
    cred_extra: &str,
) -> String {
    format!(
        "admin: {{ listen: 127.0.0.1:0 }}
store: {{ type: file, path: {state} }}
credentials:
  crm:
    grant: refresh_token
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
    refresh_before: 1s
    token_timeout: 2s
{cred_extra}upstreams:
  crm: {{ listen: 127.0.0.1:0, url: {api_url}, credential: crm, allow_insecure_http: true }}
",
        state = state.display(),
    )
}
