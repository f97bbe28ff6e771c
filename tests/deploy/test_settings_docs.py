"""The deployment files agree with the code: settings, ports, probes, pins.

``Settings`` ignores unknown ``STATEHUB_*`` variables (``extra="ignore"``), so a typo in a
compose file or a manifest would be silently dropped; these tests parse the README, the
compose file, the Kubernetes manifests and the Dockerfile and compare every name with
``Settings.model_fields``, both ways where the file claims to be complete (the README).
They run offline; the linters (hadolint, yamllint, kubernetes-validate) run in
``make deploy-check``.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from pydantic import SecretStr

from deploy.constraints import closure, server_requirements
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "STATEHUB_"
SETTING = re.compile(r"\b(STATEHUB_[A-Z0-9_]+)\b")
# Client-side variables (statehub.Client, the CLI) and the tests' own: not server settings.
NOT_SERVER = {
    "STATEHUB_URL",
    "STATEHUB_TOKEN",
    "STATEHUB_CACHE",
    "STATEHUB_CACHE_MAX_BYTES",
    "STATEHUB_OFFLINE",
    "STATEHUB_TEST_DATABASE_URL",
}


def env_names() -> set[str]:
    return {PREFIX + name.upper() for name in Settings.model_fields}


def settings_from_env(env: dict[str, str]) -> Settings:
    """Validate values as the server would read them from its environment."""
    values = {k.removeprefix(PREFIX).lower(): v for k, v in env.items() if k.startswith(PREFIX)}
    return Settings(**values)


def unknown(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith(PREFIX)} - env_names() - NOT_SERVER


# -- README -------------------------------------------------------------------------------


def readme_table() -> dict[str, str]:
    """``{setting: default cell}`` from the README's configuration table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith(f"`{PREFIX}"):
            names = SETTING.findall(cells[0])
            assert len(names) == 1, f"one setting per row: {line}"
            assert names[0] not in rows, f"documented twice: {names[0]}"
            rows[names[0]] = cells[1]
    return rows


def documented_default(cell: str) -> object:
    """A default cell: a code span with the exact value, or "unset" for no value."""
    if cell.startswith("unset"):
        return None
    match = re.match(r"`([^`]*)`", cell)
    assert match, f"the default must start with a code span or 'unset': {cell!r}"
    return "" if match.group(1) == '""' else match.group(1)


def env_form(value: object) -> object:
    """A default as it would be written in the environment."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def test_readme_documents_exactly_the_settings_with_their_defaults() -> None:
    table = readme_table()
    assert set(table) - env_names() == set(), "documented but not a setting"
    assert env_names() - set(table) == set(), "a setting the README does not document"
    for name, field in Settings.model_fields.items():
        cell = table[PREFIX + name.upper()]
        assert documented_default(cell) == env_form(field.default), f"{name}: {cell}"


def test_readme_mentions_no_unknown_server_setting() -> None:
    text = (ROOT / "README.md").read_text()
    assert unknown(set(SETTING.findall(text))) == set()


# -- docker-compose.yml -------------------------------------------------------------------


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?error}`` as an unset VAR would give them,
    with a usable stand-in for the required ones."""
    value = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)
    value = re.sub(r"\$\{[A-Z0-9_]+:\?[^}]*\}", "shb_" + secrets.token_urlsafe(32), value)
    return value.replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    env = compose["services"][name].get("environment", {})
    assert isinstance(env, dict), f"{name}: environment as a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def test_compose_uses_only_real_settings_with_valid_values(compose: dict[str, Any]) -> None:
    for name in compose["services"]:
        env = service_env(compose, name)
        assert unknown(set(env)) == set(), name
    for name in ("migrate", "statehub"):
        settings = settings_from_env(service_env(compose, name))
        assert settings.database_url.startswith("postgresql+psycopg://")
        assert settings.uses_s3
    assert (
        service_env(compose, "migrate")["STATEHUB_DATABASE_URL"]
        == (service_env(compose, "statehub")["STATEHUB_DATABASE_URL"])
    )


def test_compose_migrates_once_before_the_app(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "migrate", "statehub"} <= set(services)
    app = services["statehub"]
    settings = settings_from_env(service_env(compose, "statehub"))
    assert settings.migrate_on_start is False
    assert services["migrate"]["command"] == ["migrate"]
    needs = {k: v["condition"] for k, v in app["depends_on"].items()}
    assert needs == {
        "migrate": "service_completed_successfully",
        "minio-init": "service_completed_successfully",
        "postgres": "service_healthy",
        "minio": "service_healthy",
    }
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    bucket = settings.s3_bucket
    assert f"local/{bucket}" in " ".join(services["minio-init"]["command"])


def test_compose_services_are_pinned_healthy_and_persistent(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: pin the image ({image})"
    for name in ("postgres", "minio", "statehub"):
        assert services[name]["healthcheck"]["test"], name
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: undeclared volume {source}"
    app = services["statehub"]
    grace = settings_from_env(service_env(compose, "statehub")).shutdown_grace_seconds
    assert _seconds(app["stop_grace_period"]) > grace


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match.group(1))


# -- deploy/k8s ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """``{kind: resource}``: one resource of each kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for resource in yaml.safe_load_all(path.read_text()):
            assert resource["kind"] not in found, f"two {resource['kind']} resources"
            found[resource["kind"]] = resource
    return found


def containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return list(resource["spec"]["template"]["spec"]["containers"])


def test_manifests_use_only_real_settings(manifests: dict[str, dict[str, Any]]) -> None:
    config = manifests["ConfigMap"]["data"]
    secret = manifests["Secret"]["stringData"]
    names = set(config) | set(secret)
    for kind in ("Deployment", "Job"):
        for container in containers(manifests[kind]):
            names |= {e["name"] for e in container.get("env", [])}
    assert unknown(names) == set()
    assert all(n.startswith(PREFIX) for n in set(config) | set(secret))
    settings = settings_from_env(config)  # the non-secret values parse as the server reads them
    assert settings.migrate_on_start is False
    assert {"STATEHUB_DATABASE_URL", "STATEHUB_S3_SECRET_ACCESS_KEY"} <= set(secret)


def test_deployment_is_replicated_probed_and_sized(manifests: dict[str, dict[str, Any]]) -> None:
    deployment, config = manifests["Deployment"], manifests["ConfigMap"]["data"]
    settings = settings_from_env(config)
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    (container,) = containers(deployment)
    port = container["ports"][0]
    assert port["containerPort"] == settings.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    refs = [next(iter(source.values()))["name"] for source in container["envFrom"]]
    assert refs == [
        manifests["ConfigMap"]["metadata"]["name"],
        manifests["Secret"]["metadata"]["name"],
    ]
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + settings.shutdown_grace_seconds
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = manifests[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] >= 2


def test_migration_job_runs_migrate_with_the_same_settings(
    manifests: dict[str, dict[str, Any]],
) -> None:
    (job,) = containers(manifests["Job"])
    (app,) = containers(manifests["Deployment"])
    assert job["args"] == ["migrate"] and app["args"] == ["serve"]
    assert job["image"] == app["image"]
    assert job["envFrom"] == app["envFrom"]
    assert manifests["Job"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


# -- deploy/Dockerfile --------------------------------------------------------------------


def dockerfile() -> str:
    # Continuation lines joined: one instruction per line.
    return re.sub(r"\\\n\s*", " ", (ROOT / "deploy" / "Dockerfile").read_text())


def test_dockerfile_is_pinned_non_root_and_uses_real_settings() -> None:
    text = dockerfile()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base[1])
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    assert re.search(r'"torch==\d+\.\d+\.\d+"', text) and "whl/cpu" in text
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user and user[1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*healthcheck", text, re.M)
    assert re.search(r'^ENTRYPOINT \["statehub"\]$', text, re.M)
    assert unknown(set(SETTING.findall(text))) == set()
    uid = int(user[1].split(":")[0])
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_image_constraints_pin_every_server_dependency() -> None:

    pinned = {
        line.split("==")[0]
        for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    needed = set(closure(server_requirements())) - set(closure([Requirement("torch")]))
    assert needed - pinned == set(), "run `make constraints`"
