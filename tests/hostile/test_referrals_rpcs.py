"""Every referrals RPC under hostile input: mutated requests (Unicode edge cases, SQL-looking
strings, huge repeated fields, unknown enum numbers, boundary dates and timestamps, empty required
fields) from the usual caller and from others; raw, truncated or corrupt bytes; and forged or junk
user tokens."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx.safeguarding.v1 import safeguarding_pb2
from csx.types.v1 import types_pb2 as t
from csx_common import client
from csx_common.pki import PeerIdentity
from tests.hostile.conftest import Running, Starter
from tests.hostile.support import (
    CANARIES,
    Injected,
    Rpc,
    attack_with_bytes,
    attack_with_mutations,
    changed,
    hostile_settings,
    row_counts,
    service_methods,
)
from tests.support import concern_request, dev_pki, user

SERVICE = "/csx.referrals.v1.ReferralsService/"
DSL = user("education", "dsl", "referral_screening", "dsl.hostile")
SOCIAL_WORKER = user("social_care", "social_worker", "referral_screening", "sw.hostile")
DPO = user("social_care", "data_protection_officer", "records_management", "dpo.hostile.one")
DPO2 = user("social_care", "data_protection_officer", "records_management", "dpo.hostile.two")
MASH = user("social_care", "mash_manager", "referral_screening", "mm.hostile")
OTHERS = [
    user("police", "police_officer", "action_delivery", "pc.hostile"),
    user("social_care", "no_such_role", "referral_screening", "odd.hostile"),
    user("social_care", "social_worker", "no_such_purpose", "odd2.hostile"),
    # Users whose ids (from the identity provider) are themselves odd.
    user("social_care", "social_worker", "referral_screening", "'; DROP TABLE audit_log;--"),
    user("social_care", "social_worker", "referral_screening", "\u202eni.resu\U0001f600\x00"),
    user("social_care", "data_protection_officer", "records_management", "d" * 300),
    SOCIAL_WORKER,
    DSL,
    DPO,
    DPO2,
    MASH,
]
REASON = "Extra-familial harm only, seen at the station with older youths."


@dataclass
class Seeds:
    child_id: str
    referral_id: str
    concern_id: str
    erasure_id: str
    other_child_id: str
    match_id: str
    grant_id: str

    def ids(self) -> list[str]:
        return [
            self.child_id,
            self.referral_id,
            self.concern_id,
            self.erasure_id,
            self.other_child_id,
            self.match_id,
            self.grant_id,
        ]


def canary_concern(key: str) -> pb.SubmitConcernRequest:
    req = concern_request(key)
    req.child.given_name, req.child.family_name = CANARIES[0], CANARIES[1]
    req.narrative, req.referrer.name = CANARIES[2], CANARIES[3]
    req.intelligence.CopyFrom(
        pb.IntelligenceGrading(
            source_grade=pb.SOURCE_GRADE_B,
            intelligence_grade=2,
            handling_code=pb.HANDLING_CODE_C,
            handling_conditions="Not to be shared with the family.",
        )
    )
    return req


def in_days(days: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(days=days))
    return stamp


def rpcs(s: Seeds) -> dict[str, Rpc]:
    known = s.ids()
    table = [
        Rpc("SubmitConcern", canary_concern, DSL),
        Rpc("GetConcern", lambda k: pb.GetConcernRequest(concern_id=s.concern_id), SOCIAL_WORKER),
        Rpc(
            "RecordScreeningDecision",
            lambda k: pb.RecordScreeningDecisionRequest(
                referral_id=s.referral_id,
                idempotency_key=k,
                outcome=pb.SCREENING_OUTCOME_INTERVENTION_A,
                reason=REASON,
                decided_by="sw.hostile",
                strategy_discussion_on="2026-03-02",
            ),
            SOCIAL_WORKER,
        ),
        Rpc("GetReferral", lambda k: pb.GetReferralRequest(referral_id=s.referral_id), SOCIAL_WORKER),
        Rpc(
            "RecordConsent",
            lambda k: pb.RecordConsentRequest(
                child_id=s.child_id,
                idempotency_key=k,
                status=safeguarding_pb2.CONSENT_STATUS_NOT_SOUGHT,
                given_by=pb.CONSENT_GIVER_NONE,
                agencies=[t.AGENCY_POLICE, t.AGENCY_EDUCATION],
                data_classes=[10, 2],
                reason_not_sought="Seeking it would prejudice the child's protection.",
            ),
            SOCIAL_WORKER,
        ),
        Rpc(
            "RecordSharingDecision",
            lambda k: pb.RecordSharingDecisionRequest(
                child_id=s.child_id,
                idempotency_key=k,
                share=True,
                lawful_basis=safeguarding_pb2.LAWFUL_BASIS_SCH1_PARA18,
                reason=REASON,
                approver="manager.hostile",
                expires_at=in_days(30),
                agencies=[t.AGENCY_POLICE],
                data_classes=[10],
            ),
            SOCIAL_WORKER,
        ),
        Rpc("GetDisclosureState", lambda k: pb.GetDisclosureStateRequest(child_id=s.child_id), SOCIAL_WORKER),
        Rpc(
            "StartBreakGlass",
            lambda k: pb.StartBreakGlassRequest(
                child_id=s.child_id, idempotency_key=k, reason="Child missing tonight; police need the history now."
            ),
            OTHERS[0],
        ),
        Rpc(
            "RequestErasure",
            lambda k: pb.RequestErasureRequest(
                child_id=s.other_child_id,
                basis=safeguarding_pb2.ERASURE_BASIS_RECORDED_IN_ERROR,
                reason="Recorded about the wrong child after a mistaken match.",
                idempotency_key=k,
            ),
            DPO,
        ),
        Rpc("ApproveErasure", lambda k: pb.ApproveErasureRequest(erasure_id=s.erasure_id), DPO2),
        Rpc("EraseDue", lambda k: pb.EraseDueRequest(dry_run=True, limit=10), DPO),
        Rpc("ListPossibleMatches", lambda k: pb.ListPossibleMatchesRequest(include_resolved=True), SOCIAL_WORKER),
        Rpc(
            "ResolvePossibleMatch",
            lambda k: pb.ResolvePossibleMatchRequest(
                match_id=s.match_id, idempotency_key=k, same_child=False, reason="Twins: checked with the school."
            ),
            SOCIAL_WORKER,
        ),
        Rpc(
            "RecordBreakGlassReview",
            lambda k: pb.RecordBreakGlassReviewRequest(
                grant_id=s.grant_id,
                idempotency_key=k,
                outcome=pb.BREAK_GLASS_REVIEW_OUTCOME_JUSTIFIED,
                notes="Emergency confirmed with the duty inspector.",
            ),
            MASH,
        ),
    ]
    return {
        SERVICE + r.path: Rpc(SERVICE + r.path, r.base, r.caller, [o for o in OTHERS if o != r.caller], known)
        for r in table
    }


@pytest.fixture(scope="module")
async def referrals(starter: Starter) -> AsyncIterator[tuple[Running, dict[str, Rpc]]]:
    running = await starter.referrals()
    stub = referrals_pb2_grpc.ReferralsServiceStub(running.channel(DSL))
    first = await stub.SubmitConcern(canary_concern("hostile-seed-0001"), timeout=10)
    other = concern_request("hostile-seed-0002")
    other.child.nhs_number = ""
    other.child.given_name, other.child.family_name = "Otherhostile", "Childhostile"
    second = await stub.SubmitConcern(other, timeout=10)
    dpo = referrals_pb2_grpc.ReferralsServiceStub(running.channel(DPO))
    erasure = await dpo.RequestErasure(
        pb.RequestErasureRequest(
            child_id=second.child_id,
            basis=safeguarding_pb2.ERASURE_BASIS_RECORDED_IN_ERROR,
            reason="Recorded about the wrong child after a mistaken match.",
            idempotency_key="hostile-seed-erasure",
        ),
        timeout=10,
    )
    # A possible match (the seeded NHS number under another name) and a break-glass grant to review.
    third = canary_concern("hostile-seed-0003")
    third.child.given_name = "Differenthostile"
    await stub.SubmitConcern(third, timeout=10)
    social = referrals_pb2_grpc.ReferralsServiceStub(running.channel(SOCIAL_WORKER))
    (match,) = (await social.ListPossibleMatches(pb.ListPossibleMatchesRequest(), timeout=10)).matches
    grant = await referrals_pb2_grpc.ReferralsServiceStub(running.channel(OTHERS[0])).StartBreakGlass(
        pb.StartBreakGlassRequest(
            child_id=first.child_id,
            idempotency_key="hostile-seed-grant",
            reason="Child missing tonight; police need the history now.",
        ),
        timeout=10,
    )
    seeds = Seeds(
        first.child_id,
        first.referral_id,
        first.concern_id,
        erasure.erasure.erasure_id,
        second.child_id,
        match.match_id,
        grant.grant.grant_id,
    )
    yield running, rpcs(seeds)


def test_every_referrals_rpc_is_attacked() -> None:
    seeds = Seeds(*(["00000000-0000-0000-0000-000000000000"] * 7))
    assert sorted(rpcs(seeds)) == sorted(service_methods(pb.DESCRIPTOR, "ReferralsService"))


METHODS = service_methods(pb.DESCRIPTOR, "ReferralsService")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[-1])
@hostile_settings(25)
@given(data=st.data())
async def test_mutated_requests_get_clean_answers_and_leave_nothing(referrals, method: str, data) -> None:  # type: ignore[no-untyped-def]
    running, table = referrals
    await attack_with_mutations(running, table[method], data)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit("/", 1)[-1])
@hostile_settings(12)
@given(data=st.data())
async def test_raw_bytes_get_clean_answers_and_leave_nothing(referrals, method: str, data) -> None:  # type: ignore[no-untyped-def]
    running, table = referrals
    await attack_with_bytes(running, table[method], data)


def forged_tokens() -> st.SearchStrategy[str]:
    """Bearer values a client might send: printable junk, and JWTs unsigned, signed by another key,
    expired, or with claims of the wrong shape."""
    now = int(time.time())
    claims = {"iss": "x", "aud": "csx", "sub": "sw.one", "agency": "social_care", "role": "social_worker"}
    claims |= {"purpose": "referral_screening", "iat": now, "exp": now + 300}
    ours = dev_pki().token_key_file.read_bytes()
    other = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    forged = [
        jwt.encode(claims, None, algorithm="none"),
        jwt.encode(claims, other, algorithm="EdDSA"),
        jwt.encode(claims | {"iat": now - 7200, "exp": now - 3600}, ours, algorithm="EdDSA"),
        jwt.encode(claims | {"exp": now + 86400}, ours, algorithm="EdDSA"),
        jwt.encode(claims | {"aud": "elsewhere"}, ours, algorithm="EdDSA"),
        jwt.encode(claims | {"agency": "police"}, ours, algorithm="EdDSA"),
        jwt.encode(claims | {"sub": {"$gt": ""}}, ours, algorithm="EdDSA"),
        jwt.encode({k: v for k, v in claims.items() if k != "role"}, ours, algorithm="EdDSA"),
        jwt.encode(claims, "a-shared-secret-of-at-least-32-bytes!", algorithm="HS256"),
    ]
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=400)
    return st.one_of(st.sampled_from(forged), printable, st.sampled_from(forged).map(lambda t: t[:-3] + "AAA"))


@hostile_settings(20)
@given(token=forged_tokens())
async def test_forged_or_junk_tokens_are_refused_and_leave_nothing(referrals, token: str) -> None:  # type: ignore[no-untyped-def]
    """An agency's system (a valid certificate) with a bad user token: UNAUTHENTICATED or
    PERMISSION_DENIED, nothing written, the token never repeated."""
    running, table = referrals
    channel = client.channel(running.address, dev_pki().credentials(PeerIdentity("agency", "social_care")))
    try:
        before = await row_counts(running.runtime)
        method = channel.unary_unary(SERVICE + "RecordConsent", request_serializer=None, response_deserializer=None)
        request = table[SERVICE + "RecordConsent"].base("hostile-token-01")
        try:
            await method(request.SerializeToString(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            raise AssertionError("a forged token was accepted")
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), err
            injected = Injected()
            injected.add(token)
            assert not injected.echoed_in((err.details() or "").encode())
        assert not changed(before, await row_counts(running.runtime))
    finally:
        await channel.close()
