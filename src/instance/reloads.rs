//! What asks for a config reload: `SIGHUP`, `POST /reload` on the admin listener, and
//! the `--watch-config` poller. Requests queue to the one task that applies them, so
//! reloads never overlap.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::instance::config_file::ConfigFile;
use crate::instance::record::{Applied, ReloadError, ReloadTrigger};

/// How long the watcher waits for a changed file to be complete before looking again.
const WATCH_MAX_WAIT: Duration = Duration::from_secs(30);

/// One reload request; `reply` hears the outcome when someone waits for it.
pub struct ReloadRequest {
    pub trigger: ReloadTrigger,
    reply: Option<oneshot::Sender<Result<Applied, ReloadError>>>,
}

impl ReloadRequest {
    /// A request whose outcome the caller awaits on the returned receiver.
    pub fn awaited(
        trigger: ReloadTrigger,
    ) -> (
        ReloadRequest,
        oneshot::Receiver<Result<Applied, ReloadError>>,
    ) {
        let (tx, rx) = oneshot::channel();
        (
            ReloadRequest {
                trigger,
                reply: Some(tx),
            },
            rx,
        )
    }

    pub fn answer(self, outcome: Result<Applied, ReloadError>) {
        if let Some(reply) = self.reply {
            let _ = reply.send(outcome);
        }
    }
}

/// Starts the trigger tasks; they end with `stop`.
pub struct Reloads {
    tx: mpsc::Sender<ReloadRequest>,
    stop: CancellationToken,
}

impl Reloads {
    pub fn new(tx: mpsc::Sender<ReloadRequest>, stop: CancellationToken) -> Reloads {
        Reloads { tx, stop }
    }

    /// Reloads on each `SIGHUP`. The handler is installed before this returns, so a
    /// signal arriving from then on never gets the default action (termination).
    pub fn on_sighup(&self) -> std::io::Result<()> {
        let mut hup = signal(SignalKind::hangup())?;
        let (tx, stop) = (self.tx.clone(), self.stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    s = hup.recv() => if s.is_none() { return },
                    () = stop.cancelled() => return,
                }
                info!("SIGHUP received");
                let request = ReloadRequest {
                    trigger: ReloadTrigger::Signal,
                    reply: None,
                };
                if tx.send(request).await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Asks for a reload when the config file's complete contents differ from the last
    /// seen: looked at on each file event and every `every`, then read once complete
    /// (see [`ConfigFile::read_complete`], two reads `every` apart agreeing). Reading
    /// through the path follows symlinks afresh each time, so a Kubernetes ConfigMap
    /// update (a `..data` symlink swapped to a new directory) is seen like an edit in
    /// place or an editor's rename-over. A file that cannot be read for a moment
    /// (mid-swap) is tried again later.
    pub fn watch(&self, file: Arc<ConfigFile>, every: Duration) {
        let (tx, stop) = (self.tx.clone(), self.stop.clone());
        tokio::spawn(async move {
            let mut last = file.read_now().await.ok();
            let mut unreadable_logged = false;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = file.changed() => {}
                    () = stop.cancelled() => return,
                }
                if file.read_now().await.ok() == last {
                    continue;
                }
                let now = match file.read_complete(every, WATCH_MAX_WAIT).await {
                    Ok(text) => text.into_bytes(),
                    Err(e) => {
                        if !unreadable_logged {
                            warn!(error = %e, "watched config file is not complete or cannot be read; trying again");
                            unreadable_logged = true;
                        }
                        continue;
                    }
                };
                unreadable_logged = false;
                if last.as_ref() == Some(&now) {
                    continue;
                }
                last = Some(now);
                info!(path = %file.path().display(), "config file changed");
                let request = ReloadRequest {
                    trigger: ReloadTrigger::Watch,
                    reply: None,
                };
                if tx.send(request).await.is_err() {
                    return;
                }
            }
        });
    }
}
