"""The container image: scripts/build-image.sh builds it with buildah (no daemon, no base
image), then its config and its filesystem are inspected, and the binary is run from
the image's root filesystem under chroot as the image's user.

TOKENRELAY_STATIC_BIN=PATH reuses a prebuilt static binary instead of `cargo build`.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

import support

BUILDAH = support.tool("buildah")
TAG = "localhost/tokenrelay:packaging-test"
pytestmark = pytest.mark.skipif(BUILDAH is None, reason="buildah not installed (Debian package buildah)")


def buildah_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("STORAGE_DRIVER", "vfs")
    env.setdefault("BUILDAH_ISOLATION", "chroot")
    return env


@pytest.fixture(scope="module")
def buildah_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip, saying why, where buildah itself cannot build (e.g. no storage driver works)."""
    probe = tmp_path_factory.mktemp("buildah-probe")
    (probe / "file").write_text("probe\n")
    (probe / "Dockerfile").write_text("FROM scratch\nCOPY file /file\n")
    tag = "localhost/tokenrelay-buildah-probe:1"
    done = support.run([BUILDAH, "bud", "--quiet", "--layers=false", "-t", tag, str(probe)], env=buildah_env(), timeout=120)
    if done.returncode != 0:
        pytest.skip(f"buildah cannot build images in this environment: {done.stderr.strip()[-500:]}")
    support.run([BUILDAH, "rmi", tag], env=buildah_env())


@pytest.fixture(scope="module")
def image(buildah_works: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("image")
    archive = workdir / "tokenrelay.oci.tar"
    cmd = [str(support.REPO / "scripts" / "build-image.sh"), "--tag", TAG, "--archive", str(archive)]
    if os.environ.get("TOKENRELAY_STATIC_BIN"):
        cmd += ["--binary", os.environ["TOKENRELAY_STATIC_BIN"]]
    support.run([BUILDAH, "rmi", TAG], env=buildah_env())  # a leftover of an interrupted run
    done = support.run(cmd, env=buildah_env(), timeout=1800)
    assert done.returncode == 0, f"build-image.sh failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    inspected = support.run([BUILDAH, "inspect", "--type", "image", TAG], env=buildah_env())
    assert inspected.returncode == 0, inspected.stderr
    rootfs = workdir / "rootfs"
    extract_oci_archive(archive, rootfs)
    details = json.loads(inspected.stdout)
    yield {"inspect": details, "archive": archive, "rootfs": rootfs, "workdir": workdir}
    support.run([BUILDAH, "rmi", "--force", details["FromImageID"]], env=buildah_env())


def extract_oci_archive(archive: Path, rootfs: Path) -> None:
    """Unpack the image's layers, in order, into rootfs (numeric owners kept)."""
    layout = archive.parent / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(layout, **TRUSTED)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(layout, index["manifests"][0]["digest"]).read_text())
    rootfs.mkdir()
    for layer in manifest["layers"]:
        with tarfile.open(blob(layout, layer["digest"])) as tar:
            tar.extractall(rootfs, numeric_owner=True, **TRUSTED)


# Our own archive: keep owners and modes as they are (the point of the test).
TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def blob(layout: Path, digest: str) -> Path:
    algo, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algo / hexdigest


def config_of(image: Any) -> dict[str, Any]:
    return image["inspect"]["OCIv1"]["config"]


def test_entrypoint_and_command(image: Any) -> None:
    config = config_of(image)
    assert config["Entrypoint"] == ["/tokenrelay"]
    assert config["Cmd"] == ["run", "--config", "/etc/tokenrelay/config.yaml"]


def test_runs_as_numeric_non_root_user(image: Any) -> None:
    assert config_of(image)["User"] in {"65532", "65532:65532"}


def test_exposed_ports_and_state_volume(image: Any) -> None:
    config = config_of(image)
    assert set(config["ExposedPorts"]) == {"8081/tcp", "9090/tcp"}
    assert set(config["Volumes"]) == {"/var/lib/tokenrelay"}


def test_labels(image: Any) -> None:
    labels = config_of(image)["Labels"]
    assert labels["org.opencontainers.image.title"] == "tokenrelay"
    assert labels["org.opencontainers.image.version"]


def test_image_holds_only_the_binary_and_its_data(image: Any) -> None:
    root: Path = image["rootfs"]
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert files == [
        "etc/group",
        "etc/nsswitch.conf",
        "etc/passwd",
        "etc/ssl/certs/ca-certificates.crt",
        "tokenrelay",
    ]
    assert not (root / "bin").exists(), "a shell has no business in the image"


def test_binary_is_static_root_owned_and_read_only(image: Any) -> None:
    binary: Path = image["rootfs"] / "tokenrelay"
    st = binary.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_mode & 0o777 == 0o555
    assert "PT_INTERP" not in elf_segment_types(binary.read_bytes()), "dynamically linked (has a program interpreter)"


def elf_segment_types(elf: bytes) -> set[str]:
    """Program header types of a 64-bit little-endian ELF file."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, "not a 64-bit little-endian ELF file"
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    names = {1: "PT_LOAD", 2: "PT_DYNAMIC", 3: "PT_INTERP"}
    types = set()
    for i in range(phnum):
        kind = int.from_bytes(elf[phoff + i * phentsize : phoff + i * phentsize + 4], "little")
        types.add(names.get(kind, hex(kind)))
    assert "PT_LOAD" in types
    return types


def test_ca_bundle_and_state_directory(image: Any) -> None:
    root: Path = image["rootfs"]
    bundle = (root / "etc/ssl/certs/ca-certificates.crt").read_text()
    assert bundle.count("BEGIN CERTIFICATE") > 50
    state = (root / "var/lib/tokenrelay").stat()
    assert (state.st_uid, state.st_gid) == (65532, 65532)
    assert (root / "var/lib").stat().st_uid == 0
    assert "nonroot:x:65532:65532:" in (root / "etc/passwd").read_text()


def chroot_run(rootfs: Path, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    chroot = support.tool("chroot")
    if chroot is None or os.geteuid() != 0:
        pytest.skip("running the image's binary needs chroot as root")
    done = support.run([chroot, "--userspec=65532:65532", str(rootfs), *args], env=env, timeout=60)
    if done.returncode != 0 and "Operation not permitted" in done.stderr and "chroot" in done.stderr:
        pytest.skip(f"chroot is not permitted here: {done.stderr.strip()}")
    return done.returncode, done.stdout + done.stderr


def test_binary_runs_from_the_image_root(image: Any) -> None:
    """With nothing but the image's files: no libc, no loader, no shell."""
    code, output = chroot_run(image["rootfs"], ["/tokenrelay", "--version"], {"PATH": "/"})
    assert code == 0 and "tokenrelay" in output, output


def test_chart_config_checks_inside_the_image(image: Any) -> None:
    """The default chart's config, at its in-pod paths, in the image, as user 65532."""
    root: Path = image["rootfs"]
    code, output = chroot_run(root, ["/tokenrelay", "--help"], {"PATH": "/"})
    if not re.search(r"^\s+check\b", output, re.M):
        pytest.skip("the image's tokenrelay has no `check` subcommand yet")
    docs = support.manifests(support.render_set("default"))
    (root / "etc/tokenrelay").mkdir(exist_ok=True)
    (root / "etc/tokenrelay/config.yaml").write_text(support.config_text(docs))
    cfg = yaml.safe_load(support.config_text(docs))
    secret = root / cfg["credentials"]["crm"]["client_secret_file"].lstrip("/")
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("image-client-secret\n")
    os.chown(secret, 65532, 65532)
    code, output = chroot_run(
        root, ["/tokenrelay", "check", "--config", "/etc/tokenrelay/config.yaml"], {"PATH": "/", "CRM_CLIENT_ID": "client"}
    )
    assert code == 0, output
    assert "image-client-secret" not in output
