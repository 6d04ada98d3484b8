//! The Redis store's durability guards, against real `redis-server` processes on loopback
//! (started by `support::stores`, killed when the test ends):
//! - the persistence settings are read when the store first connects, and anything but
//!   `appendonly yes` + `appendfsync always` (or settings that cannot be read) is one
//!   warning in tokenrelay's log naming the setting and what it risks;
//! - `store.wait_replicas: 1`: without a replica a compare-and-swap (and a lease) is an
//!   error saying 0 of 1 replicas acknowledged it; once a replica is connected the same
//!   swap, sent again as the refresher does, is confirmed, and the next one swaps, with
//!   the replica holding what was confirmed;
//! - a swap sent again after its `WAIT` fell short (the replica stopped with SIGSTOP, so
//!   still counted online but acknowledging nothing), on a new connection, is not
//!   confirmed until the replica has the stored state, since such a retry is how the
//!   refresher recognises its own write.
//!
//! No assertion depends on timing: the replica's arrival is awaited by polling `INFO
//! replication` (bounded generously), a write is sent again until confirmed as the
//! refresher does (so a replica slower than one `WAIT` changes nothing), and what the
//! replica holds is read after `WAIT` confirmed it. Skipped without `redis-server` (a failure under
//! TOKENRELAY_REQUIRE_TOOLS=1).

mod support;

use std::path::Path;
use std::time::Duration;

use support::stores::{RedisServer, REDIS_DURABLE};
use tokenrelay::config::Config;
use tokenrelay::secret::Secret;
use tokenrelay::store::{CasOutcome, Store, StoreError, StoredState};
use tokenrelay::store::{Durability, RedisStore};

fn have_redis() -> bool {
    support::tools::tool("redis-server").is_some()
}

/// A config on the Redis at `url` with credential and upstream `crm`; `store_extra` adds
/// indented `store:` entries.
fn config_yaml(url: &str, store_extra: &str) -> String {
    support::stores::config_with_store(&format!("  type: redis\n  url: {url}\n{store_extra}"))
}

fn open(url: &str, store_extra: &str) -> std::sync::Arc<dyn Store> {
    let config = Config::from_yaml(&config_yaml(url, store_extra), &|_| None)
        .unwrap_or_else(|e| panic!("config invalid:\n{e}"));
    tokenrelay::store::open(&config.store).unwrap()
}

fn redis_store(url: &str) -> RedisStore {
    let codec = tokenrelay::store::Codec::new(None).unwrap();
    RedisStore::open(url, "tokenrelay/", 0, codec, Duration::from_millis(250)).unwrap()
}

fn state(generation: u64) -> StoredState {
    StoredState {
        generation,
        access_token: Some(Secret::new(format!("access-{generation}"))),
        refresh_token: Some(Secret::new(format!("refresh-{generation}"))),
        updated_by: "redis-durability-test".into(),
        ..Default::default()
    }
}

/// Sends the swap of `new` over `expected` until the replicas confirm it, as the
/// refresher retries a write (bounded generously: a replica just started or resumed may
/// take longer than one `WAIT` to acknowledge); its outcome.
async fn confirmed(
    store: std::sync::Arc<dyn Store>,
    expected: u64,
    new: &StoredState,
) -> CasOutcome {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match store.compare_and_swap("crm", expected, new).await {
            Ok(outcome) => return outcome,
            Err(e @ StoreError::NotReplicated { .. }) => {
                assert!(std::time::Instant::now() < deadline, "never confirmed: {e}")
            }
            Err(e) => panic!("compare_and_swap failed: {e}"),
        }
    }
}

/// `tokenrelay seed` against the Redis at `url`: its log (stderr), where the store's
/// startup warning lands, as it does for `run`.
fn seed_log(dir: &Path, url: &str) -> String {
    let config = dir.join(format!("seed-{}.yaml", rand::random::<u32>()));
    std::fs::write(&config, config_yaml(url, "")).unwrap();
    let out = support::seed_cli(&config, "crm", "refresh-seeded");
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "seed failed: {log}");
    log
}

/// Each way a Redis can hold an acknowledged write less than durably is named, once, in
/// the log of a tokenrelay using it; a Redis fsyncing every write is not warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_settings_that_can_lose_an_acknowledged_write_are_warned_about() {
    if !have_redis() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    let durable = RedisServer::start().await;
    assert_eq!(
        redis_store(&durable.url()).durability().await.unwrap(),
        Durability::Fsynced
    );
    let log = seed_log(dir.path(), &durable.url());
    assert!(
        !log.contains("Redis store:"),
        "warned about a durable Redis: {log}"
    );

    for (args, setting, value) in [
        (&["--appendonly", "no"][..], "appendonly", "no"),
        (
            &["--appendonly", "yes", "--appendfsync", "everysec"][..],
            "appendfsync",
            "everysec",
        ),
    ] {
        let redis = RedisServer::start_with_args(args).await;
        let finding = redis_store(&redis.url()).durability().await.unwrap();
        assert!(
            matches!(&finding, Durability::AtRisk { setting: s, value: v, .. } if *s == setting && v == value),
            "{args:?}: {finding:?}"
        );
        let log = seed_log(dir.path(), &redis.url());
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("Redis store:")).collect();
        assert_eq!(warnings.len(), 1, "{args:?}: one warning, got:\n{log}");
        for part in [
            "WARN",
            &format!("{setting} is {value}"),
            "a crash of the Redis server loses",
            "rotated refresh token Redis acknowledged can be lost",
            "appendonly yes and appendfsync always",
            "store.wait_replicas",
        ] {
            assert!(
                warnings[0].contains(part),
                "{part:?} not in {:?}",
                warnings[0]
            );
        }
    }

    // A managed Redis that does not let its users read the configuration.
    let mut args = REDIS_DURABLE.to_vec();
    args.extend([
        "--user",
        "app",
        "on",
        ">app-pass",
        "~*",
        "&*",
        "+@all",
        "-config",
    ]);
    let locked = RedisServer::start_with_args(&args).await;
    let url = format!("redis://app:app-pass@127.0.0.1:{}/0", locked.port);
    let finding = redis_store(&url).durability().await.unwrap();
    assert!(
        matches!(&finding, Durability::Unknown { reason } if reason.contains("CONFIG GET")),
        "{finding:?}"
    );
    let log = seed_log(dir.path(), &url);
    assert!(
        log.contains("Redis store: cannot read appendonly and appendfsync"),
        "{log}"
    );
    assert!(
        !log.contains("app-pass"),
        "the URL's password in the log: {log}"
    );
}

/// `store.wait_replicas: 1`: a write counts once one replica has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_counts_a_write_once_the_replicas_acknowledged_it() {
    if !have_redis() {
        return;
    }
    let primary = RedisServer::start().await;
    let store = open(&primary.url(), "  wait_replicas: 1\n");
    let first = state(1);

    // No replica: the swap reaches the primary, but is not confirmed.
    let err = store
        .compare_and_swap("crm", 0, &first)
        .await
        .expect_err("a swap no replica acknowledged");
    assert!(
        matches!(
            err,
            StoreError::NotReplicated {
                acknowledged: 0,
                required: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    for part in [
        "compare_and_swap for credential \"crm\"",
        "0 of 1 replicas acknowledged the write",
        "store.wait_replicas: 1",
        "does not count as written (a refresher retries it)",
    ] {
        assert!(text.contains(part), "{part:?} not in {text:?}");
    }
    assert!(!text.contains("refresh-1"), "a token in an error: {text}");
    // The lease likewise, and it is not left held.
    let err = match store.try_lease("crm", Duration::from_secs(30)).await {
        Err(e) => e,
        Ok(lease) => panic!("a lease no replica acknowledged: {:?}", lease.is_some()),
    };
    assert!(
        err.to_string()
            .contains("lease for credential \"crm\" not confirmed by the replicas: 0 of 1"),
        "{err}"
    );
    let unguarded = open(&primary.url(), "");
    let lease = unguarded
        .try_lease("crm", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("an unconfirmed lease is released");
    lease.release().await;

    // A replica connects.
    let replica = RedisServer::start_replica_of(&primary).await;
    assert!(
        primary.wait_for_replicas(1, Duration::from_secs(60)).await,
        "the replica never came online; its log:\n{}",
        replica.log_tail()
    );
    // The refresher sends the same swap again: the first attempt's write is found, now
    // confirmed by the replica (what the refresher takes as its own write, done).
    assert_eq!(
        confirmed(store.clone(), 0, &first).await,
        CasOutcome::Conflict {
            current_generation: 1
        }
    );
    assert_eq!(store.load("crm").await.unwrap(), Some(first));
    // The next rotation swaps, and the replica holds it once that is confirmed.
    // The next rotation is written (swapped, or, if its first WAIT fell short, found
    // written by the retry: the refresher's success either way).
    let second = state(2);
    let outcome = confirmed(store.clone(), 1, &second).await;
    assert!(
        matches!(
            outcome,
            CasOutcome::Swapped
                | CasOutcome::Conflict {
                    current_generation: 2
                }
        ),
        "{outcome:?}"
    );
    assert_eq!(store.load("crm").await.unwrap().as_ref(), Some(&second));
    let on_replica = open(&replica.url(), "");
    assert_eq!(on_replica.load("crm").await.unwrap(), Some(second));
    let lease = store
        .try_lease("crm", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("a lease the replica acknowledged");
    assert!(lease.secure_for(Duration::from_secs(60)).await);
    lease.release().await;
}

/// The retry of a swap whose `WAIT` fell short finds its own write (`Conflict` at its
/// generation), which the refresher then takes as done: so that answer must wait for the
/// replicas too. On a new connection (after a reconnect, or from another process) there
/// is no earlier write of its own for `WAIT` to wait for: a replica that acknowledges
/// nothing (stopped) must make the retry fail as the first attempt did.
///
/// Redis up to 7.0 makes `WAIT` count from the offset at the client's last command of any
/// kind, so there this holds by itself; newer servers count from the client's last
/// *propagated* write only (`call()` moves `woff` only when the command propagated), and
/// there it holds because the conflicting swap rewrites the stored generation (the
/// `CAS_SCRIPT` conflict branch). With the test machine's Redis 7.0 this test cannot tell
/// the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_sent_again_is_confirmed_only_once_the_replica_has_the_state() {
    if !have_redis() {
        return;
    }
    let primary = RedisServer::start().await;
    let replica = RedisServer::start_replica_of(&primary).await;
    assert!(
        primary.wait_for_replicas(1, Duration::from_secs(60)).await,
        "the replica never came online; its log:\n{}",
        replica.log_tail()
    );
    let guarded = "  wait_replicas: 1\n";
    let store = open(&primary.url(), guarded);
    assert_eq!(
        store.compare_and_swap("crm", 0, &state(1)).await.unwrap(),
        CasOutcome::Swapped
    );

    replica.pause();
    let second = state(2);
    let first_attempt = store.compare_and_swap("crm", 1, &second).await;
    assert!(
        matches!(
            first_attempt,
            Err(StoreError::NotReplicated {
                acknowledged: 0,
                ..
            })
        ),
        "{first_attempt:?}"
    );
    // Sent again on a new connection, while the replica still has nothing of it.
    let retry = open(&primary.url(), guarded)
        .compare_and_swap("crm", 1, &second)
        .await;
    assert!(
        matches!(
            retry,
            Err(StoreError::NotReplicated {
                acknowledged: 0,
                ..
            })
        ),
        "a retry was confirmed while the replica had not acknowledged the state: {retry:?}"
    );

    replica.resume();
    let retry = confirmed(open(&primary.url(), guarded), 1, &second).await;
    assert_eq!(
        retry,
        CasOutcome::Conflict {
            current_generation: 2
        }
    );
    assert_eq!(
        open(&replica.url(), "").load("crm").await.unwrap(),
        Some(second),
        "confirmed, so the replica has it"
    );
}
