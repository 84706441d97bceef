"""A scheduled conference taken to a quorate meeting over gRPC, as social care and its chair do it:
the chair registered (once), the meeting arranged with that chair, and attendance recorded. Used by
the demo journey, the chaos workload and the end-to-end tests, so each concludes a conference the
way the service requires (docs/conferences.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import timestamp_pb2

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import conferences_pb2_grpc
from csx.types.v1 import types_pb2
from csx_common.identity import Principal

# The people (synthetic): the manager who keeps the chair register, and a chair.
MANAGER = Principal("demo.manager", "social_care", "mash_manager", "conference_participation")
CHAIR = Principal("demo.chair", "social_care", "chair", "conference_participation")
TEAM = "demo-assessment-team"

# Social care and two agencies that know the child: quorate (London procedures).
QUORATE = (
    pb.Attendance(agency=types_pb2.AGENCY_SOCIAL_CARE, direct_contact=True),
    pb.Attendance(agency=types_pb2.AGENCY_POLICE, direct_contact=True),
    pb.Attendance(agency=types_pb2.AGENCY_EDUCATION, direct_contact=True),
)

# B's criteria met (synthetic): criminal exploitation, no significant harm at home, aged 14.
ELIGIBLE = pb.Eligibility(extra_familial_harms=[types_pb2.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION], age_years=14)


async def register_chair(
    manager: conferences_pb2_grpc.ConferencesServiceStub, chair_id: str = CHAIR.user_id, *, call_timeout: float = 10
) -> None:
    """The chair in the register, trained; registering it again is answered from the first time."""
    request = pb.RegisterChairRequest(
        idempotency_key=f"register-chair-{chair_id}"[:64],
        chair=pb.Chair(user_id=chair_id, name="Demo Chair", trained_on="2020-10-01"),
    )
    try:
        await manager.RegisterChair(request, timeout=call_timeout)
    except grpc.aio.AioRpcError as exc:
        # Registered before under another key (a database kept from an earlier run): nothing to do.
        if exc.code() != grpc.StatusCode.ABORTED:
            raise


async def hold(
    social_care: conferences_pb2_grpc.ConferencesServiceStub,
    chair: conferences_pb2_grpc.ConferencesServiceStub,
    conference: pb.Conference,
    *,
    key: str,
    chair_id: str = CHAIR.user_id,
    call_timeout: float = 10,
) -> pb.Conference:
    """Invite the agencies of a quorate attendance, record B's eligibility (ELIGIBLE) if a B review
    has none, arrange the meeting (online, started a minute
    ago) with `chair_id` (as `social_care`: a chair never assigns themselves) and record that
    attendance as the chair; the conference, HELD. `key` prefixes the idempotency keys. The
    version is read afresh first, and again if the conference changed meanwhile (ABORTED: the
    overdue sweep may have announced it)."""
    for attempt in range(3):
        current = await social_care.GetConference(
            pb.GetConferenceRequest(conference_id=conference.conference_id), timeout=call_timeout
        )
        try:
            return await _hold(social_care, chair, current.conference, f"{key}-{attempt}", chair_id, call_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED or attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _hold(
    social_care: conferences_pb2_grpc.ConferencesServiceStub,
    chair: conferences_pb2_grpc.ConferencesServiceStub,
    conference: pb.Conference,
    key: str,
    chair_id: str,
    call_timeout: float,
) -> pb.Conference:
    if conference.status == pb.CONFERENCE_STATUS_HELD:
        return conference  # held on an earlier attempt, its answer lost
    invited = {*conference.invited_agencies, *(i.agency for i in conference.invitations)}
    missing = [a.agency for a in QUORATE if a.agency != types_pb2.AGENCY_SOCIAL_CARE and a.agency not in invited]
    if missing:  # only invited agencies attend
        answer = await social_care.InviteParticipants(
            pb.InviteParticipantsRequest(
                conference_id=conference.conference_id,
                idempotency_key=f"{key}-invite"[-64:],
                expected_version=conference.version,
                invitations=[pb.Invitation(role=pb.PARTICIPANT_ROLE_AGENCY, agency=a) for a in missing],
            ),
            timeout=call_timeout,
        )
        conference = answer.conference
    if conference.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW and not conference.HasField("eligibility"):
        recorded = await social_care.RecordEligibility(
            pb.RecordEligibilityRequest(
                conference_id=conference.conference_id,
                idempotency_key=f"{key}-eligibility"[-64:],
                expected_version=conference.version,
                eligibility=ELIGIBLE,
            ),
            timeout=call_timeout,
        )
        conference = recorded.conference
    starts = timestamp_pb2.Timestamp()
    starts.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    version = conference.version
    if not conference.HasField("meeting"):
        arranged = await social_care.ArrangeConference(
            pb.ArrangeConferenceRequest(
                conference_id=conference.conference_id,
                idempotency_key=f"{key}-arrange"[-64:],
                expected_version=version,
                meeting=pb.Meeting(starts_at=starts, online=True),
                chair=chair_id,
                managing_team=TEAM,
            ),
            timeout=call_timeout,
        )
        version = arranged.conference.version
    held: pb.RecordConferenceMeetingResponse = await chair.RecordConferenceMeeting(
        pb.RecordConferenceMeetingRequest(
            conference_id=conference.conference_id,
            idempotency_key=f"{key}-meeting"[-64:],
            expected_version=version,
            attendance=QUORATE,
        ),
        timeout=call_timeout,
    )
    return held.conference
