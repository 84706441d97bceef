"""Transactional outbox: the event row is written in the same transaction as the state change.

Whoever writes an event (a use case, a consumer's handler), the relay is woken by the commit that
makes the row visible — never before it, and not by a rollback — so use cases never think about it.
With a `Handoff`, the committed rows are also passed to this process's relay in memory, so it
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

# Rows waiting in a hand-off, at most: past it the hand-off stops and the relay reads the table.
HANDOFF_LIMIT = 10_000


class OutboxRow(NamedTuple):
    """What the relay publishes: the columns of an outbox row it needs."""

    event_id: str
    subject: str
    event_type: str
    payload: bytes
    headers: dict[str, str]


class Handoff:
    """Committed outbox rows on their way to this process's relay, in commit order (SQLite: one
    writer, so commit order is the order to publish in).

    It is on only while the relay is caught up with the table. The relay turns it on just before it
    reads the table (so no row falls between the two) and off when a publish fails or a read finds a
    full batch; it turns itself off when more than `limit` rows wait. While it is off, rows are only
    in the table, which the relay reads oldest first: a row is never published after one committed
    later."""

    def __init__(self, limit: int = HANDOFF_LIMIT) -> None:
        self._rows: deque[OutboxRow] = deque()
        self._limit = limit
        self.on = False

    def put(self, row: OutboxRow) -> None:
        if not self.on:
            return
        if len(self._rows) >= self._limit:
            self.stop()
            return
        self._rows.append(row)

    def start(self) -> None:
        self._rows.clear()
        self.on = True

    def stop(self) -> None:
        self._rows.clear()
        self.on = False

    def take(self, n: int) -> list[OutboxRow]:
        return [self._rows.popleft() for _ in range(min(n, len(self._rows)))]

    def discard(self, event_ids: set[str]) -> None:
        """Rows the relay found in the table and published: not again."""
        kept = [row for row in self._rows if row.event_id not in event_ids]
        self._rows.clear()
        self._rows.extend(kept)

    def __len__(self) -> int:
        return len(self._rows)


class Outbox:
    def __init__(
        self, tables: DeliveryTables, wake: Callable[[], None] | None = None, *, handoff: Handoff | None = None
    ) -> None:
        self._table = tables.outbox
        self._wake = wake
        self._handoff = handoff

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
        if self._handoff is not None:  # per row: one written in a savepoint that rolls back is not passed on
            handoff = self._handoff
            session.after_commit(lambda: handoff.put(row))
        if self._wake is not None:
            # One wake per committed transaction, however many events it wrote; none on rollback.
            session.after_commit(self._wake)
        return row.event_id
