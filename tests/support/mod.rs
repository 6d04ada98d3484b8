//! Shared test harness: tokenrelay in-process or as a child process, on loopback only.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokenrelay::app::{self, Bound};
use tokenrelay::config::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
    tokenrelay::tls::install_crypto_provider();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = Config::from_yaml(yaml, Path::new("."), &move |k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    let (tx, rx) = oneshot::channel::<()>();
    let (btx, brx) = oneshot::channel::<Bound>();
    let task = tokio::spawn(app::run(
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
    tokenrelay::tls::install_crypto_provider();
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
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
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
    pub auth: tokenrelay::demo::AuthServer,
    pub api: tokenrelay::demo::ApiServer,
}

/// Starts the demo servers on loopback (`opts` for the authorization server).
pub async fn demo_servers(opts: tokenrelay::demo::AuthServerOptions) -> DemoServers {
    let auth = tokenrelay::demo::AuthServer::start(opts).await.unwrap();
    let api = tokenrelay::demo::ApiServer::start(Some(auth.validator()))
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
