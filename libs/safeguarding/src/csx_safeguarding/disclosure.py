"""Disclosure on every read: the policy decides each field, what may not be seen is cleared and
named, the record answers NOT_FOUND to a caller with no basis for it, and every allow and every deny
is audited with the rule that decided (docs/security.md).

Each service keeps a local view of the child's consent and sharing decisions, fed by referrals'
events (`ConsentChanged`, `SharingDecisionRecorded`), so a withdrawal reaches every service's next
read within the event pipeline's latency (well under a second), without a synchronous call.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from google.protobuf import message as pb_message
from google.protobuf.descriptor import FieldDescriptor
from sqlalchemy import JSON, Boolean, Column, DateTime, Index, Integer, MetaData, String, Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.safeguarding.v1 import safeguarding_pb2
from csx_common.audit import AuditEntry, AuditLog
from csx_common.db import Tx
from csx_common.errors import PermissionDenied
from csx_common.identity import Principal
from csx_common.messaging.consumer import Route
from csx_common.messaging.routes import route
from csx_common.sensitivity import SensitivityRegistry, descriptor_of
from csx_common.timestamps import utc
from csx_common.unit_of_work import UnitOfWork
from csx_safeguarding.policy import (
    AGENCY_BY_NAME,
    AGENCY_NAME,
    BreakGlassGrant,
    Consent,
    ConsentStatus,
    Decision,
    DisclosureContext,
    FieldSpec,
    FieldSubject,
    Involvement,
    LawfulBasis,
    PolicyEngine,
    Purpose,
    Requester,
    Role,
    SharingDecision,
)

CONSENT_STATUS = {
    safeguarding_pb2.CONSENT_STATUS_GIVEN: ConsentStatus.GIVEN,
    safeguarding_pb2.CONSENT_STATUS_REFUSED: ConsentStatus.REFUSED,
    safeguarding_pb2.CONSENT_STATUS_WITHDRAWN: ConsentStatus.WITHDRAWN,
    safeguarding_pb2.CONSENT_STATUS_NOT_SOUGHT: ConsentStatus.NOT_SOUGHT,
}
LAWFUL_BASIS = {
    safeguarding_pb2.LAWFUL_BASIS_SCH1_PARA18: LawfulBasis.SCH1_PARA18,
    safeguarding_pb2.LAWFUL_BASIS_PUBLIC_TASK: LawfulBasis.PUBLIC_TASK,
    safeguarding_pb2.LAWFUL_BASIS_LEGAL_OBLIGATION: LawfulBasis.LEGAL_OBLIGATION,
    safeguarding_pb2.LAWFUL_BASIS_VITAL_INTERESTS: LawfulBasis.VITAL_INTERESTS,
}
# Who a partner agency's portal reads as, for the policy (a practitioner delivering actions).
PORTAL_ROLES = {
    "police": Role.POLICE_OFFICER,
    "education": Role.DSL,
    "health": Role.HEALTH_SAFEGUARDING_NURSE,
    "youth_justice": Role.YOUTH_JUSTICE_WORKER,
    "social_care": Role.SOCIAL_WORKER,
}

# The views hold no reason (it stays in referrals, sealed); the policy only needs to know one exists.
REASON_HELD_BY_REFERRALS = "recorded in referrals"


def requester(user: Principal) -> Requester:
    """The policy's view of the originating user; a token with an unknown agency, role or purpose
    is refused rather than guessed at."""
    try:
        return Requester(user.user_id, AGENCY_BY_NAME[user.agency], Role(user.role), Purpose(user.purpose))
    except (KeyError, ValueError):
        raise PermissionDenied("unknown agency, role or purpose in the user's token", reason="UNKNOWN_ROLE") from None


class ConsentRecorded(Protocol):
    """What a consent record looks like, wherever it comes from (referrals' record, or the event)."""

    @property
    def status(self) -> int: ...
    @property
    def agencies(self) -> Sequence[int]: ...
    @property
    def data_classes(self) -> Sequence[int]: ...


def consent_from(record: ConsentRecorded | None) -> Consent:
    if record is None or record.status == safeguarding_pb2.CONSENT_STATUS_UNSPECIFIED:
        return Consent()
    return Consent(
        CONSENT_STATUS[safeguarding_pb2.ConsentStatus.ValueType(record.status)],
        frozenset(record.agencies) or None,
        frozenset(record.data_classes) or None,
    )


@dataclass(frozen=True)
class DisclosureTables:
    consent: Table
    sharing: Table
    break_glass: Table


def disclosure_tables(metadata: MetaData) -> DisclosureTables:
    return DisclosureTables(
        Table(
            "consent_view",
            metadata,
            Column("child_id", String(36), primary_key=True),
            Column("status", Integer, nullable=False),
            Column("agencies", JSON, nullable=False),
            Column("data_classes", JSON, nullable=False),
            Column("version", Integer, nullable=False),
        ),
        Table(
            "sharing_view",
            metadata,
            Column("decision_id", String(36), primary_key=True),
            Column("child_id", String(36), nullable=False, index=True),
            Column("share", Boolean, nullable=False),
            Column("lawful_basis", Integer, nullable=False),
            Column("approver", String(64), nullable=False),
            Column("agencies", JSON, nullable=False),
            Column("data_classes", JSON, nullable=False),
            Column("expires_at", DateTime(timezone=True)),
        ),
        Table(
            "break_glass_view",
            metadata,
            Column("grant_id", String(36), primary_key=True),
            Column("child_id", String(36), nullable=False),
            Column("user_id", String(64), nullable=False),
            Column("granted_at", DateTime(timezone=True), nullable=False),
            Column("expires_at", DateTime(timezone=True), nullable=False),
            Index("ix_break_glass_view_user_child", "user_id", "child_id"),
        ),
    )


class DisclosureViews:
    """This service's copy of every child's consent and sharing decisions."""

    def __init__(self, tables: DisclosureTables, *, postgres: bool) -> None:
        self._t = tables
        self._insert = pg_insert if postgres else sqlite_insert

    def routes(self) -> list[Route[Any]]:
        """The view's routes, each checked against its event's contract first: a malformed event
        (a status outside CONSENT_STATUS, a zero in a scope, a share without a lawful basis, a grant
        longer than an hour) is parked, never stored, as it would fail every later read of the child."""
        return [
            route(safeguarding_events.ConsentChanged, self._on_consent),
            route(safeguarding_events.SharingDecisionRecorded, self._on_sharing),
            route(safeguarding_events.BreakGlassGranted, self._on_break_glass),
        ]

    async def _on_break_glass(self, uow: UnitOfWork, event: safeguarding_events.BreakGlassGranted) -> None:
        session = uow.tx
        await session.execute(
            self._insert(self._t.break_glass)
            .values(
                grant_id=event.grant_id,
                child_id=event.child_id,
                user_id=event.user_id,
                granted_at=event.granted_at.ToDatetime(tzinfo=UTC),
                expires_at=event.expires_at.ToDatetime(tzinfo=UTC),
            )
            .on_conflict_do_nothing()
        )

    async def grant(self, session: Tx, user_id: str, child_id: str, at: datetime) -> BreakGlassGrant | None:
        """The user's grant for the child in force at `at` (None once it has expired)."""
        b = self._t.break_glass.c
        row = (
            await session.execute(
                select(b.grant_id, b.granted_at, b.expires_at)
                .where(b.user_id == user_id, b.child_id == child_id, b.expires_at > at, b.granted_at <= at)
                .limit(1)
            )
        ).first()
        if row is None:
            return None
        return BreakGlassGrant(
            row.grant_id, user_id, REASON_HELD_BY_REFERRALS, utc(row.granted_at), utc(row.expires_at)
        )

    async def _on_consent(self, uow: UnitOfWork, event: safeguarding_events.ConsentChanged) -> None:
        session = uow.tx
        t = self._t.consent
        values = {
            "status": event.status,
            "agencies": list(event.agencies),
            "data_classes": list(event.data_classes),
            "version": event.version,
        }
        # Only a newer version replaces what we hold: events may arrive out of order after faults.
        await session.execute(
            self._insert(t)
            .values(child_id=event.child_id, **values)
            .on_conflict_do_update(index_elements=[t.c.child_id], set_=values, where=t.c.version < event.version)
        )

    async def _on_sharing(self, uow: UnitOfWork, event: safeguarding_events.SharingDecisionRecorded) -> None:
        session = uow.tx
        await session.execute(
            self._insert(self._t.sharing)
            .values(
                decision_id=event.decision_id,
                child_id=event.child_id,
                share=event.share,
                lawful_basis=event.lawful_basis,
                approver=event.approver,
                agencies=list(event.agencies),
                data_classes=list(event.data_classes),
                expires_at=event.expires_at.ToDatetime(tzinfo=UTC) if event.HasField("expires_at") else None,
            )
            .on_conflict_do_nothing()
        )

    async def load(self, session: Tx, child_id: str) -> tuple[Consent, tuple[SharingDecision, ...]]:
        row = (await session.execute(select(self._t.consent).where(self._t.consent.c.child_id == child_id))).first()
        consent = Consent()
        if row is not None:
            consent = Consent(
                CONSENT_STATUS[row.status], frozenset(row.agencies) or None, frozenset(row.data_classes) or None
            )
        decisions = []
        s = self._t.sharing.c
        for d in (await session.execute(select(self._t.sharing).where(s.child_id == child_id))).all():
            decisions.append(
                SharingDecision(
                    decision_id=d.decision_id,
                    share=d.share,
                    reason=REASON_HELD_BY_REFERRALS,
                    approver=d.approver,
                    agencies=frozenset(d.agencies) or None,
                    data_classes=frozenset(d.data_classes) or None,
                    lawful_basis=LAWFUL_BASIS[d.lawful_basis] if d.share else None,
                    expires_at=utc(d.expires_at),
                )
            )
        return consent, tuple(decisions)


class ChildState(Protocol):
    """Where a service reads a child's consent and sharing decisions (its local views, or, in
    referrals, the records themselves)."""

    async def load(self, session: Tx, child_id: str) -> tuple[Consent, tuple[SharingDecision, ...]]: ...


@dataclass(frozen=True)
class Record:
    """One record about one child, about to be shown: the caller's basis for it is `involvement`."""

    message: pb_message.Message
    record_id: str
    child_id: str
    involvement: frozenset[Involvement] = frozenset()
    # Which field paths are the caller's agency's own (see Discloser.disclose).
    own: Callable[[str], bool] | None = None


def owned_elements(repeated: str, owners: Sequence[int], agency: int | None) -> Callable[[str], bool]:
    """`own` for records whose repeated `repeated` elements each belong to an agency (actions):
    the paths under the elements `agency` owns."""
    prefixes = tuple(f"{repeated}[{i}]." for i, owner in enumerate(owners) if owner == agency)
    return lambda path: path.startswith(prefixes) if prefixes else False


@dataclass(frozen=True)
class Disclosed:
    redacted_fields: tuple[str, ...]
    decisions: dict[str, Decision]


def _is_csx_message(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.file.package.startswith("csx.")


class Discloser:
    """Applies the policy to a message in place and audits what was decided."""

    def __init__(self, engine: PolicyEngine, registry: SensitivityRegistry, audit: AuditLog) -> None:
        self._engine = engine
        self._registry = registry
        self._audit = audit

    def _field_specs(self, msg: pb_message.Message, own: Callable[[str], bool] | None) -> dict[str, int | FieldSpec]:
        """Every leaf path of this message instance (repeated messages by index) and its class."""
        out: dict[str, int | FieldSpec] = {}

        def walk(m: pb_message.Message, prefix: str) -> None:
            for field in descriptor_of(m).fields:
                path = prefix + field.name
                if _is_csx_message(field):
                    if field.is_repeated:
                        for i, item in enumerate(getattr(m, field.name)):
                            walk(item, f"{path}[{i}].")
                    else:
                        walk(getattr(m, field.name), path + ".")
                    continue
                data_class = self._registry.field(field).data_class
                out[path] = FieldSpec(data_class, FieldSubject.OWN_RECORD) if own and own(path) else data_class

        walk(msg, "")
        return out

    @staticmethod
    def clear(msg: pb_message.Message, paths: Sequence[str]) -> None:
        """Clear these field paths (nested and repeated included) in place."""
        for path in paths:
            _clear(msg, path.split("."))

    def visible(self, context: DisclosureContext) -> Decision:
        """May the caller know the record exists? A deny is answered NOT_FOUND, exactly as for a
        record that does not exist."""
        return self._engine.visible(context)

    async def disclose(
        self,
        session: Tx,
        msg: pb_message.Message,
        context: DisclosureContext,
        *,
        record_type: str,
        record_id: str,
        child_id: str,
        own: Callable[[str], bool] | None = None,
    ) -> Disclosed:
        """Clear every field the caller may not see (nested and repeated included, each element of a
        repeated field decided on its own: `actions[2].description`), and audit the allowed and the
        denied field names, grouped by the rule that decided. `own(path)` says which fields belong to a
        part of the record the caller's agency itself created or owns (its concern, its action): the
        service decides that from its data, never from what the caller claims."""
        decisions = self._engine.decide_fields(context, self._field_specs(msg, own))
        denied = sorted(path for path, d in decisions.items() if not d.allowed)
        self.clear(msg, denied)
        by_rule: dict[tuple[bool, str, str], list[str]] = defaultdict(list)
        for path, d in decisions.items():
            by_rule[(d.allowed, d.rule, d.lawful_basis or "")].append(path)
        entries = [
            _entry(
                context.requester,
                "read" if allowed else "deny",
                allowed,
                rule,
                lawful_basis=basis,
                record=(record_type, record_id, child_id),
                field_names=paths,
            )
            for (allowed, rule, basis), paths in sorted(by_rule.items())
        ]
        await self._audit.append_many(session, entries)
        return Disclosed(tuple(denied), decisions)

    async def disclose_if_visible(
        self,
        session: Tx,
        msg: pb_message.Message,
        context: DisclosureContext,
        *,
        record_type: str,
        record_id: str,
        child_id: str,
        own: Callable[[str], bool] | None = None,
    ) -> Disclosed | None:
        """`disclose`, for a caller with a basis for the child; otherwise the refusal is audited and
        None returned (answer NOT_FOUND, exactly as for a record that does not exist)."""
        visible = self._engine.visible(context)
        if not visible.allowed:
            await self._audit.append(
                session,
                _entry(context.requester, "deny", False, visible.rule, record=(record_type, record_id, child_id)),
            )
            return None
        return await self.disclose(
            session, msg, context, record_type=record_type, record_id=record_id, child_id=child_id, own=own
        )

    async def disclose_records(
        self,
        session: Tx,
        user: Principal | None,
        records: Sequence[Record],
        views: DisclosureViews,
        *,
        record_type: str,
        at: datetime,
    ) -> list[tuple[pb_message.Message | None, tuple[str, ...]]]:
        """Each record as `user` may see it (in place), with the paths cleared; (None, ()) where
        the user has no basis for its child. No user: the service's own work (or INSECURE_DEV)."""
        if user is None:
            return [(r.message, ()) for r in records]
        who = requester(user)
        out: list[tuple[pb_message.Message | None, tuple[str, ...]]] = []
        for r in records:
            consent, decisions = await views.load(session, r.child_id)
            grant = None
            if who.purpose is Purpose.BREAK_GLASS:  # an emergency read: the grant is in the view
                grant = await views.grant(session, who.user_id, r.child_id, at)
            context = DisclosureContext(
                who,
                consent=consent,
                sharing_decisions=decisions,
                involvement=r.involvement,
                break_glass=grant,
                at=at,
            )
            disclosed = await self.disclose_if_visible(
                session,
                r.message,
                context,
                record_type=record_type,
                record_id=r.record_id,
                child_id=r.child_id,
                own=r.own,
            )
            out.append((r.message, disclosed.redacted_fields) if disclosed else (None, ()))
        return out

    async def may_publish_to(
        self,
        session: Tx,
        agency: int,
        views: ChildState,
        *,
        involvement: frozenset[Involvement],
        record_type: str,
        record_id: str,
        child_id: str,
        at: datetime,
        referring: bool = False,
    ) -> bool:
        """May a partner-facing event about this child go to `agency`'s portal? Decided by the same
        policy as a read by that agency's practitioner delivering actions, and audited either way.
        `referring`: the agency made the referral the event is about."""
        name = AGENCY_NAME[agency]
        portal = Requester(f"portal.{name}", agency, PORTAL_ROLES.get(name, Role.PRACTITIONER), Purpose.ACTION_DELIVERY)
        consent, decisions = await views.load(session, child_id)
        context = DisclosureContext(
            portal,
            consent=consent,
            sharing_decisions=decisions,
            involvement=involvement,
            referring_agency=referring,
            at=at,
        )
        decision = self._engine.visible(context)
        await self._audit.append(
            session,
            _entry(
                portal,
                "publish" if decision.allowed else "deny",
                decision.allowed,
                decision.rule,
                lawful_basis=decision.lawful_basis or "",
                record=(record_type, record_id, child_id),
            ),
        )
        return decision.allowed

    async def audit_involvement(
        self,
        session: Tx,
        who: Requester,
        agency: int,
        *,
        basis: Involvement,
        record_id: str,
        child_id: str,
    ) -> None:
        """A recorded decision gave `agency` a basis for the child (policy.yaml, `involvement`):
        audited when it is made, by whom, with the rule `involvement-<basis>`. The record id names
        the agency and the decision (a referral, a sharing decision, a conference)."""
        await self._audit.append(
            session,
            _entry(
                who,
                "involve",
                True,
                f"involvement-{basis.value.replace('_', '-')}",
                record=("involvement", f"{AGENCY_NAME[agency]}:{record_id}", child_id),
            ),
        )

    async def audit_action(
        self,
        session: Tx,
        who: Requester,
        action: str,
        *,
        rule_id: str,
        record_type: str,
        record_id: str,
        child_id: str = "",
    ) -> None:
        """An audited act that is not a field read, e.g. break-glass start and end."""
        await self._audit.append(session, _entry(who, action, True, rule_id, record=(record_type, record_id, child_id)))


def _entry(
    who: Requester,
    action: str,
    allowed: bool,
    rule_id: str,
    *,
    record: tuple[str, str, str],
    lawful_basis: str = "",
    field_names: Sequence[str] = (),
) -> AuditEntry:
    """One audit entry for `who`; `record` is (record type, record id, child id). Names, never values."""
    record_type, record_id, child_id = record
    return AuditEntry(
        actor_user_id=who.user_id,
        actor_agency=who.agency,
        actor_role=who.role.value,
        purpose=who.purpose.value,
        action=action,
        decision="allow" if allowed else "deny",
        rule_id=rule_id,
        lawful_basis=lawful_basis,
        record_type=record_type,
        record_id=record_id,
        child_id=child_id,
        field_names=field_names,
    )


_ELEMENT = re.compile(r"^(\w+)\[(\d+)\]$")


def _clear(msg: pb_message.Message, parts: list[str]) -> None:
    head, *rest = parts
    element = _ELEMENT.match(head)
    if element:  # one element of a repeated message field
        items = getattr(msg, element.group(1))
        index = int(element.group(2))
        if index < len(items):
            _clear(items[index], rest)
        return
    if not rest:
        msg.ClearField(head)
        return
    field = msg.DESCRIPTOR.fields_by_name[head]
    if field.is_repeated:
        for item in getattr(msg, head):
            _clear(item, rest)
    elif msg.HasField(head):
        _clear(getattr(msg, head), rest)


def now() -> datetime:
    return datetime.now(UTC)
