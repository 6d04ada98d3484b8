//! Resolves on SIGTERM or SIGINT.

use std::future::Future;

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
