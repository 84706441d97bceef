"""deploy/scripts/init_secrets.py for Kubernetes: what it writes is exactly what the chart reads.

The chart's NOTES.txt lists every Secret and ConfigMap the release reads and does not create; the
script must produce each of them, with the keys listed, valid for Kubernetes, and with certificates
naming what the chart dials (the Service names, the NATS routes' names)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import SERVICES, init_secrets_module, render, validate_manifest

NAMESPACE = "safeguarding"


def required_objects(notes: str) -> dict[tuple[str, str], set[str]]:
    """(kind, name) -> keys, from the "reads and does not create" list in NOTES.txt."""
    out: dict[tuple[str, str], set[str]] = {}
    for kind, name, keys in re.findall(r"^  (Secret|ConfigMap) (\S+): ([^\n(]+)", notes, re.M):
        out[(kind, name)] = {k.strip() for k in keys.split(",")}
    return out


@pytest.fixture(scope="module", params=["csx", "prod"])
def generated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[dict[str, Any]], Path]:
    module = init_secrets_module()
    out = tmp_path_factory.mktemp("k8s-secrets")
    module.init_kubernetes(out, namespace=NAMESPACE, release=request.param, database_host="db.internal")
    return request.param, list(yaml.safe_load_all((out / "secrets.yaml").read_text())), out


def test_script_writes_everything_the_chart_reads(generated: tuple[str, list[dict[str, Any]], Path]) -> None:
    release, objects, _ = generated
    rendered = render({}, name=release, namespace=NAMESPACE)
    required = required_objects(rendered.notes)
    assert len(required) == 4 + 4 + 3  # services' Secrets and TLS Secrets, NATS auth and TLS, identity
    produced = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    for (kind, name), keys in required.items():
        assert (kind, name) in produced, f"init_secrets.py does not write {kind} {name}"
        data = produced[(kind, name)].get("stringData") or produced[(kind, name)].get("data")
        assert keys <= set(data), (name, keys - set(data))


def test_script_output_is_valid_kubernetes(generated: tuple[str, list[dict[str, Any]], Path]) -> None:
    _, objects, out = generated
    for obj in objects:
        validate_manifest(obj)
        assert obj["metadata"]["namespace"] == NAMESPACE
    assert (out / "secrets.yaml").stat().st_mode & 0o777 == 0o600
    sql = (out / "postgres-roles.sql").read_text()
    for svc in SERVICES:
        assert f"CREATE DATABASE csx_{svc} OWNER csx_{svc};" in sql


def test_certificates_name_what_the_chart_dials(generated: tuple[str, list[dict[str, Any]], Path]) -> None:
    from cryptography import x509

    from csx_common.pki import PeerIdentity, peer_from_pem

    release, objects, _ = generated
    rendered = render({}, name=release, namespace=NAMESPACE)
    fullname = init_secrets_module().fullname(release)
    assert rendered.get("StatefulSet", f"{fullname}-nats")
    secrets = {o["metadata"]["name"]: o["stringData"] for o in objects if o["kind"] == "Secret"}

    def dns_names(pem: str) -> list[str]:
        cert = x509.load_pem_x509_certificate(pem.encode())
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )

    for svc in SERVICES:
        tls = secrets[f"{fullname}-{svc}-tls"]
        assert peer_from_pem(tls["tls.crt"].encode()) == PeerIdentity("service", svc)
        assert f"{fullname}-{svc}" in dns_names(tls["tls.crt"])
    # actionplans dials conferences by its Service name.
    configmap = rendered.get("ConfigMap", f"{fullname}-actionplans")
    host = configmap["data"]["CSX_ACTIONPLANS_CONFERENCES_ADDRESS"].split(":")[0]
    assert host in dns_names(secrets[f"{fullname}-conferences-tls"]["tls.crt"])
    # The NATS certificate covers the client Service and every route of the cluster.
    nats_names = dns_names(secrets[f"{fullname}-nats-tls"]["tls.crt"])
    nats_conf = rendered.get("ConfigMap", f"{fullname}-nats")["data"]["nats.conf"]
    for route in re.findall(r"nats-route://([^:]+):6222", nats_conf):
        assert route in nats_names
    url_host = configmap["data"]["CSX_ACTIONPLANS_NATS_URL"].split("://")[1].split(":")[0]
    assert url_host in nats_names


def test_script_refuses_to_overwrite(tmp_path: Path) -> None:
    module = init_secrets_module()
    module.init_kubernetes(tmp_path, namespace="csx", release="csx", database_host="db", pki="none")
    with pytest.raises(SystemExit):
        module.init_kubernetes(tmp_path, namespace="csx", release="csx", database_host="db", pki="none")
    objects = list(yaml.safe_load_all((tmp_path / "secrets.yaml").read_text()))
    assert {o["metadata"]["name"] for o in objects} == {*(f"csx-{s}" for s in SERVICES), "csx-nats-auth"}
