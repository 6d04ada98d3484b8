#!/usr/bin/env bash
# The 'ours' slot of the loopback benchmark (../shared/bench/run.sh): tokenrelay with a
# client_credentials credential against the bench token server, in front of the bench
# upstream, with $WORKERS worker threads. With UPSTREAM_TLS=1 the bench upstream speaks
# https under a private CA, whose PEM file run.sh exports as $UPSTREAM_CA; it becomes the
# upstream's ca_file. Usage, from the repository root:
#   cargo build --release
#   ../shared/bench/run.sh "$PWD/scripts/bench-ours.sh" 18084
#   UPSTREAM_TLS=1 ../shared/bench/run.sh "$PWD/scripts/bench-ours.sh" 18084
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${TOKENRELAY_BIN:-$here/target/release/tokenrelay}
conf=$BENCH_RUN_DIR/tokenrelay.yaml
admin_port=$(( ${LISTEN_ADDR##*:} + 1000 ))
# Plain http needs the explicit opt-in; https is verified against the run's CA.
case $UPSTREAM_URL in
  https://*) trust="ca_file: \"${UPSTREAM_CA:?UPSTREAM_CA is required for an https upstream}\"" ;;
  *) trust="allow_insecure_http: true" ;;
esac
cat > "$conf" <<CONF
admin: { listen: "127.0.0.1:$admin_port" }
log: { level: warn }
credentials:
  bench:
    grant: client_credentials
    token_url: $TOKEN_URL
    client_id: \${CLIENT_ID}
    client_secret: \${CLIENT_SECRET}
    allow_insecure_http: true
upstreams:
  bench:
    listen: "$LISTEN_ADDR"
    url: $UPSTREAM_URL
    credential: bench
    $trust
CONF
exec "$bin" run --config "$conf" --worker-threads "$WORKERS"
