//! Durable, shared credential state (the store contract of DESIGN.md).
//!
//! Every backend implements [`Store`]: `load`, `compare_and_swap` on the generation,
//! a cluster-wide refresh `lease`, and `watch` for changes made by other processes.
//! Values are encoded (and optionally encrypted) by [`codec`] before they leave the process.

pub(crate) mod bundle;
pub(crate) mod codec;
pub(crate) mod crypto;
#[cfg(feature = "etcd")]
pub(crate) mod etcd;
pub(crate) mod file;
pub(crate) mod filesystem;
pub(crate) mod redis;
mod state;
mod watcher;

pub use state::{InDoubt, Moved, NewGrant, Rotation, StoredState};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

pub use crate::config::IssuedTo;
use crate::config::{StoreBackend, StoreConfig};
use codec::CodecError;

pub use crate::clock::now_ms;
pub use codec::Codec;
pub use redis::{Durability, RedisStore};

/// What a store watch reports: the last generation seen, and whether the store was
/// reachable at the last look.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreSignal {
    pub generation: u64,
    pub error: Option<String>,
}

impl StoreSignal {
    /// The signal for a read of the stored generation, or of why it failed.
    pub fn from_generation(read: Result<u64, impl std::fmt::Display>) -> Self {
        match read {
            Ok(generation) => StoreSignal {
                generation,
                error: None,
            },
            Err(e) => StoreSignal {
                generation: 0,
                error: Some(e.to_string()),
            },
        }
    }

    /// The signal for a read of the encoded state (absent = generation 0).
    pub fn from_state_bytes(read: Result<Option<&[u8]>, impl std::fmt::Display>) -> Self {
        match read {
            Ok(None) => StoreSignal::default(),
            Ok(Some(bytes)) => Self::from_generation(codec::Codec::generation(bytes)),
            Err(e) => Self::from_generation(Err(e)),
        }
    }
}

/// Result of a compare-and-swap.
#[derive(Debug, PartialEq)]
pub enum CasOutcome {
    /// Written durably.
    Swapped,
    /// The stored generation was not the expected one; nothing written.
    Conflict { current_generation: u64 },
}

/// Store failures. Messages name the credential and the operation, never a token.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {op} for credential {credential:?} failed: {message}")]
    Backend {
        op: &'static str,
        credential: String,
        message: String,
    },
    #[error("stored state of credential {credential:?} is unreadable: {message}")]
    Corrupt { credential: String, message: String },
    /// A Redis write reached the primary but fewer replicas than `store.wait_replicas`
    /// confirmed it: it does not count as written (a failover may lose it); the refresher
    /// retries it like any failed write.
    #[error(
        "store {op} for credential {credential:?} not confirmed by the replicas: \
         {acknowledged} of {required} replicas {what} within {wait_ms} ms \
         (store.wait_replicas: {required}); it may be on the primary only, so it does not \
         count as written (a refresher retries it)",
        wait_ms = redis::REPLICA_WAIT.as_millis()
    )]
    NotReplicated {
        op: &'static str,
        credential: String,
        acknowledged: u64,
        required: u32,
        /// What the replicas that count did (`acknowledged the write`, ...).
        what: &'static str,
    },
    /// The file store's directory is on a network or FUSE filesystem (see
    /// [`filesystem`]) and the config does not allow it.
    #[error(
        "{key} {path}: the directory is on {filesystem}, a network or FUSE filesystem, \
         where flock and rename are not reliable, so neither the refresh lease nor the \
         atomic write of the state file is guaranteed (two hosts could both refresh, and \
         spend the same refresh token); put the file store on a local filesystem, use the \
         redis or etcd store to share a credential between hosts, or set \
         store.allow_network_filesystem: true if this filesystem is known to honour both"
    )]
    NetworkFilesystem {
        /// The config key naming the directory (`store.path` or `store.mark_path`).
        key: &'static str,
        path: std::path::PathBuf,
        filesystem: &'static str,
    },
}

impl StoreError {
    /// A stored state that does not decode; `at` names where it was read.
    pub fn unreadable(credential: &str, at: impl std::fmt::Display, e: CodecError) -> Self {
        StoreError::Corrupt {
            credential: credential.to_string(),
            message: format!("{at}: {e}"),
        }
    }

    pub fn backend(op: &'static str, credential: &str, e: impl std::fmt::Display) -> Self {
        StoreError::Backend {
            op,
            credential: credential.to_string(),
            message: e.to_string(),
        }
    }
}

/// A held refresh lease. Dropping it releases it (best effort); prefer `release`.
#[async_trait]
pub trait Lease: Send + Sync {
    /// Extends the lease to the TTL it was taken with, counted from now, if this holder
    /// still has it (never shortening a longer hold from [`Lease::secure_for`]). False
    /// when that cannot be confirmed (it expired and was taken, or the store is
    /// unreachable). The refresher renews every third of the TTL while a refresh holds
    /// the lease.
    async fn renew(&self) -> bool;
    /// Makes the lease held for at least `needed` from now, past the TTL it was taken
    /// with when `needed` is longer, and confirms that with the store. A refresher calls
    /// this right before sending a refresh token, with the whole token request plus a
    /// margin, and never sends it when this is false: so the lease cannot run out under
    /// a request in flight even if every renewal after it fails.
    async fn secure_for(&self, needed: Duration) -> bool;
    /// Releases the lease so another process may refresh at once.
    async fn release(self: Box<Self>);
}

/// The store contract shared by the file, Redis and etcd backends.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name for logs, metrics and `/status` (`file`, `redis`, `etcd`).
    fn kind(&self) -> &'static str;
    /// What this store can and cannot tell about a restored older state (shown on
    /// `/status`, so that the limit is not hidden).
    fn rollback_detection(&self) -> &'static str {
        "a restored older state is refused by running instances that saw a newer one; \
         instances started after a restore of the whole store cannot tell (docs/replicas.md, Limits)"
    }
    /// Current state, or `None` if nothing was ever stored.
    async fn load(&self, name: &str) -> Result<Option<StoredState>, StoreError>;
    /// Writes `new` if the stored generation equals `expected` (0 = nothing stored).
    /// Atomic and durable when it returns `Swapped`. An error leaves it open whether `new`
    /// was written (an answer lost, or, with `store.wait_replicas`, a write the replicas
    /// did not confirm): the caller sends the same swap again, and a `Conflict` at `new`'s
    /// generation with `new` stored is its own earlier write.
    async fn compare_and_swap(
        &self,
        name: &str,
        expected: u64,
        new: &StoredState,
    ) -> Result<CasOutcome, StoreError>;
    /// Tries once to take the refresh lease for `ttl`; `None` if another holder has it.
    async fn try_lease(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<Box<dyn Lease>>, StoreError>;
    /// Notifies changes of the stored generation (pushed where the backend can, else
    /// polled at most every poll interval) and of the store's reachability.
    fn watch(&self, name: &str) -> watch::Receiver<StoreSignal>;
}

/// Builds the configured store.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    let codec = codec::Codec::new(config.encryption_key.as_ref())
        .map_err(|e| StoreError::backend("open", "*", e))?;
    match &config.backend {
        StoreBackend::File {
            path,
            mark_path,
            allow_network_filesystem,
        } => Ok(Arc::new(file::FileStore::open(
            path,
            mark_path.as_deref(),
            *allow_network_filesystem,
            codec,
            config.poll_interval.0,
        )?)),
        StoreBackend::Redis {
            url,
            key_prefix,
            wait_replicas,
        } => Ok(Arc::new(redis::RedisStore::open(
            url.expose(),
            key_prefix,
            *wait_replicas,
            codec,
            config.poll_interval.0,
        )?)),
        #[cfg(feature = "etcd")]
        StoreBackend::Etcd {
            endpoints,
            key_prefix,
            username,
            password,
            ca_file,
        } => Ok(Arc::new(etcd::EtcdStore::open(
            endpoints,
            key_prefix,
            username.as_deref(),
            password.as_ref(),
            ca_file.as_deref(),
            codec,
            config.poll_interval.0,
        )?)),
        #[cfg(not(feature = "etcd"))]
        StoreBackend::Etcd { .. } => Err(StoreError::backend(
            "open",
            "*",
            "store type etcd needs a build with the `etcd` cargo feature (cargo build --features etcd)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch of the Redis and etcd stores turns what it read into a signal: the
    /// stored generation, nothing stored as 0, a failed read as its error.
    #[test]
    fn a_read_of_the_state_becomes_its_signal() {
        let state = StoredState {
            generation: 7,
            ..StoredState::default()
        };
        let bytes = codec::Codec::new(None)
            .unwrap()
            .encode("crm", &state)
            .unwrap();
        let read = StoreSignal::from_state_bytes(Ok::<_, &str>(Some(&bytes)));
        assert_eq!((read.generation, read.error), (7, None));
        let none = StoreSignal::from_state_bytes(Ok::<_, &str>(None));
        assert_eq!((none.generation, none.error), (0, None));
        let failed = StoreSignal::from_state_bytes(Err("connection refused"));
        assert_eq!(failed.error.as_deref(), Some("connection refused"));
    }
}
