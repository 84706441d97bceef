"""Panel use cases against a migrated SQLite database: the concern handler as the inbox consumer
calls it, then the read side and the outbox."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import select

from csx.panel.v1 import events_pb2 as panel_events
from csx.referrals.v1 import events_pb2 as referrals_events
from csx.types.v1 import types_pb2 as t
from csx_common.audit import AuditLog
from csx_common.db import Database
from csx_common.errors import InvalidArgument, NotFound
from csx_common.messaging.outbox import Outbox
from csx_common.migrations import upgrade
from csx_common.sensitivity import registry
from csx_common.unit_of_work import UnitsOfWork
from csx_common.validation import check_event
from csx_panel import tables
from csx_panel.app import MIGRATIONS
from csx_panel.repository import PanelRepository
from csx_panel.service import PanelService
from csx_safeguarding.disclosure import Discloser, DisclosureViews
from csx_safeguarding.policy import PolicyEngine

T0 = datetime(2021, 1, 4, 9, 0, tzinfo=UTC)
PARK = "plc-riverside-park"
SCHOOL = "plc-hillside-school"


class Notifier:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/panel.db")
    await upgrade(database, MIGRATIONS)
    yield database
    await database.dispose()


@pytest.fixture
def notifier() -> Notifier:
    return Notifier()


def make_service(db: Database, notifier: Notifier, threshold: int) -> PanelService:
    audit = AuditLog(tables.audit)
    return PanelService(
        UnitsOfWork(db, outbox=Outbox(tables.delivery, wake=notifier), audit=audit),
        PanelRepository(),
        flag_threshold_children=threshold,
        discloser=Discloser(PolicyEngine.default(), registry(), audit),
        views=DisclosureViews(tables.disclosure, postgres=db.is_postgres),
    )


@pytest.fixture
def service(db: Database, notifier: Notifier) -> PanelService:
    service = make_service(db, notifier, 3)
    service._units.clock = lambda: T0 + timedelta(days=30)
    return service


def concern(
    child_id: str,
    *places: tuple[str, int],
    minutes: int = 0,
    agency: int = t.AGENCY_POLICE,
    harms: tuple[int, ...] = (t.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION,),
    concern_id: str | None = None,
) -> referrals_events.ConcernRecorded:
    recorded = timestamp_pb2.Timestamp()
    recorded.FromDatetime(T0 + timedelta(minutes=minutes))
    return referrals_events.ConcernRecorded(
        concern_id=concern_id or str(uuid.uuid4()),
        referral_id=str(uuid.uuid4()),
        child_id=child_id,
        agency=agency,
        harm_types=list(harms),
        contexts=[t.ContextLink(place_id=p, context_type=ct) for p, ct in places],
        recorded_at=recorded,
    )


async def deliver(db: Database, service: PanelService, *events: referrals_events.ConcernRecorded) -> None:
    for event in events:
        check_event(event)  # the route's check, at the consumer's edge
        async with service._units.begin() as uow:  # as the inbox consumer runs it
            await service.on_concern_recorded(uow, event)


async def flagged_events(db: Database) -> list[tuple[str, panel_events.PlaceFlagged]]:
    o = tables.delivery.outbox.c
    async with db.session() as session:
        query = select(o.subject, o.event_type, o.payload).order_by(o.created_at)
        rows = (await session.execute(query)).all()
    assert all(r.event_type == "csx.panel.v1.PlaceFlagged" for r in rows)
    return [(r.subject, panel_events.PlaceFlagged.FromString(r.payload)) for r in rows]


def new_child() -> str:
    return str(uuid.uuid4())


async def test_place_flagged_once_when_distinct_children_reach_threshold(
    db: Database, service: PanelService, notifier: Notifier
) -> None:
    a, b, c, d = (new_child() for _ in range(4))
    park = (PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD)
    # The same child twice is one child: two concerns, still below the threshold.
    await deliver(db, service, concern(a, park), concern(a, park, minutes=1), concern(b, park, minutes=2))
    assert await flagged_events(db) == []
    assert not (await service.get_place_profile(None, PARK)).flagged_for_panel

    await deliver(db, service, concern(c, park, minutes=3))
    [(subject, event)] = await flagged_events(db)
    assert subject == "csx.panel.place_flagged"
    assert event.place_id == PARK
    assert event.child_count == 3
    assert event.flagged_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(days=30)
    assert notifier.calls == 1  # woken after the commit that wrote the event

    # A fourth child adds to the profile but does not flag the place again.
    await deliver(db, service, concern(d, park, minutes=4))
    assert len(await flagged_events(db)) == 1
    assert notifier.calls == 1
    profile = await service.get_place_profile(None, PARK)
    assert (profile.concern_count, profile.child_count, profile.flagged_for_panel) == (5, 4, True)


async def test_place_profile_aggregates(db: Database, service: PanelService) -> None:
    a, b = new_child(), new_child()
    await deliver(
        db,
        service,
        concern(
            a,
            (PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD),
            minutes=10,
            agency=t.AGENCY_EDUCATION,
            harms=(t.HARM_TYPE_ONLINE_HARM, t.HARM_TYPE_CHILD_SEXUAL_EXPLOITATION),
        ),
        concern(b, (PARK, t.CONTEXT_TYPE_PEER_GROUP), minutes=5, agency=t.AGENCY_POLICE),
        concern(b, (SCHOOL, t.CONTEXT_TYPE_SCHOOL), minutes=20, agency=t.AGENCY_HEALTH),
    )
    profile = await service.get_place_profile(None, PARK)
    assert profile.place_id == PARK
    assert (profile.concern_count, profile.child_count) == (2, 2)
    assert list(profile.harm_types) == [
        t.HARM_TYPE_CHILD_SEXUAL_EXPLOITATION,
        t.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION,
        t.HARM_TYPE_ONLINE_HARM,
    ]
    assert list(profile.reporting_agencies) == [t.AGENCY_POLICE, t.AGENCY_EDUCATION]
    assert profile.first_seen_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=5)
    assert profile.last_seen_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=10)
    assert not profile.flagged_for_panel

    with pytest.raises(NotFound):
        await service.get_place_profile(None, "plc-nowhere")


async def test_child_links_include_concerns_naming_no_place(db: Database, service: PanelService) -> None:
    child = new_child()
    late = concern(child, (PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD), (SCHOOL, t.CONTEXT_TYPE_SCHOOL), minutes=30)
    early = concern(child, minutes=1, agency=t.AGENCY_HEALTH)  # names no place
    await deliver(db, service, late, early, concern(new_child(), (PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD)))

    links = await service.get_child_links(None, child)
    assert links.child_id == child
    assert list(links.concern_ids) == [early.concern_id, late.concern_id]  # by recorded_at
    # Links of one concern come in place id order.
    assert [(link.concern_id, link.place_id, link.context_type) for link in links.links] == [
        (late.concern_id, SCHOOL, t.CONTEXT_TYPE_SCHOOL),
        (late.concern_id, PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD),
    ]
    assert all(link.agency == t.AGENCY_POLICE for link in links.links)
    assert links.links[0].recorded_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=30)

    with pytest.raises(NotFound):
        await service.get_child_links(None, new_child())


async def test_same_concern_twice_and_same_place_twice_count_once(db: Database, service: PanelService) -> None:
    child = new_child()
    event = concern(child, (PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD), (PARK, t.CONTEXT_TYPE_PEER_GROUP))
    # Under another message id the inbox would let it through; the concern id stops it here.
    await deliver(db, service, event, event)
    profile = await service.get_place_profile(None, PARK)
    assert (profile.concern_count, profile.child_count) == (1, 1)
    links = await service.get_child_links(None, child)
    assert list(links.concern_ids) == [event.concern_id]
    assert [(link.place_id, link.context_type) for link in links.links] == [(PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD)]


async def test_one_concern_can_flag_several_places(db: Database, notifier: Notifier) -> None:
    service = make_service(db, notifier, 1)
    child = new_child()
    await deliver(db, service, concern(child, (SCHOOL, t.CONTEXT_TYPE_SCHOOL), (PARK, t.CONTEXT_TYPE_ONLINE)))
    assert sorted(e.place_id for _, e in await flagged_events(db)) == [SCHOOL, PARK]
    assert notifier.calls == 1


async def test_malformed_event_leaves_nothing(db: Database, service: PanelService, notifier: Notifier) -> None:
    bad = concern(new_child(), ("Not A Place!", t.CONTEXT_TYPE_NEIGHBOURHOOD))
    with pytest.raises(InvalidArgument):
        await deliver(db, service, bad)
    missing_child = concern("", (PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD))
    with pytest.raises(InvalidArgument) as err:
        await deliver(db, service, missing_child)
    assert [v.field for v in err.value.violations] == ["child_id"]
    async with db.session() as session:
        for table in (tables.concern_links, tables.place_links, tables.places, tables.delivery.outbox):
            assert (await session.execute(select(table))).first() is None
    assert notifier.calls == 0


async def test_reporting_a_concern_is_no_basis_for_a_childs_links_routing_is(
    db: Database, service: PanelService
) -> None:
    """A partner that reported a concern about a child does not see the panel's picture of that
    child (other agencies' links) until social care routes a referral holding its concern; a merge
    decided by the MASH moves the links to the known child."""
    from csx.referrals.v1 import events_pb2
    from tests.support import user

    child, provisional = new_child(), new_child()
    await deliver(db, service, concern(child, (PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD), agency=t.AGENCY_EDUCATION))
    await deliver(db, service, concern(provisional, (PARK, t.CONTEXT_TYPE_NEIGHBOURHOOD), minutes=1))  # police

    police = user("police", "police_officer", "action_delivery", "pc.1")

    async def police_reads(child_id: str) -> object | None:
        try:
            return await service.get_child_links(police, child_id)
        except NotFound:
            return None

    assert await police_reads(provisional) is None  # its own report is not a basis either
    at = timestamp_pb2.Timestamp()
    at.FromDatetime(T0)
    async with service._units.begin() as uow:
        await service.on_children_merged(
            uow,
            events_pb2.ChildrenMerged(
                match_id=str(uuid.uuid4()), from_child_id=provisional, into_child_id=child, merged_at=at
            ),
        )
    assert await police_reads(child) is None
    async with service._units.begin() as uow:
        await service.on_referral_routed(
            uow,
            events_pb2.ReferralRouted(
                referral_id=str(uuid.uuid4()),
                child_id=child,
                intervention=t.INTERVENTION_B,
                routed_at=at,
                referring_agencies=[t.AGENCY_POLICE, t.AGENCY_EDUCATION],
            ),
        )
    links = await police_reads(child)
    assert links is not None and len(links.concern_ids) == 2  # type: ignore[attr-defined]
