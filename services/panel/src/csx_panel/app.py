"""The panel composition root: everything is built here from settings, nothing at import."""

from __future__ import annotations

import asyncio
from pathlib import Path

from csx.panel.v1 import panel_pb2, panel_pb2_grpc
from csx_common.runtime import setup_process
from csx_common.sensitivity import registry
from csx_common.settings import load_settings
from csx_panel import tables
from csx_panel.consumers import concerns_consumer
from csx_panel.grpc_api import PanelApi
from csx_panel.repository import PanelRepository
from csx_panel.service import PanelService
from csx_panel.settings import PanelSettings
from csx_safeguarding.disclosure import Discloser
from csx_safeguarding.runtime import SafeguardingRuntime

SERVICE = "panel"
MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: PanelSettings) -> SafeguardingRuntime:
    runtime = SafeguardingRuntime(
        SERVICE,
        settings,
        metadata=tables.metadata,
        delivery=tables.delivery,
        migrations=MIGRATIONS,
        # Conferences reads a place's profile for itself, to attach the panel's view to a child
        # protection conference's contexts (docs/conferences.md).
        service_calls={"/csx.panel.v1.PanelService/GetPlaceProfile": frozenset({"conferences"})},
    )
    repo = PanelRepository()
    audit = runtime.audit_log(tables.audit)
    service = PanelService(
        runtime.units,
        repo,
        settings.flag_threshold_children,
        Discloser(runtime.policy, registry(), audit),
        runtime.disclosure_views(tables.disclosure, forget=repo.forget_child),
        policy=runtime.policy,
    )
    runtime.add_consumer(concerns_consumer(service))
    runtime.add_grpc(
        panel_pb2_grpc.add_PanelServiceServicer_to_server,
        PanelApi(service),
        panel_pb2.DESCRIPTOR.services_by_name["PanelService"].full_name,
    )
    return runtime


async def serve(settings: PanelSettings) -> None:
    # Built inside the running loop: grpc.aio binds its server to the loop that creates it.
    await build(settings).run()


def main() -> None:
    settings = load_settings(PanelSettings)
    setup_process(SERVICE, settings)
    asyncio.run(serve(settings))
