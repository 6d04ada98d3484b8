//! Bootstrapping a `refresh_token` credential without keeping a secret:
//! `tokenrelay authorize --device` (RFC 8628) and `tokenrelay authorize --password`
//! (one password grant, the password never written anywhere). The real binary against
//! the real demo authorization server, loopback only.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use testkit::{AuthServer, AuthServerOptions, TokenRequestRecord};

/// RFC 8628 §3.4's grant type, as the demo server records it.
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// A config with credential `crm` (grant refresh_token, the demo client, the demo
/// server's token and device endpoints) and upstream `crm` in front of `api_url`.
fn write_config(dir: &Path, auth: &AuthServer, api_url: &str) -> PathBuf {
    let config = dir.join("config.yaml");
    std::fs::write(&config, config_yaml(dir, auth, api_url)).unwrap();
    config
}

fn config_yaml(dir: &Path, auth: &AuthServer, api_url: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
store: {{ type: file, path: "{state}" }}
credentials:
  crm:
    grant: refresh_token
    token_url: "{token}"
    device_authorization_url: "{device}"
    client_id: demo-client
    client_secret: demo-secret
    scopes: [read]
    allow_insecure_http: true
upstreams:
  crm: {{ listen: "127.0.0.1:0", url: "{api_url}", credential: crm, allow_insecure_http: true }}
"#,
        state = dir.join("state").display(),
        token = auth.token_url(),
        device = auth.device_authorization_url(),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// `tokenrelay authorize` running as a child process: its output lines as they come.
struct Authorize {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Authorize {
    /// Starts `tokenrelay authorize --config CONFIG --credential crm ARGS`; `stdin` is
    /// written to its standard input, which is then closed.
    fn spawn(config: &Path, args: &[&str], stdin: Option<&str>) -> Authorize {
        let mut child = Command::new(support::binary())
            .args(["authorize", "--credential", "crm", "--config"])
            .arg(config)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tokenrelay authorize");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(input.as_bytes()).unwrap();
        }
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let collected = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                collected.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let collected = stderr.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            collected.lock().unwrap().push_str(&s);
        });
        Authorize {
            child,
            lines,
            stdout,
            stderr,
        }
    }

    /// The first line the command prints that `pick` accepts, within `within`.
    async fn line(&self, within: Duration, pick: impl Fn(&str) -> Option<String>) -> String {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.lines.try_recv() {
                Ok(line) => {
                    if let Some(found) = pick(&line) {
                        return found;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        }
        panic!(
            "no such line within {within:?}; stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        );
    }

    /// The user code the device flow printed.
    async fn user_code(&self) -> String {
        self.line(Duration::from_secs(15), |l| {
            l.trim().strip_prefix("code: ").map(str::to_owned)
        })
        .await
    }

    /// Waits for the exit (at most a minute): the status, stdout and stderr.
    async fn finish(mut self) -> (ExitStatus, String, String) {
        let status = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(s) = self.child.try_wait().unwrap() {
                    return (s, self.stdout, self.stderr);
                }
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    panic!("tokenrelay authorize did not finish within a minute");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap();
        // The reader threads end with the pipes; give them a moment to flush.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (s, out, err) = status;
        let (out, err) = (out.lock().unwrap().clone(), err.lock().unwrap().clone());
        (s, out, err)
    }
}

/// The device-code polls the demo server has answered so far.
fn device_polls(auth: &AuthServer) -> Vec<TokenRequestRecord> {
    auth.requests_log()
        .into_iter()
        .filter(|r| r.grant_type == DEVICE_CODE_GRANT)
        .collect()
}

/// Waits until a device-code poll was answered `error`.
async fn wait_for_poll_answer(auth: &AuthServer, error: &str) {
    let seen = support::eventually(Duration::from_secs(20), || async {
        device_polls(auth)
            .iter()
            .any(|r| r.error.as_deref() == Some(error))
    })
    .await;
    assert!(
        seen,
        "no poll was answered {error}: {:?}",
        device_polls(auth)
    );
}

/// `tokenrelay status` for the config: its stdout.
async fn status(config: &Path) -> String {
    text(
        &support::cli(&["status", "--config", config.to_str().unwrap()])
            .await
            .stdout,
    )
}

fn device_options(interval: Duration) -> AuthServerOptions {
    AuthServerOptions {
        device_interval: interval,
        ..AuthServerOptions::default()
    }
}

/// The device flow end to end: the address and code are printed, polls hear
/// `authorization_pending` until the user approves, the answer is stored as generation
/// 1, and a running instance that had nothing adopts it and serves with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_flow_waits_for_approval_and_a_running_instance_adopts_the_grant() {
    let demo = support::demo_servers(device_options(Duration::from_secs(1))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &demo.auth, &demo.api.url());
    let relay = support::start(&config_yaml(dir.path(), &demo.auth, &demo.api.url())).await;
    let url = format!("{}/echo", relay.url("crm"));
    let c = support::client();
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        503,
        "no grant yet"
    );

    let run = Authorize::spawn(&config, &["--device"], None);
    let user_code = run.user_code().await;
    wait_for_poll_answer(&demo.auth, "authorization_pending").await;
    assert!(demo.auth.approve_device(&user_code));
    let (status_code, stdout, stderr) = run.finish().await;
    assert!(status_code.success(), "authorize --device failed: {stderr}");
    assert!(
        stdout.contains(&demo.auth.verification_url())
            && stdout.contains(&format!("code: {user_code}"))
            && stdout.contains(&format!("user_code={user_code}")),
        "the address, the code and the complete address are printed:\n{stdout}"
    );
    assert!(stdout.contains("generation 1"), "{stdout}");
    let polls = device_polls(&demo.auth);
    assert!(
        polls
            .iter()
            .all(|p| p.param("device_code") == Some("<redacted>")
                && p.param("scope").is_none()
                && p.client_auth == "body"),
        "{polls:?}"
    );
    assert!(polls
        .iter()
        .all(|p| p.error.as_deref() != Some("slow_down")));

    // The running instance adopts the grant without a restart, and serves with it.
    let served = support::eventually(Duration::from_secs(15), || async {
        matches!(c.get(&url).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    assert!(served, "the running instance adopts the device-flow grant");
    relay.stop().await;
    assert!(status(&config).await.contains("crm: ready"));
}

/// `slow_down` adds five seconds to the interval for every later poll. (A client that
/// ignores it keeps polling too soon and hears `slow_down` until its code expires.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_makes_the_device_flow_poll_less_often() {
    let auth = AuthServer::start(AuthServerOptions {
        device_code_ttl: Duration::from_secs(40),
        ..device_options(Duration::from_secs(1))
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &auth, "http://127.0.0.1:9");

    let run = Authorize::spawn(&config, &["--device"], None);
    let user_code = run.user_code().await;
    assert!(auth.demand_slow_down(&user_code));
    wait_for_poll_answer(&auth, "slow_down").await;
    assert!(auth.approve_device(&user_code));
    let (status_code, stdout, stderr) = run.finish().await;
    assert!(
        status_code.success(),
        "authorize --device failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("slow_down") && stderr.contains("every 6 s"),
        "{stderr}"
    );
    let polls = device_polls(&auth);
    let slowed = polls
        .iter()
        .position(|p| p.error.as_deref() == Some("slow_down"))
        .unwrap();
    assert_eq!(
        polls[slowed + 1..]
            .iter()
            .filter(|p| p.error.as_deref() == Some("slow_down"))
            .count(),
        0,
        "no poll came too soon after slow_down: {polls:?}"
    );
    let gap = polls[slowed + 1].at.duration_since(polls[slowed].at);
    assert!(
        gap >= Duration::from_secs(6),
        "the interval grew from 1 s to 6 s: the next poll came after {gap:?}"
    );
    assert_eq!(polls.last().unwrap().status, 200);
}

/// A device flow the server ends with `refuse` (given the user code): exit 1, and the
/// error says each of `says`. Returns the server and the config file.
async fn refused_device_flow(
    dir: &tempfile::TempDir,
    refuse: impl Fn(&AuthServer, &str) -> bool,
    says: &[&str],
) -> (AuthServer, PathBuf) {
    let auth = AuthServer::start(device_options(Duration::from_secs(1)))
        .await
        .unwrap();
    let config = write_config(dir.path(), &auth, "http://127.0.0.1:9");
    let run = Authorize::spawn(&config, &["--device"], None);
    let user_code = run.user_code().await;
    assert!(refuse(&auth, &user_code));
    let (status_code, _, stderr) = run.finish().await;
    assert_eq!(status_code.code(), Some(1), "{stderr}");
    for words in says {
        assert!(stderr.contains(words), "{words:?} not in: {stderr}");
    }
    (auth, config)
}

/// An expired device code ends the flow with exit 1 and a message saying what happened
/// and what to do; nothing is stored. The same when the code's lifetime runs out
/// without the server saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_device_code_exits_1_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (auth, _) = refused_device_flow(
        &dir,
        |auth, code| auth.expire_device_code(code),
        &[
            "the device code expired before the sign-in was approved",
            "nothing was stored",
            "tokenrelay authorize --credential crm --device",
        ],
    )
    .await;
    assert!(device_polls(&auth)
        .iter()
        .any(|p| p.error.as_deref() == Some("expired_token")));

    // A code that lives two seconds: the command stops polling on its own at expires_in.
    let short = AuthServer::start(AuthServerOptions {
        device_code_ttl: Duration::from_secs(2),
        ..device_options(Duration::from_secs(1))
    })
    .await
    .unwrap();
    let config = write_config(dir.path(), &short, "http://127.0.0.1:9");
    let started = Instant::now();
    let (status_code, _, stderr) = Authorize::spawn(&config, &["--device"], None)
        .finish()
        .await;
    assert_eq!(status_code.code(), Some(1), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(status(&config).await.contains("nothing stored"));
}

/// A denied request ends the flow with exit 1 and a message; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_device_request_exits_1_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config) = refused_device_flow(
        &dir,
        |auth, code| auth.deny_device(code),
        &[
            "the sign-in was denied at the provider",
            "nothing was stored",
            "approve the request",
        ],
    )
    .await;
    assert!(status(&config).await.contains("nothing stored"));
}

/// A credential without device_authorization_url is told where to get one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_flow_needs_a_device_authorization_url() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        config_yaml(dir.path(), &auth, "http://127.0.0.1:9").replace(
            &format!(
                "    device_authorization_url: \"{}\"\n",
                auth.device_authorization_url()
            ),
            "",
        ),
    )
    .unwrap();
    let (status_code, _, stderr) = Authorize::spawn(&config, &["--device"], None)
        .finish()
        .await;
    assert_eq!(status_code.code(), Some(1));
    assert!(
        stderr.contains("credentials.crm.device_authorization_url is not set"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// authorize --password
// ---------------------------------------------------------------------------------------

/// A password nothing else contains, so finding it anywhere is a leak.
const PASSWORD: &str = "correct-horse-battery-staple-7Qx";

fn password_options(access_ttl: Duration) -> AuthServerOptions {
    AuthServerOptions {
        username: "alice".into(),
        password: PASSWORD.into(),
        access_ttl,
        ..AuthServerOptions::default()
    }
}

/// Spellings of `secret` that a careless program might write: itself, and base64 (both
/// alphabets) of it at each of the three byte alignments it can have inside a longer
/// encoded value (the characters that depend on neighbouring bytes are left out).
fn spellings(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let mut out = vec![secret.to_string()];
    for offset in 0..3 {
        let mut bytes = vec![0u8; offset];
        bytes.extend_from_slice(secret.as_bytes());
        for encoded in [STANDARD.encode(&bytes), URL_SAFE_NO_PAD.encode(&bytes)] {
            let skip = if offset == 0 { 0 } else { 4 };
            let core: String = encoded.chars().skip(skip).collect();
            let core = &core[..core.len().saturating_sub(4)];
            out.push(core.to_string());
        }
    }
    out
}

/// Files under `dir` (recursively) holding any of `needles`.
fn files_containing(dir: &Path, needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap_or_default();
            let haystack = String::from_utf8_lossy(&bytes);
            for n in needles {
                if haystack.contains(n.as_str()) {
                    found.push(format!("{} holds {n:?}", path.display()));
                }
            }
        }
    }
    found
}

/// One password grant stores the grant; no file under the config or store directory
/// holds the password in any spelling, nor does the command's output; then the
/// credential runs on its stored refresh token: two rotations, no password sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_once_stores_the_grant_and_forgets_the_password() {
    let needles = spellings(PASSWORD);
    assert!(needles.iter().all(|n| n.len() >= 20), "{needles:?}");
    let demo = support::demo_servers(password_options(Duration::from_secs(3))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &demo.auth, &demo.api.url());

    let run = Authorize::spawn(
        &config,
        &["--password", "--username", "alice", "--password-file", "-"],
        Some(&format!("{PASSWORD}\n")),
    );
    let (status_code, stdout, stderr) = run.finish().await;
    assert!(
        status_code.success(),
        "authorize --password failed: {stderr}"
    );
    assert!(stdout.contains("generation 1"), "{stdout}");
    let exchange = demo.auth.requests_log().pop().unwrap();
    assert_eq!(exchange.grant_type, "password");
    assert_eq!(exchange.param("username"), Some("alice"));
    assert_eq!(exchange.param("scope"), Some("read"));
    assert_eq!(exchange.status, 200);

    let leaks = files_containing(dir.path(), &needles);
    assert!(leaks.is_empty(), "the password was written: {leaks:?}");
    assert!(
        !needles
            .iter()
            .any(|n| stdout.contains(n.as_str()) || stderr.contains(n.as_str())),
        "the password was printed"
    );
    let cfg = status(&config).await;
    assert!(cfg.contains("crm: ready (grant refresh_token)"), "{cfg}");

    // A running instance uses the stored grant: it rotates twice (the access token lives
    // 3 s), spending each refresh token once, and the password is never sent again.
    let relay = support::start(&config_yaml(dir.path(), &demo.auth, &demo.api.url())).await;
    let url = format!("{}/echo", relay.url("crm"));
    let c = support::client();
    let rotated = support::eventually(Duration::from_secs(30), || async {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
        demo.auth.stats().rotations >= 2
    })
    .await;
    relay.stop().await;
    let stats = demo.auth.stats();
    assert!(
        rotated,
        "two rotations with the stored refresh token: {stats:?}"
    );
    assert_eq!(stats.password, 1, "the password was sent once: {stats:?}");
    assert_eq!((stats.invalid_grant, stats.refresh_reuse_detected), (0, 0));
    let leaks = files_containing(dir.path(), &needles);
    assert!(leaks.is_empty(), "the password was written: {leaks:?}");
}

/// An answer without refresh_token is refused (nothing stored) unless its access token
/// lives at least 30 days; a wrong password is refused too, without echoing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_once_refuses_an_answer_without_a_refresh_token() {
    let auth = AuthServer::start(password_options(Duration::from_secs(3600)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &auth, "http://127.0.0.1:9");
    let password_args = ["--password", "--username", "alice", "--password-file", "-"];
    let stdin = format!("{PASSWORD}\n");

    let patch = |fields: serde_json::Value| fields.as_object().unwrap().clone();
    auth.alter_next_answer(patch(serde_json::json!({ "refresh_token": null })));
    let (status_code, _, stderr) = Authorize::spawn(&config, &password_args, Some(&stdin))
        .finish()
        .await;
    assert_eq!(status_code.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("issued no refresh_token")
            && stderr.contains("lives 1h")
            && stderr.contains("nothing was stored")
            && stderr.contains("grant: password"),
        "{stderr}"
    );
    assert!(status(&config).await.contains("nothing stored"));

    // A wrong password: refused, and not echoed.
    let (status_code, _, stderr) =
        Authorize::spawn(&config, &password_args, Some("not-the-password-Zk41\n"))
            .finish()
            .await;
    assert_eq!(status_code.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the username or password was not accepted")
            && !stderr.contains("not-the-password-Zk41"),
        "{stderr}"
    );
    assert!(status(&config).await.contains("nothing stored"));

    // A long-lived access token (31 days) is the grant: stored as with --code.
    auth.alter_next_answer(patch(
        serde_json::json!({ "refresh_token": null, "expires_in": 31 * 86400 }),
    ));
    let (status_code, stdout, stderr) = Authorize::spawn(&config, &password_args, Some(&stdin))
        .finish()
        .await;
    assert!(status_code.success(), "{stderr}");
    assert!(stdout.contains("generation 1"), "{stdout}");
    assert!(stderr.contains("long-lived token"), "{stderr}");
    let leaks = files_containing(dir.path(), &spellings(PASSWORD));
    assert!(leaks.is_empty(), "the password was written: {leaks:?}");
}
