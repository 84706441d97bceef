"""The referrals composition root: everything is built here from settings, nothing at import."""

from __future__ import annotations

import asyncio
from pathlib import Path

from csx.referrals.v1 import referrals_pb2, referrals_pb2_grpc
from csx_common.disclosure import Discloser
from csx_common.idempotency import IdempotencyKeys
from csx_common.policy import PolicyEngine
from csx_common.runtime import ServiceRuntime, setup_process
from csx_common.sensitivity import registry
from csx_common.settings import load_settings
from csx_referrals import tables
from csx_referrals.grpc_api import ReferralsApi
from csx_referrals.repository import ReferralsRepository
from csx_referrals.service import ReferralsService
from csx_referrals.settings import ReferralsSettings

SERVICE = "referrals"
MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: ReferralsSettings) -> ServiceRuntime:
    runtime = ServiceRuntime(
        SERVICE, settings, metadata=tables.metadata, delivery=tables.delivery, migrations=MIGRATIONS
    )
    service = ReferralsService(
        runtime.db,
        ReferralsRepository(runtime.sealer, runtime.keyring.blind_index_key),
        runtime.outbox,
        IdempotencyKeys(tables.idempotency, runtime.keyring.blind_index_key, runtime.sealer),
        runtime.stream,
        Discloser(PolicyEngine.default(), registry(), runtime.audit_log(tables.audit)),
    )
    runtime.add_grpc(
        referrals_pb2_grpc.add_ReferralsServiceServicer_to_server,
        ReferralsApi(service),
        referrals_pb2.DESCRIPTOR.services_by_name["ReferralsService"].full_name,
    )
    return runtime


async def serve(settings: ReferralsSettings) -> None:
    # Built inside the running loop: grpc.aio binds its server to the loop that creates it.
    await build(settings).run()


def main() -> None:
    settings = load_settings(ReferralsSettings)
    setup_process(SERVICE, settings)
    asyncio.run(serve(settings))
