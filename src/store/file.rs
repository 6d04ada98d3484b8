//! The embedded file store: one JSON file per credential in a directory.
//!
//! - Writes are atomic and durable: temp file (mode 0600) → fsync → rename → fsync dir.
//! - Compare-and-swap holds an exclusive `flock` on `<name>.lock` around read-compare-write,
//!   so several processes on one host can share the directory.
//! - The refresh lease is an exclusive `flock` on `<name>.lease`, held for the whole refresh;
//!   the kernel drops it when the holder dies, so a crashed refresher never blocks others.
//! - `<name>.generation` holds the highest generation ever written (the mark), written
//!   durably after each state file, so a restored older state file (a backup) is refused
//!   instead of having its already spent refresh token sent. The store's generation is
//!   the greater of the two: that is what `load`, compare-and-swap and `watch` see.
//! - Changes by other processes are noticed by polling the files' metadata (bounded interval).
//! - Both rest on `flock` and `rename` doing what they do on a local filesystem, so a
//!   directory on NFS, CIFS/SMB or FUSE is refused at open (see [`super::filesystem`])
//!   unless `store.allow_network_filesystem` is set.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::warn;

use super::codec::{Codec, CodecError};
use super::{CasOutcome, Lease, Store, StoreError, StoreSignal, StoredState};

/// File-backed store rooted at a directory.
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// A second directory keeping the generation marks (`store.mark_path`), on storage a
    /// restore of `dir` does not reach.
    mark_dir: Option<PathBuf>,
    codec: Codec,
    poll: Duration,
}

impl FileStore {
    /// Opens (creating with mode 0700 if needed) the state directory and, if given, the
    /// second directory for generation marks. Either on a network or FUSE filesystem is
    /// refused (see [`super::filesystem`]) unless `allow_network_filesystem`.
    pub fn open(
        dir: &Path,
        mark_dir: Option<&Path>,
        allow_network_filesystem: bool,
        codec: Codec,
        poll: Duration,
    ) -> Result<FileStore, StoreError> {
        let dirs =
            std::iter::once(("store.path", dir)).chain(mark_dir.map(|m| ("store.mark_path", m)));
        for (key, d) in dirs {
            open_dir(d)?;
            if !allow_network_filesystem {
                refuse_network_filesystem(key, d, super::filesystem::network_filesystem_of(d))?;
            }
        }
        Ok(FileStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                mark_dir: mark_dir.map(Path::to_path_buf),
                codec,
                poll,
            }),
        })
    }
}

/// Creates `dir` (mode 0700) if needed and checks it is a directory.
fn open_dir(dir: &Path) -> Result<(), StoreError> {
    {
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
        Ok(())
    }
}

/// The error for directory `dir` (config key `key`) if `found` (what
/// [`super::filesystem::network_filesystem_of`] said of it) is a network or FUSE
/// filesystem, or could not be told.
fn refuse_network_filesystem(
    key: &'static str,
    dir: &Path,
    found: std::io::Result<Option<&'static str>>,
) -> Result<(), StoreError> {
    match found {
        Ok(None) => Ok(()),
        Ok(Some(filesystem)) => Err(StoreError::NetworkFilesystem {
            key,
            path: dir.to_path_buf(),
            filesystem,
        }),
        Err(e) => Err(StoreError::backend(
            "open",
            "*",
            format!(
                "{key} {}: cannot tell which filesystem holds it (statfs: {e}); set \
                 store.allow_network_filesystem: true to skip this check",
                dir.display()
            ),
        )),
    }
}

impl Inner {
    fn state_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Where the generation mark is kept: beside the state file, and in the second
    /// directory when there is one.
    fn mark_paths(&self, name: &str) -> Vec<PathBuf> {
        std::iter::once(&self.dir)
            .chain(&self.mark_dir)
            .map(|d| d.join(format!("{name}.generation")))
            .collect()
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match fs::read(self.state_path(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::backend("load", name, e)),
        }
    }

    /// The generation mark, the highest of its copies; `None` before the first write
    /// that kept one (a store from an older version): the state file is then taken as
    /// it is.
    fn read_mark(&self, op: &'static str, name: &str) -> Result<Option<u64>, StoreError> {
        let mut highest = None;
        for path in self.mark_paths(name) {
            highest = highest.max(self.read_mark_at(op, name, &path)?);
        }
        Ok(highest)
    }

    fn read_mark_at(
        &self,
        op: &'static str,
        name: &str,
        path: &Path,
    ) -> Result<Option<u64>, StoreError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::backend(
                    op,
                    name,
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        };
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                credential: name.to_string(),
                message: format!("{}: not a generation number", path.display()),
            })
    }

    fn corrupt(&self, name: &str, e: CodecError) -> StoreError {
        StoreError::unreadable(name, self.state_path(name).display(), e)
    }

    /// The store's generation: the greater of the state file's and the mark. The mark is
    /// read first: it is written after the state file, so a state file read after it is
    /// at least as new unless an older one was put back.
    fn generation(&self, op: &'static str, name: &str) -> Result<u64, StoreError> {
        let mark = self.read_mark(op, name)?.unwrap_or(0);
        let file = match self.read(name)? {
            None => 0,
            Some(b) => Codec::generation(&b).map_err(|m| self.corrupt(name, m))?,
        };
        Ok(file.max(mark))
    }

    fn load(&self, name: &str) -> Result<Option<StoredState>, StoreError> {
        // Mark first, for the reason given at `generation`.
        let mark = self.read_mark("load", name)?.unwrap_or(0);
        let state = match self.read(name)? {
            None => None,
            Some(bytes) => Some(
                self.codec
                    .decode(name, &bytes)
                    .map_err(|m| self.corrupt(name, m))?,
            ),
        };
        Ok(match state {
            None if mark == 0 => None,
            Some(s) if s.generation >= mark => Some(s),
            older => Some(rolled_back(name, mark, older)),
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
        let current = self.generation("compare_and_swap", name)?;
        if current != expected {
            return Ok(CasOutcome::Conflict {
                current_generation: current,
            });
        }
        if new.generation <= expected {
            // The mark would then sit above the state just written, refusing it.
            return Err(StoreError::backend(
                "compare_and_swap",
                name,
                format!(
                    "new generation {} must be above the expected {expected}",
                    new.generation
                ),
            ));
        }
        let bytes = self
            .codec
            .encode(name, new)
            .map_err(|e| StoreError::backend("compare_and_swap", name, e))?;
        self.write_durably(&self.state_path(name), &bytes)
            .map_err(err)?;
        // Only after the state is durable, so a crash in between leaves state ≥ mark.
        let mark = format!("{}\n", new.generation);
        for path in self.mark_paths(name) {
            if let Err(e) = self.write_durably(&path, mark.as_bytes()) {
                // The state is durable, so the swap happened; the mark lags by one write
                // and is brought up to date by the next.
                warn!(credential = %name, path = %path.display(), error = %e,
                    "cannot update the generation mark");
            }
        }
        drop(lock);
        Ok(CasOutcome::Swapped)
    }

    /// temp file → fsync → rename over `target` (a file in one of the store's
    /// directories) → fsync that directory, so after a crash the file has either the old
    /// or the new content, never a torn mix, and the rename itself persists.
    fn write_durably(&self, target: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let file_name = target.file_name().unwrap_or_default().to_string_lossy();
        let dir = target.parent().unwrap_or(&self.dir);
        let tmp = dir.join(format!(
            ".{file_name}.tmp.{}.{}",
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
            fs::rename(&tmp, target)?;
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// A cheap fingerprint of the state file and the marks, to avoid re-reading them on
    /// every poll.
    fn fingerprint(&self, name: &str) -> Vec<Option<(u64, i64, i64, u64)>> {
        let of = |path: PathBuf| {
            fs::metadata(path)
                .ok()
                .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
        };
        std::iter::once(self.state_path(name))
            .chain(self.mark_paths(name))
            .map(of)
            .collect()
    }
}

/// What `load` reports for a state file older than the mark (or missing despite it):
/// the mark's generation, no token, and what happened and what to do.
fn rolled_back(name: &str, mark: u64, older: Option<StoredState>) -> StoredState {
    let what = match &older {
        Some(s) => format!(
            "the stored state (generation {}) is older than the last one written (generation {mark}): \
             a backup restored? Its refresh token has most likely been spent already, so it is not sent.",
            s.generation
        ),
        None => format!(
            "the state file is missing, but generation {mark} was written before: deleted?"
        ),
    };
    // Who wrote the refused state and when stay visible (`tokenrelay status`); its tokens do not.
    StoredState::rollback_refused(
        mark,
        older,
        format!(
            "{what} Obtain a new refresh token and run `tokenrelay seed --credential {name}` \
             or `tokenrelay authorize --credential {name}`."
        ),
    )
}

struct FileLease {
    // Holding the open, flocked file is the lease; closing it releases the lock.
    file: File,
    /// Where the lease file is: the lock only excludes others while this very file
    /// (device and inode) is still the one there.
    path: PathBuf,
}

impl FileLease {
    /// True while the locked file is still the lease file. A flock cannot expire while
    /// we hold it, but if the lease file is deleted or replaced (a cleanup of the state
    /// directory), the next taker creates and locks a new file, and our lock no longer
    /// excludes anyone.
    fn still_held(&self) -> bool {
        match (fs::metadata(&self.path), self.file.metadata()) {
            (Ok(there), Ok(ours)) => there.dev() == ours.dev() && there.ino() == ours.ino(),
            _ => false,
        }
    }
}

#[async_trait]
impl Lease for FileLease {
    async fn renew(&self) -> bool {
        // The flock is held until this process closes the file or dies.
        self.still_held()
    }

    async fn secure_for(&self, _needed: Duration) -> bool {
        // A flock lasts until this process closes the file or dies: it cannot expire
        // while we hold it; it can only stop meaning anything (`still_held`).
        self.still_held()
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
    fn rollback_detection(&self) -> &'static str {
        if self.inner.mark_dir.is_some() {
            "a restored older state file, or a whole restored state directory, is refused \
             (generation marks in store.path and store.mark_path)"
        } else {
            "a restored older state file is refused (generation mark); a restore of the \
             whole state directory (state and mark together) is not detected: set \
             store.mark_path to keep a second mark on another volume"
        }
    }

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
                Ok(()) => {
                    let lease = FileLease {
                        file,
                        path: inner.dir.join(format!("{n}.lease")),
                    };
                    // Removed between our open and our lock: locking that file excludes
                    // nobody; the next try locks the file now there.
                    Ok(lease
                        .still_held()
                        .then(|| Box::new(lease) as Box<dyn Lease>))
                }
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
            StoreSignal::from_generation(inner.generation("watch", name))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    const POLL: Duration = Duration::from_millis(50);

    fn store(dir: &Path, encrypted: bool) -> FileStore {
        let key = encrypted.then(|| Secret::new("ab".repeat(32)));
        FileStore::open(dir, None, false, Codec::new(key.as_ref()).unwrap(), POLL).unwrap()
    }

    fn state(generation: u64, refresh: &str) -> StoredState {
        StoredState {
            generation,
            access_token: Some(Secret::new(format!("access-{generation}"))),
            access_expires_at_ms: Some(4_000_000_000_000 + generation),
            refresh_token: Some(Secret::new(refresh)),
            obtained_at_ms: 1,
            updated_at_ms: 2,
            updated_by: "test".into(),
            reauthorization_required: None,
            ..Default::default()
        }
    }

    fn mark(dir: &Path) -> Option<String> {
        fs::read_to_string(dir.join("crm.generation")).ok()
    }

    /// Writes generations `from + 1 ..= to` through compare-and-swap.
    async fn rotate(s: &FileStore, from: u64, to: u64) {
        for g in from + 1..=to {
            let outcome = s
                .compare_and_swap("crm", g - 1, &state(g, &format!("refresh-{g}")))
                .await
                .unwrap();
            assert_eq!(outcome, CasOutcome::Swapped);
        }
    }

    /// Rotates to generation 5 with a backup of the state file taken at 2, then puts the
    /// backup back.
    async fn restored_backup(s: &FileStore, dir: &Path) {
        rotate(s, 0, 2).await;
        let backup = fs::read(dir.join("crm.json")).unwrap();
        rotate(s, 2, 5).await;
        fs::write(dir.join("crm.json"), backup).unwrap();
    }

    #[test]
    fn a_network_filesystem_is_refused_naming_it_the_path_and_the_option() {
        let dir = Path::new("/mnt/shared/tokenrelay");
        for (key, filesystem) in [("store.path", "NFS"), ("store.mark_path", "FUSE")] {
            let err = refuse_network_filesystem(key, dir, Ok(Some(filesystem)))
                .unwrap_err()
                .to_string();
            for part in [
                &format!("{key} /mnt/shared/tokenrelay:"),
                &format!("on {filesystem}, a network or FUSE filesystem"),
                "flock and rename are not reliable",
                "refresh lease",
                "atomic write",
                "store.allow_network_filesystem: true",
            ] {
                assert!(err.contains(part), "{part:?} not in {err:?}");
            }
        }
        assert!(refuse_network_filesystem("store.path", dir, Ok(None)).is_ok());
        let err = refuse_network_filesystem(
            "store.path",
            dir,
            Err(std::io::Error::from(ErrorKind::PermissionDenied)),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot tell which filesystem"), "{err}");
        assert!(err.contains("store.allow_network_filesystem"), "{err}");
    }

    #[tokio::test]
    async fn each_swap_writes_the_mark_0600() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        rotate(&s, 0, 1).await;
        assert_eq!(mark(dir.path()).as_deref(), Some("1\n"));
        rotate(&s, 1, 3).await;
        assert_eq!(mark(dir.path()).as_deref(), Some("3\n"));
        let mode = fs::metadata(dir.path().join("crm.generation"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// A state file or generation mark that cannot be read is an error, never "nothing
    /// stored": an empty store would let a seed replace a live refresh token.
    #[tokio::test]
    async fn an_unreadable_state_or_mark_is_an_error_not_an_empty_store() {
        for unreadable in ["crm.json", "crm.generation"] {
            let dir = tempfile::tempdir().unwrap();
            let s = store(dir.path(), false);
            rotate(&s, 0, 1).await;
            // A directory where the file should be: reading it fails, even for root.
            let path = dir.path().join(unreadable);
            fs::remove_file(&path).unwrap();
            fs::create_dir(&path).unwrap();
            let loaded = s.load("crm").await;
            assert!(loaded.is_err(), "{unreadable} unreadable: {loaded:?}");
        }
    }

    #[tokio::test]
    async fn a_conflict_writes_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        rotate(&s, 0, 2).await;
        let outcome = s.compare_and_swap("crm", 1, &state(2, "x")).await.unwrap();
        assert_eq!(
            outcome,
            CasOutcome::Conflict {
                current_generation: 2
            }
        );
        assert_eq!(mark(dir.path()).as_deref(), Some("2\n"));
    }

    #[tokio::test]
    async fn a_missing_mark_is_accepted_and_written_at_the_next_swap() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        rotate(&s, 0, 3).await;
        fs::remove_file(dir.path().join("crm.generation")).unwrap();
        let loaded = s.load("crm").await.unwrap().unwrap();
        assert_eq!(loaded, state(3, "refresh-3"));
        assert_eq!(s.watch("crm").borrow().generation, 3);
        rotate(&s, 3, 4).await;
        assert_eq!(mark(dir.path()).as_deref(), Some("4\n"));
    }

    #[tokio::test]
    async fn a_corrupt_mark_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        rotate(&s, 0, 2).await;
        let path = dir.path().join("crm.generation");
        for garbage in [&b"two\n"[..], b"", b"\xff\xfe", b"-1"] {
            fs::write(&path, garbage).unwrap();
            let err = s.load("crm").await.unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains("not a generation number"), "{err}");
            let err = s
                .compare_and_swap("crm", 2, &state(3, "x"))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            let signal = s.watch("crm").borrow().clone();
            assert!(signal.error.is_some_and(|e| e.contains("crm.generation")));
        }
        assert_eq!(
            Codec::generation(&fs::read(dir.path().join("crm.json")).unwrap()).ok(),
            Some(2),
            "nothing written over an unreadable mark"
        );
    }

    async fn rolled_back_state_is_refused(encrypted: bool) {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), encrypted);
        restored_backup(&s, dir.path()).await;
        let loaded = s.load("crm").await.unwrap().unwrap();
        assert_eq!(loaded.generation, 5, "the mark's generation");
        assert_eq!(loaded.refresh_token, None);
        assert_eq!(loaded.access_token, None);
        assert_eq!(loaded.access_expires_at_ms, None);
        assert_eq!(
            (loaded.obtained_at_ms, loaded.updated_by.as_str()),
            (1, "test")
        );
        let why = loaded.reauthorization_required.clone().unwrap();
        assert!(
            why.contains(
                "stored state (generation 2) is older than the last one written (generation 5)"
            ),
            "{why}"
        );
        assert!(why.contains("tokenrelay seed --credential crm"), "{why}");
        assert!(!why.contains("refresh-2"), "never a token: {why}");
        assert!(!format!("{loaded:?}").contains("refresh-"));
        assert_eq!(s.watch("crm").borrow().generation, 5);
    }

    #[tokio::test]
    async fn a_rolled_back_state_file_is_refused_at_the_mark() {
        rolled_back_state_is_refused(false).await;
    }

    #[tokio::test]
    async fn a_rolled_back_encrypted_state_file_is_refused_at_the_mark() {
        rolled_back_state_is_refused(true).await;
    }

    #[tokio::test]
    async fn swaps_compare_against_the_effective_generation() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        restored_backup(&s, dir.path()).await;
        // The restored file's own generation is not the store's.
        let outcome = s.compare_and_swap("crm", 2, &state(3, "x")).await.unwrap();
        assert_eq!(
            outcome,
            CasOutcome::Conflict {
                current_generation: 5
            }
        );
        // What `seed`/`authorize` do: load, then swap on the loaded generation.
        let loaded = s.load("crm").await.unwrap().unwrap();
        rotate(&s, loaded.generation, loaded.generation + 1).await;
        assert_eq!(mark(dir.path()).as_deref(), Some("6\n"));
        assert_eq!(s.load("crm").await.unwrap().unwrap(), state(6, "refresh-6"));
    }

    #[tokio::test]
    async fn a_swap_must_raise_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        rotate(&s, 0, 2).await;
        let err = s.compare_and_swap("crm", 2, &state(2, "x")).await;
        assert!(err.is_err());
        assert_eq!(s.load("crm").await.unwrap().unwrap(), state(2, "refresh-2"));
    }

    #[tokio::test]
    async fn a_deleted_state_file_under_a_mark_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        rotate(&s, 0, 3).await;
        fs::remove_file(dir.path().join("crm.json")).unwrap();
        let loaded = s.load("crm").await.unwrap().unwrap();
        assert_eq!(loaded.generation, 3);
        assert_eq!(loaded.refresh_token, None);
        assert!(loaded
            .reauthorization_required
            .is_some_and(|w| w.contains("missing")));
        rotate(&s, 3, 4).await;
    }

    #[tokio::test]
    async fn nothing_stored_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        assert_eq!(s.load("crm").await.unwrap(), None);
        assert_eq!(s.watch("crm").borrow().generation, 0);
    }

    #[tokio::test]
    async fn the_watch_reports_the_effective_generation() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        rotate(&s, 0, 2).await;
        let backup = fs::read(dir.path().join("crm.json")).unwrap();
        let mut rx = s.watch("crm");
        rotate(&s, 2, 4).await;
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|sig| sig.generation == 4),
        )
        .await
        .unwrap()
        .unwrap();
        fs::write(dir.path().join("crm.json"), backup).unwrap();
        tokio::time::sleep(POLL * 4).await;
        assert_eq!(rx.borrow().generation, 4, "a restore does not look older");
        let loaded = s.load("crm").await.unwrap().unwrap();
        rotate(&s, loaded.generation, 5).await;
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|sig| sig.generation == 5),
        )
        .await
        .unwrap()
        .unwrap();
    }
}
