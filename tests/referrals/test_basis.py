"""Asserting an identity is not access. A partner that knows a child's NHS number (or name and date
of birth) can submit a concern about the child, but that never opens another agency's records to
it: only a recorded decision does (social care's routing, a sharing decision). A partial identity
match links nothing until the MASH decides; the referrer is told the outcome of its referral."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_referrals import tables
from tests.hostile.support import hostile_settings
from tests.referrals.conftest import Referrals
from tests.support import VALID_NHS, concern_request, user, user_channel

POLICE = user("police", "police_officer", "referral_screening", "pc.attacker")
REASON = "Extra-familial harm only: seen with older youths at the station."
VICTIM = {
    "nhs_number": VALID_NHS,
    "given_name": "Canarygiven",
    "family_name": "Canaryfamily",
    "date_of_birth": "2010-05-17",
}


class Police:
    """The police's system, calling for one officer."""

    def __init__(self, referrals: Referrals) -> None:
        self.channel = user_channel(referrals.runtime.settings.grpc_address, POLICE)
        self.stub = referrals_pb2_grpc.ReferralsServiceStub(self.channel)
        self.n = 0

    async def submit(self, child: dict[str, str]) -> pb.SubmitConcernResponse:
        self.n += 1
        request = concern_request(f"pol-basis-{self.n:03d}", agency=1, agency_reference=f"POL-BASIS-{self.n}")
        request.child.Clear()
        for name, value in child.items():
            setattr(request.child, name, value)
        return await self.stub.SubmitConcern(request, timeout=10)

    async def code(self, call: object) -> grpc.StatusCode:
        try:
            await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    async def cannot_read_beyond_its_own(self, concern: pb.SubmitConcernResponse) -> None:
        """Another agency's concern is NOT_FOUND; its referral too, unless the police made the
        referral with it, when it lists only the police's own concerns."""
        concern_read, referral_read = await self.reads_of(concern)
        assert concern_read == grpc.StatusCode.NOT_FOUND
        if referral_read == grpc.StatusCode.OK:
            own = await self.stub.GetReferral(pb.GetReferralRequest(referral_id=concern.referral_id), timeout=10)
            assert concern.concern_id not in own.referral.concern_ids and own.referral.concern_ids
        else:
            assert referral_read == grpc.StatusCode.NOT_FOUND

    async def reads_of(self, concern: pb.SubmitConcernResponse) -> tuple[grpc.StatusCode, grpc.StatusCode]:
        """(GetConcern, GetReferral) of another agency's concern and referral, as the police."""
        return (
            await self.code(self.stub.GetConcern(pb.GetConcernRequest(concern_id=concern.concern_id), timeout=10)),
            await self.code(self.stub.GetReferral(pb.GetReferralRequest(referral_id=concern.referral_id), timeout=10)),
        )


@pytest.fixture
async def police(referrals: Referrals) -> AsyncIterator[Police]:
    p = Police(referrals)
    yield p
    await p.channel.close()


async def decide(referrals: Referrals, referral_id: str, outcome: int, key: str) -> pb.Referral:
    answer = await referrals.stub.RecordScreeningDecision(
        pb.RecordScreeningDecisionRequest(
            referral_id=referral_id, idempotency_key=key, outcome=outcome, reason=REASON, decided_by="sw.mash"
        ),
        timeout=10,
    )
    return answer.referral


async def open_matches(referrals: Referrals) -> list[pb.PossibleMatch]:
    return list((await referrals.stub.ListPossibleMatches(pb.ListPossibleMatchesRequest(), timeout=10)).matches)


async def test_a_known_nhs_number_with_another_name_links_nothing_and_opens_nothing(
    referrals: Referrals, police: Police
) -> None:
    school = await referrals.stub.SubmitConcern(concern_request("basis-edu-1"), timeout=10)  # education
    forged = await police.submit(dict(VICTIM, given_name="Invented", date_of_birth="2011-01-01"))
    # The same shape as for an unknown child: fresh ids, nothing that says the child was known.
    assert forged.child_id != school.child_id and forged.referral_id != school.referral_id
    assert set(f.name for f, _ in forged.ListFields()) == set(f.name for f, _ in school.ListFields())
    assert await police.reads_of(school) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND)
    [match] = await open_matches(referrals)
    assert (match.new_child_id, match.child_id) == (forged.child_id, school.child_id)
    assert match.kind == pb.POSSIBLE_MATCH_KIND_NHS_NUMBER_CONFLICT
    # Not screened while it may be a known child; the known child is, as usual (a conflicting
    # identity from a partner must not hold up the MASH's decision about the real child).
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decide(referrals, forged.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B, "basis-dec-1")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await decide(referrals, school.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B, "basis-dec-1b")
    assert await police.reads_of(school) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND)


async def test_the_exact_identity_links_but_opens_nothing_until_social_care_routes(
    referrals: Referrals, police: Police
) -> None:
    school = await referrals.stub.SubmitConcern(concern_request("basis-edu-2"), timeout=10)
    linked = await police.submit(VICTIM)
    assert (linked.child_id, linked.referral_id) == (school.child_id, school.referral_id)
    assert await open_matches(referrals) == []
    assert (await police.reads_of(school))[0] == grpc.StatusCode.NOT_FOUND
    # It made the referral, so it sees the referral's status, with its own concern only.
    own = await police.stub.GetReferral(pb.GetReferralRequest(referral_id=school.referral_id), timeout=10)
    assert list(own.referral.concern_ids) == [linked.concern_id]
    assert own.referral.status == pb.REFERRAL_STATUS_AWAITING_DECISION

    await decide(referrals, school.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B, "basis-dec-2")
    # The routing is the police's basis now: the school's concern, as the policy allows.
    read = await police.stub.GetConcern(pb.GetConcernRequest(concern_id=school.concern_id), timeout=10)
    assert read.concern.child.given_name == "Canarygiven" and not read.concern.narrative
    routed = await police.stub.GetReferral(pb.GetReferralRequest(referral_id=school.referral_id), timeout=10)
    assert set(routed.referral.concern_ids) == {school.concern_id, linked.concern_id}
    assert not routed.referral.reason and "reason" in routed.redacted_fields
    # The routing was audited as what opened the child's records to each referring agency.
    audit = referrals.runtime.metadata.tables["audit_log"].c
    async with referrals.runtime.db.session() as s:
        rules = set((await s.execute(select(audit.rule_id).where(audit.action == "involve"))).scalars())
        ids = set((await s.execute(select(audit.record_id).where(audit.action == "involve"))).scalars())
    assert rules == {"involvement-referred"}
    assert ids == {f"police:{school.referral_id}", f"education:{school.referral_id}"}


async def test_no_further_action_tells_the_referrer_the_outcome_and_opens_nothing(
    referrals: Referrals, police: Police
) -> None:
    school = await referrals.stub.SubmitConcern(concern_request("basis-edu-3"), timeout=10)
    mine = await police.submit(VICTIM)
    await decide(referrals, school.referral_id, pb.SCREENING_OUTCOME_NO_FURTHER_ACTION, "basis-dec-3")
    told = await police.stub.GetReferral(pb.GetReferralRequest(referral_id=school.referral_id), timeout=10)
    assert told.referral.outcome == pb.SCREENING_OUTCOME_NO_FURTHER_ACTION
    assert told.referral.status == pb.REFERRAL_STATUS_CLOSED and not told.referral.reason
    assert list(told.referral.concern_ids) == [mine.concern_id]
    assert (await police.reads_of(school))[0] == grpc.StatusCode.NOT_FOUND
    # Each referring agency hears the outcome on its own partner subject, its own concerns only.
    outbox = tables.delivery.outbox.c
    async with referrals.runtime.db.session() as s:
        rows = (await s.execute(select(outbox.subject, outbox.payload).where(outbox.subject.like("%.partner.%")))).all()
    from csx.referrals.v1 import events_pb2

    told_by_subject = {row.subject: events_pb2.ReferralDecided.FromString(row.payload) for row in rows}
    assert set(told_by_subject) == {
        "csx.referrals.partner.police.referral_decided",
        "csx.referrals.partner.education.referral_decided",
    }
    event = told_by_subject["csx.referrals.partner.police.referral_decided"]
    assert list(event.concern_ids) == [mine.concern_id]
    assert event.outcome == pb.SCREENING_OUTCOME_NO_FURTHER_ACTION


async def test_the_mash_resolves_a_possible_match(referrals: Referrals, police: Police) -> None:
    school = await referrals.stub.SubmitConcern(concern_request("basis-edu-4"), timeout=10)
    typo = await police.submit(dict(VICTIM, given_name="Canarygivn"))  # a typing error
    [match] = await open_matches(referrals)
    resolve = pb.ResolvePossibleMatchRequest(
        match_id=match.match_id, idempotency_key="resolve-0001", same_child=True, reason="Same child: a typing error"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:  # only social care decides
        await police.stub.ResolvePossibleMatch(resolve, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    resolved = await referrals.stub.ResolvePossibleMatch(resolve, timeout=10)
    assert resolved.match.status == pb.POSSIBLE_MATCH_STATUS_SAME_CHILD
    assert await referrals.stub.ResolvePossibleMatch(resolve, timeout=10) == resolved  # a retry
    # The police's concern now belongs to the known child and its referral, readable and re-sealed.
    moved = await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=typo.concern_id), timeout=10)
    assert (moved.concern.child_id, moved.concern.referral_id) == (school.child_id, school.referral_id)
    assert moved.concern.child.given_name == "Canarygivn"  # the concern keeps what was submitted
    referral = await referrals.stub.GetReferral(pb.GetReferralRequest(referral_id=school.referral_id), timeout=10)
    assert set(referral.referral.concern_ids) == {school.concern_id, typo.concern_id}
    async with referrals.runtime.db.session() as s:
        subjects = list((await s.execute(select(tables.delivery.outbox.c.subject))).scalars())
    assert "csx.referrals.children_merged" in subjects
    # Still nothing opened to the police: a merge is not a routing.
    assert (await police.reads_of(school))[0] == grpc.StatusCode.NOT_FOUND
    await decide(referrals, school.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B, "basis-dec-4")


async def test_a_different_child_stays_apart(referrals: Referrals, police: Police) -> None:
    school = await referrals.stub.SubmitConcern(concern_request("basis-edu-5"), timeout=10)
    other = await police.submit(dict(VICTIM, family_name="Otherfamily"))
    [match] = await open_matches(referrals)
    await referrals.stub.ResolvePossibleMatch(
        pb.ResolvePossibleMatchRequest(
            match_id=match.match_id, idempotency_key="resolve-0002", same_child=False, reason="Twins: two children"
        ),
        timeout=10,
    )
    assert await open_matches(referrals) == []
    await decide(referrals, other.referral_id, pb.SCREENING_OUTCOME_INTERVENTION_B, "basis-dec-5")
    assert (await police.reads_of(school))[0] == grpc.StatusCode.NOT_FOUND


async def test_a_name_and_date_of_birth_shared_by_two_children_links_neither(referrals: Referrals) -> None:
    twin = dict(VICTIM, nhs_number="")
    a = await referrals.stub.SubmitConcern(
        concern_request("basis-twin-a", child=dict(twin, nhs_number="9434765870")), timeout=10
    )
    b = await referrals.stub.SubmitConcern(
        concern_request("basis-twin-b", child=dict(twin, nhs_number=VALID_NHS)), timeout=10
    )
    assert a.child_id != b.child_id
    ambiguous = await referrals.stub.SubmitConcern(concern_request("basis-twin-c", child=twin), timeout=10)
    assert ambiguous.child_id not in (a.child_id, b.child_id)
    matches = await open_matches(referrals)
    assert {m.child_id for m in matches} == {a.child_id, b.child_id}
    assert {m.kind for m in matches} == {pb.POSSIBLE_MATCH_KIND_AMBIGUOUS_NAME_AND_DATE_OF_BIRTH}


# A property: whatever an agency submits, it reads no more of anyone else's records ----------------

IDENTITIES = st.sampled_from(
    [
        VICTIM,  # the exact identity
        dict(VICTIM, given_name="Invented"),  # the NHS number with another name
        dict(VICTIM, date_of_birth="2009-12-31"),  # ... or another date of birth
        dict(VICTIM, nhs_number=""),  # name and date of birth only
        {"given_name": "Someone", "family_name": "Else", "date_of_birth": "2012-03-04"},  # another child
    ]
)


_examples = iter(range(10**6))


@hostile_settings(12)
@given(identities=st.lists(IDENTITIES, min_size=1, max_size=4))
async def test_no_sequence_of_its_own_submissions_widens_what_an_agency_can_read(
    referrals: Referrals, police: Police, identities: list[dict[str, str]]
) -> None:
    """Another agency's concern and referral about a child stay NOT_FOUND to the police whatever
    the police submit about that child (the exact identity, its NHS number under another name, its
    name and date of birth, another child), in any order and number."""
    school = await referrals.stub.SubmitConcern(concern_request(f"basis-prop-{next(_examples)}"), timeout=10)
    await police.cannot_read_beyond_its_own(school)
    for identity in identities:
        await police.submit(identity)
        await police.cannot_read_beyond_its_own(school)
