#!/usr/bin/env bash
# Mutation testing of the code that keeps the promise: cargo-mutants over three scopes,
# each mutant judged by the test targets that exercise its scope's code:
#
#   credential  src/credential/**        unit tests, the simulation, the store contract,
#                                        the in-doubt, promise, rotation, single-flight,
#                                        provider, replica and grant tests
#   store       src/store/**             unit tests, the store contract (file, Redis,
#                                        etcd), the simulation, Redis durability,
#                                        rollback, encryption and transfer tests
#   response    src/oauth/response.rs    unit tests, the in-doubt, promise, rotation,
#                                        grants and providers tests
#
#   scripts/mutants.sh                          # every scope (hours on two cores)
#   scripts/mutants.sh store                    # one scope
#   scripts/mutants.sh store --shard 1/4        # a quarter of it
#   scripts/mutants.sh store -f src/store/file.rs   # one file of a scope
#   scripts/mutants.sh credential --in-diff changes.diff   # only what a diff touches
#
# Results land in target/mutants-SCOPE/mutants.out; the summary is kept in
# docs/mutation-testing.md. Arguments after the scope go to `cargo mutants`. Installs
# cargo-mutants from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null; then
    cargo install cargo-mutants --locked
fi

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
    threads=(--test-threads "${MUTANTS_TEST_THREADS:-12}")
fi

files_of() {
    case "$1" in
        credential) echo "src/credential/**/*.rs" ;;
        store) echo "src/store/**/*.rs" ;;
        response) echo "src/oauth/response.rs" ;;
    esac
}

targets_of() {
    case "$1" in
        credential) echo "--lib --test simulation --test store_contract --test in_doubt --test promise --test rotation --test single_flight --test providers --test replicas --test grants" ;;
        store) echo "--lib --test store_contract --test simulation --test redis_durability --test rollback --test encryption --test transfer" ;;
        response) echo "--lib --test in_doubt --test promise --test rotation --test grants --test providers" ;;
    esac
}

run_scope() {
    local scope=$1
    shift
    local files=(-f "$(files_of "$scope")")
    for arg in "$@"; do
        case "$arg" in
            -f | --file) files=() ;;
        esac
    done
    # The targets go to every cargo call, the build's included: a mutant then builds
    # the scope's few test binaries, not all of them.
    local targets=()
    for word in $(targets_of "$scope"); do
        targets+=("--cargo-arg=$word")
    done
    cargo mutants --features etcd --timeout "${MUTANTS_TIMEOUT:-120}" --output "target/mutants-$scope" \
        "${tool[@]}" "${targets[@]}" "$@" "${files[@]}" \
        -- "${threads[@]}"
}

case "${1:-all}" in
    credential | store | response)
        scope=$1
        shift
        run_scope "$scope" "$@"
        ;;
    all)
        [ $# -gt 0 ] && shift
        status=0
        for scope in response store credential; do
            run_scope "$scope" "$@" || status=$?
        done
        exit "$status"
        ;;
    *)
        echo "usage: scripts/mutants.sh [credential|store|response|all] [cargo-mutants arguments]" >&2
        exit 2
        ;;
esac
