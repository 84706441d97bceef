"""Reviews while a plan lasts: A's child protection reviews (WT23: the first within 3 months of the
initial conference, later ones at most 6 months apart) and B's recurring reviews at the chair's
interval (default 3 months). Dates are checked against the `holidays` package independently."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import holidays
import pytest
from conferences_support import CHAIR, Harness, held, routed
from sqlalchemy import select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.types.v1 import types_pb2
from csx_common.errors import FailedPrecondition
from csx_conferences import domain, tables

ENGLAND = holidays.country_holidays("GB", subdiv="ENG", years=range(2026, 2028))


def within(day: date) -> date:
    """The last working day on or before `day`, counted here without the service's calendar."""
    while day.weekday() >= 5 or day in ENGLAND:
        day -= timedelta(days=1)
    return day


def conclude(conference: pb.Conference, outcome: int, key: str, months: int = 0) -> pb.ConcludeConferenceRequest:
    request = pb.ConcludeConferenceRequest(
        conference_id=conference.conference_id,
        idempotency_key=key,
        expected_version=conference.version,
        outcome=outcome,
        summary="Reasons for the outcome, as the chair recorded them.",
        next_review_months=months,
    )
    if outcome != pb.CONFERENCE_OUTCOME_NO_PLAN:
        request.actions.add(owner_agency=types_pb2.AGENCY_POLICE, description="Patrol the park", due_on="2026-12-01")
    return request


async def scheduled_events(h: Harness) -> list[events.ConferenceScheduled]:
    o = tables.delivery.outbox.c
    async with h.db.session() as s:
        rows = (await s.execute(select(o.payload).where(o.subject == "csx.conferences.conference_scheduled"))).all()
    return [events.ConferenceScheduled.FromString(r.payload) for r in rows]


async def conferences_of(h: Harness, child_id: str) -> list[pb.Conference]:
    return (await h.service.list_conferences(None, child_id))[0]


async def test_a_initial_then_reviews_at_3_and_6_months_then_the_plan_ends(harness: Harness) -> None:
    h = harness
    referral_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
    await h.deliver(routed(referral_id, child_id, types_pb2.INTERVENTION_A, strategy_discussion_on="2026-03-02"))
    (initial,) = await conferences_of(h, child_id)

    # The initial conference meets on Friday 20 March and makes a child protection plan.
    h.clock.now = datetime(2026, 3, 20, 11, 0, tzinfo=UTC)
    initial = await held(h, initial)
    h.clock.now = datetime(2026, 3, 23, 9, 0, tzinfo=UTC)  # the outcome written on Monday
    await h.service.conclude_conference(
        CHAIR, conclude(initial, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, "conclude-initial")
    )
    _, first = await conferences_of(h, child_id)
    assert first.kind == pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW
    assert first.status == pb.CONFERENCE_STATUS_SCHEDULED
    assert first.review_number == 1 and first.previous_conference_id == initial.conference_id
    assert first.referral_id == referral_id and first.child_id == child_id
    # Within 3 months of the meeting's day: 20 June 2026 is a Saturday, so Friday 19 June.
    assert first.due_on == within(date(2026, 6, 20)).isoformat() == "2026-06-19"
    assert "3 months" in first.due_rule
    invited = {*initial.invited_agencies, *(i.agency for i in initial.invitations)}
    assert set(first.invited_agencies) == invited  # the agencies invited to the initial, invited again

    # The first review meets on 15 June and continues the plan: the next within 6 months.
    h.clock.now = datetime(2026, 6, 15, 14, 0, tzinfo=UTC)
    first = await held(h, first)
    await h.service.conclude_conference(
        CHAIR, conclude(first, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, "conclude-review-1")
    )
    _, _, second = await conferences_of(h, child_id)
    assert second.kind == pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW and second.review_number == 2
    assert second.previous_conference_id == first.conference_id
    assert second.due_on == within(date(2026, 12, 15)).isoformat()
    assert "6 months" in second.due_rule

    # The second review, on 10 December, ends the plan: nothing more is scheduled.
    h.clock.now = datetime(2026, 12, 10, 10, 0, tzinfo=UTC)
    second = await held(h, second)
    done = await h.service.conclude_conference(CHAIR, conclude(second, pb.CONFERENCE_OUTCOME_NO_PLAN, "conclude-r2"))
    assert done.conference.outcome == pb.CONFERENCE_OUTCOME_NO_PLAN
    assert len(await conferences_of(h, child_id)) == 3

    announced = await scheduled_events(h)
    assert [e.conference_id for e in announced] == [initial.conference_id, first.conference_id, second.conference_id]
    assert [e.previous_conference_id for e in announced] == ["", initial.conference_id, first.conference_id]
    assert {e.referral_id for e in announced} == {referral_id}
    assert announced[1].kind == pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW


async def test_a_review_a_chair_brings_forward_and_one_beyond_the_limit_is_refused(harness: Harness) -> None:
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routed(str(uuid.uuid4()), child_id, types_pb2.INTERVENTION_A, strategy_discussion_on="2026-03-02"))
    (initial,) = await conferences_of(h, child_id)
    h.clock.now = datetime(2026, 3, 20, 11, 0, tzinfo=UTC)
    initial = await held(h, initial)
    too_late = conclude(initial, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, "conclude-too-late", months=4)
    with pytest.raises(FailedPrecondition) as err:
        await h.service.conclude_conference(CHAIR, too_late)
    assert err.value.reason == "REVIEW_INTERVAL_TOO_LONG"
    (still,) = await conferences_of(h, child_id)  # nothing written, nothing scheduled
    assert still.status == pb.CONFERENCE_STATUS_HELD and still.version == initial.version
    assert len(await scheduled_events(h)) == 1

    sooner = conclude(initial, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, "conclude-sooner", months=2)
    await h.service.conclude_conference(CHAIR, sooner)
    _, review = await conferences_of(h, child_id)
    assert review.due_on == within(date(2026, 5, 20)).isoformat()


async def test_b_reviews_recur_at_the_chairs_interval_until_the_plan_ends(harness: Harness) -> None:
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routed(str(uuid.uuid4()), child_id, types_pb2.INTERVENTION_B))
    (review,) = await conferences_of(h, child_id)
    h.clock.now = datetime(2026, 3, 31, 15, 0, tzinfo=UTC)
    review = await held(h, review)
    plan = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    await h.service.conclude_conference(CHAIR, conclude(review, plan, "conclude-b-1"))  # default: 3 months
    _, second = await conferences_of(h, child_id)
    assert second.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW and second.review_number == 1
    assert second.due_on == within(date(2026, 6, 30)).isoformat()  # 31 June does not exist

    h.clock.now = datetime(2026, 6, 24, 10, 0, tzinfo=UTC)
    second = await held(h, second)
    await h.service.conclude_conference(CHAIR, conclude(second, plan, "conclude-b-2", months=2))
    _, _, third = await conferences_of(h, child_id)
    assert third.due_on == within(date(2026, 8, 24)).isoformat()
    assert "every 2 months" in third.due_rule

    h.clock.now = datetime(2026, 8, 20, 10, 0, tzinfo=UTC)
    third = await held(h, third)
    await h.service.conclude_conference(CHAIR, conclude(third, pb.CONFERENCE_OUTCOME_NO_PLAN, "conclude-b-3"))
    assert len(await conferences_of(h, child_id)) == 3


@pytest.mark.parametrize(
    ("kind", "outcome", "months", "expected"),
    [
        # A's initial conference: a plan means a review within 3 months.
        (pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, 0, "2026-06-19"),
        (pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, 1, "2026-04-20"),
        (pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, 3, "2026-06-19"),
        (pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION, pb.CONFERENCE_OUTCOME_NO_PLAN, 0, None),
        # A review: at most 6 months.
        (pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, 0, "2026-09-18"),
        (pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, 6, "2026-09-18"),
        (pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW, pb.CONFERENCE_OUTCOME_NO_PLAN, 0, None),
        # B: every 3 months by default; the chair may set up to 12.
        (pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN, 0, "2026-06-19"),
        (pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN, 12, "2027-03-19"),
        (pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, pb.CONFERENCE_OUTCOME_NO_PLAN, 0, None),
        # C makes a place's plan; its reviews belong to the panel's work, not a child's series.
        (pb.CONFERENCE_KIND_CONTEXT, pb.CONFERENCE_OUTCOME_CONTEXT_PLAN, 0, None),
    ],
)
def test_next_review(kind: int, outcome: int, months: int, expected: str | None) -> None:
    review = domain.next_review(kind, outcome, date(2026, 3, 20), months)  # a Friday
    assert (review.due_on.isoformat() if review else None) == expected
    if expected is not None:
        assert review is not None and review.due_on == within(date.fromisoformat(expected))


@pytest.mark.parametrize(
    ("kind", "outcome", "months"),
    [
        (pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, 4),
        (pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, 7),
    ],
)
def test_a_review_beyond_wt23_is_refused(kind: int, outcome: int, months: int) -> None:
    with pytest.raises(FailedPrecondition) as err:
        domain.next_review(kind, outcome, date(2026, 3, 20), months)
    assert err.value.reason == "REVIEW_INTERVAL_TOO_LONG"
