"""Transactional outbox: the event row is written in the same transaction as the state change."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from google.protobuf import message as pb_message
from sqlalchemy.ext.asyncio import AsyncSession

from csx_common import telemetry
from csx_common.messaging.events import event_type
from csx_common.messaging.tables import PENDING, DeliveryTables


class Outbox:
    def __init__(self, tables: DeliveryTables) -> None:
        self._table = tables.outbox

    async def add(self, session: AsyncSession, subject: str, event: pb_message.Message) -> str:
        event_id = str(uuid.uuid4())
        await session.execute(
            self._table.insert().values(
                event_id=event_id,
                subject=subject,
                event_type=event_type(event),
                payload=event.SerializeToString(),
                headers=telemetry.inject_headers(),
                status=PENDING,
                attempts=0,
                created_at=datetime.now(UTC),
            )
        )
        return event_id
