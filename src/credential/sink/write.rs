//! Replacing a sink file so that a reader never sees a partial one: the content goes to
//! a temporary file in the same directory, which gets its mode and is synced, then is
//! renamed over the target; the directory is synced last, so the rename survives a crash.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::FileMode;

/// Why a sink file could not be replaced. Only paths and system errors: never content.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the directory {} does not exist", dir.display())]
    NoDirectory { dir: PathBuf },
    #[error("cannot create a temporary file in {}: {source}", dir.display())]
    Create { dir: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", temp.display())]
    Write { temp: PathBuf, source: io::Error },
    #[error("cannot set mode {mode} on {}: {source}", temp.display())]
    Mode {
        temp: PathBuf,
        mode: FileMode,
        source: io::Error,
    },
    #[error("cannot rename {} over {}: {source}", temp.display(), file.display())]
    Rename {
        temp: PathBuf,
        file: PathBuf,
        source: io::Error,
    },
    #[error("the file was replaced, but its directory {} could not be synced: {source}", dir.display())]
    SyncDirectory { dir: PathBuf, source: io::Error },
}

/// Distinguishes the temporary files of this process (two writers may replace one file
/// for a moment while a reload swaps a credential).
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// The directory and file name of a validated sink path (absolute, naming a file).
fn split(file: &Path) -> (&Path, String) {
    let dir = file.parent().unwrap_or(Path::new("/"));
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, name)
}

/// The prefix of `file`'s temporary files: hidden, and named after the file.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.tokenrelay-")
}

/// Replaces `file` with `content`, mode `mode`, atomically.
pub(crate) fn replace(file: &Path, mode: FileMode, content: &[u8]) -> Result<(), WriteError> {
    let (dir, name) = split(file);
    let temp = dir.join(format!(
        "{}{}-{}.tmp",
        temp_prefix(&name),
        std::process::id(),
        NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    // Owner-only until the content is complete; the configured mode comes before the
    // rename, so the file never appears with other permissions.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => WriteError::NoDirectory {
                dir: dir.to_path_buf(),
            },
            _ => WriteError::Create {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
    let written = fill(&mut f, &temp, mode, content).and_then(|()| {
        fs::rename(&temp, file).map_err(|source| WriteError::Rename {
            temp: temp.clone(),
            file: file.to_path_buf(),
            source,
        })
    });
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    sync_dir(dir)
}

/// Writes, sets the mode and syncs the temporary file.
fn fill(f: &mut File, temp: &Path, mode: FileMode, content: &[u8]) -> Result<(), WriteError> {
    let write = |source| WriteError::Write {
        temp: temp.to_path_buf(),
        source,
    };
    f.write_all(content).map_err(write)?;
    f.set_permissions(Permissions::from_mode(mode.0))
        .map_err(|source| WriteError::Mode {
            temp: temp.to_path_buf(),
            mode,
            source,
        })?;
    f.sync_all().map_err(write)
}

/// Syncs a directory, so a rename in it is durable; filesystems that cannot sync a
/// directory say so, and are left as they are.
fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    let synced = File::open(dir).and_then(|d| d.sync_all());
    match synced {
        Err(e)
            if !matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            Err(WriteError::SyncDirectory {
                dir: dir.to_path_buf(),
                source: e,
            })
        }
        _ => Ok(()),
    }
}

/// Removes temporary files of `file` that another process left (killed in the middle of
/// a write): they hold a token nobody will use. This process's own are left alone.
pub(crate) fn remove_leftovers(file: &Path) {
    let (dir, name) = split(file);
    let prefix = temp_prefix(&name);
    let ours = format!("{prefix}{}-", std::process::id());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        if entry_name.starts_with(&prefix)
            && entry_name.ends_with(".tmp")
            && !entry_name.starts_with(&ours)
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_file_is_replaced_with_its_mode_and_no_temporary_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("crm.json");
        replace(&file, FileMode(0o600), b"one\n").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"one\n");
        assert_eq!(mode_of(&file), 0o600);
        replace(&file, FileMode(0o640), b"two\n").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"two\n");
        assert_eq!(mode_of(&file), 0o640);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["crm.json"]);
    }

    #[test]
    fn a_missing_directory_or_a_directory_in_the_way_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent/crm.json");
        let e = replace(&missing, FileMode(0o600), b"secret-token").unwrap_err();
        assert!(matches!(e, WriteError::NoDirectory { .. }), "{e}");
        assert!(e.to_string().contains("absent"), "{e}");
        let in_the_way = dir.path().join("crm.json");
        fs::create_dir(&in_the_way).unwrap();
        let e = replace(&in_the_way, FileMode(0o600), b"secret-token").unwrap_err();
        assert!(matches!(e, WriteError::Rename { .. }), "{e}");
        assert!(!format!("{e} {e:?}").contains("secret-token"));
        // The temporary file went with the failure.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_of_other_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("crm.json");
        let theirs = dir.path().join(".crm.json.tokenrelay-1-0.tmp");
        let ours = dir
            .path()
            .join(format!(".crm.json.tokenrelay-{}-0.tmp", std::process::id()));
        let unrelated = dir.path().join(".other.tokenrelay-1-0.tmp");
        for f in [&theirs, &ours, &unrelated] {
            fs::write(f, "x").unwrap();
        }
        remove_leftovers(&file);
        assert!(!theirs.exists());
        assert!(ours.exists() && unrelated.exists());
    }
}
