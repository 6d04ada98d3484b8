"""The Helm chart: lint, render every ci/ value set, validate against Kubernetes schemas,
and check what the chart promises (security, probes, sidecar wiring, secrets, config)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import support
from support import CHART, NAMESPACE, RELEASE

VALUE_SETS = support.value_set_names()
SIDECAR_SETS = [n for n in VALUE_SETS if support.is_sidecar_set(n)]
STANDALONE_SETS = [n for n in VALUE_SETS if not support.is_sidecar_set(n)]
LATEST_K8S = kubernetes_validate.latest_version()


def test_value_sets_cover_the_required_scenarios() -> None:
    assert {"default", "sidecar", "native-sidecar", "monitoring", "redis", "client-auth"} <= set(VALUE_SETS)
    assert support.load_values("default") == {}


# --- lint ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(name: str) -> None:
    report = support.helm().lint(str(CHART), support.load_values(name), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], json.dumps(report, indent=2)


def test_lint_example_chart(example_chart: Path) -> None:
    report = support.helm().lint(str(example_chart), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], json.dumps(report, indent=2)


# --- Kubernetes schema validation ---------------------------------------------------------


def min_kube_version(values: dict[str, Any]) -> str:
    """Oldest Kubernetes the value set needs: the chart's floor, or newer for newer fields."""
    sidecar = values.get("sidecar") or {}
    if values.get("mode") == "sidecar":
        if sidecar.get("native", True):
            return "1.29"  # restartable init containers
        if sidecar.get("preStopSleepSeconds"):
            return "1.30"  # lifecycle sleep action
    return "1.25"


def check_monitoring_object(doc: dict[str, Any]) -> None:
    """Structural check of Prometheus Operator objects (their CRDs are not in the schemas)."""
    kind = doc["kind"]
    assert doc["apiVersion"] == support.MONITORING_API, doc["apiVersion"]
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, sorted(doc)
    meta = doc["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 63
    assert meta["namespace"]
    assert all(isinstance(v, str) for v in (meta.get("labels") or {}).values())
    spec = doc["spec"]
    if kind == "ServiceMonitor":
        assert set(spec) <= {"namespaceSelector", "selector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels"}
        assert spec["selector"]["matchLabels"]
        for ep in spec["endpoints"]:
            assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
            assert ep["port"] == "admin" and ep["path"] == "/metrics"
    elif kind == "PodMonitor":
        assert set(spec) <= {"namespaceSelector", "selector", "podMetricsEndpoints", "jobLabel", "podTargetLabels"}
        assert spec["selector"]
        for ep in spec["podMetricsEndpoints"]:
            assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
            assert ep["port"] == "relay-admin" and ep["path"] == "/metrics"
    elif kind == "PrometheusRule":
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules"} and group["rules"]
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule), rule
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
                assert isinstance(rule["expr"], (str, int))
                if "alert" in rule:
                    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                    assert rule["annotations"]["summary"]
    else:  # pragma: no cover
        raise AssertionError(f"unexpected monitoring kind {kind}")


def validate_all(docs: list[dict[str, Any]], versions: list[str]) -> None:
    assert docs, "nothing rendered"
    for doc in docs:
        where = f"{doc['__template__']} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") in support.MONITORING_KINDS:
            check_monitoring_object(support.strip_meta(doc))
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(support.strip_meta(doc), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                raise AssertionError(f"{where}: invalid for Kubernetes {version} at {path}: {exc.message}") from None


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_manifests_are_valid_kubernetes(name: str) -> None:
    docs = support.manifests(support.render_set(name))
    validate_all(docs, [min_kube_version(support.load_values(name)), LATEST_K8S])


@pytest.mark.parametrize("name", ["example-defaults", *SIDECAR_SETS])
def test_example_chart_manifests_are_valid_kubernetes(example_chart: Path, name: str) -> None:
    values = {} if name == "example-defaults" else {"tokenrelay": support.load_values(name)}
    docs = support.manifests(support.render_chart(example_chart, values))
    merged = {**yaml.safe_load((example_chart / "values.yaml").read_text())["tokenrelay"], **values.get("tokenrelay", {})}
    validate_all(docs, [min_kube_version(merged), LATEST_K8S])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_is_labelled_and_namespaced(name: str) -> None:
    for doc in support.manifests(support.render_set(name)):
        meta = doc["metadata"]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "tokenrelay"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("tokenrelay-")
        assert meta.get("namespace"), f"{doc['kind']} has no namespace"


# --- what each mode renders ------------------------------------------------------------


@pytest.mark.parametrize("name", STANDALONE_SETS)
def test_standalone_renders_deployment_service_pdb(name: str) -> None:
    docs = support.manifests(support.render_set(name))
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"} <= kinds
    assert "PodMonitor" not in kinds


@pytest.mark.parametrize("name", SIDECAR_SETS)
def test_sidecar_mode_renders_config_and_monitoring_only(name: str) -> None:
    kinds = {d["kind"] for d in support.manifests(support.render_set(name))}
    assert kinds <= {"ConfigMap", "PodMonitor", "PrometheusRule"}, kinds
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}.isdisjoint(kinds)


def test_monitoring_objects_are_optional() -> None:
    kinds = {d["kind"] for d in support.manifests(support.render_set("default"))}
    assert support.MONITORING_KINDS.isdisjoint(kinds)
    assert "NetworkPolicy" not in kinds


def test_monitoring_value_set_renders_every_monitoring_object() -> None:
    docs = support.manifests(support.render_set("monitoring"))
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds
    dashboard = [d for d in support.of_kind(docs, "ConfigMap") if "tokenrelay.json" in (d.get("data") or {})]
    assert len(dashboard) == 1
    assert dashboard[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard[0]["metadata"]["namespace"] == "monitoring"
    json.loads(dashboard[0]["data"]["tokenrelay.json"])
    rules = support.one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert {
        "TokenrelayCredentialNotReady",
        "TokenrelayTokenRefreshFailing",
        "TokenrelayAccessTokenExpiring",
        "TokenrelayReauthorizationRequired",
        "TokenrelayReauthorizationDueSoon",
        "TokenrelayClientCertificateExpiring",
        "TokenrelayHighUpstreamErrorRate",
    } <= alerts


def test_alert_expressions_match_the_documented_conditions() -> None:
    rules = support.one(support.manifests(support.render_set("monitoring")), "PrometheusRule")["spec"]["groups"][0]["rules"]
    by_name = {r["alert"]: r for r in rules if "alert" in r}
    sel = f'namespace="{NAMESPACE}",job="{RELEASE}-tokenrelay"'
    assert by_name["TokenrelayCredentialNotReady"]["expr"] == f"tokenrelay_credential_ready{{{sel}}} == 0"
    assert (
        f'increase(tokenrelay_token_refresh_total{{{sel},result="failure"}}[15m])) > 3'
        in by_name["TokenrelayTokenRefreshFailing"]["expr"]
    )
    assert f"tokenrelay_token_expiry_timestamp_seconds{{{sel}}} - time() < 300" in by_name["TokenrelayAccessTokenExpiring"]["expr"]
    assert by_name["TokenrelayAccessTokenExpiring"]["for"] == "5m"
    assert (
        by_name["TokenrelayReauthorizationRequired"]["expr"]
        == f'tokenrelay_credential_state{{{sel},state="reauthorization_required"}} == 1'
    )
    assert by_name["TokenrelayReauthorizationRequired"]["labels"]["severity"] == "critical"
    assert (
        by_name["TokenrelayReauthorizationDueSoon"]["expr"]
        == f"tokenrelay_refresh_token_expiry_timestamp_seconds{{{sel}}} < time() + 259200"
    )
    assert by_name["TokenrelayReauthorizationDueSoon"]["for"] == "10m"
    assert by_name["TokenrelayReauthorizationDueSoon"]["labels"]["severity"] == "warning"
    assert (
        by_name["TokenrelayClientCertificateExpiring"]["expr"]
        == f"tokenrelay_client_certificate_expiry_timestamp_seconds{{{sel}}} < time() + 1209600"
    )
    assert by_name["TokenrelayClientCertificateExpiring"]["for"] == "10m"
    # Prometheus templates survive Helm's templating untouched.
    assert "{{ $labels.credential }}" in by_name["TokenrelayCredentialNotReady"]["annotations"]["summary"]


def test_reauthorization_threshold_is_configurable() -> None:
    values = support.load_values("monitoring")
    values["metrics"]["prometheusRule"]["reauthorizationThresholdSeconds"] = 14 * 86400
    docs = support.manifests(support.render_chart(CHART, values))
    rules = support.one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    expr = next(r["expr"] for r in rules if r.get("alert") == "TokenrelayReauthorizationDueSoon")
    assert expr.endswith("< time() + 1209600"), expr  # an integer, not 1.2096e+06


def test_disabled_alerts_are_left_out() -> None:
    values = support.load_values("monitoring")
    values["metrics"]["prometheusRule"]["disabledAlerts"] = ["TokenrelayDown"]
    docs = support.manifests(support.render_chart(CHART, values))
    alerts = {r.get("alert") for r in support.one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert "TokenrelayDown" not in alerts and "TokenrelayCredentialNotReady" in alerts


# --- the pod -----------------------------------------------------------------------------


def tokenrelay_pods(name: str, example_chart: Path | None = None) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """(pod spec, tokenrelay container, where) of every workload rendered for a value set."""
    if support.is_sidecar_set(name):
        assert example_chart is not None
        docs = support.manifests(support.render_chart(example_chart, {"tokenrelay": support.load_values(name)}))
    else:
        docs = support.manifests(support.render_set(name))
    out = []
    for deploy in support.of_kind(docs, "Deployment"):
        spec = support.pod_spec(deploy)
        container, where = support.tokenrelay_container(spec)
        out.append((spec, container, where))
    assert out
    return out


@pytest.mark.parametrize("name", VALUE_SETS)
def test_container_is_hardened(name: str, example_chart: Path) -> None:
    for spec, c, _ in tokenrelay_pods(name, example_chart):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 65532 and sc["runAsGroup"] == 65532
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        if not support.is_sidecar_set(name):
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
            assert psc["seccompProfile"]["type"] == "RuntimeDefault"
            assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_use_the_admin_port(name: str, example_chart: Path) -> None:
    for _, c, where in tokenrelay_pods(name, example_chart):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        admin = c["livenessProbe"]["httpGet"]["port"]
        assert admin in ports
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["readinessProbe"]["httpGet"]["port"] == admin
        if where == "initContainers":
            assert c["startupProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_config_file_and_state_volumes(name: str, example_chart: Path) -> None:
    values = support.load_values(name)
    store_type = (values.get("store") or {}).get("type", "file")
    for spec, c, _ in tokenrelay_pods(name, example_chart):
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"mount of undefined volume {m['name']}"
        assert mounts["/etc/tokenrelay"]["readOnly"] is True
        assert volumes[mounts["/etc/tokenrelay"]["name"]]["configMap"]["name"].endswith("tokenrelay")
        assert c["args"] == ["run", "--config", "/etc/tokenrelay/config.yaml"]
        if store_type == "file":
            state = mounts["/var/lib/tokenrelay"]
            assert not state.get("readOnly")
            vol = volumes[state["name"]]
            claim = (values.get("persistence") or {}).get("existingClaim")
            if claim:
                assert vol["persistentVolumeClaim"]["claimName"] == claim
            else:
                assert "emptyDir" in vol
        else:
            assert "/var/lib/tokenrelay" not in mounts


@pytest.mark.parametrize("name", STANDALONE_SETS)
def test_termination_grace_exceeds_drain(name: str) -> None:
    docs = support.manifests(support.render_set(name))
    spec = support.pod_spec(support.one(docs, "Deployment"))
    grace = support.duration_seconds(support.config(docs)["runtime"]["shutdown_grace"])
    assert spec["terminationGracePeriodSeconds"] > grace


@pytest.mark.parametrize("name", STANDALONE_SETS)
def test_file_store_runs_one_replica_with_recreate(name: str) -> None:
    docs = support.manifests(support.render_set(name))
    deploy = support.one(docs, "Deployment")
    if support.config(docs)["store"]["type"] == "file":
        assert deploy["spec"]["replicas"] == 1
        assert deploy["spec"]["strategy"]["type"] == "Recreate"
    else:
        assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"


@pytest.mark.parametrize("name", STANDALONE_SETS)
def test_service_exposes_proxy_and_admin_ports(name: str) -> None:
    docs = support.manifests(support.render_set(name))
    svc = support.one(docs, "Service")
    cfg = support.config(docs)
    listen_ports = {int(u["listen"].rsplit(":", 1)[1]) for u in cfg["upstreams"].values()}
    admin_port = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
    assert {p["port"] for p in svc["spec"]["ports"]} == listen_ports | {admin_port}
    container_ports = {p["name"] for p in support.tokenrelay_container(support.pod_spec(support.one(docs, "Deployment")))[0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    assert svc["spec"]["selector"] == support.one(docs, "Deployment")["spec"]["selector"]["matchLabels"]


# --- the rendered config -------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_listen_addresses_follow_the_mode(name: str) -> None:
    docs = support.manifests(support.render_set(name))
    cfg = support.config(docs)
    values = support.load_values(name)
    admin_port = (values.get("admin") or {}).get("port", 9090)
    assert cfg["admin"]["listen"] == f"0.0.0.0:{admin_port}"
    host = "127.0.0.1" if support.is_sidecar_set(name) else "0.0.0.0"
    for upstream in cfg["upstreams"].values():
        assert upstream["listen"].startswith(host + ":"), upstream["listen"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_config_holds_no_chart_only_keys(name: str) -> None:
    cfg = support.config(support.manifests(support.render_set(name)))
    assert set(cfg) >= {"admin", "store", "credentials", "upstreams"}
    for cred in cfg["credentials"].values():
        assert {"name", *support.CREDENTIAL_FILE_REFS}.isdisjoint(cred), sorted(cred)
    for upstream in cfg["upstreams"].values():
        assert {"name", "port", *support.UPSTREAM_FILE_REFS}.isdisjoint(upstream), sorted(upstream)


def test_client_auth_value_set_uses_every_secret_file_key() -> None:
    """The value set that renders the keys of credentials without shared secrets uses
    each of them, for credentials and for an upstream."""
    values = support.load_values("client-auth")
    used = {k for cred in values["credentials"] for k in cred}
    assert set(support.CREDENTIAL_FILE_REFS) - {"clientSecretRef", "passwordRef", "tokenRef"} <= used
    assert set(support.UPSTREAM_FILE_REFS) <= {k for up in values["upstreams"] for k in up}


def mounted_secret_items(spec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Path under /run/secrets/tokenrelay -> (Secret name, key) of the projected volume."""
    items: dict[str, tuple[str, str]] = {}
    for v in spec["volumes"]:
        for src in (v.get("projected") or {}).get("sources", []):
            for i in src["secret"]["items"]:
                items[f"/run/secrets/tokenrelay/{i['path']}"] = (src["secret"]["name"], i["key"])
    return items


@pytest.mark.parametrize("name", VALUE_SETS)
def test_each_secret_ref_becomes_a_mounted_file_in_the_config(name: str, example_chart: Path) -> None:
    """Every `*Ref` of a credential or an upstream sets its config key to a file under
    the secrets mount, and the projected volume puts that Secret key at that path."""
    values = support.load_values(name)
    cfg = support.config(support.manifests(support.render_set(name)))
    expected: dict[str, tuple[str, str]] = {}
    for section, refs in (("credentials", support.CREDENTIAL_FILE_REFS), ("upstreams", support.UPSTREAM_FILE_REFS)):
        for item in values.get(section) or []:
            for ref, (config_key, file_name) in refs.items():
                if ref not in item:
                    continue
                path = f"/run/secrets/tokenrelay/{section}/{item['name']}/{file_name}"
                assert cfg[section][item["name"]][config_key] == path, f"{section}.{item['name']}.{config_key}"
                expected[path] = (item[ref]["name"], item[ref]["key"])
    for spec, _, _ in tokenrelay_pods(name, example_chart):
        mounted = mounted_secret_items(spec)
        assert {p: mounted.get(p) for p in expected} == expected


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_are_mounted_files_never_inlined(name: str, example_chart: Path) -> None:
    docs = support.manifests(support.render_set(name))
    cfg = support.config(docs)
    text = support.config_text(docs)
    assert "client_secret:" not in text and "password:" not in text
    assert "PRIVATE KEY" not in text and "CERTIFICATE" not in text and "private_key\"" not in text
    referenced = {v for _, _, v in support.secret_file_keys(cfg)}
    assert all(p.startswith("/run/secrets/tokenrelay/") for p in referenced), referenced
    for spec, c, _ in tokenrelay_pods(name, example_chart):
        mounted = set(mounted_secret_items(spec))
        assert referenced <= mounted, referenced - mounted
        assert any(m["mountPath"] == "/run/secrets/tokenrelay" and m["readOnly"] for m in c["volumeMounts"]) == bool(referenced)


def test_admin_token_comes_from_a_mounted_secret() -> None:
    """`admin.tokenSecretRef` mounts the Secret key as a file and names it in
    `admin.token_file`; without it the config has no admin token."""
    values = support.load_values("default")
    values["admin"] = {"port": 9090, "tokenSecretRef": {"name": "relay-admin", "key": "token"}}
    docs = support.manifests(support.render_chart(CHART, values))
    cfg = support.config(docs)
    path = "/run/secrets/tokenrelay/admin/token"
    assert cfg["admin"] == {"listen": "0.0.0.0:9090", "token_file": path}
    assert "token_file" not in cfg["store"]
    spec = support.pod_spec(support.one(docs, "Deployment"))
    assert mounted_secret_items(spec)[path] == ("relay-admin", "token")
    plain = support.config(support.manifests(support.render_set("default")))
    assert "token_file" not in plain["admin"]


def test_redis_url_comes_from_a_secret_through_env() -> None:
    docs = support.manifests(support.render_set("redis"))
    cfg = support.config(docs)
    assert cfg["store"] == {
        "type": "redis",
        "url": "${TOKENRELAY_REDIS_URL}",
        "encryption_key_file": "/run/secrets/tokenrelay/store/encryption-key",
    }
    c, _ = support.tokenrelay_container(support.pod_spec(support.one(docs, "Deployment")))
    env = {e["name"]: e for e in c["env"]}
    assert env["TOKENRELAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tokenrelay-redis", "key": "url"}
    assert support.one(docs, "Deployment")["spec"]["replicas"] == 2


def test_etcd_store_lists_its_endpoints() -> None:
    cfg = support.config(support.manifests(support.render_set("etcd")))
    assert cfg["store"] == {
        "type": "etcd",
        "endpoints": support.load_values("etcd")["store"]["etcd"]["endpoints"],
        "password_file": "/run/secrets/tokenrelay/store/password",
        "username": "tokenrelay",
        "key_prefix": "/tokenrelay/",
        "poll_interval": "2s",
    }
    assert cfg["log"] == {"format": "text", "level": "info,tokenrelay=debug", "access_log": True}
    assert cfg["credentials"]["erp"]["password_file"] == "/run/secrets/tokenrelay/credentials/erp/password"


def test_checksum_annotation_follows_the_config() -> None:
    def checksum(values: dict[str, Any]) -> str:
        docs = support.manifests(support.render_chart(CHART, values))
        deploy = support.one(docs, "Deployment")
        annotation = deploy["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert re.fullmatch(r"[0-9a-f]{64}", annotation)
        return annotation

    base = checksum({})
    assert checksum({}) == base
    changed = copy.deepcopy(support.load_values("redis"))
    assert checksum(changed) != base
    assert checksum({"upstreams": [{"name": "crm", "port": 8081, "url": "https://example.amocrm.ru", "credential": "crm", "timeout": "20s"}]}) != base


def test_config_reload_watch_mode_watches_instead_of_rolling_the_pods() -> None:
    docs = support.manifests(support.render_chart(CHART, {"configReload": "watch"}))
    template = support.one(docs, "Deployment")["spec"]["template"]
    assert "checksum/config" not in (template["metadata"].get("annotations") or {})
    args = template["spec"]["containers"][0]["args"]
    assert args[:3] == ["run", "--config", args[2]] and "--watch-config" in args
    restart = support.manifests(support.render_chart(CHART, {}))
    default_args = support.one(restart, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--watch-config" not in default_args
    h = support.helm()
    with pytest.raises(h.HelmError, match="configReload"):
        support.render_chart(CHART, {"configReload": "sometimes"})


# --- the sidecar templates -------------------------------------------------------------------


@pytest.mark.parametrize("name", SIDECAR_SETS)
def test_sidecar_is_wired_into_the_app_pod(example_chart: Path, name: str) -> None:
    values = support.load_values(name)
    rendered = support.render_chart(example_chart, {"tokenrelay": values})
    docs = support.manifests(rendered)
    deploy = support.one(docs, "Deployment")
    spec = support.pod_spec(deploy)
    c, where = support.tokenrelay_container(spec)
    native = values["sidecar"]["native"]
    if native:
        assert where == "initContainers" and c["restartPolicy"] == "Always"
        assert spec["initContainers"][0] is c, "the native sidecar must start before other init containers"
        assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert "lifecycle" not in c
    else:
        assert where == "containers" and "restartPolicy" not in c
        assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == values["sidecar"]["preStopSleepSeconds"]
    # Proxy listeners are loopback-only in the pod: no container ports for them.
    assert [p["name"] for p in c["ports"]] == ["relay-admin"]
    meta = deploy["spec"]["template"]["metadata"]
    cm = support.config_map(docs)
    assert re.fullmatch(r"[0-9a-f]{64}", meta["annotations"]["checksum/tokenrelay-config"])
    assert meta["labels"]["tokenrelay-sidecar"] == cm["metadata"]["name"]
    config_volume = next(v for v in spec["volumes"] if v["name"] == "tokenrelay-config")
    assert config_volume["configMap"]["name"] == cm["metadata"]["name"]
    drain = support.duration_seconds(support.config(docs)["runtime"]["shutdown_grace"])
    assert spec["terminationGracePeriodSeconds"] > drain + values["sidecar"].get("preStopSleepSeconds", 0)
    # The PodMonitor selects the app's pods.
    for pm in support.of_kind(docs, "PodMonitor"):
        match = pm["spec"]["selector"]["matchLabels"]
        assert match.items() <= meta["labels"].items()


def test_sidecar_checksum_changes_with_the_config(example_chart: Path) -> None:
    def checksum(values: dict[str, Any]) -> str:
        docs = support.manifests(support.render_chart(example_chart, values))
        return support.one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/tokenrelay-config"]

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({"tokenrelay": {"admin": {"port": 9999}}}) != base


def test_sidecar_templates_refuse_standalone_mode(example_chart: Path) -> None:
    h = support.helm()
    with pytest.raises(h.HelmError, match="tokenrelay.mode=sidecar"):
        support.render_chart(example_chart, {"tokenrelay": {"mode": "standalone"}})


def test_native_sidecar_needs_kubernetes_1_29(example_chart: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Rendering takes no Kubernetes version, lint does; lint reports `fail` only in its log.
    needle = "native sidecars need Kubernetes 1.29"
    capfd.readouterr()
    report = support.helm().lint(str(example_chart), kube_version="v1.28.0")
    assert any(needle in e for e in report["errors"]) or needle in capfd.readouterr().err, report
    support.helm().lint(str(example_chart), {"tokenrelay": {"sidecar": {"native": False}}}, kube_version="v1.28.0")
    assert needle not in capfd.readouterr().err
    support.helm().lint(str(example_chart), kube_version="v1.29.0")
    assert needle not in capfd.readouterr().err


# --- NOTES ---------------------------------------------------------------------------------------


def test_notes_explain_how_to_use_the_sidecar() -> None:
    text = support.notes(support.render_set("native-sidecar"))
    assert "http://127.0.0.1:8081" in text
    assert "tokenrelay seed --config /etc/tokenrelay/config.yaml --credential crm --refresh-token-file -" in text
    assert "tokenrelay authorize --config /etc/tokenrelay/config.yaml --credential crm --code CODE" in text
    assert "kubectl -n tokenrelay-test exec -i" in text


def test_notes_explain_how_to_use_the_standalone_service() -> None:
    text = support.notes(support.render_set("default"))
    assert f"http://{RELEASE}-tokenrelay.{NAMESPACE}.svc:8081" in text
    assert f"exec -i deploy/{RELEASE}-tokenrelay -c tokenrelay -- \\" in text
    assert "--credential crm --refresh-token-file -" in text
    assert f"exec deploy/{RELEASE}-tokenrelay -c tokenrelay -- \\\n       tokenrelay authorize --config /etc/tokenrelay/config.yaml --credential crm --code CODE" in text
    assert "Secret crm-oauth, key client-secret" in text
    assert "emptyDir" in text  # the default store does not survive the pod
    assert "emptyDir" not in support.notes(support.render_set("monitoring"))


def test_notes_name_each_secret_file_by_its_config_key() -> None:
    text = support.notes(support.render_set("client-auth"))
    for line in [
        "Secret signing-key, key key.pem  (credentials.api.client_assertion_key_file)",
        "Secret google-sa, key sa.json  (credentials.google.service_account_file)",
        "Secret salesforce-key, key key.pem  (credentials.salesforce.assertion_key_file)",
        "Secret bank-tls, key tls.crt  (credentials.bank.client_cert_file)",
        "Secret bank-tls, key tls.key  (credentials.bank.client_key_file)",
        "Secret payments-tls, key tls.crt  (upstreams.payments.client_cert_file)",
        "Secret payments-tls, key tls.key  (upstreams.payments.client_key_file)",
    ]:
        assert line in text, text
    assert "Secret tokenrelay-etcd, key password  (store.password_file)" in support.notes(support.render_set("etcd"))


# --- values.schema.json and template guards --------------------------------------------------------


BAD_VALUES = [
    ({"mode": "daemonset"}, "mode"),
    ({"store": {"type": "sqlite"}}, "type"),
    ({"credentials": [{"name": "crm", "grant": "refresh_token", "client_secret": "hunter2"}]}, "client_secret"),
    ({"credentials": [{"name": "crm", "grant": "implicit"}]}, "grant"),
    ({"credentials": [{"name": "crm", "token_url": "https://e.com/t"}]}, "grant"),
    ({"upstreams": [{"name": "crm", "url": "https://example.com"}]}, "port"),
    ({"upstreams": [{"name": "crm", "port": 70000, "url": "https://example.com"}]}, "port"),
    ({"upstreams": [{"name": "a/b", "port": 8081, "url": "https://example.com"}]}, "name"),
    ({"unknownTopLevelKey": True}, "unknownTopLevelKey"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"credentials": [{"name": "crm", "grant": "refresh_token", "sinks": [{"file": "/run/tokens/t", "format": "yaml"}]}]}, "format"),
    ({"credentials": [{"name": "crm", "grant": "refresh_token", "sinks": [{"file": "/run/tokens/t", "mode": "0666"}]}]}, "mode"),
    ({"credentials": [{"name": "crm", "grant": "refresh_token", "sinks": [{"file": "/run/tokens/t", "mode": 416}]}]}, "mode"),
    ({"credentials": [{"name": "crm", "grant": "refresh_token", "sinks": [{"file": "tokens/t"}]}]}, "file"),
    ({"tokenSinks": {"medium": "Disk"}}, "medium"),
]


@pytest.mark.parametrize(("values", "needle"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_schema_rejects_bad_values(values: dict[str, Any], needle: str) -> None:
    h = support.helm()
    with h.Chart.load(str(CHART)) as chart:
        with pytest.raises(h.HelmError) as err:
            chart.validate_schema(chart.merge_values(values))
        assert needle in str(err.value)
        with pytest.raises(h.HelmError):
            chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_env_reference_for_inline_secrets() -> None:
    values = {"credentials": [{"name": "crm", "grant": "refresh_token", "token_url": "https://e.com/t", "client_secret": "${CRM_SECRET}"}]}
    docs = support.manifests(support.render_chart(CHART, values))
    assert support.config(docs)["credentials"]["crm"]["client_secret"] == "${CRM_SECRET}"


def test_a_preset_gives_the_grant() -> None:
    """A credential with `provider` needs no `grant` (the preset has it); the install notes
    offer a bootstrap for a preset that keeps a refresh token, and none for one whose grant
    is an assertion."""
    values = {
        "credentials": [
            {
                "name": "crm",
                "provider": "amocrm",
                "provider_params": {"subdomain": "mycompany"},
                "client_id": "${CRM_CLIENT_ID}",
                "clientSecretRef": {"name": "crm-oauth", "key": "client-secret"},
                "redirect_uri": "https://example.com/oauth",
            },
            {"name": "gcp", "provider": "google_service_account", "serviceAccountRef": {"name": "gcp-sa", "key": "sa.json"}},
        ],
        "upstreams": [{"name": "crm", "port": 8081, "url": "https://mycompany.amocrm.ru", "credential": "crm"}],
    }
    rendered = support.render_chart(CHART, values)
    crm = support.config(support.manifests(rendered))["credentials"]["crm"]
    assert crm["provider"] == "amocrm" and "grant" not in crm
    text = support.notes(rendered)
    assert "--credential crm --code CODE" in text
    assert "--credential crm --refresh-token-file -" in text
    assert "--credential gcp --code" not in text and "--credential gcp --refresh-token-file" not in text


GUARDS = [
    ({"terminationGracePeriodSeconds": 15}, "must exceed runtime.shutdown_grace"),
    ({"runtime": {"shutdown_grace": "1m30s"}, "terminationGracePeriodSeconds": 90}, "must exceed runtime.shutdown_grace"),
    ({"replicaCount": 2}, "file store holds a credential for one process only"),
    ({"store": {"type": "redis"}}, "store.redis.urlSecretRef.name"),
    ({"store": {"type": "etcd"}}, "store.etcd.endpoints"),
    ({"upstreams": [{"name": "crm", "port": 9090, "url": "https://example.com"}]}, "upstreams.crm.port"),
    ({"upstreams": [{"name": "crm", "port": 8081, "url": "https://example.com", "credential": "nope"}]}, "no credential named"),
    (
        {"upstreams": [{"name": "a", "port": 8081, "url": "https://a.example"}, {"name": "a", "port": 8082, "url": "https://b.example"}]},
        "used twice",
    ),
    ({"tokenSinks": {"enabled": True}}, "which only sidecar mode has"),
    (
        {"credentials": [{"name": "crm", "grant": "client_credentials", "token_url": "https://e.com/t", "sinks": [{"file": "/run/tokens/crm.json"}]}]},
        "credentials.crm.sinks[0].file: the tokenrelay container's root filesystem is read-only",
    ),
    (
        {
            "mode": "sidecar",
            "tokenSinks": {"enabled": True},
            "credentials": [{"name": "crm", "grant": "client_credentials", "token_url": "https://e.com/t", "sinks": [{"file": "/tmp/crm.json"}]}],
        },
        "credentials.crm.sinks[0].file: /tmp/crm.json is not in tokenSinks.mountPath (/run/tokens)",
    ),
]


@pytest.mark.parametrize(("values", "needle"), GUARDS, ids=[n for _, n in GUARDS])
def test_template_guards(values: dict[str, Any], needle: str) -> None:
    h = support.helm()
    with pytest.raises(h.HelmError, match=re.escape(needle)):
        support.render_chart(CHART, values)


# --- token sinks ---------------------------------------------------------------------------------


def test_token_sinks_share_an_empty_dir_with_the_app(example_chart: Path) -> None:
    """tokenSinks: a tmpfs emptyDir the tokenrelay container writes and the app's container
    mounts read-only (the tokenrelay.sidecar.tokenSinksVolumeMounts template); the sinks
    reach the config as written, their mode a string."""
    docs = support.manifests(support.render_chart(example_chart, {"tokenrelay": support.load_values("token-sinks")}))
    spec = support.pod_spec(support.one(docs, "Deployment"))
    volume = next(v for v in spec["volumes"] if v["name"] == "tokenrelay-tokens")
    assert volume == {"name": "tokenrelay-tokens", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    c, _ = support.tokenrelay_container(spec)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tokenrelay-tokens")
    assert mount == {"name": "tokenrelay-tokens", "mountPath": "/run/tokens"}
    app = next(a for a in spec["containers"] if a["name"] == "app")
    assert app["volumeMounts"] == [{"name": "tokenrelay-tokens", "mountPath": "/run/tokens", "readOnly": True}]
    assert spec["securityContext"]["fsGroup"] == 65532
    sinks = support.config(docs)["credentials"]["crm"]["sinks"]
    assert sinks[0] == {"file": "/run/tokens/crm.json", "format": "json", "mode": "0640"}
    assert "mode: \"0640\"" in support.config_text(docs) or "mode: '0640'" in support.config_text(docs)


def test_token_sinks_are_off_by_default(example_chart: Path) -> None:
    spec = support.pod_spec(support.one(support.manifests(support.render_chart(example_chart, {})), "Deployment"))
    assert "tokenrelay-tokens" not in {v["name"] for v in spec["volumes"]}
    app = next(a for a in spec["containers"] if a["name"] == "app")
    assert "volumeMounts" not in app


def test_a_sink_may_go_to_a_writable_extra_volume() -> None:
    """Standalone mode has no app container to share with; a sink there goes to a volume
    of extraVolumes (e.g. a ReadWriteMany claim), any directory under its mount."""
    values = {
        "credentials": [
            {"name": "crm", "grant": "client_credentials", "token_url": "https://e.com/t", "sinks": [{"file": "/var/run/tokens/crm/token"}]}
        ],
        "extraVolumes": [{"name": "tokens", "persistentVolumeClaim": {"claimName": "tokens"}}],
        "extraVolumeMounts": [{"name": "tokens", "mountPath": "/var/run/tokens"}],
    }
    docs = support.manifests(support.render_chart(CHART, values))
    assert support.config(docs)["credentials"]["crm"]["sinks"] == [{"file": "/var/run/tokens/crm/token"}]
    h = support.helm()
    read_only = {**values, "extraVolumeMounts": [{"name": "tokens", "mountPath": "/var/run/tokens", "readOnly": True}]}
    with pytest.raises(h.HelmError, match="root filesystem is read-only"):
        support.render_chart(CHART, read_only)


# --- the dashboard -------------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dash = json.loads((CHART / "dashboards" / "tokenrelay.json").read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def test_dashboard_is_well_formed() -> None:
    dash = json.loads((CHART / "dashboards" / "tokenrelay.json").read_text())
    assert dash["uid"] == "tokenrelay" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "namespace", "credential"}
    assert len(dashboard_exprs()) >= 10


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\btokenrelay_[a-z0-9_]+", expr))


def known_metric(name: str) -> bool:
    if name in support.METRICS:
        return True
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base in support.HISTOGRAMS


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    rules = support.one(support.manifests(support.render_set("monitoring")), "PrometheusRule")["spec"]["groups"][0]["rules"]
    exprs += [str(r["expr"]) for r in rules]
    used = set().union(*(metric_names(e) for e in exprs))
    unknown = {m for m in used if not known_metric(m)}
    assert not unknown, f"metrics not exported by tokenrelay: {sorted(unknown)}"
    assert {"tokenrelay_credential_ready", "tokenrelay_token_refresh_total", "tokenrelay_requests_total"} <= used


def test_packaged_chart_contents(tmp_path: Path) -> None:
    import tarfile

    archive = support.helm().package(str(CHART), destination=str(tmp_path))
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {
        "tokenrelay/Chart.yaml",
        "tokenrelay/values.yaml",
        "tokenrelay/values.schema.json",
        "tokenrelay/README.md",
        "tokenrelay/templates/NOTES.txt",
        "tokenrelay/dashboards/tokenrelay.json",
    } <= names
    assert not [n for n in names if n.startswith("tokenrelay/examples/")], "examples belong to the repository only"
