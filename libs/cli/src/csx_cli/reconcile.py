"""`csx reconcile run`: compare every producer's published outbox with every consumer's inbox and
republish what a consumer never received (csx_common.messaging.reconcile; docs/reliability.md).

Databases are the local stack's (`<data dir>/<service>.db`) unless `--database SERVICE=URL` says
otherwise. NATS: each producer's stream is reconciled as that producer's own NATS user (it may
publish only `csx.<service>.>`), and consumers' ack floors are read as the `operator` user — both
with the passwords under the stack's PKI folder (`<data dir>/pki/nats`, or CSX_PKI_DIR). Without
those files it connects without credentials (a broker without authorization).

Exit 0 when nothing needs a person; 1 when anything failed, is too old to republish, could not be
checked — or, with --dry-run, when anything is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from csx_cli.stack import CONSUMES, SERVICES, default_nats_url
from csx_common.messaging.topology import topology

reconcile_app = typer.Typer(
    help="Find events a consumer never received (broker loss) and republish them.", no_args_is_help=True
)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# The subjects each durable consumer handles, as the contracts declare it: its routes' subjects,
# which are also its filter subjects (csx_common.messaging.topology).
DURABLE_SUBJECTS: dict[str, tuple[str, ...]] = {d.name: d.subjects for d in topology().durables}
# Streams fed by a service's outbox (the intake stream is fed by agencies and has none).
PRODUCER_OF_STREAM = {topology().stream(s).name: s for s in SERVICES}


def pairs(producers: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(producer, consuming service, durable) for every durable on a producer's stream."""
    out = []
    for c in CONSUMES:
        producer = PRODUCER_OF_STREAM.get(c.stream)
        if producer and (not producers or producer in producers):
            out.append((producer, c.service, c.durable))
    return out


def _database_urls(data_dir: Path, overrides: list[str]) -> dict[str, str]:
    urls = {name: f"sqlite+aiosqlite:///{data_dir / f'{name}.db'}" for name in SERVICES}
    for item in overrides:
        name, sep, url = item.partition("=")
        if not sep or name not in SERVICES or not url:
            err.print(f"[red]--database wants SERVICE=URL with SERVICE one of {', '.join(SERVICES)}: {item!r}[/red]")
            raise typer.Exit(2)
        urls[name] = url
    return urls


def _missing_sqlite(url: str) -> str:
    from sqlalchemy.engine.url import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        return f"no SQLite database at {parsed.database or '(none)'}"
    return ""


async def _connect(nats_url: str, user: str, nats_dir: Path, seconds: float) -> Any:
    import nats

    from csx_common.natsauth import DevNatsAuth, inbox_prefix

    password_file = DevNatsAuth(nats_dir).password_file(user)
    login = (
        {"user": user, "password": password_file.read_text().strip(), "inbox_prefix": inbox_prefix(user)}
        if password_file.exists()
        else {}
    )

    async def quiet(_exc: Exception) -> None:
        return None

    return await asyncio.wait_for(
        nats.connect(
            nats_url,
            name=f"csx-reconcile-{user}",
            connect_timeout=seconds,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=quiet,
            **login,
        ),
        seconds + 1,
    )


def _stderr_logger() -> Any:
    """JSON lines on stderr (which events were republished, by id), without touching the process's
    global logging configuration: stdout stays the report's."""
    import structlog

    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
    ).bind(logger="csx.reconcile")


async def run_all(
    *,
    urls: dict[str, str],
    nats_url: str,
    nats_dir: Path,
    settle: float,
    dry_run: bool,
    lookback: float | None,
    producers: list[str] | None,
    timeout: float = 5.0,  # noqa: ASYNC109 - seconds per broker request, not this call's deadline
) -> Any:
    """Reconcile every (producer, durable) pair of the stack (or of `producers`); a ReconcileReport.
    `urls`: each service's database; `nats_dir`: the NATS users' password files (none: no login)."""
    from csx_common.db import Database
    from csx_common.messaging.reconcile import Consumer, PairReport, Producer, ReconcileReport, reconcile

    report = ReconcileReport(dry_run=dry_run, settle=settle)
    plan = pairs(producers)
    logger = _stderr_logger()
    databases: dict[str, Database] = {}
    problems = {name: _missing_sqlite(url) for name, url in urls.items()}

    def database(name: str) -> Database:
        if name not in databases:
            databases[name] = Database(urls[name])
        return databases[name]

    operator = None
    with contextlib.suppress(Exception):
        operator = await _connect(nats_url, "operator", nats_dir, timeout)
    try:
        for producer in dict.fromkeys(p for p, _, _ in plan):
            mine = [(service, durable) for p, service, durable in plan if p == producer]
            broken = {durable: problems[service] for service, durable in mine if problems[service]}
            unknown = "subjects unknown (no contract declares this durable)"
            broken |= {durable: unknown for _, durable in mine if durable not in DURABLE_SUBJECTS}
            if problems[producer]:
                broken = {durable: problems[producer] for _, durable in mine}
            consumers = [
                Consumer(durable, database(service), DURABLE_SUBJECTS[durable])
                for service, durable in mine
                if durable not in broken
            ]
            report.pairs += [PairReport(producer, durable, error=why) for durable, why in broken.items()]
            if not consumers:
                continue
            try:
                nc = await _connect(nats_url, producer, nats_dir, timeout)
            except Exception as exc:
                why = f"NATS at {nats_url}: {type(exc).__name__}"
                report.pairs += [PairReport(producer, c.durable, error=why) for c in consumers]
                continue
            try:
                result = await reconcile(
                    Producer(producer, database(producer), f"CSX_{producer.upper()}"),
                    consumers,
                    nc.jetstream(timeout=timeout),
                    settle=settle,
                    dry_run=dry_run,
                    lookback=lookback,
                    consumer_js=operator.jetstream(timeout=timeout) if operator else None,
                    publish_timeout=timeout,
                    logger=logger,
                )
                report.extend(result)
            except Exception as exc:
                why = f"{type(exc).__name__}"
                report.pairs += [PairReport(producer, c.durable, error=why) for c in consumers]
            finally:
                with contextlib.suppress(Exception):
                    await nc.close()
    finally:
        if operator is not None:
            with contextlib.suppress(Exception):
                await operator.close()
        for db in databases.values():
            await db.dispose()
    return report


@reconcile_app.command("run")
def run(
    settle: Annotated[
        float, typer.Option("--settle", help="seconds since publication before an absent event counts as missing")
    ] = 30.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what is missing; publish nothing")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="CSX_DATA_DIR", help="the local stack's data directory")
    ] = Path("var"),
    database: Annotated[
        list[str] | None, typer.Option("--database", help="SERVICE=URL, instead of <data dir>/<service>.db")
    ] = None,
    nats_url: Annotated[str | None, typer.Option("--nats-url", help="[env CSX_NATS_URL]")] = None,
    lookback_hours: Annotated[
        float | None, typer.Option("--lookback-hours", help="only events published within this many hours")
    ] = None,
    producer: Annotated[
        list[str] | None, typer.Option("--producer", help="only this producer's stream (repeatable)")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds per broker request")] = 5.0,
) -> None:
    """Compare each producer's published outbox with each consumer's inbox; republish what is missing."""
    for name in producer or ():
        if name not in SERVICES:
            err.print(f"[red]unknown producer {name!r} (known: {', '.join(SERVICES)})[/red]")
            raise typer.Exit(2)
    urls = _database_urls(data_dir, database or [])
    pki_root = Path(os.environ.get("CSX_PKI_DIR") or data_dir / "pki")
    report = asyncio.run(
        run_all(
            urls=urls,
            nats_url=nats_url or default_nats_url(),
            nats_dir=pki_root / "nats",
            settle=settle,
            dry_run=dry_run,
            lookback=lookback_hours * 3600 if lookback_hours is not None else None,
            producers=producer,
            timeout=timeout,
        )
    )
    if json_output:
        print(json.dumps(report.to_json(), indent=2))
        raise typer.Exit(0 if report.ok else 1)
    kinds = ("checked", "missing", "republished", "pending", "parked", "too_old", "failed")
    table = Table(title="Reconciliation" + (" (dry run: nothing republished)" if dry_run else ""))
    table.add_column("producer", no_wrap=True)
    table.add_column("consumer", no_wrap=True)
    for kind in kinds:
        table.add_column(kind.replace("_", " "), justify="right")
    for p in report.pairs:
        table.add_row(p.producer, p.consumer, *(str(getattr(p, k)) for k in kinds))
    console.print(table)
    for p in report.pairs:
        if p.error:
            err.print(f"[red]{p.producer} -> {p.consumer}:[/red] {p.error}")
    if report.ok:
        republished = report.total("republished")
        console.print("[green]nothing lost[/green]" + (f" ({republished} republished)" if republished else ""))
        raise typer.Exit(0)
    console.print("[red]needs attention:[/red] failed, too old or unchecked" + (", or missing" if dry_run else ""))
    raise typer.Exit(1)
