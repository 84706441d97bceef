"""The conference lifecycle and the chair register (docs/conferences.md), against a real database:
arrange, invite, reports, the meeting (quorate or not), conclusion with views and dissent, the
family summary; rescheduling and cancelling; every refusal the service checks (and that a refusal
writes and publishes nothing); the overdue list; what a partner sees; no sealed text in clear."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import holidays
import pytest
from conferences_support import ELIGIBLE, Harness, at, count, current, key, outbox, refused, routed
from sqlalchemy import select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.types.v1 import types_pb2
from csx_common.errors import Aborted, FailedPrecondition, PermissionDenied
from csx_common.identity import Principal
from csx_conferences import tables

# ------------------------------------------------------------------------------------------ callers

PURPOSE = "conference_participation"
SW = Principal("sw.allocated", "social_care", "social_worker", PURPOSE)
MANAGER = Principal("mash.manager", "social_care", "mash_manager", PURPOSE)
DPO = Principal("dpo.1", "social_care", "data_protection_officer", PURPOSE)
CHAIR = Principal("chair.ind", "social_care", "chair", PURPOSE)
OTHER_CHAIR = Principal("chair.other", "social_care", "chair", PURPOSE)
LEAD_CHAIR = Principal("chair.lead", "social_care", "chair", PURPOSE)
POLICE = Principal("pc.jones", "police", "police_officer", PURPOSE)
EDUCATION = Principal("dsl.smith", "education", "dsl", PURPOSE)
HEALTH = Principal("nurse.khan", "health", "health_safeguarding_nurse", PURPOSE)
HOUSING = Principal("housing.lee", "housing", "practitioner", PURPOSE)

SC_A, POLICE_A, HEALTH_A, EDUCATION_A, HOUSING_A = (
    types_pb2.AGENCY_SOCIAL_CARE,
    types_pb2.AGENCY_POLICE,
    types_pb2.AGENCY_HEALTH,
    types_pb2.AGENCY_EDUCATION,
    types_pb2.AGENCY_HOUSING,
)

# The team managing the children's cases in these tests; chair.ind manages another one.
TEAM = "team.south"

# ------------------------------------------------------------------------------------------ canaries
# Every sealed field gets one; the first word of each must never reach the database in clear.

REPORT_POLICE = "CANARYREPPOLICE-3f9a police report: seen with older males at the Riverside estate"
REPORT_POLICE_2 = "CANARYREPPOLICE2-77d1 police report, revised: two missing episodes"
REPORT_EDUCATION = "CANARYREPEDU-b21c school report: attendance fell to 60 percent"
REPORT_HEALTH = "CANARYREPHEALTH-0c4e health report: two A&E attendances"
DISSENT = "CANARYDISSENT-91aa police dissent: the plan does not address the county line risk"
EDU_VIEW = "CANARYEDUVIEW-5d02 school agrees: safe route plan is workable"
MINUTES = "CANARYMINUTES-e6b7 minutes of the review meeting"
SUMMARY = "CANARYSUMMARY-44f0 reasons: exploitation risk in the community"
FAMILY = "CANARYFAMILY-a3c9 what we agreed with you at the meeting"
VENUE = "CANARYVENUE-12 Acacia Avenue family home"
INVITEE = "CANARYINVITEE-Jane Doe"
RELATION = "CANARYRELATION-mother"
TRUSTED = "CANARYTRUSTED-Coach Sam"
NOTE_RESCHEDULE = "CANARYNOTERESCHED-8e2 the mother is in hospital that week"
NOTE_NO_QUORUM = "CANARYNOTEQUORUM-d51 police and school sent apologies"
NOTE_CANCEL = "CANARYNOTECANCEL-6a0 the family moved to another authority"
ACTION = "CANARYACTION-f01 youth outreach at the bus station"
CHAIR_NAME = "CANARYCHAIRNAME-Alex Morgan"

CANARIES = (
    REPORT_POLICE,
    REPORT_POLICE_2,
    REPORT_EDUCATION,
    REPORT_HEALTH,
    DISSENT,
    EDU_VIEW,
    MINUTES,
    SUMMARY,
    FAMILY,
    VENUE,
    INVITEE,
    RELATION,
    TRUSTED,
    NOTE_RESCHEDULE,
    NOTE_NO_QUORUM,
    NOTE_CANCEL,
    ACTION,
    CHAIR_NAME,
)

# ------------------------------------------------------------------------------------------ times

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # the harness clock's start (Monday)
MEETING_AT = datetime(2026, 3, 12, 10, 0, tzinfo=UTC)  # Thursday, before the B due date (23 March)
AFTER_MEETING = MEETING_AT + timedelta(hours=2)


def working_days_after(day: date, n: int) -> date:
    """Independent of csx_safeguarding.calendar: England's bank holidays from `holidays`."""
    bank = holidays.country_holidays("GB", subdiv="ENG", years=[day.year, day.year + 1])
    while n:
        day += timedelta(days=1)
        if day.weekday() < 5 and day not in bank:
            n -= 1
    return day


# ------------------------------------------------------------------------------------------ database


# ------------------------------------------------------------------------------------------ requests


def meeting(starts: datetime = MEETING_AT, venue: str = VENUE) -> pb.Meeting:
    if venue:
        return pb.Meeting(starts_at=at(starts), venue=venue)
    return pb.Meeting(starts_at=at(starts), online=True)


def arrange_req(
    c: pb.Conference,
    *,
    chair: str = CHAIR.user_id,
    starts: datetime = MEETING_AT,
    team: str = TEAM,
    venue: str = VENUE,
    version: int | None = None,
) -> pb.ArrangeConferenceRequest:
    return pb.ArrangeConferenceRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version if version is None else version,
        meeting=meeting(starts, venue),
        chair=chair,
        managing_team=team,
    )


def reschedule_req(
    c: pb.Conference,
    starts: datetime,
    *,
    reason: int = pb.CHANGE_REASON_FAMILY_UNAVAILABLE,
    note: str = NOTE_RESCHEDULE,
    chair: str = "",
    version: int | None = None,
) -> pb.RescheduleConferenceRequest:
    return pb.RescheduleConferenceRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version if version is None else version,
        meeting=meeting(starts),
        reason=reason,
        note=note,
        chair=chair,
    )


def cancel_req(c: pb.Conference, *, version: int | None = None) -> pb.CancelConferenceRequest:
    return pb.CancelConferenceRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version if version is None else version,
        reason=pb.CHANGE_REASON_NO_LONGER_REQUIRED,
        note=NOTE_CANCEL,
    )


def invite_req(
    c: pb.Conference, invitations: Sequence[pb.Invitation] | None = None, *, version: int | None = None
) -> pb.InviteParticipantsRequest:
    if invitations is None:
        invitations = [pb.Invitation(role=pb.PARTICIPANT_ROLE_AGENCY, agency=HEALTH_A)]
    return pb.InviteParticipantsRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version if version is None else version,
        invitations=list(invitations),
    )


def report_req(c: pb.Conference, text: str = REPORT_POLICE) -> pb.SubmitConferenceReportRequest:
    return pb.SubmitConferenceReportRequest(conference_id=c.conference_id, idempotency_key=key(), text=text)


def came(*agencies: int | tuple[int, bool]) -> list[pb.Attendance]:
    out = []
    for a in agencies:
        agency, direct = a if isinstance(a, tuple) else (a, True)
        out.append(pb.Attendance(agency=agency, direct_contact=direct))
    return out


QUORATE = came(SC_A, POLICE_A, EDUCATION_A)  # only invited agencies attend
NOT_QUORATE = came(SC_A, POLICE_A, (EDUCATION_A, False))


def meeting_req(
    c: pb.Conference,
    attendance: Sequence[pb.Attendance] = QUORATE,
    *,
    note: str = "",
    version: int | None = None,
) -> pb.RecordConferenceMeetingRequest:
    return pb.RecordConferenceMeetingRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version if version is None else version,
        attendance=list(attendance),
        note=note,
    )


VIEWS = [
    pb.ParticipantView(agency=POLICE_A, view=pb.VIEW_DISSENTS, reasons=DISSENT),
    pb.ParticipantView(agency=EDUCATION_A, view=pb.VIEW_AGREES, reasons=EDU_VIEW),
]


def conclude_req(
    c: pb.Conference,
    *,
    outcome: int = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
    views: Sequence[pb.ParticipantView] = VIEWS,
    version: int | None = None,
) -> pb.ConcludeConferenceRequest:
    return pb.ConcludeConferenceRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version if version is None else version,
        outcome=outcome,
        summary=SUMMARY,
        actions=[pb.AgreedAction(owner_agency=POLICE_A, description=ACTION, due_on="2026-04-30")],
        views=list(views),
        minutes=MINUTES,
    )


def summary_req(
    c: pb.Conference, sent_on: str = "2026-03-12", *, version: int | None = None
) -> pb.RecordFamilySummaryRequest:
    return pb.RecordFamilySummaryRequest(
        conference_id=c.conference_id,
        idempotency_key=key(),
        expected_version=c.version if version is None else version,
        text=FAMILY,
        sent_on=sent_on,
    )


# ------------------------------------------------------------------------------------------ set-ups


async def register(
    h: Harness,
    user_id: str,
    *,
    trained_on: str = "2025-01-10",
    manages: Sequence[str] = (),
    lead: tuple[str, str] = ("", ""),
    version: int = 0,
) -> pb.Chair:
    response = await h.service.register_chair(
        MANAGER,
        pb.RegisterChairRequest(
            idempotency_key=key(),
            chair=pb.Chair(
                user_id=user_id,
                name=f"{CHAIR_NAME} {user_id}",
                trained_on=trained_on,
                manages_teams=list(manages),
                lead_from=lead[0],
                lead_until=lead[1],
                version=version,
            ),
        ),
    )
    return response.chair


async def chairs(h: Harness) -> None:
    """chair.ind and chair.other: trained, independent of TEAM; no lead chair."""
    await register(h, CHAIR.user_id, manages=["team.north"])
    await register(h, OTHER_CHAIR.user_id)


async def new_conference(
    h: Harness,
    intervention: int = types_pb2.INTERVENTION_B,
    *,
    agencies: Sequence[int] = (POLICE_A, EDUCATION_A),
    routed_at: datetime = datetime(2026, 3, 2, 9, 0, tzinfo=UTC),
    eligible: bool = True,
) -> pb.Conference:
    """A routed conference; a B review with B's eligibility recorded (ELIGIBLE) unless not `eligible`."""
    referral_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
    strategy = routed_at.date().isoformat() if intervention == types_pb2.INTERVENTION_A else ""
    event = routed(referral_id, child_id, intervention, strategy_discussion_on=strategy, routed_at=routed_at)
    event.referring_agencies[:] = list(agencies)
    await h.deliver(event)
    (conference,) = (await h.service.list_conferences(None, child_id))[0]
    if conference.kind != pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW or not eligible:
        return conference
    request = pb.RecordEligibilityRequest(
        conference_id=conference.conference_id,
        idempotency_key=key(),
        expected_version=conference.version,
        eligibility=ELIGIBLE,
    )
    return (await h.service.record_eligibility(SW, request)).conference


async def arranged(h: Harness, starts: datetime = MEETING_AT, **kw: Any) -> pb.Conference:
    c = await new_conference(h, **kw)
    return (await h.service.arrange_conference(SW, arrange_req(c, starts=starts))).conference


async def held(h: Harness) -> pb.Conference:
    """A B review arranged for MEETING_AT and met with quorum (the clock left after the meeting)."""
    c = await arranged(h)
    h.clock.now = AFTER_MEETING
    response = await h.service.record_conference_meeting(CHAIR, meeting_req(await current(h, c.conference_id)))
    assert response.quorate
    return await current(h, c.conference_id)


# ------------------------------------------------------------------------------------------ the register


async def test_register_and_list_chairs(harness: Harness) -> None:
    first = await register(harness, CHAIR.user_id, manages=["team.north", "team.east"])
    assert first.user_id == CHAIR.user_id
    assert first.version == 1
    lead = await register(harness, LEAD_CHAIR.user_id, lead=("2026-04-01", "2026-04-30"))
    assert (lead.lead_from, lead.lead_until) == ("2026-04-01", "2026-04-30")

    listed = {c.user_id: c for c in await harness.service.list_chairs(MANAGER)}
    assert set(listed) == {CHAIR.user_id, LEAD_CHAIR.user_id}
    assert listed[CHAIR.user_id].name == f"{CHAIR_NAME} {CHAIR.user_id}"
    assert listed[CHAIR.user_id].trained_on == "2025-01-10"
    assert sorted(listed[CHAIR.user_id].manages_teams) == ["team.east", "team.north"]
    assert (listed[CHAIR.user_id].lead_from, listed[CHAIR.user_id].lead_until) == ("", "")

    # A change names the version read.
    changed = await register(harness, CHAIR.user_id, manages=["team.north"], version=1)
    assert changed.version == 2
    assert list(changed.manages_teams) == ["team.north"]

    before = (await harness.service.list_chairs(MANAGER), await count(harness, tables.delivery.outbox))
    with pytest.raises(Aborted):
        await register(harness, CHAIR.user_id, manages=[], version=1)
    assert (await harness.service.list_chairs(MANAGER), await count(harness, tables.delivery.outbox)) == before


@pytest.mark.parametrize("caller", [SW, CHAIR, DPO, POLICE], ids=lambda p: p.role)
async def test_only_social_cares_managers_keep_the_register(harness: Harness, caller: Principal) -> None:
    await register(harness, OTHER_CHAIR.user_id)
    before = (
        await harness.service.list_chairs(MANAGER),
        await count(harness, tables.delivery.outbox),
        await count(harness, tables.idempotency),
    )
    with pytest.raises(PermissionDenied) as err:
        await harness.service.register_chair(
            caller,
            pb.RegisterChairRequest(
                idempotency_key=key(),
                chair=pb.Chair(user_id=caller.user_id, name="Self Appointed", trained_on="2025-01-01"),
            ),
        )
    assert err.value.reason == "SOCIAL_CARE_MANAGER_ONLY"
    after = (
        await harness.service.list_chairs(MANAGER),
        await count(harness, tables.delivery.outbox),
        await count(harness, tables.idempotency),
    )
    assert after == before


# ------------------------------------------------------------------------------------------ the happy path


async def test_a_b_review_from_arrangement_to_the_family_summary(harness: Harness) -> None:
    h = harness
    await chairs(h)
    h.clock.now = datetime(2026, 3, 16, 9, 0, tzinfo=UTC)
    c = await new_conference(h, routed_at=datetime(2026, 3, 16, 8, 0, tzinfo=UTC), eligible=False)
    due_on = c.due_on
    assert c.status == pb.CONFERENCE_STATUS_SCHEDULED and list(c.invited_agencies) == [POLICE_A, EDUCATION_A]
    meeting_at = datetime(2026, 4, 2, 9, 0, tzinfo=UTC)  # Thursday 2 April, 10:00 BST, before Easter

    # Arrange.
    arranged_c = (await h.service.arrange_conference(SW, arrange_req(c, starts=meeting_at))).conference
    assert arranged_c.status == pb.CONFERENCE_STATUS_SCHEDULED
    assert arranged_c.chair == CHAIR.user_id
    assert arranged_c.managing_team == TEAM
    assert arranged_c.meeting.starts_at == at(meeting_at)
    assert arranged_c.meeting.venue == VENUE and not arranged_c.meeting.online
    assert arranged_c.version == c.version + 1
    assert arranged_c.due_on == due_on
    (event,) = await outbox(h, events.ConferenceArranged)
    assert (event.conference_id, event.child_id) == (c.conference_id, c.child_id)
    assert event.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert event.starts_at == at(meeting_at)
    assert event.due_on == due_on
    assert event.reason == pb.CHANGE_REASON_UNSPECIFIED

    # Invite the mother, a trusted adult and health.
    invited = (
        await h.service.invite_participants(
            SW,
            invite_req(
                arranged_c,
                [
                    pb.Invitation(role=pb.PARTICIPANT_ROLE_PARENT_OR_CARER, name=INVITEE, relationship=RELATION),
                    pb.Invitation(role=pb.PARTICIPANT_ROLE_TRUSTED_ADULT, name=TRUSTED, relationship="coach"),
                    pb.Invitation(role=pb.PARTICIPANT_ROLE_AGENCY, agency=HEALTH_A),
                ],
            ),
        )
    ).conference
    assert invited.version == arranged_c.version + 1
    assert [(i.role, i.agency, i.name) for i in invited.invitations] == [
        (pb.PARTICIPANT_ROLE_PARENT_OR_CARER, 0, INVITEE),
        (pb.PARTICIPANT_ROLE_TRUSTED_ADULT, 0, TRUSTED),
        (pb.PARTICIPANT_ROLE_AGENCY, HEALTH_A, ""),
    ]
    assert invited.invitations[0].relationship == RELATION
    assert all(i.invited_at == at(h.clock.now) for i in invited.invitations)

    # Reports, before the meeting: the referring agencies and the invited one; a second replaces the first.
    h.clock.now = datetime(2026, 3, 20, 14, 0, tzinfo=UTC)
    first = await h.service.submit_conference_report(POLICE, report_req(c, REPORT_POLICE))
    assert first.conference_id == c.conference_id and first.submitted_at == at(h.clock.now)
    await h.service.submit_conference_report(EDUCATION, report_req(c, REPORT_EDUCATION))
    h.clock.now = datetime(2026, 3, 23, 14, 0, tzinfo=UTC)
    await h.service.submit_conference_report(HEALTH, report_req(c, REPORT_HEALTH))
    await h.service.submit_conference_report(POLICE, report_req(c, REPORT_POLICE_2))
    reported = await current(h, c.conference_id)
    by_agency = {r.agency: r for r in reported.reports}
    assert len(reported.reports) == 3
    assert {a: r.text for a, r in by_agency.items()} == {
        POLICE_A: REPORT_POLICE_2,
        EDUCATION_A: REPORT_EDUCATION,
        HEALTH_A: REPORT_HEALTH,
    }
    assert by_agency[POLICE_A].submitted_by == POLICE.user_id
    assert by_agency[POLICE_A].submitted_at == at(h.clock.now)

    # B's eligibility, recorded by the social worker.
    reported = (
        await h.service.record_eligibility(
            SW,
            pb.RecordEligibilityRequest(
                conference_id=c.conference_id,
                idempotency_key="eligibility-lifecycle",
                expected_version=reported.version,
                eligibility=ELIGIBLE,
            ),
        )
    ).conference

    # The meeting, quorate: social care, police and education with direct contact (health without).
    h.clock.now = datetime(2026, 4, 2, 13, 0, tzinfo=UTC)
    recorded = await h.service.record_conference_meeting(CHAIR, meeting_req(reported))
    assert recorded.quorate is True
    met = recorded.conference
    assert met.status == pb.CONFERENCE_STATUS_HELD
    assert list(met.attendance) == list(QUORATE)
    assert met.HasField("held_at")
    assert met.version == reported.version + 1
    (meeting_event,) = await outbox(h, events.ConferenceMeetingRecorded)
    assert meeting_event.conference_id == c.conference_id and meeting_event.child_id == c.child_id
    assert meeting_event.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert meeting_event.quorate is True
    assert meeting_event.due_on == due_on
    assert meeting_event.held_at == met.held_at

    # Concluded the following Tuesday (after Good Friday and Easter Monday), with police dissenting.
    h.clock.now = datetime(2026, 4, 7, 11, 0, tzinfo=UTC)
    done = (await h.service.conclude_conference(CHAIR, conclude_req(met))).conference
    assert done.status == pb.CONFERENCE_STATUS_CONCLUDED
    assert done.outcome == pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    assert done.summary == SUMMARY and done.minutes == MINUTES
    assert [(v.agency, v.view, v.reasons) for v in done.views] == [
        (POLICE_A, pb.VIEW_DISSENTS, DISSENT),
        (EDUCATION_A, pb.VIEW_AGREES, EDU_VIEW),
    ]
    assert [a.description for a in done.actions] == [ACTION]
    assert done.chair == CHAIR.user_id
    assert done.concluded_at == at(h.clock.now)
    assert done.due_on == due_on
    # B: 2 London working days after the MEETING's day (Thu 2 April: Good Friday and Easter Monday
    # skipped), not after the day the outcome was written (Tue 7 April).
    meeting_day, concluded_day = date(2026, 4, 2), date(2026, 4, 7)
    expected = working_days_after(meeting_day, 2)
    assert expected == date(2026, 4, 8)
    assert working_days_after(concluded_day, 2) != expected
    assert done.family_summary_due_on == expected.isoformat()
    (concluded_event,) = await outbox(h, events.ConferenceConcluded)
    assert concluded_event.conference_id == c.conference_id
    assert concluded_event.outcome == pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    assert concluded_event.action_count == 1
    assert concluded_event.concluded_at == done.concluded_at

    # The family summary, recorded by social care.
    h.clock.now = datetime(2026, 4, 8, 9, 0, tzinfo=UTC)
    final = (await h.service.record_family_summary(SW, summary_req(done, "2026-04-08"))).conference
    assert final.family_summary == FAMILY
    assert final.family_summary_sent_on == "2026-04-08"
    assert final.status == pb.CONFERENCE_STATUS_CONCLUDED
    assert final.version == done.version + 1
    assert await current(h, c.conference_id) == final

    # One event of each, nothing else published for this conference's lifecycle.
    assert len(await outbox(h, events.ConferenceArranged)) == 1
    assert len(await outbox(h, events.ConferenceMeetingRecorded)) == 1
    assert await outbox(h, events.ConferenceCancelled) == []


async def test_an_initial_cpc_may_be_online_and_has_no_family_summary_date(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await new_conference(h, types_pb2.INTERVENTION_A)
    a = (await h.service.arrange_conference(SW, arrange_req(c, venue=""))).conference
    assert a.meeting.online and a.meeting.venue == ""
    h.clock.now = AFTER_MEETING
    met = (await h.service.record_conference_meeting(CHAIR, meeting_req(a))).conference
    done = (
        await h.service.conclude_conference(
            CHAIR, conclude_req(met, outcome=pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN)
        )
    ).conference
    assert done.outcome == pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN
    assert done.family_summary_due_on == ""


# ------------------------------------------------------------------------------------------ no quorum


async def test_a_meeting_without_quorum_is_recorded_and_arranged_again(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)
    h.clock.now = AFTER_MEETING
    response = await h.service.record_conference_meeting(
        CHAIR, meeting_req(await current(h, c.conference_id), NOT_QUORATE, note=NOTE_NO_QUORUM)
    )
    assert response.quorate is False
    after = response.conference
    assert after.status == pb.CONFERENCE_STATUS_SCHEDULED
    assert not after.HasField("meeting")  # cleared: arrange it again
    assert after.due_on == c.due_on
    assert after.version == c.version + 1
    change = after.changes[-1]
    assert change.reason == pb.CHANGE_REASON_NO_QUORUM
    assert change.note == NOTE_NO_QUORUM
    assert change.previous_starts_at == at(MEETING_AT)
    assert change.changed_by == CHAIR.user_id
    assert change.changed_at == at(h.clock.now)
    (event,) = await outbox(h, events.ConferenceMeetingRecorded)
    assert event.quorate is False and event.conference_id == c.conference_id and event.due_on == c.due_on

    # Arranged again (not ALREADY_ARRANGED), then met with quorum.
    second_at = datetime(2026, 3, 19, 10, 0, tzinfo=UTC)
    again = (await h.service.arrange_conference(SW, arrange_req(after, starts=second_at))).conference
    assert again.meeting.starts_at == at(second_at)
    assert again.status == pb.CONFERENCE_STATUS_SCHEDULED
    assert len(await outbox(h, events.ConferenceArranged)) == 2
    h.clock.now = second_at + timedelta(hours=1)
    quorate = await h.service.record_conference_meeting(CHAIR, meeting_req(again))
    assert quorate.quorate is True
    assert quorate.conference.status == pb.CONFERENCE_STATUS_HELD
    assert [e.quorate for e in await outbox(h, events.ConferenceMeetingRecorded)] == [False, True]
    assert quorate.conference.due_on == c.due_on


# ------------------------------------------------------------------------------------------ reschedule, cancel


async def test_reschedule_keeps_the_due_date_and_records_the_change(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)
    h.clock.now = datetime(2026, 3, 5, 16, 0, tzinfo=UTC)
    new_at = datetime(2026, 3, 19, 13, 30, tzinfo=UTC)
    moved = (await h.service.reschedule_conference(SW, reschedule_req(c, new_at))).conference
    assert moved.status == pb.CONFERENCE_STATUS_SCHEDULED
    assert moved.meeting.starts_at == at(new_at)
    assert moved.due_on == c.due_on and moved.due_rule == c.due_rule
    assert moved.chair == CHAIR.user_id  # empty chair keeps the assigned one
    assert moved.version == c.version + 1
    (change,) = moved.changes
    assert change.reason == pb.CHANGE_REASON_FAMILY_UNAVAILABLE
    assert change.note == NOTE_RESCHEDULE
    assert change.previous_starts_at == at(MEETING_AT)
    assert change.changed_by == SW.user_id
    assert change.changed_at == at(h.clock.now)
    first, second = await outbox(h, events.ConferenceArranged)
    assert first.reason == pb.CHANGE_REASON_UNSPECIFIED
    assert second.reason == pb.CHANGE_REASON_FAMILY_UNAVAILABLE
    assert second.starts_at == at(new_at)
    assert second.due_on == c.due_on

    # A new chair when the assigned one cannot come; checked against the register like arranging.
    third_at = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "CHAIR_NOT_REGISTERED",
        lambda: h.service.reschedule_conference(
            SW, reschedule_req(moved, third_at, reason=pb.CHANGE_REASON_CHAIR_UNAVAILABLE, chair="chair.nobody")
        ),
    )
    rechaired = (
        await h.service.reschedule_conference(
            SW,
            reschedule_req(moved, third_at, reason=pb.CHANGE_REASON_CHAIR_UNAVAILABLE, chair=OTHER_CHAIR.user_id),
        )
    ).conference
    assert rechaired.chair == OTHER_CHAIR.user_id
    assert [ch.reason for ch in rechaired.changes] == [
        pb.CHANGE_REASON_FAMILY_UNAVAILABLE,
        pb.CHANGE_REASON_CHAIR_UNAVAILABLE,
    ]
    assert rechaired.changes[1].previous_starts_at == at(new_at)
    assert rechaired.due_on == c.due_on
    # The old chair is no longer the assigned one.
    h.clock.now = third_at + timedelta(hours=1)
    await refused(
        h,
        c.conference_id,
        PermissionDenied,
        "NOT_ASSIGNED_CHAIR",
        lambda: h.service.record_conference_meeting(CHAIR, meeting_req(rechaired)),
    )
    assert (await h.service.record_conference_meeting(OTHER_CHAIR, meeting_req(rechaired))).quorate


async def test_cancel_keeps_the_due_date_and_says_why(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)
    h.clock.now = datetime(2026, 3, 6, 9, 0, tzinfo=UTC)
    cancelled = (await h.service.cancel_conference(SW, cancel_req(c))).conference
    assert cancelled.status == pb.CONFERENCE_STATUS_CANCELLED
    assert cancelled.due_on == c.due_on
    assert cancelled.version == c.version + 1
    change = cancelled.changes[-1]
    assert change.reason == pb.CHANGE_REASON_NO_LONGER_REQUIRED
    assert change.note == NOTE_CANCEL
    assert change.changed_by == SW.user_id
    assert change.changed_at == at(h.clock.now)
    assert change.previous_starts_at == at(MEETING_AT)
    (event,) = await outbox(h, events.ConferenceCancelled)
    assert (event.conference_id, event.child_id) == (c.conference_id, c.child_id)
    assert event.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert event.reason == pb.CHANGE_REASON_NO_LONGER_REQUIRED
    assert event.cancelled_at == at(h.clock.now)
    assert await current(h, c.conference_id) == cancelled


async def test_a_conference_never_arranged_can_be_cancelled(harness: Harness) -> None:
    c = await new_conference(harness)
    cancelled = (await harness.service.cancel_conference(SW, cancel_req(c))).conference
    assert cancelled.status == pb.CONFERENCE_STATUS_CANCELLED
    assert not cancelled.changes[-1].HasField("previous_starts_at")


# ------------------------------------------------------------------------------------------ who may


SOCIAL_CARE_COMMANDS: dict[str, Callable[[Harness, Principal, pb.Conference], Awaitable[object]]] = {
    "arrange": lambda h, who, c: h.service.arrange_conference(who, arrange_req(c)),
    "reschedule": lambda h, who, c: h.service.reschedule_conference(
        who, reschedule_req(c, datetime(2026, 3, 19, 10, 0, tzinfo=UTC))
    ),
    "cancel": lambda h, who, c: h.service.cancel_conference(who, cancel_req(c)),
    "invite": lambda h, who, c: h.service.invite_participants(who, invite_req(c)),
    "family_summary": lambda h, who, c: h.service.record_family_summary(who, summary_req(c)),
}


@pytest.mark.parametrize("command", sorted(SOCIAL_CARE_COMMANDS))
@pytest.mark.parametrize("caller", [POLICE, HEALTH, DPO], ids=lambda p: f"{p.agency}-{p.role}")
async def test_only_social_care_arranges_reschedules_cancels_invites_and_sends_the_summary(
    harness: Harness, command: str, caller: Principal
) -> None:
    await chairs(harness)
    c = await arranged(harness)
    await refused(
        harness,
        c.conference_id,
        PermissionDenied,
        "SOCIAL_CARE_ONLY",
        lambda: SOCIAL_CARE_COMMANDS[command](harness, caller, c),
    )


@pytest.mark.parametrize("caller", [SW, MANAGER, CHAIR], ids=lambda p: p.role)
async def test_each_social_care_role_may_invite(harness: Harness, caller: Principal) -> None:
    c = await new_conference(harness)
    done = (await harness.service.invite_participants(caller, invite_req(c))).conference
    assert [i.agency for i in done.invitations] == [HEALTH_A]


@pytest.mark.parametrize("caller", [SW, MANAGER, POLICE], ids=lambda p: p.role)
async def test_only_a_chair_records_a_meeting_or_concludes(harness: Harness, caller: Principal) -> None:
    h = harness
    await chairs(h)
    started = await arranged(h)
    h.clock.now = AFTER_MEETING
    await refused(
        h,
        started.conference_id,
        PermissionDenied,
        "CHAIR_ONLY",
        lambda: h.service.record_conference_meeting(caller, meeting_req(started)),
    )
    met = (await h.service.record_conference_meeting(CHAIR, meeting_req(started))).conference
    await refused(
        h,
        met.conference_id,
        PermissionDenied,
        "CHAIR_ONLY",
        lambda: h.service.conclude_conference(caller, conclude_req(met)),
    )


async def test_only_the_assigned_chair_records_the_meeting_and_concludes(harness: Harness) -> None:
    h = harness
    await chairs(h)
    started = await arranged(h)
    h.clock.now = AFTER_MEETING
    await refused(
        h,
        started.conference_id,
        PermissionDenied,
        "NOT_ASSIGNED_CHAIR",
        lambda: h.service.record_conference_meeting(OTHER_CHAIR, meeting_req(started)),
    )
    met = (await h.service.record_conference_meeting(CHAIR, meeting_req(started))).conference
    await refused(
        h,
        met.conference_id,
        PermissionDenied,
        "NOT_ASSIGNED_CHAIR",
        lambda: h.service.conclude_conference(OTHER_CHAIR, conclude_req(met)),
    )
    done = (await h.service.conclude_conference(CHAIR, conclude_req(met))).conference
    assert done.status == pb.CONFERENCE_STATUS_CONCLUDED


async def test_a_report_comes_from_an_invited_agency(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)  # police and education referred
    for outsider in (HEALTH, HOUSING):
        await refused(
            h,
            c.conference_id,
            PermissionDenied,
            "NOT_INVITED",
            lambda outsider=outsider: h.service.submit_conference_report(outsider, report_req(c, REPORT_HEALTH)),
        )
    # Invited with InviteParticipants (role AGENCY): now it may report.
    await h.service.invite_participants(SW, invite_req(await current(h, c.conference_id)))
    await h.service.submit_conference_report(HEALTH, report_req(c, REPORT_HEALTH))
    assert [r.agency for r in (await current(h, c.conference_id)).reports] == [HEALTH_A]
    # Inviting health invites health only: housing is still refused.
    await refused(
        h,
        c.conference_id,
        PermissionDenied,
        "NOT_INVITED",
        lambda: h.service.submit_conference_report(HOUSING, report_req(c, REPORT_HEALTH)),
    )


async def test_a_report_comes_from_a_practitioner(harness: Harness) -> None:
    """docs/conferences.md: a report comes from a practitioner (PRACTITIONER_ONLY, whatever the
    agency) of an invited agency (NOT_INVITED)."""
    h = harness
    await chairs(h)
    c = await arranged(h, agencies=(EDUCATION_A,))  # police not invited
    panel_member = Principal("police.panel", "police", "panel_member", PURPOSE)
    await refused(
        h,
        c.conference_id,
        PermissionDenied,
        "PRACTITIONER_ONLY",
        lambda: h.service.submit_conference_report(panel_member, report_req(c, REPORT_POLICE)),
    )


# ------------------------------------------------------------------------------------------ the chair rules


async def test_the_chair_rules_are_checked_when_arranging(harness: Harness) -> None:
    h = harness
    await chairs(h)
    await register(h, "chair.untrained", trained_on="")
    await register(h, "chair.latetraining", trained_on="2026-03-13")  # the day after the meeting
    await register(h, "chair.manager", manages=["team.north", TEAM])
    c = await new_conference(h)
    for chair, reason in [
        ("chair.nobody", "CHAIR_NOT_REGISTERED"),
        ("chair.untrained", "CHAIR_NOT_TRAINED"),
        ("chair.latetraining", "CHAIR_NOT_TRAINED"),
        ("chair.manager", "CHAIR_NOT_INDEPENDENT"),
    ]:
        await refused(
            h,
            c.conference_id,
            FailedPrecondition,
            reason,
            lambda chair=chair: h.service.arrange_conference(SW, arrange_req(c, chair=chair)),
        )
    # The late-trained chair may chair a meeting on the day of the training or after it.
    ok = await h.service.arrange_conference(
        SW, arrange_req(c, chair="chair.latetraining", starts=datetime(2026, 3, 13, 10, 0, tzinfo=UTC))
    )
    assert ok.conference.chair == "chair.latetraining"
    # The manager chairs cases of teams it does not manage.
    other = await new_conference(harness)
    assert (
        await h.service.arrange_conference(SW, arrange_req(other, chair="chair.manager", team="team.west"))
    ).conference.chair == "chair.manager"


async def test_training_counts_on_the_london_day_of_the_meeting(harness: Harness) -> None:
    h = harness
    await register(h, "chair.april", trained_on="2026-04-01")
    c = await new_conference(h)
    # 23:30 UTC on 31 March is 00:30 BST on 1 April: the day of the training.
    late = datetime(2026, 3, 31, 23, 30, tzinfo=UTC)
    done = await h.service.arrange_conference(SW, arrange_req(c, chair="chair.april", starts=late))
    assert done.conference.chair == "chair.april"
    other = await new_conference(h)
    await refused(
        h,
        other.conference_id,
        FailedPrecondition,
        "CHAIR_NOT_TRAINED",
        lambda: h.service.arrange_conference(
            SW, arrange_req(other, chair="chair.april", starts=datetime(2026, 3, 31, 22, 30, tzinfo=UTC))
        ),
    )


async def test_a_b_meeting_in_a_lead_period_is_chaired_by_the_lead_chair(harness: Harness) -> None:
    h = harness
    await chairs(h)
    await register(h, LEAD_CHAIR.user_id, lead=("2026-03-09", "2026-03-13"))
    b = await new_conference(h)
    for starts in (
        datetime(2026, 3, 9, 10, 0, tzinfo=UTC),  # the period's first day
        MEETING_AT,  # inside
        datetime(2026, 3, 13, 16, 0, tzinfo=UTC),  # its last day
    ):
        await refused(
            h,
            b.conference_id,
            FailedPrecondition,
            "LEAD_CHAIR_REQUIRED",
            lambda starts=starts: h.service.arrange_conference(SW, arrange_req(b, starts=starts)),
        )
    by_lead = await h.service.arrange_conference(SW, arrange_req(b, chair=LEAD_CHAIR.user_id))
    assert by_lead.conference.chair == LEAD_CHAIR.user_id

    # Outside the period any registered chair may chair a B review.
    after = await new_conference(h)
    done = await h.service.arrange_conference(SW, arrange_req(after, starts=datetime(2026, 3, 16, 10, 0, tzinfo=UTC)))
    assert done.conference.chair == CHAIR.user_id
    # A (an initial child protection conference) has no lead chair rule.
    a = await new_conference(h, types_pb2.INTERVENTION_A)
    assert (await h.service.arrange_conference(SW, arrange_req(a))).conference.chair == CHAIR.user_id
    # Rescheduling into the period with another chair is refused as well.
    await refused(
        h,
        after.conference_id,
        FailedPrecondition,
        "LEAD_CHAIR_REQUIRED",
        lambda: h.service.reschedule_conference(
            SW, reschedule_req(done.conference, MEETING_AT, reason=pb.CHANGE_REASON_CHAIR_UNAVAILABLE)
        ),
    )


# ------------------------------------------------------------------------------------------ state refusals


async def test_arrange_once_and_reschedule_only_an_arranged_meeting(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await new_conference(h)
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "NOT_ARRANGED",
        lambda: h.service.reschedule_conference(SW, reschedule_req(c, MEETING_AT)),
    )
    a = (await h.service.arrange_conference(SW, arrange_req(c))).conference
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "ALREADY_ARRANGED",
        lambda: h.service.arrange_conference(SW, arrange_req(a, starts=datetime(2026, 3, 19, 10, 0, tzinfo=UTC))),
    )


async def test_only_a_scheduled_conference_changes(harness: Harness) -> None:
    h = harness
    await chairs(h)
    never_arranged = await new_conference(h)
    never_arranged = (await h.service.cancel_conference(SW, cancel_req(never_arranged))).conference
    await refused(
        h,
        never_arranged.conference_id,
        FailedPrecondition,
        "CONFERENCE_NOT_SCHEDULED",
        lambda: h.service.arrange_conference(SW, arrange_req(never_arranged)),
    )

    c = await arranged(h)
    c = (await h.service.cancel_conference(SW, cancel_req(c))).conference
    cid = c.conference_id
    for call in (
        lambda: h.service.reschedule_conference(SW, reschedule_req(c, datetime(2026, 3, 19, 10, 0, tzinfo=UTC))),
        lambda: h.service.cancel_conference(SW, cancel_req(c)),
        lambda: h.service.invite_participants(SW, invite_req(c)),
        lambda: h.service.submit_conference_report(POLICE, report_req(c)),
    ):
        await refused(h, cid, FailedPrecondition, "CONFERENCE_NOT_SCHEDULED", call)
    h.clock.now = AFTER_MEETING
    await refused(
        h,
        cid,
        FailedPrecondition,
        "CONFERENCE_NOT_SCHEDULED",
        lambda: h.service.record_conference_meeting(CHAIR, meeting_req(c)),
    )

    h.clock.now = T0
    met = await held(h)
    for call in (
        lambda: h.service.invite_participants(SW, invite_req(met)),
        lambda: h.service.record_conference_meeting(CHAIR, meeting_req(met)),
    ):
        await refused(h, met.conference_id, FailedPrecondition, "CONFERENCE_NOT_SCHEDULED", call)


async def test_a_report_after_the_meeting_starts_is_refused(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)
    h.clock.now = MEETING_AT - timedelta(minutes=1)
    await h.service.submit_conference_report(POLICE, report_req(c, REPORT_POLICE))
    h.clock.now = MEETING_AT + timedelta(minutes=1)
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "MEETING_STARTED",
        lambda: h.service.submit_conference_report(EDUCATION, report_req(c, REPORT_EDUCATION)),
    )
    # Nor may an earlier report be replaced once the meeting has started.
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "MEETING_STARTED",
        lambda: h.service.submit_conference_report(POLICE, report_req(c, REPORT_POLICE_2)),
    )
    assert [(r.agency, r.text) for r in (await current(h, c.conference_id)).reports] == [(POLICE_A, REPORT_POLICE)]


async def test_a_meeting_is_recorded_once_it_has_started(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)
    h.clock.now = MEETING_AT - timedelta(minutes=5)
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "MEETING_NOT_STARTED",
        lambda: h.service.record_conference_meeting(CHAIR, meeting_req(c)),
    )


async def test_a_meeting_without_quorum_says_why(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)
    h.clock.now = AFTER_MEETING
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "NOTE_REQUIRED",
        lambda: h.service.record_conference_meeting(CHAIR, meeting_req(c, NOT_QUORATE)),
    )
    # Social care absent: not quorate either, whoever else came.
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "NOTE_REQUIRED",
        lambda: h.service.record_conference_meeting(CHAIR, meeting_req(c, came(POLICE_A, EDUCATION_A))),
    )


async def test_conclude_only_a_held_conference_and_the_summary_after_it(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)
    h.clock.now = AFTER_MEETING
    await refused(
        h,
        c.conference_id,
        FailedPrecondition,
        "CONFERENCE_NOT_HELD",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(c)),
    )
    met = (await h.service.record_conference_meeting(CHAIR, meeting_req(c))).conference
    cid = met.conference_id
    # Housing did not attend.
    absent = [*VIEWS, pb.ParticipantView(agency=HOUSING_A, view=pb.VIEW_AGREES)]
    await refused(
        h,
        cid,
        FailedPrecondition,
        "VIEW_FROM_ABSENT_AGENCY",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(met, views=absent)),
    )
    await refused(
        h,
        cid,
        FailedPrecondition,
        "OUTCOME_NOT_ALLOWED_FOR_KIND",
        lambda: h.service.conclude_conference(
            CHAIR, conclude_req(met, outcome=pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN)
        ),
    )
    await refused(
        h,
        cid,
        FailedPrecondition,
        "CONFERENCE_NOT_CONCLUDED",
        lambda: h.service.record_family_summary(SW, summary_req(met)),
    )
    twice = [*VIEWS, pb.ParticipantView(agency=POLICE_A, view=pb.VIEW_AGREES)]
    await refused(
        h,
        cid,
        FailedPrecondition,
        "DUPLICATE_VIEW",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(met, views=twice)),
    )
    done = (await h.service.conclude_conference(CHAIR, conclude_req(met))).conference
    assert done.status == pb.CONFERENCE_STATUS_CONCLUDED
    await refused(
        h,
        cid,
        FailedPrecondition,
        "CONFERENCE_ALREADY_CONCLUDED",
        lambda: h.service.conclude_conference(CHAIR, conclude_req(done)),
    )


STALE: dict[str, Callable[[Harness, pb.Conference], Awaitable[object]]] = {
    "arrange": lambda h, c: h.service.arrange_conference(SW, arrange_req(c, version=c.version + 5)),
    "invite": lambda h, c: h.service.invite_participants(SW, invite_req(c, version=c.version + 3)),
    "cancel": lambda h, c: h.service.cancel_conference(SW, cancel_req(c, version=c.version + 1)),
}


@pytest.mark.parametrize("command", sorted(STALE))
async def test_a_stale_version_is_aborted(harness: Harness, command: str) -> None:
    c = await new_conference(harness)
    await chairs(harness)
    await refused(harness, c.conference_id, Aborted, None, lambda: STALE[command](harness, c))


async def test_a_stale_version_is_aborted_along_the_lifecycle(harness: Harness) -> None:
    h = harness
    await chairs(h)
    c = await arranged(h)
    cid = c.conference_id
    await refused(
        h,
        cid,
        Aborted,
        None,
        lambda: h.service.reschedule_conference(
            SW, reschedule_req(c, datetime(2026, 3, 19, 10, 0, tzinfo=UTC), version=c.version - 1)
        ),
    )
    h.clock.now = AFTER_MEETING
    await refused(h, cid, Aborted, None, lambda: h.service.record_conference_meeting(CHAIR, meeting_req(c, version=99)))
    met = (await h.service.record_conference_meeting(CHAIR, meeting_req(c))).conference
    await refused(h, cid, Aborted, None, lambda: h.service.conclude_conference(CHAIR, conclude_req(met, version=1)))
    done = (await h.service.conclude_conference(CHAIR, conclude_req(met))).conference
    await refused(h, cid, Aborted, None, lambda: h.service.record_family_summary(SW, summary_req(done, version=1)))


# ------------------------------------------------------------------------------------------ overdue


async def test_the_overdue_list_is_the_scheduled_ones_past_due_oldest_first(harness: Harness) -> None:
    h = harness
    await chairs(h)
    # Created out of due order, so the list's order is its own.
    later = await new_conference(h, routed_at=datetime(2026, 3, 9, 9, 0, tzinfo=UTC))  # due Mon 30 March
    oldest = await new_conference(h)  # due Mon 23 March
    assert (oldest.due_on, later.due_on) == ("2026-03-23", "2026-03-30")
    arranged_late = (await h.service.arrange_conference(SW, arrange_req(oldest))).conference  # never met
    cancelled = await new_conference(h)
    await h.service.cancel_conference(SW, cancel_req(cancelled))
    met = await held(h)  # due 23 March, held: not overdue
    assert met.status == pb.CONFERENCE_STATUS_HELD
    not_yet = await new_conference(h, routed_at=datetime(2026, 3, 27, 9, 0, tzinfo=UTC))  # due in April
    assert not_yet.due_on > "2026-03-31"

    async def overdue() -> list[str]:
        conferences, _redacted = await h.service.list_overdue_conferences(SW)
        return [c.conference_id for c in conferences]

    h.clock.now = datetime(2026, 3, 23, 18, 0, tzinfo=UTC)  # the due day itself: not yet overdue
    assert await overdue() == []
    h.clock.now = datetime(2026, 3, 30, 12, 0, tzinfo=UTC)
    assert await overdue() == [arranged_late.conference_id]
    # 23:30 UTC on 30 March is 31 March in London (BST).
    h.clock.now = datetime(2026, 3, 30, 23, 30, tzinfo=UTC)
    assert await overdue() == [arranged_late.conference_id, later.conference_id]
    conferences, _ = await h.service.list_overdue_conferences(SW)
    assert [c.due_on for c in conferences] == ["2026-03-23", "2026-03-30"]
    assert all(c.status == pb.CONFERENCE_STATUS_SCHEDULED for c in conferences)


# ------------------------------------------------------------------------------------------ partners' view


async def concluded(h: Harness) -> pb.Conference:
    """A B review referred by police and education, health invited, every sealed field filled:
    reports, a dissent, minutes, the family summary."""
    await chairs(h)
    c = await new_conference(h)
    c = (await h.service.arrange_conference(SW, arrange_req(c))).conference
    await h.service.invite_participants(
        SW,
        invite_req(
            c,
            [
                pb.Invitation(role=pb.PARTICIPANT_ROLE_AGENCY, agency=HEALTH_A),
                pb.Invitation(role=pb.PARTICIPANT_ROLE_PARENT_OR_CARER, name=INVITEE, relationship=RELATION),
            ],
        ),
    )
    await h.service.submit_conference_report(POLICE, report_req(c, REPORT_POLICE))
    await h.service.submit_conference_report(EDUCATION, report_req(c, REPORT_EDUCATION))
    await h.service.submit_conference_report(HEALTH, report_req(c, REPORT_HEALTH))
    h.clock.now = AFTER_MEETING
    met = (await h.service.record_conference_meeting(CHAIR, meeting_req(await current(h, c.conference_id)))).conference
    done = (await h.service.conclude_conference(CHAIR, conclude_req(met))).conference
    return (await h.service.record_family_summary(SW, summary_req(done))).conference


def index_of(items: Sequence[Any], agency: int) -> int:
    (i,) = [i for i, item in enumerate(items) if item.agency == agency]
    return i


async def test_an_invited_agency_sees_its_own_report_and_dissent_and_nothing_of_the_others(
    harness: Harness,
) -> None:
    h = harness
    full = await concluded(h)
    assert {r.agency for r in full.reports} == {POLICE_A, EDUCATION_A, HEALTH_A}

    shown, redacted = await h.service.get_conference(POLICE, full.conference_id)
    redacted = list(redacted)
    # The operational fields.
    assert shown.status == pb.CONFERENCE_STATUS_CONCLUDED
    assert shown.outcome == full.outcome and shown.due_on == full.due_on
    assert list(shown.attendance) == list(full.attendance)
    # Its own report and its own dissent.
    own_report = index_of(shown.reports, POLICE_A)
    assert shown.reports[own_report].text == REPORT_POLICE
    assert f"reports[{own_report}].text" not in redacted
    own_view = index_of(shown.views, POLICE_A)
    assert shown.views[own_view].view == pb.VIEW_DISSENTS
    assert shown.views[own_view].reasons == DISSENT
    assert f"views[{own_view}].reasons" not in redacted
    # Not another agency's report or view.
    for agency in (EDUCATION_A, HEALTH_A):
        i = index_of(shown.reports, agency)
        assert shown.reports[i].text == "", f"{types_pb2.Agency.Name(agency)}'s report shown to police"
        assert f"reports[{i}].text" in redacted
    edu_view = index_of(shown.views, EDUCATION_A)
    assert shown.views[edu_view].reasons == ""
    assert f"views[{edu_view}].reasons" in redacted
    # Nor whether another agency dissented, nor who in it wrote its report.
    assert shown.views[edu_view].view == pb.VIEW_UNSPECIFIED and f"views[{edu_view}].view" in redacted
    edu_report = index_of(shown.reports, EDUCATION_A)
    assert shown.reports[edu_report].submitted_by == "" and f"reports[{edu_report}].submitted_by" in redacted
    # Not the minutes, the outcome's reasons, the family summary or the venue.
    assert shown.minutes == "" and "minutes" in redacted
    assert shown.summary == "" and "summary" in redacted
    assert shown.family_summary == "" and "family_summary" in redacted
    assert shown.meeting.venue == "" and "meeting.venue" in redacted
    for canary in (REPORT_EDUCATION, REPORT_HEALTH, EDU_VIEW, MINUTES, SUMMARY, FAMILY, VENUE):
        assert canary not in str(shown)

    # Health, invited with InviteParticipants, attends as well: its own report, not police's.
    seen, health_redacted = await h.service.get_conference(HEALTH, full.conference_id)
    assert seen.reports[index_of(seen.reports, HEALTH_A)].text == REPORT_HEALTH
    police_report = index_of(seen.reports, POLICE_A)
    assert seen.reports[police_report].text == ""
    assert f"reports[{police_report}].text" in health_redacted
    police_view = index_of(seen.views, POLICE_A)
    assert seen.views[police_view].reasons == ""
    assert seen.family_summary == "" and "family_summary" in health_redacted

    # Social care sees the whole record.
    whole, sw_redacted = await h.service.get_conference(SW, full.conference_id)
    assert whole.family_summary == FAMILY and whole.minutes == MINUTES
    assert {r.text for r in whole.reports} == {REPORT_POLICE, REPORT_EDUCATION, REPORT_HEALTH}
    assert "family_summary" not in sw_redacted


# ------------------------------------------------------------------------------------------ sealing


async def test_no_sealed_text_reaches_the_database_in_clear(harness: Harness) -> None:
    h = harness
    await concluded(h)
    h.clock.now = T0
    # The notes: a reschedule, a meeting without quorum, a cancellation; a trusted adult invited.
    c = await arranged(h)
    await h.service.invite_participants(
        SW,
        invite_req(c, [pb.Invitation(role=pb.PARTICIPANT_ROLE_TRUSTED_ADULT, name=TRUSTED, relationship="coach")]),
    )
    c = await current(h, c.conference_id)
    c = (await h.service.reschedule_conference(SW, reschedule_req(c, MEETING_AT + timedelta(hours=1)))).conference
    h.clock.now = MEETING_AT + timedelta(hours=3)
    c = (await h.service.record_conference_meeting(CHAIR, meeting_req(c, NOT_QUORATE, note=NOTE_NO_QUORUM))).conference
    await h.service.cancel_conference(SW, cancel_req(c))
    # Reads go through the decrypting path too.
    await h.service.list_chairs(MANAGER)
    await h.service.get_conference(POLICE, c.conference_id)

    if h.db.is_sqlite:
        path = Path(str(h.db.url.database))
        files = [p for p in (path, Path(f"{path}-wal")) if p.exists()]
        assert files and any(p.stat().st_size for p in files)
        stored = {file.name: file.read_bytes() for file in files}
    else:
        stored = {}
        async with h.db.session() as s:
            for table in tables.metadata.sorted_tables:
                values = [v for row in (await s.execute(select(table))).all() for v in row]
                stored[table.name] = b"\n".join(
                    v if isinstance(v, bytes) else json.dumps(v, default=str).encode() for v in values
                )
    everything = b"".join(stored.values())
    # Positive controls: operational values stored in clear are found by the same search.
    assert CHAIR.user_id.encode() in everything
    assert TEAM.encode() in everything
    for name, raw in stored.items():
        for canary in CANARIES:
            token = canary.split()[0].encode()
            assert token not in raw, f"{token.decode()} in clear in {name}"
