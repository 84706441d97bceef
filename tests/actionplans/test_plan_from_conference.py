"""The ConferenceConcluded handler as the inbox consumer calls it (inside its unit of work), against a
migrated SQLite database and a real gRPC conferences stand-in on loopback."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from csx.actionplans.v1 import actionplans_pb2 as pb
from csx.actionplans.v1 import events_pb2 as events
from csx.conferences.v1 import conferences_pb2 as cpb
from csx.conferences.v1 import events_pb2 as cev
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.types.v1 import types_pb2 as t
from csx_actionplans import tables
from csx_actionplans.app import MIGRATIONS
from csx_actionplans.conferences_client import ConferencesClient
from csx_actionplans.repository import ActionPlansRepository
from csx_actionplans.service import ActionPlansService, ConferenceNotConcluded
from csx_common import telemetry
from csx_common.audit import AuditLog
from csx_common.datakeys import DataKeys
from csx_common.db import Database
from csx_common.idempotency import IdempotencyKeys
from csx_common.keyring import FileKeyring
from csx_common.messaging.outbox import Outbox
from csx_common.migrations import upgrade
from csx_common.natsserver import free_port
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry
from csx_common.unit_of_work import UnitsOfWork
from csx_safeguarding.disclosure import Discloser, DisclosureViews
from csx_safeguarding.policy import PolicyEngine
from tests.actionplans.conftest import CANARY, ConferencesServer
from tests.support import files_containing, service_channel


class Notifier:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@dataclass
class Rig:
    db: Database
    service: ActionPlansService
    notifier: Notifier
    fake: object

    async def deliver(self, event: cev.ConferenceConcluded) -> None:
        # As InboxConsumer.handle does: prepare outside any transaction, then apply in the unit of
        # work that commits the inbox row.
        apply = await self.service.prepare_plan(event)
        async with self.service._units.begin() as uow:
            if apply is not None:
                await apply(uow)

    async def count(self, table) -> int:  # type: ignore[no-untyped-def]
        async with self.db.session() as s:
            return int((await s.execute(select(func.count()).select_from(table))).scalar_one())

    async def outbox(self) -> list[tuple[str, bytes]]:
        o = tables.delivery.outbox.c
        async with self.db.session() as s:
            return [tuple(r) for r in (await s.execute(select(o.subject, o.payload).order_by(o.created_at))).all()]


def make_service(
    db: Database, address: str, notifier: Notifier, timeout: float = 2.0
) -> tuple[ActionPlansService, grpc.aio.Channel]:
    channel = service_channel(address, "actionplans")
    keyring = FileKeyring.create(Path(tempfile.mkdtemp()) / "keyring.json")
    sealer = Sealer(DataKeys(tables.data_keys, keyring, "actionplans"), registry())
    audit = AuditLog(tables.audit)
    units = UnitsOfWork(
        db,
        outbox=Outbox(tables.delivery, wake=notifier),
        sealer=sealer,
        idempotency=IdempotencyKeys(tables.idempotency, keyring.blind_index_key, sealer),
        audit=audit,
    )
    service = ActionPlansService(
        units,
        ActionPlansRepository(sealer),
        ConferencesClient(channel, timeout),
        Discloser(PolicyEngine.default(), registry(), audit),
        DisclosureViews(tables.disclosure, postgres=db.is_postgres),
    )
    return service, channel


def has_wal(root: Path) -> bool:
    return any(p.name.endswith("-wal") for p in root.iterdir())


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/actionplans.db")
    await upgrade(database, MIGRATIONS)
    yield database
    await database.dispose()


@pytest.fixture
async def rig(db: Database, conferences: ConferencesServer) -> AsyncIterator[Rig]:
    notifier = Notifier()
    service, channel = make_service(db, conferences.address, notifier)
    yield Rig(db, service, notifier, conferences.servicer)
    await channel.close()


async def test_concluded_conference_publishes_one_sealed_plan(
    rig: Rig, conferences: ConferencesServer, tmp_path: Path
) -> None:
    event = conferences.servicer.conclude()
    await rig.deliver(event)

    plans = (await rig.service.list_action_plans(None, conference_id=event.conference_id))[0]
    assert len(plans) == 1
    plan = plans[0]
    assert (plan.conference_id, plan.child_id) == (event.conference_id, event.child_id)
    assert [a.description for a in plan.actions] == [
        a.description for a in conferences.servicer.conferences[event.conference_id].actions
    ]
    assert {a.status for a in plan.actions} == {pb.ACTION_STATUS_OPEN}
    assert {a.version for a in plan.actions} == {1}
    assert len({a.action_id for a in plan.actions}) == 3
    assert await rig.service.get_action_plan(None, plan.plan_id) == (plan, ())
    assert [p.plan_id for p in (await rig.service.list_action_plans(None, child_id=event.child_id))[0]] == [
        plan.plan_id
    ]

    rows = await rig.outbox()
    [(subject, payload)] = [r for r in rows if r[0] == "csx.actionplans.action_plan_published"]
    published = events.ActionPlanPublished.FromString(payload)
    # Each owning agency's portal gets a thin event naming only its own actions.
    partner = {r[0]: events.PartnerActionsAssigned.FromString(r[1]) for r in rows if ".partner." in r[0]}
    assert set(partner) == {
        "csx.actionplans.partner.police.action_assigned",
        "csx.actionplans.partner.education.action_assigned",
    }
    for event_ in partner.values():
        owned = {a.action_id for a in plan.actions if a.owner_agency == event_.agency}
        assert set(event_.action_ids) == owned and event_.plan_id == plan.plan_id
    assert published.plan_id == plan.plan_id
    assert list(published.owner_agencies) == [t.AGENCY_POLICE, t.AGENCY_EDUCATION]
    assert published.action_count == 3
    assert published.published_at == plan.published_at
    # Woken after the consumer's commit, not before.
    assert rig.notifier.calls == 1

    # Descriptions are ciphertexts at rest: not in the database file, its WAL, or its shared memory.
    assert has_wal(tmp_path)
    assert files_containing(tmp_path, [CANARY.encode()]) == []


async def test_second_delivery_of_the_same_event_does_nothing(rig: Rig, conferences: ConferencesServer) -> None:
    event = conferences.servicer.conclude()
    await rig.deliver(event)
    await rig.deliver(event)
    assert await rig.count(tables.action_plans) == 1
    assert await rig.count(tables.actions) == 3
    assert [s for s, _ in await rig.outbox()].count("csx.actionplans.action_plan_published") == 1
    # The existing plan is found before asking conferences again.
    assert conferences.servicer.calls == 1


@pytest.mark.parametrize("check_event", [True, False], ids=["event-says-no-plan", "conference-says-no-plan"])
async def test_no_plan_outcome_creates_no_plan(rig: Rig, conferences: ConferencesServer, check_event: bool) -> None:
    event = conferences.servicer.conclude(outcome=cpb.CONFERENCE_OUTCOME_NO_PLAN, actions=[])
    if not check_event:
        event.outcome = cpb.CONFERENCE_OUTCOME_UNSPECIFIED  # force the fetch: conferences has the last word
    await rig.deliver(event)
    assert await rig.count(tables.action_plans) == 0
    assert await rig.outbox() == []
    assert conferences.servicer.calls == (0 if check_event else 1)


async def test_plan_outcome_without_actions_creates_no_plan(rig: Rig, conferences: ConferencesServer) -> None:
    await rig.deliver(conferences.servicer.conclude(actions=[]))
    assert await rig.count(tables.action_plans) == 0


async def test_conferences_unreachable_raises_and_writes_nothing(db: Database) -> None:
    notifier = Notifier()
    service, channel = make_service(db, f"127.0.0.1:{free_port()}", notifier)  # nothing listens there
    rig = Rig(db, service, notifier, None)
    event = cev.ConferenceConcluded(
        conference_id="1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed",
        child_id="2c9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed",
        outcome=cpb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN,
        action_count=1,
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rig.deliver(event)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
    assert await rig.count(tables.action_plans) == 0
    assert await rig.outbox() == []
    assert notifier.calls == 0


async def test_conferences_down_then_back_is_retried(rig: Rig, conferences: ConferencesServer) -> None:
    event = conferences.servicer.conclude()
    conferences.servicer.down = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rig.deliver(event)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await rig.count(tables.action_plans) == 0
    conferences.servicer.down = False
    await rig.deliver(event)  # the redelivery
    assert await rig.count(tables.action_plans) == 1


async def test_slow_conferences_hits_the_deadline(db: Database, conferences: ConferencesServer) -> None:
    notifier = Notifier()
    service, channel = make_service(db, conferences.address, notifier, timeout=0.2)
    conferences.servicer.delay = 1.0
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await Rig(db, service, notifier, None).deliver(conferences.servicer.conclude())
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await channel.close()


async def test_fetch_continues_the_consumers_trace(rig: Rig, conferences: ConferencesServer) -> None:
    telemetry.configure("csx-actionplans-test")
    with telemetry.tracer().start_as_current_span("conference_concluded process") as span:
        await rig.deliver(conferences.servicer.conclude())
        trace_id = format(span.get_span_context().trace_id, "032x")
    [traceparent] = conferences.servicer.traceparents
    assert traceparent.split("-")[1] == trace_id


async def test_unconcluded_conference_is_retried_later(rig: Rig, conferences: ConferencesServer) -> None:
    event = conferences.servicer.conclude()
    conferences.servicer.conferences[event.conference_id].status = cpb.CONFERENCE_STATUS_SCHEDULED
    with pytest.raises(ConferenceNotConcluded):
        await rig.deliver(event)
    assert await rig.count(tables.action_plans) == 0


async def test_no_partner_event_where_a_decision_not_to_share_forbids(rig: Rig, conferences: ConferencesServer) -> None:
    from google.protobuf import timestamp_pb2

    from csx.options.v1 import options_pb2

    event = conferences.servicer.conclude()
    recorded = safeguarding_events.SharingDecisionRecorded(
        decision_id="0f8fad5b-d9cb-469f-a165-70867728950e",
        child_id=event.child_id,
        share=False,
        approver="mash.manager",
        agencies=[t.AGENCY_POLICE],
        data_classes=[options_pb2.DATA_CLASS_OPERATIONAL],
        decided_at=timestamp_pb2.Timestamp(seconds=1),
    )
    views = rig.service._views
    async with rig.service._units.begin() as uow:
        await views._on_sharing(uow, recorded)
    await rig.deliver(event)
    subjects = [s for s, _ in await rig.outbox()]
    assert "csx.actionplans.partner.education.action_assigned" in subjects
    assert not any(".partner.police." in s for s in subjects)
    a = tables.audit.log.c
    async with rig.db.session() as s:
        police = (await s.execute(select(a.action, a.rule_id).where(a.actor_user_id == "portal.police"))).all()
    assert [(r.action, r.rule_id) for r in police] == [("deny", "forbid-decision-not-to-share")]


async def test_a_move_to_b_ends_the_child_protection_plan_as_the_b_plan_starts(
    rig: Rig, conferences: ConferencesServer
) -> None:
    child_id = "3c9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed"
    initial = conferences.servicer.conclude(child_id=child_id)
    await rig.deliver(initial)
    other_child = conferences.servicer.conclude()  # another child's plan is not touched
    await rig.deliver(other_child)
    review = conferences.servicer.conclude(
        outcome=cpb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN, child_id=child_id
    )
    review.kind = cpb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW
    review.transition_to_contextual_safeguarding = True
    await rig.deliver(review)
    await rig.deliver(review)  # a redelivery changes nothing

    cp, b = (await rig.service.list_action_plans(None, child_id=child_id))[0]
    assert (cp.kind, cp.status) == (pb.PLAN_KIND_CHILD_PROTECTION, pb.PLAN_STATUS_ENDED)
    assert cp.end_reason == pb.PLAN_END_REASON_TRANSITIONED_TO_CONTEXTUAL_SAFEGUARDING
    assert cp.ended_by_conference_id == review.conference_id and cp.ended_at == review.concluded_at
    assert (b.kind, b.status, b.conference_id) == (
        pb.PLAN_KIND_CONTEXTUAL_SAFEGUARDING,
        pb.PLAN_STATUS_ACTIVE,
        review.conference_id,
    )
    (untouched,) = (await rig.service.list_action_plans(None, child_id=other_child.child_id))[0]
    assert untouched.status == pb.PLAN_STATUS_ACTIVE and not untouched.HasField("ended_at")
    rows = await rig.outbox()
    ended = [events.ActionPlanEnded.FromString(p) for s, p in rows if s == "csx.actionplans.action_plan_ended"]
    assert [(e.plan_id, e.child_id, e.successor_plan_id, e.ended_by_conference_id) for e in ended] == [
        (cp.plan_id, child_id, b.plan_id, review.conference_id)
    ]
    published = [events.ActionPlanPublished.FromString(p) for s, p in rows if s.endswith("action_plan_published")]
    assert [e.kind for e in published] == [
        pb.PLAN_KIND_CHILD_PROTECTION,
        pb.PLAN_KIND_CHILD_PROTECTION,
        pb.PLAN_KIND_CONTEXTUAL_SAFEGUARDING,
    ]


async def test_a_plan_without_a_move_ends_nothing(rig: Rig, conferences: ConferencesServer) -> None:
    child_id = "4c9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed"
    await rig.deliver(conferences.servicer.conclude(child_id=child_id))
    b = conferences.servicer.conclude(outcome=cpb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN, child_id=child_id)
    await rig.deliver(b)  # not flagged as a transition: both plans stay active
    plans = (await rig.service.list_action_plans(None, child_id=child_id))[0]
    assert [p.status for p in plans] == [pb.PLAN_STATUS_ACTIVE, pb.PLAN_STATUS_ACTIVE]
    assert not [s for s, _ in await rig.outbox() if s.endswith("action_plan_ended")]


async def test_a_move_with_no_actions_still_ends_the_plans_including_those_made_before_plans_had_kinds(
    rig: Rig, conferences: ConferencesServer
) -> None:
    child_id = "5c9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed"
    for _ in range(2):
        await rig.deliver(conferences.servicer.conclude(child_id=child_id))
    plans = tables.action_plans.c
    async with rig.db.transaction() as tx:  # the first as a plan from before the kind column: UNSPECIFIED
        first = (await tx.execute(select(plans.plan_id).order_by(plans.published_at))).scalars().first()
        await tx.execute(tables.action_plans.update().where(plans.plan_id == first).values(kind=0))
    review = conferences.servicer.conclude(
        outcome=cpb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN, child_id=child_id, actions=[]
    )
    review.transition_to_contextual_safeguarding = True
    await rig.deliver(review)
    await rig.deliver(review)
    listed = (await rig.service.list_action_plans(None, child_id=child_id))[0]
    assert [(p.kind, p.status) for p in listed] == [
        (pb.PLAN_KIND_UNSPECIFIED, pb.PLAN_STATUS_ENDED),
        (pb.PLAN_KIND_CHILD_PROTECTION, pb.PLAN_STATUS_ENDED),
    ]
    ended = [
        events.ActionPlanEnded.FromString(p) for s, p in await rig.outbox() if s == "csx.actionplans.action_plan_ended"
    ]
    assert [(e.plan_id, e.successor_plan_id) for e in ended] == [(p.plan_id, "") for p in listed]
