//! Wiring of a running instance: store, credentials and their refreshers, upstream
//! listeners, the admin listener, and orderly shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::admin::Admin;
use crate::config::units::{ByteSize, HumanDuration};
use crate::config::{Config, Grant, Limits};
use crate::credential::refresher::Refresher;
use crate::credential::Credential;
use crate::metrics::Metrics;
use crate::proxy::Upstream;

/// Addresses actually bound (useful when the config asked for port 0).
#[derive(Debug, Clone)]
pub struct Bound {
    pub admin: SocketAddr,
    pub upstreams: BTreeMap<String, SocketAddr>,
}

/// Runs until `shutdown` resolves, then stops accepting, drains in-flight requests
/// (bounded by `runtime.shutdown_grace`) and lets any refresh in progress finish its
/// durable write. `on_bound` learns the bound addresses once listening.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    let metrics = Arc::new(Metrics::new());
    let needs_store = config
        .credentials
        .values()
        .any(|c| c.grant == Grant::RefreshToken);
    let store = if needs_store {
        Some(crate::store::open(&config.store).context("opening the store")?)
    } else {
        None
    };

    let mut credentials: BTreeMap<String, Arc<Credential>> = BTreeMap::new();
    let mut cred_configs = config.credentials;
    for (name, cfg) in std::mem::take(&mut cred_configs) {
        let mut formats: Vec<String> = config
            .upstreams
            .values()
            .filter(|u| u.credential == name)
            .map(|u| u.format.clone())
            .collect();
        formats.sort();
        formats.dedup();
        credentials.insert(
            name,
            Arc::new(Credential::new(Arc::new(cfg), formats, metrics.clone())),
        );
    }

    // Bind everything before starting work, so a busy port fails startup at once.
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", config.admin.listen))?;
    // Listener workers: the main runtime plus this many threads of their own.
    let extra_workers = config
        .runtime
        .worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
        - 1;
    let mut upstreams = Vec::new();
    let mut listeners = Vec::new();
    for (name, ucfg) in config.upstreams {
        let listener = TcpListener::bind(ucfg.listen).await.with_context(|| {
            format!("upstreams.{name}.listen: cannot listen on {}", ucfg.listen)
        })?;
        let cred = credentials[&ucfg.credential].clone();
        let up = Upstream::new(
            Arc::new(ucfg),
            listener.local_addr()?,
            cred,
            &metrics,
            config.log.access_log,
            extra_workers + 1,
        )
        .map_err(|e| anyhow::anyhow!("upstreams.{name}: {e}"))?;
        upstreams.push(Arc::new(up));
        listeners.push(listener);
    }
    let bound = Bound {
        admin: admin_listener.local_addr()?,
        upstreams: upstreams
            .iter()
            .zip(&listeners)
            .map(|(u, _)| (u.config.name.clone(), u.listen))
            .collect(),
    };

    let stop_accepting = CancellationToken::new();
    let stop_refreshing = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut refreshers = Vec::new();
    for cred in credentials.values() {
        let r = Refresher::new(
            cred.clone(),
            store.clone(),
            config.store.lease_ttl.map(|t| t.0),
            config.runtime.instance_id.clone(),
            metrics.clone(),
            stop_refreshing.clone(),
        )
        .map_err(|e| anyhow::anyhow!("credentials.{}: {e}", cred.name))?;
        let span = tracing::info_span!("refresher", credential = %cred.name);
        refreshers.push(tokio::spawn(r.run().instrument(span)));
    }

    let mut servers = Vec::new();
    let mut shared = Vec::new();
    for (up, listener) in upstreams.iter().cloned().zip(listeners) {
        info!(upstream = %up.config.name, listen = %listener.local_addr()?, url = %up.config.url, "listening");
        let socket = listener.into_std()?;
        let permits = Arc::new(Semaphore::new(up.config.limits.max_connections));
        shared.push(crate::workers::Listener {
            upstream: up.clone(),
            socket: socket.try_clone()?,
            permits: permits.clone(),
        });
        servers.push(tokio::spawn(crate::server::serve_upstream(
            TcpListener::from_std(socket)?,
            up,
            permits,
            stop_accepting.clone(),
            connections.clone(),
            0,
        )));
    }
    let workers =
        crate::workers::Workers::start(extra_workers, &shared, &stop_accepting, &connections)
            .context("starting listener worker threads")?;
    drop(shared);
    let admin = Arc::new(Admin {
        credentials: credentials.values().cloned().collect(),
        upstreams: upstreams.clone(),
        metrics: metrics.clone(),
        store_kind: store.as_ref().map(|s| s.kind()).unwrap_or("none"),
    });
    info!(listen = %bound.admin, "admin listening");
    let admin_limits = Limits {
        max_connections: 64,
        header_read_timeout: HumanDuration(Duration::from_secs(10)),
        idle_timeout: HumanDuration(Duration::from_secs(60)),
        max_header_size: ByteSize(16 * 1024),
    };
    let admin_handler = move |req: http::Request<hyper::body::Incoming>, _local| {
        let admin = admin.clone();
        async move { admin.handle(&req) }
    };
    let admin_stop = CancellationToken::new();
    let admin_connections = TaskTracker::new();
    let admin_task = tokio::spawn(crate::server::serve(
        admin_listener,
        admin_limits,
        admin_handler,
        admin_stop.clone(),
        admin_connections,
    ));
    on_bound(bound);

    shutdown.await;
    let grace = config.runtime.shutdown_grace.0;
    info!(grace = ?grace, "shutting down: no new connections, draining in-flight requests");
    stop_accepting.cancel();
    for s in servers {
        let _ = s.await;
    }
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        warn!("drain period over; closing remaining connections");
    }
    workers.stop().await;
    // Refreshers stop at their next idle point; one that is mid-refresh first finishes
    // its durable write.
    stop_refreshing.cancel();
    for r in refreshers {
        let _ = r.await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    info!("stopped");
    Ok(())
}
