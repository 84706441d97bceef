"""The unit of work (Cosmic Python's pattern): one object per use case, carrying its transaction,
its caller, the time it runs at, and the means to publish, audit and seal in that transaction.

A use case is `async def work(uow) -> Response`; the service runs it with `units.run(work,
caller=..., once=Once(...))`. It never opens a transaction, never reads a context variable, and
never looks at the clock itself: all of that is here, so what a use case does is all it says.

Idempotency: with `once`, the response is remembered with the request's fingerprint in the same
transaction, sealed under the key scope the use case declared (`uow.seals_under(...)`: a child's
answer is erased with the child). There is no read before the work: a replay's key collides at the
end (its whole transaction rolled back) and the retry answers with the stored response; a replay
whose work now fails (the referral already decided, say) also answers with the stored response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from google.protobuf import message as pb_message
from sqlalchemy.exc import IntegrityError

from csx_common.audit import AuditLog
from csx_common.db import ConnectionLost, Database, Tx
from csx_common.errors import CsxError
from csx_common.idempotency import IdempotencyKeys
from csx_common.identity import Principal
from csx_common.messaging.outbox import Outbox
from csx_common.messaging.topology import topology
from csx_common.sealing import Sealer

R = TypeVar("R", bound=pb_message.Message)


@dataclass(frozen=True, slots=True)
class Once(Generic[R]):
    """A use case's idempotency: a replay of `key` in `scope` answers with the first response."""

    scope: str
    key: str
    request: pb_message.Message
    response_type: type[R]


class UnitOfWork:
    __slots__ = ("_outbox", "_scope", "audit", "caller", "now", "sealer", "tx")

    def __init__(
        self,
        tx: Tx,
        caller: Principal | None,
        now: datetime,
        *,
        outbox: Outbox | None,
        sealer: Sealer | None,
        audit: AuditLog | None,
    ) -> None:
        self.tx = tx
        self.caller = caller
        self.now = now
        self.sealer = sealer
        self.audit = audit
        self._outbox = outbox
        self._scope: str | None = None

    async def publish(self, event: pb_message.Message, **subject_params: str) -> str:
        """The event goes out after this unit commits (the transactional outbox), never before, on
        the subject its contract declares (csx_common.messaging.topology); `subject_params` fill
        that subject's placeholders: `uow.publish(decided, agency="police")`."""
        if self._outbox is None:
            raise RuntimeError("this service publishes no events")
        return await self._outbox.add(self.tx, topology().subject(event, **subject_params), event)

    def seals_under(self, scope: str) -> None:
        """The data key scope the answer is about (a child's, a place's): a remembered answer is
        sealed under it, so erasing that scope erases the answer too."""
        self._scope = scope

    @property
    def scope(self) -> str | None:
        return self._scope


Work = Callable[[UnitOfWork], Awaitable[R]]
# Writes in a unit of work that answer nothing (an event's effect, an inbox claim).
Apply = Callable[[UnitOfWork], Awaitable[None]]


class UnitsOfWork:
    """Runs a service's use cases, each in a unit of work of its own."""

    def __init__(
        self,
        db: Database,
        *,
        outbox: Outbox | None = None,
        sealer: Sealer | None = None,
        idempotency: IdempotencyKeys | None = None,
        audit: AuditLog | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self._outbox = outbox
        self._sealer = sealer
        self._idem = idempotency
        self.audit = audit  # set once at composition, when the service keeps an audit log
        self.clock = clock

    def _unit(self, tx: Tx, caller: Principal | None) -> UnitOfWork:
        return UnitOfWork(tx, caller, self.clock(), outbox=self._outbox, sealer=self._sealer, audit=self.audit)

    @asynccontextmanager
    async def begin(self, caller: Principal | None = None) -> AsyncIterator[UnitOfWork]:
        """A unit of work for the kernel's own flows (an inbox row and the event's effect)."""
        async with self.db.transaction() as tx:
            yield self._unit(tx, caller)

    async def run(
        self,
        work: Work[R],
        *,
        caller: Principal | None,
        once: Once[R] | None = None,
        before: Apply | None = None,
    ) -> R:
        """`work` in a unit of work of its own, remembered under `once` if given. `before`: writes
        of the caller's that must commit with the work or not at all (sealed intake's claim on its
        envelope), run first in the same unit of work, on every attempt."""
        if before is not None:
            work = _after(before, work)
        try:
            return await self._run(work, caller, once)
        except ConnectionLost:
            return await self._run(work, caller, once)  # it wrote nothing: once more, on a new connection

    async def _run(self, work: Work[R], caller: Principal | None, once: Once[R] | None) -> R:
        if once is None:
            async with self.begin(caller) as unit:
                return await work(unit)
        try:
            return await self._run_and_remember(work, caller, once)
        except ConnectionLost:
            raise  # nothing was written, nor answered before: run() runs it again
        except (IntegrityError, CsxError) as exc:
            # Most likely a replay: its key collided (committed or batched by the first request), or
            # its work now fails (the referral already decided). Either way the first answer stands.
            prior = await self._prior(once)
            if prior is not None:
                return prior
            if isinstance(exc, CsxError):
                raise
        # Something else of the work collided with a concurrent writer: once more, on what it wrote.
        return await self._run_and_remember(work, caller, once)

    async def _run_and_remember(self, work: Work[R], caller: Principal | None, once: Once[R]) -> R:
        if self._idem is None:
            raise RuntimeError("this service keeps no idempotency keys")
        async with self.db.transaction() as tx:
            unit = self._unit(tx, caller)
            response = await work(unit)
            if unit.scope is None:
                # Not a default: an answer about a child sealed under the service's key would
                # outlive the child's erasure.
                raise RuntimeError("an idempotent use case declares the key scope of its answer (uow.seals_under)")
            await self._idem.remember(tx, once.scope, once.key, once.request, response, seal_scope=unit.scope)
        return response

    async def _prior(self, once: Once[R]) -> R | None:
        assert self._idem is not None
        # Through the writer: the first request may be in the batch not yet committed.
        async with self.db.transaction() as tx:
            return await self._idem.find(tx, once.scope, once.key, once.request, once.response_type)


def _after(first: Apply, work: Work[R]) -> Work[R]:
    async def both(uow: UnitOfWork) -> R:
        await first(uow)
        return await work(uow)

    return both
