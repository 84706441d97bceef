"""Reconciliation (csx_common.messaging.reconcile) against a real nats-server and real databases, with
the real relay and inbox consumer: a message the broker lost comes back, and nothing applies twice."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from sqlalchemy import Column, Integer, MetaData, String, Table, delete, select

from csx.panel.v1 import events_pb2
from csx_common.db import Database
from csx_common.messaging.consumer import ConsumerSpec, InboxConsumer, PoisonEvent, Route
from csx_common.messaging.events import EVENT_ID_HEADER, EVENT_TYPE_HEADER, MSG_ID_HEADER, StreamSpec
from csx_common.messaging.outbox import Outbox
from csx_common.messaging.reconcile import Consumer, Producer, ReconcileReport, reconcile, subject_matches
from csx_common.messaging.relay import Relay
from csx_common.messaging.streams import ensure_stream
from csx_common.messaging.tables import DeliveryTables
from csx_common.unit_of_work import UnitsOfWork
from tests.support import eventually

producer_metadata = MetaData()
producer_delivery = DeliveryTables(producer_metadata)
consumer_metadata = MetaData()
consumer_delivery = DeliveryTables(consumer_metadata)
effects = Table(
    "effects",
    consumer_metadata,
    Column("id", Integer, primary_key=True),
    Column("durable", String(64), nullable=False),
    Column("place_id", String(64), nullable=False),
)


class Rig:
    """A producer (its own database, outbox and relay) and consumers in another database."""

    def __init__(self, producer_db: Database, consumer_db: Database, js: JetStreamContext, stream: StreamSpec) -> None:
        self.producer_db, self.consumer_db, self.js, self.stream = producer_db, consumer_db, js, stream
        self.outbox = Outbox(producer_delivery)
        self.relay = Relay(producer_db, producer_delivery, js)
        self.subject = stream.subject("place_flagged")
        self.running: list[InboxConsumer] = []

    async def publish(self, *places: str) -> list[str]:
        ids = []
        for place in places:
            async with self.producer_db.transaction() as s:
                ids.append(await self.outbox.add(s, self.subject, events_pb2.PlaceFlagged(place_id=place)))
        await self.relay.publish_pending()
        return ids

    async def consumer(self, durable: str, *, start: bool = True, poison: str = "") -> InboxConsumer:
        async def record(uow, event) -> None:  # type: ignore[no-untyped-def]
            if event.place_id == poison:
                raise PoisonEvent("breaks the contract")
            await uow.tx.execute(effects.insert().values(durable=durable, place_id=event.place_id))

        # Bare events (a place id only): delivery is the subject here, not the event's contract.
        route = Route(self.subject, events_pb2.PlaceFlagged, record, check=None)
        spec = ConsumerSpec(durable, self.stream.name, [route])
        consumer = InboxConsumer(UnitsOfWork(self.consumer_db), consumer_delivery, self.js, spec)
        await consumer.declare()
        if start:
            consumer.start()
            self.running.append(consumer)
        return consumer

    def target(self, durable: str) -> Consumer:
        return Consumer(durable, self.consumer_db, (self.subject,), consumer_delivery)

    async def reconcile(self, *durables: str, **kw) -> ReconcileReport:  # type: ignore[no-untyped-def]
        producer = Producer("tproducer", self.producer_db, self.stream.name, producer_delivery)
        return await reconcile(producer, [self.target(d) for d in durables], self.js, **kw)

    async def effects(self, durable: str) -> list[str]:
        async with self.consumer_db.session() as s:
            rows = await s.execute(select(effects.c.place_id).where(effects.c.durable == durable))
            return sorted(r.place_id for r in rows)

    async def messages(self) -> int:
        return (await self.js.stream_info(self.stream.name)).state.messages

    async def caught_up(self, durable: str) -> bool:
        info = await self.js.consumer_info(self.stream.name, durable)
        return not info.num_pending and not info.num_ack_pending


@pytest.fixture
async def rig(databases, nats_url: str) -> AsyncIterator[Rig]:  # type: ignore[no-untyped-def]
    producer_db = Database(await databases.new("producer"))
    consumer_db = Database(await databases.new("consumer"))
    await producer_db.run_sync(producer_metadata.create_all)
    await consumer_db.run_sync(consumer_metadata.create_all)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = StreamSpec.for_service(f"r{uuid.uuid4().hex[:8]}")
    await ensure_stream(js, stream)
    rig = Rig(producer_db, consumer_db, js, stream)
    yield rig
    for consumer in rig.running:
        await consumer.stop()
    await js.delete_stream(stream.name)
    await nc.close()
    await producer_db.dispose()
    await consumer_db.dispose()


async def test_a_deleted_stream_message_comes_back_and_applies_once(rig: Rig) -> None:
    places = [f"plc-{i}" for i in range(6)]
    a = await rig.consumer("a")  # applies everything, the lost message too (before it was lost)
    await rig.consumer("b", start=False)  # declared, but not fetching yet
    ids = await rig.publish(*places)
    await eventually(lambda: _is(rig.effects("a"), places))
    lost = await rig.js.get_msg(rig.stream.name, 5)
    assert lost.headers and lost.headers[MSG_ID_HEADER] == ids[4]
    await rig.js.delete_msg(rig.stream.name, 5)  # the broker loses an acknowledged message
    await rig.consumer("b")
    await eventually(lambda: rig.caught_up("b"))
    assert await rig.effects("b") == [p for p in places if p != "plc-4"]

    # (d) within the settle time, nothing is touched
    report = await rig.reconcile("a", "b", settle=3600)
    assert (report.pair("tproducer", "b").checked, report.total("missing"), report.total("republished")) == (0, 0, 0)
    # (c) a dry run finds exactly the lost one, and publishes nothing
    report = await rig.reconcile("a", "b", settle=0, dry_run=True)
    b = report.pair("tproducer", "b")
    assert (b.checked, b.missing, b.republished, b.missing_ids) == (6, 1, 0, [ids[4]])
    assert report.pair("tproducer", "a").missing == 0 and not report.ok
    assert await rig.messages() == 5
    # the real run republishes it
    report = await rig.reconcile("a", "b", settle=0)
    b = report.pair("tproducer", "b")
    assert (b.checked, b.missing, b.republished, b.pending, b.failed) == (6, 1, 1, 0, 0)
    assert report.pair("tproducer", "a").missing == 0 and report.ok
    await eventually(lambda: _is(rig.effects("b"), places))
    await eventually(lambda: _true(a.duplicates == 1))  # "a" got the copy too, and skipped it
    assert await rig.effects("a") == places  # nothing applied twice
    # the copy is the relay's message: subject, payload, event type and trace headers, event id
    copy = await rig.js.get_msg(rig.stream.name, 7)
    assert copy.subject == lost.subject and copy.data == lost.data and copy.headers
    assert copy.headers[EVENT_ID_HEADER] == ids[4] and copy.headers[MSG_ID_HEADER] == f"{ids[4]}~5"
    assert copy.headers[EVENT_TYPE_HEADER] == lost.headers[EVENT_TYPE_HEADER]
    assert {k: v for k, v in copy.headers.items() if k not in (MSG_ID_HEADER, EVENT_ID_HEADER)} == {
        k: v for k, v in lost.headers.items() if k != MSG_ID_HEADER
    }
    # (e) a second run has nothing to do
    report = await rig.reconcile("a", "b", settle=0)
    assert (report.total("checked"), report.total("missing"), report.total("republished")) == (12, 0, 0)
    assert await rig.messages() == 6


async def test_a_parked_event_is_reported_not_republished(rig: Rig) -> None:
    c = await rig.consumer("parking", poison="plc-poison")
    await rig.publish("plc-fine", "plc-poison")
    await eventually(lambda: _true(c.dead == 1 and c.processed == 1))
    report = await rig.reconcile("parking", settle=0)
    p = report.pair("tproducer", "parking")
    assert (p.checked, p.parked, p.missing, p.republished) == (2, 1, 0, 0)
    assert await rig.messages() == 2


async def test_a_consumer_behind_is_pending_and_one_that_passed_an_event_gets_a_copy(rig: Rig) -> None:
    await rig.consumer("slow", start=False)
    ids = await rig.publish("plc-x", "plc-y")
    report = await rig.reconcile("slow", settle=0)
    p = report.pair("tproducer", "slow")
    assert (p.missing, p.pending, p.republished) == (2, 2, 0)  # in the stream: on its way
    assert await rig.messages() == 2
    slow = await rig.consumer("slow")
    await eventually(lambda: _is(rig.effects("slow"), ["plc-x", "plc-y"]))
    await eventually(lambda: rig.caught_up("slow"))
    # its database is restored from a backup taken before it applied plc-x: the broker has moved on
    async with rig.consumer_db.transaction() as s:
        await s.execute(delete(consumer_delivery.inbox).where(consumer_delivery.inbox.c.msg_id == ids[0]))
        await s.execute(delete(effects).where(effects.c.place_id == "plc-x"))
    report = await rig.reconcile("slow", settle=0)
    p = report.pair("tproducer", "slow")
    assert (p.missing, p.pending, p.republished) == (1, 0, 1)
    await eventually(lambda: _is(rig.effects("slow"), ["plc-x", "plc-y"]))
    assert slow.processed == 3 and await rig.messages() == 3


async def test_an_event_older_than_the_stream_keeps_is_reported_not_republished(rig: Rig) -> None:
    await rig.consumer("never", start=False)
    [event_id] = await rig.publish("plc-old")
    later = datetime.now(UTC) + timedelta(days=31)  # the stream keeps 30 days
    report = await rig.reconcile("never", settle=0, now=later)
    p = report.pair("tproducer", "never")
    assert (p.too_old, p.too_old_ids, p.missing, p.republished) == (1, [event_id], 0, 0)
    assert not report.ok and await rig.messages() == 1


async def test_subject_matching() -> None:
    assert subject_matches("csx.a.b", "csx.a.b") and not subject_matches("csx.a.b", "csx.a.c")
    assert subject_matches("csx.*.b", "csx.x.b") and not subject_matches("csx.*", "csx.x.b")
    assert subject_matches("csx.>", "csx.x.b") and not subject_matches("csx.x.>", "csx.x")


async def _is(values, expected) -> bool:  # type: ignore[no-untyped-def]
    return await values == expected


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------------------------
# csx reconcile run: the stack's databases and NATS users
# --------------------------------------------------------------------------------------------


def test_the_cli_knows_every_durables_subjects() -> None:
    """csx_cli.reconcile.DURABLE_SUBJECTS is each durable's routes, as the services declare them."""
    from unittest.mock import MagicMock

    from csx_actionplans.consumers import conferences_consumer
    from csx_cli.reconcile import DURABLE_SUBJECTS, pairs
    from csx_conferences.consumers import referrals_consumer
    from csx_panel.app import concerns_consumer
    from csx_referrals.consumers import conferences_consumer as case_consumer
    from csx_safeguarding.disclosure import DisclosureViews
    from csx_safeguarding.erasure import ChildErasure

    specs = [
        concerns_consumer(MagicMock()),
        referrals_consumer(MagicMock()),
        conferences_consumer(MagicMock()),
        case_consumer(MagicMock()),
    ]
    declared = {s.durable: {r.subject for r in s.routes} for s in specs}
    disclosure = {r.subject for r in DisclosureViews(MagicMock(), postgres=False).routes()}
    disclosure |= {r.subject for r in ChildErasure(MagicMock(), lambda: None).routes()}
    declared |= {f"{s}-disclosure": disclosure for s in ("panel", "conferences", "actionplans")}
    assert {d: set(s) for d, s in DURABLE_SUBJECTS.items()} == declared
    assert {durable for _, _, durable in pairs()} == set(declared)


async def test_cli_recovers_a_deleted_message_as_the_producers_own_nats_user(tmp_path: Path) -> None:
    """`csx reconcile run` against the stack's layout and NATS users: it publishes as referrals (which
    may publish only csx.referrals.>) and reads ack floors as the operator."""
    from typer.testing import CliRunner

    from csx.referrals.v1 import events_pb2 as referral_events
    from csx_cli.main import app
    from csx_cli.stack import CONSUMES, SERVICES
    from csx_common.natsauth import (
        DevNatsAuth,
        NatsUser,
        Permissions,
        inbox_prefix,
        operator_permissions,
        render_authorization,
        service_permissions,
    )
    from csx_common.natsserver import NatsServer

    data_dir = tmp_path / "var"
    auth = DevNatsAuth(data_dir / "pki" / "nats").ensure(SERVICES, (), CONSUMES)
    users = [NatsUser(s, auth.password_file(s).read_text(), service_permissions(s, CONSUMES)) for s in SERVICES]
    users.append(NatsUser("operator", auth.password_file("operator").read_text(), operator_permissions()))
    # The broker's administrator, who deletes the message (no CSX user may).
    users.append(NatsUser("admin", "admin-secret", Permissions((">",), (">",))))
    config = tmp_path / "nats.conf"
    config.write_text(render_authorization(users))
    server = NatsServer(tmp_path / "store", config_file=config)
    server.start()
    dbs = {name: Database(f"sqlite+aiosqlite:///{data_dir / f'{name}.db'}") for name in SERVICES}
    nc = await nats.connect(
        server.url,
        user="referrals",
        password=auth.password_file("referrals").read_text(),
        inbox_prefix=inbox_prefix("referrals"),
    )
    admin = await nats.connect(server.url, user="admin", password="admin-secret")
    try:
        for db in dbs.values():
            await db.run_sync(producer_metadata.create_all)
        js = nc.jetstream()
        referrals = StreamSpec.for_service("referrals")
        await ensure_stream(js, referrals)
        outbox = Outbox(producer_delivery)
        for child in ("chd-1", "chd-2"):
            async with dbs["referrals"].transaction() as s:
                event = referral_events.ConcernRecorded(child_id=child)
                await outbox.add(s, referrals.subject("concern_recorded"), event)
        assert await Relay(dbs["referrals"], producer_delivery, js).publish_pending() == 2
        await admin.jetstream().delete_msg("CSX_REFERRALS", 1)  # lost before panel ever fetched it

        args = ["reconcile", "run", "--data-dir", str(data_dir), "--nats-url", server.url, "--settle", "0", "--json"]
        dry = await asyncio.to_thread(CliRunner().invoke, app, [*args, "--dry-run"])
        assert dry.exit_code == 1, dry.output
        assert json.loads(dry.stdout)["totals"]["missing"] == 2
        result = await asyncio.to_thread(CliRunner().invoke, app, args)
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        by_pair = {(p["producer"], p["consumer"]): p for p in out["pairs"]}
        panel = by_pair[("referrals", "panel-concerns")]
        # the lost one is back; the other is still in the stream, waiting for panel to start
        assert (panel["checked"], panel["missing"], panel["republished"], panel["pending"]) == (2, 2, 1, 1)
        assert by_pair[("referrals", "conferences-referrals")]["checked"] == 0
        assert ("conferences", "actionplans-conferences") in by_pair
        assert out["ok"] and out["totals"]["republished"] == 1
        state = (await admin.jetstream().stream_info("CSX_REFERRALS")).state
        assert (state.messages, state.last_seq) == (2, 3)
        table = await asyncio.to_thread(CliRunner().invoke, app, args[:-1])
        assert table.exit_code == 0 and "nothing lost" in table.stdout, table.output
    finally:
        await nc.close()
        await admin.close()
        for db in dbs.values():
            await db.dispose()
        server.stop()
