"""The outbox relay: publishes committed events to JetStream with Nats-Msg-Id = event id.

It polls by status (pending rows, oldest first), never by "id greater than the last seen", so a
row committed late by a slow transaction is never skipped. On SQLite, once the relay has caught up
with the table, rows this process commits are passed to it in memory (outbox.Handoff) and published
without being read back, in commit order; it still reads the table at least every `poll_seconds`.
After a failed publish, or when more rows wait than the hand-off holds, it reads the table (oldest
first) until it has caught up again, so no event overtakes an older one. A crash between publish and marking
republishes the same id, which JetStream drops as a duplicate (and inboxes drop too). On
PostgreSQL, replicas share the work with FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.js import JetStreamContext
from sqlalchemy import select, update

from csx_common import failpoints
from csx_common.db import Database
from csx_common.messaging.events import EVENT_TYPE_HEADER, MSG_ID_HEADER
from csx_common.messaging.outbox import Handoff
from csx_common.messaging.tables import PENDING, PUBLISHED, DeliveryTables

log = structlog.get_logger("csx.relay")

# Seconds a published event may wait to be marked published (SQLite; see Relay.publish_pending).
MARK_EVERY = 0.25


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
        handoff: Handoff | None = None,
    ) -> None:
        self._db = db
        self._outbox = tables.outbox
        self._js = js
        self._poll = poll_seconds
        self._batch = batch
        self._timeout = publish_timeout
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unmarked: list[str] = []  # published, not yet marked (SQLite; see publish_pending)
        self._mark_due: float | None = None
        # Rows committed by this process, passed on by its outbox (SQLite only: on PostgreSQL
        # replicas share the work through the table's row locks).
        self._handoff = handoff if handoff is not None and not db.is_postgres else None
        self._poll_due = 0.0
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
        with contextlib.suppress(Exception):  # unmarked events are only published again: harmless
            await self.flush_marks()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                sent = await self.publish_pending(defer_marks=True)
                failures = 0
                if sent >= self._batch:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("relay_publish_failed", error=type(exc).__name__, failures=failures)
            delay = self._poll if failures == 0 else min(5.0, self._poll * 2**failures)
            if self._mark_due is not None:
                delay = max(0.0, min(delay, self._mark_due - loop.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()

    async def publish_pending(self, *, defer_marks: bool = False) -> int:
        """Publish what is pending; return how many were published. With `defer_marks` (the relay's
        own loop, on SQLite), published rows are marked in one transaction every MARK_EVERY seconds
        or `batch` rows, not one per wake-up: a mark costs a commit on the one writer, and a mark
        lost in a crash only means the event is published again (JetStream and the inboxes drop it)."""
        query = (
            select(self._outbox)
            .where(self._outbox.c.status == PENDING)
            .order_by(self._outbox.c.created_at)
            .limit(self._batch)
        )
        if self._db.is_postgres:
            # Replicas share the work through the row locks: publish and mark under them.
            query = query.with_for_update(skip_locked=True)
            async with self._db.transaction() as session:
                done = await self._publish((await session.execute(query)).all())
                await self._mark(session, done)
            self.published += len(done)
            return len(done)
        now = asyncio.get_running_loop().time()
        handoff = self._handoff if defer_marks else None
        rows: Sequence[Any]
        polled = handoff is None or not handoff.on or now >= self._poll_due
        if not polled:
            assert handoff is not None
            rows = handoff.take(self._batch)  # committed by this process: nothing to read
        else:
            if handoff is not None:
                handoff.start()  # before the read: a row committed from now on is in one or the other
            if self._unmarked:
                query = query.where(self._outbox.c.event_id.not_in(self._unmarked))
            # SQLite: read without the write lock, publish, then mark.
            async with self._db.session() as session:
                rows = (await session.execute(query)).all()
            self._poll_due = now + self._poll
        try:
            done = await self._publish(rows)
        except Exception:
            self._behind(handoff)
            raise
        if handoff is not None:
            if len(done) < len(rows) or (polled and len(rows) >= self._batch):
                self._behind(handoff)  # read the table, oldest first, until caught up
            elif polled:
                handoff.discard(set(done))
        self._unmarked.extend(done)
        self.published += len(done)
        if not defer_marks or len(self._unmarked) >= self._batch or (self._mark_due or now + 1) <= now:
            await self.flush_marks()
        elif self._unmarked and self._mark_due is None:
            self._mark_due = now + MARK_EVERY
        return len(done)

    def _behind(self, handoff: Handoff | None) -> None:
        if handoff is not None:
            handoff.stop()
            self._poll_due = 0.0

    async def flush_marks(self) -> None:
        """Mark every published, not yet marked event (SQLite)."""
        if not self._unmarked:
            return
        unmarked = list(self._unmarked)
        async with self._db.transaction() as session:
            await self._mark(session, unmarked)
        del self._unmarked[: len(unmarked)]
        self._mark_due = None

    async def _publish(self, rows: Sequence[Any]) -> list[str]:
        """Publish `rows` (outbox rows, or OutboxRow) in order; the ids of those published, which
        are a prefix: the first failure ends the batch."""
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
