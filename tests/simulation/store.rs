//! An in-memory store with the contract of `tokenrelay::store::Store` (compare-and-swap
//! on the generation, a lease with a TTL, a watch), whose faults a simulation injects:
//! lost acknowledgements, failed renewals, lost releases, lease expiry on demand, writes by someone
//! else (conflicts), delayed writes, outages and a rollback to an older state.
//!
//! Time is tokio's (paused in a simulation). A lease dropped without `release` stays
//! until its TTL runs out, as a crashed holder's does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenrelay::store::{CasOutcome, Lease, Store, StoreError, StoreSignal, StoredState};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Default)]
pub struct Faults {
    /// Every operation fails.
    pub outage: bool,
    /// The next compare-and-swaps that land still report an error to the caller.
    pub lose_acks: u32,
    /// The next lease renewals fail (without renewing).
    pub fail_renewals: u32,
    /// The next lease releases are lost: the lease stays until its TTL runs out, as
    /// when its holder dies between its write and its release.
    pub lose_releases: u32,
    /// How long a compare-and-swap takes before it lands.
    pub write_delay: Duration,
    /// The next load made while a lease is held and not yet confirmed expires that
    /// lease (the holder has re-read the store and not confirmed: the model lets a lease
    /// expire there, never between confirm and the end of the request).
    pub expire_lease_on_load: bool,
}

struct HeldLease {
    id: u64,
    until: Instant,
    /// Its holder confirmed it before sending: from then on it does not expire before
    /// the time it secured (as a real store's TTL guarantees).
    secured: bool,
}

struct Inner {
    state: Option<StoredState>,
    /// Every state written, oldest first (for a rollback).
    written: Vec<StoredState>,
    lease: Option<HeldLease>,
    next_lease: u64,
    faults: Faults,
    stats: StoreStats,
    /// Leases a renewal of which failed: their holder may have been cut off.
    cut_off: std::collections::BTreeSet<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    pub writes: u64,
    pub acks_lost: u64,
    pub renewals_failed: u64,
    pub leases_expired_on_demand: u64,
    pub refused_while_down: u64,
}

pub struct FaultStore {
    inner: Arc<Mutex<Inner>>,
    signal: watch::Sender<StoreSignal>,
}

const NAME: &str = "crm";

impl FaultStore {
    pub fn new(seeded: StoredState) -> Arc<FaultStore> {
        let (signal, _) = watch::channel(StoreSignal {
            generation: seeded.generation,
            error: None,
        });
        Arc::new(FaultStore {
            inner: Arc::new(Mutex::new(Inner {
                state: Some(seeded.clone()),
                written: vec![seeded],
                lease: None,
                next_lease: 1,
                faults: Faults::default(),
                stats: StoreStats::default(),
                cut_off: Default::default(),
            })),
            signal,
        })
    }

    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.inner.lock().unwrap().faults);
    }

    pub fn state(&self) -> Option<StoredState> {
        self.inner.lock().unwrap().state.clone()
    }

    pub fn stats(&self) -> StoreStats {
        self.inner.lock().unwrap().stats.clone()
    }

    /// Whether the store is down.
    pub fn down(&self) -> bool {
        self.inner.lock().unwrap().faults.outage
    }

    /// The unexpired lease's id, if someone holds one.
    pub fn lease_id(&self) -> Option<u64> {
        let i = self.inner.lock().unwrap();
        i.lease
            .as_ref()
            .filter(|l| l.until > Instant::now())
            .map(|l| l.id)
    }

    /// Whether a renewal of lease `id` failed (its holder may have been cut off from the
    /// store, the model's "lease lost before write").
    pub fn renewal_failed(&self, id: u64) -> bool {
        self.inner.lock().unwrap().cut_off.contains(&id)
    }

    /// Whether someone holds an unexpired lease.
    pub fn leased(&self) -> bool {
        let i = self.inner.lock().unwrap();
        i.lease.as_ref().is_some_and(|l| l.until > Instant::now())
    }

    /// The store comes back from a backup: the state written `back` writes ago.
    pub fn roll_back(&self, back: usize) {
        let mut i = self.inner.lock().unwrap();
        let n = i.written.len();
        if back > 0 && back < n {
            let old = i.written[n - 1 - back].clone();
            i.state = Some(old);
        }
    }

    fn check_up(&self, op: &'static str) -> Result<(), StoreError> {
        let mut i = self.inner.lock().unwrap();
        if i.faults.outage {
            i.stats.refused_while_down += 1;
            return Err(StoreError::backend(
                op,
                NAME,
                "store unreachable (simulated)",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FaultStore {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    async fn load(&self, _name: &str) -> Result<Option<StoredState>, StoreError> {
        self.check_up("load")?;
        let mut i = self.inner.lock().unwrap();
        let unconfirmed = i
            .lease
            .as_ref()
            .is_some_and(|l| l.until > Instant::now() && !l.secured);
        if unconfirmed && i.faults.expire_lease_on_load {
            i.faults.expire_lease_on_load = false;
            i.lease = None;
            i.stats.leases_expired_on_demand += 1;
        }
        Ok(i.state.clone())
    }

    async fn compare_and_swap(
        &self,
        _name: &str,
        expected: u64,
        new: &StoredState,
    ) -> Result<CasOutcome, StoreError> {
        self.check_up("compare_and_swap")?;
        let delay = self.inner.lock().unwrap().faults.write_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let lost_ack = {
            let mut i = self.inner.lock().unwrap();
            let current = i.state.as_ref().map_or(0, |s| s.generation);
            if current != expected {
                return Ok(CasOutcome::Conflict {
                    current_generation: current,
                });
            }
            i.state = Some(new.clone());
            i.written.push(new.clone());
            i.stats.writes += 1;
            let lost = i.faults.lose_acks > 0;
            if lost {
                i.faults.lose_acks -= 1;
                i.stats.acks_lost += 1;
            }
            lost
        };
        self.signal.send_replace(StoreSignal {
            generation: new.generation,
            error: None,
        });
        if lost_ack {
            return Err(StoreError::backend(
                "compare_and_swap",
                NAME,
                "connection reset before the answer (simulated)",
            ));
        }
        Ok(CasOutcome::Swapped)
    }

    async fn try_lease(
        &self,
        _name: &str,
        ttl: Duration,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        self.check_up("lease")?;
        let mut i = self.inner.lock().unwrap();
        let now = Instant::now();
        if i.lease.as_ref().is_some_and(|l| l.until > now) {
            return Ok(None);
        }
        let id = i.next_lease;
        i.next_lease += 1;
        i.lease = Some(HeldLease {
            id,
            until: now + ttl,
            secured: false,
        });
        drop(i);
        Ok(Some(Box::new(SimLease {
            inner: self.inner.clone(),
            id,
            ttl,
        })))
    }

    fn watch(&self, _name: &str) -> watch::Receiver<StoreSignal> {
        self.signal.subscribe()
    }
}

struct SimLease {
    inner: Arc<Mutex<Inner>>,
    id: u64,
    ttl: Duration,
}

impl SimLease {
    /// Extends the lease to `for_` from now if this holder still has it; `secure`
    /// marks it confirmed.
    fn extend(&self, for_: Duration, secure: bool) -> bool {
        let mut i = self.inner.lock().unwrap();
        if i.faults.outage {
            // Cut off from the store: the lease may run out under its holder.
            i.cut_off.insert(self.id);
            return false;
        }
        let now = Instant::now();
        match &mut i.lease {
            Some(l) if l.id == self.id && l.until > now => {
                l.until = l.until.max(now + for_);
                l.secured |= secure;
                true
            }
            _ => false,
        }
    }
}

#[async_trait]
impl Lease for SimLease {
    async fn renew(&self) -> bool {
        {
            let mut i = self.inner.lock().unwrap();
            if i.faults.fail_renewals > 0 {
                i.faults.fail_renewals -= 1;
                i.stats.renewals_failed += 1;
                i.cut_off.insert(self.id);
                return false;
            }
        }
        self.extend(self.ttl, false)
    }

    async fn secure_for(&self, needed: Duration) -> bool {
        self.extend(needed, true)
    }

    async fn release(self: Box<Self>) {
        let mut i = self.inner.lock().unwrap();
        if i.faults.lose_releases > 0 {
            i.faults.lose_releases -= 1;
            return;
        }
        if i.lease.as_ref().is_some_and(|l| l.id == self.id) {
            i.lease = None;
        }
    }
}
