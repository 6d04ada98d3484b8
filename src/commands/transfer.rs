//! `tokenrelay export` and `import`: moving a credential to another environment (a
//! handover: the source stops using it, so two environments never spend the same refresh
//! token) or backing it up (`export --copy`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::{Config, CredentialConfig, Grant};
use crate::store::bundle::{self, Contents, Key};
use crate::store::{now_ms, CasOutcome, IssuedTo, Moved, Store, StoredState};

/// How long `export` waits for a refresh in progress elsewhere to finish.
const LEASE_WAIT: Duration = Duration::from_secs(60);

pub struct ExportArgs {
    pub credential: String,
    pub out: PathBuf,
    pub passphrase_file: Option<PathBuf>,
    /// A backup: the source keeps using the credential.
    pub copy: bool,
    /// A name for the destination, shown by the source's `/status`.
    pub to: Option<String>,
}

pub struct ImportArgs {
    pub credential: String,
    pub input: PathBuf,
    pub passphrase_file: Option<PathBuf>,
    /// The credential the bundle was made for, when importing it under another name.
    pub from_credential: Option<String>,
    /// Import despite every [`Refusal`].
    pub force: bool,
}

/// Why `import` refuses a bundle unless `--force` (DESIGN.md, "Operator commands"):
/// each would put a refresh token where it is spent twice or sent to the wrong server.
/// Every message names the reason and the flag; none holds a token.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the bundle was made for credential {bundle:?}, not {expected:?}: give --from-credential {bundle} to import it as {target:?} (a refresh token in two credentials is spent twice)")]
    OtherCredential {
        target: String,
        expected: String,
        bundle: String,
    },
    #[error("the bundle is for token endpoint {} with client_id {:?}, but credentials.{target}.token_url/client_id say {} / {:?}: refusing to import tokens for another client (--force imports them anyway, for the same authorization server and client under another address)", .bundle.token_url, .bundle.client_id, .ours.token_url, .ours.client_id)]
    OtherTokenEndpoint {
        target: String,
        bundle: IssuedTo,
        ours: IssuedTo,
    },
    #[error("this bundle handed credential {credential:?} over from this very store: its refresh token belongs to the destination now (which may have spent it), and sending it from here would make the authorization server revoke the grant in both; to move the credential back, export it from the destination and import that bundle (--force imports this one anyway)")]
    BroughtBack { credential: String },
    #[error("the store holds generation {current} of credential {target:?}, newer than the bundle's {bundle}: its refresh token has most likely been spent since (--force imports it anyway, only if you know it was not)")]
    Older {
        target: String,
        current: u64,
        bundle: u64,
    },
}

/// What an import is checked against: the credential it goes into, here.
struct Target<'a> {
    name: &'a str,
    /// `--from-credential`: the bundle's credential name, for a deliberate rename.
    from_credential: Option<&'a str>,
    /// The config's token endpoint identity for the credential.
    identity: IssuedTo,
    /// Its stored state, moved or not.
    current: Option<&'a StoredState>,
    /// The stored state here of the credential the bundle was exported from (`current`
    /// when the names match): a moved marker there names the handovers that left.
    source: Option<&'a StoredState>,
}

/// The reasons to refuse `bundle` for `target`, the most fundamental first.
fn refusals(bundle: &Contents, target: &Target) -> Vec<Refusal> {
    let mut why = Vec::new();
    let expected = target.from_credential.unwrap_or(target.name);
    if bundle.credential != expected {
        why.push(Refusal::OtherCredential {
            target: target.name.to_string(),
            expected: expected.to_string(),
            bundle: bundle.credential.clone(),
        });
    }
    let theirs = IssuedTo {
        token_url: bundle.token_url.clone(),
        client_id: bundle.client_id.clone(),
    };
    if theirs != target.identity {
        why.push(Refusal::OtherTokenEndpoint {
            target: target.name.to_string(),
            bundle: theirs,
            ours: target.identity.clone(),
        });
    }
    let left_here = target
        .source
        .and_then(|s| s.moved.as_ref())
        .and_then(|m| m.handover_id.as_ref());
    if bundle.handover_id.is_some() && left_here == bundle.handover_id.as_ref() {
        why.push(Refusal::BroughtBack {
            credential: bundle.credential.clone(),
        });
    }
    // Generations only grow, across handovers too (an import stores past both), so an
    // older bundle holds a token spent since, even when the target has moved it on.
    let current = target.current.map_or(0, |s| s.generation);
    if bundle.state.generation < current {
        why.push(Refusal::Older {
            target: target.name.to_string(),
            current,
            bundle: bundle.state.generation,
        });
    }
    why
}

/// The first refusal as the error; with `--force`, none, and each printed as a warning.
fn enforce(refused: Vec<Refusal>, force: bool) -> Result<(), Refusal> {
    if force {
        for r in &refused {
            eprintln!("warning: --force: importing despite: {r}");
        }
        return Ok(());
    }
    refused.into_iter().next().map_or(Ok(()), Err)
}

fn refresh_credential<'a>(cfg: &'a Config, name: &str) -> anyhow::Result<&'a CredentialConfig> {
    let Some(c) = cfg.credentials.get(name) else {
        bail!("credential {name:?} is not in the config");
    };
    if c.grant != Grant::RefreshToken {
        bail!("credential {name:?} uses grant {:?}; only refresh_token credentials keep state to move", c.grant);
    }
    Ok(c)
}

/// The passphrase from `--passphrase-file`, else the store's key.
fn bundle_key(cfg: &Config, passphrase_file: Option<&Path>) -> anyhow::Result<Key> {
    match passphrase_file {
        Some(f) => {
            let p = crate::config::read_secret(f)?;
            Ok(Key::Passphrase(p))
        }
        None => match &cfg.store.encryption_key {
            Some(k) => Ok(Key::StoreKey(k.clone())),
            None => bail!("give --passphrase-file (or set store.encryption_key_file to seal the bundle with the store's key)"),
        },
    }
}

pub async fn export(cfg: Config, args: ExportArgs) -> anyhow::Result<()> {
    let c = refresh_credential(&cfg, &args.credential)?;
    let key = bundle_key(&cfg, args.passphrase_file.as_deref())?;
    if args.out.exists() {
        bail!("{} exists; choose a new file", args.out.display());
    }
    let store = crate::store::open(&cfg.store).context("opening the store")?;
    let name = &args.credential;
    // Under the lease no refresh is in flight: the exported token is the live one.
    let lease = wait_for_lease(store.as_ref(), name).await?;
    let result = async {
        let Some(state) = store.load(name).await? else {
            bail!("nothing is stored for credential {name:?}");
        };
        if let Some(m) = &state.moved {
            bail!("credential {name:?} was already moved to {}", m.to);
        }
        if let Some(why) = &state.reauthorization_required {
            bail!("credential {name:?} needs re-authorization ({why}); there is nothing live to export");
        }
        let ours = c.token_endpoint_identity();
        // In the bundle and in the marker left here: import recognises it coming back.
        let handover_id = (!args.copy).then(|| format!("{:032x}", rand::random::<u128>()));
        let contents = Contents {
            credential: name.clone(),
            token_url: ours.token_url,
            client_id: ours.client_id,
            exported_at_ms: now_ms(),
            exported_by: cfg.runtime.instance_id.clone(),
            copy: args.copy,
            handover_id: handover_id.clone(),
            state: state.clone(),
        };
        let sealed = bundle::seal(&contents, &key)?;
        let tmp = write_new_durably(&args.out, &sealed)?;
        if !args.copy {
            let moved = Moved {
                to: args.to.clone().unwrap_or_else(|| args.out.display().to_string()),
                at_ms: now_ms(),
                handover_id,
            };
            if let Err(e) = mark_moved(store.as_ref(), name, &state, moved, &cfg.runtime.instance_id).await {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        std::fs::rename(&tmp, &args.out).with_context(|| {
            format!("the bundle is complete at {} but could not be renamed", tmp.display())
        })?;
        sync_parent(&args.out)?;
        Ok(state.generation)
    }
    .await;
    lease.release().await;
    let generation = result?;
    if args.copy {
        println!("backed up credential {name:?} (generation {generation}) to {}; this environment keeps using it, so the backup's refresh token is spent at its next rotation", args.out.display());
    } else {
        println!("exported credential {name:?} (generation {generation}) to {}; every process using this store has stopped using it (/status: moved). Import it in the destination with: tokenrelay import --config F --credential {name} --in {}", args.out.display(), args.out.display());
    }
    Ok(())
}

pub async fn import(cfg: Config, args: ImportArgs) -> anyhow::Result<()> {
    let c = refresh_credential(&cfg, &args.credential)?;
    let key = bundle_key(&cfg, args.passphrase_file.as_deref())?;
    let bytes =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let contents = bundle::open(&bytes, &key)?;
    let store = crate::store::open(&cfg.store).context("opening the store")?;
    let name = &args.credential;
    let current = store.load(name).await?;
    // Renamed handover bundles are checked against their own credential's marker too.
    let renamed_source = match &contents.handover_id {
        Some(_) if contents.credential != *name => store.load(&contents.credential).await?,
        _ => None,
    };
    let ours = c.token_endpoint_identity();
    let target = Target {
        name,
        from_credential: args.from_credential.as_deref(),
        identity: ours.clone(),
        current: current.as_ref(),
        source: if contents.credential == *name {
            current.as_ref()
        } else {
            renamed_source.as_ref()
        },
    };
    enforce(refusals(&contents, &target), args.force)?;
    if contents.copy {
        eprintln!("note: this bundle is a backup (export --copy): if its source has refreshed since, its refresh token is spent, and the first refresh will be rejected (re-authorize then)");
    }
    let current_gen = current.as_ref().map_or(0, |s| s.generation);
    let by = format!("{} (import)", cfg.runtime.instance_id);
    // Checked above (or overridden by --force): the token is ours to send.
    let new = contents.state.imported(current_gen, ours, now_ms(), &by);
    match store.compare_and_swap(name, current_gen, &new).await? {
        CasOutcome::Swapped => {}
        CasOutcome::Conflict { current_generation } => bail!(
            "the stored state changed during the import (now generation {current_generation}); run it again"
        ),
    }
    let renamed = if contents.credential == *name {
        String::new()
    } else {
        format!(" (exported as {:?})", contents.credential)
    };
    println!(
        "imported credential {name:?}{renamed} from {} (exported by {}): stored as generation {}; running instances pick it up within seconds",
        args.input.display(),
        contents.exported_by,
        new.generation
    );
    Ok(())
}

async fn wait_for_lease(
    store: &dyn Store,
    name: &str,
) -> anyhow::Result<Box<dyn crate::store::Lease>> {
    let deadline = std::time::Instant::now() + LEASE_WAIT;
    loop {
        if let Some(lease) = store.try_lease(name, LEASE_WAIT).await? {
            return Ok(lease);
        }
        if std::time::Instant::now() >= deadline {
            bail!("a refresh of credential {name:?} held the store lease for over {LEASE_WAIT:?}; try again");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The handover marker over `state`: no tokens, where, when and which handover.
async fn mark_moved(
    store: &dyn Store,
    name: &str,
    state: &StoredState,
    moved: Moved,
    by: &str,
) -> anyhow::Result<()> {
    let marker = state.moved_to(moved, &format!("{by} (export)"));
    match store.compare_and_swap(name, state.generation, &marker).await? {
        CasOutcome::Swapped => Ok(()),
        CasOutcome::Conflict { current_generation } => bail!(
            "the stored state changed during the export (now generation {current_generation}); nothing was moved, run it again"
        ),
    }
}

fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes `bytes` to a new temporary file next to `out` (mode 0600, fsynced); returns it.
fn write_new_durably(out: &Path, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("bundle"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    sync_parent(&tmp)?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(client_id: &str) -> IssuedTo {
        IssuedTo {
            token_url: "https://auth.example/token".into(),
            client_id: client_id.into(),
        }
    }

    fn bundle(generation: u64) -> Contents {
        let id = identity("app");
        Contents {
            credential: "crm".into(),
            token_url: id.token_url,
            client_id: id.client_id,
            exported_at_ms: 1,
            exported_by: "source".into(),
            copy: false,
            handover_id: None,
            state: StoredState {
                generation,
                ..Default::default()
            },
        }
    }

    fn state(generation: u64, moved: bool) -> StoredState {
        StoredState {
            generation,
            moved: moved.then(|| Moved {
                to: "elsewhere".into(),
                at_ms: 1,
                handover_id: None,
            }),
            ..Default::default()
        }
    }

    fn target<'a>(name: &'a str, current: Option<&'a StoredState>) -> Target<'a> {
        Target {
            name,
            from_credential: None,
            identity: identity("app"),
            current,
            source: current,
        }
    }

    #[test]
    fn a_bundle_at_least_as_new_as_the_target_is_accepted() {
        assert_eq!(refusals(&bundle(4), &target("crm", None)), []);
        let moved = state(4, true);
        assert_eq!(refusals(&bundle(4), &target("crm", Some(&moved))), []);
        let live = state(3, false);
        assert_eq!(refusals(&bundle(4), &target("crm", Some(&live))), []);
    }

    #[test]
    fn an_older_bundle_is_refused_whether_the_target_is_live_or_moved() {
        for moved in [false, true] {
            let current = state(5, moved);
            let why = refusals(&bundle(4), &target("crm", Some(&current)));
            let older = Refusal::Older {
                target: "crm".into(),
                current: 5,
                bundle: 4,
            };
            assert_eq!(why, [older], "moved: {moved}");
        }
    }

    #[test]
    fn a_bundle_of_another_credential_needs_its_name_in_from_credential() {
        let other = |expected: &str| Refusal::OtherCredential {
            target: "b24".into(),
            expected: expected.into(),
            bundle: "crm".into(),
        };
        let mut t = target("b24", None);
        assert_eq!(refusals(&bundle(4), &t), [other("b24")]);
        t.from_credential = Some("erp");
        assert_eq!(refusals(&bundle(4), &t), [other("erp")]);
        t.from_credential = Some("crm");
        assert_eq!(refusals(&bundle(4), &t), []);
        let named = other("b24").to_string();
        assert!(named.contains("--from-credential crm"), "{named}");
    }

    /// The source store's marker after the handover of a bundle with id `h1`.
    fn left_with(id: Option<&str>) -> StoredState {
        let mut s = state(5, true);
        s.moved.as_mut().unwrap().handover_id = id.map(str::to_string);
        s
    }

    #[test]
    fn a_handover_bundle_is_refused_by_the_store_it_left() {
        let mut handover = bundle(4);
        handover.handover_id = Some("h1".into());
        let back = Refusal::BroughtBack {
            credential: "crm".into(),
        };
        let source = left_with(Some("h1"));
        let why = refusals(&handover, &target("crm", Some(&source)));
        assert_eq!(why[0], back, "{why:?}");
        // Under another name too: the bundle's own credential here left with it.
        let mut renamed = target("b24", None);
        renamed.from_credential = Some("crm");
        renamed.source = Some(&source);
        assert_eq!(refusals(&handover, &renamed), [back]);
        // Another handover's marker, or one written before ids were recorded: not this.
        for id in [Some("h2"), None] {
            let source = left_with(id);
            let mut t = target("b24", None);
            (t.from_credential, t.source) = (Some("crm"), Some(&source));
            assert_eq!(refusals(&handover, &t), [], "{id:?}");
        }
        // A backup (or a version 1 bundle) carries no id; a marker without one is no match.
        let (backup, source) = (bundle(4), left_with(None));
        let mut t = target("b24", None);
        (t.from_credential, t.source) = (Some("crm"), Some(&source));
        assert_eq!(refusals(&backup, &t), []);
    }

    #[test]
    fn every_refusal_names_its_flag() {
        let mut t = target("crm", None);
        t.identity = identity("other-app");
        let current = state(9, true);
        t.current = Some(&current);
        let why = refusals(&bundle(4), &t);
        assert_eq!(why.len(), 2, "{why:?}");
        for r in why {
            assert!(r.to_string().contains("--force"), "{r}");
        }
    }
}
