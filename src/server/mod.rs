//! Inbound listeners: the accept loop with its connection cap, the listener worker
//! threads ([`workers`]), and the hyper plumbing of inbound connections ([`inbound`]).
//! Each accepted connection goes to what the listener's [`Slot`] holds (an upstream,
//! through [`ServeConnection`]) or, for the admin and demo listeners, to hyper.

pub mod inbound;
mod slot;
pub mod workers;

pub use slot::{Current, Slot};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::Limits;
use crate::server::inbound::Rewind;

/// What serves the connections of an upstream listener, start to finish.
pub trait ServeConnection: Send + Sync + 'static {
    /// Serves one connection until it closes; `retire` asks it to finish the request
    /// in flight and close; `worker` is the listener worker whose runtime serves it.
    fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        local: SocketAddr,
        peer: SocketAddr,
        worker: usize,
        retire: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// Serves an upstream's listener until `stop`; connection tasks run on `tracker`, which
/// the caller waits on to drain. Each connection is served by what `slot` holds when it
/// is accepted, and drains once that is retired (a reload replaced it; see [`Slot`]).
/// `worker` is the listener worker serving it.
pub async fn serve_upstream<U: ServeConnection>(
    listener: TcpListener,
    slot: Arc<Slot<U>>,
    stop: CancellationToken,
    tracker: TaskTracker,
    worker: usize,
) {
    let local = local_addr(&listener);
    let permits = {
        let slot = slot.clone();
        move || slot.current().permits.clone()
    };
    let on_conn = move |stream: TcpStream, peer: SocketAddr| {
        let current = slot.current();
        current.upstream.clone().serve_connection(
            stream,
            local,
            peer,
            worker,
            current.retire.clone(),
        )
    };
    accept_loop(listener, permits, stop, tracker, on_conn).await
}

/// Serves `listener` with a hyper `handler` until `shutdown`; connection tasks run on
/// `tracker`.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    H: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = crate::server::inbound::builder(&limits);
    let local = local_addr(&listener);
    let max = limits.max_connections;
    let conn_shutdown = shutdown.clone();
    let on_conn = move |stream: TcpStream, peer: SocketAddr| {
        let (builder, limits, handler, shutdown) = (
            builder.clone(),
            limits.clone(),
            handler.clone(),
            conn_shutdown.clone(),
        );
        let io = Rewind::new(stream, Bytes::new());
        async move {
            crate::server::inbound::serve(io, &builder, &limits, handler, local, peer, &shutdown)
                .await
        }
    };
    let permits = Arc::new(Semaphore::new(max));
    accept_loop(
        listener,
        move || permits.clone(),
        shutdown,
        tracker,
        on_conn,
    )
    .await
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Accepts connections (at most one per permit at once; workers sharing a listening
/// socket share its permits) until `shutdown`, running `on_conn` for each on `tracker`.
/// `permits` gives the current connection cap (a reload may change it).
async fn accept_loop<P, F, Fut>(
    listener: TcpListener,
    permits: P,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    on_conn: F,
) where
    P: Fn() -> Arc<Semaphore>,
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = local_addr(&listener);
    loop {
        // Waiting for a permit before accepting leaves excess connections in the
        // kernel's backlog instead of accepting and dropping them.
        let permit = tokio::select! {
            p = permits().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    warn!(%local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let conn = on_conn(stream, peer);
        tracker.spawn(async move {
            conn.await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::{ByteSize, HumanDuration};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    async fn answer(conn: &mut TcpStream) -> String {
        let mut buf = vec![0u8; 1024];
        let n = conn.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// At most `max_connections` are served at once: a further one waits in the
    /// backlog until one closes, and is served then. Stopping ends the loop.
    #[tokio::test]
    async fn the_connection_cap_holds_back_the_next_until_one_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: HumanDuration(Duration::from_secs(30)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            max_header_size: ByteSize(16 * 1024),
        };
        let handler = |_req: http::Request<hyper::body::Incoming>, _local| async {
            http::Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")))
        };
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = tokio::spawn(serve(listener, limits, handler, stop.clone(), tracker));

        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(REQUEST).await.unwrap();
        assert!(answer(&mut first).await.starts_with("HTTP/1.1 200"));

        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(REQUEST).await.unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte));
        assert!(early.await.is_err(), "served beyond the cap");

        drop(first);
        let late = tokio::time::timeout(Duration::from_secs(10), answer(&mut second));
        assert!(late.await.unwrap().starts_with("HTTP/1.1 200"));

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the accept loop ends on stop")
            .unwrap();
    }
}
