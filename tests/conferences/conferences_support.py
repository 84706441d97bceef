"""Test support for the conferences service: the service wired as app.py wires it, its units of work
with a settable clock and a counting relay notifier. (A plainly named module: conftest is not
importable.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from csx.referrals.v1 import events_pb2 as referral_events
from csx.types.v1 import types_pb2
from csx_common.audit import AuditLog
from csx_common.datakeys import DataKeys
from csx_common.db import Database
from csx_common.idempotency import IdempotencyKeys
from csx_common.keyring import FileKeyring
from csx_common.messaging.outbox import Outbox
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry
from csx_common.unit_of_work import UnitsOfWork
from csx_conferences import tables
from csx_conferences.app import SERVICE
from csx_conferences.consumers import referrals_consumer
from csx_conferences.repository import ConferencesRepository
from csx_conferences.service import ConferencesService
from csx_safeguarding.disclosure import Discloser, DisclosureViews
from csx_safeguarding.policy import PolicyEngine


@dataclass
class Clock:
    now: datetime = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Harness:
    db: Database
    db_url: str
    service: ConferencesService
    clock: Clock
    keyring: FileKeyring
    notified: list[int] = field(default_factory=list)

    @property
    def units(self) -> UnitsOfWork:
        return self.service._units

    async def deliver(self, event: referral_events.ReferralRouted) -> None:
        """What the inbox consumer does with a fresh message: the route's handler, in one unit of work."""
        (route,) = referrals_consumer(self.service).routes
        assert route.handler is not None
        async with self.units.begin() as uow:
            await route.handler(uow, event)


def routed(
    referral_id: str,
    child_id: str,
    intervention: int = types_pb2.INTERVENTION_B,
    *,
    strategy_discussion_on: str = "",
    routed_at: datetime = datetime(2026, 3, 2, 9, 0, tzinfo=UTC),
) -> referral_events.ReferralRouted:
    at = timestamp_pb2.Timestamp()
    at.FromDatetime(routed_at)
    return referral_events.ReferralRouted(
        referral_id=referral_id,
        child_id=child_id,
        intervention=intervention,
        strategy_discussion_on=strategy_discussion_on,
        routed_at=at,
    )


def make_service(db: Database, keyring: FileKeyring, clock: Clock, notified: list[int]) -> ConferencesService:
    sealer = Sealer(DataKeys(tables.data_keys, keyring, SERVICE), registry())
    audit = AuditLog(tables.audit)
    units = UnitsOfWork(
        db,
        outbox=Outbox(tables.delivery, wake=lambda: notified.append(1)),
        sealer=sealer,
        idempotency=IdempotencyKeys(tables.idempotency, keyring.blind_index_key, sealer),
        audit=audit,
        clock=clock,
    )
    return ConferencesService(
        units,
        ConferencesRepository(sealer),
        Discloser(PolicyEngine.default(), registry(), audit),
        DisclosureViews(tables.disclosure, postgres=db.is_postgres),
        contextual_review_working_days=15,
    )
