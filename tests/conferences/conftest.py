"""Fixtures for the conferences service: a migrated database on each test backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from conferences_support import Clock, Harness, make_service

from csx_common.db import Database
from csx_common.keyring import FileKeyring
from csx_common.migrations import upgrade
from csx_conferences.app import MIGRATIONS


@pytest.fixture
async def harness(databases, tmp_path) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    url = await databases.new("conferences")
    db = Database(url)
    await upgrade(db, MIGRATIONS)
    keyring = FileKeyring.create(tmp_path / "keyring.json")
    clock = Clock()
    notified: list[int] = []
    yield Harness(db, url, make_service(db, keyring, clock, notified), clock, keyring, notified)
    await db.dispose()
