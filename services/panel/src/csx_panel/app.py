"""The panel composition root: everything is built here from settings, nothing at import."""

from __future__ import annotations

import asyncio
from pathlib import Path

from csx.panel.v1 import panel_pb2, panel_pb2_grpc
from csx.referrals.v1 import events_pb2 as referrals_events
from csx_common.messaging.consumer import ConsumerSpec, Route
from csx_common.runtime import setup_process
from csx_common.sensitivity import registry
from csx_common.settings import load_settings
from csx_panel import tables
from csx_panel.grpc_api import PanelApi
from csx_panel.repository import PanelRepository
from csx_panel.service import PanelService, check_children_merged, check_concern_recorded, check_referral_routed
from csx_panel.settings import PanelSettings
from csx_safeguarding.disclosure import Discloser
from csx_safeguarding.runtime import SafeguardingRuntime

SERVICE = "panel"
MIGRATIONS = Path(__file__).parent / "migrations"


def concerns_consumer(service: PanelService) -> ConsumerSpec:
    return ConsumerSpec(
        durable="panel-concerns",
        stream="CSX_REFERRALS",
        routes=[
            Route(
                "csx.referrals.concern_recorded",
                referrals_events.ConcernRecorded,
                service.on_concern_recorded,
                check=check_concern_recorded,  # type: ignore[arg-type]
            ),
            Route(
                "csx.referrals.referral_routed",
                referrals_events.ReferralRouted,
                service.on_referral_routed,
                check=check_referral_routed,  # type: ignore[arg-type]
            ),
            Route(
                "csx.referrals.children_merged",
                referrals_events.ChildrenMerged,
                service.on_children_merged,
                check=check_children_merged,  # type: ignore[arg-type]
            ),
        ],
    )


def build(settings: PanelSettings) -> SafeguardingRuntime:
    runtime = SafeguardingRuntime(
        SERVICE, settings, metadata=tables.metadata, delivery=tables.delivery, migrations=MIGRATIONS
    )
    repo = PanelRepository()
    audit = runtime.audit_log(tables.audit)
    service = PanelService(
        runtime.units,
        repo,
        runtime.stream,
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
