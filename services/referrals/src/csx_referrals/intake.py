"""Sealed intake of concerns (docs/adr/0007): an envelope that csx_common.intake has verified and
opened is recorded exactly as a SubmitConcern call from the agency's system would be: the same
proto rules, the same use case, policy, audit, outbox event and idempotency.

Idempotent on the agency's reference: the idempotency key is derived from it, so a resend of the
same reference answers with the first concern's ids. Replays: the message id (with its agency) is
claimed in the inbox table in the use case's own unit of work, so the concern and its claim commit
together or not at all. A message id claimed before is REPLAYED (rolled back: nothing of it is
kept), unless it is JetStream redelivering the very message we answered (crash before the ack),
which is answered again. A resend answered with the first concern's ids records nothing; its claim
is written alone. Rejected messages leave no row anywhere.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from sqlalchemy import Table

from csx.intake.v1 import intake_pb2
from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.errors import Aborted, CsxError, DataLoss, InvalidArgument, Unavailable
from csx_common.identity import Principal
from csx_common.intake import Delivery, IntakeRejected, Opened
from csx_common.messaging.consumer import claim
from csx_common.unit_of_work import UnitOfWork, UnitsOfWork
from csx_common.validation import normalise_text, violations
from csx_referrals import domain
from csx_referrals.service import ReferralsService

INTAKE_DURABLE = "referrals-intake"
# The agency's system itself is the caller (its signature, not a user's token, identifies it).
SYSTEM_ROLE = "agency_system"
SYSTEM_PURPOSE = "referral_screening"
# Errors that say "not now" rather than "never": the message stays in the stream and is retried.
_TRANSIENT = (Unavailable, Aborted, DataLoss)


class _Claim:
    """One envelope's claim on its message id, made first in the unit of work that records it."""

    def __init__(self, inbox: Table, msg_id: str, redelivered: bool) -> None:
        self._inbox, self._msg_id, self._redelivered = inbox, msg_id, redelivered
        self.committed = False

    async def __call__(self, uow: UnitOfWork) -> None:
        if not await claim(uow.tx, self._inbox, INTAKE_DURABLE, self._msg_id) and not self._redelivered:
            raise IntakeRejected("REPLAYED")  # seen before, or the same envelope twice at once
        uow.tx.after_commit(self._committed)

    def _committed(self) -> None:
        self.committed = True


class ConcernIntake:
    def __init__(self, units: UnitsOfWork, inbox: Table, service: ReferralsService) -> None:
        self._units = units
        self._inbox = inbox
        self._service = service

    async def accept(self, opened: Opened, delivery: Delivery) -> intake_pb2.IntakeResult:
        try:
            request = pb.SubmitConcernRequest.FromString(opened.plaintext)
        except DecodeError:
            raise IntakeRejected("MALFORMED") from None
        request.DiscardUnknownFields()  # as at the gRPC edge: unnamed fields are never stored
        # The use case keys a concern on its submitter and reference; the request needs a key of
        # the contract's shape all the same (an envelope has none of its own).
        request.idempotency_key = domain.reference_key(opened.agency, request.agency_reference)
        normalise_text(request)
        found = violations(request)
        if found:
            raise IntakeRejected("INVALID", sorted({v.field for v in found}))
        system = Principal(f"{opened.agency}-system", opened.agency, SYSTEM_ROLE, SYSTEM_PURPOSE)
        envelope = _Claim(self._inbox, f"{opened.agency}:{opened.message_id}", delivery.redelivered)
        try:
            response = await self._service.submit_concern(system, request, before=envelope)
        except InvalidArgument as exc:
            raise IntakeRejected("INVALID", sorted({v.field for v in exc.violations})) from None
        except _TRANSIENT:
            raise
        except CsxError as exc:
            raise IntakeRejected(exc.reason) from None
        if not envelope.committed:
            # Answered with the first concern's ids (a resend of its reference): nothing recorded,
            # the claim rolled back with the rest; it is written alone.
            async with self._units.begin() as uow:
                await envelope(uow)
        return intake_pb2.IntakeResult(status=intake_pb2.INTAKE_STATUS_ACCEPTED, response=response)
