"""`csx intake publish`: the command an operator (or a trial agency) uses to send a sealed concern,
run as a process against a real nats-server and a real referrals service."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from csx_cli.main import app
from csx_cli.stack import CONSUMES, SERVICES, Stack, StackConfig
from csx_common.natsauth import DevNatsAuth
from csx_common.natsserver import NatsServer, free_port
from csx_common.pki import AGENCIES, DevPki, PeerIdentity
from csx_referrals import tables
from csx_referrals.app import ReferralsRuntime, build
from csx_referrals.settings import ReferralsSettings

CSX = str(Path(sys.executable).parent / "csx")
CONCERN = {
    "agency": "AGENCY_POLICE",
    "agencyReference": "POL-CLI-0001",
    "referrer": {"name": "A Officer", "role": "Detective constable", "email": "dc@police.example"},
    "child": {"nhsNumber": "9434765919", "givenName": "Sam", "familyName": "Example", "dateOfBirth": "2010-05-17"},
    "harmTypes": ["HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION"],
    "contexts": [{"placeId": "plc-riverside-park", "contextType": "CONTEXT_TYPE_NEIGHBOURHOOD"}],
    "narrative": "Seen with older youths near the station.",
}


class Setup:
    def __init__(self, pki: DevPki, server: NatsServer, runtime: ReferralsRuntime) -> None:
        self.pki, self.server, self.runtime = pki, server, runtime

    async def csx(self, *args: str) -> tuple[int, str]:
        """Run the csx command as a process (the service keeps running in this event loop)."""
        proc = await asyncio.create_subprocess_exec(
            CSX,
            *args,
            env={"CSX_PKI_DIR": str(self.pki.root), "CSX_NATS_URL": self.server.url, "COLUMNS": "200"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return int(proc.returncode or 0), out.decode()

    async def concerns(self) -> int:
        async with self.runtime.db.session() as s:
            return int((await s.execute(select(func.count()).select_from(tables.concerns))).scalar_one())


@pytest.fixture
async def setup(databases, tmp_path: Path) -> AsyncIterator[Setup]:  # type: ignore[no-untyped-def]
    """A PKI folder laid out as `csx up` makes it (certificates, intake key, NATS passwords)."""
    pki = DevPki(tmp_path / "pki").ensure()
    auth = DevNatsAuth(pki.root / "nats").ensure(SERVICES, AGENCIES, CONSUMES)
    server = NatsServer(tmp_path / "nats", config_file=auth.config_file)
    server.start()
    service = PeerIdentity("service", "referrals")
    runtime = build(
        ReferralsSettings(
            grpc_address=f"127.0.0.1:{free_port()}",
            database_url=await databases.new("referrals"),
            nats_url=server.url,
            nats_user="referrals",
            nats_password_file=str(auth.password_file("referrals")),
            keyring_file=str(tmp_path / "keyring.json"),
            tls_ca_file=str(pki.ca_file),
            tls_cert_file=str(pki.cert_file(service)),
            tls_key_file=str(pki.key_file(service)),
            token_public_key_file=str(pki.token_public_file),
            intake_key_file=str(pki.intake_key_file),
        )
    )
    await runtime.start()
    yield Setup(pki, server, runtime)
    await runtime.shutdown()
    server.stop()


def write(tmp_path: Path, name: str, concern: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(concern))
    return str(path)


async def test_publish_prints_the_concern_then_the_same_one_again(setup: Setup, tmp_path: Path) -> None:
    file = write(tmp_path, "concern.json", CONCERN)
    code, out = await setup.csx("intake", "publish", "--agency", "police", "--file", file, "--json")
    assert code == 0, out
    first = json.loads(out)
    assert first["status"] == "INTAKE_STATUS_ACCEPTED" and first["response"]["concernId"]
    code, out = await setup.csx("intake", "publish", "--agency", "police", "--file", file)
    assert code == 0, out
    assert first["response"]["concernId"] in out and "Concern recorded" in out
    assert await setup.concerns() == 1


async def test_publish_reports_rejections_and_exits_non_zero(setup: Setup, tmp_path: Path) -> None:
    invalid = write(tmp_path, "bad.json", {**CONCERN, "child": {**CONCERN["child"], "nhsNumber": "9434765918"}})
    code, out = await setup.csx("intake", "publish", "--agency", "police", "--file", invalid)
    assert code == 2, out
    assert "rejected: INVALID" in out and "child.nhs_number" in out and "9434765918" not in out
    # A police system sending a concern that names education: refused, as over gRPC.
    other = write(tmp_path, "other.json", {**CONCERN, "agency": "AGENCY_EDUCATION"})
    code, out = await setup.csx("intake", "publish", "--agency", "police", "--file", other)
    assert code == 1, out
    assert "rejected: AGENCY_MISMATCH" in out
    assert await setup.concerns() == 0


runner = CliRunner()


def test_publish_malformed_json_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "concern.json"
    bad.write_text('{"agency": ')
    result = runner.invoke(app, ["intake", "publish", "--agency", "police", "--file", str(bad)])
    assert result.exit_code == 2
    assert "not a readable SubmitConcernRequest" in " ".join(result.output.split())


def test_publish_without_a_pki_says_what_is_missing(tmp_path: Path) -> None:
    file = tmp_path / "concern.json"
    file.write_text(json.dumps(CONCERN))
    result = runner.invoke(
        app,
        ["intake", "publish", "--agency", "police", "--file", str(file)],
        env={"CSX_PKI_DIR": str(tmp_path / "nowhere")},
    )
    assert result.exit_code == 1
    assert "missing" in result.output and "csx up" in result.output


def test_stack_gives_referrals_its_intake_key(tmp_path: Path) -> None:
    stack = Stack(StackConfig(data_dir=tmp_path / "var", base_port=61151, nats_port=24322))
    key = stack.service_env("referrals")["CSX_REFERRALS_INTAKE_KEY_FILE"]
    assert key == str(stack.pki.intake_key_file)
    assert "CSX_PANEL_INTAKE_KEY_FILE" not in stack.service_env("panel")
