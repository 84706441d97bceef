"""`csx demo journey`: one child's path through all four services, as one trace.

B (the default): concern naming a place (referrals) -> the panel links the child to the place
(panel) -> the MASH routes the child to intervention B (referrals) -> a contextual safeguarding
review is scheduled (conferences) -> the chair concludes it with a plan and two partner actions ->
the action plan is published (actionplans) -> the family's summary is sent and a family and
community network meeting held -> the next review meets and continues the plan.

A: the same concern routed to intervention A after a strategy discussion -> the initial child
protection conference is scheduled (15 working days) -> social care records its grounds and the
context considered -> the chair concludes it with a child protection plan -> the plan is published
-> the first review (due within 3 months) meets and continues the plan (the next within 6).

All data is synthetic: a random NHS number from the 999 range reserved for testing, a made-up
name. Each run uses fresh idempotency keys, so runs never collide.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry import trace

from csx.actionplans.v1 import actionplans_pb2, actionplans_pb2_grpc
from csx.conferences.v1 import conferences_pb2, conferences_pb2_grpc
from csx.panel.v1 import panel_pb2, panel_pb2_grpc
from csx.referrals.v1 import referrals_pb2, referrals_pb2_grpc
from csx.types.v1 import types_pb2
from csx_cli import conference_flow
from csx_cli.identity import default_pki, user_channel
from csx_common.identity import Principal
from csx_common.pki import DevPki

T = TypeVar("T")

# Answers that mean "not there yet": keep polling. Anything else fails the step at once.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
DEFAULT_PLACE = "plc-riverside-park"


# The journey's people (synthetic).
REFERRER = Principal("demo.officer", "police", "police_officer", "referral_screening")
SOCIAL_WORKER = Principal("demo.social.worker", "social_care", "social_worker", "referral_screening")


class JourneyError(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


@dataclass
class StepResult:
    name: str
    seconds: float
    detail: str


@dataclass
class JourneyResult:
    run_id: str
    trace_id: str = ""
    steps: list[StepResult] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def random_nhs_number() -> str:
    """A valid (modulus 11) NHS number in the 999 range, which is reserved for testing."""
    rng = secrets.SystemRandom()
    while True:
        digits = [9, 9, 9, *(rng.randrange(10) for _ in range(6))]
        total = sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True))
        check = (11 - total % 11) % 11
        if check != 10:
            return "".join(map(str, digits)) + str(check)


def describe_rpc_error(exc: grpc.aio.AioRpcError) -> str:
    from csx_common.errors import field_violations

    text = f"{exc.code().name}: {exc.details() or ''}".rstrip(": ")
    violations = field_violations(exc)
    if violations:
        text += " [" + "; ".join(f"{f}: {d}" for f, d in violations) + "]"
    return text


class Journey:
    def __init__(
        self,
        addresses: dict[str, str],
        *,
        wait_timeout: float = 30.0,
        call_timeout: float = 5.0,
        place_id: str = DEFAULT_PLACE,
        on_step: Callable[[int, int, StepResult], None] | None = None,
        pki: DevPki | None = None,
        intervention: str = "B",
    ) -> None:
        if intervention not in ("A", "B"):
            raise ValueError("the journey runs intervention A or B")
        self.intervention = intervention
        self.addresses = addresses
        self.pki = pki or default_pki()
        self.wait_timeout = wait_timeout
        self.call_timeout = call_timeout
        self.place_id = place_id
        self.on_step = on_step or (lambda _i, _n, _r: None)
        self.run_id = uuid.uuid4().hex[:16]
        self.result = JourneyResult(self.run_id)
        self._tracer = trace.get_tracer("csx.cli")
        self._step_no = 0

    @property
    def steps(self) -> int:
        return 9 if self.intervention == "B" else 8

    def key(self, what: str) -> str:
        return f"demo-{self.run_id}-{what}"

    async def run(self) -> JourneyResult:
        # The referrer is a police officer; screening, conference and plan are social care's work.
        try:
            channels = {
                name: user_channel(address, SOCIAL_WORKER, self.pki) for name, address in self.addresses.items()
            }
            channels["referrer"] = user_channel(self.addresses["referrals"], REFERRER, self.pki)
            channels["chair"] = user_channel(self.addresses["conferences"], conference_flow.CHAIR, self.pki)
            channels["manager"] = user_channel(self.addresses["conferences"], conference_flow.MANAGER, self.pki)
        except FileNotFoundError:
            raise JourneyError(
                "submit concern",
                f"no client certificates under {self.pki.root} (start the stack with `csx up`, or set CSX_PKI_DIR)",
            ) from None
        try:
            with self._tracer.start_as_current_span(
                "csx.demo.journey", attributes={"csx.demo.run_id": self.run_id}
            ) as span:
                self.result.trace_id = format(span.get_span_context().trace_id, "032x")
                try:
                    await self._run(channels)
                except JourneyError as exc:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, exc.step))
                    raise
        finally:
            for channel in channels.values():
                await channel.close()
        return self.result

    async def _step(self, name: str, action: Callable[[], Awaitable[tuple[T, str]]]) -> T:
        self._step_no += 1
        started = time.monotonic()
        with self._tracer.start_as_current_span(f"csx.demo.{name.replace(' ', '_')}"):
            try:
                value, detail = await action()
            except grpc.aio.AioRpcError as exc:
                raise JourneyError(name, describe_rpc_error(exc)) from None
        result = StepResult(name, time.monotonic() - started, detail)
        self.result.steps.append(result)
        self.on_step(self._step_no, self.steps, result)
        return value

    async def _poll(
        self, step: str, waiting_for: str, probe: Callable[[], Awaitable[T | None]], interval: float = 0.2
    ) -> T:
        deadline = time.monotonic() + self.wait_timeout
        last_error = ""
        while True:
            try:
                found = await probe()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise JourneyError(step, describe_rpc_error(exc)) from None
                last_error = describe_rpc_error(exc)
                found = None
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                hint = f" (last answer: {last_error})" if last_error else ""
                raise JourneyError(step, f"gave up after {self.wait_timeout:.0f}s waiting for {waiting_for}{hint}")
            await asyncio.sleep(interval)

    async def _run(self, channels: dict[str, grpc.aio.Channel]) -> None:
        referrals = referrals_pb2_grpc.ReferralsServiceStub(channels["referrals"])
        referrer = referrals_pb2_grpc.ReferralsServiceStub(channels["referrer"])
        panel = panel_pb2_grpc.PanelServiceStub(channels["panel"])
        conferences = conferences_pb2_grpc.ConferencesServiceStub(channels["conferences"])
        chair = conferences_pb2_grpc.ConferencesServiceStub(channels["chair"])
        manager = conferences_pb2_grpc.ConferencesServiceStub(channels["manager"])
        actionplans = actionplans_pb2_grpc.ActionPlansServiceStub(channels["actionplans"])
        t = self.call_timeout
        ids = self.result.ids

        # 1. A police concern about a child, naming a place.
        async def submit() -> tuple[Any, str]:
            request = referrals_pb2.SubmitConcernRequest(
                idempotency_key=self.key("concern"),
                agency=types_pb2.AGENCY_POLICE,
                agency_reference=f"DEMO/{self.run_id}",
                referrer=referrals_pb2.Referrer(
                    name="Demo Officer", role="Police constable", email="demo.officer@example.org"
                ),
                child=referrals_pb2.ChildIdentity(
                    nhs_number=random_nhs_number(),
                    given_name="Alex",
                    family_name="Example",
                    date_of_birth="2010-04-01",
                ),
                harm_types=[types_pb2.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION],
                contexts=[
                    types_pb2.ContextLink(place_id=self.place_id, context_type=types_pb2.CONTEXT_TYPE_NEIGHBOURHOOD)
                ],
                narrative="Synthetic demo concern: seen with older youths at the park late at night.",
            )
            response = await referrer.SubmitConcern(request, timeout=t)
            ids.update(concern_id=response.concern_id, referral_id=response.referral_id, child_id=response.child_id)
            return response, (
                f"concern {response.concern_id}, referral {response.referral_id}, child {response.child_id}, "
                f"decision due {response.decision_due_on}"
            )

        await self._step("submit concern", submit)

        # 2. The panel has linked the child to the place.
        async def linked() -> tuple[Any, str]:
            async def probe() -> Any:
                response = await panel.GetChildLinks(
                    panel_pb2.GetChildLinksRequest(child_id=ids["child_id"]), timeout=t
                )
                return response if any(link.place_id == self.place_id for link in response.links) else None

            await self._poll("panel links child to place", f"panel to link the child to {self.place_id}", probe)
            return None, f"child linked to {self.place_id}"

        await self._step("panel links child to place", linked)

        # 3. The MASH routes the child to intervention B, or to A after a strategy discussion today.
        a = self.intervention == "A"

        async def decide() -> tuple[Any, str]:
            request = referrals_pb2.RecordScreeningDecisionRequest(
                referral_id=ids["referral_id"],
                idempotency_key=self.key("decision"),
                outcome=referrals_pb2.SCREENING_OUTCOME_INTERVENTION_B,
                reason="Synthetic demo: extra-familial harm only; contextual review needed.",
                decided_by="demo.social-worker",
            )
            if a:
                request.outcome = referrals_pb2.SCREENING_OUTCOME_INTERVENTION_A
                request.reason = "Synthetic demo: significant harm at home as well as outside; section 47 enquiry."
                request.strategy_discussion_on = dt.date.today().isoformat()
            response = await referrals.RecordScreeningDecision(request, timeout=t)
            status = referrals_pb2.ReferralStatus.Name(response.referral.status)
            return response, f"referral routed to intervention {self.intervention} ({status})"

        await self._step("screening decision", decide)

        # 4. Conferences schedules the contextual safeguarding review.
        async def scheduled() -> tuple[conferences_pb2.Conference, str]:
            async def probe() -> conferences_pb2.Conference | None:
                response: conferences_pb2.ListConferencesResponse = await conferences.ListConferences(
                    conferences_pb2.ListConferencesRequest(child_id=ids["child_id"]), timeout=t
                )
                for conference in response.conferences:
                    if (
                        conference.referral_id == ids["referral_id"]
                        and conference.status == conferences_pb2.CONFERENCE_STATUS_SCHEDULED
                    ):
                        return conference
                return None

            conference = await self._poll(
                "conference scheduled", "conferences to schedule a conference for the referral", probe
            )
            ids["conference_id"] = conference.conference_id
            return conference, (
                f"conference {conference.conference_id} "
                f"({conferences_pb2.ConferenceKind.Name(conference.kind)}) due {conference.due_on}"
            )

        conference = await self._step("conference scheduled", scheduled)

        # A: social care records the grounds at home and the context the conference will consider.
        if a:

            async def context() -> tuple[Any, str]:
                response = await conferences.RecordConferenceContext(
                    conferences_pb2.RecordConferenceContextRequest(
                        conference_id=conference.conference_id,
                        idempotency_key=self.key("context"),
                        expected_version=conference.version,
                        grounds=[types_pb2.HARM_TYPE_NEGLECT],
                        contexts=[
                            conferences_pb2.ContextConsidered(
                                place_id=self.place_id,
                                context_type=types_pb2.CONTEXT_TYPE_NEIGHBOURHOOD,
                                note="Synthetic demo: older youths gather at the park after dark.",
                            )
                        ],
                    ),
                    timeout=t,
                )
                return response.conference, f"grounds NEGLECT, context {self.place_id} considered"

            conference = await self._step("context recorded", context)

        # 5. Social care arranges the meeting with a registered chair, who records a quorate
        # attendance and concludes it with a plan and two partner actions.
        plan_outcome = (
            conferences_pb2.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN
            if a
            else conferences_pb2.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
        )

        async def conclude(current: conferences_pb2.Conference, what: str) -> conferences_pb2.Conference:
            due = (dt.date.today() + dt.timedelta(days=14)).isoformat()
            await conference_flow.register_chair(manager, call_timeout=t)
            held = await conference_flow.hold(conferences, chair, current, key=self.key(f"hold-{what}"), call_timeout=t)
            response: conferences_pb2.ConcludeConferenceResponse = await chair.ConcludeConference(
                conferences_pb2.ConcludeConferenceRequest(
                    conference_id=current.conference_id,
                    idempotency_key=self.key(f"conclude-{what}"),
                    expected_version=held.version,
                    outcome=plan_outcome,
                    summary="Synthetic demo: plan agreed with the family and community network.",
                    actions=[
                        conferences_pb2.AgreedAction(
                            owner_agency=types_pb2.AGENCY_POLICE,
                            description="Increase evening patrols at the park and share disruption results.",
                            due_on=due,
                        ),
                        conferences_pb2.AgreedAction(
                            owner_agency=types_pb2.AGENCY_EDUCATION,
                            description="Designated safeguarding lead to agree a mentoring offer at school.",
                            due_on=due,
                        ),
                    ],
                ),
                timeout=t,
            )
            return response.conference

        async def next_review(current: conferences_pb2.Conference) -> conferences_pb2.Conference:
            listed: conferences_pb2.ListConferencesResponse = await conferences.ListConferences(
                conferences_pb2.ListConferencesRequest(child_id=ids["child_id"]), timeout=t
            )
            (review,) = [c for c in listed.conferences if c.previous_conference_id == current.conference_id]
            return review

        async def first() -> tuple[conferences_pb2.Conference, str]:
            done = await conclude(conference, "first")
            review = await next_review(done)
            ids["review_id"] = review.conference_id
            return done, (
                f"concluded ({conferences_pb2.ConferenceOutcome.Name(done.outcome)}), {len(done.actions)} actions; "
                f"review due {review.due_on}"
            )

        concluded = await self._step("conference concluded", first)

        # 6. Actionplans publishes the plan.
        async def published() -> tuple[Any, str]:
            async def probe() -> actionplans_pb2.ActionPlan | None:
                response = await actionplans.ListActionPlans(
                    actionplans_pb2.ListActionPlansRequest(conference_id=ids["conference_id"]), timeout=t
                )
                return response.plans[0] if response.plans else None

            plan = await self._poll("plan published", "actionplans to publish the conference's plan", probe)
            ids["plan_id"] = plan.plan_id
            agencies = ", ".join(types_pb2.Agency.Name(a.owner_agency) for a in plan.actions)
            return plan, f"plan {plan.plan_id} with {len(plan.actions)} actions ({agencies})"

        await self._step("plan published", published)

        # B: the family has the summary within 2 working days, and the network meets between reviews.
        if not a:

            async def summary() -> tuple[Any, str]:
                response = await conferences.RecordFamilySummary(
                    conferences_pb2.RecordFamilySummaryRequest(
                        conference_id=concluded.conference_id,
                        idempotency_key=self.key("family-summary"),
                        expected_version=concluded.version,
                        text="Synthetic demo: what we agreed with you, in plain words.",
                        sent_on=dt.date.today().isoformat(),
                    ),
                    timeout=t,
                )
                return (
                    response.conference,
                    f"sent {response.conference.family_summary_sent_on} (due by {concluded.family_summary_due_on})",
                )

            sent = await self._step("family summary sent", summary)

            async def network() -> tuple[Any, str]:
                response = await conferences.RecordNetworkMeeting(
                    conferences_pb2.RecordNetworkMeetingRequest(
                        conference_id=concluded.conference_id,
                        idempotency_key=self.key("network"),
                        expected_version=sent.version,
                        meeting=conferences_pb2.NetworkMeeting(
                            held_on=dt.date.today().isoformat(),
                            attended=[
                                conferences_pb2.NetworkParticipant(
                                    role=conferences_pb2.PARTICIPANT_ROLE_PARENT_OR_CARER,
                                    name="Sam Example",
                                    relationship="parent",
                                ),
                                conferences_pb2.NetworkParticipant(
                                    role=conferences_pb2.PARTICIPANT_ROLE_TRUSTED_ADULT,
                                    name="Jo Coach",
                                    relationship="football coach",
                                ),
                            ],
                            actions=[
                                conferences_pb2.AgreedAction(
                                    owner_agency=types_pb2.AGENCY_SOCIAL_CARE,
                                    description="Coach to walk home with the young person after evening training.",
                                    due_on=(dt.date.today() + dt.timedelta(days=7)).isoformat(),
                                )
                            ],
                        ),
                    ),
                    timeout=t,
                )
                return response, f"{len(response.conference.network_meetings)} network meeting recorded"

            await self._step("network meeting", network)

        # The review: it meets and continues the plan; the next one is scheduled.
        async def review() -> tuple[Any, str]:
            current = await next_review(concluded)
            done = await conclude(current, "review")
            following = await next_review(done)
            ids["next_review_id"] = following.conference_id
            return done, (
                f"review {current.review_number} ({conferences_pb2.ConferenceKind.Name(current.kind)}) "
                f"continued the plan; next review due {following.due_on}"
            )

        await self._step("review concluded", review)
