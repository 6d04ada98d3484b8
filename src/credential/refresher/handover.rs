//! Durable writes a refresher could not finish before it was stopped.
//!
//! A rotated state may hold the only live refresh token, so its write is never given
//! up. A refresher stopped by a reload while the store is down would otherwise hold the
//! reload (and with it every other change, and SIGTERM) until the store is back. It
//! hands the write over instead: the credential's next refresher (same name) writes it
//! before anything else, or, when the reload removed the credential, the instance
//! finishes it in the background; shutdown waits for every one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::error;

use crate::metrics::Metrics;
use crate::store::{CasOutcome, Store, StoreError, StoredState};

/// States waiting to be written, by credential name.
#[derive(Default)]
pub struct PendingWrites(Mutex<BTreeMap<String, StoredState>>);

impl PendingWrites {
    /// Leaves `state` for whoever writes credential `name` next.
    pub fn put(&self, name: &str, state: StoredState) {
        self.0.lock().unwrap().insert(name.to_string(), state);
    }

    /// The state left for credential `name`, if any; whoever takes it must write it.
    pub fn take(&self, name: &str) -> Option<StoredState> {
        self.0.lock().unwrap().remove(name)
    }

    /// Every state left, for credentials nobody runs any more (or at shutdown).
    pub fn take_all(&self) -> Vec<(String, StoredState)> {
        std::mem::take(&mut *self.0.lock().unwrap())
            .into_iter()
            .collect()
    }
}

/// One compare-and-swap of `new` over the generation before it.
pub enum WriteStep {
    /// The store holds `new` (now, or from an earlier attempt whose answer was lost).
    Kept,
    /// Another state was written meanwhile (a `seed` or `authorize`): it wins.
    Superseded { found: u64 },
    /// The store failed; try again later.
    Failed(StoreError),
}

pub async fn write_once(store: &dyn Store, name: &str, new: &StoredState) -> WriteStep {
    let expected = new.generation - 1;
    match store.compare_and_swap(name, expected, new).await {
        Ok(CasOutcome::Swapped) => WriteStep::Kept,
        Ok(CasOutcome::Conflict { current_generation })
            if current_generation == new.generation && holds(store, name, new).await =>
        {
            WriteStep::Kept
        }
        Ok(CasOutcome::Conflict { current_generation }) => WriteStep::Superseded {
            found: current_generation,
        },
        Err(e) => WriteStep::Failed(e),
    }
}

/// True if the store holds exactly `new` (same generation and refresh token).
async fn holds(store: &dyn Store, name: &str, new: &StoredState) -> bool {
    matches!(store.load(name).await,
        Ok(Some(s)) if s.generation == new.generation && s.refresh_token == new.refresh_token)
}

/// The wait before the next try of a failed write: doubling from 50 ms up to 2 s.
pub fn next_delay(previous: Option<Duration>) -> Duration {
    previous.map_or(Duration::from_millis(50), |d| {
        (d * 2).min(Duration::from_secs(2))
    })
}

/// Writes `state` of credential `name` until the store keeps it or another state
/// supersedes it, logging each retry: what the instance does with a write nobody else
/// will finish.
pub async fn finish(
    store: Arc<dyn Store>,
    name: String,
    state: StoredState,
    metrics: Arc<Metrics>,
) {
    let mut delay = None;
    loop {
        match write_once(store.as_ref(), &name, &state).await {
            WriteStep::Kept => {
                metrics.store_op("compare_and_swap", true);
                tracing::info!(credential = %name, generation = state.generation, "the rotated refresh token is stored");
                return;
            }
            WriteStep::Superseded { found } => {
                metrics.store_op("compare_and_swap", false);
                error!(credential = %name, expected = state.generation - 1, found, "stored state changed meanwhile (seed or authorize?); keeping the stored state");
                return;
            }
            WriteStep::Failed(e) => {
                metrics.store_op("compare_and_swap", false);
                let wait = next_delay(delay);
                error!(credential = %name, error = %e, retry_in = ?wait, "the rotated refresh token is not stored yet: waiting for the store (the process must not be killed now)");
                tokio::time::sleep(wait).await;
                delay = Some(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::store::codec::Codec;
    use crate::store::file::FileStore;

    fn rotated(generation: u64, refresh: &str) -> StoredState {
        StoredState {
            generation,
            refresh_token: Some(Secret::new(refresh)),
            ..Default::default()
        }
    }

    /// A write whose answer was lost is sent again: the store then holds it, and the
    /// second try must know it as its own, not as another writer's state.
    #[tokio::test]
    async fn a_write_sent_again_after_it_landed_is_kept_and_another_state_wins() {
        let dir = tempfile::tempdir().unwrap();
        let codec = Codec::new(None).unwrap();
        let store =
            FileStore::open(dir.path(), None, false, codec, Duration::from_secs(1)).unwrap();
        let ours = rotated(1, "ours");
        for attempt in ["first", "sent again"] {
            let step = write_once(&store, "crm", &ours).await;
            assert!(matches!(step, WriteStep::Kept), "{attempt} write not kept");
        }
        // The same generation with another refresh token is another writer's state.
        let theirs = rotated(1, "theirs");
        let step = write_once(&store, "crm", &theirs).await;
        assert!(
            matches!(step, WriteStep::Superseded { found: 1 }),
            "another writer's state of the same generation taken as ours"
        );
        // A later generation found stored supersedes too.
        write_once(&store, "crm", &rotated(2, "later")).await;
        let step = write_once(&store, "crm", &rotated(1, "ours")).await;
        assert!(matches!(step, WriteStep::Superseded { found: 2 }));
    }

    #[test]
    fn a_failed_write_is_retried_sooner_first_then_every_two_seconds() {
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let next = next_delay(d);
            seen.push(next.as_millis());
            d = Some(next);
        }
        assert_eq!(seen, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
    }
}
