"""A child's case: open while anything about the child is open, here or in conferences; its closing
starts the retention period (docs/adr/0014).

Referrals keeps the case from its own facts (referrals awaiting a decision; routed referrals whose
conference conferences has not announced yet) and from conferences' (each conference open or
closed, from its events). Every change that can affect a case evaluates it in the same unit of
work: closing publishes CaseClosed, reopening CaseReopened, each at the time of the change that
caused it (the event's own timestamp, never the time it was applied here).

Conferences' events can arrive late, twice, or out of order: a conference only goes absent ->
open -> closed ("closed wins"), so a ConferenceScheduled after its ConferenceConcluded changes
nothing, and a second copy of an event finds nothing left to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from csx.conferences.v1 import events_pb2 as conference_events
from csx.referrals.v1 import events_pb2 as events
from csx.referrals.v1 import referrals_pb2 as pb
from csx.types.v1 import types_pb2
from csx_common.db import Tx, advisory_lock
from csx_common.messaging.consumer import PoisonEvent
from csx_common.timestamps import ts, utc
from csx_common.unit_of_work import UnitOfWork
from csx_referrals import domain, tables

_C, _CC, _R = tables.cases.c, tables.case_conferences.c, tables.referrals.c


class CaseRepository:
    """Rows of the case tables; no personal data, so nothing is sealed here."""

    async def lock(self, tx: Tx, child_id: str) -> None:
        """One evaluation of a child's case at a time (PostgreSQL; SQLite has one writer): each
        reads the facts the one before it committed."""
        await advisory_lock(tx, f"csx-referrals-case:{child_id}")

    async def facts(self, tx: Tx, child_id: str) -> domain.CaseFacts:
        awaiting = await tx.execute(
            select(_R.referral_id)
            .where(_R.child_id == child_id, _R.status == pb.REFERRAL_STATUS_AWAITING_DECISION)
            .limit(1)
        )
        pending = await tx.execute(
            select(_R.outcome).where(
                _R.child_id == child_id, _R.status == pb.REFERRAL_STATUS_ROUTED, _R.conference_announced.is_(False)
            )
        )
        conferences = await tx.execute(select(_CC.intervention).where(_CC.child_id == child_id, _CC.open.is_(True)))
        return domain.CaseFacts(
            awaiting_decision=awaiting.first() is not None,
            pending_routings=tuple(domain.ROUTES.get(outcome, 0) for outcome in pending.scalars()),
            open_conferences=tuple(conferences.scalars()),
        )

    async def status(self, tx: Tx, child_id: str) -> str | None:
        return (await tx.execute(select(_C.status).where(_C.child_id == child_id))).scalar()

    async def child_known(self, tx: Tx, child_id: str) -> bool:
        """A child referrals holds and has not erased (or merged into another record)."""
        ch = tables.children.c
        found = await tx.execute(select(ch.child_id).where(ch.child_id == child_id, ch.erased_at.is_(None)))
        return found.first() is not None

    async def open_case(self, tx: Tx, child_id: str, at: datetime, intervention: int) -> None:
        await tx.insert(
            tables.cases,
            dict(
                child_id=child_id,
                status=domain.CASE_OPEN,
                opened_at=at,
                closed_at=None,
                intervention=intervention,
                version=1,
            ),
        )

    async def change_case(self, tx: Tx, child_id: str, **values: Any) -> None:
        await tx.execute(update(tables.cases).where(_C.child_id == child_id).values(version=_C.version + 1, **values))

    async def last_conference_closed_at(self, tx: Tx, child_id: str) -> datetime | None:
        query = select(func.max(_CC.changed_at)).where(_CC.child_id == child_id, _CC.open.is_(False))
        return utc((await tx.execute(query)).scalar())

    async def opened_at(self, tx: Tx, child_id: str) -> datetime | None:
        return (await tx.execute(select(_C.opened_at).where(_C.child_id == child_id))).scalar()

    async def closed_at(self, tx: Tx, child_id: str) -> datetime | None:
        """When the case closed; None if it is open (or unknown)."""
        query = select(_C.closed_at).where(_C.child_id == child_id, _C.status == domain.CASE_CLOSED)
        return (await tx.execute(query)).scalar()

    async def intervention(self, tx: Tx, child_id: str) -> int | None:
        return (await tx.execute(select(_C.intervention).where(_C.child_id == child_id))).scalar()

    async def conference_child(self, tx: Tx, conference_id: str) -> str | None:
        return (await tx.execute(select(_CC.child_id).where(_CC.conference_id == conference_id))).scalar()

    async def conference_opened(
        self, tx: Tx, conference_id: str, child_id: str, intervention: int, at: datetime
    ) -> None:
        """Open unless already known; a known open conference takes a known intervention (a review
        named before its own event arrives). A closed one stays closed."""
        row = dict(conference_id=conference_id, child_id=child_id, open=True, intervention=intervention, changed_at=at)
        await tx.execute(_insert_ignoring_conflict(tx, tables.case_conferences).values(row))
        if intervention:
            await tx.execute(
                update(tables.case_conferences)
                .where(_CC.conference_id == conference_id, _CC.open.is_(True))
                .values(intervention=intervention)
            )

    async def conference_closed(self, tx: Tx, conference_id: str, child_id: str, at: datetime) -> None:
        """Closed for good, whether or not it was known open (its ConferenceScheduled may come later)."""
        row = dict(conference_id=conference_id, child_id=child_id, open=False, intervention=0, changed_at=at)
        await tx.execute(_insert_ignoring_conflict(tx, tables.case_conferences).values(row))
        await tx.execute(
            update(tables.case_conferences)
            .where(_CC.conference_id == conference_id, _CC.open.is_(True))
            .values(open=False, changed_at=at)
        )

    async def referral_announced(self, tx: Tx, referral_id: str, child_id: str) -> None:
        """Conferences announced the referral's conference: the routing no longer holds the case open."""
        await tx.execute(
            update(tables.referrals)
            .where(_R.referral_id == referral_id, _R.child_id == child_id, _R.conference_announced.is_(False))
            .values(conference_announced=True)
        )

    async def forget(self, tx: Tx, child_id: str) -> None:
        """The child's case and conference rows (an erased child; a record merged into another)."""
        await tx.execute(delete(tables.cases).where(_C.child_id == child_id))
        await tx.execute(delete(tables.case_conferences).where(_CC.child_id == child_id))


def _when(timestamp: Timestamp) -> datetime:
    """An event's own time; one no datetime can hold breaks the contract (parked, not retried)."""
    try:
        return timestamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise PoisonEvent("a time out of range") from exc


def _insert_ignoring_conflict(tx: Tx, table: Any) -> Any:
    insert = pg_insert if tx.dialect == "postgresql" else sqlite_insert
    return insert(table).on_conflict_do_nothing()


class Cases:
    """The case use cases, each run inside the caller's unit of work (a gRPC use case, or a
    conferences event with its inbox row)."""

    def __init__(self, repo: CaseRepository | None = None) -> None:
        self._repo = repo or CaseRepository()

    async def evaluate(self, uow: UnitOfWork, child_id: str, at: datetime) -> str | None:
        """Open or close the child's case from the facts as they now stand; `at` is when the change
        that led here happened. Returns what changed ("opened", "reopened", "closed") or None."""
        tx = uow.tx
        await self._repo.lock(tx, child_id)
        if not await self._repo.child_known(tx, child_id):
            return None  # erased (or merged away) meanwhile: nothing left to keep
        facts = await self._repo.facts(tx, child_id)
        change = domain.case_change(await self._repo.status(tx, child_id), facts)
        if change == "opened":
            await self._repo.open_case(tx, child_id, at, facts.intervention)
        elif change == "reopened":
            # Never reopened before it closed: a late event (a replay, a redelivery) carries an older time.
            at = max(at, utc(await self._repo.closed_at(tx, child_id)) or at)
            await self._repo.change_case(
                tx, child_id, status=domain.CASE_OPEN, opened_at=at, closed_at=None, intervention=facts.intervention
            )
            await uow.publish(events.CaseReopened(child_id=child_id, reopened_at=ts(at)))
        elif change == "closed":
            # The last thing to close closed it: a conclusion delivered before its (late) schedule
            # closes the case at the conclusion's time, not the schedule's.
            at = max(
                at,
                await self._repo.last_conference_closed_at(tx, child_id) or at,
                # ... and never before the case last opened (a late event from before a reopening).
                utc(await self._repo.opened_at(tx, child_id)) or at,
            )
            await self._repo.change_case(
                tx, child_id, status=domain.CASE_CLOSED, closed_at=at, intervention=types_pb2.INTERVENTION_UNSPECIFIED
            )
            await uow.publish(events.CaseClosed(child_id=child_id, closed_at=ts(at)))
        elif facts.open and await self._repo.intervention(tx, child_id) != facts.intervention:
            await self._repo.change_case(tx, child_id, intervention=facts.intervention)
        return change

    async def concern_recorded(self, uow: UnitOfWork, child_id: str, at: datetime) -> None:
        """A concern was just recorded about the child, so a referral awaits a decision: the case is
        open. The hot path of every submission, so one read when it already is (or one insert for a
        child seen for the first time); a closed case reopens through `evaluate`."""
        tx = uow.tx
        await self._repo.lock(tx, child_id)
        status = await self._repo.status(tx, child_id)
        if status == domain.CASE_OPEN:
            return
        if status is None:  # a first opening: nothing else can be open for a child without a case
            await self._repo.open_case(tx, child_id, at, types_pb2.INTERVENTION_UNSPECIFIED)
            return
        await self.evaluate(uow, child_id, at)

    async def closed_before(self, uow: UnitOfWork, child_id: str, cutoff: datetime) -> bool:
        """Is the child's case still closed since before `cutoff`? Asked again by the retention run
        in the unit of work that erases, holding the case: a concern since the listing reopened it."""
        await self._repo.lock(uow.tx, child_id)
        closed_at = await self._repo.closed_at(uow.tx, child_id)
        return closed_at is not None and utc(closed_at) < cutoff

    async def forget(self, uow: UnitOfWork, child_id: str) -> None:
        """Erasure, or a merge of this record into another: its case goes (ChildErased or
        ChildrenMerged says so; no CaseClosed)."""
        await self._repo.lock(uow.tx, child_id)
        await self._repo.forget(uow.tx, child_id)

    # Conferences' events (referrals-conferences) ---------------------------------------------------
    async def on_scheduled(self, uow: UnitOfWork, event: conference_events.ConferenceScheduled) -> None:
        if domain.about_a_place(event.kind):
            return
        at = _when(event.scheduled_at)
        await self._for_child(uow, event.conference_id, event.child_id)
        await self._repo.conference_opened(
            uow.tx, event.conference_id, event.child_id, domain.CONFERENCE_INTERVENTION.get(event.kind, 0), at
        )
        await self._repo.referral_announced(uow.tx, event.referral_id, event.child_id)
        await self.evaluate(uow, event.child_id, at)

    async def on_joined(self, uow: UnitOfWork, event: conference_events.ReferralJoinedConference) -> None:
        if domain.about_a_place(event.kind):
            return
        await self._for_child(uow, event.conference_id, event.child_id)
        # It joined an open conference (a later conclusion still wins).
        await self._repo.conference_opened(
            uow.tx, event.conference_id, event.child_id, domain.CONFERENCE_INTERVENTION.get(event.kind, 0), uow.now
        )
        await self._repo.referral_announced(uow.tx, event.referral_id, event.child_id)
        await self.evaluate(uow, event.child_id, uow.now)

    async def on_concluded(self, uow: UnitOfWork, event: conference_events.ConferenceConcluded) -> None:
        if domain.about_a_place(event.kind):
            return
        at = _when(event.concluded_at) if event.HasField("concluded_at") else uow.now
        await self._for_child(uow, event.conference_id, event.child_id)
        await self._repo.conference_closed(uow.tx, event.conference_id, event.child_id, at)
        await self._announced(uow, event.referral_ids, event.child_id)
        if event.review_conference_id:
            # The plan continues: its review is open in this same event, so the case never flaps.
            await self._for_child(uow, event.review_conference_id, event.child_id)
            review = (
                types_pb2.INTERVENTION_B
                if event.transition_to_contextual_safeguarding
                else domain.CONFERENCE_INTERVENTION.get(event.kind, 0)
            )
            await self._repo.conference_opened(uow.tx, event.review_conference_id, event.child_id, review, at)
        await self.evaluate(uow, event.child_id, at)

    async def on_cancelled(self, uow: UnitOfWork, event: conference_events.ConferenceCancelled) -> None:
        if domain.about_a_place(event.kind):
            return
        at = _when(event.cancelled_at)
        await self._for_child(uow, event.conference_id, event.child_id)
        await self._repo.conference_closed(uow.tx, event.conference_id, event.child_id, at)
        await self._announced(uow, event.referral_ids, event.child_id)
        if event.replaced_by_conference_id:
            # Escalation: the replacing conference (A's initial conference) is open in this same event.
            await self._for_child(uow, event.replaced_by_conference_id, event.child_id)
            await self._repo.conference_opened(uow.tx, event.replaced_by_conference_id, event.child_id, 0, at)
        await self.evaluate(uow, event.child_id, at)

    async def _announced(self, uow: UnitOfWork, referral_ids: Sequence[str], child_id: str) -> None:
        """Routings the closing conference took: announced, even if their own announcement was missed
        (older than the stream keeps, or still on its way)."""
        for referral_id in referral_ids:
            await self._repo.referral_announced(uow.tx, referral_id, child_id)

    async def _for_child(self, uow: UnitOfWork, conference_id: str, child_id: str) -> None:
        """A conference of a child referrals holds, and only ever of that child; anything else breaks
        the contract between the two services, and is parked for an operator (an erased child's
        events never get here: the consumer skips them)."""
        if not await self._repo.child_known(uow.tx, child_id):
            raise PoisonEvent("a conference of a child referrals does not hold")
        known = await self._repo.conference_child(uow.tx, conference_id)
        if known is not None and known != child_id:
            raise PoisonEvent("a conference named for another child")


__all__ = ["CaseRepository", "Cases"]
