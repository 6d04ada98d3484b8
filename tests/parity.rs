//! One table of cases run against both forwarding engines: the fast path (a plain-http
//! upstream, and an https one behind a private CA) and the hyper path (the same https
//! upstream with `http2: true`, which the fast path leaves to hyper; the upstream offers
//! only http/1.1, so hyper speaks HTTP/1.1 to it). Each case
//! records what the upstream received and what the app received, normalised (header
//! names lower-cased and sorted, the token, upstream authority and dates masked, bodies
//! decoded), checks the case's expectation on each engine, and requires both engines to
//! agree exactly. A rule changed in one engine only fails here. A case can also run with the
//! upstream's url as a template the token answer fills in (`{token.instance_url}`).

mod support;
#[path = "parity/upstream.rs"]
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use testkit::{AuthServer, AuthServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use upstream::{Seen, Step, Upstream};

#[derive(Clone, Copy, Debug)]
enum Engine {
    Fast,
    FastTls,
    Hyper,
}

const ENGINES: [Engine; 3] = [Engine::Fast, Engine::FastTls, Engine::Hyper];

impl Engine {
    fn tls(self) -> bool {
        !matches!(self, Engine::Fast)
    }
}

/// What the app does on its connection to the listener.
#[derive(Clone, Debug)]
enum App {
    Send(Vec<u8>),
    Sleep(Duration),
}

/// One response as the app received it.
#[derive(Debug, PartialEq, Eq)]
struct AppResponse {
    status: u16,
    /// Lower-cased `name: value` lines, sorted; framing headers left out (the body is
    /// decoded instead) and `date` values masked.
    headers: Vec<String>,
    body: String,
    /// The body ended where its framing said (not cut short by a close).
    complete: bool,
}

impl AppResponse {
    fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}: ");
        self.headers.iter().find_map(|h| h.strip_prefix(&prefix))
    }
}

/// Everything a case can look at, normalised so both engines can be compared.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// Request heads as the upstream received them, then `body: ...`.
    upstream: Vec<String>,
    app: Vec<AppResponse>,
    /// Bytes after the last whole response (none expected).
    trailing: String,
}

struct Case {
    /// Extra YAML entries of the upstream, e.g. `limits: { max_header_size: 8KiB }`.
    config: &'static str,
    /// Appended to the upstream URL (its base path).
    base_path: &'static str,
    app: Vec<App>,
    /// Methods of the app's requests in order (HEAD responses have no body).
    methods: Vec<&'static str>,
    script: Arc<upstream::Script>,
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: app.local\r\n\r\n").into_bytes()
}

fn get_close(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n\r\n").into_bytes()
}

fn ok(body: &str) -> Vec<u8> {
    response("200 OK", "", body)
}

/// A response with a Date (so neither engine adds its own) and a Content-Length.
fn response(status: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n{extra_headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers every request with 200 and its target as body.
fn echo_target() -> Arc<upstream::Script> {
    Arc::new(|seen: &Seen, _| {
        let target = seen.head.split(' ').nth(1).unwrap_or("").to_string();
        vec![Step::Send(ok(&target))]
    })
}

/// How the upstream's url is configured.
#[derive(Clone, Copy, Debug)]
enum Url {
    /// `url: "http(s)://host:port{base_path}"`.
    Fixed,
    /// `url: "{token.instance_url}{base_path}"`, the token answers naming the upstream's
    /// origin as `instance_url`.
    Template,
}

async fn run(engine: Engine, case: &Case, url: Url) -> Observed {
    let auth = AuthServer::start(AuthServerOptions::default())
        .await
        .unwrap();
    let up = Upstream::start(engine.tls(), case.script.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = relay_yaml(&auth, &up, engine, &dir, case.base_path, case.config);
    let yaml = match url {
        Url::Fixed => yaml,
        Url::Template => {
            let origin = origin_of(&up);
            let mut fields = serde_json::Map::new();
            fields.insert("instance_url".into(), origin.clone().into());
            auth.set_answer_fields(fields);
            let fixed = format!("url: \"{origin}{}\"", case.base_path);
            assert!(yaml.contains(&fixed), "{yaml}");
            yaml.replace(
                &fixed,
                &format!("url: \"{{token.instance_url}}{}\"", case.base_path),
            )
        }
    };
    let relay = support::start(&yaml).await;
    if matches!(url, Url::Template) {
        // Until a token names the url, a templated upstream's requests are the general
        // engine's: the fast one is compared only once it can serve them.
        let ready = relay.admin_url("/readyz");
        let is_ready = || async {
            let r = support::client().get(ready.as_str()).send().await;
            r.is_ok_and(|r| r.status() == 200)
        };
        assert!(support::eventually(Duration::from_secs(10), is_ready).await);
    }
    let mut conn = tokio::net::TcpStream::connect(relay.upstreams["api"])
        .await
        .unwrap();
    for step in &case.app {
        match step {
            App::Send(bytes) => {
                if conn.write_all(bytes).await.is_err() {
                    break;
                }
            }
            App::Sleep(d) => tokio::time::sleep(*d).await,
        }
    }
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let (app, trailing) = parse_responses(&raw, &case.methods);
    let upstream = up.seen().iter().map(normalise_request).collect();
    relay.stop().await;
    Observed {
        upstream,
        app,
        trailing,
    }
}

/// The scheme and authority tokenrelay is configured to reach `up` at.
fn origin_of(up: &Upstream) -> String {
    match &up.ca_pem {
        None => format!("http://127.0.0.1:{}", up.addr.port()),
        Some(_) => format!("https://localhost:{}", up.addr.port()),
    }
}

/// tokenrelay in front of `up` (plain http, or https trusting its CA, whose PEM goes to
/// `dir`), with `config` as extra upstream YAML entries.
fn relay_yaml(
    auth: &AuthServer,
    up: &Upstream,
    engine: Engine,
    dir: &tempfile::TempDir,
    base_path: &str,
    config: &str,
) -> String {
    let origin = origin_of(up);
    let (url, extra) = match &up.ca_pem {
        None => (
            format!("{origin}{base_path}"),
            "allow_insecure_http: true".to_string(),
        ),
        Some(pem) => {
            let ca = dir.path().join("ca.pem");
            std::fs::write(&ca, pem).unwrap();
            let http2 = if matches!(engine, Engine::Hyper) {
                ", http2: true"
            } else {
                ""
            };
            (
                format!("{origin}{base_path}"),
                format!("ca_file: \"{}\"{http2}", ca.display()),
            )
        }
    };
    let sep = if config.is_empty() { "" } else { ", " };
    format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n\
         credentials:\n  \
           api: {{ grant: client_credentials, token_url: {}, client_id: demo-client, client_secret: demo-secret, allow_insecure_http: true }}\n\
         upstreams:\n  \
           api: {{ listen: 127.0.0.1:0, url: \"{url}\", credential: api, timeout: 5s, {extra}{sep}{config} }}\n",
        auth.token_url()
    )
}

/// Runs `case` on both engines (the fast one over plain http and TLS); each result must satisfy `check`, and they must agree.
async fn both(case: Case, check: impl Fn(&Observed)) {
    both_with(Url::Fixed, case, check).await
}

/// As [`both`], with the upstream's url configured as `url` says.
async fn both_with(url: Url, case: Case, check: impl Fn(&Observed)) {
    let fast = run(Engine::Fast, &case, url).await;
    let fast_tls = run(Engine::FastTls, &case, url).await;
    let hyper = run(Engine::Hyper, &case, url).await;
    for (engine, seen) in [
        (Engine::Fast, &fast),
        (Engine::FastTls, &fast_tls),
        (Engine::Hyper, &hyper),
    ] {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(seen)));
        if let Err(e) = result {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{engine:?} engine: {why}\nobserved: {seen:#?}");
        }
    }
    let fast = comparable(fast);
    assert_eq!(
        fast,
        comparable(fast_tls),
        "the fast path disagrees with itself over TLS (left: plain, right: TLS)"
    );
    assert_eq!(
        fast,
        comparable(hyper),
        "the engines disagree (left: fast, right: hyper)"
    );
}

/// For comparing engines: the detail text of our own JSON errors (which carries the
/// underlying library's wording) is masked; the status, headers and keys stay.
fn comparable(mut o: Observed) -> Observed {
    for r in &mut o.app {
        if r.header("content-type") != Some("application/json") {
            continue;
        }
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&r.body) {
            if v.get("error").is_some() {
                v["error"] = "ERROR".into();
                r.body = v.to_string();
            }
        }
    }
    o
}

/// The request line with the value of a query token (`auth=`, longer than an app's
/// short test values) masked.
fn mask_query_token(line: &str) -> String {
    let Some(at) = line.find("auth=") else {
        return line.to_string();
    };
    let start = at + "auth=".len();
    let end = line[start..]
        .find(['&', ' '])
        .map_or(line.len(), |n| start + n);
    if end - start <= 10 {
        return line.to_string();
    }
    format!("{}TOKEN{}", &line[..start], &line[end..])
}

fn normalise_request(seen: &Seen) -> String {
    let mut lines = seen.head.trim_end().split("\r\n");
    let first = mask_query_token(lines.next().unwrap_or(""));
    let mut headers: Vec<String> = lines
        .map(|l| {
            let (name, value) = l.split_once(':').unwrap_or((l, ""));
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            let value = match name.as_str() {
                "host" => "UPSTREAM".to_string(),
                "authorization" if value.starts_with("Bearer ") => "Bearer TOKEN".to_string(),
                // The custom credential header of one case.
                "x-api-key" if value.starts_with("key=") => "key=TOKEN".to_string(),
                _ => value.to_string(),
            };
            format!("{name}: {value}")
        })
        .collect();
    headers.sort();
    format!(
        "{first}\n{}\nbody: {}",
        headers.join("\n"),
        String::from_utf8_lossy(&seen.body)
    )
}

/// Splits what the app read into responses, decoding bodies by their framing.
fn parse_responses(raw: &[u8], methods: &[&str]) -> (Vec<AppResponse>, String) {
    let mut out = Vec::new();
    let mut rest = raw;
    let mut methods = methods.iter();
    let mut method = methods.next().copied().unwrap_or("GET");
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let Some(status) = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let fields: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap_or((l, ""));
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        rest = &rest[end + 4..];
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let (body, complete): (Vec<u8>, bool) =
            if method == "HEAD" || status == 204 || status == 304 || status == 101 {
                (Vec::new(), true)
            } else if field("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                let (body, used, complete) = decode_chunked(rest);
                rest = &rest[used..];
                (body, complete)
            } else if let Some(len) = field("content-length") {
                let len: usize = len.parse().unwrap_or(0);
                let take = len.min(rest.len());
                let body = rest[..take].to_vec();
                rest = &rest[take..];
                (body, take == len)
            } else {
                let body = rest.to_vec();
                rest = &[];
                (body, true)
            };
        let mut headers: Vec<String> = fields
            .iter()
            .filter(|(n, _)| n != "content-length" && n != "transfer-encoding")
            .map(|(n, v)| {
                let v = if n == "date" { "DATE" } else { v.as_str() };
                format!("{n}: {v}")
            })
            .collect();
        headers.sort();
        out.push(AppResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            complete,
        });
        method = methods.next().copied().unwrap_or("GET");
    }
    (out, String::from_utf8_lossy(rest).into_owned())
}

/// Decodes a chunked body: (data, bytes used, whether the last chunk arrived). Trailer
/// lines, if any, are kept in the data as `trailer: ...` so a difference shows.
fn decode_chunked(mut raw: &[u8]) -> (Vec<u8>, usize, bool) {
    let start = raw.len();
    let mut body = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (body, start - raw.len(), false);
        };
        let line = String::from_utf8_lossy(&raw[..eol]).into_owned();
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (body, start - raw.len(), false);
        };
        raw = &raw[eol + 2..];
        if size == 0 {
            loop {
                let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
                    return (body, start - raw.len(), false);
                };
                let line = String::from_utf8_lossy(&raw[..eol]).into_owned();
                raw = &raw[eol + 2..];
                if line.is_empty() {
                    return (body, start - raw.len(), true);
                }
                body.extend_from_slice(format!("[trailer: {line}]").as_bytes());
            }
        }
        if raw.len() < size + 2 {
            body.extend_from_slice(&raw[..size.min(raw.len())]);
            return (body, start, false);
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn statuses(o: &Observed) -> Vec<u16> {
    o.app.iter().map(|r| r.status).collect()
}

// ---- the cases ----------------------------------------------------------------------

/// A plain exchange: the request reaches the upstream with the credential and its own
/// `Host`, and the response comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_is_forwarded_with_the_credential() {
    let case = Case {
        config: "",
        base_path: "",
        app: vec![App::Send(get_close("/a?x=1"))],
        methods: vec!["GET"],
        script: echo_target(),
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200]);
        assert_eq!(o.app[0].body, "/a?x=1");
        assert!(o.upstream[0].contains("authorization: Bearer TOKEN"));
        assert!(o.upstream[0].contains("host: UPSTREAM"));
    })
    .await;
}

/// Drift 1: an upstream response naming its framing header in `Connection` keeps its
/// framing, so the next response on the app's connection is not glued onto its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_headers_named_in_connection_keep_the_body_delimited() {
    let script: Arc<upstream::Script> = Arc::new(|seen: &Seen, _| {
        if seen.head.starts_with("GET /length") {
            vec![Step::Send(response(
                "200 OK",
                "Connection: content-length\r\n",
                "hello",
            ))]
        } else if seen.head.starts_with("GET /chunked") {
            vec![Step::Send(
                b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n0\r\n\r\n"
                    .to_vec(),
            )]
        } else {
            vec![Step::Send(ok("last"))]
        }
    });
    let mut first = get("/length");
    first.extend(get("/chunked"));
    first.extend(get_close("/last"));
    let case = Case {
        config: "",
        base_path: "",
        app: vec![App::Send(first)],
        methods: vec!["GET", "GET", "GET"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200, 200, 200]);
        let bodies: Vec<&str> = o.app.iter().map(|r| r.body.as_str()).collect();
        assert_eq!(bodies, ["hello", "chunk", "last"]);
        assert!(o.app.iter().all(|r| r.complete));
        assert_eq!(o.trailing, "");
    })
    .await;
}

/// A request head of `size` bytes exactly (request line, headers, final CRLF).
fn head_of_size(size: usize, close: bool) -> Vec<u8> {
    let start = "GET /big HTTP/1.1\r\nHost: app.local\r\n";
    let close = if close { "Connection: close\r\n" } else { "" };
    let fixed = start.len() + close.len() + "X-Pad: \r\n".len() + 2;
    let pad = "p".repeat(size - fixed);
    let head = format!("{start}{close}X-Pad: {pad}\r\n\r\n");
    assert_eq!(head.len(), size);
    head.into_bytes()
}

/// Drift 3: `max_header_size` is exact: a head of the limit passes, one byte more is
/// our own 431 (JSON, with Date), also well above the limit; the upstream sees none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_header_size_is_exact_and_answered_with_431() {
    for (size, expect) in [(8192, 200), (8193, 431), (12_000, 431), (20_000, 431)] {
        let case = Case {
            config: "limits: { max_header_size: 8KiB }",
            base_path: "",
            app: vec![App::Send(head_of_size(size, true))],
            methods: vec!["GET"],
            script: echo_target(),
        };
        both(case, |o| {
            assert_eq!(statuses(o), [expect], "head of {size} bytes");
            if expect == 431 {
                assert!(o.upstream.is_empty(), "the upstream saw {size} bytes");
                assert_eq!(o.app[0].header("content-type"), Some("application/json"));
                assert!(
                    o.app[0].body.contains("max_header_size"),
                    "{}",
                    o.app[0].body
                );
            }
        })
        .await;
    }
}

/// An app's `GET target` through an upstream with base path `/base` whose server
/// answers with the target it received, on both engines: with `Some(forwarded)` it is
/// forwarded as `forwarded`; with `None` it is refused with a 400 that names the base
/// path, and nothing reaches the upstream.
async fn target_under_base_path(target: &str, expect: Option<&str>) {
    let case = Case {
        config: "",
        base_path: "/base",
        app: vec![App::Send(get_close(target))],
        methods: vec!["GET"],
        script: echo_target(),
    };
    both(case, |o| match expect {
        Some(forwarded) => {
            assert_eq!(statuses(o), [200], "{target}");
            assert_eq!(o.app[0].body, forwarded, "{target}");
        }
        None => {
            assert_eq!(statuses(o), [400], "{target}");
            assert!(o.upstream.is_empty(), "{target} reached the upstream");
            assert!(o.app[0].body.contains("base path"), "{}", o.app[0].body);
        }
    })
    .await;
}

/// Drift 6: dot-segments are normalised before the base path is joined (encoded ones
/// too), and a path that would leave the base path is refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_normalised_and_cannot_escape_the_base_path() {
    for (target, expect) in [
        ("/a/./b/../c?q=/../x", Some("/base/a/c?q=/../x")),
        ("/a/%2e%2E/c", Some("/base/c")),
        ("/a/..", Some("/base/")),
        ("/../admin", None),
        ("/a/../../admin", None),
        ("/%2e%2e/admin", None),
        ("/.%2E/admin", None),
    ] {
        target_under_base_path(target, expect).await;
    }
}

/// Spellings of `..` that some servers read as a parent segment (`..;` with a path
/// parameter, as Tomcat does; `%2f`, `%2F` and `%5c` decoded to a separator) never take
/// a request out of the base path: a target that would climb out under any of these
/// readings is refused with 400 on both engines; one that stays inside under every
/// reading is forwarded as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separator_and_parameter_spellings_of_dot_dot_cannot_escape_the_base_path() {
    for (target, expect) in [
        ("/..;/admin", None),
        ("/a/..;/..;/admin", None),
        ("/..;x=1/admin", None),
        ("/%2f../admin", None),
        ("/a%2f..%2f..%2fadmin", None),
        ("/a%2F..%2F..%2Fadmin", None),
        ("/%5c..%5cadmin", None),
        ("/a/%5C..%5C..%5Cadmin", None),
        ("/a//b%2f..%2f..%2f..%2fadmin", None),
        ("/a/..;/b", Some("/base/a/..;/b")),
        ("/a/b%2f..%2fc", Some("/base/a/b%2f..%2fc")),
        ("/a;v=1/b", Some("/base/a;v=1/b")),
        ("/a%2fb/c", Some("/base/a%2fb/c")),
    ] {
        target_under_base_path(target, expect).await;
    }
}

/// A `#fragment` is not part of a request target (RFC 9112 §3.2); an app that sends one
/// anyway gets the same answer from both engines: the fragment is dropped before the
/// target is normalised, so `..` inside it changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_in_the_target_is_dropped_alike_on_both_engines() {
    for (target, forwarded) in [
        ("/a#frag", "/base/a"),
        ("/a?x=1#frag", "/base/a?x=1"),
        ("/a#/../../admin", "/base/a"),
        ("/a/b/..#x?y", "/base/a/"),
    ] {
        target_under_base_path(target, Some(forwarded)).await;
    }
}

/// Drift 7: a request body trickled within the per-read timeout still has to arrive
/// within `body_timeout` as a whole: 408, and the upstream sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_body_is_cut_at_body_timeout() {
    let mut app = vec![App::Send(
        b"POST /upload HTTP/1.1\r\nHost: app.local\r\nContent-Length: 40\r\nConnection: close\r\n\r\n"
            .to_vec(),
    )];
    for _ in 0..40 {
        app.push(App::Sleep(Duration::from_millis(200)));
        app.push(App::Send(b"x".to_vec()));
    }
    let case = Case {
        config: "body_timeout: 1s",
        base_path: "",
        app,
        methods: vec!["POST"],
        script: echo_target(),
    };
    let started = std::time::Instant::now();
    both(case, |o| {
        assert_eq!(statuses(o), [408]);
        assert!(o.upstream.is_empty());
        assert!(o.app[0].body.contains("body_timeout"), "{}", o.app[0].body);
    })
    .await;
    // Three runs, each cut after about 1s; uncut, the trickles alone take 3 x 8s.
    assert!(started.elapsed() < Duration::from_secs(18));
}

/// Drift 2: a response body that goes quiet is cut after `body_idle_timeout` on both
/// engines, and the app sees a truncated response, never a completed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_response_body_is_cut_at_body_idle_timeout() {
    let script: Arc<upstream::Script> = Arc::new(|_: &Seen, _| {
        vec![
            Step::Send(
                b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 10\r\n\r\nhello"
                    .to_vec(),
            ),
            Step::Sleep(Duration::from_secs(30)),
        ]
    });
    let case = Case {
        config: "body_idle_timeout: 1s",
        base_path: "",
        app: vec![App::Send(get_close("/stream"))],
        methods: vec!["GET"],
        script,
    };
    let started = std::time::Instant::now();
    both(case, |o| {
        assert_eq!(statuses(o), [200]);
        assert_eq!(o.app[0].body, "hello");
        assert!(!o.app[0].complete, "a cut body must not look complete");
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Drift 5: `OPTIONS *` reaches the upstream as `OPTIONS *`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_asterisk_is_forwarded_as_asterisk() {
    let case = Case {
        config: "",
        base_path: "",
        app: vec![App::Send(
            b"OPTIONS * HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n\r\n".to_vec(),
        )],
        methods: vec!["OPTIONS"],
        script: echo_target(),
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200]);
        assert!(
            o.upstream[0].starts_with("OPTIONS * HTTP/1.1\n"),
            "{}",
            o.upstream[0]
        );
    })
    .await;
}

/// Drift 5: a 101 the app did not ask for, and a status below 100, are 502 on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrequested_101_and_status_099_are_bad_gateway() {
    for head in [
        "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
        "HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    ] {
        let script: Arc<upstream::Script> =
            Arc::new(move |_: &Seen, _| vec![Step::Send(head.as_bytes().to_vec()), Step::Close]);
        let case = Case {
            config: "",
            base_path: "",
            app: vec![App::Send(get_close("/x"))],
            methods: vec!["GET"],
            script,
        };
        both(case, |o| {
            assert_eq!(statuses(o), [502], "{head:?}");
            assert_eq!(o.app[0].header("content-type"), Some("application/json"));
        })
        .await;
    }
}

/// Drift 5: two identical Content-Length headers reach the upstream as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_content_length_is_forwarded_once() {
    let case = Case {
        config: "",
        base_path: "",
        app: vec![App::Send(
            b"POST /p HTTP/1.1\r\nHost: app.local\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
                .to_vec(),
        )],
        methods: vec!["POST"],
        script: echo_target(),
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200]);
        assert_eq!(
            o.upstream[0].matches("content-length").count(),
            1,
            "{}",
            o.upstream[0]
        );
        assert!(o.upstream[0].ends_with("body: abc"));
    })
    .await;
}

/// Drift 5: response trailers are dropped on both engines (the chunked body itself is
/// passed on whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_are_dropped() {
    let script: Arc<upstream::Script> = Arc::new(|_: &Seen, _| {
        vec![Step::Send(
            b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nTrailer: x-checksum\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndata\r\n0\r\nx-checksum: 42\r\n\r\n"
                .to_vec(),
        )]
    });
    let case = Case {
        config: "",
        base_path: "",
        app: vec![App::Send(
            b"GET /t HTTP/1.1\r\nHost: app.local\r\nTE: trailers\r\nConnection: close\r\n\r\n"
                .to_vec(),
        )],
        methods: vec!["GET"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200]);
        assert_eq!(o.app[0].body, "data");
        assert!(o.app[0].complete);
    })
    .await;
}

/// Drift 5: an HTTP/1.0 app asking for keep-alive is told `Connection: keep-alive` and
/// its connection carries a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_keep_alive_request_is_answered_keep_alive() {
    let mut app =
        b"GET /one HTTP/1.0\r\nHost: app.local\r\nConnection: keep-alive\r\n\r\n".to_vec();
    app.extend_from_slice(b"GET /two HTTP/1.0\r\nHost: app.local\r\n\r\n");
    let case = Case {
        config: "",
        base_path: "",
        app: vec![App::Send(app)],
        methods: vec!["GET", "GET"],
        script: echo_target(),
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200, 200]);
        assert_eq!(o.app[0].header("connection"), Some("keep-alive"));
        assert_eq!(o.app[1].body, "/two");
    })
    .await;
}

/// Drift 5: our own error responses carry `Date`, like every other response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_own_errors_carry_date() {
    let script: Arc<upstream::Script> = Arc::new(|_: &Seen, _| vec![Step::Close]);
    let case = Case {
        config: "",
        base_path: "",
        app: vec![App::Send(get_close("/x"))],
        methods: vec!["GET"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [502]);
        assert_eq!(o.app[0].header("date"), Some("DATE"));
        assert_eq!(o.app[0].header("cache-control"), Some("no-store"));
    })
    .await;
}

/// Drift 5: bytes an upstream sends late (a body after a HEAD response) never become
/// the next request's response: HEAD asks the upstream to close, and the connection is
/// not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_bytes_after_a_head_response_are_not_read_as_the_next_response() {
    let script: Arc<upstream::Script> = Arc::new(|seen: &Seen, _| {
        if seen.head.starts_with("HEAD") {
            vec![
                Step::Send(response("200 OK", "", "").into_iter().collect()),
                Step::Sleep(Duration::from_millis(200)),
                Step::Send(b"late body".to_vec()),
            ]
        } else {
            vec![Step::Send(ok("fresh"))]
        }
    });
    let case = Case {
        config: "",
        base_path: "",
        app: vec![
            App::Send(b"HEAD /h HTTP/1.1\r\nHost: app.local\r\n\r\n".to_vec()),
            App::Sleep(Duration::from_millis(50)),
            App::Send(get_close("/after")),
        ],
        methods: vec!["HEAD", "GET"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200, 200]);
        assert_eq!(o.app[1].body, "fresh");
        assert!(
            o.upstream[0].contains("connection: close"),
            "{}",
            o.upstream[0]
        );
    })
    .await;
}

/// The scheme and `Host` the upstream saw a request with (its TLS listener is named
/// `localhost`), for redirects back to itself.
fn scheme_and_host(seen: &Seen) -> (&'static str, String) {
    let host = seen
        .head
        .lines()
        .find_map(|l| {
            l.strip_prefix("host: ")
                .or_else(|| l.strip_prefix("Host: "))
        })
        .unwrap_or("")
        .trim()
        .to_string();
    let scheme = if host.starts_with("localhost") {
        "https"
    } else {
        "http"
    };
    (scheme, host)
}

/// The hygiene rules on both engines: hop-by-hop and `Connection`-named headers, the
/// app's `Authorization` and `Proxy-*` never reach the upstream, and the response's
/// hop-by-hop headers never reach the app; redirects are pointed at the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_credentials_and_redirects_are_handled_alike() {
    let script: Arc<upstream::Script> = Arc::new(|seen: &Seen, _| {
        let (scheme, host) = scheme_and_host(seen);
        vec![Step::Send(response(
            "302 Found",
            &format!(
                "Location: {scheme}://{host}/base/next?x=1\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Foo: 1\r\nX-Kept: yes\r\n"
            ),
            "",
        ))]
    });
    let case = Case {
        config: "",
        base_path: "/base",
        app: vec![App::Send(
            b"GET /r HTTP/1.1\r\nHost: app.local\r\nAuthorization: Basic app\r\nConnection: x-secret, close\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: x\r\nX-Kept: yes\r\n\r\n"
                .to_vec(),
        )],
        methods: vec!["GET"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [302]);
        let up = &o.upstream[0];
        for gone in ["x-secret", "keep-alive", "te:", "proxy-", "Basic app"] {
            assert!(!up.contains(gone), "{gone} reached the upstream: {up}");
        }
        assert!(up.contains("x-kept: yes") && up.contains("authorization: Bearer TOKEN"));
        let r = &o.app[0];
        assert_eq!(r.header("location"), Some("http://app.local/next?x=1"));
        assert_eq!(r.header("x-hop"), None);
        assert_eq!(r.header("keep-alive"), None);
        assert_eq!(r.header("proxy-foo"), None);
        assert_eq!(r.header("x-kept"), Some("yes"));
    })
    .await;
}

/// A url template (`{token.instance_url}/base`): the requests go to the origin the token
/// answer names, under the template's path, with the credential; a body arrives whole,
/// and the upstream's redirects to its own urls are pointed at the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_template_is_served_alike() {
    let script: Arc<upstream::Script> = Arc::new(|seen: &Seen, _| {
        let target = seen.head.split(' ').nth(1).unwrap_or("").to_string();
        let (scheme, host) = scheme_and_host(seen);
        let answer = if target.starts_with("/base/moved") {
            response(
                "301 Moved Permanently",
                &format!("Location: {scheme}://{host}/base/new?y=2\r\n"),
                "",
            )
        } else {
            ok(&format!("{target} {}", seen.body.len()))
        };
        vec![Step::Send(answer)]
    });
    let case = Case {
        config: "",
        base_path: "/base",
        app: vec![
            App::Send(get("/a/b?x=1")),
            App::Send(
                b"POST /submit HTTP/1.1\r\nHost: app.local\r\nContent-Length: 5\r\n\r\nhello"
                    .to_vec(),
            ),
            App::Send(get_close("/moved")),
        ],
        methods: vec!["GET", "POST", "GET"],
        script,
    };
    both_with(Url::Template, case, |o| {
        assert_eq!(statuses(o), [200, 200, 301]);
        assert_eq!(o.app[0].body, "/base/a/b?x=1 0");
        assert_eq!(o.app[1].body, "/base/submit 5");
        assert_eq!(
            o.app[2].header("location"),
            Some("http://app.local/new?y=2")
        );
        assert_eq!(o.upstream.len(), 3, "{:?}", o.upstream);
        for up in &o.upstream {
            assert!(up.contains("authorization: Bearer TOKEN"), "{up}");
            assert!(up.contains("host: UPSTREAM"), "{up}");
        }
        assert!(o.upstream[1].ends_with("body: hello"), "{}", o.upstream[1]);
    })
    .await;
}

/// A WebSocket handshake: sent with the upgrade headers and the credential, sent again
/// with a newer token after a 401; the upstream's 101 reaches the app without its
/// hop-by-hop headers, followed by the tunnel's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_is_retried_after_a_401_and_switches() {
    // Each engine's first handshake gets a 401, its retry the 101 (runs are sequential).
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let script: Arc<upstream::Script> = Arc::new(move |_: &Seen, _| {
        if handshakes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .is_multiple_of(2)
        {
            return vec![Step::Send(response("401 Unauthorized", "", "no"))];
        }
        let mut switched =
            b"HTTP/1.1 101 Switching Protocols\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\
            Upgrade: websocket\r\nConnection: Upgrade, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\
            Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                .to_vec();
        switched.extend_from_slice(b"from upstream");
        vec![
            Step::Send(switched),
            Step::Sleep(Duration::from_millis(200)),
            Step::Close,
        ]
    });
    let case = Case {
        config: "",
        base_path: "/base",
        app: vec![App::Send(
            b"GET /chat?room=1 HTTP/1.1\r\nHost: app.local\r\nConnection: keep-alive, Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Basic app\r\n\r\n"
                .to_vec(),
        )],
        methods: vec!["GET"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [101]);
        assert_eq!(o.upstream.len(), 2, "{:#?}", o.upstream);
        for up in &o.upstream {
            assert!(up.starts_with("GET /base/chat?room=1 HTTP/1.1"), "{up}");
            for kept in [
                "connection: upgrade",
                "upgrade: websocket",
                "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
                "authorization: Bearer TOKEN",
            ] {
                assert!(up.contains(kept), "{kept} did not reach the upstream: {up}");
            }
            assert!(
                !up.contains("keep-alive") && !up.contains("Basic app"),
                "{up}"
            );
        }
        let r = &o.app[0];
        assert_eq!(r.header("connection"), Some("upgrade"));
        assert_eq!(r.header("upgrade"), Some("websocket"));
        assert_eq!(
            r.header("sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!((r.header("x-hop"), r.header("keep-alive")), (None, None));
        assert_eq!(o.trailing, "from upstream");
    })
    .await;
}

/// `token_query_param`: the app's own `auth` pairs are replaced by the token (also
/// sent as the header), and response headers that would hand the token back are
/// cleaned (a redirect keeping the query) or dropped (the token elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_query_is_put_in_and_kept_out_alike() {
    let script: Arc<upstream::Script> = Arc::new(|seen: &Seen, _| {
        let target = seen.head.split(' ').nth(1).unwrap_or("").to_string();
        let token = target.split("auth=").nth(1).unwrap_or("").to_string();
        vec![Step::Send(response(
            "302 Found",
            &format!("Location: {target}&x=1\r\nContent-Location: /tokens/{token}\r\n"),
            "",
        ))]
    });
    let case = Case {
        config: "token_query_param: auth",
        base_path: "/base",
        app: vec![App::Send(get_close(
            "/rest/x.json?start=1&auth=app&%61uth=2",
        ))],
        methods: vec!["GET"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [302]);
        let up = &o.upstream[0];
        assert!(
            up.starts_with("GET /base/rest/x.json?start=1&auth=TOKEN HTTP/1.1"),
            "{up}"
        );
        assert!(up.contains("authorization: Bearer TOKEN"), "{up}");
        let r = &o.app[0];
        assert_eq!(r.header("location"), Some("/base/rest/x.json?start=1&x=1"));
        assert_eq!(r.header("content-location"), None);
    })
    .await;
}

/// Drift 4: `check` refuses a credential header name that would break framing or
/// routing (and the run path never starts with one).
#[test]
fn credential_header_names_that_break_the_request_are_refused() {
    for name in [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Upgrade",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Proxy-Authorization",
        "Expect",
    ] {
        let yaml = format!(
            "credentials:\n  api: {{ grant: client_credentials, token_url: \"https://auth.example/token\", client_id: a, client_secret: b }}\n\
             upstreams:\n  api: {{ listen: 127.0.0.1:0, url: \"https://api.example\", credential: api, header: {name} }}\n"
        );
        let err = tokenrelay::config::Config::from_yaml(&yaml, &|_| None)
            .err()
            .unwrap_or_else(|| panic!("header {name} was accepted"));
        let text = err.to_string();
        assert!(text.contains("upstreams.api.header"), "{text}");
    }
    for name in ["Authorization", "X-Api-Key", "Proxy-Token-X"] {
        let yaml = format!(
            "credentials:\n  api: {{ grant: client_credentials, token_url: \"https://auth.example/token\", client_id: a, client_secret: b }}\n\
             upstreams:\n  api: {{ listen: 127.0.0.1:0, url: \"https://api.example\", credential: api, header: {name} }}\n"
        );
        if name.starts_with("Proxy-") {
            assert!(tokenrelay::config::Config::from_yaml(&yaml, &|_| None).is_err());
        } else {
            tokenrelay::config::Config::from_yaml(&yaml, &|_| None)
                .unwrap_or_else(|e| panic!("header {name} refused: {e}"));
        }
    }
}

/// An `Upgrade` other than websocket is ignored (RFC 9110 §7.8): Java's default
/// `HttpClient` asks every http:// request to upgrade to h2c, an `Expect: 100-continue`
/// upload included. Both engines serve such requests over HTTP/1.1, on a connection
/// that carries on, and neither `Upgrade` nor `HTTP2-Settings` reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_ignored_and_served_over_http11() {
    const H2C: &str = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n";
    let script: Arc<upstream::Script> =
        Arc::new(|seen: &Seen, _| vec![Step::Send(ok(&String::from_utf8_lossy(&seen.body)))]);
    let case = Case {
        config: "",
        base_path: "",
        app: vec![
            App::Send(format!("GET /x HTTP/1.1\r\nHost: app.local\r\n{H2C}\r\n").into_bytes()),
            App::Send(
                format!(
                    "POST /e HTTP/1.1\r\nHost: app.local\r\n{H2C}Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
                )
                .into_bytes(),
            ),
            App::Sleep(Duration::from_millis(100)),
            App::Send(b"hello".to_vec()),
            App::Send(get_close("/last")),
        ],
        methods: vec!["GET", "POST", "GET"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200, 200, 200]);
        assert_eq!(o.app[1].body, "hello");
        assert_eq!(o.upstream.len(), 3);
        for seen in &o.upstream {
            let lower = seen.to_ascii_lowercase();
            for gone in ["upgrade", "http2-settings", "h2c"] {
                assert!(!lower.contains(gone), "{gone} reached the upstream: {seen}");
            }
        }
        for r in &o.app {
            assert_eq!(r.header("upgrade"), None);
        }
    })
    .await;
}

/// A 401 is retried once with a newer token, the body sent again, on both engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_is_retried_once_with_the_body() {
    let script: Arc<upstream::Script> = Arc::new(|seen: &Seen, _| {
        if seen.head.starts_with("POST /first") {
            vec![Step::Send(response("401 Unauthorized", "", "no"))]
        } else {
            vec![Step::Send(ok("yes"))]
        }
    });
    // The script answers by path, so the retry of /first is refused too: the app gets
    // the second 401, and the connection carries on.
    let case = Case {
        config: "",
        base_path: "",
        app: vec![App::Send(
            b"POST /first HTTP/1.1\r\nHost: app.local\r\nContent-Length: 4\r\n\r\nbodyPOST /second HTTP/1.1\r\nHost: app.local\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                .to_vec(),
        )],
        methods: vec!["POST", "POST"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [401, 200]);
        assert_eq!(o.app[0].body, "no");
        assert_eq!(o.upstream.len(), 3, "{:#?}", o.upstream);
        assert!(o.upstream[0].ends_with("body: body") && o.upstream[1].ends_with("body: body"));
    })
    .await;
}

/// With `token_query_param`, the retry after a 401 carries the newer token in the query
/// in place of the first one: the query's token is the header's, each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_retry_puts_the_newer_token_in_the_query() {
    let script: Arc<upstream::Script> = Arc::new(|seen: &Seen, _| {
        let target = seen.head.split(' ').nth(1).unwrap_or("");
        let in_query = target.split("auth=").nth(1).unwrap_or("-");
        let in_header = seen
            .head
            .lines()
            .find_map(|l| l.strip_prefix("authorization: Bearer "))
            .unwrap_or("")
            .trim();
        if in_query != in_header {
            vec![Step::Send(response("400 Bad Request", "", "mismatch"))]
        } else if target.starts_with("/first") {
            vec![Step::Send(response("401 Unauthorized", "", "no"))]
        } else {
            vec![Step::Send(ok("yes"))]
        }
    });
    let case = Case {
        config: "token_query_param: auth",
        base_path: "",
        app: vec![App::Send(
            b"POST /first?a=1 HTTP/1.1\r\nHost: app.local\r\nContent-Length: 4\r\n\r\nbodyPOST /second HTTP/1.1\r\nHost: app.local\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                .to_vec(),
        )],
        methods: vec!["POST", "POST"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [401, 200], "{:#?}", o.app);
        assert_eq!(o.upstream.len(), 3, "{:#?}", o.upstream);
        for (i, target) in ["/first?a=1&", "/first?a=1&", "/second?"]
            .iter()
            .enumerate()
        {
            let line = format!("POST {target}auth=TOKEN HTTP/1.1\n");
            assert!(o.upstream[i].starts_with(&line), "{}", o.upstream[i]);
        }
    })
    .await;
}

/// An app that stops reading a response is cut off after `limits.idle_timeout` on both
/// engines, and the upstream connection is let go (its write fails) rather than held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stops_reading_is_cut_after_the_idle_timeout() {
    for engine in ENGINES {
        let script: Arc<upstream::Script> = Arc::new(|_: &Seen, _| {
            let body = vec![b'x'; 64 << 20];
            let mut bytes = format!(
                "HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            bytes.extend_from_slice(&body);
            vec![Step::Send(bytes)]
        });
        let auth = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let up = Upstream::start(engine.tls(), script).await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = relay_yaml(&auth, &up, engine, &dir, "", "limits: { idle_timeout: 1s }");
        let relay = support::start(&yaml).await;
        let mut conn = tokio::net::TcpStream::connect(relay.upstreams["api"])
            .await
            .unwrap();
        conn.write_all(&get("/big")).await.unwrap();
        // Read a little, then stop reading.
        let mut first = [0u8; 1024];
        let _ = conn.read(&mut first).await.unwrap();
        let failed = support::eventually(Duration::from_secs(20), || async {
            *up.send_failures.lock().unwrap() > 0
        })
        .await;
        assert!(
            failed,
            "{engine:?}: the stalled response was never given up"
        );
        drop(conn);
        relay.stop().await;
    }
}

/// The app's own credentials: refused under `inbound_authorization: reject`, and a
/// custom header and format carry the token while the app's copy is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_authorization_and_a_custom_credential_header() {
    let case = Case {
        config: "inbound_authorization: reject",
        base_path: "",
        app: vec![App::Send(
            b"GET /x HTTP/1.1\r\nHost: app.local\r\nAuthorization: Basic app\r\nConnection: close\r\n\r\n"
                .to_vec(),
        )],
        methods: vec!["GET"],
        script: echo_target(),
    };
    both(case, |o| {
        assert_eq!(statuses(o), [400]);
        assert!(o.upstream.is_empty());
    })
    .await;

    let case = Case {
        config: "header: X-Api-Key, format: \"key={token}\"",
        base_path: "",
        app: vec![App::Send(
            b"GET /x HTTP/1.1\r\nHost: app.local\r\nX-Api-Key: mine\r\nAuthorization: Basic app\r\nConnection: close\r\n\r\n"
                .to_vec(),
        )],
        methods: vec!["GET"],
        script: echo_target(),
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200]);
        let up = &o.upstream[0];
        assert!(
            !up.contains("mine") && !up.contains("authorization"),
            "{up}"
        );
        assert_eq!(up.matches("x-api-key: key=").count(), 1, "{up}");
    })
    .await;
}

/// Targets a listener refuses: `CONNECT` (405 with `Allow`) and an absolute-form target
/// for another host (400); neither reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_foreign_absolute_targets_are_refused() {
    for (request, status) in [
        (
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
            405,
        ),
        (
            "GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
            400,
        ),
    ] {
        let case = Case {
            config: "",
            base_path: "",
            app: vec![App::Send(request.as_bytes().to_vec())],
            methods: vec!["GET"],
            script: echo_target(),
        };
        both(case, |o| {
            assert_eq!(statuses(o), [status], "{request:?}");
            assert!(o.upstream.is_empty());
            if status == 405 {
                assert!(o.app[0].header("allow").is_some());
            }
        })
        .await;
    }
}

/// Uploads: a chunked body and an `Expect: 100-continue` body reach the upstream whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_expect_continue_uploads_arrive_whole() {
    let script: Arc<upstream::Script> =
        Arc::new(|seen: &Seen, _| vec![Step::Send(ok(&String::from_utf8_lossy(&seen.body)))]);
    let case = Case {
        config: "",
        base_path: "",
        app: vec![
            App::Send(
                b"POST /c HTTP/1.1\r\nHost: app.local\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                    .to_vec(),
            ),
            App::Send(
                b"POST /e HTTP/1.1\r\nHost: app.local\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            ),
            App::Sleep(Duration::from_millis(100)),
            App::Send(b"hello".to_vec()),
        ],
        methods: vec!["POST", "POST"],
        script,
    };
    both(case, |o| {
        assert_eq!(statuses(o), [200, 200]);
        assert_eq!(o.app[0].body, "abcde");
        assert_eq!(o.app[1].body, "hello");
    })
    .await;
}

/// Every response body cut by `body_idle_timeout` logs one line saying so, on both
/// engines (tokenrelay as a child process, its log read back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_response_body_logs_a_line() {
    for engine in ENGINES {
        let script: Arc<upstream::Script> = Arc::new(|_: &Seen, _| {
            vec![
                Step::Send(
                    response("200 OK", "", "0123456789")
                        .into_iter()
                        .take(80)
                        .collect(),
                ),
                Step::Sleep(Duration::from_secs(30)),
            ]
        });
        let auth = AuthServer::start(AuthServerOptions::default())
            .await
            .unwrap();
        let up = Upstream::start(engine.tls(), script).await;
        let dir = tempfile::tempdir().unwrap();
        let (port, admin) = (support::free_port(), support::free_port());
        let yaml = relay_yaml(&auth, &up, engine, &dir, "", "body_idle_timeout: 1s")
            .replacen("127.0.0.1:0", &format!("127.0.0.1:{admin}"), 1)
            .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1);
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.path().join("log");
        let mut child = support::ChildProc::spawn(&config, &log, &[]);
        assert!(
            support::wait_ready(
                &format!("http://127.0.0.1:{admin}/readyz"),
                Duration::from_secs(20)
            )
            .await,
            "{}",
            support::log_tail(&log, 20)
        );
        let answer = support::raw_exchange(
            format!("127.0.0.1:{port}").parse().unwrap(),
            &get_close("/stream"),
            Duration::from_secs(15),
        )
        .await;
        assert_eq!(
            support::raw_status(&answer),
            Some(200),
            "{engine:?}: {answer}"
        );
        let logged = support::eventually(Duration::from_secs(10), || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("upstream response body cut short") && text.contains("body_idle_timeout")
        })
        .await;
        assert!(logged, "{engine:?}: {}", support::log_tail(&log, 20));
        child.terminate();
    }
}
