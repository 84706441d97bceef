"""Scheduling from routing decisions and concluding conferences, against a real database."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conferences_support import CHAIR, SOCIAL_WORKER, Harness, held, routed
from sqlalchemy import func, select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.types.v1 import types_pb2
from csx_common.errors import Aborted, FailedPrecondition, NotFound
from csx_conferences import tables

SUMMARY_CANARY = "CANARY-SUMMARY-5c1e9d Riverside estate exploitation concerns"
ACTION_CANARY = "CANARY-ACTION-a77f02 youth outreach at the bus station"


def ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


async def outbox(h: Harness, subject: str) -> list[bytes]:
    o = tables.delivery.outbox.c
    async with h.db.session() as s:
        return list((await s.execute(select(o.payload).where(o.subject == subject))).scalars())


async def count(h: Harness, table) -> int:  # type: ignore[no-untyped-def]
    async with h.db.session() as s:
        return int((await s.execute(select(func.count()).select_from(table))).scalar_one())


async def scheduled(h: Harness, intervention: int = types_pb2.INTERVENTION_B, **kw: str) -> pb.Conference:
    referral_id, child_id = ids()
    await h.deliver(routed(referral_id, child_id, intervention, **kw))
    (conference,) = (await h.service.list_conferences(None, child_id))[0]
    return conference


def conclude_request(
    conference: pb.Conference,
    outcome: int = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
    *,
    key: str = "conclude-key-0001",
    version: int | None = None,
) -> pb.ConcludeConferenceRequest:
    return pb.ConcludeConferenceRequest(
        conference_id=conference.conference_id,
        idempotency_key=key,
        expected_version=conference.version if version is None else version,
        outcome=outcome,
        summary=SUMMARY_CANARY,
        actions=[
            pb.AgreedAction(owner_agency=types_pb2.AGENCY_POLICE, description=ACTION_CANARY, due_on="2026-03-16"),
            pb.AgreedAction(
                owner_agency=types_pb2.AGENCY_EDUCATION,
                description="Safe route plan with school",
                due_on="2026-03-20",
            ),
        ],
    )


async def test_routing_schedules_one_conference_per_referral(harness: Harness) -> None:
    referral_id, child_id = ids()
    event = routed(referral_id, child_id, types_pb2.INTERVENTION_B)
    await harness.deliver(event)
    # The same routing under another message id (the inbox would catch the same id).
    await harness.deliver(event)

    (conference,) = (await harness.service.list_conferences(None, child_id))[0]
    assert conference.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert conference.status == pb.CONFERENCE_STATUS_SCHEDULED
    assert conference.referral_id == referral_id
    assert conference.due_on == "2026-03-23"  # routed Mon 2 Mar + 15 working days
    assert conference.version == 1
    assert conference.scheduled_at.ToDatetime(tzinfo=UTC) == harness.clock.now

    (payload,) = await outbox(harness, "csx.conferences.conference_scheduled")
    event_out = events.ConferenceScheduled.FromString(payload)
    assert (event_out.conference_id, event_out.child_id, event_out.referral_id) == (
        conference.conference_id,
        child_id,
        referral_id,
    )
    assert event_out.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert event_out.due_on == "2026-03-23"


async def test_routing_to_a_schedules_an_initial_cpc_from_the_strategy_discussion(harness: Harness) -> None:
    conference = await scheduled(harness, types_pb2.INTERVENTION_A, strategy_discussion_on="2026-12-18")
    assert conference.kind == pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION
    assert conference.due_on == "2027-01-13"
    assert conference.due_rule.startswith("WT23")


async def test_a_contract_breaking_event_fails_and_leaves_nothing(harness: Harness) -> None:
    referral_id, child_id = ids()
    with pytest.raises(ValueError):
        await harness.deliver(routed(referral_id, child_id, types_pb2.INTERVENTION_A))
    assert await count(harness, tables.conferences) == 0
    assert await count(harness, tables.delivery.outbox) == 0


async def test_get_and_list(harness: Harness) -> None:
    child_id = str(uuid.uuid4())
    first_referral, second_referral = ids()
    await harness.deliver(routed(first_referral, child_id))
    (first,) = (await harness.service.list_conferences(None, child_id))[0]
    cancel = pb.CancelConferenceRequest(
        conference_id=first.conference_id,
        idempotency_key="cancel-first-0001",
        expected_version=first.version,
        reason=pb.CHANGE_REASON_NO_LONGER_REQUIRED,
    )
    await harness.service.cancel_conference(SOCIAL_WORKER, cancel)  # the case closed: a new one may open
    harness.clock.now = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    await harness.deliver(routed(second_referral, child_id))
    listed = (await harness.service.list_conferences(None, child_id))[0]
    assert [c.referral_id for c in listed] == [first_referral, second_referral]
    assert (await harness.service.get_conference(None, listed[1].conference_id))[0] == listed[1]
    assert await harness.service.list_conferences(None, str(uuid.uuid4())) == ([], [])
    with pytest.raises(NotFound):
        await harness.service.get_conference(None, str(uuid.uuid4()))


async def test_conclude_a_b_review(harness: Harness) -> None:
    conference = await scheduled(harness)
    harness.clock.now = datetime(2026, 4, 2, 15, 0, tzinfo=UTC)  # Thursday before Easter
    conference = await held(harness, conference)  # met at 14:00 that day
    harness.clock.now = datetime(2026, 4, 7, 9, 0, tzinfo=UTC)  # the outcome written after Easter
    response = await harness.service.conclude_conference(CHAIR, conclude_request(conference))

    done = response.conference
    assert done.status == pb.CONFERENCE_STATUS_CONCLUDED
    assert done.outcome == pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    assert done.version == 6  # scheduled, agencies invited, eligibility, arranged, held, concluded
    assert done.summary == SUMMARY_CANARY
    assert [a.description for a in done.actions] == [ACTION_CANARY, "Safe route plan with school"]
    assert [a.owner_agency for a in done.actions] == [types_pb2.AGENCY_POLICE, types_pb2.AGENCY_EDUCATION]
    assert done.chair == CHAIR.user_id
    assert done.concluded_at.ToDatetime(tzinfo=UTC) == harness.clock.now
    # From the meeting's day (2 April), not the conclusion's: Good Friday and Easter Monday skipped.
    assert done.family_summary_due_on == "2026-04-08"
    assert done.due_on == conference.due_on and done.due_rule == conference.due_rule
    assert (await harness.service.get_conference(None, conference.conference_id))[0] == done
    assert harness.notified == [1, 1, 1, 1]  # the relay woken after each commit with an event

    (payload,) = await outbox(harness, "csx.conferences.conference_concluded")
    concluded = events.ConferenceConcluded.FromString(payload)
    assert concluded.conference_id == conference.conference_id
    assert concluded.child_id == conference.child_id
    assert concluded.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert concluded.outcome == pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    assert concluded.action_count == 2
    assert concluded.concluded_at == done.concluded_at


async def test_conclude_an_initial_cpc_has_no_family_summary_date(harness: Harness) -> None:
    conference = await scheduled(harness, types_pb2.INTERVENTION_A, strategy_discussion_on="2026-03-02")
    request = conclude_request(await held(harness, conference), pb.CONFERENCE_OUTCOME_NO_PLAN)
    del request.actions[:]
    done = (await harness.service.conclude_conference(CHAIR, request)).conference
    assert done.outcome == pb.CONFERENCE_OUTCOME_NO_PLAN
    assert done.family_summary_due_on == ""
    assert list(done.actions) == []


async def test_stale_version_is_aborted_and_writes_nothing(harness: Harness) -> None:
    conference = await held(harness, await scheduled(harness))
    with pytest.raises(Aborted):
        await harness.service.conclude_conference(CHAIR, conclude_request(conference, version=7))
    assert ((await harness.service.get_conference(None, conference.conference_id))[0]).version == 5
    assert await count(harness, tables.conference_actions) == 0
    assert await count(harness, tables.idempotency) == 5  # chair, invitation, eligibility, arrangement, meeting
    assert await outbox(harness, "csx.conferences.conference_concluded") == []


async def test_conclude_twice_with_one_key_answers_the_same(harness: Harness) -> None:
    conference = await held(harness, await scheduled(harness))
    first = await harness.service.conclude_conference(CHAIR, conclude_request(conference))
    harness.clock.now = datetime(2026, 3, 9, 10, 0, tzinfo=UTC)
    second = await harness.service.conclude_conference(CHAIR, conclude_request(conference))
    assert second == first
    assert len(await outbox(harness, "csx.conferences.conference_concluded")) == 1
    assert await count(harness, tables.conference_actions) == 2
    assert harness.notified == [1, 1, 1, 1]  # scheduled, arranged, held, concluded; the replay wrote nothing


async def test_one_key_for_a_different_request_is_refused(harness: Harness) -> None:
    conference = await held(harness, await scheduled(harness))
    await harness.service.conclude_conference(CHAIR, conclude_request(conference))
    other = conclude_request(conference, pb.CONFERENCE_OUTCOME_NO_PLAN)
    with pytest.raises(FailedPrecondition) as err:
        await harness.service.conclude_conference(CHAIR, other)
    assert err.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_concluding_again_with_a_new_key_is_a_failed_precondition(harness: Harness) -> None:
    conference = await held(harness, await scheduled(harness))
    done = (await harness.service.conclude_conference(CHAIR, conclude_request(conference))).conference
    with pytest.raises(FailedPrecondition) as err:
        await harness.service.conclude_conference(CHAIR, conclude_request(done, key="conclude-key-0002"))
    assert err.value.reason == "CONFERENCE_ALREADY_CONCLUDED"


async def test_outcome_must_suit_the_kind(harness: Harness) -> None:
    conference = await held(harness, await scheduled(harness))  # B: a child protection plan is not a B outcome
    with pytest.raises(FailedPrecondition) as err:
        await harness.service.conclude_conference(
            CHAIR, conclude_request(conference, pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN)
        )
    assert err.value.reason == "OUTCOME_NOT_ALLOWED_FOR_KIND"
    assert ((await harness.service.get_conference(None, conference.conference_id))[0]).status == (
        pb.CONFERENCE_STATUS_HELD
    )


async def test_conclude_an_unknown_conference_is_not_found(harness: Harness) -> None:
    ghost = pb.Conference(conference_id=str(uuid.uuid4()), version=1)
    with pytest.raises(NotFound):
        await harness.service.conclude_conference(CHAIR, conclude_request(ghost))


async def test_no_plaintext_summary_or_action_reaches_the_database_file(harness: Harness) -> None:
    conference = await held(harness, await scheduled(harness))
    await harness.service.conclude_conference(CHAIR, conclude_request(conference))
    # Replays and reads go through the idempotency table and the decrypting path as well.
    await harness.service.conclude_conference(CHAIR, conclude_request(conference))
    (await harness.service.list_conferences(None, conference.child_id))[0]

    if harness.db.is_sqlite:
        path = Path(str(harness.db.url.database))
        files = [p for p in (path, Path(f"{path}-wal")) if p.exists()]
        assert files and any(p.stat().st_size for p in files)
        stored = {file.name: file.read_bytes() for file in files}
    else:
        # PostgreSQL: every value of every row of every table, bytes as stored.
        stored = {}
        async with harness.db.session() as s:
            for table in tables.metadata.sorted_tables:
                values = [v for row in (await s.execute(select(table))).all() for v in row]
                stored[table.name] = b"\n".join(
                    v if isinstance(v, bytes) else json.dumps(v, default=str).encode() for v in values
                )
    # Positive control: an operational value stored in clear is found by the same search.
    assert CHAIR.user_id.encode() in b"".join(stored.values())
    for name, raw in stored.items():
        for canary in (SUMMARY_CANARY, ACTION_CANARY):
            assert canary.split()[0].encode() not in raw, f"{canary.split()[0]} in clear in {name}"


async def test_the_referring_agencies_are_invited_and_see_the_conference(harness: Harness) -> None:
    """WT23: the referrer takes part. The agencies whose concerns made the referral are invited,
    see that the conference exists and when; an agency with no basis gets NOT_FOUND."""
    from tests.support import user

    referral_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
    event = routed(referral_id, child_id)
    event.referring_agencies[:] = [1, 3]  # police and education
    await harness.deliver(event)
    (conference,) = (await harness.service.list_conferences(None, child_id))[0]
    assert list(conference.invited_agencies) == [1, 3]

    async def as_agency(agency: str, role: str) -> tuple[object, tuple[str, ...]] | None:
        caller = user(agency, role, "conference_participation", f"{agency}.1")
        try:
            return await harness.service.get_conference(caller, conference.conference_id)
        except NotFound:
            return None

    seen = await as_agency("police", "police_officer")
    assert seen is not None
    shown, _ = seen
    assert shown.due_on == conference.due_on and shown.status == pb.CONFERENCE_STATUS_SCHEDULED  # type: ignore[attr-defined]
    assert await as_agency("health", "health_safeguarding_nurse") is None


async def test_a_break_glass_grant_from_referrals_opens_a_conference_for_its_hour_only(harness: Harness) -> None:
    """The grant reaches this service as an event (its disclosure view), so the emergency read
    works here too, for its user and child only, and ends when the grant expires."""
    from google.protobuf import timestamp_pb2

    from tests.support import user

    referral_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
    await harness.deliver(routed(referral_id, child_id))
    (conference,) = (await harness.service.list_conferences(None, child_id))[0]
    granted, expires = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    granted.FromDatetime(harness.clock.now)
    expires.FromDatetime(harness.clock.now + timedelta(hours=1))
    event = safeguarding_events.BreakGlassGranted(
        grant_id=str(uuid.uuid4()),
        child_id=child_id,
        user_id="nurse.ae",
        agency=2,
        granted_at=granted,
        expires_at=expires,
    )
    views = harness.service._views
    (route,) = [r for r in views.routes() if r.subject == "csx.referrals.break_glass_granted"]
    assert route.handler is not None
    async with harness.units.begin() as uow:
        await route.handler(uow, event)

    async def nurse_reads(user_id: str = "nurse.ae") -> bool:
        who = user("health", "health_safeguarding_nurse", "break_glass", user_id)
        try:
            await harness.service.get_conference(who, conference.conference_id)
            return True
        except NotFound:
            return False

    assert await nurse_reads()
    assert not await nurse_reads("another.nurse")  # the grant is the user's, not the agency's
    harness.clock.now += timedelta(hours=1, seconds=1)
    assert not await nurse_reads()
