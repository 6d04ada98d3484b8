//! WebSocket through both engines: a real client (tokio-tungstenite) talks to the
//! listener, a real WebSocket server sits behind it on plain http (ws) or behind TLS
//! with a private CA (wss). The fast engine serves both; the general one serves the TLS
//! upstream configured with `http2: true`. The handshake carries the credential,
//! messages flow both ways, the tunnel ends with either side or after the idle timeout,
//! and it is counted.

mod support;
#[path = "parity/upstream.rs"]
#[allow(dead_code)]
mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use testkit::{AuthServer, AuthServerOptions};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// The engine that serves an upstream: the fast one over plain http or TLS, or the
/// general one (TLS with `http2: true`, which the fast engine leaves to it).
#[derive(Clone, Copy, Debug)]
enum Engine {
    Fast,
    FastTls,
    General,
}

const ENGINES: [Engine; 3] = [Engine::Fast, Engine::FastTls, Engine::General];

impl Engine {
    fn tls(self) -> bool {
        !matches!(self, Engine::Fast)
    }

    /// Upstream YAML entries that pick this engine.
    fn config(self) -> &'static str {
        match self {
            Engine::General => ", http2: true",
            _ => "",
        }
    }

    /// The engine `/status` names for the upstream.
    fn name(self) -> &'static str {
        match self {
            Engine::General => "general",
            _ => "fast",
        }
    }
}

/// The relay's upstream `api` is served by `engine`, as `/status` says.
async fn assert_engine(relay: &support::Running, engine: Engine) {
    let status = support::status_json(&relay.admin_url("")).await;
    assert_eq!(
        status["upstreams"]["api"]["engine"],
        engine.name(),
        "{engine:?}"
    );
}

/// A WebSocket echo server; records each handshake's path and Authorization header.
struct EchoServer {
    addr: SocketAddr,
    ca_pem: Option<String>,
    handshakes: Arc<Mutex<Vec<(String, String)>>>,
}

impl EchoServer {
    async fn start(tls: bool) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (acceptor, ca_pem) = if tls {
            let (config, ca) = upstream::pki();
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
                Some(ca),
            )
        } else {
            (None, None)
        };
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                echo(tls, seen).await
                            }
                        }
                        None => echo(tcp, seen).await,
                    }
                });
            }
        });
        EchoServer {
            addr,
            ca_pem,
            handshakes,
        }
    }
}

// tungstenite's handshake callback type fixes the large error variant.
#[allow(clippy::result_large_err)]
async fn echo<S>(stream: S, seen: Arc<Mutex<Vec<(String, String)>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let record = |req: &Request, resp: Response| {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        seen.lock().unwrap().push((req.uri().to_string(), auth));
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_text() || msg.is_binary() {
            if ws.send(msg).await.is_err() {
                return;
            }
        } else if msg.is_close() {
            return;
        }
    }
}

/// tokenrelay in front of `server` (base path `/base`), with `extra` upstream YAML.
async fn relay(
    server: &EchoServer,
    auth: &AuthServer,
    extra: &str,
) -> (support::Running, tempfile::TempDir) {
    relay_to(server.addr, server.ca_pem.as_deref(), "/base", auth, extra).await
}

/// tokenrelay in front of the server at `addr` (`ca_pem`: its private CA when it speaks
/// TLS) under `base_path`, with `extra` upstream YAML; the directory holds the CA file.
async fn relay_to(
    addr: SocketAddr,
    ca_pem: Option<&str>,
    base_path: &str,
    auth: &AuthServer,
    extra: &str,
) -> (support::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (url, trust) = match ca_pem {
        None => (
            format!("http://127.0.0.1:{}{base_path}", addr.port()),
            "allow_insecure_http: true".to_string(),
        ),
        Some(pem) => {
            let ca = dir.path().join("ca.pem");
            std::fs::write(&ca, pem).unwrap();
            (
                format!("https://localhost:{}{base_path}", addr.port()),
                format!("ca_file: \"{}\"", ca.display()),
            )
        }
    };
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n\
         credentials:\n  \
           api: {{ grant: client_credentials, token_url: {}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}\n\
         upstreams:\n  \
           api: {{ listen: 127.0.0.1:0, url: \"{url}\", credential: api, {trust}{extra} }}\n",
        auth.token_url()
    );
    (support::start(&yaml).await, dir)
}

async fn messages_flow_with_the_credential(engine: Engine) {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let server = EchoServer::start(engine.tls()).await;
    let (relay, _dir) = relay(&server, &auth, engine.config()).await;
    assert_engine(&relay, engine).await;
    let url = format!("ws://{}/chat?room=1", relay.upstreams["api"]);
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .expect("handshake within 10s")
    .expect("handshake accepted");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "again"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2])).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), &[0u8, 1, 2]);

    let handshakes = server.handshakes.lock().unwrap().clone();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(handshakes[0].0, "/base/chat?room=1");
    assert!(handshakes[0].1.starts_with("Bearer "), "{handshakes:?}");
    assert!(
        auth.is_valid_access_token(handshakes[0].1.trim_start_matches("Bearer ")),
        "the handshake carries a token the authorization server issued"
    );

    let metrics = support::metrics_text(&relay.admin_url("")).await;
    let open = support::metric(
        &metrics,
        "tokenrelay_upstream_tunnels_open",
        &[("upstream", "api")],
    );
    assert_eq!(open, 1.0, "{metrics}");
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(
        support::eventually(Duration::from_secs(10), || async {
            let m = support::metrics_text(&relay.admin_url("")).await;
            support::metric(
                &m,
                "tokenrelay_upstream_tunnels_open",
                &[("upstream", "api")],
            ) == 0.0
                && support::metric(
                    &m,
                    "tokenrelay_upstream_tunnel_bytes_total",
                    &[("upstream", "api"), ("direction", "to_app")],
                ) > 0.0
        })
        .await,
        "the tunnel ends and its bytes are counted"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_a_plain_http_upstream() {
    messages_flow_with_the_credential(Engine::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_an_https_upstream() {
    messages_flow_with_the_credential(Engine::FastTls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_on_the_general_engine() {
    messages_flow_with_the_credential(Engine::General).await;
}

/// A quiet tunnel ends after the listener's idle timeout; the client sees it close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_tunnel_ends_after_the_idle_timeout() {
    for engine in [Engine::FastTls, Engine::General] {
        a_quiet_tunnel_ends_on(engine).await;
    }
}

async fn a_quiet_tunnel_ends_on(engine: Engine) {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let server = EchoServer::start(engine.tls()).await;
    let extra = format!("{}, limits: {{ idle_timeout: 1s }}", engine.config());
    let (relay, _dir) = relay(&server, &auth, &extra).await;
    let url = format!("ws://{}/quiet", relay.upstreams["api"]);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    ws.next().await.unwrap().unwrap();
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(20), ws.next()).await;
    assert!(end.is_ok(), "the tunnel stays open past 20s");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(15),
        "{engine:?}: {waited:?}"
    );
    relay.stop().await;
}

/// A tunnel lives longer than the header-read timeout while messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_tunnel_outlives_the_connection_timeouts() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let server = EchoServer::start(false).await;
    let (relay, _dir) = relay(
        &server,
        &auth,
        ", limits: { idle_timeout: 1s, header_read_timeout: 1s }",
    )
    .await;
    let url = format!("ws://{}/busy", relay.upstreams["api"]);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        ws.send(Message::text("ping")).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an echo within 5s")
            .expect("the tunnel is open")
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), "ping");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    relay.stop().await;
}

/// An open tunnel holds its place under `limits.max_connections`: with a cap of one, a
/// second connection waits until the tunnel closes, then gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_counts_against_the_connection_cap() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let server = EchoServer::start(false).await;
    let (relay, _dir) = relay(&server, &auth, ", limits: { max_connections: 1 }").await;
    let addr = relay.upstreams["api"];
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/cap"))
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    ws.next().await.unwrap().unwrap();

    let second = tokio::spawn(async move {
        support::raw_exchange(
            addr,
            b"GET /cap HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n\r\n",
            Duration::from_secs(20),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !second.is_finished(),
        "a second connection was served while the tunnel was open"
    );
    ws.close(None).await.unwrap();
    drop(ws);
    let answer = second.await.unwrap();
    assert!(
        support::raw_status(&answer).is_some(),
        "the waiting connection is served once the tunnel closes: {answer:?}"
    );
    relay.stop().await;
}

/// A WebSocket handshake as an app sends it, with `extra` header lines and `body`.
fn handshake(extra: &str, body: &str) -> Vec<u8> {
    format!(
        "GET /chat HTTP/1.1\r\nHost: app.local\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n{body}"
    )
    .into_bytes()
}

/// tokenrelay in front of a scripted upstream (plain or TLS) that answers every
/// request with `answer`.
async fn scripted(
    engine: Engine,
    answer: &'static str,
    auth: &AuthServer,
) -> (support::Running, upstream::Upstream, tempfile::TempDir) {
    let script: Arc<upstream::Script> = Arc::new(move |_: &upstream::Seen, _| {
        vec![
            upstream::Step::Send(answer.as_bytes().to_vec()),
            upstream::Step::Sleep(Duration::from_secs(5)),
        ]
    });
    let up = upstream::Upstream::start(engine.tls(), script).await;
    let extra = format!(", timeout: 3s{}", engine.config());
    let (relay, dir) = relay_to(up.addr, up.ca_pem.as_deref(), "", auth, &extra).await;
    (relay, up, dir)
}

/// An upstream that answers a WebSocket handshake with a 101 for another protocol (or
/// for none) did not switch to WebSocket: the app gets our 502, not a 101 and a tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_for_another_protocol_is_refused_not_tunnelled() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    for engine in ENGINES {
        for answer in [
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n",
        ] {
            let (relay, up, _dir) = scripted(engine, answer, &auth).await;
            let got = support::raw_exchange(
                relay.upstreams["api"],
                &handshake("", ""),
                Duration::from_secs(10),
            )
            .await;
            assert_eq!(
                support::raw_status(&got),
                Some(502),
                "{engine:?}, {answer:?}: {got}"
            );
            assert!(
                support::raw_body(&got).contains("websocket"),
                "{engine:?}: {got}"
            );
            assert_eq!(up.seen().len(), 1, "the handshake reached the upstream");
            relay.stop().await;
        }
    }
}

/// A WebSocket handshake carrying a body (a length or chunked) is refused at once with
/// a 400 that says why; it never reaches the upstream (which would wait for the body
/// the handshake cannot forward, and the app would get a 504).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_a_body_is_refused_with_400() {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    for engine in ENGINES {
        let server = EchoServer::start(engine.tls()).await;
        let extra = format!(", timeout: 3s{}", engine.config());
        let (relay, _dir) = relay(&server, &auth, &extra).await;
        for request in [
            handshake("Content-Length: 5\r\n", "hello"),
            handshake("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
        ] {
            let got =
                support::raw_exchange(relay.upstreams["api"], &request, Duration::from_secs(10))
                    .await;
            assert_eq!(support::raw_status(&got), Some(400), "{engine:?}: {got}");
            assert!(
                support::raw_body(&got).contains("body"),
                "{engine:?}: {got}"
            );
        }
        assert!(server.handshakes.lock().unwrap().is_empty());
        relay.stop().await;
    }
}

/// A client that sends its first message right behind the handshake, before the 101
/// (as the handshake's own bytes allow): the message reaches the upstream once it
/// switched, and its echo comes back, on both engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_with_the_handshake_goes_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    for engine in ENGINES {
        let server = EchoServer::start(engine.tls()).await;
        let (relay, _dir) = relay(&server, &auth, engine.config()).await;
        let mut request = b"GET /early HTTP/1.1\r\nHost: app.local\r\nConnection: Upgrade\r\n\
            Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            .to_vec();
        // A masked text frame "early" (a client's frames are masked, RFC 6455 §5.3).
        let key = [1u8, 2, 3, 4];
        request.extend_from_slice(&[0x81, 0x80 | 5]);
        request.extend_from_slice(&key);
        request.extend(b"early".iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        let mut conn = tokio::net::TcpStream::connect(relay.upstreams["api"])
            .await
            .unwrap();
        conn.write_all(&request).await.unwrap();
        let echo = b"\x81\x05early";
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            while !got.windows(echo.len()).any(|w| w == echo) {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got);
        assert_eq!(support::raw_status(&text), Some(101), "{engine:?}: {text}");
        assert!(
            got.windows(echo.len()).any(|w| w == echo),
            "{engine:?}: no echo of the early message: {text:?}"
        );
        drop(conn);
        relay.stop().await;
    }
}
