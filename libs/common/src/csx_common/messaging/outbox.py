"""Transactional outbox: the event row is written in the same transaction as the state change.

Whoever writes an event (a use case, a consumer's handler), the relay is woken by the commit that
makes the row visible — never before it, and not by a rollback — so use cases never think about it.
With `handoff`, the committed rows are also handed to the relay in memory (`committed`), so it
publishes them without reading them back; the table stays the record it polls for anything else.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from google.protobuf import message as pb_message

from csx_common import telemetry
from csx_common.db import Tx
from csx_common.messaging.events import event_type
from csx_common.messaging.tables import PENDING, DeliveryTables

# Rows handed over but not yet taken by the relay, at most (past it the oldest are dropped: the
# relay's poll finds them in the table).
HANDOFF_LIMIT = 10_000


class OutboxRow(NamedTuple):
    """What the relay publishes: the columns of an outbox row it needs."""

    event_id: str
    subject: str
    event_type: str
    payload: bytes
    headers: dict[str, str]


class Outbox:
    def __init__(
        self, tables: DeliveryTables, wake: Callable[[], None] | None = None, *, handoff: bool = False
    ) -> None:
        self._table = tables.outbox
        self._wake = wake
        self._handoff = handoff
        self.committed: deque[OutboxRow] = deque(maxlen=HANDOFF_LIMIT)

    async def add(self, session: Tx, subject: str, event: pb_message.Message) -> str:
        # Second line of defence: a sub-message copied from a request carries only known fields.
        event.DiscardUnknownFields()
        row = OutboxRow(
            str(uuid.uuid4()), subject, event_type(event), event.SerializeToString(), telemetry.inject_headers()
        )
        await session.insert(
            self._table,
            dict(row._asdict(), status=PENDING, attempts=0, created_at=datetime.now(UTC)),
        )
        if self._handoff:  # per row: a row written in a savepoint that rolls back is not handed over
            session.after_commit(lambda: self.committed.append(row))
        if self._wake is not None:
            # One wake per committed transaction, however many events it wrote; none on rollback.
            session.after_commit(self._wake)
        return row.event_id
