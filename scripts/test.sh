#!/usr/bin/env bash
# Installs what the tests need (when missing) and runs every check and test:
# formatting, clippy (-D warnings), unit and integration tests, packaging tests.
#   scripts/test.sh            # everything
#   SKIP_PACKAGING=1 scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have promtool || need_apt+=(prometheus)
have chromium || need_apt+=(chromium)
have redis-server || need_apt+=(redis-server)
have etcd || need_apt+=(etcd-server)
# The etcd store (cargo feature `etcd`) compiles etcd's protobufs with protoc.
have protoc || need_apt+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets --features etcd -- -D warnings"
cargo clippy --all-targets --locked --features etcd -- -D warnings
echo "== cargo test"
TOKENRELAY_REQUIRE_TOOLS=1 cargo test --locked --all-targets --features etcd -- --test-threads=2
if [ -z "${SKIP_PACKAGING:-}" ] && [ -x scripts/test-packaging.sh ]; then
  echo "== packaging tests"
  cargo build --locked --features etcd
  TOKENRELAY_BIN="$PWD/target/debug/tokenrelay" scripts/test-packaging.sh
fi
echo "== all tests passed"
