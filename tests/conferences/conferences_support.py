"""Test support for the conferences service: the service wired as app.py wires it, its units of work
with a settable clock and a counting relay notifier. (A plainly named module: conftest is not
importable.)"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from sqlalchemy import func, select

from csx.conferences.v1 import conferences_pb2
from csx.conferences.v1 import conferences_pb2 as pb
from csx.options.v1 import options_pb2
from csx.referrals.v1 import events_pb2 as referral_events
from csx.types.v1 import types_pb2
from csx_common.audit import AuditLog
from csx_common.datakeys import DataKeys
from csx_common.db import Database
from csx_common.errors import CsxError
from csx_common.idempotency import IdempotencyKeys
from csx_common.identity import Principal
from csx_common.keyring import FileKeyring
from csx_common.messaging.outbox import Outbox
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry
from csx_common.unit_of_work import UnitsOfWork
from csx_conferences import tables
from csx_conferences.app import SERVICE
from csx_conferences.consumers import referrals_consumer
from csx_conferences.repository import ConferencesRepository
from csx_conferences.service import ConferencesService
from csx_safeguarding.disclosure import Discloser, DisclosureViews
from csx_safeguarding.policy import PolicyEngine


@dataclass
class Clock:
    now: datetime = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Harness:
    db: Database
    db_url: str
    service: ConferencesService
    clock: Clock
    keyring: FileKeyring
    notified: list[int] = field(default_factory=list)

    @property
    def units(self) -> UnitsOfWork:
        return self.service._units

    async def deliver(self, event: referral_events.ReferralRouted) -> None:
        """What the inbox consumer does with a fresh message: the route's handler, in one unit of work."""
        (route,) = referrals_consumer(self.service).routes
        assert route.handler is not None
        async with self.units.begin() as uow:
            await route.handler(uow, event)


def routed(
    referral_id: str,
    child_id: str,
    intervention: int = types_pb2.INTERVENTION_B,
    *,
    strategy_discussion_on: str = "",
    routed_at: datetime = datetime(2026, 3, 2, 9, 0, tzinfo=UTC),
) -> referral_events.ReferralRouted:
    at = timestamp_pb2.Timestamp()
    at.FromDatetime(routed_at)
    return referral_events.ReferralRouted(
        referral_id=referral_id,
        child_id=child_id,
        intervention=intervention,
        strategy_discussion_on=strategy_discussion_on,
        routed_at=at,
    )


def make_service(db: Database, keyring: FileKeyring, clock: Clock, notified: list[int]) -> ConferencesService:
    sealer = Sealer(DataKeys(tables.data_keys, keyring, SERVICE), registry())
    audit = AuditLog(tables.audit)
    units = UnitsOfWork(
        db,
        outbox=Outbox(tables.delivery, wake=lambda: notified.append(1)),
        sealer=sealer,
        idempotency=IdempotencyKeys(tables.idempotency, keyring.blind_index_key, sealer),
        audit=audit,
        clock=clock,
    )
    return ConferencesService(
        units,
        ConferencesRepository(sealer),
        Discloser(PolicyEngine.default(), registry(), audit),
        DisclosureViews(tables.disclosure, postgres=db.is_postgres),
        contextual_review_working_days=15,
        quorum_other_agencies=2,
    )


# The conference's people (synthetic): the chair register's keeper, a social worker, a chair.
MANAGER = Principal("manager.1", "social_care", "mash_manager", "conference_participation")
SOCIAL_WORKER = Principal("sw.1", "social_care", "social_worker", "conference_participation")
CHAIR = Principal("chair.lead", "social_care", "chair", "conference_participation")
QUORATE = [
    conferences_pb2.Attendance(agency=types_pb2.AGENCY_SOCIAL_CARE, direct_contact=True),
    conferences_pb2.Attendance(agency=types_pb2.AGENCY_POLICE, direct_contact=True),
    conferences_pb2.Attendance(agency=types_pb2.AGENCY_EDUCATION, direct_contact=True),
]

ELIGIBLE = conferences_pb2.Eligibility(
    extra_familial_harms=[types_pb2.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION], age_years=14
)


async def register_chair(h: Harness, user_id: str = CHAIR.user_id, **fields: object) -> conferences_pb2.Chair:
    chair = conferences_pb2.Chair(user_id=user_id, name=f"Chair {user_id}", trained_on="2020-10-01", **fields)
    response = await h.service.register_chair(
        MANAGER, conferences_pb2.RegisterChairRequest(idempotency_key=f"chair-{user_id}"[:64], chair=chair)
    )
    return response.chair


async def held(
    h: Harness, conference: conferences_pb2.Conference, *, chair: Principal = CHAIR
) -> conferences_pb2.Conference:
    """B's eligibility recorded (ELIGIBLE) if a B review has none; the conference arranged an hour
    before the harness clock's now with `chair` (registered here if it is not yet) and a quorate
    meeting recorded by that chair: HELD."""
    if chair.user_id not in {c.user_id for c in await h.service.list_chairs(MANAGER)}:
        await register_chair(h, chair.user_id)
    invited = {*conference.invited_agencies, *(i.agency for i in conference.invitations)}
    missing = [a.agency for a in QUORATE if a.agency != types_pb2.AGENCY_SOCIAL_CARE and a.agency not in invited]
    if missing:  # only invited agencies attend
        invite = conferences_pb2.InviteParticipantsRequest(
            conference_id=conference.conference_id,
            idempotency_key=f"invite-{conference.conference_id}"[:64],
            expected_version=conference.version,
            invitations=[
                conferences_pb2.Invitation(role=conferences_pb2.PARTICIPANT_ROLE_AGENCY, agency=a) for a in missing
            ],
        )
        conference = (await h.service.invite_participants(SOCIAL_WORKER, invite)).conference
    if conference.kind == conferences_pb2.CONFERENCE_KIND_CONTEXTUAL_REVIEW and not conference.HasField("eligibility"):
        eligibility = conferences_pb2.RecordEligibilityRequest(
            conference_id=conference.conference_id,
            idempotency_key=f"eligible-{conference.conference_id}"[:64],
            expected_version=conference.version,
            eligibility=ELIGIBLE,
        )
        conference = (await h.service.record_eligibility(SOCIAL_WORKER, eligibility)).conference
    starts = timestamp_pb2.Timestamp()
    starts.FromDatetime(h.clock.now - timedelta(hours=1))
    arranged = await h.service.arrange_conference(
        SOCIAL_WORKER,
        conferences_pb2.ArrangeConferenceRequest(
            conference_id=conference.conference_id,
            idempotency_key=f"arrange-{conference.conference_id}"[:64],
            expected_version=conference.version,
            meeting=conferences_pb2.Meeting(starts_at=starts, online=True),
            chair=chair.user_id,
            managing_team="team-east",
        ),
    )
    recorded = await h.service.record_conference_meeting(
        chair,
        conferences_pb2.RecordConferenceMeetingRequest(
            conference_id=conference.conference_id,
            idempotency_key=f"meeting-{conference.conference_id}"[:64],
            expected_version=arranged.conference.version,
            attendance=QUORATE,
        ),
    )
    return recorded.conference


# The database as a test sees it ---------------------------------------------------------------


def subject(event: type[Message]) -> str:
    return str(event.DESCRIPTOR.GetOptions().Extensions[options_pb2.event].subject)


def at(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def key() -> str:
    return f"key-{uuid.uuid4().hex[:24]}"


async def outbox(h: Harness, event: type[Message]) -> list[Any]:
    o = tables.delivery.outbox.c
    async with h.db.session() as s:
        payloads = list((await s.execute(select(o.payload).where(o.subject == subject(event)))).scalars())
    return [event.FromString(p) for p in payloads]


async def count(h: Harness, table) -> int:  # type: ignore[no-untyped-def]
    async with h.db.session() as s:
        return int((await s.execute(select(func.count()).select_from(table))).scalar_one())


async def current(h: Harness, conference_id: str) -> pb.Conference:
    return (await h.service.get_conference(None, conference_id))[0]


async def state(h: Harness, conference_id: str) -> tuple[object, ...]:
    """What a refused call must leave as it was: the stored conference (its version included),
    the outbox and the idempotency keys."""
    return (
        await current(h, conference_id),
        await count(h, tables.delivery.outbox),
        await count(h, tables.idempotency),
    )


async def refused(
    h: Harness,
    conference_id: str,
    error: type[CsxError],
    reason: str | None,
    call: Callable[[], Awaitable[object]],
) -> None:
    before = await state(h, conference_id)
    with pytest.raises(error) as err:
        await call()
    if reason is not None:
        assert err.value.reason == reason
    assert await state(h, conference_id) == before, "a refused call wrote something"
