"""The actionplans process in-process, from its composition root: real gRPC on loopback, a real
nats-server, SQLite (and PostgreSQL where configured), and the conferences stand-in."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest
from nats.js import JetStreamContext
from sqlalchemy import func, select

from csx.actionplans.v1 import actionplans_pb2 as pb
from csx.actionplans.v1 import actionplans_pb2_grpc
from csx.actionplans.v1 import events_pb2 as events
from csx.conferences.v1 import events_pb2 as cev
from csx.types.v1 import types_pb2
from csx_actionplans import tables
from csx_actionplans.app import build
from csx_actionplans.settings import ActionPlansSettings
from csx_common.errors import status_details
from csx_common.messaging.events import MSG_ID_HEADER, StreamSpec
from csx_common.messaging.streams import ensure_stream
from csx_common.messaging.tables import PUBLISHED
from csx_common.messaging.topology import topology
from csx_common.natsserver import free_port
from csx_safeguarding.runtime import SafeguardingRuntime
from tests.actionplans.conftest import CANARY, ConferencesServer
from tests.support import eventually, files_containing, identity_settings, user, user_channel

DURABLE = "actionplans-conferences"
CONCLUDED = "csx.conferences.conference_concluded"
CONFERENCES_STREAM = topology().stream("conferences").name


class ActionPlans:
    def __init__(
        self,
        runtime: SafeguardingRuntime,
        stub: actionplans_pb2_grpc.ActionPlansServiceStub,
        js: JetStreamContext,
        conferences: ConferencesServer,
    ) -> None:
        self.runtime, self.stub, self.js, self.conferences = runtime, stub, js, conferences

    async def publish(self, event: cev.ConferenceConcluded, msg_id: str | None = None) -> None:
        await self.js.publish(
            CONCLUDED, event.SerializeToString(), headers={MSG_ID_HEADER: msg_id or str(uuid.uuid4())}
        )

    async def plans(self, conference_id: str) -> list[pb.ActionPlan]:
        reply = await self.stub.ListActionPlans(pb.ListActionPlansRequest(conference_id=conference_id), timeout=5)
        return list(reply.plans)

    async def plan_for(self, event: cev.ConferenceConcluded) -> pb.ActionPlan:
        await self.publish(event)

        async def exists() -> bool:
            return bool(await self.plans(event.conference_id))

        await eventually(exists)
        return (await self.plans(event.conference_id))[0]

    async def count(self, table) -> int:  # type: ignore[no-untyped-def]
        async with self.runtime.db.session() as s:
            return int((await s.execute(select(func.count()).select_from(table))).scalar_one())

    async def subjects(self) -> list[str]:
        o = tables.delivery.outbox.c
        async with self.runtime.db.session() as s:
            return sorted(r for (r,) in (await s.execute(select(o.subject))).all())

    async def all_published(self) -> bool:
        o = tables.delivery.outbox.c
        async with self.runtime.db.session() as s:
            return {r for (r,) in (await s.execute(select(o.status))).all()} <= {PUBLISHED}


@pytest.fixture
async def actionplans(  # type: ignore[no-untyped-def]
    databases, nats_url: str, conferences: ConferencesServer, tmp_path: Path
) -> AsyncIterator[ActionPlans]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    # The conferences stream is conferences' to declare; here it is ours, emptied, with no consumer
    # left over from an earlier test, so each test sees only its own events.
    await ensure_stream(js, StreamSpec.for_service("conferences"))
    # The service also reads referrals' consent events (its disclosure view).
    await ensure_stream(js, StreamSpec.for_service("referrals"))
    await js.purge_stream(CONFERENCES_STREAM)
    with contextlib.suppress(Exception):
        await js.delete_consumer(CONFERENCES_STREAM, DURABLE)
    settings = ActionPlansSettings(
        grpc_address=f"127.0.0.1:{free_port()}",
        database_url=await databases.new("actionplans"),
        nats_url=nats_url,
        keyring_file=str(tmp_path / "keyring.json"),
        conferences_address=conferences.address,
        conferences_timeout_seconds=2.0,
        **identity_settings("actionplans"),
    )
    runtime = build(settings)
    await runtime.start()
    channel = user_channel(settings.grpc_address, user("social_care", "chair", "conference_participation"))
    yield ActionPlans(runtime, actionplans_pb2_grpc.ActionPlansServiceStub(channel), js, conferences)
    await channel.close()
    await runtime.shutdown()
    with contextlib.suppress(Exception):
        await js.delete_consumer(CONFERENCES_STREAM, DURABLE)
    await nc.close()


def update(plan: pb.ActionPlan, status: int, version: int, key: str, index: int = 0) -> pb.UpdateActionRequest:
    return pb.UpdateActionRequest(
        plan_id=plan.plan_id,
        action_id=plan.actions[index].action_id,
        expected_version=version,
        status=status,
        idempotency_key=key,
    )


async def rpc_error(call) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def reason(error: grpc.aio.AioRpcError) -> str:
    status = status_details(error)
    assert status is not None
    from google.rpc import error_details_pb2

    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def test_concluded_event_becomes_one_plan_and_is_published(actionplans: ActionPlans) -> None:
    event = actionplans.conferences.servicer.conclude()
    plan = await actionplans.plan_for(event)
    assert len(plan.actions) == 3 and plan.actions[0].description.startswith(CANARY)
    got = await actionplans.stub.GetActionPlan(pb.GetActionPlanRequest(plan_id=plan.plan_id), timeout=5)
    assert got.plan == plan

    # Republished under a new id (so neither JetStream nor the inbox dedupes it): the plan already
    # exists, so still one plan and one event.
    [consumer] = [c for c in actionplans.runtime.consumers if c.spec.durable == DURABLE]
    await actionplans.publish(event)

    async def seen_twice() -> bool:
        return consumer.processed == 2

    await eventually(seen_twice)
    assert await actionplans.count(tables.action_plans) == 1
    # One ActionPlanPublished, and for each owning agency's portal one event naming its own actions.
    owners = sorted({types_pb2.Agency.Name(a.owner_agency).removeprefix("AGENCY_").lower() for a in plan.actions})
    assert await actionplans.subjects() == sorted(
        ["csx.actionplans.action_plan_published"]
        + [f"csx.actionplans.partner.{agency}.action_assigned" for agency in owners]
    )

    await eventually(actionplans.all_published)
    last = await actionplans.js.get_last_msg("CSX_ACTIONPLANS", "csx.actionplans.action_plan_published")
    published = events.ActionPlanPublished.FromString(last.data)
    assert (published.plan_id, published.action_count) == (plan.plan_id, 3)


async def test_conferences_down_is_retried_by_the_consumer(actionplans: ActionPlans) -> None:
    fake = actionplans.conferences.servicer
    fake.down = True
    event = fake.conclude()
    await actionplans.publish(event)

    async def retried() -> bool:
        return fake.calls >= 2

    await eventually(retried)  # nak'ed with backoff, then redelivered
    assert await actionplans.plans(event.conference_id) == []
    fake.down = False

    async def exists() -> bool:
        return bool(await actionplans.plans(event.conference_id))

    await eventually(exists)
    assert await actionplans.count(tables.delivery.dead_letters) == 0


async def test_update_action_happy_path_stale_retry_and_closed(actionplans: ActionPlans, tmp_path: Path) -> None:
    plan = await actionplans.plan_for(actionplans.conferences.servicer.conclude())
    stub = actionplans.stub

    first = update(plan, pb.ACTION_STATUS_IN_PROGRESS, 1, "upd-0001")
    moved = await stub.UpdateAction(first, timeout=5)
    assert (moved.action.status, moved.action.version) == (pb.ACTION_STATUS_IN_PROGRESS, 2)
    assert moved.action.description == plan.actions[0].description

    # A retry of the same request answers the first result, description included, and writes nothing.
    again = await stub.UpdateAction(first, timeout=5)
    assert again == moved
    assert (await actionplans.subjects()).count("csx.actionplans.action_updated") == 1

    # The same version read by someone else is now stale.
    stale = await rpc_error(stub.UpdateAction(update(plan, pb.ACTION_STATUS_DONE, 1, "upd-0002"), timeout=5))
    assert stale.code() == grpc.StatusCode.ABORTED and reason(stale) == "STALE_VERSION"

    # The same key for a different request is refused, not replayed.
    reused = await rpc_error(stub.UpdateAction(update(plan, pb.ACTION_STATUS_DONE, 2, "upd-0001"), timeout=5))
    assert reused.code() == grpc.StatusCode.FAILED_PRECONDITION

    done = await stub.UpdateAction(update(plan, pb.ACTION_STATUS_DONE, 2, "upd-0003"), timeout=5)
    assert (done.action.status, done.action.version) == (pb.ACTION_STATUS_DONE, 3)
    for target in (pb.ACTION_STATUS_OPEN, pb.ACTION_STATUS_IN_PROGRESS, pb.ACTION_STATUS_CANCELLED):
        closed = await rpc_error(stub.UpdateAction(update(plan, target, 3, f"upd-10{target:02d}"), timeout=5))
        assert closed.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(closed) == "ACTION_CLOSED"

    cancelled = await stub.UpdateAction(update(plan, pb.ACTION_STATUS_CANCELLED, 1, "upd-0004", index=1), timeout=5)
    assert cancelled.action.status == pb.ACTION_STATUS_CANCELLED
    reopen = await rpc_error(stub.UpdateAction(update(plan, pb.ACTION_STATUS_OPEN, 2, "upd-0005", index=1), timeout=5))
    assert reopen.code() == grpc.StatusCode.FAILED_PRECONDITION

    stored = (await stub.GetActionPlan(pb.GetActionPlanRequest(plan_id=plan.plan_id), timeout=5)).plan
    assert [(a.status, a.version) for a in stored.actions] == [
        (pb.ACTION_STATUS_DONE, 3),
        (pb.ACTION_STATUS_CANCELLED, 2),
        (pb.ACTION_STATUS_OPEN, 1),
    ]
    await eventually(actionplans.all_published)
    last = await actionplans.js.get_last_msg("CSX_ACTIONPLANS", "csx.actionplans.action_updated")
    updated = events.ActionUpdated.FromString(last.data)
    assert (updated.action_id, updated.status, updated.version) == (
        plan.actions[1].action_id,
        pb.ACTION_STATUS_CANCELLED,
        2,
    )
    assert (await actionplans.subjects()).count("csx.actionplans.action_updated") == 3

    # The idempotency table keeps responses with their sealed fields sealed: no description in clear.
    if actionplans.runtime.db.is_sqlite:
        assert files_containing(tmp_path, [CANARY.encode()]) == []


async def test_unknown_ids_are_not_found(actionplans: ActionPlans) -> None:
    fake = actionplans.conferences.servicer
    plan = await actionplans.plan_for(fake.conclude())
    other = await actionplans.plan_for(fake.conclude())
    stub = actionplans.stub
    missing = await rpc_error(stub.GetActionPlan(pb.GetActionPlanRequest(plan_id=str(uuid.uuid4())), timeout=5))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    for request in (
        pb.UpdateActionRequest(
            plan_id=str(uuid.uuid4()),
            action_id=plan.actions[0].action_id,
            expected_version=1,
            status=pb.ACTION_STATUS_DONE,
            idempotency_key="nf-00001",
        ),
        pb.UpdateActionRequest(
            plan_id=plan.plan_id,
            action_id=str(uuid.uuid4()),
            expected_version=1,
            status=pb.ACTION_STATUS_DONE,
            idempotency_key="nf-00002",
        ),
        # An action that exists, but in another plan.
        pb.UpdateActionRequest(
            plan_id=plan.plan_id,
            action_id=other.actions[0].action_id,
            expected_version=1,
            status=pb.ACTION_STATUS_DONE,
            idempotency_key="nf-00003",
        ),
    ):
        err = await rpc_error(stub.UpdateAction(request, timeout=5))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert await actionplans.count(tables.idempotency) == 0


async def test_list_by_child_and_bad_requests(actionplans: ActionPlans) -> None:
    fake = actionplans.conferences.servicer
    child = str(uuid.uuid4())
    first = await actionplans.plan_for(fake.conclude(child_id=child))
    second = await actionplans.plan_for(fake.conclude(child_id=child))
    listed = await actionplans.stub.ListActionPlans(pb.ListActionPlansRequest(child_id=child), timeout=5)
    assert {p.plan_id for p in listed.plans} == {first.plan_id, second.plan_id}

    both = pb.ListActionPlansRequest(child_id=child, conference_id=first.conference_id)
    for bad in (pb.ListActionPlansRequest(), both):
        err = await rpc_error(actionplans.stub.ListActionPlans(bad, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    unspecified = update(first, pb.ACTION_STATUS_UNSPECIFIED, 1, "bad-0001")
    err = await rpc_error(actionplans.stub.UpdateAction(unspecified, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_only_the_owning_agency_or_social_care_moves_an_action(actionplans: ActionPlans) -> None:
    plan = await actionplans.plan_for(actionplans.conferences.servicer.conclude())
    police_action = next(a for a in plan.actions if a.owner_agency == types_pb2.AGENCY_POLICE)
    address = actionplans.runtime.settings.grpc_address

    def update(key: str) -> pb.UpdateActionRequest:
        return pb.UpdateActionRequest(
            plan_id=plan.plan_id,
            action_id=police_action.action_id,
            expected_version=police_action.version,
            status=pb.ACTION_STATUS_IN_PROGRESS,
            idempotency_key=key,
        )

    nurse = user("health", "health_safeguarding_nurse", "action_delivery", "nurse.1")
    async with user_channel(address, nurse) as channel:
        err = await rpc_error(
            actionplans_pb2_grpc.ActionPlansServiceStub(channel).UpdateAction(update("upd-hlth-1"), timeout=5)
        )
    assert err.code() == grpc.StatusCode.NOT_FOUND  # not theirs: as if it did not exist
    assert (await actionplans.subjects()).count("csx.actionplans.action_updated") == 0
    officer = user("police", "police_officer", "action_delivery", "pc.1")
    async with user_channel(address, officer) as channel:
        moved = await actionplans_pb2_grpc.ActionPlansServiceStub(channel).UpdateAction(update("upd-pol-01"), timeout=5)
    assert moved.action.status == pb.ACTION_STATUS_IN_PROGRESS
    assert moved.action.description == police_action.description  # its own action, in full
