"""`csx status`: each service's health, each stream's size, each durable consumer's lag."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from csx_cli.identity import default_pki, probe_credentials
from csx_cli.stack import CONSUMERS, SERVICES, STREAMS
from csx_client.subjects import inbox_prefix
from csx_common import client
from csx_common.natsauth import DevNatsAuth
from csx_common.pki import Credentials, DevPki


@dataclass
class ServiceHealth:
    name: str
    address: str
    status: str  # SERVING, NOT_SERVING, UNKNOWN, UNREACHABLE, ...
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "SERVING"


@dataclass
class StreamState:
    name: str
    status: str  # ok, missing, unknown
    messages: int | None = None
    bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class ConsumerState:
    stream: str
    durable: str
    status: str  # ok, missing, unknown
    num_pending: int | None = None
    num_ack_pending: int | None = None
    num_redelivered: int | None = None

    @property
    def lag(self) -> int | None:
        if self.num_pending is None or self.num_ack_pending is None:
            return None
        return self.num_pending + self.num_ack_pending

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class StackStatus:
    services: list[ServiceHealth]
    nats_url: str
    nats_reachable: bool
    nats_error: str = ""
    streams: list[StreamState] = field(default_factory=list)
    consumers: list[ConsumerState] = field(default_factory=list)
    max_lag: int | None = None

    def problems(self) -> list[str]:
        out = [f"service {s.name} is {s.status}" for s in self.services if not s.ok]
        if not self.nats_reachable:
            out.append(f"NATS at {self.nats_url} is unreachable")
        out += [f"stream {s.name} is {s.status}" for s in self.streams if not s.ok]
        out += [f"consumer {c.durable} on {c.stream} is {c.status}" for c in self.consumers if not c.ok]
        if self.max_lag is not None:
            out += [
                f"consumer {c.durable} lags by {c.lag} (> {self.max_lag})"
                for c in self.consumers
                if c.lag is not None and c.lag > self.max_lag
            ]
        return out

    @property
    def healthy(self) -> bool:
        return not self.problems()

    def to_json(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "problems": self.problems(),
            "services": [asdict(s) | {"ok": s.ok} for s in self.services],
            "nats": {"url": self.nats_url, "reachable": self.nats_reachable, "error": self.nats_error},
            "streams": [asdict(s) for s in self.streams],
            "consumers": [asdict(c) | {"lag": c.lag} for c in self.consumers],
        }


async def check_service(name: str, address: str, call_timeout: float, credentials: Credentials | None) -> ServiceHealth:
    if credentials is None:
        return ServiceHealth(name, address, "UNREACHABLE", "no client certificate (set CSX_PKI_DIR)")
    async with client.channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=call_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return ServiceHealth(name, address, "SERVICE_UNKNOWN", exc.details() or "")
            return ServiceHealth(name, address, "UNREACHABLE", f"{exc.code().name}: {exc.details() or ''}")
        return ServiceHealth(name, address, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


async def check_jetstream(
    nats_url: str, call_timeout: float, pki: DevPki
) -> tuple[bool, str, list[StreamState], list[ConsumerState]]:
    """Streams and consumers, read as the NATS `operator` user (stream and consumer info only)."""
    auth = DevNatsAuth(pki.root / "nats")
    password_file = auth.password_file("operator")
    login = (
        {"user": "operator", "password": password_file.read_text().strip(), "inbox_prefix": inbox_prefix("operator")}
        if password_file.exists()
        else {}
    )
    import nats
    from nats.js.errors import NotFoundError

    async def quiet(_exc: Exception) -> None:
        return None

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                nats_url,
                name="csx-status",
                connect_timeout=call_timeout,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=quiet,
                **login,
            ),
            call_timeout + 1,
        )
    except Exception as exc:
        return (
            False,
            f"{type(exc).__name__}: {exc}",
            [StreamState(s, "unknown") for s in STREAMS],
            [ConsumerState(s, d, "unknown") for s, d in CONSUMERS],
        )
    try:
        js = nc.jetstream(timeout=call_timeout)
        streams: list[StreamState] = []
        for name in STREAMS:
            try:
                info = await js.stream_info(name)
                streams.append(StreamState(name, "ok", info.state.messages, info.state.bytes))
            except NotFoundError:
                streams.append(StreamState(name, "missing"))
            except Exception as exc:
                streams.append(StreamState(name, f"unknown ({type(exc).__name__})"))
        consumers: list[ConsumerState] = []
        for stream, durable in CONSUMERS:
            try:
                cinfo = await js.consumer_info(stream, durable)
                consumers.append(
                    ConsumerState(
                        stream,
                        durable,
                        "ok",
                        cinfo.num_pending or 0,
                        cinfo.num_ack_pending or 0,
                        cinfo.num_redelivered or 0,
                    )
                )
            except NotFoundError:
                consumers.append(ConsumerState(stream, durable, "missing"))
            except Exception as exc:
                consumers.append(ConsumerState(stream, durable, f"unknown ({type(exc).__name__})"))
        return True, "", streams, consumers
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def collect(
    addresses: dict[str, str],
    nats_url: str,
    *,
    call_timeout: float = 2.0,
    max_lag: int | None = None,
    pki: DevPki | None = None,
) -> StackStatus:
    pki = pki or default_pki()
    try:
        credentials: Credentials | None = probe_credentials(pki)
    except FileNotFoundError:
        credentials = None  # no certificates: nothing can be asked, every service reads as down
    checks = [check_service(name, addresses[name], call_timeout, credentials) for name in SERVICES]
    services, (reachable, error, streams, consumers) = await asyncio.gather(
        asyncio.gather(*checks), check_jetstream(nats_url, call_timeout, pki)
    )
    return StackStatus(services, nats_url, reachable, error, streams, consumers, max_lag)
