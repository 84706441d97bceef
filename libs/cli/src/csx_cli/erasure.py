"""`csx child erase` / `csx child approve` and `csx retention run`: erasure by key destruction.

    csx child erase CHILD_ID --basis recorded-in-error --reason TEXT --requested-by USER [--approved-by USER]
    csx child approve ERASURE_ID --approved-by USER
    csx retention run --as USER [--dry-run] [--limit N]

Each user is a data protection officer of social care, acting through social care's certificate
with a token minted from the development PKI (production: the partnership's identity provider).
After the erasure, the command waits until every service has destroyed the child's keys, then
rotates the key-encryption key (`csx keys rotate`): only then is a copy of a database taken before
the erasure unreadable too. `--no-shred` skips that last step (a later rotation does it).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import MetaData, func, select

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx.safeguarding.v1 import safeguarding_pb2
from csx_cli.identity import default_pki, user_channel
from csx_cli.keys import Databases, DataDir, JsonOutput, KeyringFile, _targets
from csx_cli.stack import default_addresses
from csx_common.datakeys import DESTROYED, child_scope, data_keys_table
from csx_common.db import Database
from csx_common.identity import Principal

child_app = typer.Typer(help="A child's records: erasure by key destruction.", no_args_is_help=True)
retention_app = typer.Typer(help="The retention schedule (35 years after a case closes).", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_FAILED = 1
ROLE, PURPOSE = "data_protection_officer", "records_management"


class Basis(StrEnum):
    lawful_request = "lawful-request"
    recorded_in_error = "recorded-in-error"


BASES = {
    Basis.lawful_request: safeguarding_pb2.ERASURE_BASIS_LAWFUL_REQUEST,
    Basis.recorded_in_error: safeguarding_pb2.ERASURE_BASIS_RECORDED_IN_ERROR,
}
Address = Annotated[str | None, typer.Option("--referrals", help="referrals address [default: CSX_REFERRALS_ADDRESS]")]
Wait = Annotated[float, typer.Option("--wait", min=1.0, help="seconds to wait for every service to apply it")]
NoShred = Annotated[bool, typer.Option("--no-shred", help="skip the KEK rotation that makes old copies unreadable")]


def _officer(user_id: str) -> Principal:
    return Principal(user_id, "social_care", ROLE, PURPOSE)


def _stub(address: str | None, user_id: str) -> tuple[grpc.aio.Channel, referrals_pb2_grpc.ReferralsServiceStub]:
    channel = user_channel(address or default_addresses()["referrals"], _officer(user_id), default_pki())
    return channel, referrals_pb2_grpc.ReferralsServiceStub(channel)


def _fail(exc: grpc.aio.AioRpcError) -> typer.Exit:
    err.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
    return typer.Exit(EXIT_FAILED)


async def applied_everywhere(databases: Mapping[str, str], child_ids: list[str], within: float) -> dict[str, bool]:
    """Poll each service's data_keys until the children's tombstones are there (or time runs out)."""
    table = data_keys_table(MetaData())
    scopes = [child_scope(c) for c in child_ids]
    query = select(func.count(func.distinct(table.c.scope))).where(
        table.c.scope.in_(scopes), table.c.state == DESTROYED
    )
    done = dict.fromkeys(databases, not scopes)
    opened = {service: Database(url) for service, url in databases.items()}
    deadline = time.monotonic() + within
    try:
        while not all(done.values()) and time.monotonic() < deadline:
            for service, db in opened.items():
                if not done[service]:
                    async with db.session() as s:
                        done[service] = (await s.execute(query)).scalar_one() == len(scopes)
            if not all(done.values()):
                await asyncio.sleep(0.2)
    finally:
        for db in opened.values():
            await db.dispose()
    return done


def _finish(
    records: list[pb.ErasureRecord], keyring: Path, databases: dict[str, str], wait: float, shred: bool
) -> dict[str, Any]:
    from csx_cli.rotation import rotate

    applied = asyncio.run(applied_everywhere(databases, [r.child_id for r in records], wait))
    out: dict[str, Any] = {"erased": [_record_json(r) for r in records], "applied": applied, "shredded": False}
    if not all(applied.values()):
        missing = ", ".join(s for s, ok in applied.items() if not ok)
        err.print(
            f"[yellow]not yet applied by {missing}; the KEK was not rotated. Run `csx keys rotate` later.[/yellow]"
        )
        return out
    if shred and records:
        from csx_cli.rotation import RotationError

        try:
            summary = asyncio.run(rotate(keyring, databases))
        except RotationError as exc:  # e.g. one keyring per service: rotate each with `csx keys rotate`
            err.print(
                f"[yellow]erased, but the KEK was not rotated:[/yellow] {exc}. Run `csx keys rotate` for each keyring."
            )
            out["shred_error"] = str(exc)
            return out
        out["shredded"] = True
        out["rotation"] = summary.to_json()
    return out


def _record_json(record: pb.ErasureRecord) -> dict[str, Any]:
    return {
        "erasure_id": record.erasure_id,
        "child_id": record.child_id,
        "basis": safeguarding_pb2.ErasureBasis.Name(record.basis),
        "requested_by": record.requested_by,
        "approved_by": record.approved_by,
        "erased_at": record.erased_at.ToJsonString() if record.HasField("erased_at") else "",
        "keys_destroyed_in_referrals": record.keys_destroyed,
    }


def _report(out: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print(json.dumps(out, indent=2))
        return
    table = Table(title="Erased")
    for column in ("child", "erasure", "basis", "requested by", "approved by"):
        table.add_column(column, overflow="fold")
    for r in out["erased"]:
        table.add_row(r["child_id"], r["erasure_id"], r["basis"], r["requested_by"], r["approved_by"])
    console.print(table)
    console.print("applied by: " + ", ".join(f"{s} {'yes' if ok else 'NO'}" for s, ok in out["applied"].items()))
    if out["shredded"]:
        rotation = out["rotation"]
        console.print(
            f"key-encryption key rotated to {rotation['to_kek_id']} ({rotation['total_rewrapped']} data keys "
            "re-wrapped): copies of the databases taken before now can no longer be decrypted. Take a fresh backup."
        )


@child_app.command("erase")
def erase(
    child_id: Annotated[str, typer.Argument(help="the child's id (as in GetConcern / GetReferral)")],
    basis: Annotated[Basis, typer.Option("--basis", help="why the records are erased")],
    reason: Annotated[
        str,
        typer.Option(
            "--reason", help="at least 20 characters, kept sealed; '-' reads it from stdin (no shell history)"
        ),
    ],
    requested_by: Annotated[str, typer.Option("--requested-by", help="the data protection officer asking")],
    approved_by: Annotated[
        str | None, typer.Option("--approved-by", help="a second data protection officer (else approve later)")
    ] = None,
    referrals: Address = None,
    data_dir: DataDir = Path("var"),
    keyring: KeyringFile = None,
    databases: Databases = None,
    wait: Wait = 60.0,
    no_shred: NoShred = False,
    json_output: JsonOutput = False,
) -> None:
    """Request the erasure of a child's records and, with --approved-by, carry it out."""

    if reason == "-":
        reason = sys.stdin.read().strip()

    async def run() -> pb.ErasureRecord:
        channel, stub = _stub(referrals, requested_by)
        async with channel:
            request = pb.RequestErasureRequest(
                child_id=child_id, basis=BASES[basis], reason=reason, idempotency_key=f"cli-{uuid.uuid4().hex}"
            )
            record: pb.ErasureRecord = (await stub.RequestErasure(request, timeout=10)).erasure
        if approved_by is None:
            return record
        channel, stub = _stub(referrals, approved_by)
        async with channel:
            approved: pb.ApproveErasureResponse = await stub.ApproveErasure(
                pb.ApproveErasureRequest(erasure_id=record.erasure_id), timeout=30
            )
            return approved.erasure

    try:
        record = asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise _fail(exc) from None
    if not record.HasField("erased_at"):
        if json_output:
            print(json.dumps({"requested": _record_json(record)}, indent=2))
        else:
            console.print(
                f"erasure {record.erasure_id} requested; a second data protection officer approves it with "
                f"`csx child approve {record.erasure_id} --approved-by USER`"
            )
        return
    keyring_path, urls = _targets(data_dir, keyring, databases)
    _report(_finish([record], keyring_path, urls, wait, not no_shred), json_output)


@child_app.command("approve")
def approve(
    erasure_id: Annotated[str, typer.Argument(help="the erasure request's id")],
    approved_by: Annotated[
        str, typer.Option("--approved-by", help="a data protection officer other than the requester")
    ],
    referrals: Address = None,
    data_dir: DataDir = Path("var"),
    keyring: KeyringFile = None,
    databases: Databases = None,
    wait: Wait = 60.0,
    no_shred: NoShred = False,
    json_output: JsonOutput = False,
) -> None:
    """Approve (and so carry out) another officer's erasure request."""

    async def run() -> pb.ErasureRecord:
        channel, stub = _stub(referrals, approved_by)
        async with channel:
            approved: pb.ApproveErasureResponse = await stub.ApproveErasure(
                pb.ApproveErasureRequest(erasure_id=erasure_id), timeout=30
            )
            return approved.erasure

    try:
        record = asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise _fail(exc) from None
    keyring_path, urls = _targets(data_dir, keyring, databases)
    _report(_finish([record], keyring_path, urls, wait, not no_shred), json_output)


@retention_app.command("run")
def retention_run(
    as_user: Annotated[str, typer.Option("--as", help="the data protection officer running the schedule")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what is due, erase nothing")] = False,
    limit: Annotated[int, typer.Option("--limit", min=0, help="at most this many children (0: the default, 1000)")] = 0,
    referrals: Address = None,
    data_dir: DataDir = Path("var"),
    keyring: KeyringFile = None,
    databases: Databases = None,
    wait: Wait = 120.0,
    no_shred: NoShred = False,
    json_output: JsonOutput = False,
) -> None:
    """Erase every child whose retention period has ended (35 years after the case closed, or
    CSX_REFERRALS_RETENTION_YEARS), then rotate the KEK once for the whole run."""

    async def run() -> pb.EraseDueResponse:
        channel, stub = _stub(referrals, as_user)
        async with channel:
            response: pb.EraseDueResponse = await stub.EraseDue(
                pb.EraseDueRequest(dry_run=dry_run, limit=limit), timeout=600
            )
            return response

    try:
        response = asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise _fail(exc) from None
    closed_before = response.closed_before.ToJsonString()
    if dry_run:
        out = {"due": response.due, "closed_before": closed_before, "dry_run": True}
        if json_output:
            print(json.dumps(out, indent=2))
        else:
            console.print(f"{response.due} children due (cases closed before {closed_before}); nothing erased")
        return
    keyring_path, urls = _targets(data_dir, keyring, databases)
    out = _finish(list(response.erased), keyring_path, urls, wait, not no_shred)
    out.update(due=response.due, closed_before=closed_before, dry_run=False)
    if not json_output:
        console.print(
            f"{len(response.erased)} of {response.due} due children erased (cases closed before {closed_before})"
        )
    _report(out, json_output)
