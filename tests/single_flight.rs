//! Token refreshes are single-flight: many requests finding the token expired share one
//! token request; and when no token can be had, requests fail promptly with 503.

mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;
use testkit::{AuthServerOptions, FailureMode};

use support::{credential_state, demo_servers, one_upstream_yaml};

/// The value of a metric sample line starting with `prefix` (0 when absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Tokenrelay with 5 s tokens whose proactive refresh comes after they expire:
/// refresh_at 0.99 and refresh_before 0s put it at ~4.7-4.95 s, after the token stops
/// being used (5 s minus the 1.25 s safety margin = 3.75 s). So there is a window in
/// which the token is expired and no refresh runs. `extra`: more credential settings.
async fn expiring_without_a_refresh(extra: &str) -> (support::DemoServers, support::Running) {
    let demo = demo_servers(AuthServerOptions {
        access_ttl: Duration::from_secs(5),
        ..Default::default()
    })
    .await;
    let yaml = one_upstream_yaml(
        &demo.auth.token_url(),
        &demo.api.url(),
        &format!("refresh_at: 0.99, refresh_before: 0s{extra}"),
        "",
    );
    let tr = support::start(&yaml).await;
    (demo, tr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_on_an_expired_token_cause_one_token_request() {
    // Waits are bounded by twice the token timeout: long enough for a slow machine to
    // send all 1000 requests while the refresh is held.
    let (demo, tr) = expiring_without_a_refresh(", token_timeout: 60s").await;
    let c = support::client();
    let url = format!("{}/echo", tr.url("api"));
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "warm-up");
    assert_eq!(demo.auth.stats().token_requests, 1);

    // Whatever refresh starts once the token has expired is held at the token endpoint
    // until every request is waiting for it, however long sending them takes.
    demo.auth.hold_token_requests();
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            credential_state(&tr, "api").await == "unavailable"
        })
        .await,
        "token never expired"
    );
    let before = demo.auth.stats().token_requests;
    assert_eq!(before, 1, "no refresh may have finished before expiry");
    let log_before = demo.auth.requests_log().len();

    let sending = tokio::spawn(join_all((0..1000).map(|_| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let resp = c.get(&url).send().await?;
            Ok::<_, reqwest::Error>(resp.status().as_u16())
        }
    })));
    let waiters = || async {
        let metrics = support::get_text(&tr.admin_url("/metrics")).await;
        metric(
            &metrics,
            "tokenrelay_refresh_waiters_total{credential=\"api\"}",
        )
    };
    let all_waiting = support::eventually(Duration::from_secs(60), || async {
        waiters().await >= 1000.0
    })
    .await;
    demo.auth.release_token_requests();
    let responses = sending.await.unwrap();
    let all_done = Instant::now();
    assert!(all_waiting, "only {} requests waited", waiters().await);
    let ok = responses.iter().filter(|r| matches!(r, Ok(200))).count();
    assert_eq!(ok, 1000, "non-200 answers: {:?}", {
        let mut bad: Vec<_> = responses
            .iter()
            .filter(|r| !matches!(r, Ok(200)))
            .map(|r| format!("{r:?}"))
            .collect();
        bad.truncate(5);
        bad
    });
    // Exactly one token request was made for all of them.
    assert_eq!(
        demo.auth.stats().token_requests - before,
        1,
        "token requests while 1000 requests waited"
    );
    let log = demo.auth.requests_log();
    let during: Vec<_> = log[log_before..]
        .iter()
        .filter(|r| r.at <= all_done)
        .collect();
    assert_eq!(during.len(), 1);
    assert_eq!(during[0].grant_type, "client_credentials");

    // No second refresh follows from the demand the waiters left behind: any token
    // request started now would be processed at once (the next scheduled one is ~4.7 s
    // after the new token).
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        demo.auth.stats().token_requests - before,
        1,
        "a spurious refresh followed the single-flight one"
    );
    tr.stop().await;
}

async fn assert_503_json(resp: reqwest::Response) {
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    assert_eq!(body["upstream"], "api");
    assert_eq!(body["credential"], "api");
}

/// Tokenrelay with one upstream and 3 s tokens (refreshed proactively ~1.4 s in), whose
/// token endpoint fails from after the first token on, once that token has expired:
/// the demo servers, the running instance and the upstream's `/echo` url.
async fn token_expired_with_the_endpoint_down() -> (support::DemoServers, support::Running, String)
{
    let demo = demo_servers(AuthServerOptions {
        access_ttl: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let yaml = one_upstream_yaml(
        &demo.auth.token_url(),
        &demo.api.url(),
        "token_timeout: 1s",
        "",
    );
    let tr = support::start(&yaml).await;
    let url = format!("{}/echo", tr.url("api"));
    let first = support::client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    demo.auth.set_mode(FailureMode::ServerError);
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            credential_state(&tr, "api").await == "unavailable"
        })
        .await,
        "token never expired"
    );
    (demo, tr, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_get_a_prompt_503_when_no_token_can_be_obtained() {
    let (demo, tr, url) = token_expired_with_the_endpoint_down().await;
    let c = support::client();
    let forwarded = demo.api.stats().requests;
    // token_timeout 1s: any wait is bounded by the wait budget (up to 1 s to the
    // attempt, then 2 × 1 s + 2 s), plus a margin.
    let bound = Duration::from_secs(6);
    for _ in 0..3 {
        let started = Instant::now();
        let answers = join_all((0..20).map(|_| c.get(&url).send())).await;
        for resp in answers {
            assert_503_json(resp.unwrap()).await;
        }
        assert!(
            started.elapsed() < bound,
            "503s took {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        demo.api.stats().requests,
        forwarded,
        "nothing forwarded without a token"
    );
    let ready = c.get(tr.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    // The endpoint recovers: so does the proxy (within the refresh backoff).
    demo.auth.set_mode(FailureMode::Normal);
    assert!(
        support::eventually(Duration::from_secs(30), || async {
            matches!(c.get(&url).send().await, Ok(r) if r.status() == 200)
        })
        .await,
        "no recovery after the token endpoint came back"
    );
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_get_a_prompt_503_when_the_first_token_cannot_be_obtained() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    demo.auth.set_mode(FailureMode::ServerError);
    let yaml = one_upstream_yaml(
        &demo.auth.token_url(),
        &demo.api.url(),
        "token_timeout: 1s",
        "",
    );
    let tr = support::start(&yaml).await;
    let c = support::client();
    let url = format!("{}/echo", tr.url("api"));
    let started = Instant::now();
    for resp in join_all((0..10).map(|_| c.get(&url).send())).await {
        assert_503_json(resp.unwrap()).await;
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(demo.api.stats().requests, 0);
    tr.stop().await;
}

/// How many attempts the usual backoff (no valid token: 0.5 s doubling to 5 s, each
/// scaled by at least 0.75) can make in `window`, counting one at its start.
fn usual_attempts_at_most(window: Duration) -> u64 {
    let mut elapsed = Duration::ZERO;
    let mut attempts = 1;
    for failures in 0.. {
        let delay = (Duration::from_millis(500) * (1 << failures.min(7)))
            .min(Duration::from_secs(5))
            .mul_f64(0.75);
        elapsed += delay;
        if elapsed > window {
            break;
        }
        attempts += 1;
    }
    attempts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_requests_never_raise_a_down_endpoint_above_twice_the_usual_attempt_rate() {
    let (demo, tr, url) = token_expired_with_the_endpoint_down().await;
    let c = support::client();

    // Requests keep arriving (each waiting or answered 503) while the endpoint stays down.
    let before = demo.auth.stats().token_requests;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let answers = join_all((0..4).map(|_| c.get(&url).send())).await;
        for resp in answers {
            assert_eq!(resp.unwrap().status(), 503);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let window = started.elapsed();
    let attempts = demo.auth.stats().token_requests - before;
    // Bringing retries forward may at most double the usual rate (one extra attempt per
    // backoff step); an attempt in flight when the window opened counts too.
    let bound = 2 * usual_attempts_at_most(window) + 1;
    eprintln!("{attempts} token requests in {window:?} (bound {bound})");
    assert!(
        attempts <= bound,
        "{attempts} token requests in {window:?} with the endpoint down; at most {bound} allowed"
    );
    tr.stop().await;
}

/// `n` concurrent GETs of `url`; the status codes, in no order.
async fn concurrent_statuses(url: &str, n: usize) -> Vec<u16> {
    let c = support::client();
    join_all((0..n).map(|_| c.get(url).send()))
        .await
        .into_iter()
        .map(|r| r.map(|r| r.status().as_u16()).unwrap_or(0))
        .collect()
}

/// Requests waiting after an upstream 401 keep waiting through one failed refresh
/// attempt: the retry comes within their wait budget, and they all get its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_after_a_401_keep_waiting_through_one_failed_attempt() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let yaml = one_upstream_yaml(
        &demo.auth.token_url(),
        &demo.api.url(),
        "token_timeout: 3s",
        "",
    );
    let tr = support::start(&yaml).await;
    let url = format!("{}/echo", tr.url("api"));
    assert_eq!(concurrent_statuses(&url, 1).await, vec![200], "warm-up");
    // The token is revoked; the refresh it causes fails slowly (every waiter has joined
    // by then); the next one works.
    demo.auth.fail_next(1, Duration::from_millis(800));
    demo.auth.expire_access_tokens();
    let statuses = concurrent_statuses(&url, 12).await;
    let stats = demo.auth.stats();
    tr.stop().await;
    assert_eq!(statuses, vec![200; 12], "token requests: {stats:?}");
    assert_eq!(stats.token_requests, 3, "warm-up, the failure, the retry");
}

/// Requests waiting on an expired token keep waiting through one failed attempt too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_an_expired_token_keep_waiting_through_one_failed_attempt() {
    let (demo, tr) = expiring_without_a_refresh(", token_timeout: 3s").await;
    let url = format!("{}/echo", tr.url("api"));
    assert_eq!(concurrent_statuses(&url, 1).await, vec![200], "warm-up");
    demo.auth.fail_next(1, Duration::from_millis(800));
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            credential_state(&tr, "api").await == "unavailable"
        })
        .await,
        "token never expired"
    );
    let statuses = concurrent_statuses(&url, 12).await;
    let stats = demo.auth.stats();
    tr.stop().await;
    assert_eq!(statuses, vec![200; 12], "token requests: {stats:?}");
}
