"""Shared fixtures: a real nats-server per test session, and databases on SQLite and (where
CSX_TEST_POSTGRES_URL is set, as in CI) PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine.url import make_url

from csx_common.natsserver import NatsServer

POSTGRES_URL = os.environ.get("CSX_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgres"] if POSTGRES_URL else ["sqlite"]


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats") / "store")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


async def _admin(sql: str) -> None:
    import asyncpg

    url = make_url(POSTGRES_URL)
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class DatabaseFactory:
    """Fresh, empty databases of one backend; PostgreSQL ones are dropped afterwards."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self._tmp = tmp_path
        self.created: list[str] = []

    async def new(self, name: str) -> str:
        if self.backend == "sqlite":
            return f"sqlite+aiosqlite:///{self._tmp / name}.db"
        db_name = f"csx_{name}_{uuid.uuid4().hex[:10]}"
        await _admin(f'CREATE DATABASE "{db_name}"')
        self.created.append(db_name)
        return make_url(POSTGRES_URL).set(database=db_name).render_as_string(hide_password=False)

    async def cleanup(self) -> None:
        for db_name in self.created:
            await _admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(request.param, tmp_path)
    yield factory
    await factory.cleanup()
