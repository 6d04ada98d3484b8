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
//! - Endpoints: the store talks to one endpoint at a time and moves on to the next when a
//!   request to it fails (as etcd's own Go client does). etcd-client's built-in balancing
//!   spreads requests over all endpoints without health checks, so a single dead member
//!   would fail a share of every request (etcdv3/etcd-client#39). Every request is safe to
//!   send again to the next endpoint: reads are, a lease granted twice just expires, and
//!   the two writes (state swap, lock key) recognise their own earlier success. While a
//!   new leader is being elected, a write sent to a follower can wait out the request
//!   timeout (3 s) before it goes to the next member.

use std::future::Future;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, PutOptions, TlsOptions, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use tokio::sync::{watch, Mutex};

use super::codec::Codec;
use super::watcher::{self, Notifications};
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
    /// The endpoint in use and its client, connected lazily, so tokenrelay starts
    /// (degraded) while etcd is down.
    conn: Mutex<Conn>,
}

struct Conn {
    /// Index into `endpoints` of the endpoint in use.
    endpoint: usize,
    client: Option<Client>,
    /// Bumped whenever the client in use is abandoned, so that concurrent failures of
    /// the same client move on only once.
    epoch: u64,
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
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // A member cut off from the others fails requests (and watches) instead of
            // serving stale data, so the store moves on to another endpoint.
            .with_require_leader(true);
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
                conn: Mutex::new(Conn {
                    endpoint: 0,
                    client: None,
                    epoch: 0,
                }),
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

    /// The client of the endpoint in use (connecting if needed) and its epoch.
    async fn client(&self, op: &'static str, name: &str) -> Result<(Client, u64), StoreError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.client.as_ref() {
            return Ok((c.clone(), conn.epoch));
        }
        let endpoint = &self.endpoints[conn.endpoint];
        let connected = tokio::time::timeout(
            REQUEST_TIMEOUT * 2,
            Client::connect([endpoint], Some(self.options.clone())),
        )
        .await;
        let message = match connected {
            Ok(Ok(c)) => {
                conn.client = Some(c.clone());
                return Ok((c, conn.epoch));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connecting to etcd timed out".to_string(),
        };
        // The epoch stays: it names the clients handed out, and a failed connect hands
        // out none, so no request can fail on this endpoint and move on a second time.
        conn.endpoint = (conn.endpoint + 1) % self.endpoints.len();
        Err(StoreError::backend(op, name, message))
    }

    /// Abandons the endpoint of `epoch` (if still in use) for the next one.
    async fn failed(&self, epoch: u64) {
        let mut conn = self.conn.lock().await;
        if conn.epoch == epoch {
            conn.client = None;
            conn.endpoint = (conn.endpoint + 1) % self.endpoints.len();
            conn.epoch += 1;
        }
    }

    /// Runs `request` against the endpoint in use, moving on to the next endpoint when that
    /// one fails (unreachable, timed out, without a leader), once around the list at most.
    /// Other errors (permission, not found, ...) are returned at once. `request` must be
    /// safe to send again.
    async fn request<T, F, Fut>(
        &self,
        op: &'static str,
        name: &str,
        mut request: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = None;
        for _ in 0..self.endpoints.len() {
            let (c, epoch) = match self.client(op, name).await {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, request(c)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if !endpoint_failure(&e) => {
                    return Err(StoreError::backend(op, name, e))
                }
                Ok(Err(e)) => last = Some(StoreError::backend(op, name, e)),
                Err(_) => last = Some(StoreError::backend(op, name, "etcd request timed out")),
            }
            self.failed(epoch).await;
        }
        Err(last.expect("at least one endpoint"))
    }

    /// Current value bytes and mod revision of the state key.
    async fn get(
        &self,
        op: &'static str,
        name: &str,
    ) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let key = self.key(name);
        let resp = self
            .request(op, name, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn signal(&self, name: &str) -> StoreSignal {
        let read = self.get("watch", name).await;
        StoreSignal::from_state_bytes(
            read.as_ref()
                .map(|kv| kv.as_ref().map(|(b, _)| b.as_slice())),
        )
    }
}

struct EtcdLease {
    inner: Arc<Inner>,
    name: String,
    /// The lock key's value: the id of the etcd lease it was first bound to.
    value: String,
    held: StdMutex<Held>,
}

/// The etcd lease the lock key is bound to now.
#[derive(Clone, Copy)]
struct Held {
    id: i64,
    ttl: Duration,
    /// Local bound of the lease's end, advanced by each keep-alive answer.
    until: Instant,
}

impl EtcdLease {
    fn current(&self) -> Held {
        *self.held.lock().unwrap()
    }

    fn held_for(&self, needed: Duration) -> bool {
        Instant::now() + needed < self.current().until
    }

    /// Binds the lock key to a new etcd lease of at least `ttl` (a keep-alive only
    /// restores the TTL a lease was granted with), if the key is still ours.
    async fn rebind(&self, ttl: Duration) -> bool {
        let (inner, name) = (&self.inner, self.name.as_str());
        let secs = ttl.as_secs_f64().ceil() as i64;
        let sent = Instant::now();
        let Ok(grant) = inner
            .request("lease", name, |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await
        else {
            return false;
        };
        let id = grant.id();
        let lock = inner.lease_key(name);
        let txn = Txn::new()
            .when([Compare::value(
                lock.clone(),
                CompareOp::Equal,
                self.value.clone(),
            )])
            .and_then([TxnOp::put(
                lock,
                self.value.clone(),
                Some(PutOptions::new().with_lease(id)),
            )]);
        // Repeating it is harmless: the same value is put with the same lease.
        let bound = inner
            .request("lease", name, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .is_ok_and(|r| r.succeeded());
        let revoke = |id: i64| async move {
            let _ = inner
                .request(
                    "lease",
                    name,
                    |mut c| async move { c.lease_revoke(id).await },
                )
                .await;
        };
        if !bound {
            // Not ours any more, or unknown: revoking the new lease also drops the key
            // if the put did land, so nothing of ours is left behind either way.
            revoke(id).await;
            return false;
        }
        let old = std::mem::replace(
            &mut *self.held.lock().unwrap(),
            Held {
                id,
                ttl: Duration::from_secs(grant.ttl().max(0) as u64),
                until: sent + Duration::from_secs(grant.ttl().max(0) as u64),
            },
        );
        // The key no longer depends on the old lease.
        revoke(old.id).await;
        true
    }
}

#[async_trait]
impl Lease for EtcdLease {
    async fn renew(&self) -> bool {
        let id = self.current().id;
        let sent = Instant::now();
        let answer = self
            .inner
            .request("lease", &self.name, |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        let mut held = self.held.lock().unwrap();
        if held.id != id {
            // Rebound meanwhile, which renewed it.
            return true;
        }
        match answer {
            Ok(Some(r)) if r.ttl() > 0 => {
                held.until = sent + Duration::from_secs(r.ttl() as u64);
                true
            }
            // Expired (TTL 0), or unreachable: `until` stops advancing and runs out.
            _ => false,
        }
    }

    async fn secure_for(&self, needed: Duration) -> bool {
        let ttl = self.current().ttl;
        // A renewal interval of slack, so that the check is not lost to the call's time.
        if needed + ttl / 3 <= ttl {
            self.renew().await && self.held_for(needed)
        } else {
            self.rebind(needed + ttl / 3).await && self.held_for(needed)
        }
    }

    async fn release(self: Box<Self>) {
        let id = self.current().id;
        // Revoking twice is harmless (the second finds no lease and fails, ignored).
        let _ = self
            .inner
            .request("lease", &self.name, |mut c| async move {
                c.lease_revoke(id).await
            })
            .await;
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
            .map_err(|e| StoreError::unreadable(name, format!("key {}", self.inner.key(name)), e))
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
                let generation = Codec::generation(&current).map_err(|e| StoreError::Corrupt {
                    credential: name.to_string(),
                    message: e.to_string(),
                })?;
                if generation != expected {
                    return Ok(CasOutcome::Conflict {
                        current_generation: generation,
                    });
                }
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
            }
        };
        // Else-branch: read the key, so a write of ours whose answer was lost (and that
        // was then sent again to another endpoint) is recognised as done.
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key.clone(), bytes.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = inner
            .request(op, name, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(CasOutcome::Swapped);
        }
        match txn_get_value(&resp) {
            Some(current) if current == bytes => Ok(CasOutcome::Swapped),
            Some(current) => Ok(CasOutcome::Conflict {
                current_generation: Codec::generation(&current).unwrap_or(0),
            }),
            None => Ok(CasOutcome::Conflict {
                current_generation: 0,
            }),
        }
    }

    async fn try_lease(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        let inner = &self.inner;
        let op = "lease";
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let started = Instant::now();
        let grant = inner
            .request(op, name, |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?;
        let id = grant.id();
        let lock = inner.lease_key(name);
        let value = id.to_string();
        // Else-branch: read the lock key, so that a txn of ours whose answer was lost (and
        // that was then sent again to another endpoint) is recognised as won.
        let txn = Txn::new()
            .when([Compare::create_revision(lock.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                lock.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(lock, None)]);
        let won = inner
            .request(op, name, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .map(|r| r.succeeded() || txn_get_value(&r).is_some_and(|v| v == value.as_bytes()));
        let revoke = || async {
            let _ = inner
                .request(op, name, |mut c| async move { c.lease_revoke(id).await })
                .await;
        };
        match won {
            Ok(true) => {}
            Ok(false) => {
                revoke().await;
                return Ok(None);
            }
            Err(e) => {
                revoke().await;
                return Err(e);
            }
        }
        let ttl = Duration::from_secs(grant.ttl().max(0) as u64);
        Ok(Some(Box::new(EtcdLease {
            inner: inner.clone(),
            name: name.to_string(),
            value,
            held: StdMutex::new(Held {
                id,
                ttl,
                until: started + ttl,
            }),
        })))
    }

    fn watch(&self, name: &str) -> watch::Receiver<StoreSignal> {
        let (sub_inner, look_inner) = (self.inner.clone(), self.inner.clone());
        let (sub_name, look_name) = (name.to_string(), name.to_string());
        watcher::spawn(
            self.inner.poll,
            move || {
                let (inner, name) = (sub_inner.clone(), sub_name.clone());
                async move {
                    let (mut c, epoch) = inner.client("watch", &name).await.ok()?;
                    match tokio::time::timeout(REQUEST_TIMEOUT, c.watch(inner.key(&name), None))
                        .await
                    {
                        Ok(Ok(stream)) => Some(Box::new(EtcdNotes {
                            stream,
                            inner,
                            epoch,
                        })
                            as Box<dyn Notifications>),
                        _ => {
                            inner.failed(epoch).await;
                            None
                        }
                    }
                }
            },
            move || {
                let (inner, name) = (look_inner.clone(), look_name.clone());
                async move { inner.signal(&name).await }
            },
        )
    }
}

/// Events of an etcd watch on the state key.
struct EtcdNotes {
    stream: etcd_client::WatchStream,
    inner: Arc<Inner>,
    epoch: u64,
}

#[async_trait]
impl Notifications for EtcdNotes {
    async fn next(&mut self) -> bool {
        if matches!(self.stream.message().await, Ok(Some(_))) {
            return true;
        }
        // Watch lost (member down or cut off): the next subscription uses the next endpoint.
        self.inner.failed(self.epoch).await;
        false
    }
}

/// The value read by a txn's (single) get operation, if the key existed.
fn txn_get_value(resp: &TxnResponse) -> Option<Vec<u8>> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    })
}

/// Whether `e` says the endpoint (not the request) is the problem: unreachable, timed
/// out, or a member without a leader. Matched on the standard gRPC status codes.
fn endpoint_failure(e: &etcd_client::Error) -> bool {
    const CANCELLED: i32 = 1;
    const UNKNOWN: i32 = 2;
    const DEADLINE_EXCEEDED: i32 = 4;
    const INTERNAL: i32 = 13;
    const UNAVAILABLE: i32 = 14;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            i32::from(status.code()),
            CANCELLED | UNKNOWN | DEADLINE_EXCEEDED | INTERNAL | UNAVAILABLE
        ),
        _ => false,
    }
}
