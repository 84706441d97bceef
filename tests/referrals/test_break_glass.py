"""Break-glass (issue 3 item 5): a named user, a mandatory reason, one hour, audited at start and
end, a review due within 72 hours; after expiry the next read is denied."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from sqlalchemy import select

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
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
        _service_of(referrals)._clock = lambda: datetime.now(UTC) + timedelta(hours=1, minutes=1)
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
