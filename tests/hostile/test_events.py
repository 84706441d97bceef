"""Every event a service consumes, delivered malformed: garbage, truncated or bit-flipped payloads,
missing or non-UUID ids, unknown enum numbers, huge repeated fields, adversarial strings,
impossible dates and timestamps.

Through the real InboxConsumer of each running service (`handle`, as JetStream would deliver it,
redelivered while it is nak'ed): every event is either applied, or parked in `dead_letters` leaving
no effect rows and no outbox rows; one that breaks the contract is parked at once, never retried;
nothing that was applied breaks a later read. Then over a real nats-server: a poison event
between valid ones, and each consumer keeps consuming.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import nats
import nats.js.errors
import pytest
from google.protobuf import message as pb_message
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from csx.actionplans.v1 import actionplans_pb2 as ap
from csx.conferences.v1 import conferences_pb2 as cpb
from csx.conferences.v1 import conferences_pb2_grpc
from csx.conferences.v1 import events_pb2 as conference_events
from csx.panel.v1 import panel_pb2 as ppb
from csx.referrals.v1 import events_pb2 as referral_events
from csx.referrals.v1 import referrals_pb2 as rpb
from csx.referrals.v1 import referrals_pb2_grpc
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.safeguarding.v1 import safeguarding_pb2
from csx.types.v1 import types_pb2 as t
from csx_cli import conference_flow
from csx_common.messaging.events import MSG_ID_HEADER
from csx_common.messaging.topology import topology
from csx_common.validation import event_violations
from tests.hostile.conftest import Running, Starter
from tests.hostile.support import (
    Injected,
    call,
    changed,
    consumer_for,
    deliver,
    hostile_settings,
    mutated,
    raw_payloads,
    row_counts,
)
from tests.support import concern_request, eventually, user

CHAIR = user("social_care", "chair", "conference_participation", "chair.hostile")
SOCIAL_WORKER = user("social_care", "social_worker", "referral_screening", "sw.hostile")
PLACE = "plc-hostile-events"
T0 = 1_790_000_000


def stamp(offset: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=T0 + offset)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Stack:
    panel: Running
    conferences: Running
    actionplans: Running
    referrals: Running
    # A child each service holds records about, so the reads after an event exercise the policy
    # with the disclosure views the events change.
    child_id: str
    concluded_conference_id: str
    # The seeded child's referral (referrals' routes name it) and the bus the stack runs on.
    referral_id: str
    nats_url: str

    def __repr__(self) -> str:
        return "Stack()"


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class Contract:
    """What a consumed event must carry to be applied (the consumer's side of the contract), spelled
    here by hand: the oracle the contracts' `(buf.validate)` rules are held to."""

    uuids: tuple[str, ...]
    required: tuple[str, ...] = ()
    extra: Callable[[Any], bool] = lambda e: True

    def broken_by(self, event: Any) -> bool:
        if not all(_UUID.fullmatch(getattr(event, name)) for name in self.uuids):
            return True
        for name in self.required:
            field = event.DESCRIPTOR.fields_by_name[name]
            if not (event.HasField(name) if field.message_type is not None else getattr(event, name)):
                return True
        try:
            return not self.extra(event)
        except ValueError:  # a timestamp outside 0001..9999: ToNanoseconds refuses it
            return True


CONTRACTS: dict[str, Contract] = {
    "csx.referrals.v1.ConcernRecorded": Contract(("concern_id", "referral_id", "child_id"), ("agency", "recorded_at")),
    "csx.referrals.v1.ReferralRouted": Contract(("referral_id", "child_id"), ("intervention", "routed_at")),
    "csx.safeguarding.v1.ConsentChanged": Contract(("child_id",), ("status", "version")),
    "csx.safeguarding.v1.SharingDecisionRecorded": Contract(
        ("decision_id", "child_id"),
        ("approver",),
        # A decision to share names its lawful basis and expiry (referrals' rule); one not to
        # share has no basis.
        lambda e: (e.lawful_basis != 0) == e.share and (not e.share or e.HasField("expires_at")),
    ),
    "csx.safeguarding.v1.ChildErased": Contract(("erasure_id", "child_id"), ("erased_at",)),
    "csx.safeguarding.v1.BreakGlassGranted": Contract(
        ("grant_id", "child_id"),
        ("user_id", "agency", "granted_at", "expires_at"),
        # At most one hour (csx_safeguarding.policy.MAX_BREAK_GLASS).
        lambda e: 0 < (e.expires_at.ToNanoseconds() - e.granted_at.ToNanoseconds()) <= 3600 * 10**9,
    ),
    "csx.referrals.v1.ChildrenMerged": Contract(("match_id", "from_child_id", "into_child_id"), ("merged_at",)),
    # The outcome may be unspecified: actionplans asks conferences, which has the last word.
    "csx.conferences.v1.ConferenceConcluded": Contract(("conference_id", "child_id")),
    "csx.conferences.v1.ConferenceScheduled": Contract(
        ("conference_id", "child_id", "referral_id"), ("kind", "scheduled_at")
    ),
    "csx.conferences.v1.ConferenceCancelled": Contract(("conference_id", "child_id"), ("cancelled_at",)),
    "csx.conferences.v1.ReferralJoinedConference": Contract(
        ("conference_id", "child_id", "referral_id"), ("intervention",)
    ),
}


def breaks_contract(message_type: type[pb_message.Message], payload: bytes) -> bool:
    """The oracle: an event the consumer must park at once (it can never be applied). The rules
    written here by hand must all be in the contract's annotations (what the consumer checks)."""
    try:
        event = message_type.FromString(payload)
    except DecodeError:
        return True
    by_hand = CONTRACTS[event.DESCRIPTOR.full_name].broken_by(event)
    found = event_violations(event)
    assert found or not by_hand, f"{event.DESCRIPTOR.full_name}: the contract's rules miss a case the oracle refuses"
    return bool(found)


@dataclass
class RouteUnderTest:
    service: str
    durable: str
    subject: str
    message_type: type[pb_message.Message]
    base: Callable[[Stack], pb_message.Message]
    # Whether a mutated id may name the stack's seeded child (not for an erasure: erasing the
    # seeded child would leave nothing for the later examples to read).
    seeded_ids: bool = True

    @property
    def id(self) -> str:
        return f"{self.durable}:{self.subject.rsplit('.', 1)[-1]}"


def concern_recorded(s: Stack) -> pb_message.Message:
    return referral_events.ConcernRecorded(
        concern_id=new_id(),
        referral_id=new_id(),
        child_id=s.child_id,
        agency=t.AGENCY_POLICE,
        harm_types=[t.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION, t.HARM_TYPE_MISSING_EPISODE],
        contexts=[
            t.ContextLink(place_id=PLACE, context_type=t.CONTEXT_TYPE_NEIGHBOURHOOD),
            t.ContextLink(place_id="plc-hostile-school", context_type=t.CONTEXT_TYPE_SCHOOL),
        ],
        recorded_at=stamp(),
    )


def consent_changed(s: Stack) -> pb_message.Message:
    return safeguarding_events.ConsentChanged(
        child_id=s.child_id,
        status=safeguarding_pb2.CONSENT_STATUS_GIVEN,
        agencies=[t.AGENCY_POLICE, t.AGENCY_EDUCATION],
        data_classes=[10, 2],
        version=int(uuid.uuid4().int % 1_000_000) + 1,
        changed_at=stamp(60),
    )


def sharing_recorded(s: Stack) -> pb_message.Message:
    return safeguarding_events.SharingDecisionRecorded(
        decision_id=new_id(),
        child_id=s.child_id,
        share=True,
        lawful_basis=safeguarding_pb2.LAWFUL_BASIS_SCH1_PARA18,
        approver="manager.hostile",
        agencies=[t.AGENCY_POLICE],
        data_classes=[10],
        decided_at=stamp(),
        expires_at=stamp(86400 * 3650),
    )


def break_glass_granted(s: Stack) -> pb_message.Message:
    return safeguarding_events.BreakGlassGranted(
        grant_id=new_id(),
        child_id=s.child_id,
        user_id="pc.hostile",
        agency=t.AGENCY_POLICE,
        granted_at=stamp(),
        expires_at=stamp(1800),
    )


def child_erased(s: Stack) -> pb_message.Message:
    return safeguarding_events.ChildErased(
        erasure_id=new_id(),
        child_id=new_id(),
        basis=safeguarding_pb2.ERASURE_BASIS_RECORDED_IN_ERROR,
        requested_by="dpo.one",
        approved_by="dpo.two",
        erased_at=stamp(),
    )


def referral_routed(s: Stack) -> pb_message.Message:
    return referral_events.ReferralRouted(
        referral_id=new_id(),
        child_id=s.child_id,
        intervention=t.INTERVENTION_B,
        routed_at=stamp(),
    )


def children_merged(s: Stack) -> pb_message.Message:
    return referral_events.ChildrenMerged(
        match_id=new_id(), from_child_id=new_id(), into_child_id=s.child_id, merged_at=stamp()
    )


def conference_concluded(s: Stack) -> pb_message.Message:
    return conference_events.ConferenceConcluded(
        conference_id=s.concluded_conference_id,
        child_id=s.child_id,
        kind=cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW,
        outcome=cpb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
        action_count=2,
        concluded_at=stamp(),
    )


def conference_scheduled(s: Stack) -> pb_message.Message:
    return conference_events.ConferenceScheduled(
        conference_id=new_id(),
        child_id=s.child_id,
        referral_id=s.referral_id,
        kind=cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW,
        due_on="2026-12-21",
        scheduled_at=stamp(),
    )


def conference_cancelled(s: Stack) -> pb_message.Message:
    return conference_events.ConferenceCancelled(
        conference_id=new_id(),
        child_id=s.child_id,
        kind=cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW,
        reason=cpb.CHANGE_REASON_ESCALATED_TO_CHILD_PROTECTION,
        cancelled_at=stamp(),
        replaced_by_conference_id=new_id(),
    )


def referral_joined(s: Stack) -> pb_message.Message:
    return conference_events.ReferralJoinedConference(
        conference_id=s.concluded_conference_id,
        child_id=s.child_id,
        referral_id=s.referral_id,
        intervention=t.INTERVENTION_B,
        kind=cpb.CONFERENCE_KIND_CONTEXTUAL_REVIEW,
    )


DISCLOSURE = [
    ("csx.referrals.consent_changed", safeguarding_events.ConsentChanged, consent_changed, True),
    ("csx.referrals.sharing_decision_recorded", safeguarding_events.SharingDecisionRecorded, sharing_recorded, True),
    ("csx.referrals.child_erased", safeguarding_events.ChildErased, child_erased, False),
    ("csx.referrals.break_glass_granted", safeguarding_events.BreakGlassGranted, break_glass_granted, True),
]
ROUTES = [
    RouteUnderTest(
        "panel", "panel-concerns", "csx.referrals.concern_recorded", referral_events.ConcernRecorded, concern_recorded
    ),
    RouteUnderTest(
        "panel", "panel-concerns", "csx.referrals.referral_routed", referral_events.ReferralRouted, referral_routed
    ),
    # Never a mutated id naming the seeded child as the one merged away: its links must stay to read.
    RouteUnderTest(
        "panel",
        "panel-concerns",
        "csx.referrals.children_merged",
        referral_events.ChildrenMerged,
        children_merged,
        seeded_ids=False,
    ),
    RouteUnderTest(
        "conferences",
        "conferences-referrals",
        "csx.referrals.referral_routed",
        referral_events.ReferralRouted,
        referral_routed,
    ),
    RouteUnderTest(
        "actionplans",
        "actionplans-conferences",
        "csx.conferences.conference_concluded",
        conference_events.ConferenceConcluded,
        conference_concluded,
    ),
    *[
        RouteUnderTest("referrals", "referrals-conferences", f"csx.conferences.{subject}", message_type, base)
        for subject, message_type, base in (
            ("conference_scheduled", conference_events.ConferenceScheduled, conference_scheduled),
            ("conference_concluded", conference_events.ConferenceConcluded, conference_concluded),
            ("conference_cancelled", conference_events.ConferenceCancelled, conference_cancelled),
            ("referral_joined_conference", conference_events.ReferralJoinedConference, referral_joined),
        )
    ],
    *[
        RouteUnderTest(service, f"{service}-disclosure", subject, message_type, base, seeded)
        for service in ("panel", "conferences", "actionplans")
        for subject, message_type, base, seeded in DISCLOSURE
    ],
]


def running(stack: Stack, service: str) -> Running:
    return getattr(stack, service)  # type: ignore[no-any-return]


async def read_child(stack: Stack, service: str, child_id: str) -> grpc.StatusCode:
    """A read about the child through the service's API, as a user: whatever an event stored must
    not make it fail."""
    target = running(stack, service)
    request: pb_message.Message
    if service == "panel":
        path, request = "/csx.panel.v1.PanelService/GetChildLinks", ppb.GetChildLinksRequest(child_id=child_id)
    elif service == "conferences":
        path = "/csx.conferences.v1.ConferencesService/ListConferences"
        request = cpb.ListConferencesRequest(child_id=child_id)
    elif service == "actionplans":
        path, request = (
            "/csx.actionplans.v1.ActionPlansService/ListActionPlans",
            ap.ListActionPlansRequest(child_id=child_id),
        )
    elif service == "referrals":
        path = "/csx.referrals.v1.ReferralsService/GetDisclosureState"
        request = rpb.GetDisclosureStateRequest(child_id=child_id)
    principal = SOCIAL_WORKER if service in ("panel", "referrals") else CHAIR
    return (await call(target.channel(principal), path, request)).code


@pytest.fixture(scope="module")
async def stack(starter: Starter) -> AsyncIterator[Stack]:
    conferences = await starter.conferences()
    panel = await starter.panel()
    actionplans = await starter.actionplans(conferences.address)
    referrals = await starter.referrals()
    # A child referrals holds (from a concern), so referrals' own consumer applies the valid events.
    dsl = user("education", "dsl", "referral_screening", "dsl.hostile")  # concern_request is the school's
    submitted = await referrals_pb2_grpc.ReferralsServiceStub(referrals.channel(dsl)).SubmitConcern(
        concern_request("hostile-events-seed"), timeout=10
    )
    child_id = submitted.child_id
    seed = Stack(panel, conferences, actionplans, referrals, child_id, "", submitted.referral_id, starter.nats_url)
    # The panel knows the child from a concern; conferences from a routing, concluded with a plan
    # that actionplans builds from the ConferenceConcluded the relay publishes.
    assert await deliver(
        consumer_for(panel.runtime, ROUTES[0].subject), ROUTES[0].subject, _bytes(concern_recorded(seed))
    ) == ("ack", 1)
    routed = consumer_for(conferences.runtime, "csx.referrals.referral_routed", "conferences-referrals")
    assert await deliver(routed, "csx.referrals.referral_routed", _bytes(referral_routed(seed))) == ("ack", 1)
    stub = conferences_pb2_grpc.ConferencesServiceStub(conferences.channel(CHAIR))
    (conference,) = (await stub.ListConferences(cpb.ListConferencesRequest(child_id=child_id), timeout=10)).conferences
    manager = user("social_care", "mash_manager", "conference_participation", "manager.hostile")
    managing = conferences_pb2_grpc.ConferencesServiceStub(conferences.channel(manager))
    await conference_flow.register_chair(managing, CHAIR.user_id)
    held = await conference_flow.hold(managing, stub, conference, key="hostile-events", chair_id=CHAIR.user_id)
    await stub.ConcludeConference(
        cpb.ConcludeConferenceRequest(
            conference_id=conference.conference_id,
            idempotency_key="hostile-events-conclude",
            expected_version=held.version,
            outcome=cpb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
            summary="Review held with the family and partners.",
            actions=[
                cpb.AgreedAction(owner_agency=t.AGENCY_POLICE, description="Patrols at the park", due_on="2026-12-01"),
                cpb.AgreedAction(owner_agency=t.AGENCY_EDUCATION, description="Mentoring", due_on="2026-12-05"),
            ],
        ),
        timeout=10,
    )

    async def planned() -> bool:
        return await read_child(seed, "actionplans", child_id) == grpc.StatusCode.OK and bool(
            await _plans(actionplans, child_id)
        )

    await eventually(planned, within=30)
    seed.concluded_conference_id = conference.conference_id
    await bus_quiet(seed)
    yield seed


async def bus_quiet(stack: Stack) -> None:
    """Conferences' events all published and referrals done with them: referrals reads the real
    conferences stream too, so an attack on its routes counts its rows only once nothing else moves."""
    conferences = stack.conferences.runtime
    outbox = conferences.delivery.outbox.c
    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()

        async def quiet() -> bool:
            async with conferences.db.session() as session:
                unpublished = await session.execute(select(outbox.event_id).where(outbox.published_at.is_(None)))
                if unpublished.first() is not None:
                    return False
            try:
                info = await js.consumer_info("CSX_CONFERENCES", "referrals-conferences")
            except nats.js.errors.NotFoundError:
                return False  # referrals declares its durable in the background: not yet
            return not info.num_pending and not info.num_ack_pending

        await eventually(quiet, within=30)
    finally:
        await nc.close()


def _bytes(event: pb_message.Message) -> bytes:
    return event.SerializeToString()


async def _plans(actionplans: Running, child_id: str) -> list[ap.ActionPlan]:
    answer = await call(
        actionplans.channel(CHAIR),
        "/csx.actionplans.v1.ActionPlansService/ListActionPlans",
        ap.ListActionPlansRequest(child_id=child_id),
    )
    return list(ap.ListActionPlansResponse.FromString(answer.response).plans) if answer.response else []


def test_every_consumed_route_is_attacked() -> None:
    """Every route of every durable consumer the contracts declare is in ROUTES (so a new one is
    too); the services build their consumers from the same declarations (routes.consumer)."""
    declared = {(d.name, subject) for d in topology().durables for subject in d.subjects}
    assert {(r.durable, r.subject) for r in ROUTES} == declared
    assert {(r.durable, r.service) for r in ROUTES} == {(d.name, d.service) for d in topology().durables}


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.id)
@hostile_settings(40)
@given(data=st.data())
async def test_malformed_events_are_parked_and_leave_nothing(stack: Stack, route: RouteUnderTest, data) -> None:  # type: ignore[no-untyped-def]
    target = running(stack, route.service)
    consumer = consumer_for(target.runtime, route.subject, route.durable)
    base = route.base(stack)
    known = [stack.child_id, stack.concluded_conference_id] if route.seeded_ids else []
    if data.draw(st.booleans()):
        payload = mutated(data.draw, base, Injected(), known).SerializeToString()
    else:
        payload = data.draw(raw_payloads(base.SerializeToString()))
    poison = breaks_contract(route.message_type, payload)

    if route.service == "referrals":
        await bus_quiet(stack)
    before = await row_counts(target.runtime)
    settled, deliveries = await deliver(consumer, route.subject, payload)
    after = await row_counts(target.runtime)

    assert settled in ("ack", "term"), f"still retrying after {deliveries} deliveries"
    if poison:
        # Parked at once; or, about a child erased meanwhile, acknowledged and not applied.
        assert deliveries == 1, "an event that breaks the contract must not be retried"
        assert settled == "term" or not changed(before, after, ignore=["inbox"]), "a malformed event was applied"
    if settled == "term":
        assert after["dead_letters"] == before["dead_letters"] + 1
        assert not changed(before, after, ignore=["dead_letters"]), "a parked event left rows behind"
    else:
        event = route.message_type.FromString(payload)
        child_id = getattr(event, "child_id", "")
        if child_id and route.seeded_ids:
            assert await read_child(stack, route.service, child_id) in (
                grpc.StatusCode.OK,
                grpc.StatusCode.NOT_FOUND,
            ), "an applied event broke a read of the child"


async def test_consumers_keep_consuming_past_poison_over_nats(stack: Stack, hostile_nats) -> None:  # type: ignore[no-untyped-def]
    """Over a real nats-server: garbage, then a malformed event, then a valid one, on every route.
    The bad two are parked in dead_letters, the valid one applied, every consumer still running."""
    nc = await nats.connect(hostile_nats.url)
    js = nc.jetstream()
    expected: list[tuple[Running, str, str, str]] = []  # (service, durable, msg id, "inbox" | "dead")
    try:
        for route in ROUTES:
            target = running(stack, route.service)
            good = route.base(stack)
            bad = route.message_type()
            bad.CopyFrom(good)
            if route.message_type is conference_events.ConferenceConcluded:
                bad.conference_id = "'; DROP TABLE action_plans;--"
            elif route.message_type is referral_events.ChildrenMerged:
                bad.into_child_id = "\U0001f600" * 40
            else:
                bad.child_id = "\U0001f600" * 40
            for payload, where in (
                (b"\x0a\xff\xff\xff\xff\x0f", "dead"),
                (_bytes(bad), "dead"),
                (_bytes(good), "inbox"),
            ):
                msg_id = new_id()
                await js.publish(route.subject, payload, headers={MSG_ID_HEADER: msg_id})
                expected.append((target, route.durable, msg_id, where))
                # Every other durable on the subject takes the message too: settled either way.
                expected.extend(
                    (running(stack, other.service), other.durable, msg_id, "any")
                    for other in ROUTES
                    if other.subject == route.subject and other.durable != route.durable
                )
    finally:
        await nc.close()

    async def settled() -> bool:
        for target, durable, msg_id, where in expected:
            delivery = target.runtime.delivery
            tables = {"inbox": [delivery.inbox], "dead": [delivery.dead_letters]}.get(
                where, [delivery.inbox, delivery.dead_letters]
            )
            async with target.runtime.db.session() as session:
                for table in tables:
                    found = await session.execute(
                        select(table.c.msg_id).where(table.c.consumer == durable, table.c.msg_id == msg_id)
                    )
                    if found.first() is not None:
                        break
                else:
                    return False
        return True

    await eventually(settled, within=30)
    for service in ("panel", "conferences", "actionplans", "referrals"):
        for consumer in running(stack, service).runtime.consumers:
            assert consumer._task is not None and not consumer._task.done(), consumer.spec.durable
    await asyncio.sleep(0)
