"""`csx intake publish`: send a concern the way a partner agency's system does over NATS — sealed
to the referrals intake key, signed with the agency's certificate (csx_client) — and print the
answer. Identities come from the development PKI (CSX_PKI_DIR, default var/pki): the agency's
certificate and key, referrals' intake public key, and the agency's NATS password."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

intake_app = typer.Typer(help="Sealed intake: concerns over NATS, as a partner agency's system.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_REJECTED = 1
EXIT_USAGE = 2


@intake_app.command("publish")
def publish(
    agency: Annotated[str, typer.Option("--agency", help="the sending agency, e.g. police")],
    file: Annotated[
        Path,
        typer.Option("--file", "-f", help="SubmitConcernRequest as protobuf JSON", exists=True, dir_okay=False),
    ],
    nats_url: Annotated[str | None, typer.Option("--nats-url", help="NATS URL (env CSX_NATS_URL)")] = None,
    wait: Annotated[float, typer.Option("--wait", help="seconds to wait for the answer")] = 15.0,
    json_output: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
) -> None:
    """Seal, sign and publish one concern on csx.intake.<agency>.submit; print the concern's ids, or
    the reason it was rejected (exit 1; exit 2 for a request the service finds invalid). The
    agency reference is the idempotency key: publishing it again answers with the same concern."""
    from google.protobuf import json_format

    from csx.referrals.v1 import referrals_pb2
    from csx.types.v1 import types_pb2
    from csx_cli.identity import default_pki
    from csx_cli.stack import default_nats_url
    from csx_client import ACCEPTED, AgencyIdentity, IntakeClient, Recipient
    from csx_common.natsauth import DevNatsAuth
    from csx_common.pki import PeerIdentity

    try:
        request = json_format.Parse(file.read_text(encoding="utf-8"), referrals_pb2.SubmitConcernRequest())
    except (OSError, UnicodeDecodeError, json_format.ParseError) as exc:
        err.print(f"[red]{file} is not a readable SubmitConcernRequest (protobuf JSON):[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    if request.agency == types_pb2.AGENCY_UNSPECIFIED:
        # The file may leave the agency to --agency; an unknown name stays unset and the service says so.
        with contextlib.suppress(ValueError):
            request.agency = types_pb2.Agency.Value(f"AGENCY_{agency.upper()}")
    pki = default_pki()
    peer = PeerIdentity("agency", agency)
    try:
        identity = AgencyIdentity.from_files(agency, pki.cert_file(peer), pki.key_file(peer))
        recipient = Recipient.from_file(pki.intake_public_file)
    except FileNotFoundError as exc:
        err.print(f"[red]missing {exc.filename}[/red] (run `csx up`, or set CSX_PKI_DIR)")
        raise typer.Exit(EXIT_REJECTED) from None
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_USAGE) from None
    password_file = DevNatsAuth(pki.root / "nats").password_file(f"agency-{agency}")
    password = password_file.read_text().strip() if password_file.exists() else ""
    url = nats_url or default_nats_url()

    async def run() -> object:
        client = await IntakeClient.connect(url, identity, recipient, password=password)
        try:
            future = await client.publish(request)
            try:
                return await asyncio.wait_for(future, wait)
            except TimeoutError:
                return None
        finally:
            await client.close()

    try:
        result = asyncio.run(run())
    except Exception as exc:
        err.print(f"[red]could not publish to {url}:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(EXIT_REJECTED) from None
    if result is None:
        err.print(
            f"[yellow]stored in the intake stream, but no answer within {wait:.0f}s:[/yellow] it is handled "
            "when referrals reads it (publish it again later to hear the answer)"
        )
        raise typer.Exit(EXIT_REJECTED)
    _print(result, json_output)
    if result.status != ACCEPTED:  # type: ignore[attr-defined]
        raise typer.Exit(EXIT_USAGE if result.reason == "INVALID" else EXIT_REJECTED)  # type: ignore[attr-defined]


def _print(result: object, json_output: bool) -> None:
    from google.protobuf import json_format

    from csx.intake.v1 import intake_pb2

    assert isinstance(result, intake_pb2.IntakeResult)
    if json_output:
        print(json.dumps(json_format.MessageToDict(result), indent=2))
        return
    if result.status != intake_pb2.INTAKE_STATUS_ACCEPTED:
        err.print(f"[red]rejected:[/red] {result.reason} (message {result.message_id or '?'})")
        for path in result.field_paths:
            err.print(f"  {path}")
        return
    table = Table(title="Concern recorded (sealed intake)", show_header=False)
    table.add_row("concern_id", result.response.concern_id)
    table.add_row("referral_id", result.response.referral_id)
    table.add_row("child_id", result.response.child_id)
    table.add_row("decision_due_on", result.response.decision_due_on)
    table.add_row("message_id", result.message_id)
    console.print(table)
