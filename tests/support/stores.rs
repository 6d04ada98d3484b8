//! Real store servers for the tests: `redis-server` and `etcd` processes on free loopback
//! ports, data in temporary directories, SIGKILLed when dropped. Started through
//! [`super::tools`], so only programs `scripts/test-tools.txt` lists.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::{eventually, free_ports, log_tail};

/// SIGKILLs and reaps `child`, if any.
pub fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The persistence a `redis-server` gets unless a test says otherwise: an append-only
/// log fsynced on every write, no RDB snapshots.
pub const REDIS_DURABLE: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];

/// A `redis-server` on a loopback port in its own temporary directory; SIGKILLed on drop.
pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// Arguments after port, bind and directory (persistence, `--replicaof`, ...).
    args: Vec<String>,
}

impl RedisServer {
    /// A server with [`REDIS_DURABLE`] persistence.
    pub async fn start() -> RedisServer {
        RedisServer::start_with_args(REDIS_DURABLE).await
    }

    /// A server started with `args` instead of [`REDIS_DURABLE`] (for example
    /// `--appendonly no`, or `--replicaof 127.0.0.1 PORT`).
    pub async fn start_with_args(args: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            port: free_ports(1)[0],
            dir: tempfile::tempdir().unwrap(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        r.spawn().await;
        r
    }

    /// A replica of `primary` (`--replicaof`), with [`REDIS_DURABLE`] persistence of its
    /// own. Replication may still be starting when this returns: see
    /// [`RedisServer::wait_for_replicas`].
    pub async fn start_replica_of(primary: &RedisServer) -> RedisServer {
        let port = primary.port.to_string();
        let mut args = REDIS_DURABLE.to_vec();
        args.extend(["--replicaof", "127.0.0.1", &port]);
        RedisServer::start_with_args(&args).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Polls `INFO replication` until at least `n` replicas are connected and online
    /// (synchronised), for at most `within`.
    pub async fn wait_for_replicas(&self, n: usize, within: Duration) -> bool {
        let url = self.url();
        eventually(within, || {
            let url = url.clone();
            async move {
                let online = async {
                    let mut c = redis::Client::open(url)
                        .ok()?
                        .get_multiplexed_async_connection()
                        .await
                        .ok()?;
                    let info: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    Some(online_replicas(&info))
                };
                tokio::time::timeout(Duration::from_secs(2), online)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|online| online >= n)
            }
        })
        .await
    }

    /// Starts (or restarts, on the same port, data directory and arguments) and waits for
    /// PONG.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .unwrap();
        let child = super::tools::command("redis-server")
            .expect("redis-server is installed")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let up = eventually(Duration::from_secs(10), || redis_ping(addr)).await;
        assert!(up, "redis-server did not start:\n{}", self.log_tail());
    }

    /// SIGKILL: no shutdown, no final save; only what the append-only log has survives.
    pub fn kill9(&mut self) {
        kill_child(&mut self.child);
    }

    /// SIGSTOP: the server stops answering (and, as a replica, acknowledging) but its
    /// connections stay open, so its primary still counts it as an online replica.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("redis-server running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        nix::sys::signal::kill(pid, signal).expect("signal redis-server");
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.path().join("redis.log"), 20)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// The replicas `INFO replication` lists as online (`slaveN:...,state=online,...`).
pub fn online_replicas(info: &str) -> usize {
    info.lines()
        .filter(|l| {
            l.strip_prefix("slave")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                && l.contains("state=online")
        })
        .count()
}

/// True if the server at `addr` answers `PING` with `+PONG`.
pub async fn redis_ping(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        conn.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// One member of an [`EtcdCluster`].
#[cfg(feature = "etcd")]
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of `n` members on loopback (distinct client and peer ports), data in a
/// temporary directory; every member SIGKILLed on drop.
#[cfg(feature = "etcd")]
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    pub dir: tempfile::TempDir,
}

#[cfg(feature = "etcd")]
impl EtcdCluster {
    pub async fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * n);
        let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        let initial_cluster = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{name}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("tokenrelay-test-{:x}", rand::random::<u64>());
        let mut members = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let (client, peer) = (ports[2 * i], ports[2 * i + 1]);
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            let child = super::tools::command("etcd")
                .expect("etcd is installed")
                .args(["--name", name])
                .arg("--data-dir")
                .arg(dir.path().join(name))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster={initial_cluster}"))
                .arg(format!("--initial-cluster-token={token}"))
                .args(["--initial-cluster-state", "new", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn etcd");
            members.push(EtcdMember {
                name: name.clone(),
                client_port: client,
                child: Some(child),
            });
        }
        let cluster = EtcdCluster { members, dir };
        for m in &cluster.members {
            let url = format!("http://127.0.0.1:{}/health", m.client_port);
            let healthy = eventually(Duration::from_secs(20), || {
                let url = url.clone();
                async move {
                    match super::client().get(&url).send().await {
                        Ok(r) if r.status() == 200 => r
                            .json::<serde_json::Value>()
                            .await
                            .is_ok_and(|v| v["health"] == "true"),
                        _ => false,
                    }
                }
            })
            .await;
            assert!(
                healthy,
                "etcd member {} did not become healthy:\n{}",
                m.name,
                log_tail(&cluster.dir.path().join(format!("{}.log", m.name)), 20)
            );
        }
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Index of the current leader: each member is asked for its status (the etcd client
    /// crate's Maintenance API) and the one whose member id is the leader's is it.
    pub async fn leader(&self) -> Option<usize> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2));
        for (i, endpoint) in self.endpoints().iter().enumerate() {
            let Ok(mut client) =
                etcd_client::Client::connect([endpoint.as_str()], Some(options.clone())).await
            else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            if status.header().map(|h| h.member_id()) == Some(status.leader()) {
                return Some(i);
            }
        }
        None
    }

    pub fn kill9(&mut self, i: usize) {
        kill_child(&mut self.members[i].child);
    }

    /// SIGSTOP member `i`: its connections stay open and its requests go unanswered, as
    /// with a hung host.
    pub fn pause(&self, i: usize) {
        let child = self.members[i].child.as_ref().expect("etcd member running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("signal etcd");
    }

    /// Turns authentication on with one user, `root`, whose password is `password`.
    pub async fn enable_authentication(&self, password: &str) {
        let endpoints = self.endpoints();
        let mut client = etcd_client::Client::connect(&endpoints, None)
            .await
            .expect("connect to etcd");
        // The root role is built in on recent etcd releases; adding it again is refused.
        let _ = client.role_add("root").await;
        client
            .user_add("root", password, None)
            .await
            .expect("add root");
        client
            .user_grant_role("root", "root")
            .await
            .expect("grant root its role");
        client.auth_enable().await.expect("enable authentication");
    }
}

#[cfg(feature = "etcd")]
impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            kill_child(&mut m.child);
        }
    }
}

/// A config whose `store:` section is `store_yaml` (indented entries), with one
/// credential `crm` and its upstream (never contacted).
pub fn config_with_store(store_yaml: &str) -> String {
    format!(
        "store:
{store_yaml}credentials:
  crm:
    grant: refresh_token
    token_url: http://127.0.0.1:9/token
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
upstreams:
  crm:
    listen: 127.0.0.1:0
    url: http://127.0.0.1:9
    credential: crm
    allow_insecure_http: true
"
    )
}
