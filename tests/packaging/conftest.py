"""Fixtures for the packaging tests (chart, image, systemd unit)."""

from __future__ import annotations

from pathlib import Path

import pytest

import support


@pytest.fixture(scope="session")
def example_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example consumer chart with its tokenrelay dependency built."""
    return support.build_example(tmp_path_factory.mktemp("example"))


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
