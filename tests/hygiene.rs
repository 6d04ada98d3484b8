//! What must never cross the proxy, or leak out of it: the app's own credentials, foreign
//! hosts, CONNECT tunnels, hop-by-hop headers, invented forwarding headers, and the
//! token or client secret in logs, errors, /status, /metrics, `check` or Debug output.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use testkit::{AuthServerOptions, FailureMode};
use tokenrelay::config::Config;

use support::{
    demo_servers, one_upstream_yaml, raw_body, raw_exchange, raw_status, DemoServers, Running,
};

async fn setup(upstream_extra: &str) -> (DemoServers, Running) {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let yaml = one_upstream_yaml(&demo.auth.token_url(), &demo.api.url(), "", upstream_extra);
    let running = support::start(&yaml).await;
    (demo, running)
}

fn header_values(demo: &DemoServers, name: &str) -> Vec<String> {
    demo.api
        .last_request_headers()
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_own_authorization_is_replaced_not_forwarded() {
    let (demo, tr) = setup("").await;
    let resp = support::client()
        .get(format!("{}/echo", tr.url("api")))
        .header("authorization", "Bearer the-apps-own-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let auth = header_values(&demo, "authorization");
    assert_eq!(auth.len(), 1, "{auth:?}");
    assert!(!auth[0].contains("the-apps-own-token"));
    let token = auth[0].strip_prefix("Bearer ").unwrap();
    assert!(demo.auth.is_valid_access_token(token));
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_header_and_format_carry_the_token() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    // An upstream that does not check Authorization, to see exactly what arrives.
    let open_api = testkit::ApiServer::start(None).await.unwrap();
    let yaml = one_upstream_yaml(
        &demo.auth.token_url(),
        &open_api.url(),
        "",
        "header: X-Api-Key, format: \"Token {token}\"",
    );
    let tr = support::start(&yaml).await;
    let resp = support::client()
        .get(format!("{}/echo", tr.url("api")))
        .header("authorization", "Bearer app")
        .header("x-api-key", "app-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let headers = open_api.last_request_headers();
    let keys: Vec<&String> = headers
        .iter()
        .filter(|(n, _)| n == "x-api-key")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let token = keys[0].strip_prefix("Token ").expect("configured format");
    assert!(demo.auth.is_valid_access_token(token));
    assert!(
        !headers.iter().any(|(n, _)| n == "authorization"),
        "the app's Authorization must not be forwarded"
    );
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_authorization_reject_answers_400_json() {
    let (demo, tr) = setup("inbound_authorization: reject").await;
    let c = support::client();
    let resp = c
        .get(format!("{}/echo", tr.url("api")))
        .header("authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(body["upstream"], "api");
    assert_eq!(body["credential"], "api");
    assert_eq!(demo.api.stats().requests, 0, "nothing forwarded");
    // Without the header the request goes through.
    let resp = c
        .get(format!("{}/echo", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_for_another_host_is_refused() {
    let (demo, tr) = setup("").await;
    let addr = tr.upstreams["api"];
    for target in [
        "http://evil.example/",
        "http://evil.example/echo?x=1",
        "https://evil.example:8443/echo",
        "http://127.0.0.1:1/echo",
    ] {
        let req =
            format!("GET {target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n");
        let resp = raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).await;
        assert_eq!(raw_status(&resp), Some(400), "{target}: {resp}");
        let body: Value = serde_json::from_str(raw_body(&resp)).unwrap();
        assert_eq!(body["upstream"], "api");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(demo.api.stats().requests, 0, "nothing forwarded");
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_for_the_upstream_itself_is_accepted() {
    let (demo, tr) = setup("").await;
    let addr = tr.upstreams["api"];
    let up = demo.api.addr();
    let req =
        format!("GET http://{up}/echo?abs=1 HTTP/1.1\r\nHost: {up}\r\nConnection: close\r\n\r\n");
    let resp = raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(raw_status(&resp), Some(200), "{resp}");
    assert_eq!(demo.api.last_request().unwrap().uri, "/echo?abs=1");
    // The listener's own address is the upstream too, as far as the app is concerned.
    let req = format!(
        "GET http://{addr}/echo?abs=2 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let resp = raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(raw_status(&resp), Some(200), "{resp}");
    assert_eq!(demo.api.last_request().unwrap().uri, "/echo?abs=2");
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_with_405() {
    let (demo, tr) = setup("").await;
    let addr = tr.upstreams["api"];
    for authority in ["evil.example:443".to_string(), demo.api.addr().to_string()] {
        let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        let resp = raw_exchange(addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(raw_status(&resp), Some(405), "{authority}: {resp}");
        assert!(resp.contains("\"upstream\":\"api\""), "{resp}");
    }
    assert_eq!(demo.api.stats().requests, 0, "nothing forwarded");
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_dropped() {
    let (_demo, tr) = setup("").await;
    let addr = tr.upstreams["api"];
    let req = format!(
        "GET /echo HTTP/1.1\r\nHost: {addr}\r\n\
         Connection: X-Foo, close\r\nX-Foo: nominated\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers\r\n\
         Proxy-Authorization: Basic cHJveHk6cHc=\r\nProxy-Connection: keep-alive\r\n\
         Upgrade: websocket\r\nX-Kept: yes\r\n\r\n"
    );
    let resp = raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(raw_status(&resp), Some(200), "{resp}");
    // The body may be chunked; the JSON object is what lies between the outer braces.
    let body = raw_body(&resp);
    let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
    let echo: Value = serde_json::from_str(json).unwrap();
    let headers = echo["headers"].as_object().unwrap();
    for gone in [
        "x-foo",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(!headers.contains_key(gone), "{gone} forwarded: {headers:?}");
    }
    if let Some(conn) = headers.get("connection") {
        let conn = conn.to_string().to_ascii_lowercase();
        assert!(
            !conn.contains("x-foo") && !conn.contains("upgrade"),
            "{conn}"
        );
    }
    assert_eq!(headers["x-kept"], serde_json::json!(["yes"]));
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_dropped() {
    let (_demo, tr) = setup("").await;
    let resp = support::client()
        .get(format!("{}/hop", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["x-normal"], "yes");
    assert!(h.get("x-secret-hop").is_none(), "{h:?}");
    assert!(h.get("keep-alive").is_none(), "{h:?}");
    assert!(h.get("proxy-authenticate").is_none(), "{h:?}");
    if let Some(conn) = h.get("connection") {
        assert!(
            !conn
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("x-secret-hop"),
            "{h:?}"
        );
    }
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_forwarding_headers_are_invented() {
    let (_demo, tr) = setup("").await;
    let resp = support::client()
        .get(format!("{}/echo", tr.url("api")))
        .send()
        .await
        .unwrap();
    let echo: Value = resp.json().await.unwrap();
    let names: Vec<&String> = echo["headers"].as_object().unwrap().keys().collect();
    assert!(
        !names.iter().any(|n| n.starts_with("x-forwarded")
            || n.as_str() == "forwarded"
            || n.as_str() == "x-real-ip"),
        "{names:?}"
    );
    tr.stop().await;
}

const CLIENT_SECRET: &str = "cs-Zq81-unique-client-secret-7f3a";
const STATIC_TOKEN: &str = "st-Wx42-unique-static-token-91bc";
const PASSWORD: &str = "pw-Kk07-unique-password-55de";

#[test]
fn config_debug_output_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}-file\n")).unwrap();
    let yaml = format!(
        "credentials:\n\
         \x20 a: {{ grant: client_credentials, token_url: https://auth.example/t, client_id: id, client_secret: \"${{SECRET}}\" }}\n\
         \x20 b: {{ grant: refresh_token, token_url: https://auth.example/t, client_id: id, client_secret_file: {} }}\n\
         \x20 c: {{ grant: static, token: {STATIC_TOKEN} }}\n\
         \x20 d: {{ grant: password, token_url: https://auth.example/t, client_id: id, username: u, password: {PASSWORD} }}\n\
         upstreams:\n\
         \x20 a: {{ listen: 127.0.0.1:0, url: https://api.example, credential: a }}\n\
         \x20 c: {{ listen: 127.0.0.1:0, url: https://api.example, credential: c }}\n",
        secret_file.display()
    );
    let config = Config::from_yaml(&yaml, &|k| {
        (k == "SECRET").then(|| CLIENT_SECRET.to_string())
    })
    .unwrap();
    // The values did load...
    assert_eq!(
        config.credentials["a"]
            .client_secret
            .as_ref()
            .unwrap()
            .expose(),
        CLIENT_SECRET
    );
    let debug = format!("{config:?} {config:#?}");
    let yaml_out = config.to_redacted_yaml();
    for shown in [&debug, &yaml_out] {
        for secret in [CLIENT_SECRET, STATIC_TOKEN, PASSWORD] {
            assert!(!shown.contains(secret), "{secret} shown in:\n{shown}");
        }
        assert!(shown.contains("<redacted>"));
    }
}

#[test]
fn check_prints_the_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}-file\n")).unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "credentials:\n\
             \x20 a: {{ grant: client_credentials, token_url: https://auth.example/t, client_id: id, client_secret: \"${{TR_TEST_SECRET}}\" }}\n\
             \x20 b: {{ grant: client_credentials, token_url: https://auth.example/t, client_id: id, client_secret_file: {} }}\n\
             \x20 c: {{ grant: static, token: {STATIC_TOKEN} }}\n\
             upstreams:\n\
             \x20 a: {{ listen: 127.0.0.1:0, url: https://api.example, credential: a }}\n",
            secret_file.display()
        ),
    )
    .unwrap();
    let out = Command::new(support::binary())
        .args(["check", "--config"])
        .arg(&config)
        .env("TR_TEST_SECRET", CLIENT_SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("<redacted>"), "{stdout}");
    assert!(
        stdout.contains("auth.example"),
        "resolved config printed: {stdout}"
    );
    for secret in [CLIENT_SECRET, STATIC_TOKEN] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}\n{stderr}"
        );
    }
}

/// Fails with the neighbourhood of `needle` in `text` (not the whole text).
fn assert_absent(what: &str, text: &str, name: &str, needle: &str) {
    if let Some(i) = text.find(needle) {
        let from = text[..i]
            .char_indices()
            .rev()
            .nth(300)
            .map_or(0, |(j, _)| j);
        let to = text[i..]
            .char_indices()
            .nth(300)
            .map_or(text.len(), |(j, _)| i + j);
        panic!("{name} appears in the {what}:\n...{}...", &text[from..to]);
    }
}

/// Bearer token values the upstream has received so far.
fn learn_token(demo: &DemoServers, tokens: &mut Vec<String>) {
    for (n, v) in demo.api.last_request_headers() {
        if n == "authorization" {
            let t = v.strip_prefix("Bearer ").unwrap_or(&v).to_string();
            if !tokens.contains(&t) {
                tokens.push(t);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_secrets_never_reach_logs_errors_status_or_metrics() {
    let demo = demo_servers(AuthServerOptions {
        client_secret: CLIENT_SECRET.into(),
        access_ttl: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (admin, api, dead, slow) = (
        support::free_port(),
        support::free_port(),
        support::free_port(),
        support::free_port(),
    );
    let nothing_there = support::free_port();
    let token_url = demo.auth.token_url();
    let api_url = demo.api.url();
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{ listen: 127.0.0.1:{admin} }}\n\
             log: {{ access_log: true }}\n\
             credentials:\n\
             \x20 api: {{ grant: client_credentials, token_url: {token_url}, client_id: demo-client, client_secret: \"${{TR_TEST_SECRET}}\", allow_insecure_http: true, token_timeout: 1s }}\n\
             upstreams:\n\
             \x20 api: {{ listen: 127.0.0.1:{api}, url: {api_url}, credential: api, allow_insecure_http: true }}\n\
             \x20 dead: {{ listen: 127.0.0.1:{dead}, url: http://127.0.0.1:{nothing_there}, credential: api, allow_insecure_http: true }}\n\
             \x20 slow: {{ listen: 127.0.0.1:{slow}, url: {api_url}, credential: api, allow_insecure_http: true, timeout: 300ms }}\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("tokenrelay.log");
    let mut child = support::ChildProc::spawn(
        &config,
        &log,
        &[
            ("RUST_LOG", "tokenrelay=trace,info"),
            ("TR_TEST_SECRET", CLIENT_SECRET),
        ],
    );
    let admin_url = |p: &str| format!("http://127.0.0.1:{admin}{p}");
    assert!(
        support::wait_ready(&admin_url("/readyz"), Duration::from_secs(15)).await,
        "not ready; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let c = support::client();
    let mut tokens = Vec::new();
    let mut bodies = Vec::new();
    let get = |port: u16, path: &str| c.get(format!("http://127.0.0.1:{port}{path}"));

    // Plain traffic, with the app's own Authorization to strip.
    for _ in 0..3 {
        let r = get(api, "/echo?q=1")
            .header("authorization", "Bearer app-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        learn_token(&demo, &mut tokens);
    }
    // Upstream rejects the token: 401 → refresh → retry.
    demo.auth.revoke_all();
    let r = get(api, "/echo").send().await.unwrap();
    assert_eq!(r.status(), 200, "retried after 401 with a new token");
    learn_token(&demo, &mut tokens);
    // Upstream errors of every kind.
    for (port, path, status) in [
        (dead, "/echo", 502u16),
        (slow, "/sleep/2000", 504),
        (api, "/status/500", 500),
    ] {
        let r = get(port, path).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        bodies.push(r.text().await.unwrap());
    }
    // Failing token endpoint until the token expires: 503s with reasons.
    for mode in [
        FailureMode::Garbage200,
        FailureMode::EmptyAccessToken,
        FailureMode::ServerError,
    ] {
        demo.auth.set_mode(mode);
        tokio::time::sleep(Duration::from_millis(800)).await;
        let r = get(api, "/status/200").send().await.unwrap();
        learn_token(&demo, &mut tokens);
        bodies.push(r.text().await.unwrap());
    }
    let expired = support::eventually(Duration::from_secs(10), || async {
        matches!(get(api, "/echo").send().await, Ok(r) if r.status() == 503)
    })
    .await;
    assert!(expired, "expected 503 once the token expired");
    let r = get(api, "/echo").send().await.unwrap();
    assert_eq!(r.status(), 503);
    bodies.push(r.text().await.unwrap());
    bodies.push(
        c.get(admin_url("/status"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    // Recovery.
    demo.auth.set_mode(FailureMode::Normal);
    assert!(
        support::eventually(Duration::from_secs(30), || async {
            matches!(get(api, "/echo").send().await, Ok(r) if r.status() == 200)
        })
        .await
    );
    learn_token(&demo, &mut tokens);
    let status = support::get_text(&admin_url("/status")).await;
    let metrics = support::get_text(&admin_url("/metrics")).await;
    bodies.push(status.clone());
    bodies.push(metrics.clone());

    let code = tokio::task::spawn_blocking(move || child.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let log_text = std::fs::read_to_string(&log).unwrap();

    // The scenario really happened and was logged in detail.
    assert!(tokens.len() >= 2, "tokens seen upstream: {}", tokens.len());
    assert!(tokens.iter().all(|t| t.len() >= 16));
    assert!(log_text.contains("token refresh"), "{log_text}");
    assert!(log_text.contains("request not forwarded"), "{log_text}");
    assert!(
        log_text.contains("result=\"failure\"") || log_text.contains("failure"),
        "{log_text}"
    );
    assert!(status.contains("\"api\""), "{status}");
    assert!(metrics.contains("tokenrelay_"), "{metrics}");

    for (what, text) in
        std::iter::once(("log", &log_text)).chain(bodies.iter().map(|b| ("response", b)))
    {
        assert_absent(what, text, "the client secret", CLIENT_SECRET);
        for t in &tokens {
            assert_absent(what, text, "an access token", t);
            // Not even a prefix.
            assert_absent(what, text, "an access token prefix", &t[..12]);
        }
    }
}

/// tokenrelay in front of an API that takes the token only from the query parameter
/// `auth` (as Bitrix24's REST API does), with `token_query_param: auth` and `extra`.
async fn query_token_setup(extra: &str) -> (DemoServers, Running) {
    let auth = testkit::AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = testkit::ApiServer::start_with_query_token(auth.validator(), "auth")
        .await
        .unwrap();
    let upstream = format!("token_query_param: auth{extra}");
    let yaml = one_upstream_yaml(&auth.token_url(), &api.url(), "", &upstream);
    let running = support::start(&yaml).await;
    (DemoServers { auth, api }, running)
}

/// The query pairs of the upstream's last request, decoded.
fn upstream_query(demo: &DemoServers) -> Vec<(String, String)> {
    let uri = demo
        .api
        .last_request()
        .expect("the upstream saw a request")
        .uri;
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// Every way the token could be spelt in text the app reads.
fn token_spellings(token: &str) -> Vec<String> {
    let encoded: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
    vec![token.to_string(), encoded]
}

/// With `token_query_param`, an upstream redirect that keeps the query (here a 301 to
/// `/echo?<the same query>`) comes back to the app pointed at the listener and without
/// the token: neither `Location` nor `Content-Location` nor any other header carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_token_never_comes_back_in_a_redirect() {
    let (demo, tr) = query_token_setup("").await;
    let local = tr.url("api");
    let resp = support::client()
        .get(format!("{local}/moved?start=50&filter=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 301);
    let sent = upstream_query(&demo);
    let token = sent
        .iter()
        .find(|(n, _)| n == "auth")
        .map(|(_, v)| v.clone())
        .expect("the upstream got the token in the query");
    assert!(demo.auth.is_valid_access_token(&token));
    let headers = format!("{:?}", resp.headers());
    for spelling in token_spellings(&token) {
        assert_absent("response headers", &headers, "the access token", &spelling);
    }
    for name in ["location", "content-location"] {
        assert_eq!(
            resp.headers()[name].to_str().unwrap(),
            format!("{local}/echo?start=50&filter=x"),
            "{name}"
        );
    }
    let body = resp.text().await.unwrap();
    for spelling in token_spellings(&token) {
        assert_absent("response body", &body, "the access token", &spelling);
    }
    tr.stop().await;
}

/// The app's own `auth` parameter is removed before the token is added, however it is
/// spelt (percent-encoded name, repeated, bare); the upstream sees exactly one `auth`,
/// the token. With `token_query_param_ignore_case` (a provider that reads names
/// case-insensitively) case variants go too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_query_parameter_is_replaced_in_any_spelling() {
    let (demo, tr) = query_token_setup("").await;
    let c = support::client();
    // Each query, and a pair that must stay: a case variant is another parameter to a
    // case-sensitive provider, and so is a name that only starts alike.
    for (query, kept) in [
        ("%61uth=app&start=1", None),
        ("au%74h=app&start=1", None),
        ("start=1&auth=one&AUTH=kept&auth", Some(("AUTH", "kept"))),
        ("auth%3D=kept&start=1", Some(("auth=", "kept"))),
    ] {
        let resp = c
            .get(format!("{}/echo?{query}", tr.url("api")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        let sent = upstream_query(&demo);
        let auth: Vec<&(String, String)> = sent.iter().filter(|(n, _)| n == "auth").collect();
        assert_eq!(auth.len(), 1, "{query}: {sent:?}");
        assert!(demo.auth.is_valid_access_token(&auth[0].1), "{query}");
        assert!(
            sent.contains(&("start".into(), "1".into())),
            "{query}: {sent:?}"
        );
        if let Some((n, v)) = kept {
            assert!(sent.contains(&(n.into(), v.into())), "{query}: {sent:?}");
        }
    }
    tr.stop().await;

    let (demo, tr) = query_token_setup(", token_query_param_ignore_case: true").await;
    let resp = c
        .get(format!("{}/echo?AUTH=app&Auth=app&start=1", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = upstream_query(&demo);
    let auth: Vec<&(String, String)> = sent
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("auth"))
        .collect();
    assert_eq!(auth.len(), 1, "{sent:?}");
    assert_eq!(auth[0].0, "auth");
    tr.stop().await;
}
