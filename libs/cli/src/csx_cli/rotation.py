"""Rotating a keyring's key-encryption keys (KEKs) in Tink's order, while the services keep serving.

    summary = await rotate("var/keyring.json", {"referrals": url, "panel": url2, ...})

1. *Add* a new KEK, decrypt-only (`enabled`), and record the rotation ({"from", "to"}) in the
   keyring file. Running services re-read the file when it changes, so after a short rollout grace
   every one of them can unwrap under the new KEK before anything is wrapped by it.
2. *Promote* it to primary. New data keys are wrapped by it from the services' next wrap on. Wait
   the grace again: a transaction that wrapped a key under the old primary just before the promotion
   may still commit it.
3. *Re-wrap* every live data key of every database under the new KEK, in batches of one transaction
   each (compare-and-set, so live traffic interleaves and a concurrent erasure is never undone).
4. *Retire*: after the grace, count again. Only when no live data key in any database references a
   KEK other than the primary are those KEKs destroyed and the rotation record cleared (one atomic
   save). Keys that appeared meanwhile are re-wrapped by another pass; a KEK that is still
   referenced is never destroyed.

Every step is recorded in the keyring file before the next begins, so a rotation interrupted at any
point (even by SIGKILL) continues where it stopped when `rotate` runs again, and ends in the same
state: one primary KEK wrapping every live data key, the others destroyed. Two rotations never run
at once on one keyring (an exclusive lock on `<keyring>.lock`, released by the OS if we die).

The databases listed must be every database whose data keys this keyring wraps: a KEK is destroyed
once no *listed* database references it. Each is named by its service, which is part of every
wrapped key's associated data; a preflight unwraps a sample from each so that a wrong name or a wrong
keyring stops the rotation before it changes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, select, text
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from csx_common.crypto import DataLossError
from csx_common.datakeys import DataKeys, data_keys_table, rewrap_batch, wrap_aad
from csx_common.db import Database
from csx_common.keyring import DESTROYED, ENABLED, PRIMARY, FileKeyring, KeyringError

DEFAULT_BATCH = 200
# Services see a keyring change at their next wrap (one stat per wrap), so the grace only has to
# outlast a transaction that wrapped a key just before the change. Seconds.
DEFAULT_GRACE_SECONDS = 5.0
DEFAULT_MAX_PASSES = 5
BATCH_ATTEMPTS = 3


class RotationError(Exception):
    """The rotation cannot go on; the message says why and what to do. The keyring is left in a
    state a later `rotate` continues from."""


@dataclass(frozen=True, slots=True)
class Progress:
    """One report from `rotate`: a step starting, or re-wrap progress (done of total keys)."""

    step: str  # "add" | "rollout" | "promote" | "rewrap" | "verify" | "retire"
    detail: str = ""
    done: int = 0
    total: int = 0


@dataclass(slots=True)
class RotationSummary:
    from_kek_id: str
    to_kek_id: str
    destroyed: list[str]
    rewrapped: dict[str, int]
    seconds: float
    rewrap_seconds: float
    passes: int
    resumed: bool

    @property
    def total_rewrapped(self) -> int:
        return sum(self.rewrapped.values())

    @property
    def keys_per_second(self) -> float:
        """The re-wrap rate: keys re-wrapped per second of re-wrapping (rollout graces excluded)."""
        return self.total_rewrapped / self.rewrap_seconds if self.rewrap_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "from_kek_id": self.from_kek_id,
            "to_kek_id": self.to_kek_id,
            "destroyed": self.destroyed,
            "rewrapped": self.rewrapped,
            "total_rewrapped": self.total_rewrapped,
            "seconds": round(self.seconds, 3),
            "rewrap_seconds": round(self.rewrap_seconds, 3),
            "keys_per_second": round(self.keys_per_second, 1),
            "passes": self.passes,
            "resumed": self.resumed,
        }


ProgressCallback = Callable[[Progress], None]


@dataclass(slots=True)
class _Store:
    service: str
    db: Database
    keys: DataKeys


async def rotate(
    keyring_path: str | Path,
    databases: Mapping[str, str],
    *,
    batch: int = DEFAULT_BATCH,
    progress: ProgressCallback | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    max_passes: int = DEFAULT_MAX_PASSES,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> RotationSummary:
    """Rotate the keyring's KEK (or finish the rotation recorded in it); see the module docstring.
    `databases` maps service name to database URL. An exception raised by `progress` interrupts
    the rotation like a crash would (what the resumability tests use)."""
    if batch < 1 or max_passes < 1 or grace_seconds < 0:
        raise ValueError("batch and max_passes must be positive, grace_seconds not negative")
    report = progress or (lambda _p: None)
    started = time.monotonic()
    path = Path(keyring_path)
    with _exclusive(path):
        ring = _open_keyring(path)
        async with _stores(databases, ring) as stores:
            await _preflight(stores, ring)
            resumed = ring.rotation is not None
            if ring.rotation is None:
                old_id = ring.primary_id
                new_id = ring.add()
                ring.rotation = {"from": old_id, "to": new_id}
                ring.save()
                report(Progress("add", f"added {new_id} as decrypt-only"))
            old_id, new_id = _recorded(ring)

            if ring.keks[new_id].state == ENABLED:
                report(Progress("rollout", f"{grace_seconds:g}s for every service to load {new_id}"))
                await sleep(grace_seconds)
                ring.refresh()
                ring.promote(new_id)
                ring.save()
                report(Progress("promote", f"{new_id} is primary; {old_id} decrypts only"))
            report(Progress("rollout", f"{grace_seconds:g}s for wraps under the old primary to commit"))
            await sleep(grace_seconds)

            rewrapped = {s.service: 0 for s in stores}
            rewrap_seconds = 0.0
            passes = 0
            verified = False
            while True:
                references = await _references(stores)
                pending = {s: sum(n for k, n in refs.items() if k != new_id) for s, refs in references.items()}
                total = sum(pending.values())
                if not total:
                    if verified:
                        break  # nothing refers to an old KEK, a full grace after the last re-wrap
                    report(Progress("verify", f"{grace_seconds:g}s, then count every database again"))
                    await sleep(grace_seconds)
                    verified = True
                    continue
                verified = False
                passes += 1
                if passes > max_passes:
                    raise RotationError(
                        f"{total} data key(s) still not wrapped by {new_id} after {max_passes} passes "
                        "(something keeps wrapping under an old KEK?); nothing was destroyed, run again"
                    )
                t0 = time.monotonic()
                done = 0
                report(Progress("rewrap", f"pass {passes}", 0, total))
                for store in stores:
                    if not pending[store.service]:
                        continue
                    while True:
                        n = await _rewrap(store, new_id, batch, sleep)
                        if not n:
                            break
                        done += n
                        rewrapped[store.service] += n
                        report(Progress("rewrap", store.service, done, max(total, done)))
                rewrap_seconds += time.monotonic() - t0

            # `references` is the count just taken: no live data key refers to any KEK but new_id.
            ring.refresh()
            if ring.primary_id != new_id:
                raise RotationError(f"the keyring's primary changed to {ring.primary_id} during the rotation")
            retire = [k for k in ring.enabled_ids() if not any(k in refs for refs in references.values())]
            for kek_id in retire:
                ring.destroy(kek_id)
            ring.rotation = None
            ring.save()
            report(Progress("retire", "destroyed " + (", ".join(retire) or "nothing")))
    return RotationSummary(
        from_kek_id=old_id,
        to_kek_id=new_id,
        destroyed=retire,
        rewrapped=rewrapped,
        seconds=time.monotonic() - started,
        rewrap_seconds=rewrap_seconds,
        passes=passes,
        resumed=resumed,
    )


async def key_status(keyring_path: str | Path, databases: Mapping[str, str]) -> dict[str, Any]:
    """Each KEK (id, state, created) with the live data keys it wraps per service, the rotation in
    progress if any, and references to KEKs the keyring does not hold (those keys are unreadable)."""
    ring = _open_keyring(Path(keyring_path))
    async with _stores(databases, ring) as stores:
        references = await _references(stores)
    keks = [
        {
            "id": k.kek_id,
            "state": k.state,
            "created_at": k.created_at,
            "data_keys": {s: refs.get(k.kek_id, 0) for s, refs in references.items()},
        }
        for k in ring.keks.values()
    ]
    unknown: dict[str, dict[str, int]] = {}
    for service, refs in references.items():
        for kek_id, n in refs.items():
            if kek_id not in ring.keks:
                unknown.setdefault(kek_id, {})[service] = n
    return {
        "keyring": str(ring.path),
        "primary": ring.primary_id,
        "rotation": ring.rotation,
        "keks": keks,
        "unknown_keks": unknown,
    }


# Internals ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RotationError(f"another rotation of {path} is running") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_keyring(path: Path) -> FileKeyring:
    if not path.is_file():
        raise RotationError(f"no keyring at {path}")
    try:
        return FileKeyring(path.resolve())
    except KeyringError as exc:
        raise RotationError(f"{path}: {exc}") from None


def _recorded(ring: FileKeyring) -> tuple[str, str]:
    record = ring.rotation or {}
    old_id, new_id = record.get("from", ""), record.get("to", "")
    target = ring.keks.get(new_id)
    if target is None or target.state not in (ENABLED, PRIMARY):
        raise RotationError(
            f"the keyring records a rotation to {new_id or '(none)'}, which it holds only as "
            f"{target.state if target else 'unknown'}; repair the file's `rotation` entry by hand"
        )
    return old_id, new_id


@contextlib.asynccontextmanager
async def _stores(databases: Mapping[str, str], ring: FileKeyring) -> Any:
    if not databases:
        raise RotationError("no databases given")
    table = data_keys_table(MetaData())
    stores: list[_Store] = []
    try:
        for service, url in databases.items():
            _check_exists(service, url)
            stores.append(_Store(service, Database(url), DataKeys(table, ring, service)))
        yield stores
    finally:
        for store in stores:
            await store.db.dispose()


async def _rewrap(store: _Store, new_id: str, batch: int, sleep: Callable[[float], Awaitable[Any]]) -> int:
    """One batch in one transaction. A transaction that loses a deadlock or a lock wait to live
    traffic is tried again (its rows are untouched: it rolled back)."""
    for attempt in range(BATCH_ATTEMPTS):
        try:
            async with store.db.transaction() as session:
                return await rewrap_batch(session, store.keys, new_id, batch)
        except DBAPIError as exc:
            if attempt == BATCH_ATTEMPTS - 1 or not _retryable(exc):
                raise
            await sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _retryable(exc: DBAPIError) -> bool:
    """SQLite busy, or PostgreSQL deadlock (40P01) / serialization failure (40001)."""
    if isinstance(exc, OperationalError):
        return True
    return getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")


def _check_exists(service: str, url: str) -> None:
    """Never create an empty SQLite database by looking into one that is not there."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and (not parsed.database or not Path(parsed.database).is_file()):
        raise RotationError(f"{service}: no SQLite database at {parsed.database or '(none)'}")


async def _references(stores: list[_Store]) -> dict[str, dict[str, int]]:
    """{service: {kek id: live data keys it wraps}}."""
    out = {}
    for store in stores:
        try:
            # Counted only once every writer already under way has finished: one that wrapped a key
            # under the old KEK just before the promotion must be seen here. SQLite's BEGIN IMMEDIATE
            # waits for it; on PostgreSQL a SHARE lock on data_keys waits for every open writer of it.
            async with store.db.transaction() as session:
                if store.db.is_postgres:
                    await session.execute(text("LOCK TABLE data_keys IN SHARE MODE"))
                out[store.service] = await store.keys.wrapped_by(session)
        except SQLAlchemyError as exc:
            raise RotationError(
                f"{store.service}: cannot read data_keys ({type(exc).__name__}); is the service migrated?"
            ) from None
    return out


async def _preflight(stores: list[_Store], ring: FileKeyring) -> None:
    """Stop before changing anything if a key could not be re-wrapped: a reference to a KEK this
    keyring does not hold, or a sample key that does not unwrap under the service name given."""
    references = await _references(stores)
    for store in stores:
        for kek_id in references[store.service]:
            kek = ring.keks.get(kek_id)
            if kek is None or kek.state == DESTROYED:
                raise RotationError(
                    f"{store.service}: {references[store.service][kek_id]} data key(s) are wrapped by {kek_id}, "
                    f"which this keyring holds {'only as destroyed' if kek else 'not at all'} "
                    "(the wrong keyring, or a database restored from before an earlier rotation?)"
                )
            t = store.keys.table.c
            async with store.db.session() as session:
                row = (
                    await session.execute(
                        select(t.key_id, t.scope, t.wrapped).where(t.kek_id == kek_id, t.wrapped.is_not(None)).limit(1)
                    )
                ).first()
            if row is None:
                continue
            try:
                await ring.unwrap(kek_id, row.wrapped, wrap_aad(store.service, row.scope, row.key_id))
            except DataLossError:
                raise RotationError(
                    f"{store.service}: data key {row.key_id} does not unwrap with this keyring as service "
                    f"{store.service!r} (the wrong keyring, or the wrong service name for this database?)"
                ) from None
