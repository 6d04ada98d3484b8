#!/usr/bin/env bash
# Build the tokenrelay container image without a container daemon and without pulling
# any base image:
#   1. build a statically linked release binary (glibc, crt-static);
#   2. stage it with the system CA bundle under target/image/;
#   3. build ./Dockerfile (FROM scratch) with buildah, the repository root as context.
#
# Usage: scripts/build-image.sh [--tag NAME:TAG] [--binary PATH] [--archive FILE] [--no-build]
#   --tag NAME:TAG   image name (default: localhost/tokenrelay:<Cargo.toml version>)
#   --binary PATH    use this prebuilt static binary instead of running cargo
#   --archive FILE   also write the image as an OCI archive (for `skopeo copy`,
#                    `docker load` via oci-archive, or pushing from CI)
#   --no-build       stage and check only; do not run buildah (e.g. to `docker build .`)
#
# Environment: STORAGE_DRIVER (default vfs) and BUILDAH_ISOLATION (default chroot) are
# read by buildah itself; the defaults work as root inside an unprivileged container.
# CARGO_TARGET_DIR is honoured. CA_BUNDLE overrides the CA bundle path.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_triple=x86_64-unknown-linux-gnu
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo_root/Cargo.toml" | head -n1)
tag="localhost/tokenrelay:${version:-dev}"
binary=""
archive=""
run_buildah=1

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --archive) archive=$2; shift 2 ;;
        --no-build) run_buildah=0; shift ;;
        -h|--help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "build-image: unknown argument: $1" >&2; exit 2 ;;
    esac
done

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Paths given on the command line are relative to where the script was called from.
[[ -z "$binary" ]] || binary=$(realpath "$binary")
[[ -z "$archive" ]] || archive=$(realpath -m "$archive")
cd "$repo_root"

# 1. The static binary.
if [[ -z "$binary" ]]; then
    log "building a static release binary for $target_triple"
    # With --target, RUSTFLAGS apply to the binary only, not to build scripts and
    # proc-macros, which must stay dynamically linked to run on the host.
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --features etcd --target "$target_triple" --bin tokenrelay
    binary="${CARGO_TARGET_DIR:-target}/$target_triple/release/tokenrelay"
fi
[[ -x "$binary" ]] || die "no executable at $binary"

# A scratch image has no dynamic loader: refuse anything that needs one.
if readelf -l "$binary" | grep -q 'INTERP'; then
    die "$binary is dynamically linked (it has a program interpreter); build it with -C target-feature=+crt-static"
fi
if readelf -d "$binary" 2>/dev/null | grep -q '(NEEDED)'; then
    die "$binary needs shared libraries: $(readelf -d "$binary" | grep '(NEEDED)' | tr -s ' ')"
fi

# 2. Stage the context files.
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[[ -s "$ca_bundle" ]] || die "no CA bundle at $ca_bundle (install the ca-certificates package or set CA_BUNDLE)"
stage="$repo_root/target/image"
rm -rf "$stage"
mkdir -p "$stage/empty"
install -m 0555 "$binary" "$stage/tokenrelay"
install -m 0444 "$ca_bundle" "$stage/ca-certificates.crt"
log "staged $(du -h "$stage/tokenrelay" | cut -f1) binary and CA bundle in ${stage#"$repo_root/"}"

[[ $run_buildah -eq 1 ]] || { log "staged only (--no-build)"; exit 0; }

# 3. Build.
command -v buildah >/dev/null || die "buildah is not installed (Debian: apt-get install buildah)"
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
log "buildah bud -t $tag (storage $STORAGE_DRIVER, isolation $BUILDAH_ISOLATION)"
buildah bud \
    --file Dockerfile \
    --tag "$tag" \
    --build-arg "VERSION=${version:-dev}" \
    --build-arg "REVISION=$revision" \
    --layers=false \
    --quiet \
    "$repo_root" >/dev/null

if [[ -n "$archive" ]]; then
    rm -f "$archive"
    buildah push --quiet "$tag" "oci-archive:$archive:$tag"
    log "wrote OCI archive $archive"
fi
log "built $tag"
echo "$tag"
