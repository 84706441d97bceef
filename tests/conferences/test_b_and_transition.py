"""Intervention B's own parts and the move from A to B (docs/conferences.md): eligibility (extra-familial
harm, no significant harm at home, a child under 10 only with the chair's reason), family and community
network meetings between reviews, and the CP plan -> B transition (offered, answered by the family,
made only by a review conference, one event). Every refusal writes and publishes nothing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from conferences_support import (
    CHAIR,
    SOCIAL_WORKER,
    Harness,
    count,
    current,
    held,
    key,
    outbox,
    refused,
    routed,
)
from google.protobuf import timestamp_pb2
from sqlalchemy import select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.types.v1 import types_pb2
from csx_common.errors import FailedPrecondition, PermissionDenied
from csx_common.identity import Principal
from csx_conferences import domain, tables

POLICE = Principal("pc.jones", "police", "police_officer", "conference_participation")
OTHER_CHAIR = Principal("chair.other", "social_care", "chair", "conference_participation")
YOT = Principal("yot.officer", "youth_justice", "youth_justice_worker", "conference_participation")
CCE = types_pb2.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION
COACH = "CANARYCOACH-Sam Okafor"
COACH_ROLE = "CANARYCOACHROLE-football coach at the Eastside club"
NETWORK_NOTES = "CANARYNETNOTES-the network agreed a safe route home"
NETWORK_ACTION = "CANARYNETACTION-coach walks him to the bus on training nights"
UNDER_TEN_REASON = "CANARYUNDER10-older siblings are exploited by the same group"
FAMILY_NO = "CANARYFAMILYNO-we want to keep the child protection plan for now"


def eligibility_req(c: pb.Conference, **fields: object) -> pb.RecordEligibilityRequest:
    values: dict[str, object] = {"extra_familial_harms": [CCE], "age_years": 14, **fields}
    return pb.RecordEligibilityRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version,
        eligibility=pb.Eligibility(**values),  # type: ignore[arg-type]
    )


def conclude_req(c: pb.Conference, outcome: int) -> pb.ConcludeConferenceRequest:
    request = pb.ConcludeConferenceRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version,
        outcome=outcome,
        summary="Reasons for the outcome, as the chair recorded them.",
    )
    if outcome != pb.CONFERENCE_OUTCOME_NO_PLAN:
        request.actions.add(owner_agency=types_pb2.AGENCY_POLICE, description="Patrol the park", due_on="2026-12-01")
    return request


def network_req(c: pb.Conference, held_on: str) -> pb.RecordNetworkMeetingRequest:
    return pb.RecordNetworkMeetingRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version,
        meeting=pb.NetworkMeeting(
            held_on=held_on,
            attended=[
                pb.NetworkParticipant(role=pb.PARTICIPANT_ROLE_YOUNG_PERSON, name="CANARYYP-Jay"),
                pb.NetworkParticipant(role=pb.PARTICIPANT_ROLE_TRUSTED_ADULT, name=COACH, relationship=COACH_ROLE),
                pb.NetworkParticipant(role=pb.PARTICIPANT_ROLE_AGENCY, agency=types_pb2.AGENCY_YOUTH_JUSTICE),
            ],
            actions=[
                pb.AgreedAction(
                    owner_agency=types_pb2.AGENCY_SOCIAL_CARE, description=NETWORK_ACTION, due_on="2026-04-30"
                )
            ],
            notes=NETWORK_NOTES,
        ),
    )


async def routed_conference(h: Harness, intervention: int = types_pb2.INTERVENTION_B) -> pb.Conference:
    child_id = str(uuid.uuid4())
    strategy = "2026-03-02" if intervention == types_pb2.INTERVENTION_A else ""
    await h.deliver(routed(str(uuid.uuid4()), child_id, intervention, strategy_discussion_on=strategy))
    (conference,) = (await h.service.list_conferences(None, child_id))[0]
    return conference


async def following(h: Harness, c: pb.Conference) -> pb.Conference:
    """The review `c` scheduled when it concluded with a plan."""
    (review,) = [
        r
        for r in (await h.service.list_conferences(None, c.child_id))[0]
        if r.previous_conference_id == c.conference_id
    ]
    return review


# ------------------------------------------------------------------------------------------ eligibility


async def test_a_b_plan_needs_eligibility_recorded_and_met(harness: Harness) -> None:
    h = harness
    c = await routed_conference(h)
    # Recorded as not eligible: significant harm within the family.
    c = (
        await h.service.record_eligibility(SOCIAL_WORKER, eligibility_req(c, significant_intra_familial_harm=True))
    ).conference
    c = await held(h, c)
    plan = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "SIGNIFICANT_INTRA_FAMILIAL_HARM",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(c, plan)),
    )
    # Without a plan, the review may conclude (eligibility decides B's plan, not the meeting).
    done = (await h.service.conclude_conference(CHAIR, conclude_req(c, pb.CONFERENCE_OUTCOME_NO_PLAN))).conference
    assert done.status == pb.CONFERENCE_STATUS_CONCLUDED
    assert done.eligibility.significant_intra_familial_harm
    assert done.eligibility.recorded_by == SOCIAL_WORKER.user_id


async def test_eligibility_not_recorded_refuses_a_plan(harness: Harness) -> None:
    h = harness
    c = await routed_conference(h)
    c = await held(h, c)  # the harness records ELIGIBLE when missing: take it away in the stored record
    async with h.units.begin() as uow:
        stored = await h.service._repo.get(uow.tx, c.conference_id)
        assert stored is not None
        stored.ClearField("eligibility")
        assert await h.service._write(uow, stored)
    c = await current(h, c.conference_id)
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "ELIGIBILITY_NOT_RECORDED",
        lambda: h.service.conclude_conference(
            CHAIR, conclude_req(c, pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN)
        ),
    )


async def test_a_child_under_10_needs_the_assigned_chairs_reason(harness: Harness) -> None:
    h = harness
    c = await routed_conference(h)
    c = (await h.service.record_eligibility(SOCIAL_WORKER, eligibility_req(c, age_years=8))).conference
    c = await held(h, c)
    plan = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "UNDER_TEN_REASON_REQUIRED",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(c, plan)),
    )
    # The reason is the chair's: the social worker, or another chair, may not record it.
    with_reason = eligibility_req(c, age_years=8, under_ten_reason=UNDER_TEN_REASON)
    for caller in (SOCIAL_WORKER, OTHER_CHAIR):
        await refused(
            h,
            c.conference_id,
            PermissionDenied,
            "NOT_ASSIGNED_CHAIR",
            lambda caller=caller: h.service.record_eligibility(caller, with_reason),
        )
    c = (await h.service.record_eligibility(CHAIR, with_reason)).conference
    assert c.eligibility.under_ten_reason == UNDER_TEN_REASON and c.eligibility.recorded_by == CHAIR.user_id
    done = (await h.service.conclude_conference(CHAIR, conclude_req(c, plan))).conference
    assert done.outcome == plan
    # The next review carries the criteria forward, but not the reason: that is each review's chair's.
    review = await following(h, c)
    assert review.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW and review.previous_conference_id == c.conference_id
    assert list(review.eligibility.extra_familial_harms) == [CCE] and review.eligibility.age_years == 8
    assert not review.eligibility.under_ten_reason and not review.eligibility.under_ten_reason_by
    h.clock.now = datetime(2026, 4, 20, 11, 0, tzinfo=UTC)
    review = await held(h, review)
    await refused(
        h,
        review.conference_id,
        FailedPrecondition,
        "UNDER_TEN_REASON_REQUIRED",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(review, plan)),
    )


async def test_the_chairs_under_10_reason_survives_a_social_workers_update_and_counts_for_that_chair_only(
    harness: Harness,
) -> None:
    h = harness
    c = await routed_conference(h)
    c = (await h.service.record_eligibility(SOCIAL_WORKER, eligibility_req(c, age_years=8))).conference
    c = await held(h, c)
    reasoned = eligibility_req(c, age_years=8, under_ten_reason=UNDER_TEN_REASON)
    c = (await h.service.record_eligibility(CHAIR, reasoned)).conference
    assert c.eligibility.under_ten_reason_by == CHAIR.user_id
    # The social worker adds a harm: the chair's reason stays (only the chair withdraws it).
    c = (
        await h.service.record_eligibility(
            SOCIAL_WORKER, eligibility_req(c, age_years=8, extra_familial_harms=[CCE, types_pb2.HARM_TYPE_ONLINE_HARM])
        )
    ).conference
    assert c.eligibility.under_ten_reason == UNDER_TEN_REASON and c.eligibility.recorded_by == SOCIAL_WORKER.user_id
    # A reason another chair recorded does not count for this conference's chair.
    async with h.units.begin() as uow:
        stored = await h.service._repo.get(uow.tx, c.conference_id)
        assert stored is not None
        stored.eligibility.under_ten_reason_by = OTHER_CHAIR.user_id
        assert await h.service._write(uow, stored)
    c = await current(h, c.conference_id)
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "UNDER_TEN_REASON_REQUIRED",
        lambda: h.service.conclude_conference(
            CHAIR, conclude_req(c, pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN)
        ),
    )


async def test_eligibility_is_bs_and_social_cares(harness: Harness) -> None:
    h = harness
    a = await routed_conference(h, types_pb2.INTERVENTION_A)
    await refused(
        h,
        a.conference_id,
        FailedPrecondition,
        "NOT_CONTEXTUAL_REVIEW",
        lambda: h.service.record_eligibility(SOCIAL_WORKER, eligibility_req(a)),
    )
    b = await routed_conference(h)
    await refused(
        h,
        b.conference_id,
        PermissionDenied,
        "SOCIAL_CARE_ONLY",
        lambda: h.service.record_eligibility(POLICE, eligibility_req(b)),
    )


# ------------------------------------------------------------------------------------ network meetings


async def b_plan(h: Harness) -> pb.Conference:
    """A B review met on Monday 16 March 2026 and concluded with a plan; the clock on 20 March."""
    c = await routed_conference(h)
    h.clock.now = datetime(2026, 3, 16, 11, 0, tzinfo=UTC)
    c = await held(h, c)
    plan = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    done = (await h.service.conclude_conference(CHAIR, conclude_req(c, plan))).conference
    h.clock.now = datetime(2026, 3, 20, 15, 0, tzinfo=UTC)
    return done


async def test_a_network_meeting_between_reviews_with_its_attendance_and_actions(harness: Harness) -> None:
    h = harness
    plan = await b_plan(h)
    # The social worker convenes one, the chair another.
    first = (await h.service.record_network_meeting(SOCIAL_WORKER, network_req(plan, "2026-03-18"))).conference
    second = (await h.service.record_network_meeting(CHAIR, network_req(first, "2026-03-20"))).conference
    assert [m.held_on for m in second.network_meetings] == ["2026-03-18", "2026-03-20"]
    assert [m.convened_by for m in second.network_meetings] == [SOCIAL_WORKER.user_id, CHAIR.user_id]
    meeting = second.network_meetings[0]
    assert [(p.role, p.name, p.relationship) for p in meeting.attended][1] == (
        pb.PARTICIPANT_ROLE_TRUSTED_ADULT,
        COACH,
        COACH_ROLE,
    )
    assert [a.description for a in meeting.actions] == [NETWORK_ACTION] and meeting.notes == NETWORK_NOTES
    assert uuid.UUID(meeting.meeting_id) and meeting.meeting_id != second.network_meetings[1].meeting_id
    recorded = await outbox(h, events.NetworkMeetingRecorded)
    assert [(e.conference_id, e.child_id, e.held_on, e.action_count) for e in recorded] == [
        (plan.conference_id, plan.child_id, "2026-03-18", 1),
        (plan.conference_id, plan.child_id, "2026-03-20", 1),
    ]
    assert [e.meeting_id for e in recorded] == [m.meeting_id for m in second.network_meetings]
    # Names, relationships, notes and actions are sealed: none is in the database in clear.
    async with h.db.session() as s:
        rows = (await s.execute(select(tables.conferences.c.body, tables.conferences.c.sealed))).all()
    stored = b"".join(r.body + str(r.sealed).encode() for r in rows)
    for canary in (COACH, COACH_ROLE, NETWORK_NOTES, NETWORK_ACTION, "CANARYYP-Jay"):
        assert canary.encode() not in stored


async def test_a_network_meeting_is_held_between_the_plans_review_and_the_next(harness: Harness) -> None:
    h = harness
    plan = await b_plan(h)
    for held_on in ("2026-03-13", "2026-03-23"):  # before the review met; after today
        await refused(
            h,
            plan.conference_id,
            FailedPrecondition,
            "HELD_ON_OUT_OF_RANGE",
            lambda held_on=held_on: h.service.record_network_meeting(SOCIAL_WORKER, network_req(plan, held_on)),
        )
    # Once the next review has met, a meeting after that day belongs to that review's plan.
    review = await following(h, plan)
    h.clock.now = datetime(2026, 4, 2, 11, 0, tzinfo=UTC)
    await held(h, review)
    h.clock.now = datetime(2026, 4, 8, 11, 0, tzinfo=UTC)
    await refused(
        h,
        plan.conference_id,
        FailedPrecondition,
        "HELD_ON_OUT_OF_RANGE",
        lambda: h.service.record_network_meeting(SOCIAL_WORKER, network_req(plan, "2026-04-06")),
    )
    # One held before it, recorded late, is still the first plan's.
    late = await h.service.record_network_meeting(SOCIAL_WORKER, network_req(plan, "2026-03-30"))
    assert [m.held_on for m in late.conference.network_meetings] == ["2026-03-30"]


async def test_a_network_meeting_needs_a_b_plan_and_social_care(harness: Harness) -> None:
    h = harness
    scheduled = await routed_conference(h)
    await refused(
        h,
        scheduled.conference_id,
        FailedPrecondition,
        "NO_CONTEXTUAL_PLAN",
        lambda: h.service.record_network_meeting(SOCIAL_WORKER, network_req(scheduled, "2026-03-02")),
    )
    plan = await b_plan(h)
    await refused(
        h,
        plan.conference_id,
        PermissionDenied,
        "SOCIAL_CARE_ONLY",
        lambda: h.service.record_network_meeting(POLICE, network_req(plan, "2026-03-18")),
    )


# ------------------------------------------------------------------------------------------ CP plan -> B


async def cp_review(h: Harness) -> pb.Conference:
    """A child on a child protection plan (initial conference 20 March 2026): its first review, scheduled."""
    initial = await routed_conference(h, types_pb2.INTERVENTION_A)
    h.clock.now = datetime(2026, 3, 20, 11, 0, tzinfo=UTC)
    initial = await held(h, initial)
    await h.service.conclude_conference(CHAIR, conclude_req(initial, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN))
    review = await following(h, initial)
    assert review.kind == pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW
    return review


def offer_req(c: pb.Conference, offered_on: str = "2026-05-11") -> pb.OfferTransitionRequest:
    return pb.OfferTransitionRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version,
        extra_familial_harms=[CCE, types_pb2.HARM_TYPE_MISSING_EPISODE],
        offered_on=offered_on,
        note="Risks now outside the home only",
    )


def answer_req(
    c: pb.Conference, answer: int, answered_on: str = "2026-05-14", words: str = ""
) -> pb.RecordTransitionAnswerRequest:
    return pb.RecordTransitionAnswerRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version,
        answer=answer,  # type: ignore[arg-type]
        answered_on=answered_on,
        family_response=words,
    )


async def test_a_declined_offer_is_kept_and_an_accepted_one_moves_the_child_to_b_at_the_review(
    harness: Harness,
) -> None:
    h = harness
    review = await cp_review(h)
    h.clock.now = datetime(2026, 5, 15, 9, 0, tzinfo=UTC)
    # Offered, declined by the family: kept, with their words.
    review = (await h.service.offer_transition(SOCIAL_WORKER, offer_req(review))).conference
    declined = pb.TRANSITION_ANSWER_DECLINED
    review = (
        await h.service.record_transition_answer(SOCIAL_WORKER, answer_req(review, declined, words=FAMILY_NO))
    ).conference
    # Offered again later, and accepted.
    review = (await h.service.offer_transition(SOCIAL_WORKER, offer_req(review, "2026-05-14"))).conference
    review = (
        await h.service.record_transition_answer(
            SOCIAL_WORKER, answer_req(review, pb.TRANSITION_ANSWER_ACCEPTED, "2026-05-15")
        )
    ).conference
    assert [(o.answer, o.offered_on, o.answered_on) for o in review.transition_offers] == [
        (pb.TRANSITION_ANSWER_DECLINED, "2026-05-11", "2026-05-14"),
        (pb.TRANSITION_ANSWER_ACCEPTED, "2026-05-14", "2026-05-15"),
    ]
    assert review.transition_offers[0].family_response == FAMILY_NO
    assert list(review.transition_offers[1].extra_familial_harms) == [CCE, types_pb2.HARM_TYPE_MISSING_EPISODE]
    assert review.transition_offers[0].offered_by == SOCIAL_WORKER.user_id

    # The review conference makes the move: the CP plan ends, B starts, with its first review in 3 months.
    h.clock.now = datetime(2026, 6, 1, 11, 0, tzinfo=UTC)
    review = await held(h, review)
    plan = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    # B's criteria hold for the move too: recorded on the review first.
    await refused(
        h,
        review.conference_id,
        FailedPrecondition,
        "ELIGIBILITY_NOT_RECORDED",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(review, plan)),
    )
    review = (await h.service.record_eligibility(SOCIAL_WORKER, eligibility_req(review))).conference
    done = (await h.service.conclude_conference(CHAIR, conclude_req(review, plan))).conference
    assert done.outcome == plan
    b_review = await following(h, review)
    assert b_review.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert b_review.previous_conference_id == review.conference_id
    assert b_review.due_on == "2026-09-01"  # 1 September 2026, a Tuesday
    assert list(b_review.eligibility.extra_familial_harms) == [CCE]  # carried to B's first review
    # The B plan the move made has its network meetings like any other.
    h.clock.now = datetime(2026, 6, 3, 11, 0, tzinfo=UTC)
    met = await h.service.record_network_meeting(SOCIAL_WORKER, network_req(done, "2026-06-02"))
    assert [m.held_on for m in met.conference.network_meetings] == ["2026-06-02"]
    concluded = [e for e in await outbox(h, events.ConferenceConcluded) if e.conference_id == review.conference_id]
    assert [(e.transition_to_contextual_safeguarding, e.review_conference_id) for e in concluded] == [
        (True, b_review.conference_id)
    ]
    assert list(concluded[0].referral_ids) == [review.referral_id]


async def test_no_move_to_b_without_acceptance_nor_outside_a_review(harness: Harness) -> None:
    h = harness
    plan = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    # The initial conference may not reach B's outcome at all.
    initial = await routed_conference(h, types_pb2.INTERVENTION_A)
    h.clock.now = datetime(2026, 3, 20, 11, 0, tzinfo=UTC)
    initial = await held(h, initial)
    await refused(
        h,
        initial.conference_id,
        FailedPrecondition,
        "OUTCOME_NOT_ALLOWED_FOR_KIND",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(initial, plan)),
    )
    await refused(
        h,
        initial.conference_id,
        FailedPrecondition,
        "TRANSITION_AT_REVIEW_ONLY",
        lambda: h.service.offer_transition(SOCIAL_WORKER, offer_req(initial, "2026-03-20")),
    )
    review = await cp_review(h)
    h.clock.now = datetime(2026, 5, 15, 9, 0, tzinfo=UTC)
    await refused(
        h,
        review.conference_id,
        FailedPrecondition,
        "NO_PENDING_OFFER",
        lambda: h.service.record_transition_answer(SOCIAL_WORKER, answer_req(review, pb.TRANSITION_ANSWER_ACCEPTED)),
    )
    review = (await h.service.offer_transition(SOCIAL_WORKER, offer_req(review))).conference
    await refused(
        h,
        review.conference_id,
        FailedPrecondition,
        "OFFER_ALREADY_OPEN",
        lambda: h.service.offer_transition(SOCIAL_WORKER, offer_req(review)),
    )
    for answered_on in ("2026-05-10", "2026-05-16"):  # before the offer; after today
        await refused(
            h,
            review.conference_id,
            FailedPrecondition,
            "ANSWERED_ON_OUT_OF_RANGE",
            lambda answered_on=answered_on: h.service.record_transition_answer(
                SOCIAL_WORKER, answer_req(review, pb.TRANSITION_ANSWER_ACCEPTED, answered_on)
            ),
        )
    await refused(
        h,
        review.conference_id,
        PermissionDenied,
        "SOCIAL_CARE_ONLY",
        lambda: h.service.record_transition_answer(POLICE, answer_req(review, pb.TRANSITION_ANSWER_ACCEPTED)),
    )
    # Offered but not answered: the review may not make the move.
    h.clock.now = datetime(2026, 6, 1, 11, 0, tzinfo=UTC)
    review = await held(h, review)
    await refused(
        h,
        review.conference_id,
        FailedPrecondition,
        "TRANSITION_NOT_ACCEPTED",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(review, plan)),
    )
    # It continues the plan instead: no transition in the event.
    await h.service.conclude_conference(CHAIR, conclude_req(review, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN))
    (event,) = [e for e in await outbox(h, events.ConferenceConcluded) if e.conference_id == review.conference_id]
    assert not event.transition_to_contextual_safeguarding and event.review_conference_id
    assert (await following(h, review)).kind == pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW


async def test_an_offer_is_recorded_once_made(harness: Harness) -> None:
    h = harness
    review = await cp_review(h)
    h.clock.now = datetime(2026, 5, 15, 9, 0, tzinfo=UTC)
    await refused(
        h,
        review.conference_id,
        FailedPrecondition,
        "OFFERED_ON_IN_FUTURE",
        lambda: h.service.offer_transition(SOCIAL_WORKER, offer_req(review, "2026-05-16")),
    )
    assert await count(h, tables.conferences) == 2  # the initial conference and its review, nothing more


async def test_the_chair_neither_makes_nor_answers_the_offer(harness: Harness) -> None:
    h = harness
    review = await cp_review(h)
    h.clock.now = datetime(2026, 5, 15, 9, 0, tzinfo=UTC)
    review = await held(h, review)  # arranged: CHAIR is its assigned chair
    await refused(
        h,
        review.conference_id,
        PermissionDenied,
        "CHAIR_NOT_INDEPENDENT",
        lambda: h.service.offer_transition(CHAIR, offer_req(review)),
    )
    review = (await h.service.offer_transition(SOCIAL_WORKER, offer_req(review))).conference
    await refused(
        h,
        review.conference_id,
        PermissionDenied,
        "CHAIR_NOT_INDEPENDENT",
        lambda: h.service.record_transition_answer(CHAIR, answer_req(review, pb.TRANSITION_ANSWER_ACCEPTED)),
    )


async def test_offers_and_network_meetings_are_bounded(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    monkeypatch.setattr(domain, "MAX_TRANSITION_OFFERS", 2)
    monkeypatch.setattr(domain, "MAX_NETWORK_MEETINGS", 1)
    review = await cp_review(h)
    h.clock.now = datetime(2026, 5, 15, 9, 0, tzinfo=UTC)
    for _ in range(2):
        review = (await h.service.offer_transition(SOCIAL_WORKER, offer_req(review))).conference
        declined = answer_req(review, pb.TRANSITION_ANSWER_DECLINED)
        review = (await h.service.record_transition_answer(SOCIAL_WORKER, declined)).conference
    await refused(
        h,
        review.conference_id,
        FailedPrecondition,
        "TOO_MANY_OFFERS",
        lambda: h.service.offer_transition(SOCIAL_WORKER, offer_req(review)),
    )
    plan = await b_plan(h)
    plan = (await h.service.record_network_meeting(SOCIAL_WORKER, network_req(plan, "2026-03-18"))).conference
    await refused(
        h,
        plan.conference_id,
        FailedPrecondition,
        "TOO_MANY_NETWORK_MEETINGS",
        lambda: h.service.record_network_meeting(SOCIAL_WORKER, network_req(plan, "2026-03-19")),
    )


async def test_an_agency_owning_a_network_action_sees_it_and_not_the_names(harness: Harness) -> None:
    h = harness
    plan = await b_plan(h)
    request = network_req(plan, "2026-03-18")
    request.meeting.actions[0].owner_agency = types_pb2.AGENCY_YOUTH_JUSTICE
    await h.service.record_network_meeting(SOCIAL_WORKER, request)
    shown, redacted = await h.service.get_conference(YOT, plan.conference_id)
    (meeting,) = shown.network_meetings
    assert meeting.actions[0].description == NETWORK_ACTION  # its own action
    # The trusted adult's name and the notes are social care's (no consent recorded here).
    assert all(not p.name for p in meeting.attended) and not meeting.notes
    assert "network_meetings[0].attended[1].name" in redacted


async def test_whoever_made_or_recorded_the_offer_may_not_then_chair_the_review(harness: Harness) -> None:
    h = harness
    review = await cp_review(h)
    h.clock.now = datetime(2026, 5, 15, 9, 0, tzinfo=UTC)
    review = (await h.service.offer_transition(OTHER_CHAIR, offer_req(review))).conference  # before any chair
    starts = timestamp_pb2.Timestamp()
    starts.FromDatetime(datetime(2026, 5, 20, 10, 0, tzinfo=UTC))
    arrange = pb.ArrangeConferenceRequest(
        conference_id=review.conference_id,
        idempotency_key=key(),
        expected_version=review.version,
        meeting=pb.Meeting(starts_at=starts, online=True),
        chair=OTHER_CHAIR.user_id,
        managing_team="team-east",
    )
    await refused(
        h,
        review.conference_id,
        FailedPrecondition,
        "CHAIR_NOT_INDEPENDENT",
        lambda: h.service.arrange_conference(SOCIAL_WORKER, arrange),
    )


async def test_the_service_keeps_who_recorded_the_reason_whatever_the_caller_sends(harness: Harness) -> None:
    h = harness
    c = await routed_conference(h)
    forged = eligibility_req(c, age_years=8)
    forged.eligibility.under_ten_reason_by = CHAIR.user_id  # claims the chair's reason without one
    forged.eligibility.recorded_by = "someone.else"
    stored = (await h.service.record_eligibility(SOCIAL_WORKER, forged)).conference.eligibility
    assert stored.under_ten_reason_by == "" and stored.recorded_by == SOCIAL_WORKER.user_id


async def test_a_conference_record_never_outgrows_one_message(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    plan = await b_plan(h)
    monkeypatch.setattr(domain, "MAX_RECORD_BYTES", plan.ByteSize() + 100)
    await refused(
        h,
        plan.conference_id,
        FailedPrecondition,
        "RECORD_TOO_LARGE",
        lambda: h.service.record_network_meeting(SOCIAL_WORKER, network_req(plan, "2026-03-18")),
    )
