//! The fast path against a scripted upstream that behaves the way real servers do at
//! the edges: closing idle keep-alive connections, closing instead of answering,
//! close-delimited bodies, interim 1xx responses, trailers, bodies cut short; each over
//! plain http and over TLS. Also pipelining, HEAD, and a connection handed to the
//! general path midway.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::AuthServerOptions;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::{demo_servers, one_upstream_yaml, DemoServers, Running};

/// What the scripted upstream does with one request.
enum Reply {
    /// Answer and keep the connection open.
    Send(Vec<u8>),
    /// Answer, then close the connection.
    SendAndClose(Vec<u8>),
    /// Close without answering.
    Close,
}

/// A request as the scripted upstream received it.
#[derive(Clone, Debug)]
struct Seen {
    connection: usize,
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }
}

type Script = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An HTTP/1.1 upstream on 127.0.0.1:0 answering per `script(request, index on its
/// connection)`.
struct ScriptedUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Set when it speaks TLS: the private CA's PEM, written to a file for `ca_file`.
    ca: Option<(tempfile::TempDir, std::path::PathBuf)>,
}

impl ScriptedUpstream {
    async fn start(script: Arc<Script>) -> ScriptedUpstream {
        Self::start_over(false, script).await
    }

    /// Plain http, or TLS (http/1.1) with a certificate from a fresh private CA.
    async fn start_over(tls: bool, script: Arc<Script>) -> ScriptedUpstream {
        Self::start_reading_after(Duration::ZERO, tls, script).await
    }

    /// As [`Self::start_over`], each connection read only after `pause` (so what is
    /// sent to it backs up in the sender's buffers meanwhile).
    async fn start_reading_after(
        pause: Duration,
        tls: bool,
        script: Arc<Script>,
    ) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, pause, tls, script)
    }

    /// As [`Self::start_reading_after`], on a listener whose connections have a narrow
    /// window (small segments, a small receive buffer): what a sender can put in its
    /// socket before the upstream reads is then small and the same on every connection
    /// (100 to 150 KiB on Linux), so a sweep of body sizes meets it.
    async fn start_narrow(pause: Duration, tls: bool, script: Arc<Script>) -> ScriptedUpstream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Advertised in the SYN-ACK: the sender's buffer is sized from it.
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::TcpMaxSeg, &1000).unwrap();
        socket.set_recv_buffer_size(8 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        Self::start_on(listener, pause, tls, script)
    }

    fn start_on(
        listener: TcpListener,
        pause: Duration,
        tls: bool,
        script: Arc<Script>,
    ) -> ScriptedUpstream {
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (conns, log) = (connections.clone(), seen.clone());
        let (acceptor, ca) = if tls {
            let (config, pem) = support::pki::localhost_server(&[b"http/1.1"]);
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("ca.pem");
            std::fs::write(&file, pem).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            (Some(acceptor), Some((dir, file)))
        } else {
            (None, None)
        };
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let connection = conns.fetch_add(1, Ordering::SeqCst);
                let (script, log, acceptor) = (script.clone(), log.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let stream: Box<dyn Io> = match acceptor {
                        Some(a) => match a.accept(tcp).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                        None => Box::new(tcp),
                    };
                    tokio::time::sleep(pause).await;
                    serve_scripted(stream, connection, script, log).await
                });
            }
        });
        ScriptedUpstream {
            addr,
            connections,
            seen,
            ca,
        }
    }

    fn url(&self) -> String {
        match self.ca {
            // The certificate names localhost.
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_scripted(
    mut stream: Box<dyn Io>,
    connection: usize,
    script: Arc<Script>,
    log: Arc<Mutex<Vec<Seen>>>,
) {
    let mut buf = Vec::new();
    for index in 0.. {
        let Some((head, body)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let seen = Seen {
            connection,
            head,
            body,
        };
        log.lock().unwrap().push(seen.clone());
        match script(&seen, index) {
            Reply::Send(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::SendAndClose(bytes) => {
                let _ = stream.write_all(&bytes).await;
                // Over TLS this also sends close_notify.
                let _ = stream.shutdown().await;
                return;
            }
            Reply::Close => return,
        }
    }
}

/// Reads one request (Content-Length or chunked body, decoded) from `stream`.
async fn read_request<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    let head_end = read_until(stream, buf, b"\r\n\r\n").await?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let lower = head.to_ascii_lowercase();
    let body = if lower.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let line_end = read_until(stream, buf, b"\r\n").await?;
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&buf[..line_end - 2]).trim(), 16)
                    .ok()?;
            buf.drain(..line_end);
            while buf.len() < size + 2 {
                read_more(stream, buf).await?;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                return Some((head, body));
            }
        }
    } else {
        read_length(stream, buf, content_length(&lower)).await?
    };
    Some((head, body))
}

/// The Content-Length of a lower-cased head (0 when absent).
fn content_length(lower_head: &str) -> usize {
    lower_head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap())
        .unwrap_or(0)
}

/// Reads until `buf` holds `len` bytes and takes them.
async fn read_length<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    len: usize,
) -> Option<Vec<u8>> {
    while buf.len() < len {
        read_more(stream, buf).await?;
    }
    Some(buf.drain(..len).collect())
}

/// Reads until `buf` contains `pattern`; returns the offset just past it.
async fn read_until<S: AsyncRead + Unpin + ?Sized>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    pattern: &[u8],
) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(pattern.len()).position(|w| w == pattern) {
            return Some(i + pattern.len());
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more<S: AsyncRead + Unpin + ?Sized>(stream: &mut S, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// tokenrelay in front of `upstream`, with the demo authorization server for tokens.
async fn relay_to(upstream: &ScriptedUpstream) -> (DemoServers, Running) {
    relay_with(upstream, "").await
}

/// As [`relay_to`], with `extra` upstream YAML entries (`, key: value`).
async fn relay_with(upstream: &ScriptedUpstream, extra: &str) -> (DemoServers, Running) {
    let demo = demo_servers(AuthServerOptions::default()).await;
    let extra = match &upstream.ca {
        Some((_, file)) => format!("timeout: 5s, ca_file: \"{}\"{extra}", file.display()),
        None => format!("timeout: 5s{extra}"),
    };
    let yaml = one_upstream_yaml(&demo.auth.token_url(), &upstream.url(), "", &extra);
    let running = support::start(&yaml).await;
    (demo, running)
}

/// A response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one response to a request with the given method (Content-Length or chunked).
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, method: &str) -> RawResponse {
    let head_end = tokio::time::timeout(
        Duration::from_secs(10),
        read_until(stream, buf, b"\r\n\r\n"),
    )
    .await
    .expect("a response within 10s")
    .expect("a response head");
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let status = support::raw_status(&head).unwrap();
    let lower = head.to_ascii_lowercase();
    let body = if method == "HEAD" {
        Vec::new()
    } else if lower.contains("transfer-encoding: chunked") {
        let end = read_until(stream, buf, b"0\r\n\r\n").await.unwrap();
        buf.drain(..end).collect()
    } else {
        read_length(stream, buf, content_length(&lower))
            .await
            .expect("the whole response body")
    };
    RawResponse { status, head, body }
}

/// One app connection to tokenrelay's listener, read response by response.
struct AppConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl AppConn {
    async fn open(running: &Running) -> AppConn {
        AppConn {
            stream: TcpStream::connect(running.upstreams["api"]).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads the next response, to a request with `method`.
    async fn read(&mut self, method: &str) -> RawResponse {
        read_response(&mut self.stream, &mut self.buf, method).await
    }

    /// Sends one request and reads its response.
    async fn exchange(&mut self, request: &[u8]) -> RawResponse {
        self.send(request).await;
        let method =
            String::from_utf8_lossy(request.split(|&b| b == b' ').next().unwrap()).into_owned();
        self.read(&method).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_upstream_closed_are_not_reused_and_requests_still_succeed() {
    for tls in [false, true] {
        println!("over TLS: {tls}");
        // Every answer is followed by the upstream closing, half of them without saying so.
        let up = ScriptedUpstream::start_over(
            tls,
            Arc::new(|seen: &Seen, _| {
                if seen.connection.is_multiple_of(2) {
                    Reply::SendAndClose(ok("quiet close"))
                } else {
                    Reply::SendAndClose(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 4\r\n\r\nbye!"
                            .to_vec(),
                    )
                }
            }),
        )
        .await;
        let (_demo, tr) = relay_to(&up).await;
        let c = support::client();
        for i in 0..6u32 {
            let method = if i.is_multiple_of(2) { "GET" } else { "POST" };
            let resp = c
                .request(method.parse().unwrap(), format!("{}/n{i}", tr.url("api")))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "request {i} ({method})");
            // Give the upstream's FIN time to arrive, as it would between real requests.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 6);
        tr.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_instead_of_answering_is_retried_only_when_safe() {
    for tls in [false, true] {
        println!("over TLS: {tls}");
        // Each connection answers its first request and closes on its second.
        let up = ScriptedUpstream::start_over(
            tls,
            Arc::new(|seen: &Seen, index| match index {
                0 => Reply::Send(ok(seen.target())),
                _ => Reply::Close,
            }),
        )
        .await;
        let (_demo, tr) = relay_to(&up).await;
        // One app connection, so one listener worker and its pool of upstream connections.
        let mut conn = AppConn::open(&tr).await;
        let first = conn
            .exchange(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        assert_eq!(first.status, 200);
        // Reuses the pooled connection, which closes: a GET is safe to send again.
        let second = conn
            .exchange(b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        assert_eq!(
            (second.status, second.body.as_slice()),
            (200, &b"/second"[..])
        );
        // A POST is not: the upstream may have acted on it before closing.
        let third = conn
            .exchange(b"POST /third HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nonce")
            .await;
        assert_eq!(third.status, 502, "{}", third.head);
        let text = String::from_utf8_lossy(&third.body);
        assert!(
            text.contains("closed the connection before answering"),
            "{text}"
        );
        let posts = up.seen().iter().filter(|s| s.target() == "/third").count();
        assert_eq!(posts, 1, "a POST must not be sent twice");
        tr.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_interim_chunked_and_truncated_responses() {
    for tls in [false, true] {
        println!("over TLS: {tls}");
        let up = ScriptedUpstream::start_over(tls, Arc::new(|seen: &Seen, _| match seen.target() {
            "/until-close" => Reply::SendAndClose(b"HTTP/1.1 200 OK\r\n\r\nall of it, until close".to_vec()),
            "/early-hints" => Reply::Send(
                b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal"
                    .to_vec(),
            ),
            "/chunked" => Reply::Send(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-sum: 12\r\n\r\n"
                    .to_vec(),
            ),
            "/cut-short" => Reply::SendAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..".to_vec()),
            other => Reply::Send(ok(other)),
        }))
        .await;
        let (_demo, tr) = relay_to(&up).await;
        let c = support::client();
        let get = |path: &str| c.get(format!("{}{path}", tr.url("api"))).send();

        let resp = get("/until-close").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "all of it, until close");

        let resp = get("/early-hints").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "final");

        let resp = get("/chunked").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "hello, world");

        let resp = get("/cut-short").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.bytes().await.is_err(),
            "a body cut short must reach the app as an error, not as a complete body"
        );

        // The listener is still fine afterwards.
        assert_eq!(get("/after").await.unwrap().text().await.unwrap(), "/after");
        tr.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_head_and_a_handoff_to_the_general_path_on_one_connection() {
    let up = ScriptedUpstream::start(Arc::new(|seen: &Seen, _| {
        let body = format!("{} {} bytes", seen.target(), seen.body.len());
        if seen.head.starts_with("HEAD ") {
            // A HEAD answer announces a length it does not send.
            Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec())
        } else {
            Reply::Send(ok(&body))
        }
    }))
    .await;
    let (_demo, tr) = relay_to(&up).await;
    let mut conn = AppConn::open(&tr).await;

    // Three requests in one write, one of them HEAD. `X-Case-Probe` tells the paths
    // apart at the upstream: the fast path keeps header names as the app wrote them,
    // hyper sends them in lower case.
    conn.send(
        b"GET /one HTTP/1.1\r\nhost: x\r\nX-Case-Probe: 1\r\n\r\n\
          HEAD /two HTTP/1.1\r\nhost: x\r\nX-Case-Probe: 1\r\n\r\n\
          POST /three HTTP/1.1\r\nhost: x\r\nX-Case-Probe: 1\r\ncontent-length: 5\r\n\r\nabcde",
    )
    .await;
    let one = conn.read("GET").await;
    let two = conn.read("HEAD").await;
    let three = conn.read("POST").await;
    assert_eq!(
        (one.status, one.body.as_slice()),
        (200, &b"/one 0 bytes"[..])
    );
    assert_eq!(two.status, 200);
    assert!(
        two.head
            .to_ascii_lowercase()
            .contains("content-length: 1000"),
        "{}",
        two.head
    );
    assert_eq!(
        (three.status, three.body.as_slice()),
        (200, &b"/three 5 bytes"[..])
    );

    // A chunked upload is the general path's: the connection is handed over midway and
    // keeps working.
    let four = conn
        .exchange(
            b"POST /four HTTP/1.1\r\nhost: x\r\nX-Case-Probe: 1\r\ntransfer-encoding: chunked\r\n\r\n6\r\nchunky\r\n0\r\n\r\n",
        )
        .await;
    assert_eq!(
        (four.status, four.body.as_slice()),
        (200, &b"/four 6 bytes"[..])
    );
    let five = conn
        .exchange(b"GET /five HTTP/1.1\r\nhost: x\r\nX-Case-Probe: 1\r\n\r\n")
        .await;
    assert_eq!(
        (five.status, five.body.as_slice()),
        (200, &b"/five 0 bytes"[..])
    );

    // Every request reached the upstream with the token, once.
    let seen = up.seen();
    let targets: Vec<&str> = seen.iter().map(|s| s.target()).collect();
    assert_eq!(targets, ["/one", "/two", "/three", "/four", "/five"]);
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.head
                .to_ascii_lowercase()
                .contains("\r\nauthorization: bearer "),
            "{}",
            s.head
        );
        let fast = s.head.contains("X-Case-Probe: 1");
        assert_eq!(
            fast,
            i < 3,
            "fast path for the first three only: {}",
            s.head
        );
    }
    tr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_keep_alive_timeout_is_not_used_to_its_end() {
    for tls in [false, true] {
        println!("over TLS: {tls}");
        // The upstream says it closes idle connections after 2 s (but keeps them open here,
        // so only tokenrelay's own decision can make it open a new one).
        let up = ScriptedUpstream::start_over(
            tls,
            Arc::new(|_: &Seen, _| {
                Reply::Send(
                b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=2, max=100\r\ncontent-length: 2\r\n\r\nok"
                    .to_vec(),
            )
            }),
        )
        .await;
        let (_demo, tr) = relay_to(&up).await;
        // One app connection, so one listener worker and its pool of upstream connections.
        let mut conn = AppConn::open(&tr).await;
        let mut post = async || {
            conn.exchange(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx")
                .await
                .status
        };
        assert_eq!(post().await, 200);
        assert_eq!(post().await, 200);
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            1,
            "reused while fresh"
        );
        // Within the last second of the announced timeout: a new connection.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(post().await, 200);
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
        tr.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let up = ScriptedUpstream::start(Arc::new(|seen: &Seen, _| {
        Reply::Send(ok(&String::from_utf8_lossy(&seen.body)))
    }))
    .await;
    let (_demo, tr) = relay_to(&up).await;
    let mut conn = AppConn::open(&tr).await;
    // As PHP's curl sends bodies over 1 KiB: head first, body only after `100 Continue`.
    // (The interim response has no body, as a GET's would not.)
    conn.send(
        b"POST /form HTTP/1.1\r\nhost: x\r\nX-Case-Probe: 1\r\nexpect: 100-continue\r\ncontent-length: 11\r\n\r\n",
    )
    .await;
    let interim = conn.read("GET").await;
    assert_eq!(interim.status, 100, "{}", interim.head);
    conn.send(b"hello world").await;
    let done = conn.read("POST").await;
    assert_eq!(
        (done.status, done.body.as_slice()),
        (200, &b"hello world"[..])
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].head.contains("X-Case-Probe: 1"),
        "fast path: {}",
        seen[0].head
    );
    assert!(
        !seen[0].head.to_ascii_lowercase().contains("expect"),
        "{}",
        seen[0].head
    );
    tr.stop().await;
}

/// An 8 MiB body (held whole for a possible 401 retry) to an upstream that starts
/// reading late reaches it whole, over plain http and over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_reaches_a_slow_upstream_whole() {
    for tls in [false, true] {
        println!("over TLS: {tls}");
        let up = ScriptedUpstream::start_reading_after(
            Duration::from_millis(500),
            tls,
            Arc::new(|seen: &Seen, _| Reply::Send(ok(&seen.body.len().to_string()))),
        )
        .await;
        let (_demo, tr) = relay_with(&up, ", retry_body_limit: 16MiB").await;
        let mut conn = AppConn::open(&tr).await;
        let body = vec![b'x'; 8 << 20];
        let mut request = format!(
            "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let resp = conn.exchange(&request).await;
        assert_eq!(
            (
                resp.status,
                String::from_utf8_lossy(&resp.body).into_owned()
            ),
            (200, (8 << 20).to_string()),
            "{}",
            resp.head
        );
        tr.stop().await;
    }
}

/// Over TLS, the request's last bytes can still sit in rustls when the write of head and
/// body returns: the socket was full, and rustls had taken in the rest of the plaintext
/// (up to 64 KiB of records). Nothing writes again while the response is awaited; the
/// fast path's flush sends them. That happens when the request is larger than what the
/// socket holds by at most 64 KiB and the upstream starts reading late. Sizes from 64
/// KiB up in steps of 48 KiB, each on a new upstream connection, meet that window on
/// an upstream whose window is narrow (see [`ScriptedUpstream::start_narrow`]); without
/// the flush, the upstream waits for the rest of the body and the app gets a 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_every_size_reach_an_upstream_that_reads_late() {
    for tls in [false, true] {
        println!("over TLS: {tls}");
        let up = ScriptedUpstream::start_narrow(
            Duration::from_millis(200),
            tls,
            Arc::new(|seen: &Seen, _| {
                let body = seen.body.len().to_string();
                Reply::SendAndClose(
                    format!(
                        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes(),
                )
            }),
        )
        .await;
        let (_demo, tr) = relay_with(&up, ", retry_body_limit: 1MiB").await;
        let mut conn = AppConn::open(&tr).await;
        for size in (64..=640).step_by(48).map(|k| k * 1024) {
            let mut request =
                format!("POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n")
                    .into_bytes();
            request.resize(request.len() + size, b'x');
            let resp = conn.exchange(&request).await;
            assert_eq!(
                (
                    resp.status,
                    String::from_utf8_lossy(&resp.body).into_owned()
                ),
                (200, size.to_string()),
                "a body of {size} bytes: {}",
                resp.head
            );
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 13);
        tr.stop().await;
    }
}
