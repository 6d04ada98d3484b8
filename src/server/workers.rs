//! Listener workers. With `runtime.worker_threads` N > 1, the main runtime (admin,
//! refreshers, and listener worker 0) is joined by N-1 threads, each running a
//! current-thread runtime that accepts on the same listening sockets and serves its
//! connections start to finish, like nginx's worker processes: no work stealing and no
//! cross-thread wakeups on the request path. Listeners are handed to every worker as
//! they are bound, at startup or by a reload.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::server::{ServeConnection, Slot};

/// A listening socket to accept on until `stop`, serving what `slot` holds.
struct Assignment<U> {
    socket: std::net::TcpListener,
    slot: Arc<Slot<U>>,
    stop: CancellationToken,
}

/// All listener workers; [`Workers::stop`] ends the extra threads.
pub struct Workers<U> {
    threads: Vec<JoinHandle<()>>,
    assign: Vec<mpsc::UnboundedSender<Assignment<U>>>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl<U: ServeConnection> Workers<U> {
    /// Starts workers 1..=`count` (worker 0 is the calling runtime); connections of
    /// every worker run on `tracker`.
    pub fn start(count: usize, tracker: &TaskTracker) -> io::Result<Workers<U>> {
        let stop = CancellationToken::new();
        let mut threads = Vec::new();
        let mut assign = Vec::new();
        for index in 1..=count {
            let (tx, mut rx) = mpsc::unbounded_channel::<Assignment<U>>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, tracker) = (stop.clone(), tracker.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tokenrelay-w{index}"))
                .spawn(move || {
                    rt.block_on(async move {
                        loop {
                            tokio::select! {
                                a = rx.recv() => match a {
                                    Some(a) => accept(a, &tracker, index),
                                    None => break,
                                },
                                () = stop.cancelled() => break,
                            }
                        }
                        // Connections drain on this runtime; it ends when told to.
                        stop.cancelled().await;
                    });
                })?;
            threads.push(thread);
            assign.push(tx);
        }
        Ok(Workers {
            threads,
            assign,
            stop,
            tracker: tracker.clone(),
        })
    }

    /// Has each worker accept on one of `sockets` (handles of one listening socket,
    /// one per worker) until `stop`. Call within the main runtime.
    pub fn serve(
        &self,
        sockets: Vec<std::net::TcpListener>,
        slot: &Arc<Slot<U>>,
        stop: &CancellationToken,
    ) {
        let mut sockets = sockets.into_iter();
        for (tx, socket) in self.assign.iter().zip(sockets.by_ref()) {
            let a = Assignment {
                socket,
                slot: slot.clone(),
                stop: stop.clone(),
            };
            // A worker gone means shutdown has begun; nothing to serve then.
            let _ = tx.send(a);
        }
        if let Some(socket) = sockets.next() {
            let a = Assignment {
                socket,
                slot: slot.clone(),
                stop: stop.clone(),
            };
            accept(a, &self.tracker, 0);
        }
    }

    /// How many workers accept on each listener (the main runtime's included).
    pub fn count(&self) -> usize {
        self.assign.len() + 1
    }

    /// Ends the worker runtimes (after the drain) and waits for their threads.
    pub async fn stop(self) {
        self.stop.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Starts worker `index`'s accept loop for `a` on the current runtime.
fn accept<U: ServeConnection>(a: Assignment<U>, tracker: &TaskTracker, index: usize) {
    match TcpListener::from_std(a.socket) {
        Ok(socket) => {
            // Tracked with the connections, so the drain also waits for the loop to end.
            tracker.spawn(crate::server::serve_upstream(
                socket,
                a.slot,
                a.stop,
                tracker.clone(),
                index,
            ));
        }
        Err(e) => warn!(worker = index, error = %e, "worker cannot use a listening socket"),
    }
}
