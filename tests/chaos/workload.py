"""The chaos workload: concerns with unique agency references, through gRPC and sealed intake, and the
journey driven further for some (routed to B, a conference, concluded, a plan). Every call retries
as a real client would (same idempotency key, same agency reference) until it is acknowledged or its
deadline passes; the history records what was attempted and what was acknowledged, for the checker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from csx.conferences.v1 import conferences_pb2 as cpb
from csx.conferences.v1 import conferences_pb2_grpc
from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_cli import conference_flow
from csx_cli.stack import Stack
from tests.support import user, user_channel

T = TypeVar("T")
DSL = user("education", "dsl", "referral_screening", "dsl.chaos")
SOCIAL_WORKER = user("social_care", "social_worker", "referral_screening", "sw.chaos")
CHAIR = user("social_care", "chair", "conference_participation", "chair.chaos")
MANAGER = user("social_care", "mash_manager", "conference_participation", "manager.chaos")
# Not now, maybe later: the call is retried with the same key. Anything else is an answer.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


@dataclass
class Op:
    """One concern and what was asked and answered about it."""

    seq: int
    ref: str
    via: str  # "grpc" or "intake"
    route: bool = False
    conclude: bool = False
    acknowledged: bool = False
    acked_at: float = 0.0
    concern_id: str = ""
    child_id: str = ""
    referral_id: str = ""
    routed: bool = False
    conference_id: str = ""
    concluded: bool = False
    error: str = ""
    latency: float = 0.0


@dataclass
class History:
    run_id: str
    ops: list[Op] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def acknowledged(self) -> list[Op]:
        return [o for o in self.ops if o.acknowledged]


def concern(op: Op, run_id: str) -> pb.SubmitConcernRequest:
    return pb.SubmitConcernRequest(
        idempotency_key=f"chaos-{run_id}-{op.seq:06d}",
        agency=1 if op.via == "intake" else 3,
        agency_reference=op.ref,
        referrer=pb.Referrer(name="Chaos Referrer", role="Designated safeguarding lead", email="dsl@school.example"),
        child=pb.ChildIdentity(given_name=f"Chaos{op.seq}", family_name=f"Run{run_id}", date_of_birth="2011-06-15"),
        harm_types=[2],
        contexts=[{"place_id": f"plc-chaos-{op.seq % 7}", "context_type": 3}],
        narrative="Seen with older youths near the station late at night.",
    )


class Workload:
    def __init__(
        self, stack: Stack, run_id: str, *, deadline: float = 120.0, intake_every: int = 5, route_every: int = 10
    ) -> None:
        self.stack = stack
        self.history = History(run_id)
        self.deadline = deadline
        self.intake_every = intake_every
        self.route_every = route_every
        self._intake: Any = None

    def op(self, seq: int) -> Op:
        via = "intake" if self.intake_every and seq % self.intake_every == self.intake_every - 1 else "grpc"
        route = via == "grpc" and seq % self.route_every == 0
        op = Op(seq, f"CHAOS-{self.history.run_id}-{seq:06d}", via, route=route, conclude=route and seq % 30 == 0)
        self.history.ops.append(op)
        return op

    async def run(
        self, n: int, *, rate: float, concurrency: int = 8, more: Callable[[], bool] = lambda: False
    ) -> History:
        """Submit n concerns at about `rate` per second, `concurrency` at a time at most; then keep
        going at the same rate while `more()` says so (the faults are still coming)."""
        a = self.stack.addresses
        self.history.started = time.monotonic()
        async with (
            user_channel(a["referrals"], DSL, self.stack.pki) as submit_ch,
            user_channel(a["referrals"], SOCIAL_WORKER, self.stack.pki) as route_ch,
            user_channel(a["conferences"], CHAIR, self.stack.pki) as chair_ch,
            user_channel(a["conferences"], SOCIAL_WORKER, self.stack.pki) as arrange_ch,
            user_channel(a["conferences"], MANAGER, self.stack.pki) as manager_ch,
        ):
            self._submit = referrals_pb2_grpc.ReferralsServiceStub(submit_ch)
            self._route = referrals_pb2_grpc.ReferralsServiceStub(route_ch)
            self._conferences = conferences_pb2_grpc.ConferencesServiceStub(chair_ch)
            self._arrange = conferences_pb2_grpc.ConferencesServiceStub(arrange_ch)
            manager = conferences_pb2_grpc.ConferencesServiceStub(manager_ch)
            await self._retry(lambda: conference_flow.register_chair(manager, CHAIR.user_id))
            if self.intake_every:
                self._intake = await self._intake_client()
            gate = asyncio.Semaphore(concurrency)
            tasks = []
            start = time.monotonic()
            seq = 0
            while seq < n or more():
                await asyncio.sleep(max(0.0, start + seq / rate - time.monotonic()))
                await gate.acquire()
                task = asyncio.create_task(self._one(self.op(seq)))
                task.add_done_callback(lambda _t: gate.release())
                tasks.append(task)
                seq += 1
            await asyncio.gather(*tasks)
            if self._intake is not None:
                await self._intake.close()
        self.history.finished = time.monotonic()
        return self.history

    # -- one concern ----------------------------------------------------------------------------
    async def _one(self, op: Op) -> None:
        t0 = time.monotonic()
        try:
            if op.via == "intake":
                response = await self._by_intake(op)
            else:
                request = concern(op, self.history.run_id)
                response = await self._retry(lambda: self._submit.SubmitConcern(request, timeout=10))
        except Exception as exc:  # not acknowledged: indeterminate, which the checker allows
            op.error = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            return
        op.acknowledged, op.acked_at, op.latency = True, time.monotonic(), time.monotonic() - t0
        op.concern_id, op.child_id, op.referral_id = response.concern_id, response.child_id, response.referral_id
        if op.route:
            await self._drive(op)

    async def _drive(self, op: Op) -> None:
        decision = pb.RecordScreeningDecisionRequest(
            referral_id=op.referral_id,
            idempotency_key=f"route-{op.ref}"[-64:],
            outcome=pb.SCREENING_OUTCOME_INTERVENTION_B,
            reason="Extra-familial harm; family protective.",
            decided_by="sw.chaos",
        )
        try:
            await self._retry(lambda: self._route.RecordScreeningDecision(decision, timeout=10))
        except Exception:
            return
        op.routed = True
        if not op.conclude:
            return
        listing = cpb.ListConferencesRequest(child_id=op.child_id)
        try:
            conference = await self._retry(lambda: self._first_conference(listing))
            held = await self._retry(
                lambda: conference_flow.hold(
                    self._arrange, self._conferences, conference, key=f"hold-{op.ref}"[-50:], chair_id=CHAIR.user_id
                )
            )
            conclude = cpb.ConcludeConferenceRequest(
                conference_id=conference.conference_id,
                idempotency_key=f"conclude-{op.ref}"[-64:],
                expected_version=held.version,
                outcome=cpb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
                summary="Plan agreed with the family.",
                actions=[cpb.AgreedAction(owner_agency=1, description="Patrol the park", due_on="2027-01-15")],
            )
            op.conference_id = conference.conference_id
            await self._retry(lambda: self._conferences.ConcludeConference(conclude, timeout=10))
            op.concluded = True
        except Exception:
            return

    async def _first_conference(self, listing: cpb.ListConferencesRequest) -> cpb.Conference:
        reply = await self._conferences.ListConferences(listing, timeout=5)
        if not reply.conferences:  # not there yet: the event is on its way
            raise _NotYet
        return reply.conferences[0]

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.deadline
        delay = 0.2
        while True:
            try:
                return await call()
            except (grpc.aio.AioRpcError, _NotYet) as exc:
                retry = isinstance(exc, _NotYet) or exc.code() in RETRYABLE
                if not retry or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 1.5)

    # -- sealed intake --------------------------------------------------------------------------
    async def _intake_client(self) -> Any:
        from csx_client import AgencyIdentity, IntakeClient, Recipient
        from csx_common.natsauth import DevNatsAuth
        from csx_common.pki import PeerIdentity

        pki = self.stack.pki
        peer = PeerIdentity("agency", "police")
        identity = AgencyIdentity.from_files("police", pki.cert_file(peer), pki.key_file(peer))
        password = DevNatsAuth(pki.root / "nats").password_file("agency-police").read_text().strip()
        return await IntakeClient.connect(
            self.stack.nats_url, identity, Recipient.from_file(pki.intake_public_file), password=password
        )

    async def _by_intake(self, op: Op) -> pb.SubmitConcernResponse:
        """Publish, wait for the answer; publish again (same reference: idempotent) until it comes."""
        from csx_client import ACCEPTED

        deadline = time.monotonic() + self.deadline
        request = concern(op, self.history.run_id)
        while True:
            try:
                result = await self._intake.submit(request, wait=8.0)
            except Exception:  # broker down, or no answer yet (referrals down): send again
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
                continue
            if result.status != ACCEPTED:
                raise RuntimeError(f"intake rejected: {result.reason}")
            return result.response


class _NotYet(Exception):
    pass
