"""Rows <-> messages for the conferences database; encryption happens here and nowhere else."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date

from sqlalchemy import Row, select, update

from csx.conferences.v1 import conferences_pb2 as pb
from csx_common.crypto import KeyDestroyedError
from csx_common.datakeys import SERVICE_SCOPE, child_scope
from csx_common.db import Tx
from csx_common.sealing import Sealer
from csx_conferences import tables

CONFERENCES = "conferences"
ACTIONS = "conference_actions"
CHAIRS = "chairs"


def action_record_id(conference_id: str, position: int) -> str:
    # Binds each action's ciphertext to its conference and place in the plan.
    return f"{conference_id}/actions/{position}"


class ConferencesRepository:
    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer

    async def _conference_values(self, session: Tx, conference: pb.Conference) -> dict[str, object]:
        head = pb.Conference()
        head.CopyFrom(conference)
        head.ClearField("actions")  # stored row by row in conference_actions
        # Sealed under the child's key scope, so erasing a child's key erases its conferences too.
        body, sealed = await self._sealer.seal_record(
            session, head, table=CONFERENCES, record_id=conference.conference_id, scope=child_scope(conference.child_id)
        )
        return {
            "child_id": conference.child_id,
            "kind": conference.kind,
            "status": conference.status,
            "due_on": date.fromisoformat(conference.due_on),
            "outcome": conference.outcome,
            "version": conference.version,
            "body": body,
            "sealed": sealed,
            "scheduled_at": conference.scheduled_at.ToDatetime(tzinfo=UTC),
            "concluded_at": (
                conference.concluded_at.ToDatetime(tzinfo=UTC) if conference.HasField("concluded_at") else None
            ),
            "overdue_announced_on": (
                date.fromisoformat(conference.overdue_announced_on) if conference.overdue_announced_on else None
            ),
        }

    async def exists_for_referral(self, session: Tx, referral_id: str) -> bool:
        """Did a conference take this referral already (scheduled for it, or joined by it)?"""
        r = tables.conference_referrals.c
        found = await session.execute(select(r.conference_id).where(r.referral_id == referral_id))
        return found.first() is not None

    async def take_referral(self, session: Tx, referral_id: str, conference_id: str) -> None:
        await session.insert(tables.conference_referrals, {"referral_id": referral_id, "conference_id": conference_id})

    async def add(self, session: Tx, conference: pb.Conference) -> None:
        await session.execute(
            tables.conferences.insert().values(
                conference_id=conference.conference_id,
                # The routing's first conference only: its reviews belong to the same referral.
                referral_id=(conference.referral_id or None) if not conference.previous_conference_id else None,
                **(await self._conference_values(session, conference)),
            )
        )
        if conference.referral_id and not conference.previous_conference_id:
            await self.take_referral(session, conference.referral_id, conference.conference_id)
        await self._add_actions(session, conference)

    async def update(self, session: Tx, conference: pb.Conference, expected_version: int) -> bool:
        """Write `conference` (whose version is already bumped) if the stored version is still
        `expected_version`; False if someone else changed it first."""
        c = tables.conferences.c
        result = await session.execute(
            update(tables.conferences)
            .where(c.conference_id == conference.conference_id, c.version == expected_version)
            .values(**(await self._conference_values(session, conference)))
        )
        if not result.rowcount:
            return False
        await session.execute(
            tables.conference_actions.delete().where(
                tables.conference_actions.c.conference_id == conference.conference_id
            )
        )
        await self._add_actions(session, conference)
        return True

    async def _add_actions(self, session: Tx, conference: pb.Conference) -> None:
        rows = []
        for position, action in enumerate(conference.actions):
            body, sealed = await self._sealer.seal_record(
                session,
                action,
                table=ACTIONS,
                record_id=action_record_id(conference.conference_id, position),
                scope=child_scope(conference.child_id),
            )
            rows.append(
                {
                    "conference_id": conference.conference_id,
                    "position": position,
                    "owner_agency": action.owner_agency,
                    "body": body,
                    "sealed": sealed,
                }
            )
        if rows:
            await session.execute(tables.conference_actions.insert(), rows)

    async def get(self, session: Tx, conference_id: str) -> pb.Conference | None:
        row = (
            await session.execute(select(tables.conferences).where(tables.conferences.c.conference_id == conference_id))
        ).first()
        if row is None:
            return None
        return (await self._assemble(session, [row]))[0]

    async def list_for_child(self, session: Tx, child_id: str) -> list[pb.Conference]:
        c = tables.conferences.c
        rows = (
            await session.execute(
                select(tables.conferences).where(c.child_id == child_id).order_by(c.scheduled_at, c.conference_id)
            )
        ).all()
        return await self._assemble(session, rows)

    async def following(self, session: Tx, conference: pb.Conference) -> pb.Conference | None:
        """The review `conference` scheduled when it continued the plan, if any (a child has a few
        conferences: read them rather than index a column for it)."""
        later = await self.list_for_child(session, conference.child_id)
        return next((c for c in later if c.previous_conference_id == conference.conference_id), None)

    async def _assemble(self, session: Tx, rows: Sequence[Row]) -> list[pb.Conference]:
        if not rows:
            return []
        a = tables.conference_actions.c
        ids = [row.conference_id for row in rows]
        actions: dict[str, list[pb.AgreedAction]] = defaultdict(list)
        child_of = {row.conference_id: row.child_id for row in rows}
        action_rows = await session.execute(
            select(a.conference_id, a.position, a.body, a.sealed)
            .where(a.conference_id.in_(ids))
            .order_by(a.conference_id, a.position)
        )
        for ar in action_rows:
            actions[ar.conference_id].append(
                await self._sealer.open_record(
                    session,
                    pb.AgreedAction,
                    ar.body,
                    ar.sealed,
                    table=ACTIONS,
                    record_id=action_record_id(ar.conference_id, ar.position),
                    scope=child_scope(child_of[ar.conference_id]),
                )
            )
        out = []
        for row in rows:
            # A conference with nothing sealed yet would otherwise outlive its child's erasure.
            await self._sealer.ensure_not_erased(session, child_scope(row.child_id))
            conference = await self._sealer.open_record(
                session,
                pb.Conference,
                row.body,
                row.sealed,
                table=CONFERENCES,
                record_id=row.conference_id,
                scope=child_scope(row.child_id),
            )
            conference.actions.extend(actions[row.conference_id])
            out.append(conference)
        return out

    async def open_for_child(self, session: Tx, child_id: str) -> pb.Conference | None:
        """The child's open conference (scheduled or held, not yet concluded or cancelled), the
        latest scheduled if there were ever more than one."""
        c = tables.conferences.c
        row = (
            await session.execute(
                select(tables.conferences)
                .where(
                    c.child_id == child_id,
                    c.status.in_([pb.CONFERENCE_STATUS_SCHEDULED, pb.CONFERENCE_STATUS_HELD]),
                )
                .order_by(c.scheduled_at.desc(), c.conference_id)
                .limit(1)
            )
        ).first()
        return None if row is None else (await self._assemble(session, [row]))[0]

    async def list_overdue(self, session: Tx, today: date) -> list[pb.Conference]:
        """Scheduled conferences whose due date has passed, oldest due first; an erased child's are
        not listed (its records no longer exist for anyone)."""
        c = tables.conferences.c
        rows = (
            await session.execute(
                select(tables.conferences)
                .where(c.status == pb.CONFERENCE_STATUS_SCHEDULED, c.due_on < today)
                .order_by(c.due_on, c.conference_id)
            )
        ).all()
        out = []
        for row in rows:
            try:
                out.extend(await self._assemble(session, [row]))
            except KeyDestroyedError:
                continue
        return out

    async def overdue_to_announce(self, session: Tx, today: date) -> list[tuple[str, int]]:
        """(conference id, version) of the overdue conferences not yet announced: columns only."""
        c = tables.conferences.c
        rows = await session.execute(
            select(c.conference_id, c.version)
            .where(c.status == pb.CONFERENCE_STATUS_SCHEDULED, c.due_on < today, c.overdue_announced_on.is_(None))
            .order_by(c.due_on, c.conference_id)
        )
        return [(row.conference_id, row.version) for row in rows]

    # The chair register ------------------------------------------------------------------------
    async def chairs(self, session: Tx) -> list[pb.Chair]:
        rows = (await session.execute(select(tables.chairs).order_by(tables.chairs.c.user_id))).all()
        return [
            await self._sealer.open_record(
                session, pb.Chair, row.body, row.sealed, table=CHAIRS, record_id=row.user_id, scope=SERVICE_SCOPE
            )
            for row in rows
        ]

    async def put_chair(self, session: Tx, chair: pb.Chair) -> bool:
        """Add the chair (version 1) or replace it (its version already bumped) if the stored
        version is the one before; False if someone else changed it first."""
        body, sealed = await self._sealer.seal_record(
            session, chair, table=CHAIRS, record_id=chair.user_id, scope=SERVICE_SCOPE
        )
        t = tables.chairs
        if chair.version == 1:
            exists = await session.execute(select(t.c.user_id).where(t.c.user_id == chair.user_id))
            if exists.first() is not None:
                return False
            await session.insert(t, {"user_id": chair.user_id, "version": 1, "body": body, "sealed": sealed})
            return True
        result = await session.execute(
            update(t)
            .where(t.c.user_id == chair.user_id, t.c.version == chair.version - 1)
            .values(version=chair.version, body=body, sealed=sealed)
        )
        return bool(result.rowcount)
