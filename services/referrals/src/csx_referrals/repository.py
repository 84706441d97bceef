"""Rows <-> messages for the referrals database; encryption happens here and nowhere else."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.crypto import blind_index
from csx_common.sealing import Sealer
from csx_common.timestamps import ts
from csx_referrals import tables
from csx_referrals.domain import normalise_name


class ReferralsRepository:
    def __init__(self, sealer: Sealer, index_key: bytes) -> None:
        self._sealer = sealer
        self._index_key = index_key

    # Children -----------------------------------------------------------------------------
    def _indexes(self, child: pb.ChildIdentity) -> tuple[str | None, str]:
        nhs = blind_index(self._index_key, "nhs_number", child.nhs_number) if child.nhs_number else None
        name_dob = blind_index(
            self._index_key,
            "name_dob",
            f"{normalise_name(child.given_name, child.family_name)}|{child.date_of_birth}",
        )
        return nhs, name_dob

    async def find_or_create_child(self, session: AsyncSession, child: pb.ChildIdentity, now: datetime) -> str:
        nhs, name_dob = self._indexes(child)
        c = tables.children.c
        if nhs:
            found = (await session.execute(select(c.child_id).where(c.nhs_index == nhs).limit(1))).scalar()
            if found:
                return str(found)
            # Known before by name and date of birth only: the same child, now with an NHS number.
            found = (
                await session.execute(
                    select(c.child_id).where(c.name_dob_index == name_dob, c.nhs_index.is_(None)).limit(1)
                )
            ).scalar()
            if found:
                await session.execute(update(tables.children).where(c.child_id == found).values(nhs_index=nhs))
                return str(found)
        else:
            found = (await session.execute(select(c.child_id).where(c.name_dob_index == name_dob).limit(1))).scalar()
            if found:
                return str(found)
        child_id = str(uuid.uuid4())
        await session.execute(
            tables.children.insert().values(child_id=child_id, nhs_index=nhs, name_dob_index=name_dob, created_at=now)
        )
        return child_id

    # Referrals ----------------------------------------------------------------------------
    async def open_referral_for(self, session: AsyncSession, child_id: str) -> str | None:
        c = tables.referrals.c
        return (
            await session.execute(
                select(c.referral_id)
                .where(c.child_id == child_id, c.status == pb.REFERRAL_STATUS_AWAITING_DECISION)
                .limit(1)
            )
        ).scalar()

    async def open_referral(self, session: AsyncSession, child_id: str, now: datetime, due: date) -> str:
        referral_id = str(uuid.uuid4())
        await session.execute(
            tables.referrals.insert().values(
                referral_id=referral_id,
                child_id=child_id,
                status=pb.REFERRAL_STATUS_AWAITING_DECISION,
                outcome=pb.SCREENING_OUTCOME_UNSPECIFIED,
                opened_at=now,
                decision_due_on=due,
                sealed={},
                version=1,
            )
        )
        return referral_id

    async def get_referral(self, session: AsyncSession, referral_id: str) -> tuple[pb.Referral, int] | None:
        row = (
            await session.execute(select(tables.referrals).where(tables.referrals.c.referral_id == referral_id))
        ).first()
        if row is None:
            return None
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
        self._sealer.unseal(referral, row.sealed, table="referrals", record_id=row.referral_id)
        return referral, row.version

    async def record_decision(self, session: AsyncSession, referral: pb.Referral, expected_version: int) -> bool:
        sealed_view = pb.Referral(reason=referral.reason)
        sealed = self._sealer.seal(sealed_view, table="referrals", record_id=referral.referral_id)
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
    async def add_concern(self, session: AsyncSession, concern: pb.Concern) -> None:
        body, sealed = self._sealer.seal_record(concern, table="concerns", record_id=concern.concern_id)
        await session.execute(
            tables.concerns.insert().values(
                concern_id=concern.concern_id,
                referral_id=concern.referral_id,
                child_id=concern.child_id,
                agency=concern.agency,
                agency_reference=concern.agency_reference,
                body=body,
                sealed=sealed,
                recorded_at=concern.recorded_at.ToDatetime(tzinfo=UTC),
            )
        )

    async def get_concern(
        self, session: AsyncSession, concern_id: str, *, decrypt: Callable[[str], bool] | None = None
    ) -> pb.Concern | None:
        """The concern, decrypting only the sealed paths `decrypt` accepts (all by default)."""
        row = (
            await session.execute(
                select(tables.concerns.c.body, tables.concerns.c.sealed).where(
                    tables.concerns.c.concern_id == concern_id
                )
            )
        ).first()
        if row is None:
            return None
        return self._sealer.open_record(
            pb.Concern, row.body, row.sealed, table="concerns", record_id=concern_id, only=decrypt
        )

    # Consent and sharing decisions ------------------------------------------------------------
    async def child_exists(self, session: AsyncSession, child_id: str) -> bool:
        c = tables.children.c
        return (await session.execute(select(c.child_id).where(c.child_id == child_id))).first() is not None

    async def current_consent(self, session: AsyncSession, child_id: str) -> pb.ConsentRecord | None:
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
        return self._sealer.unseal(record, row.sealed, table="consents", record_id=f"{row.child_id}/{row.version}")

    async def add_consent(self, session: AsyncSession, record: pb.ConsentRecord) -> None:
        sealed = self._sealer.seal(
            pb.ConsentRecord(reason_not_sought=record.reason_not_sought),
            table="consents",
            record_id=f"{record.child_id}/{record.version}",
            scope=record.child_id,
        )
        await session.execute(
            tables.consents.insert().values(
                child_id=record.child_id,
                version=record.version,
                status=record.status,
                given_by=record.given_by,
                agencies=list(record.agencies),
                data_classes=list(record.data_classes),
                recorded_by=record.recorded_by,
                recorded_at=record.recorded_at.ToDatetime(tzinfo=UTC),
                sealed=sealed,
            )
        )

    async def add_sharing_decision(self, session: AsyncSession, decision: pb.SharingDecision) -> None:
        sealed = self._sealer.seal(
            pb.SharingDecision(reason=decision.reason),
            table="sharing_decisions",
            record_id=decision.decision_id,
            scope=decision.child_id,
        )
        await session.execute(
            tables.sharing_decisions.insert().values(
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
            )
        )

    async def active_sharing_decisions(
        self, session: AsyncSession, child_id: str, now: datetime
    ) -> list[pb.SharingDecision]:
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
            out.append(self._sealer.unseal(decision, row.sealed, table="sharing_decisions", record_id=row.decision_id))
        return out

    async def agencies_for_child(self, session: AsyncSession, child_id: str) -> set[int]:
        """The agencies that have raised a concern about the child (their basis for knowing it)."""
        c = tables.concerns.c
        return set((await session.execute(select(c.agency).where(c.child_id == child_id).distinct())).scalars())

    # Break-glass -------------------------------------------------------------------------------
    async def add_grant(self, session: AsyncSession, grant: pb.BreakGlassGrant) -> None:
        sealed = self._sealer.seal(
            pb.BreakGlassGrant(reason=grant.reason), table="break_glass_grants", record_id=grant.grant_id
        )
        await session.execute(
            tables.break_glass_grants.insert().values(
                grant_id=grant.grant_id,
                child_id=grant.child_id,
                user_id=grant.user_id,
                agency=grant.agency,
                granted_at=grant.granted_at.ToDatetime(tzinfo=UTC),
                expires_at=grant.expires_at.ToDatetime(tzinfo=UTC),
                review_due_at=grant.review_due_at.ToDatetime(tzinfo=UTC),
                end_audited=False,
                sealed=sealed,
            )
        )

    async def grants_for(self, session: AsyncSession, user_id: str, child_id: str) -> list:  # type: ignore[type-arg]
        """The user's grants for the child that are active or whose end is not yet audited."""
        g = tables.break_glass_grants.c
        return list(
            (
                await session.execute(
                    select(g.grant_id, g.granted_at, g.expires_at, g.end_audited).where(
                        g.user_id == user_id, g.child_id == child_id, g.end_audited.is_(False)
                    )
                )
            ).all()
        )

    async def mark_grant_end_audited(self, session: AsyncSession, grant_id: str) -> None:
        g = tables.break_glass_grants.c
        await session.execute(update(tables.break_glass_grants).where(g.grant_id == grant_id).values(end_audited=True))
