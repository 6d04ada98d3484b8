//! The status page in headless Chromium: a healthy instance and one with a dead grant
//! (screenshots written under the tests' temporary directory, `target/tmp`, their paths
//! printed), the
//! code form exchanging an authorization code against the demo server, the page's DOM,
//! and the guards of its actions (CSRF token, loopback, admin token). No secret reaches
//! the page or `/status`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::tools::tool;
use testkit::{ApiServer, AuthServer, AuthServerOptions};

const REDIRECT: &str = "http://127.0.0.1:1/callback";

struct Env {
    auth: AuthServer,
    _api: ApiServer,
    relay: support::Running,
    yaml: String,
    dir: tempfile::TempDir,
}

/// `crm` (refresh_token: a live grant, or a dead one) and `billing`
/// (client_credentials), each with an upstream.
async fn start_env(dead: bool, admin_extra: &str) -> Env {
    start_env_with(dead, "127.0.0.1:0", admin_extra, |_| String::new()).await
}

/// [`start_env`] with the admin listener at `admin_listen`, `admin_extra` in `admin:`
/// and `crm_extra(auth)` in `crm`'s settings.
async fn start_env_with(
    dead: bool,
    admin_listen: &str,
    admin_extra: &str,
    crm_extra: impl Fn(&AuthServer) -> String,
) -> Env {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
admin: {{ listen: "{admin_listen}"{admin_extra} }}
store: {{ type: file, path: "{state}" }}
credentials:
  crm: {{ grant: refresh_token, token_url: "{t}", client_id: demo-client, client_secret: demo-secret, refresh_token_idle_lifetime: 90d, allow_insecure_http: true, {crm} }}
  billing: {{ grant: client_credentials, token_url: "{t}", client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}
upstreams:
  crm: {{ listen: "127.0.0.1:0", url: "{u}", credential: crm, allow_insecure_http: true }}
  billing: {{ listen: "127.0.0.1:0", url: "{u}", credential: billing, allow_insecure_http: true }}
"#,
        state = dir.path().join("state").display(),
        t = auth.token_url(),
        u = api.url(),
        crm = {
            let extra = crm_extra(&auth);
            if extra.is_empty() {
                format!(r#"redirect_uri: "{REDIRECT}""#)
            } else {
                extra
            }
        },
    );
    let refresh = if dead {
        "a-refresh-token-the-server-never-issued".to_string()
    } else {
        auth.new_grant()
    };
    support::seed_refresh_token(&yaml, "crm", &refresh).await;
    let relay = support::start(&yaml).await;
    let want = if dead {
        "reauthorization_required"
    } else {
        "ready"
    };
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            support::credential_state(&relay, "crm").await == want
                && support::credential_state(&relay, "billing").await == "ready"
        })
        .await,
        "crm did not become {want}"
    );
    Env {
        auth,
        _api: api,
        relay,
        yaml,
        dir,
    }
}

/// Headless Chromium with a profile of its own.
struct Browser {
    chromium: PathBuf,
    profile: tempfile::TempDir,
}

impl Browser {
    fn new() -> Option<Browser> {
        Some(Browser {
            chromium: tool("chromium")?,
            profile: tempfile::tempdir().unwrap(),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,1400",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", self.profile.path().display()));
        cmd
    }

    /// The DOM after `url` loaded (and any navigation it started settled).
    fn dom(&self, url: &str) -> String {
        let out = self.command().arg("--dump-dom").arg(url).output().unwrap();
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A PNG of `url` at `path`.
    fn screenshot(&self, url: &str, path: &Path) {
        let out = self
            .command()
            .arg(format!("--screenshot={}", path.display()))
            .arg(url)
            .output()
            .unwrap();
        assert!(out.status.success());
        let png = std::fs::read(path).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000);
        println!("screenshot: {}", path.display());
    }
}

/// The value of the page's hidden `csrf` field.
fn csrf_of(html: &str) -> String {
    let at = html
        .find(r#"name="csrf" value=""#)
        .expect("the page has a form")
        + r#"name="csrf" value=""#.len();
    html[at..].split('"').next().unwrap().to_string()
}

/// The access token the upstream received (the API server echoes the request).
async fn token_seen_upstream(relay: &support::Running, upstream: &str) -> String {
    let echo: serde_json::Value = support::client()
        .get(format!("{}/echo", relay.url(upstream)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth = echo["headers"]["authorization"][0].as_str().unwrap();
    auth.strip_prefix("Bearer ").unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_instance_in_chromium() {
    let Some(browser) = Browser::new() else {
        return;
    };
    let env = start_env(false, "").await;
    let mut secrets = vec!["demo-secret".to_string()];
    for upstream in ["crm", "billing"] {
        secrets.push(token_seen_upstream(&env.relay, upstream).await);
    }
    let c = support::client();
    for _ in 0..3 {
        c.get(format!("{}/status/404", env.relay.url("billing")))
            .send()
            .await
            .unwrap();
    }
    // An access token the upstream stops accepting: the request is replayed with a
    // new token after the 401, and the timeline shows it.
    env.auth.expire_access_tokens();
    secrets.push(token_seen_upstream(&env.relay, "crm").await);
    let stored = support::stored_state(&env.yaml, "crm").await.unwrap();
    secrets.push(stored.refresh_token.unwrap().expose().to_string());

    let dom = browser.dom(&env.relay.admin_url("/"));
    for needle in [
        r#"<p id="summary" class="summary ok">2 of 2 credentials healthy</p>"#,
        r#"<section class="cred" id="cred-crm">"#,
        r#"<span class="state ready">ready</span>"#,
        r#"<svg class="timeline""#,
        r#"class="ev refresh success""#,
        r#"class="ev state ready""#,
        r#"<svg class="sparkline""#,
        "2xx 1",
        "4xx 3",
        "2xx 2",
        r#"class="ev replay""#,
        "request replayed after a 401: answered 200",
        r#"class="ev refresh success""#,
        "expires in ",
        "scheduled refresh in ",
        r#"<div class="bar ok"><div style="width:100%"></div></div> dies in 89d 23h"#,
        "idle lifetime: dies unless used before",
        r#"<span class="estimate""#,
    ] {
        assert!(dom.contains(needle), "the page lacks {needle:?}:\n{dom}");
    }
    assert!(!dom.contains("What to do now"), "nothing to do:\n{dom}");
    let status = support::get_text(&env.relay.admin_url("/status")).await;
    for s in &secrets {
        assert!(!dom.contains(s.as_str()), "a secret reached the page");
        assert!(!status.contains(s.as_str()), "a secret reached /status");
    }
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-healthy.png");
    browser.screenshot(&env.relay.admin_url("/"), &shot);
    env.relay.stop().await;
}

/// A dead grant is what the page says first; the code form on it exchanges a code
/// against the demo server, and the credential is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_grant_in_chromium_and_its_code_form() {
    let Some(browser) = Browser::new() else {
        return;
    };
    let env = start_env(true, "").await;
    let url = env.relay.admin_url("/");
    let dom = browser.dom(&url);
    for needle in [
        r#"<p id="summary" class="summary bad">1 of 2 credentials healthy · 1 needs re-authorization</p>"#,
        r#"<span class="state reauthorization_required">reauthorization required</span>"#,
        "What to do now",
        "tokenrelay authorize --config",
        "--credential crm",
        r#"class="ev refresh failure""#,
        "none: waiting for re-authorization",
        "dead: rejected, a new grant is needed",
        r#"<form class="code" method="post" action="/actions/authorize-code">"#,
    ] {
        assert!(dom.contains(needle), "the page lacks {needle:?}:\n{dom}");
    }
    // The dead credential comes before the healthy one.
    assert!(dom.find("cred-crm").unwrap() < dom.find("cred-billing").unwrap());

    // The form, filled in and submitted by the browser: the page itself has no script,
    // so a copy of it (same form, same CSRF token) submits itself once loaded.
    let code = env.auth.new_authorization_code(REDIRECT);
    let html = support::get_text(&url).await;
    let filled = html
        .replacen(
            "<head>",
            &format!(r#"<head><base href="http://{}/">"#, env.relay.admin),
            1,
        )
        .replacen(
            r#"<input name="code""#,
            &format!(r#"<input name="code" value="{code}""#),
            1,
        )
        .replacen(
            "</body>",
            "<script>document.querySelector('form.code').submit()</script></body>",
            1,
        );
    let page = env.dir.path().join("filled.html");
    std::fs::write(&page, filled).unwrap();
    let answer = browser.dom(&format!("file://{}", page.display()));
    assert!(
        answer.contains("authorized credential crm: tokens stored"),
        "the form's answer:\n{answer}"
    );
    assert!(!answer.contains(&code), "the code is not echoed");
    assert_eq!(env.auth.stats().authorization_codes, 1);
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            support::credential_state(&env.relay, "crm").await == "ready"
        })
        .await,
        "the new grant was adopted"
    );
    let dom = browser.dom(&url);
    assert!(dom.contains("2 of 2 credentials healthy"), "{dom}");
    assert!(dom.contains(r#"class="ev state reauthorization_required""#));
    env.relay.stop().await;
}

async fn post_form(url: &str, form: &[(&str, &str)], bearer: Option<&str>) -> (u16, String) {
    let mut req = support::client().post(url).form(form);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_the_csrf_token() {
    let env = start_env(true, "").await;
    let action = env.relay.admin_url("/actions/authorize-code");
    let csrf = csrf_of(&support::get_text(&env.relay.admin_url("/")).await);
    let code = env.auth.new_authorization_code(REDIRECT);
    for form in [
        vec![("credential", "crm"), ("code", code.as_str())],
        vec![
            ("credential", "crm"),
            ("code", code.as_str()),
            ("csrf", "forged"),
        ],
    ] {
        let (status, body) = post_form(&action, &form, None).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("CSRF token is missing or stale"), "{body}");
    }
    assert_eq!(
        env.auth.stats().authorization_codes,
        0,
        "nothing was exchanged"
    );
    // A GET does nothing.
    let r = support::client().get(&action).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // A rejected code says so in words.
    let (status, body) = post_form(
        &action,
        &[
            ("credential", "crm"),
            ("code", "not-a-code"),
            ("csrf", &csrf),
        ],
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("the authorization code was rejected"),
        "{body}"
    );
    assert_eq!(
        support::credential_state(&env.relay, "crm").await,
        "reauthorization_required"
    );
    env.relay.stop().await;
}

/// With `admin.token_file`, actions need that bearer token (from loopback too), and
/// the page's form asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_actions_need_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-admin-token\n").unwrap();
    let env = start_env(
        true,
        &format!(r#", token_file: "{}""#, token_file.display()),
    )
    .await;
    let page = support::get_text(&env.relay.admin_url("/")).await;
    assert!(page.contains(r#"name="admin_token""#));
    assert!(!page.contains("s3cret-admin-token"));
    let csrf = csrf_of(&page);
    let action = env.relay.admin_url("/actions/authorize-code");
    let code = env.auth.new_authorization_code(REDIRECT);
    let form = [
        ("credential", "crm"),
        ("code", code.as_str()),
        ("csrf", csrf.as_str()),
    ];
    for bearer in [None, Some("wrong")] {
        let (status, body) = post_form(&action, &form, bearer).await;
        assert_eq!(status, 401, "{body}");
    }
    assert_eq!(env.auth.stats().authorization_codes, 0);
    let (status, body) = post_form(&action, &form, Some("s3cret-admin-token")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("authorized credential crm"), "{body}");
    env.relay.stop().await;
}

/// A static token the upstream keeps rejecting is not "ready": the page says so and
/// what to do; a new token in the token_file makes it ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_static_token_is_not_ready() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "a-token-the-upstream-never-issued\n").unwrap();
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  legacy: {{ grant: static, token_file: "{file}" }}
upstreams:
  legacy: {{ listen: "127.0.0.1:0", url: "{u}", credential: legacy, allow_insecure_http: true }}
"#,
        file = token_file.display(),
        u = api.url()
    );
    let relay = support::start(&yaml).await;
    assert_eq!(support::credential_state(&relay, "legacy").await, "ready");
    let c = support::client();
    let r = c
        .get(format!("{}/echo", relay.url("legacy")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            support::credential_state(&relay, "legacy").await == "degraded"
        })
        .await,
        "a rejected static token is degraded"
    );
    let page = support::get_text(&relay.admin_url("/")).await;
    for needle in [
        r#"<p id="summary" class="summary warn">0 of 1 credential healthy · 1 is degraded</p>"#,
        "the upstream rejects this static token (401 since",
        "What to do now",
        "put a valid token in the credential",
    ] {
        assert!(page.contains(needle), "the page lacks {needle:?}:\n{page}");
    }
    assert!(!page.contains("a-token-the-upstream-never-issued"));
    std::fs::write(&token_file, format!("{}\n", auth.new_access_token())).unwrap();
    assert!(
        support::eventually(Duration::from_secs(20), || async {
            support::credential_state(&relay, "legacy").await == "ready"
        })
        .await,
        "a new token makes it ready"
    );
    relay.stop().await;
}

/// Where `redirect_uri` points at the admin listener, "Authorize again" starts the
/// provider's flow and the admin listener serves its callback: the browser ends on a
/// page saying the grant is stored, and the credential is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_again_through_the_admin_listener_in_chromium() {
    let Some(browser) = Browser::new() else {
        return;
    };
    let port = support::free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let env = start_env_with(true, &format!("127.0.0.1:{port}"), "", |auth| {
        // `auto=1`: the demo server approves at once, as a user clicking "allow".
        format!(
            r#"redirect_uri: "{redirect}", authorize_url: "{}?auto=1""#,
            auth.authorize_url()
        )
    })
    .await;
    let url = env.relay.admin_url("/");
    let html = support::get_text(&url).await;
    assert!(
        html.contains(r#"<form class="again" method="post" action="/actions/authorize-start">"#),
        "{html}"
    );
    let submit = html
        .replacen(
            "<head>",
            &format!(r#"<head><base href="http://{}/">"#, env.relay.admin),
            1,
        )
        .replacen(
            "</body>",
            "<script>document.querySelector('form.again').submit()</script></body>",
            1,
        );
    let page = env.dir.path().join("again.html");
    std::fs::write(&page, submit).unwrap();
    let answer = browser.dom(&format!("file://{}", page.display()));
    assert!(
        answer.contains("authorized credential crm: tokens stored"),
        "where the browser ended:\n{answer}"
    );
    assert_eq!(env.auth.stats().authorization_codes, 1);
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            support::credential_state(&env.relay, "crm").await == "ready"
        })
        .await,
        "the new grant was adopted"
    );
    // A callback with a state nobody started is refused.
    let r = support::client()
        .get(format!("{redirect}?code=abc&state=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "no authorization pending: not a callback at all"
    );
    // While one is pending, a callback with another state is refused, and the pending
    // one is not spent by it.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let start = no_redirects
        .post(env.relay.admin_url("/actions/authorize-start"))
        .form(&[("credential", "crm"), ("csrf", csrf_of(&html).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), 303);
    let location = start.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&env.auth.authorize_url()),
        "{location}"
    );
    assert!(
        location.contains("code_challenge_method=S256"),
        "{location}"
    );
    let r = support::client()
        .get(format!("{redirect}?code=abc&state=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("does not match a pending authorization"));
    assert_eq!(
        env.auth.stats().authorization_codes,
        1,
        "nothing more was exchanged"
    );
    env.relay.stop().await;
}

/// The real binary with a dead grant: the page's command names this process's config
/// file (absolute), never a placeholder. The dead-grant screenshot is of this page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_grant_names_the_real_config_file() {
    let Some(browser) = Browser::new() else {
        return;
    };
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", support::free_port());
    let yaml = format!(
        r#"
admin: {{ listen: "{admin}" }}
store: {{ type: file, path: "{state}" }}
credentials:
  crm: {{ grant: refresh_token, token_url: "{t}", client_id: demo-client, client_secret: demo-secret, redirect_uri: "{REDIRECT}", refresh_token_idle_lifetime: 90d, allow_insecure_http: true }}
  billing: {{ grant: client_credentials, token_url: "{t}", client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}
upstreams:
  crm: {{ listen: "127.0.0.1:0", url: "{u}", credential: crm, allow_insecure_http: true }}
  billing: {{ listen: "127.0.0.1:0", url: "{u}", credential: billing, allow_insecure_http: true }}
"#,
        state = dir.path().join("state").display(),
        t = auth.token_url(),
        u = api.url()
    );
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, &yaml).unwrap();
    support::seed_refresh_token(&yaml, "crm", "a-refresh-token-the-server-never-issued").await;
    let mut relay = support::ChildProc::spawn(&config, &dir.path().join("log"), &[]);
    let status = format!("http://{admin}/status");
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            support::client()
                .get(&status)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
                && support::status_json(&format!("http://{admin}")).await["credentials"]["crm"]
                    ["state"]
                    == "reauthorization_required"
        })
        .await,
        "crm did not become reauthorization_required"
    );
    let url = format!("http://{admin}/");
    let dom = browser.dom(&url);
    let command = format!(
        "tokenrelay authorize --config {} --credential crm",
        config.display()
    );
    assert!(dom.contains(&command), "the page lacks {command:?}:\n{dom}");
    assert!(!dom.contains("--config FILE"), "{dom}");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-dead-grant.png");
    browser.screenshot(&url, &shot);
    relay.terminate();
}
