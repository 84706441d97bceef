"""Consent and sharing decisions, owned by referrals (issue 3 item 2): social care records them,
every change is an event for the other services' views, reasons are sealed at rest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import select

from csx.options.v1 import options_pb2
from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.safeguarding.v1 import safeguarding_pb2
from csx.types.v1 import types_pb2
from csx_referrals import tables
from tests.referrals.conftest import Referrals
from tests.support import concern_request, user, user_channel


async def child_of(referrals: Referrals) -> str:
    return (await referrals.stub.SubmitConcern(concern_request("consent-c1"), timeout=10)).child_id


def in_days(days: int) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(datetime.now(UTC) + timedelta(days=days))
    return out


async def outbox_events(referrals: Referrals, subject: str) -> list[bytes]:
    o = tables.delivery.outbox.c
    async with referrals.runtime.db.session() as s:
        return list((await s.execute(select(o.payload).where(o.subject == subject).order_by(o.created_at))).scalars())


async def test_consent_changes_are_versioned_events(referrals: Referrals) -> None:
    child_id = await child_of(referrals)
    given = await referrals.stub.RecordConsent(
        pb.RecordConsentRequest(
            child_id=child_id,
            idempotency_key="consent-0001",
            status=safeguarding_pb2.CONSENT_STATUS_GIVEN,
            given_by=pb.CONSENT_GIVER_YOUNG_PERSON,
            agencies=[types_pb2.AGENCY_HEALTH, types_pb2.AGENCY_EDUCATION],
        ),
        timeout=10,
    )
    withdrawn = await referrals.stub.RecordConsent(
        pb.RecordConsentRequest(
            child_id=child_id,
            idempotency_key="consent-0002",
            status=safeguarding_pb2.CONSENT_STATUS_WITHDRAWN,
            given_by=pb.CONSENT_GIVER_YOUNG_PERSON,
        ),
        timeout=10,
    )
    assert (given.consent.version, withdrawn.consent.version) == (1, 2)
    assert given.consent.recorded_by == "sw.test"
    changes = [
        safeguarding_events.ConsentChanged.FromString(p)
        for p in await outbox_events(referrals, "csx.referrals.consent_changed")
    ]
    assert [(c.version, c.status) for c in changes] == [
        (1, safeguarding_pb2.CONSENT_STATUS_GIVEN),
        (2, safeguarding_pb2.CONSENT_STATUS_WITHDRAWN),
    ]
    state = await referrals.stub.GetDisclosureState(pb.GetDisclosureStateRequest(child_id=child_id), timeout=5)
    assert state.consent.status == safeguarding_pb2.CONSENT_STATUS_WITHDRAWN


async def test_not_sought_needs_a_reason_which_is_sealed(referrals: Referrals) -> None:
    child_id = await child_of(referrals)
    request = pb.RecordConsentRequest(
        child_id=child_id,
        idempotency_key="consent-ns-01",
        status=safeguarding_pb2.CONSENT_STATUS_NOT_SOUGHT,
        given_by=pb.CONSENT_GIVER_NONE,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.RecordConsent(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request.reason_not_sought = "ZQXREASON seeking it would alert the exploiters"
    recorded = await referrals.stub.RecordConsent(request, timeout=5)
    assert recorded.consent.reason_not_sought.startswith("ZQXREASON")
    async with referrals.runtime.db.session() as s:
        stored = (await s.execute(select(tables.consents.c.sealed))).scalars().all()
    assert stored and all("ZQXREASON" not in str(v) for v in stored)


async def test_sharing_decisions_to_share_and_not_to_share(referrals: Referrals) -> None:
    child_id = await child_of(referrals)
    bad = pb.RecordSharingDecisionRequest(
        child_id=child_id,
        idempotency_key="share-0001",
        share=True,
        reason="Police need the health picture to protect the child tonight.",
        approver="mash.manager",
        agencies=[types_pb2.AGENCY_POLICE],
        data_classes=[options_pb2.DATA_CLASS_HEALTH],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.RecordSharingDecision(bad, timeout=5)  # no lawful basis, no expiry
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad.lawful_basis = safeguarding_pb2.LAWFUL_BASIS_SCH1_PARA18
    bad.expires_at.CopyFrom(in_days(30))
    shared = await referrals.stub.RecordSharingDecision(bad, timeout=5)
    refused = await referrals.stub.RecordSharingDecision(
        pb.RecordSharingDecisionRequest(
            child_id=child_id,
            idempotency_key="share-0002",
            share=False,
            reason="Education must not see the police intelligence: it names a sibling.",
            approver="mash.manager",
            agencies=[types_pb2.AGENCY_EDUCATION],
            data_classes=[options_pb2.DATA_CLASS_POLICE_INTELLIGENCE],
        ),
        timeout=5,
    )
    state = await referrals.stub.GetDisclosureState(pb.GetDisclosureStateRequest(child_id=child_id), timeout=5)
    assert {d.decision_id for d in state.decisions} == {shared.decision.decision_id, refused.decision.decision_id}
    assert len(await outbox_events(referrals, "csx.referrals.sharing_decision_recorded")) == 2


async def test_only_social_care_records_or_reads_disclosure(referrals: Referrals) -> None:
    child_id = await child_of(referrals)
    address = referrals.runtime.settings.grpc_address
    async with user_channel(address, user("police", "police_officer", "action_delivery", "pc.1")) as channel:
        police = referrals_pb2_grpc.ReferralsServiceStub(channel)
        consent = pb.RecordConsentRequest(
            child_id=child_id, idempotency_key="consent-pol1", status=safeguarding_pb2.CONSENT_STATUS_GIVEN, given_by=1
        )
        for call in (
            police.RecordConsent(consent, timeout=5),
            police.GetDisclosureState(pb.GetDisclosureStateRequest(child_id=child_id), timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # An agency submits concerns as itself only.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await police.SubmitConcern(concern_request("as-education-1"), timeout=5)  # agency: education
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await outbox_events(referrals, "csx.referrals.consent_changed") == []


async def test_unknown_child_is_not_found(referrals: Referrals) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.RecordConsent(
            pb.RecordConsentRequest(
                child_id="0f8fad5b-d9cb-469f-a165-70867728950e",
                idempotency_key="consent-nf-1",
                status=safeguarding_pb2.CONSENT_STATUS_REFUSED,
                given_by=pb.CONSENT_GIVER_PARENT_OR_CARER,
            ),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
