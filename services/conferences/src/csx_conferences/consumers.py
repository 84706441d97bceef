"""What the conferences service consumes: routing decisions from the referrals stream. The durable,
its stream and subjects are the contract's (ConferencesService's `(csx.options.v1.topology)`)."""

from __future__ import annotations

from google.protobuf import message as pb_message

from csx.referrals.v1 import events_pb2 as referral_events
from csx_common.messaging.consumer import ConsumerSpec
from csx_common.messaging.routes import consumer, route
from csx_common.unit_of_work import UnitOfWork
from csx_conferences.service import ConferencesService


def referrals_consumer(service: ConferencesService) -> ConsumerSpec:
    """Referrals routed to A or B become conferences. A malformed routing (ids that are not UUIDs,
    an unknown intervention, no time) breaks its contract and is parked at the route's check, leaving
    nothing behind. The inbox makes a redelivery a no-op; the service makes a second routing event
    for the same referral one too."""

    async def on_referral_routed(uow: UnitOfWork, event: pb_message.Message) -> None:
        assert isinstance(event, referral_events.ReferralRouted)
        await service.schedule_from_routing(uow, event)

    return consumer("conferences-referrals", [route(referral_events.ReferralRouted, on_referral_routed)])
