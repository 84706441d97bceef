"""The kernel's branches under every service's migrations (docs/adr/0010), on SQLite and (where
CSX_TEST_POSTGRES_URL is set) PostgreSQL, each test on databases of its own:

- a fresh database reaches every head and matches the service's metadata (alembic check);
- a database built by the revisions from before the kernel's branches (fixtures/before_kernel), with
  a row in every table, upgrades to today's heads with every row intact, passes alembic check, and
  then has the same schema and version table as a fresh one;
- a later kernel revision reaches old and fresh databases alike.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from csx_common.db import Database
from csx_common.migrations import KERNEL_MIGRATIONS, alembic_config, upgrade
from tests.conftest import DatabaseFactory

SERVICES = ("referrals", "panel", "conferences", "actionplans")
FIXTURES = Path(__file__).parent / "fixtures" / "before_kernel"


def migrations(service: str) -> Path:
    return Path(importlib.import_module(f"csx_{service}.migrate").__file__).parent / "migrations"  # type: ignore[arg-type]


def before_kernel(service: str, url: str) -> Config:
    """The service's revisions as they were before the kernel's branches."""
    cfg = Config()
    cfg.set_main_option("script_location", str(FIXTURES))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(FIXTURES / service / "migrations" / "versions"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def on(url: str, work: Callable[[Connection], Any]) -> Any:
    db = Database(url)
    try:
        return await db.run_sync(work)
    finally:
        await db.dispose()


async def alembic(url: str, cfg: Config, work: Callable[[Config], None]) -> None:
    def run(conn: Connection) -> None:
        cfg.attributes["connection"] = conn
        work(cfg)

    await on(url, run)


async def migrate(url: str, service: str) -> None:
    """What the service does at start and `python -m csx_<service>.migrate` does."""
    db = Database(url)
    try:
        await upgrade(db, migrations(service))
    finally:
        await db.dispose()


async def old_head(databases: DatabaseFactory, service: str) -> str:
    """A database made by the service's revisions from before the kernel's branches, a row in
    every table."""
    url = await databases.new(f"{service}_old")
    await alembic(url, before_kernel(service, url), lambda cfg: command.upgrade(cfg, "head"))
    await on(url, fill)
    return url


def check(service: str, url: str) -> Callable[[Connection], None]:
    def run(conn: Connection) -> None:
        cfg = alembic_config(migrations(service), url)
        cfg.attributes["connection"] = conn
        command.check(cfg)

    return run


# --- what a database holds ---------------------------------------------------------------------


def versions(conn: Connection) -> set[str]:
    return {r[0] for r in conn.execute(sa.text("SELECT version_num FROM alembic_version"))}


def schema(conn: Connection) -> dict[str, Any]:
    """Tables, columns, keys, indexes, constraints and triggers, order aside."""
    inspector = sa.inspect(conn)
    out: dict[str, Any] = {}
    for table in inspector.get_table_names():
        if table == "alembic_version":
            continue
        out[table] = {
            "columns": {
                c["name"]: (str(c["type"]), c["nullable"], str(c.get("default"))) for c in inspector.get_columns(table)
            },
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted(
                (
                    i["name"],
                    tuple(i["column_names"]),
                    bool(i["unique"]),
                    sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                )
                for i in inspector.get_indexes(table)
            ),
            "unique": sorted(
                (str(u["name"]), tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)
            ),
            "foreign_keys": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                for f in inspector.get_foreign_keys(table)
            ),
            "checks": sorted((str(c["name"]), c["sqltext"]) for c in inspector.get_check_constraints(table)),
        }
    if conn.dialect.name == "sqlite":
        triggers = conn.execute(sa.text("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"))
    else:
        triggers = conn.execute(
            sa.text(
                "SELECT t.tgname, c.relname, pg_get_triggerdef(t.oid) FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal"
            )
        )
    out["triggers"] = sorted(tuple(r) for r in triggers)
    return out


SAMPLES: dict[type, Any] = {
    int: 1,  # 1 also satisfies audit_head's single-row check
    str: "x",
    bool: True,
    bytes: b"\x00\xff",
    datetime: datetime(2026, 12, 3, 9, 30, tzinfo=UTC),
    date: date(2026, 12, 3),
}


def sample(column: sa.Column[Any]) -> Any:
    return {"k": ["v"]} if isinstance(column.type, sa.JSON) else SAMPLES[column.type.python_type]


def fill(conn: Connection) -> None:
    """One row in every table (in foreign-key order; every key column is "x" or 1, so they meet)."""
    metadata = sa.MetaData()
    metadata.reflect(conn)
    for table in metadata.sorted_tables:
        if table.name != "alembic_version":
            conn.execute(table.insert().values({c.name: sample(c) for c in table.columns}))


def rows(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    metadata = sa.MetaData()
    metadata.reflect(conn)
    return {
        table.name: [dict(r._mapping) for r in conn.execute(sa.select(table))]
        for table in metadata.sorted_tables
        if table.name != "alembic_version"
    }


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("service", SERVICES)
async def test_a_fresh_database_reaches_every_head_and_matches_the_metadata(
    service: str, databases: DatabaseFactory
) -> None:
    url = await databases.new(f"{service}_fresh")
    await migrate(url, service)
    await migrate(url, service)  # a second run is a no-op
    await on(url, check(service, url))
    tables = await on(url, lambda c: set(sa.inspect(c).get_table_names()))
    assert {"outbox", "inbox", "dead_letters", "data_keys", "audit_log", "audit_head", "audit_checkpoints"} <= tables


@pytest.mark.postgres
@pytest.mark.parametrize("service", SERVICES)
async def test_a_database_from_before_the_kernel_branches_upgrades_with_every_row(
    service: str, databases: DatabaseFactory
) -> None:
    old = await old_head(databases, service)
    before = await on(old, rows)
    assert all(len(r) == 1 for r in before.values()), before

    await migrate(old, service)

    after = await on(old, rows)
    kept = {
        table: [{k: row[k] for k in old_row} for row, old_row in zip(after[table], before[table], strict=True)]
        for table in before
    }
    assert kept == before  # every row kept (with the columns it had; columns added since are new)
    added = after.keys() - before.keys()
    if "conference_referrals" in added:  # backfilled: the referral each existing conference took
        (conference,) = before["conferences"]
        taken = {"referral_id": conference["referral_id"], "conference_id": conference["conference_id"]}
        assert after["conference_referrals"] == [taken]
    assert all(not after[table] for table in added - {"conference_referrals"})  # the others: empty
    await on(old, check(service, old))
    fresh = await databases.new(f"{service}_new")
    await migrate(fresh, service)
    assert await on(old, versions) == await on(fresh, versions)
    assert await on(old, schema) == await on(fresh, schema)


INBOX_NOTE = '''
"""inbox note (a test's)"""

import sqlalchemy as sa
from alembic import op

revision = "0123456789ab"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbox") as batch_op:
        batch_op.add_column(sa.Column("note", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox") as batch_op:
        batch_op.drop_column("note")
'''


@pytest.mark.postgres
@pytest.mark.parametrize("service", SERVICES)
async def test_a_later_kernel_revision_reaches_old_and_fresh_databases(
    service: str, databases: DatabaseFactory, tmp_path: Path
) -> None:
    kernel = tmp_path / "kernel_migrations"
    shutil.copytree(KERNEL_MIGRATIONS, kernel, ignore=shutil.ignore_patterns("__pycache__"))
    [first] = (kernel / "delivery").glob("*.py")
    head = first.name.split("_")[0]
    (kernel / "delivery" / "0123456789ab_inbox_note.py").write_text(INBOX_NOTE.format(head=head))

    def later(url: str) -> Config:
        cfg = alembic_config(migrations(service), url)
        locations = [
            str(kernel / loc.split("/")[-1]) if loc.startswith("csx_common:") else loc
            for loc in cfg.get_version_locations_list() or []
        ]
        cfg.set_main_option("version_locations", "\n".join(locations))
        return cfg

    old = await old_head(databases, service)
    fresh = await databases.new(f"{service}_new")
    for url in (old, fresh):
        await alembic(url, later(url), lambda cfg: command.upgrade(cfg, "heads"))
        columns = await on(url, lambda c: {col["name"] for col in sa.inspect(c).get_columns("inbox")})
        assert "note" in columns
        assert "0123456789ab" in await on(url, versions)
    assert await on(old, versions) == await on(fresh, versions)
    assert len((await on(old, rows))["inbox"]) == 1


@pytest.mark.postgres
async def test_a_database_at_an_older_revision_is_refused_rather_than_upgraded_wrongly(
    databases: DatabaseFactory,
) -> None:
    url = await databases.new("referrals_older")
    # Before per-child data keys: the folded revisions are gone, so Alembic cannot place it.
    await alembic(url, before_kernel("referrals", url), lambda cfg: command.upgrade(cfg, "4ab5cbf7d043"))
    with pytest.raises(CommandError, match="4ab5cbf7d043"):
        await migrate(url, "referrals")
    assert await on(url, versions) == {"4ab5cbf7d043"}
