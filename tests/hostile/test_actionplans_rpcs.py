"""Every actionplans RPC under hostile input (see test_referrals_rpcs.py for what is generated).
Conferences is the stand-in the actionplans API tests use, on a real mutual-TLS gRPC server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from csx.actionplans.v1 import actionplans_pb2 as pb
from csx.actionplans.v1 import actionplans_pb2_grpc
from csx.conferences.v1 import conferences_pb2_grpc
from tests.actionplans.conftest import FakeConferences
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
from tests.support import server_credentials, user

SERVICE = "/csx.actionplans.v1.ActionPlansService/"
CHAIR = user("social_care", "chair", "conference_participation", "chair.hostile")
OFFICER = user("police", "police_officer", "action_delivery", "pc.hostile")
OTHERS = [
    CHAIR,
    OFFICER,
    user("education", "dsl", "action_delivery", "dsl.hostile"),
    user("health", "health_safeguarding_nurse", "action_delivery", "nurse.hostile"),
    user("police", "no_such_role", "action_delivery", "odd.hostile"),
    user("police", "police_officer", "no_such_purpose", "odd2.hostile"),
]
CONCLUDED = "csx.conferences.conference_concluded"


def rpcs(plans: list[pb.ActionPlan]) -> dict[str, Rpc]:
    known = [x for p in plans for x in (p.plan_id, p.conference_id, p.child_id, *(a.action_id for a in p.actions))]

    def update(key: str) -> pb.UpdateActionRequest:
        plan = plans[hash(key) % len(plans)]
        action = plan.actions[hash(key[::-1]) % len(plan.actions)]
        return pb.UpdateActionRequest(
            plan_id=plan.plan_id,
            action_id=action.action_id,
            expected_version=action.version,
            status=pb.ACTION_STATUS_IN_PROGRESS,
            idempotency_key=key,
        )

    first = plans[0]
    table = [
        Rpc("GetActionPlan", lambda k: pb.GetActionPlanRequest(plan_id=first.plan_id), CHAIR),
        Rpc("ListActionPlans", lambda k: pb.ListActionPlansRequest(child_id=first.child_id), OFFICER),
        Rpc("UpdateAction", update, OFFICER),
    ]
    return {
        SERVICE + r.path: Rpc(SERVICE + r.path, r.base, r.caller, [o for o in OTHERS if o != r.caller], known)
        for r in table
    }


@pytest.fixture(scope="module")
async def actionplans(starter: Starter) -> AsyncIterator[tuple[Running, dict[str, Rpc]]]:
    fake = FakeConferences()
    server = grpc.aio.server()
    conferences_pb2_grpc.add_ConferencesServiceServicer_to_server(fake, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials("conferences"))
    await server.start()
    running = await starter.actionplans(f"127.0.0.1:{port}")
    consumer = consumer_for(running.runtime, CONCLUDED)
    stub = actionplans_pb2_grpc.ActionPlansServiceStub(running.channel(CHAIR))
    plans = []
    for _ in range(3):
        event = fake.conclude()
        assert await deliver(consumer, CONCLUDED, event.SerializeToString()) == ("ack", 1)
        listed = await stub.ListActionPlans(pb.ListActionPlansRequest(conference_id=event.conference_id), timeout=10)
        plans.extend(listed.plans)
    yield running, rpcs(plans)
    await server.stop(None)


def test_every_actionplans_rpc_is_attacked() -> None:
    plan = pb.ActionPlan(plan_id=str(uuid.uuid4()), actions=[pb.Action(action_id=str(uuid.uuid4()))])
    assert sorted(rpcs([plan])) == sorted(service_methods(pb.DESCRIPTOR, "ActionPlansService"))


METHODS = service_methods(pb.DESCRIPTOR, "ActionPlansService")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[-1])
@hostile_settings(30)
@given(data=st.data())
async def test_mutated_requests_get_clean_answers_and_leave_nothing(actionplans, method: str, data) -> None:  # type: ignore[no-untyped-def]
    running, table = actionplans
    await attack_with_mutations(running, table[method], data)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[-1])
@hostile_settings(15)
@given(data=st.data())
async def test_raw_bytes_get_clean_answers_and_leave_nothing(actionplans, method: str, data) -> None:  # type: ignore[no-untyped-def]
    running, table = actionplans
    await attack_with_bytes(running, table[method], data)
