"""The decision point's API: typed inputs that refuse nonsense, whole records, record visibility,
time (expiries), and what a decision carries for the audit."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from csx_safeguarding.policy import (
    MAX_BREAK_GLASS,
    Agency,
    BreakGlassGrant,
    Consent,
    DataClass,
    DisclosureContext,
    FieldSpec,
    FieldSubject,
    HandlingCode,
    IntelligenceHandling,
    LawfulBasis,
    PolicyEngine,
    PolicyRequest,
    Purpose,
    Requester,
    Role,
    SharingDecision,
)
from tests.policy import benchmark
from tests.policy.support import NOW, USER, context, data_class, not_to_share, share

ENGINE = PolicyEngine.default()
OPS, IDENTITY, HEALTH = (
    DataClass.DATA_CLASS_OPERATIONAL,
    DataClass.DATA_CLASS_IDENTITY,
    DataClass.DATA_CLASS_HEALTH,
)


# ---------------------------------------------------------------------------------- typed inputs
def test_inputs_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="agency"):
        Requester(USER, Agency.AGENCY_UNSPECIFIED, Role.DSL, Purpose.ACTION_DELIVERY)
    with pytest.raises(ValueError):
        Requester(USER, Agency.AGENCY_POLICE, "constable", Purpose.ACTION_DELIVERY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user_id"):
        Requester("", Agency.AGENCY_POLICE, Role.POLICE_OFFICER, Purpose.ACTION_DELIVERY)
    with pytest.raises(ValueError, match="data class"):
        context("police", "police_officer", "action_delivery").field(DataClass.DATA_CLASS_UNSPECIFIED)
    with pytest.raises(ValueError, match="unknown values"):
        Consent("given", frozenset({99}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lawful basis and an expiry"):
        SharingDecision("sd", True, "reason", "approver", lawful_basis=LawfulBasis.PUBLIC_TASK)
    with pytest.raises(ValueError, match="reason"):
        SharingDecision("sd", False, " ", "approver")
    with pytest.raises(ValueError, match="no lawful basis"):
        SharingDecision("sd", False, "reason", "approver", lawful_basis=LawfulBasis.PUBLIC_TASK)
    with pytest.raises(ValueError, match="timezone-aware"):
        SharingDecision("sd", True, "r", "a", lawful_basis=LawfulBasis.SCH1_PARA18, expires_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="conditions"):
        IntelligenceHandling(HandlingCode.C)


def test_break_glass_needs_a_reason_and_at_most_an_hour() -> None:
    with pytest.raises(ValueError, match="reason"):
        BreakGlassGrant("bg", USER, "  ", NOW, NOW + timedelta(minutes=5))
    with pytest.raises(ValueError, match="at most one hour"):
        BreakGlassGrant("bg", USER, "why", NOW, NOW + MAX_BREAK_GLASS + timedelta(seconds=1))
    with pytest.raises(ValueError, match="at most one hour"):
        BreakGlassGrant("bg", USER, "why", NOW, NOW)
    BreakGlassGrant("bg", USER, "why", NOW, NOW + MAX_BREAK_GLASS)


# ------------------------------------------------------------------------------------ time
def test_break_glass_expiry_takes_effect_on_the_next_decision() -> None:
    grant = BreakGlassGrant("bg", USER, "child missing", NOW, NOW + timedelta(hours=1))
    ctx = replace(context("police", "police_officer", "break_glass", involved=False), break_glass=grant, at=None)
    during = replace(ctx, at=NOW + timedelta(minutes=59, seconds=59))
    after = replace(ctx, at=NOW + timedelta(hours=1))
    assert ENGINE.decide(during.field(HEALTH)).obligations == ("review_within_72h",)
    assert ENGINE.decide(after.field(HEALTH)).rule == "forbid-break-glass-without-active-grant"
    # at=None: decided for the wall clock, long after this grant expired.
    assert not ENGINE.decide(ctx.field(HEALTH)).allowed


def test_sharing_decision_expiry_is_exclusive() -> None:
    ctx = context("police", "police_officer", "action_delivery", decisions=(share("sch1_para18"),))
    expiry = NOW + timedelta(days=30)
    assert ENGINE.decide(replace(ctx, at=expiry - timedelta(microseconds=1)).field(HEALTH)).allowed
    assert not ENGINE.decide(replace(ctx, at=expiry).field(HEALTH)).allowed


def test_decisions_follow_consent_changes_immediately() -> None:
    """Nothing is cached across calls: the next decision sees a withdrawal."""
    ctx = context("police", "police_officer", "action_delivery", consent="given")
    assert ENGINE.decide(ctx.field(HEALTH)).allowed
    withdrawn = replace(ctx, consent=Consent("withdrawn"))
    assert ENGINE.decide(withdrawn.field(HEALTH)).rule == "forbid-consent-refused-or-withdrawn"


# ------------------------------------------------------------------------- audit information
def test_allow_names_the_sharing_decision_in_play_preferring_sch1_para18() -> None:
    decisions = (
        share("public_task", decision_id="sd-public"),
        share("sch1_para18", ["police"], ["health"], decision_id="sd-para18"),
    )
    ctx = context("police", "police_officer", "action_delivery", decisions=decisions)
    decision = ENGINE.decide(ctx.field(HEALTH))
    assert (decision.rule, decision.lawful_basis, decision.sharing_decision_id) == (
        "permit-with-sharing-basis",
        "sch1_para18",
        "sd-para18",
    )
    # Narrative: only the public-task decision covers it.
    narrative = ENGINE.decide(ctx.field(data_class("narrative")))
    assert (narrative.lawful_basis, narrative.sharing_decision_id) == ("public_task", "sd-public")


def test_deny_by_a_decision_not_to_share_names_it() -> None:
    decisions = (share("sch1_para18", decision_id="sd-1"), not_to_share(["police"], decision_id="nts-7"))
    ctx = context("police", "police_officer", "action_delivery", decisions=decisions)
    decision = ENGINE.decide(ctx.field(HEALTH))
    assert (decision.allowed, decision.rule, decision.sharing_decision_id) == (
        False,
        "forbid-decision-not-to-share",
        "nts-7",
    )
    assert decision.reason.startswith("A recorded decision not to share")


def test_every_decision_names_a_rule_and_a_reason() -> None:
    ctx = context("transport", "practitioner", "action_delivery")
    for dc in DataClass.values():
        if dc == DataClass.DATA_CLASS_UNSPECIFIED:
            continue
        decision = ENGINE.decide(PolicyRequest(ctx, dc))
        assert decision.rule and decision.reason


# ------------------------------------------------------------------------------ whole records
RECORD = {
    "concern_id": OPS,
    "agency": OPS,
    "referrer.name": IDENTITY,
    "referrer.role": OPS,
    "referrer.email": DataClass.DATA_CLASS_CONTACT,
    "child.nhs_number": IDENTITY,
    "child.given_name": IDENTITY,
    "child.family_name": IDENTITY,
    "child.date_of_birth": IDENTITY,
    "harm_types": OPS,
    "contexts.place_id": OPS,
    "narrative": DataClass.DATA_CLASS_NARRATIVE,
    "intelligence.source_grade": DataClass.DATA_CLASS_POLICE_INTELLIGENCE,
    "intelligence.handling_conditions": DataClass.DATA_CLASS_POLICE_INTELLIGENCE,
    "recorded_at": OPS,
}


def allowed(decisions: dict[str, object]) -> set[str]:
    return {path for path, d in decisions.items() if d.allowed}  # type: ignore[attr-defined]


def test_same_record_three_agencies() -> None:
    base = {"handling_spec": "c", "consent": "given", "consent_agencies": ["health"]}
    police = ENGINE.decide_fields(context("police", "police_officer", "action_delivery", **base), RECORD)
    health = ENGINE.decide_fields(
        context("health", "health_safeguarding_nurse", "conference_participation", **base), RECORD
    )
    school = ENGINE.decide_fields(context("education", "dsl", "action_delivery", referring=True, **base), RECORD)
    ops = {p for p, dc in RECORD.items() if dc == OPS and not p.startswith("referrer.")}
    child_identity = {p for p in RECORD if p.startswith("child.")}
    intel = {p for p in RECORD if p.startswith("intelligence.")}
    referrer = {p for p in RECORD if p.startswith("referrer.")}
    assert allowed(police) == ops | child_identity | intel
    assert allowed(health) == ops | child_identity | {"narrative"}
    assert allowed(school) == ops | child_identity | referrer
    assert health["intelligence.source_grade"].rule == "forbid-intelligence-handling-c"
    assert police["intelligence.source_grade"].obligations == ("handling_conditions",)
    assert police["referrer.role"].rule == "forbid-referrer-identity"


def test_referrer_paths_and_field_specs() -> None:
    assert ENGINE.subject_of("referrer.name") is FieldSubject.REFERRER
    assert ENGINE.subject_of("concerns[3].referrer.email") is FieldSubject.REFERRER
    assert ENGINE.subject_of("referrer_notes") is FieldSubject.CHILD
    assert ENGINE.subject_of("child.given_name") is FieldSubject.CHILD
    ctx = context("police", "police_officer", "action_delivery")
    out = ENGINE.decide_fields(ctx, {"submitted_by": FieldSpec(IDENTITY, FieldSubject.REFERRER)})
    assert out["submitted_by"].rule == "forbid-referrer-identity"
    with pytest.raises(ValueError, match="'x'"):
        ENGINE.decide_fields(ctx, {"x": DataClass.DATA_CLASS_UNSPECIFIED})


NARRATIVE, CONTACT = DataClass.DATA_CLASS_NARRATIVE, DataClass.DATA_CLASS_CONTACT


def own(data_class: int) -> FieldSpec:
    return FieldSpec(data_class, FieldSubject.OWN_RECORD)


def test_referring_agency_reads_its_own_concern_whatever_the_consent() -> None:
    """Partner defect 1: the officer whose force raised concern 0 reads its narrative (and its
    referrer block) without consent, and after a withdrawal; concern 1, raised by a school, stays
    behind consent or a sharing basis, and its referrer stays hidden.

    In a record holding several concerns the read path marks the requester's own concern
    `own_record` and leaves `referring_agency` False: that flag is one per context and would
    release every concern's referrer block to `permit-referrer-to-referring-agency`."""
    concern = {
        "concerns[0].narrative": own(NARRATIVE),
        "concerns[0].referrer.name": own(IDENTITY),
        "concerns[0].referrer.email": own(CONTACT),
        "concerns[1].narrative": NARRATIVE,
        "concerns[1].referrer.name": IDENTITY,
    }
    ours = {p for p in concern if p.startswith("concerns[0].")}
    for consent in ("not_sought", "refused", "withdrawn"):
        ctx = context("police", "police_officer", "action_delivery", consent=consent)
        decisions = ENGINE.decide_fields(ctx, concern)
        assert allowed(decisions) == ours, consent
        assert {decisions[p].rule for p in ours} == {"permit-own-record"}
        assert decisions["concerns[1].referrer.name"].rule == "forbid-referrer-identity"
        assert decisions["concerns[1].narrative"].rule == (
            "default-deny" if consent == "not_sought" else "forbid-consent-refused-or-withdrawn"
        )
    # A single-concern record read the existing way (referring agency flag) agrees.
    ctx = context("police", "police_officer", "action_delivery", referring=True, consent="withdrawn")
    assert ENGINE.decide(ctx.field(NARRATIVE, FieldSubject.OWN_RECORD)).rule == "permit-own-record"


def test_action_owner_reads_its_own_action_but_not_the_others() -> None:
    """Partner defect 2: health owns action 0 and reads its description; police's action 1 stays
    hidden without consent or a basis, and with consent covering health it shows."""
    plan = {
        "actions[0].owner_agency": OPS,
        "actions[0].description": own(NARRATIVE),
        "actions[1].owner_agency": OPS,
        "actions[1].description": NARRATIVE,
    }
    nurse = context("health", "health_safeguarding_nurse", "action_delivery")
    decisions = ENGINE.decide_fields(nurse, plan)
    assert allowed(decisions) == {"actions[0].owner_agency", "actions[0].description", "actions[1].owner_agency"}
    assert decisions["actions[0].description"].rule == "permit-own-record"
    assert decisions["actions[1].description"].rule == "default-deny"
    with_consent = context("health", "health_safeguarding_nurse", "action_delivery", consent="given")
    assert ENGINE.decide_fields(with_consent, plan)["actions[1].description"].rule == "permit-with-consent"
    # A decision not to share with health hides police's action, never health's own.
    refused = context("health", "health_safeguarding_nurse", "action_delivery", decisions=(not_to_share(["health"]),))
    decisions = ENGINE.decide_fields(refused, plan)
    assert decisions["actions[0].description"].allowed
    assert decisions["actions[1].description"].rule == "forbid-decision-not-to-share"


def test_own_record_keeps_purpose_limits() -> None:
    auditor = context("health", "auditor", "quality_assurance", involved=False)
    decisions = ENGINE.decide_fields(auditor, {"actions[0].status": own(OPS), "actions[0].description": own(NARRATIVE)})
    assert decisions["actions[0].status"].rule == "permit-quality-assurance-operational"
    assert decisions["actions[0].description"].rule == "forbid-quality-assurance-beyond-operational"


def test_own_record_subject_accepts_its_word() -> None:
    assert FieldSubject("own_record") is FieldSubject.OWN_RECORD
    ctx = context("police", "police_officer", "action_delivery", consent="withdrawn")
    assert ENGINE.decide(PolicyRequest(ctx, NARRATIVE, "own_record")).rule == "permit-own-record"  # type: ignore[arg-type]
    assert ENGINE.decide(ctx.field(NARRATIVE)).rule == "forbid-consent-refused-or-withdrawn"


def test_visible_answers_whether_the_record_exists_for_the_caller() -> None:
    assert ENGINE.visible(context("police", "police_officer", "action_delivery")).allowed
    hidden = ENGINE.visible(context("police", "police_officer", "action_delivery", involved=False))
    assert (hidden.allowed, hidden.rule) == (False, "forbid-no-involvement")


def test_context_accepts_plain_values() -> None:
    ctx = DisclosureContext(
        Requester(USER, Agency.AGENCY_HEALTH, "health_safeguarding_nurse", "action_delivery"),  # type: ignore[arg-type]
        involvement=frozenset({"action_owner"}),  # type: ignore[arg-type]
        sharing_decisions=[share("sch1_para18")],  # type: ignore[arg-type]
        at=datetime(2021, 2, 9, tzinfo=UTC),
    )
    assert ENGINE.decide(ctx.field(HEALTH)).rule == "permit-health-to-health"
    assert isinstance(ctx.sharing_decisions, tuple)


def test_benchmark_runs() -> None:
    """The micro-benchmark (run it as a script for numbers) stays runnable."""
    result = benchmark.measure(rounds=50)
    assert result["fields_per_record"] == 20
    assert result["per_field_us"] > 0 and result["per_record_us"] > 0
