"""Sealed intake of concerns (docs/adr/0007): an envelope that csx_common.intake has verified and
opened is recorded exactly as a SubmitConcern call from the agency's system would be: the same
proto rules, the same use case, policy, audit, outbox event and idempotency.

Idempotent on the agency's reference: the idempotency key is derived from it, so a resend of the
same reference answers with the first concern's ids. Replays: the message id (with its agency) is
written to the inbox table once the concern is recorded; the same message id seen again is
REPLAYED, unless it is JetStream redelivering the very message we answered (crash before the ack),
which is answered again. Rejected messages leave no row anywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from sqlalchemy import Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from csx.intake.v1 import intake_pb2
from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.db import Database
from csx_common.errors import Aborted, CsxError, DataLoss, InvalidArgument, Unavailable
from csx_common.identity import Principal
from csx_common.intake import Delivery, IntakeRejected, Opened
from csx_common.validation import normalise_text, violations
from csx_referrals import domain
from csx_referrals.service import ReferralsService

INTAKE_DURABLE = "referrals-intake"
# The agency's system itself is the caller (its signature, not a user's token, identifies it).
SYSTEM_ROLE = "agency_system"
SYSTEM_PURPOSE = "referral_screening"
# Errors that say "not now" rather than "never": the message stays in the stream and is retried.
_TRANSIENT = (Unavailable, Aborted, DataLoss)


class ConcernIntake:
    def __init__(self, db: Database, inbox: Table, service: ReferralsService) -> None:
        self._db = db
        self._inbox = inbox
        self._service = service

    async def accept(self, opened: Opened, delivery: Delivery) -> intake_pb2.IntakeResult:
        seen_as = f"{opened.agency}:{opened.message_id}"
        if not delivery.redelivered and await self._seen(seen_as):
            raise IntakeRejected("REPLAYED")
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
        try:
            response = await self._service.submit_concern(system, request)
        except InvalidArgument as exc:
            raise IntakeRejected("INVALID", sorted({v.field for v in exc.violations})) from None
        except _TRANSIENT:
            raise
        except CsxError as exc:
            raise IntakeRejected(exc.reason) from None
        if not await self._claim(seen_as) and not delivery.redelivered:
            raise IntakeRejected("REPLAYED")  # the same envelope, twice at once: recorded once
        return intake_pb2.IntakeResult(status=intake_pb2.INTAKE_STATUS_ACCEPTED, response=response)

    async def _seen(self, msg_id: str) -> bool:
        c = self._inbox.c
        async with self._db.session() as session:
            row = await session.execute(select(c.msg_id).where(c.consumer == INTAKE_DURABLE, c.msg_id == msg_id))
            return row.first() is not None

    async def _claim(self, msg_id: str) -> bool:
        insert = pg_insert if self._db.is_postgres else sqlite_insert
        async with self._db.transaction() as session:
            result = await session.execute(
                insert(self._inbox)
                .values(consumer=INTAKE_DURABLE, msg_id=msg_id, received_at=datetime.now(UTC))
                .on_conflict_do_nothing()
            )
        return bool(result.rowcount)
