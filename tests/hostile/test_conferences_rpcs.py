"""Every conferences RPC under hostile input (see test_referrals_rpcs.py for what is generated)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import conferences_pb2_grpc
from csx.referrals.v1 import events_pb2 as referral_events
from csx.types.v1 import types_pb2 as t
from csx_cli import conference_flow
from tests.hostile.conftest import Running, Starter
from tests.hostile.support import (
    CANARIES,
    Rpc,
    attack_with_bytes,
    attack_with_mutations,
    consumer_for,
    deliver,
    hostile_settings,
    service_methods,
)
from tests.support import user

SERVICE = "/csx.conferences.v1.ConferencesService/"
CHAIR = user("social_care", "chair", "conference_participation", "chair.hostile")
MANAGER = user("social_care", "mash_manager", "conference_participation", "manager.hostile")
POLICE = user("police", "police_officer", "conference_participation", "pc.hostile")
OTHERS = [
    CHAIR,
    MANAGER,
    user("police", "police_officer", "conference_participation", "pc.hostile"),
    user("education", "dsl", "action_delivery", "dsl.hostile"),
    user("social_care", "no_such_role", "conference_participation", "odd.hostile"),
    user("social_care", "chair", "no_such_purpose", "odd2.hostile"),
]
REFERRAL_ROUTED = "csx.referrals.referral_routed"


def rpcs(child_id: str, scheduled: list[str], concluded: str) -> dict[str, Rpc]:
    known = [child_id, concluded, *scheduled]

    def pick(key: str) -> str:
        return scheduled[hash(key) % len(scheduled)]

    def conclude(key: str) -> pb.ConcludeConferenceRequest:
        return pb.ConcludeConferenceRequest(
            conference_id=pick(key),
            idempotency_key=key,
            expected_version=1,
            outcome=pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
            summary=CANARIES[2],
            actions=[
                pb.AgreedAction(owner_agency=t.AGENCY_POLICE, description=CANARIES[0], due_on="2026-12-01"),
                pb.AgreedAction(owner_agency=t.AGENCY_EDUCATION, description=CANARIES[1], due_on="2026-12-05"),
            ],
            views=[pb.ParticipantView(agency=t.AGENCY_POLICE, view=pb.VIEW_DISSENTS, reasons=CANARIES[0])],
            minutes=CANARIES[1],
        )

    meeting = pb.Meeting(starts_at=timestamp_pb2.Timestamp(seconds=1_790_000_000), venue=CANARIES[0])
    quorate = [
        pb.Attendance(agency=t.AGENCY_SOCIAL_CARE, direct_contact=True),
        pb.Attendance(agency=t.AGENCY_POLICE, direct_contact=True),
        pb.Attendance(agency=t.AGENCY_HEALTH, direct_contact=True),
    ]
    table = [
        Rpc("GetConference", lambda k: pb.GetConferenceRequest(conference_id=concluded), CHAIR),
        Rpc("ListConferences", lambda k: pb.ListConferencesRequest(child_id=child_id), CHAIR),
        Rpc("ListOverdueConferences", lambda k: pb.ListOverdueConferencesRequest(), CHAIR),
        Rpc(
            "ArrangeConference",
            lambda k: pb.ArrangeConferenceRequest(
                conference_id=pick(k),
                idempotency_key=k,
                expected_version=1,
                meeting=meeting,
                chair=CHAIR.user_id,
                managing_team="team-hostile",
            ),
            CHAIR,
        ),
        Rpc(
            "RescheduleConference",
            lambda k: pb.RescheduleConferenceRequest(
                conference_id=pick(k),
                idempotency_key=k,
                expected_version=2,
                meeting=meeting,
                reason=pb.CHANGE_REASON_FAMILY_UNAVAILABLE,
                note=CANARIES[1],
            ),
            CHAIR,
        ),
        Rpc(
            "CancelConference",
            lambda k: pb.CancelConferenceRequest(
                conference_id=pick(k),
                idempotency_key=k,
                expected_version=2,
                reason=pb.CHANGE_REASON_NO_LONGER_REQUIRED,
                note=CANARIES[2],
            ),
            CHAIR,
        ),
        Rpc(
            "InviteParticipants",
            lambda k: pb.InviteParticipantsRequest(
                conference_id=pick(k),
                idempotency_key=k,
                expected_version=1,
                invitations=[
                    pb.Invitation(role=pb.PARTICIPANT_ROLE_TRUSTED_ADULT, name=CANARIES[0], relationship=CANARIES[1]),
                    pb.Invitation(role=pb.PARTICIPANT_ROLE_AGENCY, agency=t.AGENCY_HEALTH),
                ],
            ),
            CHAIR,
        ),
        Rpc(
            "RecordConferenceContext",
            lambda k: pb.RecordConferenceContextRequest(
                conference_id=pick(k),
                idempotency_key=k,
                expected_version=1,
                grounds=[t.HARM_TYPE_NEGLECT],
                contexts=[
                    pb.ContextConsidered(
                        place_id="plc-hostile", context_type=t.CONTEXT_TYPE_TRANSPORT, note=CANARIES[1]
                    )
                ],
            ),
            CHAIR,
        ),
        Rpc(
            "SubmitConferenceReport",
            lambda k: pb.SubmitConferenceReportRequest(conference_id=pick(k), idempotency_key=k, text=CANARIES[2]),
            POLICE,
        ),
        Rpc(
            "RecordConferenceMeeting",
            lambda k: pb.RecordConferenceMeetingRequest(
                conference_id=pick(k), idempotency_key=k, expected_version=2, attendance=quorate, note=CANARIES[0]
            ),
            CHAIR,
        ),
        Rpc("ConcludeConference", conclude, CHAIR),
        Rpc(
            "RecordFamilySummary",
            lambda k: pb.RecordFamilySummaryRequest(
                conference_id=concluded, idempotency_key=k, expected_version=5, text=CANARIES[1], sent_on="2026-12-03"
            ),
            CHAIR,
        ),
        Rpc(
            "RecordEligibility",
            lambda k: pb.RecordEligibilityRequest(
                conference_id=pick(k),
                idempotency_key=k,
                expected_version=1,
                eligibility=pb.Eligibility(
                    extra_familial_harms=[t.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION],
                    age_years=8,
                    under_ten_reason=CANARIES[0],
                ),
            ),
            CHAIR,
        ),
        Rpc(
            "RecordNetworkMeeting",
            lambda k: pb.RecordNetworkMeetingRequest(
                conference_id=concluded,
                idempotency_key=k,
                expected_version=5,
                meeting=pb.NetworkMeeting(
                    held_on="2026-12-03",
                    attended=[
                        pb.NetworkParticipant(
                            role=pb.PARTICIPANT_ROLE_TRUSTED_ADULT, name=CANARIES[0], relationship=CANARIES[1]
                        ),
                        pb.NetworkParticipant(role=pb.PARTICIPANT_ROLE_AGENCY, agency=t.AGENCY_HEALTH),
                    ],
                    actions=[
                        pb.AgreedAction(owner_agency=t.AGENCY_HEALTH, description=CANARIES[2], due_on="2026-12-10")
                    ],
                    notes=CANARIES[1],
                ),
            ),
            CHAIR,
        ),
        Rpc(
            "OfferTransition",
            lambda k: pb.OfferTransitionRequest(
                conference_id=pick(k),
                idempotency_key=k,
                expected_version=1,
                extra_familial_harms=[t.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION],
                offered_on="2026-12-01",
                note=CANARIES[2],
            ),
            CHAIR,
        ),
        Rpc(
            "RecordTransitionAnswer",
            lambda k: pb.RecordTransitionAnswerRequest(
                conference_id=pick(k),
                idempotency_key=k,
                expected_version=2,
                answer=pb.TRANSITION_ANSWER_DECLINED,
                answered_on="2026-12-02",
                family_response=CANARIES[0],
            ),
            CHAIR,
        ),
        Rpc(
            "RegisterChair",
            lambda k: pb.RegisterChairRequest(
                idempotency_key=k,
                chair=pb.Chair(user_id=f"chair.{k[-8:]}", name=CANARIES[0], trained_on="2020-01-01"),
            ),
            MANAGER,
        ),
        Rpc("ListChairs", lambda k: pb.ListChairsRequest(), CHAIR),
    ]
    return {
        SERVICE + r.path: Rpc(SERVICE + r.path, r.base, r.caller, [o for o in OTHERS if o != r.caller], known)
        for r in table
    }


@pytest.fixture(scope="module")
async def conferences(starter: Starter) -> AsyncIterator[tuple[Running, dict[str, Rpc]]]:
    running = await starter.conferences()
    consumer = consumer_for(running.runtime, REFERRAL_ROUTED)
    # Six children, one open conference each (a second routing for a child joins its open one).
    children = [str(uuid.uuid4()) for _ in range(6)]
    for i, child in enumerate(children):
        routed = referral_events.ReferralRouted(
            referral_id=str(uuid.uuid4()),
            child_id=child,
            intervention=t.INTERVENTION_A if i % 2 else t.INTERVENTION_B,
            strategy_discussion_on="2026-03-02" if i % 2 else "",
            routed_at=timestamp_pb2.Timestamp(seconds=1_790_000_000),
        )
        assert await deliver(consumer, REFERRAL_ROUTED, routed.SerializeToString()) == ("ack", 1)
    stub = conferences_pb2_grpc.ConferencesServiceStub(running.channel(CHAIR))
    listed = [
        c
        for child in children
        for c in (await stub.ListConferences(pb.ListConferencesRequest(child_id=child), timeout=10)).conferences
    ]
    child_id = children[0]
    reviews = [c.conference_id for c in listed if c.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW]
    scheduled = [c.conference_id for c in listed if c.conference_id != reviews[0]]
    table = rpcs(child_id, scheduled, reviews[0])
    manager = conferences_pb2_grpc.ConferencesServiceStub(running.channel(MANAGER))
    await conference_flow.register_chair(manager, CHAIR.user_id)
    (review,) = [c for c in listed if c.conference_id == reviews[0]]
    held = await conference_flow.hold(manager, stub, review, key="hostile-seed", chair_id=CHAIR.user_id)
    first = table[SERVICE + "ConcludeConference"].base("hostile-seed-conclude")
    first.conference_id, first.expected_version = reviews[0], held.version
    del first.views[:]  # the seed is a plain conclusion; the attacks add views of their own
    await stub.ConcludeConference(first, timeout=10)
    yield running, table


def test_every_conferences_rpc_is_attacked() -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    assert sorted(rpcs(ids[0], ids[1:2], ids[2])) == sorted(service_methods(pb.DESCRIPTOR, "ConferencesService"))


METHODS = service_methods(pb.DESCRIPTOR, "ConferencesService")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[-1])
@hostile_settings(30)
@given(data=st.data())
async def test_mutated_requests_get_clean_answers_and_leave_nothing(conferences, method: str, data) -> None:  # type: ignore[no-untyped-def]
    running, table = conferences
    await attack_with_mutations(running, table[method], data)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[-1])
@hostile_settings(15)
@given(data=st.data())
async def test_raw_bytes_get_clean_answers_and_leave_nothing(conferences, method: str, data) -> None:  # type: ignore[no-untyped-def]
    running, table = conferences
    await attack_with_bytes(running, table[method], data)
