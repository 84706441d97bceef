"""One open intervention per child: a referral routed for a child whose case is open joins the open
conference (its agencies invited, the chair told) and never schedules a second initial conference
or a parallel review."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from conferences_support import CHAIR, SOCIAL_WORKER, Harness, held, routed
from sqlalchemy import select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.types.v1 import types_pb2
from csx_conferences import tables


async def joined_events(h: Harness) -> list[events.ReferralJoinedConference]:
    o = tables.delivery.outbox.c
    subject = "csx.conferences.referral_joined_conference"
    async with h.db.session() as s:
        rows = (await s.execute(select(o.payload).where(o.subject == subject))).all()
    return [events.ReferralJoinedConference.FromString(r.payload) for r in rows]


async def conferences_of(h: Harness, child_id: str) -> list[pb.Conference]:
    return (await h.service.list_conferences(None, child_id))[0]


def routing(child_id: str, intervention: int, agencies: list[int], **kw: str):  # type: ignore[no-untyped-def]
    event = routed(str(uuid.uuid4()), child_id, intervention, **kw)
    event.referring_agencies[:] = agencies
    return event


async def test_a_second_routing_joins_the_open_conference(harness: Harness) -> None:
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routing(child_id, types_pb2.INTERVENTION_B, [types_pb2.AGENCY_POLICE]))
    (open_b,) = await conferences_of(h, child_id)

    # A second referral about the same child, from the school and health.
    second = routing(
        child_id,
        types_pb2.INTERVENTION_B,
        [types_pb2.AGENCY_EDUCATION, types_pb2.AGENCY_HEALTH, types_pb2.AGENCY_POLICE],
    )
    await h.deliver(second)
    await h.deliver(second)  # announced twice (another message id): joined once

    (joined,) = await conferences_of(h, child_id)  # no second conference
    assert joined.conference_id == open_b.conference_id
    assert list(joined.joined_referral_ids) == [second.referral_id]
    invited = [(i.role, i.agency) for i in joined.invitations]
    assert invited == [
        (pb.PARTICIPANT_ROLE_AGENCY, types_pb2.AGENCY_HEALTH),
        (pb.PARTICIPANT_ROLE_AGENCY, types_pb2.AGENCY_EDUCATION),
    ]  # in agency order; police was invited already
    assert joined.version == open_b.version + 1
    (told,) = await joined_events(h)
    assert (told.conference_id, told.referral_id, told.intervention) == (
        open_b.conference_id,
        second.referral_id,
        types_pb2.INTERVENTION_B,
    )
    assert told.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW


async def test_a_held_conference_is_still_open_and_a_review_joins_too(harness: Harness) -> None:
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routing(child_id, types_pb2.INTERVENTION_B, [types_pb2.AGENCY_POLICE]))
    (review,) = await conferences_of(h, child_id)
    review = await held(h, review)
    await h.deliver(routing(child_id, types_pb2.INTERVENTION_B, [types_pb2.AGENCY_HOUSING]))
    (still,) = await conferences_of(h, child_id)
    assert still.status == pb.CONFERENCE_STATUS_HELD and len(still.joined_referral_ids) == 1
    told = (await joined_events(h))[0]
    assert told.chair == CHAIR.user_id  # the chair is named, to be told

    # Concluded with a plan: the next review is the open conference, and the next referral joins it.
    h.clock.now = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
    conclude = pb.ConcludeConferenceRequest(
        conference_id=still.conference_id,
        idempotency_key="conclude-open-0001",
        expected_version=still.version,
        outcome=pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
        summary="Plan agreed with the family and partners.",
        actions=[pb.AgreedAction(owner_agency=types_pb2.AGENCY_POLICE, description="Patrols", due_on="2026-04-01")],
    )
    await h.service.conclude_conference(CHAIR, conclude)
    _, next_review = await conferences_of(h, child_id)
    later = routing(child_id, types_pb2.INTERVENTION_B, [types_pb2.AGENCY_EDUCATION])
    await h.deliver(later)
    conferences = await conferences_of(h, child_id)
    assert len(conferences) == 2
    assert list(conferences[1].joined_referral_ids) == [later.referral_id]
    assert conferences[1].conference_id == next_review.conference_id


async def test_once_the_case_is_closed_a_routing_opens_a_new_conference(harness: Harness) -> None:
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routing(child_id, types_pb2.INTERVENTION_B, [types_pb2.AGENCY_POLICE]))
    (first,) = await conferences_of(h, child_id)
    await h.service.cancel_conference(
        SOCIAL_WORKER,
        pb.CancelConferenceRequest(
            conference_id=first.conference_id,
            idempotency_key="cancel-closed-0001",
            expected_version=first.version,
            reason=pb.CHANGE_REASON_NO_LONGER_REQUIRED,
        ),
    )
    again = routing(child_id, types_pb2.INTERVENTION_A, [types_pb2.AGENCY_HEALTH], strategy_discussion_on="2026-03-02")
    await h.deliver(again)
    by_id = {c.conference_id: c for c in await conferences_of(h, child_id)}
    cancelled = by_id.pop(first.conference_id)
    (fresh,) = by_id.values()
    assert cancelled.status == pb.CONFERENCE_STATUS_CANCELLED and not cancelled.joined_referral_ids
    assert fresh.kind == pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION and fresh.referral_id == again.referral_id
    assert await joined_events(h) == []


async def test_routed_to_a_while_a_b_review_is_open_the_initial_cpc_replaces_it(harness: Harness) -> None:
    """A child protection conference is a statutory duty that B cannot meet (B makes no child
    protection plan): the B review is closed, with the reason, and the initial CPC scheduled."""
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routing(child_id, types_pb2.INTERVENTION_B, [types_pb2.AGENCY_POLICE]))
    (b,) = await conferences_of(h, child_id)
    to_a = routing(child_id, types_pb2.INTERVENTION_A, [types_pb2.AGENCY_HEALTH], strategy_discussion_on="2026-03-02")
    await h.deliver(to_a)
    await h.deliver(to_a)  # again: handled once
    both = {c.kind: c for c in await conferences_of(h, child_id)}
    closed, initial = both[pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW], both[pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION]
    assert (
        len(both) == 2 and closed.conference_id == b.conference_id and closed.status == pb.CONFERENCE_STATUS_CANCELLED
    )
    assert closed.changes[-1].reason == pb.CHANGE_REASON_ESCALATED_TO_CHILD_PROTECTION
    assert initial.kind == pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION and initial.referral_id == to_a.referral_id
    assert initial.due_on == "2026-03-23"  # 15 working days from the strategy discussion
    assert await joined_events(h) == []


async def test_a_routing_taken_once_even_after_its_conference_closed(harness: Harness) -> None:
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routing(child_id, types_pb2.INTERVENTION_B, [types_pb2.AGENCY_POLICE]))
    (open_b,) = await conferences_of(h, child_id)
    joining = routing(child_id, types_pb2.INTERVENTION_B, [types_pb2.AGENCY_EDUCATION])
    await h.deliver(joining)
    joined = (await conferences_of(h, child_id))[0]
    await h.service.cancel_conference(
        SOCIAL_WORKER,
        pb.CancelConferenceRequest(
            conference_id=open_b.conference_id,
            idempotency_key="cancel-taken-0001",
            expected_version=joined.version,
            reason=pb.CHANGE_REASON_NO_LONGER_REQUIRED,
        ),
    )
    await h.deliver(joining)  # announced again after the conference it joined was cancelled
    assert len(await conferences_of(h, child_id)) == 1  # not scheduled anew
    assert len(await joined_events(h)) == 1
