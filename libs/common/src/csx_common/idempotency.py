"""Idempotency keys: a retried write returns the first result instead of writing twice.

The key row is inserted in the same transaction as the write, so of two concurrent requests with
one key, one commits and the other fails on the primary key and then reads the first's answer.
The request is fingerprinted with a keyed hash and the remembered response is sealed like any
record (its personal fields encrypted): neither is ever stored in clear.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf import message as pb_message
from sqlalchemy import JSON, Column, DateTime, LargeBinary, MetaData, String, Table, select

from csx_common.db import Tx
from csx_common.errors import FailedPrecondition
from csx_common.sealing import Sealer

R = TypeVar("R", bound=pb_message.Message)


IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"


def idempotency_table(metadata: MetaData) -> Table:
    return Table(
        "idempotency_keys",
        metadata,
        Column("scope", String(100), primary_key=True),
        Column("key", String(64), primary_key=True),
        Column("fingerprint", String(64), nullable=False),
        Column("response", LargeBinary, nullable=False),
        Column("sealed", JSON, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )


class IdempotencyKeys:
    def __init__(self, table: Table, fingerprint_key: bytes, sealer: Sealer) -> None:
        self.table = table
        # A key of its own, derived from the given one, so fingerprints and blind indexes never
        # share a key even when the same secret is handed to both.
        self._key = hmac.new(fingerprint_key, b"csx-idempotency-fingerprint", hashlib.sha256).digest()
        self._sealer = sealer

    def fingerprint(self, request: pb_message.Message) -> str:
        return hmac.new(self._key, request.SerializeToString(deterministic=True), hashlib.sha256).hexdigest()

    async def find(
        self, session: Tx, scope: str, key: str, request: pb_message.Message, response_type: type[R]
    ) -> R | None:
        row = (
            await session.execute(
                select(self.table.c.fingerprint, self.table.c.response, self.table.c.sealed).where(
                    self.table.c.scope == scope, self.table.c.key == key
                )
            )
        ).first()
        if row is None:
            return None
        if row.fingerprint != self.fingerprint(request):
            raise FailedPrecondition(
                "idempotency key was already used for a different request",
                subject="idempotency_key",
                reason=IDEMPOTENCY_KEY_REUSED,
            )
        return await self._sealer.open_record(
            session, response_type, row.response, row.sealed, table="idempotency_keys", record_id=f"{scope}/{key}"
        )

    async def remember(
        self,
        session: Tx,
        scope: str,
        key: str,
        request: pb_message.Message,
        response: pb_message.Message,
        *,
        seal_scope: str,
    ) -> None:
        # Under the child's key when the answer is about a child: a remembered answer holds the same
        # sealed text as the record (a reason, say), and must be erased with it.
        body, sealed = await self._sealer.seal_record(
            session,
            response,
            table="idempotency_keys",
            record_id=f"{scope}/{key}",
            scope=seal_scope,
        )
        await session.insert(
            self.table,
            dict(
                scope=scope,
                key=key,
                fingerprint=self.fingerprint(request),
                response=body,
                sealed=sealed,
                created_at=datetime.now(UTC),
            ),
        )
