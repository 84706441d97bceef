"""What the panel consumes: concerns, routings and merges from the referrals stream. The durable,
its stream and subjects are the contract's (PanelService's `(csx.options.v1.topology)`)."""

from __future__ import annotations

from csx.referrals.v1 import events_pb2 as referrals_events
from csx_common.messaging.consumer import ConsumerSpec
from csx_common.messaging.routes import consumer, route
from csx_panel.service import PanelService


def concerns_consumer(service: PanelService) -> ConsumerSpec:
    return consumer(
        "panel-concerns",
        [
            route(referrals_events.ConcernRecorded, service.on_concern_recorded),
            route(referrals_events.ReferralRouted, service.on_referral_routed),
            route(referrals_events.ChildrenMerged, service.on_children_merged),
        ],
    )
