"""Consumers built from the topology the contracts declare (csx_common.messaging.topology): a
route's subject is its event type's, a ConsumerSpec's stream is its durable's, and a consumer
handles exactly the events its durable declares, no more and no fewer.

    consumer("panel-concerns", [route(ConcernRecorded, service.on_concern_recorded), ...])

Every route checks its event against the event's contract (csx_common.validation.check_event)
before anything else: a malformed event is parked at once, leaving nothing behind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from google.protobuf import message as pb_message

from csx_common.messaging.consumer import ConsumerSpec, Route
from csx_common.messaging.topology import TopologyError, topology
from csx_common.unit_of_work import Apply, UnitOfWork

E = TypeVar("E", bound=pb_message.Message)


def route(
    message_type: type[E],
    handler: Callable[[UnitOfWork, E], Awaitable[None]] | None = None,
    *,
    prepare: Callable[[E], Awaitable[Apply | None]] | None = None,
) -> Route[E]:
    """Events of `message_type` on their declared subject, checked against the event's contract,
    then handled (or prepared, then applied). The route's message type is what the consumer decodes,
    so a handler receives exactly an `E`. An event published per agency (a placeholder in its
    subject) is for that agency's portal, not for a service's consumer: refused here, since routes
    are looked up by the concrete subject."""
    event = topology().event(message_type)
    if event.params:
        raise TopologyError(f"{event.full_name} is published per {', '.join(event.params)}: no service consumes it")
    return Route(event.filter_subject, message_type, handler, prepare)


def consumer(durable: str, routes: Sequence[Route[Any]], **options: Any) -> ConsumerSpec:
    """The ConsumerSpec of a declared durable: its stream from the contracts, its routes exactly its
    declared events. `options`: ConsumerSpec's tuning (max_deliver, backoff, ack_wait, batch)."""
    declared = topology().durable(durable)
    handled = [r.message_type.DESCRIPTOR.full_name for r in routes]
    if sorted(handled) != sorted(declared.events):
        raise TopologyError(
            f"durable {durable} declares {sorted(declared.events)} but its routes handle {sorted(handled)}"
        )
    return ConsumerSpec(durable=declared.name, stream=declared.stream, routes=routes, **options)
