//! The upstream listeners: each a bound socket, accepted on by every worker, serving
//! what its [`Slot`] holds. Listeners are matched across reloads by the address the
//! config names, so an upstream may be renamed or change settings without its socket
//! closing; a `:0` address is matched by upstream name instead.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::UpstreamConfig;
use crate::proxy::Upstream;
use crate::server::workers::Workers;
use crate::server::{Current, Slot};

/// How a listener is recognised across reloads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ListenerKey {
    Address(SocketAddr),
    /// Port 0: whatever the kernel picked, kept for as long as the upstream exists.
    Ephemeral(String),
}

impl ListenerKey {
    pub fn of(config: &UpstreamConfig) -> ListenerKey {
        if config.listen.port() == 0 {
            ListenerKey::Ephemeral(config.name.clone())
        } else {
            ListenerKey::Address(config.listen)
        }
    }
}

/// A listening socket being served.
pub struct RunningListener {
    pub slot: Arc<Slot<Upstream>>,
    /// Ends the accept loops; the slot's retire tokens are its children.
    stop: CancellationToken,
}

/// A listener's address cannot be bound (busy, or not this host's).
#[derive(Debug, thiserror::Error)]
#[error("upstreams.{name}.listen: cannot listen on {listen}: {source}")]
pub struct BindError {
    name: String,
    listen: SocketAddr,
    source: std::io::Error,
}

/// A socket bound for a listener that is not served yet: one handle per worker.
pub struct Bound {
    sockets: Vec<std::net::TcpListener>,
    pub local: SocketAddr,
}

/// Binds `config.listen` with a handle for each of `workers` (the fallible steps come
/// before anything changes: a busy port fails a reload whole).
pub async fn bind(config: &UpstreamConfig, workers: usize) -> Result<Bound, BindError> {
    let at = |source| BindError {
        name: config.name.clone(),
        listen: config.listen,
        source,
    };
    let listener = TcpListener::bind(config.listen).await.map_err(at)?;
    let local = listener.local_addr().map_err(at)?;
    let socket = listener.into_std().map_err(at)?;
    let mut sockets = (1..workers)
        .map(|_| socket.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(at)?;
    sockets.push(socket);
    Ok(Bound { sockets, local })
}

impl RunningListener {
    /// Starts serving `upstream` on `bound` in every worker until `parent` is cancelled
    /// or [`RunningListener::stop`].
    pub fn start(
        bound: Bound,
        upstream: Arc<Upstream>,
        workers: &Workers<Upstream>,
        parent: &CancellationToken,
    ) -> RunningListener {
        let stop = parent.child_token();
        let slot = Arc::new(Slot::new(serving(upstream, None, &stop)));
        workers.serve(bound.sockets, &slot, &stop);
        RunningListener { slot, stop }
    }

    /// The upstream new connections get.
    pub fn upstream(&self) -> Arc<Upstream> {
        self.slot.current().upstream.clone()
    }

    /// New connections get `upstream`; connections of the one it replaces end after
    /// their request in flight.
    pub fn replace(&self, upstream: Arc<Upstream>) {
        let current = self.slot.current();
        self.slot
            .replace(serving(upstream, Some(&current), &self.stop));
    }

    /// Stops accepting (the socket closes once every worker's loop has ended);
    /// connections end after their request in flight.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// A generation of settings for `upstream`. The connection cap (with the connections it
/// counts) carries over from `previous` when its size is unchanged.
fn serving(
    upstream: Arc<Upstream>,
    previous: Option<&Current<Upstream>>,
    stop: &CancellationToken,
) -> Current<Upstream> {
    let max = upstream.config.limits.max_connections;
    let permits = match previous {
        Some(p) if p.upstream.config.limits.max_connections == max => p.permits.clone(),
        _ => Arc::new(Semaphore::new(max)),
    };
    Current {
        upstream,
        permits,
        retire: stop.child_token(),
    }
}
