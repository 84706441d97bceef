"""Erasure and retention: the child's data keys destroyed, here and (through ChildErased) everywhere.

Two people for an erasure on request (a data protection officer asks, another approves); the
retention schedule for the rest (35 years after the child's case closed, domain.RETENTION_YEARS;
kept in csx_referrals.cases). Either way one transaction destroys the keys, forgets the
identity indexes, closes any open referral, drops the case, writes the audit tombstone and the
ChildErased event, or none of it happens.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from csx.referrals.v1 import referrals_pb2 as pb
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.safeguarding.v1 import safeguarding_pb2
from csx_common.audit import AuditLog
from csx_common.datakeys import child_scope
from csx_common.errors import FailedPrecondition, NotFound, PermissionDenied
from csx_common.identity import Principal
from csx_common.timestamps import ts
from csx_common.unit_of_work import Once, UnitOfWork, UnitsOfWork
from csx_referrals import domain
from csx_referrals.cases import Cases
from csx_referrals.repository import ReferralsRepository
from csx_safeguarding.erasure import erasure_entry
from csx_safeguarding.policy import PolicyEngine

RETENTION_SCHEDULE = "retention_schedule"
DEFAULT_RUN_LIMIT = 1000


# The commands of this service, each named in the policy's `commands` section (checked at start-up):
# social care's data protection officers, never a call without a named user.
COMMANDS = ("request_erasure", "approve_erasure", "erase_due")


class ErasureService:
    def __init__(
        self,
        units: UnitsOfWork,
        repo: ReferralsRepository,
        audit: AuditLog,
        *,
        retention_years: int = domain.RETENTION_YEARS,
        policy: PolicyEngine | None = None,
        cases: Cases | None = None,
    ) -> None:
        """`policy`: the process's one policy (the runtime's); by default the shipped one."""
        self._policy = policy if policy is not None else PolicyEngine.default()
        self._policy.require_commands(COMMANDS)
        self._units = units
        self._repo = repo
        self._audit = audit
        self._retention_years = retention_years
        self._cases = cases or Cases()

    def _erasure_officer(self, command: str, user: Principal | None) -> Principal:
        if user is None or not self._policy.permits_caller(command, user).allowed:
            raise PermissionDenied(
                "erasure is for social care's data protection officers", reason="ERASURE_ROLE_REQUIRED"
            )
        return user

    async def request(self, caller: Principal | None, request: pb.RequestErasureRequest) -> pb.RequestErasureResponse:
        user = self._erasure_officer("request_erasure", caller)

        async def work(uow: UnitOfWork) -> pb.RequestErasureResponse:
            uow.seals_under(child_scope(request.child_id))
            if not await self._repo.child_exists(uow.tx, request.child_id):
                raise NotFound("child not found")
            record = pb.ErasureRecord(
                erasure_id=str(uuid.uuid4()),
                child_id=request.child_id,
                basis=request.basis,
                reason=request.reason,
                requested_by=user.user_id,
                requested_at=ts(uow.now),
            )
            await self._repo.add_erasure(uow.tx, record)
            entry = erasure_entry(
                user.user_id, erasure_id=record.erasure_id, child_id=record.child_id, rule_id="erasure-requested"
            )
            await self._audit.append(uow.tx, entry)
            return pb.RequestErasureResponse(erasure=record)

        once = Once(f"erasure:{user.user_id}", request.idempotency_key, request, pb.RequestErasureResponse)
        return await self._units.run(work, caller=caller, once=once)

    async def approve(self, caller: Principal | None, request: pb.ApproveErasureRequest) -> pb.ApproveErasureResponse:
        user = self._erasure_officer("approve_erasure", caller)

        async def work(uow: UnitOfWork) -> pb.ApproveErasureResponse:
            session = uow.tx
            record = await self._repo.get_erasure(session, request.erasure_id)
            if record is None:
                raise NotFound("erasure request not found")
            if record.HasField("erased_at"):
                raise FailedPrecondition("this erasure was already carried out", reason="ALREADY_ERASED")
            # Two people, never one: a fact of this erasure record (who requested it), so the use
            # case's check, not the policy's (the policy says who may approve at all).
            if record.requested_by == user.user_id:
                raise PermissionDenied("a second person must approve an erasure", reason="SECOND_APPROVER_REQUIRED")
            if not await self._repo.child_exists(session, record.child_id):
                raise FailedPrecondition("the child was already erased", reason="ALREADY_ERASED")
            record.approved_by = user.user_id
            await self._erase(uow, record, rule_id="erasure-approved")
            return pb.ApproveErasureResponse(erasure=record)

        return await self._units.run(work, caller=caller)

    async def erase_due(self, caller: Principal | None, request: pb.EraseDueRequest) -> pb.EraseDueResponse:
        user = self._erasure_officer("erase_due", caller)
        now = self._units.clock()
        cutoff = domain.retention_cutoff(now, self._retention_years)
        limit = request.limit or DEFAULT_RUN_LIMIT
        async with self._units.db.session() as session:
            due = await self._repo.children_closed_before(session, cutoff, limit)
        response = pb.EraseDueResponse(due=len(due), closed_before=ts(cutoff))
        if request.dry_run:
            return response
        for child_id in due:  # one unit of work each: a long run commits as it goes, and resumes
            erased = await self._units.run(
                lambda uow, child_id=child_id: self._erase_by_schedule(uow, user, child_id, cutoff), caller=caller
            )
            if erased is not None:
                response.erased.append(erased)
        return response

    async def _erase_by_schedule(
        self, uow: UnitOfWork, user: Principal, child_id: str, cutoff: datetime
    ) -> pb.ErasureRecord | None:
        # Asked again where it is erased: erased meanwhile, or the case reopened since the listing.
        if not await self._repo.child_exists(uow.tx, child_id):
            return None
        # The child's key lock before the case's, the order every other writer takes them in (a
        # conferences event: the consumer's erased-check, then the case), so the two never deadlock.
        await self._repo.lock_child_keys(uow.tx, child_id)
        if not await self._cases.closed_before(uow, child_id, cutoff):
            return None
        record = pb.ErasureRecord(
            erasure_id=str(uuid.uuid4()),
            child_id=child_id,
            basis=safeguarding_pb2.ERASURE_BASIS_RETENTION_ENDED,
            reason=f"Retention period of {self._retention_years} years after case closure has ended.",
            requested_by=user.user_id,
            requested_at=ts(uow.now),
            approved_by=RETENTION_SCHEDULE,
        )
        await self._repo.add_erasure(uow.tx, record)
        await self._erase(uow, record, rule_id="erasure-retention")
        return record

    async def _erase(self, uow: UnitOfWork, record: pb.ErasureRecord, *, rule_id: str) -> None:
        session, now = uow.tx, uow.now
        record.erased_at.CopyFrom(ts(now))
        if not await self._repo.mark_erased(session, record):  # first, so a second approver stops here
            raise FailedPrecondition("this erasure was already carried out", reason="ALREADY_ERASED")
        record.keys_destroyed = await self._repo.destroy_child_keys(session, record.child_id, now)
        await self._repo.erase_child_indexes(session, record.child_id, now)
        await self._repo.close_open_referrals(session, record.child_id, now)
        await self._cases.forget(uow, record.child_id)  # ids and times only, but nothing left to keep
        actor = record.approved_by if record.approved_by != RETENTION_SCHEDULE else record.requested_by
        await self._audit.append(
            session, erasure_entry(actor, erasure_id=record.erasure_id, child_id=record.child_id, rule_id=rule_id)
        )
        await uow.publish(
            safeguarding_events.ChildErased(
                erasure_id=record.erasure_id,
                child_id=record.child_id,
                basis=record.basis,
                requested_by=record.requested_by,
                approved_by=record.approved_by,
                erased_at=record.erased_at,
            ),
        )
