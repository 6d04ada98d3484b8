"""The systemd unit for VMs: parsed and checked key by key, verified with
systemd-analyze where it is installed, and its example config accepted by tokenrelay."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import support
from support import check

UNIT = support.REPO / "deploy" / "systemd" / "tokenrelay.service"
VM_CONFIG = support.REPO / "deploy" / "systemd" / "config.yaml"
BINARY = "/usr/local/bin/tokenrelay"
SYSTEMD_ANALYZE = support.tool("systemd-analyze")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: sections, repeatable keys, comments, no continuations here."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not used"
        if line.startswith("["):
            assert line.endswith("]"), f"line {number}: bad section header"
            current = line[1:-1]
            assert current not in sections, f"section {current} twice"
            sections[current] = {}
            continue
        assert current is not None, f"line {number}: key outside a section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key), f"line {number}: not KEY=VALUE: {raw!r}"
        sections[current].setdefault(key, []).append(value)
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values is not None, f"[{section}] has no {key}="
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times"
    return values[0]


def test_sections(unit: dict[str, dict[str, list[str]]]) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in one(unit, "Unit", "After")


EXPECTED = {
    "DynamicUser": "yes",
    "StateDirectory": "tokenrelay",
    "ConfigurationDirectory": "tokenrelay",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
}


@pytest.mark.parametrize(("key", "value"), EXPECTED.items(), ids=list(EXPECTED))
def test_hardening_and_lifecycle(unit: dict[str, dict[str, list[str]]], key: str, value: str) -> None:
    assert one(unit, "Service", key) == value


def test_syscall_filter(unit: dict[str, dict[str, list[str]]]) -> None:
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service"


def test_commands(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Service", "ExecStartPre") == f"{BINARY} check --config /etc/tokenrelay/config.yaml"
    assert one(unit, "Service", "ExecStart") == f"{BINARY} run --config /etc/tokenrelay/config.yaml"


def test_stop_timeout_exceeds_shutdown_grace(unit: dict[str, dict[str, list[str]]]) -> None:
    import yaml

    grace = support.duration_seconds(yaml.safe_load(VM_CONFIG.read_text())["runtime"]["shutdown_grace"])
    assert support.duration_seconds(one(unit, "Service", "TimeoutStopSec")) > grace


def test_load_credential_is_documented() -> None:
    text = UNIT.read_text()
    assert re.search(r"^#LoadCredential=[\w-]+:/etc/tokenrelay/secrets/", text, re.M)


def stub_unit(tmp_path: Path) -> Path:
    """The unit with the binary path pointed at an executable that exists here."""
    binary = tmp_path / "tokenrelay"
    shutil.copy("/bin/true", binary)
    unit = tmp_path / "tokenrelay.service"
    unit.write_text(UNIT.read_text().replace(BINARY, str(binary)))
    return unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    done = support.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(stub_unit(tmp_path))], timeout=60)
    # verify exits 0 on unknown keys and unparsable values, but says so on stderr.
    problems = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)")
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    done = support.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(stub_unit(tmp_path))], timeout=60)
    if done.returncode != 0 and "offline" in done.stderr:
        pytest.skip(f"this systemd-analyze has no offline security mode: {done.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


def test_vm_config_passes_tokenrelay_check(tokenrelay_bin: Path, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "crm-client-secret").write_text("vm-client-secret-value\n")
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(VM_CONFIG.read_text().replace("/var/lib/tokenrelay", str(state)))
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    env.update({"CREDENTIALS_DIRECTORY": str(creds), "CRM_CLIENT_ID": "vm-client"})
    code, output = check(tokenrelay_bin, config, env)
    assert code == 0, output
    assert "vm-client-secret-value" not in output
