"""`csx keys`: the key-encryption keys of a keyring, and rotating them while the services run.

    csx keys status [--keyring FILE] [--database SERVICE=URL ...] [--json]
    csx keys rotate [--keyring FILE] [--database SERVICE=URL ...] [--batch N] [--grace S] [--json]

Without options both work on the local stack (`csx up`): its keyring (var/keyring.json) and the four
services' databases. With `--database`, exactly the databases given are used: list every database
whose data keys the keyring wraps, because a rotation destroys the old KEK once none of *those*
references it. See docs/keys.md.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar
from rich.table import Table

keys_app = typer.Typer(help="Key-encryption keys: status and rotation without downtime.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_FAILED = 1
EXIT_USAGE = 2

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="CSX_DATA_DIR", help="the local stack's data directory (for the defaults)"),
]
KeyringFile = Annotated[
    Path | None,
    typer.Option("--keyring", help="the keyring file (default: <data-dir>/keyring.json)", dir_okay=False),
]
Databases = Annotated[
    list[str] | None,
    typer.Option(
        "--database",
        help="SERVICE=URL, repeatable; every database the keyring's KEKs wrap keys for "
        "(default: the local stack's four)",
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _targets(data_dir: Path, keyring: Path | None, databases: list[str] | None) -> tuple[Path, dict[str, str]]:
    urls: dict[str, str] = {}
    for item in databases or []:
        service, sep, url = item.partition("=")
        if not sep or not service.strip() or not url.strip():
            err.print(f"[red]--database takes SERVICE=URL, not {item!r}[/red]")
            raise typer.Exit(EXIT_USAGE)
        if service.strip() in urls:
            err.print(f"[red]--database {service.strip()} given twice[/red]")
            raise typer.Exit(EXIT_USAGE)
        urls[service.strip()] = url.strip()
    if keyring is not None and urls:
        return keyring, urls
    from csx_cli.stack import SERVICES, Stack, StackConfig, StackError

    try:
        stack = Stack(StackConfig(data_dir=data_dir))
    except StackError as exc:
        err.print(f"[red]{exc}[/red] (or give --keyring and --database)")
        raise typer.Exit(EXIT_USAGE) from None
    return keyring or stack.keyring_file, urls or {name: stack.database_url(name) for name in SERVICES}


def _shown(url: str) -> str:
    from sqlalchemy.engine.url import make_url

    return make_url(url).render_as_string(hide_password=True)


@keys_app.command("status")
def status(
    data_dir: DataDir = Path("var"),
    keyring: KeyringFile = None,
    databases: Databases = None,
    json_output: JsonOutput = False,
) -> None:
    """Each KEK (id, state, created) with the live data keys it wraps in each database, and the
    rotation in progress, if any."""
    from csx_cli.rotation import RotationError, key_status

    keyring_path, urls = _targets(data_dir, keyring, databases)
    try:
        result = asyncio.run(key_status(keyring_path, urls))
    except RotationError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_FAILED) from None
    if json_output:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"Key-encryption keys in {result['keyring']}")
    table.add_column("kek", no_wrap=True, min_width=16)
    table.add_column("state", no_wrap=True, min_width=9)
    table.add_column("created (UTC)", no_wrap=True, min_width=16)
    table.add_column("live data keys")
    for kek in result["keks"]:
        style = {"primary": "green", "enabled": "yellow", "destroyed": "dim"}.get(kek["state"], "")
        table.add_row(
            kek["id"],
            f"[{style}]{kek['state']}[/{style}]",
            kek["created_at"][:16].replace("T", " "),
            " · ".join(f"{s} {n}" for s, n in kek["data_keys"].items()),
        )
    console.print(table)
    console.print("live data keys per database: " + ", ".join(f"{s}={_shown(u)}" for s, u in urls.items()))
    rotation = result["rotation"]
    if rotation:
        console.print(
            f"[yellow]rotation in progress[/yellow] from {rotation.get('from')} to {rotation.get('to')}: "
            "run `csx keys rotate` to finish it"
        )
    else:
        console.print("no rotation in progress")
    for kek_id, per_service in result["unknown_keks"].items():
        counts = ", ".join(f"{s}: {n}" for s, n in per_service.items())
        err.print(f"[red]data keys wrapped by {kek_id}, which the keyring does not hold:[/red] {counts}")


@keys_app.command("rotate")
def rotate(
    data_dir: DataDir = Path("var"),
    keyring: KeyringFile = None,
    databases: Databases = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="data keys re-wrapped per transaction")] = 200,
    grace: Annotated[
        float,
        typer.Option("--grace", min=0.0, help="seconds for each keyring change to reach every running service"),
    ] = 5.0,
    json_output: JsonOutput = False,
) -> None:
    """Add a new KEK (decrypt-only), promote it, re-wrap every data key under it, and destroy the old
    KEK once nothing references it. The services keep running. Interrupted, it continues where it
    stopped when run again."""
    from csx_cli.rotation import Progress, RotationError
    from csx_cli.rotation import rotate as run_rotation

    keyring_path, urls = _targets(data_dir, keyring, databases)
    bar = Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("keys"),
        TimeElapsedColumn(),
        console=err,
        disable=json_output,
    )
    task: TaskID | None = None

    def on_progress(p: Progress) -> None:
        nonlocal task
        if p.step != "rewrap":
            if not json_output:
                bar.console.print(f"[bold]{p.step}[/bold]  {p.detail}")
            return
        if task is None:
            task = bar.add_task("re-wrap", total=p.total)
        bar.update(task, completed=p.done, total=max(p.total, 1), description=f"re-wrap {p.detail}")

    try:
        with bar:
            summary = asyncio.run(
                run_rotation(keyring_path, urls, batch=batch, grace_seconds=grace, progress=on_progress)
            )
    except RotationError as exc:
        err.print(f"[red]rotation stopped:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        err.print("interrupted; run `csx keys rotate` again to continue the rotation")
        raise typer.Exit(130) from None
    out: dict[str, Any] = summary.to_json()
    if json_output:
        print(json.dumps(out, indent=2))
        return
    table = Table(title="Rotation complete" + (" (resumed)" if summary.resumed else ""), show_header=False)
    table.add_row("new primary KEK", summary.to_kek_id)
    table.add_row("destroyed", ", ".join(summary.destroyed) or "-")
    for service, n in summary.rewrapped.items():
        table.add_row(f"re-wrapped in {service}", str(n))
    table.add_row("re-wrap rate", f"{summary.keys_per_second:.0f} keys/s ({summary.rewrap_seconds:.2f}s)")
    table.add_row("took", f"{summary.seconds:.1f}s")
    console.print(table)
