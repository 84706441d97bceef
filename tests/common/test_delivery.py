"""Outbox, relay and inbox consumer against a real nats-server and real databases, under faults."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from csx.panel.v1 import events_pb2
from csx_common.db import Database
from csx_common.messaging.consumer import ConsumerSpec, InboxConsumer, Route
from csx_common.messaging.events import StreamSpec
from csx_common.messaging.outbox import Outbox
from csx_common.messaging.relay import Relay
from csx_common.messaging.streams import ensure_stream
from csx_common.messaging.tables import PUBLISHED, DeliveryTables
from csx_common.unit_of_work import UnitsOfWork

metadata = MetaData()
delivery = DeliveryTables(metadata)
effects = Table("effects", metadata, Column("id", Integer, primary_key=True), Column("place_id", String(64)))


class Rig:
    def __init__(self, db: Database, js: JetStreamContext, stream: StreamSpec) -> None:
        self.db, self.js, self.stream = db, js, stream
        self.outbox = Outbox(delivery)
        self.subject = stream.subject("place_flagged")

    async def write_event(self, place_id: str) -> str:
        async with self.db.transaction() as s:
            return await self.outbox.add(s, self.subject, events_pb2.PlaceFlagged(place_id=place_id))

    async def stream_count(self) -> int:
        return (await self.js.stream_info(self.stream.name)).state.messages

    async def effect_count(self) -> int:
        async with self.db.session() as s:
            return int((await s.execute(select(func.count()).select_from(effects))).scalar_one())

    def consumer(self, durable: str, handler=None, **kw) -> InboxConsumer:  # type: ignore[no-untyped-def]
        async def record(uow, event) -> None:  # type: ignore[no-untyped-def]
            await uow.tx.execute(effects.insert().values(place_id=event.place_id))

        spec = ConsumerSpec(
            durable=durable,
            stream=self.stream.name,
            # Delivery mechanics on bare events (a place id only): the contract's check is not the subject here.
            routes=[Route(self.subject, events_pb2.PlaceFlagged, handler or record, check=None)],
            **kw,
        )
        return InboxConsumer(UnitsOfWork(self.db), delivery, self.js, spec)


@pytest.fixture
async def rig(databases, nats_url: str) -> AsyncIterator[Rig]:  # type: ignore[no-untyped-def]
    db = Database(await databases.new("delivery"))
    await db.run_sync(metadata.create_all)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = StreamSpec.for_service(f"t{uuid.uuid4().hex[:8]}")
    await ensure_stream(js, stream)
    yield Rig(db, js, stream)
    await js.delete_stream(stream.name)
    await nc.close()
    await db.dispose()


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


async def test_relay_killed_between_commit_and_publish_delivers_once_after_restart(rig: Rig) -> None:
    await rig.write_event("plc-a")  # committed; no relay ran (it "died" before publishing)
    assert await rig.stream_count() == 0
    relay = Relay(rig.db, delivery, rig.js)
    assert await relay.publish_pending() == 1
    assert await relay.publish_pending() == 0
    assert await rig.stream_count() == 1


async def test_relay_killed_between_publish_and_mark_is_deduplicated(rig: Rig) -> None:
    await rig.write_event("plc-b")
    relay = Relay(rig.db, delivery, rig.js)
    async with rig.db.session() as s:
        rows = (await s.execute(select(delivery.outbox))).all()
    await relay._publish(rows)  # published, then "crashed" before marking the row
    assert await Relay(rig.db, delivery, rig.js).publish_pending() == 1  # republished: same Nats-Msg-Id
    assert await rig.stream_count() == 1


async def test_relay_polls_by_status_not_by_id(rig: Rig) -> None:
    """An event committed after a later one was published is still published."""
    relay = Relay(rig.db, delivery, rig.js)
    await rig.write_event("plc-late-1")
    await relay.publish_pending()
    await rig.write_event("plc-late-2")
    assert await relay.publish_pending() == 1
    assert await rig.stream_count() == 2


async def test_same_message_twice_has_one_effect(rig: Rig) -> None:
    await rig.write_event("plc-c")
    await Relay(rig.db, delivery, rig.js).publish_pending()
    consumer = rig.consumer("dupes")
    await consumer.declare()
    sub = await rig.js.pull_subscribe_bind(durable="dupes", stream=rig.stream.name)
    [msg] = await sub.fetch(1, timeout=5)
    await consumer.handle(msg)
    again = Msg(_client=msg._client, subject=msg.subject, reply=msg.reply, data=msg.data, headers=msg.headers)
    await consumer.handle(again)  # delivered again (e.g. redelivery after a lost ack)
    await consumer.stop()
    assert (consumer.processed, consumer.duplicates) == (1, 1)
    assert await rig.effect_count() == 1


async def _async(value: bool) -> bool:
    return value


async def test_consumer_killed_after_commit_before_ack_has_one_effect(rig: Rig, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    await rig.write_event("plc-d")
    await Relay(rig.db, delivery, rig.js).publish_pending()
    first = rig.consumer("crashy", ack_wait=1.0)
    await first.declare()

    original_ack = Msg.ack

    async def lost_ack(self) -> None:  # type: ignore[no-untyped-def]
        return None  # the process "died" after commit, before the ack reached the broker

    monkeypatch.setattr(Msg, "ack", lost_ack)
    first.start()
    await wait_for(lambda: _async(first.processed == 1))
    await first.stop()
    monkeypatch.setattr(Msg, "ack", original_ack)
    second = rig.consumer("crashy", ack_wait=1.0)
    await second.declare()
    second.start()
    try:
        await wait_for(lambda: _async(second.duplicates == 1))
    finally:
        await second.stop()
    assert await rig.effect_count() == 1


async def test_failing_handler_is_retried_then_succeeds_once(rig: Rig) -> None:
    calls = 0

    async def flaky(uow, event) -> None:  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        await uow.tx.execute(effects.insert().values(place_id=event.place_id))
        if calls == 1:
            raise RuntimeError("transient")  # rolls back the effect and the inbox row

    await rig.write_event("plc-e")
    await Relay(rig.db, delivery, rig.js).publish_pending()
    consumer = rig.consumer("flaky", handler=flaky, backoff=(0.1,))
    await consumer.declare()
    consumer.start()
    try:
        await wait_for(lambda: _async(consumer.processed == 1))
    finally:
        await consumer.stop()
    assert calls == 2
    assert await rig.effect_count() == 1


async def test_poison_message_goes_to_dead_letters_not_forever(rig: Rig) -> None:
    async def poison(uow, event) -> None:  # type: ignore[no-untyped-def]
        raise ValueError("cannot handle")

    await rig.write_event("plc-f")
    await Relay(rig.db, delivery, rig.js).publish_pending()
    consumer = rig.consumer("poison", handler=poison, max_deliver=3, backoff=(0.1,))
    await consumer.declare()
    consumer.start()
    try:
        await wait_for(lambda: _async(consumer.dead == 1))
        await asyncio.sleep(0.5)
    finally:
        await consumer.stop()
    async with rig.db.session() as s:
        dead = (await s.execute(select(delivery.dead_letters))).all()
    assert len(dead) == 1 and dead[0].deliveries == 3 and dead[0].error == "ValueError"
    info = await rig.js.consumer_info(rig.stream.name, "poison")
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert await rig.effect_count() == 0


async def test_outbox_wakes_the_relay_once_per_commit_and_never_on_rollback(rig: Rig) -> None:
    wakes: list[int] = []
    outbox = Outbox(delivery, wake=lambda: wakes.append(1))
    async with rig.db.transaction() as s:
        await outbox.add(s, rig.subject, events_pb2.PlaceFlagged(place_id="plc-w1"))
        await outbox.add(s, rig.subject, events_pb2.PlaceFlagged(place_id="plc-w2"))
        assert wakes == []  # not before the rows are visible
    assert wakes == [1]
    with pytest.raises(RuntimeError):
        async with rig.db.transaction() as s:
            await outbox.add(s, rig.subject, events_pb2.PlaceFlagged(place_id="plc-w3"))
            raise RuntimeError("use case failed")
    assert wakes == [1]


async def test_poison_event_is_parked_at_once(rig: Rig) -> None:
    from csx_common.messaging.consumer import PoisonEvent

    calls = 0

    async def refuse(uow, event) -> None:  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        raise PoisonEvent("breaks the contract")

    await rig.write_event("plc-g")
    await Relay(rig.db, delivery, rig.js).publish_pending()
    consumer = rig.consumer("poison-now", handler=refuse, max_deliver=10, backoff=(0.1,))
    await consumer.declare()
    consumer.start()
    try:
        await wait_for(lambda: _async(consumer.dead == 1))
    finally:
        await consumer.stop()
    assert calls == 1


async def test_a_failing_handler_leaves_no_values_in_spans(rig: Rig) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from csx_common import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    original = telemetry.tracer
    telemetry.tracer = lambda name="csx": provider.get_tracer(name)  # type: ignore[assignment]

    async def leaky(uow, event) -> None:  # type: ignore[no-untyped-def]
        raise ValueError("NHS 9434765919 for Zqxcanary")  # as a driver error with parameters would

    try:
        await rig.write_event("plc-h")
        await Relay(rig.db, delivery, rig.js).publish_pending()
        consumer = rig.consumer("leaky", handler=leaky, max_deliver=1, backoff=(0.1,))
        await consumer.declare()
        consumer.start()
        await wait_for(lambda: _async(consumer.dead == 1))
        await consumer.stop()
    finally:
        telemetry.tracer = original  # type: ignore[assignment]
    spans = exporter.get_finished_spans()
    assert spans
    text = repr([(s.attributes, [(e.name, e.attributes) for e in s.events], s.status) for s in spans])
    assert "9434765919" not in text and "Zqxcanary" not in text
    assert "ValueError" in text


async def test_released_dead_letter_is_applied_once(rig: Rig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An operator fixes the cause and releases a parked event (`csx deadletters replay`): the consumer
    applies it at its next quiet moment, once, through the inbox."""
    from typer.testing import CliRunner

    from csx_cli.main import app

    broken = True

    async def until_fixed(uow, event) -> None:  # type: ignore[no-untyped-def]
        if broken:
            raise RuntimeError("dependency broken")
        await uow.tx.execute(effects.insert().values(place_id=event.place_id))

    await rig.write_event("plc-replay")
    await Relay(rig.db, delivery, rig.js).publish_pending()
    consumer = rig.consumer("replayable", handler=until_fixed, max_deliver=2, backoff=(0.1,))
    await consumer.declare()
    consumer.start()
    try:
        await wait_for(lambda: _async(consumer.dead == 1))
        broken = False
        url = rig.db.url.render_as_string(hide_password=False)
        runner = CliRunner()
        listed = await asyncio.to_thread(runner.invoke, app, ["deadletters", "list", "--database-url", url, "--json"])
        assert listed.exit_code == 0, listed.output
        [parked] = [r for r in json.loads(listed.output) if r["consumer"] == "replayable"]
        assert parked["state"] == "parked" and "plc-replay" not in listed.output
        released = await asyncio.to_thread(
            runner.invoke, app, ["deadletters", "replay", str(parked["id"]), "--database-url", url]
        )
        assert released.exit_code == 0, released.output
        await wait_for(lambda: _async(consumer.replayed == 1))
    finally:
        await consumer.stop()
    assert await rig.effect_count() == 1
    listed = await asyncio.to_thread(CliRunner().invoke, app, ["deadletters", "list", "--database-url", url, "--json"])
    assert [r["state"] for r in json.loads(listed.output) if r["consumer"] == "replayable"] == ["replayed"]


async def test_the_relay_marks_in_batches_publishes_each_event_once_and_marks_all_at_stop(rig: Rig) -> None:
    relay = Relay(rig.db, delivery, rig.js, poll_seconds=0.05)
    relay.start()
    for i in range(40):
        await rig.write_event(f"plc-batch-{i}")
        relay.notify()
        await asyncio.sleep(0.005)  # one event per wake-up, as at a low steady rate
    await wait_for(lambda: _async(relay.published == 40))
    await relay.stop()  # marks what is still unmarked
    assert await rig.stream_count() == 40  # each once: marked or not, nothing was published twice
    async with rig.db.session() as s:
        statuses = (await s.execute(select(delivery.outbox.c.status))).scalars().all()
    assert len(statuses) == 40 and set(statuses) == {PUBLISHED}


async def test_a_batch_is_applied_in_stream_order_and_shares_commits(rig: Rig) -> None:
    """SQLite pipelines a fetched batch (each unit of work queues for the writer once the one before
    it has): effects land in stream order, every message once, with far fewer COMMITs than messages.
    PostgreSQL applies one message after another: the same order, a COMMIT each."""
    for i in range(60):
        await rig.write_event(f"plc-{i:02d}")
    assert await Relay(rig.db, delivery, rig.js).publish_pending() == 60
    commits = rig.db.commits
    consumer = rig.consumer("in-order")
    await consumer.declare()
    consumer.start()
    try:
        await wait_for(lambda: _effects_at_least(rig, 60))
    finally:
        await consumer.stop()
    async with rig.db.session() as s:
        order = [row.place_id for row in (await s.execute(select(effects.c.place_id).order_by(effects.c.id))).all()]
    assert order == [f"plc-{i:02d}" for i in range(60)]
    assert consumer.processed == 60
    if rig.db.is_sqlite:
        assert rig.db.commits - commits < 30, rig.db.commits - commits  # one fsync for many events


async def _effects_at_least(rig: Rig, n: int) -> bool:
    return await rig.effect_count() >= n
