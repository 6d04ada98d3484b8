//! Notifications: a person hears about a dead grant without Prometheus. A real local
//! HTTP receiver gets the webhook's POSTs: signed, retried until accepted, one per
//! event, and never carrying a secret.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ring::hmac;
use serde_json::Value;
use testkit::{AuthServerOptions, FailureMode};

use support::{eventually, metric, metrics_text, DemoServers};

const HOOK_SECRET: &str = "hook-s3cret-key";

/// What the receiver got: the signature header and the body of each POST.
type Received = Arc<Mutex<Vec<(Option<String>, Vec<u8>)>>>;

/// A webhook receiver on loopback that answers 500 to its first `failures` POSTs.
async fn receiver(failures: usize) -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received: Received = Arc::default();
    let left = Arc::new(AtomicUsize::new(failures));
    let got = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (got, left) = (got.clone(), left.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (got, left) = (got.clone(), left.clone());
                    async move {
                        let sig = req
                            .headers()
                            .get("x-tokenrelay-signature")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        got.lock().unwrap().push((sig, body.to_vec()));
                        let fail = left
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        if fail {
                            *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, received)
}

/// The demo servers and a refreshing credential `crm` on the file store in `dir`, with
/// `notify.webhook` set to the flow mapping `webhook`.
async fn with_webhook(dir: &tempfile::TempDir, webhook: &str) -> (DemoServers, String) {
    let demo = support::demo_servers(AuthServerOptions::default()).await;
    let state = dir.path().join("s");
    let mut yaml = support::quick_refresh_yaml(&demo.auth.token_url(), &demo.api.url(), &state, "");
    yaml.push_str(&format!("notify:\n  webhook: {webhook}\n"));
    (demo, yaml)
}

fn expected_signature(body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, HOOK_SECRET.as_bytes());
    let hex: String = hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

fn events(received: &Received) -> Vec<Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| serde_json::from_slice(body).unwrap())
        .collect()
}

/// A dead grant is told once, signed, with the command that helps, after the receiver
/// failed twice; the deliveries are counted; no secret is in any body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_grant_is_told_signed_and_retried_until_accepted() {
    let (hook, received) = receiver(2).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hook-secret");
    std::fs::write(&secret_file, HOOK_SECRET).unwrap();
    let hook = format!("{{ url: {hook}, secret_file: {} }}", secret_file.display());
    let (DemoServers { auth, api: _api }, yaml) = with_webhook(&dir, &hook).await;
    let refresh_token = auth.new_grant();
    support::seed_refresh_token(&yaml, "crm", &refresh_token).await;
    auth.set_mode(FailureMode::InvalidGrantAlways);
    let relay = support::start(&yaml).await;
    let admin = format!("http://{}", relay.admin);

    let delivered = eventually(Duration::from_secs(30), || async {
        metric(
            &metrics_text(&admin).await,
            "tokenrelay_notifications_total",
            &[("event", "reauthorization_required"), ("result", "success")],
        ) == 1.0
    })
    .await;
    let text = metrics_text(&admin).await;
    relay.stop().await;
    assert!(delivered, "not delivered: {:?}", events(&received));

    let posts = received.lock().unwrap().clone();
    assert_eq!(posts.len(), 3, "two refused, then accepted");
    let failures = metric(
        &text,
        "tokenrelay_notifications_total",
        &[("event", "reauthorization_required"), ("result", "failure")],
    );
    assert_eq!(failures, 2.0);
    for (sig, body) in &posts {
        assert_eq!(sig.as_deref(), Some(expected_signature(body).as_str()));
        let text = String::from_utf8_lossy(body);
        for secret in ["demo-secret", refresh_token.as_str(), HOOK_SECRET] {
            assert!(!text.contains(secret), "a secret in the body: {text}");
        }
    }
    let told = events(&received);
    assert!(told.iter().all(|e| e == &told[0]), "one event, sent again");
    let e = &told[0];
    assert_eq!(e["event"], "reauthorization_required");
    assert_eq!(e["credential"], "crm");
    assert_eq!(e["state"], "reauthorization_required");
    assert!(e["at"].as_str().unwrap().ends_with('Z'), "{e}");
    assert!(
        e["detail"].as_str().unwrap().contains("invalid_grant"),
        "{e}"
    );
    assert!(
        e["action"]
            .as_str()
            .unwrap()
            .starts_with("tokenrelay authorize --config "),
        "{e}"
    );
}

/// Seeding a new grant brings the credential back, and that is told too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_after_a_dead_grant_is_told() {
    let (hook, received) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let hook = format!("{{ url: {hook}, events: [reauthorization_required, recovered] }}");
    let (DemoServers { auth, api: _api }, yaml) = with_webhook(&dir, &hook).await;
    auth.set_mode(FailureMode::InvalidGrantAlways);
    support::seed_refresh_token(&yaml, "crm", &auth.new_grant()).await;
    let relay = support::start(&yaml).await;
    let told = |event: &'static str| {
        let received = received.clone();
        move || {
            let received = received.clone();
            async move { events(&received).iter().any(|e| e["event"] == event) }
        }
    };
    assert!(eventually(Duration::from_secs(30), told("reauthorization_required")).await);
    auth.set_mode(FailureMode::Normal);
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let seeded = support::seed_cli(&config, "crm", &auth.new_grant());
    assert!(seeded.status.success(), "{seeded:?}");
    let recovered = eventually(Duration::from_secs(30), told("recovered")).await;
    relay.stop().await;
    assert!(recovered, "{:?}", events(&received));
    let names: Vec<Value> = events(&received)
        .iter()
        .map(|e| e["event"].clone())
        .collect();
    assert_eq!(names, ["reauthorization_required", "recovered"]);
}

/// A webhook that is neither https nor on this host needs `allow_insecure_http`.
#[test]
fn a_plain_http_webhook_elsewhere_is_refused() {
    let yaml = support::one_upstream_yaml("http://127.0.0.1:1/token", "http://127.0.0.1:2", "", "");
    let with = |webhook: &str| format!("{yaml}notify:\n  webhook: {webhook}\n");
    let refused = tokenrelay::config::Config::from_yaml(
        &with("{ url: http://hooks.example.com/x }"),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(refused.contains("notify.webhook.url"), "{refused}");
    for ok in [
        "{ url: http://127.0.0.1:9/x }",
        "{ url: https://hooks.example.com/x }",
        "{ url: http://hooks.example.com/x, allow_insecure_http: true }",
    ] {
        tokenrelay::config::Config::from_yaml(&with(ok), &|_| None).unwrap();
    }
    let bad_event = tokenrelay::config::Config::from_yaml(
        &with("{ url: https://h.example/x, events: [dead] }"),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        bad_event.contains("\"dead\" is not an event"),
        "{bad_event}"
    );
}
