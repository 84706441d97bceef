"""What the conferences service consumes: routing decisions from the referrals stream."""

from __future__ import annotations

from google.protobuf import message as pb_message

from csx.referrals.v1 import events_pb2 as referral_events
from csx_common.messaging.consumer import ConsumerSpec, Route
from csx_common.messaging.events import StreamSpec
from csx_common.unit_of_work import UnitOfWork
from csx_common.validation import validate_event
from csx_conferences.service import ConferencesService

REFERRALS = StreamSpec.for_service("referrals")


def check_routing(event: referral_events.ReferralRouted) -> None:
    """A malformed routing (ids that are not UUIDs, an unknown intervention, no time) can never
    schedule: InvalidArgument parks it in dead_letters at once, leaving nothing behind."""
    validate_event(event, uuids=("referral_id", "child_id"), required=("intervention", "routed_at"))


def referrals_consumer(service: ConferencesService) -> ConsumerSpec:
    """Referrals routed to A or B become conferences. The inbox makes a redelivery a no-op; the
    service makes a second routing event for the same referral one too."""

    async def on_referral_routed(uow: UnitOfWork, event: pb_message.Message) -> None:
        assert isinstance(event, referral_events.ReferralRouted)
        check_routing(event)
        await service.schedule_from_routing(uow, event)

    return ConsumerSpec(
        durable="conferences-referrals",
        stream=REFERRALS.name,
        routes=[
            Route(
                REFERRALS.subject("referral_routed"),
                referral_events.ReferralRouted,
                on_referral_routed,
                check=check_routing,  # type: ignore[arg-type]
            )
        ],
    )
