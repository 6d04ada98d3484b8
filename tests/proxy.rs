//! Forwarding through a real tokenrelay to the demo upstream: methods, paths, headers,
//! streamed bodies, upstream errors, redirects, inbound limits and graceful shutdown.

mod support;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};
use testkit::{pattern_byte, AuthServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::{demo_servers, one_upstream_yaml, raw_exchange, raw_status, DemoServers, Running};

const MIB: usize = 1 << 20;

/// Demo servers plus tokenrelay in front of them (upstream url = api url + `base_path`).
async fn setup(base_path: &str, upstream_extra: &str) -> (DemoServers, Running) {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let yaml = one_upstream_yaml(
        &demo.auth.token_url(),
        &format!("{}{base_path}", demo.api.url()),
        "",
        upstream_extra,
    );
    let running = support::start(&yaml).await;
    (demo, running)
}

/// The bearer token the upstream received on its most recent request.
fn upstream_authorization(demo: &DemoServers) -> Vec<String> {
    demo.api
        .last_request_headers()
        .into_iter()
        .filter(|(n, _)| n == "authorization")
        .map(|(_, v)| v)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_is_forwarded_with_path_query_and_token() {
    let (demo, tr) = setup("", "").await;
    let c = support::client();
    let query = "a=1&b=two%20words&c=%2F%3F%26&d=%E2%9C%93";
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let resp = c
            .request(m, format!("{}/echo?{query}", tr.url("api")))
            .body(format!("body of {method}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{method}");
        let echo: Value = resp.json().await.unwrap();
        assert_eq!(echo["method"], method);
        assert_eq!(echo["path"], "/echo");
        assert_eq!(
            echo["query"], query,
            "{method}: query must arrive byte for byte"
        );
        assert_eq!(echo["body"], format!("body of {method}"));
        let auth = upstream_authorization(&demo);
        assert_eq!(
            auth.len(),
            1,
            "{method}: exactly one Authorization upstream"
        );
        let token = auth[0].strip_prefix("Bearer ").expect("Bearer scheme");
        assert!(demo.auth.is_valid_access_token(token));
    }

    let resp = c
        .head(format!("{}/echo?h=1", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap().is_empty());
    let last = demo.api.last_request().unwrap();
    assert_eq!(last.method, "HEAD");
    assert_eq!(last.uri, "/echo?h=1");
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_paths_arrive_unchanged() {
    let (demo, tr) = setup("", "").await;
    let target = "/files/a%2Fb%20c/%E2%9C%93?q=%25x%3D&empty=&plus=a+b";
    let resp = support::client()
        .get(format!("{}{target}", tr.url("api")))
        .send()
        .await
        .unwrap();
    // The demo API has no such route: its own 404 comes back, naming the path it saw.
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["path"], "/files/a%2Fb%20c/%E2%9C%93");
    assert_eq!(demo.api.last_request().unwrap().uri, target);
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_path_of_the_upstream_url_prefixes_every_request() {
    for base in ["/v1", "/v1/"] {
        let (demo, tr) = setup(base, "").await;
        let resp = support::client()
            .post(format!("{}/echo?x=1", tr.url("api")))
            .body("hi")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "base {base}");
        let echo: Value = resp.json().await.unwrap();
        assert_eq!(echo["path"], "/v1/echo", "base {base}");
        assert_eq!(echo["query"], "x=1");
        assert_eq!(demo.api.last_request().unwrap().uri, "/v1/echo?x=1");

        let resp = support::client()
            .get(format!("{}/", tr.url("api")))
            .send()
            .await
            .unwrap();
        assert_eq!(demo.api.last_request().unwrap().uri, "/v1/", "base {base}");
        assert_eq!(resp.status(), 404);
        tr.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_pass_through_and_host_is_the_upstreams() {
    let (demo, tr) = setup("", "").await;
    let resp = support::client()
        .get(format!("{}/echo", tr.url("api")))
        .header("x-request-id", "abc-123")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("accept", "application/json")
        .header("user-agent", "legacy-app/1.0")
        .header("cookie", "session=s1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    let h = &echo["headers"];
    assert_eq!(h["x-request-id"], serde_json::json!(["abc-123"]));
    assert_eq!(h["x-multi"], serde_json::json!(["one", "two"]));
    assert_eq!(h["accept"], serde_json::json!(["application/json"]));
    assert_eq!(h["user-agent"], serde_json::json!(["legacy-app/1.0"]));
    assert_eq!(h["cookie"], serde_json::json!(["session=s1"]));
    assert_eq!(
        h["host"],
        serde_json::json!([demo.api.addr().to_string()]),
        "Host must name the upstream, not the listener"
    );
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_and_status_pass_through() {
    let (_demo, tr) = setup("", "").await;
    let resp = support::client()
        .get(format!("{}/echo", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    for code in [201u16, 204, 404, 418] {
        let resp = support::client()
            .get(format!("{}/status/{code}", tr.url("api")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), code);
    }
    tr.stop().await;
}

/// Deterministic, non-repeating-looking upload data.
fn upload_data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 7) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_through_intact() {
    let (_demo, tr) = setup("", "").await;
    let data = upload_data(50 * MIB);
    let sent = Sha256::digest(&data);
    let mut resp = support::client()
        .post(format!("{}/stream-echo", tr.url("api")))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        len += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(len, 50 * MIB);
    assert_eq!(
        hasher.finalize(),
        sent,
        "echoed body differs from the upload"
    );
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_larger_than_the_retry_limit_is_streamed_not_buffered() {
    // With the body still open, the upstream's echo of its first 100 KiB (beyond the
    // 64 KiB held for a 401 retry) must come back: nothing waits for the whole body.
    let (_demo, tr) = setup("", "").await;
    let mut conn = tokio::net::TcpStream::connect(tr.upstreams["api"])
        .await
        .unwrap();
    let first = vec![b'z'; 100 * 1024];
    let mut req = format!(
        "POST /stream-echo HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        tr.upstreams["api"],
        first.len()
    )
    .into_bytes();
    req.extend_from_slice(&first);
    req.extend_from_slice(b"\r\n");
    conn.write_all(&req).await.unwrap();
    let mut seen = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    while seen < 50 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("echoed bytes arrive while the upload is still open")
            .unwrap();
        assert!(n > 0, "connection closed early");
        if head.len() < 512 {
            head.extend_from_slice(&buf[..n.min(512)]);
        }
        seen += buf[..n].iter().filter(|&&b| b == b'z').count();
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    conn.write_all(b"0\r\n\r\n").await.unwrap();
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_uploads_are_answered_and_forwarded() {
    // What curl does for bodies over 1 KiB: send the head, wait for 100 Continue.
    let (_demo, tr) = setup("", "").await;
    let addr = tr.upstreams["api"];
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = "x".repeat(5000);
    conn.write_all(
        format!(
            "POST /echo HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("100 Continue before the body is sent")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
        .await
        .expect("response after the body")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    // Whatever else the proxy sent, one final 200 with the echo of the whole body.
    let final_head = text.rfind("HTTP/1.1 ").unwrap();
    assert!(text[final_head..].starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"body_len\":5000"), "{text}");
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_download_streams_through_intact() {
    let (_demo, tr) = setup("", "").await;
    let n = 50 * MIB as u64;
    let mut resp = support::client()
        .get(format!("{}/bytes/{n}", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert!(resp.headers().get("content-length").is_none());
    let mut offset = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        for (i, b) in chunk.iter().enumerate() {
            let at = offset + i as u64;
            assert_eq!(*b, pattern_byte(at), "byte {at} differs");
        }
        offset += chunk.len() as u64;
    }
    assert_eq!(offset, n);
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_chunked_responses_keep_their_framing() {
    let (_demo, tr) = setup("", "").await;
    for n in [0u64, 1, 16 * 1024, 16 * 1024 + 1, 100_000] {
        let resp = support::client()
            .get(format!("{}/bytes/{n}", tr.url("api")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len() as u64, n);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(i as u64)));
    }
    tr.stop().await;
}

async fn assert_error_json(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    assert_eq!(body["upstream"], "api", "{body}");
    assert_eq!(body["credential"], "api", "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_connection_is_a_502_json_error() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let tr = support::start(&one_upstream_yaml(&demo.auth.token_url(), &dead, "", "")).await;
    let started = Instant::now();
    let resp = support::client()
        .get(format!("{}/echo", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_error_json(resp, 502).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slower_than_timeout_is_a_504_json_error() {
    let (demo, tr) = setup("", "timeout: 500ms").await;
    // Warm up so the token fetch is not part of the measured time.
    let c = support::client();
    let resp = c
        .get(format!("{}/echo", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let resp = c
        .get(format!("{}/sleep/5000", tr.url("api")))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_error_json(resp, 504).await;
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // A fast request on the same listener still works.
    let resp = c
        .get(format!("{}/sleep/10", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(demo);
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_passes_through_unchanged() {
    let (_demo, tr) = setup("", "").await;
    for code in [500u16, 502, 503, 504] {
        let resp = support::client()
            .get(format!("{}/status/{code}", tr.url("api")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), code);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["status"], code, "the upstream's own body: {body}");
        assert!(
            body.get("upstream").is_none(),
            "not a tokenrelay error: {body}"
        );
    }
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_point_back_at_the_listener() {
    let (demo, tr) = setup("", "").await;
    let resp = support::client()
        .get(format!("{}/redirect", tr.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let local = tr.url("api");
    assert_eq!(
        resp.headers()["location"].to_str().unwrap(),
        format!("{local}/echo?from=redirect")
    );
    assert_eq!(
        resp.headers()["content-location"].to_str().unwrap(),
        format!("{local}/echo")
    );
    assert!(!format!("{:?}", resp.headers()).contains(&demo.api.addr().to_string()));

    // Following it through the proxy works.
    let resp = support::client()
        .get(resp.headers()["location"].to_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["query"], "from=redirect");
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_is_refused() {
    let (demo, tr) = setup("", "limits: { max_header_size: 16KiB }").await;
    let addr = tr.upstreams["api"];

    // Below the limit: served.
    let ok = format!(
        "GET /echo HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(4 * 1024)
    );
    let resp = raw_exchange(addr, ok.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(raw_status(&resp), Some(200), "{resp}");
    let before = demo.api.stats().requests;

    // Just over the limit (likely read whole at once) and far over it (read in parts).
    for size in [17 * 1024, 64 * 1024] {
        let big = format!(
            "GET /echo HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(size)
        );
        let resp = raw_exchange(addr, big.as_bytes(), Duration::from_secs(10)).await;
        let status = raw_status(&resp);
        assert!(
            status == Some(431) || status.is_none(),
            "{size}: expected 431 or a closed connection, got {resp:.200}"
        );
        assert_eq!(
            demo.api.stats().requests,
            before,
            "{size}: nothing forwarded"
        );
    }
    tr.stop().await;
}

/// Sends one keep-alive request and waits up to `within` for a `200` response head.
async fn ask(conn: &mut tokio::net::TcpStream, request: &str, within: Duration) -> bool {
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    matches!(
        tokio::time::timeout(within, conn.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1 200")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_caps_concurrent_connections() {
    let (_demo, tr) = setup("", "limits: { max_connections: 2 }").await;
    let addr = tr.upstreams["api"];
    let request = format!("GET /echo HTTP/1.1\r\nHost: {addr}\r\n\r\n");

    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(ask(&mut first, &request, Duration::from_secs(10)).await);
    assert!(ask(&mut second, &request, Duration::from_secs(10)).await);

    // Both stay open (keep-alive): a third connection is not served...
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        !ask(&mut third, &request, Duration::from_millis(1500)).await,
        "a third concurrent connection was served"
    );
    // ...until one of the others closes.
    drop(first);
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("third connection served after the first closed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(second);
    drop(third);
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_disconnected_after_the_header_read_timeout() {
    let (demo, tr) = setup("", "limits: { header_read_timeout: 1s }").await;
    let addr = tr.upstreams["api"];
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    // Half a request head, then silence.
    conn.write_all(format!("GET /echo HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // A 408 before closing is fine too.
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "slow client still connected after 8s");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        started.elapsed()
    );
    assert_eq!(demo.api.stats().requests, 0);

    // A connection that never sends a byte is closed on the same clock.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(8), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "silent client still connected after 8s"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A prompt client on the same listener is served.
    let resp = raw_exchange(
        addr,
        format!("GET /echo HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(raw_status(&resp), Some(200));
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_live_until_the_idle_timeout_not_the_header_timeout() {
    let (_demo, tr) = setup("", "limits: { header_read_timeout: 1s, idle_timeout: 3s }").await;
    let addr = tr.upstreams["api"];
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /echo HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut buf = vec![0u8; 64 * 1024];
    // Reads one response (the echo body is small; a single read holds it).
    async fn response(conn: &mut tokio::net::TcpStream, buf: &mut [u8]) -> String {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(buf))
            .await
            .expect("response in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    }
    conn.write_all(request.as_bytes()).await.unwrap();
    assert!(response(&mut conn, &mut buf)
        .await
        .starts_with("HTTP/1.1 200"));
    // Idle for longer than the header timeout: still open, and serves a second request.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    conn.write_all(request.as_bytes()).await.unwrap();
    let second = response(&mut conn, &mut buf).await;
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "second request on the idle connection: {second:?}"
    );
    // Then idle past the idle timeout: closed by the server.
    let idle_from = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection still open after 10s");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(2500),
        "closed after {idle:?}, before the 3s idle timeout"
    );
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_and_exits_zero() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (admin, listen) = (support::free_port(), support::free_port());
    let config = dir.path().join("tokenrelay.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{ listen: 127.0.0.1:{admin} }}\n\
             credentials:\n  api: {{ grant: client_credentials, token_url: {}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}\n\
             upstreams:\n  api: {{ listen: 127.0.0.1:{listen}, url: {}, credential: api, allow_insecure_http: true }}\n",
            demo.auth.token_url(),
            demo.api.url()
        ),
    )
    .unwrap();
    let mut child = support::ChildProc::spawn(&config, &dir.path().join("log"), &[]);
    assert!(
        support::wait_ready(
            &format!("http://127.0.0.1:{admin}/readyz"),
            Duration::from_secs(15)
        )
        .await,
        "tokenrelay did not become ready; log:\n{}",
        std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
    );

    let url = format!("http://127.0.0.1:{listen}/sleep/1500");
    let slow = tokio::spawn(async move {
        let resp = support::client().get(url).send().await?;
        let status = resp.status();
        let connection = resp.headers().get("connection").cloned();
        let body = resp.text().await?;
        Ok::<_, reqwest::Error>((status, connection, body))
    });
    let api = &demo.api;
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            api.stats().requests >= 1
        })
        .await,
        "the slow request never reached the upstream"
    );
    let code = tokio::task::spawn_blocking(move || {
        let code = child.terminate();
        (code, child)
    })
    .await
    .unwrap();
    let (status, connection, body) = slow.await.unwrap().expect("in-flight request completed");
    assert_eq!(status, 200);
    assert_eq!(body, "slept");
    // The app is told not to reuse a connection that is being drained.
    assert_eq!(
        connection.as_ref().and_then(|v| v.to_str().ok()),
        Some("close")
    );
    assert_eq!(code.0, Some(0), "exit code after SIGTERM");
    // Stopped: the listener is gone.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", listen))
        .await
        .is_err());
}

/// Names of this process's threads (Linux: /proc/self/task/*/comm).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_workers_share_the_connection_cap_and_stop_with_the_process() {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let yaml = one_upstream_yaml(
        &demo.auth.token_url(),
        &demo.api.url(),
        "",
        "limits: { max_connections: 3 }",
    ) + "runtime: { worker_threads: 4 }\n";
    let tr = support::start(&yaml).await;
    // The worker threads start beside the listeners; give them a moment.
    let started = support::eventually(Duration::from_secs(10), || async {
        thread_names().iter().any(|n| n == "tokenrelay-w3")
    })
    .await;
    assert!(
        started,
        "4 workers: the main runtime and threads w1..w3: {:?}",
        thread_names()
    );
    let addr = tr.upstreams["api"];
    let request = format!("GET /echo HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // Whichever workers accept them, three connections use up the one cap.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(ask(&mut conn, &request, Duration::from_secs(10)).await);
        open.push(conn);
    }
    let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        !ask(&mut fourth, &request, Duration::from_millis(1500)).await,
        "a fourth concurrent connection was served"
    );
    drop(open.pop());
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), fourth.read(&mut buf))
        .await
        .expect("fourth connection served after one closed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(open);
    drop(fourth);

    // 64 requests at once, each on a connection of its own that closes after the
    // response: all are served through the three slots.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let requests = (0..64).map(|i| {
        let c = c.clone();
        let url = format!("{}/echo?i={i}", tr.url("api"));
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200))),
        "{statuses:?}"
    );

    tr.stop().await;
    assert!(
        !thread_names().iter().any(|n| n == "tokenrelay-w3"),
        "worker threads end with the process's shutdown"
    );
}

/// Java's default `HttpClient` (`HttpClient.newHttpClient()`, HTTP/2 preferred) asks
/// every http:// request to upgrade to h2c. The real JDK client, run on
/// `tests/clients/H2cProbe.java`, sends GETs, a POST with `Expect: 100-continue`, a PUT
/// and a DELETE through both engines' listeners (a plain-http upstream: the fast path;
/// an https one: hyper) and must get every answer over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jdk_default_client_is_served_over_http11_on_both_engines() {
    let Some(mut java) = support::tools::command("java") else {
        return;
    };
    let demo = demo_servers(AuthServerOptions::default()).await;
    let (tls, ca_pem) = support::pki::localhost_server(&[b"http/1.1"]);
    let secure_api = testkit::ApiServer::start_tls(Some(demo.auth.validator()), tls)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n\
         credentials:\n  \
           api: {{ grant: client_credentials, token_url: {}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}\n\
         upstreams:\n  \
           fast: {{ listen: 127.0.0.1:0, url: {}, credential: api, allow_insecure_http: true }}\n  \
           general: {{ listen: 127.0.0.1:0, url: \"https://localhost:{}\", credential: api, ca_file: \"{}\" }}\n",
        demo.auth.token_url(),
        demo.api.url(),
        secure_api.addr().port(),
        ca.display()
    );
    let tr = support::start(&yaml).await;
    let probe =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/H2cProbe.java");
    let child = java
        .arg(probe)
        .arg(tr.url("fast"))
        .arg(tr.url("general"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("java starts");
    let (status, stdout, stderr) = wait_bounded(child, Duration::from_secs(180)).await;
    assert_eq!(
        status,
        Some(0),
        "the JDK client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("12 requests, 0 failed"), "{stdout}");
    assert_eq!(
        demo.api.stats().unauthorized + secure_api.stats().unauthorized,
        0
    );
    tr.stop().await;
}

/// Waits for `child` off the runtime, killing it after `within`; its exit code (`None`
/// when killed) and output.
async fn wait_bounded(
    mut child: std::process::Child,
    within: Duration,
) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let read = |r: Option<&mut dyn std::io::Read>| {
        let mut text = String::new();
        if let Some(r) = r {
            let _ = r.read_to_string(&mut text);
        }
        text
    };
    let stdout = read(child.stdout.as_mut().map(|s| s as &mut dyn std::io::Read));
    let stderr = read(child.stderr.as_mut().map(|s| s as &mut dyn std::io::Read));
    (status, stdout, stderr)
}
