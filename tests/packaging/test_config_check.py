"""The config the chart renders is accepted by `tokenrelay check`.

The binary comes from TOKENRELAY_BIN (default target/debug/tokenrelay). Paths inside the
pod (/run/secrets/tokenrelay, /var/lib/tokenrelay) are rewritten into a temporary
directory holding stand-in secret files, and every ${VAR} the config expands is set.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

import support
from support import check

SECRETS_DIR = "/run/secrets/tokenrelay"
STATE_DIR = "/var/lib/tokenrelay"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
VALUE_SETS = support.value_set_names()


#: Config keys whose files hold key material `tokenrelay check` parses: a private key, a
#: Google service-account file, a client certificate with its key.
KEY_FILES = {"client_assertion_key_file", "assertion_key_file", "service_account_file", "client_cert_file", "client_key_file"}


def openssl(*args: str) -> None:
    """Run openssl (skips the test when it is not installed)."""
    path = support.tool("openssl")
    if path is None:
        pytest.skip("openssl is not installed (scripts/test-tools.txt)")
    done = support.run([path, *args], timeout=60)
    assert done.returncode == 0, done.stderr


def pem_body(pem: str) -> list[str]:
    """The base64 lines of a PEM file: what must never be printed."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def write_key_material(block: dict[str, Any], key: str, path: Path, workdir: Path) -> list[str]:
    """Write a real key, service account or certificate for `key` of a config block (a
    certificate and its key together); return the secret lines."""
    if key == "client_key_file":
        return []  # written with client_cert_file
    if key == "client_cert_file":
        key_path = Path(block["client_key_file"])
        key_path.parent.mkdir(parents=True, exist_ok=True)
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "90",
                "-subj", "/CN=tokenrelay-test", "-keyout", str(key_path), "-out", str(path))
        key_path.chmod(0o400)
        return pem_body(key_path.read_text())
    pem_path = path if key != "service_account_file" else workdir / f"sa-key-{secrets.token_hex(4)}.pem"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(pem_path))
    pem = pem_path.read_text()
    if key == "service_account_file":
        pem_path.unlink()
        account = {
            "type": "service_account",
            "project_id": "test",
            "private_key_id": secrets.token_hex(8),
            "private_key": pem,
            "client_email": "relay@test.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
        path.write_text(json.dumps(account))
    return pem_body(pem)


def materialize(config_text: str, workdir: Path) -> tuple[Path, dict[str, str], list[str]]:
    """Write the config with in-pod paths moved under workdir, create the files it refers
    to, and return (config path, environment, secret values that must never be printed)."""
    secrets_dir = workdir / "secrets"
    state_dir = workdir / "state"
    state_dir.mkdir(mode=0o700, parents=True)
    text = config_text.replace(SECRETS_DIR, str(secrets_dir)).replace(STATE_DIR, str(state_dir))
    cfg = yaml.safe_load(text)
    printed_never: list[str] = []
    blocks = {"store": cfg["store"]}
    blocks |= {f"credentials.{n}": c for n, c in cfg["credentials"].items()}
    blocks |= {f"upstreams.{n}": u for n, u in cfg["upstreams"].items()}
    for where, key, value in support.secret_file_keys(cfg):
        path = Path(value)
        assert path.is_relative_to(secrets_dir), f"{where}.{key}: {value} is not under the secrets mount"
        path.parent.mkdir(parents=True, exist_ok=True)
        if key in KEY_FILES:
            printed_never += write_key_material(blocks[where], key, path, workdir)
            if path.exists():
                path.chmod(0o400)
            continue
        if key == "encryption_key_file":
            content = base64.b64encode(secrets.token_bytes(32)).decode()
        else:
            content = f"s3cr3t-{key}-{secrets.token_hex(8)}"
        path.write_text(content + "\n")
        path.chmod(0o400)
        printed_never.append(content)
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    for var in sorted(set(ENV_REF.findall(text))):
        env[var] = "redis://127.0.0.1:6379/0" if var == "TOKENRELAY_REDIS_URL" else f"test-{var.lower()}"
    config_path = workdir / "config.yaml"
    config_path.write_text(text)
    return config_path, env, printed_never


def rendered_config(name: str, example_chart: Path) -> str:
    if name == "example-defaults":
        docs = support.manifests(support.render_chart(example_chart, {}))
    else:
        docs = support.manifests(support.render_set(name))
    return support.config_text(docs)


@pytest.mark.parametrize("name", [*VALUE_SETS, "example-defaults"])
def test_rendered_config_passes_tokenrelay_check(name: str, tokenrelay_bin: Path, example_chart: Path, tmp_path: Path) -> None:
    config_path, env, never = materialize(rendered_config(name, example_chart), tmp_path)
    code, output = check(tokenrelay_bin, config_path, env)
    assert code == 0, f"tokenrelay check rejected the config of {name}:\n{output}\n--- config:\n{config_path.read_text()}"
    leaked = [s for s in never if s in output]
    assert not leaked, "tokenrelay check printed a secret"


def mutate(config_text: str, change: Any) -> str:
    cfg = yaml.safe_load(config_text)
    change(cfg)
    return yaml.safe_dump(cfg, sort_keys=False)


def first_credential(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = sorted(cfg["credentials"])[0]
    return name, cfg["credentials"][name]


def test_check_rejects_unknown_keys_by_path(tokenrelay_bin: Path, example_chart: Path, tmp_path: Path) -> None:
    """Control: the check above is meaningful only if check really validates."""
    text = rendered_config("default", example_chart)
    name, _ = first_credential(yaml.safe_load(text))
    bad = mutate(text, lambda cfg: first_credential(cfg)[1].__setitem__("bogus_key", 1))
    config_path, env, _ = materialize(bad, tmp_path)
    code, output = check(tokenrelay_bin, config_path, env)
    assert code == 1, output
    assert f"credentials.{name}.bogus_key" in output


def test_check_rejects_plain_http_token_url(tokenrelay_bin: Path, example_chart: Path, tmp_path: Path) -> None:
    text = rendered_config("default", example_chart)
    name, _ = first_credential(yaml.safe_load(text))
    bad = mutate(text, lambda cfg: first_credential(cfg)[1].__setitem__("token_url", "http://example.com/token"))
    config_path, env, _ = materialize(bad, tmp_path)
    code, output = check(tokenrelay_bin, config_path, env)
    assert code == 1, output
    assert f"credentials.{name}.token_url" in output


def quick_start_values() -> dict[str, Any]:
    """The values file of docs/kubernetes.md's quick start (the yaml block that starts with
    `# values-quickstart.yaml`)."""
    text = (support.REPO / "docs" / "kubernetes.md").read_text()
    blocks = [b.split("```")[0] for b in text.split("```yaml\n")[1:]]
    found = [b for b in blocks if b.lstrip().startswith("# values-quickstart.yaml")]
    assert len(found) == 1, "docs/kubernetes.md has no quick start values block"
    return yaml.safe_load(textwrap.dedent(found[0]))


def test_the_kubernetes_quick_start_installs_and_passes_check(tokenrelay_bin: Path, tmp_path: Path) -> None:
    """The quick start's values render with the chart, use the image scripts/build-image.sh
    names by default (and the quick start loads), and give a config `tokenrelay check`
    accepts."""
    values = quick_start_values()
    version = re.search(r'^version\s*=\s*"([^"]+)"', (support.REPO / "Cargo.toml").read_text(), re.M)
    assert version, "Cargo.toml has no version"
    script = (support.REPO / "scripts" / "build-image.sh").read_text()
    assert 'tag="localhost/tokenrelay:${version:-dev}"' in script, "build-image.sh names its image differently now"
    image = f"{values['image']['repository']}:{values['image']['tag']}"
    assert image == f"localhost/tokenrelay:{version.group(1)}", image
    docs_text = (support.REPO / "docs" / "kubernetes.md").read_text()
    for loader in ("kind load docker-image", "k3d image import", "minikube image load"):
        assert f"{loader} {image}" in docs_text, f"the quick start does not load {image} with {loader}"
    assert values["image"]["pullPolicy"] == "Never"
    docs = support.manifests(support.render_chart(support.CHART, values))
    config_path, env, never = materialize(support.config_text(docs), tmp_path)
    code, output = check(tokenrelay_bin, config_path, env)
    assert code == 0, f"tokenrelay check rejected the quick start's config:\n{output}\n--- config:\n{config_path.read_text()}"
    assert not [s for s in never if s in output], "tokenrelay check printed a secret"
