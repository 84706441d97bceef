"""Shared helpers for the deployment checks: all offline, no Docker engine, no cluster, no helm binary.

The chart is rendered with helm-python-sdk (Helm's Go SDK through a C library), manifests are
validated against the Kubernetes JSON schemas shipped in kubernetes-validate, compose files with
compose-spec, NATS configurations with `nats-server -t`.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "csx"
COMPOSE_FILE = ROOT / "docker-compose.yml"
NATS_ACCOUNTS = CHART / "files" / "nats" / "accounts.conf"
COMPOSE_NATS_CONF = ROOT / "deploy" / "compose" / "nats.conf"
SERVICES = ("referrals", "panel", "conferences", "actionplans")
# The Kubernetes version manifests are validated against (the chart's kubeVersion allows >= 1.30).
KUBE_VERSION = "1.33"
RELEASE = "csx"
NAMESPACE = "csx"

# Variables the deployments set that no CSX settings class reads, because a library does: the
# OpenTelemetry SDK (OTEL_*), OpenSSL (SSL_CERT_FILE: the CA for NATS TLS) and asyncpg
# (PGSSLROOTCERT: the CA for PostgreSQL TLS). Anything else must be a settings field.
STANDARD_VARIABLES = frozenset(
    {
        "OTEL_SERVICE_NAME",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "SSL_CERT_FILE",
        "PGSSLROOTCERT",
    }
)


# --- the settings vocabulary, read from the settings classes ----------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    service: str
    cls: type
    prefix: str
    known: frozenset[str]
    required: frozenset[str]


def _settings_class(service: str) -> type:
    from csx_common.settings import ServiceSettings

    module = importlib.import_module(f"csx_{service}.settings")
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, ServiceSettings) and obj is not ServiceSettings
    ]
    assert len(classes) == 1, f"csx_{service}.settings should define one ServiceSettings subclass"
    return classes[0]


@cache
def vocabulary(service: str) -> Vocabulary:
    cls = _settings_class(service)
    prefix = str(cls.model_config.get("env_prefix", ""))
    assert prefix == f"CSX_{service.upper()}_", f"{cls.__name__} has env_prefix {prefix!r}"
    fields = cls.model_fields
    known = frozenset(prefix + name.upper() for name in fields)
    required = frozenset(prefix + name.upper() for name, f in fields.items() if f.is_required())
    return Vocabulary(service, cls, prefix, known, required)


def settings_from_env(service: str, env: Mapping[str, str]) -> Any:
    """Build the service's settings from exactly `env` (as the process would see it)."""
    cls = vocabulary(service).cls
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return cls()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- Helm ---------------------------------------------------------------------------------------------


@cache
def chart() -> Any:
    import helm_python

    return helm_python.Chart.load(CHART)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Rendered:
    values: dict[str, Any]
    manifests: dict[str, str]
    objects: list[dict[str, Any]]

    @property
    def notes(self) -> str:
        return next((v for k, v in self.manifests.items() if k.endswith("NOTES.txt")), "")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{kind}/{name} not rendered")

    def workloads(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(object, pod spec) for every object that makes pods."""
        for o in self.objects:
            if o["kind"] in ("Deployment", "StatefulSet", "Job"):
                yield o, o["spec"]["template"]["spec"]
            elif o["kind"] == "Pod":
                yield o, o["spec"]


def render(values: Mapping[str, Any] | None = None, **options: Any) -> Rendered:
    manifests = chart().render(
        dict(values or {}), name=options.get("name", RELEASE), namespace=options.get("namespace", NAMESPACE)
    )
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(dict(values or {}), manifests, objects)


_validated: set[str] = set()


def validate_manifest(obj: Mapping[str, Any]) -> None:
    """Against the Kubernetes OpenAPI schema (strict: unknown fields fail). Identical objects across
    the values matrix are validated once."""
    import kubernetes_validate

    key = json.dumps(obj, sort_keys=True)
    if key in _validated:
        return
    kubernetes_validate.validate(dict(obj), KUBE_VERSION, strict=True)
    _validated.add(key)


def container_env(rendered: Rendered, container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment as the kubelet would build it: envFrom ConfigMaps resolved from
    the rendered objects, Secret references as placeholders."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(rendered.get("ConfigMap", ref)["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                env[item["name"]] = f"<secret {ref['secretKeyRef']['name']}/{ref['secretKeyRef']['key']}>"
            else:
                env[item["name"]] = "<from field>"
    return env


# --- compose ------------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error} interpolation."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if value:
            return value
        if op in (":-", "-"):
            return arg or ""
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return _INTERPOLATION.sub(replace, text)


def compose_env_names() -> set[str]:
    text = COMPOSE_FILE.read_text()
    return {m.group(1) for m in _INTERPOLATION.finditer(text)}


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml parsed and validated by compose-spec (anchors merged), after interpolation
    with `env` when given."""
    from compose_spec import PyOptions

    text = COMPOSE_FILE.read_text()
    if env is not None:
        text = interpolate(text, env)
    project = PyOptions(apply_merge=True).from_yaml(text)
    project.validate()
    return project.to_dict()


def compose_environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# --- nats-server ----------------------------------------------------------------------------------------


@cache
def nats_server() -> str:
    from csx_common.natsserver import nats_server_binary

    return nats_server_binary()


def nats_check(config: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`nats-server -t -c config` with exactly `env` (passwords come from the environment)."""
    return subprocess.run(  # noqa: S603
        [nats_server(), "-t", "-c", str(config)],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@cache
def nats_server_version() -> str:
    out = subprocess.run([nats_server(), "--version"], capture_output=True, text=True, check=True)  # noqa: S603
    match = re.search(r"v(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    assert match, out
    return match.group(1)


def nats_passwords() -> dict[str, str]:
    return {f"NATS_{s.upper()}_PASSWORD": f"{s}-password-0123456789" for s in SERVICES} | {
        "NATS_OPERATOR_PASSWORD": "operator-password-0123456789"
    }


# --- generated secrets (deploy/scripts/init_secrets.py) -----------------------------------------------


def init_secrets_module() -> Any:
    import importlib.util

    path = ROOT / "deploy" / "scripts" / "init_secrets.py"
    spec = importlib.util.spec_from_file_location("csx_init_secrets", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def compose_secrets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """What `init_secrets.py compose` writes, in a temporary directory: (secrets dir, .env values)."""
    base = tmp_path_factory.mktemp("compose-secrets")
    module = init_secrets_module()
    module.init_compose(base / "secrets", base / ".env")
    return base / "secrets", module.read_env_file(base / ".env")
