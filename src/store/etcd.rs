//! The etcd v3 store (cargo feature `etcd`), for several replicas sharing one credential.
//!
//! - State: key `<prefix><name>` holding the encoded (optionally encrypted) state.
//!   Compare-and-swap reads the key, checks the generation inside it, and writes with a
//!   txn that compares the key's mod revision, so no write can slip in between. etcd
//!   acknowledges only after a majority has the write in its fsynced log.
//! - Lease: an etcd lease with a lock key `<prefix><name>/lease` created only if absent
//!   (`create_revision == 0`), kept alive while held; the key vanishes with the lease if
//!   the holder dies. "Held for N more" is judged from the last keep-alive answer.
//! - Watch: an etcd watch on the state key, plus a bounded poll as a safety net.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, PutOptions, TlsOptions, Txn, TxnOp,
};
use tokio::sync::{watch, Mutex};

use super::codec::Codec;
use super::{CasOutcome, Lease, Store, StoreError, StoreSignal, StoredState};
use crate::secret::Secret;

/// Bound on every etcd request, so an unreachable cluster looks down instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// etcd-backed store.
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    options: ConnectOptions,
    prefix: String,
    codec: Codec,
    poll: Duration,
    /// Connected lazily, so tokenrelay starts (degraded) while etcd is down.
    client: Mutex<Option<Client>>,
}

impl EtcdStore {
    /// Prepares a client for the endpoints (user/password and a CA file optional).
    pub fn open(
        endpoints: &[String],
        prefix: &str,
        username: Option<&str>,
        password: Option<&Secret>,
        ca_file: Option<&std::path::Path>,
        codec: Codec,
        poll: Duration,
    ) -> Result<EtcdStore, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let (Some(u), Some(p)) = (username, password) {
            options = options.with_user(u, p.expose());
        }
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| StoreError::backend("open", "*", format!("store.ca_file: {e}")))?;
            options =
                options.with_tls(TlsOptions::new().ca_certificate(Certificate::from_pem(pem)));
        }
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                endpoints: endpoints.to_vec(),
                options,
                prefix: prefix.to_string(),
                codec,
                poll,
                client: Mutex::new(None),
            }),
        })
    }
}

impl Inner {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn lease_key(&self, name: &str) -> String {
        format!("{}{name}/lease", self.prefix)
    }

    async fn client(&self, op: &'static str, name: &str) -> Result<Client, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(
            REQUEST_TIMEOUT * 2,
            Client::connect(&self.endpoints, Some(self.options.clone())),
        )
        .await
        .map_err(|_| StoreError::backend(op, name, "connecting to etcd timed out"))?
        .map_err(|e| StoreError::backend(op, name, e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Current value bytes and mod revision of the state key.
    async fn get(
        &self,
        op: &'static str,
        name: &str,
    ) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let mut c = self.client(op, name).await?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, c.get(self.key(name), None))
            .await
            .map_err(|_| StoreError::backend(op, name, "etcd request timed out"))?
            .map_err(|e| StoreError::backend(op, name, e))?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn signal(&self, name: &str) -> StoreSignal {
        match self.get("watch", name).await {
            Ok(None) => StoreSignal::default(),
            Ok(Some((bytes, _))) => match Codec::generation(&bytes) {
                Ok(generation) => StoreSignal {
                    generation,
                    error: None,
                },
                Err(e) => StoreSignal {
                    generation: 0,
                    error: Some(e),
                },
            },
            Err(e) => StoreSignal {
                generation: 0,
                error: Some(e.to_string()),
            },
        }
    }
}

struct EtcdLease {
    inner: Arc<Inner>,
    name: String,
    id: i64,
    /// Local bound of the lease's end, advanced by each keep-alive answer.
    held_until: Arc<StdMutex<Instant>>,
    keeper: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl Lease for EtcdLease {
    async fn is_held_for(&self, needed: Duration) -> bool {
        Instant::now() + needed < *self.held_until.lock().unwrap()
    }

    async fn release(self: Box<Self>) {
        self.keeper.abort();
        if let Ok(mut c) = self.inner.client("lease", &self.name).await {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, c.lease_revoke(self.id)).await;
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn load(&self, name: &str) -> Result<Option<StoredState>, StoreError> {
        let Some((bytes, _)) = self.inner.get("load", name).await? else {
            return Ok(None);
        };
        self.inner
            .codec
            .decode(name, &bytes)
            .map(Some)
            .map_err(|message| StoreError::Corrupt {
                credential: name.to_string(),
                message: format!("key {}: {message}", self.inner.key(name)),
            })
    }

    async fn compare_and_swap(
        &self,
        name: &str,
        expected: u64,
        new: &StoredState,
    ) -> Result<CasOutcome, StoreError> {
        let inner = &self.inner;
        let op = "compare_and_swap";
        let bytes = inner
            .codec
            .encode(name, new)
            .map_err(|e| StoreError::backend(op, name, e))?;
        let key = inner.key(name);
        let compare = match inner.get(op, name).await? {
            None if expected == 0 => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            None => {
                return Ok(CasOutcome::Conflict {
                    current_generation: 0,
                })
            }
            Some((current, revision)) => {
                let generation =
                    Codec::generation(&current).map_err(|message| StoreError::Corrupt {
                        credential: name.to_string(),
                        message,
                    })?;
                if generation != expected {
                    return Ok(CasOutcome::Conflict {
                        current_generation: generation,
                    });
                }
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
            }
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, bytes, None)]);
        let mut c = inner.client(op, name).await?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, c.txn(txn))
            .await
            .map_err(|_| StoreError::backend(op, name, "etcd request timed out"))?
            .map_err(|e| StoreError::backend(op, name, e))?;
        if resp.succeeded() {
            return Ok(CasOutcome::Swapped);
        }
        let current_generation = match inner.get(op, name).await? {
            Some((b, _)) => Codec::generation(&b).unwrap_or(0),
            None => 0,
        };
        Ok(CasOutcome::Conflict { current_generation })
    }

    async fn try_lease(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        let inner = &self.inner;
        let op = "lease";
        let mut c = inner.client(op, name).await?;
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let started = Instant::now();
        let grant = tokio::time::timeout(REQUEST_TIMEOUT, c.lease_grant(ttl_secs, None))
            .await
            .map_err(|_| StoreError::backend(op, name, "etcd request timed out"))?
            .map_err(|e| StoreError::backend(op, name, e))?;
        let id = grant.id();
        let lock = inner.lease_key(name);
        let txn = Txn::new()
            .when([Compare::create_revision(lock.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                lock,
                id.to_string(),
                Some(PutOptions::new().with_lease(id)),
            )]);
        let won = match tokio::time::timeout(REQUEST_TIMEOUT, c.txn(txn)).await {
            Ok(Ok(r)) => r.succeeded(),
            Ok(Err(e)) => {
                let _ = c.lease_revoke(id).await;
                return Err(StoreError::backend(op, name, e));
            }
            Err(_) => {
                let _ = c.lease_revoke(id).await;
                return Err(StoreError::backend(op, name, "etcd request timed out"));
            }
        };
        if !won {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, c.lease_revoke(id)).await;
            return Ok(None);
        }
        let held_until = Arc::new(StdMutex::new(
            started + Duration::from_secs(grant.ttl().max(0) as u64),
        ));
        let keeper = {
            let held_until = held_until.clone();
            let mut c = c.clone();
            tokio::spawn(async move {
                let Ok((mut keeper, mut stream)) = c.lease_keep_alive(id).await else {
                    return;
                };
                let every = Duration::from_secs((ttl_secs as u64 / 3).max(1));
                loop {
                    tokio::time::sleep(every).await;
                    let sent = Instant::now();
                    if keeper.keep_alive().await.is_err() {
                        return;
                    }
                    match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {
                            *held_until.lock().unwrap() =
                                sent + Duration::from_secs(r.ttl() as u64);
                        }
                        _ => return, // lost: held_until stops advancing and runs out
                    }
                }
            })
        };
        Ok(Some(Box::new(EtcdLease {
            inner: inner.clone(),
            name: name.to_string(),
            id,
            held_until,
            keeper,
        })))
    }

    fn watch(&self, name: &str) -> watch::Receiver<StoreSignal> {
        let (tx, rx) = watch::channel(StoreSignal::default());
        let inner = self.inner.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let publish = |signal: StoreSignal| {
                tx.send_if_modified(|s| {
                    let changed = *s != signal;
                    *s = signal;
                    changed
                })
            };
            let mut backoff = Duration::from_millis(200);
            loop {
                let stream = async {
                    let mut c = inner.client("watch", &name).await.ok()?;
                    tokio::time::timeout(REQUEST_TIMEOUT, c.watch(inner.key(&name), None))
                        .await
                        .ok()?
                        .ok()
                };
                let Some(mut stream) = stream.await else {
                    let signal = inner.signal(&name).await;
                    let failed = signal.error.is_some();
                    publish(signal);
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(if failed { backoff } else { inner.poll }).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                };
                backoff = Duration::from_millis(200);
                publish(inner.signal(&name).await);
                let mut tick = tokio::time::interval(inner.poll);
                loop {
                    tokio::select! {
                        m = stream.message() => {
                            if !matches!(m, Ok(Some(_))) {
                                break; // watch lost: re-establish
                            }
                            publish(inner.signal(&name).await);
                        }
                        _ = tick.tick() => {
                            let signal = inner.signal(&name).await;
                            let failed = signal.error.is_some();
                            publish(signal);
                            if failed {
                                break;
                            }
                        }
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        rx
    }
}
