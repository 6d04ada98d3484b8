//! The real refresher, simulated: N refresher tasks of `tokenrelay::credential` sharing
//! an in-memory store with injected faults and a scripted token endpoint with
//! single-use refresh tokens and reuse detection, under tokio's paused clock (hours of
//! refreshes run in milliseconds). This is where the code answers to the protocol model
//! (tests/protocol_model, the spec; docs/replicas.md maps its steps to functions).
//!
//! - Replays: each counterexample of the model's negative controls, and each of its
//!   named exceptions, as a scripted history on the real code, asserting the outcome the
//!   model assigns.
//! - A seeded random-history explorer: crashes, restarts and faults at random moments;
//!   the model's invariants checked on what the endpoint received and what the store
//!   holds. A failing seed prints its trace; `SIMULATION_SEED=N` replays one history.

#[path = "simulation/endpoint.rs"]
mod endpoint;
#[path = "simulation/store.rs"]
mod store;
#[path = "simulation/world.rs"]
mod world;

use std::time::Duration;

use endpoint::Behaviour;
use world::World;

const MINUTE: Duration = Duration::from_secs(60);

/// The endpoint saw no violation of the model's invariants (else its trace).
fn no_violation(r: &endpoint::EndpointReport) {
    assert!(
        r.violations.is_empty(),
        "{:?}\n{}",
        r.violations,
        r.log.join("\n")
    );
}

/// Nothing was lost: no violation, no reuse, the store holds the server's current
/// token and every running replica serves.
fn healthy(w: &World, r: &endpoint::EndpointReport) {
    no_violation(r);
    assert_eq!(r.reuses, 0, "{}", r.log.join("\n"));
    assert_eq!(w.stored_token(), Some(r.current), "{}", r.log.join("\n"));
    assert!(w.all_serving(), "{}", r.log.join("\n"));
}

/// The plain case: one replica rotates every ~45 s for ten minutes.
#[tokio::test(start_paused = true)]
async fn a_replica_rotates_on_schedule() {
    let w = World::new(1, Duration::ZERO, 1);
    w.pass(10 * MINUTE).await;
    let r = w.report();
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(r.requests >= 15, "{r:?}");
    assert_eq!(r.requests, r.current);
    assert_eq!(w.stored_token(), Some(r.current));
    assert!(w.all_serving());
}

/// Three replicas share the rotations: one refresh per rotation, the others adopt.
#[tokio::test(start_paused = true)]
async fn three_replicas_rotate_once_per_rotation() {
    let w = World::new(3, Duration::ZERO, 2);
    w.pass(10 * MINUTE).await;
    let r = w.report();
    healthy(&w, &r);
    assert_eq!(
        r.requests,
        r.current,
        "one request per rotation:\n{}",
        r.log.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Replays of the model's negative controls: the safeguard each broken variant dropped,
// on the real code.
// ---------------------------------------------------------------------------------------

/// Model: "no confirm-before-send": the holder's lease expires before it sends, and a
/// second replica takes it and sends the same token. The real refresher confirms the
/// lease right before sending and sends nothing without it.
#[tokio::test(start_paused = true)]
async fn a_lease_lost_before_sending_sends_nothing() {
    let w = World::new(2, Duration::ZERO, 3);
    w.store.faults(|f| f.expire_lease_on_load = true);
    w.pass(5 * MINUTE).await;
    let r = w.report();
    assert_eq!(w.store.stats().leases_expired_on_demand, 1);
    healthy(&w, &r);
    assert_eq!(r.requests, r.current, "{}", r.log.join("\n"));
}

/// Model: "a 200 with an unusable access token is discarded": the new refresh token is
/// then in neither the store nor any memory. The real refresher stores it first and
/// presents it next time.
#[tokio::test(start_paused = true)]
async fn an_unusable_answer_keeps_its_refresh_token() {
    let w = World::new(2, Duration::ZERO, 4);
    w.endpoint.script(&[Behaviour::UnusableAccessToken]);
    w.pass(5 * MINUTE).await;
    let r = w.report();
    healthy(&w, &r);
    assert_eq!(r.requests, r.current);
}

/// Model: "no renewal while writing": the lease lapses after the answer and the next
/// holder sends the spent token. The real refresher renews while its (slow) write lands.
#[tokio::test(start_paused = true)]
async fn a_slow_write_keeps_its_lease() {
    let w = World::new(2, Duration::ZERO, 5);
    w.store.faults(|f| f.write_delay = Duration::from_secs(20));
    w.pass(MINUTE).await;
    w.store.faults(|f| f.write_delay = Duration::ZERO);
    w.pass(5 * MINUTE).await;
    let r = w.report();
    healthy(&w, &r);
    let lost: f64 = (0..2)
        .map(|i| w.metric(i, "tokenrelay_refresh_lease_lost_total"))
        .sum();
    assert_eq!(lost, 0.0, "a lease renewed throughout was counted as lost");
}

/// Model: "blind write instead of compare-and-swap": a write whose acknowledgement was
/// lost is retried later and puts a spent token back. The real refresher's retry is a
/// compare-and-swap that recognises its own landed write.
#[tokio::test(start_paused = true)]
async fn a_lost_acknowledgement_is_recognised_as_our_write() {
    let w = World::new(2, Duration::ZERO, 6);
    w.store.faults(|f| f.lose_acks = 1);
    w.pass(5 * MINUTE).await;
    let r = w.report();
    assert_eq!(w.store.stats().acks_lost, 1);
    healthy(&w, &r);
    assert_eq!(r.requests, r.current);
}

/// A replica waiting for the lease adopts the holder's rotation as soon as it is stored,
/// not when the holder's lease runs out: here the release is lost, as when the holder
/// dies between its write and its release, and the lease outlives the write.
#[tokio::test(start_paused = true)]
async fn a_waiting_replica_adopts_a_rotation_as_soon_as_it_is_stored() {
    let w = World::new(2, Duration::ZERO, 8);
    // A slow write: the other replica's refresh comes due while the holder writes.
    w.store.faults(|f| {
        f.write_delay = Duration::from_secs(6);
        f.lose_releases = 1;
    });
    let mut waited = Duration::ZERO;
    while w.store.state().map(|s| s.generation) == Some(1) {
        assert!(waited < 5 * MINUTE, "no rotation in five minutes");
        w.pass(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    let stored = w.store.state().unwrap().generation;
    assert!(
        w.store.lease_id().is_some(),
        "the holder's lease outlives its write"
    );
    w.pass(Duration::from_secs(1)).await;
    for (i, replica) in w.replicas.iter().enumerate() {
        let serving = replica
            .as_ref()
            .and_then(|r| r.credential.current())
            .map(|t| t.generation);
        assert_eq!(
            serving,
            Some(stored),
            "replica {i}, a second after the write:\n{}",
            w.report().log.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Replays of the model's named exceptions: the outcome it assigns, on the real code.
// ---------------------------------------------------------------------------------------

/// Lost in transit, then the retry after the timeout: with a grace window the one
/// retry recovers; nothing is lost.
#[tokio::test(start_paused = true)]
async fn lost_in_transit_with_a_grace_window_recovers() {
    let w = World::new(2, Duration::from_secs(30), 7);
    w.endpoint
        .script(&[Behaviour::Answer, Behaviour::TimeoutAfterActing]);
    w.pass(5 * MINUTE).await;
    let r = w.report();
    no_violation(&r);
    assert_eq!((r.reuses, r.grace_answers), (0, 1), "{}", r.log.join("\n"));
    assert_eq!(w.stored_token(), Some(r.current));
    assert!(w.all_serving());
}

/// Lost in transit without a grace window: the same token is presented exactly once
/// more (the model's "retry after timeout"), refused, and the fleet stops: every replica
/// needs re-authorization and nothing more is sent.
#[tokio::test(start_paused = true)]
async fn lost_in_transit_without_a_grace_window_needs_reauthorization() {
    let w = World::new(3, Duration::ZERO, 8);
    w.endpoint
        .script(&[Behaviour::Answer, Behaviour::TimeoutAfterActing]);
    w.pass(5 * MINUTE).await;
    let r = w.report();
    no_violation(&r);
    assert_eq!(r.reuses, 1, "{}", r.log.join("\n"));
    assert_eq!(
        r.requests,
        3,
        "startup, the lost one, one retry:\n{}",
        r.log.join("\n")
    );
    let stored = w.store.state().unwrap();
    assert!(stored.reauthorization_required.is_some() && stored.refresh_token.is_none());
    assert!(!w.all_serving());
}

/// Lost by crash, then the reuse after the crash: a replica dies between the answer and
/// its durable write; the restarted fleet presents the stored, spent token, which the
/// server refuses: re-authorization.
#[tokio::test(start_paused = true)]
async fn lost_by_crash_then_reused() {
    let mut w = World::new(1, Duration::ZERO, 9);
    w.store.faults(|f| f.write_delay = Duration::from_secs(5));
    w.pass(Duration::from_secs(1)).await;
    assert_eq!(
        w.report().requests,
        1,
        "the startup refresh is in its write"
    );
    w.crash(0);
    w.store.faults(|f| f.write_delay = Duration::ZERO);
    w.start(0);
    w.pass(MINUTE).await;
    let r = w.report();
    no_violation(&r);
    assert_eq!(r.reuses, 1, "{}", r.log.join("\n"));
    assert!(r.lost.contains(&1));
    assert!(w.store.state().unwrap().reauthorization_required.is_some());
}

/// Lease lost before the write, then the reuse after it: the holder's renewals fail
/// while its write is slow, its lease runs out, and the next holder presents the token
/// it spent. The cut-off holder counts the lost lease.
#[tokio::test(start_paused = true)]
async fn a_holder_cut_off_from_the_store_loses_its_lease() {
    let w = World::new(2, Duration::ZERO, 10);
    w.store.faults(|f| {
        f.write_delay = Duration::from_secs(30);
        f.fail_renewals = 100;
    });
    w.pass(MINUTE).await;
    w.store.faults(|f| {
        f.write_delay = Duration::ZERO;
        f.fail_renewals = 0;
    });
    w.pass(MINUTE).await;
    let r = w.report();
    no_violation(&r);
    assert_eq!(r.reuses, 1, "{}", r.log.join("\n"));
    let lost: f64 = (0..2)
        .map(|i| w.metric(i, "tokenrelay_refresh_lease_lost_total"))
        .sum();
    assert!(
        lost >= 1.0,
        "the cut-off holder did not count its lost lease"
    );
}

// ---------------------------------------------------------------------------------------
// Random histories.
// ---------------------------------------------------------------------------------------

/// Histories per `cargo test` run (`SIMULATION_HISTORIES` overrides).
const HISTORIES: u64 = 10_000;
/// Fault events per history, each after up to a minute of simulated time.
const EVENTS: usize = 6;

/// Runs seeded random histories on worker threads (each a paused-clock runtime) and
/// fails with the first failing seed's trace.
#[test]
fn random_histories_keep_every_token_safe() {
    let histories: u64 = std::env::var("SIMULATION_HISTORIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HISTORIES);
    let seeds: Vec<u64> = match std::env::var("SIMULATION_SEED") {
        Ok(seed) => vec![seed.parse().expect("SIMULATION_SEED is a number")],
        Err(_) => (1..=histories).collect(),
    };
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| seeds.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let results: Vec<Result<Totals, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || run_seeds(&chunk)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut totals = Totals::default();
    for r in results {
        match r {
            Ok(t) => totals.add(&t),
            Err(trace) => panic!("{trace}"),
        }
    }
    println!(
        "{} histories in {:.1?}: {totals:?}",
        seeds.len(),
        started.elapsed()
    );
    if seeds.len() as u64 >= HISTORIES {
        // The faults must actually happen, or the run proves little.
        assert!(
            totals.crashes > 1000 && totals.reuses > 100 && totals.in_doubt > 1000,
            "{totals:?}"
        );
    }
}

#[derive(Debug, Default)]
struct Totals {
    requests: u64,
    rotations: u64,
    crashes: u64,
    in_doubt: u64,
    reuses: u64,
    grace_answers: u64,
    reauthorizations: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.rotations += o.rotations;
        self.crashes += o.crashes;
        self.in_doubt += o.in_doubt;
        self.reuses += o.reuses;
        self.grace_answers += o.grace_answers;
        self.reauthorizations += o.reauthorizations;
    }
}

fn run_seeds(seeds: &[u64]) -> Result<Totals, String> {
    let mut totals = Totals::default();
    for &seed in seeds {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        totals.add(&rt.block_on(history(seed))?);
    }
    Ok(totals)
}

/// One history: random faults, then a quiet period, then the invariants.
async fn history(seed: u64) -> Result<Totals, String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = rng.gen_range(1..=3usize);
    let grace = if rng.gen_bool(0.3) {
        Duration::from_secs(30)
    } else {
        Duration::ZERO
    };
    let mut w = World::new(n, grace, seed);
    w.endpoint
        .note(format!("seed {seed}: {n} replicas, grace window {grace:?}"));
    let mut totals = Totals::default();
    // Whether something happened that may cost the grant (a named loss) or may make the
    // fleet stop presenting it (an attempt in doubt).
    let mut doubtful = false;
    for _ in 0..EVENTS {
        w.pass(Duration::from_millis(rng.gen_range(0..60_000)))
            .await;
        let i = rng.gen_range(0..n);
        match rng.gen_range(0..11) {
            0 if w.running(i) => {
                w.crash(i);
                totals.crashes += 1;
                doubtful = true;
            }
            1 if !w.running(i) => w.start(i),
            2 => {
                let b = [
                    Behaviour::UnusableAccessToken,
                    Behaviour::TimeoutBeforeActing,
                    Behaviour::TimeoutAfterActing,
                    Behaviour::ResetAfterActing,
                    Behaviour::ServerError,
                    Behaviour::InvalidGrant,
                ][rng.gen_range(0..6)];
                w.endpoint.note(format!("the next answer: {b:?}"));
                w.endpoint.script(&[b]);
                doubtful |= b != Behaviour::UnusableAccessToken;
            }
            3 => {
                w.endpoint.note("the next acknowledgement is lost".into());
                w.store.faults(|f| f.lose_acks += 1);
            }
            4 => {
                let d = Duration::from_millis(rng.gen_range(0..30_000));
                w.endpoint.note(format!("store down for {d:?}"));
                w.store.faults(|f| f.outage = true);
                w.pass(d).await;
                w.store.faults(|f| f.outage = false);
                w.endpoint.note("store back".into());
            }
            5 => {
                let d = Duration::from_millis(rng.gen_range(0..8_000));
                w.endpoint.note(format!("writes take {d:?}"));
                w.store.faults(|f| f.write_delay = d);
            }
            6 => {
                w.endpoint
                    .note("the lease expires at the next load under it".into());
                w.store.faults(|f| f.expire_lease_on_load = true);
            }
            7 => {
                // Renewals fail while a slow write is under way: the holder may be cut
                // off (the model's "lease lost before write").
                w.endpoint.note("renewals fail, writes take 20 s".into());
                w.store.faults(|f| {
                    f.fail_renewals += 10;
                    f.write_delay = Duration::from_secs(20);
                });
                doubtful = true;
            }
            8 if w.running(i) && !w.store.down() => w.stop(i).await,
            9 => {
                let back = rng.gen_range(1..=2);
                w.endpoint.note(format!(
                    "the store is restored from a backup {back} writes old"
                ));
                w.store.roll_back(back);
                w.endpoint.rolled_back();
                doubtful = true;
            }
            _ => {}
        }
    }
    w.endpoint
        .note("quiet: faults cleared, every replica running".into());
    w.store.faults(|f| *f = Default::default());
    for i in 0..n {
        if !w.running(i) {
            w.start(i);
        }
    }
    w.pass(3 * MINUTE).await;
    let r = w.report();
    let stored = w.store.state().expect("a state");
    let trace = || {
        format!(
            "seed {seed} (replay: SIMULATION_SEED={seed}):\n{}",
            r.log.join("\n")
        )
    };
    if !r.violations.is_empty() {
        return Err(format!("{:?}\n{}", r.violations, trace()));
    }
    let stopped = stored.reauthorization_required.is_some();
    let excused = r.revoked || stopped || r.rolled_back || r.lost.contains(&r.current);
    if !excused && w.stored_token() != Some(r.current) {
        return Err(format!(
            "invariant 2: the server's current token r{} is not stored (r{:?})\n{}",
            r.current,
            w.stored_token(),
            trace()
        ));
    }
    if !doubtful && (r.revoked || stopped || !w.all_serving()) {
        return Err(format!(
            "nothing was lost or in doubt, yet the fleet stopped: revoked {}, {:?}\n{}",
            r.revoked,
            stored.reauthorization_required,
            trace()
        ));
    }
    totals.requests = r.requests;
    totals.rotations = r.current;
    totals.reuses = r.reuses;
    totals.grace_answers = r.grace_answers;
    totals.reauthorizations = u64::from(stopped);
    totals.in_doubt = (0..n)
        .map(|i| w.metric(i, "tokenrelay_refresh_in_doubt_total") as u64)
        .sum();
    Ok(totals)
}

/// The one retry after an attempt in doubt is marked in the store before it leaves; a
/// retry that then cannot leave (the holder's lease ran out while the mark was being
/// written) is marked as owed again, so that the next attempt makes it instead of
/// giving the token up.
#[tokio::test(start_paused = true)]
async fn a_retry_that_never_left_stays_owed() {
    let w = World::new(1, Duration::from_secs(120), 12);
    w.pass(Duration::from_secs(5)).await;
    w.endpoint.script(&[Behaviour::ResetAfterActing]);
    w.store.faults(|f| {
        f.fail_renewals = 1000;
        f.write_delay = Duration::from_secs(15);
    });
    w.pass(MINUTE).await;
    w.store.faults(|f| *f = Default::default());
    w.pass(3 * MINUTE).await;
    let r = w.report();
    let stored = w.store.state().unwrap();
    no_violation(&r);
    assert_eq!((r.reuses, r.grace_answers), (0, 1), "{}", r.log.join("\n"));
    assert_eq!(
        stored.reauthorization_required,
        None,
        "{}",
        r.log.join("\n")
    );
    assert_eq!(w.stored_token(), Some(r.current));
    assert!(w.all_serving());
}
