"""The database: SQLite (WAL, synchronous=FULL) or PostgreSQL by URL, behind one small `Tx` type.

A use case runs inside `async with db.transaction() as tx:` and everything it writes (state,
outbox rows, inbox rows, audit entries) commits together or not at all; nothing is acknowledged
before the COMMIT that covers it returns.

SQLite has one writer, so each process has exactly one write connection, driven from the event
loop (docs/adr/0009-one-writer-group-commit.md):

- a transaction takes the writer, runs its statements synchronously on it (a few microseconds
  each: no thread hand-off per statement) inside a SAVEPOINT of its own, and gives the writer back;
- transactions that finish while a COMMIT is under way, or queue behind one another, form the next
  batch: one BEGIN IMMEDIATE ... COMMIT covers them all (group commit), and the COMMIT (the fsync)
  runs on a worker thread so the loop keeps serving;
- a failed transaction rolls back only its own savepoint; a failed COMMIT fails its whole batch;
- reads use connections of their own (query_only) with a plain deferred BEGIN on the WAL snapshot.

A transaction must not await anything that really waits (a network call, a KMS): while it holds
the writer no other transaction can run. On PostgreSQL each transaction has a pooled connection of
its own, and the same code awaits asyncpg.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine, Table, bindparam, create_engine, event, pool, text
from sqlalchemy.engine import Result
from sqlalchemy.engine.url import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from csx_common.errors import Unavailable

log = structlog.get_logger("csx.db")
T = TypeVar("T")
# How long a connection waits for another process holding the file's write lock (a CLI tool).
BUSY_TIMEOUT_MS = 10_000
Params = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
# Rows of any shape (SQLAlchemy 2.1 types a result by its columns; statements here are built anywhere).
Rows = Result[*tuple[Any, ...]]


class ConnectionLost(Unavailable):
    """The connection failed before COMMIT (PostgreSQL): the transaction wrote nothing, so its work
    may run again at once, on a new connection."""

    reason = "DATABASE_CONNECTION_LOST"


class Tx(ABC):
    """One transaction's connection: what use cases, repositories and the kernel write through."""

    dialect: str

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.info: dict[str, Any] = {}  # per-transaction state of the kernel (data key budgets)
        self._after_commit: dict[int, Callable[[], None]] = {}

    @abstractmethod
    async def execute(self, statement: Any, params: Params = None) -> Rows: ...

    async def scalar(self, statement: Any, params: Params = None) -> Any:
        return (await self.execute(statement, params)).scalar()

    @abstractmethod
    async def insert(self, table: Table, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """INSERT one row (a mapping) or several (a sequence of mappings with the same keys): the way
        to write rows on a hot path, compiled once per table and set of columns."""

    @abstractmethod
    def savepoint(self) -> Any:
        """`async with tx.savepoint():` — what runs inside rolls back alone if it raises."""

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once after the COMMIT covering this transaction (never after a rollback,
        nor if registered in a savepoint that rolled back); the same callback registered twice runs
        once."""
        self._after_commit[id(callback)] = callback

    def _savepoint_mark(self) -> int:
        return len(self._after_commit)

    def _rolled_back_to(self, mark: int) -> None:
        """A savepoint rolled back: what was registered in it goes with it."""
        for key in list(self._after_commit)[mark:]:
            del self._after_commit[key]

    def _committed(self) -> None:
        for callback in self._after_commit.values():
            try:
                callback()
            except Exception as exc:
                log.warning("after_commit_failed", error=type(exc).__name__)


class _SqliteTx(Tx):
    """Statements run synchronously, on the connection the transaction holds."""

    _names = itertools.count()

    def __init__(self, conn: Connection) -> None:
        super().__init__("sqlite")
        self._conn = conn

    async def execute(self, statement: Any, params: Params = None) -> Rows:
        if isinstance(statement, str):
            statement = text(statement)
        return self._conn.execute(statement, params)

    async def insert(self, table: Table, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        rows = [values] if isinstance(values, Mapping) else list(values)
        if not rows:
            return
        if any(row.keys() != rows[0].keys() for row in rows):
            raise ValueError(f"{table.name}: rows inserted together give the same columns")
        sql, names, processors = _compiled_insert(self._conn.dialect, table, tuple(rows[0]))
        args = [[processors[n](row[n]) if n in processors else row[n] for n in names] for row in rows]
        raw = _raw(self._conn)
        try:
            if len(args) == 1:
                raw.execute(sql, args[0])
            else:
                raw.executemany(sql, args)
        except sqlite3.Error as exc:
            # As SQLAlchemy reports it (IntegrityError for a key taken), and without the values.
            raise DBAPIError.instance(sql, None, exc, sqlite3.Error, hide_parameters=True) from None

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        name = f"sp{next(self._names)}"
        raw = _raw(self._conn)
        raw.execute(f"SAVEPOINT {name}")
        mark = self._savepoint_mark()
        try:
            yield
        except BaseException:
            raw.execute(f"ROLLBACK TO {name}")
            raw.execute(f"RELEASE {name}")
            self._rolled_back_to(mark)
            raise
        raw.execute(f"RELEASE {name}")


class _AsyncTx(Tx):
    """PostgreSQL (asyncpg): every statement is a round trip, so inserts wait in `_pending` and go
    together, as one statement of data-modifying CTEs, before anything else the transaction sends
    (a read sees them), at a savepoint's end and before COMMIT. A key taken surfaces as the same
    IntegrityError, at that point rather than at the insert."""

    def __init__(self, conn: AsyncConnection) -> None:
        super().__init__(conn.dialect.name)
        self._conn = conn
        self._pending: list[tuple[Table, list[Mapping[str, Any]]]] = []

    async def execute(self, statement: Any, params: Params = None) -> Rows:
        await self.flush()
        if isinstance(statement, str):
            statement = text(statement)
        result: Rows = await self._conn.execute(statement, params)
        return result

    async def insert(self, table: Table, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        rows = [values] if isinstance(values, Mapping) else list(values)
        if rows:
            self._pending.append((table, rows))

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        dialect = self._conn.dialect
        parts: list[str] = []
        args: list[Any] = []
        for table, all_rows in pending:
            columns = tuple(all_rows[0])
            if any(row.keys() != all_rows[0].keys() for row in all_rows):
                raise ValueError(f"{table.name}: rows inserted together give the same columns")
            per_statement = max(1, _MAX_PARAMETERS // len(columns))
            for start in range(0, len(all_rows), per_statement):
                rows = all_rows[start : start + per_statement]
                if parts and len(args) + len(rows) * len(columns) > _MAX_PARAMETERS:
                    await self._send(parts, args)  # PostgreSQL takes at most 65,535 parameters a statement
                    parts, args = [], []
                sql, names, processors = _compiled_insert(dialect, table, columns, len(rows))
                offset = len(args)
                parts.append(_renumber(sql, offset) if offset else sql)
                args.extend(processors[n](row[n]) if n in processors else row[n] for row in rows for n in names)
        await self._send(parts, args)

    async def _send(self, parts: list[str], args: list[Any]) -> None:
        if len(parts) == 1:
            sql = parts[0]
        else:
            ctes = ", ".join(f"i{i} AS ({part})" for i, part in enumerate(parts))
            sql = f"WITH {ctes} SELECT 1"
        await self._conn.exec_driver_sql(sql, tuple(args))

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        await self.flush()
        mark = self._savepoint_mark()
        async with self._conn.begin_nested():
            try:
                yield
                await self.flush()
            except BaseException:
                self._pending.clear()  # rolled back with the savepoint
                self._rolled_back_to(mark)
                raise


_PLACEHOLDER = re.compile(r"\$(\d+)")
# Parameters per statement, well under PostgreSQL's limit (65,535): a flush of more is split.
_MAX_PARAMETERS = 30_000


def _renumber(sql: str, offset: int) -> str:
    """asyncpg's positional parameters ($1, $2, ...) of one INSERT, moved after `offset` others."""
    return _PLACEHOLDER.sub(lambda m: f"${int(m.group(1)) + offset}", sql)


_INSERTS: dict[tuple[Any, Table, tuple[str, ...], int], tuple[str, list[str], dict[str, Any]]] = {}


def _compiled_insert(
    dialect: Any, table: Table, columns: tuple[str, ...], rows: int = 1
) -> tuple[str, list[str], dict[str, Any]]:
    """(SQL, parameter names of one row in order, SQLAlchemy's own bind processors) of INSERT INTO
    table (columns) VALUES with `rows` rows: SQLAlchemy compiles it and converts each value exactly
    as it would, once, instead of building an execution context per row (~100 µs a statement on a
    small VM, against ~20 µs for sqlite3)."""
    key = (dialect, table, columns, rows)
    found = _INSERTS.get(key)
    if found is None:
        if any(c.default is not None or c.server_default is not None for c in table.c if c.key not in columns):
            raise ValueError(f"{table.name}: a column with a default is missing; give every value")
        values = [{c: bindparam(f"{c}_{r}" if r else c, type_=table.c[c].type) for c in columns} for r in range(rows)]
        compiled = table.insert().values(values if rows > 1 else values[0]).compile(dialect=dialect)
        processors = {n: p for n, p in compiled._bind_processors.items() if p is not None}
        per_row = [c for c in (compiled.positiontup or ())][: len(columns)]
        found = _INSERTS[key] = (compiled.string, per_row, {n: processors[n] for n in per_row if n in processors})
    return found


def _raw(conn: Connection | None) -> Any:
    assert conn is not None, "the writer's connection is open while it writes"
    return conn.connection.dbapi_connection


def _sqlite_pragmas(query_only: bool) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets readers run beside the writer; FULL fsyncs each commit, so an acknowledged
        # concern survives power loss.
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=FULL")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        # Another process (a CLI tool) may hold the write lock for a moment: wait for it.
        dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if query_only:
            dbapi_conn.execute("PRAGMA query_only=ON")

    return on_connect


def _commit(raw: Any) -> None:
    raw.execute("COMMIT")


async def _off_loop(work: Callable[[], T]) -> T:
    """`work` on a worker thread, waited for to its end even if the caller is cancelled meanwhile:
    the thread is using the write connection, and nothing else may touch it until it is done."""
    done = asyncio.get_running_loop().run_in_executor(None, work)
    cancelled = False
    while not done.done():
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return done.result()


class _SqliteWriter:
    """The one write connection of this process, and its group commit."""

    def __init__(self, engine: Engine, maintenance: Engine) -> None:
        self._engine = engine
        self._maintenance = maintenance
        self._conn: Connection | None = None
        self._lock: asyncio.Lock | None = None  # created lazily: it binds to the running loop
        self._open = False  # inside BEGIN IMMEDIATE
        self._batch: list[tuple[asyncio.Future[None], _SqliteTx]] = []
        self._committer: asyncio.Task[None] | None = None
        self._waiting = 0
        self.commits = 0  # batches committed (tests and benchmarks read it)

    def _writer_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @asynccontextmanager
    async def _holding(self) -> AsyncIterator[None]:
        """The writer, counting who waits for it (a lone transaction commits at once)."""
        self._waiting += 1
        try:
            await self._writer_lock().acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._writer_lock().release()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        loop = asyncio.get_running_loop()
        async with self._holding():
            if self._conn is None:
                self._conn = await _off_loop(self._connect)
            raw = _raw(self._conn)
            if not self._open:
                try:
                    self._begin()
                except sqlite3.OperationalError:  # another process holds the file's write lock
                    await _off_loop(self._begin_waiting)
            tx = _SqliteTx(self._conn)
            try:
                async with tx.savepoint():
                    yield tx
            except BaseException:
                if not self._batch:  # nothing else to commit: give the file's write lock back now
                    raw.execute("ROLLBACK")
                    self._open = False
                raise
            done: asyncio.Future[None] = loop.create_future()
            self._batch.append((done, tx))
            if self._committer is None:
                self._committer = loop.create_task(self._commit(), name="sqlite-group-commit")
        await asyncio.shield(done)

    async def _commit(self) -> None:
        # Queued behind the transactions already waiting for the writer: they join this batch.
        async with self._holding():
            self._committer = None
            # A lone transaction with nobody waiting commits on the loop: the fsync costs less than
            # a thread hand-off (250-330 µs on a 2-core VM, measured), and the reply goes out
            # sooner. Under load (others waiting, or a batch of several), on a thread: the loop
            # serves requests meanwhile instead of standing still for the fsync.
            await self._commit_batch(on_loop=not self._waiting and len(self._batch) <= 1)

    def _connect(self) -> Connection:
        conn = self._engine.connect()
        # BEGIN IMMEDIATE is tried without waiting, on the loop; only if another process holds the
        # file's write lock does it wait, on a worker thread (see _begin).
        _raw(conn).execute("PRAGMA busy_timeout=0")
        return conn

    def _begin(self) -> None:
        _raw(self._conn).execute("BEGIN IMMEDIATE")
        self._open = True

    def _begin_waiting(self) -> None:
        raw = _raw(self._conn)
        raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            raw.execute("BEGIN IMMEDIATE")
        finally:
            raw.execute("PRAGMA busy_timeout=0")
        self._open = True

    def _end(self) -> None:
        try:
            _commit(_raw(self._conn))
        except BaseException:
            with suppress(Exception):
                _raw(self._conn).execute("ROLLBACK")
            raise
        finally:
            self._open = False
        self.commits += 1

    async def _commit_batch(self, *, on_loop: bool = False) -> None:
        """COMMIT the open batch (the writer lock held), on a worker thread unless `on_loop`, then
        settle its transactions."""
        batch, self._batch = self._batch, []
        if not self._open:
            return
        commits = self.commits
        try:
            if on_loop:
                self._end()
            else:
                await _off_loop(self._end)
        except BaseException as exc:
            if self.commits == commits:  # not committed: none of the batch is stored
                self._failed(batch, exc)
                if isinstance(exc, Exception):
                    return
                raise
            self._settle(batch)  # committed, and this task cancelled meanwhile
            raise
        self._settle(batch)

    @staticmethod
    def _failed(batch: list[tuple[asyncio.Future[None], _SqliteTx]], exc: BaseException) -> None:
        log.error("group_commit_failed", transactions=len(batch), error=type(exc).__name__)
        for done, _tx in batch:
            if not done.done():
                done.set_exception(CommitFailed("the transaction's COMMIT failed"))

    @staticmethod
    def _settle(batch: list[tuple[asyncio.Future[None], _SqliteTx]]) -> None:
        for done, tx in batch:
            if not done.done():
                done.set_result(None)
            tx._committed()

    async def run_sync(self, work: Callable[[Connection], T]) -> T:
        """`work` in a transaction of its own, on a connection of its own, while this process's
        writer waits (so the two never contend for the file's write lock)."""
        async with self._holding():
            await self._commit_batch()

            def in_transaction() -> T:
                with self._maintenance.begin() as conn:
                    return work(conn)

            return await _off_loop(in_transaction)

    async def close(self) -> None:
        if self._committer is not None:
            with suppress(Exception):
                await self._committer
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._maintenance.dispose()


class CommitFailed(Exception):
    """The COMMIT covering a transaction failed: none of its batch was stored."""


class Database:
    def __init__(self, url: str | URL, *, echo: bool = False) -> None:
        self.url = make_url(url)
        self._writer: _SqliteWriter | None = None
        self._reader: Engine | None = None
        self._async: AsyncEngine | None = None
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            sync_url = self.url.set(drivername="sqlite+pysqlite")
            # AUTOCOMMIT: the driver never begins or commits on its own; BEGIN, SAVEPOINT and COMMIT
            # are issued here, where the group commit needs them.
            common: dict[str, Any] = {
                "echo": echo,
                "isolation_level": "AUTOCOMMIT",
                "connect_args": {"check_same_thread": False},
            }
            writer = create_engine(sync_url, poolclass=pool.NullPool, **common)
            event.listen(writer, "connect", _sqlite_pragmas(query_only=False))
            # Schema work and migrations: SQLAlchemy's own transactions, BEGIN IMMEDIATE each.
            maintenance = create_engine(
                sync_url, poolclass=pool.NullPool, echo=echo, connect_args={"check_same_thread": False}
            )
            event.listen(maintenance, "connect", _sqlite_pragmas(query_only=False))
            event.listen(maintenance, "connect", lambda dbapi_conn, _r: setattr(dbapi_conn, "isolation_level", None))
            event.listen(maintenance, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
            self._writer = _SqliteWriter(writer, maintenance)
            self._reader = create_engine(sync_url, pool_size=4, max_overflow=-1, **common)
            event.listen(self._reader, "connect", _sqlite_pragmas(query_only=True))
        else:
            self._async = create_async_engine(self.url, echo=echo, pool_size=10, max_overflow=10, pool_pre_ping=False)

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    @property
    def commits(self) -> int:
        """SQLite: how many group commits so far (each covers one or more transactions)."""
        return self._writer.commits if self._writer else 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        if self._writer is not None:
            async with self._writer.transaction() as tx:
                yield tx
            return
        assert self._async is not None
        committing = False
        try:
            async with self._async.begin() as conn:
                tx = _AsyncTx(conn)
                yield tx
                await tx.flush()
                committing = True
        except DBAPIError as exc:
            # No pre-ping (a round trip per transaction): a connection that died while pooled (the
            # server restarted) fails its first statement instead. Before COMMIT, nothing was written.
            if exc.connection_invalidated and not committing:
                raise ConnectionLost("the database connection was lost; nothing was written") from None
            raise
        tx._committed()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Tx]:
        """A read-only transaction (a consistent snapshot; nothing is committed)."""
        if self._reader is not None:
            conn = self._reader.connect()
            raw = _raw(conn)
            try:
                raw.execute("BEGIN")
                yield _SqliteTx(conn)
            finally:
                with suppress(Exception):
                    raw.execute("ROLLBACK")
                conn.close()
            return
        assert self._async is not None
        async with self._async.connect() as reading:
            yield _AsyncTx(reading)

    async def run_sync(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` in a transaction of its own, off the event loop (schema work,
        migrations, bulk maintenance)."""
        if self._writer is not None:
            return await self._writer.run_sync(work)
        assert self._async is not None
        async with self._async.begin() as conn:
            return await conn.run_sync(work)

    async def ping(self) -> None:
        async with self.session() as s:
            await s.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        if self._reader is not None:
            self._reader.dispose()
        if self._async is not None:
            await self._async.dispose()


async def advisory_lock(tx: Tx, *names: str) -> None:
    """Serialise transactions that work on any of `names` until this one ends (PostgreSQL advisory
    transaction locks, taken in a fixed order in one round trip). A no-op on SQLite, whose writers
    are serialised already."""
    if tx.dialect != "postgresql" or not names:
        return
    keys = sorted({int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big", signed=True) for n in names})
    locks = ", ".join(f"pg_advisory_xact_lock(:k{i})" for i in range(len(keys)))
    await tx.execute(text(f"SELECT {locks}"), {f"k{i}": key for i, key in enumerate(keys)})
