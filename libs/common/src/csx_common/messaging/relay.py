"""The outbox relay: publishes committed events to JetStream with Nats-Msg-Id = event id.

It polls by status (pending rows, oldest first), never by "id greater than the last seen", so a
row committed late by a slow transaction is never skipped. A crash between publish and marking
republishes the same id, which JetStream drops as a duplicate (and inboxes drop too). On
PostgreSQL, replicas share the work with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog
from nats.js import JetStreamContext
from sqlalchemy import select, update

from csx_common import failpoints
from csx_common.db import Database
from csx_common.messaging.events import EVENT_TYPE_HEADER, MSG_ID_HEADER
from csx_common.messaging.tables import PENDING, PUBLISHED, DeliveryTables

log = structlog.get_logger("csx.relay")


class Relay:
    def __init__(
        self,
        db: Database,
        tables: DeliveryTables,
        js: JetStreamContext,
        *,
        poll_seconds: float = 0.5,
        batch: int = 200,
        publish_timeout: float = 5.0,
    ) -> None:
        self._db = db
        self._outbox = tables.outbox
        self._js = js
        self._poll = poll_seconds
        self._batch = batch
        self._timeout = publish_timeout
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.published = 0

    def notify(self) -> None:
        """Called after a commit that added outbox rows: publish now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                sent = await self.publish_pending()
                failures = 0
                if sent >= self._batch:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("relay_publish_failed", error=type(exc).__name__, failures=failures)
            delay = self._poll if failures == 0 else min(5.0, self._poll * 2**failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()

    async def publish_pending(self) -> int:
        query = (
            select(self._outbox)
            .where(self._outbox.c.status == PENDING)
            .order_by(self._outbox.c.created_at)
            .limit(self._batch)
        )
        if self._db.is_postgres:
            query = query.with_for_update(skip_locked=True)
            async with self._db.transaction() as session:
                rows = (await session.execute(query)).all()
                done = await self._publish(rows)
                await self._mark(session, done)
        else:
            # SQLite: read without the write lock, publish, then mark in a short transaction.
            async with self._db.session() as session:
                rows = (await session.execute(query)).all()
            done = await self._publish(rows)
            if done:
                async with self._db.transaction() as session:
                    await self._mark(session, done)
        self.published += len(done)
        return len(done)

    async def _publish(self, rows: list) -> list[str]:
        done: list[str] = []
        try:
            for row in rows:
                failpoints.hit("relay.before_publish")
                headers = {**row.headers, MSG_ID_HEADER: row.event_id, EVENT_TYPE_HEADER: row.event_type}
                await self._js.publish(row.subject, row.payload, headers=headers, timeout=self._timeout)
                done.append(row.event_id)
        except Exception:
            if not done:
                raise
        if done:
            failpoints.hit("relay.before_mark")
        return done

    async def _mark(self, session, event_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
        if event_ids:
            await session.execute(
                update(self._outbox)
                .where(self._outbox.c.event_id.in_(event_ids))
                .values(status=PUBLISHED, published_at=datetime.now(UTC))
            )
