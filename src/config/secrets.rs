//! Secrets and key files referenced by the config: read here (never logged), each error
//! naming the key and the file. A leaf: it knows nothing of the sections.

use std::path::{Path, PathBuf};

use super::Problems;
use crate::secret::Secret;

/// Reads a secret from a file, trimming one trailing newline as editors and `echo` add it.
pub(super) fn read_secret_file(p: &mut Problems, path: &str, file: &Path) -> Option<Secret> {
    read_secret(file).map_err(|e| p.add(path, e)).ok()
}

/// A static token file's content: [`read_secret`], then the token rule
/// ([`Secret::check_token`]); errors name the file, never the token.
pub fn read_static_token(file: &Path) -> Result<Secret, String> {
    let token = read_secret(file)?;
    token
        .check_token()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(token)
}

/// A secret file's content without its final line break; errors name the file.
pub fn read_secret(file: &Path) -> Result<Secret, String> {
    let s = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let v = s.strip_suffix('\n').unwrap_or(&s);
    let v = v.strip_suffix('\r').unwrap_or(v);
    if v.is_empty() {
        return Err(format!("{} is empty", file.display()));
    }
    Ok(Secret::new(v))
}

/// Exactly one of an inline secret or a `*_file`; `None` when neither is set.
pub(super) fn secret_from(
    p: &mut Problems,
    path: &str,
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Option<Secret> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            p.add(
                &format!("{path}.{key}"),
                format!("set either {key} or {key}_file, not both"),
            );
            None
        }
        (Some(v), None) if v.is_empty() => {
            p.add(&format!("{path}.{key}"), "is empty");
            None
        }
        (Some(v), None) => Some(Secret::new(v)),
        (None, Some(f)) => read_secret_file(p, &format!("{path}.{key}_file"), &f),
        (None, None) => None,
    }
}

pub(super) fn check_ca_file(p: &mut Problems, path: &str, file: &Option<PathBuf>) {
    if let Some(f) = file {
        if let Err(e) = crate::tls::read_ca_file(f) {
            p.add(path, e);
        }
    }
}
