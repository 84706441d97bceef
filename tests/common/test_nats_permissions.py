"""Each NATS user may touch only its own subjects (csx_common.natsauth), on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import api as js_api

from csx_common.intake import IntakeConsumer, ensure_intake_stream
from csx_common.messaging.events import StreamSpec
from csx_common.messaging.streams import ensure_stream
from csx_common.natsauth import Consumes, DevNatsAuth, inbox_prefix
from csx_common.natsserver import NatsServer

SERVICES = ("referrals", "panel", "conferences", "actionplans")
AGENCIES = ("police", "health", "education")
CONSUMES = (
    Consumes("panel", "CSX_REFERRALS", "panel-concerns"),
    Consumes("conferences", "CSX_REFERRALS", "conferences-referrals"),
    Consumes("referrals", "CSX_INTAKE", "referrals-intake"),
)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, DevNatsAuth]]:
    root = tmp_path_factory.mktemp("nats-auth")
    auth = DevNatsAuth(root / "auth").ensure(SERVICES, AGENCIES, CONSUMES)
    server = NatsServer(root / "store", config_file=auth.config_file)
    server.start()
    yield server, auth
    server.stop()


class Session:
    def __init__(self, nc: nats.NATS, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors

    async def violations(self) -> list[str]:
        await self.nc.flush(timeout=2)
        await asyncio.sleep(0.1)
        return [e for e in self.errors if "permissions violation" in e.lower()]


async def login(secured: tuple[NatsServer, DevNatsAuth], user: str) -> Session:
    server, auth = secured
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        server.url,
        user=user,
        password=auth.password_file(user).read_text(),
        error_cb=on_error,
        allow_reconnect=False,
        inbox_prefix=inbox_prefix(user),
    )
    return Session(nc, errors)


@pytest.fixture
async def sessions(secured) -> AsyncIterator[list[Session]]:  # type: ignore[no-untyped-def]
    opened: list[Session] = []
    yield opened
    for s in opened:
        await s.nc.close()


async def test_agency_publishes_only_its_own_intake(secured, sessions) -> None:  # type: ignore[no-untyped-def]
    police = await login(secured, "agency-police")
    sessions.append(police)
    await police.nc.publish("csx.intake.police.submit", b"sealed")
    assert await police.violations() == []
    await police.nc.publish("csx.intake.health.submit", b"sealed")
    await police.nc.publish("csx.intake.police.result", b"forged answer")
    assert len(await police.violations()) == 2


async def test_agency_reads_only_its_own_partner_subjects(secured, sessions) -> None:  # type: ignore[no-untyped-def]
    police = await login(secured, "agency-police")
    sessions.append(police)
    await police.nc.subscribe("csx.actionplans.partner.police.>")
    assert await police.violations() == []
    await police.nc.subscribe("csx.actionplans.partner.health.>")
    assert len(await police.violations()) == 1


async def test_wrong_password_is_refused(secured) -> None:  # type: ignore[no-untyped-def]
    server, _auth = secured
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(
            server.url, user="agency-police", password="guess", allow_reconnect=False, max_reconnect_attempts=0
        )


async def test_service_owns_its_stream_and_events_only(secured, sessions) -> None:  # type: ignore[no-untyped-def]
    referrals = await login(secured, "referrals")
    panel = await login(secured, "panel")
    sessions.extend([referrals, panel])
    await ensure_stream(referrals.nc.jetstream(), StreamSpec.for_service("referrals"))
    ack = await referrals.nc.jetstream().publish("csx.referrals.concern_recorded", b"x")
    assert ack.stream == "CSX_REFERRALS"
    # The panel may not forge referrals' events, nor declare referrals' stream.
    await panel.nc.publish("csx.referrals.concern_recorded", b"forged")
    assert len(await panel.violations()) == 1
    with pytest.raises(Exception):  # noqa: B017 - a denied API request gets no answer
        await ensure_stream(panel.nc.jetstream(timeout=1), StreamSpec.for_service("referrals"))


async def test_service_reads_only_through_its_own_durable(secured, sessions) -> None:  # type: ignore[no-untyped-def]
    referrals = await login(secured, "referrals")
    panel = await login(secured, "panel")
    sessions.extend([referrals, panel])
    await ensure_stream(referrals.nc.jetstream(), StreamSpec.for_service("referrals"))
    await referrals.nc.jetstream().publish("csx.referrals.concern_recorded", b"y")
    js = panel.nc.jetstream(timeout=2)
    config = js_api.ConsumerConfig(durable_name="panel-concerns", filter_subjects=["csx.referrals.concern_recorded"])
    await js.add_consumer("CSX_REFERRALS", config)
    sub = await js.pull_subscribe_bind(durable="panel-concerns", stream="CSX_REFERRALS")
    [msg] = await sub.fetch(1, timeout=3)
    await msg.ack()
    assert await panel.violations() == []
    # Another service's durable is off limits: the request is denied and never answered.
    other = js_api.ConsumerConfig(durable_name="conferences-referrals", filter_subjects=["csx.referrals.>"])
    with pytest.raises(Exception):  # noqa: B017
        await js.add_consumer("CSX_REFERRALS", other)


def test_rendered_config_passes_nats_server_check(secured) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from csx_common.natsserver import nats_server_binary

    _server, auth = secured
    done = subprocess.run(  # noqa: S603
        [nats_server_binary(), "-t", "-c", str(auth.config_file)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path(auth.config_file).stat().st_mode & 0o077 == 0


async def test_nobody_reads_another_users_replies(secured, sessions) -> None:  # type: ignore[no-untyped-def]
    health = await login(secured, "agency-health")
    sessions.append(health)
    await health.nc.subscribe("_INBOX.>")
    await health.nc.subscribe(inbox_prefix("panel") + ".>")
    assert len(await health.violations()) == 2


# --- sealed intake (csx_common.intake) ---------------------------------------------------------------


async def test_agency_hears_only_its_own_intake_results(secured, sessions) -> None:  # type: ignore[no-untyped-def]
    police = await login(secured, "agency-police")
    sessions.append(police)
    await police.nc.subscribe("csx.intake.police.result")
    assert await police.violations() == []
    await police.nc.subscribe("csx.intake.health.result")
    await police.nc.subscribe("csx.intake.*.result")
    await police.nc.subscribe("csx.intake.health.submit")
    assert len(await police.violations()) == 3


async def test_agency_stores_in_the_intake_stream_that_only_referrals_reads(secured, sessions) -> None:  # type: ignore[no-untyped-def]
    referrals = await login(secured, "referrals")
    police = await login(secured, "agency-police")
    panel = await login(secured, "panel")
    sessions.extend([referrals, police, panel])
    # Only referrals declares the intake stream.
    with pytest.raises(Exception):  # noqa: B017 - a denied API request gets no answer
        await ensure_intake_stream(panel.nc.jetstream(timeout=1))
    assert len(await panel.violations()) == 1
    await ensure_intake_stream(referrals.nc.jetstream(timeout=2))
    # The agency's publish is stored and acknowledged on its own inbox, with no JetStream API right.
    ack = await police.nc.jetstream(timeout=2).publish("csx.intake.police.submit", b"sealed-probe")
    assert ack.stream == "CSX_INTAKE"
    assert await police.violations() == []
    # Referrals reads it through its own durable, and may answer on any agency's result subject.
    js = referrals.nc.jetstream(timeout=2)
    consumer = IntakeConsumer(referrals.nc, js, None, None, durable="referrals-intake")  # type: ignore[arg-type]
    await consumer.declare()
    sub = await js.pull_subscribe_bind(durable="referrals-intake", stream="CSX_INTAKE")
    [msg] = await sub.fetch(1, timeout=3)
    assert msg.data == b"sealed-probe"
    await msg.ack()
    await referrals.nc.publish("csx.intake.police.result", b"answer")
    assert await referrals.violations() == []
    # Referrals may not forge an agency's submission; nobody else reads the stream or answers.
    await referrals.nc.publish("csx.intake.police.submit", b"forged")
    assert len(await referrals.violations()) == 1
    await panel.nc.publish("csx.intake.police.result", b"forged answer")
    assert len(await panel.violations()) == 2
    other = js_api.ConsumerConfig(durable_name="panel-intake", filter_subjects=["csx.intake.*.submit"])
    with pytest.raises(Exception):  # noqa: B017
        await panel.nc.jetstream(timeout=1).add_consumer("CSX_INTAKE", other)
    assert len(await panel.violations()) == 3
