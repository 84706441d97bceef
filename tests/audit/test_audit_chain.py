"""The audit chain on SQLite and (with CSX_TEST_POSTGRES_URL) PostgreSQL: appends, verification,
and every way of tampering with it that verification must catch."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.exc import DBAPIError

from csx_common.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditEntryError,
    AuditLog,
    AuditSigner,
    audit_tables,
    checkpoint_message,
    load_public_key,
    run_checkpoints,
)
from tests.audit.support import CHILDREN, Rig, entry, make_rig, tables

N = 10


@pytest.fixture
async def rig(databases, tmp_path: Path) -> AsyncIterator[Rig]:  # type: ignore[no-untyped-def]
    rig = await make_rig(databases, tmp_path)
    yield rig
    await rig.db.dispose()


# --------------------------------------------------------------------------------------------
# Appending and verifying an intact chain
# --------------------------------------------------------------------------------------------


async def test_empty_chain_verifies(rig: Rig) -> None:
    report = await rig.verify()
    assert report.ok and report.entries == 0 and report.checkpoints == 0
    assert await rig.checkpoint() is None


async def test_append_and_verify(rig: Rig) -> None:
    async with rig.db.transaction() as s:
        first = await rig.audit.append(s, entry(0))
    assert first.seq == 1 and first.prev_hash == GENESIS_HASH
    await rig.append(N - 1, start=1)
    cp = await rig.checkpoint()
    assert cp.seq == N
    report = await rig.verify()
    assert report.ok, report
    assert (report.entries, report.checkpoints, report.last_checkpoint_seq, report.head_seq) == (N, 1, N, N)
    assert report.unanchored == 0 and not report.warnings
    async with rig.db.session() as s:
        assert await rig.audit.head(s) == (N, (await rig.audit.records(s))[-1].hash)


async def test_small_batches_and_many_checkpoints(rig: Rig) -> None:
    for _ in range(4):
        await rig.append(3)
        await rig.checkpoint()
    await rig.append(2)
    report = await rig.verify(batch_size=2)
    assert report.ok, report
    assert (report.entries, report.checkpoints, report.last_checkpoint_seq, report.unanchored) == (
        14,
        4,
        12,
        2,
    )


async def test_checkpoint_twice_without_appends_is_the_same_checkpoint(rig: Rig) -> None:
    await rig.append(3)
    assert await rig.checkpoint() == await rig.checkpoint()
    async with rig.db.session() as s:
        assert (await s.execute(select(func.count()).select_from(tables.checkpoints))).scalar_one() == 1


async def test_no_checkpoint_is_a_warning_not_a_failure(rig: Rig) -> None:
    await rig.append(3)
    report = await rig.verify()
    assert report.ok and report.warnings and report.unanchored == 3


async def test_stored_values_round_trip_exactly(rig: Rig) -> None:
    """What is hashed is what comes back: microseconds and time zone survive both backends."""
    at = datetime(2025, 3, 9, 1, 30, 59, 123456, tzinfo=UTC)
    audit = AuditLog(tables, clock=lambda: at.astimezone(ZoneInfo("Europe/Paris")))
    async with rig.db.transaction() as s:
        written = await audit.append(s, entry(7))
    async with rig.db.session() as s:
        [read] = await audit.records(s)
    assert read == written and read.at == at
    assert (await rig.verify()).ok


async def test_rolled_back_append_leaves_no_gap(rig: Rig) -> None:
    await rig.append(2)
    with pytest.raises(RuntimeError):
        async with rig.db.transaction() as s:
            await rig.audit.append(s, entry(99))
            raise RuntimeError("the read failed after auditing")
    await rig.append(1, start=2)
    report = await rig.verify()
    assert report.ok and report.entries == 3


async def test_audit_failure_fails_the_callers_transaction(rig: Rig) -> None:
    """If the audit cannot be written, nothing else in the transaction is committed either."""
    side_md = MetaData()
    reads = Table("reads", side_md, Column("id", Integer, primary_key=True), Column("what", String(20)))
    await rig.db.run_sync(side_md.create_all)
    await rig.sql("DROP TABLE audit_log")
    with pytest.raises(DBAPIError):
        async with rig.db.transaction() as s:
            await s.execute(reads.insert().values(what="disclosed"))
            await rig.audit.append(s, entry(1))
    async with rig.db.session() as s:
        assert (await s.execute(select(func.count()).select_from(reads))).scalar_one() == 0


@pytest.mark.parametrize("statement", ["UPDATE audit_log SET purpose = 'x'", "DELETE FROM audit_log"])
async def test_audit_tables_refuse_update_and_delete(rig: Rig, statement: str) -> None:
    await rig.append(2)
    with pytest.raises(DBAPIError, match="append-only"):
        await rig.sql(statement)
    await rig.checkpoint()
    with pytest.raises(DBAPIError, match="append-only"):
        await rig.sql(statement.replace("audit_log", "audit_checkpoints").replace("purpose", "hash"))
    assert (await rig.verify()).ok


async def test_concurrent_appends_form_one_chain(rig: Rig) -> None:
    """50 transactions at once (some rolled back): one chain, seq 1..n with no gaps."""

    async def one(i: int) -> None:
        async with rig.db.transaction() as s:
            await rig.audit.append(s, entry(i))
            await asyncio.sleep(0)  # let others queue on the head while this one holds it
            if i % 10 == 9:
                raise LookupError("rolled back")

    results = await asyncio.gather(*(one(i) for i in range(50)), return_exceptions=True)
    assert all(r is None or isinstance(r, LookupError) for r in results), results
    await rig.checkpoint()
    report = await rig.verify()
    assert report.ok, report
    assert report.entries == 45 and report.head_seq == 45
    async with rig.db.session() as s:
        seqs = [r.seq for r in await rig.audit.records(s)]
    assert seqs == list(range(1, 46))


async def test_verify_beside_concurrent_appends_and_checkpoints(rig: Rig) -> None:
    await rig.append(20)
    await rig.checkpoint()
    stop = asyncio.Event()

    async def writer() -> None:
        i = 100
        while not stop.is_set():
            await rig.append(1, start=i)
            if i % 5 == 0:
                await rig.checkpoint()
            i += 1

    task = asyncio.create_task(writer())
    try:
        for _ in range(5):
            report = await rig.verify(batch_size=7)
            assert report.ok, report
    finally:
        stop.set()
        await task
    assert (await rig.verify()).ok


async def test_run_checkpoints_signs_periodically(rig: Rig) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_checkpoints(rig.db.transaction, rig.audit, rig.signer, every=0.02, stop=stop))
    await rig.append(3)
    for _ in range(200):
        if (await rig.verify()).last_checkpoint_seq == 3:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 2)
    report = await rig.verify()
    assert report.ok and report.last_checkpoint_seq == 3


# --------------------------------------------------------------------------------------------
# Tampering
# --------------------------------------------------------------------------------------------

# column -> SQL that changes its value (the same SQL on both backends unless a pair is given)
EDITS: dict[str, str | tuple[str, str]] = {
    "seq": "seq = seq + 1000",
    "at": ("at = datetime(at, '+1 second')", "at = at + interval '1 second'"),
    "actor_user_id": "actor_user_id = 'usr-mallory'",
    "actor_agency": "actor_agency = actor_agency + 1",
    "actor_role": "actor_role = actor_role || 'x'",
    "purpose": "purpose = 'curiosity'",
    "action": "action = 'write'",
    "record_type": "record_type = record_type || 'x'",
    "record_id": "record_id = record_id || 'x'",
    "child_id": "child_id = 'chd-zzzz'",
    "field_names": "field_names = '[\"child.address\"]'",
    "decision": "decision = CASE decision WHEN 'allow' THEN 'deny' ELSE 'allow' END",
    "rule_id": "rule_id = rule_id || 'x'",
    "lawful_basis": "lawful_basis = 'consent-x'",
    "prev_hash": "prev_hash = '" + "f" * 64 + "'",
    "hash": "hash = '" + "e" * 64 + "'",
}


def test_every_column_has_an_edit() -> None:
    assert set(EDITS) == set(tables.log.c.keys())


@pytest.mark.parametrize("column", list(EDITS))
async def test_editing_any_column_of_any_row_is_detected(rig: Rig, column: str) -> None:
    await rig.append(N)
    await rig.checkpoint()
    await rig.unguard()
    edit = EDITS[column]
    if isinstance(edit, tuple):
        edit = edit[0] if rig.dialect == "sqlite" else edit[1]
    for seq in (1, 2, N // 2, N - 1, N):
        [original] = await rig.sql(f"SELECT {column} FROM audit_log WHERE seq = :s", s=seq)
        await rig.sql(f"UPDATE audit_log SET {edit} WHERE seq = :s", s=seq)
        report = await rig.verify()
        assert not report.ok, (column, seq)
        assert report.broken_seq == seq, (column, seq, report)
        expected = "missing" if column == "seq" else "hash_mismatch"
        assert report.kind == expected, (column, seq, report)
        # put it back: the chain verifies again
        where = seq + 1000 if column == "seq" else seq
        value = json.dumps(original[0]) if isinstance(original[0], list) else original[0]
        await rig.sql(f"UPDATE audit_log SET {column} = :v WHERE seq = :s", v=value, s=where)
        assert (await rig.verify()).ok, (column, seq)


async def test_deleting_a_middle_row_is_detected(rig: Rig) -> None:
    await rig.append(N)
    await rig.unguard()
    await rig.sql("DELETE FROM audit_log WHERE seq = 5")
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind, report.entries) == (False, 5, "missing", 4)
    assert "entry 5 is missing" in (report.problem or "")


async def test_deleting_the_first_row_is_detected(rig: Rig) -> None:
    await rig.append(3)
    await rig.unguard()
    await rig.sql("DELETE FROM audit_log WHERE seq = 1")
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, 1, "missing")


async def test_deleting_the_last_rows_is_detected_by_the_head(rig: Rig) -> None:
    await rig.append(N)
    await rig.unguard()
    await rig.sql("DELETE FROM audit_log WHERE seq > 8")
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, 9, "truncated")


async def test_deleting_the_last_rows_and_moving_the_head_is_detected_by_the_checkpoint(rig: Rig) -> None:
    await rig.append(N)
    await rig.checkpoint()
    await rig.unguard()
    await rig.sql("DELETE FROM audit_log WHERE seq > 8")
    [(h8,)] = await rig.sql("SELECT hash FROM audit_log WHERE seq = 8")
    await rig.sql("UPDATE audit_head SET seq = 8, hash = :h", h=h8)
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, 9, "truncated")
    assert "checkpoint" in (report.problem or "")


async def test_reordering_rows_is_detected(rig: Rig) -> None:
    await rig.append(N)
    await rig.unguard()
    await rig.sql("UPDATE audit_log SET seq = -1 WHERE seq = 3")
    await rig.sql("UPDATE audit_log SET seq = 3 WHERE seq = 4")
    await rig.sql("UPDATE audit_log SET seq = 4 WHERE seq = -1")
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, 3, "hash_mismatch")


async def test_inserting_a_forged_row_is_detected(rig: Rig) -> None:
    await rig.append(N)
    [row] = await rig.sql("SELECT * FROM audit_log WHERE seq = 4")
    values = dict(row._mapping)
    await rig.unguard()
    await rig.sql("UPDATE audit_log SET seq = seq + 100 WHERE seq > 4")
    await rig.sql("UPDATE audit_log SET seq = seq - 99 WHERE seq > 100")  # make room at 5
    values["seq"] = 5
    if isinstance(values["field_names"], list):  # PostgreSQL's driver decodes JSON
        values["field_names"] = json.dumps(values["field_names"])
    columns = ", ".join(values)
    await rig.sql(f"INSERT INTO audit_log ({columns}) VALUES ({', '.join(':' + c for c in values)})", **values)
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, 5, "hash_mismatch")


async def test_rewriting_history_with_recomputed_hashes_is_detected_by_the_checkpoint(rig: Rig) -> None:
    await rig.append(N)
    await rig.checkpoint()
    await rig.unguard()
    await rig.sql("UPDATE audit_log SET actor_user_id = 'usr-someone-else' WHERE seq = 3")
    await rig.rehash_from(3)
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, N, "checkpoint_mismatch")


async def test_an_earlier_checkpoint_pins_the_rewrite_closer(rig: Rig) -> None:
    await rig.append(5)
    await rig.checkpoint()
    await rig.append(5, start=5)
    await rig.checkpoint()
    await rig.unguard()
    await rig.sql("UPDATE audit_log SET purpose = 'other' WHERE seq = 2")
    await rig.rehash_from(2)
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, 5, "checkpoint_mismatch")


async def test_forged_checkpoint_signature_is_detected(rig: Rig) -> None:
    await rig.append(N)
    await rig.checkpoint()
    await rig.unguard()
    forged = base64.b64encode(os.urandom(64)).decode()
    await rig.sql("UPDATE audit_checkpoints SET signature = :sig", sig=forged)
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, N, "bad_signature")


async def test_checkpoint_signed_by_another_key_is_detected(rig: Rig, tmp_path: Path) -> None:
    """A forger rewrites history, then re-signs the checkpoint with a key of their own."""
    await rig.append(N)
    await rig.checkpoint()
    await rig.unguard()
    await rig.sql("UPDATE audit_log SET decision = 'allow' WHERE seq = 4")
    await rig.rehash_from(4)
    await rig.sql("DELETE FROM audit_checkpoints")
    mallory = AuditSigner.generate()
    await rig.checkpoint(mallory)
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, N, "unknown_key")
    # ... or claims the real key's id for it
    [(seq, hash_, at)] = await rig.sql("SELECT seq, hash, at FROM audit_checkpoints")
    at_dt = datetime.fromisoformat(at) if isinstance(at, str) else at
    sig = mallory.sign(checkpoint_message(seq, hash_, at_dt, rig.signer.key_id))
    await rig.sql(
        "UPDATE audit_checkpoints SET key_id = :k, signature = :s",
        k=rig.signer.key_id,
        s=base64.b64encode(sig).decode(),
    )
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, N, "bad_signature")


async def test_edited_checkpoint_hash_is_detected(rig: Rig) -> None:
    await rig.append(N)
    await rig.checkpoint()
    await rig.unguard()
    await rig.sql("UPDATE audit_checkpoints SET hash = :h", h="d" * 64)
    report = await rig.verify()
    assert (report.ok, report.kind) == (False, "bad_signature")


async def test_rotated_keys(rig: Rig) -> None:
    await rig.append(3)
    await rig.checkpoint()
    new = AuditSigner.generate()
    await rig.append(3, start=3)
    await rig.checkpoint(new)
    assert (await rig.verify([rig.signer.public_key, new.public_key])).ok
    report = await rig.verify(new.public_key)
    assert (report.ok, report.broken_seq, report.kind) == (False, 3, "unknown_key")


async def test_a_missing_head_row_is_detected(rig: Rig) -> None:
    await rig.append(3)
    await rig.sql("DELETE FROM audit_head")
    report = await rig.verify()
    assert (report.ok, report.kind) == (False, "head_mismatch")


async def test_unreadable_values_are_reported_not_raised(rig: Rig) -> None:
    await rig.append(3)
    await rig.unguard()
    if rig.dialect != "sqlite":
        # PostgreSQL's column types refuse such values outright: nothing unreadable can be stored.
        with pytest.raises(Exception):  # noqa: B017
            await rig.sql("UPDATE audit_log SET at = 'not a date' WHERE seq = 2")
        with pytest.raises(Exception):  # noqa: B017
            await rig.sql("UPDATE audit_log SET field_names = '{not json' WHERE seq = 2")
        assert (await rig.verify()).ok
        return
    await rig.sql("UPDATE audit_log SET at = 'yesterday' WHERE seq = 2")
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, 2, "unreadable")
    await rig.sql("UPDATE audit_log SET at = '2025-01-01 00:00:00', field_names = '{not json' WHERE seq = 2")
    report = await rig.verify()
    assert (report.ok, report.broken_seq, report.kind) == (False, 2, "unreadable")


# --------------------------------------------------------------------------------------------
# Field names, never values
# --------------------------------------------------------------------------------------------


def test_the_table_has_no_place_for_a_value() -> None:
    assert set(tables.log.c.keys()) == {
        "seq", "at", "actor_user_id", "actor_agency", "actor_role", "purpose", "action", "record_type",
        "record_id", "child_id", "field_names", "decision", "rule_id", "lawful_basis", "prev_hash", "hash",
    }  # fmt: skip


def test_an_entry_cannot_carry_a_value() -> None:
    with pytest.raises(TypeError):
        entry(1, value="Sam Example")
    with pytest.raises(TypeError):
        entry(1, values={"child.name": "Sam Example"})
    with pytest.raises(AttributeError):
        object.__setattr__(entry(1), "value", "Sam Example")  # slots: no room for one


@pytest.mark.parametrize(
    "names",
    [
        ["child.name=Sam Example"],
        ["child.name = Sam"],
        ["Sam Example"],
        ["child.nhs_number:9434765919"],
        ["child.name", "'Sam'"],
        [""],
        ["child..name"],
        ["9434765919"],
        ["child.name\n"],
        ["actions[x].description"],
        ["a" * 201],
        "child.name",  # one string, not a list of names
    ],
)
def test_append_rejects_anything_but_field_paths(names: object) -> None:
    with pytest.raises(AuditEntryError) as info:
        entry(1, field_names=names)
    assert "Sam" not in str(info.value) and "9434765919" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"action": "peek"}, "action"),
        ({"decision": "maybe"}, "decision"),
        ({"actor_user_id": ""}, "actor_user_id"),
        ({"actor_agency": True}, "actor_agency"),
        ({"actor_agency": "1"}, "actor_agency"),
        ({"purpose": "x" * 65}, "purpose"),
        ({"rule_id": "r\x00"}, "rule_id"),
    ],
)
def test_entry_validation(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(AuditEntryError, match=problem):
        entry(1, **overrides)


async def test_append_takes_only_entries(rig: Rig) -> None:
    async with rig.db.transaction() as s:
        with pytest.raises(TypeError):
            await rig.audit.append(s, {"actor_user_id": "u", "value": "Sam"})  # type: ignore[arg-type]


async def test_field_names_stored_sorted_and_unique(rig: Rig) -> None:
    names = ["referrer.email", "child.date_of_birth", "actions[2].description", "child.date_of_birth"]
    async with rig.db.transaction() as s:
        await rig.audit.append(s, entry(1, field_names=names))
    async with rig.db.session() as s:
        [record] = await rig.audit.records(s)
    assert record.field_names == ["actions[2].description", "child.date_of_birth", "referrer.email"]


# --------------------------------------------------------------------------------------------
# Child history
# --------------------------------------------------------------------------------------------


async def test_child_history(rig: Rig) -> None:
    await rig.append(N)
    async with rig.db.transaction() as s:
        await rig.audit.append(
            s,
            AuditEntry(
                actor_user_id="usr-health-7",
                actor_agency=2,
                actor_role="school nurse",
                purpose="safeguarding",
                action="break_glass_start",
                decision="allow",
                rule_id="break-glass",
                child_id=CHILDREN[0],
            ),
        )
    async with rig.db.session() as s:
        history = await rig.audit.child_history(s, CHILDREN[0])
        other = await rig.audit.child_history(s, CHILDREN[1])
        none = await rig.audit.child_history(s, "chd-unknown")
        limited = await rig.audit.child_history(s, CHILDREN[0], limit=2)
    assert [r.seq for r in history] == [1, 3, 5, 7, 9, 11]
    assert [r.seq for r in other] == [2, 4, 6, 8, 10]
    assert none == [] and [r.seq for r in limited] == [1, 3]
    first = history[0]
    assert (first.actor_user_id, first.actor_agency, first.purpose, first.decision) == (
        "usr-police-0",
        1,
        "safeguarding",
        "deny",
    )
    assert first.field_names == ["actions[0].description", "child.date_of_birth", "concern.narrative"]
    assert history[-1].action == "break_glass_start" and history[-1].field_names == []
    assert history[0].at <= history[-1].at <= datetime.now(UTC) + timedelta(seconds=1)


# --------------------------------------------------------------------------------------------
# The signing key
# --------------------------------------------------------------------------------------------


def test_signer_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.key"
    signer = AuditSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = AuditSigner.load_or_create(path)
    assert again.key_id == signer.key_id
    public = load_public_key(AuditSigner.public_path(path))
    signature = signer.sign(b"m")
    public.verify(signature, b"m")
    with pytest.raises(ValueError):
        load_public_key(path)  # the private key file is not a public key


def test_tables_on_another_metadata_are_independent() -> None:
    other = audit_tables(MetaData())
    assert other.log is not tables.log and other.log.name == "audit_log"


async def test_entries_appended_together_chain_like_single_appends(rig: Rig) -> None:
    from csx_common.audit import AuditEntry

    await rig.append(2)
    entries = [
        AuditEntry(
            actor_user_id="u.batch",
            actor_agency=1,
            actor_role="police_officer",
            purpose="action_delivery",
            action=action,
            decision=decision,
            rule_id="rule",
            field_names=("narrative",),
        )
        for action, decision in (("read", "allow"), ("deny", "deny"))
    ]
    async with rig.db.transaction() as s:
        records = await rig.audit.append_many(s, entries)
    assert [r.seq for r in records] == [3, 4]
    assert records[1].prev_hash == records[0].hash
    await rig.append(1, start=5)
    assert (await rig.verify()).ok
