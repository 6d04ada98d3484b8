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
    /// A refresh token obtained elsewhere.
    RefreshToken(&'a Path),
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
        Seed::RefreshToken(f) => (*f, "refresh token"),
        Seed::AccessToken(f, _) => (*f, "access token"),
    };
    let token = read_token(file, kind)?;
    let generation = match what {
        Seed::RefreshToken(_) => {
            store_new_grant(
                &cfg,
                credential,
                Some(token),
                None,
                None,
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
                None,
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

/// Writes a fresh grant (a refresh token, an access token with its expiry if known, or
/// both) as the next generation; used by `seed` and `authorize`. Returns the new
/// generation. `answer_fields` are the kept fields of the answer that brought it (none
/// for a seeded token: a new grant starts without the previous one's fields, and learns
/// them from its first token answer).
pub async fn store_new_grant(
    cfg: &Config,
    credential: &str,
    refresh_token: Option<Secret>,
    access: Option<(Secret, Option<u64>)>,
    refresh_expires_in: Option<std::time::Duration>,
    answer_fields: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<u64> {
    let store = crate::store::open(&cfg.store).context("opening the store")?;
    let by = format!("{} (seed)", cfg.runtime.instance_id);
    let grant = crate::instance::grant::Obtained {
        refresh_token,
        access,
        refresh_expires_in,
        answer_fields,
    };
    Ok(crate::instance::grant::store_grant(
        &*store,
        credential,
        cfg.credentials.get(credential),
        &by,
        grant,
    )
    .await?)
}
