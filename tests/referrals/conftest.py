"""The referrals service running in-process: real gRPC (mutual TLS) on loopback, real NATS, and
SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from csx.referrals.v1 import referrals_pb2_grpc
from csx_common.natsserver import free_port
from csx_referrals import tables
from csx_referrals.app import build
from csx_referrals.settings import ReferralsSettings
from csx_safeguarding.runtime import SafeguardingRuntime
from tests.support import identity_settings, user_channel


class Referrals:
    def __init__(
        self,
        runtime: SafeguardingRuntime,
        stub: referrals_pb2_grpc.ReferralsServiceStub,
        channel: grpc.aio.Channel,
    ) -> None:
        self.runtime, self.stub, self.channel = runtime, stub, channel

    async def count(self, table) -> int:  # type: ignore[no-untyped-def]
        async with self.runtime.db.session() as s:
            return int((await s.execute(select(func.count()).select_from(table))).scalar_one())

    async def stored(self) -> tuple[int, int, int, int]:
        return (
            await self.count(tables.concerns),
            await self.count(tables.children),
            await self.count(tables.referrals),
            await self.count(tables.delivery.outbox),
        )


@pytest.fixture
async def referrals(databases, nats_url: str, tmp_path: Path) -> AsyncIterator[Referrals]:  # type: ignore[no-untyped-def]
    settings = ReferralsSettings(
        grpc_address=f"127.0.0.1:{free_port()}",
        database_url=await databases.new("referrals"),
        nats_url=nats_url,
        keyring_file=str(tmp_path / "keyring.json"),
        max_message_bytes=256 * 1024,
        **identity_settings("referrals"),
    )
    runtime = build(settings)
    await runtime.start()
    channel = user_channel(settings.grpc_address)
    yield Referrals(runtime, referrals_pb2_grpc.ReferralsServiceStub(channel), channel)
    await channel.close()
    await runtime.shutdown()
