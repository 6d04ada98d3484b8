//! Listener workers. With `runtime.worker_threads` N > 1, the main runtime (admin,
//! refreshers, and listener worker 0) is joined by N-1 threads, each running a
//! current-thread runtime that accepts on the same listening sockets and serves its
//! connections start to finish, like nginx's worker processes: no work stealing and no
//! cross-thread wakeups on the request path.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::proxy::Upstream;

/// What a worker serves: an upstream, its listening socket, its connection cap.
pub struct Listener {
    pub upstream: Arc<Upstream>,
    pub socket: std::net::TcpListener,
    pub permits: Arc<Semaphore>,
}

/// The extra worker threads; [`Workers::stop`] ends them.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts workers 1..=`count`, each accepting on clones of `listeners` until
    /// `stop_accepting`; their connections run on `tracker`.
    pub fn start(
        count: usize,
        listeners: &[Listener],
        stop_accepting: &CancellationToken,
        tracker: &TaskTracker,
    ) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut threads = Vec::new();
        for index in 1..=count {
            let mine = listeners
                .iter()
                .map(|l| {
                    Ok(Listener {
                        upstream: l.upstream.clone(),
                        socket: l.socket.try_clone()?,
                        permits: l.permits.clone(),
                    })
                })
                .collect::<io::Result<Vec<_>>>()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stop_accepting, tracker) =
                (stop.clone(), stop_accepting.clone(), tracker.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tokenrelay-w{index}"))
                .spawn(move || {
                    rt.block_on(async move {
                        for l in mine {
                            match TcpListener::from_std(l.socket) {
                                Ok(socket) => {
                                    tokio::spawn(crate::server::serve_upstream(
                                        socket,
                                        l.upstream,
                                        l.permits,
                                        stop_accepting.clone(),
                                        tracker.clone(),
                                        index,
                                    ));
                                }
                                Err(e) => warn!(worker = index, error = %e, "worker cannot use a listening socket"),
                            }
                        }
                        // Connections drain on this runtime; it ends when told to.
                        stop.cancelled().await;
                    });
                })?;
            threads.push(thread);
        }
        Ok(Workers { threads, stop })
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
