"""What the conferences service consumes: routing decisions from the referrals stream."""

from __future__ import annotations

from google.protobuf import message as pb_message
from sqlalchemy.ext.asyncio import AsyncSession

from csx.referrals.v1 import events_pb2 as referral_events
from csx_common.messaging.consumer import ConsumerSpec, Route
from csx_common.messaging.events import StreamSpec
from csx_conferences.service import ConferencesService

REFERRALS = StreamSpec.for_service("referrals")


def referrals_consumer(service: ConferencesService) -> ConsumerSpec:
    """Referrals routed to A or B become conferences. The inbox makes a redelivery a no-op; the
    service makes a second routing event for the same referral one too."""

    async def on_referral_routed(session: AsyncSession, event: pb_message.Message) -> None:
        assert isinstance(event, referral_events.ReferralRouted)
        await service.schedule_from_routing(session, event)

    return ConsumerSpec(
        durable="conferences-referrals",
        stream=REFERRALS.name,
        routes=[Route(REFERRALS.subject("referral_routed"), referral_events.ReferralRouted, on_referral_routed)],
    )
