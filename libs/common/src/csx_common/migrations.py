"""Alembic, per service: each service keeps its own `migrations/` folder and version table.

`upgrade(db, script_location)` runs `alembic upgrade head` on the service's engine from inside
asyncio (services run it at start in development; the Helm chart runs it as a Job). The
services' `env.py` is two lines that call `run_env(metadata)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.ext.asyncio import create_async_engine

from csx_common.db import Database


def alembic_config(script_location: Path, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def upgrade(db: Database, script_location: Path) -> None:
    cfg = alembic_config(script_location, db.url.render_as_string(hide_password=False))

    def run(sync_conn: Any) -> None:
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "head")

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
    """`python -m csx_<service>.migrate`: upgrade the service's database to head and exit (the
    compose one-shot `migrate` step and the Helm pre-install/pre-upgrade Job)."""
    import asyncio
    import os

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
