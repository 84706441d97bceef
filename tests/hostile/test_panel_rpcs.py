"""Every panel RPC under hostile input (see test_referrals_rpcs.py for what is generated)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from csx.panel.v1 import panel_pb2 as pb
from csx.referrals.v1 import events_pb2 as referral_events
from csx.types.v1 import types_pb2 as t
from tests.hostile.conftest import Running, Starter
from tests.hostile.support import (
    Rpc,
    attack_with_bytes,
    attack_with_mutations,
    consumer_for,
    deliver,
    hostile_settings,
    service_methods,
)
from tests.support import user

SERVICE = "/csx.panel.v1.PanelService/"
ANALYST = user("police", "panel_member", "panel_analysis", "analyst.hostile")
SOCIAL_WORKER = user("social_care", "social_worker", "referral_screening", "sw.hostile")
OTHERS = [
    ANALYST,
    SOCIAL_WORKER,
    user("education", "dsl", "referral_screening", "dsl.hostile"),
    user("police", "no_such_role", "panel_analysis", "odd.hostile"),
    user("health", "health_safeguarding_nurse", "no_such_purpose", "odd2.hostile"),
]
PLACE = "plc-hostile-park"
CONCERN_RECORDED = "csx.referrals.concern_recorded"


def rpcs(child_id: str) -> dict[str, Rpc]:
    table = [
        Rpc("GetPlaceProfile", lambda k: pb.GetPlaceProfileRequest(place_id=PLACE), ANALYST),
        Rpc("GetChildLinks", lambda k: pb.GetChildLinksRequest(child_id=child_id), SOCIAL_WORKER),
    ]
    return {
        SERVICE + r.path: Rpc(SERVICE + r.path, r.base, r.caller, [o for o in OTHERS if o != r.caller], [child_id])
        for r in table
    }


@pytest.fixture(scope="module")
async def panel(starter: Starter) -> AsyncIterator[tuple[Running, dict[str, Rpc]]]:
    running = await starter.panel()
    consumer = consumer_for(running.runtime, CONCERN_RECORDED)
    children = [str(uuid.uuid4()) for _ in range(3)]
    for child in children:  # three children at one place: flagged for the panel
        event = referral_events.ConcernRecorded(
            concern_id=str(uuid.uuid4()),
            referral_id=str(uuid.uuid4()),
            child_id=child,
            agency=t.AGENCY_POLICE,
            harm_types=[t.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION],
            contexts=[t.ContextLink(place_id=PLACE, context_type=t.CONTEXT_TYPE_NEIGHBOURHOOD)],
            recorded_at=timestamp_pb2.Timestamp(seconds=1_790_000_000),
        )
        assert await deliver(consumer, CONCERN_RECORDED, event.SerializeToString()) == ("ack", 1)
    yield running, rpcs(children[0])


def test_every_panel_rpc_is_attacked() -> None:
    assert sorted(rpcs(str(uuid.uuid4()))) == sorted(service_methods(pb.DESCRIPTOR, "PanelService"))


METHODS = service_methods(pb.DESCRIPTOR, "PanelService")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[-1])
@hostile_settings(30)
@given(data=st.data())
async def test_mutated_requests_get_clean_answers_and_leave_nothing(panel, method: str, data) -> None:  # type: ignore[no-untyped-def]
    running, table = panel
    await attack_with_mutations(running, table[method], data)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[-1])
@hostile_settings(15)
@given(data=st.data())
async def test_raw_bytes_get_clean_answers_and_leave_nothing(panel, method: str, data) -> None:  # type: ignore[no-untyped-def]
    running, table = panel
    await attack_with_bytes(running, table[method], data)
