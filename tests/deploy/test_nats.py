"""The NATS configurations that docker-compose and the Helm chart run: they pass `nats-server -t`
(with their real includes, TLS files and passwords), they keep acknowledged data safe, and the
users they define can do what each service does, and only that, with the services' own client
code over TLS on a real nats-server."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    COMPOSE_FILE,
    COMPOSE_NATS_CONF,
    NATS_ACCOUNTS,
    ROOT,
    SERVICES,
    init_secrets_module,
    load_compose,
    nats_check,
    nats_passwords,
    nats_server,
    nats_server_version,
    render,
)
from tests.deploy.test_chart import MATRIX

NATS_ENTRYPOINT = ROOT / "deploy" / "compose" / "nats-entrypoint.sh"


def test_accounts_conf_is_generated_from_the_permission_model() -> None:
    """files/nats/accounts.conf is exactly what csx_common.natsauth says (render_nats_accounts.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "render_nats_accounts", ROOT / "deploy/scripts/render_nats_accounts.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert NATS_ACCOUNTS.read_text() == module.render(), "run deploy/scripts/render_nats_accounts.py"
    users = re.findall(r'user: "([a-z]+)", password: \$NATS_([A-Z]+)_PASSWORD', NATS_ACCOUNTS.read_text())
    assert [u for u, _ in users] == [*SERVICES, "operator"]
    assert all(var == user.upper() for user, var in users)


def test_nats_image_matches_the_server_the_configs_are_tested_with() -> None:
    version = nats_server_version()
    compose_image = load_compose()["services"]["nats"]["image"]
    assert compose_image == f"nats:{version}-alpine"
    chart_image = render({}).of_kind("StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert chart_image == f"nats:{version}"


# --- docker-compose -----------------------------------------------------------------------------------


def compose_config_dir(tmp_path: Path, secrets_dir: Path, *, port: int = 4222, http: int = 8222) -> Path:
    """deploy/compose/nats.conf and accounts.conf as the container sees them, with /run/secrets and
    /data pointing at temporary copies."""
    conf_dir = tmp_path / "etc-nats"
    conf_dir.mkdir()
    text = COMPOSE_NATS_CONF.read_text()
    text = text.replace("/run/secrets/nats-server.crt", str(secrets_dir / "nats" / "server.crt"))
    text = text.replace("/run/secrets/nats-server.key", str(secrets_dir / "nats" / "server.key"))
    text = text.replace("/data/jetstream", str(tmp_path / "jetstream"))
    text = text.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
    text = text.replace("http: 0.0.0.0:8222", f"http: 127.0.0.1:{http}")
    assert "/run/secrets" not in text and "/data/" not in text
    (conf_dir / "nats.conf").write_text(text)
    (conf_dir / "accounts.conf").write_text(NATS_ACCOUNTS.read_text())
    return conf_dir


def compose_password_env(secrets_dir: Path) -> dict[str, str]:
    """What nats-entrypoint.sh exports, from the generated password files."""
    return {
        f"NATS_{user.upper()}_PASSWORD": (secrets_dir / "pki" / "nats" / f"{user}.password").read_text().strip()
        for user in (*SERVICES, "operator")
    }


def test_compose_nats_config_is_valid(tmp_path: Path, compose_secrets: Any) -> None:
    secrets_dir, _ = compose_secrets
    conf_dir = compose_config_dir(tmp_path, secrets_dir)
    result = nats_check(conf_dir / "nats.conf", compose_password_env(secrets_dir))
    assert result.returncode == 0, result.stderr
    # A password missing from the environment is an error, never an empty password.
    result = nats_check(conf_dir / "nats.conf", {})
    assert result.returncode != 0 and "NATS_REFERRALS_PASSWORD" in result.stderr


def test_compose_nats_keeps_acknowledged_data() -> None:
    text = COMPOSE_NATS_CONF.read_text()
    assert re.search(r"jetstream \{[^}]*sync_interval: always", text, re.S)
    assert re.search(r"store_dir: /data/jetstream", text)
    assert "tls {" in text
    compose = load_compose()
    volumes = compose["services"]["nats"]["volumes"]
    assert any(
        str(v).startswith("nats-data:/data") or (isinstance(v, dict) and v.get("target") == "/data") for v in volumes
    )


def test_compose_nats_entrypoint_reads_every_user_s_password(compose_secrets: Any) -> None:
    assert subprocess.run(["sh", "-n", str(NATS_ENTRYPOINT)], check=False).returncode == 0  # noqa: S607
    script = NATS_ENTRYPOINT.read_text()
    users = re.search(r"for user in ([a-z ]+); do", script)
    assert users and users.group(1).split() == [*SERVICES, "operator"]
    compose = load_compose()
    nats_secrets = {s if isinstance(s, str) else s["source"] for s in compose["services"]["nats"]["secrets"]}
    assert {f"nats-{u}-password" for u in users.group(1).split()} <= nats_secrets


# --- the Helm chart ---------------------------------------------------------------------------------------


def chart_config_dir(tmp_path: Path, configmap: dict[str, Any], certs: dict[str, bytes]) -> Path:
    conf_dir = tmp_path / "etc-nats"
    conf_dir.mkdir()
    tls_dir = tmp_path / "nats-tls"
    tls_dir.mkdir()
    for name, data in certs.items():
        (tls_dir / name).write_bytes(data)
    text = configmap["data"]["nats.conf"]
    text = text.replace("/etc/nats-tls/", f"{tls_dir}/")
    text = text.replace("/data/jetstream", str(tmp_path / "jetstream"))
    text = text.replace("/var/run/nats/", f"{tmp_path}/")
    (conf_dir / "nats.conf").write_text(text)
    (conf_dir / "accounts.conf").write_text(configmap["data"]["accounts.conf"])
    return conf_dir


@pytest.fixture(scope="module")
def nats_certs() -> dict[str, bytes]:
    from csx_common.pki import CertificateAuthority

    module = init_secrets_module()
    ca = CertificateAuthority.generate("test CA")
    cert, key = module.issue(ca, ["csx-nats", "*.csx-nats-headless.csx.svc.cluster.local"])
    from cryptography.hazmat.primitives import serialization

    return {"tls.crt": cert, "tls.key": key, "ca.crt": ca.cert.public_bytes(serialization.Encoding.PEM)}


NATS_CASES = [name for name, values in MATRIX.items() if values.get("nats", {}).get("install", True)]


@pytest.mark.parametrize("case", NATS_CASES)
def test_chart_nats_config_is_valid(case: str, tmp_path: Path, nats_certs: dict[str, bytes]) -> None:
    r = render(MATRIX[case])
    configmap = r.get("ConfigMap", "csx-nats")
    assert configmap["data"]["accounts.conf"] == NATS_ACCOUNTS.read_text()
    conf_dir = chart_config_dir(tmp_path, configmap, nats_certs)
    statefulset = r.get("StatefulSet", "csx-nats")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    # Every password the config needs comes from the StatefulSet's environment.
    env_names = {e["name"] for e in container["env"]}
    assert set(nats_passwords()) <= env_names
    result = nats_check(conf_dir / "nats.conf", {**nats_passwords(), "POD_NAME": "csx-nats-0"})
    assert result.returncode == 0, result.stderr
    text = configmap["data"]["nats.conf"]
    assert re.search(r"jetstream \{[^}]*sync_interval: always", text, re.S)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/nats", "/data", "/var/run/nats"} <= mounts
    assert container["args"] == ["--config", "/etc/nats/nats.conf"]


# --- the users work, and only for their own subjects, with the services' own client code ------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def compose_nats(tmp_path: Path, compose_secrets: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """nats-server running the compose configuration (TLS, accounts, sync_interval: always)."""
    secrets_dir, _ = compose_secrets
    port = free_port()
    conf_dir = compose_config_dir(tmp_path, secrets_dir, port=port, http=free_port())
    env = {"PATH": "/usr/bin:/bin", **compose_password_env(secrets_dir)}
    log = open(tmp_path / "nats.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([nats_server(), "-c", str(conf_dir / "nats.conf")], env=env, stdout=log, stderr=log)  # noqa: S603
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            assert process.poll() is None, (tmp_path / "nats.log").read_text()
            time.sleep(0.05)
    # The services trust the compose CA through SSL_CERT_FILE, as in docker-compose.yml.
    monkeypatch.setenv("SSL_CERT_FILE", str(secrets_dir / "pki" / "ca.crt"))
    yield f"tls://localhost:{port}", compose_password_env(secrets_dir)
    process.terminate()
    process.wait(10)
    log.close()


async def _exercise(url: str, passwords: dict[str, str]) -> None:
    from nats.errors import Error as NatsError
    from nats.js import api as js_api

    from csx_cli.stack import CONSUMES
    from csx_common.intake import ensure_intake_stream
    from csx_common.messaging.events import StreamSpec
    from csx_common.messaging.streams import connect, ensure_stream
    from csx_common.natsauth import INTAKE_STREAM

    async def login(user: str) -> Any:
        return await connect(url, f"test-{user}", user=user, password=passwords[f"NATS_{user.upper()}_PASSWORD"])

    clients = {s: await login(s) for s in SERVICES}
    try:
        for service, nc in clients.items():
            js = nc.jetstream(timeout=2)
            spec = StreamSpec.for_service(service)
            await ensure_stream(js, spec, replicas=1, max_age_days=30)
            await ensure_stream(js, spec, replicas=1, max_age_days=30)  # the update path too
            ack = await js.publish(spec.subject("probe"), b"{}", headers={"Nats-Msg-Id": f"{service}-1"})
            assert ack.stream == spec.name
        await ensure_intake_stream(clients["referrals"].jetstream(timeout=2))
        for c in CONSUMES:
            js = clients[c.service].jetstream(timeout=2)
            if c.stream == INTAKE_STREAM:
                # Agencies' sealed concerns: referrals declares and binds its durable (no agency user
                # in these accounts publishes one), and may answer on the agencies' result subjects.
                intake = js_api.ConsumerConfig(
                    durable_name=c.durable,
                    ack_policy=js_api.AckPolicy.EXPLICIT,
                    filter_subjects=["csx.intake.*.submit"],
                )
                await js.add_consumer(c.stream, intake)
                await js.pull_subscribe_bind(durable=c.durable, stream=c.stream)
                await clients[c.service].publish("csx.intake.police.result", b"{}")
                await clients[c.service].flush(timeout=2)
                continue
            config = js_api.ConsumerConfig(
                durable_name=c.durable,
                ack_policy=js_api.AckPolicy.EXPLICIT,
                filter_subjects=[f"csx.{c.stream.removeprefix('CSX_').lower()}.probe"],
            )
            await js.add_consumer(c.stream, config)
            sub = await js.pull_subscribe_bind(durable=c.durable, stream=c.stream)
            (msg,) = await sub.fetch(1, timeout=2)
            await msg.ack_sync()
        # Nobody publishes another service's events or touches another's stream.
        js = clients["panel"].jetstream(timeout=0.5)
        with pytest.raises((NatsError, asyncio.TimeoutError, TimeoutError)):
            await js.publish("csx.referrals.forged", b"{}")
        with pytest.raises((NatsError, asyncio.TimeoutError, TimeoutError)):
            await ensure_stream(js, StreamSpec.for_service("referrals"), replicas=1, max_age_days=1)
        operator = await login("operator")
        try:
            info = await operator.jetstream(timeout=2).stream_info("CSX_REFERRALS")
            assert info.state.messages == 1
            with pytest.raises((NatsError, asyncio.TimeoutError, TimeoutError)):
                await operator.jetstream(timeout=0.5).publish("csx.referrals.forged", b"{}")
        finally:
            await operator.close()
    finally:
        for nc in clients.values():
            await nc.close()


async def test_compose_nats_users_can_do_their_work_and_only_theirs(compose_nats: Any) -> None:
    url, passwords = compose_nats
    await asyncio.wait_for(_exercise(url, passwords), 30)


def test_compose_file_mounts_the_shared_accounts_file() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    volumes = compose["services"]["nats"]["volumes"]
    assert "./deploy/helm/csx/files/nats/accounts.conf:/etc/nats/accounts.conf:ro" in volumes
