//! Breadth-first exploration of every reachable state, checking each step and state.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use super::model::{Event, Exception, Model, Note, State};

/// Counts of the named exceptions, one per explored transition that shows it.
#[derive(Debug, Default)]
pub struct Tally([u64; Exception::ALL.len()]);

impl Tally {
    pub fn of(&self, e: Exception) -> u64 {
        self.0[e as usize]
    }

    fn count(&mut self, e: Exception) {
        self.0[e as usize] += 1;
    }
}

#[derive(Debug)]
pub struct Report {
    pub states: usize,
    pub transitions: u64,
    /// Length of the longest shortest path from the initial state.
    pub depth: u32,
    pub exceptions: Tally,
    /// The shortest trace found for each exception, in the order first found.
    pub witnesses: Vec<(Exception, Vec<String>)>,
}

/// A violated invariant and the shortest sequence of steps that reaches it.
#[derive(Debug)]
pub struct Counterexample {
    pub violation: &'static str,
    pub trace: Vec<String>,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.violation)?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

struct Node {
    state: u128,
    parent: u32,
    event: Option<Event>,
}

/// Explores every state reachable from the initial one; stops at the first violation.
pub fn explore(model: &Model) -> Result<Report, Counterexample> {
    let initial = State::initial();
    if let Some(violation) = initial.lost_token() {
        return Err(Counterexample {
            violation,
            trace: vec![initial.render(model.replicas())],
        });
    }
    let mut nodes = vec![Node {
        state: initial.pack(),
        parent: u32::MAX,
        event: None,
    }];
    let mut seen: HashSet<u128, BuildHasherDefault<PackedHasher>> = HashSet::default();
    seen.insert(nodes[0].state);
    let mut report = Report {
        states: 0,
        transitions: 0,
        depth: 0,
        exceptions: Tally::default(),
        witnesses: Vec::new(),
    };
    let mut steps = Vec::new();
    let mut level_start = 0;
    while level_start < nodes.len() {
        let level_end = nodes.len();
        for at in level_start..level_end {
            let state = State::unpack(nodes[at].state);
            model.steps(&state, &mut steps);
            for step in steps.drain(..) {
                report.transitions += 1;
                let violation = match step.note {
                    Note::Violation(v) => Some(v),
                    Note::Exception(e) => {
                        if report.exceptions.of(e) == 0 {
                            let witness = trace(model, &nodes, at, step.event, &step.next);
                            report.witnesses.push((e, witness));
                        }
                        report.exceptions.count(e);
                        None
                    }
                    Note::Nothing => None,
                };
                if let Some(violation) = violation.or_else(|| step.next.lost_token()) {
                    let trace = trace(model, &nodes, at, step.event, &step.next);
                    return Err(Counterexample { violation, trace });
                }
                let packed = step.next.pack();
                if seen.insert(packed) {
                    let parent = u32::try_from(at).expect("fewer than 2^32 states");
                    nodes.push(Node {
                        state: packed,
                        parent,
                        event: Some(step.event),
                    });
                }
            }
        }
        if nodes.len() > level_end {
            report.depth += 1;
        }
        level_start = level_end;
    }
    report.states = nodes.len();
    Ok(report)
}

/// The steps from the initial state to `last`, one line each, with the state after it.
fn trace(model: &Model, nodes: &[Node], from: usize, last: Event, reached: &State) -> Vec<String> {
    let mut path = vec![(Some(last), *reached)];
    let mut at = from;
    loop {
        let node = &nodes[at];
        path.push((node.event, State::unpack(node.state)));
        if node.parent == u32::MAX {
            break;
        }
        at = node.parent as usize;
    }
    path.reverse();
    let replicas = model.replicas();
    path.iter()
        .enumerate()
        .map(|(n, (event, state))| {
            let state = state.render(replicas);
            match event {
                Some(e) => format!("{n:>2}. {e}\n      {state}"),
                None => format!(" 0. initial\n      {state}"),
            }
        })
        .collect()
}

/// States are already dense bit fields: one multiply-xor round spreads them enough,
/// and costs far less than SipHash in an unoptimised test build.
#[derive(Default)]
struct PackedHasher(u64);

impl Hasher for PackedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, v: u128) {
        let mixed = (v as u64) ^ ((v >> 64) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let h = mixed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        self.0 = h ^ (h >> 31);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
