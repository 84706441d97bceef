"""The four services as their composition roots build them (real gRPC with mutual TLS and user
tokens, real nats-server, SQLite and PostgreSQL where configured), one module at a time.

Each module gets a nats-server of its own, so the events one module's services publish (and the
durable consumers they leave) never reach another's, nor the rest of the suite.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest

from csx_common.identity import Principal
from csx_common.messaging.events import StreamSpec
from csx_common.messaging.streams import ensure_stream
from csx_common.natsserver import NatsServer, free_port
from csx_safeguarding.runtime import SafeguardingRuntime
from tests.conftest import BACKENDS, DatabaseFactory
from tests.support import identity_settings, user_channel

# The limit the existing API tests use: small enough that the huge-field cases cross it.
MAX_MESSAGE_BYTES = 256 * 1024


class Running:
    """A started service and channels to it, one per calling user."""

    def __init__(self, runtime: SafeguardingRuntime) -> None:
        self.runtime = runtime
        self.address = runtime.settings.grpc_address
        self._channels: dict[Principal, grpc.aio.Channel] = {}

    def __repr__(self) -> str:
        return f"Running({self.runtime.service})"

    def channel(self, principal: Principal) -> grpc.aio.Channel:
        if principal not in self._channels:
            self._channels[principal] = user_channel(self.address, principal)
        return self._channels[principal]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        await self.runtime.shutdown()


@pytest.fixture(scope="module")
def hostile_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("hostile-nats") / "store")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
async def hostile_databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(request.param, tmp_path_factory.mktemp("hostile-db"))
    yield factory
    await factory.cleanup()


async def declare_streams(nats_url: str, *services: str) -> None:
    """Upstream streams a consumer binds to (a service waits, NOT_SERVING, until they exist)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for service in services:
            await ensure_stream(js, StreamSpec.for_service(service))
    finally:
        await nc.close()


class Starter:
    """Builds and starts services from their composition roots on one NATS and one backend."""

    def __init__(self, nats_url: str, databases: DatabaseFactory, tmp: Path) -> None:
        self.nats_url, self.databases, self.tmp = nats_url, databases, tmp
        self.started: list[Running] = []

    async def start(
        self, name: str, build: Callable[[Any], SafeguardingRuntime], settings_cls: type, **extra: Any
    ) -> Running:
        settings = settings_cls(
            grpc_address=f"127.0.0.1:{free_port()}",
            database_url=await self.databases.new(name),
            nats_url=self.nats_url,
            keyring_file=str(self.tmp / f"{name}-keyring.json"),
            max_message_bytes=MAX_MESSAGE_BYTES,
            relay_poll_seconds=0.2,
            **identity_settings(name),
            **extra,
        )
        runtime = build(settings)
        await runtime.start()
        running = Running(runtime)
        self.started.append(running)
        return running

    async def referrals(self) -> Running:
        from csx_referrals.app import build
        from csx_referrals.settings import ReferralsSettings

        return await self.start("referrals", build, ReferralsSettings)

    async def panel(self) -> Running:
        from csx_panel.app import build
        from csx_panel.settings import PanelSettings

        await declare_streams(self.nats_url, "referrals")
        return await self.start("panel", build, PanelSettings)

    async def conferences(self) -> Running:
        from csx_conferences.app import build
        from csx_conferences.settings import ConferencesSettings

        await declare_streams(self.nats_url, "referrals")
        # No overdue sweep: its writes would land between an attack's before and after counts.
        return await self.start("conferences", build, ConferencesSettings, overdue_check_seconds=0)

    async def actionplans(self, conferences_address: str) -> Running:
        from csx_actionplans.app import build
        from csx_actionplans.settings import ActionPlansSettings

        await declare_streams(self.nats_url, "referrals", "conferences")
        return await self.start(
            "actionplans",
            build,
            ActionPlansSettings,
            conferences_address=conferences_address,
            conferences_timeout_seconds=2.0,
        )

    async def close(self) -> None:
        for running in reversed(self.started):
            await running.close()


@pytest.fixture(scope="module")
async def starter(
    hostile_nats: NatsServer, hostile_databases: DatabaseFactory, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Starter]:
    starter = Starter(hostile_nats.url, hostile_databases, tmp_path_factory.mktemp("hostile-keys"))
    yield starter
    await starter.close()
