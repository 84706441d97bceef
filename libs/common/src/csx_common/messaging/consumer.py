"""Inbox consumer: events between services, on the pull loop (csx_common.messaging.pull), each
applied with its inbox row in one unit of work.

For each message: one transaction inserts (consumer, msg_id) into the inbox and runs the handler;
a message already in the inbox is a redelivery and only acked. The ack follows the commit, so a
crash in between redelivers, and the inbox makes the second delivery a no-op. Failures are
nak'ed with backoff; after `max_deliver` attempts the message is parked in `dead_letters` and
terminated, never redelivered forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar, cast

import structlog
from google.protobuf import message as pb_message
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import CursorResult, Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from csx_common import failpoints, telemetry
from csx_common.crypto import KeyDestroyedError
from csx_common.db import Tx
from csx_common.errors import InvalidArgument
from csx_common.messaging.events import EVENT_ID_HEADER, EVENT_TYPE_HEADER, MSG_ID_HEADER
from csx_common.messaging.pull import PullLoop, processing, record_failure, retry_delay
from csx_common.messaging.tables import DeliveryTables
from csx_common.unit_of_work import Apply, UnitOfWork, UnitsOfWork
from csx_common.validation import check_event

log = structlog.get_logger("csx.consumer")

# How often an idle consumer looks for dead letters released for replay.
REPLAY_CHECK_SECONDS = 5.0


class PoisonEvent(ValueError):
    """A handler's verdict that an event can never be applied (it breaks the contract): parked in
    dead_letters at once instead of being retried."""


def decode_event(message_type: type[pb_message.Message], data: bytes) -> pb_message.Message:
    """The event from its wire bytes, without the fields its contract does not name (they would be
    applied, stored and published again unclassified); bytes that do not parse are poison."""
    try:
        event = message_type.FromString(data)
    except DecodeError as exc:
        raise PoisonEvent("undecodable event") from exc
    event.DiscardUnknownFields()
    return event


class Obsolete(Protocol):
    """Whether an event has nothing left to act on; `lock` holds that answer until the transaction ends."""

    def __call__(self, session: Tx, event: pb_message.Message, *, lock: bool) -> Awaitable[bool]: ...


E = TypeVar("E", bound=pb_message.Message)


@dataclass(frozen=True)
class Route(Generic[E]):
    """Handle messages on `subject` (a concrete subject) as `message_type`: the handler receives
    exactly an `E`.

    Either `handler(uow, event)`, run in the inbox's unit of work, or `prepare(event)`, run before it
    for slow work (a gRPC fetch), returning the `apply(uow)` to run inside it (or None for nothing
    to do): no database lock is held while another service is called.
    """

    subject: str
    message_type: type[E]
    handler: Callable[[UnitOfWork, E], Awaitable[None]] | None = None
    prepare: Callable[[E], Awaitable[Apply | None]] | None = None
    # The contract an event must meet (its protovalidate annotations; raises InvalidArgument),
    # checked as soon as it is decoded: before anything, even the erased-child check, queries with
    # its values (a NUL in an id is an error on PostgreSQL, which would be retried), so it is
    # parked at once.
    check: Callable[[pb_message.Message], None] | None = check_event

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.prepare is None):
            raise ValueError("a route has exactly one of handler or prepare")


@dataclass
class ConsumerSpec:
    durable: str
    stream: str
    routes: Sequence[Route[Any]]
    max_deliver: int = 10
    # Seconds before redelivery after the n-th failure (the last value repeats).
    backoff: Sequence[float] = field(default_factory=lambda: (0.5, 1, 2, 5, 10, 30))
    ack_wait: float = 30.0
    batch: int = 64


async def claim(tx: Tx, inbox: Table, consumer: str, msg_id: str) -> bool:
    """Write (consumer, msg_id) to the inbox in `tx`; False if it is there already (a redelivery).
    The claim commits or rolls back with what the message changes, so it marks exactly the
    messages applied."""
    result = await tx.execute(
        _claim_statement(inbox, tx.dialect), {"consumer": consumer, "msg_id": msg_id, "received_at": datetime.now(UTC)}
    )
    return bool(cast(CursorResult[Any], result).rowcount)


@functools.cache
def _claim_statement(inbox: Table, dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING into the inbox, built once (not per message)."""
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    columns = ("consumer", "msg_id", "received_at")
    return insert(inbox).values({c: bindparam(c, type_=inbox.c[c].type) for c in columns}).on_conflict_do_nothing()


class InboxConsumer:
    """The events of `spec.stream` on the pull loop, in stream order, each with its inbox row in one
    unit of work.

    On SQLite a fetched batch is pipelined: each message's unit of work queues for the writer once
    the one before it has, so they run on it in stream order and share group COMMITs (one fsync for
    many events, each acked after the COMMIT covering it). On PostgreSQL, where transactions run side
    by side, one message after another."""

    def __init__(
        self,
        units: UnitsOfWork,
        tables: DeliveryTables,
        js: JetStreamContext,
        spec: ConsumerSpec,
        *,
        obsolete: Obsolete | None = None,
    ) -> None:
        self._units = units
        self._db = units.db
        # Events that have nothing left to act on (about an erased child): acknowledged, recorded in
        # the inbox, and not applied.
        self._obsolete = obsolete
        self._tables = tables
        self.spec = spec
        self._routes = {r.subject: r for r in spec.routes}
        self._loop = PullLoop(
            js,
            stream=spec.stream,
            durable=spec.durable,
            subjects=list(self._routes),
            handle=self.handle,
            ack_wait=spec.ack_wait,
            batch=spec.batch,
            concurrent=self._db.is_sqlite,
            idle=self._quiet,
        )
        # The previous message's turn: done once its unit of work has queued for the writer (or it ended).
        self._previous_turn: asyncio.Future[None] | None = None
        self.processed = 0
        self.duplicates = 0
        self.dead = 0
        self.replayed = 0
        self._next_replay_check = 0.0

    async def declare(self) -> None:
        await self._loop.declare()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    @property
    def _task(self) -> asyncio.Task[None] | None:
        return self._loop.task  # (tests/hostile checks that every consumer is still running)

    async def _quiet(self) -> None:
        """A quiet moment: now and then, re-run parked events an operator released."""
        now = asyncio.get_running_loop().time()
        if now >= self._next_replay_check:
            self._next_replay_check = now + REPLAY_CHECK_SECONDS
            await self._replay_requested()

    async def handle(self, msg: Msg) -> None:
        before, turn = self._previous_turn, asyncio.get_running_loop().create_future()
        self._previous_turn = turn
        try:
            if before is not None:
                await before
            await self._handle(msg, turn)
        finally:
            if not turn.done():
                turn.set_result(None)

    async def _handle(self, msg: Msg, turn: asyncio.Future[None]) -> None:
        headers = msg.headers or {}
        meta = msg.metadata
        # The event id: Nats-Msg-Id as the relay sets it, or Csx-Event-Id on a reconciliation copy.
        msg_id = headers.get(EVENT_ID_HEADER) or headers.get(MSG_ID_HEADER) or f"{meta.stream}:{meta.sequence.stream}"
        route = self._routes.get(msg.subject)
        with processing(
            f"{msg.subject} process",
            msg,
            self.spec.durable,
            parent=telemetry.extract_context(headers),
            **{"messaging.message.id": msg_id, "csx.event_type": headers.get(EVENT_TYPE_HEADER, "")},
        ) as span:
            try:
                if route is None:
                    raise PoisonEvent("no route for this subject")
                fresh = await self._apply(route, msg.data, msg_id, turn=turn)
                failpoints.hit("consumer.before_ack")
                await msg.ack()
                if fresh:
                    self.processed += 1
                else:
                    self.duplicates += 1
                    span.set_attribute("csx.duplicate", True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                record_failure(span, exc)
                await self._failed(msg, msg_id, exc)

    async def _apply(
        self,
        route: Route[Any],
        data: bytes,
        msg_id: str,
        after: Apply | None = None,
        turn: asyncio.Future[None] | None = None,
    ) -> bool:
        """Decode, prepare and apply one event with its inbox row in one transaction; False if this
        message id was applied before. `after` runs in the same transaction (marking a replay);
        `turn` is done as soon as the transaction has queued for the writer (the next message may
        queue its own)."""
        event = decode_event(route.message_type, data)
        if route.check is not None:
            route.check(event)
        apply: Apply | None
        if route.prepare is not None:
            # Nothing slow for an event with nothing left to act on (asked again below, in the
            # transaction that writes).
            if self._obsolete is not None:
                async with self._db.session() as session:
                    if await self._obsolete(session, event, lock=False):
                        return await self._skip(msg_id, after)
            apply = await route.prepare(event)
        else:
            handler = route.handler
            assert handler is not None

            async def apply(uow: UnitOfWork) -> None:
                await handler(uow, event)

        try:
            if turn is not None and not turn.done():
                # Nothing yields between here and queueing for the writer: the next message's unit
                # of work queues behind this one, and both join the same group COMMIT.
                turn.set_result(None)
            async with self._units.begin() as uow:
                fresh = await self._claim(uow.tx, msg_id)
                # Asked again inside the transaction that writes (and, where it applies, holding off
                # a concurrent erasure): the check before was only to skip the preparation.
                if fresh and self._obsolete is not None and await self._obsolete(uow.tx, event, lock=True):
                    raise KeyDestroyedError("the event's child was erased")
                if fresh and apply is not None:
                    await apply(uow)
                if after is not None:
                    await after(uow)
        except KeyDestroyedError:
            return await self._skip(msg_id, after)  # erased while we were applying it
        return fresh

    async def _skip(self, msg_id: str, after: Apply | None) -> bool:
        log.info("event_obsolete", consumer=self.spec.durable, msg_id=msg_id)
        async with self._units.begin() as uow:
            fresh = await self._claim(uow.tx, msg_id)
            if after is not None:
                await after(uow)
        return fresh

    async def _replay_requested(self) -> None:
        """Dead letters an operator released (`csx deadletters replay`) are applied again, through the
        inbox as any delivery is, and marked replayed; one that still fails stays released."""
        dead = self._tables.dead_letters
        c = dead.c
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(c.id, c.subject, c.msg_id, c.payload).where(
                        c.consumer == self.spec.durable, c.replay_requested_at.is_not(None), c.replayed_at.is_(None)
                    )
                )
            ).all()
        for row in rows:
            route = self._routes.get(row.subject)
            if route is None:
                continue

            async def mark(uow: UnitOfWork, row_id: int = row.id) -> None:
                await uow.tx.execute(update(dead).where(c.id == row_id).values(replayed_at=uow.now))

            try:
                await self._apply(route, row.payload, row.msg_id, after=mark)
                self.replayed += 1
            except Exception as exc:
                log.warning("dead_letter_replay_failed", consumer=self.spec.durable, error=type(exc).__name__)

    async def _claim(self, session: Tx, msg_id: str) -> bool:
        return await claim(session, self._tables.inbox, self.spec.durable, msg_id)

    async def _failed(self, msg: Msg, msg_id: str, exc: Exception) -> None:
        deliveries = msg.metadata.num_delivered or 1
        log.warning(
            "event_handling_failed",
            consumer=self.spec.durable,
            msg_id=msg_id,
            deliveries=deliveries,
            error=type(exc).__name__,
        )
        try:
            if deliveries >= self.spec.max_deliver or isinstance(exc, (PoisonEvent, InvalidArgument)):
                async with self._db.transaction() as session:
                    await session.execute(
                        self._tables.dead_letters.insert().values(
                            consumer=self.spec.durable,
                            msg_id=msg_id,
                            subject=msg.subject,
                            payload=msg.data,
                            deliveries=deliveries,
                            error=type(exc).__name__,
                            dead_at=datetime.now(UTC),
                        )
                    )
                await msg.term()
                self.dead += 1
                log.error("event_dead_lettered", consumer=self.spec.durable, msg_id=msg_id)
            else:
                await msg.nak(delay=retry_delay(self.spec.backoff, deliveries))
        except Exception as inner:
            # Could not even park it (database down?): try again later; never drop it.
            log.error("event_failure_handling_failed", consumer=self.spec.durable, error=type(inner).__name__)
            with contextlib.suppress(Exception):
                await msg.nak(delay=max(self.spec.backoff))
