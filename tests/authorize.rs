//! `tokenrelay authorize`: exchanging a pasted code, refusing an expired one clearly, and
//! the browser flow through a locally served redirect_uri callback. Real binary, real
//! demo authorization server, loopback only.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::{AuthServer, AuthServerOptions};

fn write_config(dir: &Path, auth: &AuthServer, redirect_uri: &str) -> std::path::PathBuf {
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
admin: {{ listen: "127.0.0.1:0" }}
store: {{ type: file, path: "{state}" }}
credentials:
  crm:
    grant: refresh_token
    token_url: "{token}"
    authorize_url: "{authorize}"
    client_id: demo-client
    client_secret: demo-secret
    redirect_uri: "{redirect_uri}"
    allow_insecure_http: true
upstreams:
  crm: {{ listen: "127.0.0.1:0", url: "http://127.0.0.1:9", credential: crm, allow_insecure_http: true }}
"#,
            state = dir.join("state").display(),
            token = auth.token_url(),
            authorize = auth.authorize_url(),
        ),
    )
    .unwrap();
    config
}

/// Runs the binary off the runtime's worker threads: the demo authorization server it
/// talks to runs on this same runtime and must not be starved by a blocked worker.
async fn cli(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::run_cli(&args)
    })
    .await
    .unwrap()
}

/// `tokenrelay authorize --code CODE` for credential `crm`.
async fn authorize_with_code(cfg: &str, code: &str) -> std::process::Output {
    cli(&[
        "authorize",
        "--config",
        cfg,
        "--credential",
        "crm",
        "--code",
        code,
    ])
    .await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pasted_code_is_exchanged_and_stored() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let redirect = "https://example.com/oauth/callback";
    let config = write_config(dir.path(), &auth, redirect);
    let code = auth.new_authorization_code(redirect);

    let cfg = config.to_str().unwrap();
    let out = authorize_with_code(cfg, &code).await;
    assert!(
        out.status.success(),
        "authorize failed: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("generation 1"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(auth.stats().authorization_codes, 1);
    let exchange = auth.requests_log().into_iter().last().unwrap();
    assert_eq!(exchange.grant_type, "authorization_code");
    assert_eq!(exchange.param("redirect_uri"), Some(redirect));

    let status = cli(&["status", "--config", cfg]).await;
    let status_text = text(&status.stdout);
    assert!(status.status.success());
    assert!(
        status_text.contains("crm: ready (grant refresh_token)")
            && status_text.contains(&format!("{:<21} 1", "generation:")),
        "{status_text}"
    );
    assert!(!status_text.contains(&code));

    // The same code a second time: refused, with advice, and the stored grant untouched.
    let again = authorize_with_code(cfg, &code).await;
    assert_eq!(again.status.code(), Some(1));
    let err = text(&again.stderr);
    assert!(err.contains("rejected") && err.contains("expire"), "{err}");
    assert!(text(&cli(&["status", "--config", cfg]).await.stdout)
        .contains(&format!("{:<21} 1", "generation:")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_fails_clearly_and_stores_nothing() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let redirect = "https://example.com/oauth/callback";
    let config = write_config(dir.path(), &auth, redirect);
    let code = auth.new_authorization_code(redirect);
    auth.expire_authorization_code(&code);

    let cfg = config.to_str().unwrap();
    let out = authorize_with_code(cfg, &code).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("authorization code was rejected") && err.contains("expire"),
        "{err}"
    );
    assert!(!err.contains(&code), "the code is not echoed");
    let status = text(&cli(&["status", "--config", cfg]).await.stdout);
    assert!(status.contains("nothing stored"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_flow_is_completed_through_the_local_callback() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let config = write_config(dir.path(), &auth, &redirect);

    let mut child = Command::new(support::binary())
        .args(["authorize", "--credential", "crm", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The printed authorize URL: the user would open it in a browser.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut url = None;
    let mut waiting = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(15)) {
        if line.trim().starts_with(&auth.authorize_url()) {
            url = Some(line.trim().to_string());
        }
        if line.contains("Waiting for the callback") {
            waiting = true;
            break;
        }
    }
    let url = url.expect("authorize URL printed");
    assert!(waiting, "callback server announced");
    assert!(
        url.contains("code_challenge_method=S256") && url.contains("state="),
        "{url}"
    );

    // The "browser": approve, follow the redirect to the local callback.
    tokenrelay::install_crypto_provider();
    let browser = reqwest::Client::builder().no_proxy().build().unwrap();
    let page = browser.get(format!("{url}&auto=1")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Authorized"));

    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.status.success(),
        "authorize failed: {}",
        text(&status.stderr)
    );
    let cfg = config.to_str().unwrap();
    let stored = text(&cli(&["status", "--config", cfg]).await.stdout);
    assert!(stored.contains("crm: ready"), "{stored}");
    assert_eq!(auth.stats().authorization_codes, 1);
}
