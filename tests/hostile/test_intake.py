"""Sealed intake (referrals consuming agencies' envelopes on NATS) under hostile input: mutated
concerns sealed and signed properly, and arbitrary or damaged envelope bytes, published as the
police's own NATS user to a referrals service with its intake key. Every one is answered, accepted
or rejected with a reason; a rejection stores nothing, and no answer repeats a value it was sent.
(The fixed catalogue of forged, stale and replayed envelopes is in tests/intake.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csx.intake.v1 import intake_pb2
from csx_cli.stack import CONSUMES, SERVICES
from csx_client import IntakeClient, seal
from csx_common.natsauth import DevNatsAuth
from csx_common.natsserver import NatsServer
from csx_common.pki import AGENCIES
from tests.hostile.conftest import Running, Starter
from tests.hostile.support import CANARIES, Injected, changed, hostile_settings, mutated, raw_payloads, row_counts
from tests.intake.conftest import identity, police_concern, recipient
from tests.support import dev_pki

ANSWER_WITHIN = 15.0


@pytest.fixture(scope="module")
def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, DevNatsAuth]]:
    root = tmp_path_factory.mktemp("hostile-intake-nats")
    auth = DevNatsAuth(root / "auth").ensure(SERVICES, AGENCIES, CONSUMES)
    server = NatsServer(root / "store", config_file=auth.config_file)
    server.start()
    yield server, auth
    server.stop()


@pytest.fixture(scope="module")
async def intake(
    hostile_databases, secured_nats, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Running, IntakeClient]]:
    from csx_referrals.app import build
    from csx_referrals.settings import ReferralsSettings

    server, auth = secured_nats
    starter = Starter(server.url, hostile_databases, tmp_path_factory.mktemp("hostile-intake-keys"))
    running = await starter.start(
        "referrals",
        build,
        ReferralsSettings,
        nats_user="referrals",
        nats_password_file=str(auth.password_file("referrals")),
        intake_key_file=str(dev_pki().intake_key_file),
    )
    client = await IntakeClient.connect(
        server.url,
        identity("police"),
        recipient(),
        user="agency-police",
        password=auth.password_file("agency-police").read_text(),
    )
    yield running, client
    await client.close()
    await starter.close()


def canary_concern(reference: str):  # type: ignore[no-untyped-def]
    request = police_concern(reference)
    request.child.given_name, request.child.family_name = CANARIES[0], CANARIES[1]
    request.narrative, request.referrer.name = CANARIES[2], CANARIES[3]
    return request


async def check_answer(running: Running, future, before: dict[str, int], injected: Injected) -> None:  # type: ignore[no-untyped-def]
    result: intake_pb2.IntakeResult = await asyncio.wait_for(future, ANSWER_WITHIN)
    assert result.status in (intake_pb2.INTAKE_STATUS_ACCEPTED, intake_pb2.INTAKE_STATUS_REJECTED)
    echoed = injected.echoed_in(result.SerializeToString())
    assert not echoed, f"the answer repeats a value it was sent: {echoed!r}"
    if result.status == intake_pb2.INTAKE_STATUS_REJECTED:
        assert result.reason
        diff = changed(before, await row_counts(running.runtime))
        assert not diff, f"rejected ({result.reason}) but rows changed: {diff}"


@hostile_settings(25)
@given(data=st.data())
async def test_mutated_concerns_sealed_properly_are_answered_and_rejections_store_nothing(intake, data) -> None:  # type: ignore[no-untyped-def]
    running, client = intake
    injected = Injected()
    for canary in CANARIES:
        injected.add(canary)
    reference = f"POL-H-{data.draw(st.uuids()).hex[:12]}"
    request = mutated(data.draw, canary_concern(reference), injected)
    before = await row_counts(running.runtime)
    await check_answer(running, await client.publish(request), before, injected)


@hostile_settings(25)
@given(data=st.data())
async def test_damaged_envelopes_are_answered_and_store_nothing(intake, data) -> None:  # type: ignore[no-untyped-def]
    running, client = intake
    reference = f"POL-H-{data.draw(st.uuids()).hex[:12]}"
    _message_id, sealed = seal(canary_concern(reference), identity("police"), recipient())
    payload = data.draw(raw_payloads(sealed))
    injected = Injected()
    for canary in CANARIES:
        injected.add(canary)
    before = await row_counts(running.runtime)
    await check_answer(running, await client.publish_sealed(payload), before, injected)
