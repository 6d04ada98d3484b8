#!/usr/bin/env bash
# Before/after on the loopback benchmark: two tokenrelay binaries in the same run of
# ../shared/bench/run.sh, their rounds interleaved with nginx's (nginx, ours, base, nginx,
# ours, base, ...), so machine noise hits all three alike. Compare "cpu us/req" of `ours`
# (AFTER) and `base` (BEFORE) within one table. Usage, from the repository root:
#   scripts/bench-ab.sh BEFORE_BINARY AFTER_BINARY        # plain http, then https upstream
# Both binaries are built as for scripts/bench-ours.sh, e.g. for a commit C:
#   git worktree add /tmp/before C && (cd /tmp/before && cargo build --release)
# Knobs: ROUNDS [5], KINDS ["0 1": plain, then https; "1": https only], and the bench's own (DURATION, CONNS, WORKERS, PIN, ...).
# The bench harness takes one 'ours' slot; a temporary copy of it gains a second one
# ('base', port 18085) started the same way. Nothing outside the copy is changed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
before=$(realpath "${1:?usage: $0 BEFORE_BINARY AFTER_BINARY}")
after=$(realpath "${2:?usage: $0 BEFORE_BINARY AFTER_BINARY}")
bench=$(cd "$here/../shared/bench" && pwd)
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
cp -r "$bench"/. "$copy"/
python3 - "$copy/run.sh" <<'PATCH'
import sys
p = sys.argv[1]
s = open(p).read()
def sub(old, new):
    global s
    if old not in s:
        sys.exit(f"bench-ab: the bench harness changed; cannot add the 'base' slot near: {old!r}")
    s = s.replace(old, new, 1)
sub('[ -n "$OURS_CMD" ] && PEERS="$PEERS ours"',
    '[ -n "$OURS_CMD" ] && PEERS="$PEERS ours"\n[ -n "${BASE_CMD:-}" ] && PEERS="$PEERS base"\nBASE_PORT=${BASE_PORT:-18085}')
sub('ours) ports+=" $OURS_PORT";; esac; done',
    'ours) ports+=" $OURS_PORT";; base) ports+=" $BASE_PORT";; esac; done')
sub('  *) echo "unknown peer $peer" >&2; exit 2;;',
    '''  base)  [ "$UPSTREAM_TLS" = 1 ] && export UPSTREAM_CA=$RUN/ca.pem
         mkdir -p "$RUN/base"
         export BENCH_RUN_DIR=$RUN/base LISTEN_ADDR=127.0.0.1:$BASE_PORT UPSTREAM_URL=$UP_SCHEME://$UP_HOST:$UP_PORT \\
           TOKEN_URL=http://127.0.0.1:$TOKEN_PORT/token CLIENT_ID CLIENT_SECRET TOKEN WORKERS
         start "$CPU_PROXY" base sh -c "exec $BASE_CMD"
         PID[base]=$PID_base; URL[base]=http://127.0.0.1:$BASE_PORT/; wait_port "$BASE_PORT";;
  *) echo "unknown peer $peer" >&2; exit 2;;''')
open(p, "w").write(s)
PATCH
export BASE_CMD="env TOKENRELAY_BIN=$before $here/scripts/bench-ours.sh"
for tls in ${KINDS:-0 1}; do
  echo "=== UPSTREAM_TLS=$tls   ours = $after   base = $before"
  UPSTREAM_TLS=$tls PEERS=nginx ROUNDS=${ROUNDS:-5} MAX_SECONDS=${MAX_SECONDS:-900} \
    TOKENRELAY_BIN=$after "$copy/run.sh" "$here/scripts/bench-ours.sh" 18084
done
