//! Token-answer fields and upstream urls taken from them (`url: "{token.instance_url}/v1"`),
//! in-process against real servers on loopback: the demo authorization server adding
//! `instance_url` to its answers, two demo APIs standing for two Salesforce instances,
//! and tokenrelay on the real file store.
//!
//! Covered: the first answer's instance receives the requests (with the bearer, under the
//! template's path); a rotation that changes the field moves them (the 401 retry goes to
//! the new instance); a rotation that omits it keeps the old one; redirects are rewritten
//! against the resolved base; the field is stored with the token and used after a restart
//! and by a second instance adopting a rotation, with no token request of their own; a
//! missing field gives 503 and an unusable one 502, each naming the field, until an answer
//! brings a good one (client_credentials, kept in memory); a rejected value names the
//! field and the rule, never the value, and `/readyz` is 503 meanwhile; `authorize --code`
//! storing the code answer's fields (shown by `status`); config validation and `check`,
//! secret names in any spelling refused, and never shown from an older stored state.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use support::{client, eventually, status_json};
use testkit::{ApiServer, AuthServer, AuthServerOptions};
use tokenrelay::config::Config;

fn fields(pairs: &[(&str, &str)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

/// A refresh_token credential `sf` on the file store in `state`, an upstream `sf` at
/// `{token.instance_url}/v1` and an upstream `root` at `{token.instance_url}`.
fn config_yaml(token_url: &str, state: &Path) -> String {
    format!(
        "admin: {{ listen: 127.0.0.1:0 }}
store: {{ type: file, path: {state}, poll_interval: 200ms }}
credentials:
  sf:
    grant: refresh_token
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
    token_timeout: 2s
upstreams:
  sf: {{ listen: 127.0.0.1:0, url: \"{{token.instance_url}}/v1\", credential: sf, allow_insecure_http: true }}
  root: {{ listen: 127.0.0.1:0, url: \"{{token.instance_url}}\", credential: sf, allow_insecure_http: true }}
",
        state = state.display()
    )
}

struct Fixture {
    auth: AuthServer,
    /// Two instances of the same API (the same tokens are valid on both).
    one: ApiServer,
    two: ApiServer,
    dir: tempfile::TempDir,
    yaml: String,
}

async fn fixture() -> Fixture {
    if std::env::var_os("TEST_LOG").is_some() {
        tokenrelay::init_logging(tokenrelay::config::LogFormat::Text, Some("debug"));
    }
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(300),
        ..AuthServerOptions::default()
    })
    .await
    .unwrap();
    let one = ApiServer::start(Some(auth.validator())).await.unwrap();
    let two = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_yaml(&auth.token_url(), &dir.path().join("state"));
    Fixture {
        auth,
        one,
        two,
        dir,
        yaml,
    }
}

/// `GET {base}{path}`: status and body.
async fn get(base: &str, path: &str) -> (u16, String) {
    let r = client().get(format!("{base}{path}")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `GET {base}{path}` until it answers `want` (up to 10 s); the last answer.
async fn get_until(base: &str, path: &str, want: u16) -> (u16, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = get(base, path).await;
        if answer.0 == want || std::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stored `instance_url` of credential `sf`.
async fn stored_instance(yaml: &str) -> Option<String> {
    let cfg = Config::from_yaml(yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&cfg.store).unwrap();
    let state = store.load("sf").await.unwrap()?;
    state.answer_fields.get("instance_url").cloned()
}

/// The last request `api` received was `uri` with a bearer token.
fn assert_reached(api: &ApiServer, uri: &str) {
    let last = api.last_request().expect("the instance received a request");
    assert_eq!(last.uri, uri);
    let auth = last
        .headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(auth.starts_with("Bearer "), "no bearer token forwarded");
}

#[tokio::test]
async fn requests_follow_the_instance_url_of_the_current_token() {
    let f = fixture().await;
    f.auth
        .set_answer_fields(fields(&[("instance_url", &f.one.url())]));
    support::seed_refresh_token(&f.yaml, "sf", &f.auth.new_grant()).await;
    let running = support::start(&f.yaml).await;
    let sf = running.url("sf");

    // The first answer names instance one: requests go there, under the template's path.
    let (code, body) = get(&sf, "/echo?a=1").await;
    assert_eq!(code, 200, "{body}");
    assert_reached(&f.one, "/v1/echo?a=1");
    assert_eq!(f.two.stats().requests, 0);
    assert_eq!(stored_instance(&f.yaml).await, Some(f.one.url()));
    let status = status_json(&format!("http://{}", running.admin)).await;
    let cred = &status["credentials"]["sf"];
    assert_eq!(cred["answer_fields"]["instance_url"], json!(f.one.url()));
    assert_eq!(
        cred["upstream_urls"]["sf"]["url"],
        json!(format!("{}/v1", f.one.url()))
    );
    assert_eq!(cred["upstream_urls"]["root"]["url"], json!(f.one.url()));
    assert_eq!(
        cred["upstream_urls"]["sf"]["template"],
        json!("{token.instance_url}/v1")
    );
    // A templated upstream is served by the fast engine, which follows the token.
    assert_eq!(status["upstreams"]["sf"]["engine"], "fast");

    // The org moves: the next answer names instance two. The access token is rejected
    // by instance one, the refresh brings the new instance_url, and the retry (and every
    // request after it) goes to instance two.
    f.auth
        .set_answer_fields(fields(&[("instance_url", &f.two.url())]));
    f.auth.expire_access_tokens();
    let refreshes = f.auth.stats().refreshes;
    let (code, body) = get(&sf, "/echo?b=2").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(f.auth.stats().refreshes, refreshes + 1);
    assert_reached(&f.two, "/v1/echo?b=2");
    let one_before = f.one.stats().requests;
    let (code, _) = get(&sf, "/echo").await;
    assert_eq!(code, 200);
    assert_reached(&f.two, "/v1/echo");
    assert_eq!(f.one.stats().requests, one_before);
    assert_eq!(stored_instance(&f.yaml).await, Some(f.two.url()));

    // Redirects from the resolved instance are rewritten to the listener.
    let root = running.url("root");
    let r = client()
        .get(format!("{root}/redirect"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("{root}/echo?from=redirect")
    );

    // A rotation whose answer omits instance_url keeps the one known.
    f.auth.set_answer_fields(Map::new());
    f.auth.expire_access_tokens();
    let (code, body) = get(&sf, "/echo?c=3").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(f.auth.stats().refreshes, refreshes + 2);
    assert_reached(&f.two, "/v1/echo?c=3");
    assert_eq!(stored_instance(&f.yaml).await, Some(f.two.url()));
    running.stop().await;
}

#[tokio::test]
async fn the_instance_is_stored_with_the_token_for_restarts_and_replicas() {
    let f = fixture().await;
    f.auth
        .set_answer_fields(fields(&[("instance_url", &f.one.url())]));
    support::seed_refresh_token(&f.yaml, "sf", &f.auth.new_grant()).await;
    let first = support::start(&f.yaml).await;
    let (code, body) = get(&first.url("sf"), "/echo").await;
    assert_eq!(code, 200, "{body}");
    first.stop().await;
    assert_eq!(stored_instance(&f.yaml).await, Some(f.one.url()));

    // Restart: the stored token is adopted without a token request, and its stored
    // instance_url routes the upstream (answers would not carry it any more).
    f.auth.set_answer_fields(Map::new());
    let requests = f.auth.stats().token_requests;
    let a = support::start(&f.yaml).await;
    let (code, body) = get(&a.url("sf"), "/echo?after=restart").await;
    assert_eq!(code, 200, "{body}");
    assert_reached(&f.one, "/v1/echo?after=restart");
    assert_eq!(f.auth.stats().token_requests, requests, "no token request");

    // A second instance on the same store; the first rotates to instance two, and the
    // second adopts the rotation from the store, instance_url included, without a
    // token request of its own.
    let b = support::start(&f.yaml).await;
    let (code, _) = get(&b.url("sf"), "/echo").await;
    assert_eq!(code, 200);
    assert_eq!(f.auth.stats().token_requests, requests);
    f.auth
        .set_answer_fields(fields(&[("instance_url", &f.two.url())]));
    f.auth.expire_access_tokens();
    let (code, body) = get(&a.url("sf"), "/echo?from=a").await;
    assert_eq!(code, 200, "{body}");
    assert_reached(&f.two, "/v1/echo?from=a");
    assert_eq!(f.auth.stats().token_requests, requests + 1);
    let admin_b = format!("http://{}", b.admin);
    let want = json!(format!("{}/v1", f.two.url()));
    assert!(
        eventually(Duration::from_secs(10), || {
            let admin_b = admin_b.clone();
            let want = want.clone();
            async move {
                status_json(&admin_b).await["credentials"]["sf"]["upstream_urls"]["sf"]["url"]
                    == want
            }
        })
        .await,
        "the second instance adopted the rotated token and its instance_url"
    );
    let (code, body) = get(&b.url("sf"), "/echo?from=b").await;
    assert_eq!(code, 200, "{body}");
    assert_reached(&f.two, "/v1/echo?from=b");
    assert_eq!(f.auth.stats().token_requests, requests + 1);
    a.stop().await;
    b.stop().await;
}

/// A missing field is a 503, an unusable one a 502, both naming the field (never a
/// token); a later answer with a usable value is picked up at the next refresh. Uses
/// client_credentials, whose fields live in memory only.
#[tokio::test]
async fn a_missing_or_unusable_field_is_a_clear_error_until_an_answer_brings_it() {
    let (auth, api, running) = client_credentials_fixture().await;
    let sf = running.url("sf");
    let admin = format!("http://{}", running.admin);
    assert!(
        eventually(Duration::from_secs(10), || {
            let admin = admin.clone();
            async move { status_json(&admin).await["credentials"]["sf"]["state"] == "ready" }
        })
        .await
    );

    let (code, body) = get(&sf, "/echo").await;
    assert_eq!(code, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("instance_url"), "{error}");
    assert_eq!(v["upstream"], "sf");
    assert_eq!(api.stats().requests, 0);
    let status = status_json(&admin).await;
    assert!(status["credentials"]["sf"]["upstream_urls"]["sf"]["error"]
        .as_str()
        .unwrap()
        .contains("instance_url"));

    // An answer whose instance_url is not a usable url (at the next refresh): 502
    // naming the field.
    auth.set_answer_fields(fields(&[("instance_url", "ftp://na1.example.com")]));
    let (code, body) = get_until(&sf, "/echo", 502).await;
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("instance_url") && body.contains("ftp://na1.example.com"),
        "{body}"
    );
    assert_eq!(api.stats().requests, 0);

    // Then a good one: forwarded there.
    auth.set_answer_fields(fields(&[("instance_url", &api.url())]));
    let (code, body) = get_until(&sf, "/echo?ok=1", 200).await;
    assert_eq!(code, 200, "{body}");
    assert_reached(&api, "/v1/echo?ok=1");
    running.stop().await;
}

/// The problems `yaml` is refused with ("" when it is accepted).
fn config_error(yaml: &str) -> String {
    match Config::from_yaml(yaml, &|_| None) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// `tokenrelay check` of `yaml` (written to a config file of its own): its output.
fn check(yaml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    support::run_cli(&["check", "--config", path.to_str().unwrap()])
}

fn one_upstream(credential: &str, url: &str) -> String {
    format!(
        "credentials:\n  c: {{ {credential} }}\nupstreams:\n  u: {{ listen: 127.0.0.1:0, url: \"{url}\", credential: c }}\n"
    )
}

const OAUTH: &str =
    "grant: refresh_token, token_url: https://login.example.com/token, client_id: id, client_secret: s";

#[test]
fn url_templates_are_validated() {
    for (url, says) in [
        (
            "https://{token.instance_url}/x",
            "must start with {token.FIELD}",
        ),
        ("{token.instance_url", "is not closed"),
        ("{token.instance_url}?x=1", "query or fragment"),
        (
            "{token.instance_url}data",
            "must be a path starting with '/'",
        ),
        (
            "{tokens.instance_url}",
            "the only placeholder is {token.FIELD}",
        ),
        ("{token.instance-url}", "is not a field name"),
        ("{token.}", "is not a field name"),
        ("{token.access_token}", "looks like a secret"),
    ] {
        let e = config_error(&one_upstream(OAUTH, url));
        assert!(
            e.contains("upstreams.u.url: ") && e.contains(says),
            "{url}: {e}"
        );
    }
    // A static token has no answer to take a field from.
    let e = config_error(&one_upstream(
        "grant: static, token: abc",
        "{token.instance_url}",
    ));
    assert!(
        e.contains("upstreams.u.url: ") && e.contains("uses grant static"),
        "{e}"
    );
    let e = config_error(&one_upstream(
        &format!("{OAUTH}, answer_fields: [instance_url, refresh_token]"),
        "https://api.example.com",
    ));
    assert!(
        e.contains("credentials.c.answer_fields: ") && e.contains("looks like a secret"),
        "{e}"
    );
    let e = config_error(&one_upstream(
        "grant: static, token: abc, answer_fields: [instance_url]",
        "https://api.example.com",
    ));
    assert!(e.contains("credentials.c.answer_fields: not used"), "{e}");

    // Kept: the preset's fields plus the template's.
    let cfg = Config::from_yaml(
        &one_upstream(
            "provider: salesforce, client_id: id, client_secret: s, redirect_uri: https://example.com/cb",
            "{token.sfdc_community_url}/services/data",
        ),
        &|_| None,
    )
    .unwrap();
    let c = &cfg.credentials["c"];
    assert_eq!(c.answer_fields, ["instance_url", "sfdc_community_url"]);
    assert_eq!(c.url_templates.len(), 1);
    assert_eq!(
        cfg.upstreams["u"].url.as_str(),
        "{token.sfdc_community_url}/services/data"
    );
    // A url template needs https from its field unless the upstream allows http; a
    // fixed url is unchanged.
    assert!(!c.url_templates[0].allow_insecure_http);
    assert!(cfg.upstreams["u"].url.fixed().is_none());
}

#[test]
fn check_prints_the_template_and_where_it_comes_from() {
    let out = check(&one_upstream(
        "provider: zoho, client_id: id, client_secret: s, redirect_uri: https://example.com/cb",
        "{token.api_domain}/crm/v8",
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let printed: serde_yaml::Value = serde_yaml::from_str(&stdout).unwrap();
    assert_eq!(
        printed["upstreams"]["u"]["url"].as_str(),
        Some("{token.api_domain}/crm/v8")
    );
    assert_eq!(
        printed["credentials"]["c"]["answer_fields"],
        serde_yaml::from_str::<serde_yaml::Value>("[api_domain]").unwrap()
    );
    assert!(
        stdout.contains("upstreams.u.url: the field api_domain of credential c's token answers, followed by /crm/v8"),
        "{stdout}"
    );
}

/// `authorize --code` stores the code exchange's fields with the tokens (Salesforce's
/// first instance_url comes from it); `status` shows them, and a start adopts the
/// stored token and its instance without a token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_stores_the_code_answers_fields() {
    let f = fixture().await;
    let redirect = "https://example.com/oauth/callback";
    let yaml = f.yaml.replace(
        "    token_timeout: 2s\n",
        &format!("    token_timeout: 2s\n    redirect_uri: {redirect}\n"),
    );
    let config = f.dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let cfg = config.to_str().unwrap();
    f.auth
        .set_answer_fields(fields(&[("instance_url", &f.one.url())]));
    let code = f.auth.new_authorization_code(redirect);
    let out = support::cli(&[
        "authorize",
        "--config",
        cfg,
        "--credential",
        "sf",
        "--code",
        &code,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = support::cli(&["status", "--config", cfg]).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("answer field instance_url: {}", f.one.url())),
        "{text}"
    );

    let requests = f.auth.stats().token_requests;
    let running = support::start(&yaml).await;
    let (code, body) = get(&running.url("sf"), "/echo?authorized=1").await;
    assert_eq!(code, 200, "{body}");
    assert_reached(&f.one, "/v1/echo?authorized=1");
    assert_eq!(f.auth.stats().token_requests, requests);
    running.stop().await;
}

/// Secret names in camelCase, PascalCase, concatenated or kebab spelling are refused as
/// `answer_fields` entries and as template fields, by validation and by `check`.
#[test]
fn secret_names_in_any_spelling_are_refused() {
    for name in [
        "apiKey",
        "sessionId",
        "clientSecret",
        "refreshToken",
        "idToken",
        "apikey",
        "sessionid",
        "SessionID",
    ] {
        let e = config_error(&one_upstream(
            &format!("{OAUTH}, answer_fields: [instance_url, {name}]"),
            "https://api.example.com",
        ));
        assert!(
            e.contains("credentials.c.answer_fields: ")
                && e.contains(&format!("{name:?} looks like a secret")),
            "{name}: {e}"
        );
        let e = config_error(&one_upstream(OAUTH, &format!("{{token.{name}}}/v1")));
        assert!(
            e.contains("upstreams.u.url: ") && e.contains("looks like a secret"),
            "{name}: {e}"
        );
    }
    let out = check(&one_upstream(
        &format!("{OAUTH}, answer_fields: [instance_url, apiKey]"),
        "https://api.example.com",
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepted apiKey");
    assert!(
        stderr.contains("\"apiKey\" looks like a secret"),
        "{stderr}"
    );
}

/// A state stored by a version whose rule missed camelCase names (`apiKey`,
/// `sessionId`) never shows them: not on `/status`, not in `tokenrelay status`, and the
/// next rotation stores the state without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_fields_of_an_older_stored_state_are_never_shown_or_kept() {
    let f = fixture().await;
    let secrets = [
        ("apiKey", "ak-0f3e-never-shown"),
        ("sessionId", "sess-77a1-never-shown"),
        ("clientSecret", "cs-19bb-never-shown"),
        ("refreshToken", "rt-5c2d-never-shown"),
        ("idToken", "it-8e40-never-shown"),
    ];
    let mut stored: std::collections::BTreeMap<String, String> = secrets
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    stored.insert("instance_url".into(), f.one.url());
    let cfg = Config::from_yaml(&f.yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&cfg.store).unwrap();
    let state = tokenrelay::store::StoredState {
        generation: 1,
        refresh_token: Some(tokenrelay::secret::Secret::new(f.auth.new_grant())),
        obtained_at_ms: tokenrelay::store::now_ms(),
        updated_by: "older-version".into(),
        answer_fields: stored,
        ..Default::default()
    };
    store.compare_and_swap("sf", 0, &state).await.unwrap();
    let never_shown = |text: &str| {
        for (name, value) in secrets {
            assert!(
                !text.contains(value) && !text.contains(name),
                "{name} shown: {text}"
            );
        }
    };
    let config = f.dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, &f.yaml).unwrap();
    let cli = support::cli(&["status", "--config", config.to_str().unwrap()]).await;
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(text.contains("instance_url"), "{text}");
    never_shown(&text);

    let running = support::start(&f.yaml).await;
    let (code, body) = get(&running.url("sf"), "/echo").await;
    assert_eq!(code, 200, "{body}");
    assert_reached(&f.one, "/v1/echo");
    let status = status_json(&format!("http://{}", running.admin)).await;
    assert_eq!(
        status["credentials"]["sf"]["answer_fields"],
        json!({ "instance_url": f.one.url() })
    );
    never_shown(&status.to_string());
    let page = support::get_text(&running.admin_url("/")).await;
    never_shown(&page);
    let state = support::stored_state(&f.yaml, "sf").await.unwrap();
    assert!(state.generation > 1, "rotated at startup");
    assert_eq!(
        state.answer_fields.keys().collect::<Vec<_>>(),
        ["instance_url"]
    );
    running.stop().await;
}

/// The demo authorization server (access tokens live 3 s), an API accepting its tokens,
/// and tokenrelay with a client_credentials credential `sf` (refreshed 1 s before
/// expiry) and an upstream `sf` at `{token.instance_url}/v1`, started. Fields of
/// client_credentials answers live in memory only.
async fn client_credentials_fixture() -> (AuthServer, ApiServer, support::Running) {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(3),
        ..AuthServerOptions::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}
credentials:
  sf: {{ grant: client_credentials, token_url: {}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true, refresh_before: 1s }}
upstreams:
  sf: {{ listen: 127.0.0.1:0, url: \"{{token.instance_url}}/v1\", credential: sf, allow_insecure_http: true }}
",
        auth.token_url()
    );
    let running = support::start(&yaml).await;
    (auth, api, running)
}

/// Polls `/status` until upstream `sf`'s url error contains `says` (a refresh has
/// brought the answer); the error then.
async fn url_error_becomes(admin: &str, says: &str) -> String {
    let error = || async {
        status_json(admin).await["credentials"]["sf"]["upstream_urls"]["sf"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let found = eventually(Duration::from_secs(15), || async {
        error().await.contains(says)
    })
    .await;
    let last = error().await;
    assert!(
        found,
        "the url error came to say {says:?}; it says {last:?}"
    );
    last
}

/// `GET {admin}/readyz`: status and body.
async fn readyz(admin: &str) -> (u16, String) {
    get(admin, "/readyz").await
}

/// A field value the upstream url cannot use is refused naming the field and the rule
/// it broke, whether the value is not kept at all (not a string, too long) or kept but
/// not a usable URL; the error (502, `/status`, `/readyz`) never quotes what may be
/// secret: a URL's credentials or query, or a value that is not a URL. The host of a
/// URL is an instance address and is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_field_value_names_the_field_and_the_rule_never_the_value() {
    let (auth, api, running) = client_credentials_fixture().await;
    let (sf, admin) = (running.url("sf"), format!("http://{}", running.admin));
    let long = format!("https://na1.example.com/{}", "p".repeat(3000));
    for (value, rule, hidden, named) in [
        (json!(42), "not a string", None, None),
        (json!(long), "longer than 2048", Some("pppp"), None),
        (
            json!("https://admin:pw-3f9a@na1.example.com"),
            "credentials",
            Some("pw-3f9a"),
            Some("https://na1.example.com"),
        ),
        (
            json!("https://na1.example.com/x?sig=sig-77c1"),
            "query",
            Some("sig-77c1"),
            Some("https://na1.example.com"),
        ),
        (
            json!("tok-5d2e-not-a-url"),
            "not an absolute URL",
            Some("tok-5d2e"),
            None,
        ),
    ] {
        auth.set_answer_fields(Map::from_iter([("instance_url".to_string(), value)]));
        let error = url_error_becomes(&admin, rule).await;
        let (code, body) = get(&sf, "/echo").await;
        let (ready, why) = readyz(&admin).await;
        for text in [&error, &body, &why] {
            assert!(text.contains("instance_url"), "{rule}: {text}");
            assert!(hidden.is_none_or(|h| !text.contains(h)), "{rule}: {text}");
            assert!(named.is_none_or(|n| text.contains(n)), "{rule}: {text}");
        }
        assert_eq!(code, 502, "{rule}: {body}");
        assert!(body.contains(rule), "{rule}: {body}");
        assert_eq!(ready, 503, "{rule}: {why}");
        assert!(why.contains("upstream sf") && why.contains(rule), "{why}");
    }
    assert_eq!(api.stats().requests, 0);

    auth.set_answer_fields(fields(&[("instance_url", &api.url())]));
    let (code, body) = get_until(&sf, "/echo", 200).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(readyz(&admin).await.0, 200);
    running.stop().await;
}

/// `/readyz` says not ready while a templated upstream's url cannot be resolved (no
/// answer carried the field yet), though its credential holds a token, and ready once
/// an answer brings it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_templated_upstream_that_cannot_resolve() {
    let (auth, api, running) = client_credentials_fixture().await;
    let admin = format!("http://{}", running.admin);
    url_error_becomes(
        &admin,
        "no token answer so far carried the field instance_url",
    )
    .await;
    assert_eq!(
        status_json(&admin).await["credentials"]["sf"]["state"],
        "ready"
    );
    let (code, body) = readyz(&admin).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("upstream sf") && body.contains("instance_url"),
        "{body}"
    );

    auth.set_answer_fields(fields(&[("instance_url", &api.url())]));
    let (code, body) = get_until(&admin, "/readyz", 200).await;
    assert_eq!(code, 200, "{body}");
    running.stop().await;
}
