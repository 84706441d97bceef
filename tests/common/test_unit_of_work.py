"""The unit of work's idempotency (csx_common.unit_of_work), on SQLite and PostgreSQL: a replay
answers with the first response without redoing the work, a replay whose work now fails still
answers with it, concurrent replays write once, and an answer's key scope must be declared."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, String, Table, func, select
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import IntegrityError

from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.datakeys import DataKeys, child_scope, data_keys_table
from csx_common.db import Database
from csx_common.errors import FailedPrecondition
from csx_common.idempotency import IDEMPOTENCY_KEY_REUSED, IdempotencyKeys, idempotency_table
from csx_common.keyring import FileKeyring
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry
from csx_common.unit_of_work import Once, UnitOfWork, UnitsOfWork
from tests.conftest import POSTGRES_URL, DatabaseFactory, _admin

metadata = MetaData()
keys_table = data_keys_table(metadata)
idem_table = idempotency_table(metadata)
consents = Table("consents", metadata, Column("child_id", String(36), primary_key=True), Column("by", String(64)))


@dataclass
class Rig:
    db: Database
    units: UnitsOfWork


@pytest.fixture
async def rig(databases, tmp_path: Path) -> AsyncIterator[Rig]:  # type: ignore[no-untyped-def]
    db = Database(await databases.new("uow"))
    await db.run_sync(metadata.create_all)
    ring = FileKeyring.create(tmp_path / "keyring.json")
    sealer = Sealer(DataKeys(keys_table, ring, "referrals"), registry())
    units = UnitsOfWork(db, sealer=sealer, idempotency=IdempotencyKeys(idem_table, b"k" * 32, sealer))
    yield Rig(db, units)
    await db.dispose()


CHILD = "0b7e6f5c-3d8a-4c1e-9f2a-6b5d4c3a2b10"


def record(calls: list[str]):  # type: ignore[no-untyped-def]
    async def work(uow: UnitOfWork) -> pb.RecordSharingDecisionResponse:
        uow.seals_under(child_scope(CHILD))
        calls.append("ran")
        taken = await uow.tx.scalar(select(func.count()).select_from(consents))
        if taken:
            raise FailedPrecondition("consent already recorded", reason="ALREADY")
        await uow.tx.insert(consents, {"child_id": CHILD, "by": "sw.one"})
        return pb.RecordSharingDecisionResponse(decision=pb.SharingDecision(child_id=CHILD, reason="CANARY reason"))

    return work


async def rows(db: Database, table: Table) -> int:
    async with db.session() as s:
        return int((await s.execute(select(func.count()).select_from(table))).scalar_one())


async def test_a_replay_answers_with_the_first_response_even_when_its_work_now_fails(rig: Rig) -> None:
    request = pb.RecordSharingDecisionRequest(child_id=CHILD, idempotency_key="consent-0001")
    once = Once("consent", "consent-0001", request, pb.RecordSharingDecisionResponse)
    calls: list[str] = []
    first = await rig.units.run(record(calls), caller=None, once=once)
    again = await rig.units.run(record(calls), caller=None, once=once)  # the work refuses now
    assert again == first and first.decision.reason == "CANARY reason"
    assert await rows(rig.db, consents) == 1 and await rows(rig.db, idem_table) == 1
    async with rig.db.session() as s:
        stored = (await s.execute(select(idem_table.c.response, idem_table.c.sealed))).one()
    assert b"CANARY" not in stored.response and "CANARY" not in str(stored.sealed)  # sealed, under the child


async def test_the_same_key_for_another_request_is_refused(rig: Rig) -> None:
    calls: list[str] = []
    once = Once(
        "consent",
        "k-2",
        pb.RecordSharingDecisionRequest(child_id=CHILD, idempotency_key="k-2"),
        pb.RecordSharingDecisionResponse,
    )
    await rig.units.run(record(calls), caller=None, once=once)
    other = Once(
        "consent",
        "k-2",
        pb.RecordSharingDecisionRequest(child_id=CHILD, idempotency_key="k-3"),
        pb.RecordSharingDecisionResponse,
    )
    with pytest.raises(FailedPrecondition) as err:
        await rig.units.run(record(calls), caller=None, once=other)
    assert err.value.reason == IDEMPOTENCY_KEY_REUSED


async def test_concurrent_replays_write_once_and_all_answer_alike(rig: Rig) -> None:
    request = pb.RecordSharingDecisionRequest(child_id=CHILD, idempotency_key="k-many")
    once = Once("consent", "k-many", request, pb.RecordSharingDecisionResponse)
    calls: list[str] = []
    answers = await asyncio.gather(*(rig.units.run(record(calls), caller=None, once=once) for _ in range(10)))
    assert all(a == answers[0] for a in answers)
    assert await rows(rig.db, consents) == 1 and await rows(rig.db, idem_table) == 1


async def test_an_idempotent_use_case_must_declare_its_answers_key_scope(rig: Rig) -> None:
    async def careless(uow: UnitOfWork) -> pb.RecordSharingDecisionResponse:
        await uow.tx.insert(consents, {"child_id": CHILD, "by": "sw.one"})
        return pb.RecordSharingDecisionResponse(decision=pb.SharingDecision(child_id=CHILD))

    once = Once("consent", "k-4", pb.RecordSharingDecisionRequest(child_id=CHILD), pb.RecordSharingDecisionResponse)
    with pytest.raises(RuntimeError, match="seals_under"):
        await rig.units.run(careless, caller=None, once=once)
    assert await rows(rig.db, consents) == 0  # nothing of it stays


async def test_inserts_in_a_savepoint_that_fails_are_gone_and_the_rest_commits(rig: Rig) -> None:
    """On PostgreSQL inserts wait to go together; one made inside a savepoint that rolls back must
    not be sent later with the transaction's other inserts."""
    other = "1c8f7e6d-4e9b-4d2f-8a3b-7c6e5d4b3a21"

    async def work(uow: UnitOfWork) -> None:
        await uow.tx.insert(consents, {"child_id": CHILD, "by": "kept"})
        with pytest.raises(ValueError):
            async with uow.tx.savepoint():
                await uow.tx.insert(consents, {"child_id": other, "by": "rolled back"})
                raise ValueError("undo")

    await rig.units.run(work, caller=None)
    async with rig.db.session() as s:
        assert (await s.execute(select(consents.c.child_id, consents.c.by))).all() == [(CHILD, "kept")]


async def test_a_key_taken_inside_a_savepoint_surfaces_there(rig: Rig) -> None:
    """A data key race relies on it: the IntegrityError of an insert is caught at its savepoint."""
    await rig.units.run(lambda uow: uow.tx.insert(consents, {"child_id": CHILD, "by": "first"}), caller=None)
    caught: list[str] = []

    async def work(uow: UnitOfWork) -> None:
        try:
            async with uow.tx.savepoint():
                await uow.tx.insert(consents, {"child_id": CHILD, "by": "second"})
        except IntegrityError:
            caught.append("taken")

    await rig.units.run(work, caller=None)
    assert caught == ["taken"]


@pytest.mark.skipif(not POSTGRES_URL, reason="needs CSX_TEST_POSTGRES_URL (a PostgreSQL connection to kill)")
async def test_a_connection_lost_while_pooled_costs_a_use_case_nothing(tmp_path: Path) -> None:
    """No pre-ping: a pooled connection whose server side died (a restart, a failover) fails its
    first statement; the unit of work runs once more on a new connection, and nothing is doubled."""
    factory = DatabaseFactory("postgres", tmp_path)
    try:
        url = await factory.new("lost")
        db = Database(url)
        await db.run_sync(metadata.create_all)
        units = UnitsOfWork(db)
        await units.run(lambda uow: uow.tx.scalar(select(1)), caller=None)  # a connection in the pool
        name = make_url(url).database
        await _admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        await units.run(lambda uow: uow.tx.insert(consents, {"child_id": CHILD, "by": "after"}), caller=None)
        assert await rows(db, consents) == 1
        await db.dispose()
    finally:
        await factory.cleanup()


async def test_many_rows_inserted_together_all_arrive(rig: Rig) -> None:
    """PostgreSQL sends a transaction's inserts as one statement, split past its parameter limit
    (65,535): 20,000 rows of two columns are 40,000 parameters."""
    rows = [{"child_id": f"{i:036d}", "by": "bulk"} for i in range(20_000)]

    async def work(uow: UnitOfWork) -> None:
        await uow.tx.insert(consents, rows)
        await uow.tx.insert(consents, {"child_id": CHILD, "by": "one more"})

    await rig.units.run(work, caller=None)
    assert await rows_in(rig.db) == 20_001


async def rows_in(db: Database) -> int:
    return await rows(db, consents)


async def test_rows_inserted_together_must_give_the_same_columns(rig: Rig) -> None:
    async def work(uow: UnitOfWork) -> None:
        await uow.tx.insert(consents, [{"child_id": CHILD, "by": "a"}, {"child_id": "x" * 36}])

    with pytest.raises(ValueError, match="same columns"):
        await rig.units.run(work, caller=None)
    assert await rows(rig.db, consents) == 0
