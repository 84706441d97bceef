"""A role is not taken on trust: the policy says which agencies' users may hold which roles, and a
token pairing a role with an agency that may not hold it is refused before any handler runs (so
not even an audit entry is written)."""

from __future__ import annotations

import grpc
import pytest

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_safeguarding.policy import PolicyEngine, PolicyError
from csx_safeguarding.policy.model import AGENCY_BY_NAME, Role
from tests.referrals.conftest import Referrals
from tests.support import concern_request, user, user_channel

# Claims a hostile partner might make, each refused at the door.
CLAIMED = [
    ("youth_justice", "auditor", "quality_assurance"),
    ("youth_justice", "panel_member", "panel_analysis"),
    ("police", "social_worker", "referral_screening"),
    ("education", "chair", "conference_participation"),
    ("health", "mash_manager", "referral_screening"),
    ("community_safety", "data_protection_officer", "records_management"),
    ("social_care", "auditor", "quality_assurance"),
    ("safeguarding_partnership", "panel_member", "panel_analysis"),
    ("police", "dsl", "referral_screening"),
]


async def audit_rows(referrals: Referrals) -> int:
    return await referrals.count(referrals.runtime.metadata.tables["audit_log"])


@pytest.mark.parametrize(("agency", "role", "purpose"), CLAIMED)
async def test_a_role_the_agency_may_not_hold_is_refused_before_any_handler(
    referrals: Referrals, agency: str, role: str, purpose: str
) -> None:
    concern = await referrals.stub.SubmitConcern(concern_request("roles-victim"), timeout=10)
    before = (await referrals.stored(), await audit_rows(referrals))
    channel = user_channel(referrals.runtime.settings.grpc_address, user(agency, role, purpose, f"{agency}.claims"))
    stub = referrals_pb2_grpc.ReferralsServiceStub(channel)
    try:
        for call in (
            stub.GetConcern(pb.GetConcernRequest(concern_id=concern.concern_id), timeout=10),
            stub.GetReferral(pb.GetReferralRequest(referral_id=concern.referral_id), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "role" in (err.value.details() or "")
    finally:
        await channel.close()
    assert (await referrals.stored(), await audit_rows(referrals)) == before


async def test_the_partnerships_quality_assurance_team_reads_operational_data_only(referrals: Referrals) -> None:
    concern = await referrals.stub.SubmitConcern(concern_request("roles-qa"), timeout=10)
    qa = user("safeguarding_partnership", "auditor", "quality_assurance", "qa.one")
    channel = user_channel(referrals.runtime.settings.grpc_address, qa)
    try:
        got = await referrals_pb2_grpc.ReferralsServiceStub(channel).GetConcern(
            pb.GetConcernRequest(concern_id=concern.concern_id), timeout=10
        )
    finally:
        await channel.close()
    assert got.concern.concern_id == concern.concern_id
    assert got.concern.narrative == "" and got.concern.child.given_name == ""
    assert {"narrative", "child.given_name", "referrer.name"} <= set(got.redacted_fields)


def test_every_role_is_placed_and_only_social_care_holds_the_statutory_roles() -> None:
    engine = PolicyEngine.default()
    assert engine.role_agencies is not None
    assert set(engine.role_agencies) == {r.value for r in Role}
    social_care = AGENCY_BY_NAME["social_care"]
    for role in ("social_worker", "mash_manager", "chair", "data_protection_officer"):
        assert engine.role_agencies[role] == {social_care}
    assert engine.role_agencies["auditor"] == {AGENCY_BY_NAME["safeguarding_partnership"]}
    assert not engine.admits("police", "no_such_role", "referral_screening")
    assert not engine.admits("no_such_agency", "practitioner", "action_delivery")
    assert not engine.admits("police", "police_officer", "no_such_purpose")


def test_a_policy_that_leaves_a_role_unplaced_does_not_load() -> None:
    from importlib import resources

    raw = resources.files("csx_safeguarding.policy").joinpath("policy.yaml").read_text()
    broken = raw.replace("  auditor: [safeguarding_partnership]\n", "")
    assert broken != raw
    with pytest.raises(PolicyError, match="auditor"):
        PolicyEngine.from_text(broken)
