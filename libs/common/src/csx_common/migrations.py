"""Alembic, per service, over the kernel's branches.

Each service keeps its own `migrations/` folder, its own revisions and its own version table. The
kernel's tables (outbox, inbox and dead letters, data keys, idempotency keys, disclosure views, the
audit chain) are migrated by the kernel: one Alembic branch per table factory, in
`csx_common/kernel_migrations/<name>/` (branch label `kernel_<name>`). A service's
`migrations/alembic.ini` lists in `version_locations` its own `versions/` and the kernel branches
of the factories its `tables.py` calls, and its base revision `depends_on` those branches, so its
script directory holds exactly the tables its metadata declares (docs/adr/0010).

`upgrade(db, script_location)` runs `alembic upgrade heads` (the service's head and the kernel
branches' heads) on the service's engine from inside asyncio (services run it at start in
development; the Helm chart runs it as a Job). The services' `env.py` is two lines that call
`run_env(metadata)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.ext.asyncio import create_async_engine

from csx_common.db import Database

# The kernel's branches, one folder each; `env.py` and `script.py.mako` beside them serve
# `tools/migrations.py kernel ...`.
KERNEL_MIGRATIONS = Path(__file__).with_name("kernel_migrations")


def alembic_config(script_location: Path, url: str) -> Config:
    """A service's Alembic configuration: its `alembic.ini` (where its revisions and the kernel
    branches it holds are), and the database URL."""
    cfg = Config(str(script_location / "alembic.ini"))
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def kernel_config(url: str, branches: Iterable[str]) -> Config:
    """The kernel's own script directory over the named branches (for writing and checking kernel
    revisions; services reach the same revisions through their `alembic.ini`)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(KERNEL_MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join(str(KERNEL_MIGRATIONS / b) for b in branches))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def upgrade(db: Database, script_location: Path) -> None:
    cfg = alembic_config(script_location, db.url.render_as_string(hide_password=False))

    def run(sync_conn: Any) -> None:
        cfg.attributes["connection"] = sync_conn
        # Every head: the service's branch and each kernel branch are separate lines.
        command.upgrade(cfg, "heads")

    await db.run_sync(run)


def run_env(metadata: MetaData) -> None:
    """The body of a service's migrations/env.py."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection, metadata)
        return
    if context.is_offline_mode():
        context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    import asyncio

    async def online() -> None:
        engine = create_async_engine(context.config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: _run(c, metadata))
            await conn.commit()
        await engine.dispose()

    asyncio.run(online())


def _run(connection: Any, metadata: MetaData) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main(service: str, script_location: Path) -> None:
    """`python -m csx_<service>.migrate`: upgrade the service's database to its heads and exit (the
    compose one-shot `migrate` step and the Helm pre-install/pre-upgrade Job)."""
    import asyncio

    from csx_common.db import Database

    variable = f"CSX_{service.upper()}_DATABASE_URL"
    url = os.environ.get(variable)
    if not url:
        raise SystemExit(f"{variable}: missing")

    async def run() -> None:
        db = Database(url)
        try:
            await upgrade(db, script_location)
        finally:
            await db.dispose()

    asyncio.run(run())
    print(f"{service}: database at head")
