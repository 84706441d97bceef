"""The `csx` command: run the stack locally, check its health, submit concerns, demo the journey.

Addresses of the services come from options, else CSX_<NAME>_ADDRESS, else the `csx up` defaults
(127.0.0.1:50051..50054, or CSX_BASE_PORT..+3); NATS from --nats-url, else CSX_NATS_URL, else
nats://127.0.0.1:<CSX_NATS_PORT or 14222>.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.table import Table

from csx_cli.audit import audit_app
from csx_cli.deadletters import deadletters_app
from csx_cli.erasure import child_app, retention_app
from csx_cli.intake import intake_app
from csx_cli.keys import keys_app
from csx_cli.reconcile import reconcile_app
from csx_cli.stack import (
    DEFAULT_BASE_PORT,
    DEFAULT_NATS_PORT,
    SERVICES,
    Stack,
    StackConfig,
    StackError,
    default_addresses,
    default_nats_url,
)
from csx_cli.tokens import token_app

app = typer.Typer(
    name="csx",
    help="CSX developer and operator commands.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
concern_app = typer.Typer(help="Concerns (the referrals service).", no_args_is_help=True)
demo_app = typer.Typer(help="Demonstrations against a running stack.", no_args_is_help=True)
app.add_typer(concern_app, name="concern")
app.add_typer(demo_app, name="demo")
app.add_typer(audit_app, name="audit")
app.add_typer(deadletters_app, name="deadletters")
app.add_typer(intake_app, name="intake")
app.add_typer(keys_app, name="keys")
app.add_typer(reconcile_app, name="reconcile")
app.add_typer(child_app, name="child")
app.add_typer(retention_app, name="retention")
app.add_typer(token_app, name="token")

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USAGE = 2


def _addresses(overrides: dict[str, str | None]) -> dict[str, str]:
    addresses = default_addresses()
    addresses.update({name: value for name, value in overrides.items() if value})
    return addresses


ReferralsAddr = Annotated[str | None, typer.Option("--referrals", help="host:port [env CSX_REFERRALS_ADDRESS]")]
PanelAddr = Annotated[str | None, typer.Option("--panel", help="host:port [env CSX_PANEL_ADDRESS]")]
ConferencesAddr = Annotated[str | None, typer.Option("--conferences", help="host:port [env CSX_CONFERENCES_ADDRESS]")]
ActionplansAddr = Annotated[str | None, typer.Option("--actionplans", help="host:port [env CSX_ACTIONPLANS_ADDRESS]")]


# --------------------------------------------------------------------------------------------
# csx up
# --------------------------------------------------------------------------------------------


@app.command()
def up(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="CSX_DATA_DIR", help="databases, keyring, NATS store, logs")
    ] = Path("var"),
    base_port: Annotated[
        int,
        typer.Option("--base-port", envvar="CSX_BASE_PORT", help="services listen on this port and the 3 after"),
    ] = DEFAULT_BASE_PORT,
    nats_port: Annotated[
        int, typer.Option("--nats-port", envvar="CSX_NATS_PORT", help="port of the stack's own nats-server")
    ] = DEFAULT_NATS_PORT,
    log_level: Annotated[str, typer.Option("--log-level", envvar="CSX_LOG_LEVEL")] = "INFO",
    trace_file: Annotated[
        str,
        typer.Option("--trace-file", envvar="CSX_TRACE_FILE", help="JSON-lines span file for every service"),
    ] = "",
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for each service to serve")] = 60.0,
) -> None:
    """Run NATS and the four services in the foreground until Ctrl-C (what `make run` does)."""
    if nats_port == 4222:
        err.print("[red]port 4222 belongs to the system NATS; choose another --nats-port[/red]")
        raise typer.Exit(EXIT_USAGE)
    try:
        stack = Stack(
            StackConfig(
                data_dir=data_dir,
                base_port=base_port,
                nats_port=nats_port,
                log_level=log_level.upper(),
                trace_file=trace_file,
                start_timeout=timeout,
                die_with_parent=True,
            ),
            echo=lambda msg: console.print(f"[dim]{msg}[/dim]"),
        )
    except StackError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None

    stopping = False

    def request_stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    started = time.monotonic()
    console.print(f"starting NATS and {len(SERVICES)} services (data in {stack.data_dir}, logs in {stack.log_dir})")
    try:
        stack.start()
    except StackError as exc:
        err.print(f"[red]stack did not start:[/red] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; stopped")
        raise typer.Exit(130) from None

    table = Table(title=f"CSX is up ({time.monotonic() - started:.1f}s)")
    table.add_column("process", no_wrap=True)
    table.add_column("listens on", no_wrap=True)
    table.add_column("pid", justify="right", no_wrap=True)
    pids = stack.pids
    table.add_row("nats", stack.nats_url, str(pids["nats"]))
    for name in SERVICES:
        table.add_row(f"csx-{name}", stack.addresses[name], str(pids[name]))
    console.print(table)
    console.print(f"logs: {stack.log_dir}/<process>.log")
    console.print("Ctrl-C to stop. Try: [bold]csx status[/bold], [bold]csx demo journey[/bold]")

    code = 0
    try:
        while True:
            time.sleep(0.5)
            stack.check()
    except KeyboardInterrupt:
        console.print("stopping services, then NATS ...")
    except StackError as exc:
        err.print(f"[red]{exc}[/red]")
        err.print("stopping the rest of the stack")
        code = 1
    finally:
        # A second Ctrl-C while stopping must not leave orphans: ignore it, stop() is bounded.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    console.print("stopped")
    raise typer.Exit(code)


# --------------------------------------------------------------------------------------------
# csx status
# --------------------------------------------------------------------------------------------


@app.command()
def status(
    json_output: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    nats_url: Annotated[str | None, typer.Option("--nats-url", help="[env CSX_NATS_URL]")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="deadline per check, seconds")] = 2.0,
    max_lag: Annotated[
        int | None, typer.Option("--max-lag", help="also unhealthy when a consumer lags by more than this")
    ] = None,
    referrals: ReferralsAddr = None,
    panel: PanelAddr = None,
    conferences: ConferencesAddr = None,
    actionplans: ActionplansAddr = None,
) -> None:
    """Health of each service, messages per stream, lag per durable consumer. Exit 1 unless all healthy."""
    from csx_cli.status import collect

    addresses = _addresses(
        {"referrals": referrals, "panel": panel, "conferences": conferences, "actionplans": actionplans}
    )
    result = asyncio.run(collect(addresses, nats_url or default_nats_url(), call_timeout=timeout, max_lag=max_lag))
    if json_output:
        print(json.dumps(result.to_json(), indent=2))
        raise typer.Exit(0 if result.healthy else 1)

    def mark(ok: bool, text: str) -> str:
        return f"[green]{text}[/green]" if ok else f"[red]{text}[/red]"

    services = Table(title="Services")
    for column in ("service", "address", "health"):
        services.add_column(column)
    for s in result.services:
        services.add_row(s.name, s.address, mark(s.ok, s.status))
    services.add_row(
        "nats", result.nats_url, mark(result.nats_reachable, "UP" if result.nats_reachable else "UNREACHABLE")
    )
    console.print(services)

    streams = Table(title="Streams")
    for column in ("stream", "state", "messages"):
        streams.add_column(column, justify="right" if column == "messages" else "left")
    for st in result.streams:
        streams.add_row(st.name, mark(st.ok, st.status), "" if st.messages is None else str(st.messages))
    console.print(streams)

    consumers = Table(title="Durable consumers")
    for column in ("consumer", "stream", "state", "pending", "ack pending", "lag"):
        consumers.add_column(column, justify="right" if column in ("pending", "ack pending", "lag") else "left")
    for c in result.consumers:
        consumers.add_row(
            c.durable,
            c.stream,
            mark(c.ok, c.status),
            "" if c.num_pending is None else str(c.num_pending),
            "" if c.num_ack_pending is None else str(c.num_ack_pending),
            "" if c.lag is None else str(c.lag),
        )
    console.print(consumers)
    problems = result.problems()
    if problems:
        console.print("[red]unhealthy:[/red] " + "; ".join(problems))
        raise typer.Exit(1)
    console.print("[green]healthy[/green]")


# --------------------------------------------------------------------------------------------
# csx concern submit
# --------------------------------------------------------------------------------------------


@concern_app.command("submit")
def concern_submit(
    file: Annotated[
        Path,
        typer.Option("--file", "-f", help="SubmitConcernRequest as protobuf JSON", exists=True, dir_okay=False),
    ],
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="overrides the file's; a fresh one is made when neither has one"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the response as JSON")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="call deadline, seconds")] = 10.0,
    referrals: ReferralsAddr = None,
    user_id: Annotated[str, typer.Option("--user", help="the submitting user's id")] = "cli.user",
    role: Annotated[
        str | None,
        typer.Option(
            "--role",
            help="the submitting user's role [default: the agency's own: police_officer, dsl, "
            "health_safeguarding_nurse, youth_justice_worker, social_worker, else practitioner]",
        ),
    ] = None,
) -> None:
    """Submit a concern to the referrals service, as a user of the agency the concern names (its
    certificate from CSX_PKI_DIR, default var/pki). Exit 2 on a request the service finds invalid."""
    from google.protobuf import json_format

    from csx.referrals.v1 import referrals_pb2, referrals_pb2_grpc
    from csx_common.errors import field_violations

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        err.print(f"[red]cannot read {file}:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    request = referrals_pb2.SubmitConcernRequest()
    try:
        json_format.Parse(text, request)
    except json_format.ParseError as exc:
        err.print(f"[red]{file} is not a valid SubmitConcernRequest (protobuf JSON):[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    if idempotency_key:
        request.idempotency_key = idempotency_key
    elif not request.idempotency_key:
        request.idempotency_key = f"cli-{uuid.uuid4().hex}"

    address = _addresses({"referrals": referrals})["referrals"]
    from csx.types.v1 import types_pb2
    from csx_cli.identity import default_pki, submitter_role
    from csx_common.client import sync_channel
    from csx_common.identity import Principal, TokenIssuer, bearer
    from csx_common.pki import PeerIdentity

    agency = types_pb2.Agency.Name(request.agency).removeprefix("AGENCY_").lower()
    if agency == "unspecified":
        agency = "social_care"  # the service will say what is missing; the call still needs a caller
    pki = default_pki()
    try:
        credentials = pki.credentials(PeerIdentity("agency", agency))
        token = TokenIssuer(pki.token_key_file.read_bytes()).issue(
            Principal(user_id, agency, role or submitter_role(agency), "referral_screening")
        )
    except FileNotFoundError:
        err.print(f"[red]no certificate for agency {agency} under {pki.root}[/red] (run `csx up`, or set CSX_PKI_DIR)")
        raise typer.Exit(1) from None
    with sync_channel(address, credentials) as channel:
        stub = referrals_pb2_grpc.ReferralsServiceStub(channel)
        try:
            response = stub.SubmitConcern(request, timeout=timeout, metadata=bearer(token))
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                err.print(f"[red]the referrals service rejected the concern:[/red] {details}")
                for field_path, description in field_violations(exc):
                    err.print(f"  {field_path}: {description}")
                raise typer.Exit(EXIT_USAGE) from None
            err.print(f"[red]SubmitConcern failed at {address}:[/red] {code.name}: {details}")
            raise typer.Exit(1) from None
    if json_output:
        print(json_format.MessageToJson(response, indent=2))
        return
    table = Table(title="Concern recorded", show_header=False)
    table.add_row("concern_id", response.concern_id)
    table.add_row("referral_id", response.referral_id)
    table.add_row("child_id", response.child_id)
    table.add_row("decision_due_on", response.decision_due_on)
    table.add_row("idempotency_key", request.idempotency_key)
    console.print(table)


# --------------------------------------------------------------------------------------------
# csx demo journey
# --------------------------------------------------------------------------------------------


@demo_app.command("journey")
def demo_journey(
    trace_file: Annotated[
        str,
        typer.Option("--trace-file", envvar="CSX_TRACE_FILE", help="append the journey's spans (JSON lines)"),
    ] = "",
    wait: Annotated[float, typer.Option("--wait", help="seconds each wait step may take")] = 30.0,
    timeout: Annotated[float, typer.Option("--timeout", help="deadline per call, seconds")] = 5.0,
    place_id: Annotated[str, typer.Option("--place-id", help="place the concern names")] = "plc-riverside-park",
    intervention: Annotated[
        str, typer.Option("--intervention", help="A (child protection) or B (contextual safeguarding)")
    ] = "B",
    referrals: ReferralsAddr = None,
    panel: PanelAddr = None,
    conferences: ConferencesAddr = None,
    actionplans: ActionplansAddr = None,
) -> None:
    """Drive one child from concern through a conference, its published plan and a review, as one trace.
    Exit 0 only if every step passed."""
    from csx_cli.journey import Journey, JourneyError, StepResult
    from csx_common import telemetry

    provider = telemetry.configure("csx-cli", trace_file)
    addresses = _addresses(
        {"referrals": referrals, "panel": panel, "conferences": conferences, "actionplans": actionplans}
    )

    def on_step(i: int, n: int, step: StepResult) -> None:
        console.print(f"[green]✓[/green] [{i}/{n}] {step.name:<28} {step.seconds:6.2f}s  {step.detail}")

    if intervention.upper() not in ("A", "B"):
        err.print("--intervention is A or B")
        raise typer.Exit(2)
    journey = Journey(
        addresses,
        wait_timeout=wait,
        call_timeout=timeout,
        place_id=place_id,
        on_step=on_step,
        intervention=intervention.upper(),
    )
    console.print(f"demo journey {journey.run_id} against " + ", ".join(f"{k}={v}" for k, v in addresses.items()))
    code = 0
    try:
        result = asyncio.run(journey.run())
        console.print(
            f"[bold green]intervention {journey.intervention} through a review[/bold green] in "
            f"{result.seconds:.2f}s; trace {result.trace_id}"
        )
    except JourneyError as exc:
        done = len(journey.result.steps)
        err.print(f"[red]✗ [{done + 1}/{journey.steps}] {exc.step} failed:[/red] {exc.message}")
        if journey.result.trace_id:
            err.print(f"trace {journey.result.trace_id}")
        code = 1
    finally:
        provider.force_flush()
        provider.shutdown()
    if trace_file:
        console.print(f"spans appended to {trace_file}")
    raise typer.Exit(code)


def run() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
