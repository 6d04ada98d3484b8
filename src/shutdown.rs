//! Stopping: the signals that start it, and how long a retired connection lingers.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{signal as unix_signal, SignalKind};

/// Installs the SIGTERM/SIGINT handlers at once (so a signal arriving during startup is
/// not lost to the default action) and returns a future that completes on either.
/// Must be called within the tokio runtime.
pub fn signal() -> impl Future<Output = ()> {
    let mut term = unix_signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = unix_signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// How long a retired connection that is idle waits for the app's next request. An app
/// reusing a keep-alive connection may be sending one as a reload lands; it is answered
/// (with `Connection: close`) rather than cut off.
pub const RETIRE_GRACE: Duration = Duration::from_secs(1);
