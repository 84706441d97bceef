"""One vocabulary: the environment that docker-compose.yml and the Helm chart give each service is
the one its settings class reads. Both directions: every variable the class requires is set, and
every variable set is a field of the class (or one of the few standard variables that a library
reads). The names come from the classes themselves (pydantic model_fields + env_prefix), never
from a list kept here; and the values must load: the class is built from the very environment."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import (
    SERVICES,
    STANDARD_VARIABLES,
    Rendered,
    chart,
    compose_environment,
    container_env,
    load_compose,
    render,
    settings_from_env,
    vocabulary,
)
from tests.deploy.test_chart import MATRIX


def check_environment(service: str, env: dict[str, str], where: str, *, full: bool) -> None:
    vocab = vocabulary(service)
    unknown = sorted(n for n in env if n not in vocab.known and n not in STANDARD_VARIABLES)
    assert not unknown, f"{where} sets {unknown}, which {vocab.cls.__name__} does not read"
    # Development shortcuts never reach a deployment.
    assert env.get(f"{vocab.prefix}INSECURE_DEV", "false") == "false", where
    if full:
        missing = sorted(vocab.required - env.keys())
        assert not missing, f"{where} does not set {missing}, which {vocab.cls.__name__} requires"
    else:
        # A migration step needs the database URL only.
        assert f"{vocab.prefix}DATABASE_URL" in env, where


def resolved(env: dict[str, str]) -> dict[str, str]:
    """Placeholders for values that only exist at run time (Secrets), so the class can load."""
    out = {}
    for name, value in env.items():
        if value.startswith("<secret "):
            if name.endswith("_DATABASE_URL"):
                value = "postgresql+asyncpg://csx@db/csx"
            elif name.endswith("_NATS_URL"):
                value = "tls://svc:pw@nats:4222"
        out[name] = value
    return out


def test_vocabulary_is_read_from_the_settings_classes() -> None:
    for service in SERVICES:
        vocab = vocabulary(service)
        assert {
            f"{vocab.prefix}{n}" for n in ("GRPC_ADDRESS", "DATABASE_URL", "NATS_URL", "KEYRING_FILE")
        } <= vocab.required
        assert f"{vocab.prefix}LOG_LEVEL" in vocab.known - vocab.required
        # The plaintext health-only port: optional, off unless a deployment sets it.
        assert f"{vocab.prefix}HEALTH_ADDRESS" in vocab.known - vocab.required
    assert "CSX_ACTIONPLANS_CONFERENCES_ADDRESS" in vocabulary("actionplans").required
    assert "CSX_PANEL_FLAG_THRESHOLD_CHILDREN" in vocabulary("panel").known


# --- docker-compose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose(compose_secrets: Any) -> dict[str, Any]:
    _, env = compose_secrets
    return load_compose(env)


def test_compose_services_set_exactly_their_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for service in SERVICES:
        env = compose_environment(services[service])
        check_environment(service, env, f"docker-compose {service}", full=True)
        settings = settings_from_env(service, env)
        assert settings.grpc_address == "0.0.0.0:50051"
        # The compose health check uses the mutual-TLS port: no plaintext health port here.
        assert settings.health_address == ""
        assert settings.keyring_file.startswith("/run/secrets/")
        assert settings.database_url.startswith("postgresql+asyncpg://")


def test_compose_migrations_set_only_their_service_settings(compose: dict[str, Any]) -> None:
    for service in SERVICES:
        env = compose_environment(compose["services"][f"{service}-migrate"])
        check_environment(service, env, f"docker-compose {service}-migrate", full=False)


def test_no_compose_container_sets_another_service_s_settings(compose: dict[str, Any]) -> None:
    """CSX_<X>_ variables appear only on X's own containers."""
    for name, spec in compose["services"].items():
        owner = name.removesuffix("-migrate")
        for variable in compose_environment(spec):
            if variable.startswith("CSX_"):
                assert owner in SERVICES and variable.startswith(f"CSX_{owner.upper()}_"), (name, variable)


# --- Helm -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(MATRIX), ids=list(MATRIX))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(MATRIX[request.param])


def test_chart_services_set_exactly_their_settings(rendered: Rendered) -> None:
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in rendered.of_kind("Deployment")}
    assert deployments
    for service, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = container_env(rendered, container)
        check_environment(service, env, f"chart Deployment {service}", full=True)
        settings = settings_from_env(service, resolved(env))
        assert settings.keyring_file == "/etc/csx/keyring/keyring.json"
        # The kubelet's probes reach the health port on the pod's address: all interfaces.
        health_port = chart().merge_values(rendered.values)["healthPort"]
        assert settings.health_address == f"0.0.0.0:{health_port}"
        assert settings.grpc_address == "0.0.0.0:50051"


def test_chart_settings_values_reach_the_service_typed() -> None:
    """Values from values.yaml arrive as the types pydantic expects (no 1.048576e+06)."""
    from tests.deploy.test_chart import ALL_SETTINGS

    r = render(MATRIX["all-services-all-settings"])
    for service in SERVICES:
        (container,) = r.get("Deployment", f"csx-{service}")["spec"]["template"]["spec"]["containers"]
        settings = settings_from_env(service, resolved(container_env(r, container)))
        assert settings.stream_max_age_days == 90
        assert settings.max_message_bytes == ALL_SETTINGS.get(service, {}).get("maxMessageBytes", 1048576)
        for key, value in ALL_SETTINGS[service].items():
            field = "".join(f"_{c.lower()}" if c.isupper() else c for c in key)
            assert getattr(settings, field) == value, (service, key)
    (container,) = r.get("Deployment", "csx-actionplans")["spec"]["template"]["spec"]["containers"]
    settings = settings_from_env("actionplans", resolved(container_env(r, container)))
    assert settings.conferences_address == "csx-conferences:50051"


def test_chart_migration_jobs_set_only_their_service_settings(rendered: Rendered) -> None:
    for job in rendered.of_kind("Job"):
        service = job["metadata"]["labels"]["csx.io/service"]
        (container,) = job["spec"]["template"]["spec"]["containers"]
        check_environment(service, container_env(rendered, container), f"chart Job {service}", full=False)


def test_chart_uses_the_same_names_as_compose(compose: dict[str, Any]) -> None:
    """The two deployments share one vocabulary for the settings both of them set."""
    r = render({})
    for service in SERVICES:
        (container,) = r.get("Deployment", f"csx-{service}")["spec"]["template"]["spec"]["containers"]
        chart_env = set(container_env(r, container))
        compose_env = set(compose_environment(compose["services"][service]))
        required = vocabulary(service).required
        assert required <= chart_env & compose_env
