"""A safeguarding service's process: csx_common's ServiceRuntime with the safeguarding kernel wired
in: the one disclosure policy (every read, and which agencies' users may hold which roles, checked on
every call before any handler), the local view of consent and sharing decisions, and erasure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import message as pb_message

from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx_common.datakeys import child_scope
from csx_common.db import Tx
from csx_common.messaging.routes import consumer
from csx_common.runtime import ServiceRuntime
from csx_common.settings import ServiceSettings
from csx_safeguarding.disclosure import DisclosureTables, DisclosureViews
from csx_safeguarding.erasure import ChildErasure, Forget
from csx_safeguarding.policy import PolicyEngine


class SafeguardingRuntime(ServiceRuntime):
    def __init__(self, service: str, settings: ServiceSettings, *, migrations: Path, **kwargs: Any) -> None:
        self.policy = PolicyEngine.default()
        super().__init__(service, settings, migrations=migrations, admits=self.policy.admits, **kwargs)

    def disclosure_views(self, tables: DisclosureTables, *, forget: Forget | None = None) -> DisclosureViews:
        """This service's local view of consent and sharing decisions, kept current by a durable
        consumer (`<service>-disclosure`) of referrals' events. The same consumer applies erasures
        (ChildErased): the child's data keys destroyed, `forget` run, the act audited."""
        views = DisclosureViews(tables, postgres=self.db.is_postgres)
        erasure = ChildErasure(self.data_keys, lambda: self.units.audit, forget)
        # Its stream and subjects are the contract's: referrals' stream, where it publishes them.
        self.add_consumer(consumer(f"{self.service}-disclosure", views.routes() + erasure.routes()))
        return views

    async def obsolete(self, session: Tx, event: pb_message.Message, *, lock: bool) -> bool:
        """An event about a child erased since it was published has nothing left to act on. (The
        erasure itself is always applied: destroying keys again is harmless.) With `lock`, an erasure
        of the child waits for this transaction, so what it writes cannot outlive the erasure."""
        child_id = getattr(event, "child_id", "")
        if not child_id or isinstance(event, safeguarding_events.ChildErased):
            return False
        return await self.data_keys.erased(session, child_scope(child_id), lock=lock)
