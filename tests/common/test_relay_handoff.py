"""The relay's hand-off (SQLite): rows a process commits reach the relay in memory and are published
without being read back, in order, once; a row written in a savepoint that rolled back is neither
handed over nor published; rows only the table knows (written before a restart) are found by the poll;
after a failed publish, no later event overtakes the failed one. Real nats-server, real SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from sqlalchemy import MetaData

from csx.panel.v1 import events_pb2
from csx_common.db import Database
from csx_common.messaging.outbox import Handoff, Outbox
from csx_common.messaging.relay import Relay
from csx_common.messaging.tables import DeliveryTables

metadata = MetaData()
delivery = DeliveryTables(metadata)


@dataclass
class Rig:
    db: Database
    js: JetStreamContext
    stream: str
    subject: str

    async def published(self) -> list[str]:
        """The place ids on the stream, in stream order."""
        sub = await self.js.pull_subscribe(self.subject, stream=self.stream)
        out: list[str] = []
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except nats.errors.TimeoutError:
                break
            for msg in msgs:
                out.append(events_pb2.PlaceFlagged.FromString(msg.data).place_id)
                await msg.ack()
        await sub.unsubscribe()
        return out


@pytest.fixture
async def rig(tmp_path: Path, nats_url: str) -> AsyncIterator[Rig]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    await db.run_sync(metadata.create_all)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    name = f"T{uuid.uuid4().hex[:8]}".upper()
    subject = f"t{name.lower()}.place_flagged"
    await js.add_stream(name=name, subjects=[subject])
    yield Rig(db, js, name, subject)
    await js.delete_stream(name)
    await nc.close()
    await db.dispose()


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling what the relay's task changes
            await asyncio.sleep(0.02)


async def test_committed_rows_are_published_from_memory_in_order_and_once(rig: Rig) -> None:
    handoff = Handoff()
    outbox = Outbox(delivery, handoff=handoff)
    relay = Relay(rig.db, delivery, rig.js, poll_seconds=60, handoff=handoff)
    outbox._wake = relay.notify
    # Committed before the relay runs (the hand-off is off until it has read the table): its first
    # read finds them, and publishes each once.
    for i in range(5):
        async with rig.db.transaction() as tx:
            await outbox.add(tx, rig.subject, events_pb2.PlaceFlagged(place_id=f"plc-{i:02d}"))
    reads = 0
    session = rig.db.session

    def counting_session():  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return session()

    rig.db.session = counting_session  # type: ignore[method-assign]
    relay.start()
    try:
        await until(lambda: relay.published == 5)
        assert reads == 1 and handoff.on and not len(handoff)
        for i in range(5, 25):  # the next poll is a minute away: these come from the commits
            async with rig.db.transaction() as tx:
                await outbox.add(tx, rig.subject, events_pb2.PlaceFlagged(place_id=f"plc-{i:02d}"))
        await until(lambda: relay.published == 25)
        await asyncio.sleep(0.2)
        assert reads == 1 and relay.published == 25
    finally:
        await relay.stop()
    assert await rig.published() == [f"plc-{i:02d}" for i in range(25)]


async def test_a_row_from_a_savepoint_that_rolled_back_is_never_published(rig: Rig) -> None:
    handoff = Handoff()
    handoff.start()
    outbox = Outbox(delivery, handoff=handoff)
    async with rig.db.transaction() as tx:
        await outbox.add(tx, rig.subject, events_pb2.PlaceFlagged(place_id="plc-kept"))
        with pytest.raises(ValueError):
            async with tx.savepoint():
                await outbox.add(tx, rig.subject, events_pb2.PlaceFlagged(place_id="plc-undone"))
                raise ValueError("undo")
    assert [events_pb2.PlaceFlagged.FromString(row.payload).place_id for row in handoff.take(10)] == ["plc-kept"]
    relay = Relay(rig.db, delivery, rig.js, poll_seconds=0.1, handoff=handoff)
    relay.start()
    try:
        await until(lambda: relay.published >= 1)
        await asyncio.sleep(0.4)  # a poll or two more: nothing else is pending
    finally:
        await relay.stop()
    assert await rig.published() == ["plc-kept"]


async def test_rows_only_the_table_knows_are_found_by_the_poll(rig: Rig) -> None:
    """Written by an earlier process (nothing handed over), then published by this one's relay."""
    async with rig.db.transaction() as tx:
        await Outbox(delivery).add(tx, rig.subject, events_pb2.PlaceFlagged(place_id="plc-before-restart"))
    handoff = Handoff()
    outbox = Outbox(delivery, handoff=handoff)
    relay = Relay(rig.db, delivery, rig.js, poll_seconds=0.1, handoff=handoff)
    outbox._wake = relay.notify
    relay.start()
    try:
        async with rig.db.transaction() as tx:
            await outbox.add(tx, rig.subject, events_pb2.PlaceFlagged(place_id="plc-after-restart"))
        await until(lambda: relay.published == 2)
    finally:
        await relay.stop()
    assert sorted(await rig.published()) == ["plc-after-restart", "plc-before-restart"]


async def test_after_a_failed_publish_no_event_overtakes_an_older_one(tmp_path: Path, nats_url: str) -> None:
    """The first event's publish fails (its stream is not there yet); the second is committed once
    the stream is back. The relay reads the table until it has caught up, so the stream holds them
    in commit order (from memory, the second would have gone first)."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'order.db'}")
    await db.run_sync(metadata.create_all)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    name = f"T{uuid.uuid4().hex[:8]}".upper()
    subject = f"t{name.lower()}.place_flagged"
    handoff = Handoff()
    outbox = Outbox(delivery, handoff=handoff)
    relay = Relay(db, delivery, js, poll_seconds=60, publish_timeout=0.5, handoff=handoff)
    try:
        assert await relay.publish_pending(defer_marks=True) == 0  # caught up: the hand-off is on
        assert handoff.on
        async with db.transaction() as tx:
            await outbox.add(tx, subject, events_pb2.PlaceFlagged(place_id="plc-first"))
        with pytest.raises(Exception):  # noqa: B017 - no stream for the subject yet: JetStream refuses it
            await relay.publish_pending(defer_marks=True)
        assert not handoff.on
        await js.add_stream(name=name, subjects=[subject])
        async with db.transaction() as tx:
            await outbox.add(tx, subject, events_pb2.PlaceFlagged(place_id="plc-second"))
        assert await relay.publish_pending(defer_marks=True) == 2
        await relay.flush_marks()
        rig = Rig(db, js, name, subject)
        assert await rig.published() == ["plc-first", "plc-second"]
        assert handoff.on  # caught up again
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
        await nc.close()
        await db.dispose()
