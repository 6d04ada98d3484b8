//! A scripted HTTP/1.1 upstream on 127.0.0.1:0, plain or behind TLS with a private CA
//! (http/1.1 only, so the bytes it receives are comparable): it records each request
//! head as received and answers as the case's script says.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the upstream does, in order, after reading one request.
#[derive(Clone, Debug)]
pub enum Step {
    Send(Vec<u8>),
    Sleep(Duration),
    /// Close the connection.
    Close,
}

/// A request as the upstream received it: the raw head and the decoded body.
#[derive(Clone, Debug)]
pub struct Seen {
    pub head: String,
    pub body: Vec<u8>,
}

pub type Script = dyn Fn(&Seen, usize) -> Vec<Step> + Send + Sync;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Upstream {
    pub addr: SocketAddr,
    /// The private CA's PEM when the upstream speaks TLS.
    pub ca_pem: Option<String>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// How many responses could not be written whole (the peer closed).
    pub send_failures: Arc<Mutex<usize>>,
}

impl Upstream {
    pub async fn start(tls: bool, script: Arc<Script>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (acceptor, ca_pem) = if tls {
            let (config, ca) = pki();
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
                Some(ca),
            )
        } else {
            (None, None)
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let send_failures = Arc::new(Mutex::new(0));
        let failures = send_failures.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (script, log, acceptor) = (script.clone(), log.clone(), acceptor.clone());
                let failures = failures.clone();
                tokio::spawn(async move {
                    let io: Box<dyn Io> = match acceptor {
                        Some(a) => match a.accept(tcp).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                        None => Box::new(tcp),
                    };
                    serve(io, script, log, failures).await;
                });
            }
        });
        Upstream {
            addr,
            ca_pem,
            seen,
            send_failures,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    mut io: Box<dyn Io>,
    script: Arc<Script>,
    log: Arc<Mutex<Vec<Seen>>>,
    failures: Arc<Mutex<usize>>,
) {
    let mut buf = Vec::new();
    for index in 0.. {
        let Some((head, body)) = read_request(&mut io, &mut buf).await else {
            return;
        };
        let seen = Seen { head, body };
        log.lock().unwrap().push(seen.clone());
        for step in script(&seen, index) {
            match step {
                Step::Send(bytes) => {
                    if io.write_all(&bytes).await.is_err() {
                        *failures.lock().unwrap() += 1;
                        return;
                    }
                    let _ = io.flush().await;
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Close => {
                    let _ = io.shutdown().await;
                    return;
                }
            }
        }
    }
}

/// Reads one request (Content-Length or chunked body, decoded).
async fn read_request(io: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let head_end = read_until(io, buf, b"\r\n\r\n").await?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let lower = head.to_ascii_lowercase();
    if lower.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let line_end = read_until(io, buf, b"\r\n").await?;
            let line = String::from_utf8_lossy(&buf[..line_end - 2]).into_owned();
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            buf.drain(..line_end);
            if size == 0 {
                let end = read_until(io, buf, b"\r\n").await?;
                buf.drain(..end);
                return Some((head, body));
            }
            while buf.len() < size + 2 {
                read_more(io, buf).await?;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let len = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        .unwrap_or(0);
    while buf.len() < len {
        read_more(io, buf).await?;
    }
    Some((head, buf.drain(..len).collect()))
}

async fn read_until(io: &mut Box<dyn Io>, buf: &mut Vec<u8>, pattern: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(pattern.len()).position(|w| w == pattern) {
            return Some(i + pattern.len());
        }
        read_more(io, buf).await?;
    }
}

async fn read_more(io: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    match io.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// A server config for localhost/127.0.0.1 signed by a fresh private CA, and the CA's PEM.
pub fn pki() -> (rustls::ServerConfig, String) {
    crate::support::pki::localhost_server(&[b"http/1.1"])
}
