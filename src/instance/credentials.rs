//! The running credentials: each with its refresher task and the token that stops it.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::credential::refresher::handover::PendingWrites;
use crate::credential::refresher::Refresher;
use crate::credential::Credential;
use crate::metrics::Metrics;
use crate::store::Store;

/// One credential and its refresher.
pub struct RunningCredential {
    pub credential: Arc<Credential>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A credential built but not started yet (a reload has not committed).
pub struct Prepared {
    pub credential: Arc<Credential>,
    refresher: Refresher,
    stop: CancellationToken,
}

/// What every refresher of the instance shares.
#[derive(Clone)]
pub struct Context {
    pub store: Option<Arc<dyn Store>>,
    pub lease_ttl: Option<Duration>,
    pub instance_id: String,
    pub metrics: Arc<Metrics>,
    /// Cancelled at shutdown; each refresher's own token is a child of it.
    pub stop_all: CancellationToken,
    /// Durable writes stopped refreshers could not finish, for their successors.
    pub pending_writes: Arc<PendingWrites>,
}

impl Prepared {
    /// Builds the credential and its refresher; nothing runs yet.
    pub fn new(
        credential: Arc<Credential>,
        ctx: &Context,
    ) -> Result<Prepared, crate::oauth::TokenClientError> {
        let stop = ctx.stop_all.child_token();
        let refresher = Refresher::new(
            credential.clone(),
            ctx.store.clone(),
            ctx.lease_ttl,
            ctx.instance_id.clone(),
            ctx.metrics.clone(),
            stop.clone(),
        )?
        .with_handover(ctx.pending_writes.clone());
        Ok(Prepared {
            credential,
            refresher,
            stop,
        })
    }

    /// The stored state belongs to another token endpoint identity: not used.
    pub fn set_aside_stored_state(mut self) -> Self {
        self.refresher = self.refresher.set_aside_stored_state();
        self
    }

    /// Starts the refresher.
    pub fn start(self) -> RunningCredential {
        let span = tracing::info_span!("refresher", credential = %self.credential.name);
        RunningCredential {
            credential: self.credential,
            stop: self.stop,
            task: tokio::spawn(self.refresher.run().instrument(span)),
        }
    }
}

impl RunningCredential {
    /// Stops the refresher at its next idle point (one in the middle of a refresh first
    /// finishes its durable write) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
