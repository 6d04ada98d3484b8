//! The embedded file store: one JSON file per credential in a directory.
//!
//! - Writes are atomic and durable: temp file (mode 0600) → fsync → rename → fsync dir.
//! - Compare-and-swap holds an exclusive `flock` on `<name>.lock` around read-compare-write,
//!   so several processes on one host can share the directory.
//! - The refresh lease is an exclusive `flock` on `<name>.lease`, held for the whole refresh;
//!   the kernel drops it when the holder dies, so a crashed refresher never blocks others.
//! - Changes by other processes are noticed by polling the file's metadata (bounded interval).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::codec::Codec;
use super::{CasOutcome, Lease, Store, StoreError, StoreSignal, StoredState};

/// File-backed store rooted at a directory.
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    codec: Codec,
    poll: Duration,
}

impl FileStore {
    /// Opens (creating with mode 0700 if needed) the state directory.
    pub fn open(dir: &Path, codec: Codec, poll: Duration) -> Result<FileStore, StoreError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    StoreError::backend(
                        "open",
                        "*",
                        format!("cannot create {}: {e}", dir.display()),
                    )
                })?;
        }
        let meta = fs::metadata(dir).map_err(|e| {
            StoreError::backend("open", "*", format!("cannot access {}: {e}", dir.display()))
        })?;
        if !meta.is_dir() {
            return Err(StoreError::backend(
                "open",
                "*",
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(FileStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                codec,
                poll,
            }),
        })
    }
}

impl Inner {
    fn state_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match fs::read(self.state_path(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::backend("load", name, e)),
        }
    }

    fn load(&self, name: &str) -> Result<Option<StoredState>, StoreError> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        self.codec
            .decode(name, &bytes)
            .map(Some)
            .map_err(|message| StoreError::Corrupt {
                credential: name.to_string(),
                message: format!("{}: {message}", self.state_path(name).display()),
            })
    }

    fn open_lock(&self, name: &str, suffix: &str) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(format!("{name}.{suffix}")))
    }

    fn cas(&self, name: &str, expected: u64, new: &StoredState) -> Result<CasOutcome, StoreError> {
        let err = |e: std::io::Error| StoreError::backend("compare_and_swap", name, e);
        let lock = self.open_lock(name, "lock").map_err(err)?;
        lock.lock().map_err(err)?;
        let current = match self.read(name)? {
            None => 0,
            Some(b) => Codec::generation(&b).map_err(|message| StoreError::Corrupt {
                credential: name.to_string(),
                message,
            })?,
        };
        if current != expected {
            return Ok(CasOutcome::Conflict {
                current_generation: current,
            });
        }
        let bytes = self
            .codec
            .encode(name, new)
            .map_err(|e| StoreError::backend("compare_and_swap", name, e))?;
        self.write_durably(name, &bytes).map_err(err)?;
        drop(lock);
        Ok(CasOutcome::Swapped)
    }

    /// temp file → fsync → rename over → fsync the directory, so after a crash the file
    /// is either the old or the new state, never a torn mix, and the rename itself persists.
    fn write_durably(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(
            ".{name}.json.tmp.{}.{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            // Enforce 0600 even under a permissive umask-less filesystem.
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
            fs::rename(&tmp, self.state_path(name))?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// A cheap fingerprint of the state file, to avoid re-reading it on every poll.
    fn fingerprint(&self, name: &str) -> Option<(u64, i64, i64, u64)> {
        fs::metadata(self.state_path(name))
            .ok()
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
    }
}

struct FileLease {
    // Holding the open, flocked file is the lease; closing it releases the lock.
    _file: File,
}

#[async_trait]
impl Lease for FileLease {
    async fn is_held_for(&self, _needed: Duration) -> bool {
        // A flock lasts until this process closes the file or dies: it cannot expire
        // while we hold it.
        true
    }
    async fn release(self: Box<Self>) {}
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    name: &str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::backend(op, name, format!("task failed: {e}"))))
}

#[async_trait]
impl Store for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn load(&self, name: &str) -> Result<Option<StoredState>, StoreError> {
        let inner = self.inner.clone();
        let n = name.to_string();
        blocking("load", name, move || inner.load(&n)).await
    }

    async fn compare_and_swap(
        &self,
        name: &str,
        expected: u64,
        new: &StoredState,
    ) -> Result<CasOutcome, StoreError> {
        let inner = self.inner.clone();
        let n = name.to_string();
        let new = new.clone();
        // Runs to completion even if the caller is cancelled: a started write is finished.
        blocking("compare_and_swap", name, move || {
            inner.cas(&n, expected, &new)
        })
        .await
    }

    async fn try_lease(
        &self,
        name: &str,
        _ttl: Duration,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        let inner = self.inner.clone();
        let n = name.to_string();
        blocking("lease", name, move || {
            let file = inner
                .open_lock(&n, "lease")
                .map_err(|e| StoreError::backend("lease", &n, e))?;
            match file.try_lock() {
                Ok(()) => Ok(Some(Box::new(FileLease { _file: file }) as Box<dyn Lease>)),
                Err(fs::TryLockError::WouldBlock) => Ok(None),
                Err(fs::TryLockError::Error(e)) => Err(StoreError::backend("lease", &n, e)),
            }
        })
        .await
    }

    fn watch(&self, name: &str) -> watch::Receiver<StoreSignal> {
        let inner = self.inner.clone();
        let name = name.to_string();
        let read_generation = |inner: &Inner, name: &str| -> StoreSignal {
            let read = inner.read(name);
            StoreSignal::from_state_bytes(read.as_ref().map(|b| b.as_deref()))
        };
        let (tx, rx) = watch::channel(read_generation(&inner, &name));
        tokio::spawn(async move {
            let mut last = inner.fingerprint(&name);
            let mut tick = tokio::time::interval(inner.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                }
                let fp = inner.fingerprint(&name);
                if fp == last {
                    continue;
                }
                last = fp;
                let signal = read_generation(&inner, &name);
                tx.send_if_modified(|s| {
                    let changed = *s != signal;
                    *s = signal;
                    changed
                });
            }
        });
        rx
    }
}
