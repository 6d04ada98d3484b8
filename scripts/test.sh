#!/usr/bin/env bash
# Installs what the tests need (when missing) and runs every check and test:
# formatting, clippy (-D warnings), unit and integration tests, packaging tests.
#   scripts/test.sh            # everything
#   SKIP_PACKAGING=1 scripts/test.sh
# The programs the tests start, and their Debian packages, are listed in
# scripts/test-tools.txt; this script installs the packages of missing entries.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/test-tools.sh

need_apt=$(missing_test_packages)
if [ -n "$need_apt" ]; then
  echo "== installing Debian packages: $(echo $need_apt)"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  # The prometheus package would start a server where an init system runs; policy-rc.d
  # stops that for the duration of the install.
  policy=/usr/sbin/policy-rc.d; created_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 0755 "$policy"
    created_policy=1
  fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need_apt >/dev/null
  [ -n "$created_policy" ] && $SUDO rm -f "$policy"
fi
still_missing=$(missing_test_tools)
if [ -n "$still_missing" ]; then
  echo "== missing after the install step (scripts/test-tools.txt):" >&2
  echo "$still_missing" | sed 's/^/   /' >&2
  exit 1
fi

# Every step runs; the failures are reported together at the end.
failed=()
step() {
  local name="$1"; shift
  echo "== $name"
  if ! "$@"; then failed+=("$name"); fi
}

step "cargo fmt --check" cargo fmt --all -- --check
# --workspace: crates/testkit (the demo servers) too.
step "cargo clippy --workspace --all-targets --features etcd -- -D warnings" \
  cargo clippy --workspace --all-targets --locked --features etcd -- -D warnings
# The binary without the default `demo` feature (no `tokenrelay demo`, no crates/testkit).
step "cargo clippy --no-default-features -- -D warnings" \
  cargo clippy --locked --no-default-features -- -D warnings
# --no-fail-fast: one failing test target never hides the others.
step "cargo test" env TOKENRELAY_REQUIRE_TOOLS=1 \
  cargo test --locked --workspace --all-targets --features etcd --no-fail-fast -- --test-threads=2
if [ -z "${SKIP_PACKAGING:-}" ] && [ -x scripts/test-packaging.sh ]; then
  step "packaging tests" sh -c 'cargo build --locked --features etcd &&
    TOKENRELAY_REQUIRE_TOOLS=1 TOKENRELAY_BIN="$PWD/target/debug/tokenrelay" scripts/test-packaging.sh'
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "== FAILED: ${#failed[@]} step(s):" >&2
  printf '   %s\n' "${failed[@]}" >&2
  echo "   (cargo test lists its failing targets above, under 'error: N targets failed')" >&2
  exit 1
fi
echo "== all tests passed"
