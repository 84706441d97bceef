"""The conferences composition root: everything is built here from settings, nothing at import."""

from __future__ import annotations

import asyncio
from pathlib import Path

from csx.conferences.v1 import conferences_pb2, conferences_pb2_grpc
from csx_common import client
from csx_common.runtime import setup_process
from csx_common.sensitivity import registry
from csx_common.settings import load_settings
from csx_conferences import tables
from csx_conferences.consumers import referrals_consumer
from csx_conferences.grpc_api import ConferencesApi
from csx_conferences.panel_client import PanelClient
from csx_conferences.repository import ConferencesRepository
from csx_conferences.service import ConferencesService
from csx_conferences.settings import ConferencesSettings
from csx_safeguarding.disclosure import Discloser
from csx_safeguarding.runtime import SafeguardingRuntime

SERVICE = "conferences"
MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: ConferencesSettings) -> SafeguardingRuntime:
    runtime = SafeguardingRuntime(
        SERVICE,
        settings,
        metadata=tables.metadata,
        delivery=tables.delivery,
        migrations=MIGRATIONS,
        # Actionplans fetches a concluded conference's actions for itself (events are thin).
        service_calls={"/csx.conferences.v1.ConferencesService/GetConference": frozenset({"actionplans"})},
    )
    panel = None
    if settings.panel_address:
        channel = client.channel(settings.panel_address, runtime.credentials)
        runtime.on_close(channel.close)
        panel = PanelClient(channel, settings.panel_timeout_seconds)
    service = ConferencesService(
        runtime.units,
        ConferencesRepository(runtime.sealer),
        Discloser(runtime.policy, registry(), runtime.audit_log(tables.audit)),
        runtime.disclosure_views(tables.disclosure),
        contextual_review_working_days=settings.contextual_review_working_days,
        policy=runtime.policy,
        quorum_other_agencies=settings.quorum_other_agencies,
        panel=panel,
    )
    runtime.add_grpc(
        conferences_pb2_grpc.add_ConferencesServiceServicer_to_server,
        ConferencesApi(service),
        conferences_pb2.DESCRIPTOR.services_by_name["ConferencesService"].full_name,
    )
    runtime.add_consumer(referrals_consumer(service))
    if settings.overdue_check_seconds:
        runtime.add_periodic("overdue-conferences", settings.overdue_check_seconds, service.announce_overdue)
    return runtime


async def serve(settings: ConferencesSettings) -> None:
    # Built inside the running loop: grpc.aio binds its server to the loop that creates it.
    await build(settings).run()


def main() -> None:
    settings = load_settings(ConferencesSettings)
    setup_process(SERVICE, settings)
    asyncio.run(serve(settings))
