//! TLS to upstreams and token endpoints: a private CA trusted through `ca_file` works
//! (HTTP/1.1 by default, on the fast path; HTTP/2 negotiated by ALPN where the upstream
//! sets `http2` and the server offers it); without it, the server's
//! certificate is refused — a 502 of kind `tls` for upstreams, a failed refresh for token
//! endpoints — and nothing is sent. Certificates are made by the test (rcgen); a TLS
//! terminator in the test relays to the plain-HTTP demo servers. Loopback only.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use testkit::{ApiServer, AuthServer, AuthServerOptions};
use tokio::net::TcpListener;

/// A private CA (PEM) and a server certificate it signed for localhost and 127.0.0.1.
struct Pki {
    ca_pem: String,
    server: rustls::ServerConfig,
}

fn pki(alpn: &[&[u8]]) -> Pki {
    let (server, ca_pem) = support::pki::localhost_server(alpn);
    Pki { ca_pem, server }
}

/// Terminates TLS on a loopback port and relays the bytes to `backend`; records the
/// ALPN protocol each connection negotiated.
async fn tls_front(
    config: rustls::ServerConfig,
    backend: SocketAddr,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let alpn = Arc::new(Mutex::new(Vec::new()));
    let seen = alpn.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let proto = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).to_string());
                seen.lock()
                    .unwrap()
                    .push(proto.unwrap_or_else(|| "none".into()));
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, alpn)
}

/// The demo servers (plain http) and a private CA offering h2 and http/1.1, its PEM
/// written to `ca_file` in `dir`.
struct Demo {
    pki: Pki,
    dir: tempfile::TempDir,
    ca_file: std::path::PathBuf,
    auth: AuthServer,
    api: ApiServer,
}

async fn demo_behind_a_private_ca() -> Demo {
    let pki = pki(&[b"h2", b"http/1.1"]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    Demo {
        pki,
        dir,
        ca_file,
        auth,
        api,
    }
}

/// One client_credentials credential and one upstream; a CA file for either side is
/// optional, and plain-http URLs (the non-TLS side of a test) are allowed explicitly.
fn yaml(
    token_url: &str,
    upstream_url: &str,
    cred_ca: Option<&Path>,
    up_ca: Option<&Path>,
) -> String {
    let extra = |url: &str, ca: Option<&Path>| {
        let mut e = ca
            .map(|p| format!(", ca_file: \"{}\"", p.display()))
            .unwrap_or_default();
        if url.starts_with("http://") {
            e.push_str(", allow_insecure_http: true");
        }
        e
    };
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
credentials:
  api: {{ grant: client_credentials, token_url: "{token_url}", client_id: demo-client, client_secret: demo-secret, token_timeout: 2s{} }}
upstreams:
  api: {{ listen: "127.0.0.1:0", url: "{upstream_url}", credential: api{} }}
"#,
        extra(token_url, cred_ca),
        extra(upstream_url, up_ca)
    )
}

/// The upstream entry of `yaml` with `http2: true`.
fn with_http2(yaml: String) -> String {
    yaml.replacen(", credential: api", ", credential: api, http2: true", 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_in_ca_file_is_trusted_and_http2_is_negotiated_where_asked() {
    // `_dir` holds the CA file for the test's duration.
    let Demo {
        pki,
        dir: _dir,
        ca_file,
        auth,
        api,
    } = demo_behind_a_private_ca().await;
    let (auth_tls, _) = tls_front(pki.server.clone(), auth.addr()).await;
    for (http2, protocol) in [(false, "http/1.1"), (true, "h2")] {
        let (api_tls, api_alpn) = tls_front(pki.server.clone(), api.addr()).await;
        let config = yaml(
            &format!("https://127.0.0.1:{}/oauth2/token", auth_tls.port()),
            &format!("https://localhost:{}", api_tls.port()),
            Some(&ca_file),
            Some(&ca_file),
        );
        let relay = support::start(&if http2 { with_http2(config) } else { config }).await;
        for _ in 0..3 {
            let resp = support::client()
                .get(format!("{}/echo?via=tls", relay.url("api")))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["query"], "via=tls");
        }
        assert!(api.stats().authorized >= 3);
        let status: serde_json::Value =
            serde_json::from_str(&support::get_text(&relay.admin_url("/status")).await).unwrap();
        let engine = if http2 { "general" } else { "fast" };
        assert_eq!(
            status["upstreams"]["api"]["engine"], engine,
            "http2: {http2}"
        );
        let protocols = api_alpn.lock().unwrap().clone();
        assert!(
            !protocols.is_empty() && protocols.iter().all(|p| p == protocol),
            "http2: {http2}: {protocols:?}"
        );
        relay.stop().await;
    }
}

/// On both engines: the fast path (HTTP/1.1) and hyper (`http2: true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_upstream_certificate_is_a_502_of_kind_tls() {
    let pki = pki(&[b"http/1.1"]);
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let (api_tls, _) = tls_front(pki.server, api.addr()).await;
    for http2 in [false, true] {
        let config = yaml(
            &auth.token_url(),
            &format!("https://localhost:{}", api_tls.port()),
            None,
            None,
        );
        let relay = support::start(&if http2 { with_http2(config) } else { config }).await;
        let resp = support::client()
            .get(format!("{}/echo", relay.url("api")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "http2: {http2}");
        let body: serde_json::Value = resp.json().await.unwrap();
        let error = body["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(
            error.contains("tls") && error.contains("certificate"),
            "http2: {http2}: {body}"
        );
        assert_eq!(api.stats().requests, 0, "nothing reached the upstream");
        let metrics = support::get_text(&relay.admin_url("/metrics")).await;
        assert!(
            metrics.contains(r#"tokenrelay_upstream_errors_total{kind="tls",upstream="api"} 1"#),
            "http2: {http2}: {metrics}"
        );
        relay.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_token_endpoint_gets_no_client_secret() {
    let pki = pki(&[b"http/1.1"]);
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let api = ApiServer::start(Some(auth.validator())).await.unwrap();
    let (auth_tls, _) = tls_front(pki.server, auth.addr()).await;
    let relay = support::start(&yaml(
        &format!("https://127.0.0.1:{}/oauth2/token", auth_tls.port()),
        &api.url(),
        None,
        None,
    ))
    .await;
    let resp = support::client()
        .get(format!("{}/echo", relay.url("api")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        auth.stats().token_requests,
        0,
        "the handshake failed before any request"
    );
    let status = support::client()
        .get(relay.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let error = status["credentials"]["api"]["last_refresh"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(error.contains("certificate"), "{status}");
    assert!(!status.to_string().contains("demo-secret"));
    relay.stop().await;
}

/// An HTTP CONNECT proxy on loopback; records each tunnel's request head.
async fn connect_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                seen.lock().unwrap().push(head.clone());
                let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_follow_https_proxy_and_no_proxy_from_the_environment() {
    let Demo {
        pki,
        dir,
        ca_file,
        auth,
        api,
    } = demo_behind_a_private_ca().await;
    let (api_tls, _) = tls_front(pki.server.clone(), api.addr()).await;
    let (proxy, tunnels) = connect_proxy().await;
    let proxy_url = format!("http://proxyuser:proxy-pass-9f2@127.0.0.1:{}", proxy.port());

    let dead_proxy = format!("http://127.0.0.1:{}", support::free_port());
    for (run, proxy_url, no_proxy) in [
        ("proxied", &proxy_url, ""),
        ("direct", &proxy_url, "localhost"),
        ("unreachable proxy", &dead_proxy, ""),
    ] {
        let (listen, admin) = (support::free_port(), support::free_port());
        let config = dir.path().join(format!("{run}.yaml"));
        let text = yaml(
            &auth.token_url(),
            &format!("https://localhost:{}", api_tls.port()),
            None,
            Some(&ca_file),
        )
        .replace("127.0.0.1:0\", url", &format!("127.0.0.1:{listen}\", url"))
        .replace(
            "listen: \"127.0.0.1:0\" }",
            &format!("listen: \"127.0.0.1:{admin}\" }}"),
        );
        std::fs::write(&config, text).unwrap();
        let log = dir.path().join(format!("{run}.log"));
        let env = [
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("https_proxy", proxy_url.as_str()),
            ("NO_PROXY", no_proxy),
            ("no_proxy", no_proxy),
        ];
        let mut child = support::ChildProc::spawn(&config, &log, &env);
        assert!(
            support::wait_ready(
                &format!("http://127.0.0.1:{admin}/readyz"),
                std::time::Duration::from_secs(20)
            )
            .await,
            "{run}: not ready\n{}",
            support::log_tail(&log, 30)
        );
        // The fast path connects directly: a proxied upstream stays with the general one.
        let status: serde_json::Value = serde_json::from_str(
            &support::get_text(&format!("http://127.0.0.1:{admin}/status")).await,
        )
        .unwrap();
        let engine = if no_proxy.is_empty() {
            "general"
        } else {
            "fast"
        };
        assert_eq!(status["upstreams"]["api"]["engine"], engine, "{run}");
        let before = tunnels.lock().unwrap().len();
        let resp = support::client()
            .get(format!("http://127.0.0.1:{listen}/echo?run={run}"))
            .send()
            .await
            .unwrap();
        if proxy_url == &dead_proxy {
            assert_eq!(resp.status(), 502, "{run}");
            let metrics = support::metrics_text(&format!("http://127.0.0.1:{admin}")).await;
            let connect_errors = support::metric(
                &metrics,
                "tokenrelay_upstream_errors_total",
                &[("upstream", "api"), ("kind", "connect")],
            );
            assert_eq!(connect_errors, 1.0, "{run}");
            assert_eq!(child.terminate(), Some(0));
            continue;
        }
        assert_eq!(resp.status(), 200, "{run}\n{}", support::log_tail(&log, 30));
        let new: Vec<String> = tunnels.lock().unwrap()[before..].to_vec();
        let log_text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !log_text.contains("proxy-pass-9f2"),
            "{run}: proxy password logged"
        );
        if no_proxy.is_empty() {
            assert_eq!(new.len(), 1, "{run}: one tunnel: {new:?}");
            assert!(
                new[0].starts_with(&format!("CONNECT localhost:{} ", api_tls.port())),
                "{}",
                new[0]
            );
            // Basic credentials from the proxy URL reach the proxy, and only the proxy.
            assert!(
                new[0]
                    .to_ascii_lowercase()
                    .contains("proxy-authorization: basic chjvehl1c2vyonbyb3h5lxbhc3mtowyy"),
                "{}",
                new[0]
            );
            assert!(
                log_text.contains(&format!("proxy=http://127.0.0.1:{}", proxy.port())),
                "the proxy in use is logged (without its credentials)"
            );
        } else {
            assert!(
                new.is_empty(),
                "{run}: NO_PROXY must bypass the proxy: {new:?}"
            );
        }
        assert_eq!(child.terminate(), Some(0));
    }
}

/// An HTTP/1.0 app asking for keep-alive is told `Connection: keep-alive` even when the
/// upstream answered over HTTP/2, and its connection carries a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_keep_alive_app_keeps_its_connection_over_an_h2_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Demo {
        pki,
        dir: _dir,
        ca_file,
        auth,
        api,
    } = demo_behind_a_private_ca().await;
    let (api_tls, api_alpn) = tls_front(pki.server.clone(), api.addr()).await;
    let relay = support::start(&with_http2(yaml(
        &auth.token_url(),
        &format!("https://localhost:{}", api_tls.port()),
        None,
        Some(&ca_file),
    )))
    .await;
    let mut conn = tokio::net::TcpStream::connect(relay.upstreams["api"])
        .await
        .unwrap();
    conn.write_all(b"GET /echo HTTP/1.0\r\nHost: app.local\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "the connection closed: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .expect("a Content-Length for an HTTP/1.0 keep-alive answer");
                if buf.len() >= end + 4 + len {
                    return head;
                }
            }
        }
    })
    .await
    .expect("a whole response within 10s");
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(head.contains("connection: keep-alive"), "{head}");
    assert_eq!(
        api_alpn.lock().unwrap().first().map(String::as_str),
        Some("h2")
    );
    // The second request (no keep-alive) is answered, then the connection closes.
    conn.write_all(b"GET /echo HTTP/1.0\r\nHost: app.local\r\n\r\n")
        .await
        .unwrap();
    let mut second = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut second),
    )
    .await
    .expect("the second answer within 10s")
    .unwrap();
    let second = String::from_utf8_lossy(&second);
    assert_eq!(support::raw_status(&second), Some(200), "{second}");
    relay.stop().await;
}
