"""Sealed intake against a real nats-server with the stack's NATS users and permissions (agencies
publish as themselves, referrals consumes as itself) and a real referrals service in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from csx.intake.v1 import intake_pb2
from csx.referrals.v1 import referrals_pb2_grpc
from csx_cli.stack import CONSUMES, SERVICES
from csx_client import AgencyIdentity, IntakeClient, Recipient
from csx_common.natsauth import DevNatsAuth
from csx_common.natsserver import NatsServer, free_port
from csx_common.pki import AGENCIES, DevPki, PeerIdentity
from csx_referrals import tables
from csx_referrals.app import ReferralsRuntime, build
from csx_referrals.settings import ReferralsSettings
from tests.support import concern_request, dev_pki, identity_settings, user, user_channel

POLICE = 1  # csx.types.v1.Agency.AGENCY_POLICE


def police_concern(reference: str, **overrides: object):  # type: ignore[no-untyped-def]
    req = concern_request("unused-key", agency=POLICE, agency_reference=reference, **overrides)
    req.ClearField("idempotency_key")  # the intake path derives it from the agency reference
    return req


def identity(agency: str, pki: DevPki | None = None, *, claims: str | None = None) -> AgencyIdentity:
    """`agency`'s certificate and key from `pki` (default: the partnership's), claiming `claims`."""
    pki = pki or dev_pki()
    peer = PeerIdentity("agency", agency)
    signer = AgencyIdentity.from_files(agency, pki.cert_file(peer), pki.key_file(peer))
    return AgencyIdentity(claims or agency, signer.certificate_der, signer.key)


def recipient() -> Recipient:
    return Recipient.from_file(dev_pki().intake_public_file)


@pytest.fixture(scope="module")
def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, DevNatsAuth]]:
    root = tmp_path_factory.mktemp("intake-nats")
    auth = DevNatsAuth(root / "auth").ensure(SERVICES, AGENCIES, CONSUMES)
    server = NatsServer(root / "store", config_file=auth.config_file)
    server.start()
    yield server, auth
    server.stop()


class Intake:
    def __init__(self, runtime: ReferralsRuntime, server: NatsServer, auth: DevNatsAuth) -> None:
        self.runtime, self.server, self.auth = runtime, server, auth
        self._clients: list[IntakeClient] = []
        self._channels: list = []

    async def client(self, agency: str = "police", who: AgencyIdentity | None = None) -> IntakeClient:
        """Connected as `agency`'s NATS user, signing as `who` (default: the agency itself)."""
        client = await IntakeClient.connect(
            self.server.url,
            who or identity(agency),
            recipient(),
            user=f"agency-{agency}",
            password=self.auth.password_file(f"agency-{agency}").read_text(),
        )
        self._clients.append(client)
        return client

    async def count(self, table) -> int:  # type: ignore[no-untyped-def]
        async with self.runtime.db.session() as s:
            return int((await s.execute(select(func.count()).select_from(table))).scalar_one())

    async def stored(self) -> dict[str, int]:
        """Rows a submission could leave: state, events, idempotency keys, seen message ids."""
        return {
            "concerns": await self.count(tables.concerns),
            "children": await self.count(tables.children),
            "referrals": await self.count(tables.referrals),
            "outbox": await self.count(tables.delivery.outbox),
            "idempotency": await self.count(tables.idempotency),
            "inbox": await self.count(tables.delivery.inbox),
        }

    async def stream_messages(self) -> int:
        assert self.runtime.js is not None
        return int((await self.runtime.js.stream_info("CSX_INTAKE")).state.messages)

    def grpc(self, agency: str = "police", role: str = "police_officer") -> referrals_pb2_grpc.ReferralsServiceStub:
        channel = user_channel(self.runtime.settings.grpc_address, user(agency, role, user_id=f"{agency}.reader"))
        self._channels.append(channel)
        return referrals_pb2_grpc.ReferralsServiceStub(channel)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients.clear()
        for channel in self._channels:
            await channel.close()
        self._channels.clear()


async def start_referrals(databases, secured_nats, tmp_path: Path, **overrides: object) -> ReferralsRuntime:  # type: ignore[no-untyped-def]
    server, auth = secured_nats
    settings = ReferralsSettings(
        grpc_address=f"127.0.0.1:{free_port()}",
        database_url=await databases.new("referrals"),
        nats_url=server.url,
        nats_user="referrals",
        nats_password_file=str(auth.password_file("referrals")),
        keyring_file=str(tmp_path / "keyring.json"),
        intake_key_file=str(dev_pki().intake_key_file),
        **identity_settings("referrals"),
        **overrides,  # type: ignore[arg-type]
    )
    runtime = build(settings)
    await runtime.start()
    return runtime


@pytest.fixture
async def intake(databases, secured_nats, tmp_path: Path) -> AsyncIterator[Intake]:  # type: ignore[no-untyped-def]
    runtime = await start_referrals(databases, secured_nats, tmp_path)
    harness = Intake(runtime, *secured_nats)
    yield harness
    await harness.close()
    await harness.runtime.shutdown()  # (a test may have replaced it with a restarted one)


def rejected(result: intake_pb2.IntakeResult) -> str:
    assert result.status == intake_pb2.INTAKE_STATUS_REJECTED, result
    assert not result.HasField("response")
    return result.reason
