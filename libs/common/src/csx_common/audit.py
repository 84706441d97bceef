"""Tamper-evident audit: an append-only, hash-chained log of every disclosure decision.

Each service keeps its own chain in its own database (`audit_tables(metadata)`):

- `audit_log`: one row per decision — who (user, agency, role), why (purpose), what (action, record
  type and id, pseudonymous child id, the *names* of the fields — never their values), the decision
  with the rule that made it and the lawful basis, and `prev_hash`/`hash`. `hash` is SHA-256 over a
  canonical JSON encoding of the row's contents *including its seq and prev_hash*, so an edited row
  fails its own hash, a deleted row leaves a gap in seq, and a reordered row fails both.
- `audit_head`: one row (`id = 1`) holding the latest seq and hash. An append locks it
  (`SELECT ... FOR UPDATE` on PostgreSQL; SQLite's single writer already serialises), so appends
  from concurrent transactions form one chain with no gaps: seq is assigned from the head, never
  from a database sequence (a rolled-back sequence value would look like a deleted row).
- `audit_checkpoints`: the head's (seq, hash) signed with Ed25519 (`AuditSigner`) every so often. A
  signed checkpoint pins everything before it: truncating the tail, or rewriting history and
  recomputing every hash, no longer matches what the key (which the database does not hold) signed.

`AuditLog.append(session, entry)` writes inside the caller's transaction: if the audit cannot be
written the transaction fails, and with it the read it was auditing. Call it as the last statement
before commit — on PostgreSQL the head row stays locked until the transaction ends.

`AuditLog.verify(session, public_keys)` walks the chain from seq 1 in batches and reports the first
broken entry; `AuditLog.child_history(session, child_id)` answers "who saw what about this child,
when and why". Both only read.

Both audit tables refuse UPDATE and DELETE through triggers (`append_only_statements`, also run by
`metadata.create_all`): defence in depth against mistakes; the hash chain is what catches someone
able to drop a trigger.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    event,
    func,
    select,
    type_coerce,
)

from csx_common.db import Tx

log = structlog.get_logger("csx.audit")

CHAIN_VERSION = 1
GENESIS_HASH = "0" * 64
HEAD_ID = 1

ACTIONS = frozenset(
    {
        "read",
        "write",
        "deny",
        "publish",
        "involve",
        "break_glass_start",
        "break_glass_end",
        "break_glass_review",
        "erase",
    }
)
DECISIONS = frozenset({"allow", "deny"})

# A field path as the sensitivity registry and Sealer name them: `referrer.email`,
# `actions[2].description`. Letters, digits and underscores, dots between, optional [index].
# Nothing that could carry a value: no '=', ':', spaces or quotes.
FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?)*")
MAX_FIELD_PATH = 200
MAX_FIELDS = 1000

# Column widths, shared by the table and the entry's validation.
WIDTHS = {
    "actor_user_id": 128,
    "actor_role": 64,
    "purpose": 64,
    "action": 32,
    "record_type": 64,
    "record_id": 128,
    "child_id": 64,
    "decision": 8,
    "rule_id": 128,
    "lawful_basis": 128,
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# The columns a row's hash covers, in the order of the canonical encoding (keys are sorted anyway;
# the list is explicit so that adding a column is a deliberate, versioned change).
HASHED = (
    "seq",
    "at",
    "actor_user_id",
    "actor_agency",
    "actor_role",
    "purpose",
    "action",
    "record_type",
    "record_id",
    "child_id",
    "field_names",
    "decision",
    "rule_id",
    "lawful_basis",
    "prev_hash",
)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditTables:
    log: Table
    head: Table
    checkpoints: Table


def audit_tables(metadata: MetaData) -> AuditTables:
    """The audit tables on a service's MetaData (and their append-only triggers for create_all)."""
    log_table = Table(
        "audit_log",
        metadata,
        # Assigned from audit_head under its lock, not by a sequence: contiguous by construction.
        Column("seq", BigInteger, primary_key=True, autoincrement=False),
        Column("at", DateTime(timezone=True), nullable=False),
        Column("actor_user_id", String(WIDTHS["actor_user_id"]), nullable=False),
        Column("actor_agency", Integer, nullable=False),
        Column("actor_role", String(WIDTHS["actor_role"]), nullable=False),
        Column("purpose", String(WIDTHS["purpose"]), nullable=False),
        Column("action", String(WIDTHS["action"]), nullable=False),
        Column("record_type", String(WIDTHS["record_type"]), nullable=False),
        Column("record_id", String(WIDTHS["record_id"]), nullable=False),
        Column("child_id", String(WIDTHS["child_id"]), nullable=False),
        # Field *paths* only (JSON list of strings). Never values.
        Column("field_names", JSON, nullable=False),
        Column("decision", String(WIDTHS["decision"]), nullable=False),
        Column("rule_id", String(WIDTHS["rule_id"]), nullable=False),
        Column("lawful_basis", String(WIDTHS["lawful_basis"]), nullable=False),
        Column("prev_hash", String(64), nullable=False),
        Column("hash", String(64), nullable=False),
        Index("ix_audit_log_child_seq", "child_id", "seq"),
    )
    head = Table(
        "audit_head",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("seq", BigInteger, nullable=False),
        Column("hash", String(64), nullable=False),
        CheckConstraint(f"id = {HEAD_ID}", name="ck_audit_head_single_row"),
    )
    checkpoints = Table(
        "audit_checkpoints",
        metadata,
        Column("seq", BigInteger, primary_key=True, autoincrement=False),
        Column("hash", String(64), nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
        # base64 of the 64-byte Ed25519 signature over `checkpoint_message(...)`.
        Column("signature", String(100), nullable=False),
        Column("key_id", String(32), nullable=False),
    )
    for table in (log_table, checkpoints):
        for dialect in ("postgresql", "sqlite"):
            for statement in append_only_statements(dialect, table.name):
                event.listen(table, "after_create", DDL(statement).execute_if(dialect=dialect))
    return AuditTables(log_table, head, checkpoints)


def append_only_statements(dialect: str, table: str) -> list[str]:
    """DDL making `table` refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL).

    For migrations: `for s in append_only_statements(op.get_bind().dialect.name, "audit_log"):
    op.execute(s)` (and the same for "audit_checkpoints").
    """
    if dialect == "postgresql":
        return [
            "CREATE OR REPLACE FUNCTION csx_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION USING MESSAGE = "
            "'audit tables are append-only: ' || TG_OP || ' on ' || TG_TABLE_NAME; END $$",
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION csx_audit_append_only()",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION csx_audit_append_only()",
        ]
    if dialect == "sqlite":
        return [
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END",
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END",
        ]
    return []


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


class AuditEntryError(ValueError):
    """An entry that must not be written (bad field path, unknown action, too long, ...)."""


def _text(name: str, value: object, *, required: bool) -> str:
    if not isinstance(value, str):
        raise AuditEntryError(f"{name} must be a string")
    if required and not value:
        raise AuditEntryError(f"{name} is required")
    if len(value) > WIDTHS[name]:
        raise AuditEntryError(f"{name} is longer than {WIDTHS[name]} characters")
    if _CONTROL.search(value):
        raise AuditEntryError(f"{name} contains control characters")
    return value


def normalise_field_names(names: Iterable[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated field paths; AuditEntryError for anything that is not a field path."""
    if isinstance(names, str | bytes):
        raise AuditEntryError("field_names must be a list of field paths, not one string")
    out = set()
    for name in names:
        if not isinstance(name, str) or len(name) > MAX_FIELD_PATH or not FIELD_PATH.fullmatch(name):
            # Never echo the offending text: it may be a value.
            raise AuditEntryError("field_names may hold only field paths (e.g. 'child.date_of_birth')")
        out.add(name)
    if len(out) > MAX_FIELDS:
        raise AuditEntryError(f"more than {MAX_FIELDS} field names")
    return tuple(sorted(out))


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One decision to audit. There is deliberately no place for a value: field *names* only."""

    actor_user_id: str
    actor_agency: int
    actor_role: str
    purpose: str
    action: str
    decision: str
    rule_id: str = ""
    lawful_basis: str = ""
    record_type: str = ""
    record_id: str = ""
    child_id: str = ""
    # Paths such as 'child.date_of_birth'; stored sorted and de-duplicated (as a tuple).
    field_names: Sequence[str] = ()

    def __post_init__(self) -> None:
        for name in ("actor_user_id", "actor_role", "purpose"):
            _text(name, getattr(self, name), required=True)
        for name in ("rule_id", "lawful_basis", "record_type", "record_id", "child_id"):
            _text(name, getattr(self, name), required=False)
        if isinstance(self.actor_agency, bool) or not isinstance(self.actor_agency, int):
            raise AuditEntryError("actor_agency must be an integer (csx.types.v1.Agency)")
        if not 0 <= self.actor_agency < 2**31:
            raise AuditEntryError("actor_agency out of range")
        if self.action not in ACTIONS:
            raise AuditEntryError(f"action must be one of {sorted(ACTIONS)}")
        if self.decision not in DECISIONS:
            raise AuditEntryError(f"decision must be one of {sorted(DECISIONS)}")
        object.__setattr__(self, "field_names", normalise_field_names(self.field_names))


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A stored entry as read back (not validated: it may have been tampered with)."""

    seq: int
    at: datetime
    actor_user_id: str
    actor_agency: int
    actor_role: str
    purpose: str
    action: str
    record_type: str
    record_id: str
    child_id: str
    field_names: list[str]
    decision: str
    rule_id: str
    lawful_basis: str
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["at"] = canonical_time(self.at)
        return out


def row_values(record: AuditRecord) -> dict[str, Any]:
    """The hashed columns of a record (cheaper than dataclasses.asdict, which deep-copies)."""
    return {name: getattr(record, name) for name in HASHED}


def canonical_time(at: datetime) -> str:
    """UTC with microseconds and a Z: the same text whatever the backend hands back."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # SQLite stores UTC without an offset
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _read_time(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError("not a timestamp")


def _read_json_list(value: object) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def canonical_bytes(values: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers: sorted-key compact JSON of the HASHED columns plus a version."""
    doc: dict[str, Any] = {"v": CHAIN_VERSION}
    for name in HASHED:
        value = values[name]
        doc[name] = canonical_time(value) if name == "at" else value
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_hash(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(values)).hexdigest()


# --------------------------------------------------------------------------------------------
# Signing
# --------------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def checkpoint_message(seq: int, head_hash: str, at: datetime, kid: str) -> bytes:
    return f"csx-audit-checkpoint:v{CHAIN_VERSION}|{seq}|{head_hash}|{canonical_time(at)}|{kid}".encode()


class AuditSigner:
    """An Ed25519 checkpoint-signing key. A PEM file in development (generated on first run), with
    the public key beside it as `<path>.pub` for `csx audit verify --public-key`."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def generate(cls) -> AuditSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> AuditSigner:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | Path) -> AuditSigner:
        path = Path(path)
        if path.exists():
            return cls.load(path)
        signer = cls.generate()
        signer.save(path)
        return signer

    @staticmethod
    def public_path(path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(path.name + ".pub")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        tmp.replace(path)
        self.public_path(path).write_bytes(self.public_pem())

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (the `.pub` written by AuditSigner.save)."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


# --------------------------------------------------------------------------------------------
# The log
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: str
    at: datetime
    signature: str
    key_id: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": canonical_time(self.at)}


@dataclass
class VerifyReport:
    ok: bool
    entries: int = 0  # entries whose hash and link were checked
    checkpoints: int = 0  # checkpoints whose signature and hash were checked
    head_seq: int = 0
    last_checkpoint_seq: int = 0
    # The first broken entry, if any: its seq, a short code and what is wrong.
    broken_seq: int | None = None
    kind: str | None = None
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unanchored(self) -> int:
        """Entries after the latest signed checkpoint (their truncation would go unnoticed)."""
        return max(0, self.entries - self.last_checkpoint_seq)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "unanchored": self.unanchored}


class _Broken(Exception):
    def __init__(self, seq: int, kind: str, problem: str) -> None:
        super().__init__(problem)
        self.seq, self.kind, self.problem = seq, kind, problem


def _utcnow() -> datetime:
    return datetime.now(UTC)


PublicKeys = Ed25519PublicKey | Iterable[Ed25519PublicKey] | Mapping[str, Ed25519PublicKey]


def _key_map(keys: PublicKeys) -> dict[str, Ed25519PublicKey]:
    if isinstance(keys, Ed25519PublicKey):
        return {key_id(keys): keys}
    if isinstance(keys, Mapping):
        return dict(keys)
    return {key_id(k): k for k in keys}


class AuditLog:
    def __init__(self, tables: AuditTables, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.tables = tables
        self._clock = clock
        t = tables.log
        # `at` and `field_names` are read without SQLAlchemy's conversion so that a tampered value
        # is reported as a broken entry rather than raising while fetching.
        self._row_columns = [
            c if c.name not in ("at", "field_names") else type_coerce(c, String).label(c.name) for c in t.c
        ]
        # Built once: appends are hot, and a statement rebuilt per call costs more than its round trip.
        head = tables.head
        self._lock_query = select(head.c.seq, head.c.hash).where(head.c.id == HEAD_ID).with_for_update()
        self._move_head = (
            head.update().where(head.c.id == HEAD_ID).values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
        )

    # ---- writing -----------------------------------------------------------------------------

    async def _lock_head(self, session: Tx) -> tuple[int, str]:
        row = (await session.execute(self._lock_query)).first()
        if row is None:
            head = self.tables.head
            await session.execute(self._insert_ignore(session, head, id=HEAD_ID, seq=0, hash=GENESIS_HASH))
            row = (await session.execute(self._lock_query)).one()
        return int(row.seq), str(row.hash)

    @staticmethod
    def _insert_ignore(session: Tx, table: Table, **values: Any) -> Any:
        dialect = session.dialect
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).values(**values).on_conflict_do_nothing()
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table).values(**values).on_conflict_do_nothing()
        return table.insert().values(**values)

    async def append(self, session: Tx, entry: AuditEntry) -> AuditRecord:
        """Append `entry` in the caller's transaction; it commits or rolls back with it."""
        [record] = await self.append_many(session, [entry])
        return record

    async def append_many(self, session: Tx, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Append several entries (e.g. the allow and deny groups of one read) in one round: the head
        is locked and moved once and the rows go in as one multi-row insert."""
        if not entries:
            return []
        if not all(isinstance(e, AuditEntry) for e in entries):
            raise TypeError("append takes AuditEntry values")
        seq, prev_hash = await self._lock_head(session)
        at = self._clock().astimezone(UTC)
        records = []
        for entry in entries:
            seq += 1
            values: dict[str, Any] = {
                "seq": seq,
                "at": at,
                "actor_user_id": entry.actor_user_id,
                "actor_agency": entry.actor_agency,
                "actor_role": entry.actor_role,
                "purpose": entry.purpose,
                "action": entry.action,
                "record_type": entry.record_type,
                "record_id": entry.record_id,
                "child_id": entry.child_id,
                "field_names": list(entry.field_names),
                "decision": entry.decision,
                "rule_id": entry.rule_id,
                "lawful_basis": entry.lawful_basis,
                "prev_hash": prev_hash,
            }
            values["hash"] = prev_hash = entry_hash(values)
            records.append(values)
        await session.insert(self.tables.log, records)
        await session.execute(self._move_head, {"new_seq": seq, "new_hash": prev_hash})
        return [AuditRecord(**values) for values in records]

    async def head(self, session: Tx) -> tuple[int, str]:
        """(seq, hash) of the latest committed entry; (0, GENESIS_HASH) for an empty chain."""
        head = self.tables.head
        row = (await session.execute(select(head.c.seq, head.c.hash).where(head.c.id == HEAD_ID))).first()
        return (0, GENESIS_HASH) if row is None else (int(row.seq), str(row.hash))

    async def checkpoint(self, session: Tx, signer: AuditSigner) -> Checkpoint | None:
        """Sign the current head and store it; the existing checkpoint if nothing was appended since;
        None for an empty chain. Log or publish the result too: a copy outside the database is what
        catches someone who deletes checkpoints along with the tail."""
        seq, head_hash = await self._lock_head(session)
        if seq == 0:
            return None
        cps = self.tables.checkpoints
        existing = (await session.execute(select(cps).where(cps.c.seq == seq))).first()
        if existing is not None:
            return Checkpoint(
                int(existing.seq), existing.hash, _read_time(existing.at), existing.signature, existing.key_id
            )
        at = self._clock().astimezone(UTC)
        signature = base64.b64encode(signer.sign(checkpoint_message(seq, head_hash, at, signer.key_id))).decode()
        cp = Checkpoint(seq, head_hash, at, signature, signer.key_id)
        await session.execute(cps.insert().values(**asdict(cp)))
        return cp

    # ---- reading -----------------------------------------------------------------------------

    def _record(self, row: Any) -> AuditRecord:
        values = dict(row._mapping)
        values["at"] = _read_time(values["at"])
        values["field_names"] = _read_json_list(values["field_names"])
        return AuditRecord(**values)

    async def _rows(self, session: Tx, batch_size: int) -> AsyncIterator[Any]:
        t = self.tables.log
        last: int | None = None
        while True:
            query = select(*self._row_columns).order_by(t.c.seq).limit(batch_size)
            if last is not None:
                query = query.where(t.c.seq > last)
            rows = (await session.execute(query)).all()
            for row in rows:
                yield row
            if len(rows) < batch_size:
                return
            last = rows[-1].seq

    async def _checkpoints(self, session: Tx, upto: int, batch_size: int) -> AsyncIterator[Any]:
        cps = self.tables.checkpoints
        cols = [c if c.name != "at" else type_coerce(c, String).label("at") for c in cps.c]
        last: int | None = None
        while True:
            query = select(*cols).where(cps.c.seq <= upto).order_by(cps.c.seq).limit(batch_size)
            if last is not None:
                query = query.where(cps.c.seq > last)
            rows = (await session.execute(query)).all()
            for row in rows:
                yield row
            if len(rows) < batch_size:
                return
            last = rows[-1].seq

    async def records(self, session: Tx, *, after: int = 0, limit: int | None = None) -> list[AuditRecord]:
        """Entries with seq > `after`, in order (an export, or a page of one)."""
        t = self.tables.log
        query = select(*self._row_columns).where(t.c.seq > after).order_by(t.c.seq)
        if limit is not None:
            query = query.limit(limit)
        return [self._record(row) for row in (await session.execute(query)).all()]

    async def child_history(self, session: Tx, child_id: str, *, limit: int | None = None) -> list[AuditRecord]:
        """Every entry about this child, oldest first: who saw (or was refused) what, when and why."""
        t = self.tables.log
        query = select(*self._row_columns).where(t.c.child_id == child_id).order_by(t.c.seq)
        if limit is not None:
            query = query.limit(limit)
        return [self._record(row) for row in (await session.execute(query)).all()]

    # ---- verifying ---------------------------------------------------------------------------

    async def verify(self, session: Tx, public_keys: PublicKeys, *, batch_size: int = 2000) -> VerifyReport:
        """Walk the chain from seq 1: each hash recomputed, each link and seq checked, each
        checkpoint's signature checked and its hash compared with the entry it signed, the tail
        compared with the head row and the latest checkpoint. Reports the first broken entry.

        Safe beside concurrent appends: the head and the latest checkpoint are read first, and
        entries only ever grow, so everything they vouch for must be there when walked.
        """
        started = time.perf_counter()
        keys = _key_map(public_keys)
        head_row = (
            await session.execute(
                select(self.tables.head.c.seq, self.tables.head.c.hash).where(self.tables.head.c.id == HEAD_ID)
            )
        ).first()
        head_seq, head_hash = (0, GENESIS_HASH) if head_row is None else (int(head_row.seq), head_row.hash)
        latest_cp = select(func.coalesce(func.max(self.tables.checkpoints.c.seq), 0))
        cp_max = int((await session.execute(latest_cp)).scalar_one())
        report = VerifyReport(ok=True, head_seq=head_seq)
        try:
            await self._walk(session, keys, report, head_seq, head_hash, head_row is None, cp_max, batch_size)
        except _Broken as broken:
            report.ok = False
            report.broken_seq, report.kind, report.problem = broken.seq, broken.kind, broken.problem
        if report.ok and report.checkpoints == 0 and report.entries:
            report.warnings.append("no signed checkpoint: a truncated tail would go unnoticed")
        report.seconds = time.perf_counter() - started
        return report

    def _check_checkpoint(self, cp: Any, keys: Mapping[str, Ed25519PublicKey]) -> None:
        seq = int(cp.seq)
        key = keys.get(cp.key_id)
        if key is None:
            raise _Broken(seq, "unknown_key", f"checkpoint {seq} is signed by an unknown key ({cp.key_id})")
        try:
            message = checkpoint_message(seq, cp.hash, _read_time(cp.at), cp.key_id)
            key.verify(base64.b64decode(cp.signature, validate=True), message)
        except (InvalidSignature, ValueError, TypeError):
            raise _Broken(seq, "bad_signature", f"checkpoint {seq}: the signature does not verify") from None

    async def _walk(
        self,
        session: Tx,
        keys: Mapping[str, Ed25519PublicKey],
        report: VerifyReport,
        head_seq: int,
        head_hash: str,
        head_missing: bool,
        cp_max: int,
        batch_size: int,
    ) -> None:
        checkpoints = self._checkpoints(session, cp_max, batch_size)
        cp = await anext(checkpoints, None)
        prev_seq, prev_hash = 0, GENESIS_HASH
        async for row in self._rows(session, batch_size):
            seq = int(row.seq)
            expected = prev_seq + 1
            if seq != expected:
                raise _Broken(expected, "missing", f"entry {expected} is missing (the next entry is {seq})")
            try:
                record = self._record(row)
                recomputed = entry_hash(row_values(record))
            except (ValueError, TypeError):
                raise _Broken(seq, "unreadable", f"entry {seq}: unreadable timestamp or field list") from None
            if recomputed != record.hash:
                raise _Broken(seq, "hash_mismatch", f"entry {seq} does not match its hash (edited)")
            if record.prev_hash != prev_hash:
                raise _Broken(seq, "broken_link", f"entry {seq}'s prev_hash is not the hash of entry {prev_seq}")
            while cp is not None and int(cp.seq) <= seq:
                self._check_checkpoint(cp, keys)
                if int(cp.seq) != seq or cp.hash != record.hash:
                    raise _Broken(
                        int(cp.seq),
                        "checkpoint_mismatch",
                        f"entry {int(cp.seq)} does not match the signed checkpoint (history rewritten)",
                    )
                report.checkpoints += 1
                report.last_checkpoint_seq = int(cp.seq)
                cp = await anext(checkpoints, None)
            if seq == head_seq and record.hash != head_hash:
                raise _Broken(seq, "head_mismatch", f"entry {seq} does not match the chain head row")
            prev_seq, prev_hash = seq, record.hash
            report.entries += 1
        if cp is not None:
            self._check_checkpoint(cp, keys)
            raise _Broken(
                prev_seq + 1,
                "truncated",
                f"the chain ends at entry {prev_seq} but a signed checkpoint vouches for entry {int(cp.seq)}",
            )
        if head_seq > prev_seq:
            raise _Broken(
                prev_seq + 1,
                "truncated",
                f"the chain ends at entry {prev_seq} but the head row records entry {head_seq}",
            )
        if head_missing and prev_seq:
            raise _Broken(1, "head_mismatch", "the chain head row is missing")


async def run_checkpoints(
    sessions: Callable[[], Any],
    audit: AuditLog,
    signer: AuditSigner,
    *,
    every: float,
    stop: asyncio.Event,
) -> None:
    """Sign a checkpoint every `every` seconds until `stop` is set. `sessions` is a transaction
    factory such as `Database.transaction`. Each checkpoint is logged (seq, hash, key id — no personal
    data) so a copy exists outside the database."""
    while not stop.is_set():
        try:
            async with sessions() as session:
                cp = await audit.checkpoint(session, signer)
            if cp is not None:
                log.info("audit checkpoint", seq=cp.seq, hash=cp.hash, key_id=cp.key_id, signature=cp.signature)
        except Exception as exc:  # keep checkpointing; the next attempt may succeed
            log.error("audit checkpoint failed", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
