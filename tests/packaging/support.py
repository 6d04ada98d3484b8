"""Shared helpers for the packaging tests: rendering the chart, reading manifests."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tokenrelay"
CI_DIR = CHART / "ci"
EXAMPLE = CHART / "examples" / "app-with-sidecar"
TOOLS_LIST = REPO / "scripts" / "test-tools.txt"
RELEASE = "rel"
NAMESPACE = "tokenrelay-test"

#: Prometheus Operator kinds: not in the Kubernetes OpenAPI schemas, checked structurally.
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
MONITORING_API = "monitoring.coreos.com/v1"

#: Metric families tokenrelay exports (DESIGN.md, "Metrics").
METRICS = {
    "tokenrelay_requests_total",
    "tokenrelay_request_duration_seconds",
    "tokenrelay_upstream_errors_total",
    "tokenrelay_token_refresh_total",
    "tokenrelay_token_refresh_duration_seconds",
    "tokenrelay_token_expiry_timestamp_seconds",
    "tokenrelay_refresh_token_expiry_timestamp_seconds",
    "tokenrelay_token_generation",
    "tokenrelay_credential_ready",
    "tokenrelay_credential_state",
    "tokenrelay_last_refresh_success_timestamp_seconds",
    "tokenrelay_refresh_waiters_total",
    "tokenrelay_upstream_401_retries_total",
    "tokenrelay_store_operations_total",
    "tokenrelay_build_info",
    "tokenrelay_client_certificate_expiry_timestamp_seconds",
    "tokenrelay_sink_writes_total",
}
HISTOGRAMS = {"tokenrelay_request_duration_seconds", "tokenrelay_token_refresh_duration_seconds"}


def tool(name: str) -> str | None:
    """The path of a program the tests start, which scripts/test-tools.txt must list (the
    install step reads that list). None when it is missing, so the caller skips; with
    TOKENRELAY_REQUIRE_TOOLS=1 a missing program is an error naming its Debian package."""
    packages = {}
    for line in TOOLS_LIST.read_text().splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            packages[words[0]] = words[1]
    if name not in packages:
        raise RuntimeError(
            f"the packaging tests start `{name}`, which scripts/test-tools.txt does not list, so "
            f"the install step would not provide it: add a line `{name} <debian-package> packaging`"
        )
    found = shutil.which(name)
    if found is None and os.environ.get("TOKENRELAY_REQUIRE_TOOLS") == "1":
        raise RuntimeError(
            f"`{name}` is not installed: it comes from the Debian package `{packages[name]}` "
            "(scripts/test.sh installs everything scripts/test-tools.txt lists)"
        )
    return found


def value_set_names() -> list[str]:
    """Names of the chart-testing value sets: ci/NAME-values.yaml."""
    return sorted(p.name[: -len("-values.yaml")] for p in CI_DIR.glob("*-values.yaml"))


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI_DIR / f"{name}-values.yaml").read_text()) or {}


def is_sidecar_set(name: str) -> bool:
    return load_values(name).get("mode") == "sidecar"


def helm():
    import helm_python

    return helm_python


def render_chart(chart: Path, values: dict[str, Any] | None) -> dict[str, str]:
    """Render a chart offline, as `helm template` would."""
    with helm().Chart.load(str(chart)) as loaded:
        return loaded.render(values=values or {}, name=RELEASE, namespace=NAMESPACE)


@functools.lru_cache(maxsize=None)
def _render_set_json(name: str) -> str:
    return json.dumps(render_chart(CHART, load_values(name)))


def render_set(name: str) -> dict[str, str]:
    """Rendered templates of the chart with ci/NAME-values.yaml (cached)."""
    return json.loads(_render_set_json(name))


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered output (NOTES.txt left out)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path}: a document that is not a mapping"
            doc.setdefault("__template__", path)
            docs.append(doc)
    return docs


def strip_meta(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__template__"}


def notes(rendered: dict[str, str], chart_name: str = "tokenrelay") -> str:
    for path, text in rendered.items():
        if path == f"{chart_name}/templates/NOTES.txt":
            return text
    raise AssertionError("no NOTES.txt rendered")


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in of_kind(docs, "ConfigMap") if "config.yaml" in (d.get("data") or {})]
    assert len(found) == 1, f"expected one ConfigMap with config.yaml, found {len(found)}"
    return found[0]


def config_text(docs: list[dict[str, Any]]) -> str:
    return config_map(docs)["data"]["config.yaml"]


def config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(config_text(docs))


#: Chart-only keys of a credential that mount a Secret key as a file: the config key the
#: mounted path goes to, and the file's name under credentials/<name>/ (templates/_helpers.tpl).
CREDENTIAL_FILE_REFS = {
    "clientSecretRef": ("client_secret_file", "client-secret"),
    "passwordRef": ("password_file", "password"),
    "tokenRef": ("token_file", "token"),
    "clientAssertionKeyRef": ("client_assertion_key_file", "client-assertion-key.pem"),
    "assertionKeyRef": ("assertion_key_file", "assertion-key.pem"),
    "serviceAccountRef": ("service_account_file", "service-account.json"),
    "clientCertRef": ("client_cert_file", "client.crt"),
    "clientKeyRef": ("client_key_file", "client.key"),
}
#: The same for an upstream, under upstreams/<name>/.
UPSTREAM_FILE_REFS = {
    "clientCertRef": ("client_cert_file", "client.crt"),
    "clientKeyRef": ("client_key_file", "client.key"),
}


def secret_file_keys(cfg: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(block, key, path) of every secret-file key of a rendered config (`*_file` but
    `ca_file`) in the store, the credentials and the upstreams; block is e.g.
    `credentials.api`."""
    blocks = [("store", cfg["store"])]
    blocks += [(f"credentials.{n}", c) for n, c in cfg["credentials"].items()]
    blocks += [(f"upstreams.{n}", u) for n, u in cfg["upstreams"].items()]
    return [(where, k, v) for where, block in blocks for k, v in block.items() if k.endswith("_file") and k != "ca_file"]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def tokenrelay_container(spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The tokenrelay container of a pod spec and where it is ("containers"/"initContainers")."""
    hits = [
        (c, where)
        for where in ("initContainers", "containers")
        for c in spec.get(where) or []
        if c.get("args", [])[:1] == ["run"] and "/etc/tokenrelay/config.yaml" in c.get("args", [])
    ]
    assert len(hits) == 1, f"expected one tokenrelay container, found {len(hits)}"
    return hits[0]


_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str | int) -> float:
    """Seconds in a config duration: 30s, 1m30s, 250ms, or a bare number of seconds."""
    text = str(text)
    if text.isdigit():
        return float(text)
    assert _DURATION.match(text), f"not a duration: {text!r}"
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))


def build_example(workdir: Path) -> Path:
    """Copy the example consumer chart with the tokenrelay chart beside it, and run
    `helm dependency update` on it, as a user would (file://../.. repository)."""
    root = workdir / "charts" / "tokenrelay"
    shutil.copytree(CHART, root, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    example = root / "examples" / "app-with-sidecar"
    env_keys = {
        "HELM_CACHE_HOME": workdir / "helm-cache",
        "HELM_CONFIG_HOME": workdir / "helm-config",
        "HELM_DATA_HOME": workdir / "helm-data",
    }
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: str(v) for k, v in env_keys.items()})
    try:
        helm().dependency_update(str(example), skip_refresh=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert list((example / "charts").glob("tokenrelay-*.tgz")), "dependency update packaged no tokenrelay chart"
    return example


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    return subprocess.run(cmd, check=False, **kw)


def check(binary: Path, config_path: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `tokenrelay check`; (exit code, stdout + stderr)."""
    done = run([str(binary), "check", "--config", str(config_path)], env=env, timeout=60)
    return done.returncode, done.stdout + done.stderr
