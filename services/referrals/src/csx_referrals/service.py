"""Referral use cases. Each owns its transaction: state, outbox event and idempotency key commit
together, and the relay is woken after the commit."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from csx.referrals.v1 import events_pb2 as events
from csx.referrals.v1 import referrals_pb2 as pb
from csx.types.v1 import types_pb2
from csx_common.db import Database
from csx_common.errors import Aborted, FailedPrecondition, NotFound
from csx_common.idempotency import IdempotencyKeys
from csx_common.messaging.events import StreamSpec
from csx_common.messaging.outbox import Outbox
from csx_referrals import domain
from csx_referrals.repository import ReferralsRepository, ts


class ReferralsService:
    def __init__(
        self,
        db: Database,
        repo: ReferralsRepository,
        outbox: Outbox,
        idempotency: IdempotencyKeys,
        stream: StreamSpec,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._repo = repo
        self._outbox = outbox
        self._idem = idempotency
        self._stream = stream
        self._clock = clock

    async def submit_concern(self, request: pb.SubmitConcernRequest) -> pb.SubmitConcernResponse:
        scope = f"submit_concern:{request.agency}"

        async def work(session) -> pb.SubmitConcernResponse:  # type: ignore[no-untyped-def]
            now = self._clock()
            child_id = await self._repo.find_or_create_child(session, request.child, now)
            due = domain.decision_due_on(now.date())
            referral_id = await self._repo.open_referral_for(session, child_id)
            if referral_id is None:
                referral_id = await self._repo.open_referral(session, child_id, now, due)
            concern = pb.Concern(
                concern_id=str(uuid.uuid4()),
                referral_id=referral_id,
                child_id=child_id,
                agency=request.agency,
                agency_reference=request.agency_reference,
                referrer=request.referrer,
                child=request.child,
                harm_types=request.harm_types,
                contexts=request.contexts,
                narrative=request.narrative,
                recorded_at=ts(now),
            )
            if request.HasField("intelligence"):
                concern.intelligence.CopyFrom(request.intelligence)
            await self._repo.add_concern(session, concern)
            await self._outbox.add(
                session,
                self._stream.subject("concern_recorded"),
                events.ConcernRecorded(
                    concern_id=concern.concern_id,
                    referral_id=referral_id,
                    child_id=child_id,
                    agency=request.agency,
                    harm_types=request.harm_types,
                    contexts=request.contexts,
                    recorded_at=concern.recorded_at,
                ),
            )
            return pb.SubmitConcernResponse(
                concern_id=concern.concern_id,
                referral_id=referral_id,
                child_id=child_id,
                recorded_at=concern.recorded_at,
                decision_due_on=due.isoformat(),
            )

        response, _ = await self._idem.run_once(
            self._db, scope, request.idempotency_key, request, pb.SubmitConcernResponse, work
        )
        return response

    async def get_concern(self, concern_id: str) -> pb.Concern:
        async with self._db.session() as session:
            concern = await self._repo.get_concern(session, concern_id)
        if concern is None:
            raise NotFound("concern not found")
        return concern

    async def get_referral(self, referral_id: str) -> pb.Referral:
        async with self._db.session() as session:
            found = await self._repo.get_referral(session, referral_id)
        if found is None:
            raise NotFound("referral not found")
        return found[0]

    async def record_screening_decision(
        self, request: pb.RecordScreeningDecisionRequest
    ) -> pb.RecordScreeningDecisionResponse:
        async def work(session) -> pb.RecordScreeningDecisionResponse:  # type: ignore[no-untyped-def]
            found = await self._repo.get_referral(session, request.referral_id)
            if found is None:
                raise NotFound("referral not found")
            referral, version = found
            if referral.status != pb.REFERRAL_STATUS_AWAITING_DECISION:
                raise FailedPrecondition(
                    "referral already has a screening decision",
                    subject=f"referrals/{request.referral_id}",
                    reason="REFERRAL_ALREADY_DECIDED",
                )
            now = self._clock()
            referral.status = domain.status_after(request.outcome)
            referral.outcome = request.outcome
            referral.reason = request.reason
            referral.decided_by = request.decided_by
            referral.strategy_discussion_on = request.strategy_discussion_on
            referral.decided_at.CopyFrom(ts(now))
            if not await self._repo.record_decision(session, referral, version):
                raise Aborted("referral changed concurrently; read it again")
            intervention = domain.ROUTES.get(request.outcome)
            if intervention is not None:
                await self._outbox.add(
                    session,
                    self._stream.subject("referral_routed"),
                    events.ReferralRouted(
                        referral_id=referral.referral_id,
                        child_id=referral.child_id,
                        intervention=intervention,
                        strategy_discussion_on=request.strategy_discussion_on,
                        routed_at=referral.decided_at,
                    ),
                )
            return pb.RecordScreeningDecisionResponse(referral=referral)

        response, _ = await self._idem.run_once(
            self._db,
            f"screening_decision:{request.referral_id}",
            request.idempotency_key,
            request,
            pb.RecordScreeningDecisionResponse,
            work,
        )
        return response


__all__ = ["ReferralsService", "types_pb2"]
