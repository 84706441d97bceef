"""Erasure by key destruction, as every service does it.

Referrals decides an erasure (two people, or the retention schedule) and publishes ChildErased;
each other service applies it from its `<service>-disclosure` consumer of referrals' events, in
one transaction: destroy the child's data keys (leaving a tombstone), let the service forget
what it holds in the clear about the child (its `forget` hook, e.g. the panel's place links),
and audit it with who requested and approved. Reads of the child's records then answer NOT_FOUND
(RECORD_ERASED), here and in any copy of the rows once the KEKs that wrapped the keys are rotated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any

from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.types.v1 import types_pb2
from csx_common.audit import AuditEntry, AuditLog
from csx_common.datakeys import DataKeys, child_scope
from csx_common.db import Tx
from csx_common.messaging.consumer import Route
from csx_common.messaging.routes import route
from csx_common.unit_of_work import UnitOfWork

Forget = Callable[[Tx, str], Awaitable[None]]
ERASURE_ROLE = "data_protection_officer"
RECORDS_MANAGEMENT = "records_management"


def erasure_entry(actor: str, *, erasure_id: str, child_id: str, rule_id: str) -> AuditEntry:
    """The audit tombstone of an erasure: who, which rule; the reason stays sealed in referrals."""
    return AuditEntry(
        actor_user_id=actor,
        actor_agency=types_pb2.AGENCY_SOCIAL_CARE,
        actor_role=ERASURE_ROLE,
        purpose=RECORDS_MANAGEMENT,
        action="erase",
        decision="allow",
        rule_id=rule_id,
        record_type="erasure",
        record_id=erasure_id,
        child_id=child_id,
    )


class ChildErasure:
    def __init__(self, keys: DataKeys, audit: Callable[[], AuditLog | None], forget: Forget | None = None) -> None:
        self._keys = keys
        self._audit = audit
        self._forget = forget

    def routes(self) -> list[Route[Any]]:
        """Checked against ChildErased's contract first: a malformed erasure is parked, not applied (a
        child id that is not a UUID would tombstone a scope no record has, and a user id the audit
        chain cannot hold would fail, and be retried)."""
        return [route(safeguarding_events.ChildErased, self._on_erased)]

    async def _on_erased(self, uow: UnitOfWork, event: safeguarding_events.ChildErased) -> None:
        session = uow.tx
        await self._keys.destroy(session, child_scope(event.child_id), event.erased_at.ToDatetime(tzinfo=UTC))
        if self._forget is not None:
            await self._forget(session, event.child_id)
        audit = self._audit()
        if audit is not None:
            # Approved by the second person (or the retention schedule): the act recorded here.
            actor = event.approved_by or event.requested_by
            await audit.append(
                session,
                erasure_entry(actor, erasure_id=event.erasure_id, child_id=event.child_id, rule_id="erasure-applied"),
            )
