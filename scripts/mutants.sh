#!/usr/bin/env bash
# Mutation testing of the code that keeps the promise: cargo-mutants over
# src/credential/, src/store/ and src/oauth/response.rs, each mutant judged by the
# test targets that exercise that code (unit tests, the simulation, the store contract,
# the in-doubt and promise tests). Results land in target/mutants/mutants.out; the
# summary is kept in docs/mutation-testing.md.
#
#   scripts/mutants.sh                 # the three scopes (hours on two cores)
#   scripts/mutants.sh -f src/oauth/response.rs      # one file
#   scripts/mutants.sh --in-diff changes.diff         # only code a diff touches
#
# Extra arguments go to `cargo mutants` before the scope. Installs cargo-mutants from
# crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null; then
    cargo install cargo-mutants --locked
fi

scope=(-f 'src/credential/**/*.rs' -f 'src/store/**/*.rs' -f src/oauth/response.rs)
for arg in "$@"; do
    case "$arg" in
        -f | --file) scope=() ;;
    esac
done

# A few hundred random histories per mutant: the replays and the first histories catch
# what the 10,000 of a full test run would, at a fraction of the time.
export SIMULATION_HISTORIES="${SIMULATION_HISTORIES:-300}"
export TOKENRELAY_REQUIRE_TOOLS="${TOKENRELAY_REQUIRE_TOOLS:-1}"

# Without debug info the per-mutant link is several seconds shorter.
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-0}"

# cargo-nextest runs the targets' tests side by side: most of them wait on timers, so
# a mutant's verdict then takes about as long as the slowest test, not the sum.
tool=(--test-tool cargo)
threads=()
if cargo nextest --version >/dev/null 2>&1; then
    tool=(--test-tool nextest)
    threads=(--test-threads "${MUTANTS_TEST_THREADS:-6}")
fi

exec cargo mutants --features etcd --timeout 300 --output target "${tool[@]}" \
    "$@" "${scope[@]}" \
    -- "${threads[@]}" --lib --test simulation --test store_contract --test in_doubt --test promise \
    --test rotation --test single_flight
