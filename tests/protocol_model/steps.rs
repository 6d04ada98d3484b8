//! Every step the replicas and their environment can take from a state.

use super::model::{
    Event, Exception, Fate, Lease, Model, Note, Outcome, Phase, Replica, State, Step, MARKER,
    SPENT_TOKEN_SENT, TWO_IN_FLIGHT,
};

impl Model {
    /// Every step possible from `s`, appended to `out`.
    pub fn steps(&self, s: &State, out: &mut Vec<Step>) {
        for i in 0..usize::from(self.bounds.replicas) {
            self.replica_steps(s, i, out);
            self.crash(s, i, out);
        }
        self.lease_expiry(s, out);
    }

    fn replica_steps(&self, s: &State, i: usize, out: &mut Vec<Step>) {
        match s.replicas[i].phase {
            Phase::Idle => {
                adopt_by_watch(s, i, out);
                take_lease(s, i, out);
            }
            Phase::Leased => load(s, i, out),
            Phase::Loaded { generation, token } => self.confirm(s, i, generation, token, out),
            Phase::Confirmed { generation, token } => self.send(s, i, generation, token, out),
            Phase::InFlight { generation, token } => self.answer(s, i, generation, token, out),
            Phase::Writing { generation, token } => {
                self.write(s, i, generation, token, out);
                self.fail_renewal(s, i, out);
            }
            Phase::Rejected { generation } => {
                reread_after_rejection(s, i, generation, out);
                self.fail_renewal(s, i, out);
            }
            Phase::MarkingRejected { generation } => {
                write_marker(s, i, generation, out);
                self.fail_renewal(s, i, out);
            }
            Phase::Reauthorization => {}
            Phase::Crashed => restart(s, i, out),
        }
    }

    /// Confirm-before-send: the lease must still be this replica's (the store also
    /// guarantees timeout + margin left, which the lease-expiry rule relies on).
    fn confirm(&self, s: &State, i: usize, generation: u8, token: u8, out: &mut Vec<Step>) {
        let mut n = *s;
        if !self.protocol.confirm_before_send || s.lease == Lease::Held(i as u8) {
            n.replicas[i].phase = Phase::Confirmed { generation, token };
        } else {
            n.end_attempt(i, Phase::Idle);
        }
        push(out, n, Event::Confirm(i as u8), Note::Nothing);
    }

    fn send(&self, s: &State, i: usize, generation: u8, token: u8, out: &mut Vec<Step>) {
        let would_rotate = !s.revoked && token == s.current;
        if would_rotate && s.current >= self.bounds.rotations {
            return;
        }
        let note = if in_flight_elsewhere(s, i) {
            Note::Violation(TWO_IN_FLIGHT)
        } else if token < s.current {
            s.excuse_reuse(token)
                .map_or(Note::Violation(SPENT_TOKEN_SENT), |_| Note::Nothing)
        } else {
            Note::Nothing
        };
        let mut n = *s;
        n.replicas[i].phase = Phase::InFlight { generation, token };
        push(out, n, Event::Send(i as u8), note);
    }

    fn answer(&self, s: &State, i: usize, generation: u8, token: u8, out: &mut Vec<Step>) {
        let event = |o| Event::Answer(i as u8, o);

        let mut n = *s;
        n.end_attempt(i, Phase::Idle);
        push(out, n, event(Outcome::LostBeforeActing), Note::Nothing);

        let mut acted = *s;
        let (issued, note) = acted.serve(token, s);
        let Some(new) = issued else {
            let mut n = acted;
            n.replicas[i].phase = Phase::Rejected { generation };
            push(out, n, event(Outcome::InvalidGrant), note);
            let mut n = acted;
            n.end_attempt(i, Phase::Idle);
            push(out, n, event(Outcome::LostAfterActing), note);
            return;
        };
        let mut n = acted;
        n.fates[usize::from(new)] = Fate::Held;
        n.replicas[i].phase = Phase::Writing {
            generation,
            token: new,
        };
        push(out, n, event(Outcome::Usable), Note::Nothing);
        if !self.protocol.keep_unusable_answer {
            n.fates[usize::from(new)] = Fate::Dropped;
            n.end_attempt(i, Phase::Idle);
        }
        push(out, n, event(Outcome::UnusableAccessToken), Note::Nothing);

        let mut n = acted;
        n.fates[usize::from(new)] = Fate::TimedOut;
        n.end_attempt(i, Phase::Idle);
        let lost = Note::Exception(Exception::LostInTransit);
        push(out, n, event(Outcome::LostAfterActing), lost);
    }

    /// CAS(generation → generation + 1). A lost acknowledgement leaves the replica writing;
    /// its retry recognises its own write (same generation and token).
    fn write(&self, s: &State, i: usize, generation: u8, token: u8, out: &mut Vec<Step>) {
        let event = |ack_lost| Event::Write {
            replica: i as u8,
            ack_lost,
        };
        let mut n = *s;
        if s.stored_generation == generation || !self.protocol.compare_generation {
            n.stored_generation = generation + 1;
            n.stored = token;
            n.fates[usize::from(token)] = Fate::Durable;
            push(out, n, event(true), Note::Nothing);
            n.replicas[i].known = generation + 1;
            n.end_attempt(i, Phase::Idle);
        } else if s.stored_generation == generation + 1 && s.stored == token {
            n.replicas[i].known = generation + 1;
            n.end_attempt(i, Phase::Idle);
        } else {
            // Conflict with a write that is not its own: the stored state wins.
            if n.fates[usize::from(token)] == Fate::Held {
                n.fates[usize::from(token)] = Fate::Dropped;
            }
            n.end_attempt(i, Phase::Idle);
        }
        push(out, n, event(false), Note::Nothing);
    }

    /// A renewal fails while the holder still has an answer to write or a rejection to
    /// record: the store is unreachable from it, so its lease may run out.
    fn fail_renewal(&self, s: &State, i: usize, out: &mut Vec<Step>) {
        let r = s.replicas[i];
        if r.renewal_failed
            || s.lease != Lease::Held(i as u8)
            || s.renewal_failures >= self.bounds.renewal_failures
        {
            return;
        }
        let mut n = *s;
        n.renewal_failures += 1;
        n.replicas[i].renewal_failed = true;
        push(out, n, Event::RenewalFails(i as u8), Note::Nothing);
    }

    fn crash(&self, s: &State, i: usize, out: &mut Vec<Step>) {
        let phase = s.replicas[i].phase;
        if phase == Phase::Crashed || s.crashes >= self.bounds.crashes {
            return;
        }
        let mut n = *s;
        n.crashes += 1;
        if n.lease == Lease::Held(i as u8) {
            n.lease = Lease::Orphaned;
        }
        n.replicas[i] = Replica {
            phase: Phase::Crashed,
            known: 0,
            renewal_failed: false,
        };
        let event = |server_acted| Event::Crash {
            replica: i as u8,
            server_acted,
        };
        match phase {
            Phase::InFlight { token, .. } => {
                push(out, n, event(false), Note::Nothing);
                let (issued, note) = n.serve(token, s);
                if let Some(new) = issued {
                    n.fates[usize::from(new)] = Fate::HolderCrashed;
                    push(out, n, event(true), Note::Exception(Exception::LostByCrash));
                } else {
                    push(out, n, event(true), note);
                }
            }
            Phase::Writing { token, .. } if n.fates[usize::from(token)] == Fate::Held => {
                n.fates[usize::from(token)] = Fate::HolderCrashed;
                push(
                    out,
                    n,
                    event(false),
                    Note::Exception(Exception::LostByCrash),
                );
            }
            _ => push(out, n, event(false), Note::Nothing),
        }
    }

    /// Lease expiry as an event. A crashed holder's lease expires after the TTL. A live
    /// holder's may expire before it confirms (confirm then refuses to send), never
    /// between confirm and the end of its request (confirm guarantees timeout + margin),
    /// and after the answer only if its renewal failed.
    fn lease_expiry(&self, s: &State, out: &mut Vec<Step>) {
        let mut n = *s;
        n.lease = Lease::Free;
        match s.lease {
            Lease::Free => {}
            Lease::Orphaned => push(out, n, Event::LeaseExpires, Note::Nothing),
            Lease::Held(i) => {
                let r = s.replicas[usize::from(i)];
                let may_expire = match r.phase {
                    Phase::Leased | Phase::Loaded { .. } => true,
                    Phase::Confirmed { .. } | Phase::InFlight { .. } => {
                        !self.protocol.confirm_before_send
                    }
                    p if p.after_answer() => r.renewal_failed || !self.protocol.renew_while_writing,
                    _ => unreachable!("an idle or crashed replica holds no live lease"),
                };
                if !may_expire {
                    return;
                }
                let note = match r.phase {
                    Phase::Writing { token, .. }
                        if r.renewal_failed && s.fates[usize::from(token)] == Fate::Held =>
                    {
                        n.cut_off |= 1 << token;
                        Note::Exception(Exception::LeaseLostBeforeWrite)
                    }
                    _ => Note::Nothing,
                };
                push(out, n, Event::LeaseExpires, note);
            }
        }
    }
}

impl State {
    fn release(&mut self, i: usize) {
        if self.lease == Lease::Held(i as u8) {
            self.lease = Lease::Free;
        }
    }

    /// Ends replica `i`'s attempt: the lease goes back (if still its own).
    fn end_attempt(&mut self, i: usize, phase: Phase) {
        self.release(i);
        let r = &mut self.replicas[i];
        r.phase = phase;
        r.renewal_failed = false;
    }

    /// The token endpoint handles `token`. Returns the new token if it issued one, and
    /// the exception or violation if the token was already spent.
    fn serve(&mut self, token: u8, before: &State) -> (Option<u8>, Note) {
        if token < self.current {
            self.revoked = true;
            let note = match before.excuse_reuse(token) {
                Ok(e) => Note::Exception(e),
                Err(v) => Note::Violation(v),
            };
            return (None, note);
        }
        if self.revoked {
            return (None, Note::Nothing);
        }
        self.current += 1;
        (Some(self.current), Note::Nothing)
    }
}

fn push(out: &mut Vec<Step>, next: State, event: Event, note: Note) {
    out.push(Step { next, event, note });
}

fn in_flight_elsewhere(s: &State, i: usize) -> bool {
    s.replicas
        .iter()
        .enumerate()
        .any(|(j, r)| j != i && matches!(r.phase, Phase::InFlight { .. }))
}

/// The store's watch (or polling) shows an idle replica a newer generation.
fn adopt_by_watch(s: &State, i: usize, out: &mut Vec<Step>) {
    if s.stored_generation == s.replicas[i].known {
        return;
    }
    let mut n = *s;
    adopt_stored(&mut n, i);
    push(out, n, Event::Adopt(i as u8), Note::Nothing);
}

/// Takes what the store holds as this replica's own; a marker means reauthorization.
fn adopt_stored(n: &mut State, i: usize) {
    n.replicas[i].known = n.stored_generation;
    let phase = if n.stored == MARKER {
        Phase::Reauthorization
    } else {
        Phase::Idle
    };
    n.end_attempt(i, phase);
}

fn take_lease(s: &State, i: usize, out: &mut Vec<Step>) {
    if s.lease != Lease::Free {
        return;
    }
    let mut n = *s;
    n.lease = Lease::Held(i as u8);
    n.replicas[i].phase = Phase::Leased;
    push(out, n, Event::TakeLease(i as u8), Note::Nothing);
}

/// Re-reads the store under the lease: adopt if the generation moved, else go on.
fn load(s: &State, i: usize, out: &mut Vec<Step>) {
    let mut n = *s;
    if s.stored_generation != s.replicas[i].known || s.stored == MARKER {
        adopt_stored(&mut n, i);
    } else {
        n.replicas[i].phase = Phase::Loaded {
            generation: s.stored_generation,
            token: s.stored,
        };
    }
    push(out, n, Event::Load(i as u8), Note::Nothing);
}

/// After invalid_grant: adopt if another replica rotated meanwhile, else record it.
fn reread_after_rejection(s: &State, i: usize, generation: u8, out: &mut Vec<Step>) {
    let mut n = *s;
    if s.stored_generation != generation {
        adopt_stored(&mut n, i);
    } else {
        n.replicas[i].phase = Phase::MarkingRejected { generation };
    }
    push(out, n, Event::ReRead(i as u8), Note::Nothing);
}

/// CAS(generation → generation + 1, marker). Whether or not the store took it (it may
/// be unreachable), the replica goes idle awaiting reauthorization; on a conflict it
/// retries later and adopts what it finds.
fn write_marker(s: &State, i: usize, generation: u8, out: &mut Vec<Step>) {
    let event = |stored| Event::WriteMarker {
        replica: i as u8,
        stored,
    };
    if s.stored_generation == generation {
        let mut n = *s;
        n.stored_generation = generation + 1;
        n.stored = MARKER;
        n.replicas[i].known = generation + 1;
        n.end_attempt(i, Phase::Reauthorization);
        push(out, n, event(true), Note::Nothing);
        let mut n = *s;
        n.end_attempt(i, Phase::Reauthorization);
        push(out, n, event(false), Note::Nothing);
    } else {
        let mut n = *s;
        n.end_attempt(i, Phase::Idle);
        push(out, n, event(false), Note::Nothing);
    }
}

/// A restarted replica remembers nothing and starts by loading the store.
fn restart(s: &State, i: usize, out: &mut Vec<Step>) {
    let mut n = *s;
    n.replicas[i].phase = Phase::Idle;
    push(out, n, Event::Restart(i as u8), Note::Nothing);
}
