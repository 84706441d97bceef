"""Async SQLAlchemy: one engine per service, SQLite (WAL, synchronous=FULL) or PostgreSQL by URL.

The unit of work owns the commit: a use case runs inside `async with db.transaction() as s:` and
everything it writes (state, outbox rows, inbox rows) commits together or not at all.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine.url import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the writer; FULL fsyncs each commit, so an acknowledged
    # concern survives power loss.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class Database:
    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = make_url(url)
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            # One writer at a time in SQLite; a small pool avoids "database is locked" storms.
            kwargs["pool_size"] = 4
            kwargs["max_overflow"] = 0
        else:
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 10
            kwargs["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            # aiosqlite starts transactions lazily; BEGIN IMMEDIATE takes the write lock up front
            # so two writers never deadlock upgrading a read lock.
            event.listen(self.engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
            event.listen(
                self.engine.sync_engine,
                "connect",
                lambda dbapi_conn, _r: setattr(dbapi_conn, "isolation_level", None),
            )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer. Writers queue here, woken the moment the lock is free, instead of
        # in SQLite's busy handler, which sleeps in growing steps (up to 100 ms) and ruins latency
        # under concurrency. Created lazily: it binds to the running loop.
        self._write_lock: asyncio.Lock | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        if not self.is_sqlite:
            async with self._sessions() as session, session.begin():
                yield session
            return
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock, self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A read-only session (no commit)."""
        async with self._sessions() as session:
            yield session

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


async def advisory_lock(session: AsyncSession, name: str) -> None:
    """Serialise transactions that work on `name` until this one ends (PostgreSQL advisory
    transaction lock). A no-op on SQLite, whose writers are serialised already."""
    if session.get_bind().dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
