"""The csx command without a running stack: bad input, nothing listening, a fake referrals service.

Fast: no NATS, no service processes (one test starts nats-server and a referrals process that
fails at once, to check that the stack names the failed process and shows its log).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from csx.referrals.v1 import referrals_pb2, referrals_pb2_grpc
from csx_cli import stack as stack_mod
from csx_cli.journey import random_nhs_number
from csx_cli.main import app
from csx_cli.stack import Stack, StackConfig, StackError, default_addresses, default_nats_url
from csx_common import errors
from csx_common.identity import Principal, TokenVerifier
from tests.support import dev_pki, server_credentials

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PKI_ENV = {"CSX_PKI_DIR": str(dev_pki().root)}


def nothing_listening() -> dict[str, str]:
    """Addresses (and a NATS URL) where nothing answers."""
    return {
        "CSX_REFERRALS_ADDRESS": f"127.0.0.1:{unused_port()}",
        "CSX_PANEL_ADDRESS": f"127.0.0.1:{unused_port()}",
        "CSX_CONFERENCES_ADDRESS": f"127.0.0.1:{unused_port()}",
        "CSX_ACTIONPLANS_ADDRESS": f"127.0.0.1:{unused_port()}",
        "CSX_NATS_URL": f"nats://127.0.0.1:{unused_port()}",
        "CSX_PKI_DIR": str(dev_pki().root),
    }


VALID_CONCERN = {
    "agency": "AGENCY_EDUCATION",
    "agencyReference": "EDU-123",
    "referrer": {"name": "A Teacher", "role": "Designated safeguarding lead", "email": "dsl@school.example"},
    "child": {
        "nhsNumber": "9434765919",
        "givenName": "Sam",
        "familyName": "Example",
        "dateOfBirth": "2010-05-17",
    },
    "harmTypes": ["HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION"],
    "contexts": [{"placeId": "plc-riverside-park", "contextType": "CONTEXT_TYPE_NEIGHBOURHOOD"}],
    "narrative": "Seen with older youths near the station.",
}


# -- csx concern submit ---------------------------------------------------------------------------


def test_submit_malformed_json_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "concern.json"
    bad.write_text('{"agency": "AGENCY_POLICE",')
    result = runner.invoke(app, ["concern", "submit", "--file", str(bad)])
    assert result.exit_code == 2
    assert "not a valid SubmitConcernRequest" in flat(result.output)


def test_submit_unknown_field_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "concern.json"
    bad.write_text(json.dumps({**VALID_CONCERN, "childName": "x"}))
    result = runner.invoke(app, ["concern", "submit", "--file", str(bad)])
    assert result.exit_code == 2
    assert "childName" in result.output


def test_submit_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["concern", "submit", "--file", str(tmp_path / "absent.json")])
    assert result.exit_code == 2


def test_submit_with_nothing_listening_fails_naming_the_address(tmp_path: Path) -> None:
    good = tmp_path / "concern.json"
    good.write_text(json.dumps(VALID_CONCERN))
    address = f"127.0.0.1:{unused_port()}"
    result = runner.invoke(
        app, ["concern", "submit", "--file", str(good), "--referrals", address, "--timeout", "2"], env=PKI_ENV
    )
    assert result.exit_code == 1
    out = flat(result.output)
    assert address in out
    assert "UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out


class FakeReferrals(referrals_pb2_grpc.ReferralsServiceServicer):
    """Rejects a concern without an agency the way the real service does (BadRequest details)."""

    def __init__(self) -> None:
        self.requests: list[referrals_pb2.SubmitConcernRequest] = []
        self.deadlines: list[float | None] = []
        self.callers: list[Principal] = []

    def SubmitConcern(
        self, request: referrals_pb2.SubmitConcernRequest, context: grpc.ServicerContext
    ) -> referrals_pb2.SubmitConcernResponse:
        self.requests.append(request)
        self.deadlines.append(context.time_remaining())
        token = dict(context.invocation_metadata()).get("authorization", "").removeprefix("Bearer ")
        self.callers.append(TokenVerifier(dev_pki().token_public_file.read_bytes()).verify(token))
        if request.agency == 0:
            code, message, trailers = errors.to_status(
                errors.InvalidArgument(
                    [
                        errors.FieldViolation("agency", "value is required"),
                        errors.FieldViolation("child.nhs_number", "must be 10 digits"),
                    ]
                )
            )
            context.set_trailing_metadata(trailers)
            context.abort(code, message)
        return referrals_pb2.SubmitConcernResponse(
            concern_id="c-1", referral_id="r-1", child_id="ch-1", decision_due_on="2026-11-30"
        )


@pytest.fixture
def fake_referrals() -> Iterator[tuple[str, FakeReferrals]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = FakeReferrals()
    referrals_pb2_grpc.add_ReferralsServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials("referrals"))
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


def test_submit_invalid_argument_prints_field_violations_and_exits_2(
    tmp_path: Path, fake_referrals: tuple[str, FakeReferrals]
) -> None:
    address, _servicer = fake_referrals
    concern = {k: v for k, v in VALID_CONCERN.items() if k != "agency"}
    path = tmp_path / "concern.json"
    path.write_text(json.dumps(concern))
    result = runner.invoke(app, ["concern", "submit", "--file", str(path), "--referrals", address], env=PKI_ENV)
    assert result.exit_code == 2, result.output
    out = flat(result.output)
    assert "agency: value is required" in out
    assert "child.nhs_number: must be 10 digits" in out


def test_submit_prints_ids_sets_a_deadline_and_a_fresh_idempotency_key(
    tmp_path: Path, fake_referrals: tuple[str, FakeReferrals]
) -> None:
    address, servicer = fake_referrals
    path = tmp_path / "concern.json"
    path.write_text(json.dumps(VALID_CONCERN))
    for _ in range(2):
        result = runner.invoke(
            app, ["concern", "submit", "--file", str(path), "--referrals", address, "--json"], env=PKI_ENV
        )
        assert result.exit_code == 0, result.output
        response = json.loads(result.output)
        assert response == {
            "concernId": "c-1",
            "referralId": "r-1",
            "childId": "ch-1",
            "decisionDueOn": "2026-11-30",
        }
    keys = [r.idempotency_key for r in servicer.requests]
    assert len(set(keys)) == 2 and all(k.startswith("cli-") for k in keys)
    assert all(d is not None and d <= 11 for d in servicer.deadlines)  # the --timeout default, 10s
    # Called as a named user of the agency the concern names, through that agency's certificate.
    # As a school's designated safeguarding lead: a role the policy lets an education user hold.
    assert {(c.agency, c.user_id, c.role) for c in servicer.callers} == {("education", "cli.user", "dsl")}


def test_submit_keeps_the_files_idempotency_key(tmp_path: Path, fake_referrals: tuple[str, FakeReferrals]) -> None:
    address, servicer = fake_referrals
    path = tmp_path / "concern.json"
    path.write_text(json.dumps({**VALID_CONCERN, "idempotencyKey": "retry-me-0001"}))
    result = runner.invoke(app, ["concern", "submit", "--file", str(path), "--referrals", address], env=PKI_ENV)
    assert result.exit_code == 0, result.output
    for word in ("c-1", "r-1", "ch-1", "2026-11-30"):
        assert word in result.output
    assert servicer.requests[-1].idempotency_key == "retry-me-0001"


# -- csx status -----------------------------------------------------------------------------------


def test_status_json_with_nothing_running_reports_everything_down() -> None:
    result = runner.invoke(app, ["status", "--json", "--timeout", "0.5"], env=nothing_listening())
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["healthy"] is False
    assert {s["name"]: s["status"] for s in report["services"]} == {
        "referrals": "UNREACHABLE",
        "panel": "UNREACHABLE",
        "conferences": "UNREACHABLE",
        "actionplans": "UNREACHABLE",
    }
    assert report["nats"]["reachable"] is False
    assert {s["name"] for s in report["streams"]} == {
        "CSX_REFERRALS",
        "CSX_PANEL",
        "CSX_CONFERENCES",
        "CSX_ACTIONPLANS",
        "CSX_INTAKE",
    }
    assert {c["durable"] for c in report["consumers"]} == {
        "panel-concerns",
        "conferences-referrals",
        "actionplans-conferences",
        "referrals-conferences",
        "panel-disclosure",
        "conferences-disclosure",
        "actionplans-disclosure",
        "referrals-intake",
    }
    assert any("referrals" in p for p in report["problems"])


def test_status_table_with_nothing_running_exits_non_zero() -> None:
    result = runner.invoke(app, ["status", "--timeout", "0.5"], env=nothing_listening())
    assert result.exit_code == 1
    assert "UNREACHABLE" in result.output
    assert "unhealthy" in result.output


# -- csx demo journey -----------------------------------------------------------------------------


def test_demo_journey_without_certificates_says_where_it_looked(tmp_path: Path) -> None:
    env = nothing_listening() | {"CSX_PKI_DIR": str(tmp_path / "nowhere")}
    result = runner.invoke(app, ["demo", "journey", "--timeout", "1"], env=env)
    assert result.exit_code == 1
    assert "no client certificates" in flat(result.output) and "nowhere" in flat(result.output)


def test_demo_journey_with_nothing_running_fails_at_the_first_step(tmp_path: Path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    result = runner.invoke(
        app, ["demo", "journey", "--timeout", "1", "--trace-file", str(trace_file)], env=nothing_listening()
    )
    assert result.exit_code == 1
    out = flat(result.output)
    assert "submit concern failed" in out
    assert "UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out


def test_random_nhs_numbers_pass_the_modulus_11_check() -> None:
    for _ in range(200):
        number = random_nhs_number()
        assert len(number) == 10 and number.isdigit() and number.startswith("999")
        total = sum(int(d) * w for d, w in zip(number[:9], range(10, 1, -1), strict=True))
        assert (11 - total % 11) % 11 == int(number[9])


# -- csx up / the Stack API -----------------------------------------------------------------------


def test_up_refuses_the_system_nats_port() -> None:
    result = runner.invoke(app, ["up", "--nats-port", "4222"])
    assert result.exit_code == 2
    assert "4222" in result.output


def test_default_addresses_follow_env() -> None:
    assert default_addresses({}) == {
        "referrals": "127.0.0.1:50051",
        "panel": "127.0.0.1:50052",
        "conferences": "127.0.0.1:50053",
        "actionplans": "127.0.0.1:50054",
    }
    moved = default_addresses({"CSX_BASE_PORT": "60051", "CSX_PANEL_ADDRESS": "panel:9000"})
    assert moved["referrals"] == "127.0.0.1:60051"
    assert moved["panel"] == "panel:9000"
    assert moved["actionplans"] == "127.0.0.1:60054"
    assert default_nats_url({}) == "nats://127.0.0.1:14222"
    assert default_nats_url({"CSX_NATS_PORT": "15000"}) == "nats://127.0.0.1:15000"


def test_stack_gives_each_service_its_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSX_PANEL_DATABASE_URL", "postgresql+asyncpg://stale/elsewhere")
    monkeypatch.setenv("CSX_PANEL_RELAY_POLL_SECONDS", "0.1")
    stack = Stack(StackConfig(data_dir=tmp_path / "var", base_port=61051, nats_port=24222, trace_file="t.jsonl"))
    assert stack.addresses == {
        "referrals": "127.0.0.1:61051",
        "panel": "127.0.0.1:61052",
        "conferences": "127.0.0.1:61053",
        "actionplans": "127.0.0.1:61054",
    }
    data = (tmp_path / "var").resolve()
    for name in stack_mod.SERVICES:
        env = stack.service_env(name)
        prefix = f"CSX_{name.upper()}_"
        assert env[prefix + "GRPC_ADDRESS"] == stack.addresses[name]
        assert env[prefix + "DATABASE_URL"] == f"sqlite+aiosqlite:///{data / (name + '.db')}"
        assert env[prefix + "NATS_URL"] == "nats://127.0.0.1:24222"
        assert env[prefix + "KEYRING_FILE"] == str(data / "keyring.json")
        assert Path(env[prefix + "TRACE_FILE"]).is_absolute()
    assert stack.service_env("actionplans")["CSX_ACTIONPLANS_CONFERENCES_ADDRESS"] == "127.0.0.1:61053"
    # Tuning from the environment passes through; what the stack decides overrides stale values.
    assert stack.service_env("panel")["CSX_PANEL_RELAY_POLL_SECONDS"] == "0.1"
    assert stack.log_files["referrals"] == data / "logs" / "referrals.log"


def test_stack_with_port_zero_picks_distinct_free_ports(tmp_path: Path) -> None:
    stack = Stack(StackConfig(data_dir=tmp_path, base_port=0, nats_port=0))
    ports = [*stack.ports.values(), stack.nats_port]
    assert len(set(ports)) == 5
    assert 4222 not in ports


def test_stack_refuses_to_start_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = Stack(StackConfig(data_dir=tmp_path, base_port=0, nats_port=port))
        with pytest.raises(StackError, match=f"NATS port {port}"):
            stack.start()
    assert stack.pids == {name: None for name in ("nats", *stack_mod.SERVICES)}


def test_stack_names_a_service_that_dies_and_shows_its_log(tmp_path: Path) -> None:
    stack = Stack(StackConfig(data_dir=tmp_path, base_port=0, nats_port=0, services=("referrals",)))
    # A stand-in that fails the way a misconfigured service does, without the service's start-up cost.
    stack._services["referrals"].argv = [
        sys.executable,
        "-c",
        "import sys; print('CSX_REFERRALS_DATABASE_URL: missing', file=sys.stderr); sys.exit(3)",
    ]
    with pytest.raises(StackError) as caught:
        stack.start()
    message = str(caught.value)
    assert message.startswith("referrals exited with status 3")
    assert str(tmp_path.resolve() / "logs" / "referrals.log") in message
    assert "CSX_REFERRALS_DATABASE_URL: missing" in message
    # Whatever it started (NATS) is stopped again; the keyring was made before any service started.
    assert all(pid is None for pid in stack.pids.values())
    assert (tmp_path / "keyring.json").exists()


# -- tools/check_imports.py -----------------------------------------------------------------------


def test_import_boundary_check_finds_crossings(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools" / "check_imports.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def write(rel: str, text: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("services/alpha/src/csx_alpha/ok.py", "import csx_common\nfrom csx.alpha.v1 import x\n")
    write("services/alpha/src/csx_alpha/bad.py", "def f():\n    from csx_beta.domain import thing\n")
    write("services/beta/src/csx_beta/__init__.py", "")
    write("libs/common/src/csx_common/bad.py", "import csx_alpha.tables\nimport csx_cli\n")
    write("libs/cli/src/csx_cli/bad.py", "from csx_beta import app\n")
    problems = module.check(tmp_path)
    assert len(problems) == 4, problems
    assert any("csx_alpha/bad.py:2: imports csx_beta.domain" in p for p in problems)
    assert sum("libs/common" in p for p in problems) == 2
    assert any("libs/cli" in p for p in problems)
    assert module.check(ROOT) == []
