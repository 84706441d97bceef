"""docker-compose.yml, validated against the Compose specification (compose-spec) and checked for
what a first server needs: ordering by health and completed migrations, health checks, hardened
containers, ports on loopback only, secrets that exist and reach only their service, and the
telemetry path from the services through the collector to Jaeger."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    CHART,
    COMPOSE_FILE,
    ROOT,
    SERVICES,
    compose_env_names,
    compose_environment,
    init_secrets_module,
    load_compose,
)

INFRASTRUCTURE = ("nats", "postgres", "otel-collector", "jaeger")


@pytest.fixture(scope="module")
def compose(compose_secrets: Any) -> dict[str, Any]:
    _, env = compose_secrets
    return load_compose(env)


def test_compose_file_is_valid_as_written_and_after_interpolation(compose_secrets: Any) -> None:
    raw = load_compose()
    assert raw["name"] == "csx"
    _, env = compose_secrets
    interpolated = load_compose(env)
    assert set(interpolated["services"]) == set(raw["services"])


def test_every_interpolated_variable_comes_from_init_secrets(compose_secrets: Any) -> None:
    module = init_secrets_module()
    assert compose_env_names() == set(module.compose_env_names())
    _, env = compose_secrets
    assert set(module.compose_env_names()) <= set(env)
    # Unset, compose refuses to start (${VAR:?...}) rather than use an empty password.
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"\$\{[A-Z_]+(:-|-)", text)


def test_services_and_steps(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*INFRASTRUCTURE, *SERVICES, *(f"{s}-migrate" for s in SERVICES)}


def test_start_order_follows_health_and_completed_migrations(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, spec in services.items():
        for target in spec.get("depends_on", {}):
            assert target in services, f"{name} depends on unknown {target}"
    for svc in SERVICES:
        deps = services[svc]["depends_on"]
        assert deps[f"{svc}-migrate"]["condition"] == "service_completed_successfully"
        assert deps["nats"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
        migrate = services[f"{svc}-migrate"]
        assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert migrate["command"] == ["python", "-m", f"csx_{svc}.migrate"]
        assert migrate["restart"] == "no"
        assert migrate["image"] == services[svc]["image"]
        assert migrate["build"] == services[svc]["build"]
        assert "ports" not in migrate and migrate["networks"] == ["backend"]
    # Consumers start after the service whose stream they read.
    assert services["panel"]["depends_on"]["referrals"]["condition"] == "service_healthy"
    assert services["conferences"]["depends_on"]["referrals"]["condition"] == "service_healthy"
    assert services["actionplans"]["depends_on"]["conferences"]["condition"] == "service_healthy"


def test_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nats = " ".join(services["nats"]["healthcheck"]["test"])
    assert "/healthz?js-enabled-only=true" in nats
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    for svc in SERVICES:
        test = services[svc]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/opt/csx/grpc_health_check.py"]
        # With no --address the script asks the mutual-TLS port with the service's own certificate.
        assert "--address" not in test


def test_the_plaintext_health_port_is_never_published(compose: dict[str, Any]) -> None:
    """Compose's health checks use the mutual-TLS port, so the services' plaintext health-only port
    (HEALTH_ADDRESS, for Kubernetes' native probes) stays off; were it ever set, it must listen on
    the container's loopback only and be neither published nor exposed."""
    for svc in SERVICES:
        spec = compose["services"][svc]
        address = compose_environment(spec).get(f"CSX_{svc.upper()}_HEALTH_ADDRESS", "")
        assert address == "", f"{svc}: the compose health check does not need a plaintext port"
    for name, spec in compose["services"].items():
        env = compose_environment(spec)
        health = [v for k, v in env.items() if k.endswith("_HEALTH_ADDRESS") and v]
        ports = {int(p.rsplit(":", 1)[1]) if isinstance(p, str) else int(p["target"]) for p in spec.get("ports", [])}
        ports |= {int(str(p).split("/")[0]) for p in spec.get("expose", [])}
        for address in health:
            host, _, port = address.rpartition(":")
            assert host in ("127.0.0.1", "localhost", "[::1]"), (name, address)
            assert int(port) not in ports, (name, address)
        # Whatever happens to the settings, the chart's default health port is never published.
        assert 8081 not in ports, name


def test_containers_are_hardened(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        assert spec.get("read_only") is True, name
        assert spec.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in spec.get("security_opt", []), name
        assert not spec.get("privileged"), name
        assert not spec.get("cap_add"), name
        assert spec.get("network_mode") != "host", name
        if name in SERVICES or name.endswith("-migrate"):
            assert spec["user"] == "10001:10001", name
        if name == "postgres":
            assert spec["user"] == "70:70"
        image = spec["image"]
        assert ":" in image and not image.endswith(":latest"), name


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    published = []
    for name, spec in compose["services"].items():
        for port in spec.get("ports", []):
            text = port if isinstance(port, str) else f"{port.get('host_ip')}:{port.get('published')}:{port['target']}"
            assert text.startswith("127.0.0.1:"), (name, port)
            published.append(int(text.split(":")[1]))
    assert len(published) == len(set(published))
    for i, svc in enumerate(SERVICES):
        assert compose["services"][svc]["ports"] == [f"127.0.0.1:{50051 + i}:50051"]


def test_backend_network_is_internal(compose: dict[str, Any]) -> None:
    assert compose["networks"]["backend"]["internal"] is True
    for name in ("postgres", "otel-collector"):
        assert compose["services"][name]["networks"] == ["backend"]


def test_durability_settings(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["postgres"]["command"])
    for setting in ("synchronous_commit=on", "fsync=on", "full_page_writes=on"):
        assert setting in command
    assert "--data-checksums" in compose["services"]["postgres"]["environment"]["POSTGRES_INITDB_ARGS"]
    assert set(compose["volumes"]) == {"nats-data", "postgres-data"}


def _secret_targets(spec: dict[str, Any]) -> dict[str, str]:
    """target path in the container -> secret name."""
    out = {}
    for item in spec.get("secrets", []):
        if isinstance(item, str):
            out[f"/run/secrets/{item}"] = item
        else:
            target = item.get("target", item["source"])
            out[target if target.startswith("/") else f"/run/secrets/{target}"] = item["source"]
    return out


def test_secret_files_are_what_init_secrets_writes(compose: dict[str, Any], compose_secrets: Any) -> None:
    secrets_dir, _ = compose_secrets
    prefix = "./deploy/compose/secrets/"
    for name, secret in compose["secrets"].items():
        path = secret["file"]
        assert path.startswith(prefix), name
        assert (secrets_dir / path.removeprefix(prefix)).is_file(), f"init_secrets.py does not write {path}"
        # Files the containers read are readable by their user; the directory keeps others out.
        assert (secrets_dir / path.removeprefix(prefix)).stat().st_mode & 0o444 == 0o444, name
    assert secrets_dir.stat().st_mode & 0o777 == 0o700
    ignore = (ROOT / "deploy" / "compose" / "secrets" / ".gitignore").read_text().split()
    assert ignore[-2:] == ["*", "!.gitignore"]


def test_every_file_setting_is_a_mounted_secret(compose: dict[str, Any]) -> None:
    for svc in SERVICES:
        spec = compose["services"][svc]
        mounted = _secret_targets(spec)
        env = compose_environment(spec)
        for variable, value in env.items():
            if variable.endswith("_FILE"):
                assert value in mounted, f"{svc}: {variable}={value} is not a mounted secret"
        # A service sees only its own keyring, certificate key and NATS password.
        own = {mounted[p] for p in mounted}
        for other in SERVICES:
            if other != svc:
                assert not {f"{other}-keyring", f"{other}-tls-key", f"nats-{other}-password"} & own, (svc, other)
        assert env[f"CSX_{svc.upper()}_NATS_USER"] == svc
        assert env[f"CSX_{svc.upper()}_NATS_URL"] == "tls://nats:4222"
        assert f"CSX_{svc.upper()}_INSECURE_DEV" not in env


def test_each_service_s_certificate_names_it(compose: dict[str, Any], compose_secrets: Any) -> None:
    """The certificate a service presents names it (spiffe://csx/service/<name>) and is valid for
    the compose host name its callers use (actionplans calls conferences:50051)."""
    from cryptography import x509

    from csx_common.pki import PeerIdentity, peer_from_pem

    secrets_dir, _ = compose_secrets
    for svc in SERVICES:
        source = compose["secrets"][f"{svc}-tls-cert"]["file"].removeprefix("./deploy/compose/secrets/")
        pem = (secrets_dir / source).read_bytes()
        assert peer_from_pem(pem) == PeerIdentity("service", svc)
        san = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert svc in san.value.get_values_for_type(x509.DNSName)
    address = compose_environment(compose["services"]["actionplans"])["CSX_ACTIONPLANS_CONFERENCES_ADDRESS"]
    assert address == "conferences:50051"
    nats_cert = (secrets_dir / "nats" / "server.crt").read_bytes()
    san = x509.load_pem_x509_certificate(nats_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "nats" in san.value.get_values_for_type(x509.DNSName)


def test_mounted_files_exist() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, spec in raw["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = spec.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_images_carry_the_services_version(compose: dict[str, Any]) -> None:
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for svc in SERVICES:
        version = tomllib.loads((ROOT / "services" / svc / "pyproject.toml").read_text())["project"]["version"]
        assert version == chart_version
        assert compose["services"][svc]["image"] == f"csx-{svc}:{version}"
        build = {"context": ".", "dockerfile": "Dockerfile", "args": {"SERVICE": svc}}
        assert compose["services"][svc]["build"] == build
        # The migration step names the same build, so both use one image.
        assert compose["services"][f"{svc}-migrate"]["image"] == compose["services"][svc]["image"]
        assert compose["services"][f"{svc}-migrate"]["build"] == build


def test_telemetry_reaches_jaeger(compose: dict[str, Any]) -> None:
    collector = yaml.safe_load((ROOT / "deploy" / "compose" / "otel-collector.yaml").read_text())
    pipeline = collector["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for component in pipeline[kind]:
            assert component in collector[kind], f"{component} is not defined"
    receiver_port = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    (exporter,) = (collector["exporters"][e] for e in pipeline["exporters"])
    host = exporter["endpoint"].split(":")[0]
    assert host in compose["services"]
    for svc in SERVICES:
        env = compose_environment(compose["services"][svc])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{receiver_port}"
        assert env["OTEL_SERVICE_NAME"] == f"csx-{svc}"
        assert "backend" in compose["services"][svc]["networks"]
    assert compose["services"]["jaeger"]["ports"] == ["127.0.0.1:16686:16686"]


def test_postgres_init_creates_the_roles_the_services_use(compose: dict[str, Any]) -> None:
    script = ROOT / "deploy" / "compose" / "postgres-init.sh"
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0  # noqa: S607
    text = script.read_text()
    services = re.search(r"for service in ([a-z ]+); do", text)
    assert services and services.group(1).split() == list(SERVICES)
    postgres_env = compose["services"]["postgres"]["environment"]
    for svc in SERVICES:
        assert f"{svc.upper()}_DB_PASSWORD" in postgres_env
        url = compose_environment(compose["services"][svc])[f"CSX_{svc.upper()}_DATABASE_URL"]
        assert re.fullmatch(rf"postgresql\+asyncpg://csx_{svc}:[0-9a-f]+@postgres:5432/csx_{svc}", url), url
        assert url.split(":")[2].split("@")[0] == postgres_env[f"{svc.upper()}_DB_PASSWORD"]


def test_init_secrets_never_replaces_a_keyring(tmp_path: Path) -> None:
    module = init_secrets_module()
    created = module.init_compose(tmp_path / "secrets", tmp_path / ".env")
    keyring = tmp_path / "secrets" / "keyrings" / "panel.json"
    before = keyring.read_text()
    env_before = (tmp_path / ".env").read_text()
    assert keyring in created
    again = module.init_compose(tmp_path / "secrets", tmp_path / ".env")
    assert again == []
    assert keyring.read_text() == before and (tmp_path / ".env").read_text() == env_before
    from csx_common.keyring import FileKeyring

    FileKeyring(keyring)
