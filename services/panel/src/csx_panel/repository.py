"""Rows <-> messages for the panel database."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import distinct, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from csx.panel.v1 import panel_pb2 as pb
from csx_common.db import Tx
from csx_common.timestamps import ts
from csx_panel import tables
from csx_panel.domain import PlaceMention


def _insert(session: Tx, table: Any) -> Any:
    dialect = session.dialect
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(table)


class PanelRepository:
    # Writes -------------------------------------------------------------------------------
    async def add_concern(
        self, session: Tx, concern_id: str, child_id: str, agency: int, recorded_at: datetime
    ) -> bool:
        """False if the concern is already recorded (the same concern delivered under another id)."""
        result = await session.execute(
            _insert(session, tables.concern_links)
            .values(concern_id=concern_id, child_id=child_id, agency=agency, recorded_at=recorded_at)
            .on_conflict_do_nothing()
        )
        return bool(result.rowcount)

    async def lock_place(self, session: Tx, place_id: str) -> bool:
        """Create the place if new and lock its row; returns whether it is already flagged.

        The lock serialises concerns about one place (PostgreSQL; SQLite has one writer anyway), so
        two concurrent concerns cannot each count the other out and both miss the threshold.
        """
        c = tables.places.c
        new_place = _insert(session, tables.places).values(place_id=place_id)
        await session.execute(new_place.on_conflict_do_nothing())
        query = select(c.flagged_at).where(c.place_id == place_id).with_for_update()
        return (await session.execute(query)).scalar_one() is not None

    async def add_place_link(
        self,
        session: Tx,
        concern_id: str,
        mention: PlaceMention,
        child_id: str,
        agency: int,
        harm_types: list[int],
        recorded_at: datetime,
    ) -> None:
        await session.insert(
            tables.place_links,
            {
                "concern_id": concern_id,
                "place_id": mention.place_id,
                "context_type": mention.context_type,
                "child_id": child_id,
                "agency": agency,
                "harm_types": harm_types,
                "recorded_at": recorded_at,
            },
        )

    async def child_count(self, session: Tx, place_id: str, *, up_to: int | None = None) -> int:
        """The distinct children linked to the place; with `up_to`, counting stops there (a place
        named in thousands of concerns costs a threshold check no more than a new one)."""
        c = tables.place_links.c
        children = select(c.child_id).where(c.place_id == place_id).distinct()
        if up_to is not None:
            children = children.limit(up_to)
        return int((await session.execute(select(func.count()).select_from(children.subquery()))).scalar_one())

    async def flag_place(self, session: Tx, place_id: str, now: datetime) -> bool:
        c = tables.places.c
        result = await session.execute(
            update(tables.places).where(c.place_id == place_id, c.flagged_at.is_(None)).values(flagged_at=now)
        )
        return bool(result.rowcount)

    # Reads --------------------------------------------------------------------------------
    async def place_profile(self, session: Tx, place_id: str) -> pb.PlaceProfile | None:
        c = tables.place_links.c
        summary = (
            await session.execute(
                select(
                    func.count(c.concern_id),
                    func.count(distinct(c.child_id)),
                    func.min(c.recorded_at),
                    func.max(c.recorded_at),
                ).where(c.place_id == place_id)
            )
        ).one()
        concern_count, child_count, first_seen, last_seen = summary
        if not concern_count:
            return None
        agencies = await session.execute(select(c.agency).distinct().where(c.place_id == place_id).order_by(c.agency))
        harm_types: set[int] = set()
        harm_lists = await session.execute(select(c.harm_types).where(c.place_id == place_id))
        for row_harms in harm_lists.scalars():
            harm_types.update(row_harms)
        places = tables.places.c
        flagged_at = (await session.execute(select(places.flagged_at).where(places.place_id == place_id))).scalar()
        return pb.PlaceProfile(
            place_id=place_id,
            concern_count=concern_count,
            child_count=child_count,
            harm_types=sorted(harm_types),
            reporting_agencies=list(agencies.scalars()),
            first_seen_at=ts(first_seen),
            last_seen_at=ts(last_seen),
            flagged_for_panel=flagged_at is not None,
        )

    async def child_links(self, session: Tx, child_id: str) -> pb.GetChildLinksResponse | None:
        cc = tables.concern_links.c
        query = select(cc.concern_id).where(cc.child_id == child_id).order_by(cc.recorded_at, cc.concern_id)
        concern_ids = list((await session.execute(query)).scalars())
        if not concern_ids:
            return None
        pc = tables.place_links.c
        rows = await session.execute(
            select(pc.concern_id, pc.place_id, pc.context_type, pc.agency, pc.recorded_at)
            .where(pc.child_id == child_id)
            .order_by(pc.recorded_at, pc.concern_id, pc.place_id)
        )
        return pb.GetChildLinksResponse(
            child_id=child_id,
            concern_ids=concern_ids,
            links=[
                pb.ChildLink(
                    concern_id=r.concern_id,
                    place_id=r.place_id,
                    context_type=r.context_type,
                    agency=r.agency,
                    recorded_at=ts(r.recorded_at),
                )
                for r in rows
            ],
        )

    async def routed_agencies(self, session: Tx, child_id: str) -> set[int]:
        """The agencies whose concerns social care routed: their basis for knowing the child."""
        c = tables.routed_agencies.c
        return set((await session.execute(select(c.agency).where(c.child_id == child_id))).scalars())

    async def add_routed_agencies(self, session: Tx, child_id: str, agencies: Sequence[int]) -> None:
        t = tables.routed_agencies
        known = await self.routed_agencies(session, child_id)
        for agency in sorted(set(agencies) - known):
            await session.execute(t.insert().values(child_id=child_id, agency=agency))

    async def merge_child(self, session: Tx, from_id: str, into_id: str) -> None:
        """The MASH decided two child records are one child: what was about `from_id` is about `into_id`."""
        for table in (tables.concern_links, tables.place_links):
            await session.execute(update(table).where(table.c.child_id == from_id).values(child_id=into_id))
        moved = await self.routed_agencies(session, from_id)
        await session.execute(tables.routed_agencies.delete().where(tables.routed_agencies.c.child_id == from_id))
        await self.add_routed_agencies(session, into_id, sorted(moved))

    async def forget_child(self, session: Tx, child_id: str) -> None:
        """On erasure: the child's links to places and concerns go. A place's flag stays (it is
        about the place); its child count no longer includes the child."""
        await session.execute(tables.place_links.delete().where(tables.place_links.c.child_id == child_id))
        await session.execute(tables.concern_links.delete().where(tables.concern_links.c.child_id == child_id))
        await session.execute(tables.routed_agencies.delete().where(tables.routed_agencies.c.child_id == child_id))
