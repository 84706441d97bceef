"""Erasure by key destruction and retention, in referrals (issue 4 items 3 and 4). The whole
stack's part (every service, the database copy, the CLI) is in tests/e2e/test_erasure.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from sqlalchemy import select, update

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx.safeguarding.v1 import safeguarding_pb2
from csx_referrals import tables
from tests.referrals.conftest import Referrals
from tests.support import concern_request, user, user_channel

DPO = user("social_care", "data_protection_officer", "records_management", "dpo.one")
DPO2 = user("social_care", "data_protection_officer", "records_management", "dpo.two")
SOCIAL_WORKER = user("social_care", "social_worker", "referral_screening", "sw.erasure")
REASON = "Recorded about the wrong child after a mistaken NHS number match."


def reason_of(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> str:
    from google.rpc import error_details_pb2, status_pb2

    for key, value in err.value.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


async def test_two_people_erase_a_child_and_nothing_else(referrals: Referrals) -> None:
    address = referrals.runtime.settings.grpc_address
    erased = await referrals.stub.SubmitConcern(concern_request("erase-a-1"), timeout=10)
    kept = await referrals.stub.SubmitConcern(
        concern_request("erase-b-1", child={"given_name": "Keep", "family_name": "Me", "date_of_birth": "2012-02-02"}),
        timeout=10,
    )
    # A remembered answer holding sealed text about the child (the break-glass reason).
    await referrals.stub.StartBreakGlass(
        pb.StartBreakGlassRequest(
            child_id=erased.child_id, idempotency_key="erase-bg-01", reason="SECRET-REASON for emergency access now"
        ),
        timeout=5,
    )
    async with user_channel(address, DPO) as one, user_channel(address, DPO2) as two:
        dpo, dpo2 = referrals_pb2_grpc.ReferralsServiceStub(one), referrals_pb2_grpc.ReferralsServiceStub(two)
        ask = pb.RequestErasureRequest(
            child_id=erased.child_id,
            basis=safeguarding_pb2.ERASURE_BASIS_RECORDED_IN_ERROR,
            reason=REASON,
            idempotency_key="erase-01",
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a social worker cannot erase
            await referrals.stub.RequestErasure(ask, timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        requested = (await dpo.RequestErasure(ask, timeout=5)).erasure
        assert (await dpo.RequestErasure(ask, timeout=5)).erasure == requested  # idempotent
        assert requested.requested_by == "dpo.one" and not requested.HasField("erased_at")
        # Nothing is erased yet, and the requester cannot approve their own request.
        assert (await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=erased.concern_id))).concern.narrative
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await dpo.ApproveErasure(pb.ApproveErasureRequest(erasure_id=requested.erasure_id), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and reason_of(err) == "SECOND_APPROVER_REQUIRED"

        approved = (await dpo2.ApproveErasure(pb.ApproveErasureRequest(erasure_id=requested.erasure_id))).erasure
        assert approved.approved_by == "dpo.two" and approved.HasField("erased_at") and approved.keys_destroyed >= 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await dpo2.ApproveErasure(pb.ApproveErasureRequest(erasure_id=requested.erasure_id), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_of(err) == "ALREADY_ERASED"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=erased.concern_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(err) == "RECORD_ERASED"
    assert "Canary" not in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:  # an open referral has nothing sealed: asked anyway
        await referrals.stub.GetReferral(pb.GetReferralRequest(referral_id=erased.referral_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(err) == "RECORD_ERASED"
    # Remembered answers (idempotency) about the child were sealed under its key: gone with it.
    from csx_common.crypto import KeyDestroyedError

    sealer = referrals.runtime.sealer
    async with referrals.runtime.db.session() as s:
        i = tables.idempotency.c
        for row in (await s.execute(select(i.scope, i.key, i.response, i.sealed))).all():
            if not row.sealed:
                continue
            try:
                opened = await sealer.open_record(
                    s, pb.StartBreakGlassResponse, row.response, row.sealed,
                    table="idempotency_keys", record_id=f"{row.scope}/{row.key}",
                )  # fmt: skip
            except KeyDestroyedError:
                continue
            assert opened.grant.child_id != erased.child_id
    other = await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=kept.concern_id), timeout=5)
    assert other.concern.child.given_name == "Keep"

    # The child can no longer be found; a new concern with the same identity makes a new record.
    again = await referrals.stub.SubmitConcern(concern_request("erase-a-2"), timeout=10)
    assert again.child_id != erased.child_id

    async with referrals.runtime.db.session() as s:
        child = (await s.execute(select(tables.children).where(tables.children.c.child_id == erased.child_id))).one()
        assert child.nhs_index is None and child.name_dob_index is None and child.erased_at is not None
        keys = tables.data_keys.c
        states = (
            await s.execute(select(keys.state, keys.wrapped).where(keys.scope == f"child:{erased.child_id}"))
        ).all()
        assert states and all(state == "destroyed" and wrapped is None for state, wrapped in states)
        a = tables.audit.log.c
        trail = (
            await s.execute(
                select(a.actor_user_id, a.action, a.rule_id).where(a.child_id == erased.child_id, a.action == "erase")
            )
        ).all()
        assert [tuple(t) for t in trail] == [
            ("dpo.one", "erase", "erasure-requested"),
            ("dpo.two", "erase", "erasure-approved"),
        ]
        o = tables.delivery.outbox.c
        subjects = (await s.execute(select(o.subject))).scalars().all()
    assert subjects.count("csx.referrals.child_erased") == 1


async def test_retention_erases_children_whose_case_closed_35_years_ago(referrals: Referrals) -> None:
    address = referrals.runtime.settings.grpc_address
    old = await referrals.stub.SubmitConcern(concern_request("retention-old"), timeout=10)
    recent = await referrals.stub.SubmitConcern(
        concern_request(
            "retention-new", child={"given_name": "Recent", "family_name": "Case", "date_of_birth": "2015-01-01"}
        ),
        timeout=10,
    )
    still_open = await referrals.stub.SubmitConcern(
        concern_request(
            "retention-open", child={"given_name": "Open", "family_name": "Case", "date_of_birth": "2015-01-02"}
        ),
        timeout=10,
    )
    # Retention runs from the case's closure (docs/adr/0014), not from the referral's decision: the
    # two cases are closed by a real decision (no further action, nothing else open), and then their
    # closure is moved back in time. (Until issue 12 this test moved the referrals' decided_at back.)
    for response, key in ((old, "retention-old-nfa"), (recent, "retention-new-nfa")):
        await referrals.stub.RecordScreeningDecision(
            pb.RecordScreeningDecisionRequest(
                referral_id=response.referral_id,
                idempotency_key=key,
                outcome=pb.SCREENING_OUTCOME_NO_FURTHER_ACTION,
                reason="No further action: the school's support plan is enough.",
                decided_by="sw.jones",
            ),
            timeout=10,
        )
    decided = datetime.now(UTC) - timedelta(days=365 * 35 + 10)
    async with referrals.runtime.db.transaction() as s:
        r, c = tables.referrals.c, tables.cases.c
        for response, when in ((old, decided), (recent, datetime.now(UTC) - timedelta(days=365))):
            await s.execute(update(tables.cases).where(c.child_id == response.child_id).values(closed_at=when))
        await s.execute(  # opened long ago but still awaiting a decision: not due
            update(tables.referrals).where(r.referral_id == still_open.referral_id).values(opened_at=decided)
        )
    async with user_channel(address, DPO) as channel:
        dpo = referrals_pb2_grpc.ReferralsServiceStub(channel)
        dry = await dpo.EraseDue(pb.EraseDueRequest(dry_run=True), timeout=10)
        assert dry.due == 1 and not dry.erased
        run = await dpo.EraseDue(pb.EraseDueRequest(), timeout=10)
        assert [e.child_id for e in run.erased] == [old.child_id]
        assert run.erased[0].basis == safeguarding_pb2.ERASURE_BASIS_RETENTION_ENDED and run.erased[0].approved_by
        assert (await dpo.EraseDue(pb.EraseDueRequest(), timeout=10)).due == 0  # nothing left
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=old.concern_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for kept in (recent, still_open):
        assert (await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=kept.concern_id))).concern.narrative
    with pytest.raises(grpc.aio.AioRpcError) as err:  # only a data protection officer runs retention
        await referrals.stub.EraseDue(pb.EraseDueRequest(dry_run=True), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_two_approvers_at_once_erase_once(referrals: Referrals) -> None:
    import asyncio

    address = referrals.runtime.settings.grpc_address
    submitted = await referrals.stub.SubmitConcern(concern_request("erase-race-1"), timeout=10)
    approvers = [user("social_care", "data_protection_officer", "records_management", f"dpo.r{i}") for i in range(4)]
    async with user_channel(address, DPO) as channel:
        requested = (
            await referrals_pb2_grpc.ReferralsServiceStub(channel).RequestErasure(
                pb.RequestErasureRequest(
                    child_id=submitted.child_id,
                    basis=safeguarding_pb2.ERASURE_BASIS_LAWFUL_REQUEST,
                    reason=REASON,
                    idempotency_key="erase-race-01",
                ),
                timeout=5,
            )
        ).erasure

    async def approve(who) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
        async with user_channel(address, who) as channel:
            try:
                await referrals_pb2_grpc.ReferralsServiceStub(channel).ApproveErasure(
                    pb.ApproveErasureRequest(erasure_id=requested.erasure_id), timeout=10
                )
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    codes = await asyncio.gather(*(approve(a) for a in approvers))
    assert sorted(c.name for c in codes) == ["FAILED_PRECONDITION"] * 3 + ["OK"]
    async with referrals.runtime.db.session() as s:
        o = tables.delivery.outbox.c
        subjects = (await s.execute(select(o.subject))).scalars().all()
    assert subjects.count("csx.referrals.child_erased") == 1
