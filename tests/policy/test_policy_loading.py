"""Loading the policy: the shipped file loads from the package, and a bad file fails on load with a
message naming the rule (never at decision time)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from csx_safeguarding.policy import PolicyEngine, PolicyError
from tests.policy.support import context, data_class

PERMIT = """
  - id: permit-ops
    effect: permit
    description: Operational data to involved police officers.
    when:
      agencies: [police]
      data_classes: [operational]
"""


def policy(rules: str = PERMIT, head: str = "version: 1\n", tail: str = "") -> str:
    return head + "rules:" + rules + tail


def load(text: str) -> PolicyEngine:
    return PolicyEngine.from_text(text, source="test.yaml")


def test_default_policy_ships_as_package_data() -> None:
    resource = resources.files("csx_safeguarding.policy").joinpath("policy.yaml")
    assert resource.is_file()
    engine = PolicyEngine.default()
    assert engine.forbids and engine.permits
    assert all(r.description for r in engine.rules)


def test_from_yaml_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy())
    engine = PolicyEngine.from_yaml(path)
    assert [r.id for r in engine.rules] == ["permit-ops"]
    path.write_text(policy(PERMIT.replace("police]", "polise]")))
    with pytest.raises(PolicyError, match=rf"{path}: rule 'permit-ops'"):
        PolicyEngine.from_yaml(path)


def test_a_minimal_policy_decides() -> None:
    engine = load(policy())
    ctx = context("police", "police_officer", "action_delivery")
    assert engine.decide(ctx.field(data_class("operational"))).rule == "permit-ops"
    denied = engine.decide(ctx.field(data_class("identity")))
    assert (denied.allowed, denied.rule) == (False, "default-deny")


BAD_RULES = {
    "unknown condition": (
        PERMIT.replace("agencies:", "agency:"),
        r"rule 'permit-ops': unknown condition 'agency'",
    ),
    "unknown agency": (
        PERMIT.replace("[police]", "[polise]"),
        r"rule 'permit-ops': 'agencies' has unknown value 'polise'",
    ),
    "unknown data class": (
        PERMIT.replace("[operational]", "[operationl]"),
        r"rule 'permit-ops': 'data_classes' has unknown value 'operationl'",
    ),
    "prefixed enum name": (
        PERMIT.replace("[police]", "[AGENCY_POLICE]"),
        r"rule 'permit-ops': 'agencies' has unknown value 'AGENCY_POLICE'",
    ),
    "unknown role": (
        PERMIT + "      roles: [constable]\n",
        r"rule 'permit-ops': 'roles' has unknown value 'constable'",
    ),
    "unknown purpose": (
        PERMIT + "      purposes: [curiosity]\n",
        r"rule 'permit-ops': 'purposes' has unknown value 'curiosity'",
    ),
    "unknown consent state": (
        PERMIT + "      consent: [implied]\n",
        r"rule 'permit-ops': 'consent' has unknown value 'implied'",
    ),
    "unknown lawful basis": (
        PERMIT + "      sharing_basis: [legitimate_interests]\n",
        r"rule 'permit-ops': 'sharing_basis' has unknown value 'legitimate_interests'",
    ),
    "unknown handling code": (
        PERMIT + "      handling_codes: [x]\n",
        r"rule 'permit-ops': 'handling_codes' has unknown value 'x'",
    ),
    "a single value, not a list": (
        PERMIT.replace("[police]", "police"),
        r"rule 'permit-ops': 'agencies' must be a non-empty list",
    ),
    "an empty list": (
        PERMIT.replace("[police]", "[]"),
        r"rule 'permit-ops': 'agencies' must be a non-empty list",
    ),
    "a value twice": (
        PERMIT.replace("[police]", "[police, police]"),
        r"rule 'permit-ops': 'agencies' lists a value twice",
    ),
    "a boolean condition given text": (
        PERMIT + "      involved: 'yes'\n",
        r"rule 'permit-ops': 'involved' must be true or false",
    ),
    "unknown rule key": (
        PERMIT + "    priority: 1\n",
        r"rule 'permit-ops': unknown key\(s\) \['priority'\]",
    ),
    "conditions at the top of the rule": (
        PERMIT.replace("    when:\n", "")
        .replace("      agencies", "    agencies")
        .replace("      data_classes", "    data_classes"),
        r"rule 'permit-ops': unknown key\(s\) \['agencies', 'data_classes'\]",
    ),
    "bad effect": (
        PERMIT.replace("effect: permit", "effect: allow"),
        r"rule 'permit-ops': 'effect' must be permit or forbid",
    ),
    "missing description": (
        PERMIT.replace("    description: Operational data to involved police officers.\n", ""),
        r"rule 'permit-ops': missing key\(s\) \['description'\]",
    ),
    "blank description": (
        PERMIT.replace("Operational data to involved police officers.", "''"),
        r"rule 'permit-ops': 'description' must be non-empty",
    ),
    "empty when (would match everything)": (
        PERMIT.split("    when:")[0] + "    when: {}\n",
        r"rule 'permit-ops': conditions must be a non-empty mapping",
    ),
    "unless not a list": (
        PERMIT + "    unless:\n      agencies: [health]\n",
        r"rule 'permit-ops': 'unless' must be a non-empty list",
    ),
    "bad condition inside unless": (
        PERMIT + "    unless:\n      - agencys: [health]\n",
        r"rule 'permit-ops' unless\[0\]: unknown condition 'agencys'",
    ),
    "reserved id": (
        PERMIT.replace("permit-ops", "default-deny"),
        r"rule 'default-deny': 'default-deny' is reserved",
    ),
    "id not kebab-case": (
        PERMIT.replace("permit-ops", "Permit Ops"),
        r"rules\[0\]: 'id' must be kebab-case",
    ),
    "duplicate rule id": (
        PERMIT + PERMIT,
        r"duplicate rule id\(s\) \['permit-ops'\]",
    ),
    "duplicate YAML key in a rule": (
        PERMIT.replace("    effect: permit\n", "    effect: forbid\n    effect: permit\n"),
        r"duplicate key 'effect' at line",
    ),
}


@pytest.mark.parametrize(("rules", "message"), list(BAD_RULES.values()), ids=list(BAD_RULES))
def test_invalid_rule_is_refused_naming_it(rules: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load(policy(rules))


BAD_FILES = {
    "not YAML": ("rules: [\n", r"test.yaml: not valid YAML"),
    "not a mapping": ("- 1\n", r"test.yaml: the policy must be a mapping"),
    "unknown top-level key": (policy(tail="\nextra: 1\n"), r"unknown key\(s\) \['extra'\]"),
    "missing version": (policy(head=""), r"missing key\(s\) \['version'\]"),
    "future version": (policy(head="version: 2\n"), r"unsupported version 2"),
    "no rules": ("version: 1\nrules: []\n", r"'rules' must be a non-empty list"),
    "unknown handling agency": (
        policy(head="version: 1\nintelligence_handling:\n  c_default_agencies: [polis]\n"),
        r"intelligence_handling: 'c_default_agencies' has unknown value 'polis'",
    ),
    "unknown handling key": (
        policy(head="version: 1\nintelligence_handling:\n  c_agencies: [police]\n"),
        r"intelligence_handling: unknown key\(s\) \['c_agencies'\]",
    ),
    "bad obligation name": (
        policy(
            tail="\nobligations:\n  - id: ob-x\n    obligation: Review-Soon\n    description: d\n"
            "    when:\n      purposes: [break_glass]\n"
        ),
        r"obligation 'ob-x': 'obligation' must be snake_case",
    ),
    "bad obligation condition": (
        policy(
            tail="\nobligations:\n  - id: ob-x\n    obligation: review\n    description: d\n"
            "    when:\n      purpose: [break_glass]\n"
        ),
        r"obligation 'ob-x': unknown condition 'purpose'",
    ),
}


@pytest.mark.parametrize(("text", "message"), list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_invalid_file_is_refused(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load(text)


def test_forbid_beats_permit_in_a_small_policy() -> None:
    """The permit comes first in the file and matches; the forbid still decides."""
    engine = load(
        policy(
            PERMIT
            + """
  - id: forbid-withdrawn
    effect: forbid
    description: Withdrawn consent.
    when:
      consent: [withdrawn]
"""
        )
    )
    ok = context("police", "police_officer", "action_delivery")
    assert engine.decide(ok.field(data_class("operational"))).rule == "permit-ops"
    withdrawn = context("police", "police_officer", "action_delivery", consent="withdrawn")
    decision = engine.decide(withdrawn.field(data_class("operational")))
    assert (decision.allowed, decision.rule) == (False, "forbid-withdrawn")


def test_unless_lifts_a_forbid_only_where_all_its_conditions_hold() -> None:
    engine = load(
        policy(
            PERMIT.replace("[police]", "[police, health]")
            + """
  - id: forbid-unless-police-officer
    effect: forbid
    description: Only police officers.
    when:
      data_classes: [operational]
    unless:
      - agencies: [police]
        roles: [police_officer]
"""
        )
    )
    officer = context("police", "police_officer", "action_delivery")
    analyst = context("police", "police_analyst", "action_delivery")
    nurse = context("health", "police_officer", "action_delivery")
    ops = data_class("operational")
    assert engine.decide(officer.field(ops)).allowed
    assert engine.decide(analyst.field(ops)).rule == "forbid-unless-police-officer"
    assert engine.decide(nurse.field(ops)).rule == "forbid-unless-police-officer"
