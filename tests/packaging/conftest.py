"""Fixtures for the packaging tests (chart, image, systemd unit)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import support


@pytest.fixture(scope="session")
def example_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example consumer chart with its tokenrelay dependency built."""
    return support.build_example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="session")
def tokenrelay_bin() -> Path:
    """The tokenrelay binary: TOKENRELAY_BIN, else target/debug/tokenrelay; skips while
    it is not built or has no `check` subcommand."""
    explicit = "TOKENRELAY_BIN" in os.environ
    path = Path(os.environ.get("TOKENRELAY_BIN", support.REPO / "target" / "debug" / "tokenrelay"))
    if not path.is_absolute():
        path = support.REPO / path
    if not path.exists():
        if explicit:
            pytest.fail(f"TOKENRELAY_BIN={path} does not exist")
        pytest.skip(f"{path} is not built yet (cargo build), or set TOKENRELAY_BIN")
    shown = support.run([str(path), "--help"], timeout=30)
    if not re.search(r"^\s+check\b", shown.stdout + shown.stderr, re.M):
        pytest.skip(f"{path} has no `check` subcommand yet (its --help lists none)")
    return path


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"chart: {support.CHART.relative_to(support.REPO)}"]
    try:
        h = support.helm()
        lines.append(f"helm SDK: {h.helm_sdk_version()} (helm-python-sdk {h.__version__})")
    except Exception as exc:  # pragma: no cover - reported, the tests then fail
        lines.append(f"helm SDK: unavailable ({exc})")
    try:
        import kubernetes_validate

        lines.append(f"kubernetes-validate: {kubernetes_validate.__version__}, schemas up to {kubernetes_validate.latest_version()}")
    except Exception as exc:  # pragma: no cover
        lines.append(f"kubernetes-validate: unavailable ({exc})")
    return lines
