//! Wiring of a running instance: the instance (credentials, refreshers, upstream
//! listeners), the admin listener, config reloads, and orderly shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::units::{ByteSize, HumanDuration};
use crate::config::{Config, ConfigError, Limits};
use crate::instance::admin::Admin;
use crate::instance::config_file::ConfigFile;
use crate::instance::record::ReloadError;
use crate::instance::record::{ConfigStatus, ReloadTrigger};
use crate::instance::reloads::{ReloadRequest, Reloads};
use crate::instance::Instance;
use crate::metrics::Metrics;

/// Addresses actually bound (useful when the config asked for port 0).
#[derive(Debug, Clone)]
pub struct Bound {
    pub admin: SocketAddr,
    pub upstreams: BTreeMap<String, SocketAddr>,
}

/// Turns the config file's text into a config, for a reload.
pub type Loader = Arc<dyn Fn(&str) -> Result<Config, ConfigError> + Send + Sync>;

/// How long a reload waits for the config file to be complete: two reads this far apart
/// must agree (the watcher waits one poll interval instead)...
const RELOAD_SETTLE: Duration = Duration::from_millis(300);
/// ... and a writer holding it open is waited for this long.
const RELOAD_MAX_WAIT: Duration = Duration::from_secs(5);

/// How an instance reloads its config; the default is never.
#[derive(Clone, Default)]
pub struct ReloadOptions {
    /// Parses the config file again; without it (or `path`) every reload request is
    /// refused.
    pub loader: Option<Loader>,
    /// The config file (shown in `/status`), read only when complete.
    pub path: Option<PathBuf>,
    /// Reload on `SIGHUP`.
    pub on_sighup: bool,
    /// Poll `path` and reload when its contents change (`--watch-config`).
    pub watch: Option<Duration>,
}

/// Runs `config` until `shutdown` resolves, without reloads.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    run_with(config, ReloadOptions::default(), shutdown, on_bound).await
}

/// Runs until `shutdown` resolves, applying reloads as `reloading` allows, then stops
/// accepting, drains in-flight requests (bounded by `runtime.shutdown_grace`) and lets
/// any refresh in progress finish its durable write. `on_bound` learns the bound
/// addresses once listening.
pub async fn run_with(
    mut config: Config,
    reloading: ReloadOptions,
    shutdown: impl Future<Output = ()>,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    // Endpoints named by an `issuer` come from its metadata; at start there is nothing
    // to fall back on, so a failure is a config error.
    crate::oauth::discovery::resolve(&mut config, &BTreeMap::new())
        .await
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let metrics = Arc::new(Metrics::new());
    // Bind the admin listener first, so a busy port fails startup before any work.
    let admin_listen = config.admin.listen;
    let admin_listener = TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {admin_listen}"))?;
    // Reload triggers come first: a SIGHUP during startup must not end the process.
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let stop_triggers = CancellationToken::new();
    let reloads = Reloads::new(reload_tx.clone(), stop_triggers.clone());
    if reloading.on_sighup {
        reloads
            .on_sighup()
            .context("installing the SIGHUP handler")?;
    }
    let notify_config = config.notify.clone();
    let mut instance = Instance::start(config, metrics.clone()).await?;
    let bound = Bound {
        admin: admin_listener.local_addr()?,
        upstreams: instance.upstream_addresses(),
    };
    let config_status = Arc::new(Mutex::new(ConfigStatus::new(reloading.path.clone())));
    let admin = Arc::new(Admin {
        view: instance.view(),
        metrics: metrics.clone(),
        store: Mutex::new(instance.store_info()),
        config: config_status.clone(),
        reloads: reload_tx,
    });
    let stop_notifier = CancellationToken::new();
    let notifier = super::notify::spawn(
        &notify_config,
        instance.view(),
        metrics.clone(),
        reloading.path.clone(),
        stop_notifier.clone(),
    )?;
    let file = reloading.path.as_deref().map(ConfigFile::open);
    if let (Some(every), Some(file)) = (reloading.watch, &file) {
        reloads.watch(file.clone(), every);
    }

    info!(listen = %bound.admin, "admin listening");
    let admin_task = serve_admin(admin_listener, admin.clone());
    on_bound(bound);

    tokio::pin!(shutdown);
    loop {
        let request = tokio::select! {
            () = &mut shutdown => break,
            r = reload_rx.recv() => match r { Some(r) => r, None => break },
        };
        let (Some(loader), Some(file)) = (&reloading.loader, &file) else {
            request.answer(Err(ReloadError::NoConfigFile));
            continue;
        };
        let outcome = reload(&mut instance, file, loader, request.trigger).await;
        metrics.config_reload(outcome.is_ok());
        config_status
            .lock()
            .unwrap()
            .record(request.trigger, &outcome);
        admin.set_store(instance.store_info());
        request.answer(outcome);
    }
    stop_triggers.cancel();
    stop_notifier.cancel();
    if let Some(n) = notifier {
        let _ = n.await;
    }
    instance.shutdown().await;
    admin_task.stop().await;
    info!("stopped");
    Ok(())
}

/// Reads the config file once it is complete and applies it; an incomplete or invalid
/// file changes nothing.
async fn reload(
    instance: &mut Instance,
    file: &ConfigFile,
    loader: &Loader,
    trigger: ReloadTrigger,
) -> Result<crate::instance::record::Applied, ReloadError> {
    info!(?trigger, "reloading the config");
    let outcome = match file.read_complete(RELOAD_SETTLE, RELOAD_MAX_WAIT).await {
        Err(e) => Err(ReloadError::Unreadable(e)),
        Ok(text) => match loader(&text) {
            Ok(mut config) => {
                let previous = instance.credential_configs();
                match crate::oauth::discovery::resolve(&mut config, &previous).await {
                    Ok(kept) => {
                        for k in kept {
                            warn!(credential = %k.credential, issuer = %k.issuer, error = %k.error, "discovery failed on reload; the credential keeps its previous endpoints");
                        }
                        instance.apply(config).await.map_err(ReloadError::from)
                    }
                    Err(e) => Err(ReloadError::Invalid(e)),
                }
            }
            Err(e) => Err(ReloadError::Invalid(e)),
        },
    };
    match &outcome {
        Ok(applied) => info!(
            changes = %applied.changes.summary(),
            restart_needed = ?applied.restart_needed,
            "config reloaded"
        ),
        Err(e) => error!(error = %e, "config reload failed; the running config is kept"),
    }
    outcome
}

/// The admin listener's task.
struct AdminTask {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminTask {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn serve_admin(listener: TcpListener, admin: Arc<Admin>) -> AdminTask {
    let limits = Limits {
        max_connections: 64,
        header_read_timeout: HumanDuration(Duration::from_secs(10)),
        idle_timeout: HumanDuration(Duration::from_secs(60)),
        max_header_size: ByteSize(16 * 1024),
    };
    let handler = move |req: http::Request<hyper::body::Incoming>, _local| {
        let admin = admin.clone();
        async move { admin.handle(req).await }
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(crate::server::serve(
        listener,
        limits,
        handler,
        stop.clone(),
        TaskTracker::new(),
    ));
    AdminTask { stop, task }
}
