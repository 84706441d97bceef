"""A rig around one audit chain in a fresh database, tampering helpers, and the append benchmark."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, text

from csx_common.audit import (
    AuditEntry,
    AuditLog,
    AuditSigner,
    AuditTables,
    VerifyReport,
    audit_tables,
    entry_hash,
)
from csx_common.db import Database

metadata = MetaData()
tables: AuditTables = audit_tables(metadata)

CHILDREN = ("chd-aaaa", "chd-bbbb")


def entry(i: int = 0, **overrides: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "actor_user_id": f"usr-police-{i % 3}",
        "actor_agency": 1 + i % 3,
        "actor_role": "investigator",
        "purpose": "safeguarding",
        "action": "read",
        "decision": "allow" if i % 4 else "deny",
        "rule_id": f"rule-{i % 5}",
        "lawful_basis": "consent" if i % 2 else "dpa2018-sch1-para18",
        "record_type": "referral",
        "record_id": f"ref-{i:04d}",
        "child_id": CHILDREN[i % 2],
        "field_names": ["child.date_of_birth", "concern.narrative", f"actions[{i % 3}].description"],
    }
    values.update(overrides)
    return AuditEntry(**values)


@dataclass
class Rig:
    db: Database
    audit: AuditLog
    signer: AuditSigner

    @property
    def dialect(self) -> str:
        return "postgresql" if self.db.is_postgres else "sqlite"

    async def append(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            async with self.db.transaction() as s:
                await self.audit.append(s, entry(i))

    async def checkpoint(self, signer: AuditSigner | None = None) -> Any:
        async with self.db.transaction() as s:
            return await self.audit.checkpoint(s, signer or self.signer)

    async def verify(self, keys: Any = None, **kw: Any) -> VerifyReport:
        async with self.db.session() as s:
            return await self.audit.verify(s, self.signer.public_key if keys is None else keys, **kw)

    async def sql(self, statement: str, **params: Any) -> Any:
        async with self.db.transaction() as s:
            result = await s.execute(text(statement), params)
            return result.all() if result.returns_rows else None

    async def unguard(self) -> None:
        """What someone with direct database access does first: drop the append-only triggers."""
        names = ["append_only", "no_truncate"] if self.dialect == "postgresql" else ["no_update", "no_delete"]
        for table in ("audit_log", "audit_checkpoints"):
            for name in names:
                on = f" ON {table}" if self.dialect == "postgresql" else ""
                await self.sql(f"DROP TRIGGER IF EXISTS {table}_{name}{on}")

    async def rehash_from(self, seq: int) -> None:
        """Recompute every hash from `seq` on and move the head: a careful forger's rewrite."""
        async with self.db.transaction() as s:
            prev = (await s.execute(text("SELECT hash FROM audit_log WHERE seq = :s"), {"s": seq - 1})).scalar_one()
            last_seq = 0
            for record in await self.audit.records(s, after=seq - 1):
                values = asdict(record)
                values["prev_hash"] = prev
                new_hash = entry_hash(values)
                await s.execute(
                    text("UPDATE audit_log SET prev_hash = :p, hash = :h WHERE seq = :s"),
                    {"p": prev, "h": new_hash, "s": record.seq},
                )
                prev, last_seq = new_hash, record.seq
            await s.execute(text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": last_seq, "h": prev})


async def make_rig(databases: Any, tmp_path: Path, name: str = "audit") -> Rig:
    db = Database(await databases.new(name))
    await db.run_sync(metadata.create_all)
    return Rig(db, AuditLog(tables), AuditSigner.load_or_create(tmp_path / "audit-signing.key"))


async def appends_per_second(db: Database, audit: AuditLog, n: int, concurrency: int) -> float:
    """`n` appends, each in its own transaction, `concurrency` at a time."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore, db.transaction() as s:
            await audit.append(s, entry(i))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - started)


async def benchmark(db: Database, audit: AuditLog, signer: AuditSigner, n: int = 400) -> dict[str, float]:
    """Micro-benchmark of the audit beside a baseline: a transaction that writes one plain row.

    - baseline_tx_per_s: transactions/s, each inserting one ordinary row (the commit's cost)
    - append_tx_per_s: transactions/s, each appending one audit entry
    - append_tx_per_s_20: the same with 20 transactions at once
    - append_us_in_tx: microseconds one append adds inside a transaction (many per transaction)
    - verify_entries_per_s: entries verified per second
    """
    plain_md = MetaData()
    plain = Table("bench_plain", plain_md, Column("id", Integer, primary_key=True), Column("v", String(64)))
    await db.run_sync(plain_md.create_all)
    started = time.perf_counter()
    for i in range(n):
        async with db.transaction() as s:
            await s.execute(plain.insert(), {"id": i, "v": "x"})
    out = {"baseline_tx_per_s": n / (time.perf_counter() - started)}
    out["append_tx_per_s"] = await appends_per_second(db, audit, n, concurrency=1)
    out["append_tx_per_s_20"] = await appends_per_second(db, audit, n, concurrency=20)
    entries = [entry(i) for i in range(n)]
    async with db.transaction() as s:
        started = time.perf_counter()
        for e in entries:
            await audit.append(s, e)
        out["append_us_in_tx"] = (time.perf_counter() - started) / n * 1e6
    async with db.transaction() as s:
        await audit.checkpoint(s, signer)
    async with db.session() as s:
        report = await audit.verify(s, signer.public_key)
    assert report.ok and report.entries == 3 * n, report
    out["verify_entries_per_s"] = report.entries / report.seconds
    return out
