"""Who sees what of one concern (issue 3 items 3-4): the same record read by social care, police,
education and health through real mutual-TLS channels, each getting exactly the fields the policy
allows, with the rest cleared and named; consent changes the very next read; every read audited."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy import select

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx.safeguarding.v1 import safeguarding_pb2
from csx_common.identity import Principal
from csx_referrals import tables
from tests.referrals.conftest import Referrals
from tests.support import concern_request, user, user_channel

POLICE = user("police", "police_officer", "action_delivery", "pc.smith")
EDUCATION = user("education", "dsl", "referral_screening", "dsl.jones")
HEALTH = user("health", "health_safeguarding_nurse", "conference_participation", "nurse.patel")

INTELLIGENCE = {"intelligence.source_grade", "intelligence.intelligence_grade", "intelligence.handling_code"}
REFERRER = {"referrer.name", "referrer.role", "referrer.email", "referrer.phone"}
IDENTITY = {"child.nhs_number", "child.given_name", "child.family_name", "child.date_of_birth"}


class Readers:
    def __init__(self, referrals: Referrals) -> None:
        self.referrals = referrals
        self.channels: list[grpc.aio.Channel] = []

    def stub(self, who: Principal) -> referrals_pb2_grpc.ReferralsServiceStub:
        channel = user_channel(self.referrals.runtime.settings.grpc_address, who)
        self.channels.append(channel)
        return referrals_pb2_grpc.ReferralsServiceStub(channel)

    async def read(self, who: Principal, concern_id: str) -> pb.GetConcernResponse:
        return await self.stub(who).GetConcern(pb.GetConcernRequest(concern_id=concern_id), timeout=5)


@pytest.fixture
async def readers(referrals: Referrals) -> AsyncIterator[Readers]:
    r = Readers(referrals)
    yield r
    for channel in r.channels:
        await channel.close()


async def police_concern(readers: Readers, *, routed: bool = True) -> pb.SubmitConcernResponse:
    request = concern_request("disc-pol-01")
    request.agency = 1  # AGENCY_POLICE
    request.agency_reference = "OCC-0001"
    request.referrer.name = "PC Canary"
    request.intelligence.source_grade = pb.SOURCE_GRADE_B
    request.intelligence.intelligence_grade = 2
    request.intelligence.handling_code = pb.HANDLING_CODE_P
    response = await readers.stub(POLICE).SubmitConcern(request, timeout=10)
    # The school has raised its own concern about the same child, and social care has routed the
    # referral holding both: that routing is the school's basis for knowing the child.
    await readers.stub(EDUCATION).SubmitConcern(concern_request("disc-edu-01"), timeout=10)
    if routed:
        await route(readers.referrals, response.referral_id)
    return response


async def route(referrals: Referrals, referral_id: str, key: str = "disc-route-1") -> None:
    await referrals.stub.RecordScreeningDecision(
        pb.RecordScreeningDecisionRequest(
            referral_id=referral_id,
            idempotency_key=key,
            outcome=pb.SCREENING_OUTCOME_INTERVENTION_B,
            reason="Extra-familial harm only: seen with older youths at the station.",
            decided_by="sw.mash",
        ),
        timeout=10,
    )


def assert_cleared(concern: pb.Concern, paths: set[str]) -> None:
    for path in paths:
        holder = concern
        *parents, leaf = path.split(".")
        for name in parents:
            holder = getattr(holder, name)
        assert (
            not holder.HasField(leaf)
            if holder.DESCRIPTOR.fields_by_name[leaf].has_presence
            else not getattr(holder, leaf)
        ), path


async def test_each_agency_sees_exactly_what_the_policy_allows(referrals: Referrals, readers: Readers) -> None:
    submitted = await police_concern(readers)
    social = await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=submitted.concern_id), timeout=5)
    assert list(social.redacted_fields) == []
    assert social.concern.referrer.name == "PC Canary" and social.concern.narrative

    # The raising agency reads its own concern in full: its own words are not a disclosure to it.
    police = await readers.read(POLICE, submitted.concern_id)
    assert list(police.redacted_fields) == []
    assert police.concern.referrer.name == "PC Canary" and police.concern.narrative
    assert police.concern.intelligence.intelligence_grade == 2

    education = await readers.read(EDUCATION, submitted.concern_id)
    hidden = INTELLIGENCE | REFERRER | {"narrative", "intelligence.handling_conditions"}
    assert set(education.redacted_fields) == hidden
    assert_cleared(education.concern, hidden)
    assert education.concern.child.given_name == "Canarygiven"  # identity: an involved agency

    with pytest.raises(grpc.aio.AioRpcError) as err:  # health has no basis for this child
        await readers.read(HEALTH, submitted.concern_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_consent_changes_the_next_read(referrals: Referrals, readers: Readers) -> None:
    submitted = await police_concern(readers)

    async def consent(status: int, key: str) -> None:
        await referrals.stub.RecordConsent(
            pb.RecordConsentRequest(
                child_id=submitted.child_id, idempotency_key=key, status=status, given_by=pb.CONSENT_GIVER_YOUNG_PERSON
            ),
            timeout=5,
        )

    await consent(safeguarding_pb2.CONSENT_STATUS_GIVEN, "consent-give-1")
    education = await readers.read(EDUCATION, submitted.concern_id)
    assert set(education.redacted_fields) == REFERRER
    assert education.concern.narrative

    await consent(safeguarding_pb2.CONSENT_STATUS_WITHDRAWN, "consent-wd-01")
    education = await readers.read(EDUCATION, submitted.concern_id)
    assert IDENTITY | {"narrative"} <= set(education.redacted_fields)
    assert_cleared(education.concern, IDENTITY | {"narrative"})
    assert education.concern.agency_reference == "OCC-0001"  # operational data stays with involved agencies
    # A withdrawal takes nothing from the police's own concern: it was never shared with them.
    assert list((await readers.read(POLICE, submitted.concern_id)).redacted_fields) == []


async def test_every_read_and_refusal_is_audited_with_field_names_only(referrals: Referrals, readers: Readers) -> None:
    submitted = await police_concern(readers)
    await readers.read(EDUCATION, submitted.concern_id)
    with pytest.raises(grpc.aio.AioRpcError):
        await readers.read(HEALTH, submitted.concern_id)
    a = tables.audit.log.c
    async with referrals.runtime.db.session() as s:
        rows = (await s.execute(select(tables.audit.log).order_by(a.seq))).all()
    education_rows = [r for r in rows if r.actor_user_id == "dsl.jones"]
    assert {(r.action, r.decision) for r in education_rows} == {("read", "allow"), ("deny", "deny")}
    denied = {f for r in education_rows if r.decision == "deny" for f in r.field_names}
    assert denied == INTELLIGENCE | REFERRER | {"narrative", "intelligence.handling_conditions"}
    assert all(r.rule_id for r in rows)
    [refusal] = [r for r in rows if r.actor_user_id == "nurse.patel"]
    assert (refusal.decision, refusal.record_id) == ("deny", submitted.concern_id)
    stored = " ".join(str(tuple(r)) for r in rows)
    for value in ("Canarygiven", "PC Canary", "CANARY-NARRATIVE", "9434765919"):
        assert value not in stored


async def test_fields_the_caller_may_not_see_are_never_decrypted(
    referrals: Referrals, readers: Readers, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted = await police_concern(readers)
    cipher = referrals.runtime.sealer._cipher
    decrypted: list[str] = []
    real = cipher.decrypt

    def spy(blob, ctx, keys):  # type: ignore[no-untyped-def]
        decrypted.append(ctx.field)
        return real(blob, ctx, keys)

    monkeypatch.setattr(cipher, "decrypt", spy)
    education = await readers.read(EDUCATION, submitted.concern_id)
    concern_fields = [f for f in decrypted if not f.startswith(("reason", "reason_not_sought"))]
    assert "narrative" not in concern_fields and not any(f.startswith("referrer.") for f in concern_fields)
    assert "child.given_name" in concern_fields  # what it may see is decrypted
    assert set(education.redacted_fields) >= {"narrative", "referrer.name"}


async def test_a_read_whose_audit_cannot_be_written_is_refused(referrals: Referrals, readers: Readers) -> None:
    from sqlalchemy import text

    submitted = await police_concern(readers)
    if referrals.runtime.db.is_sqlite:
        statements = [
            "CREATE TRIGGER audit_full BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        ]
    else:
        statements = [
            "CREATE OR REPLACE FUNCTION audit_full() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$",
            "CREATE TRIGGER audit_full BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_full()",
        ]
    async with referrals.runtime.db.transaction() as s:  # the audit log can no longer be written
        for statement in statements:
            await s.execute(text(statement))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await readers.read(EDUCATION, submitted.concern_id)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "Canarygiven" not in (err.value.details() or "")


async def test_referral_reason_is_social_cares_and_unknown_to_agencies_without_a_basis(
    referrals: Referrals, readers: Readers
) -> None:
    submitted = await police_concern(readers, routed=False)
    await referrals.stub.RecordScreeningDecision(
        pb.RecordScreeningDecisionRequest(
            referral_id=submitted.referral_id,
            idempotency_key="disc-decide-1",
            outcome=pb.SCREENING_OUTCOME_INTERVENTION_B,
            reason="ZQXREASON extra-familial harm; family protective",
            decided_by="sw.test",
        ),
        timeout=5,
    )
    request = pb.GetReferralRequest(referral_id=submitted.referral_id)
    police = await readers.stub(POLICE).GetReferral(request, timeout=5)
    assert "reason" in police.redacted_fields and not police.referral.reason
    assert police.referral.status == pb.REFERRAL_STATUS_ROUTED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await readers.stub(HEALTH).GetReferral(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    social = await referrals.stub.GetReferral(request, timeout=5)
    assert social.referral.reason.startswith("ZQXREASON")


async def test_a_concern_edited_to_name_another_owner_fails_rather_than_discloses(referrals: Referrals) -> None:
    """The owning agency reads its own concern in full, so ownership is bound into each ciphertext's
    associated data: moving a concern to another agency in the database is DATA_LOSS, never a read."""
    from sqlalchemy import select, update

    from csx.referrals.v1 import referrals_pb2_grpc
    from csx_referrals import tables
    from tests.support import user, user_channel

    submitted = await referrals.stub.SubmitConcern(concern_request("owner-tamper-1"), timeout=10)  # education
    c = tables.concerns.c
    async with referrals.runtime.db.transaction() as s:
        body = (await s.execute(select(c.body).where(c.concern_id == submitted.concern_id))).scalar_one()
        moved = pb.Concern.FromString(body)
        moved.agency = 1  # police
        await s.execute(
            update(tables.concerns)
            .where(c.concern_id == submitted.concern_id)
            .values(agency=1, body=moved.SerializeToString())
        )
    police = user("police", "police_officer", "referral_screening", "pc.tamper")
    async with user_channel(referrals.runtime.settings.grpc_address, police) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await referrals_pb2_grpc.ReferralsServiceStub(channel).GetConcern(
                pb.GetConcernRequest(concern_id=submitted.concern_id), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "Canary" not in (err.value.details() or "") and "CANARY" not in (err.value.details() or "")


async def test_a_concern_moved_to_another_child_fails_rather_than_discloses(referrals: Referrals) -> None:
    """Disclosure is decided on the child's consent and sharing decisions, so a concern edited in the
    database to belong to another child must not be read under that child's basis: its ciphertexts
    name the first child's data key, and the read is DATA_LOSS."""
    from sqlalchemy import select, update

    first = await referrals.stub.SubmitConcern(concern_request("moved-child-1"), timeout=10)
    other = await referrals.stub.SubmitConcern(
        concern_request(
            "moved-child-2", child={"given_name": "Other", "family_name": "Kid", "date_of_birth": "2012-01-01"}
        ),
        timeout=10,
    )
    c = tables.concerns.c
    async with referrals.runtime.db.transaction() as s:
        body = (await s.execute(select(c.body).where(c.concern_id == first.concern_id))).scalar_one()
        moved = pb.Concern.FromString(body)
        moved.child_id = other.child_id
        await s.execute(
            update(tables.concerns)
            .where(c.concern_id == first.concern_id)
            .values(child_id=other.child_id, body=moved.SerializeToString())
        )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=first.concern_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
