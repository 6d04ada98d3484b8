//! The forwarding path of one upstream, and the dispatch of each app connection to an
//! engine. [`Upstream`] holds the resolved, immutable facts; [`policy`] and [`outcome`]
//! hold every rule (headers, target, credential, the 401 sequence, errors, metrics and
//! access log); two engines do only framing and I/O: [`fast`] for upstreams spoken to in
//! HTTP/1.1 (plain or TLS, WebSocket included), [`hyper`] for the rest (HTTP/2, an egress
//! proxy, and whatever the fast path hands over). `tunnel` carries WebSocket tunnels
//! for both.

pub mod fast;
pub mod hyper;
pub mod outcome;
pub mod policy;
mod rates;
mod tunnel;
mod upstream;

pub use rates::Snapshot as RequestRates;
pub use upstream::{Upstream, UpstreamSetupError};

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

impl crate::server::ServeConnection for Upstream {
    /// Serves one app connection until it closes: the fast path where it applies, the
    /// general path for the rest of the connection from the first request it declines.
    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        local: SocketAddr,
        peer: SocketAddr,
        worker: usize,
        shutdown: CancellationToken,
    ) {
        match fast::serve(self.clone(), stream, local, worker, shutdown.clone()).await {
            fast::End::Closed => {}
            fast::End::Handoff { stream, read } => {
                hyper::serve(self, stream, read, local, peer, &shutdown).await
            }
        }
    }
}
