//! The seed providers end to end, each against the demo authorization server emulating
//! that provider's documented behaviour (`ProviderProfile`), with tokenrelay configured by
//! its preset (`provider: NAME`; only `token_url` points at the emulation):
//! `check`, `authorize --code`, traffic through the proxy, a rotation, then the provider
//! revoking the grant: `reauthorization_required` within seconds with at most one token
//! request after the revocation, and a new authorization picked up without a restart.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{eventually, metric, metrics_text, status_json};
use testkit::{ApiServer, AuthServer, AuthServerOptions, ProviderProfile};

const REDIRECT_URI: &str = "https://example.com/oauth/callback";

struct Journey {
    auth: AuthServer,
    _api: ApiServer,
    _dir: tempfile::TempDir,
    config: PathBuf,
    yaml: String,
}

/// The demo servers for `profile` and a config for preset `provider` on the file store.
async fn journey(
    provider: &str,
    params: &str,
    profile: ProviderProfile,
    access_ttl: Duration,
) -> Journey {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl,
        rotate_refresh_tokens: true,
        profile,
        ..AuthServerOptions::default()
    })
    .await
    .unwrap();
    // Bitrix24's REST API takes the token as the `auth` query parameter.
    let api = if profile == ProviderProfile::Bitrix24 {
        ApiServer::start_with_query_token(auth.validator(), "auth").await
    } else {
        ApiServer::start(Some(auth.validator())).await
    }
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}
store: {{ type: file, path: {state}, poll_interval: 200ms }}
credentials:
  crm:
    provider: {provider}
    provider_params: {{ {params} }}
    client_id: demo-client
    client_secret: demo-secret
    redirect_uri: {REDIRECT_URI}
    # The provider's real endpoint, emulated on loopback.
    token_url: {token_url}
    allow_insecure_http: true
    refresh_before: 1s
    token_timeout: 3s
upstreams:
  crm: {{ listen: 127.0.0.1:0, url: {api_url}, credential: crm, allow_insecure_http: true }}
",
        state = dir.path().join("state").display(),
        token_url = auth.token_url(),
        api_url = api.url(),
    );
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, &yaml).unwrap();
    Journey {
        auth,
        _api: api,
        _dir: dir,
        config,
        yaml,
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `tokenrelay check`: valid, and it says which values the preset filled in.
async fn check(j: &Journey, provider: &str) {
    let out = support::cli(&["check", "--config", &path(&j.config)]).await;
    assert!(out.status.success(), "check failed: {}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(
        printed.contains(&format!("credentials.crm.grant: preset {provider}")),
        "check names the preset's values:\n{printed}"
    );
    assert!(!printed.contains("demo-secret"), "check shows the secret");
}

/// The ELMA365 journey with `access_ttl` tokens and one more credential setting (a
/// line of YAML), authorized, and tokenrelay started on it.
async fn elma365_with(access_ttl: Duration, setting: &str) -> (Journey, support::Running) {
    let j = journey(
        "elma365",
        "base_url: https://acme.elma365.ru",
        ProviderProfile::Elma365,
        access_ttl,
    )
    .await;
    let yaml = j.yaml.replace(
        "    refresh_before: 1s\n",
        &format!("    refresh_before: 1s\n    {setting}\n"),
    );
    authorize(&j).await;
    let relay = support::start(&yaml).await;
    (j, relay)
}

/// `tokenrelay authorize --code` with a fresh code from the provider.
async fn authorize(j: &Journey) {
    let code = j.auth.new_authorization_code(REDIRECT_URI);
    let config = path(&j.config);
    let out = support::cli(&[
        "authorize",
        "--config",
        &config,
        "--credential",
        "crm",
        "--code",
        &code,
    ])
    .await;
    assert!(
        out.status.success(),
        "authorize failed: {}",
        text(&out.stderr)
    );
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

async fn get(url: &str) -> u16 {
    support::client()
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn state(admin: &str) -> String {
    status_json(admin).await["credentials"]["crm"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The whole journey for a provider whose grants carry refresh tokens.
async fn refreshing_provider_journey(provider: &str, params: &str, profile: ProviderProfile) {
    let j = journey(provider, params, profile, Duration::from_secs(3)).await;
    check(&j, provider).await;
    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    assert_eq!(get(&url).await, 200, "traffic with the authorized token");

    // A rotation (3 s tokens are refreshed about 2 s in, or, for presets that refresh on
    // demand, by the first request after they expire), traffic unaffected.
    let rotated = eventually(Duration::from_secs(15), || async {
        assert_eq!(get(&url).await, 200, "traffic while the token rotates");
        j.auth.stats().rotations >= 1
    })
    .await;
    assert!(rotated, "no rotation: {:?}", j.auth.stats());
    assert_eq!(get(&url).await, 200, "traffic after the rotation");

    // The provider revokes the grant: the next request's 401 leads to one refresh, which
    // the provider refuses in its own way; the credential needs re-authorization.
    let before = j.auth.stats().token_requests;
    j.auth.revoke_all();
    let _ = get(&url).await;
    let reauth = eventually(Duration::from_secs(5), || {
        let admin = admin.clone();
        async move { state(&admin).await == "reauthorization_required" }
    })
    .await;
    // Later requests must not spend anything either.
    for _ in 0..5 {
        assert_eq!(get(&url).await, 503);
    }
    let after_revocation = j.auth.stats().token_requests - before;
    let st = status_json(&admin).await;
    assert!(
        reauth,
        "{provider}: not reauthorization_required after revocation: {st}"
    );
    assert!(
        after_revocation <= 1,
        "{provider}: {after_revocation} token requests after the revocation"
    );
    assert_eq!(j.auth.stats().refresh_reuse_detected, 0);

    // A new authorization is picked up by the running instance.
    authorize(&j).await;
    let back = eventually(Duration::from_secs(10), || {
        let url = url.clone();
        async move { get(&url).await == 200 }
    })
    .await;
    let metrics = metrics_text(&admin).await;
    relay.stop().await;
    assert!(
        back,
        "{provider}: the new authorization was not adopted without a restart"
    );
    eprintln!(
        "{provider}: {:?}; token requests after revocation {after_revocation}; refreshes ok {}",
        j.auth.stats(),
        metric(
            &metrics,
            "tokenrelay_token_refresh_total",
            &[("result", "success")]
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amocrm_journey() {
    refreshing_provider_journey("amocrm", "subdomain: acme", ProviderProfile::AmoCrm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kommo_journey() {
    refreshing_provider_journey("kommo", "subdomain: acme", ProviderProfile::AmoCrm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitrix24_journey() {
    refreshing_provider_journey(
        "bitrix24",
        "portal: acme.bitrix24.ru",
        ProviderProfile::Bitrix24,
    )
    .await;
}

/// Bitrix24 calls hourly refreshes excessive: its preset refreshes on demand. With 2 s
/// access tokens and no traffic, nothing is refreshed; the first request after expiry
/// waits for one refresh and succeeds; a refresh token about to die unused (an 8 s idle
/// lifetime here) gets a keep-alive refresh without any request. (A start with an expired
/// stored token refreshes it, as in every mode.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitrix24_refreshes_only_on_demand_and_to_keep_the_grant_alive() {
    let j = journey(
        "bitrix24",
        "portal: acme.bitrix24.ru",
        ProviderProfile::Bitrix24,
        Duration::from_secs(2),
    )
    .await;
    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    assert_eq!(get(&url).await, 200);
    // Three access-token lifetimes without traffic: no refresh, and the credential stays
    // ready (the next request refreshes), so /readyz holds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(j.auth.stats().refreshes, 0, "{:?}", j.auth.stats());
    let admin = format!("http://{}", relay.admin);
    assert_eq!(state(&admin).await, "ready");
    assert_eq!(get(&format!("{admin}/readyz")).await, 200);
    // The token has expired: the request waits for one refresh.
    assert_eq!(get(&url).await, 200);
    assert_eq!(j.auth.stats().refreshes, 1, "{:?}", j.auth.stats());
    relay.stop().await;

    // With a short idle lifetime the grant is kept alive without traffic.
    let yaml = j.yaml.replace(
        "    refresh_before: 1s\n",
        "    refresh_before: 1s\n    refresh_token_idle_lifetime: 8s\n",
    );
    // (The start refreshes the expired stored token; the next refresh is the keep-alive,
    // a tenth of the idle lifetime before it ends: 7.2 s later.)
    let relay = support::start(&yaml).await;
    let kept_alive = eventually(Duration::from_secs(40), || async {
        j.auth.stats().refreshes >= 3
    })
    .await;
    let st = status_json(&format!("http://{}", relay.admin)).await;
    relay.stop().await;
    assert!(kept_alive, "no keep-alive refresh: {st}");
}

/// Bitrix24's REST API takes the token as the `auth` query parameter: it is added to
/// every call (the app's own `auth` dropped), and after a 401 the retry carries the new
/// token there too, a POST body included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitrix24_rest_calls_carry_the_token_as_the_auth_parameter() {
    let j = journey(
        "bitrix24",
        "portal: acme.bitrix24.ru",
        ProviderProfile::Bitrix24,
        Duration::from_secs(60),
    )
    .await;
    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let base = relay.url("crm");
    let c = support::client();
    // (The demo API's /echo stands for a REST method such as /rest/crm.deal.list.)
    let call = format!("{base}/echo?start=50&auth=app-token");
    assert_eq!(c.get(&call).send().await.unwrap().status(), 200);
    let first = j._api.last_request().unwrap().uri;
    let (path, query) = first.split_once('?').unwrap();
    assert_eq!(path, "/echo");
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(pairs.len(), 2, "{first}");
    assert_eq!(pairs[0], ("start".to_string(), "50".to_string()));
    assert_eq!(pairs[1].0, "auth");
    assert_ne!(
        pairs[1].1, "app-token",
        "the app's own auth reached the API"
    );

    // The access token is revoked: the 401 leads to a refresh and the retried POST
    // carries the new token.
    j.auth.expire_access_tokens();
    let resp = c
        .post(format!("{base}/echo"))
        .json(&serde_json::json!({"fields": {"TITLE": "deal"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let retried = j._api.last_request().unwrap().uri;
    assert!(retried.starts_with("/echo?auth="), "{retried}");
    assert!(
        !retried.contains(&pairs[1].1),
        "the retry kept the old token"
    );
    assert_eq!(j._api.stats().unauthorized, 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elma365_journey() {
    refreshing_provider_journey(
        "elma365",
        "base_url: https://acme.elma365.ru",
        ProviderProfile::Elma365,
    )
    .await;
}

/// YooMoney: the code exchange yields only a long-lived access token. It is stored and
/// used, never refreshed; when the upstream keeps rejecting it (revoked), the credential
/// needs re-authorization, with no token request at all; a new authorization is adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yoomoney_journey() {
    let j = journey(
        "yoomoney",
        "",
        ProviderProfile::YooMoney,
        Duration::from_secs(3),
    )
    .await;
    check(&j, "yoomoney").await;
    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    for _ in 0..3 {
        assert_eq!(get(&url).await, 200);
    }
    let st = status_json(&admin).await;
    assert_eq!(st["credentials"]["crm"]["state"], "ready", "{st}");
    assert_eq!(st["credentials"]["crm"]["expiry_known"], false, "{st}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        get(&url).await,
        200,
        "still used after the demo's usual access lifetime"
    );

    let before = j.auth.stats().token_requests;
    j.auth.revoke_all();
    for _ in 0..3 {
        assert_eq!(get(&url).await, 401, "the rejection passes through");
    }
    let reauth = eventually(Duration::from_secs(5), || {
        let admin = admin.clone();
        async move { state(&admin).await == "reauthorization_required" }
    })
    .await;
    assert!(reauth, "{}", status_json(&admin).await);
    assert_eq!(get(&url).await, 503);
    assert_eq!(
        j.auth.stats().token_requests,
        before,
        "nothing to refresh, nothing sent"
    );
    assert_eq!(j.auth.stats().refreshes, 0);

    authorize(&j).await;
    let back = eventually(Duration::from_secs(10), || {
        let url = url.clone();
        async move { get(&url).await == 200 }
    })
    .await;
    relay.stop().await;
    assert!(
        back,
        "the new authorization was not adopted without a restart"
    );
}

/// ELMA365's refresh tokens die 14 days after the authorization whatever happens: the
/// expiry is shown in `/status` and as `tokenrelay_refresh_token_expiry_timestamp_seconds`
/// from the moment the credential is authorized, and a rotation keeps the same deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elma365_refresh_token_deadline_is_shown() {
    let j = journey(
        "elma365",
        "base_url: https://acme.elma365.ru",
        ProviderProfile::Elma365,
        Duration::from_secs(3),
    )
    .await;
    let authorized = std::time::SystemTime::now();
    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let deadline = authorized
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64
        + 14.0 * 86400.0;
    let gauge = |m: &str| {
        metric(
            m,
            "tokenrelay_refresh_token_expiry_timestamp_seconds",
            &[("credential", "crm")],
        )
    };
    // The refresher reads the stored state just after startup.
    let shown = eventually(Duration::from_secs(10), || {
        let admin = admin.clone();
        async move { gauge(&metrics_text(&admin).await) > 0.0 }
    })
    .await;
    assert!(shown, "no refresh-token expiry after startup");
    let before = gauge(&metrics_text(&admin).await);
    let rotated = eventually(Duration::from_secs(15), || async {
        j.auth.stats().rotations >= 1
    })
    .await;
    let after = gauge(&metrics_text(&admin).await);
    let st = status_json(&admin).await;
    relay.stop().await;
    assert!(rotated);
    for g in [before, after] {
        assert!(
            (g - deadline).abs() < 30.0,
            "gauge {g}, expected about {deadline}"
        );
    }
    let left = st["credentials"]["crm"]["refresh_token_expires_in_seconds"]
        .as_i64()
        .unwrap();
    assert!((14 * 86400 - 60..=14 * 86400).contains(&left), "{st}");
}

/// A seeded refresh token's absolute lifetime counts from when the provider issued it:
/// with `--refresh-token-issued-at` ten days ago, ELMA365's 14-day token has four days
/// left and the expiry is known, through a refresh too; without it the seed time stands
/// in, and `/status` and `tokenrelay status` call the expiry an estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_refresh_tokens_count_their_lifetime_from_their_issue_time() {
    let j = journey(
        "elma365",
        "base_url: https://acme.elma365.ru",
        ProviderProfile::Elma365,
        Duration::from_secs(3),
    )
    .await;
    let token = j._dir.path().join("refresh-token");
    let config = path(&j.config);
    let seed = |issued_at: Option<String>| {
        let token = token.clone();
        let config = config.clone();
        let grant = j.auth.new_grant();
        async move {
            std::fs::write(&token, grant).unwrap();
            let token = path(&token);
            let mut args = vec!["seed", "--config", &config, "--credential", "crm"];
            args.extend(["--refresh-token-file", &token]);
            if let Some(at) = &issued_at {
                args.extend(["--refresh-token-issued-at", at]);
            }
            let out = support::cli(&args).await;
            assert!(out.status.success(), "seed: {}", text(&out.stderr));
        }
    };
    let ten_days_ago = std::time::SystemTime::now() - Duration::from_secs(10 * 86400);
    let ten_days_ago = humantime::format_rfc3339_seconds(ten_days_ago).to_string();
    seed(Some(ten_days_ago.clone())).await;
    let relay = support::start(&j.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let rotated = eventually(Duration::from_secs(15), || async {
        j.auth.stats().rotations >= 1
    })
    .await;
    let st = status_json(&admin).await;
    let c = &st["credentials"]["crm"];
    let left = c["refresh_token_expires_in_seconds"].as_i64().unwrap();
    assert!(rotated, "{st}");
    assert!((4 * 86400 - 120..=4 * 86400).contains(&left), "{st}");
    assert_eq!(c["refresh_token_expiry_estimated"], false, "{st}");

    // Without the issue time: 14 days from the seed, an estimate.
    seed(None).await;
    let estimated = eventually(Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let st = status_json(&admin).await;
            st["credentials"]["crm"]["refresh_token_expiry_estimated"] == true
        }
    })
    .await;
    let st = status_json(&admin).await;
    let page = support::client()
        .get(format!("{admin}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let out = support::cli(&["status", "--config", &config]).await;
    let printed = text(&out.stdout);
    assert!(estimated, "{st}");
    let left = st["credentials"]["crm"]["refresh_token_expires_in_seconds"]
        .as_i64()
        .unwrap();
    assert!((14 * 86400 - 120..=14 * 86400).contains(&left), "{st}");
    // The refresh token's countdown bar is marked as an estimate.
    assert!(page.contains(r#"<span class="estimate""#), "{page}");
    assert!(
        printed.contains("(estimate: counted from the seed time"),
        "{printed}"
    );

    // A later seed of a token issued before the current grant's seed is a new grant,
    // adopted (not taken for a restored backup): its expiry counts from its issue time.
    seed(Some(ten_days_ago)).await;
    let adopted = eventually(Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let st = status_json(&admin).await;
            let c = &st["credentials"]["crm"];
            c["refresh_token_expiry_estimated"] == false
                && c["refresh_token_expires_in_seconds"].as_i64() < Some(5 * 86400)
        }
    })
    .await;
    let st = status_json(&admin).await;
    relay.stop().await;
    assert!(adopted, "{st}");
    assert_eq!(st["credentials"]["crm"]["state"], "ready", "{st}");

    // A time in the future is refused, saying why.
    let out = support::cli(&[
        "seed",
        "--config",
        &config,
        "--credential",
        "crm",
        "--refresh-token-file",
        &path(&token),
        "--refresh-token-issued-at",
        "2999-01-01",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("2999-01-01 is in the future"),
        "{}",
        text(&out.stderr)
    );
}

/// A refresh token with an idle lifetime shorter than the access token's is refreshed
/// before it would die unused (a keep-alive refresh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_tokens_with_an_idle_lifetime_are_kept_alive() {
    let (j, relay) =
        elma365_with(Duration::from_secs(120), "refresh_token_idle_lifetime: 10s").await;
    let kept_alive = eventually(Duration::from_secs(20), || async {
        j.auth.stats().rotations >= 1
    })
    .await;
    let status = status_json(&format!("http://{}", relay.admin)).await;
    relay.stop().await;
    assert!(
        kept_alive,
        "no refresh before the 10 s idle lifetime ran out: {status}"
    );
}

/// A provider's refresh rate limit (Zoho: 10 per 10 minutes) is never exceeded: with
/// 2 s tokens and a limit of 2 per minute, only two refreshes are sent, and `/status`
/// says why the next one waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_rate_limit_is_never_exceeded() {
    let (j, relay) = elma365_with(
        Duration::from_secs(2),
        "refresh_rate_limit: { count: 2, per: 1m }",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let st = status_json(&format!("http://{}", relay.admin)).await;
    relay.stop().await;
    let stats = j.auth.stats();
    assert_eq!(stats.refreshes, 2, "{stats:?}");
    let error = st["credentials"]["crm"]["last_refresh"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("refresh limits"), "{st}");
    // The next refresh waits for the window to move on: about 50 s from now.
    let next = &st["credentials"]["crm"]["next_attempt"];
    let in_seconds = next["in_seconds"].as_i64().unwrap_or_default();
    assert!((20..=60).contains(&in_seconds), "next attempt: {next}");
}

/// A provider's minimum token age (Exact Online refuses to refresh younger tokens) holds
/// back a refresh that the token's lifetime asks for: with 2 s tokens refreshed 1 s before
/// they expire and a minimum age of 3 s, refreshes are sent 3 s apart, and still sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_wait_for_the_minimum_token_age() {
    const MIN_AGE: Duration = Duration::from_secs(3);
    let (j, relay) = elma365_with(Duration::from_secs(2), "min_token_age: 3s").await;
    let refreshed = eventually(Duration::from_secs(30), || async {
        j.auth.stats().refreshes >= 3
    })
    .await;
    let st = status_json(&format!("http://{}", relay.admin)).await;
    relay.stop().await;
    assert!(refreshed, "fewer than 3 refreshes in 30 s: {st}");
    let sent = j.auth.refresh_request_times();
    for pair in sent.windows(2) {
        // The refresher counts the age from the answer, which came after the server
        // logged the request; a millisecond is lost to the stored time's resolution.
        let gap = pair[1] - pair[0];
        assert!(
            gap + Duration::from_millis(5) >= MIN_AGE,
            "a refresh {gap:?} after the one before"
        );
    }
}

/// Zendesk: JSON bodies to `/oauth/tokens`, each refresh rotating the pair, a dead grant
/// answered `400 invalid_grant`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zendesk_journey() {
    refreshing_provider_journey("zendesk", "subdomain: acme", ProviderProfile::Zendesk).await;
}

/// Pipedrive: HTTP Basic and form bodies only; a refused refresh token is answered `400`
/// "Invalid grant: refresh_token is invalid", which the preset names a dead grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipedrive_journey() {
    refreshing_provider_journey("pipedrive", "", ProviderProfile::Pipedrive).await;
}

/// Pipedrive names the company's API host in every token answer (`api_domain`): it is
/// kept with the token and shown by `/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipedrive_api_domain_is_kept() {
    let j = journey(
        "pipedrive",
        "",
        ProviderProfile::Pipedrive,
        Duration::from_secs(60),
    )
    .await;
    let mut fields = serde_json::Map::new();
    fields.insert(
        "api_domain".into(),
        serde_json::json!("https://acme.pipedrive.com"),
    );
    j.auth.set_answer_fields(fields);
    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let admin = format!("http://{}", relay.admin);
    assert_eq!(get(&format!("{}/echo", relay.url("crm"))).await, 200);
    let st = status_json(&admin).await;
    relay.stop().await;
    assert!(
        st.to_string().contains("https://acme.pipedrive.com"),
        "api_domain not kept: {st}"
    );
    let log = j.auth.requests_log();
    assert!(!log.is_empty());
    for r in &log {
        assert_eq!(r.client_auth, "basic", "{r:?}");
        assert_eq!(r.content_type, "form", "{r:?}");
    }
}

/// Zoom: HTTP Basic and form bodies only, each refresh replacing the refresh token; a
/// superseded or revoked one is answered "Invalid Token!" (not `invalid_grant`), which
/// the preset names a dead grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zoom_journey() {
    refreshing_provider_journey("zoom", "", ProviderProfile::Zoom).await;
}

/// T-Bank: HTTP Basic and form bodies only, rotating refresh tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tbank_journey() {
    refreshing_provider_journey("tbank", "", ProviderProfile::TBank).await;
}

/// Yandex: the form refresh with HTTP Basic rotates the refresh token, and the API gets
/// `Authorization: OAuth <token>`, the header format Yandex's APIs document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yandex_rotates_and_sends_the_oauth_header() {
    let j = journey(
        "yandex",
        "",
        ProviderProfile::Standard,
        Duration::from_secs(3),
    )
    .await;
    check(&j, "yandex").await;
    // An API that records what it gets (the demo API's validator wants Bearer).
    let api = ApiServer::start(None).await.unwrap();
    let yaml = j.yaml.replace(&j._api.url(), &api.url());
    authorize(&j).await;
    let relay = support::start(&yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    assert_eq!(get(&url).await, 200);
    let rotated = eventually(Duration::from_secs(15), || async {
        j.auth.stats().rotations >= 1
    })
    .await;
    assert_eq!(get(&url).await, 200);
    let headers = api.last_request_headers();
    let authorization = headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let valid = authorization
        .strip_prefix("OAuth ")
        .is_some_and(|token| j.auth.is_valid_access_token(token));
    relay.stop().await;
    assert!(rotated, "no rotation: {:?}", j.auth.stats());
    assert!(
        authorization.starts_with("OAuth "),
        "not the OAuth scheme: {authorization:?}"
    );
    assert!(valid, "the API did not get a current token");
    for r in j.auth.requests_log() {
        assert_eq!(r.client_auth, "basic", "{r:?}");
        assert_eq!(r.content_type, "form", "{r:?}");
    }
}

/// GitHub App: a standard journey (form body, single-use refresh tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_app_journey() {
    refreshing_provider_journey("github_app", "", ProviderProfile::Standard).await;
}

/// Shopify: JSON refreshes rotate the refresh token, and the Admin API gets the bare token
/// in `X-Shopify-Access-Token` (no `Authorization` header), the header Shopify documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shopify_rotates_and_sends_the_shopify_header() {
    let j = journey(
        "shopify",
        "shop: acme",
        ProviderProfile::Standard,
        Duration::from_secs(3),
    )
    .await;
    check(&j, "shopify").await;
    // An API that records what it gets (the demo API's validator wants Bearer).
    let api = ApiServer::start(None).await.unwrap();
    let yaml = j.yaml.replace(&j._api.url(), &api.url());
    authorize(&j).await;
    let relay = support::start(&yaml).await;
    let url = format!("{}/echo", relay.url("crm"));
    let sent = support::client()
        .get(&url)
        .header("Authorization", "Bearer app-token")
        .header("X-Shopify-Access-Token", "app-token")
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(sent, 200);
    // The app's own credentials are dropped; ours goes in Shopify's header, bare.
    let current_token_only = |headers: Vec<(String, String)>| {
        let values = |name: &str| -> Vec<String> {
            headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let shopify = values("x-shopify-access-token");
        assert_eq!(shopify.len(), 1, "{headers:?}");
        assert!(values("authorization").is_empty(), "{headers:?}");
        j.auth.is_valid_access_token(&shopify[0])
    };
    assert!(current_token_only(api.last_request_headers()));
    let rotated = eventually(Duration::from_secs(15), || async {
        j.auth.stats().rotations >= 1
    })
    .await;
    assert_eq!(get(&url).await, 200);
    let after = current_token_only(api.last_request_headers());
    relay.stop().await;
    assert!(rotated, "no rotation: {:?}", j.auth.stats());
    assert!(
        after,
        "the API did not get a current token after the rotation"
    );
    let log = j.auth.requests_log();
    assert!(log.iter().any(|r| r.grant_type == "refresh_token"));
    for r in log {
        assert_eq!(r.content_type, "json", "{r:?}");
        assert_eq!(r.client_auth, "body", "{r:?}");
    }
}

/// Slack: answers say `token_type: "bot"` and `"ok": true`; the preset accepts the type, so
/// the code exchange, traffic (as `Authorization: Bearer`) and rotations work; without
/// the preset's `token_types` the access tokens of the same answers are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_bot_tokens_rotate() {
    let j = journey(
        "slack",
        "",
        ProviderProfile::Standard,
        Duration::from_secs(3),
    )
    .await;
    check(&j, "slack").await;
    let mut fields = serde_json::Map::new();
    fields.insert("ok".into(), serde_json::json!(true));
    fields.insert("token_type".into(), serde_json::json!("bot"));
    j.auth.set_answer_fields(fields);

    // A credential that does not accept the type keeps the refresh token of such an
    // answer but not its access token, and says why.
    let strict = j.yaml.replace(
        "    refresh_before: 1s\n",
        "    refresh_before: 1s\n    token_types: []\n",
    );
    let strict_config = j.config.with_file_name("strict.yaml");
    std::fs::write(&strict_config, &strict).unwrap();
    let code = j.auth.new_authorization_code(REDIRECT_URI);
    let out = support::cli(&[
        "authorize",
        "--config",
        &path(&strict_config),
        "--credential",
        "crm",
        "--code",
        &code,
    ])
    .await;
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("access token is unusable") && stderr.contains("token_type bot"),
        "{stderr}"
    );

    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    assert_eq!(get(&url).await, 200, "traffic with the bot token");
    let rotated = eventually(Duration::from_secs(15), || async {
        j.auth.stats().rotations >= 2
    })
    .await;
    assert_eq!(get(&url).await, 200, "traffic after the rotations");
    let st = status_json(&admin).await;
    relay.stop().await;
    assert!(rotated, "no rotations: {:?} {st}", j.auth.stats());
    assert_eq!(st["credentials"]["crm"]["state"], "ready", "{st}");
    for r in j.auth.requests_log() {
        assert_eq!(r.client_auth, "basic", "{r:?}");
        assert_eq!(r.content_type, "form", "{r:?}");
    }
}

/// Slack answers a refresh token it no longer accepts with HTTP 200 and
/// `"error": "invalid_refresh_token"`: the preset names it a dead grant, so the credential
/// needs re-authorization within three attempts instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_invalid_refresh_token_in_a_200_is_a_dead_grant() {
    let answer = testkit::FailureMode::ErrorIn200("invalid_refresh_token");
    let profile = ProviderProfile::Standard;
    dead_grant("slack", "", profile, answer, "invalid_refresh_token").await;
}

/// `provider`'s answer `answer` to a refresh is a dead grant: the credential needs
/// re-authorization within three attempts instead of retrying forever, and the reason
/// says what the provider answered.
async fn dead_grant(
    provider: &str,
    params: &str,
    profile: ProviderProfile,
    answer: testkit::FailureMode,
    reason_names: &str,
) {
    let j = journey(provider, params, profile, Duration::from_secs(60)).await;
    check(&j, provider).await;
    j.auth.set_mode(answer);
    support::seed_refresh_token(&j.yaml, "crm", &j.auth.new_grant()).await;
    let relay = support::start(&j.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let reauth = eventually(Duration::from_secs(20), || {
        let admin = admin.clone();
        async move { state(&admin).await == "reauthorization_required" }
    })
    .await;
    let st = status_json(&admin).await;
    let attempts = j.auth.stats().token_requests;
    relay.stop().await;
    assert!(reauth, "{provider}: not reauthorization_required: {st}");
    assert!(attempts <= 3, "{provider}: {attempts} token requests");
    let reason = st["credentials"]["crm"]["reauthorization_required"]["reason"].to_string();
    assert!(reason.contains(reason_names), "{provider}: {reason}");
}

/// Zoho answers a revoked refresh token with HTTP 200 `{"error":"invalid_code"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zoho_invalid_code_in_a_200_is_a_dead_grant() {
    let answer = testkit::FailureMode::ErrorIn200("invalid_code");
    dead_grant(
        "zoho",
        "",
        ProviderProfile::Standard,
        answer,
        "invalid_code",
    )
    .await;
}

/// GitHub answers a spent or revoked refresh token with HTTP 200
/// `{"error": "bad_refresh_token"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_bad_refresh_token_in_a_200_is_a_dead_grant() {
    let answer = testkit::FailureMode::ErrorIn200("bad_refresh_token");
    let profile = ProviderProfile::Standard;
    dead_grant("github_app", "", profile, answer, "bad_refresh_token").await;
}

/// HubSpot's older answer to a dead refresh token carries only its own `status` field,
/// no OAuth `error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_bad_refresh_token_without_an_error_field_is_a_dead_grant() {
    let answer = testkit::FailureMode::Answer(
        400,
        r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}"#,
    );
    dead_grant("hubspot", "", ProviderProfile::Standard, answer, "400").await;
}

/// amoCRM answers an expired or unreadable refresh token 401 with the OAuth server's
/// hints, as it answers a revoked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amocrm_expired_or_unreadable_refresh_tokens_are_dead_grants() {
    for hint in ["Token has expired", "Cannot decrypt the refresh token"] {
        let body = format!(
            r#"{{"title":"Unauthorized","type":"https://httpstatus.es/401","status":401,"detail":"The refresh token is invalid.","hint":"{hint}"}}"#
        );
        let answer = testkit::FailureMode::Answer(401, Box::leak(body.into_boxed_str()));
        dead_grant(
            "amocrm",
            "subdomain: acme",
            ProviderProfile::AmoCrm,
            answer,
            "401",
        )
        .await;
    }
}

/// Intuit: each token request asks for the refresh token's absolute expiry
/// (`x-include-refresh-token-hard-expires-in: true`), and the answer's
/// `x_refresh_token_hard_expires_in` is the expiry `/status` shows, not the preset's
/// 1825-day estimate nor the 100-day rolling lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intuit_asks_for_and_uses_the_hard_expiry_of_refresh_tokens() {
    refreshing_provider_journey("intuit", "", ProviderProfile::Intuit).await;
    let j = journey(
        "intuit",
        "",
        ProviderProfile::Intuit,
        Duration::from_secs(3),
    )
    .await;
    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let rotated = eventually(Duration::from_secs(15), || async {
        j.auth.stats().rotations >= 1
    })
    .await;
    let st = status_json(&admin).await;
    relay.stop().await;
    assert!(rotated, "{st}");
    for r in j.auth.requests_log() {
        assert!(
            r.has_header("x-include-refresh-token-hard-expires-in"),
            "{r:?}"
        );
    }
    let c = &st["credentials"]["crm"];
    let left = c["refresh_token_expires_in_seconds"].as_i64().unwrap();
    let hard = testkit::INTUIT_HARD_EXPIRES_IN.as_secs() as i64;
    assert!((hard - 60..=hard).contains(&left), "{st}");
    assert_eq!(c["refresh_token_expiry_estimated"], false, "{st}");
}

/// SberBusiness API: form refreshes to `/ic/sso/api/v2/oauth/token`, rotating; every
/// token request carries a new `RqUID` of 32 hex digits; the preset refuses a credential
/// without the client certificate the token endpoint needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sber_business_sends_a_new_request_id_with_each_token_request() {
    let mut j = journey(
        "sber_business",
        "",
        ProviderProfile::Standard,
        Duration::from_secs(3),
    )
    .await;
    // Without the client certificate `check` refuses the credential.
    let out = support::cli(&["check", "--config", &path(&j.config)]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(
            "credentials.crm.client_cert_file: required by preset sber_business (see `tokenrelay providers sber_business`)"
        ),
        "{}",
        text(&out.stderr)
    );
    let ck = rcgen::generate_simple_self_signed(vec!["partner".into()]).unwrap();
    let (cert, key) = (
        j._dir.path().join("cert.pem"),
        j._dir.path().join("key.pem"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    j.yaml = j.yaml.replace(
        "    refresh_before: 1s\n",
        &format!(
            "    refresh_before: 1s\n    client_cert_file: {}\n    client_key_file: {}\n",
            path(&cert),
            path(&key)
        ),
    );
    std::fs::write(&j.config, &j.yaml).unwrap();
    check(&j, "sber_business").await;
    authorize(&j).await;
    let relay = support::start(&j.yaml).await;
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    let rotated = eventually(Duration::from_secs(15), || async {
        assert_eq!(get(&url).await, 200);
        j.auth.stats().rotations >= 2
    })
    .await;
    relay.stop().await;
    assert!(rotated, "{:?}", j.auth.stats());
    let log = j.auth.requests_log();
    let ids: std::collections::BTreeSet<&str> = log
        .iter()
        .map(|r| {
            r.header("rquid")
                .unwrap_or_else(|| panic!("no RqUID: {r:?}"))
        })
        .collect();
    assert_eq!(ids.len(), log.len(), "a new RqUID per request: {ids:?}");
    for id in ids {
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }
    for r in &log {
        assert_eq!(
            (r.client_auth.as_str(), r.content_type.as_str()),
            ("body", "form")
        );
    }
}

/// HubSpot: form refreshes at the dated token endpoint that replaces /oauth/v1/token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_journey() {
    refreshing_provider_journey("hubspot", "", ProviderProfile::Standard).await;
    let shown = support::cli(&["providers", "hubspot"]).await;
    let shown = text(&shown.stdout);
    assert!(
        shown.contains("https://api.hubapi.com/oauth/2026-03/token"),
        "{shown}"
    );
}
