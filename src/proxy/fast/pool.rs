//! Idle HTTP/1.1 connections to one upstream (plain or TLS), reused most recent first.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::stream::UpstreamStream;
use crate::metrics::UpstreamErrorKind;

/// Idle connections older than this are closed rather than reused.
const IDLE_LIMIT: Duration = Duration::from_secs(90);
/// Announced keep-alive timeouts are not used to their very end.
const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);
const READ_BUFFER: usize = 16 * 1024;

/// One connection to the upstream, with its read buffer.
pub struct UpstreamConn {
    pub stream: UpstreamStream,
    pub buf: BytesMut,
    /// It carried an exchange before (so it may have been closed meanwhile).
    pub reused: bool,
    /// After this the upstream may close it at any moment: not reused.
    usable_until: Instant,
}

/// The idle connections of one upstream.
pub struct Pool {
    host: String,
    port: u16,
    connect_timeout: Duration,
    /// For `https://` upstreams: the TLS client (its session cache resumes sessions
    /// across connections) and the name the certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// At most this many idle connections are kept (per worker).
    max_idle: usize,
    /// One list per listener worker: a connection stays with the runtime whose reactor
    /// it is registered with.
    idle: Box<[Mutex<Vec<UpstreamConn>>]>,
}

/// Why no connection to the upstream could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    TimedOut,
    #[error("{0}")]
    Tcp(#[source] io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
}

impl ConnectError {
    pub fn kind(&self) -> UpstreamErrorKind {
        match self {
            ConnectError::TimedOut => UpstreamErrorKind::Timeout,
            ConnectError::Tcp(_) => UpstreamErrorKind::Connect,
            ConnectError::Tls(_) => UpstreamErrorKind::Tls,
        }
    }
}

/// How to reach one upstream: its host, port and, for TLS, the client settings.
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
}

impl Pool {
    /// `None` when the host is no valid TLS server name.
    pub fn new(endpoint: Endpoint<'_>, max_idle: usize, workers: usize) -> Option<Pool> {
        // The URL's IPv6 literal keeps its brackets; the resolver wants it bare.
        let host = endpoint
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = match endpoint.tls {
            Some(config) => Some((
                TlsConnector::from(config),
                ServerName::try_from(host.clone()).ok()?,
            )),
            None => None,
        };
        Some(Pool {
            host,
            port: endpoint.port,
            connect_timeout: endpoint.connect_timeout,
            tls,
            max_idle,
            idle: (0..workers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        })
    }

    fn mine(&self, worker: usize) -> &Mutex<Vec<UpstreamConn>> {
        &self.idle[worker % self.idle.len()]
    }

    /// An idle connection of `worker`'s that still looks open at `now`, if any.
    pub fn checkout(&self, worker: usize, now: Instant) -> Option<UpstreamConn> {
        loop {
            let mut conn = self
                .mine(worker)
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if now >= conn.usable_until {
                continue;
            }
            // The upstream may have closed it while idle.
            if conn.stream.idle_and_open() {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    /// A new connection, TLS handshake included, within the connect timeout.
    pub async fn connect(&self) -> Result<UpstreamConn, ConnectError> {
        let attempt = async {
            let mut last = None;
            for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "the host name resolved to nothing")
            }))
        };
        let established = async {
            let tcp = attempt.await.map_err(ConnectError::Tcp)?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok(UpstreamStream::Plain(tcp)),
                Some((connector, name)) => connector
                    .connect(name.clone(), tcp)
                    .await
                    .map(|tls| UpstreamStream::Tls(Box::new(tls)))
                    .map_err(ConnectError::Tls),
            }
        };
        let stream = tokio::time::timeout(self.connect_timeout, established)
            .await
            .map_err(|_| ConnectError::TimedOut)??;
        Ok(UpstreamConn {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            reused: false,
            usable_until: Instant::now(),
        })
    }

    /// Keeps a connection whose last exchange ended cleanly. `keep_alive` is the idle
    /// time the upstream announced (`Keep-Alive: timeout=N`); the connection is not
    /// reused in the last second of it, when the upstream may close it as a request
    /// arrives.
    pub fn checkin(
        &self,
        worker: usize,
        mut conn: UpstreamConn,
        keep_alive: Option<Duration>,
        now: Instant,
    ) {
        let limit = match keep_alive {
            Some(t) if t <= KEEP_ALIVE_MARGIN => return,
            Some(t) => (t - KEEP_ALIVE_MARGIN).min(IDLE_LIMIT),
            None => IDLE_LIMIT,
        };
        conn.buf.clear();
        conn.usable_until = now + limit;
        let mut idle = self.mine(worker).lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }
}
