//! `authorize --password`: one resource-owner password grant (RFC 6749 §4.3) whose
//! answer is stored like a code exchange's, so the credential runs on `refresh_token`
//! and the config holds no password. The password is read into a buffer wiped on drop
//! (from a no-echo terminal prompt, a file, or standard input), sent once, and written
//! nowhere: not to the store, a log, `/status` or an error message.
//!
//! (The copies made while encoding that one request belong to the HTTP client and are
//! freed, not wiped, when the command exits moments later.)

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::config::CredentialConfig;
use crate::oauth::{GrantRequest, TokenAnswer, TokenClient};

/// The shortest access-token lifetime kept from an answer that carries no
/// `refresh_token`: such a token is the whole grant until it expires, and a shorter one
/// would leave the credential dead within days, with the password gone.
pub const LONG_LIVED_MIN: Duration = Duration::from_secs(30 * 86400);

/// Where the username and password come from.
#[derive(Debug, Default)]
pub struct PasswordInput {
    /// `--username`; without it, a prompt on the terminal.
    pub username: Option<String>,
    /// `--password-file`: a file holding the password, or `-` for standard input;
    /// without it, a no-echo prompt on the terminal.
    pub password_file: Option<PathBuf>,
}

/// Why the password grant stored nothing. Messages never hold the password.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("no username given: pass --username (required with --password-file -, as standard input then holds the password)")]
    NoUsername,
    #[error("cannot read the username from standard input: {0}")]
    ReadUsername(#[source] std::io::Error),
    #[error("cannot read the password file {}: {source}", path.display())]
    ReadPasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prompt for the password without a terminal ({0}); pass --password-file FILE, or --password-file - to read it from standard input")]
    NoTerminal(#[source] std::io::Error),
    #[error("the password is empty")]
    EmptyPassword,
    #[error("the password is not UTF-8 text")]
    NotText,
    #[error("the username or password was not accepted ({0}); nothing was stored")]
    Rejected(String),
    #[error("the password grant failed ({0}); nothing was stored")]
    Failed(String),
    #[error("the token endpoint issued no refresh_token, and its access token {}; nothing was stored, as the credential could not be kept alive without the password. Ask the provider to issue refresh tokens to this client (often the offline_access scope), or use grant: password, which sends the configured password on every token request", lifetime.map(|l| format!("lives {} (less than the {} days a token must live to be kept on its own)", humantime::format_duration(l), LONG_LIVED_MIN.as_secs() / 86400)).unwrap_or_else(|| "states no lifetime (expires_in)".into()))]
    NoRefreshToken { lifetime: Option<Duration> },
}

/// Reads the credentials, exchanges them once, and returns an answer fit to store.
pub async fn exchange(
    client: &TokenClient,
    c: &CredentialConfig,
    input: PasswordInput,
) -> Result<TokenAnswer, PasswordError> {
    let from_stdin = input.password_file.as_deref() == Some(Path::new("-"));
    let username = match input.username {
        Some(u) if !u.is_empty() => u,
        Some(_) => return Err(PasswordError::NoUsername),
        None if from_stdin => return Err(PasswordError::NoUsername),
        None => prompt_username()?,
    };
    let password = match &input.password_file {
        Some(path) => read_password_file(path)?,
        None => {
            let host = c
                .token_url
                .as_ref()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            Zeroizing::new(
                rpassword::prompt_password(format!("Password for {username} at {host}: "))
                    .map_err(PasswordError::NoTerminal)?,
            )
        }
    };
    if password.is_empty() {
        return Err(PasswordError::EmptyPassword);
    }
    let answer = client
        .request(GrantRequest::ResourceOwner {
            username: &username,
            password: &password,
        })
        .await
        .map_err(|e| {
            // A server that echoes what it was sent must not put the password on screen.
            let said = scrub(&e.to_string(), &password);
            if e.is_invalid_grant() {
                PasswordError::Rejected(said)
            } else {
                PasswordError::Failed(said)
            }
        })?;
    if answer.refresh_token.is_none() {
        let access = match &answer.access {
            Ok(a) => a,
            Err(e) => return Err(PasswordError::Failed(scrub(&e.to_string(), &password))),
        };
        let lifetime = access.expires_in_stated.then_some(access.expires_in);
        if lifetime.is_none_or(|l| l < LONG_LIVED_MIN) {
            return Err(PasswordError::NoRefreshToken { lifetime });
        }
    }
    Ok(answer)
}

/// The username from a prompt on standard error, read from standard input.
fn prompt_username() -> Result<String, PasswordError> {
    eprint!("Username: ");
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(PasswordError::ReadUsername)?;
    let name = line.trim().to_string();
    if name.is_empty() {
        return Err(PasswordError::NoUsername);
    }
    Ok(name)
}

/// The password from a file or `-` (standard input): its text without one trailing line
/// break (spaces are kept: they may be part of it).
fn read_password_file(path: &Path) -> Result<Zeroizing<String>, PasswordError> {
    let read_error = |source| PasswordError::ReadPasswordFile {
        path: path.to_path_buf(),
        source,
    };
    // Reserved up front so that reading does not leave unwiped smaller buffers behind.
    let mut bytes = Zeroizing::new(Vec::with_capacity(4096));
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(read_error)?;
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| PasswordError::NotText)?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(text);
    Ok(Zeroizing::new(text.to_string()))
}

/// `text` with every occurrence of `secret` replaced.
fn scrub(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_string();
    }
    text.replace(secret, crate::secret::REDACTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One trailing line break goes; everything else, spaces included, stays.
    #[test]
    fn password_files_keep_their_text() {
        let dir = tempfile::tempdir().unwrap();
        for (content, expected) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            (" with spaces \n", " with spaces "),
            ("two\n\n", "two\n"),
            ("no-newline", "no-newline"),
        ] {
            let f = dir.path().join("pw");
            std::fs::write(&f, content).unwrap();
            assert_eq!(read_password_file(&f).unwrap().as_str(), expected);
        }
        let e = read_password_file(&dir.path().join("missing")).unwrap_err();
        assert!(
            e.to_string().contains("cannot read the password file"),
            "{e}"
        );
    }

    #[test]
    fn errors_never_carry_the_password() {
        assert_eq!(
            scrub("invalid_grant: bad password hunter2 for demo", "hunter2"),
            "invalid_grant: bad password <redacted> for demo"
        );
        let e = PasswordError::NoRefreshToken {
            lifetime: Some(Duration::from_secs(3600)),
        };
        assert!(
            e.to_string().contains("lives 1h (less than the 30 days"),
            "{e}"
        );
        let e = PasswordError::NoRefreshToken { lifetime: None };
        assert!(e.to_string().contains("states no lifetime"), "{e}");
    }
}
