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
//! by a Redis crash (see docs/replicas.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::{watch, Mutex};

use super::codec::Codec;
use super::watcher::{self, Notifications};
use super::{CasOutcome, Lease, Store, StoreError, StoreSignal, StoredState};

const CAS_SCRIPT: &str = r#"
local current = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if current ~= tonumber(ARGV[1]) then
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
}

impl RedisStore {
    /// Prepares a client for `url` (`redis://` or `rediss://`, with user:password if any).
    pub fn open(
        url: &str,
        prefix: &str,
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
            }),
        })
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
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
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
        *slot = Some(c.clone());
        Ok(c)
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
        let mut c = self.inner.conn("lease", &self.key).await.ok()?;
        let left: i64 = Script::new(EXTEND_SCRIPT)
            .key(&self.key)
            .arg(&self.token)
            .arg(at_least.as_millis() as u64)
            .invoke_async(&mut c)
            .await
            .ok()?;
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
            Some(bytes) => inner
                .codec
                .decode(name, &bytes)
                .map(Some)
                .map_err(|message| StoreError::Corrupt {
                    credential: name.to_string(),
                    message: format!("key {}: {message}", inner.key(name)),
                }),
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
        let mut c = inner.conn("compare_and_swap", name).await?;
        let (ok, current): (i64, u64) = Script::new(CAS_SCRIPT)
            .key(inner.key(name))
            .key(inner.channel(name))
            .arg(expected)
            .arg(new.generation)
            .arg(bytes)
            .invoke_async(&mut c)
            .await
            .map_err(err("compare_and_swap", name))?;
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
        let mut c = inner.conn("lease", name).await?;
        let token = format!("{:032x}", rand::random::<u128>());
        let set: Option<String> = redis::cmd("SET")
            .arg(inner.lease_key(name))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut c)
            .await
            .map_err(err("lease", name))?;
        Ok(set.map(|_| {
            Box::new(RedisLease {
                inner: inner.clone(),
                key: inner.lease_key(name),
                token,
                ttl,
            }) as Box<dyn Lease>
        }))
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
