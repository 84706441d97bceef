"""The event topology is declared once, in the contracts (csx.options.v1.event on event messages,
csx.options.v1.topology on services), and everything that names a subject, a stream or a durable
reads it: these tests hold the declarations, and what is built from them, to that."""

from __future__ import annotations

import uuid
from datetime import timedelta
from unittest.mock import MagicMock

import pytest
from buf.validate import validate_pb2
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from sqlalchemy import MetaData

from csx.actionplans.v1 import events_pb2 as actionplans_events
from csx.options.v1 import options_pb2
from csx.referrals.v1 import events_pb2 as referrals_events
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx_cli.reconcile import DURABLE_SUBJECTS, PRODUCER_OF_STREAM
from csx_cli.stack import CONSUMES, SERVICES, STREAMS
from csx_common.errors import InvalidArgument
from csx_common.messaging.consumer import ConsumerSpec
from csx_common.messaging.reconcile import subject_matches
from csx_common.messaging.routes import consumer, route
from csx_common.messaging.topology import Topology, TopologyError, contract_files, topology
from csx_common.natsauth import INTAKE_STREAM, agency_permissions, service_permissions
from csx_common.pki import AGENCIES
from csx_common.validation import check_event, event_violations
from csx_safeguarding.policy import MAX_BREAK_GLASS

ID = str(uuid.uuid4())


def _event_messages() -> list[Descriptor]:
    """Every message of every events.proto: each one is an event."""
    return [d for f in contract_files() if f.name.endswith("/events.proto") for d in f.message_types_by_name.values()]


# -- the declarations ---------------------------------------------------------------------------


def test_every_event_declares_its_subject_in_its_publishers_stream() -> None:
    declared = {e.full_name for e in topology().events}
    assert {d.full_name for d in _event_messages()} == declared
    for event in topology().events:
        stream = topology().stream(event.publisher)
        assert event.stream == stream.name
        assert any(subject_matches(p, event.filter_subject) for p in stream.subjects), event.full_name


def test_every_service_the_cli_runs_declares_its_topology() -> None:
    assert set(topology().services) == set(SERVICES)
    for service in SERVICES:
        assert topology().stream(service).name in STREAMS
    assert set(STREAMS) == {topology().stream(s).name for s in SERVICES} | {INTAKE_STREAM}


def test_subjects_with_params() -> None:
    decided = referrals_events.ReferralDecided(referral_id=ID)
    assert topology().subject(decided, agency="police") == "csx.referrals.partner.police.referral_decided"
    assert topology().event(decided).filter_subject == "csx.referrals.partner.*.referral_decided"
    assert topology().subject(referrals_events.ConcernRecorded) == "csx.referrals.concern_recorded"
    for wrong in ({}, {"agency": "police.>"}, {"agency": "*"}, {"agency": "Police"}, {"agency": "a", "b": "c"}):
        with pytest.raises(TopologyError):
            topology().subject(decided, **wrong)
    with pytest.raises(TopologyError):
        topology().subject(referrals_events.ConcernRecorded, agency="police")
    with pytest.raises(TopologyError, match="not an event"):
        topology().subject(timestamp_pb2.Timestamp())


def test_inconsistent_declarations_are_refused() -> None:
    def service(name: str, *consumers: tuple[str, list[str]]) -> options_pb2.ServiceTopology:
        return options_pb2.ServiceTopology(
            name=name,
            stream=f"S_{name.upper()}",
            subjects=[f"csx.{name}.>"],
            consumers=[options_pb2.DurableConsumer(durable=d, events=e) for d, e in consumers],
        )

    fine = Topology({"a.A": "csx.a.happened", "b.B": "csx.b.partner.{agency}.told"}, [service("a"), service("b")])
    assert fine.event("b.B").publisher == "b" and fine.event("b.B").params == ("agency",)
    cases = {
        "exactly one service's stream": ({"a.A": "csx.nowhere.happened"}, [service("a")]),
        "share subject": ({"a.A": "csx.a.x", "a.B": "csx.a.x"}, [service("a")]),
        "lower-case tokens": ({"a.A": "csx.a.Happened"}, [service("a")]),
        "undeclared events": ({"a.A": "csx.a.x"}, [service("a"), service("b", ("b-a", ["a.Nope"]))]),
        "several streams": (
            {"a.A": "csx.a.x", "b.B": "csx.b.y"},
            [service("a"), service("b"), service("c", ("c-mixed", ["a.A", "b.B"]))],
        ),
        "must be named": ({"a.A": "csx.a.x"}, [service("a"), service("b", ("other-a", ["a.A"]))]),
        "declared twice": ({"a.A": "csx.a.x"}, [service("a"), service("b", ("b-a", ["a.A"]), ("b-a", ["a.A"]))]),
    }
    for why, (events, services) in cases.items():
        with pytest.raises(TopologyError, match=why):
            Topology(events, services)


# -- what reads them ----------------------------------------------------------------------------


def _built_consumers() -> list[ConsumerSpec]:
    """Every ConsumerSpec the services build, as their composition roots do."""
    from csx_actionplans.consumers import conferences_consumer
    from csx_conferences.consumers import referrals_consumer
    from csx_panel.consumers import concerns_consumer
    from csx_referrals.consumers import conferences_consumer as cases_consumer
    from csx_safeguarding.disclosure import DisclosureViews, disclosure_tables
    from csx_safeguarding.erasure import ChildErasure

    # As SafeguardingRuntime.disclosure_views builds each service's `<service>-disclosure`.
    views = DisclosureViews(disclosure_tables(MetaData()), postgres=False)
    kernel = views.routes() + ChildErasure(MagicMock(), lambda: None).routes()
    disclosure = [consumer(f"{s}-disclosure", kernel) for s in ("panel", "conferences", "actionplans")]
    services = [
        concerns_consumer(MagicMock()),
        referrals_consumer(MagicMock()),
        conferences_consumer(MagicMock()),
        cases_consumer(MagicMock()),
    ]
    return services + disclosure


def test_consumers_are_built_from_the_declarations() -> None:
    built = {spec.durable: spec for spec in _built_consumers()}
    assert set(built) == {d.name for d in topology().durables}
    for durable in topology().durables:
        spec = built[durable.name]
        assert spec.stream == durable.stream
        assert sorted(r.subject for r in spec.routes) == sorted(durable.subjects)
        assert all(r.check is check_event for r in spec.routes)


def test_a_consumer_must_handle_exactly_its_declared_events() -> None:
    async def handler(uow, event) -> None:  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(TopologyError, match="declares"):
        consumer("conferences-referrals", [])
    with pytest.raises(TopologyError, match="declares"):
        consumer(
            "conferences-referrals",
            [route(referrals_events.ReferralRouted, handler), route(referrals_events.ConcernRecorded, handler)],
        )
    with pytest.raises(TopologyError, match="no service declares"):
        consumer("conferences-everything", [route(referrals_events.ReferralRouted, handler)])


def test_the_cli_reads_durables_and_streams_from_the_declarations() -> None:
    declared = {(d.service, d.stream, d.name) for d in topology().durables}
    assert {(c.service, c.stream, c.durable) for c in CONSUMES if c.stream != INTAKE_STREAM} == declared
    assert {d.name: d.subjects for d in topology().durables} == DURABLE_SUBJECTS
    assert {topology().stream(s).name: s for s in SERVICES} == PRODUCER_OF_STREAM


def test_permissions_cover_exactly_what_each_service_publishes_and_reads() -> None:
    """A service may publish its own events (and no other service's); a partner agency may read
    its own partner subjects (and no other agency's)."""
    for event in topology().events:
        for service in SERVICES:
            publish = service_permissions(service, CONSUMES).publish
            allowed = any(subject_matches(p, event.filter_subject) for p in publish)
            assert allowed == (service == event.publisher), (service, event.full_name)
        if event.params:
            assert event.params == ("agency",), event.full_name
            for agency in AGENCIES:
                subject = event.subject(agency=agency)
                for other in AGENCIES:
                    readable = any(subject_matches(p, subject) for p in agency_permissions(other).subscribe)
                    assert readable == (other == agency), (other, subject)
    for durable in topology().durables:
        publish = service_permissions(durable.service, CONSUMES).publish
        assert f"$JS.API.CONSUMER.MSG.NEXT.{durable.stream}.{durable.name}" in publish


# -- the event rules: protovalidate annotations ---------------------------------------------------


def _rules(field: FieldDescriptor) -> validate_pb2.FieldRules:
    return field.GetOptions().Extensions[validate_pb2.field]


def _csx_messages(descriptor: Descriptor, seen: set[str]) -> list[Descriptor]:
    if descriptor.full_name in seen or not descriptor.full_name.startswith("csx."):
        return []
    seen.add(descriptor.full_name)
    out = [descriptor]
    for field in descriptor.fields:
        if field.message_type is not None:
            out += _csx_messages(field.message_type, seen)
    return out


def test_every_event_field_is_bounded_by_its_contract() -> None:
    """What a consumer stores it has checked: every string of an event (and of the CSX types in it)
    is a UUID or bounded (64 characters at most), every list bounded (100), every enum a defined
    value, and no list of enums may hold the unspecified value."""
    seen: set[str] = set()
    unbounded = []
    for descriptor in [m for d in _event_messages() for m in _csx_messages(d, seen)]:
        for field in descriptor.fields:
            rules = _rules(field)
            if field.is_repeated:
                if not 0 < rules.repeated.max_items <= 100:
                    unbounded.append(f"{field.full_name}: max_items")
                rules = rules.repeated.items
            if field.type == FieldDescriptor.TYPE_STRING and not (
                rules.string.uuid or 0 < rules.string.max_len <= 64 or rules.string.pattern.endswith(",63}$")
            ):
                unbounded.append(f"{field.full_name}: a UUID or max_len <= 64")
            if field.enum_type is not None:
                if not rules.enum.defined_only:
                    unbounded.append(f"{field.full_name}: defined_only")
                if field.is_repeated and 0 not in rules.enum.not_in:
                    unbounded.append(f"{field.full_name}: not_in [0]")
    assert unbounded == []


def _grant(span: timedelta, **changes: object) -> safeguarding_events.BreakGlassGranted:
    granted = timestamp_pb2.Timestamp(seconds=1_790_000_000)
    expires = timestamp_pb2.Timestamp()
    expires.FromNanoseconds(granted.ToNanoseconds() + span // timedelta(microseconds=1) * 1000)
    event = safeguarding_events.BreakGlassGranted(
        grant_id=ID, child_id=ID, user_id="pc.one", agency=1, granted_at=granted, expires_at=expires
    )
    for name, value in changes.items():
        setattr(event, name, value)
    return event


def _fields(event: object) -> list[str]:
    with pytest.raises(InvalidArgument) as err:
        check_event(event)  # type: ignore[arg-type]
    assert err.value.message == "event is malformed"
    return [v.field for v in err.value.violations]


def test_a_break_glass_grant_lasts_at_most_its_policy_hour() -> None:
    check_event(_grant(MAX_BREAK_GLASS))
    check_event(_grant(timedelta(seconds=1)))
    assert _fields(_grant(MAX_BREAK_GLASS + timedelta(microseconds=1))) == ["expires_at"]
    assert _fields(_grant(timedelta(0))) == ["expires_at"]
    assert _fields(_grant(-timedelta(minutes=5))) == ["expires_at"]
    assert "user_id" in _fields(_grant(MAX_BREAK_GLASS, user_id=""))


def test_a_sharing_decision_has_a_basis_and_an_expiry_exactly_when_it_shares() -> None:
    expiry = timestamp_pb2.Timestamp(seconds=1_900_000_000)

    def decision(**fields: object) -> safeguarding_events.SharingDecisionRecorded:
        return safeguarding_events.SharingDecisionRecorded(decision_id=ID, child_id=ID, approver="m.one", **fields)  # type: ignore[arg-type]

    check_event(decision(share=True, lawful_basis=1, expires_at=expiry))
    check_event(decision(share=False))
    check_event(decision(share=False, expires_at=expiry))
    for wrong in (
        decision(share=True, lawful_basis=1),
        decision(share=True, expires_at=expiry),
        decision(share=False, lawful_basis=2),
    ):
        assert _fields(wrong) == ["lawful_basis"]


def test_violations_name_fields_and_rules_never_values() -> None:
    canary = "Canary-" + "x" * 80
    event = referrals_events.ConcernRecorded(
        concern_id=canary,
        referral_id=ID,
        child_id=ID + "\x00",
        agency=99,
        harm_types=[0, 1],
        recorded_at=timestamp_pb2.Timestamp(seconds=2**62),
    )
    found = event_violations(event)
    assert {v.field for v in found} >= {"concern_id", "child_id", "agency", "harm_types[0]", "recorded_at"}
    assert not any("Canary" in v.description for v in found)


def test_published_only_events_follow_the_same_rules() -> None:
    """Events no CSX service consumes (partner portals') carry their contract too."""
    good = actionplans_events.PartnerActionsAssigned(
        plan_id=ID, child_id=ID, agency=1, action_ids=[ID], first_due_on="2026-12-01", published_at={"seconds": 1}
    )
    check_event(good)
    assert _fields(actionplans_events.PartnerActionsAssigned(plan_id=ID, child_id=ID, agency=1)) == ["published_at"]
