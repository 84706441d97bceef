"""The conference process end to end, on the running system (`make run`'s processes): A from the
strategy discussion through two reviews, B with its reviews, family summaries and a network meeting,
the CP plan -> B move accepted and refused, a meeting without quorum rearranged, and the chair rules
refusing the wrong chair. Every due date is checked against the `holidays` package, computed here
independently of the service's calendar; meeting days come from the records (London time)."""

from __future__ import annotations

import calendar
import random
import string
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import holidays
import pytest
from google.protobuf import timestamp_pb2

from csx.actionplans.v1 import actionplans_pb2, actionplans_pb2_grpc
from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import conferences_pb2_grpc
from csx.referrals.v1 import referrals_pb2, referrals_pb2_grpc
from csx.types.v1 import types_pb2
from csx_cli import conference_flow
from csx_cli.journey import random_nhs_number
from csx_cli.stack import Stack
from csx_common.errors import error_reason
from tests.support import concern_request, eventually, user, user_channel

LONDON = ZoneInfo("Europe/London")
ENGLAND = holidays.country_holidays("GB", subdiv="ENG", years=range(2025, 2030))
POLICE = user("police", "police_officer", "referral_screening", "pc.process.e2e")
SOCIAL_WORKER = user("social_care", "social_worker", "conference_participation", "sw.process.e2e")
MANAGER = user("social_care", "mash_manager", "conference_participation", "manager.process.e2e")
CHAIR = user("social_care", "chair", "conference_participation", "chair.process.e2e")


# An independent calendar ----------------------------------------------------------------------------
def working(day: date) -> bool:
    return day.weekday() < 5 and day not in ENGLAND


def working_days_after(day: date, n: int) -> date:
    while n:
        day += timedelta(days=1)
        n -= working(day)
    return day


def within_months(day: date, months: int) -> date:
    """The last working day on or before the same day `months` later (the month's end if shorter)."""
    year, month = divmod(day.month - 1 + months, 12)
    year, month = day.year + year, month + 1
    end = date(year, month, min(day.day, calendar.monthrange(year, month)[1]))
    while not working(end):
        end -= timedelta(days=1)
    return end


def meeting_day(conference: pb.Conference) -> date:
    return conference.held_at.ToDatetime(tzinfo=UTC).astimezone(LONDON).date()


def london_today() -> date:
    return datetime.now(LONDON).date()


# The people and their calls ----------------------------------------------------------------------
@dataclass
class Process:
    stack: Stack
    referrer: referrals_pb2_grpc.ReferralsServiceStub
    mash: referrals_pb2_grpc.ReferralsServiceStub
    social_care: conferences_pb2_grpc.ConferencesServiceStub
    manager: conferences_pb2_grpc.ConferencesServiceStub
    chair: conferences_pb2_grpc.ConferencesServiceStub
    plans: actionplans_pb2_grpc.ActionPlansServiceStub

    async def routed(self, intervention: int, strategy_discussion_on: str = "", place: str = "") -> pb.Conference:
        """A child of its own (a random NHS number and name), concern submitted by the police (naming
        `place`, if given) and routed by the MASH: the conference scheduled for it."""
        tag = uuid.uuid4().hex[:10]
        request = concern_request(f"process-{tag}")
        if place:
            request.contexts[0].place_id = place
        request.agency, request.agency_reference = types_pb2.AGENCY_POLICE, f"POL-{tag}"
        request.child.nhs_number = random_nhs_number()
        request.child.given_name = "".join(random.choices(string.ascii_lowercase, k=8)).title()  # noqa: S311
        submitted = await self.referrer.SubmitConcern(request, timeout=10)
        decision = referrals_pb2.RecordScreeningDecisionRequest(
            referral_id=submitted.referral_id,
            idempotency_key=f"process-decide-{tag}",
            outcome=intervention,  # type: ignore[arg-type]
            reason="Synthetic end-to-end test: routed as the test needs.",
            decided_by=SOCIAL_WORKER.user_id,
            strategy_discussion_on=strategy_discussion_on,
        )
        await self.mash.RecordScreeningDecision(decision, timeout=10)
        return await self.only_open(submitted.child_id)

    async def conferences(self, child_id: str) -> list[pb.Conference]:
        reply = await self.social_care.ListConferences(pb.ListConferencesRequest(child_id=child_id), timeout=10)
        return list(reply.conferences)

    async def only_open(self, child_id: str) -> pb.Conference:
        found: list[pb.Conference] = []

        async def scheduled() -> bool:
            found[:] = [c for c in await self.conferences(child_id) if c.status == pb.CONFERENCE_STATUS_SCHEDULED]
            return bool(found)

        await eventually(scheduled)
        (conference,) = found
        return conference

    async def hold(self, conference: pb.Conference, chair_id: str = CHAIR.user_id) -> pb.Conference:
        await conference_flow.register_chair(self.manager, chair_id)
        return await conference_flow.hold(
            self.manager, self.chair, conference, key=f"hold-{uuid.uuid4().hex[:12]}", chair_id=chair_id
        )

    async def conclude(self, held: pb.Conference, outcome: int, months: int = 0) -> pb.Conference:
        request = pb.ConcludeConferenceRequest(
            conference_id=held.conference_id,
            idempotency_key=f"conclude-{uuid.uuid4().hex[:12]}",
            expected_version=held.version,
            outcome=outcome,  # type: ignore[arg-type]
            summary="Reasons for the outcome, as the chair recorded them.",
            next_review_months=months,
        )
        if outcome != pb.CONFERENCE_OUTCOME_NO_PLAN:
            request.actions.add(
                owner_agency=types_pb2.AGENCY_POLICE,
                description="Disrupt the group at the park on Friday evenings",
                due_on=(london_today() + timedelta(days=21)).isoformat(),
            )
        return (await self.chair.ConcludeConference(request, timeout=10)).conference

    async def following(self, conference: pb.Conference) -> pb.Conference:
        (review,) = [
            c
            for c in await self.conferences(conference.child_id)
            if c.previous_conference_id == conference.conference_id
        ]
        return review

    async def change(self, call: str, request: object) -> pb.Conference:
        answer = await getattr(self.social_care, call)(request, timeout=10)
        return answer.conference  # type: ignore[no-any-return]


@pytest.fixture
async def process(stack: Stack) -> AsyncIterator[Process]:
    a = stack.addresses
    async with (
        user_channel(a["referrals"], POLICE, stack.pki) as police,
        user_channel(a["referrals"], SOCIAL_WORKER, stack.pki) as mash,
        user_channel(a["conferences"], SOCIAL_WORKER, stack.pki) as social_care,
        user_channel(a["conferences"], MANAGER, stack.pki) as manager,
        user_channel(a["conferences"], CHAIR, stack.pki) as chair,
        user_channel(a["actionplans"], SOCIAL_WORKER, stack.pki) as plans,
    ):
        yield Process(
            stack,
            referrals_pb2_grpc.ReferralsServiceStub(police),
            referrals_pb2_grpc.ReferralsServiceStub(mash),
            conferences_pb2_grpc.ConferencesServiceStub(social_care),
            conferences_pb2_grpc.ConferencesServiceStub(manager),
            conferences_pb2_grpc.ConferencesServiceStub(chair),
            actionplans_pb2_grpc.ActionPlansServiceStub(plans),
        )


async def refused(call: object, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert (err.value.code(), error_reason(err.value)) == (code, reason)


def key() -> str:
    return f"e2e-{uuid.uuid4().hex[:16]}"


# ------------------------------------------------------------------------------------------------ A


async def test_a_from_the_strategy_discussion_through_two_reviews(process: Process) -> None:
    p = process
    strategy = london_today() - timedelta(days=3)
    place = f"plc-e2e-{uuid.uuid4().hex[:8]}"  # named by this child's concern only
    initial = await p.routed(referrals_pb2.SCREENING_OUTCOME_INTERVENTION_A, strategy.isoformat(), place)
    assert initial.kind == pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION
    assert initial.due_on == working_days_after(strategy, 15).isoformat()

    # A with context: the grounds at home and the place the conference considers, with the running
    # panel's view of it (recorded again until the panel has taken the concern naming the place).
    async def with_panel_view() -> bool:
        nonlocal initial
        initial = await p.change(
            "RecordConferenceContext",
            pb.RecordConferenceContextRequest(
                conference_id=initial.conference_id,
                idempotency_key=key(),
                expected_version=initial.version,
                grounds=[types_pb2.HARM_TYPE_NEGLECT],
                contexts=[pb.ContextConsidered(place_id=place, context_type=types_pb2.CONTEXT_TYPE_NEIGHBOURHOOD)],
            ),
        )
        return initial.contexts[0].HasField("panel_view")

    await eventually(with_panel_view, every=0.5)
    view = initial.contexts[0].panel_view
    assert (view.child_count, view.concern_count, list(view.reporting_agencies)) == (1, 1, [types_pb2.AGENCY_POLICE])
    assert view.HasField("read_at") and not view.flagged_for_panel
    held = await p.hold(initial)
    await p.conclude(held, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN)
    first = await p.following(held)
    assert (first.kind, first.review_number) == (pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW, 1)
    assert first.due_on == within_months(meeting_day(held), 3).isoformat()

    held_first = await p.hold(first)
    await p.conclude(held_first, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN)
    second = await p.following(held_first)
    assert (second.kind, second.review_number) == (pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW, 2)
    assert second.due_on == within_months(meeting_day(held_first), 6).isoformat()

    # The second review ends the plan: nothing more is scheduled.
    ended = await p.conclude(await p.hold(second), pb.CONFERENCE_OUTCOME_NO_PLAN)
    assert ended.outcome == pb.CONFERENCE_OUTCOME_NO_PLAN
    assert [c.status for c in await p.conferences(initial.child_id)] == [pb.CONFERENCE_STATUS_CONCLUDED] * 3

    # Each plan-making conference published a child protection plan.
    async def two_plans() -> bool:
        reply = await p.plans.ListActionPlans(
            actionplans_pb2.ListActionPlansRequest(child_id=initial.child_id), timeout=5
        )
        return [x.kind for x in reply.plans] == [actionplans_pb2.PLAN_KIND_CHILD_PROTECTION] * 2

    await eventually(two_plans)


# ------------------------------------------------------------------------------------------------ B


async def test_b_with_two_reviews_a_network_meeting_and_the_family_summaries(process: Process) -> None:
    p = process
    first = await p.routed(referrals_pb2.SCREENING_OUTCOME_INTERVENTION_B)
    assert first.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert first.due_on == working_days_after(meeting_day_of_routing(first), 15).isoformat()
    done = await p.conclude(await p.hold(first), pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN)
    assert done.family_summary_due_on == working_days_after(meeting_day(done), 2).isoformat()
    done = await p.change(
        "RecordFamilySummary",
        pb.RecordFamilySummaryRequest(
            conference_id=done.conference_id,
            idempotency_key=key(),
            expected_version=done.version,
            text="What we agreed with you at the review, in plain words.",
            sent_on=london_today().isoformat(),
        ),
    )
    assert done.family_summary_sent_on <= done.family_summary_due_on
    review = await p.following(done)
    assert (review.kind, review.review_number) == (pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, 1)
    assert review.due_on == within_months(meeting_day(done), 3).isoformat()
    assert review.eligibility.extra_familial_harms  # B's criteria carried to the review

    # Between the reviews, the family and community network meets.
    done = await p.change(
        "RecordNetworkMeeting",
        pb.RecordNetworkMeetingRequest(
            conference_id=done.conference_id,
            idempotency_key=key(),
            expected_version=done.version,
            meeting=pb.NetworkMeeting(
                held_on=london_today().isoformat(),
                attended=[
                    pb.NetworkParticipant(role=pb.PARTICIPANT_ROLE_YOUNG_PERSON, name="Jay"),
                    pb.NetworkParticipant(
                        role=pb.PARTICIPANT_ROLE_TRUSTED_ADULT, name="Sam", relationship="boxing coach"
                    ),
                ],
                actions=[
                    pb.AgreedAction(
                        owner_agency=types_pb2.AGENCY_SOCIAL_CARE,
                        description="Coach walks Jay home after training",
                        due_on=(london_today() + timedelta(days=7)).isoformat(),
                    )
                ],
            ),
        ),
    )
    assert len(done.network_meetings) == 1 and done.network_meetings[0].convened_by == SOCIAL_WORKER.user_id

    # The first review meets, continues the plan and sets the next at 2 months.
    reviewed = await p.conclude(await p.hold(review), pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN, months=2)
    assert reviewed.family_summary_due_on == working_days_after(meeting_day(reviewed), 2).isoformat()
    second = await p.following(reviewed)
    assert (second.kind, second.review_number) == (pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, 2)
    assert second.due_on == within_months(meeting_day(reviewed), 2).isoformat()


def meeting_day_of_routing(conference: pb.Conference) -> date:
    """B's first review is due 15 working days after the routing (the day it was scheduled)."""
    return conference.scheduled_at.ToDatetime(tzinfo=UTC).astimezone(LONDON).date()


# ------------------------------------------------------------------------------------- CP plan -> B


async def child_protection_review(p: Process) -> pb.Conference:
    initial = await p.routed(referrals_pb2.SCREENING_OUTCOME_INTERVENTION_A, london_today().isoformat())
    held = await p.hold(initial)
    await p.conclude(held, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN)
    return await p.following(held)


async def offer(p: Process, review: pb.Conference) -> pb.Conference:
    return await p.change(
        "OfferTransition",
        pb.OfferTransitionRequest(
            conference_id=review.conference_id,
            idempotency_key=key(),
            expected_version=review.version,
            extra_familial_harms=[types_pb2.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION],
            offered_on=london_today().isoformat(),
        ),
    )


async def answer(p: Process, review: pb.Conference, given: int) -> pb.Conference:
    return await p.change(
        "RecordTransitionAnswer",
        pb.RecordTransitionAnswerRequest(
            conference_id=review.conference_id,
            idempotency_key=key(),
            expected_version=review.version,
            answer=given,  # type: ignore[arg-type]
            answered_on=london_today().isoformat(),
        ),
    )


async def test_a_cp_plan_moves_to_b_at_a_review_the_family_accepted(process: Process) -> None:
    p = process
    review = await child_protection_review(p)
    review = await answer(p, await offer(p, review), pb.TRANSITION_ANSWER_ACCEPTED)
    review = await p.change(  # B's criteria, which the move must meet like any B plan
        "RecordEligibility",
        pb.RecordEligibilityRequest(
            conference_id=review.conference_id,
            idempotency_key=key(),
            expected_version=review.version,
            eligibility=conference_flow.ELIGIBLE,
        ),
    )
    moved = await p.conclude(await p.hold(review), pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN)
    assert moved.kind == pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW
    b_review = await p.following(moved)
    assert b_review.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert b_review.due_on == within_months(meeting_day(moved), 3).isoformat()

    # Actionplans applied the one event: the CP plan ended as the B plan started.
    async def moved_in_actionplans() -> bool:
        reply = await p.plans.ListActionPlans(
            actionplans_pb2.ListActionPlansRequest(child_id=review.child_id), timeout=5
        )
        return [(x.kind, x.status) for x in reply.plans] == [
            (actionplans_pb2.PLAN_KIND_CHILD_PROTECTION, actionplans_pb2.PLAN_STATUS_ENDED),
            (actionplans_pb2.PLAN_KIND_CONTEXTUAL_SAFEGUARDING, actionplans_pb2.PLAN_STATUS_ACTIVE),
        ]

    await eventually(moved_in_actionplans)


async def test_a_refused_move_keeps_the_cp_plan(process: Process) -> None:
    p = process
    review = await child_protection_review(p)
    review = await answer(p, await offer(p, review), pb.TRANSITION_ANSWER_DECLINED)
    held = await p.hold(review)
    await refused(
        p.conclude(held, pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN),
        grpc.StatusCode.FAILED_PRECONDITION,
        "TRANSITION_NOT_ACCEPTED",
    )
    kept = await p.conclude(held, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN)
    assert [o.answer for o in kept.transition_offers] == [pb.TRANSITION_ANSWER_DECLINED]
    assert (await p.following(kept)).kind == pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW


# ---------------------------------------------------------------------------------- quorum and chairs


async def test_a_meeting_without_quorum_is_recorded_and_arranged_again(process: Process) -> None:
    p = process
    conference = await p.routed(referrals_pb2.SCREENING_OUTCOME_INTERVENTION_B)
    await conference_flow.register_chair(p.manager, CHAIR.user_id)
    starts = timestamp_pb2.Timestamp()
    starts.FromDatetime(datetime.now(UTC) - timedelta(minutes=5))
    arranged = (
        await p.manager.ArrangeConference(
            pb.ArrangeConferenceRequest(
                conference_id=conference.conference_id,
                idempotency_key=key(),
                expected_version=conference.version,
                meeting=pb.Meeting(starts_at=starts, online=True),
                chair=CHAIR.user_id,
                managing_team="team-e2e",
            ),
            timeout=10,
        )
    ).conference
    unquorate = await p.chair.RecordConferenceMeeting(
        pb.RecordConferenceMeetingRequest(
            conference_id=conference.conference_id,
            idempotency_key=key(),
            expected_version=arranged.version,
            attendance=[
                pb.Attendance(agency=types_pb2.AGENCY_SOCIAL_CARE, direct_contact=True),
                pb.Attendance(agency=types_pb2.AGENCY_POLICE, direct_contact=True),
            ],
            note="The school and health sent apologies.",
        ),
        timeout=10,
    )
    assert unquorate.quorate is False
    again = unquorate.conference
    assert again.status == pb.CONFERENCE_STATUS_SCHEDULED and not again.HasField("meeting")
    assert [c.reason for c in again.changes] == [pb.CHANGE_REASON_NO_QUORUM]
    assert again.due_on == conference.due_on  # the due date never moves
    held = await p.hold(again)  # arranged again, and quorate this time
    assert held.status == pb.CONFERENCE_STATUS_HELD


async def test_the_lead_chair_and_independence_rules_refuse_the_wrong_chair(process: Process) -> None:
    p = process
    # A lead-chair period in the future, so no other test's meetings (held now) fall in it.
    lead_from = london_today() + timedelta(days=400)
    lead_until = lead_from + timedelta(days=30)
    tag = uuid.uuid4().hex[:8]
    register = [
        pb.Chair(
            user_id=f"lead.{tag}",
            name="Lead Chair",
            trained_on="2020-10-01",
            lead_from=lead_from.isoformat(),
            lead_until=lead_until.isoformat(),
        ),
        pb.Chair(user_id=f"other.{tag}", name="Other Chair", trained_on="2020-10-01"),
        pb.Chair(user_id=f"manager.{tag}", name="Team Manager", trained_on="2020-10-01", manages_teams=[f"team-{tag}"]),
    ]
    for chair in register:
        await p.manager.RegisterChair(pb.RegisterChairRequest(idempotency_key=key(), chair=chair), timeout=10)
    conference = await p.routed(referrals_pb2.SCREENING_OUTCOME_INTERVENTION_B)
    starts = timestamp_pb2.Timestamp()
    starts.FromDatetime(
        datetime.combine(lead_from + timedelta(days=7), datetime.min.time(), LONDON) + timedelta(hours=10)
    )

    def arrange(chair_id: str) -> object:
        return p.manager.ArrangeConference(
            pb.ArrangeConferenceRequest(
                conference_id=conference.conference_id,
                idempotency_key=key(),
                expected_version=conference.version,
                meeting=pb.Meeting(starts_at=starts, online=True),
                chair=chair_id,
                managing_team=f"team-{tag}",
            ),
            timeout=10,
        )

    await refused(arrange(f"manager.{tag}"), grpc.StatusCode.FAILED_PRECONDITION, "CHAIR_NOT_INDEPENDENT")
    await refused(arrange(f"other.{tag}"), grpc.StatusCode.FAILED_PRECONDITION, "LEAD_CHAIR_REQUIRED")
    arranged = (await arrange(f"lead.{tag}")).conference  # type: ignore[attr-defined]
    assert arranged.chair == f"lead.{tag}"
