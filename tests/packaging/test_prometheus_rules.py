"""The PrometheusRule's alerts and the dashboard's queries, checked with promtool."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import support

PROMTOOL = support.tool("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")

RULE_SETS = [
    n
    for n in support.value_set_names()
    if ((support.load_values(n).get("metrics") or {}).get("prometheusRule") or {}).get("enabled")
]
HERE = Path(__file__).parent


def rule_groups(name: str) -> list[dict[str, Any]]:
    docs = support.manifests(support.render_set(name))
    return support.one(docs, "PrometheusRule")["spec"]["groups"]


def write_rules(directory: Path, groups: list[dict[str, Any]]) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool(*args: str) -> tuple[int, str]:
    done = support.run([PROMTOOL, *args], timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_rule_sets_exist() -> None:
    assert "monitoring" in RULE_SETS and any(support.is_sidecar_set(n) for n in RULE_SETS)


@pytest.mark.parametrize("name", RULE_SETS)
def test_promtool_check_rules(name: str, tmp_path: Path) -> None:
    code, output = promtool("check", "rules", str(write_rules(tmp_path, rule_groups(name))))
    assert code == 0, output
    assert "SUCCESS" in output


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool unit tests (alerts.test.yaml) against the rules rendered for ci/monitoring."""
    write_rules(tmp_path, rule_groups("monitoring"))
    shutil.copy(HERE / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    code, output = promtool("test", "rules", str(tmp_path / "alerts.test.yaml"))
    assert code == 0, output


def test_sidecar_alerts_select_the_pod_monitor_job() -> None:
    name = next(n for n in RULE_SETS if support.is_sidecar_set(n))
    expr = next(r["expr"] for r in rule_groups(name)[0]["rules"] if r.get("alert") == "TokenrelayCredentialNotReady")
    assert f'job="{support.NAMESPACE}/{support.RELEASE}-tokenrelay"' in expr


GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$credential": ".*",
    "$upstream": ".*",
}


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, as a recording rule."""
    dash = json.loads((support.CHART / "dashboards" / "tokenrelay.json").read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    rules = []
    for i, q in enumerate(queries):
        if q.startswith("label_values("):  # Grafana's own function: check its selector only
            q = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q)
        for var, value in GRAFANA_VARS.items():
            q = q.replace(var, value)
        assert "$" not in q, f"unhandled Grafana variable in {q}"
        rules.append({"record": f"dashboard:query_{i}:check", "expr": q})
    path = write_rules(tmp_path, [{"name": "dashboard", "rules": rules}])
    code, output = promtool("check", "rules", str(path))
    assert code == 0, output
