#!/usr/bin/env bash
# Packaging tests: Helm chart (lint, render, Kubernetes schema validation, `tokenrelay
# check` of the rendered config), Prometheus rules (promtool), systemd unit
# (systemd-analyze) and the container image (buildah).
#
# Usage: scripts/test-packaging.sh [pytest arguments...]
# Environment:
#   TOKENRELAY_BIN         binary for `tokenrelay check` (default target/debug/tokenrelay;
#                          those tests skip while it does not exist)
#   TOKENRELAY_STATIC_BIN  prebuilt static binary for the image test (default: cargo build)
#   PACKAGING_NO_APT=1     never call apt-get; tests whose tools are missing skip
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

log() { echo "test-packaging: $*" >&2; }

# --- Debian packages, only those missing ---------------------------------------------------
apt_install() {
    [[ "${PACKAGING_NO_APT:-0}" == 1 ]] && { log "PACKAGING_NO_APT=1: not installing $*"; return 0; }
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n); else
            log "not root and no sudo: not installing $*; the tests that need them skip"; return 0
        fi
    fi
    command -v apt-get >/dev/null || { log "no apt-get: not installing $*"; return 0; }
    log "installing Debian packages: $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || true
    # The prometheus package would start a server where an init system runs; policy-rc.d
    # stops that for the duration of the install.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 0755 "$policy"
        created_policy=1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
        || log "apt-get install $* failed; the tests that need them skip"
    [[ $created_policy -eq 1 ]] && "${sudo[@]}" rm -f "$policy"
    return 0
}

source "$repo_root/scripts/lib/test-tools.sh"
mapfile -t missing < <(missing_test_packages packaging)
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_install "${missing[@]}"
fi

# --- Python environment ----------------------------------------------------------------------
venv="$repo_root/.venv-packaging"
requirements="$repo_root/tests/packaging/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    python3 -m venv "$venv"
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    log "installing $(grep -cv '^\s*\(#\|$\)' "$requirements") Python packages"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    echo "$want" >"$stamp"
fi

# --- Run ----------------------------------------------------------------------------------
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest tests/packaging -p no:cacheprovider -ra "$@"
