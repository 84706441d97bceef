"""Rows <-> messages for the referrals database; encryption happens here and nowhere else."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Integer,
    String,
    bindparam,
    delete,
    func,
    literal_column,
    null,
    or_,
    select,
    type_coerce,
    update,
)

from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.crypto import DataLossError, blind_index
from csx_common.datakeys import SERVICE_SCOPE, child_scope
from csx_common.db import Tx, advisory_lock
from csx_common.sealing import SealedRecord, Sealer
from csx_common.timestamps import ts, utc
from csx_referrals import tables
from csx_referrals.domain import CASE_CLOSED, normalise_name
from csx_safeguarding.disclosure import CONSENT_STATUS, LAWFUL_BASIS, REASON_HELD_BY_REFERRALS
from csx_safeguarding.policy import Consent, SharingDecision

# 16 bits: at 100,000 children about 1.5 share each index value, so a leaked index table names
# nobody, and a lookup decrypts a handful of candidates at most.
INDEX_BITS = 16
CHILDREN = "children"

# The submission path's queries, built once: building a statement costs more than running it.
_CANDIDATES = select(
    tables.children.c.child_id,
    tables.children.c.nhs_index,
    tables.children.c.name_dob_index,
    tables.children.c.sealed,
).where(
    or_(tables.children.c.nhs_index == bindparam("nhs"), tables.children.c.name_dob_index == bindparam("name_dob")),
    tables.children.c.erased_at.is_(None),
)
_OPEN_REFERRAL = (
    select(tables.referrals.c.referral_id)
    .where(
        tables.referrals.c.child_id == bindparam("child_id"),
        tables.referrals.c.status == pb.REFERRAL_STATUS_AWAITING_DECISION,
    )
    .limit(1)
)


def _disclosure_facts_query() -> Any:
    """One statement for everything the policy needs about a child and a user: the latest consent,
    the sharing decisions in force, the agencies routed a referral of the child, and the user's
    grants whose end is not yet audited. Rows are tagged by `kind` and padded to one shape; no
    sealed column is read (the policy needs a decision's scope and basis, never its reasons)."""
    child, user = bindparam("child_id"), bindparam("user_id")
    c, s, g = tables.consents.c, tables.sharing_decisions.c, tables.break_glass_grants.c
    con, r = tables.concerns.c, tables.referrals.c
    text_, num, flag = type_coerce(null(), String), type_coerce(null(), Integer), type_coerce(null(), Boolean)
    when = type_coerce(null(), DateTime(timezone=True))
    json_ = type_coerce(null(), tables.consents.c.agencies.type)
    latest = select(func.max(c.version)).where(c.child_id == child).scalar_subquery()
    consent = select(
        literal_column("0", Integer).label("kind"),
        text_.label("id"),
        c.status.label("num"),
        flag.label("flag"),
        c.agencies.label("agencies"),
        c.data_classes.label("data_classes"),
        when.label("t1"),
        when.label("t2"),
        text_.label("approver"),
    ).where(c.child_id == child, c.version == latest)
    sharing = select(
        literal_column("1"),
        s.decision_id,
        s.lawful_basis,
        s.share,
        s.agencies,
        s.data_classes,
        s.expires_at,
        s.decided_at,
        s.approver,
    ).where(s.child_id == child, s.expires_at.is_(None) | (s.expires_at > bindparam("now")))
    routed = (
        select(literal_column("2"), text_, con.agency, flag, json_, json_, when, when, text_)
        .join(tables.referrals, r.referral_id == con.referral_id)
        .where(con.child_id == child, r.status == pb.REFERRAL_STATUS_ROUTED)
    )
    grants = select(literal_column("3"), g.grant_id, num, flag, json_, json_, g.granted_at, g.expires_at, text_).where(
        g.user_id == user, g.child_id == child, g.end_audited.is_(False)
    )
    return consent.union_all(sharing, routed, grants)  # unordered: no temporary B-tree


_DISCLOSURE_FACTS = _disclosure_facts_query()


@dataclass(frozen=True)
class Grant:
    grant_id: str
    granted_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class DisclosureFacts:
    """A child's consent and sharing decisions as the policy takes them, the agencies whose concern
    is in a routed referral of the child, and one user's grants whose end is not yet audited."""

    consent: Consent
    decisions: tuple[SharingDecision, ...]
    routed: frozenset[int]
    grants: tuple[Grant, ...]


_CONCERN = select(
    tables.concerns.c.body, tables.concerns.c.sealed, tables.concerns.c.agency, tables.concerns.c.child_id
).where(tables.concerns.c.concern_id == bindparam("concern_id"))


def _concern_record(concern: pb.Concern) -> str:
    # The owning agency is in the associated data: an agency's own concern is shown to it in full,
    # so a row edited to name another owner must fail to decrypt, not disclose.
    return f"{concern.concern_id}/{concern.agency}"


def _name_dob(child: pb.ChildIdentity) -> str:
    return f"{normalise_name(child.given_name, child.family_name)}|{child.date_of_birth}"


class ReferralsRepository:
    def __init__(self, sealer: Sealer, index_key: bytes, *, index_bits: int = INDEX_BITS) -> None:
        self._sealer = sealer
        self._index_key = index_key
        self._index_bits = index_bits

    # Children -----------------------------------------------------------------------------
    def indexes(self, child: pb.ChildIdentity) -> tuple[str | None, str]:
        """(NHS number index or None, name + date of birth index), both truncated."""
        nhs = (
            blind_index(self._index_key, "nhs_number", child.nhs_number, bits=self._index_bits)
            if child.nhs_number
            else None
        )
        return nhs, blind_index(self._index_key, "name_dob", _name_dob(child), bits=self._index_bits)

    async def _candidates(
        self, session: Tx, nhs: str | None, name_dob: str
    ) -> tuple[list[tuple[str, pb.ChildIdentity]], list[tuple[str, pb.ChildIdentity]]]:
        """The children sharing the NHS number index, and those sharing the name and date of birth
        index (one query), with their identities decrypted for exact comparison."""
        rows = (await session.execute(_CANDIDATES, {"nhs": nhs, "name_dob": name_dob})).all()
        by_nhs, by_name_dob = [], []
        for row in rows:
            identity = await self._sealer.unseal(
                session, pb.ChildIdentity(), row.sealed, table=CHILDREN, record_id=row.child_id
            )
            if nhs is not None and row.nhs_index == nhs:
                by_nhs.append((row.child_id, identity))
            if row.name_dob_index == name_dob:
                by_name_dob.append((row.child_id, identity))
        return by_nhs, by_name_dob

    async def match_child(
        self, session: Tx, child: pb.ChildIdentity
    ) -> tuple[tuple[str, pb.ChildIdentity] | None, list[tuple[str, int]]]:
        """(the known child this identity is, with its stored identity, or None; the known children
        it may be, with how).

        Linked only where nothing disagrees: the NHS number and the normalised name and date of
        birth all agree; or, with no NHS number to compare, the name and date of birth agree with
        exactly one child. The same NHS number with another name or date of birth, or a name and
        date of birth shared by several children, is a possible match: nothing is linked until
        the MASH decides (an agency that knows a child's NHS number must not be able to attach a
        concern, and itself, to that child)."""
        nhs, name_dob = self.indexes(child)
        wanted = _name_dob(child)
        by_nhs, by_name_dob = await self._candidates(session, nhs, name_dob)
        if nhs:
            same_nhs = [(child_id, known) for child_id, known in by_nhs if known.nhs_number == child.nhs_number]
            agree = [(child_id, known) for child_id, known in same_nhs if _name_dob(known) == wanted]
            if len(agree) == 1:
                return agree[0], []
            if same_nhs:
                return None, [(child_id, pb.POSSIBLE_MATCH_KIND_NHS_NUMBER_CONFLICT) for child_id, _ in same_nhs]
        exact = [
            (child_id, known)
            for child_id, known in by_name_dob
            if _name_dob(known) == wanted and (not child.nhs_number or not known.nhs_number)
        ]
        if len(exact) == 1:
            return exact[0], []
        return None, [(child_id, pb.POSSIBLE_MATCH_KIND_AMBIGUOUS_NAME_AND_DATE_OF_BIRTH) for child_id, _ in exact]

    async def find_or_create_child(
        self, session: Tx, child: pb.ChildIdentity, now: datetime
    ) -> tuple[str, bool, list[tuple[str, int]]]:
        """(the child's id, whether the record is new, the known children a new record may be:
        possible matches to record)."""
        nhs, name_dob = self.indexes(child)
        # Concurrent referrals of one new child must converge on one record: serialise on the
        # index values (PostgreSQL; SQLite has a single writer already).
        buckets = {f"nhs:{nhs}", f"name_dob:{name_dob}"} - {"nhs:None"}
        await advisory_lock(session, *(f"csx-referrals-child:{bucket}" for bucket in buckets))
        found, possible = await self.match_child(session, child)
        if found is not None:
            child_id, known = found
            if child.nhs_number and not known.nhs_number:
                # Known before by name and date of birth only: the same child, now with an NHS number.
                known.nhs_number = child.nhs_number
                await self._store_identity(session, child_id, known, update_row=True)
            return child_id, False, []
        child_id = str(uuid.uuid4())
        await self._sealer.keys.new_scope(session, child_scope(child_id), now)
        await self._store_identity(session, child_id, child, created_at=now)
        return child_id, True, possible

    async def _store_identity(
        self,
        session: Tx,
        child_id: str,
        identity: pb.ChildIdentity,
        *,
        created_at: datetime | None = None,
        update_row: bool = False,
    ) -> None:
        nhs, name_dob = self.indexes(identity)
        stored = pb.ChildIdentity()
        stored.CopyFrom(identity)  # sealing clears fields in place: never the caller's message
        sealed = await self._sealer.seal(
            session, stored, table=CHILDREN, record_id=child_id, scope=child_scope(child_id)
        )
        values = {"nhs_index": nhs, "name_dob_index": name_dob, "sealed": sealed}
        if update_row:
            c = tables.children.c
            await session.execute(update(tables.children).where(c.child_id == child_id).values(**values))
        else:
            await session.insert(tables.children, dict(child_id=child_id, created_at=created_at, **values))

    async def erase_child_indexes(self, session: Tx, child_id: str, now: datetime) -> bool:
        """Forget how to find the child: blind indexes gone, identity unreadable (its key is
        destroyed separately). False if already erased."""
        c = tables.children.c
        result = await session.execute(
            update(tables.children)
            .where(c.child_id == child_id, c.erased_at.is_(None))
            .values(nhs_index=None, name_dob_index=None, erased_at=now)
        )
        return bool(result.rowcount)

    # Referrals ----------------------------------------------------------------------------
    async def open_referral_for(self, session: Tx, child_id: str) -> str | None:
        return (await session.execute(_OPEN_REFERRAL, {"child_id": child_id})).scalar()

    async def open_referral(self, session: Tx, child_id: str, now: datetime, due: date) -> str:
        referral_id = str(uuid.uuid4())
        await session.insert(
            tables.referrals,
            dict(
                referral_id=referral_id,
                child_id=child_id,
                status=pb.REFERRAL_STATUS_AWAITING_DECISION,
                outcome=pb.SCREENING_OUTCOME_UNSPECIFIED,
                opened_at=now,
                decision_due_on=due,
                sealed={},
                version=1,
                conference_announced=False,
            ),
        )
        return referral_id

    async def get_referral(self, session: Tx, referral_id: str) -> tuple[pb.Referral, int] | None:
        row = (
            await session.execute(select(tables.referrals).where(tables.referrals.c.referral_id == referral_id))
        ).first()
        if row is None:
            return None
        # An open referral has nothing sealed yet, so unsealing would not notice an erasure: ask.
        await self._sealer.ensure_not_erased(session, child_scope(row.child_id))
        concern_ids = (
            await session.execute(
                select(tables.concerns.c.concern_id)
                .where(tables.concerns.c.referral_id == referral_id)
                .order_by(tables.concerns.c.recorded_at)
            )
        ).scalars()
        referral = pb.Referral(
            referral_id=row.referral_id,
            child_id=row.child_id,
            status=row.status,
            outcome=row.outcome,
            decided_by=row.decided_by or "",
            strategy_discussion_on=row.strategy_discussion_on or "",
            opened_at=ts(row.opened_at),
            decided_at=ts(row.decided_at),
            decision_due_on=row.decision_due_on.isoformat(),
            concern_ids=list(concern_ids),
        )
        await self._sealer.unseal(session, referral, row.sealed, table="referrals", record_id=row.referral_id)
        return referral, row.version

    async def record_decision(self, session: Tx, referral: pb.Referral, expected_version: int) -> bool:
        sealed_view = pb.Referral(reason=referral.reason)
        sealed = await self._sealer.seal(
            session,
            sealed_view,
            table="referrals",
            record_id=referral.referral_id,
            scope=child_scope(referral.child_id),
        )
        c = tables.referrals.c
        result = await session.execute(
            update(tables.referrals)
            .where(c.referral_id == referral.referral_id, c.version == expected_version)
            .values(
                status=referral.status,
                outcome=referral.outcome,
                decided_by=referral.decided_by,
                strategy_discussion_on=referral.strategy_discussion_on or None,
                decided_at=referral.decided_at.ToDatetime(tzinfo=UTC),
                sealed=sealed,
                version=expected_version + 1,
            )
        )
        return bool(result.rowcount)

    # Concerns -----------------------------------------------------------------------------
    async def add_concern(self, session: Tx, concern: pb.Concern) -> None:
        body, sealed = await self._sealer.seal_record(
            session, concern, table="concerns", record_id=_concern_record(concern), scope=child_scope(concern.child_id)
        )
        await session.insert(
            tables.concerns,
            dict(
                concern_id=concern.concern_id,
                referral_id=concern.referral_id,
                child_id=concern.child_id,
                agency=concern.agency,
                agency_reference=concern.agency_reference,
                body=body,
                sealed=sealed,
                recorded_at=concern.recorded_at.ToDatetime(tzinfo=UTC),
            ),
        )

    async def load_concern(self, session: Tx, concern_id: str) -> SealedRecord[pb.Concern] | None:
        """The concern with its keys in hand (an erased child's fails here), nothing decrypted yet."""
        row = (await session.execute(_CONCERN, {"concern_id": concern_id})).first()
        if row is None:
            return None
        loaded = await self._sealer.load_record(
            session,
            pb.Concern,
            row.body,
            row.sealed,
            table="concerns",
            record_id=f"{concern_id}/{row.agency}",
            scope=child_scope(row.child_id),
        )
        concern = loaded.message
        if concern.agency != row.agency or concern.concern_id != concern_id or concern.child_id != row.child_id:
            raise DataLossError("concern body does not match its row")
        return loaded

    async def get_concern(self, session: Tx, concern_id: str) -> pb.Concern | None:
        """The concern, decrypted."""
        loaded = await self.load_concern(session, concern_id)
        return None if loaded is None else loaded.reveal()

    # Consent and sharing decisions ------------------------------------------------------------
    async def child_exists(self, session: Tx, child_id: str) -> bool:
        c = tables.children.c
        found = await session.execute(select(c.child_id).where(c.child_id == child_id, c.erased_at.is_(None)))
        return found.first() is not None

    async def current_consent(self, session: Tx, child_id: str) -> pb.ConsentRecord | None:
        c = tables.consents.c
        row = (
            await session.execute(
                select(tables.consents).where(c.child_id == child_id).order_by(c.version.desc()).limit(1)
            )
        ).first()
        if row is None:
            return None
        record = pb.ConsentRecord(
            child_id=row.child_id,
            status=row.status,
            given_by=row.given_by,
            agencies=row.agencies,
            data_classes=row.data_classes,
            recorded_by=row.recorded_by,
            recorded_at=ts(row.recorded_at),
            version=row.version,
        )
        return await self._sealer.unseal(
            session, record, row.sealed, table="consents", record_id=f"{row.child_id}/{row.version}"
        )

    async def add_consent(self, session: Tx, record: pb.ConsentRecord) -> None:
        sealed = await self._sealer.seal(
            session,
            pb.ConsentRecord(reason_not_sought=record.reason_not_sought),
            table="consents",
            record_id=f"{record.child_id}/{record.version}",
            scope=child_scope(record.child_id),
        )
        await session.insert(
            tables.consents,
            dict(
                child_id=record.child_id,
                version=record.version,
                status=record.status,
                given_by=record.given_by,
                agencies=list(record.agencies),
                data_classes=list(record.data_classes),
                recorded_by=record.recorded_by,
                recorded_at=record.recorded_at.ToDatetime(tzinfo=UTC),
                sealed=sealed,
            ),
        )

    async def add_sharing_decision(self, session: Tx, decision: pb.SharingDecision) -> None:
        sealed = await self._sealer.seal(
            session,
            pb.SharingDecision(reason=decision.reason),
            table="sharing_decisions",
            record_id=decision.decision_id,
            scope=child_scope(decision.child_id),
        )
        await session.insert(
            tables.sharing_decisions,
            dict(
                decision_id=decision.decision_id,
                child_id=decision.child_id,
                share=decision.share,
                lawful_basis=decision.lawful_basis,
                approver=decision.approver,
                decided_by=decision.decided_by,
                decided_at=decision.decided_at.ToDatetime(tzinfo=UTC),
                expires_at=decision.expires_at.ToDatetime(tzinfo=UTC) if decision.HasField("expires_at") else None,
                agencies=list(decision.agencies),
                data_classes=list(decision.data_classes),
                sealed=sealed,
            ),
        )

    async def active_sharing_decisions(self, session: Tx, child_id: str, now: datetime) -> list[pb.SharingDecision]:
        c = tables.sharing_decisions.c
        rows = (
            await session.execute(
                select(tables.sharing_decisions)
                .where(c.child_id == child_id, (c.expires_at.is_(None)) | (c.expires_at > now))
                .order_by(c.decided_at)
            )
        ).all()
        out = []
        for row in rows:
            decision = pb.SharingDecision(
                decision_id=row.decision_id,
                child_id=row.child_id,
                share=row.share,
                lawful_basis=row.lawful_basis,
                approver=row.approver,
                decided_by=row.decided_by,
                decided_at=ts(row.decided_at),
                agencies=row.agencies,
                data_classes=row.data_classes,
            )
            if row.expires_at is not None:
                decision.expires_at.CopyFrom(ts(row.expires_at))
            out.append(
                await self._sealer.unseal(
                    session, decision, row.sealed, table="sharing_decisions", record_id=row.decision_id
                )
            )
        return out

    async def disclosure_facts(
        self, session: Tx, child_id: str, now: datetime, *, user_id: str = ""
    ) -> DisclosureFacts:
        consent, routed, grants = Consent(), set(), []
        decisions: list[tuple[datetime, str, SharingDecision]] = []
        rows = await session.execute(_DISCLOSURE_FACTS, {"child_id": child_id, "user_id": user_id, "now": now})
        for row in rows:
            if row.kind == 0:
                if row.num in CONSENT_STATUS:  # an unspecified status is no consent recorded
                    consent = Consent(
                        CONSENT_STATUS[row.num], frozenset(row.agencies) or None, frozenset(row.data_classes) or None
                    )
            elif row.kind == 1:
                decisions.append(
                    (
                        utc(row.t2),  # the policy takes them oldest first
                        row.id,
                        SharingDecision(
                            decision_id=row.id,
                            share=row.flag,
                            reason=REASON_HELD_BY_REFERRALS,
                            approver=row.approver,
                            agencies=frozenset(row.agencies) or None,
                            data_classes=frozenset(row.data_classes) or None,
                            lawful_basis=LAWFUL_BASIS[row.num] if row.flag else None,
                            expires_at=utc(row.t1),
                        ),
                    )
                )
            elif row.kind == 2:
                routed.add(row.num)
            else:
                grants.append(Grant(row.id, utc(row.t1), utc(row.t2)))
        decisions.sort(key=lambda d: d[:2])
        return DisclosureFacts(consent, tuple(d[2] for d in decisions), frozenset(routed), tuple(grants))

    async def referral_concerns(self, session: Tx, referral_id: str) -> list[tuple[str, int]]:
        """(concern id, raising agency) of every concern in the referral, oldest first."""
        c = tables.concerns.c
        query = select(c.concern_id, c.agency).where(c.referral_id == referral_id).order_by(c.recorded_at)
        return [(row.concern_id, row.agency) for row in (await session.execute(query)).all()]

    # Possible matches ---------------------------------------------------------------------------
    async def add_possible_match(self, session: Tx, child_id: str, candidate: str, kind: int, now: datetime) -> None:
        await session.insert(
            tables.possible_matches,
            dict(
                match_id=str(uuid.uuid4()),
                child_id=child_id,
                candidate_child_id=candidate,
                kind=kind,
                status=pb.POSSIBLE_MATCH_STATUS_OPEN,
                found_at=now,
                sealed={},
            ),
        )

    async def has_open_match(self, session: Tx, child_id: str) -> bool:
        """Is this a record made for a possible match, not yet resolved? (The known child it may be
        is screened as usual: a partner submitting a conflicting identity must not hold it up.)"""
        m = tables.possible_matches.c
        query = select(m.match_id).where(m.child_id == child_id, m.status == pb.POSSIBLE_MATCH_STATUS_OPEN)
        return (await session.execute(query.limit(1))).first() is not None

    async def possible_matches(
        self, session: Tx, *, match_id: str | None = None, include_resolved: bool = False
    ) -> list[pb.PossibleMatch]:
        m = tables.possible_matches.c
        query = select(tables.possible_matches).order_by(m.found_at)
        if match_id is not None:
            query = query.where(m.match_id == match_id)
        if not include_resolved:
            query = query.where(m.status == pb.POSSIBLE_MATCH_STATUS_OPEN)
        out = []
        for row in (await session.execute(query)).all():
            match = pb.PossibleMatch(
                match_id=row.match_id,
                child_id=row.candidate_child_id,
                new_child_id=row.child_id,
                kind=row.kind,
                status=row.status,
                found_at=ts(row.found_at),
                resolved_by=row.resolved_by or "",
            )
            if row.resolved_at is not None:
                match.resolved_at.CopyFrom(ts(row.resolved_at))
            out.append(
                await self._sealer.unseal(session, match, row.sealed, table="possible_matches", record_id=row.match_id)
            )
        return out

    async def resolve_match(self, session: Tx, match: pb.PossibleMatch) -> bool:
        """Compare-and-set on an open match: False if it was resolved meanwhile."""
        sealed = await self._sealer.seal(
            session,
            pb.PossibleMatch(reason=match.reason),
            table="possible_matches",
            record_id=match.match_id,
            scope=child_scope(match.child_id),
        )
        m = tables.possible_matches.c
        result = await session.execute(
            update(tables.possible_matches)
            .where(m.match_id == match.match_id, m.status == pb.POSSIBLE_MATCH_STATUS_OPEN)
            .values(
                status=match.status,
                resolved_by=match.resolved_by,
                resolved_at=match.resolved_at.ToDatetime(tzinfo=UTC),
                sealed=sealed,
            )
        )
        return bool(result.rowcount)

    async def merge_child(self, session: Tx, from_id: str, into_id: str, now: datetime) -> None:
        """Move every concern and referral of `from_id` (a record made for a possible match, all of
        whose referrals still await a decision) to `into_id`: each concern is re-sealed under the
        known child's key; an open referral joins the known child's open one if it has one. The
        record made for the match is then forgotten (its keys destroyed, its indexes deleted)."""
        c, r = tables.concerns.c, tables.referrals.c
        target = await self.open_referral_for(session, into_id)
        rows = (await session.execute(select(c.concern_id, c.referral_id).where(c.child_id == from_id))).all()
        for row in rows:
            concern = await self.get_concern(session, row.concern_id)
            assert concern is not None
            concern.child_id = into_id
            if target is not None:
                concern.referral_id = target
            body, sealed = await self._sealer.seal_record(
                session,
                concern,
                table="concerns",
                record_id=_concern_record(concern),
                scope=child_scope(into_id),
            )
            await session.execute(
                update(tables.concerns)
                .where(c.concern_id == row.concern_id)
                .values(child_id=into_id, referral_id=concern.referral_id, body=body, sealed=sealed)
            )
        if target is not None:
            await session.execute(delete(tables.referrals).where(r.child_id == from_id))
        else:
            await session.execute(update(tables.referrals).where(r.child_id == from_id).values(child_id=into_id))
        await self.destroy_child_keys(session, from_id, now)
        await self.erase_child_indexes(session, from_id, now)

    # Break-glass -------------------------------------------------------------------------------
    async def add_grant(self, session: Tx, grant: pb.BreakGlassGrant) -> None:
        sealed = await self._sealer.seal(
            session,
            pb.BreakGlassGrant(reason=grant.reason),
            table="break_glass_grants",
            record_id=grant.grant_id,
            scope=child_scope(grant.child_id),
        )
        await session.insert(
            tables.break_glass_grants,
            dict(
                grant_id=grant.grant_id,
                child_id=grant.child_id,
                user_id=grant.user_id,
                agency=grant.agency,
                granted_at=grant.granted_at.ToDatetime(tzinfo=UTC),
                expires_at=grant.expires_at.ToDatetime(tzinfo=UTC),
                review_due_at=grant.review_due_at.ToDatetime(tzinfo=UTC),
                end_audited=False,
                sealed=sealed,
            ),
        )

    async def get_grant(self, session: Tx, grant_id: str) -> pb.BreakGlassGrant | None:
        row = (
            await session.execute(
                select(tables.break_glass_grants).where(tables.break_glass_grants.c.grant_id == grant_id)
            )
        ).first()
        if row is None:
            return None
        grant = grant_from_row(row)
        return await self._sealer.unseal(
            session, grant, row.sealed, table="break_glass_grants", record_id=grant_id, scope=child_scope(row.child_id)
        )

    async def record_review(self, session: Tx, grant: pb.BreakGlassGrant) -> bool:
        """Compare-and-set on an unreviewed grant; the notes sealed beside the reason."""
        g = tables.break_glass_grants.c
        row = (await session.execute(select(g.sealed).where(g.grant_id == grant.grant_id))).one()
        notes = await self._sealer.seal(
            session,
            pb.BreakGlassGrant(review_notes=grant.review_notes),
            table="break_glass_grants",
            record_id=grant.grant_id,
            scope=child_scope(grant.child_id),
        )
        result = await session.execute(
            update(tables.break_glass_grants)
            .where(g.grant_id == grant.grant_id, g.reviewed_at.is_(None))
            .values(
                reviewed_by=grant.reviewed_by,
                reviewed_at=grant.reviewed_at.ToDatetime(tzinfo=UTC),
                review_outcome=grant.review_outcome,
                sealed={**row.sealed, **notes},
            )
        )
        return bool(result.rowcount)

    async def mark_grant_end_audited(self, session: Tx, grant_id: str) -> None:
        g = tables.break_glass_grants.c
        await session.execute(update(tables.break_glass_grants).where(g.grant_id == grant_id).values(end_audited=True))

    # Erasure --------------------------------------------------------------------------------------
    async def add_erasure(self, session: Tx, record: pb.ErasureRecord) -> None:
        # The reason outlives the child's keys: sealed under the service's own.
        sealed = await self._sealer.seal(
            session,
            pb.ErasureRecord(reason=record.reason),
            table="erasures",
            record_id=record.erasure_id,
            scope=SERVICE_SCOPE,
        )
        await session.insert(
            tables.erasures,
            dict(
                erasure_id=record.erasure_id,
                child_id=record.child_id,
                basis=record.basis,
                requested_by=record.requested_by,
                requested_at=record.requested_at.ToDatetime(tzinfo=UTC),
                sealed=sealed,
            ),
        )

    async def get_erasure(self, session: Tx, erasure_id: str) -> pb.ErasureRecord | None:
        row = (await session.execute(select(tables.erasures).where(tables.erasures.c.erasure_id == erasure_id))).first()
        if row is None:
            return None
        record = pb.ErasureRecord(
            erasure_id=row.erasure_id,
            child_id=row.child_id,
            basis=row.basis,
            requested_by=row.requested_by,
            requested_at=ts(row.requested_at),
            approved_by=row.approved_by or "",
        )
        if row.erased_at is not None:
            record.erased_at.CopyFrom(ts(row.erased_at))
        return await self._sealer.unseal(session, record, row.sealed, table="erasures", record_id=row.erasure_id)

    async def mark_erased(self, session: Tx, record: pb.ErasureRecord) -> bool:
        """Compare-and-set: False if the erasure was already carried out (two approvers at once)."""
        c = tables.erasures.c
        result = await session.execute(
            update(tables.erasures)
            .where(c.erasure_id == record.erasure_id, c.erased_at.is_(None))
            .values(approved_by=record.approved_by, erased_at=record.erased_at.ToDatetime(tzinfo=UTC))
        )
        return bool(result.rowcount)

    async def lock_child_keys(self, session: Tx, child_id: str) -> None:
        """Hold off the child's erasure (or take its turn) until this transaction ends."""
        await self._sealer.keys.erased(session, child_scope(child_id), lock=True)

    async def destroy_child_keys(self, session: Tx, child_id: str, now: datetime) -> int:
        return await self._sealer.keys.destroy(session, child_scope(child_id), now)

    async def close_open_referrals(self, session: Tx, child_id: str, now: datetime) -> None:
        c = tables.referrals.c
        await session.execute(
            update(tables.referrals)
            .where(c.child_id == child_id, c.status == pb.REFERRAL_STATUS_AWAITING_DECISION)
            .values(status=pb.REFERRAL_STATUS_CLOSED, decided_at=now, version=c.version + 1)
        )

    async def children_closed_before(self, session: Tx, cutoff: datetime, limit: int) -> list[str]:
        """Children not yet erased whose case closed before `cutoff` (and has not reopened): their
        retention period has ended (docs/adr/0014)."""
        c, ch = tables.cases.c, tables.children.c
        query = (
            select(c.child_id)
            .join(tables.children, ch.child_id == c.child_id)
            .where(ch.erased_at.is_(None), c.status == CASE_CLOSED, c.closed_at < cutoff)
            .order_by(c.closed_at, c.child_id)
            .limit(limit)
        )
        return list((await session.execute(query)).scalars())


def grant_from_row(row: Any) -> pb.BreakGlassGrant:
    """A break-glass grant's operational part from its row (the reason and notes stay sealed)."""
    grant = pb.BreakGlassGrant(
        grant_id=row.grant_id,
        child_id=row.child_id,
        user_id=row.user_id,
        agency=row.agency,
        granted_at=ts(row.granted_at),
        expires_at=ts(row.expires_at),
        review_due_at=ts(row.review_due_at),
        reviewed_by=row.reviewed_by or "",
        review_outcome=row.review_outcome or 0,
    )
    if row.reviewed_at is not None:
        grant.reviewed_at.CopyFrom(ts(row.reviewed_at))
    return grant
