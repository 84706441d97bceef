"""The default policy, case by case: agency × role × purpose × data class × consent × lawful basis ×
handling code (× involvement, referrer, break-glass), each with the decision AND the rule that
decides it. Unless a row says otherwise the agency is involved with the child, consent was not
sought, there is no sharing decision, the intelligence is ungraded and the field is the child's.
`subject="own_record"`: the field belongs to a concern the requester's agency raised or an action it
owns (the read path marks it so)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from csx_safeguarding.policy import FieldSubject, PolicyEngine, SharingDecision
from tests.policy.support import context, data_class, not_to_share, share


@dataclass(frozen=True)
class Case:
    agency: str
    role: str
    purpose: str
    data_class: str
    expect: str  # "allow" | "deny"
    rule: str
    consent: str = "not_sought"
    consent_agencies: list[str] | None = None
    consent_classes: list[str] | None = None
    decisions: tuple[SharingDecision, ...] = ()
    handling: str | None = None  # None (ungraded), "p", "c", "c:health,education"
    involved: bool = True
    referring: bool = False
    subject: str = "child"
    break_glass: str | None = None  # "active", "expired", "other_user"
    obligations: tuple[str, ...] = field(default=())


A, D = "allow", "deny"
HC = ("handling_conditions",)
REVIEW = ("review_within_72h",)
DAY = timedelta(days=1)

# Agencies, roles and purposes as the policy YAML names them.
SC, POL, HEA, EDU, YJ = "social_care", "police", "health", "education", "youth_justice"
SW, MASH, CHAIR = "social_worker", "mash_manager", "chair"
OFFICER, ANALYST = "police_officer", "police_analyst"
DSL, NURSE, YJW, PRAC = "dsl", "health_safeguarding_nurse", "youth_justice_worker", "practitioner"
AUDITOR, PANEL = "auditor", "panel_member"
SCREEN, CONF, ACT = "referral_screening", "conference_participation", "action_delivery"
QA, ANALYSIS, BG = "quality_assurance", "panel_analysis", "break_glass"
INTEL, SPECIAL, OPS = "police_intelligence", "special_category", "operational"

# Recorded sharing decisions used below.
SCH18_POLICE_HEALTH = (share("sch1_para18", [POL], ["health"]),)
SCH18_POLICE_HEALTH_EXPIRED = (share("sch1_para18", [POL], ["health"], expires=-DAY),)
SCH18_POLICE_NARRATIVE = (share("sch1_para18", [POL], ["narrative"]),)
SCH18_EDU_INTEL = (share("sch1_para18", [EDU], [INTEL]),)
SCH18_ANYONE = (share("sch1_para18"),)
PUBLIC_TASK_POLICE_NARRATIVE = (share("public_task", [POL], ["narrative"]),)
PUBLIC_TASK_HOUSING_CONTACT = (share("public_task", ["housing"], ["contact"]),)
VITAL_EDU_SPECIAL = (share("vital_interests", [EDU], [SPECIAL]),)
NOT_TO_SC_HEALTH = (not_to_share([SC], ["health"]),)
NOT_TO_POLICE_IDENTITY = (not_to_share([POL], ["identity"]),)
NOT_TO_HEALTH = (not_to_share([HEA]),)
NOT_TO_POLICE = (not_to_share([POL]),)
OWN = "own_record"

# fmt: off
CASES: dict[str, Case] = {
    # ---- social care: the MASH and chairs see what screening and conferences need
    "mash screens identity of any referred child":
        Case(SC, MASH, SCREEN, "identity", A, "permit-social-care-statutory", involved=False),
    "social worker sees health for a conference":
        Case(SC, SW, CONF, "health", A, "permit-social-care-statutory"),
    "chair sees C intelligence (default conditions) with its conditions":
        Case(SC, CHAIR, CONF, INTEL, A, "permit-social-care-statutory", handling="c", obligations=HC),
    "social care excluded by C conditions naming health only":
        Case(SC, MASH, SCREEN, INTEL, D, "forbid-intelligence-handling-c", handling="c:health"),
    "social care keeps statutory access after consent withdrawn":
        Case(SC, SW, ACT, "narrative", A, "permit-social-care-statutory", consent="withdrawn"),
    "social care sees the referrer":
        Case(SC, MASH, SCREEN, "identity", A, "permit-social-care-statutory", subject="referrer"),
    "decision not to share binds social care too":
        Case(SC, SW, SCREEN, "health", D, "forbid-decision-not-to-share", decisions=NOT_TO_SC_HEALTH),
    "auditor role doing casework is not permitted":
        Case(SC, AUDITOR, SCREEN, "identity", D, "default-deny"),
    # ---- police
    "police officer sees operational data of an involved child":
        Case(POL, OFFICER, ACT, OPS, A, "permit-operational-involved"),
    "police not involved: the record does not exist for them":
        Case(POL, OFFICER, ACT, OPS, D, "forbid-no-involvement", involved=False),
    "police officer sees identity":
        Case(POL, OFFICER, ACT, "identity", A, "permit-identity-involved"),
    "police analyst sees P intelligence":
        Case(POL, ANALYST, SCREEN, INTEL, A, "permit-police-intelligence-to-police", handling="p"),
    "police always see their own C intelligence, with conditions":
        Case(POL, ANALYST, SCREEN, INTEL, A, "permit-police-intelligence-to-police", handling="c:health",
             obligations=HC),
    "police do not see health without consent or basis":
        Case(POL, OFFICER, ACT, "health", D, "default-deny"),
    "police see health with consent":
        Case(POL, OFFICER, ACT, "health", A, "permit-with-consent", consent="given"),
    "consent scoped to health agency is no consent for police":
        Case(POL, OFFICER, ACT, "health", D, "default-deny", consent="given", consent_agencies=[HEA]),
    "consent scoped to education data is no consent for health data":
        Case(POL, OFFICER, ACT, "health", D, "default-deny", consent="given", consent_classes=["education"]),
    "police see health under a Sch.1 para 18 decision":
        Case(POL, OFFICER, ACT, "health", A, "permit-with-sharing-basis", decisions=SCH18_POLICE_HEALTH),
    "an expired sharing decision is no basis":
        Case(POL, OFFICER, ACT, "health", D, "default-deny", decisions=SCH18_POLICE_HEALTH_EXPIRED),
    "a sharing decision for another data class is no basis":
        Case(POL, OFFICER, ACT, "health", D, "default-deny", decisions=SCH18_POLICE_NARRATIVE),
    "withdrawn consent forbids narrative":
        Case(POL, OFFICER, ACT, "narrative", D, "forbid-consent-refused-or-withdrawn", consent="withdrawn"),
    "Sch.1 para 18 overrides withdrawn consent":
        Case(POL, OFFICER, ACT, "narrative", A, "permit-with-sharing-basis", consent="withdrawn",
             decisions=SCH18_POLICE_NARRATIVE),
    "public task does not override refused consent":
        Case(POL, OFFICER, ACT, "narrative", D, "forbid-consent-refused-or-withdrawn", consent="refused",
             decisions=PUBLIC_TASK_POLICE_NARRATIVE),
    "withdrawn consent forbids identity too":
        Case(POL, OFFICER, ACT, "identity", D, "forbid-consent-refused-or-withdrawn", consent="withdrawn"),
    "withdrawn consent leaves operational data":
        Case(POL, OFFICER, ACT, OPS, A, "permit-operational-involved", consent="withdrawn"),
    "withdrawal scoped to health agency does not touch police":
        Case(POL, OFFICER, ACT, "identity", A, "permit-identity-involved", consent="withdrawn",
             consent_agencies=[HEA]),
    "referrer identity hidden from a non-referring agency":
        Case(POL, OFFICER, ACT, "identity", D, "forbid-referrer-identity", subject="referrer"),
    "referrer's job title hidden too (operational but identifying)":
        Case(POL, OFFICER, ACT, OPS, D, "forbid-referrer-identity", subject="referrer"),
    "referring agency sees its own referrer":
        Case(POL, OFFICER, ACT, "contact", A, "permit-referrer-to-referring-agency", subject="referrer",
             referring=True),
    "child's withdrawal does not govern the referrer's own details":
        Case(POL, OFFICER, ACT, "identity", A, "permit-referrer-to-referring-agency", subject="referrer",
             referring=True, consent="withdrawn"),
    "decision not to share identity with police":
        Case(POL, OFFICER, ACT, "identity", D, "forbid-decision-not-to-share",
             decisions=NOT_TO_POLICE_IDENTITY),
    "decision not to share with health does not bind police":
        Case(POL, OFFICER, ACT, "identity", A, "permit-identity-involved", decisions=NOT_TO_HEALTH),
    "police intelligence needs a police role":
        Case(POL, DSL, ACT, INTEL, D, "default-deny", handling="p"),
    # ---- health
    "nurse sees health of an involved child":
        Case(HEA, NURSE, CONF, "health", A, "permit-health-to-health"),
    "nurse not involved":
        Case(HEA, NURSE, CONF, "health", D, "forbid-no-involvement", involved=False),
    "nurse sees P intelligence with consent":
        Case(HEA, NURSE, CONF, INTEL, A, "permit-with-consent", consent="given", handling="p"),
    "C intelligence (default conditions) not to health, even with consent":
        Case(HEA, NURSE, CONF, INTEL, D, "forbid-intelligence-handling-c", consent="given", handling="c"),
    "C intelligence naming health, with consent, carries its conditions":
        Case(HEA, NURSE, CONF, INTEL, A, "permit-with-consent", consent="given", handling="c:health",
             obligations=HC),
    "C naming health grants nothing by itself":
        Case(HEA, NURSE, CONF, INTEL, D, "default-deny", handling="c:health"),
    "ungraded intelligence stays with police and social care":
        Case(HEA, NURSE, CONF, INTEL, D, "forbid-intelligence-ungraded", consent="given"),
    "health do not see education data without consent":
        Case(HEA, NURSE, CONF, "education", D, "default-deny"),
    "withdrawn consent forbids even health's own class":
        Case(HEA, NURSE, CONF, "health", D, "forbid-consent-refused-or-withdrawn", consent="withdrawn"),
    # ---- education
    "DSL sees education data":
        Case(EDU, DSL, ACT, "education", A, "permit-education-to-education"),
    "DSL sees the referrer from their school":
        Case(EDU, DSL, SCREEN, "identity", A, "permit-referrer-to-referring-agency", subject="referrer",
             referring=True),
    "DSL sees special category under vital interests":
        Case(EDU, DSL, ACT, SPECIAL, A, "permit-with-sharing-basis", decisions=VITAL_EDU_SPECIAL),
    "DSL does not see location without consent or basis":
        Case(EDU, DSL, ACT, "location", D, "default-deny"),
    "DSL sees P intelligence under Sch.1 para 18":
        Case(EDU, DSL, CONF, INTEL, A, "permit-with-sharing-basis", handling="p", decisions=SCH18_EDU_INTEL),
    # ---- youth justice and other partners
    "youth justice sees identity":
        Case(YJ, YJW, CONF, "identity", A, "permit-identity-involved"),
    "youth justice sees social care data with consent":
        Case(YJ, YJW, CONF, "social_care", A, "permit-with-consent", consent="given"),
    "transport sees no contact details by default":
        Case("transport", PRAC, ACT, "contact", D, "default-deny"),
    "housing sees contact under public task":
        Case("housing", PRAC, ACT, "contact", A, "permit-with-sharing-basis",
             decisions=PUBLIC_TASK_HOUSING_CONTACT),
    "voluntary sector not involved":
        Case("voluntary_sector", PRAC, ACT, "identity", D, "forbid-no-involvement", involved=False),
    "a decision to share naming the agency is itself a basis (policy.yaml, involvement)":
        Case("community_safety", PRAC, ACT, "contact", A, "permit-with-sharing-basis", involved=False,
             decisions=SCH18_ANYONE),
    "a decision not to share is no basis":
        Case("community_safety", PRAC, ACT, "identity", D, "forbid-no-involvement", involved=False,
             decisions=(not_to_share(["community_safety"], ["contact"]),)),
    # ---- the referrer is told the outcome (WT23), and nothing more, until a decision opens the child
    "the referring agency sees its referral's status and outcome":
        Case(EDU, DSL, SCREEN, OPS, A, "permit-outcome-to-referring-agency", involved=False, referring=True),
    "the referring agency sees no identity by referring":
        Case(EDU, DSL, SCREEN, "identity", D, "forbid-no-involvement", involved=False, referring=True),
    "nor the screening reason":
        Case(EDU, DSL, SCREEN, "social_care", D, "forbid-no-involvement", involved=False, referring=True),
    # ---- quality assurance and the panel: operational only
    "auditor sees operational data across cases":
        Case(SC, AUDITOR, QA, OPS, A, "permit-quality-assurance-operational", involved=False),
    "auditor sees no identity":
        Case(SC, AUDITOR, QA, "identity", D, "forbid-quality-assurance-beyond-operational", involved=False),
    "quality assurance purpose limits social care roles too":
        Case(SC, MASH, QA, "health", D, "forbid-quality-assurance-beyond-operational"),
    "auditor outside social care never sees the referrer":
        Case(POL, AUDITOR, QA, OPS, D, "forbid-referrer-identity", involved=False, subject="referrer"),
    "panel member sees operational data":
        Case(POL, PANEL, ANALYSIS, OPS, A, "permit-panel-analysis-operational", involved=False),
    "panel member sees no location":
        Case(EDU, PANEL, ANALYSIS, "location", D, "forbid-panel-analysis-beyond-operational", involved=False),
    "panel analysis needs the panel role":
        Case(POL, ANALYST, ANALYSIS, OPS, D, "default-deny", involved=False),
    # ---- the agency's own record (a concern it raised, an action it owns): not a disclosure to it
    "referring officer reads their own concern's narrative, consent not sought":
        Case(POL, OFFICER, ACT, "narrative", A, "permit-own-record", subject=OWN, referring=True),
    "another agency's concern narrative still needs consent or a basis":
        Case(POL, OFFICER, ACT, "narrative", D, "default-deny", referring=True),
    "own concern's narrative stays visible after consent is withdrawn":
        Case(POL, OFFICER, ACT, "narrative", A, "permit-own-record", subject=OWN, referring=True,
             consent="withdrawn"),
    "own concern's narrative stays visible when consent was refused":
        Case(POL, ANALYST, SCREEN, "narrative", A, "permit-own-record", subject=OWN, referring=True,
             consent="refused"),
    "withdrawn consent still hides another agency's narrative":
        Case(POL, OFFICER, ACT, "narrative", D, "forbid-consent-refused-or-withdrawn", referring=True,
             consent="withdrawn"),
    "action owner reads the description of its own action":
        Case(HEA, NURSE, ACT, "narrative", A, "permit-own-record", subject=OWN),
    "action owner does not read another agency's action description":
        Case(HEA, NURSE, ACT, "narrative", D, "default-deny"),
    "own action description visible after withdrawal; other agencies' still hidden":
        Case(YJ, YJW, ACT, "narrative", A, "permit-own-record", subject=OWN, consent="withdrawn"),
    "another agency's action description hidden after withdrawal":
        Case(YJ, YJW, ACT, "narrative", D, "forbid-consent-refused-or-withdrawn", consent="withdrawn"),
    "own action's location visible to a practitioner partner":
        Case("housing", PRAC, ACT, "location", A, "permit-own-record", subject=OWN),
    "a decision not to share does not hide the agency's own record":
        Case(POL, OFFICER, ACT, "narrative", A, "permit-own-record", subject=OWN, referring=True,
             decisions=NOT_TO_POLICE),
    "a decision not to share still hides others' data from the agency":
        Case(POL, OFFICER, ACT, "narrative", D, "forbid-decision-not-to-share", referring=True,
             decisions=NOT_TO_POLICE),
    "a decision not to share with social care does not hide its own record":
        Case(SC, SW, SCREEN, "health", A, "permit-own-record", subject=OWN, decisions=NOT_TO_SC_HEALTH),
    "own record visible while the involvement view lags":
        Case(POL, OFFICER, ACT, "narrative", A, "permit-own-record", subject=OWN, involved=False),
    "own concern's referrer block is the agency's own staff":
        Case(EDU, DSL, SCREEN, "contact", A, "permit-own-record", subject=OWN, referring=True),
    "police see their own C-coded intelligence, with its conditions":
        Case(POL, ANALYST, SCREEN, INTEL, A, "permit-own-record", subject=OWN, handling="c:health",
             obligations=HC),
    "C conditions still bind intelligence held in another agency's own record":
        Case(HEA, NURSE, ACT, INTEL, D, "forbid-intelligence-handling-c", subject=OWN, handling="c"),
    "ungraded intelligence in a school's own record stays restricted":
        Case(EDU, DSL, ACT, INTEL, D, "forbid-intelligence-ungraded", subject=OWN),
    "quality assurance sees only operational data of its own agency's records":
        Case(POL, AUDITOR, QA, "narrative", D, "forbid-quality-assurance-beyond-operational", subject=OWN,
             involved=False),
    "quality assurance purpose limits own-record reads by practitioners too":
        Case(POL, OFFICER, QA, "narrative", D, "forbid-quality-assurance-beyond-operational", subject=OWN),
    "auditor sees operational data of its own agency's records":
        Case(POL, AUDITOR, QA, OPS, A, "permit-quality-assurance-operational", subject=OWN, involved=False),
    "panel analysis sees no personal data of its own agency's records":
        Case(POL, PANEL, ANALYSIS, "location", D, "forbid-panel-analysis-beyond-operational", subject=OWN,
             involved=False),
    "own record needs a practitioner role":
        Case(SC, AUDITOR, ACT, "narrative", D, "default-deny", subject=OWN),
    "break-glass without a grant is refused on own records too":
        Case(POL, OFFICER, BG, "narrative", D, "forbid-break-glass-without-active-grant", subject=OWN,
             break_glass="expired"),
    "break-glass read of an own record is still a reviewed break-glass read":
        Case(POL, OFFICER, BG, "narrative", A, "permit-break-glass", subject=OWN, break_glass="active",
             consent="withdrawn", obligations=REVIEW),
    # ---- break-glass
    "break-glass permits an uninvolved officer, reviewed within 72h":
        Case(POL, OFFICER, BG, "location", A, "permit-break-glass", involved=False, break_glass="active",
             obligations=REVIEW),
    "break-glass after expiry":
        Case(POL, OFFICER, BG, "location", D, "forbid-break-glass-without-active-grant", involved=False,
             break_glass="expired"),
    "another user's grant is no grant":
        Case(POL, OFFICER, BG, "health", D, "forbid-break-glass-without-active-grant",
             break_glass="other_user"),
    "break-glass does not beat withdrawn consent":
        Case(POL, OFFICER, BG, "health", D, "forbid-consent-refused-or-withdrawn", break_glass="active",
             consent="withdrawn"),
    "break-glass does not reveal the referrer":
        Case(POL, OFFICER, BG, "identity", D, "forbid-referrer-identity", break_glass="active",
             subject="referrer"),
    "break-glass does not beat C conditions":
        Case(HEA, NURSE, BG, INTEL, D, "forbid-intelligence-handling-c", break_glass="active", handling="c"),
    "break-glass read of C intelligence carries both obligations":
        Case(POL, OFFICER, BG, INTEL, A, "permit-break-glass", break_glass="active", handling="c",
             obligations=HC + REVIEW),
    "a grant does nothing outside the break_glass purpose":
        Case(POL, OFFICER, ACT, "health", D, "default-deny", break_glass="active"),
    "auditors cannot break glass":
        Case(POL, AUDITOR, BG, OPS, D, "default-deny", involved=False, break_glass="active"),
}
# fmt: on


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.default()


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_policy_case(engine: PolicyEngine, case: Case) -> None:
    ctx = context(
        case.agency,
        case.role,
        case.purpose,
        consent=case.consent,
        consent_agencies=case.consent_agencies,
        consent_classes=case.consent_classes,
        decisions=case.decisions,
        handling_spec=case.handling,
        involved=case.involved,
        referring=case.referring,
        break_glass=case.break_glass,
    )
    decision = engine.decide(ctx.field(data_class(case.data_class), FieldSubject(case.subject)))
    assert (decision.allowed, decision.rule) == (case.expect == A, case.rule), decision.reason
    assert decision.obligations == case.obligations
    if not decision.allowed:
        assert decision.obligations == ()


def test_table_decides_by_every_rule(engine: PolicyEngine) -> None:
    """Every rule of the default policy (and the default deny) decides at least one row."""
    used = {case.rule for case in CASES.values()}
    assert {r.id for r in engine.rules} | {"default-deny"} <= used
    assert len(CASES) >= 40
