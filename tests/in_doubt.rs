//! Refresh attempts whose outcome is unknown (DESIGN.md, "in doubt"), against the demo
//! authorization server on loopback: it rotates single-use refresh tokens with reuse
//! detection, and can lose an answer after acting on the request (a 502 from a proxy in
//! front of it, or no answer before the client's timeout), with or without a reuse grace
//! window (as Okta, Auth0 and Django OAuth Toolkit offer).
//!
//! The rule: the same refresh token is presented exactly once more, never a second
//! time; a provider with a grace window answers that retry, one without refuses it and
//! the credential needs re-authorization, naming the attempt in doubt as the cause.

mod support;

use std::time::Duration;

use support::{eventually, metric, metrics_text, status_json};
use testkit::{ApiServer, AuthServer, AuthServerOptions, AuthStats, LostAnswer};

struct Fixture {
    auth: AuthServer,
    _api: ApiServer,
    _dir: tempfile::TempDir,
    yaml: String,
}

async fn fixture(reuse_grace: Duration) -> Fixture {
    let auth = AuthServer::start(AuthServerOptions {
        access_ttl: Duration::from_secs(3),
        rotate_refresh_tokens: true,
        reuse_grace,
        ..AuthServerOptions::default()
    })
    .await
    .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        support::quick_refresh_yaml(&auth.token_url(), &api.url(), &dir.path().join("state"), "");
    support::seed_refresh_token(&yaml, "crm", &auth.new_grant()).await;
    Fixture {
        auth,
        _api: api,
        _dir: dir,
        yaml,
    }
}

fn in_doubt_total(metrics: &str) -> f64 {
    metric(
        metrics,
        "tokenrelay_refresh_in_doubt_total",
        &[("credential", "crm")],
    )
}

/// Starts tokenrelay on `f`, waits for its first refresh, then loses the answers of the
/// next `lost` refreshes as `how` says. Returns the relay, its admin URL, the server's
/// counters when the loss was set up, and every `last_refresh.result` /status showed
/// until `until` held (polled every 20 ms, at most `within`).
async fn lose_answers<F>(
    f: &Fixture,
    lost: u32,
    how: LostAnswer,
    within: Duration,
    until: F,
) -> (support::Running, String, AuthStats, Vec<String>)
where
    F: Fn(&AuthStats, &serde_json::Value) -> bool,
{
    let relay = support::start(&f.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    let first = support::client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200, "startup refresh");
    let before = f.auth.stats();
    f.auth.lose_next_answers(lost, how);
    let mut results = Vec::<String>::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = status_json(&admin).await;
        if let Some(r) = status["credentials"]["crm"]["last_refresh"]["result"].as_str() {
            if results.last().map(String::as_str) != Some(r) {
                results.push(r.to_string());
            }
        }
        if until(&f.auth.stats(), &status) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached within {within:?}: {:?}; /status results {results:?}; {status}",
            f.auth.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (relay, admin, before, results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_recovered_by_one_retry_within_the_grace_window() {
    let f = fixture(Duration::from_secs(30)).await;
    let (relay, admin, before, results) = lose_answers(
        &f,
        1,
        LostAnswer::BadGateway,
        Duration::from_secs(30),
        |stats, _| stats.grace_reuses >= 1,
    )
    .await;
    // The next rotation, made with the token the grace answer handed over, works.
    let rotated = eventually(Duration::from_secs(15), || {
        let issued = f.auth.stats().rotations;
        async move { issued >= before.rotations + 2 }
    })
    .await;
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    let after = support::client().get(&url).send().await.unwrap().status();
    let metrics = metrics_text(&admin).await;
    let status = status_json(&admin).await;
    relay.stop().await;
    let stats = f.auth.stats();
    eprintln!("{stats:?}; /status results {results:?}");
    assert!(rotated, "no rotation after the recovered one: {stats:?}");
    assert_eq!(stats.answers_lost, 1);
    assert_eq!(stats.grace_reuses, 1, "the retry presents the same token");
    // The retry leaves only when the lease's secured time for the lost request is over
    // (token_timeout 2 s + 1 s margin), never at once.
    let refreshes = f.auth.refresh_request_times();
    let lost_at = refreshes[before.refreshes as usize];
    let retried_at = refreshes[before.refreshes as usize + 1];
    assert!(
        retried_at - lost_at >= Duration::from_millis(2500),
        "retried {:?} after the lost answer",
        retried_at - lost_at
    );
    assert_eq!(stats.refresh_reuse_detected, 0, "{stats:?}");
    assert_eq!(stats.invalid_grant, 0, "{stats:?}");
    assert_eq!(in_doubt_total(&metrics), 1.0, "{metrics}");
    assert!(
        results.iter().any(|r| r == "in_doubt"),
        "/status never showed the attempt in doubt: {results:?}"
    );
    assert_eq!(after, 200);
    assert_eq!(status["credentials"]["crm"]["state"], "ready", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_refresh_is_retried_once_within_the_grace_window() {
    let f = fixture(Duration::from_secs(30)).await;
    let (relay, admin, _, results) = lose_answers(
        &f,
        1,
        LostAnswer::Hang(Duration::from_secs(4)),
        Duration::from_secs(30),
        |stats, _| stats.grace_reuses >= 1,
    )
    .await;
    let metrics = metrics_text(&admin).await;
    relay.stop().await;
    let stats = f.auth.stats();
    assert_eq!(stats.answers_lost, 1);
    assert_eq!(stats.refresh_reuse_detected, 0, "{stats:?}");
    assert_eq!(in_doubt_total(&metrics), 1.0, "{metrics}");
    assert!(results.iter().any(|r| r == "in_doubt"), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_grace_window_the_retry_is_refused_and_reauthorization_names_the_attempt_in_doubt(
) {
    let f = fixture(Duration::ZERO).await;
    let (relay, admin, before, _) = lose_answers(
        &f,
        1,
        LostAnswer::BadGateway,
        Duration::from_secs(30),
        |_, status| status["credentials"]["crm"]["state"] == "reauthorization_required",
    )
    .await;
    let after_reauth = f.auth.stats();
    // Nothing more is sent: the dead token, or anything else.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let stats = f.auth.stats();
    let status = status_json(&admin).await;
    let metrics = metrics_text(&admin).await;
    relay.stop().await;
    eprintln!("{stats:?}; {status}");
    assert_eq!(
        stats.refreshes,
        before.refreshes + 2,
        "the lost one and exactly one retry: {stats:?}"
    );
    assert_eq!(stats.refresh_reuse_detected, 1, "{stats:?}");
    assert_eq!(
        stats.token_requests, after_reauth.token_requests,
        "token requests after re-authorization was required"
    );
    assert_eq!(in_doubt_total(&metrics), 1.0, "{metrics}");
    let detail = status["credentials"]["crm"].to_string();
    assert!(
        detail.contains("outcome was unknown") && detail.contains("502"),
        "the reason names the attempt in doubt: {detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_never_presented_a_third_time() {
    // A grace window would answer a third presentation: it must not be made.
    let f = fixture(Duration::from_secs(60)).await;
    let (relay, admin, before, _) = lose_answers(
        &f,
        2,
        LostAnswer::BadGateway,
        Duration::from_secs(30),
        |_, status| status["credentials"]["crm"]["state"] == "reauthorization_required",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let stats = f.auth.stats();
    let status = status_json(&admin).await;
    let metrics = metrics_text(&admin).await;
    let stored = support::stored_state(&f.yaml, "crm").await.unwrap();
    relay.stop().await;
    assert_eq!(stats.refreshes, before.refreshes + 2, "{stats:?}");
    assert_eq!(stats.answers_lost, 2);
    assert_eq!(stats.grace_reuses, 1, "{stats:?}");
    assert_eq!(in_doubt_total(&metrics), 2.0, "{metrics}");
    let detail = status["credentials"]["crm"].to_string();
    assert!(detail.contains("not presented again"), "{detail}");
    assert!(stored.refresh_token.is_none() && stored.reauthorization_required.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_not_in_doubt() {
    let f = fixture(Duration::ZERO).await;
    let relay = support::start(&f.yaml).await;
    let admin = format!("http://{}", relay.admin);
    let url = format!("{}/api/v4/leads", relay.url("crm"));
    assert_eq!(
        support::client().get(&url).send().await.unwrap().status(),
        200
    );
    let Fixture {
        auth, _dir, yaml, ..
    } = f;
    let grant_requests = auth.stats().refreshes;
    // The token endpoint goes away: every attempt is refused before it is sent.
    auth.shutdown().await;
    let failed = eventually(Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            let m = metrics_text(&admin).await;
            metric(
                &m,
                "tokenrelay_token_refresh_total",
                &[("credential", "crm"), ("result", "failure")],
            ) >= 3.0
        }
    })
    .await;
    let metrics = metrics_text(&admin).await;
    let status = status_json(&admin).await;
    let stored = support::stored_state(&yaml, "crm").await.unwrap();
    relay.stop().await;
    assert!(failed, "fewer than three failed attempts: {metrics}");
    assert!(grant_requests >= 1);
    assert_eq!(in_doubt_total(&metrics), 0.0, "{metrics}");
    assert_ne!(
        status["credentials"]["crm"]["state"], "reauthorization_required",
        "{status}"
    );
    assert!(stored.in_doubt.is_none() && stored.refresh_token.is_some());
}

/// A process that stored the retry mark and was killed while its retry was in flight:
/// the next process must not present the token again (the mark, not memory, says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_made_by_a_killed_process_is_not_made_again() {
    let f = fixture(Duration::ZERO).await;
    let cfg = tokenrelay::config::Config::from_yaml(&f.yaml, &|_| None).unwrap();
    let store = tokenrelay::store::open(&cfg.store).unwrap();
    let seeded = store.load("crm").await.unwrap().unwrap();
    let marked = tokenrelay::store::StoredState {
        generation: seeded.generation + 1,
        in_doubt: Some(tokenrelay::store::InDoubt {
            at_ms: tokenrelay::store::now_ms(),
            cause: "token endpoint answered 502".into(),
            retried: false,
        }),
        ..seeded.clone()
    };
    let swapped = store
        .compare_and_swap("crm", seeded.generation, &marked)
        .await
        .unwrap();
    assert_eq!(swapped, tokenrelay::store::CasOutcome::Swapped);
    // The retry reaches the server, which acts and never answers.
    f.auth
        .lose_next_answers(1, LostAnswer::Hang(Duration::from_secs(60)));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, &f.yaml).unwrap();
    let mut first = support::ChildProc::spawn(&config, &dir.path().join("first.log"), &[]);
    let sent = eventually(Duration::from_secs(20), || {
        let n = f.auth.stats().refreshes;
        async move { n >= 1 }
    })
    .await;
    first.kill9();
    assert!(sent, "the owed retry was never sent");
    let after_kill = store.load("crm").await.unwrap().unwrap();
    assert!(
        after_kill.in_doubt.as_ref().is_some_and(|d| d.retried),
        "the retry was sent before its mark was stored: {:?}",
        after_kill.in_doubt
    );
    let mut second = support::ChildProc::spawn(&config, &dir.path().join("second.log"), &[]);
    let gave_up = eventually(Duration::from_secs(20), || {
        let store = store.clone();
        async move {
            matches!(store.load("crm").await, Ok(Some(s)) if s.reauthorization_required.is_some())
        }
    })
    .await;
    // Time for a wrong second retry to show at the server.
    tokio::time::sleep(Duration::from_secs(3)).await;
    second.kill9();
    let stats = f.auth.stats();
    assert!(
        gave_up,
        "the second process did not record re-authorization"
    );
    assert_eq!(
        stats.refreshes, 1,
        "the token was presented again: {stats:?}"
    );
}
