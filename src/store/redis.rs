//! The Redis store (Redis 6+ / Valkey), for several replicas sharing one credential.
//!
//! - State: a hash `<prefix><name>` with `generation` and `data` (the encoded, optionally
//!   encrypted state). Compare-and-swap is one Lua script: compare the generation, write,
//!   and publish the new generation on `<prefix><name>:changed`.
//! - Lease: `SET <prefix><name>:lease <random> NX PX <ttl>`, released by a
//!   compare-and-delete script; "still held for N" is checked with a compare-and-PTTL
//!   script right before a refresh token is sent.
//! - Watch: pub/sub on the change channel, plus a bounded poll as a safety net (and to
//!   notice the store coming back).
//!
//! Durability is the server's: with `appendonly yes` and `appendfsync always` a swap is on
//! disk before the script returns; with `everysec` up to a second of writes can be lost
//! by a Redis crash. The settings are read when the store first connects, and a risky or
//! unreadable one is logged once ([`durability`]).
//!
//! Replicas: with `store.wait_replicas: N` every write (the lease taken or extended, a
//! compare-and-swap, whatever its outcome) is followed, in the same request on the same
//! connection, by `WAIT N` and, where the server has it (Redis 7.2+, detected once),
//! `WAITAOF`; the write counts only once N replicas acknowledged it (and wrote it to their
//! append-only file), otherwise the operation fails with
//! [`StoreError::NotReplicated`], saying how many did, and the caller retries it.
//! See docs/replicas.md.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::{watch, Mutex, OnceCell};
use tracing::warn;

use super::codec::Codec;
use super::watcher::{self, Notifications};
use super::{CasOutcome, Lease, Store, StoreError, StoreSignal, StoredState};

pub mod durability;

pub use durability::Durability;

/// Compare-and-swap. On a conflict with ARGV[4] = 1 (replicas are waited for), the stored
/// generation is written again unchanged: that propagates to the replicas, so the WAIT
/// that follows on this connection covers the state this answer reports. Without it, a
/// swap sent again on a new connection after a first attempt whose WAIT fell short (the
/// lost-acknowledgement case) could be reported as done on the word of a WAIT that had
/// nothing to wait for: newer Redis versions count WAIT from the client's last propagated
/// write only (up to 7.0, from its last command of any kind).
const CAS_SCRIPT: &str = r#"
local stored = redis.call('HGET', KEYS[1], 'generation')
local current = tonumber(stored or '0')
if current ~= tonumber(ARGV[1]) then
  if stored and ARGV[4] == '1' then
    redis.call('HSET', KEYS[1], 'generation', stored)
  end
  return {0, current}
end
redis.call('HSET', KEYS[1], 'generation', ARGV[2], 'data', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return {1, tonumber(ARGV[2])}
"#;

const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// If we still hold the lease: makes it last at least ARGV[2] ms from now (never
/// shortening it) and returns the ms it has left; else -1.
const EXTEND_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  left = tonumber(ARGV[2])
end
return left
"#;

/// Bound on every Redis command, so a hung server looks like a down one.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// How long `WAIT` and `WAITAOF` each wait for the replicas. Both go in one request with
/// the write, so together they stay well under [`COMMAND_TIMEOUT`]; a replica slower than
/// this fails the operation, and the caller's retry waits again.
pub const REPLICA_WAIT: Duration = Duration::from_secs(1);

/// Redis-backed store.
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    codec: Codec,
    poll: Duration,
    /// Connected lazily, so tokenrelay starts (degraded) while Redis is down; the
    /// manager reconnects by itself afterwards.
    conn: Mutex<Option<ConnectionManager>>,
    /// `store.wait_replicas`: replicas that must acknowledge each write (0: none).
    wait_replicas: u32,
    /// Whether the server has `WAITAOF`, learnt at the first write that waits.
    aof_wait: OnceCell<AofWait>,
    /// Set once the persistence settings were read and judged (at the first connection).
    durability_checked: AtomicBool,
}

/// What `WAITAOF` can be asked of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AofWait {
    /// Before Redis 7.2 (or disabled): `WAIT` alone.
    Unsupported,
    /// `WAITAOF <local> N`: `local` is 1, or 0 when the server itself has no append-only
    /// file (WAITAOF refuses to wait for a local fsync then).
    Supported { local: u32 },
}

impl RedisStore {
    /// Prepares a client for `url` (`redis://` or `rediss://`, with user:password if any);
    /// each write waits for `wait_replicas` replicas (0: none).
    pub fn open(
        url: &str,
        prefix: &str,
        wait_replicas: u32,
        codec: Codec,
        poll: Duration,
    ) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::backend("open", "*", format!("invalid store.url: {}", describe(&e)))
        })?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                prefix: prefix.to_string(),
                codec,
                poll,
                conn: Mutex::new(None),
                wait_replicas,
                aof_wait: OnceCell::new(),
                durability_checked: AtomicBool::new(false),
            }),
        })
    }

    /// Reads the server's persistence settings now and judges them (what the store logs
    /// once when it first connects).
    pub async fn durability(&self) -> Result<Durability, StoreError> {
        let mut c = self.inner.conn("durability", "*").await?;
        Ok(Durability::read(&mut c).await)
    }
}

/// A Redis error as text, without echoing the URL (it may carry a password).
fn describe(e: &redis::RedisError) -> String {
    let s = e.to_string();
    if s.contains("redis://") || s.contains("rediss://") {
        format!("{:?}", e.kind())
    } else {
        s
    }
}

impl Inner {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn channel(&self, name: &str) -> String {
        format!("{}{name}:changed", self.prefix)
    }

    fn lease_key(&self, name: &str) -> String {
        format!("{}{name}:lease", self.prefix)
    }

    async fn conn(&self, op: &'static str, name: &str) -> Result<ConnectionManager, StoreError> {
        let mut cached = self.conn.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let c = tokio::time::timeout(
            COMMAND_TIMEOUT * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError::backend(op, name, "connecting to Redis timed out"))?
        .map_err(|e| StoreError::backend(op, name, describe(&e)))?;
        *cached = Some(c.clone());
        drop(cached);
        if !self.durability_checked.swap(true, Ordering::Relaxed) {
            let mut probe = c.clone();
            if let Some(warning) = Durability::read(&mut probe).await.warning() {
                warn!("{warning}");
            }
        }
        Ok(c)
    }

    /// What `WAITAOF` can be asked of the server, found out at the first call by asking
    /// for the local fsync alone: an unknown command means Redis before 7.2; a refusal
    /// because the server has no append-only file means waiting for the replicas only.
    async fn aof_wait(&self, op: &'static str, name: &str) -> Result<AofWait, StoreError> {
        self.aof_wait
            .get_or_try_init(|| async {
                let mut c = self.conn(op, name).await?;
                let probe: Result<redis::Value, _> = redis::cmd("WAITAOF")
                    .arg(1)
                    .arg(0)
                    .arg(REPLICA_WAIT.as_millis() as u64)
                    .query_async(&mut c)
                    .await;
                match probe {
                    Ok(_) => Ok(AofWait::Supported { local: 1 }),
                    Err(e) => {
                        let text = e.to_string().to_ascii_lowercase();
                        if text.contains("unknown command") {
                            Ok(AofWait::Unsupported)
                        } else if text.contains("appendonly") {
                            Ok(AofWait::Supported { local: 0 })
                        } else {
                            Err(StoreError::backend(op, name, describe(&e)))
                        }
                    }
                }
            })
            .await
            .copied()
    }

    /// Sends `write` and, with `store.wait_replicas` set, `WAIT` (and `WAITAOF`) behind it
    /// in the same request: one connection, so they wait for this very write (both count
    /// the replicas that have everything the connection wrote so far). The write's answer,
    /// or [`StoreError::NotReplicated`] if fewer replicas than required acknowledged it.
    async fn write<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        name: &str,
        write: redis::Cmd,
    ) -> Result<T, StoreError> {
        let fail = |e: redis::RedisError| StoreError::backend(op, name, describe(&e));
        let required = self.wait_replicas;
        if required == 0 {
            let mut c = self.conn(op, name).await?;
            return write.query_async(&mut c).await.map_err(fail);
        }
        let aof = self.aof_wait(op, name).await?;
        let wait_ms = REPLICA_WAIT.as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.add_command(write)
            .cmd("WAIT")
            .arg(required)
            .arg(wait_ms);
        if let AofWait::Supported { local } = aof {
            pipe.cmd("WAITAOF").arg(local).arg(required).arg(wait_ms);
        }
        let mut c = self.conn(op, name).await?;
        let mut answers: Vec<redis::Value> = pipe.query_async(&mut c).await.map_err(fail)?;
        let parse = |e: redis::ParsingError| {
            StoreError::backend(op, name, format!("unexpected answer from Redis: {e}"))
        };
        let aof_acks: Option<(u64, u64)> = match aof {
            AofWait::Supported { .. } => Some(
                redis::from_redis_value(answers.pop().unwrap_or(redis::Value::Nil))
                    .map_err(parse)?,
            ),
            AofWait::Unsupported => None,
        };
        let acked: u64 =
            redis::from_redis_value(answers.pop().unwrap_or(redis::Value::Nil)).map_err(parse)?;
        let answer: T =
            redis::from_redis_value(answers.pop().unwrap_or(redis::Value::Nil)).map_err(parse)?;
        match short_of(required, aof, acked, aof_acks) {
            None => Ok(answer),
            Some((acknowledged, what)) => Err(StoreError::NotReplicated {
                op,
                credential: name.to_string(),
                acknowledged,
                required,
                what: what.describe(),
            }),
        }
    }

    async fn generation(&self, name: &str) -> Result<u64, StoreError> {
        let mut c = self.conn("watch", name).await?;
        let g: Option<u64> = redis::cmd("HGET")
            .arg(self.key(name))
            .arg("generation")
            .query_async(&mut c)
            .await
            .map_err(|e| StoreError::backend("watch", name, describe(&e)))?;
        Ok(g.unwrap_or(0))
    }
}

fn err<'a>(op: &'static str, name: &'a str) -> impl Fn(redis::RedisError) -> StoreError + 'a {
    move |e| StoreError::backend(op, name, describe(&e))
}

/// Which acknowledgement of a write fell short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplicaAck {
    /// `WAIT`: replicas that received it.
    Received,
    /// `WAITAOF`: replicas that wrote it to their append-only file.
    Fsynced,
    /// `WAITAOF`: the primary did not fsync it to its own append-only file.
    LocalFsync,
}

impl ReplicaAck {
    fn describe(self) -> &'static str {
        match self {
            ReplicaAck::Received => "acknowledged the write",
            ReplicaAck::Fsynced => {
                "wrote it to their append-only file (replicas need appendonly yes for that)"
            }
            ReplicaAck::LocalFsync => {
                "wrote it to their append-only file, and the primary did not fsync it to its own"
            }
        }
    }
}

/// Which acknowledgement fell short, and how many replicas gave it, from the answers of
/// `WAIT` (`acked`) and `WAITAOF` (`aof_acks`: local fsyncs, replica fsyncs); `None` when
/// `required` replicas (and the primary, where asked) confirmed the write.
fn short_of(
    required: u32,
    aof: AofWait,
    acked: u64,
    aof_acks: Option<(u64, u64)>,
) -> Option<(u64, ReplicaAck)> {
    let required = u64::from(required);
    if acked < required {
        return Some((acked, ReplicaAck::Received));
    }
    match (aof, aof_acks) {
        (AofWait::Unsupported, _) => None,
        (AofWait::Supported { .. }, None) => Some((0, ReplicaAck::Fsynced)),
        (AofWait::Supported { local }, Some((local_acked, aof_acked))) => {
            if local_acked < u64::from(local) {
                Some((aof_acked, ReplicaAck::LocalFsync))
            } else if aof_acked < required {
                Some((aof_acked, ReplicaAck::Fsynced))
            } else {
                None
            }
        }
    }
}

/// An `EVAL` of `script` (sent whole, so it can go in a pipeline without a NOSCRIPT retry).
fn eval(script: &str, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for k in keys {
        cmd.arg(*k);
    }
    cmd
}

struct RedisLease {
    inner: Arc<Inner>,
    key: String,
    token: String,
    ttl: Duration,
}

impl RedisLease {
    /// Runs [`EXTEND_SCRIPT`] for `at_least`; the time the lease is certainly held from
    /// now on, or `None` if it is not ours (or the store did not answer).
    async fn extend(&self, at_least: Duration) -> Option<Duration> {
        let sent = Instant::now();
        let mut extend = eval(EXTEND_SCRIPT, &[&self.key]);
        extend.arg(&self.token).arg(at_least.as_millis() as u64);
        let left: i64 = match self.inner.write("lease", &self.key, extend).await {
            Ok(left) => left,
            Err(e) => {
                if matches!(e, StoreError::NotReplicated { .. }) {
                    warn!(error = %e, "lease extension not confirmed by the replicas");
                }
                return None;
            }
        };
        let left = Duration::from_millis(u64::try_from(left).ok().filter(|ms| *ms > 0)?);
        // Counted from before the call was sent: a lower bound of the lease's end.
        Some((sent + left).saturating_duration_since(Instant::now()))
    }
}

#[async_trait]
impl Lease for RedisLease {
    async fn renew(&self) -> bool {
        self.extend(self.ttl).await.is_some()
    }

    async fn secure_for(&self, needed: Duration) -> bool {
        // Extended to a renewal interval beyond what is needed, so that the check below
        // is not lost to the time the call took.
        self.extend(needed + self.ttl / 3)
            .await
            .is_some_and(|left| left > needed)
    }

    async fn release(self: Box<Self>) {
        if let Ok(mut c) = self.inner.conn("lease", &self.key).await {
            let _: Result<i64, _> = Script::new(RELEASE_SCRIPT)
                .key(&self.key)
                .arg(&self.token)
                .invoke_async(&mut c)
                .await;
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn load(&self, name: &str) -> Result<Option<StoredState>, StoreError> {
        let inner = &self.inner;
        let mut c = inner.conn("load", name).await?;
        let data: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(inner.key(name))
            .arg("data")
            .query_async(&mut c)
            .await
            .map_err(err("load", name))?;
        match data {
            None => Ok(None),
            Some(bytes) => {
                inner.codec.decode(name, &bytes).map(Some).map_err(|e| {
                    StoreError::unreadable(name, format!("key {}", inner.key(name)), e)
                })
            }
        }
    }

    async fn compare_and_swap(
        &self,
        name: &str,
        expected: u64,
        new: &StoredState,
    ) -> Result<CasOutcome, StoreError> {
        let inner = &self.inner;
        let bytes = inner
            .codec
            .encode(name, new)
            .map_err(|e| StoreError::backend("compare_and_swap", name, e))?;
        let mut cas = eval(CAS_SCRIPT, &[&inner.key(name), &inner.channel(name)]);
        cas.arg(expected)
            .arg(new.generation)
            .arg(bytes)
            .arg(u8::from(inner.wait_replicas > 0));
        let (ok, current): (i64, u64) = inner.write("compare_and_swap", name, cas).await?;
        Ok(if ok == 1 {
            CasOutcome::Swapped
        } else {
            CasOutcome::Conflict {
                current_generation: current,
            }
        })
    }

    async fn try_lease(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        let inner = &self.inner;
        let token = format!("{:032x}", rand::random::<u128>());
        let mut set = redis::cmd("SET");
        set.arg(inner.lease_key(name))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        let lease = RedisLease {
            inner: inner.clone(),
            key: inner.lease_key(name),
            token,
            ttl,
        };
        match inner.write::<Option<String>>("lease", name, set).await {
            Ok(set) => Ok(set.map(|_| Box::new(lease) as Box<dyn Lease>)),
            Err(e) => {
                if matches!(e, StoreError::NotReplicated { .. }) {
                    // Taken on the primary but not confirmed: let it go rather than hold
                    // a lease a failover could hand to someone else.
                    Box::new(lease).release().await;
                }
                Err(e)
            }
        }
    }

    fn watch(&self, name: &str) -> watch::Receiver<StoreSignal> {
        let (sub_inner, look_inner) = (self.inner.clone(), self.inner.clone());
        let (sub_name, look_name) = (name.to_string(), name.to_string());
        watcher::spawn(
            self.inner.poll,
            move || {
                let (inner, name) = (sub_inner.clone(), sub_name.clone());
                async move {
                    let subscribe = async {
                        let mut ps = inner.client.get_async_pubsub().await?;
                        ps.subscribe(inner.channel(&name)).await?;
                        Ok::<_, redis::RedisError>(ps)
                    };
                    match tokio::time::timeout(COMMAND_TIMEOUT, subscribe).await {
                        Ok(Ok(ps)) => Some(Box::new(PubSubNotes(Box::pin(ps.into_on_message())))
                            as Box<dyn Notifications>),
                        _ => None,
                    }
                }
            },
            move || {
                let (inner, name) = (look_inner.clone(), look_name.clone());
                async move { StoreSignal::from_generation(inner.generation(&name).await) }
            },
        )
    }
}

/// Redis pub/sub messages on the change channel.
struct PubSubNotes(std::pin::Pin<Box<redis::aio::PubSubStream>>);

#[async_trait]
impl Notifications for PubSubNotes {
    async fn next(&mut self) -> bool {
        self.0.next().await.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_alone_counts_the_replicas_that_received_the_write() {
        let plain = AofWait::Unsupported;
        assert_eq!(short_of(1, plain, 1, None), None);
        assert_eq!(short_of(2, plain, 3, None), None);
        assert_eq!(short_of(1, plain, 0, None), Some((0, ReplicaAck::Received)));
        assert_eq!(short_of(3, plain, 2, None), Some((2, ReplicaAck::Received)));
    }

    #[test]
    fn waitaof_also_needs_the_replicas_and_the_primary_to_have_fsynced_it() {
        let both = AofWait::Supported { local: 1 };
        assert_eq!(short_of(1, both, 1, Some((1, 1))), None);
        // Received by the replica but not in its append-only file (appendonly no there).
        assert_eq!(
            short_of(1, both, 1, Some((1, 0))),
            Some((0, ReplicaAck::Fsynced))
        );
        // The primary's own fsync missing.
        assert_eq!(
            short_of(1, both, 1, Some((0, 1))),
            Some((1, ReplicaAck::LocalFsync))
        );
        // WAIT falls short first.
        assert_eq!(
            short_of(2, both, 1, Some((1, 1))),
            Some((1, ReplicaAck::Received))
        );
        // A primary without an append-only file: replicas only.
        let replicas_only = AofWait::Supported { local: 0 };
        assert_eq!(short_of(1, replicas_only, 1, Some((0, 1))), None);
        // No WAITAOF answer where one was asked for is not a confirmation.
        assert_eq!(short_of(1, both, 1, None), Some((0, ReplicaAck::Fsynced)));
    }

    #[test]
    fn the_error_says_how_many_of_how_many_and_what_happens_next() {
        let e = StoreError::NotReplicated {
            op: "compare_and_swap",
            credential: "crm".into(),
            acknowledged: 0,
            required: 1,
            what: ReplicaAck::Received.describe(),
        }
        .to_string();
        for part in [
            "compare_and_swap for credential \"crm\"",
            "0 of 1 replicas acknowledged the write within 1000 ms",
            "store.wait_replicas: 1",
            "does not count as written (a refresher retries it)",
        ] {
            assert!(e.contains(part), "{part:?} not in {e:?}");
        }
    }
}
