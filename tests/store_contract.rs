//! The store contract (DESIGN.md, "Store contract") checked the same way against every
//! backend, through the public `tokenrelay::store::Store` trait only: the file store in a
//! temporary directory, a real `redis-server` (alone, and with `store.wait_replicas: 1`
//! and a replica) and a real single-member `etcd`, started on free loopback ports by
//! `support::stores` and killed when the test ends. Each store is opened from a config,
//! as tokenrelay opens it; two handles on one store play two processes.
//!
//! What every backend must do, since the refresher relies on it so that a rotating refresh
//! token is never lost and never spent twice:
//! - compare-and-swap over a stale generation (behind, ahead, or "nothing stored") answers
//!   `Conflict` with the stored generation and writes nothing: `load` still returns the
//!   state that was there;
//! - compare-and-swap over the stored generation swaps, and `load` returns the new state;
//! - a compare-and-swap sent again after it succeeded (its answer lost) answers
//!   `Conflict { current_generation: <the new generation> }` with the state it wrote, which
//!   is how the refresher recognises its own write;
//! - of several compare-and-swaps racing over one generation, exactly one swaps;
//! - the refresh lease is exclusive (a second `try_lease`, from this or another handle, is
//!   `None` while it is held) and free again once released;
//! - a lease that was lost (it ran out, or another holder took it after that) is no longer
//!   confirmed: `secure_for` and `renew` answer false, so no refresh token is sent under it.
//!
//! No assertion depends on timing: a lost lease is made by removing it in the store
//! (file: the lease file; Redis: the lease key, as its expiry would; etcd: revoking the
//! etcd lease, as its expiry would).
//!
//! Redis and etcd are skipped when not installed (a failure under
//! TOKENRELAY_REQUIRE_TOOLS=1); etcd needs the `etcd` cargo feature
//! (`cargo test --features etcd --test store_contract`).

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use support::stores::RedisServer;
use tokenrelay::config::Config;
use tokenrelay::secret::Secret;
use tokenrelay::store::{CasOutcome, Store, StoredState};

/// A lease TTL long enough that nothing in these tests runs it out by waiting.
const TTL: Duration = Duration::from_secs(30);

/// Opens the store a config with `store_yaml` names, as tokenrelay does.
fn open(store_yaml: &str) -> Arc<dyn Store> {
    let config = Config::from_yaml(&support::stores::config_with_store(store_yaml), &|_| None)
        .unwrap_or_else(|e| panic!("config invalid:\n{e}"));
    tokenrelay::store::open(&config.store).unwrap_or_else(|e| panic!("store not opened: {e}"))
}

/// The `store:` entries of an etcd store on `endpoints`, then `more` (indented entries).
fn etcd_yaml(endpoints: &[String], more: &str) -> String {
    format!(
        "  type: etcd\n  endpoints: [{}]\n{more}",
        endpoints.join(", ")
    )
}

/// A loopback endpoint nobody listens on: every connection to it is refused.
fn unanswered_endpoint() -> String {
    format!("http://127.0.0.1:{}", support::free_ports(1)[0])
}

/// A state of generation `generation` with tokens named after it.
fn state(generation: u64, tag: &str) -> StoredState {
    StoredState {
        generation,
        access_token: Some(Secret::new(format!("access-{tag}-{generation}"))),
        access_expires_at_ms: Some(4_000_000_000_000 + generation),
        refresh_token: Some(Secret::new(format!("refresh-{tag}-{generation}"))),
        obtained_at_ms: 1_000 + generation,
        updated_at_ms: 2_000 + generation,
        updated_by: format!("contract-{tag}"),
        ..Default::default()
    }
}

/// How a backend's lease is lost without waiting for it to run out.
enum LoseLease {
    /// Remove `<dir>/<name>.lease`: a new lease file is then locked by the next taker.
    File(PathBuf),
    /// `DEL <prefix><name>:lease`, what Redis does when the key expires.
    Redis(String),
    /// Revoke the etcd lease the lock key is bound to, what etcd does when it expires
    /// (the lock key goes with it).
    #[cfg(feature = "etcd")]
    Etcd(String),
}

impl LoseLease {
    async fn lose(&self, name: &str) {
        match self {
            LoseLease::File(dir) => std::fs::remove_file(dir.join(format!("{name}.lease")))
                .expect("the lease file exists while the lease is held"),
            LoseLease::Redis(url) => {
                let mut c = redis::Client::open(url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let deleted: i64 = redis::cmd("DEL")
                    .arg(format!("tokenrelay/{name}:lease"))
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert_eq!(deleted, 1, "the lease key exists while the lease is held");
            }
            #[cfg(feature = "etcd")]
            LoseLease::Etcd(endpoint) => {
                let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
                    .await
                    .unwrap();
                let got = c
                    .get(format!("tokenrelay/{name}/lease"), None)
                    .await
                    .unwrap();
                let kv = got
                    .kvs()
                    .first()
                    .expect("the lock key exists while the lease is held");
                assert!(kv.lease() != 0, "the lock key is bound to an etcd lease");
                c.lease_revoke(kv.lease()).await.unwrap();
            }
        }
    }
}

/// The checks of the contract, in the order they run.
#[derive(Clone, Copy, Debug)]
enum Check {
    SwapOverTheStoredGeneration,
    StaleGeneration,
    SwapSentAgain,
    ConcurrentSwaps,
    ExclusiveLease,
    LostLease,
}

impl Check {
    const ALL: [Check; 6] = [
        Check::SwapOverTheStoredGeneration,
        Check::StaleGeneration,
        Check::SwapSentAgain,
        Check::ConcurrentSwaps,
        Check::ExclusiveLease,
        Check::LostLease,
    ];
}

/// One backend under test: two handles on the same store (two processes).
struct Backend {
    kind: &'static str,
    ours: Arc<dyn Store>,
    theirs: Arc<dyn Store>,
    lose: LoseLease,
}

impl Backend {
    fn new(kind: &'static str, store_yaml: &str, lose: LoseLease) -> Backend {
        let backend = Backend {
            kind,
            ours: open(store_yaml),
            theirs: open(store_yaml),
            lose,
        };
        assert_eq!(backend.ours.kind(), kind);
        // `/status` shows what the store can tell of a restored older state.
        let rollback = backend.ours.rollback_detection();
        assert!(
            rollback.contains("restore") && rollback.contains("refused"),
            "{kind}: {rollback}"
        );
        backend
    }

    /// Every check of the contract, each on its own credential name. A check that fails
    /// does not stop the others: each runs as its own task (its panic message is printed
    /// as it happens), and the test fails at the end naming every broken check.
    async fn check_contract(self) {
        let kind = self.kind;
        let backend = Arc::new(self);
        let mut broken = Vec::new();
        for check in Check::ALL {
            let b = backend.clone();
            if tokio::spawn(async move { b.run(check).await })
                .await
                .is_err()
            {
                broken.push(format!("{check:?}"));
            }
        }
        assert!(
            broken.is_empty(),
            "{kind}: the store breaks the contract in {}",
            broken.join(", ")
        );
    }

    async fn run(&self, check: Check) {
        match check {
            Check::SwapOverTheStoredGeneration => {
                self.a_swap_over_the_stored_generation_swaps().await
            }
            Check::StaleGeneration => self.a_stale_generation_conflicts_and_writes_nothing().await,
            Check::SwapSentAgain => {
                self.a_swap_sent_again_after_success_conflicts_at_its_own_generation()
                    .await
            }
            Check::ConcurrentSwaps => {
                self.of_concurrent_swaps_over_one_generation_one_wins()
                    .await
            }
            Check::ExclusiveLease => self.the_lease_is_exclusive_until_released().await,
            Check::LostLease => self.a_lost_lease_is_not_secured().await,
        }
    }

    async fn swap(&self, name: &str, expected: u64, new: &StoredState) -> CasOutcome {
        self.ours
            .compare_and_swap(name, expected, new)
            .await
            .unwrap_or_else(|e| panic!("{}: compare_and_swap failed: {e}", self.kind))
    }

    async fn load(&self, name: &str) -> Option<StoredState> {
        // Read through the other handle: what another process sees.
        self.theirs
            .load(name)
            .await
            .unwrap_or_else(|e| panic!("{}: load failed: {e}", self.kind))
    }

    async fn a_swap_over_the_stored_generation_swaps(&self) {
        let (kind, name) = (self.kind, "swaps");
        assert_eq!(self.load(name).await, None, "{kind}: nothing stored yet");
        let first = state(1, "swaps");
        assert_eq!(
            self.swap(name, 0, &first).await,
            CasOutcome::Swapped,
            "{kind}"
        );
        assert_eq!(self.load(name).await.as_ref(), Some(&first), "{kind}");
        let second = state(2, "swaps");
        assert_eq!(
            self.swap(name, 1, &second).await,
            CasOutcome::Swapped,
            "{kind}"
        );
        assert_eq!(self.load(name).await.as_ref(), Some(&second), "{kind}");
    }

    async fn a_stale_generation_conflicts_and_writes_nothing(&self) {
        let (kind, name) = (self.kind, "stale");
        // Expecting something stored where nothing is.
        assert_eq!(
            self.swap(name, 1, &state(2, "never")).await,
            CasOutcome::Conflict {
                current_generation: 0
            },
            "{kind}: a swap expecting generation 1 over nothing stored"
        );
        assert_eq!(
            self.load(name).await,
            None,
            "{kind}: a refused swap wrote over nothing stored"
        );

        let stored = state(1, "stored");
        assert_eq!(
            self.swap(name, 0, &stored).await,
            CasOutcome::Swapped,
            "{kind}"
        );
        let current = state(2, "stored");
        assert_eq!(
            self.swap(name, 1, &current).await,
            CasOutcome::Swapped,
            "{kind}"
        );
        // Behind (a refresher that missed a rotation), "nothing stored" (a second seed),
        // and ahead of the store.
        for (expected, new) in [
            (1, state(2, "lost")),
            (0, state(1, "lost")),
            (3, state(4, "lost")),
        ] {
            assert_eq!(
                self.swap(name, expected, &new).await,
                CasOutcome::Conflict {
                    current_generation: 2
                },
                "{kind}: a swap expecting generation {expected} over generation 2"
            );
            assert_eq!(
                self.load(name).await.as_ref(),
                Some(&current),
                "{kind}: a refused swap (expected {expected}) changed the stored state"
            );
        }
    }

    async fn a_swap_sent_again_after_success_conflicts_at_its_own_generation(&self) {
        let (kind, name) = (self.kind, "resent");
        let first = state(1, "resent");
        assert_eq!(
            self.swap(name, 0, &first).await,
            CasOutcome::Swapped,
            "{kind}"
        );
        let new = state(2, "resent");
        assert_eq!(
            self.swap(name, 1, &new).await,
            CasOutcome::Swapped,
            "{kind}"
        );
        // The answer was lost; the refresher sends the same swap again.
        assert_eq!(
            self.swap(name, 1, &new).await,
            CasOutcome::Conflict {
                current_generation: 2
            },
            "{kind}: the same swap sent again after it succeeded"
        );
        assert_eq!(
            self.load(name).await.as_ref(),
            Some(&new),
            "{kind}: the stored state is the one the first attempt wrote"
        );
    }

    /// Writers racing over the same generation (two per handle): exactly one swaps, the
    /// others get `Conflict` at the winner's generation, and the winner's state is stored.
    /// Whatever the interleaving, that must hold; the interleavings that would expose a
    /// store comparing outside its atomic write (a read, then an unconditional write) come
    /// from the race itself, so this check can miss such a store but never fails a
    /// correct one.
    async fn of_concurrent_swaps_over_one_generation_one_wins(&self) {
        const ROUNDS: u64 = 20;
        const WRITERS: usize = 4;
        let (kind, name) = (self.kind, "raced");
        for generation in 1..=ROUNDS {
            let attempts = (0..WRITERS).map(|w| {
                let store = if w % 2 == 0 { &self.ours } else { &self.theirs };
                let new = state(generation, &format!("writer{w}"));
                async move {
                    let outcome = store.compare_and_swap(name, generation - 1, &new).await;
                    (new, outcome)
                }
            });
            let results = futures_util::future::join_all(attempts).await;
            let mut winners = Vec::new();
            for (new, outcome) in results {
                match outcome.unwrap_or_else(|e| panic!("{kind}: compare_and_swap failed: {e}")) {
                    CasOutcome::Swapped => winners.push(new),
                    CasOutcome::Conflict { current_generation } => assert_eq!(
                        current_generation, generation,
                        "{kind}: a writer that lost the race to generation {generation}"
                    ),
                }
            }
            assert_eq!(
                winners.len(),
                1,
                "{kind}: {} of {WRITERS} writers racing over generation {} swapped",
                winners.len(),
                generation - 1
            );
            assert_eq!(
                self.load(name).await.as_ref(),
                winners.first(),
                "{kind}: the stored state is the winner's"
            );
        }
    }

    async fn the_lease_is_exclusive_until_released(&self) {
        let (kind, name) = (self.kind, "exclusive");
        let lease = self
            .ours
            .try_lease(name, TTL)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{kind}: a free lease was not granted"));
        for (who, store) in [
            ("another process", &self.theirs),
            ("this process", &self.ours),
        ] {
            assert!(
                store.try_lease(name, TTL).await.unwrap().is_none(),
                "{kind}: {who} got a lease that is held"
            );
        }
        assert!(lease.secure_for(TTL * 2).await, "{kind}: a held lease");
        assert!(lease.renew().await, "{kind}: a held lease");
        lease.release().await;
        let theirs = self
            .theirs
            .try_lease(name, TTL)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{kind}: a released lease was not granted again"));
        assert!(
            self.ours.try_lease(name, TTL).await.unwrap().is_none(),
            "{kind}: the lease was granted twice after its release"
        );
        theirs.release().await;
    }

    async fn a_lost_lease_is_not_secured(&self) {
        let kind = self.kind;
        // Ran out, and nobody has taken it since.
        let name = "lost";
        let lease = self.ours.try_lease(name, TTL).await.unwrap().expect("free");
        self.lose.lose(name).await;
        assert!(
            !lease.secure_for(Duration::from_secs(1)).await,
            "{kind}: secure_for confirmed a lease that ran out"
        );
        assert!(
            !lease.secure_for(TTL * 3).await,
            "{kind}: secure_for (past the TTL) confirmed a lease that ran out"
        );
        assert!(
            !lease.renew().await,
            "{kind}: renew confirmed a lease that ran out"
        );
        lease.release().await;

        // Ran out, and another process took it.
        let name = "taken";
        let lease = self.ours.try_lease(name, TTL).await.unwrap().expect("free");
        self.lose.lose(name).await;
        let other = self
            .theirs
            .try_lease(name, TTL)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{kind}: a lease that ran out was not granted"));
        assert!(
            !lease.secure_for(Duration::from_secs(1)).await,
            "{kind}: secure_for confirmed a lease another process holds"
        );
        assert!(
            !lease.secure_for(TTL * 3).await,
            "{kind}: secure_for (past the TTL) confirmed a lease another process holds"
        );
        assert!(
            !lease.renew().await,
            "{kind}: renew confirmed a lease another process holds"
        );
        // The old holder letting go does not free the new holder's lease.
        lease.release().await;
        assert!(
            self.ours.try_lease(name, TTL).await.unwrap().is_none(),
            "{kind}: the old holder's release freed the new holder's lease"
        );
        assert!(other.secure_for(TTL * 2).await, "{kind}: the new holder");
        other.release().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store_yaml = format!("  type: file\n  path: {}\n", dir.path().display());
    Backend::new(
        "file",
        &store_yaml,
        LoseLease::File(dir.path().to_path_buf()),
    )
    .check_contract()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_keeps_the_contract() {
    if support::tools::tool("redis-server").is_none() {
        return;
    }
    let redis = RedisServer::start().await;
    let store_yaml = format!("  type: redis\n  url: {}\n", redis.url());
    Backend::new("redis", &store_yaml, LoseLease::Redis(redis.url()))
        .check_contract()
        .await;
}

/// The same with `store.wait_replicas: 1` and a replica: every write goes with a `WAIT`
/// (a conflict too), and the contract is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_waiting_for_a_replica_keeps_the_contract() {
    if support::tools::tool("redis-server").is_none() {
        return;
    }
    let redis = RedisServer::start().await;
    let replica = RedisServer::start_replica_of(&redis).await;
    assert!(
        redis.wait_for_replicas(1, Duration::from_secs(60)).await,
        "the replica never came online; its log:\n{}",
        replica.log_tail()
    );
    let store_yaml = format!(
        "  type: redis\n  url: {}\n  wait_replicas: 1\n",
        redis.url()
    );
    Backend::new("redis", &store_yaml, LoseLease::Redis(redis.url()))
        .check_contract()
        .await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_keeps_the_contract() {
    if support::tools::tool("etcd").is_none() {
        return;
    }
    let etcd = support::stores::EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints();
    let store_yaml = etcd_yaml(&endpoints, "");
    Backend::new("etcd", &store_yaml, LoseLease::Etcd(endpoints[0].clone()))
        .check_contract()
        .await;
}

/// The etcd store moves on from an endpoint that does not answer: at the first connect
/// (a dead first endpoint) and when the member in use dies (its client is dropped for
/// the next endpoint), each request going once around the list at most.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_moves_on_from_endpoints_that_do_not_answer() {
    if support::tools::tool("etcd").is_none() {
        return;
    }
    let mut etcd = support::stores::EtcdCluster::start(3).await;
    let live = etcd.endpoints();
    let endpoints = [vec![unanswered_endpoint()], live].concat();
    let store = open(&etcd_yaml(&endpoints, ""));
    let swap = |generation: u64| {
        let store = store.clone();
        async move {
            store
                .compare_and_swap("crm", generation - 1, &state(generation, "failover"))
                .await
        }
    };
    assert!(
        matches!(swap(1).await, Ok(CasOutcome::Swapped)),
        "past the dead first endpoint"
    );
    // The first live member answered; it dies, and the store moves on to the next.
    etcd.kill9(0);
    let mut outcome = swap(2).await;
    for _ in 0..5 {
        // The cluster may be electing a new leader: a few more tries, not forever.
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        outcome = swap(2).await;
    }
    assert!(
        matches!(outcome, Ok(CasOutcome::Swapped)),
        "after the member in use died: {outcome:?}"
    );
    let loaded = store.load("crm").await.unwrap().expect("stored");
    assert_eq!(loaded.generation, 2);
}

/// With etcd authentication (`store.username`/`password`) connecting is a request of its
/// own: a refused endpoint fails there and the store moves on to the next.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_with_authentication_moves_on_from_endpoints_that_do_not_answer() {
    if support::tools::tool("etcd").is_none() {
        return;
    }
    let etcd = support::stores::EtcdCluster::start(1).await;
    etcd.enable_authentication("contract-password").await;
    // With authentication the client connects (and authenticates) before its first
    // request, so a refused endpoint fails the connect, not a request.
    let endpoints = [vec![unanswered_endpoint()], etcd.endpoints()].concat();
    let store = open(&etcd_yaml(
        &endpoints,
        "  username: root\n  password: contract-password\n",
    ));
    let outcome = store
        .compare_and_swap("crm", 0, &state(1, "authenticated"))
        .await;
    assert!(
        matches!(outcome, Ok(CasOutcome::Swapped)),
        "past the dead first endpoint: {outcome:?}"
    );
    let loaded = store.load("crm").await.unwrap().expect("stored");
    assert_eq!(loaded.generation, 1);
}

/// Requests that fail on the same endpoint at once move the store on by one endpoint, not
/// one per request: a second move would skip the live member for a dead one.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_failing_together_on_one_etcd_member_move_on_once() {
    if support::tools::tool("etcd").is_none() {
        return;
    }
    let etcd = support::stores::EtcdCluster::start(3).await;
    let leader = etcd.leader().await.expect("the cluster has a leader");
    let follower = (leader + 1) % 3;
    let live = etcd.endpoints();
    // A follower first, so that pausing it needs no election; then the leader; then an
    // endpoint nobody listens on, which a second move would land on.
    let endpoints = [
        live[follower].clone(),
        live[leader].clone(),
        unanswered_endpoint(),
    ];
    let store = open(&etcd_yaml(&endpoints, ""));
    store
        .compare_and_swap("crm", 0, &state(1, "together"))
        .await
        .expect("the first endpoint answers");
    etcd.pause(follower);
    // Both reads wait on the paused member and fail together: the store must move on to
    // the leader once, not once per failed request.
    let (a, b) = tokio::join!(store.load("crm"), store.load("crm"));
    for (which, loaded) in [("first", a), ("second", b)] {
        let loaded = loaded.unwrap_or_else(|e| panic!("the {which} read failed: {e}"));
        assert_eq!(loaded.expect("stored").generation, 1, "the {which} read");
    }
}
