//! Secrets and key files referenced by the config: read here (never logged), each error
//! naming the key and the file. A leaf: it knows nothing of the sections.

use std::path::{Path, PathBuf};

use super::Problems;
use crate::secret::{InvalidToken, Secret};

/// Reads a secret from a file, trimming one trailing newline as editors and `echo` add it.
pub(super) fn read_secret_file(p: &mut Problems, path: &str, file: &Path) -> Option<Secret> {
    read_secret(file).map_err(|e| p.add(path, e)).ok()
}

/// Why a secret file cannot be used (never showing its content).
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {}: {source}", file.display())]
    Unreadable {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is empty", file.display())]
    Empty { file: PathBuf },
    #[error("{}: {reason}", file.display())]
    NotAToken { file: PathBuf, reason: InvalidToken },
}

/// A static token file's content: [`read_secret`], then the token rule
/// ([`Secret::check_token`]); errors name the file, never the token.
pub fn read_static_token(file: &Path) -> Result<Secret, SecretFileError> {
    let token = read_secret(file)?;
    token
        .check_token()
        .map_err(|reason| SecretFileError::NotAToken {
            file: file.to_path_buf(),
            reason,
        })?;
    Ok(token)
}

/// A secret file's content without one final line break (`\n` or `\r\n`, as editors and
/// `echo` add it); errors name the file.
pub fn read_secret(file: &Path) -> Result<Secret, SecretFileError> {
    let s = std::fs::read_to_string(file).map_err(|source| SecretFileError::Unreadable {
        file: file.to_path_buf(),
        source,
    })?;
    let v = s
        .strip_suffix("\r\n")
        .or_else(|| s.strip_suffix('\n'))
        .unwrap_or(&s);
    if v.is_empty() {
        return Err(SecretFileError::Empty {
            file: file.to_path_buf(),
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The token read from a file holding `content`, or the error and the file's path.
    fn static_token(content: &str) -> Result<Secret, (SecretFileError, String)> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("api.token");
        std::fs::write(&file, content).unwrap();
        read_static_token(&file).map_err(|e| (e, file.display().to_string()))
    }

    #[test]
    fn one_trailing_line_break_is_trimmed_anything_else_is_refused() {
        for ok in ["tok", "tok\n", "tok\r\n"] {
            assert_eq!(static_token(ok).unwrap().expose(), "tok", "{ok:?}");
        }
        for bad in ["tok\n\n", "tok\r", "a\nb", "tok\t", "\n", ""] {
            let (e, file) = static_token(bad).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&file),
                "{bad:?}: the file is not named: {text}"
            );
            assert!(!text.contains("tok\t"), "{bad:?}: the value shows: {text}");
        }
        assert!(matches!(
            static_token("tok\r"),
            Err((
                SecretFileError::NotAToken {
                    reason: InvalidToken::LineBreak,
                    ..
                },
                _
            ))
        ));
    }
}
