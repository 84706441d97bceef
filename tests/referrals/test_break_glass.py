"""Break-glass (issue 3 item 5): a named user, a mandatory reason, one hour, audited at start and
end, a review due within 72 hours; after expiry the next read is denied."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from sqlalchemy import select

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx_referrals import tables
from tests.referrals.conftest import Referrals
from tests.support import concern_request, user, user_channel

NURSE = user("health", "health_safeguarding_nurse", "conference_participation", "nurse.ae")
NURSE_IN_EMERGENCY = user("health", "health_safeguarding_nurse", "break_glass", "nurse.ae")


async def test_break_glass_grants_one_hour_then_the_next_read_is_denied(referrals: Referrals) -> None:
    submitted = await referrals.stub.SubmitConcern(concern_request("bg-concern-1"), timeout=10)
    read = pb.GetConcernRequest(concern_id=submitted.concern_id)
    address = referrals.runtime.settings.grpc_address
    async with user_channel(address, NURSE) as ordinary, user_channel(address, NURSE_IN_EMERGENCY) as emergency:
        nurse = referrals_pb2_grpc.ReferralsServiceStub(ordinary)
        urgent = referrals_pb2_grpc.ReferralsServiceStub(emergency)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # no basis for this child
            await urgent.GetConcern(read, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        too_short = pb.StartBreakGlassRequest(
            child_id=submitted.child_id, idempotency_key="bg-start-01", reason="urgent"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await nurse.StartBreakGlass(too_short, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        started = await nurse.StartBreakGlass(
            pb.StartBreakGlassRequest(
                child_id=submitted.child_id,
                idempotency_key="bg-start-02",
                reason="Child in A&E unconscious; need known risks before treatment tonight.",
            ),
            timeout=5,
        )
        grant = started.grant
        hours = lambda a, b: (b.ToDatetime() - a.ToDatetime()) / timedelta(hours=1)  # noqa: E731
        assert hours(grant.granted_at, grant.expires_at) == 1
        assert hours(grant.granted_at, grant.review_due_at) == 72

        granted = await urgent.GetConcern(read, timeout=5)
        assert granted.concern.child.given_name == "Canarygiven"
        with pytest.raises(grpc.aio.AioRpcError):  # the grant serves only the break_glass purpose
            await nurse.GetConcern(read, timeout=5)

        # An hour and a minute later:
        _service_of(referrals)._units.clock = lambda: datetime.now(UTC) + timedelta(hours=1, minutes=1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await urgent.GetConcern(read, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    a = tables.audit.log.c
    async with referrals.runtime.db.session() as s:
        actions = [
            (r.action, r.record_id)
            for r in (
                await s.execute(select(a.action, a.record_id).where(a.actor_user_id == "nurse.ae").order_by(a.seq))
            )
        ]
    assert ("break_glass_start", grant.grant_id) in actions
    assert actions.count(("break_glass_end", grant.grant_id)) == 1
    assert actions.index(("break_glass_start", grant.grant_id)) < actions.index(("break_glass_end", grant.grant_id))
    async with referrals.runtime.db.session() as s:
        sealed = (await s.execute(select(tables.break_glass_grants.c.sealed))).scalars().all()
    assert all("A&E" not in str(v) for v in sealed)


def _service_of(referrals: Referrals):  # type: ignore[no-untyped-def]
    """The ReferralsService behind the runtime's gRPC servicer (to move its clock)."""
    import gc

    from csx_referrals.service import ReferralsService

    return next(o for o in gc.get_objects() if isinstance(o, ReferralsService) and o._db is referrals.runtime.db)


MASH_MANAGER = user("social_care", "mash_manager", "referral_screening", "mm.review")


async def _grant(referrals: Referrals, key: str) -> pb.BreakGlassGrant:
    submitted = await referrals.stub.SubmitConcern(concern_request(f"bg-c-{key}"), timeout=10)
    async with user_channel(referrals.runtime.settings.grpc_address, NURSE) as channel:
        started = await referrals_pb2_grpc.ReferralsServiceStub(channel).StartBreakGlass(
            pb.StartBreakGlassRequest(
                child_id=submitted.child_id,
                idempotency_key=f"bg-s-{key}",
                reason="Child in A&E unconscious; need known risks before treatment tonight.",
            ),
            timeout=5,
        )
    return started.grant


async def test_a_grant_is_published_for_every_service(referrals: Referrals) -> None:

    grant = await _grant(referrals, "pub1")
    outbox = tables.delivery.outbox.c
    async with referrals.runtime.db.session() as s:
        payload = (
            await s.execute(select(outbox.payload).where(outbox.subject == "csx.referrals.break_glass_granted"))
        ).scalar_one()
    event = safeguarding_events.BreakGlassGranted.FromString(payload)
    assert (event.grant_id, event.child_id, event.user_id) == (grant.grant_id, grant.child_id, "nurse.ae")
    assert event.expires_at == grant.expires_at
    assert b"A&E" not in payload  # the reason stays in referrals


async def test_the_review_is_a_second_persons_and_is_recorded_once(referrals: Referrals) -> None:
    grant = await _grant(referrals, "rev1")
    review = pb.RecordBreakGlassReviewRequest(
        grant_id=grant.grant_id,
        idempotency_key="bg-review-01",
        outcome=pb.BREAK_GLASS_REVIEW_OUTCOME_JUSTIFIED,
        notes="Emergency confirmed with the A&E consultant.",
    )
    address = referrals.runtime.settings.grpc_address
    grantee_as_manager = user("social_care", "mash_manager", "referral_screening", "nurse.ae")
    for who, code in (
        (NURSE, grpc.StatusCode.PERMISSION_DENIED),  # not a reviewer's role
        (user("social_care", "social_worker", "referral_screening", "sw.x"), grpc.StatusCode.PERMISSION_DENIED),
        (grantee_as_manager, grpc.StatusCode.FAILED_PRECONDITION),  # the grant's own user
    ):
        async with user_channel(address, who) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await referrals_pb2_grpc.ReferralsServiceStub(channel).RecordBreakGlassReview(review, timeout=5)
            assert err.value.code() == code
    async with user_channel(address, MASH_MANAGER) as channel:
        stub = referrals_pb2_grpc.ReferralsServiceStub(channel)
        done = await stub.RecordBreakGlassReview(review, timeout=5)
        assert done.grant.reviewed_by == "mm.review" and done.grant.review_notes.startswith("Emergency")
        assert await stub.RecordBreakGlassReview(review, timeout=5) == done  # a retry
        review.idempotency_key = "bg-review-02"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RecordBreakGlassReview(review, timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    g = tables.break_glass_grants.c
    async with referrals.runtime.db.session() as s:
        sealed = (await s.execute(select(g.sealed).where(g.grant_id == grant.grant_id))).scalar_one()
    assert set(sealed) == {"reason", "review_notes"}  # notes sealed beside the reason, never in clear


async def test_overdue_reviews_are_listed_for_an_alert(referrals: Referrals) -> None:
    import asyncio
    import json

    from typer.testing import CliRunner

    from csx_cli.main import app

    reviewed, late, fresh = [await _grant(referrals, k) for k in ("od1", "od2", "od3")]
    g = tables.break_glass_grants.c
    async with referrals.runtime.db.transaction() as s:
        for grant in (reviewed, late):  # both granted four days ago
            await s.execute(
                tables.break_glass_grants.update()
                .where(g.grant_id == grant.grant_id)
                .values(review_due_at=datetime.now(UTC) - timedelta(days=1))
            )
    async with user_channel(referrals.runtime.settings.grpc_address, MASH_MANAGER) as channel:
        await referrals_pb2_grpc.ReferralsServiceStub(channel).RecordBreakGlassReview(
            pb.RecordBreakGlassReviewRequest(
                grant_id=reviewed.grant_id,
                idempotency_key="bg-review-od",
                outcome=pb.BREAK_GLASS_REVIEW_OUTCOME_NOT_JUSTIFIED,
                notes="Not an emergency: raised with the nurse's manager.",
            ),
            timeout=5,
        )
    url = referrals.runtime.settings.database_url

    # The command runs its own event loop: in a thread of its own, as from a shell.
    def csx(*args: str):  # type: ignore[no-untyped-def]
        return asyncio.to_thread(
            CliRunner().invoke, app, ["audit", "breakglass", "--json", "--database-url", url, *args]
        )

    result = await csx("--overdue")
    assert result.exit_code == 1, result.output
    listed = json.loads(result.output)
    assert [g["grant_id"] for g in listed["grants"]] == [late.grant_id] and listed["overdue"] == 1
    everything = await csx()
    assert everything.exit_code == 0
    assert {g["grant_id"] for g in json.loads(everything.output)["grants"]} >= {
        reviewed.grant_id,
        late.grant_id,
        fresh.grant_id,
    }
