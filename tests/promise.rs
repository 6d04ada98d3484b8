//! The promise against strange token-endpoint answers and bursts, in-process: tokenrelay
//! on the real file store, the demo authorization server (rotating single-use refresh
//! tokens with reuse detection) and the demo API on loopback sockets.
//!
//! Covered:
//! - a `200` that rotates (a new refresh token) but whose access-token part is unusable
//!   (`expires_in` 0, negative or not a number; `token_type: "mac"`; `access_token`
//!   missing, empty or not a header value): the new refresh token is stored before
//!   anything else, the current access token keeps serving, the attempt counts as a
//!   failure, and the next refresh presents the new refresh token — the spent one never
//!   reaches the server again; `expires_in: "3600"` (a numeric string) is a number;
//! - a `200` that is not strict JSON (trailing bytes, a duplicate key, over the answer
//!   limit) is treated the same way; a byte-order mark and two names for the refresh
//!   token's lifetime are usable.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::{eventually, metric, metrics_text, status_json, Load};
use testkit::{ApiServer, AuthServer, AuthServerOptions};
use tokenrelay::config::Config;

/// The demo servers, a state directory and a config with credential and upstream `crm`.
struct Fixture {
    auth: AuthServer,
    _api: ApiServer,
    _dir: tempfile::TempDir,
    yaml: String,
}

async fn fixture(access_ttl: Duration, cred_extra: &str) -> Fixture {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl,
        rotate_refresh_tokens: true,
        ..AuthServerOptions::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = support::quick_refresh_yaml(
        &auth.token_url(),
        &api.url(),
        &dir.path().join("state"),
        cred_extra,
    );
    let f = Fixture {
        auth,
        _api: api,
        _dir: dir,
        yaml,
    };
    seed(&f).await;
    f
}

/// Stores a fresh grant's refresh token, as `seed` does.
async fn seed(f: &Fixture) {
    support::seed_refresh_token(&f.yaml, "crm", &f.auth.new_grant()).await;
}

fn refreshes(metrics: &str, result: &str) -> f64 {
    metric(
        metrics,
        "tokenrelay_token_refresh_total",
        &[("credential", "crm"), ("result", result)],
    )
}

/// One rotation is answered with `patch` applied to the otherwise correct answer; the
/// refresh token it carries must be kept and used, the spent one never presented again.
async fn strange_answer_keeps_the_new_refresh_token(patch: Value, usable: bool) {
    strange_bytes_keep_the_new_refresh_token(patch, None, usable).await;
}

/// Rewrites an answer's bytes (see [`AuthServer::rewrite_next_answer`]).
type Rewrite = fn(Vec<u8>) -> Vec<u8>;

/// As [`strange_answer_keeps_the_new_refresh_token`], with the patched answer's bytes
/// then rewritten by `rewrite` (a 200 that is not strict JSON).
async fn strange_bytes_keep_the_new_refresh_token(
    patch: Value,
    rewrite: Option<Rewrite>,
    usable: bool,
) {
    let f = fixture(Duration::from_secs(3), "").await;
    let relay = support::start(&f.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    let first = support::client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200, "startup refresh");
    let issued_before = f.auth.stats().issued;
    // What /status says of each refresh while this runs (the failure is brief).
    let watching = Arc::new(AtomicBool::new(true));
    let status_errors = tokio::spawn({
        let (admin, watching) = (admin.clone(), watching.clone());
        async move {
            let mut seen = Vec::<String>::new();
            while watching.load(Ordering::Relaxed) {
                let st = status_json(&admin).await;
                if let Some(e) = st["credentials"]["crm"]["last_refresh"]["error"].as_str() {
                    if !seen.iter().any(|s| s == e) {
                        seen.push(e.to_string());
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            seen
        }
    });
    f.auth.alter_next_answer(patch.as_object().unwrap().clone());
    if let Some(rewrite) = rewrite {
        f.auth.rewrite_next_answer(rewrite);
    }
    let load = Load::start(vec![url.clone()], 4, Duration::from_millis(20));
    // The altered rotation, then (unless it was usable) a failure and a retry with the
    // new refresh token, which must succeed.
    let rotated_twice = eventually(Duration::from_secs(15), || {
        let issued = f.auth.stats().issued;
        async move { issued >= issued_before + 2 }
    })
    .await;
    // Let a few more requests through on the newest token.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.stop().await;
    let stats = f.auth.stats();
    let metrics = metrics_text(&admin).await;
    let status = status_json(&admin).await;
    let last = support::client().get(&url).send().await.unwrap().status();
    watching.store(false, Ordering::Relaxed);
    let status_errors = status_errors.await.unwrap();
    relay.stop().await;
    eprintln!(
        "patch {patch} rewritten {}: {stats:?}; load {} ok, {} 5xx; refreshes ok {} failed {}",
        rewrite.is_some(),
        report.ok,
        report.server_errors,
        refreshes(&metrics, "success"),
        refreshes(&metrics, "failure"),
    );
    assert!(
        rotated_twice,
        "no further rotation after the altered answer: {stats:?}"
    );
    assert_eq!(
        stats.refresh_reuse_detected, 0,
        "the spent refresh token was presented again"
    );
    assert_eq!(
        stats.invalid_grant, 0,
        "a refresh token was rejected: {stats:?}"
    );
    assert_eq!(last, 200, "requests succeed afterwards");
    assert_eq!(status["credentials"]["crm"]["state"], "ready", "{status}");
    assert_eq!(report.server_errors, 0, "{report:?}");
    assert_eq!(report.unauthorized, 0, "{report:?}");
    if usable {
        assert_eq!(
            refreshes(&metrics, "failure"),
            0.0,
            "{patch} is a usable answer"
        );
    } else {
        assert!(
            refreshes(&metrics, "failure") >= 1.0,
            "the unusable answer counts as a failed refresh"
        );
        assert!(
            status_errors
                .iter()
                .any(|e| e.contains("the new refresh token was stored")),
            "/status never said why the refresh failed: {status_errors:?}"
        );
    }
}

macro_rules! strange_answers {
    ($($name:ident: $patch:expr, $usable:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            strange_answer_keeps_the_new_refresh_token($patch, $usable).await;
        }
    )*};
}

strange_answers! {
    rotation_with_zero_expires_in_keeps_the_new_refresh_token: json!({"expires_in": 0}), false;
    rotation_with_negative_expires_in_keeps_the_new_refresh_token: json!({"expires_in": -5}), false;
    rotation_with_non_numeric_expires_in_keeps_the_new_refresh_token: json!({"expires_in": "soon"}), false;
    rotation_with_mac_token_type_keeps_the_new_refresh_token: json!({"token_type": "mac"}), false;
    rotation_without_access_token_keeps_the_new_refresh_token: json!({"access_token": null}), false;
    rotation_with_empty_access_token_keeps_the_new_refresh_token: json!({"access_token": ""}), false;
    rotation_with_access_token_not_a_header_value_keeps_the_new_refresh_token: json!({"access_token": "two\nlines"}), false;
    rotation_with_expires_in_as_numeric_string_is_usable: json!({"expires_in": "3"}), true;
}

// ---------------------------------------------------------------------------------------
// Never an empty or broken credential header (static tokens).
// ---------------------------------------------------------------------------------------

fn static_yaml(token_file: &Path, api_url: &str) -> String {
    format!(
        "admin: {{ listen: 127.0.0.1:0 }}
credentials:
  api: {{ grant: static, token_file: {} }}
upstreams:
  api: {{ listen: 127.0.0.1:0, url: {api_url}, credential: api, allow_insecure_http: true }}
",
        token_file.display()
    )
}

/// One trailing line break is trimmed; anything else that cannot be a header value is a
/// config error naming the key and the file, never a token forwarded empty.
#[test]
fn static_token_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    for good in ["tok-1\n", "tok-1\r\n", "tok-1"] {
        std::fs::write(&file, good).unwrap();
        let yaml = static_yaml(&file, "http://127.0.0.1:9");
        assert!(Config::from_yaml(&yaml, &|_| None).is_ok(), "{good:?}");
    }
    for bad in [
        "tok-1\n\n",
        "tok-1\nline-2\n",
        "to\u{1}k",
        " tok-1",
        "tok-1 ",
        "tök",
        "\n",
    ] {
        std::fs::write(&file, bad).unwrap();
        let yaml = static_yaml(&file, "http://127.0.0.1:9");
        let e = Config::from_yaml(&yaml, &|_| None).unwrap_err().to_string();
        assert!(
            e.contains("credentials.api.token_file") && e.contains(&file.display().to_string()),
            "{bad:?}: {e}"
        );
        assert!(
            !e.contains("tok-1") && !e.contains("line-2"),
            "the error shows the token: {e}"
        );
    }
}

/// A token file rewritten with content that is not a valid header value (two trailing
/// newlines) is refused at run time: the previous token stays in use, `/status` and the
/// metrics say why, and no request ever carries an empty or partial credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_token_reload_to_invalid_content_keeps_the_previous_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "static-1\n").unwrap();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new("static-1".to_string()));
    let validator = {
        let accepted = accepted.clone();
        std::sync::Arc::new(move |t: &str| t == *accepted.lock().unwrap())
    };
    let api = ApiServer::start(Some(validator)).await.unwrap();
    let relay = support::start(&static_yaml(&file, &api.url())).await;
    let admin = format!("http://{}", relay.admin);
    let url = format!("{}/echo", relay.url("api"));
    assert_eq!(
        support::client().get(&url).send().await.unwrap().status(),
        200
    );

    // The secret is "rotated" into a broken file; the upstream now wants the new token.
    std::fs::write(&file, "static-2\n\n").unwrap();
    *accepted.lock().unwrap() = "static-2".into();
    // A 401 makes tokenrelay re-read the file at once; it must not use what it read.
    let status = support::client().get(&url).send().await.unwrap().status();
    assert_eq!(
        status, 401,
        "the 401 passes through: nothing valid is newer"
    );
    let sent: Vec<String> = api
        .last_request_headers()
        .into_iter()
        .filter(|(k, _)| k == "authorization")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        sent,
        vec!["Bearer static-1".to_string()],
        "the previous token was sent"
    );
    let st = status_json(&admin).await;
    let cred = &st["credentials"]["api"];
    let error = cred["last_refresh"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("token_file"), "/status says why: {st}");
    assert!(
        !st.to_string().contains("static-2"),
        "/status shows the token: {st}"
    );
    let metrics = metrics_text(&admin).await;
    assert!(
        metric(
            &metrics,
            "tokenrelay_token_refresh_total",
            &[("credential", "api"), ("result", "failure")]
        ) >= 1.0,
        "the failed reload is counted"
    );

    // Fixed: the next re-read picks it up.
    std::fs::write(&file, "static-2\n").unwrap();
    let fixed = eventually(Duration::from_secs(5), || {
        let url = url.clone();
        async move {
            matches!(support::client().get(&url).send().await, Ok(r) if r.status() == 200)
        }
    })
    .await;
    relay.stop().await;
    assert!(fixed, "the repaired token file is used");
}

// ---------------------------------------------------------------------------------------
// A 401 after success means revocation.
// ---------------------------------------------------------------------------------------

/// The provider revokes the access token twice within a second. Each 401 is to a token
/// the upstream had accepted, so each causes an immediate refresh and one retry: the app
/// never sees a 401. (Spacing is only for newly issued tokens rejected before they ever
/// worked, which points to a permission problem.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_in_quick_succession_each_refresh_at_once() {
    let f = fixture(Duration::from_secs(60), "").await;
    let relay = support::start(&f.yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    let c = support::client();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        f.auth.expire_access_tokens();
        statuses.push(c.get(&url).send().await.unwrap().status().as_u16());
    }
    let metrics = metrics_text(&format!("http://{}", relay.admin)).await;
    relay.stop().await;
    assert_eq!(
        statuses,
        vec![200, 200, 200],
        "each revocation was refreshed at once"
    );
    assert_eq!(
        metric(
            &metrics,
            "tokenrelay_token_refresh_total",
            &[("trigger", "upstream_401"), ("result", "success")]
        ),
        3.0
    );
    assert_eq!(f.auth.stats().refresh_reuse_detected, 0);
}

/// An upstream that rejects every token (a permission problem): 401-driven refreshes of
/// tokens that never worked stay spaced out, so the rotation does not spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rejected_before_ever_working_are_spaced_out() {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(60),
        ..AuthServerOptions::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(std::sync::Arc::new(|_: &str| false)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        support::quick_refresh_yaml(&auth.token_url(), &api.url(), &dir.path().join("state"), "");
    let f = Fixture {
        auth,
        _api: api,
        _dir: dir,
        yaml,
    };
    seed(&f).await;
    let relay = support::start(&f.yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    let c = support::client();
    let before = f.auth.stats().refreshes;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
    }
    let took = started.elapsed();
    let refreshes = f.auth.stats().refreshes - before;
    relay.stop().await;
    // Gaps of 1, 2, 4, ... s between such refreshes: however slow the machine made the
    // 20 requests, at most one more refresh per gap that passed (without spacing there
    // would be 20).
    let gaps_passed = (took.as_secs_f64() + 1.0).log2().floor() as u64;
    assert!(
        refreshes <= 2 + gaps_passed,
        "{refreshes} refreshes for 20 quick 401s in {took:?}"
    );
}

// ---------------------------------------------------------------------------------------
// No 503 storm while a retry is moments away.
// ---------------------------------------------------------------------------------------

/// The token endpoint fails until the access token has expired (the refresher is deep in
/// backoff, its next retry seconds away), then recovers; 500 requests arrive at once.
/// They bring the retry forward, share its one outcome, and all get 200: one successful
/// token request, no 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_after_expiry_waits_for_one_attempt_instead_of_503() {
    use testkit::FailureMode;
    let f = fixture(Duration::from_secs(4), "").await;
    let relay = support::start(&f.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let url = format!("{}/echo", relay.url("crm"));
    assert_eq!(
        support::client().get(&url).send().await.unwrap().status(),
        200
    );
    f.auth.set_mode(FailureMode::ServerError);
    let expired = eventually(Duration::from_secs(15), || {
        let admin = admin.clone();
        async move { status_json(&admin).await["credentials"]["crm"]["state"] == "unavailable" }
    })
    .await;
    assert!(expired, "the token expired while refreshes failed");
    f.auth.set_mode(FailureMode::Normal);
    let issued_before = f.auth.stats().issued;
    let c = support::client();
    let burst: Vec<_> = (0..500)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { c.get(&url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<String, u32>::new();
    for task in burst {
        let key = match task.await.unwrap() {
            Ok(s) => s.to_string(),
            Err(e) => format!("transport error: {e}"),
        };
        *statuses.entry(key).or_default() += 1;
    }
    let issued = f.auth.stats().issued - issued_before;
    relay.stop().await;
    eprintln!("burst after expiry: {statuses:?}; {issued} token(s) issued");
    assert_eq!(statuses.get("200"), Some(&500), "{statuses:?}");
    assert_eq!(
        issued, 1,
        "one successful token request for the whole burst"
    );
}

/// The log says which 401 case it was: a revoked token that had worked, a newly issued
/// token never accepted, and the spacing that follows repeated rejections of new ones.
/// (A child process, so its log can be read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_which_401_case_it_was() {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(60),
        rotate_refresh_tokens: true,
        ..AuthServerOptions::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let refusing = ApiServer::start(Some(Arc::new(|_: &str| false)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let [admin, crm, denied] = support::free_ports(3)[..] else {
        unreachable!()
    };
    let credential = |name: &str| {
        format!(
            "  {name}:
    grant: refresh_token
    token_url: {}
    client_id: demo-client
    client_secret: demo-secret
    allow_insecure_http: true
    token_timeout: 2s
",
            auth.token_url()
        )
    };
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:{admin} }}
store: {{ type: file, path: {state} }}
credentials:
{crm_cred}{denied_cred}upstreams:
  crm: {{ listen: 127.0.0.1:{crm}, url: {api}, credential: crm, allow_insecure_http: true }}
  denied: {{ listen: 127.0.0.1:{denied}, url: {refusing}, credential: denied, allow_insecure_http: true }}
",
        state = dir.path().join("state").display(),
        crm_cred = credential("crm"),
        denied_cred = credential("denied"),
        api = api.url(),
        refusing = refusing.url(),
    );
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, &yaml).unwrap();
    support::seed_refresh_token(&yaml, "crm", &auth.new_grant()).await;
    support::seed_refresh_token(&yaml, "denied", &auth.new_grant()).await;
    let log = dir.path().join("relay.log");
    let mut child = support::ChildProc::spawn(&config, &log, &[]);
    assert!(
        support::wait_ready(
            &format!("http://127.0.0.1:{admin}/readyz"),
            Duration::from_secs(30)
        )
        .await
    );
    let c = support::client();
    let get = |port: u16| c.get(format!("http://127.0.0.1:{port}/echo")).send();
    assert_eq!(get(crm).await.unwrap().status(), 200);
    auth.expire_access_tokens();
    assert_eq!(get(crm).await.unwrap().status(), 200, "revoked: refreshed");
    for _ in 0..3 {
        assert_eq!(get(denied).await.unwrap().status(), 401);
    }
    child.terminate();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = |credential: &str, what: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("credential={credential}")) && l.contains(what))
            .count()
    };
    assert_eq!(
        lines("crm", "rejected a token it had accepted before (revoked"),
        1,
        "{text}"
    );
    assert_eq!(lines("crm", "never accepted"), 0, "{text}");
    assert!(
        lines("denied", "rejected a token it never accepted") >= 1,
        "{text}"
    );
    assert!(
        lines("denied", "permission problem rather than an expired token") >= 1,
        "{text}"
    );
    assert_eq!(lines("denied", "had accepted before"), 0, "{text}");
}

/// Inserts `text` right after the answer's opening brace.
fn after_brace(body: Vec<u8>, text: &str) -> Vec<u8> {
    let mut out = b"{".to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&body[1..]);
    out
}

fn with_bom(body: Vec<u8>) -> Vec<u8> {
    [&b"\xEF\xBB\xBF"[..], &body].concat()
}

fn with_duplicate_expires_in(body: Vec<u8>) -> Vec<u8> {
    after_brace(body, r#""expires_in":7,"#)
}

fn with_trailing_bytes(body: Vec<u8>) -> Vec<u8> {
    [&body[..], b" <!-- served by proxy -->"].concat()
}

fn with_two_refresh_lifetimes(body: Vec<u8>) -> Vec<u8> {
    after_brace(
        body,
        r#""refresh_expires_in":1800,"refresh_token_expires_in":7776000,"#,
    )
}

/// 3 MiB of padding in another field: over the answer limit (256 KiB), within what is
/// read to salvage the refresh token (4 MiB).
fn padded_past_the_limit(body: Vec<u8>) -> Vec<u8> {
    after_brace(
        body,
        &format!(r#""padding":"{}","#, "x".repeat(3 * 1024 * 1024)),
    )
}

macro_rules! strange_bytes {
    ($($name:ident: $rewrite:expr, $usable:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            strange_bytes_keep_the_new_refresh_token(json!({}), Some($rewrite), $usable).await;
        }
    )*};
}

strange_bytes! {
    rotation_with_a_byte_order_mark_is_usable: with_bom, true;
    rotation_with_a_duplicate_key_keeps_the_new_refresh_token: with_duplicate_expires_in, false;
    rotation_with_trailing_bytes_keeps_the_new_refresh_token: with_trailing_bytes, false;
    rotation_with_two_names_for_the_refresh_lifetime_is_usable: with_two_refresh_lifetimes, true;
    rotation_larger_than_the_answer_limit_keeps_the_new_refresh_token: padded_past_the_limit, false;
}
