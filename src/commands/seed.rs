//! `tokenrelay seed`: store an initial refresh token obtained elsewhere. Running
//! instances adopt it through the store's watch within seconds.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};

use crate::config::{Config, Grant};
use crate::secret::Secret;
use crate::store::{now_ms, CasOutcome, StoredState};

pub async fn run(cfg: Config, credential: &str, file: &Path) -> anyhow::Result<()> {
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
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the refresh token from standard input")?;
    } else {
        text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    let token = text.trim();
    if token.is_empty() {
        bail!("the refresh token is empty");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("the refresh token contains whitespace; the file must hold just the token");
    }
    let generation = store_new_grant(&cfg, credential, Secret::new(token), None).await?;
    println!("stored refresh token for credential {credential:?} (generation {generation}); running instances pick it up within seconds");
    Ok(())
}

/// Writes a fresh grant (refresh token, optionally an access token with its expiry) as
/// the next generation; used by `seed` and `authorize`. Returns the new generation.
pub async fn store_new_grant(
    cfg: &Config,
    credential: &str,
    refresh_token: Secret,
    access: Option<(Secret, u64)>,
) -> anyhow::Result<u64> {
    let store = crate::store::open(&cfg.store).context("opening the store")?;
    // A lost race with a running refresher is retried on the newer generation.
    for _ in 0..10 {
        let current = store.load(credential).await?;
        let expected = current.as_ref().map(|s| s.generation).unwrap_or(0);
        let now = now_ms();
        let state = StoredState {
            generation: expected + 1,
            access_expires_at_ms: access.as_ref().map(|a| a.1),
            access_token: access.as_ref().map(|a| a.0.clone()),
            refresh_token: Some(refresh_token.clone()),
            obtained_at_ms: now,
            updated_at_ms: now,
            updated_by: format!("{} (seed)", cfg.runtime.instance_id),
            reauthorization_required: None,
            ..Default::default()
        };
        match store.compare_and_swap(credential, expected, &state).await? {
            CasOutcome::Swapped => return Ok(state.generation),
            CasOutcome::Conflict { .. } => continue,
        }
    }
    bail!("the stored state kept changing; try again")
}
