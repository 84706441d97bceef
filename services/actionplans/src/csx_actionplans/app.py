"""The actionplans composition root: everything is built here from settings, nothing at import."""

from __future__ import annotations

import asyncio
from pathlib import Path

from csx.actionplans.v1 import actionplans_pb2, actionplans_pb2_grpc
from csx_actionplans import tables
from csx_actionplans.conferences_client import ConferencesClient
from csx_actionplans.consumers import conferences_consumer
from csx_actionplans.grpc_api import ActionPlansApi
from csx_actionplans.repository import ActionPlansRepository
from csx_actionplans.service import ActionPlansService
from csx_actionplans.settings import ActionPlansSettings
from csx_common import client
from csx_common.runtime import setup_process
from csx_common.sensitivity import registry
from csx_common.settings import load_settings
from csx_safeguarding.disclosure import Discloser
from csx_safeguarding.runtime import SafeguardingRuntime

SERVICE = "actionplans"
MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: ActionPlansSettings) -> SafeguardingRuntime:
    """Call inside the running loop: grpc.aio binds servers and channels to the loop creating them."""
    runtime = SafeguardingRuntime(
        SERVICE, settings, metadata=tables.metadata, delivery=tables.delivery, migrations=MIGRATIONS
    )
    # Called as this service (its own certificate), not for a person: event-driven work.
    channel = client.channel(settings.conferences_address, runtime.credentials)
    runtime.on_close(channel.close)
    audit = runtime.audit_log(tables.audit)
    service = ActionPlansService(
        runtime.units,
        ActionPlansRepository(runtime.sealer),
        ConferencesClient(channel, settings.conferences_timeout_seconds),
        Discloser(runtime.policy, registry(), audit),
        runtime.disclosure_views(tables.disclosure),
        policy=runtime.policy,
    )
    runtime.add_grpc(
        actionplans_pb2_grpc.add_ActionPlansServiceServicer_to_server,
        ActionPlansApi(service),
        actionplans_pb2.DESCRIPTOR.services_by_name["ActionPlansService"].full_name,
    )
    runtime.add_consumer(conferences_consumer(service))
    return runtime


async def serve(settings: ActionPlansSettings) -> None:
    await build(settings).run()


def main() -> None:
    settings = load_settings(ActionPlansSettings)
    setup_process(SERVICE, settings)
    asyncio.run(serve(settings))
