"""Transactional outbox: the event row is written in the same transaction as the state change.

Whoever writes an event (a use case, a consumer's handler), the relay is woken by the commit that
makes the row visible — never before it, and not by a rollback — so use cases never think about it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from google.protobuf import message as pb_message

from csx_common import telemetry
from csx_common.db import Tx
from csx_common.messaging.events import event_type
from csx_common.messaging.tables import PENDING, DeliveryTables


class Outbox:
    def __init__(self, tables: DeliveryTables, wake: Callable[[], None] | None = None) -> None:
        self._table = tables.outbox
        self._wake = wake

    async def add(self, session: Tx, subject: str, event: pb_message.Message) -> str:
        event_id = str(uuid.uuid4())
        # Second line of defence: a sub-message copied from a request carries only known fields.
        event.DiscardUnknownFields()
        await session.insert(
            self._table,
            dict(
                event_id=event_id,
                subject=subject,
                event_type=event_type(event),
                payload=event.SerializeToString(),
                headers=telemetry.inject_headers(),
                status=PENDING,
                attempts=0,
                created_at=datetime.now(UTC),
            ),
        )
        if self._wake is not None:
            # One wake per committed transaction, however many events it wrote; none on rollback.
            session.after_commit(self._wake)
        return event_id
