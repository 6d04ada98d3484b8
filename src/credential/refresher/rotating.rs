//! The rotating `refresh_token` grant: the store protocol of DESIGN.md. Take the lease,
//! re-read, adopt if the generation moved, else spend the refresh token and write what
//! the answer carries with compare-and-swap, durably, before publishing it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::Instant;

use tracing::{error, warn};

use super::{Failure, Refresher};
use crate::config::url_template::merge_fields;
use crate::credential::{policy, RefreshError, RefreshResult, Trigger};
use crate::metrics::Metrics;
use crate::oauth::{GrantRequest, TokenAnswer, TokenError};
use crate::store::{now_ms, CasOutcome, InDoubt, Lease, Rotation, Store, StoredState};

use super::handover::{self, WriteStep};

use super::decide::rotation::{LEASE_POLL, LONG_LIVED_EXPIRED, NO_REFRESH_TOKEN};
use super::decide::{self, AfterAnswer, AfterRejection, LeaseBusy, Loaded, Spend, UnderLease};
use super::in_doubt;

impl Refresher {
    /// The rotating refresh protocol; see the module docs.
    pub(super) async fn refresh_rotating(
        &mut self,
        trigger: Trigger,
    ) -> Result<RefreshResult, Failure> {
        let store = self.store.clone().expect("refresh_token grant has a store");
        let ttl = self.lease_ttl;
        let deadline =
            decide::lease_wait_deadline(Instant::now(), ttl, self.cred.config.token_timeout.0);
        let lease = loop {
            match store.try_lease(self.name(), ttl).await {
                Ok(Some(lease)) => {
                    self.metrics.store_op("lease", true);
                    break lease;
                }
                Ok(None) => {
                    // Another process is refreshing: adopt its result as soon as it lands.
                    if let Some(Some(s)) = self.load().await {
                        if s.generation > self.known_generation && self.publish_stored(&s) {
                            self.known_generation = s.generation;
                            return Ok(RefreshResult::Adopted);
                        }
                    }
                    let stopping = self.shutdown.is_cancelled();
                    match decide::lease_busy(Instant::now(), deadline, stopping) {
                        LeaseBusy::GiveUp => return Err(Failure::Error(RefreshError::LeaseBusy)),
                        LeaseBusy::PollAgain => tokio::time::sleep(LEASE_POLL).await,
                    }
                }
                Err(e) => {
                    self.metrics.store_op("lease", false);
                    self.cred.set_store_error(Some(e.to_string()));
                    if let Some(result) = self.refresh_without_store().await {
                        return result;
                    }
                    return Err(Failure::Error(RefreshError::Lease(e)));
                }
            }
        };
        // Renewed every third of the TTL for as long as the refresh holds it.
        let lost = AtomicBool::new(false);
        let metrics = self.metrics.clone();
        let renewing = keep_renewing(lease.as_ref(), ttl, &lost, &metrics);
        let result = {
            let work = self.refresh_holding(lease.as_ref(), trigger, &store, &lost);
            tokio::pin!(work);
            tokio::pin!(renewing);
            tokio::select! {
                r = &mut work => r,
                never = &mut renewing => match never {},
            }
        };
        lease.release().await;
        result
    }

    async fn refresh_holding(
        &mut self,
        lease: &dyn Lease,
        trigger: Trigger,
        store: &Arc<dyn Store>,
        lease_lost: &AtomicBool,
    ) -> Result<RefreshResult, Failure> {
        let stored = match self.load().await {
            None => return Err(Failure::Error(RefreshError::StoreUnavailable)),
            Some(None) => {
                self.cred.set_unavailable_reason(Some(format!(
                    "no refresh token stored yet: run `tokenrelay seed --credential {}`",
                    self.name()
                )));
                return Err(Failure::Idle);
            }
            Some(Some(s)) => s,
        };
        let ours = self.cred.config.token_endpoint_identity();
        let under_lease = decide::under_lease(&Loaded {
            stored: &stored,
            known_generation: self.known_generation,
            newest_authorization_ms: self.newest_authorization_ms,
            set_aside_up_to: self.foreign_up_to,
            ours: &ours,
            trigger,
            now_ms: now_ms(),
            refresh_at: self.cred.config.refresh_at,
            refresh_before: self.cred.config.refresh_before.0,
        });
        // Whatever follows, this is now the newest generation seen (a `seed` or
        // `authorize` after a rollback writes the one after it).
        self.known_generation = stored.generation;
        match under_lease {
            UnderLease::RolledBack(why) => {
                self.enter_reauthorization(why);
                return Err(Failure::Idle);
            }
            UnderLease::Hold(h) => {
                self.note_state(&stored);
                self.hold(Some(h));
                return Err(Failure::Idle);
            }
            UnderLease::Adopt => {
                self.note_state(&stored);
                self.hold(None);
                if self.publish_stored(&stored) {
                    return Ok(RefreshResult::Adopted);
                }
            }
            UnderLease::Refresh => {
                self.note_state(&stored);
                self.hold(None);
            }
        }
        let refresh_token = match decide::spend(&stored) {
            Spend::LongLived => {
                // Never refreshed: used while valid, then a human must provide a new one.
                if self.publish_stored(&stored) {
                    return Ok(RefreshResult::Adopted);
                }
                self.enter_reauthorization(LONG_LIVED_EXPIRED.into());
                return Err(Failure::Idle);
            }
            Spend::NothingToSend => {
                self.long_lived = false;
                self.enter_reauthorization(NO_REFRESH_TOKEN.into());
                return Err(Failure::Idle);
            }
            Spend::Send(refresh_token) => {
                self.long_lived = false;
                refresh_token.clone()
            }
        };
        let rotating = self.cred.config.refresh_token.rotating;
        let mut stored = stored;
        let mut trigger = trigger;
        let result = loop {
            if rotating {
                match in_doubt::before_send(stored.in_doubt.as_ref()) {
                    in_doubt::BeforeSend::Send => {}
                    in_doubt::BeforeSend::MarkRetry(mark) => {
                        // The one retry is recorded before it leaves, so that no process
                        // (this one after a crash included) makes a second.
                        stored = self.write_mark(store, &stored, mark).await?;
                    }
                    in_doubt::BeforeSend::GiveUp(why) => {
                        break self.dead_grant(store, &stored, why).await;
                    }
                }
            }
            self.may_send_refresh().map_err(Failure::Error)?;
            // Confirm the lease right before spending the refresh token, held (extended
            // if need be) for the whole request.
            let needed = policy::lease_needed_to_send(self.cred.config.token_timeout.0);
            if !lease.secure_for(needed).await {
                self.retry_still_owed(store, &stored).await;
                return Err(Failure::Error(RefreshError::LeaseNotConfirmed));
            }
            let secured_until = Instant::now() + needed;
            lease_lost.store(false, Ordering::Relaxed);
            let client = self.client.as_ref().expect("refresh grant has a client");
            let answer = client
                .request(GrantRequest::RefreshToken(&refresh_token))
                .await;
            let mark = stored.in_doubt.as_ref();
            break match decide::after_answer(answer, rotating, mark, now_ms()) {
                AfterAnswer::Commit(answer) => self.commit(store, &stored, *answer).await,
                AfterAnswer::Rejected { error, why } => {
                    self.rejected(store, &stored, error, why).await
                }
                AfterAnswer::RetryOnce { error, mark } => {
                    warn!(credential = %self.name(), error = %error, "refresh outcome unknown: the same refresh token is presented once more when the lease's secured time has passed");
                    self.cred.record(
                        trigger,
                        RefreshResult::InDoubt,
                        Some(in_doubt::explanation(&error)),
                        None,
                    );
                    stored = self.write_mark(store, &stored, mark).await?;
                    // The lease stays held until the request it secured is over for the
                    // server too; only then does the retry leave.
                    tokio::time::sleep_until(secured_until).await;
                    trigger = Trigger::Expired;
                    continue;
                }
                AfterAnswer::GiveUp(why) => {
                    self.metrics.in_doubt(self.name());
                    self.dead_grant(store, &stored, why).await
                }
                AfterAnswer::Transient(e) => {
                    self.retry_still_owed(store, &stored).await;
                    Err(Failure::Error(e.into()))
                }
            };
        };
        if lease_lost.load(Ordering::Relaxed) {
            // The compare-and-swap on the generation decided what was written.
            self.metrics.lease_lost(self.name());
            warn!(credential = %self.name(), "the refresh lease could not be renewed while this refresh held it; its result was written under compare-and-swap on the generation");
        }
        result
    }

    /// Makes what the answer carries durable, then publishes it. The old refresh token
    /// is dead at the server now, so the write is retried until it succeeds, however
    /// long that takes. A new refresh token is stored even when the answer's
    /// access-token part is unusable: the attempt then fails, the current access token
    /// keeps serving, and the next attempt presents the new refresh token.
    async fn commit(
        &mut self,
        store: &Arc<dyn Store>,
        stored: &StoredState,
        answer: TokenAnswer,
    ) -> Result<RefreshResult, Failure> {
        let now = now_ms();
        let expiry = self.refresh_expiry(now, &answer, stored);
        let refresh_expiry = (expiry.map(|e| e.at_ms), expiry.is_some_and(|e| e.estimate));
        let issued_to = self.cred.config.token_endpoint_identity();
        let access = match answer.access {
            Ok(access) => access,
            Err(e) => {
                let Some(refresh_token) = answer.refresh_token else {
                    // Nothing new to keep: the presented refresh token is still the live one.
                    return Err(Failure::Error(e.into()));
                };
                let new = stored.rotated_refresh_token_only(
                    refresh_token,
                    refresh_expiry,
                    issued_to,
                    now,
                    &self.instance_id,
                );
                let new = self.write_durably(store, new).await?;
                self.known_generation = new.generation;
                self.cred
                    .set_refresh_expiry(new.refresh_expires_at_ms, new.refresh_expires_estimated);
                self.cred.set_refresh_life(Some(now), new.authorized_at_ms);
                self.refresh_obtained_ms = Some(now);
                warn!(credential = %self.name(), generation = new.generation,
                    "token endpoint rotated the refresh token but its access token is unusable; the new refresh token is stored, the current access token stays in use");
                return Err(Failure::Error(RefreshError::UnusableAccessToken(e)));
            }
        };
        let rotation = Rotation {
            access_token: access.token,
            access_expires_at_ms: now + access.expires_in.as_millis() as u64,
            refresh_token: answer.refresh_token,
            refresh_expires_at_ms: refresh_expiry.0,
            refresh_expires_estimated: refresh_expiry.1,
            // A field this answer omits keeps its stored value (Salesforce sends
            // instance_url on some answers only).
            answer_fields: merge_fields(&stored.answer_fields, &answer.fields),
            issued_to,
        };
        let new = stored.rotated(rotation, now, &self.instance_id);
        let new = self.write_durably(store, new).await?;
        self.known_generation = new.generation;
        self.note_state(&new);
        self.cred
            .publish_with_fields(
                new.access_token.as_ref().expect("set by rotated"),
                new.generation,
                Some(
                    SystemTime::UNIX_EPOCH
                        + Duration::from_millis(new.access_expires_at_ms.unwrap_or(now)),
                ),
                new.answer_fields.clone(),
                &answer.refused_fields,
            )
            .map_err(|e| Failure::Error(e.into()))?;
        Ok(RefreshResult::Success)
    }

    /// The store is unreachable. A credential whose refresh tokens do not rotate (Google,
    /// Zoho) may then refresh on its own when it holds no valid token, keeping the result
    /// in memory: nothing is spent, so nothing can be lost. A rotating credential never
    /// does (`None`): it waits for the store.
    async fn refresh_without_store(&mut self) -> Option<Result<RefreshResult, Failure>> {
        let rotating = self.cred.config.refresh_token.rotating;
        let holds_usable_token = self.cred.usable(Instant::now()).is_some();
        if !decide::refresh_without_store(rotating, holds_usable_token) {
            return None;
        }
        let refresh_token = self.remembered_refresh_token.clone()?;
        self.may_send_refresh().ok()?;
        let client = self.client.as_ref().expect("refresh grant has a client");
        let answer = client
            .request(GrantRequest::RefreshToken(&refresh_token))
            .await
            .and_then(TokenAnswer::into_response);
        Some(match answer {
            Ok(resp) => {
                let generation = self.cred.current().map(|t| t.generation).unwrap_or(0);
                warn!(credential = %self.name(), "store unreachable: refreshed on this replica alone (this credential's refresh tokens do not rotate); the token is kept in memory");
                let fields = merge_fields(&self.cred.current_fields(), &resp.fields);
                self.cred
                    .publish_with_fields(
                        &resp.access_token,
                        generation,
                        Some(crate::clock::wall_now() + resp.expires_in),
                        fields,
                        &resp.refused_fields,
                    )
                    .map(|()| RefreshResult::Success)
                    .map_err(|e| Failure::Error(e.into()))
            }
            Err(e) => Err(Failure::Error(e.into())),
        })
    }

    /// When the refresh token obtained at `now_ms` dies, from what the answer stated and
    /// the credential's rules; absolute lifetimes count from the grant's issue time.
    fn refresh_expiry(
        &self,
        now_ms: u64,
        answer: &TokenAnswer,
        stored: &StoredState,
    ) -> Option<policy::RefreshExpiry> {
        let rules = &self.cred.config.refresh_token;
        let issued = policy::Issued {
            obtained_ms: now_ms,
            obtained_exact: true,
            authorized_at_ms: stored.issued_at_ms.or(stored.authorized_at_ms),
            authorized_exact: !stored.issued_at_unknown,
        };
        let lifetimes = policy::Lifetimes {
            stated: answer.refresh_expires_in,
            stated_hard: answer.refresh_hard_expires_in,
            idle: rules.idle_lifetime.map(|d| d.0),
            absolute: rules.absolute_lifetime.map(|d| d.0),
        };
        policy::refresh_token_expiry(issued, lifetimes)
    }

    /// Compare-and-swap of `new` over the generation before it, retried while the store
    /// fails (the answer being written may hold the only live refresh token). Never
    /// given up: a refresher stopped meanwhile hands the write over (see [`handover`]),
    /// or, without anyone to take it, keeps trying until only SIGKILL ends it.
    pub(super) async fn write_durably(
        &mut self,
        store: &Arc<dyn Store>,
        new: StoredState,
    ) -> Result<StoredState, Failure> {
        let mut delay = None;
        loop {
            match handover::write_once(store.as_ref(), self.name(), &new).await {
                WriteStep::Kept => {
                    self.metrics.store_op("compare_and_swap", true);
                    self.cred.set_store_error(None);
                    return Ok(new);
                }
                WriteStep::Superseded { found } => {
                    self.metrics.store_op("compare_and_swap", false);
                    // Only a write without the lease (seed/authorize) can get here; the
                    // operator's new state wins and is adopted through the watch.
                    error!(credential = %self.name(), expected = new.generation - 1, found,
                        "stored state changed during a refresh (seed or authorize?); keeping the stored state");
                    return Err(Failure::Error(RefreshError::StoredStateChanged));
                }
                WriteStep::Failed(e) => {
                    self.metrics.store_op("compare_and_swap", false);
                    self.cred.set_store_error(Some(e.to_string()));
                    let wait = handover::next_delay(delay);
                    if self.shutdown.is_cancelled() {
                        if let Some(pending) = &self.handover {
                            warn!(credential = %self.name(), error = %e, generation = new.generation, "stopping with the rotated refresh token not stored yet: its write is handed over");
                            pending.put(self.name(), new);
                            return Err(Failure::HandedOver);
                        }
                        error!(credential = %self.name(), error = %e, retry_in = ?wait, "stopping, but the rotated refresh token is not stored yet: waiting for the store (the process must not be killed now)");
                    } else {
                        error!(credential = %self.name(), error = %e, retry_in = ?wait, "cannot persist the rotated token yet; retrying");
                    }
                    tokio::time::sleep(wait).await;
                    delay = Some(wait);
                }
            }
        }
    }

    /// The retry `stored` marks as made never left (the lease was not confirmed, or the
    /// request certainly was not sent): the mark goes back to "owed", so that nobody
    /// gives the token up for a presentation that never happened.
    async fn retry_still_owed(&mut self, store: &Arc<dyn Store>, stored: &StoredState) {
        if let Some(owed) = in_doubt::still_owed(stored.in_doubt.as_ref()) {
            let _ = self.write_mark(store, stored, owed).await;
        }
    }

    /// Writes `stored` again with the in-doubt mark `mark`, durably; the state written.
    async fn write_mark(
        &mut self,
        store: &Arc<dyn Store>,
        stored: &StoredState,
        mark: InDoubt,
    ) -> Result<StoredState, Failure> {
        let new = stored.marked_in_doubt(mark, now_ms(), &self.instance_id);
        let new = self.write_durably(store, new).await?;
        self.known_generation = new.generation;
        Ok(new)
    }

    /// `invalid_grant`: adopt if another process rotated meanwhile, else record that a
    /// human must re-authorize, so no process presents the dead token again.
    async fn rejected(
        &mut self,
        store: &Arc<dyn Store>,
        stored: &StoredState,
        e: TokenError,
        why: String,
    ) -> Result<RefreshResult, Failure> {
        let now = self.load().await.flatten();
        let now_stored = now.as_ref().map(|s| s.generation);
        if let (AfterRejection::Rotated, Some(now)) =
            (decide::after_rejection(stored.generation, now_stored), now)
        {
            self.known_generation = now.generation;
            if self.publish_stored(&now) {
                return Ok(RefreshResult::Adopted);
            }
            return Err(Failure::Error(RefreshError::RejectedWhileRotated(e)));
        }
        match self.dead_grant(store, stored, why).await {
            Err(Failure::Error(RefreshError::StoredStateChanged)) => {
                Err(Failure::Error(RefreshError::RejectedWhileRotated(e)))
            }
            other => other,
        }
    }

    /// Records durably that the stored refresh token must not be presented again and a
    /// human must re-authorize (`why`), so that no process sends it.
    async fn dead_grant(
        &mut self,
        store: &Arc<dyn Store>,
        stored: &StoredState,
        why: String,
    ) -> Result<RefreshResult, Failure> {
        let marker = stored.requiring_reauthorization(why.clone(), now_ms(), &self.instance_id);
        match store
            .compare_and_swap(self.name(), stored.generation, &marker)
            .await
        {
            Ok(CasOutcome::Swapped) => {
                self.metrics.store_op("compare_and_swap", true);
                self.known_generation = marker.generation;
            }
            Ok(CasOutcome::Conflict { .. }) => {
                self.metrics.store_op("compare_and_swap", false);
                return Err(Failure::Error(RefreshError::StoredStateChanged));
            }
            Err(se) => {
                self.metrics.store_op("compare_and_swap", false);
                warn!(credential = %self.name(), error = %se, "cannot record the rejection in the store");
            }
        }
        self.enter_reauthorization(why.clone());
        self.cred
            .record(Trigger::Scheduled, RefreshResult::Failure, Some(why), None);
        Err(Failure::Idle)
    }
}

/// Renews `lease` every third of its TTL, forever (dropped when the refresh ends). A
/// failed renewal is counted and marks the lease as possibly lost; later renewals keep
/// trying, since the lease may still be ours (a passing store outage).
async fn keep_renewing(
    lease: &dyn Lease,
    ttl: Duration,
    lost: &AtomicBool,
    metrics: &Metrics,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(policy::lease_renew_interval(ttl)).await;
        let renewed = lease.renew().await;
        metrics.store_op("lease_renew", renewed);
        if !renewed {
            lost.store(true, Ordering::Relaxed);
        }
    }
}
