"""Data keys: one AES-256 key per child (or place, or the service itself), stored wrapped by a KEK.

Each service keeps its own `data_keys` table. A row is a data key for one *scope*
(`child:<id>`, `place:<id>`, `service`), wrapped by a KEK from the `KekProvider` with associated
data binding service, scope and key id, so a wrapped key copied to another scope is useless.

- At most one key per scope is `active` (a partial unique index says so); older ones are
  `retired` and still decrypt. Each encryption is counted in the same transaction as the write,
  and a key that would pass `max_encryptions` is retired and replaced: AES-GCM with random 96-bit
  nonces must stay far below 2^32 messages per key (NIST SP 800-38D §8.3).
- Erasure destroys every key of a scope: the wrapped key is deleted, a `destroyed` row stays as a
  tombstone, and the scope never gets a key again. Reads of its records then fail with
  KeyDestroyedError, in every replica at once: decryption always checks the row, and only the
  unwrapped key (the expensive KMS call) is cached, briefly, in memory.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from csx_common.crypto import DataKey, DataLossError, KeyDestroyedError
from csx_common.db import Tx, advisory_lock
from csx_common.keyring import KekProvider

ACTIVE, RETIRED, DESTROYED = "active", "retired", "destroyed"
SERVICE_SCOPE = "service"
# 2^24 encryptions per key: 1/256 of the 2^32 bound, so rolling over costs nothing in practice.
MAX_ENCRYPTIONS = 1 << 24
# Encryptions reserved per transaction and scope (see DataKeys.encryption_key).
RESERVE = 16
_BUDGET = "csx_data_key_budget"


def child_scope(child_id: str) -> str:
    return f"child:{child_id}"


def place_scope(place_id: str) -> str:
    return f"place:{place_id}"


def data_keys_table(metadata: MetaData) -> Table:
    return Table(
        "data_keys",
        metadata,
        Column("key_id", String(40), primary_key=True),
        Column("scope", String(80), nullable=False, index=True),
        Column("state", String(12), nullable=False),
        # Long enough for a KMS key ARN or a Vault key path.
        Column("kek_id", String(255), index=True),
        Column("wrapped", LargeBinary),
        Column("encryptions", BigInteger, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("destroyed_at", DateTime(timezone=True)),
        Index(
            "ux_data_keys_active_scope",
            "scope",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )


def wrap_aad(service: str, scope: str, key_id: str) -> bytes:
    return f"csx-dek:v1|{service}|{scope}|{key_id}".encode()


class DataKeys:
    def __init__(
        self,
        table: Table,
        keks: KekProvider,
        service: str,
        *,
        max_encryptions: int = MAX_ENCRYPTIONS,
        reserve: int = RESERVE,
        cache_seconds: float = 300.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.keks = keks
        self.service = service
        self.max_encryptions = max_encryptions
        self._reserve = min(reserve, max_encryptions)
        self._cache_seconds = cache_seconds
        self._cache_size = cache_size
        self._clock = clock
        # key id -> (digest of the wrapped row it came from, key, expiry). Keyed on the wrapped
        # bytes too, so a re-wrapped or destroyed row never answers from a stale entry.
        self._cache: OrderedDict[str, tuple[bytes, bytes, float]] = OrderedDict()
        t = table.c
        self._count = (
            update(table)
            .where(
                t.scope == bindparam("b_scope"),
                t.state == ACTIVE,
                t.encryptions + bindparam("b_uses") <= max_encryptions,
            )
            .values(encryptions=t.encryptions + bindparam("b_uses"))
            .returning(t.key_id, t.kek_id, t.wrapped)
        )

    # Encryption -------------------------------------------------------------------------------
    async def encryption_key(self, session: Tx, scope: str, uses: int = 1) -> DataKey:
        """The scope's active key, counting `uses` encryptions against it; a new key if it has none
        or the count would pass the cap. KeyDestroyedError if the scope was erased.

        Counted once per transaction: the first use reserves RESERVE encryptions (one UPDATE) and
        the transaction's later seals under the scope spend from that reservation. Counting more
        than were made only brings the roll-over forward; never counting fewer is what matters."""
        budget: dict[str, tuple[DataKey, int]] = session.info.setdefault(_BUDGET, {})
        held = budget.get(scope)
        if held is not None and held[1] >= uses:
            budget[scope] = (held[0], held[1] - uses)
            return held[0]
        reserve = max(uses, self._reserve)
        for _ in range(3):
            key = await self._count_on_active(session, scope, reserve)
            if key is None:
                try:
                    async with session.savepoint():
                        key = await self._roll(session, scope, reserve)
                except IntegrityError:
                    continue  # another transaction made the scope's key first: use theirs
            budget[scope] = (key, reserve - uses)
            return key
        raise DataLossError("could not obtain a data key")

    async def new_scope(self, session: Tx, scope: str, now: datetime) -> None:
        """The first key of a scope just created (a new child's random id): inserted directly, with
        no look for an earlier key or tombstone, since a scope that did not exist has neither."""
        key_id = "dk-" + secrets.token_hex(8)
        material = AESGCM.generate_key(256)
        kek_id, wrapped = await self.keks.wrap(material, wrap_aad(self.service, scope, key_id))
        await session.insert(
            self.table,
            {
                "key_id": key_id,
                "scope": scope,
                "state": ACTIVE,
                "kek_id": kek_id,
                "wrapped": wrapped,
                "encryptions": self._reserve,
                "created_at": now,
            },
        )
        self._remember(key_id, kek_id, wrapped, material)
        session.info.setdefault(_BUDGET, {})[scope] = (DataKey(key_id, material), self._reserve)

    async def _count_on_active(self, session: Tx, scope: str, uses: int) -> DataKey | None:
        row = (await session.execute(self._count, {"b_scope": scope, "b_uses": uses})).first()
        if row is None:
            return None
        return DataKey(row.key_id, await self._unwrap(row.key_id, scope, row.kek_id, row.wrapped))

    async def _roll(self, session: Tx, scope: str, uses: int) -> DataKey:
        t = self.table.c
        # Serialised with destroy() of the same scope (PostgreSQL): otherwise each could miss the
        # other's uncommitted row, leaving a live key beside an erasure's tombstone.
        await advisory_lock(session, _lock_name(scope))
        erased = await session.execute(select(t.key_id).where(t.scope == scope, t.state == DESTROYED).limit(1))
        if erased.first() is not None:
            raise KeyDestroyedError("the scope was erased")
        await session.execute(update(self.table).where(t.scope == scope, t.state == ACTIVE).values(state=RETIRED))
        key_id = "dk-" + secrets.token_hex(8)
        material = AESGCM.generate_key(256)
        kek_id, wrapped = await self.keks.wrap(material, wrap_aad(self.service, scope, key_id))
        await session.insert(
            self.table,
            dict(
                key_id=key_id,
                scope=scope,
                state=ACTIVE,
                kek_id=kek_id,
                wrapped=wrapped,
                encryptions=uses,
                created_at=datetime.now(UTC),
            ),
        )
        self._remember(key_id, kek_id, wrapped, material)
        return DataKey(key_id, material)

    # Decryption -------------------------------------------------------------------------------
    async def decryption_keys(
        self, session: Tx, key_ids: Iterable[str], *, scope: str | None = None
    ) -> dict[str, bytes]:
        """The keys, unwrapped. With `scope`, each must belong to it: a record moved to another
        child in the database (its child id edited) names the first child's key, and fails."""
        wanted = set(key_ids)
        if not wanted:
            return {}
        t = self.table.c
        rows = (
            await session.execute(select(t.key_id, t.scope, t.state, t.kek_id, t.wrapped).where(t.key_id.in_(wanted)))
        ).all()
        if len(rows) != len(wanted):
            raise DataLossError("ciphertext names an unknown data key")
        keys = {}
        for row in rows:
            if row.state == DESTROYED or row.wrapped is None:
                raise KeyDestroyedError("the record's data key was destroyed")
            if scope is not None and row.scope != scope:
                raise DataLossError("ciphertext belongs to another record's scope")
            keys[row.key_id] = await self._unwrap(row.key_id, row.scope, row.kek_id, row.wrapped)
        return keys

    async def _unwrap(self, key_id: str, scope: str, kek_id: str, wrapped: bytes) -> bytes:
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] == _digest(kek_id, wrapped) and hit[2] > self._clock():
            self._cache.move_to_end(key_id)
            return hit[1]
        material = await self.keks.unwrap(kek_id, wrapped, wrap_aad(self.service, scope, key_id))
        self._remember(key_id, kek_id, wrapped, material)
        return material

    def _remember(self, key_id: str, kek_id: str, wrapped: bytes, material: bytes) -> None:
        self._cache[key_id] = (_digest(kek_id, wrapped), material, self._clock() + self._cache_seconds)
        self._cache.move_to_end(key_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # Erasure ----------------------------------------------------------------------------------
    async def destroy(self, session: Tx, scope: str, now: datetime) -> int:
        """Destroy every key of `scope` (and leave a tombstone, even if it had none): its records
        become unreadable here, in every replica, and in any copy of the rows once the KEKs that
        wrapped them are rotated away. Returns how many keys were destroyed."""
        t = self.table.c
        await advisory_lock(session, _lock_name(scope))
        ids = list((await session.execute(select(t.key_id).where(t.scope == scope, t.state != DESTROYED))).scalars())
        if ids:
            await session.execute(
                update(self.table)
                .where(t.key_id.in_(ids))
                .values(state=DESTROYED, kek_id=None, wrapped=None, destroyed_at=now)
            )
        tomb = await session.execute(select(t.key_id).where(t.scope == scope, t.state == DESTROYED).limit(1))
        if tomb.first() is None:
            await session.insert(
                self.table,
                dict(
                    key_id="dk-" + secrets.token_hex(8),
                    scope=scope,
                    state=DESTROYED,
                    encryptions=0,
                    created_at=now,
                    destroyed_at=now,
                ),
            )
        for key_id in ids:
            self._cache.pop(key_id, None)
        return len(ids)

    async def erased(self, session: Tx, scope: str, *, lock: bool = False) -> bool:
        """Whether `scope` was erased; `lock` (in a write transaction) holds off a concurrent erasure
        of it until this transaction ends, so what the caller writes next cannot outlive one."""
        if lock:
            await advisory_lock(session, _lock_name(scope))
        t = self.table.c
        found = await session.execute(select(t.key_id).where(t.scope == scope, t.state == DESTROYED).limit(1))
        return found.first() is not None

    async def wrapped_by(self, session: Tx) -> dict[str, int]:
        """How many live data keys each KEK wraps (what a rotation must drive to zero)."""
        t = self.table.c
        rows = await session.execute(
            select(t.kek_id, func.count().label("n")).where(t.wrapped.is_not(None)).group_by(t.kek_id)
        )
        return {row.kek_id: row.n for row in rows.all()}


def _lock_name(scope: str) -> str:
    return f"csx-datakeys:{scope}"


def _digest(kek_id: str, wrapped: bytes) -> bytes:
    return hashlib.sha256(kek_id.encode() + b"|" + wrapped).digest()


async def rewrap_batch(session: Tx, keys: DataKeys, to_kek: str, limit: int = 200) -> int:
    """Re-wrap up to `limit` live data keys not yet under `to_kek` (the primary); returns how many.
    One compare-and-set UPDATE for the batch (sent as one executemany), on the old wrapping, so a
    concurrent destroy or re-wrap is never undone; on PostgreSQL rows a live transaction holds are
    skipped this pass rather than waited for."""
    t = keys.table.c
    query = (
        select(t.key_id, t.scope, t.kek_id, t.wrapped)
        .where(t.wrapped.is_not(None), t.kek_id != to_kek)
        .order_by(t.key_id)
        .limit(limit)
    )
    if session.dialect == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = (await session.execute(query)).all()
    changes = []
    for row in rows:
        aad = wrap_aad(keys.service, row.scope, row.key_id)
        material = await keys.keks.unwrap(row.kek_id, row.wrapped, aad)
        kek_id, wrapped = await keys.keks.wrap(material, aad)
        if kek_id != to_kek:
            raise DataLossError("the primary key-encryption key changed during the re-wrap")
        changes.append(
            {"b_key": row.key_id, "b_old_kek": row.kek_id, "b_old": row.wrapped, "b_kek": kek_id, "b_new": wrapped}
        )
    if changes:
        statement = (
            update(keys.table)
            .where(t.key_id == bindparam("b_key"), t.kek_id == bindparam("b_old_kek"), t.wrapped == bindparam("b_old"))
            .values(kek_id=bindparam("b_kek"), wrapped=bindparam("b_new"))
        )
        await session.execute(statement, changes)
    return len(rows)
