"""A child's case (issue 12 item 7; docs/adr/0014): open while a referral awaits a decision, a routed
referral waits for its conference, or a conference is open; CaseClosed when nothing is, CaseReopened
when something is again; the retention period runs from the closure. The referrals service runs
from its composition root (real gRPC, SQLite or PostgreSQL) and hears conferences' events through
its real durable consumer on a real nats-server: this test publishes them as conferences would."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from google.protobuf import message as pb_message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select, update

from csx.conferences.v1 import conferences_pb2 as cpb
from csx.conferences.v1 import events_pb2 as conference_events
from csx.referrals.v1 import events_pb2 as events
from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx.types.v1 import types_pb2
from csx_common.messaging.events import MSG_ID_HEADER, StreamSpec
from csx_common.messaging.streams import ensure_stream
from csx_common.messaging.topology import topology
from csx_common.timestamps import ts, utc
from csx_referrals import domain, tables
from csx_referrals.consumers import DURABLE
from tests.referrals.conftest import Referrals
from tests.support import concern_request, user, user_channel

DPO = user("social_care", "data_protection_officer", "records_management", "dpo.cases")
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
async def conferences_stream(nats_url: str) -> AsyncIterator[Any]:
    """Conferences' stream, as conferences declares it; here it is the test's own: emptied, with no
    durable left over from an earlier test, so each test sees only its own events."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = StreamSpec.for_service("conferences")
    await ensure_stream(js, stream)
    await js.purge_stream(stream.name)
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream.name, DURABLE)
    yield js
    await nc.close()


@pytest.fixture
async def stack(conferences_stream: Any, referrals: Referrals) -> AsyncIterator[Stack]:
    yield Stack(referrals, conferences_stream)


class Stack:
    def __init__(self, referrals: Referrals, js: Any) -> None:
        self.referrals, self.js = referrals, js
        self.stub = referrals.stub

    async def concern(self, key: str, given: str = "Casey") -> pb.SubmitConcernResponse:
        child = {"given_name": given, "family_name": "Case", "date_of_birth": "2011-03-04"}
        return await self.stub.SubmitConcern(concern_request(key, child=child), timeout=10)

    async def decide(self, referral_id: str, outcome: int) -> pb.Referral:
        request = pb.RecordScreeningDecisionRequest(
            referral_id=referral_id,
            idempotency_key=f"decide-{referral_id}",
            outcome=outcome,
            reason="Decided at the front door after checks with partners.",
            decided_by="sw.cases",
            strategy_discussion_on="2026-12-02" if outcome == pb.SCREENING_OUTCOME_INTERVENTION_A else "",
        )
        return (await self.stub.RecordScreeningDecision(request, timeout=10)).referral

    async def publish(self, event: pb_message.Message, msg_id: str | None = None) -> str:
        """As conferences' relay would (Nats-Msg-Id = its event id), then wait until referrals has
        taken it (applied, skipped, or parked)."""
        msg_id = msg_id or str(uuid.uuid4())
        await self.js.publish(topology().subject(event), event.SerializeToString(), headers={MSG_ID_HEADER: msg_id})
        await self.taken(msg_id)
        return msg_id

    async def taken(self, msg_id: str) -> None:
        inbox, dead = tables.delivery.inbox.c, tables.delivery.dead_letters.c
        for _ in range(200):
            async with self.referrals.runtime.db.session() as s:
                if (await s.execute(select(inbox.msg_id).where(inbox.msg_id == msg_id))).first() or (
                    await s.execute(select(dead.msg_id).where(dead.msg_id == msg_id))
                ).first():
                    return
            await asyncio.sleep(0.02)
        raise AssertionError(f"referrals never took {msg_id}")

    async def case(self, child_id: str) -> Any:
        async with self.referrals.runtime.db.session() as s:
            return (await s.execute(select(tables.cases).where(tables.cases.c.child_id == child_id))).first()

    async def case_events(self) -> list[pb_message.Message]:
        o = tables.delivery.outbox.c
        kinds = {"csx.referrals.case_closed": events.CaseClosed, "csx.referrals.case_reopened": events.CaseReopened}
        async with self.referrals.runtime.db.session() as s:
            rows = (await s.execute(select(o.subject, o.payload).where(o.subject.in_(kinds)))).all()
        return [kinds[row.subject].FromString(row.payload) for row in rows]

    async def parked(self) -> list[Any]:
        d = tables.delivery.dead_letters.c
        async with self.referrals.runtime.db.session() as s:
            return list((await s.execute(select(d.msg_id, d.deliveries, d.error).where(d.consumer == DURABLE))).all())


def scheduled(conference_id: str, child_id: str, referral_id: str, kind: int, at: datetime) -> Any:
    return conference_events.ConferenceScheduled(
        conference_id=conference_id,
        child_id=child_id,
        referral_id=referral_id,
        kind=kind,
        due_on="2026-12-20",
        scheduled_at=ts(at),
    )


def concluded(conference_id: str, child_id: str, kind: int, outcome: int, at: datetime, review: str = "") -> Any:
    return conference_events.ConferenceConcluded(
        conference_id=conference_id,
        child_id=child_id,
        kind=kind,
        outcome=outcome,
        concluded_at=ts(at),
        review_conference_id=review,
    )


def new_id() -> str:
    return str(uuid.uuid4())


def closed(child_id: str, at: datetime) -> events.CaseClosed:
    return events.CaseClosed(child_id=child_id, closed_at=ts(at))


# -- the rules, free of I/O ---------------------------------------------------------------------


def test_the_case_is_open_while_anything_is_and_follows_the_strongest_intervention() -> None:
    facts = domain.CaseFacts
    assert not facts(False).open and facts(False).intervention == types_pb2.INTERVENTION_UNSPECIFIED
    assert facts(True).open and facts(True).intervention == types_pb2.INTERVENTION_UNSPECIFIED
    assert facts(False, pending_routings=(types_pb2.INTERVENTION_B,)).intervention == types_pb2.INTERVENTION_B
    both = facts(False, (types_pb2.INTERVENTION_A,), (types_pb2.INTERVENTION_B, 0))
    assert both.open and both.intervention == types_pb2.INTERVENTION_B  # what is open outranks what is pending
    assert facts(False, (), (0, types_pb2.INTERVENTION_A, types_pb2.INTERVENTION_B)).intervention == (
        types_pb2.INTERVENTION_A
    )
    assert domain.case_change(None, facts(True)) == "opened"
    assert domain.case_change(domain.CASE_CLOSED, facts(True)) == "reopened"
    assert domain.case_change(domain.CASE_OPEN, facts(False)) == "closed"
    assert domain.case_change(domain.CASE_OPEN, facts(True)) is None
    assert domain.case_change(domain.CASE_CLOSED, facts(False)) is None
    assert domain.case_change(None, facts(False)) is None


# -- through the service and its consumer -------------------------------------------------------


def utc_of(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


async def test_routed_to_b_the_case_stays_open_through_a_review_and_closes_when_the_plan_ends(stack: Stack) -> None:
    first = await stack.concern("case-b-1")
    case = await stack.case(first.child_id)
    assert case.status == "open" and case.intervention == 0 and case.closed_at is None
    referral = await stack.decide(first.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B)
    case = await stack.case(first.child_id)  # routed, its conference not yet announced: open
    assert case.status == "open" and case.intervention == types_pb2.INTERVENTION_B

    review, follow_up = new_id(), new_id()
    b = cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    await stack.publish(scheduled(review, first.child_id, first.referral_id, b, T0))
    plan, ended = T0 + timedelta(days=10), T0 + timedelta(days=100)
    await stack.publish(
        concluded(review, first.child_id, b, cpb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN, plan, follow_up)
    )
    assert (await stack.case(first.child_id)).status == "open"  # the plan continues: no flap
    follow = scheduled(follow_up, first.child_id, first.referral_id, b, plan)
    follow.previous_conference_id = review
    await stack.publish(follow)
    assert (await stack.case(first.child_id)).status == "open" and await stack.case_events() == []

    await stack.publish(concluded(follow_up, first.child_id, b, cpb.CONFERENCE_OUTCOME_NO_PLAN, ended))
    case = await stack.case(first.child_id)
    assert case.status == "closed" and utc(case.closed_at) == ended and case.intervention == 0
    assert await stack.case_events() == [closed(first.child_id, ended)]
    assert referral.decided_at.ToDatetime(tzinfo=UTC) < ended

    again = await stack.concern("case-b-2")  # a new concern about the same child
    assert again.child_id == first.child_id
    case = await stack.case(first.child_id)
    assert case.status == "open" and case.closed_at is None
    # Never reopened before it closed: the conferences here are dated ahead of the concern's real time.
    reopened = events.CaseReopened(child_id=first.child_id, reopened_at=max(again.recorded_at, ts(ended), key=utc_of))
    assert await stack.case_events() == [closed(first.child_id, ended), reopened]


async def test_late_and_doubled_events_close_the_case_once_at_the_conclusion(stack: Stack) -> None:
    sub = await stack.concern("case-order-1")
    await stack.decide(sub.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_A)
    conference, a = new_id(), cpb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION
    ended = T0 + timedelta(days=14)
    conclusion = concluded(conference, sub.child_id, a, cpb.CONFERENCE_OUTCOME_NO_PLAN, ended)
    await stack.publish(conclusion)  # before its schedule: the routed referral still holds the case
    assert (await stack.case(sub.child_id)).status == "open"
    await stack.publish(scheduled(conference, sub.child_id, sub.referral_id, a, T0))  # late: closed wins
    case = await stack.case(sub.child_id)
    assert case.status == "closed" and utc(case.closed_at) == ended  # the conclusion's time, not the schedule's
    version = case.version

    await stack.publish(conclusion)  # the same event under another message id (a republished copy)
    await stack.publish(scheduled(conference, sub.child_id, sub.referral_id, a, T0))
    assert (await stack.case(sub.child_id)).version == version
    assert await stack.case_events() == [closed(sub.child_id, ended)]
    assert await stack.parked() == []


async def test_an_escalation_never_closes_the_case(stack: Stack) -> None:
    sub = await stack.concern("case-escalate-1")
    await stack.decide(sub.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B)
    review, initial = new_id(), new_id()
    await stack.publish(scheduled(review, sub.child_id, sub.referral_id, cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, T0))
    assert (await stack.case(sub.child_id)).intervention == types_pb2.INTERVENTION_B
    # Routed to A while the B review is open: the review is closed and replaced in one change; its
    # cancellation alone (nothing else pending here) must not close the case.
    cancelled_at = T0 + timedelta(days=3)
    await stack.publish(
        conference_events.ConferenceCancelled(
            conference_id=review,
            child_id=sub.child_id,
            kind=cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW,
            reason=cpb.CHANGE_REASON_ESCALATED_TO_CHILD_PROTECTION,
            cancelled_at=ts(cancelled_at),
            replaced_by_conference_id=initial,
        )
    )
    assert (await stack.case(sub.child_id)).status == "open"
    initial_cp = scheduled(initial, sub.child_id, sub.referral_id, cpb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION, T0)
    await stack.publish(initial_cp)
    case = await stack.case(sub.child_id)
    assert case.status == "open" and case.intervention == types_pb2.INTERVENTION_A
    assert await stack.case_events() == []


async def test_no_further_action_closes_a_case_with_nothing_else_open(stack: Stack) -> None:
    sub = await stack.concern("case-nfa-1")
    referral = await stack.decide(sub.referral_id, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION)
    decided_at = referral.decided_at.ToDatetime(tzinfo=UTC)
    case = await stack.case(sub.child_id)
    assert case.status == "closed" and utc(case.closed_at) == decided_at
    assert await stack.case_events() == [closed(sub.child_id, decided_at)]

    # A child with an open conference: a second referral decided NFA leaves the case open.
    other = await stack.concern("case-nfa-2", given="Robin")
    await stack.decide(other.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B)
    await stack.publish(
        scheduled(new_id(), other.child_id, other.referral_id, cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, T0)
    )
    second = await stack.concern("case-nfa-3", given="Robin")
    assert second.child_id == other.child_id and second.referral_id != other.referral_id
    await stack.decide(second.referral_id, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION)
    assert (await stack.case(other.child_id)).status == "open"
    assert len(await stack.case_events()) == 1


async def test_retention_runs_from_the_case_closing_not_from_the_last_decision(stack: Stack) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=365 * 35 + 10)
    # A child whose last screening decision is 35 years old, with a conference still open: kept.
    planned = await stack.concern("case-keep-1", given="Kept")
    await stack.decide(planned.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B)
    await stack.publish(
        scheduled(new_id(), planned.child_id, planned.referral_id, cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, T0)
    )
    # A child whose case closed 35 years ago: erased.
    done = await stack.concern("case-done-1", given="Done")
    await stack.decide(done.referral_id, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION)
    async with stack.referrals.runtime.db.transaction() as s:
        r, c = tables.referrals.c, tables.cases.c
        for child in (planned.child_id, done.child_id):
            await s.execute(
                update(tables.referrals).where(r.child_id == child).values(opened_at=long_ago, decided_at=long_ago)
            )
        await s.execute(update(tables.cases).where(c.child_id == done.child_id).values(closed_at=long_ago))

    async with user_channel(stack.referrals.runtime.settings.grpc_address, DPO) as channel:
        dpo = referrals_pb2_grpc.ReferralsServiceStub(channel)
        run = await dpo.EraseDue(pb.EraseDueRequest(), timeout=10)
    assert [e.child_id for e in run.erased] == [done.child_id]
    assert await stack.case(done.child_id) is None  # the erased child's case went with it
    assert (await stack.case(planned.child_id)).status == "open"

    # Conferences' events about the erased child are skipped, never parked or retried.
    msg_id = await stack.publish(
        concluded(new_id(), done.child_id, cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, cpb.CONFERENCE_OUTCOME_NO_PLAN, T0)
    )
    assert await stack.parked() == [] and await stack.case(done.child_id) is None
    assert msg_id


async def test_events_that_break_the_contract_are_parked_at_once(stack: Stack) -> None:
    sub = await stack.concern("case-poison-1")
    await stack.decide(sub.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B)
    b, conference = cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, new_id()
    bad_id = await stack.publish(scheduled("not-a-uuid", sub.child_id, sub.referral_id, b, T0))
    unknown_child = await stack.publish(scheduled(new_id(), new_id(), sub.referral_id, b, T0))
    await stack.publish(scheduled(conference, sub.child_id, sub.referral_id, b, T0))
    other = await stack.concern("case-poison-2", given="Other")
    another_child = await stack.publish(
        concluded(conference, other.child_id, b, cpb.CONFERENCE_OUTCOME_NO_PLAN, T0)  # someone else's conference
    )
    parked = {row.msg_id: row for row in await stack.parked()}
    assert set(parked) == {bad_id, unknown_child, another_child}
    assert all(row.deliveries == 1 for row in parked.values())  # never retried
    assert (await stack.case(sub.child_id)).status == "open"  # the valid one applied, the consumer runs on
    await stack.publish(concluded(conference, sub.child_id, b, cpb.CONFERENCE_OUTCOME_NO_PLAN, T0))
    assert (await stack.case(sub.child_id)).status == "closed"


async def test_a_context_conference_is_not_a_childs_case(stack: Stack) -> None:
    sub = await stack.concern("case-place-1")
    await stack.decide(sub.referral_id, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION)
    place = new_id()  # C is about a place: its id is not a child's
    await stack.publish(scheduled(new_id(), place, sub.referral_id, cpb.CONFERENCE_KIND_CONTEXT, T0))
    assert await stack.parked() == [] and await stack.case(place) is None
    assert (await stack.case(sub.child_id)).status == "closed"


async def test_a_merge_reopens_the_known_childs_case_and_forgets_the_other_record(stack: Stack) -> None:
    known = await stack.stub.SubmitConcern(concern_request("case-merge-1"), timeout=10)
    await stack.decide(known.referral_id, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION)
    assert (await stack.case(known.child_id)).status == "closed"
    typo = concern_request("case-merge-2")
    typo.child.given_name = "Canarygivn"  # the same NHS number, a typing error in the name
    record = await stack.stub.SubmitConcern(typo, timeout=10)
    assert record.child_id != known.child_id and (await stack.case(record.child_id)).status == "open"
    [match] = (await stack.stub.ListPossibleMatches(pb.ListPossibleMatchesRequest(), timeout=10)).matches
    resolved = await stack.stub.ResolvePossibleMatch(
        pb.ResolvePossibleMatchRequest(
            match_id=match.match_id, idempotency_key="case-merge-r1", same_child=True, reason="Same child: a typo"
        ),
        timeout=10,
    )
    assert await stack.case(record.child_id) is None
    assert (await stack.case(known.child_id)).status == "open"  # the moved referral awaits a decision
    assert (await stack.case_events())[-1] == events.CaseReopened(
        child_id=known.child_id, reopened_at=resolved.match.resolved_at
    )


async def test_the_migration_gives_every_child_a_case_by_the_rule_until_now(databases: Any) -> None:
    """Closed at the last decision when nothing awaits one; a referral routed to A or B holds the
    case open (conferences' events, replayed to the new durable, announce its conference)."""
    from alembic import command
    from sqlalchemy import insert

    from csx_common.db import Database
    from csx_common.migrations import alembic_config, upgrade
    from csx_referrals.app import MIGRATIONS

    db = Database(await databases.new("referrals_cases_migration"))
    cfg = alembic_config(MIGRATIONS, db.url.render_as_string(hide_password=False))

    def before_cases(sync_conn: Any) -> None:
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "7e012ebac5cc")  # the schema before cases (its kernel branches with it)
        children = ["closed", "routed", "waiting", "erased"]
        sync_conn.execute(
            insert(tables.children),
            [dict(child_id=c, sealed={}, created_at=T0, erased_at=T0 if c == "erased" else None) for c in children],
        )
        later = T0 + timedelta(days=5)
        rows = [
            ("r1", "closed", pb.REFERRAL_STATUS_CLOSED, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION, T0),
            ("r2", "closed", pb.REFERRAL_STATUS_CLOSED, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION, later),
            ("r3", "routed", pb.REFERRAL_STATUS_ROUTED, pb.SCREENING_OUTCOME_INTERVENTION_A, T0),
            ("r4", "waiting", pb.REFERRAL_STATUS_AWAITING_DECISION, 0, None),
            ("r5", "erased", pb.REFERRAL_STATUS_CLOSED, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION, T0),
        ]
        sync_conn.execute(
            insert(tables.referrals).values(
                [
                    dict(
                        referral_id=r,
                        child_id=c,
                        status=status,
                        outcome=outcome,
                        opened_at=T0,
                        decided_at=decided,
                        decision_due_on=T0.date(),
                        sealed={},
                        version=1,
                    )
                    for r, c, status, outcome, decided in rows
                ]
            )
        )
        sync_conn.commit()

    try:
        await db.run_sync(before_cases)
        await upgrade(db, MIGRATIONS)
        async with db.session() as s:
            found = {
                row.child_id: (row.status, utc(row.closed_at), row.intervention)
                for row in (await s.execute(select(tables.cases))).all()
            }
    finally:
        await db.dispose()
    assert found == {
        "closed": ("closed", T0 + timedelta(days=5), 0),
        "routed": ("open", None, types_pb2.INTERVENTION_A),
        "waiting": ("open", None, 0),
    }


async def test_a_closing_conference_names_its_routings_so_a_missed_announcement_never_holds_the_case(
    stack: Stack,
) -> None:
    """The routing's ConferenceScheduled never arrives (older than the stream keeps, say): the
    conclusion names the referrals it took, and the case closes."""
    first = await stack.concern("case-missed-1")
    await stack.decide(first.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B)
    b = cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    ended = T0 + timedelta(days=30)
    conclusion = concluded(new_id(), first.child_id, b, cpb.CONFERENCE_OUTCOME_NO_PLAN, ended)
    conclusion.referral_ids.append(first.referral_id)
    await stack.publish(conclusion)
    case = await stack.case(first.child_id)
    assert case.status == "closed" and utc(case.closed_at) == ended
    assert await stack.case_events() == [closed(first.child_id, ended)]
