"""The deployment files hold what the code expects of them: docker-compose.yml publishes ports on
127.0.0.1 only, the Kubernetes kustomization never applies the example Secret, and each
container, in Kubernetes and in compose, gets only the secrets its service uses, and every one it
needs. What a service uses is read from the code: its settings' `secrets()` with every optional
secret switched on, its own settings, and the document store's URL when it reaches the store.

Compose cannot run here (no Docker); the files are read as YAML."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.admin.settings import AdminSettings
from services.dispatcher.settings import DispatcherSettings
from services.ingest.settings import IngestSettings
from services.orchestrator.settings import OrchestratorSettings
from services.segmenter.settings import SegmenterSettings
from shared.settings import CommonSettings, StreamSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
SECRET_NAME = "waypost-secrets"
# The `waypost` CLI (the topics job) reads the common settings.
CLI = "cli"
SETTINGS: dict[str, type[CommonSettings]] = {
    "ingest": IngestSettings,
    "admin": AdminSettings,
    "segmenter": SegmenterSettings,
    "orchestrator": OrchestratorSettings,
    "dispatcher": DispatcherSettings,
    CLI: CommonSettings,
}
# Every optional secret switched on, where the service's settings have the field: a Kafka
# cluster that asks for SASL, a signed-in SMTP server, the UI's own session secret.
ALL_ON: dict[str, Any] = {
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "PLAIN",
    "kafka_sasl_username": "waypost",
    "kafka_sasl_password": "a-password",
    "smtp_username": "waypost",
    "smtp_password": "a-password",
    "admin_session_secret": "a-session-secret",
}
# What a service reaching the document store imports to do it.
STORE_MODULES = ("shared.docstore", "shared.document_view")


def _variable(name: str) -> str:
    """`WAYPOST_ADMIN_API_KEYS (ops)` -> `WAYPOST_ADMIN_API_KEYS`."""
    return name.split(" (", 1)[0]


def uses_store(service: str) -> bool:
    if service == CLI:
        return False  # the topics job: Kafka only
    sources = (ROOT / "services" / service).rglob("*.py")
    return any(module in path.read_text() for path in sources for module in STORE_MODULES)


@cache
def allowed(service: str) -> frozenset[str]:
    """Every secret variable the service may be given."""
    settings = SETTINGS[service]
    on = {name: value for name, value in ALL_ON.items() if name in settings.model_fields}
    used = {_variable(s.variable) for s in settings(**on).secrets()}
    # Its own settings (not the common ones every service reads): an SMS account's id and a
    # WeChat app id travel in the Secret with their credentials.
    base: type[BaseSettings] = (
        StreamSettings if issubclass(settings, StreamSettings) else CommonSettings
    )
    own = {
        f"WAYPOST_{name.upper()}" for name in settings.model_fields if name not in base.model_fields
    }
    store = {"WAYPOST_MONGO_URL"} if uses_store(service) else set()
    return frozenset(used | (own & catalogue()) | store)


@cache
def required(service: str) -> frozenset[str]:
    """The secrets the service refuses to start without in production, and the store's URL."""
    needed = {_variable(s.variable) for s in SETTINGS[service]().secrets() if not s.optional}
    return frozenset(needed | ({"WAYPOST_MONGO_URL"} if uses_store(service) else set()))


@cache
def catalogue() -> frozenset[str]:
    """The keys of `waypost-secrets`, as the example lists them."""
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    return frozenset(example["stringData"])


def service_of(command: list[str] | str) -> str:
    """Which service a container runs, from its command."""
    text = command if isinstance(command, str) else " ".join(command)
    found = re.search(r"python -m services\.(\w+)", text)
    if found:
        return found.group(1)
    assert text.startswith("waypost "), f"a command that runs no Waypost service: {text}"
    return CLI


# --- Kubernetes -------------------------------------------------------------------------------


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        (name, document)
        for name in kustomization["resources"]
        for document in yaml.safe_load_all((K8S / name).read_text())
        if document
    ]


def _workloads() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name} {document['kind']}/{document['metadata']['name']}", document)
        for name, document in _manifests()
        if document["kind"] in ("Deployment", "StatefulSet", "Job")
    ]


def test_the_kustomization_never_applies_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = [
        *kustomization.get("resources", []),
        *kustomization.get("components", []),
        *kustomization.get("patches", []),
    ]

    assert "secret.example.yaml" not in [str(entry) for entry in listed]
    assert "secretGenerator" not in kustomization
    assert [name for name, document in _manifests() if document["kind"] == "Secret"] == []


def test_every_service_and_the_topics_job_is_deployed() -> None:
    ran = {
        service_of(container["command"])
        for _where, workload in _workloads()
        for container in workload["spec"]["template"]["spec"]["containers"]
    }

    assert ran == set(SETTINGS)


@pytest.mark.parametrize("where", [where for where, _ in _workloads()])
def test_each_workload_gets_only_the_secrets_its_service_uses_and_all_it_needs(
    where: str,
) -> None:
    workload = dict(_workloads())[where]
    for container in workload["spec"]["template"]["spec"]["containers"]:
        service = service_of(container["command"])
        assert "envFrom" not in container or all(
            "secretRef" not in source for source in container["envFrom"]
        ), f"{where}: the whole Secret is given, not the keys it uses"
        refs = [
            entry["valueFrom"]["secretKeyRef"]
            for entry in container.get("env", [])
            if "secretKeyRef" in entry.get("valueFrom", {})
        ]
        keys = {ref["key"] for ref in refs}

        assert {ref["name"] for ref in refs} <= {SECRET_NAME}
        assert keys <= catalogue(), f"{where}: keys secret.example.yaml does not list"
        assert keys - allowed(service) == set(), f"{where}: secrets {service} does not use"
        assert required(service) - keys == set(), f"{where}: secrets {service} needs"
        for entry in container.get("env", []):
            if "secretKeyRef" in entry.get("valueFrom", {}):
                assert entry["name"] == entry["valueFrom"]["secretKeyRef"]["key"]


# --- docker compose ---------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # anchors and `<<` merged
    return loaded


def _waypost_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if str(service.get("image", "")).startswith("waypost:")
    }


def _published(port: str | int | dict[str, Any]) -> str | None:
    """The host address a port entry binds (None: every address)."""
    if isinstance(port, dict):
        return str(port["host_ip"]) if "host_ip" in port else None
    parts = str(port).rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def test_every_published_port_in_compose_is_bound_to_127_0_0_1() -> None:
    published = {
        f"{name} {port}": _published(port)
        for name, service in compose()["services"].items()
        for port in service.get("ports", [])
    }

    assert published, "compose publishes no port at all"
    assert {entry: host for entry, host in published.items() if host != "127.0.0.1"} == {}


def test_compose_runs_every_service_and_the_topics_job() -> None:
    assert {service_of(s["command"]) for s in _waypost_services().values()} == set(SETTINGS)


@pytest.mark.parametrize("name", sorted(_waypost_services()))
def test_each_compose_service_gets_only_the_secrets_it_uses_and_all_it_needs(name: str) -> None:
    service = _waypost_services()[name]
    runs = service_of(service["command"])
    environment = service.get("environment", {})
    assert isinstance(environment, dict), f"{name}: environment as a mapping"
    given = set(environment) & catalogue()

    assert given - allowed(runs) == set(), f"{name}: secrets {runs} does not use"
    assert required(runs) - set(environment) == set(), f"{name}: secrets {runs} needs"


def test_ingest_and_the_dispatcher_share_the_link_secret_in_compose() -> None:
    services = _waypost_services()

    assert (
        services["ingest"]["environment"]["WAYPOST_LINK_SECRET"]
        == services["dispatcher"]["environment"]["WAYPOST_LINK_SECRET"]
    )
