//! The running instance's credentials and upstream listeners, and how a config is
//! applied to them. Startup applies the first config to an empty instance; a reload
//! applies the next one the same way:
//!
//! 1. **Prepare** (may fail; nothing visible changes): build changed and new
//!    credentials with their refreshers, open the store if a credential now needs it,
//!    bind new listeners, build changed and new upstreams.
//! 2. **Commit** (cannot fail): stop the refreshers of changed and removed credentials,
//!    start the new ones, hand changed upstreams to their listeners (new connections
//!    get them; old ones end after their request in flight), serve new listeners, stop
//!    removed ones.
//!
//! An unchanged credential keeps its token and refresher: no token request. A changed
//! one starts a new refresher, which adopts what the store holds for it.
//!
//! - [`credentials`]: a credential with its refresher task;
//! - [`listeners`]: a listening socket and what it serves;
//! - [`record`]: what a reload did, for the log, `/status` and `tokenrelay reload`.

pub mod admin;
mod admin_actions;
pub mod config_file;
mod credentials;
pub mod grant;
mod listeners;
mod notify;
pub mod record;
pub mod reloads;
pub mod run;
pub mod status_page;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, CredentialConfig, Grant, UpstreamConfig};
use crate::credential::refresher::handover;
use crate::credential::Credential;
use crate::metrics::Metrics;
use crate::proxy::Upstream;
use crate::server::workers::Workers;
use credentials::{Context, Prepared, RunningCredential};
use listeners::{ListenerKey, RunningListener};
use record::{Applied, Changes};

/// What the admin endpoints report on; replaced whole by each applied config.
#[derive(Default)]
pub struct View {
    pub credentials: Vec<Arc<Credential>>,
    pub upstreams: Vec<Arc<Upstream>>,
    /// Where the status page's code form stores a new grant, and as whom.
    pub store: Option<Arc<dyn crate::store::Store>>,
    pub instance_id: String,
}

/// The running credentials and listeners.
pub struct Instance {
    /// The config the instance started with, without its credentials and upstreams:
    /// the restart-only settings stay as they were.
    base: Config,
    ctx: Context,
    credentials: BTreeMap<String, RunningCredential>,
    listeners: BTreeMap<ListenerKey, RunningListener>,
    workers: Workers<Upstream>,
    /// Every connection (and accept loop) of every worker, for the drain at shutdown.
    connections: TaskTracker,
    stop_accepting: CancellationToken,
    access_log: bool,
    shutdown_grace: Duration,
    view: Arc<ArcSwap<View>>,
    /// Writes handed over by refreshers a reload stopped and no new refresher takes.
    finishing: TaskTracker,
}

/// An upstream's part in a config being applied.
enum UpstreamStep {
    Keep(ListenerKey),
    Replace(ListenerKey, Arc<Upstream>),
    Add(ListenerKey, listeners::Bound, Arc<Upstream>),
}

/// Why a config could not be applied. Everything fallible happens before anything
/// changes, so nothing did.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("opening the store: {0}")]
    Store(#[source] crate::store::StoreError),
    #[error("credentials.{name}: {source}")]
    Credential {
        name: String,
        source: crate::oauth::TokenClientError,
    },
    #[error("upstreams.{name}.credential: no such credential")]
    NoCredential { name: String },
    #[error("upstreams.{name}: {source}")]
    Upstream {
        name: String,
        source: crate::proxy::UpstreamSetupError,
    },
    #[error(transparent)]
    Listen(#[from] listeners::BindError),
}

impl Instance {
    /// Starts the listener workers and applies `config`.
    pub async fn start(mut config: Config, metrics: Arc<Metrics>) -> anyhow::Result<Instance> {
        let connections = TaskTracker::new();
        // Listener workers: the main runtime plus this many threads of their own.
        let extra_workers = config
            .runtime
            .worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
            - 1;
        let workers = Workers::start(extra_workers, &connections)
            .map_err(|e| anyhow::anyhow!("starting listener worker threads: {e}"))?;
        let credentials = std::mem::take(&mut config.credentials);
        let upstreams = std::mem::take(&mut config.upstreams);
        let mut instance = Instance {
            ctx: Context {
                store: None,
                lease_ttl: config.store.lease_ttl.map(|t| t.0),
                instance_id: config.runtime.instance_id.clone(),
                metrics,
                stop_all: CancellationToken::new(),
                pending_writes: Default::default(),
            },
            finishing: TaskTracker::new(),
            access_log: config.log.access_log,
            shutdown_grace: config.runtime.shutdown_grace.0,
            base: config,
            credentials: BTreeMap::new(),
            listeners: BTreeMap::new(),
            workers,
            connections,
            stop_accepting: CancellationToken::new(),
            view: Arc::new(ArcSwap::from_pointee(View::default())),
        };
        let (access_log, grace) = (instance.access_log, instance.shutdown_grace);
        instance
            .apply_parts(credentials, upstreams, access_log, grace)
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(instance)
    }

    /// What the admin endpoints read.
    pub fn view(&self) -> Arc<ArcSwap<View>> {
        self.view.clone()
    }

    /// The store backend's name (or `none`) and what it can tell of a restore.
    pub fn store_info(&self) -> StoreInfo {
        match &self.ctx.store {
            None => StoreInfo::default(),
            Some(s) => StoreInfo {
                kind: s.kind(),
                rollback_detection: Some(s.rollback_detection()),
            },
        }
    }

    /// The running config of each credential, by name.
    pub fn credential_configs(&self) -> BTreeMap<String, Arc<CredentialConfig>> {
        self.credentials
            .iter()
            .map(|(name, r)| (name.clone(), r.credential.config.clone()))
            .collect()
    }

    /// Addresses the upstream listeners actually bound, by upstream name.
    pub fn upstream_addresses(&self) -> BTreeMap<String, SocketAddr> {
        self.listeners
            .values()
            .map(|l| {
                let up = l.upstream();
                (up.config.name.clone(), up.listen)
            })
            .collect()
    }

    /// Applies a reloaded config: everything in it is validated already; what can still
    /// fail (binding, building clients, opening the store) fails before anything
    /// changes. Restart-only settings keep their running values.
    pub async fn apply(&mut self, new: Config) -> Result<Applied, ApplyError> {
        let restart_needed = self.base.restart_only_changes(&new);
        let changes = self
            .apply_parts(
                new.credentials,
                new.upstreams,
                new.log.access_log,
                new.runtime.shutdown_grace.0,
            )
            .await?;
        for setting in &restart_needed {
            warn!(setting, "this setting changed in the file but applies only at restart; the running value is kept");
        }
        Ok(Applied {
            changes,
            restart_needed,
        })
    }

    async fn apply_parts(
        &mut self,
        new_credentials: BTreeMap<String, CredentialConfig>,
        new_upstreams: BTreeMap<String, UpstreamConfig>,
        access_log: bool,
        shutdown_grace: Duration,
    ) -> Result<Changes, ApplyError> {
        let mut changes = Changes::default();

        // 1. Prepare.
        let store = match &self.ctx.store {
            Some(s) => Some(s.clone()),
            None if new_credentials
                .values()
                .any(|c| c.grant == Grant::RefreshToken) =>
            {
                Some(crate::store::open(&self.base.store).map_err(ApplyError::Store)?)
            }
            None => None,
        };
        let ctx = Context {
            store,
            ..self.ctx.clone()
        };
        let mut kept: BTreeMap<String, Arc<Credential>> = BTreeMap::new();
        let mut fresh: BTreeMap<String, Prepared> = BTreeMap::new();
        for (name, cfg) in new_credentials {
            match self.credentials.get(&name) {
                Some(r) if r.credential.config.same_as(&cfg) => {
                    kept.insert(name, r.credential.clone());
                }
                old => {
                    if old.is_some() {
                        changes.credentials_changed.push(name.clone());
                    } else {
                        changes.credentials_added.push(name.clone());
                    }
                    // A stored refresh token belongs to the endpoint and client it was
                    // issued to; a changed one starts over rather than leak it.
                    let other_identity = old.is_some_and(|o| {
                        o.credential.config.token_endpoint_identity()
                            != cfg.token_endpoint_identity()
                    });
                    let cred = Arc::new(Credential::new(Arc::new(cfg), ctx.metrics.clone()));
                    if let Some(o) = old.filter(|o| {
                        !other_identity && o.credential.config.grant == cred.config.grant
                    }) {
                        cred.carry_over(&o.credential);
                    }
                    let mut p =
                        Prepared::new(cred, &ctx).map_err(|source| ApplyError::Credential {
                            name: name.clone(),
                            source,
                        })?;
                    if other_identity {
                        p = p.set_aside_stored_state();
                    }
                    fresh.insert(name, p);
                }
            }
        }
        changes.credentials_removed = self
            .credentials
            .keys()
            .filter(|n| !kept.contains_key(*n) && !fresh.contains_key(*n))
            .cloned()
            .collect();

        let mut steps = Vec::new();
        let mut claimed = std::collections::BTreeSet::new();
        for (name, cfg) in new_upstreams {
            let key = ListenerKey::of(&cfg);
            let cred = kept
                .get(&cfg.credential)
                .or_else(|| fresh.get(&cfg.credential).map(|p| &p.credential))
                .ok_or_else(|| ApplyError::NoCredential { name: name.clone() })?
                .clone();
            let build = |cfg, listen| {
                Upstream::new(
                    Arc::new(cfg),
                    listen,
                    cred.clone(),
                    &ctx.metrics,
                    access_log,
                    self.workers.count(),
                )
                .map(Arc::new)
                .map_err(|source| ApplyError::Upstream {
                    name: name.clone(),
                    source,
                })
            };
            claimed.insert(key.clone());
            match self.listeners.get(&key) {
                Some(l) => {
                    let current = l.upstream();
                    if current.config.same_as(&cfg)
                        && Arc::ptr_eq(&current.credential, &cred)
                        && self.access_log == access_log
                    {
                        steps.push(UpstreamStep::Keep(key));
                    } else {
                        if current.config.name == name {
                            changes.upstreams_changed.push(name.clone());
                        } else {
                            changes.upstreams_removed.push(current.config.name.clone());
                            changes.upstreams_added.push(name.clone());
                        }
                        let up = build(cfg, current.listen)?;
                        steps.push(UpstreamStep::Replace(key, up));
                    }
                }
                None => {
                    changes.upstreams_added.push(name.clone());
                    let bound = listeners::bind(&cfg, self.workers.count()).await?;
                    let up = build(cfg, bound.local)?;
                    steps.push(UpstreamStep::Add(key, bound, up));
                }
            }
        }
        for (key, l) in &self.listeners {
            if !claimed.contains(key) {
                changes
                    .upstreams_removed
                    .push(l.upstream().config.name.clone());
            }
        }

        // 2. Commit.
        self.ctx.store = ctx.store;
        let stopping: Vec<RunningCredential> = changes
            .credentials_changed
            .iter()
            .chain(&changes.credentials_removed)
            .filter_map(|n| self.credentials.remove(n))
            .collect();
        futures_util::future::join_all(stopping.into_iter().map(RunningCredential::stop)).await;
        for name in &changes.credentials_removed {
            self.ctx.metrics.forget_credential(name);
        }
        self.finish_orphaned_writes(&changes, &fresh);
        for (name, p) in fresh {
            self.credentials.insert(name, p.start());
        }
        let mut listeners = BTreeMap::new();
        for step in steps {
            match step {
                UpstreamStep::Keep(key) => {
                    let l = self.listeners.remove(&key).expect("kept listener exists");
                    listeners.insert(key, l);
                }
                UpstreamStep::Replace(key, up) => {
                    let l = self
                        .listeners
                        .remove(&key)
                        .expect("replaced listener exists");
                    l.replace(up);
                    listeners.insert(key, l);
                }
                UpstreamStep::Add(key, bound, up) => {
                    info!(upstream = %up.config.name, listen = %up.listen, url = %up.config.url, "listening");
                    let l = RunningListener::start(bound, up, &self.workers, &self.stop_accepting);
                    listeners.insert(key, l);
                }
            }
        }
        for (_, l) in std::mem::replace(&mut self.listeners, listeners) {
            info!(upstream = %l.upstream().config.name, "stopped listening; open connections end after their request in flight");
            l.stop();
        }
        self.access_log = access_log;
        self.shutdown_grace = shutdown_grace;
        self.view.store(Arc::new(View {
            credentials: self
                .credentials
                .values()
                .map(|r| r.credential.clone())
                .collect(),
            upstreams: self.listeners.values().map(|l| l.upstream()).collect(),
            store: self.ctx.store.clone(),
            instance_id: self.ctx.instance_id.clone(),
        }));
        Ok(changes)
    }

    /// Stops accepting, drains in-flight requests (bounded by `runtime.shutdown_grace`),
    /// then stops the refreshers; one that is mid-refresh first finishes its durable
    /// write.
    pub async fn shutdown(self) {
        let grace = self.shutdown_grace;
        info!(grace = ?grace, "shutting down: no new connections, draining in-flight requests");
        self.stop_accepting.cancel();
        self.connections.close();
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_err()
        {
            warn!("drain period over; closing remaining connections");
        }
        self.workers.stop().await;
        self.ctx.stop_all.cancel();
        futures_util::future::join_all(self.credentials.into_values().map(RunningCredential::stop))
            .await;
        // What the stopped refreshers handed over is written before the process ends.
        if let Some(store) = &self.ctx.store {
            for (name, state) in self.ctx.pending_writes.take_all() {
                self.finishing.spawn(handover::finish(
                    store.clone(),
                    name,
                    state,
                    self.ctx.metrics.clone(),
                ));
            }
        }
        self.finishing.close();
        self.finishing.wait().await;
    }

    /// A stopped refresher's pending write goes to the credential's new refresher when
    /// there is one of the same grant; else (removed, or no longer a refresh-token
    /// grant) it is finished in the background.
    fn finish_orphaned_writes(&self, changes: &Changes, fresh: &BTreeMap<String, Prepared>) {
        let Some(store) = &self.ctx.store else { return };
        for name in changes
            .credentials_changed
            .iter()
            .chain(&changes.credentials_removed)
        {
            let taken_over = fresh
                .get(name)
                .is_some_and(|p| p.credential.config.grant == Grant::RefreshToken);
            if taken_over {
                continue;
            }
            if let Some(state) = self.ctx.pending_writes.take(name) {
                warn!(credential = %name, generation = state.generation, "the rotated refresh token of a credential no longer refreshed is written in the background");
                self.finishing.spawn(handover::finish(
                    store.clone(),
                    name.clone(),
                    state,
                    self.ctx.metrics.clone(),
                ));
            }
        }
    }
}

/// The store as `/status` describes it.
#[derive(Clone, Copy, Debug)]
pub struct StoreInfo {
    pub kind: &'static str,
    pub rollback_detection: Option<&'static str>,
}

impl Default for StoreInfo {
    fn default() -> Self {
        StoreInfo {
            kind: "none",
            rollback_detection: None,
        }
    }
}
