"""`csx audit`: prove a service's audit chain untampered, and answer "who saw what about this child".

    csx audit verify [--data-dir var] [--json]      every service of the local stack
    csx audit verify --database-url URL --public-key FILE [--public-key OLD_FILE] [--json]
    csx audit child CHILD_ID --database-url URL [--json]
    csx audit checkpoint --database-url URL --signing-key FILE
    csx audit keygen FILE

`verify` exits 0 when the chain is intact, 1 with the first broken entry, 2 when it cannot check
(bad key file, no such database, no audit tables). Without --database-url and --public-key it
checks the four services of the stack `make run` / `csx up` runs (<data dir>/<service>.db against
<data dir>/pki/audit/<service>.key.pub), one line each: 1 if any chain is broken, else 2 if any
could not be checked. `verify` and `child` only read: they open their
own engine without taking SQLite's write lock, so they are safe beside a running service.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.table import Table

audit_app = typer.Typer(
    help="The tamper-evident audit chain of a service's database.",
    no_args_is_help=True,
)

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_BROKEN = 1
EXIT_CANNOT_CHECK = 2

T = TypeVar("T")

DatabaseUrl = Annotated[
    str,
    typer.Option(
        "--database-url",
        envvar="CSX_AUDIT_DATABASE_URL",
        help="the service's database, e.g. sqlite+aiosqlite:///var/referrals.db",
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="machine-readable output")]


class CannotCheck(Exception):
    pass


def _shown(url: str) -> str:
    from sqlalchemy.engine.url import make_url

    return make_url(url).render_as_string(hide_password=True)


def _check_url(url: str) -> None:
    from sqlalchemy.engine.url import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise CannotCheck(f"not a database URL: {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        # Never create an empty database by reading one that is not there.
        if not database or database == ":memory:" or not Path(database).is_file():
            raise CannotCheck(f"no SQLite database at {database or '(none)'}")


def _run_read(url: str, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Run `work(session, audit_log)` on a read-only session of its own engine."""
    from sqlalchemy import MetaData
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from csx_common.audit import AuditLog, audit_tables
    from csx_common.db import Database

    _check_url(url)

    async def main() -> T:
        try:
            db = Database(url)
        except (SQLAlchemyError, ImportError) as exc:
            raise CannotCheck(f"cannot use {_shown(url)}: {exc}") from None
        try:
            async with db.session() as session:
                return await work(session, AuditLog(audit_tables(MetaData())))
        except (DBAPIError, SQLAlchemyError, OSError) as exc:
            raise CannotCheck(f"cannot read the audit tables at {_shown(url)}: {type(exc).__name__}") from None
        finally:
            await db.dispose()

    return asyncio.run(main())


def _agency(value: int) -> str:
    try:
        from csx.types.v1 import types_pb2

        # Name() is typed for the enum's NewType; any int is accepted (ValueError if unknown).
        return types_pb2.Agency.Name(cast("types_pb2.Agency.ValueType", value)).removeprefix("AGENCY_").lower()
    except (ImportError, ValueError):
        return str(value)


# --------------------------------------------------------------------------------------------
# csx audit verify
# --------------------------------------------------------------------------------------------


def _verify_one(url: str, keys: list[Any], batch_size: int) -> Any:
    """The VerifyReport of one database's chain; CannotCheck when it cannot be read."""

    async def work(session: Any, audit: Any) -> Any:
        return await audit.verify(session, keys, batch_size=batch_size)

    return _run_read(url, work)


def _intact_summary(report: Any) -> str:
    latest = (
        f"latest at entry {report.last_checkpoint_seq}, {report.unanchored} entries after it"
        if report.checkpoints
        else "none"
    )
    return f"{report.entries} entries, {report.checkpoints} signed checkpoints ({latest}); {report.seconds:.2f}s"


@audit_app.command("verify")
def verify(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="CSX_AUDIT_DATABASE_URL",
            help="one service's database, e.g. sqlite+aiosqlite:///var/referrals.db (with --public-key); "
            "without both, every service of the local stack under --data-dir",
        ),
    ] = None,
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--public-key",
            help="Ed25519 public key (PEM) that signs checkpoints; repeat for keys rotated out",
        ),
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            envvar="CSX_DATA_DIR",
            help="the local stack's data directory (`csx up`): <service>.db and pki/audit/<service>.key.pub",
        ),
    ] = Path("var"),
    json_output: JsonOutput = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="entries read per query")] = 2000,
) -> None:
    """Walk the chain from entry 1. Exit 0 if intact, 1 with the first broken entry, 2 if it cannot check.

    Without --database-url and --public-key: every service of the local stack under --data-dir.

    One line per service; exit 1 if any chain is broken, else 2 if any could not be checked.
    """
    if database_url is None and not public_key:
        _verify_local_stack(data_dir, json_output, batch_size)
        return
    if database_url is None or not public_key:
        err.print(
            "[red]give both --database-url and --public-key for one database, or neither to verify "
            "every service of the local stack (--data-dir)[/red]"
        )
        raise typer.Exit(EXIT_CANNOT_CHECK)

    from csx_common.audit import load_public_key

    try:
        keys = [load_public_key(p) for p in public_key]
    except (OSError, ValueError) as exc:
        err.print(f"[red]cannot load the public key:[/red] {exc}")
        raise typer.Exit(EXIT_CANNOT_CHECK) from None

    try:
        report = _verify_one(database_url, keys, batch_size)
    except CannotCheck as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_CANNOT_CHECK) from None

    if json_output:
        print(json.dumps(report.to_json(), indent=2))
    elif report.ok:
        console.print(f"[green]audit chain intact[/green]: {_intact_summary(report)}")
        for warning in report.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}")
    else:
        console.print(f"[red]audit chain BROKEN at entry {report.broken_seq}[/red] ({report.kind}): {report.problem}")
        console.print(f"{report.entries} entries and {report.checkpoints} checkpoints before it verified")
    raise typer.Exit(0 if report.ok else EXIT_BROKEN)


def _verify_local_stack(data_dir: Path, json_output: bool, batch_size: int) -> None:
    """Every service's chain in the local stack's databases, against its own checkpoint key."""
    from csx_cli.stack import SERVICES, local_audit_signing_key, local_database_url
    from csx_common.audit import AuditSigner, load_public_key

    results: dict[str, Any] = {}
    broken = cannot = False
    width = max(len(name) for name in SERVICES)
    for name in SERVICES:
        url = local_database_url(data_dir, name)
        key_file = AuditSigner.public_path(local_audit_signing_key(data_dir, name))
        try:
            try:
                keys = [load_public_key(key_file)]
            except (OSError, ValueError) as exc:
                raise CannotCheck(f"cannot load the public key {key_file}: {exc}") from None
            report = _verify_one(url, keys, batch_size)
        except CannotCheck as exc:
            cannot = True
            results[name] = {"ok": False, "error": str(exc), "database_url": url, "public_key": str(key_file)}
            if not json_output:
                console.print(f"{name:<{width}}  [red]cannot check[/red]: {exc}")
            continue
        results[name] = {**report.to_json(), "database_url": url, "public_key": str(key_file)}
        broken = broken or not report.ok
        if json_output:
            continue
        if report.ok:
            console.print(f"{name:<{width}}  [green]intact[/green]: {_intact_summary(report)}")
            for warning in report.warnings:
                console.print(f"{'':<{width}}  [yellow]warning:[/yellow] {warning}")
        else:
            console.print(
                f"{name:<{width}}  [red]BROKEN at entry {report.broken_seq}[/red] ({report.kind}): {report.problem}"
            )
    if json_output:
        print(json.dumps(results, indent=2))
    if broken:
        raise typer.Exit(EXIT_BROKEN)
    if cannot:
        if not json_output:
            err.print(f"(data directory {data_dir.resolve()}: is this where `csx up` ran? see --data-dir)")
        raise typer.Exit(EXIT_CANNOT_CHECK)
    raise typer.Exit(0)


# --------------------------------------------------------------------------------------------
# csx audit child
# --------------------------------------------------------------------------------------------


@audit_app.command("child")
def child(
    child_id: Annotated[str, typer.Argument(help="the child's pseudonymous id")],
    database_url: DatabaseUrl,
    json_output: JsonOutput = False,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="at most this many entries")] = None,
) -> None:
    """Who saw (or was refused) what about this child, when and why, oldest first."""
    from csx_common.audit import AuditRecord

    async def work(session: Any, audit: Any) -> list[AuditRecord]:
        records: list[AuditRecord] = await audit.child_history(session, child_id, limit=limit)
        return records

    try:
        records = _run_read(database_url, work)
    except CannotCheck as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_CANNOT_CHECK) from None

    if json_output:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return
    if not records:
        console.print(f"no audit entries about child {child_id}")
        return
    table = Table(title=f"Audit history of child {child_id}")
    for column in (
        "seq",
        "at (UTC)",
        "user",
        "agency",
        "role",
        "purpose",
        "action",
        "record",
        "fields",
        "decision",
        "rule",
        "lawful basis",
    ):
        table.add_column(column, justify="right" if column == "seq" else "left")
    for r in records:
        decision = f"[green]{r.decision}[/green]" if r.decision == "allow" else f"[red]{r.decision}[/red]"
        table.add_row(
            str(r.seq),
            r.at.strftime("%Y-%m-%d %H:%M:%S"),
            r.actor_user_id,
            _agency(r.actor_agency),
            r.actor_role,
            r.purpose,
            r.action,
            f"{r.record_type}/{r.record_id}" if r.record_id else r.record_type,
            ", ".join(r.field_names),
            decision,
            r.rule_id,
            r.lawful_basis,
        )
    console.print(table)
    console.print(f"{len(records)} entries; [dim]`csx audit verify` proves them untampered[/dim]")


# --------------------------------------------------------------------------------------------
# csx audit breakglass
# --------------------------------------------------------------------------------------------

EXIT_OVERDUE = 1


@audit_app.command("breakglass")
def breakglass(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="CSX_REFERRALS_DATABASE_URL",
            help="the referrals database (default: the local stack's, under --data-dir)",
        ),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="CSX_DATA_DIR", help="the local stack's data directory")
    ] = Path("var"),
    overdue: Annotated[
        bool, typer.Option("--overdue", help="only grants whose review is past due (72 hours); exit 1 if any")
    ] = False,
    json_output: JsonOutput = False,
) -> None:
    """Break-glass grants and their reviews: who, which child, when, and whether a second person has
    reviewed it (due within 72 hours). With --overdue, for an alert: the overdue ones, exit 1 if any."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from csx_cli.stack import local_database_url

    url = database_url or local_database_url(data_dir, "referrals")
    now = datetime.now(UTC)

    async def work(session: Any, _audit: Any) -> list[dict[str, Any]]:
        rows = await session.execute(
            text(
                "SELECT grant_id, child_id, user_id, agency, granted_at, expires_at, review_due_at, "
                "reviewed_by, reviewed_at, review_outcome FROM break_glass_grants ORDER BY granted_at"
            )
        )
        return [dict(row._mapping) for row in rows]

    try:
        rows = _run_read(url, work)
    except CannotCheck as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_CANNOT_CHECK) from None

    def at(value: Any) -> datetime:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    grants = []
    for row in rows:
        late = row["reviewed_at"] is None and at(row["review_due_at"]) < now
        if overdue and not late:
            continue
        grants.append(
            {
                "grant_id": row["grant_id"],
                "child_id": row["child_id"],
                "user_id": row["user_id"],
                "agency": _agency(row["agency"]),
                "granted_at": at(row["granted_at"]).isoformat(),
                "review_due_at": at(row["review_due_at"]).isoformat(),
                "reviewed_by": row["reviewed_by"] or "",
                "reviewed_at": at(row["reviewed_at"]).isoformat() if row["reviewed_at"] else "",
                "overdue": late,
            }
        )
    late_count = sum(g["overdue"] for g in grants)
    if json_output:
        print(json.dumps({"grants": grants, "overdue": late_count}, indent=2))
    else:
        table = Table(title="Break-glass grants" + (" with overdue reviews" if overdue else ""))
        for column in ("grant", "user", "agency", "child", "granted (UTC)", "review due", "reviewed by"):
            table.add_column(column)
        for g in grants:
            due = f"[red]{g['review_due_at'][:16]} OVERDUE[/red]" if g["overdue"] else g["review_due_at"][:16]
            table.add_row(
                g["grant_id"], g["user_id"], g["agency"], g["child_id"], g["granted_at"][:16], due, g["reviewed_by"]
            )
        console.print(table)
        console.print(f"{len(grants)} grants; {late_count} reviews overdue (due within 72 hours of the grant)")
    if overdue and late_count:
        raise typer.Exit(EXIT_OVERDUE)


# --------------------------------------------------------------------------------------------
# csx audit checkpoint / keygen
# --------------------------------------------------------------------------------------------


@audit_app.command("checkpoint")
def checkpoint(
    database_url: DatabaseUrl,
    signing_key: Annotated[
        Path, typer.Option("--signing-key", help="Ed25519 private key (PEM), see `csx audit keygen`")
    ],
    json_output: JsonOutput = False,
) -> None:
    """Sign the chain's current head now (services also do this periodically)."""
    from sqlalchemy import MetaData
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from csx_common.audit import AuditLog, AuditSigner, Checkpoint, audit_tables
    from csx_common.db import Database

    try:
        signer = AuditSigner.load(signing_key)
        _check_url(database_url)
    except (OSError, ValueError, CannotCheck) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_CANNOT_CHECK) from None

    async def main() -> Checkpoint | None:
        db = Database(database_url)
        try:
            async with db.transaction() as session:
                return await AuditLog(audit_tables(MetaData())).checkpoint(session, signer)
        except (DBAPIError, SQLAlchemyError, OSError) as exc:
            raise CannotCheck(f"cannot write a checkpoint at {_shown(database_url)}: {type(exc).__name__}") from None
        finally:
            await db.dispose()

    try:
        cp = asyncio.run(main())
    except CannotCheck as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_CANNOT_CHECK) from None
    if json_output:
        print(json.dumps(None if cp is None else cp.to_json(), indent=2))
    elif cp is None:
        console.print("the chain is empty: nothing to sign")
    else:
        console.print(f"checkpoint at entry {cp.seq}: {cp.hash} signed by key {cp.key_id}")


@audit_app.command("keygen")
def keygen(
    path: Annotated[Path, typer.Argument(help="private key file (PEM); the public key goes to FILE.pub")],
) -> None:
    """Create a checkpoint-signing key (kept if it already exists) and print its id."""
    from csx_common.audit import AuditSigner

    existed = path.exists()
    try:
        signer = AuditSigner.load_or_create(path)
    except (OSError, ValueError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_CANNOT_CHECK) from None
    if existed and not AuditSigner.public_path(path).exists():
        AuditSigner.public_path(path).write_bytes(signer.public_pem())
    console.print(
        f"{'existing' if existed else 'new'} key {signer.key_id}; public key: {AuditSigner.public_path(path)}"
    )
