//! `tokenrelay seed`: store an initial refresh token obtained elsewhere. Running
//! instances adopt it through the store's watch within seconds.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};

use crate::config::{Config, Grant};
use crate::secret::Secret;
use crate::store::now_ms;

/// What `seed` stores.
pub enum Seed<'a> {
    /// A refresh token obtained elsewhere, and when it was issued if known (Unix ms).
    RefreshToken(&'a Path, Option<u64>),
    /// A long-lived access token pasted from a provider's UI (YooMoney, amoCRM's
    /// long-lived tokens), with its lifetime when known. It is never refreshed.
    AccessToken(&'a Path, Option<std::time::Duration>),
}

pub async fn run(cfg: Config, credential: &str, what: Seed<'_>) -> anyhow::Result<()> {
    let Some(c) = cfg.credentials.get(credential) else {
        bail!(
            "credential {credential:?} is not in the config (known: {})",
            cfg.credentials
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if c.grant != Grant::RefreshToken {
        bail!(
            "credential {credential:?} uses grant {:?}; seed applies only to grant refresh_token",
            c.grant
        );
    }
    let (file, kind) = match &what {
        Seed::RefreshToken(f, _) => (*f, "refresh token"),
        Seed::AccessToken(f, _) => (*f, "access token"),
    };
    let token = read_token(file, kind)?;
    let generation = match what {
        Seed::RefreshToken(_, issued_at) => {
            let issued = match issued_at {
                Some(ms) => IssuedAt::At(ms),
                None => IssuedAt::Unknown,
            };
            store_new_grant(
                &cfg,
                credential,
                Some(token),
                None,
                (Default::default(), issued),
                Default::default(),
            )
            .await?
        }
        Seed::AccessToken(_, lifetime) => {
            let expires = lifetime.map(|l| now_ms() + l.as_millis() as u64);
            store_new_grant(
                &cfg,
                credential,
                None,
                Some((token, expires)),
                (Default::default(), IssuedAt::Now),
                Default::default(),
            )
            .await?
        }
    };
    println!("stored {kind} for credential {credential:?} (generation {generation}); running instances pick it up within seconds");
    Ok(())
}

/// A token from a file or `-` (standard input): one line, nothing else.
fn read_token(file: &Path, kind: &str) -> anyhow::Result<Secret> {
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("reading the {kind} from standard input"))?;
    } else {
        text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    let token = Secret::new(text.trim());
    if let Err(e) = token.check_token() {
        bail!("the {kind} is unusable: {e}; the file must hold just the token");
    }
    if token.expose().contains(' ') {
        bail!("the {kind} contains whitespace; the file must hold just the token");
    }
    Ok(token)
}

pub use crate::instance::grant::IssuedAt;

/// Why `--refresh-token-issued-at` is refused.
#[derive(Debug, thiserror::Error)]
pub enum IssuedAtError {
    #[error("not a time: {0:?} (write an RFC 3339 time like 2026-03-01T09:30:00Z, or a date like 2026-03-01)")]
    NotATime(String),
    #[error("{0} is in the future; give the time the provider issued the refresh token")]
    InTheFuture(String),
}

/// `--refresh-token-issued-at`: an RFC 3339 time, or a date (midnight UTC); never in
/// the future. Unix ms.
pub fn parse_issued_at(text: &str) -> Result<u64, IssuedAtError> {
    let t = text.trim();
    let full = if t.len() == 10 {
        format!("{t}T00:00:00Z")
    } else {
        t.to_string()
    };
    let at = humantime::parse_rfc3339_weak(&full)
        .map_err(|_| IssuedAtError::NotATime(text.to_string()))?;
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| IssuedAtError::NotATime(text.to_string()))?
        .as_millis() as u64;
    // A minute of clock skew between the provider's page and this host is allowed.
    if ms > now_ms() + 60_000 {
        return Err(IssuedAtError::InTheFuture(text.to_string()));
    }
    Ok(ms.min(now_ms()))
}

/// Writes a fresh grant (a refresh token, an access token with its expiry if known, or
/// both) as the next generation; used by `seed`, `authorize` and `demo`. `stated` is what
/// the answer said of the refresh token's life (nothing for a seeded one), and `issued`
/// when it was issued. `answer_fields` are the kept fields of the answer that brought it
/// (none for a seeded token: a new grant starts without the previous one's fields, and
/// learns them from its first token answer). Returns the new generation.
pub async fn store_new_grant(
    cfg: &Config,
    credential: &str,
    refresh_token: Option<Secret>,
    access: Option<(Secret, Option<u64>)>,
    (stated, issued): (crate::credential::policy::Lifetimes, IssuedAt),
    answer_fields: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<u64> {
    let grant = crate::instance::grant::Obtained {
        refresh_token,
        access,
        stated,
        issued,
        answer_fields,
    };
    store_obtained(cfg, credential, grant).await
}

/// Stores `grant` as the credential's next generation (see [`store_new_grant`]).
pub async fn store_obtained(
    cfg: &Config,
    credential: &str,
    grant: crate::instance::grant::Obtained,
) -> anyhow::Result<u64> {
    let store = crate::store::open(&cfg.store).context("opening the store")?;
    let by = format!("{} (seed)", cfg.runtime.instance_id);
    Ok(crate::instance::grant::store_grant(
        &*store,
        credential,
        cfg.credentials.get(credential),
        &by,
        grant,
    )
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_times_are_rfc3339_times_or_dates_in_the_past() {
        assert_eq!(parse_issued_at("2026-03-01").unwrap(), 1_772_323_200_000);
        assert_eq!(
            parse_issued_at("2026-03-01T09:30:00Z").unwrap(),
            1_772_323_200_000 + (9 * 3600 + 30 * 60) * 1000
        );
        assert_eq!(
            parse_issued_at("yesterday").unwrap_err().to_string(),
            "not a time: \"yesterday\" (write an RFC 3339 time like 2026-03-01T09:30:00Z, or a date like 2026-03-01)"
        );
        assert_eq!(
            parse_issued_at("2999-01-01").unwrap_err().to_string(),
            "2999-01-01 is in the future; give the time the provider issued the refresh token"
        );
    }
}
