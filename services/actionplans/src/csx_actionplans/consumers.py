"""Event subscriptions: which subjects this service consumes, and the use case each one runs."""

from __future__ import annotations

from csx.conferences.v1 import events_pb2 as conf_events
from csx_actionplans.service import ActionPlansService, check_concluded
from csx_common.messaging.consumer import ConsumerSpec, Route

CONFERENCES_STREAM = "CSX_CONFERENCES"


def conferences_consumer(service: ActionPlansService) -> ConsumerSpec:
    return ConsumerSpec(
        durable="actionplans-conferences",
        stream=CONFERENCES_STREAM,
        routes=[
            Route(
                "csx.conferences.conference_concluded",
                conf_events.ConferenceConcluded,
                prepare=service.prepare_plan,  # type: ignore[arg-type]
                check=check_concluded,  # type: ignore[arg-type]
            )
        ],
    )
