//! An exhaustive model of the rotating-refresh protocol (docs/replicas.md, "The protocol
//! model"): replicas, the store with its lease, and a token endpoint with single-use
//! refresh tokens and reuse detection, explored breadth-first over every interleaving of
//! replica steps, crashes, lost answers, lost acknowledgements and lease expiry.
//!
//! Checked in every reachable state and step:
//! 1. the server is never presented a spent refresh token, except after a named loss
//!    (a timed-out request retried, a crash, a holder cut off from the store);
//! 2. the server's current refresh token is always stored or held by a live replica that
//!    is writing it, except after a timeout or a crash in the window;
//! 3. one refresh per rotation: never two requests in flight, never a second request for
//!    a rotation the server already made (same exceptions as 1).
//!
//! The negative controls run the same explorer on broken variants and expect it to fail.
//! `--nocapture` prints the figures, one shortest trace per exception, and the
//! counterexamples.

#[path = "protocol_model/codec.rs"]
mod codec;
#[path = "protocol_model/explorer.rs"]
mod explorer;
#[path = "protocol_model/model.rs"]
mod model;
#[path = "protocol_model/steps.rs"]
mod steps;

use std::time::Instant;

use explorer::{explore, Report};
use model::{Bounds, Exception, Model, Protocol};

/// The widest configuration that stays within seconds in an unoptimised build.
const THREE_REPLICAS: Bounds = Bounds {
    replicas: 3,
    rotations: 3,
    crashes: 2,
    renewal_failures: 1,
};

/// Fewer replicas, longer histories and more faults.
const TWO_REPLICAS: Bounds = Bounds {
    replicas: 2,
    rotations: 4,
    crashes: 2,
    renewal_failures: 2,
};

/// Small, for the negative controls: a broken variant must fail even here.
const CONTROL: Bounds = Bounds {
    replicas: 2,
    rotations: 2,
    crashes: 1,
    renewal_failures: 1,
};

#[test]
fn target_protocol_with_three_replicas_keeps_every_token_safe() {
    let report = check_target(THREE_REPLICAS);
    assert!(report.states > 500_000, "explored too little: {report:?}");
}

#[test]
fn target_protocol_with_two_replicas_and_more_faults_keeps_every_token_safe() {
    let report = check_target(TWO_REPLICAS);
    assert!(report.states > 100_000, "explored too little: {report:?}");
    for (exception, trace) in &report.witnesses {
        println!("shortest trace to {exception:?}:");
        for line in trace {
            println!("  {line}");
        }
    }
}

#[test]
fn sending_without_confirming_the_lease_is_caught() {
    expect_violation(
        Protocol {
            confirm_before_send: false,
            ..Protocol::TARGET
        },
        "two refresh requests are in flight",
    );
}

#[test]
fn discarding_a_new_refresh_token_that_came_with_an_unusable_access_token_is_caught() {
    expect_violation(
        Protocol {
            keep_unusable_answer: false,
            ..Protocol::TARGET
        },
        "invariant 2",
    );
}

#[test]
fn writing_without_comparing_the_generation_is_caught() {
    expect_violation(
        Protocol {
            compare_generation: false,
            ..Protocol::TARGET
        },
        "invariant 2",
    );
}

#[test]
fn letting_the_lease_lapse_while_writing_is_caught() {
    expect_violation(
        Protocol {
            renew_while_writing: false,
            ..Protocol::TARGET
        },
        "sent again",
    );
}

/// Explores the target protocol, which must hold; prints the figures, and checks every
/// named exception was reached, so the bounds are wide enough to show each of them.
fn check_target(bounds: Bounds) -> Report {
    let started = Instant::now();
    let model = Model::new(Protocol::TARGET, bounds);
    let report = explore(&model).unwrap_or_else(|cx| panic!("target protocol fails: {cx}"));
    println!(
        "{bounds:?}: {} states, {} transitions, depth {}, {:.1?}",
        report.states,
        report.transitions,
        report.depth,
        started.elapsed()
    );
    for e in Exception::ALL {
        println!("  {e:?}: {} transitions", report.exceptions.of(e));
        assert!(report.exceptions.of(e) > 0, "{e:?} never reached");
    }
    report
}

/// A broken variant must produce a violation of the named invariant, with a trace.
fn expect_violation(protocol: Protocol, expected: &str) {
    let model = Model::new(protocol, CONTROL);
    match explore(&model) {
        Ok(report) => panic!("{protocol:?} passed the checker: {report:?}"),
        Err(cx) => {
            println!("{protocol:?}: {cx}");
            assert!(cx.violation.contains(expected), "unexpected: {cx}");
            assert!(cx.trace.len() > 2, "no trace: {cx}");
        }
    }
}
