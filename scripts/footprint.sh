#!/usr/bin/env bash
# Sidecar footprint, measured on loopback (a measurement script, not a timed test).
#
#   1. builds the release binary (cargo build --release --locked --features etcd);
#   2. starts a token endpoint and a plain-http upstream (one small Python process,
#      127.0.0.1 only) and, RUNS times, interleaved:
#        - idle RSS (VmRSS from /proc/PID/status, SETTLE s after /readyz answers 200)
#          with 1 and with 50 client_credentials credentials, each with its upstream,
#          with the default worker threads and with runtime.worker_threads: 1;
#        - time from process start to /readyz 200 with a stored valid token: a
#          refresh_token credential on the file store, seeded beforehand with
#          `tokenrelay seed --access-token-file - --expires-in 1h`; the token endpoint
#          must see no request;
#        - RSS with CONNS idle keep-alive connections on one listener (each sent one
#          request, got its 200, and stays open), and the increase over idle;
#   3. binary size as built and stripped; when buildah works, the image size
#      (scripts/build-image.sh) and the idle RSS of the image's static binary;
#   4. prints a markdown table: each run's figure, the median, the target.
#
# Usage: scripts/footprint.sh [--no-build] [--no-image]
# Needs python3, curl, ss (iproute2) and strip (binutils); buildah for the image.
# Environment (defaults in brackets):
#   RUNS [3]  SETTLE [3] s  CONNS [2000]  BASE_PORT [18400] (uses BASE_PORT..+2, +10..+59)
#   TOKENRELAY_BIN     measure this binary instead of building one
#   CARGO_TARGET_DIR   honoured (e.g. a target directory of its own, to skip a busy build lock)
#   LOAD_MAX [cores]   before each run, wait up to QUIET_WAIT [300] s for the 1-minute load
#                      average to fall below this (the figures are noisy on a busy machine)
#   IMAGE [1]          0 skips the image (as --no-image); the image build is a second,
#                      static, cargo build, unless IMAGE_BINARY names a prebuilt static one
#   KEEP [0]           1 keeps the work directory (configs, logs) and prints its path
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=1
IMAGE=${IMAGE:-1}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-build) build=0; shift ;;
        --no-image) IMAGE=0; shift ;;
        -h|--help) sed -n '2,31s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "footprint: unknown argument: $1" >&2; exit 2 ;;
    esac
done
RUNS=${RUNS:-3}
SETTLE=${SETTLE:-3}
CONNS=${CONNS:-2000}
BASE_PORT=${BASE_PORT:-18400}
LOAD_MAX=${LOAD_MAX:-$(nproc)}
QUIET_WAIT=${QUIET_WAIT:-300}
KEEP=${KEEP:-0}
target_dir=${CARGO_TARGET_DIR:-$here/target}

log() { echo "footprint: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Both the client and the proxy hold CONNS sockets (the proxy also its upstream ones).
want_fds=$(( CONNS * 2 + 1024 ))
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt $want_fds ]]; then
    ulimit -n "$want_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)" ||
        die "cannot raise the open-files limit to $want_fds"
fi
[[ $(ulimit -n) == unlimited || $(ulimit -n) -ge $(( CONNS + 256 )) ]] ||
    die "the open-files limit $(ulimit -n) is too low for CONNS=$CONNS (hard limit $(ulimit -Hn))"

# 1. The binary.
if [[ -n "${TOKENRELAY_BIN:-}" ]]; then
    bin=$(realpath "$TOKENRELAY_BIN")
elif [[ $build -eq 1 ]]; then
    log "cargo build --release --locked --features etcd (target dir $target_dir)"
    (cd "$here" && cargo build --release --locked --features etcd --bin tokenrelay)
    bin=$target_dir/release/tokenrelay
else
    bin=$target_dir/release/tokenrelay
fi
[[ -x "$bin" ]] || die "no executable at $bin"

work=$(mktemp -d /tmp/tokenrelay-footprint.XXXXXX)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ $KEEP -eq 1 ]]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

tok_port=$BASE_PORT
up_port=$(( BASE_PORT + 1 ))
admin_port=$(( BASE_PORT + 2 ))
first_listen=$(( BASE_PORT + 10 ))
for p in $tok_port $up_port $admin_port $(seq $first_listen $(( first_listen + 49 ))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p on 127.0.0.1 is in use; set BASE_PORT"
    fi
done

# The helpers: token endpoint + upstream ("servers"), the readiness timer ("ready"), and
# the idle-connection client ("idle"). Loopback only.
cat > "$work/helper.py" <<'PY'
import asyncio, json, os, socket, subprocess, sys, time

def servers(tok_port, up_port):
    token_requests = 0

    async def read_request(reader):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        if length:
            await reader.readexactly(length)
        return method, target

    def response(status, body, ctype="text/plain"):
        return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def token(reader, writer):
        nonlocal token_requests
        try:
            while True:
                method, target = await read_request(reader)
                if method == "POST" and target.startswith("/token"):
                    token_requests += 1
                    body = json.dumps({"access_token": "footprint-token-7f3a",
                                       "token_type": "Bearer", "expires_in": 3600}).encode()
                    writer.write(response("200 OK", body, "application/json"))
                elif target == "/count":
                    writer.write(response("200 OK", str(token_requests).encode()))
                else:
                    writer.write(response("404 Not Found", b"no\n"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def upstream(reader, writer):
        try:
            while True:
                await read_request(reader)
                writer.write(response("200 OK", b"ok"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        a = await asyncio.start_server(token, "127.0.0.1", tok_port)
        b = await asyncio.start_server(upstream, "127.0.0.1", up_port, backlog=4096)
        print("listening", flush=True)
        await asyncio.gather(a.serve_forever(), b.serve_forever())
    asyncio.run(main())

def get(port, path, timeout=1.0):
    """Status code of GET path on 127.0.0.1:port, or None if nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(64)
            return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
    except OSError:
        return None

def ready(bin_, config, admin_port, logfile):
    """Milliseconds from starting the process to the first /readyz 200."""
    with open(logfile, "ab") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen([bin_, "run", "--config", config], stdout=out, stderr=out)
        try:
            while True:
                if get(admin_port, "/readyz") == 200:
                    print(f"{(time.perf_counter() - t0) * 1000:.1f}")
                    return
                if p.poll() is not None:
                    sys.exit(f"tokenrelay exited with {p.returncode}; see {logfile}")
                if time.perf_counter() - t0 > 10:
                    sys.exit("not ready within 10 s")
                time.sleep(0.0005)
        finally:
            p.terminate()
            p.wait()

def idle(port, n, marker):
    """Opens n keep-alive connections, one request each, and holds them open."""
    async def main():
        sem = asyncio.Semaphore(64)
        conns, failed = [], 0
        async def one():
            nonlocal failed
            async with sem:
                try:
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    w.write(b"GET /idle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    await w.drain()
                    head = await r.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            length = int(v)
                    await r.readexactly(length)
                    if not head.startswith(b"HTTP/1.1 200"):
                        failed += 1
                    conns.append((r, w))
                except (OSError, asyncio.IncompleteReadError):
                    failed += 1
        await asyncio.gather(*(one() for _ in range(n)))
        with open(marker, "w") as f:
            f.write(f"{len(conns)} {failed}\n")
        await asyncio.sleep(3600)
    asyncio.run(main())

if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "servers":
        servers(int(args[0]), int(args[1]))
    elif mode == "ready":
        ready(args[0], args[1], int(args[2]), args[3])
    elif mode == "idle":
        idle(int(args[0]), int(args[1]), args[2])
PY

py() { python3 "$work/helper.py" "$@"; }

python3 "$work/helper.py" servers "$tok_port" "$up_port" > "$work/servers.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/servers.log" 2>/dev/null && break; sleep 0.1; done
grep -q listening "$work/servers.log" || die "the helper servers did not start: $(cat "$work/servers.log")"
token_requests() { curl -sf "http://127.0.0.1:$tok_port/count"; }

# A config with n client_credentials credentials, each with its upstream.
write_config() { # file n [extra runtime yaml]
    local file=$1 n=$2 i
    {
        echo "admin: { listen: \"127.0.0.1:$admin_port\" }"
        echo "store: { type: file, path: \"$work/state\" }"
        echo "log: { level: warn }"
        [[ -z "${3:-}" ]] || echo "runtime: { $3 }"
        echo "credentials:"
        for i in $(seq "$n"); do
            echo "  c$i: { grant: client_credentials, token_url: \"http://127.0.0.1:$tok_port/token\", client_id: footprint, client_secret: footprint-secret, allow_insecure_http: true }"
        done
        echo "upstreams:"
        for i in $(seq "$n"); do
            echo "  u$i: { listen: \"127.0.0.1:$(( first_listen + i - 1 ))\", url: \"http://127.0.0.1:$up_port\", credential: c$i, allow_insecure_http: true, limits: { idle_timeout: 10m } }"
        done
    } > "$file"
}

rss_kib() { awk -v f="${2:-VmRSS}:" '$1 == f { print $2 }' "/proc/$1/status"; }
threads() { awk '/^Threads:/ { print $2 }' "/proc/$1/status"; }

proxy_pid=""
start_proxy() { # config
    "$bin" run --config "$1" >> "$work/proxy.log" 2>&1 &
    proxy_pid=$!
    pids+=("$proxy_pid")
    local i
    for i in $(seq 200); do
        [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/readyz")" == 200 ]] && return 0
        kill -0 "$proxy_pid" 2>/dev/null || die "tokenrelay exited; see $work/proxy.log: $(tail -5 "$work/proxy.log")"
        sleep 0.05
    done
    die "tokenrelay was not ready within 10 s; see $work/proxy.log"
}
stop_proxy() {
    kill -TERM "$proxy_pid" 2>/dev/null || true
    wait "$proxy_pid" 2>/dev/null || true
    proxy_pid=""
}

wait_quiet() {
    local waited=0 load
    while :; do
        load=$(cut -d' ' -f1 /proc/loadavg)
        awk -v l="$load" -v m="$LOAD_MAX" 'BEGIN { exit !(l < m) }' && break
        if [[ $waited -ge $QUIET_WAIT ]]; then
            log "load $load is still at or above $LOAD_MAX after ${QUIET_WAIT}s; measuring anyway"
            break
        fi
        [[ $waited -gt 0 ]] || log "waiting for the 1-minute load ($load) to fall below $LOAD_MAX"
        sleep 10; waited=$(( waited + 10 ))
    done
    echo "$load"
}

declare -A fig       # fig[name] = "v1 v2 v3"
add() { fig[$1]="${fig[$1]:-}${fig[$1]:+ }$2"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

cfg1=$work/one.yaml cfg1w=$work/one-w1.yaml cfg50=$work/fifty.yaml cfgr=$work/ready.yaml
write_config "$cfg1" 1
write_config "$cfg1w" 1 "worker_threads: 1"
write_config "$cfg50" 50
cat > "$cfgr" <<CONF
admin: { listen: "127.0.0.1:$admin_port" }
store: { type: file, path: "$work/ready-state" }
log: { level: warn }
credentials:
  c: { grant: refresh_token, token_url: "http://127.0.0.1:$tok_port/token", client_id: footprint, client_secret: footprint-secret, allow_insecure_http: true }
upstreams:
  u: { listen: "127.0.0.1:$first_listen", url: "http://127.0.0.1:$up_port", credential: c, allow_insecure_http: true }
CONF
printf 'footprint-long-lived-token\n' |
    "$bin" seed --config "$cfgr" --credential c --access-token-file - --expires-in 1h >/dev/null

for run in $(seq "$RUNS"); do
    load=$(wait_quiet)
    add load "$load"
    log "run $run/$RUNS (load $load)"

    for variant in 1:"$cfg1" 1w:"$cfg1w" 50:"$cfg50"; do
        start_proxy "${variant#*:}"
        sleep "$SETTLE"
        add "idle${variant%%:*}" "$(rss_kib "$proxy_pid")"
        add "anon${variant%%:*}" "$(rss_kib "$proxy_pid" RssAnon)"
        add "file${variant%%:*}" "$(rss_kib "$proxy_pid" RssFile)"
        add "threads${variant%%:*}" "$(threads "$proxy_pid")"
        stop_proxy
    done

    before=$(token_requests)
    add ready "$(py ready "$bin" "$cfgr" "$admin_port" "$work/proxy.log")"
    after=$(token_requests)
    [[ "$before" == "$after" ]] || die "the stored-token start made $(( after - before )) token request(s)"

    start_proxy "$cfg1"
    sleep "$SETTLE"
    base=$(rss_kib "$proxy_pid")
    rm -f "$work/idle.marker"
    python3 "$work/helper.py" idle "$first_listen" "$CONNS" "$work/idle.marker" > "$work/idle.log" 2>&1 &
    client=$!
    pids+=("$client")
    for _ in $(seq 1200); do [[ -s "$work/idle.marker" ]] && break; sleep 0.1; done
    [[ -s "$work/idle.marker" ]] || die "the idle client did not finish opening connections: $(tail -3 "$work/idle.log")"
    read -r opened failed < "$work/idle.marker"
    [[ $opened -eq $CONNS && $failed -eq 0 ]] || die "idle client: $opened open, $failed failed"
    sleep "$SETTLE"
    held=$(rss_kib "$proxy_pid")
    # Established app-side connections still open on the listener (the proxy's side).
    est=$(ss -Htn state established "( sport = :$first_listen )" | wc -l)
    [[ $est -eq $CONNS ]] || log "warning: $est of $CONNS connections are established"
    upconns=$(ss -Htn state established "( dport = :$up_port )" | wc -l)
    add conns "$held"
    add connsdelta "$(( held - base ))"
    add upconns "$upconns"
    add threadsc "$(threads "$proxy_pid")"
    kill -TERM "$client" 2>/dev/null || true
    wait "$client" 2>/dev/null || true
    stop_proxy
done

# 3. Sizes.
size_built=$(stat -c %s "$bin")
strip -o "$work/tokenrelay.stripped" "$bin"
size_stripped=$(stat -c %s "$work/tokenrelay.stripped")
image_row="not measured (--no-image or IMAGE=0)"
if [[ $IMAGE -ne 0 ]]; then
    if ! command -v buildah >/dev/null; then
        image_row="not measured: buildah is not installed"
    elif ! STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} buildah info >/dev/null 2>&1; then
        image_row="not measured: buildah does not work here ($(STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} buildah info 2>&1 | tail -1))"
    else
        tag=localhost/tokenrelay:footprint
        log "building the image (static binary, then buildah) as $tag"
        image_args=(--tag "$tag" --archive "$work/image.tar")
        [[ -z "${IMAGE_BINARY:-}" ]] || image_args+=(--binary "$IMAGE_BINARY")
        if "$here/scripts/build-image.sh" "${image_args[@]}" > "$work/image.log" 2>&1; then
            img=$(STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} buildah images --format '{{.Size}}' "$tag" | head -1)
            static=$(stat -c %s "$here/target/image/tokenrelay")
            image_row="$img (buildah images); OCI archive $(mib $(( $(stat -c %s "$work/image.tar") / 1024 ))) MiB; static binary in it $(mib $(( static / 1024 ))) MiB"
            STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} buildah rmi "$tag" >/dev/null 2>&1 || true
            # The image runs the static binary (no shared libc mapped): its idle RSS.
            bin=$here/target/image/tokenrelay
            for run in $(seq "$RUNS"); do
                start_proxy "$cfg1"
                sleep "$SETTLE"
                add idlestatic "$(rss_kib "$proxy_pid")"
                add anonstatic "$(rss_kib "$proxy_pid" RssAnon)"
                stop_proxy
            done
        else
            image_row="not measured: scripts/build-image.sh failed ($(tail -1 "$work/image.log"))"
        fi
    fi
fi

# 4. The table.
median() { tr ' ' '\n' | sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
row() { # label key format(mib|ms|n) target check(awk on median m, or empty)
    local label=$1 key=$2 fmt=$3 target=$4 check=$5 vals=() v m met=""
    for v in ${fig[$key]}; do
        case $fmt in mib) vals+=("$(mib "$v")") ;; *) vals+=("$v") ;; esac
    done
    m=$(echo "${fig[$key]}" | median)
    [[ $fmt == mib ]] && m=$(mib "$m")
    if [[ -n "$check" ]]; then
        if awk -v m="$m" "BEGIN { exit !($check) }"; then met=yes; else met=no; fi
    fi
    echo "| $label | ${vals[*]} | **$m** | $target | $met |"
}
echo
echo "tokenrelay footprint: $(git -C "$here" describe --always --dirty 2>/dev/null || echo unknown), $(uname -m), $(nproc) cores, $RUNS runs, load $(echo "${fig[load]}" | tr ' ' '/')"
echo
echo "| figure | runs | median | target | met |"
echo "| --- | --- | --- | --- | --- |"
row "idle RSS, 1 credential + upstream (MiB)" idle1 mib "≤ 8 MiB" "m <= 8"
row "… of it anonymous (heap, stacks) (MiB)" anon1 mib "" ""
row "… of it file-backed (binary and libraries) (MiB)" file1 mib "" ""
row "idle RSS, 1 credential, worker_threads: 1 (MiB)" idle1w mib "" ""
row "… of it anonymous (MiB)" anon1w mib "" ""
row "idle RSS, 50 credentials + upstreams (MiB)" idle50 mib "≤ 8 MiB" "m <= 8"
row "… of it anonymous (MiB)" anon50 mib "" ""
row "start to /readyz 200, stored valid token, 0 token requests (ms)" ready ms "≤ 50 ms" "m <= 50"
row "RSS with $CONNS idle keep-alive connections (MiB)" conns mib "" ""
row "… increase over idle (MiB)" connsdelta mib "≤ +16 MiB" "m <= 16"
row "… upstream connections pooled meanwhile" upconns n "" ""
echo "| binary as built / stripped (MiB) | | $(mib $(( size_built / 1024 ))) / $(mib $(( size_stripped / 1024 ))) | | |"
echo "| image | | $image_row | | |"
if [[ -n "${fig[idlestatic]:-}" ]]; then
    row "idle RSS, 1 credential, the image's static binary (MiB)" idlestatic mib "≤ 8 MiB" "m <= 8"
    row "… of it anonymous (MiB)" anonstatic mib "" ""
fi
echo
echo "Threads per run: idle with 1 credential ${fig[threads1]}; with worker_threads: 1 ${fig[threads1w]}; with 50 credentials ${fig[threads50]}; with the connections open ${fig[threadsc]}."
