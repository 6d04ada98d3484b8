//! The general engine's side of a WebSocket tunnel: it waits for hyper to hand over both
//! upgraded connections, then [`crate::proxy::tunnel`] carries the bytes.

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::proxy::Upstream;
use crate::server::inbound::Upgrading;

/// Waits for both upgrades, then carries bytes until the tunnel ends.
pub async fn run(
    up: Arc<Upstream>,
    app: OnUpgrade,
    upstream: OnUpgrade,
    held: Option<Upgrading>,
    shutdown: CancellationToken,
) {
    // Held for the tunnel's life: the connection's own timeouts leave it alone.
    let _held = held;
    let (app, upstream) = match tokio::join!(app, upstream) {
        (Ok(a), Ok(u)) => (a, u),
        (a, u) => {
            debug!(upstream = %up.config.name, app_ok = a.is_ok(), upstream_ok = u.is_ok(), "websocket upgrade did not complete");
            return;
        }
    };
    crate::proxy::tunnel::carry(&up, TokioIo::new(app), TokioIo::new(upstream), &shutdown).await;
}
