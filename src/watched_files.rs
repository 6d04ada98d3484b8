//! Files re-read when they change: cert-manager and Kubernetes Secret updates replace
//! mounted keys and certificates in place, and a restart must not be needed. Each use
//! costs one `stat` per file; the files are parsed again only when one of them changed.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// What identifies one version of a file: a replaced file has a new inode or mtime.
type Stamp = Option<(u64, u64, SystemTime, u64)>;

/// Errors of later loads are only logged, so their type is erased.
type Loader<T> = dyn Fn() -> Result<T, Box<dyn std::error::Error + Send + Sync>> + Send + Sync;

/// A value parsed from files, parsed again when they change.
pub struct Reloading<T> {
    what: String,
    paths: Vec<PathBuf>,
    load: Box<Loader<T>>,
    current: Mutex<(Vec<Stamp>, Arc<T>)>,
}

impl<T> Reloading<T> {
    /// Loads once (an error here is a configuration error); `what` names the value in logs.
    pub fn new<E: std::error::Error + Send + Sync + 'static>(
        what: impl Into<String>,
        paths: Vec<PathBuf>,
        load: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Reloading<T>, E> {
        let stamps = stamps(&paths);
        let value = load()?;
        Ok(Reloading {
            what: what.into(),
            paths,
            load: Box::new(move || load().map_err(Into::into)),
            current: Mutex::new((stamps, Arc::new(value))),
        })
    }

    /// The current value, re-read first if a file changed. A new version that does not
    /// load (say the certificate was replaced before its key) keeps the previous value
    /// and is tried again when a file changes again.
    pub fn get(&self) -> Arc<T> {
        let now = stamps(&self.paths);
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if cur.0 != now {
            cur.0 = now;
            match (self.load)() {
                Ok(v) => {
                    tracing::info!(what = %self.what, "changed files re-read");
                    cur.1 = Arc::new(v);
                }
                Err(e) => {
                    tracing::warn!(what = %self.what, error = %e, "changed files cannot be used; keeping the previous version")
                }
            }
        }
        cur.1.clone()
    }
}

fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                )
            })
        })
        .collect()
}
