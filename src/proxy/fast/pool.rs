//! Idle HTTP/1.1 connections to one plain-http upstream, reused most recent first.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Idle connections older than this are closed rather than reused.
const IDLE_LIMIT: Duration = Duration::from_secs(90);
/// Announced keep-alive timeouts are not used to their very end.
const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);
const READ_BUFFER: usize = 16 * 1024;

/// One connection to the upstream, with its read buffer.
pub struct UpstreamConn {
    pub stream: TcpStream,
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
    /// At most this many idle connections are kept (per worker).
    max_idle: usize,
    /// One list per listener worker: a connection stays with the runtime whose reactor
    /// it is registered with.
    idle: Box<[Mutex<Vec<UpstreamConn>>]>,
}

impl Pool {
    pub fn new(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        max_idle: usize,
        workers: usize,
    ) -> Pool {
        Pool {
            // The URL's IPv6 literal keeps its brackets; the resolver wants it bare.
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            connect_timeout,
            max_idle,
            idle: (0..workers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        }
    }

    fn mine(&self, worker: usize) -> &Mutex<Vec<UpstreamConn>> {
        &self.idle[worker % self.idle.len()]
    }

    /// An idle connection of `worker`'s that still looks open, if any.
    pub fn checkout(&self, worker: usize) -> Option<UpstreamConn> {
        let now = Instant::now();
        loop {
            let mut conn = self
                .mine(worker)
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if now >= conn.usable_until {
                continue;
            }
            // The upstream may have closed it while idle. The probe costs no syscall when
            // the socket has had no event since its last read.
            match conn.stream.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.reused = true;
                    return Some(conn);
                }
                _ => continue,
            }
        }
    }

    /// A new connection, within the connect timeout.
    pub async fn connect(&self) -> io::Result<UpstreamConn> {
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
        let stream = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = stream.set_nodelay(true);
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
    pub fn checkin(&self, worker: usize, mut conn: UpstreamConn, keep_alive: Option<Duration>) {
        let limit = match keep_alive {
            Some(t) if t <= KEEP_ALIVE_MARGIN => return,
            Some(t) => (t - KEEP_ALIVE_MARGIN).min(IDLE_LIMIT),
            None => IDLE_LIMIT,
        };
        conn.buf.clear();
        conn.usable_until = Instant::now() + limit;
        let mut idle = self.mine(worker).lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }
}
