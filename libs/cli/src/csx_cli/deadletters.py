"""`csx deadletters`: what a service's consumers parked, and releasing it once the cause is fixed.

Parked events stay in the service's own `dead_letters` table; `replay` marks rows, and the service's
consumer applies them again (through the inbox, so never twice) at its next quiet moment.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

deadletters_app = typer.Typer(
    help="Events a service's consumers could not apply, and replaying them.", no_args_is_help=True
)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DatabaseUrl = Annotated[
    str,
    typer.Option("--database-url", envvar="CSX_DEADLETTERS_DATABASE_URL", help="the service's database"),
]


def _run(url: str, work: Any) -> Any:
    from sqlalchemy import MetaData
    from sqlalchemy.engine.url import make_url

    from csx_common.db import Database
    from csx_common.messaging.tables import DeliveryTables

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        err.print(f"[red]no SQLite database at {parsed.database or '(none)'}[/red]")
        raise typer.Exit(2)

    async def main() -> Any:
        db = Database(url)
        try:
            async with db.transaction() as tx:
                return await work(tx, DeliveryTables(MetaData()).dead_letters)
        finally:
            await db.dispose()

    return asyncio.run(main())


@deadletters_app.command("list")
def list_(
    database_url: DatabaseUrl,
    json_output: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Parked events: ids, consumers, subjects, attempts, error types. Never their contents."""
    from sqlalchemy import select

    async def work(conn: Any, dead: Any) -> list[dict[str, Any]]:
        c = dead.c
        rows = await conn.execute(
            select(
                c.id,
                c.consumer,
                c.subject,
                c.msg_id,
                c.deliveries,
                c.error,
                c.dead_at,
                c.replay_requested_at,
                c.replayed_at,
            ).order_by(c.id)
        )
        return [dict(r._mapping) for r in rows]

    rows = _run(database_url, work)
    for row in rows:
        row["state"] = "replayed" if row["replayed_at"] else "released" if row["replay_requested_at"] else "parked"
    if json_output:
        print(json.dumps(rows, default=str, indent=2))
        return
    table = Table(title=f"Dead letters ({len(rows)})")
    for column in ("id", "consumer", "subject", "deliveries", "error", "dead_at", "state"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[k]) for k in ("id", "consumer", "subject", "deliveries", "error", "dead_at", "state")))
    console.print(table)


@deadletters_app.command("replay")
def replay(
    database_url: DatabaseUrl,
    ids: Annotated[list[int] | None, typer.Argument(help="dead letter ids (see `list`)")] = None,
    all_parked: Annotated[bool, typer.Option("--all", help="every parked event")] = False,
) -> None:
    """Release parked events for the service to apply again (once the cause is fixed)."""
    from sqlalchemy import update

    if not ids and not all_parked:
        err.print("[red]name dead letter ids, or --all[/red]")
        raise typer.Exit(2)

    async def work(conn: Any, dead: Any) -> int:
        c = dead.c
        query = update(dead).where(c.replayed_at.is_(None), c.replay_requested_at.is_(None))
        if ids:
            query = query.where(c.id.in_(ids))
        result = await conn.execute(query.values(replay_requested_at=datetime.now(UTC)))
        return int(result.rowcount)

    released = _run(database_url, work)
    console.print(f"released {released} dead letter(s); the service applies them at its next quiet moment")
