//! Reading the config file for a reload only when it is complete. A tool writing the file
//! in place leaves it half-written for a moment, or for as long as the writer stalls; a
//! half that parses (an upstream list cut short, a URL cut mid-port) would send requests,
//! and the bearer token, to the wrong place. So a reload reads the file only when
//! - no writer has it open: the kernel's close-write event (inotify) came after the last
//!   write, where events are available (elsewhere only the next rule applies);
//! - two reads `settle` apart are identical;
//!
//! and the caller applies it only if it parses and validates completely. Writing a new
//! file and renaming it over the old one is always safe.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Why the config file could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: still being written after {waited:?} (a writer has it open or it keeps changing); write a new file and rename it over the old one")]
    StillWriting { path: PathBuf, waited: Duration },
    #[error("{path}: is not UTF-8 text")]
    NotText { path: PathBuf },
}

/// What the file events said about writers.
#[derive(Default)]
struct Writes {
    /// A write came after the last close-write: a writer has the file open.
    open: bool,
}

/// The config file and, where the platform has them, its write events.
pub struct ConfigFile {
    path: PathBuf,
    /// The paths whose events count: the path as given and the file it resolves to.
    watched: Vec<PathBuf>,
    writes: Mutex<Writes>,
    /// Woken by every event about the file, and by every event in its directories.
    changed: Notify,
    /// Whether write events are being received.
    events: Mutex<Option<RecommendedWatcher>>,
}

impl ConfigFile {
    /// Watches `path`'s directory (and that of the file it resolves to) for writes;
    /// without file events, only the settle rule keeps a half-written file out.
    pub fn open(path: &Path) -> Arc<ConfigFile> {
        let file = Self::without_events(path);
        file.watch_writes();
        file
    }

    /// The file with no event watch: only the settle rule applies.
    fn without_events(path: &Path) -> Arc<ConfigFile> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut watched = vec![abs.clone()];
        if let Ok(real) = std::fs::canonicalize(&abs) {
            if real != abs {
                watched.push(real);
            }
        }
        Arc::new(ConfigFile {
            path: path.to_path_buf(),
            watched,
            writes: Mutex::new(Writes::default()),
            changed: Notify::new(),
            events: Mutex::new(None),
        })
    }

    /// Starts receiving the file's write events, where the platform has them.
    fn watch_writes(self: &Arc<Self>) {
        let (file, path) = (self, &self.path);
        let weak = Arc::downgrade(file);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let (Some(file), Ok(event)) = (weak.upgrade(), event) {
                file.on_event(&event);
            }
        });
        match watcher {
            Ok(mut w) => {
                let dirs: Vec<&Path> = file.watched.iter().filter_map(|p| p.parent()).collect();
                let watching = dirs
                    .iter()
                    .filter(|d| w.watch(d, RecursiveMode::NonRecursive).is_ok())
                    .count();
                if watching > 0 {
                    *file.events.lock().unwrap() = Some(w);
                } else {
                    warn!(path = %path.display(), "cannot watch the config file's directory; a reload trusts a file that stays unchanged between two reads");
                }
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "file events are unavailable; a reload trusts a file that stays unchanged between two reads");
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn on_event(&self, event: &notify::Event) {
        let ours = event.paths.iter().any(|p| self.watched.contains(p));
        if ours {
            let mut writes = self.writes.lock().unwrap();
            match event.kind {
                EventKind::Modify(ModifyKind::Data(_)) => writes.open = true,
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => writes.open = false,
                // A file renamed into place, or a new one, is complete once written (a
                // write to a new one marks it open again).
                EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Create(_)
                | EventKind::Remove(_) => writes.open = false,
                _ => {}
            }
            debug!(kind = ?event.kind, open = writes.open, "config file event");
        }
        // Reads (ours included) change nothing; everything else may be an update (a
        // Kubernetes ConfigMap swaps a symlink beside the file).
        if !matches!(
            event.kind,
            EventKind::Access(AccessKind::Open(_) | AccessKind::Close(AccessMode::Read))
        ) {
            self.changed.notify_waiters();
        }
    }

    /// Whether a writer has the file open, as far as events tell.
    fn being_written(&self) -> bool {
        self.writes.lock().unwrap().open
    }

    /// Resolves at the next file event (never, without events).
    pub async fn changed(&self) {
        if self.events.lock().unwrap().is_none() {
            return std::future::pending().await;
        }
        self.changed.notified().await;
    }

    /// The file's bytes as they are now (no completeness check).
    pub async fn read_now(&self) -> Result<Vec<u8>, ReadError> {
        tokio::fs::read(&self.path)
            .await
            .map_err(|source| ReadError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The file's text once it is complete (see the module comment): no writer has it
    /// open, and two reads `settle` apart are identical. Gives up after `max_wait`.
    pub async fn read_complete(
        &self,
        settle: Duration,
        max_wait: Duration,
    ) -> Result<String, ReadError> {
        self.settled(settle, max_wait, || self.read_now()).await
    }

    /// [`ConfigFile::read_complete`] with the reads done by `read`.
    async fn settled<F, Fut>(
        &self,
        settle: Duration,
        max_wait: Duration,
        mut read: F,
    ) -> Result<String, ReadError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, ReadError>>,
    {
        let started = Instant::now();
        let deadline = started + max_wait;
        loop {
            while self.being_written() {
                if Instant::now() >= deadline {
                    return Err(self.still_writing(started));
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), self.changed()).await;
            }
            let first = read().await?;
            tokio::time::sleep(settle).await;
            let second = read().await?;
            if first == second && !self.being_written() {
                return String::from_utf8(second).map_err(|_| ReadError::NotText {
                    path: self.path.clone(),
                });
            }
            if Instant::now() >= deadline {
                return Err(self.still_writing(started));
            }
        }
    }

    fn still_writing(&self, started: Instant) -> ReadError {
        ReadError::StillWriting {
            path: self.path.clone(),
            waited: started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SETTLE: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_file_left_alone_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        let file = ConfigFile::open(&path);
        let text = file.read_complete(SETTLE, Duration::from_secs(5)).await;
        assert_eq!(text.unwrap(), "a: 1\n");
    }

    /// A writer holding the file open mid-write keeps it out until it closes it, however
    /// long it stalls; the read then sees the whole file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_open_for_writing_is_read_once_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        let file = ConfigFile::open(&path);
        let mut writer = std::fs::File::create(&path).unwrap();
        writer.write_all(b"url: http://127.0.0.1:2801").unwrap();
        // The write's event is delivered by the watcher's own thread.
        let seen = Instant::now() + Duration::from_secs(30);
        while !file.being_written() && Instant::now() < seen {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(file.being_written(), "no write event");
        // Stalled mid-write: never complete.
        let stalled = file
            .read_complete(SETTLE, Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(
            matches!(stalled, ReadError::StillWriting { .. }),
            "{stalled}"
        );
        assert!(stalled.to_string().contains("rename"), "{stalled}");
        let reader = tokio::spawn({
            let file = file.clone();
            async move { file.read_complete(SETTLE, Duration::from_secs(20)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.write_all(b"0\n").unwrap();
        drop(writer);
        let text = reader.await.unwrap().unwrap();
        assert_eq!(text, "url: http://127.0.0.1:28010\n");
    }

    /// Without file events, what is read is returned once two reads agree, and a file
    /// that never stops changing is given up on. (Reads are scripted: no timing.)
    #[tokio::test]
    async fn without_events_a_file_is_read_once_two_reads_agree() {
        let dir = tempfile::tempdir().unwrap();
        let file = ConfigFile::without_events(&dir.path().join("c.yaml"));
        let script = std::sync::Mutex::new(vec!["a", "b", "c", "c", "d"].into_iter());
        let read = || {
            let next = script.lock().unwrap().next().unwrap();
            async move { Ok(next.as_bytes().to_vec()) }
        };
        let text = file.settled(Duration::ZERO, Duration::from_secs(60), read);
        assert_eq!(text.await.unwrap(), "c");
        let n = std::sync::atomic::AtomicU32::new(0);
        let changing = || {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move { Ok(format!("n: {i}").into_bytes()) }
        };
        let e = file.settled(Duration::ZERO, Duration::ZERO, changing).await;
        assert!(matches!(e, Err(ReadError::StillWriting { .. })), "{e:?}");
    }

    #[tokio::test]
    async fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = ConfigFile::open(&dir.path().join("none.yaml"));
        let e = file
            .read_complete(SETTLE, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("none.yaml: cannot read"), "{e}");
    }
}
