"""Rows <-> messages for the actionplans database; encryption happens here and nowhere else.

The Sealer does not handle repeated fields, so each Action is sealed on its own, bound to its own
action id: a description moved to another action's row fails authentication.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, select, update

from csx.actionplans.v1 import actionplans_pb2 as pb
from csx_actionplans import tables
from csx_common.datakeys import child_scope
from csx_common.db import Tx
from csx_common.sealing import Sealer
from csx_common.timestamps import ts

ACTIONS = "actions"


class ActionPlansRepository:
    def __init__(self, sealer: Sealer) -> None:
        self._sealer = sealer

    async def _action(self, session: Tx, row: Any, *, scope: str | None = None) -> pb.Action:
        action = pb.Action(
            action_id=row.action_id,
            owner_agency=row.owner_agency,
            due_on=row.due_on,
            status=row.status,
            version=row.version,
        )
        return await self._sealer.unseal(
            session, action, row.sealed, table=ACTIONS, record_id=row.action_id, scope=scope
        )

    # Plans --------------------------------------------------------------------------------
    async def plan_id_for_conference(self, session: Tx, conference_id: str) -> str | None:
        c = tables.action_plans.c
        return (await session.execute(select(c.plan_id).where(c.conference_id == conference_id))).scalar()

    async def add_plan(self, session: Tx, plan: pb.ActionPlan) -> None:
        published_at = plan.published_at.ToDatetime(tzinfo=UTC)
        await session.execute(
            tables.action_plans.insert().values(
                plan_id=plan.plan_id,
                conference_id=plan.conference_id,
                child_id=plan.child_id,
                published_at=published_at,
                kind=plan.kind,
                status=plan.status,
            )
        )
        rows = []
        for position, action in enumerate(plan.actions):
            copy = pb.Action()
            copy.CopyFrom(action)
            # Under the child's data key: erasing the child erases its plan's details too.
            sealed = await self._sealer.seal(
                session, copy, table=ACTIONS, record_id=action.action_id, scope=child_scope(plan.child_id)
            )
            rows.append(
                {
                    "action_id": action.action_id,
                    "plan_id": plan.plan_id,
                    "owner_agency": action.owner_agency,
                    "due_on": action.due_on,
                    "status": action.status,
                    "version": action.version,
                    "sealed": sealed,
                    "position": position,
                    "updated_at": published_at,
                }
            )
        await session.execute(tables.actions.insert(), rows)

    async def get_plan(self, session: Tx, plan_id: str) -> pb.ActionPlan | None:
        plans = await self._plans(session, tables.action_plans.c.plan_id == plan_id)
        return plans[0] if plans else None

    async def list_plans(self, session: Tx, *, child_id: str = "", conference_id: str = "") -> list[pb.ActionPlan]:
        c = tables.action_plans.c
        where = c.child_id == child_id if child_id else c.conference_id == conference_id
        return await self._plans(session, where)

    async def _plans(self, session: Tx, where: ColumnElement[bool]) -> list[pb.ActionPlan]:
        p = tables.action_plans.c
        query = select(tables.action_plans).where(where).order_by(p.published_at, p.plan_id)
        rows = (await session.execute(query)).all()
        if not rows:
            return []
        for row in rows:  # the plan's head holds nothing sealed: check the child was not erased
            await self._sealer.ensure_not_erased(session, child_scope(row.child_id))
        plans = {row.plan_id: _plan_head(row) for row in rows}
        a = tables.actions.c
        action_rows: Sequence[Any] = (
            await session.execute(
                select(tables.actions).where(a.plan_id.in_(list(plans))).order_by(a.plan_id, a.position)
            )
        ).all()
        for row in action_rows:
            plan = plans[row.plan_id]
            plan.actions.append(await self._action(session, row, scope=child_scope(plan.child_id)))
        return list(plans.values())

    async def end_active_plans(
        self, session: Tx, child_id: str, kinds: Sequence[int], reason: int, conference_id: str, at: datetime
    ) -> list[tuple[str, int]]:
        """End the child's active plans of these kinds; (plan id, kind) of each, oldest first."""
        p = tables.action_plans.c
        active = (p.child_id == child_id) & p.kind.in_(list(kinds)) & (p.status == pb.PLAN_STATUS_ACTIVE)
        rows = (
            await session.execute(select(p.plan_id, p.kind).where(active).order_by(p.published_at, p.plan_id))
        ).all()
        if rows:
            await session.execute(
                update(tables.action_plans)
                .where(p.plan_id.in_([r.plan_id for r in rows]))
                .values(
                    status=pb.PLAN_STATUS_ENDED, end_reason=reason, ended_by_conference_id=conference_id, ended_at=at
                )
            )
        return [(r.plan_id, r.kind) for r in rows]

    # Actions ------------------------------------------------------------------------------
    async def get_action(self, session: Tx, plan_id: str, action_id: str) -> tuple[pb.Action, str] | None:
        """(the action, its plan's child id), or None."""
        a, p = tables.actions.c, tables.action_plans.c
        query = (
            select(tables.actions, p.child_id)
            .join_from(tables.actions, tables.action_plans, a.plan_id == p.plan_id)
            .where(a.action_id == action_id, a.plan_id == plan_id)
        )
        row = (await session.execute(query)).first()
        if row is None:
            return None
        return await self._action(session, row, scope=child_scope(row.child_id)), row.child_id

    async def update_status(
        self, session: Tx, action_id: str, status: int, expected_version: int, now: datetime
    ) -> bool:
        """Compare-and-set on the version: False if someone else changed the action first."""
        a = tables.actions.c
        result = await session.execute(
            update(tables.actions)
            .where(a.action_id == action_id, a.version == expected_version)
            .values(status=status, version=expected_version + 1, updated_at=now)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def _plan_head(row: Any) -> pb.ActionPlan:
    """A plan's columns (its actions are read separately)."""
    plan = pb.ActionPlan(
        plan_id=row.plan_id,
        conference_id=row.conference_id,
        child_id=row.child_id,
        published_at=ts(row.published_at),
        kind=row.kind,
        status=row.status,
        end_reason=row.end_reason,
        ended_by_conference_id=row.ended_by_conference_id or "",
    )
    if row.ended_at is not None:
        plan.ended_at.CopyFrom(ts(row.ended_at))
    return plan
