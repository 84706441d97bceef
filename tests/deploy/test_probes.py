"""The chart's native gRPC probes, asked of a real service process's servers, as the kubelet asks
them: no cluster, no database, no NATS. Each service is built from the environment the chart gives
it (its ConfigMap and the Deployment's env; files and Secrets replaced by test ones, and the two
ports moved to free loopback ports), its gRPC servers are started, and each probe's question goes
in plaintext to the probe's port: `grpc.health.v1.Health/Check` for the probe's `service`. The
probes must fail until the service says SERVING, pass after, fail again from SIGTERM; and the health
port must answer nothing but health."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.conftest import RELEASE, SERVICES, container_env, render, settings_from_env
from tests.deploy.test_chart import GRPC_SERVICES

PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


async def kubelet_probe(port: int, service: str) -> bool:
    """What the kubelet's gRPC probe does: a plaintext Check; success only on SERVING."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3
            )
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def chart_environment(service: str, tmp_path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """(the service's environment, its container) as the chart renders them, made loadable here."""
    from csx_common.natsserver import free_port
    from csx_common.pki import PeerIdentity
    from tests.support import dev_pki

    rendered = render({})
    (container,) = rendered.get("Deployment", f"{RELEASE}-{service}")["spec"]["template"]["spec"]["containers"]
    env = container_env(rendered, container)
    prefix = f"CSX_{service.upper()}_"
    pki = dev_pki()
    peer = PeerIdentity("service", service)
    files = {
        "KEYRING_FILE": str(tmp_path / "keyring.json"),
        "TLS_CA_FILE": str(pki.ca_file),
        "TLS_CERT_FILE": str(pki.cert_file(peer)),
        "TLS_KEY_FILE": str(pki.key_file(peer)),
        "TOKEN_PUBLIC_KEY_FILE": str(pki.token_public_file),
        "NATS_PASSWORD_FILE": str(tmp_path / "nats-password"),
    }
    (tmp_path / "nats-password").write_text("not-used-here-0123456789")
    for name, value in files.items():
        assert prefix + name in env, name
        env[prefix + name] = value
    if service == "referrals":  # the sealed-intake key the chart mounts (intake.enabled)
        env[prefix + "INTAKE_KEY_FILE"] = str(pki.intake_key_file)
    # The chart listens on all interfaces; here, free loopback ports (the probes follow the port).
    assert env[prefix + "GRPC_ADDRESS"] == "0.0.0.0:50051"
    assert env[prefix + "HEALTH_ADDRESS"] == f"0.0.0.0:{container['ports'][1]['containerPort']}"
    env[prefix + "GRPC_ADDRESS"] = f"127.0.0.1:{free_port()}"
    env[prefix + "HEALTH_ADDRESS"] = f"127.0.0.1:{free_port()}"
    env[prefix + "DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"
    # Reflection on, to show that even then the health port offers nothing but health.
    env[prefix + "REFLECTION"] = "true"
    return {k: v for k, v in env.items() if not k.startswith("OTEL_")}, container


@pytest.fixture(params=SERVICES)
async def started(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, Any, dict[str, Any]]]:
    service = request.param
    env, container = chart_environment(service, tmp_path)
    settings = settings_from_env(service, env)
    runtime = importlib.import_module(f"csx_{service}.app").build(settings)
    # Only the servers: migrations, NATS and consumers are what SERVING waits for, not what is tested.
    await runtime.grpc.start()
    try:
        yield service, runtime, container
    finally:
        await runtime.grpc.stop(0)
        await runtime.db.dispose()


async def test_the_chart_s_probes_follow_the_service_s_health(started: tuple[str, Any, dict[str, Any]]) -> None:
    service, runtime, container = started
    port = runtime.grpc.health_port
    assert port and port != runtime.grpc.port
    questions = {probe: container[probe]["grpc"].get("service", "") for probe in PROBES}
    assert questions["readinessProbe"] == f"csx.{service}.v1.{GRPC_SERVICES[service]}"
    # Listening but not yet SERVING (still binding consumers): no probe passes.
    for probe, name in questions.items():
        assert not await kubelet_probe(port, name), (service, probe)
    await runtime.grpc.set_serving(True)
    for probe, name in questions.items():
        assert await kubelet_probe(port, name), (service, probe)
    # SIGTERM: NOT_SERVING, so readiness drops the pod from its Service while it drains.
    await runtime.grpc.health.enter_graceful_shutdown()
    assert not await kubelet_probe(port, questions["readinessProbe"])


async def test_the_health_port_answers_health_only(started: tuple[str, Any, dict[str, Any]]) -> None:
    """Plaintext, so it must serve no CSX method and no reflection, whatever the settings."""
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    service, runtime, _ = started
    await runtime.grpc.set_serving(True)
    name = f"csx.{service}.v1.{GRPC_SERVICES[service]}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.health_port}") as channel:
        # Any method of the service's API, called with empty bytes: the server has no such method.
        method = (
            importlib.import_module(f"csx.{service}.v1.{service}_pb2")
            .DESCRIPTOR.services_by_name[GRPC_SERVICES[service]]
            .methods[0]
        )
        call = channel.unary_unary(f"/{name}/{method.name}")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"", timeout=3)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Reflection is a bidirectional stream, and the server refuses a method it lacks from the
        # request's headers alone. So the stream is opened and its status read without writing a
        # request. A write that races that refusal fails in grpc.aio. The client then reports
        # INTERNAL "Internal error from Core" (`Failed "execute_batch": (SendMessageOperation,)`)
        # in place of the server's UNIMPLEMENTED (grpc/grpc#36066). If this port did serve
        # reflection, the call would sit waiting for a request and end DEADLINE_EXCEEDED.
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=3)
        assert await stream.code() == grpc.StatusCode.UNIMPLEMENTED
    # The mutual-TLS port refuses a plaintext probe: that is why the health port exists.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
