"""SQLite's one writer and its group commit (csx_common.db): batches, isolation of failures, the
failed COMMIT, reads beside the writer, and a kill -9 in the middle of group commits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import JSON, Column, DateTime, Integer, LargeBinary, MetaData, String, Table, func, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from csx_common import db as dbmod
from csx_common.db import CommitFailed, Database

metadata = MetaData()
rows = Table("rows", metadata, Column("id", Integer, primary_key=True), Column("note", String(20)))


@pytest.fixture
async def db(tmp_path: Path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    await database.run_sync(metadata.create_all)
    yield database
    await database.dispose()


async def count(db: Database) -> int:
    async with db.session() as s:
        return int((await s.execute(select(func.count()).select_from(rows))).scalar_one())


async def ids(db: Database) -> set[int]:
    async with db.session() as s:
        return set((await s.execute(select(rows.c.id))).scalars())


async def test_concurrent_transactions_share_commits_and_are_visible_when_acknowledged(db: Database) -> None:
    seen_at_ack: list[bool] = []

    async def one(i: int) -> None:
        async with db.transaction() as tx:
            await tx.execute(insert(rows).values(id=i, note="x"))
        # Acknowledged: a reader on its own connection must already see it (committed).
        seen_at_ack.append(i in await ids(db))

    before = db.commits
    await asyncio.gather(*(one(i) for i in range(200)))
    assert all(seen_at_ack) and len(seen_at_ack) == 200
    assert await count(db) == 200
    commits = db.commits - before
    assert 1 <= commits < 100, commits  # grouped: far fewer COMMITs (fsyncs) than transactions


async def test_a_failing_transaction_rolls_back_alone(db: Database) -> None:
    class Refused(Exception):
        pass

    async def one(i: int) -> None:
        async with db.transaction() as tx:
            await tx.execute(insert(rows).values(id=i, note="x"))
            if i % 3 == 0:
                raise Refused

    results = await asyncio.gather(*(one(i) for i in range(60)), return_exceptions=True)
    failed = {i for i, r in enumerate(results) if isinstance(r, Refused)}
    assert failed == {i for i in range(60) if i % 3 == 0}
    assert await ids(db) == set(range(60)) - failed


async def test_a_savepoint_inside_a_transaction_rolls_back_alone(db: Database) -> None:
    async with db.transaction() as tx:
        await tx.execute(insert(rows).values(id=1, note="kept"))
        with pytest.raises(ValueError):
            async with tx.savepoint():
                await tx.execute(insert(rows).values(id=2, note="undone"))
                raise ValueError
    assert await ids(db) == {1}


async def test_a_failed_commit_fails_its_whole_batch_and_the_writer_carries_on(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = dbmod._commit
    failures = iter([True])

    def flaky(raw) -> None:  # type: ignore[no-untyped-def]
        if next(failures, False):
            raise OSError("disk I/O error")
        real(raw)

    monkeypatch.setattr(dbmod, "_commit", flaky)

    async def one(i: int) -> None:
        async with db.transaction() as tx:
            await tx.execute(insert(rows).values(id=i, note="x"))

    results = await asyncio.gather(*(one(i) for i in range(40)), return_exceptions=True)
    failed = {i for i, r in enumerate(results) if isinstance(r, CommitFailed)}
    assert failed, "the first batch's COMMIT failed"
    assert all(r is None or isinstance(r, CommitFailed) for r in results)
    assert await ids(db) == set(range(40)) - failed  # none of the failed batch stored, the rest all
    await one(1000)
    assert 1000 in await ids(db)


async def test_after_commit_callbacks_run_once_after_the_commit_and_never_after_a_rollback(db: Database) -> None:
    calls: list[str] = []

    def wake() -> None:
        calls.append("wake")

    async with db.transaction() as tx:
        tx.after_commit(wake)
        tx.after_commit(wake)
        await tx.execute(insert(rows).values(id=1, note="x"))
        assert calls == []
    assert calls == ["wake"]
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            tx.after_commit(wake)
            raise RuntimeError
    assert calls == ["wake"]


async def test_reads_run_beside_an_open_write_and_cannot_write(db: Database) -> None:
    async with db.transaction() as tx:
        await tx.execute(insert(rows).values(id=1, note="x"))
        # The writer is held and its change uncommitted: a reader sees the last committed snapshot.
        assert await count(db) == 0
    assert await count(db) == 1
    with pytest.raises(OperationalError):
        async with db.session() as s:
            await s.execute(insert(rows).values(id=2, note="x"))


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from sqlalchemy import Column, Integer, MetaData, String, Table, insert
    from csx_common.db import Database

    metadata = MetaData()
    rows = Table("rows", metadata, Column("id", Integer, primary_key=True), Column("note", String(20)))

    async def main(url):
        db = Database(url)
        await db.run_sync(metadata.create_all)
        print("ready", flush=True)
        counter = iter(range(10**9))

        async def worker():
            while True:
                i = next(counter)
                async with db.transaction() as tx:
                    await tx.execute(insert(rows).values(id=i, note="x" * 20))
                sys.stdout.write(f"{i}\\n")
                sys.stdout.flush()

        await asyncio.gather(*(worker() for _ in range(32)))

    asyncio.run(main(sys.argv[1]))
    """
)


def write_until_killed(url: str, kill_after: int) -> set[int]:
    """Run WRITER, SIGKILL it once `kill_after` writes are acknowledged; the acknowledged ids."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    acknowledged: set[int] = set()
    try:
        for line in proc.stdout:
            acknowledged.add(int(line))
            if len(acknowledged) >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)  # mid-stream: batches are running and committing
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return acknowledged


@pytest.mark.parametrize("kill_after", [150, 700])
async def test_kill_9_during_group_commits_loses_no_acknowledged_transaction(tmp_path: Path, kill_after: int) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"
    acknowledged = await asyncio.to_thread(write_until_killed, url, kill_after)
    db = Database(url)
    try:
        stored = await ids(db)
    finally:
        await db.dispose()
    assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged rows lost"
    assert len(stored) >= kill_after


typed = Table(
    "typed",
    metadata,
    Column("id", String(20), primary_key=True),
    Column("at", DateTime(timezone=True)),
    Column("doc", JSON),
    Column("blob", LargeBinary),
)


async def test_tx_insert_stores_values_as_sqlalchemy_would_and_reports_a_taken_key_without_them(
    db: Database,
) -> None:
    at = datetime(2026, 12, 3, 10, 30, 1, 123456, tzinfo=UTC)
    async with db.transaction() as tx:
        await tx.insert(typed, {"id": "a", "at": at, "doc": {"k": ["v"]}, "blob": b"\x00\x01"})
        await tx.insert(
            typed, [{"id": "b", "at": at, "doc": None, "blob": None}, {"id": "c", "at": at, "doc": 1, "blob": b""}]
        )
        await tx.execute(insert(typed).values(id="d", at=at, doc={"k": ["v"]}, blob=b"\x00\x01"))  # the slow way
    async with db.session() as s:
        got = {r.id: r for r in (await s.execute(select(typed))).all()}
        raw = {r[0]: r[1:] for r in (await s.execute(text("SELECT id, at, doc FROM typed"))).all()}
    assert got["a"].at.replace(tzinfo=UTC) == at and got["a"].doc == {"k": ["v"]} and got["a"].blob == b"\x00\x01"
    assert got["c"].doc == 1 and got["b"].blob is None
    assert raw["a"] == raw["d"]  # byte for byte what SQLAlchemy itself stores
    with pytest.raises(IntegrityError) as err:
        async with db.transaction() as tx:
            await tx.insert(typed, {"id": "a", "at": at, "doc": {"secret": "CANARY-VALUE"}, "blob": None})
    assert "CANARY" not in str(err.value)
