"""The referrals service in-process: real gRPC on loopback, real NATS, SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select, update

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_common.errors import error_reason, field_violations, status_details
from csx_referrals import tables
from tests.referrals.conftest import Referrals
from tests.support import concern_request, user, user_channel


async def test_health_is_serving_when_ready(referrals: Referrals) -> None:
    health = health_pb2_grpc.HealthStub(referrals.channel)
    for service in ("", "csx.referrals.v1.ReferralsService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_submit_is_idempotent_and_round_trips(referrals: Referrals) -> None:
    req = concern_request("idem-0001")
    first = await referrals.stub.SubmitConcern(req, timeout=10)
    again = await referrals.stub.SubmitConcern(req, timeout=10)
    assert first == again
    assert await referrals.stored() == (1, 1, 1, 1)
    got = await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=first.concern_id), timeout=5)
    assert got.concern.child == req.child and got.concern.narrative == req.narrative
    # A second concern about the same child joins the child's open referral.
    second = await referrals.stub.SubmitConcern(concern_request("idem-0002"), timeout=10)
    assert (second.child_id, second.referral_id) == (first.child_id, first.referral_id)


async def test_a_reference_used_again_with_other_content_is_a_conflict(referrals: Referrals) -> None:
    await referrals.stub.SubmitConcern(concern_request("reuse-0001"), timeout=10)
    before = await referrals.stored()
    for key in ("reuse-0001", "reuse-0002"):  # the same idempotency key, or a new one
        changed = concern_request(key, agency_reference="EDU-reuse-0001", narrative="something else")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await referrals.stub.SubmitConcern(changed, timeout=10)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error_reason(err.value) == "AGENCY_REFERENCE_CONFLICT"
    assert await referrals.stored() == before


async def test_the_same_reference_with_a_new_idempotency_key_answers_with_the_first_concern(
    referrals: Referrals,
) -> None:
    first = await referrals.stub.SubmitConcern(concern_request("ref-first-1"), timeout=10)
    before = await referrals.stored()
    resent = concern_request("ref-resent-1", agency_reference="EDU-ref-first-1")
    assert await referrals.stub.SubmitConcern(resent, timeout=10) == first
    assert await referrals.stored() == before
    # Another agency's reference is its own: the same text from the police is another concern.
    police = concern_request("ref-police-1", agency=1, agency_reference="EDU-ref-first-1")
    police_channel = user_channel(
        referrals.runtime.settings.grpc_address, user("police", "police_officer", "referral_screening", "pc.ref")
    )
    try:
        other = await referrals_pb2_grpc.ReferralsServiceStub(police_channel).SubmitConcern(police, timeout=10)
    finally:
        await police_channel.close()
    assert other.concern_id != first.concern_id


BAD_INPUTS = {
    "missing child": ({"child": None}, "child"),
    "missing narrative": ({"narrative": ""}, "narrative"),
    "oversized narrative": ({"narrative": "x" * 20001}, "narrative"),
    "malformed email": ({"referrer": {"name": "A", "role": "B", "email": "not-an-email"}}, "referrer.email"),
    "wrong nhs check digit": (
        {
            "child": {
                "nhs_number": "9434765918",
                "given_name": "A",
                "family_name": "B",
                "date_of_birth": "2010-01-01",
            }
        },
        "child.nhs_number",
    ),
    "future date of birth": (
        {"child": {"given_name": "A", "family_name": "B", "date_of_birth": "2999-01-01"}},
        "child.date_of_birth",
    ),
    "malformed date of birth": (
        {"child": {"given_name": "A", "family_name": "B", "date_of_birth": "17/05/2010"}},
        "child.date_of_birth",
    ),
    "unknown enum value": ({"harm_types": [2, 99]}, "harm_types[1]"),
    "unspecified agency": ({"agency": 0}, "agency"),
    "bad place id": (
        {"contexts": [pb.csx_dot_types_dot_v1_dot_types__pb2.ContextLink(place_id="Bad Place!", context_type=3)]},
        "contexts[0].place_id",
    ),
    "bad idempotency key": ({"idempotency_key": "x"}, "idempotency_key"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
async def test_bad_input_is_invalid_argument_and_stores_nothing(referrals: Referrals, case: str) -> None:
    overrides, field = BAD_INPUTS[case]
    req = concern_request("bad-00001")
    for name, value in overrides.items():
        if value is None:
            req.ClearField(name)
        elif isinstance(value, dict):
            getattr(req, name).Clear()
            for k, v in value.items():
                setattr(getattr(req, name), k, v)
        elif isinstance(value, list):
            req.ClearField(name)
            getattr(req, name).extend(value)
        else:
            setattr(req, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.SubmitConcern(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [f for f, _ in field_violations(err.value)]
    assert field in fields, fields
    text = f"{err.value.details()} {status_details(err.value)}"
    for value in ("Canary", "CANARY", "9434765918", "2999-01-01", "not-an-email"):
        assert value not in text
    assert await referrals.stored() == (0, 0, 0, 0)


async def test_oversized_message_is_resource_exhausted(referrals: Referrals) -> None:
    req = concern_request("huge-0001", narrative="x" * (300 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.SubmitConcern(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await referrals.stored() == (0, 0, 0, 0)


async def test_ciphertext_copied_to_another_row_is_data_loss(referrals: Referrals) -> None:
    a = await referrals.stub.SubmitConcern(concern_request("copy-0001"), timeout=10)
    b = await referrals.stub.SubmitConcern(
        concern_request(
            "copy-0002", child={"given_name": "Other", "family_name": "Child", "date_of_birth": "2011-01-01"}
        ),
        timeout=10,
    )
    async with referrals.runtime.db.transaction() as s:
        sealed_a = (
            await s.execute(select(tables.concerns.c.sealed).where(tables.concerns.c.concern_id == a.concern_id))
        ).scalar_one()
        await s.execute(
            update(tables.concerns).where(tables.concerns.c.concern_id == b.concern_id).values(sealed=sealed_a)
        )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=b.concern_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "Canary" not in err.value.details()


async def test_screening_decision_routes_once(referrals: Referrals) -> None:
    sub = await referrals.stub.SubmitConcern(concern_request("route-0001"), timeout=10)
    decision = pb.RecordScreeningDecisionRequest(
        referral_id=sub.referral_id,
        idempotency_key="decide-0001",
        outcome=pb.SCREENING_OUTCOME_INTERVENTION_B,
        reason="Extra-familial harm only; family protective.",
        decided_by="sw.jones",
    )
    first = await referrals.stub.RecordScreeningDecision(decision, timeout=10)
    assert first.referral.status == pb.REFERRAL_STATUS_ROUTED
    assert first == await referrals.stub.RecordScreeningDecision(decision, timeout=10)
    decision.idempotency_key = "decide-0002"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.RecordScreeningDecision(decision, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # ConcernRecorded, one ReferralRouted, and the outcome to the referring agency (ReferralDecided).
    async with referrals.runtime.db.session() as s:
        subjects = sorted((await s.execute(select(tables.delivery.outbox.c.subject))).scalars())
    assert subjects == [
        "csx.referrals.concern_recorded",
        "csx.referrals.partner.education.referral_decided",
        "csx.referrals.referral_routed",
    ]
    unknown = pb.GetReferralRequest(referral_id="0f8fad5b-d9cb-469f-a165-70867728950e")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.GetReferral(unknown, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_same_child_is_found_with_and_without_an_nhs_number(referrals: Referrals) -> None:
    with_nhs = await referrals.stub.SubmitConcern(concern_request("match-0001"), timeout=10)
    without = concern_request("match-0002")
    without.child.ClearField("nhs_number")
    again = await referrals.stub.SubmitConcern(without, timeout=10)
    assert again.child_id == with_nhs.child_id
    # And the other way round: first known by name and date of birth, later with an NHS number.
    first = concern_request("match-0003")
    first.child.ClearField("nhs_number")
    first.child.given_name = "Laterknown"
    known = await referrals.stub.SubmitConcern(first, timeout=10)
    later = concern_request("match-0004")
    later.child.given_name = "Laterknown"
    later.child.nhs_number = "4010232137"
    assert (await referrals.stub.SubmitConcern(later, timeout=10)).child_id == known.child_id


async def test_concurrent_concerns_about_one_child_make_one_child_and_one_open_referral(referrals: Referrals) -> None:
    import asyncio

    replies = await asyncio.gather(
        *(referrals.stub.SubmitConcern(concern_request(f"race-{i:04d}"), timeout=20) for i in range(8))
    )
    assert len({r.child_id for r in replies}) == 1
    assert len({r.referral_id for r in replies}) == 1
    assert await referrals.stored() == (8, 1, 1, 8)


@pytest.mark.parametrize("tamper", ["bit_flip", "truncated", "unknown_key_id"])
async def test_a_tampered_ciphertext_is_data_loss_never_a_value(referrals: Referrals, tamper: str) -> None:
    import base64

    submitted = await referrals.stub.SubmitConcern(concern_request(f"tamper-{tamper}"), timeout=10)
    c = tables.concerns.c
    async with referrals.runtime.db.transaction() as s:
        sealed = dict((await s.execute(select(c.sealed).where(c.concern_id == submitted.concern_id))).scalar_one())
        blob = bytearray(base64.b64decode(sealed["narrative"]))
        if tamper == "bit_flip":
            blob[len(blob) // 2] ^= 0x01
        elif tamper == "truncated":
            blob = blob[: len(blob) - 7]
        else:
            blob[3] ^= 0x20  # a byte of the key id: names a data key that does not exist
        sealed["narrative"] = base64.b64encode(bytes(blob)).decode()
        await s.execute(update(tables.concerns).where(c.concern_id == submitted.concern_id).values(sealed=sealed))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=submitted.concern_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "Canary" not in (err.value.details() or "") and "CANARY" not in (err.value.details() or "")
