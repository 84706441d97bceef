"""Overdue conferences: past the due date (London) and not held, announced once by
ConferenceOverdue (a periodic sweep in every replica) and listed for social care."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from conferences_support import SOCIAL_WORKER, Harness, held, routed
from sqlalchemy import select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.types.v1 import types_pb2
from csx_conferences import tables


async def announced(h: Harness) -> list[events.ConferenceOverdue]:
    o = tables.delivery.outbox.c
    async with h.db.session() as s:
        rows = (await s.execute(select(o.payload).where(o.subject == "csx.conferences.conference_overdue"))).all()
    return [events.ConferenceOverdue.FromString(r.payload) for r in rows]


async def test_an_overdue_conference_is_announced_once_the_day_after_its_due_date(harness: Harness) -> None:
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routed(str(uuid.uuid4()), child_id, types_pb2.INTERVENTION_B))  # routed Monday 2 March
    (conference,) = (await h.service.list_conferences(None, child_id))[0]
    assert conference.due_on == "2026-03-23"

    h.clock.now = datetime(2026, 3, 23, 23, 30, tzinfo=UTC)  # still the due day in London (GMT)
    assert await h.service.announce_overdue() == 0
    h.clock.now = datetime(2026, 3, 24, 0, 30, tzinfo=UTC)
    assert await h.service.announce_overdue() == 1
    assert await h.service.announce_overdue() == 0  # once
    (event,) = await announced(h)
    assert (event.conference_id, event.child_id, event.due_on) == (conference.conference_id, child_id, "2026-03-23")
    assert event.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW

    listed, _ = await h.service.list_overdue_conferences(SOCIAL_WORKER)
    assert [c.conference_id for c in listed] == [conference.conference_id]
    assert listed[0].overdue_announced_on == "2026-03-24"


async def test_held_conferences_are_not_overdue(harness: Harness) -> None:
    h = harness
    child_id = str(uuid.uuid4())
    await h.deliver(routed(str(uuid.uuid4()), child_id, types_pb2.INTERVENTION_B))
    (conference,) = (await h.service.list_conferences(None, child_id))[0]
    h.clock.now = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
    await held(h, conference)
    h.clock.now = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
    assert await h.service.announce_overdue() == 0
    assert await announced(h) == []


async def test_two_sweeps_at_once_announce_each_conference_once(harness: Harness) -> None:
    h = harness
    for _ in range(3):
        await h.deliver(routed(str(uuid.uuid4()), str(uuid.uuid4()), types_pb2.INTERVENTION_B))
    h.clock.now = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
    first, second = await asyncio.gather(h.service.announce_overdue(), h.service.announce_overdue())
    assert first + second == 3
    assert len({e.conference_id for e in await announced(h)}) == len(await announced(h)) == 3
