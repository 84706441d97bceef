"""Event subscriptions: what this service consumes, and the use case each one runs. The durable,
its stream and subjects are the contract's (ActionPlansService's `(csx.options.v1.topology)`)."""

from __future__ import annotations

from csx.conferences.v1 import events_pb2 as conf_events
from csx_actionplans.service import ActionPlansService
from csx_common.messaging.consumer import ConsumerSpec
from csx_common.messaging.routes import consumer, route


def conferences_consumer(service: ActionPlansService) -> ConsumerSpec:
    """A concluded conference becomes a plan. Its outcome may be unspecified (the contract allows it):
    conferences, asked over gRPC, has the last word on it."""
    return consumer(
        "actionplans-conferences",
        [route(conf_events.ConferenceConcluded, prepare=service.prepare_plan)],
    )
