"""The policy's `commands` section: who may run each command (issue 11). The shipped table must
decide exactly as the hand-written checks it replaced did, for every agency, role and purpose and
for a call with no user; a bad table fails on load; a command the policy does not name is refused
loudly."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from csx_actionplans.service import COMMANDS as ACTIONPLANS_COMMANDS
from csx_conferences.service import COMMANDS as CONFERENCES_COMMANDS
from csx_panel.service import COMMANDS as PANEL_COMMANDS
from csx_referrals.erasure import COMMANDS as ERASURE_COMMANDS
from csx_referrals.service import COMMANDS as REFERRALS_COMMANDS
from csx_safeguarding.policy import AGENCY_BY_NAME, PolicyEngine, PolicyError, Purpose, Role, UnknownCommandError
from tests.policy.test_policy_loading import PERMIT, load, policy

ENGINE = PolicyEngine.default()

# ------------------------------------------------------------------------- the old behaviour
# The hand-written checks the table replaced, verbatim in effect (agency None: no user).
SOCIAL_CARE = "social_care"


def _social_care(agency: str | None, role: str | None, purpose: str | None) -> bool:  # may_decide
    return agency is None or agency == SOCIAL_CARE


def _erasure(agency: str | None, role: str | None, purpose: str | None) -> bool:  # may_erase
    return agency == SOCIAL_CARE and role == "data_protection_officer"


def _break_glass_review(agency: str | None, role: str | None, purpose: str | None) -> bool:
    return agency == SOCIAL_CARE and role in {"mash_manager", "data_protection_officer"}


def _manage_conference(agency: str | None, role: str | None, purpose: str | None) -> bool:  # was may_conclude
    return agency is None or (agency == SOCIAL_CARE and role in {"chair", "social_worker", "mash_manager"})


# New with issue 12 (no hand-written check before them): the intended table.
def _chair(agency: str | None, role: str | None, purpose: str | None) -> bool:
    return agency == SOCIAL_CARE and role == "chair"  # a person, never a system call


def _manage_chairs(agency: str | None, role: str | None, purpose: str | None) -> bool:
    return agency is None or (agency == SOCIAL_CARE and role == "mash_manager")


PRACTITIONERS = {
    "social_worker",
    "chair",
    "police_analyst",
    "police_officer",
    "dsl",
    "health_safeguarding_nurse",
    "youth_justice_worker",
    "practitioner",
}


def _contribute(agency: str | None, role: str | None, purpose: str | None) -> bool:
    casework = {"referral_screening", "conference_participation", "action_delivery"}
    return agency is not None and role in PRACTITIONERS and purpose in casework


def _place_profile(agency: str | None, role: str | None, purpose: str | None) -> bool:
    return agency is None or purpose == "panel_analysis" or agency == SOCIAL_CARE


OLD: dict[str, Callable[[str | None, str | None, str | None], bool]] = {
    "record_screening_decision": _social_care,
    "list_possible_matches": _social_care,
    "resolve_possible_match": _social_care,
    "record_consent": _social_care,
    "record_sharing_decision": _social_care,
    "get_disclosure_state": _social_care,
    # may_submit_for / may_update with an agency other than the request's or the action's owner:
    # only social care (or no user); the agency acting for itself is the use case's check.
    "submit_concern_for_another_agency": _social_care,
    "update_any_action": _social_care,
    "request_erasure": _erasure,
    "approve_erasure": _erasure,
    "erase_due": _erasure,
    "review_break_glass": _break_glass_review,
    "manage_conference": _manage_conference,
    "chair_conference": _chair,
    "manage_chairs": _manage_chairs,
    "contribute_to_conference": _contribute,
    "get_place_profile": _place_profile,
}

SERVICE_COMMANDS = (
    *REFERRALS_COMMANDS,
    *ERASURE_COMMANDS,
    *CONFERENCES_COMMANDS,
    *PANEL_COMMANDS,
    *ACTIONPLANS_COMMANDS,
)

CALLERS = [
    *itertools.product(
        [*AGENCY_BY_NAME, "unknown_agency"], [*(r.value for r in Role), "unknown_role"], [p.value for p in Purpose]
    ),
    (None, None, None),
]


def test_the_shipped_policy_names_every_command_the_services_run_and_no_other() -> None:
    assert len(set(SERVICE_COMMANDS)) == len(SERVICE_COMMANDS)
    assert set(ENGINE.commands) == set(SERVICE_COMMANDS) == set(OLD)
    ENGINE.require_commands(SERVICE_COMMANDS)
    assert all(c.description for c in ENGINE.commands.values())


@pytest.mark.parametrize("command", sorted(OLD))
def test_each_command_decides_as_the_hand_written_check_it_replaced(command: str) -> None:
    old = OLD[command]
    differ = [
        (agency, role, purpose)
        for agency, role, purpose in CALLERS
        if ENGINE.permits_command(command, agency, role, purpose).allowed != old(agency, role, purpose)
    ]
    assert differ == []


@pytest.mark.parametrize(
    ("command", "agency", "role", "purpose", "allowed"),
    [
        ("record_screening_decision", "social_care", "mash_manager", "referral_screening", True),
        ("record_screening_decision", "police", "police_officer", "referral_screening", False),
        ("record_consent", None, None, None, True),
        ("submit_concern_for_another_agency", "social_care", "social_worker", "referral_screening", True),
        ("submit_concern_for_another_agency", "health", "health_safeguarding_nurse", "referral_screening", False),
        ("request_erasure", "social_care", "data_protection_officer", "records_management", True),
        ("request_erasure", "social_care", "mash_manager", "records_management", False),
        ("approve_erasure", "police", "data_protection_officer", "records_management", False),
        ("erase_due", None, None, None, False),
        ("review_break_glass", "social_care", "mash_manager", "break_glass", True),
        ("review_break_glass", "social_care", "data_protection_officer", "records_management", True),
        ("review_break_glass", "social_care", "social_worker", "referral_screening", False),
        ("review_break_glass", None, None, None, False),
        ("chair_conference", "social_care", "chair", "conference_participation", True),
        ("chair_conference", "social_care", "social_worker", "conference_participation", False),
        ("chair_conference", "social_care", "data_protection_officer", "conference_participation", False),
        ("chair_conference", "police", "chair", "conference_participation", False),
        ("chair_conference", None, None, None, False),
        ("manage_conference", "social_care", "social_worker", "conference_participation", True),
        ("manage_conference", "police", "police_officer", "conference_participation", False),
        ("manage_chairs", "social_care", "mash_manager", "conference_participation", True),
        ("manage_chairs", "social_care", "chair", "conference_participation", False),
        ("contribute_to_conference", "education", "dsl", "conference_participation", True),
        ("contribute_to_conference", "police", "panel_member", "panel_analysis", False),
        ("get_place_profile", "police", "panel_member", "panel_analysis", True),
        ("get_place_profile", "social_care", "social_worker", "referral_screening", True),
        ("get_place_profile", "police", "police_officer", "action_delivery", False),
        ("update_any_action", "social_care", "social_worker", "action_delivery", True),
        ("update_any_action", "police", "police_officer", "action_delivery", False),
    ],
)
def test_named_cases(command: str, agency: str | None, role: str | None, purpose: str | None, allowed: bool) -> None:
    decision = ENGINE.permits_command(command, agency, role, purpose)
    assert decision.allowed is allowed
    assert decision.rule == "command-" + command.replace("_", "-")
    assert decision.reason == ENGINE.commands[command].description


def test_permits_caller_reads_the_principal_and_none_is_no_user() -> None:
    from csx_common.identity import Principal

    dpo = Principal("u1", "social_care", "data_protection_officer", "records_management")
    assert ENGINE.permits_caller("request_erasure", dpo).allowed
    assert not ENGINE.permits_caller("request_erasure", None).allowed
    assert ENGINE.permits_caller("record_consent", None).allowed


def test_a_command_the_policy_does_not_name_is_refused_loudly() -> None:
    with pytest.raises(UnknownCommandError, match="'delete_everything'"):
        ENGINE.permits_command("delete_everything", "social_care", "social_worker", "referral_screening")
    with pytest.raises(UnknownCommandError, match="'delete_everything'"):
        ENGINE.permits_caller("delete_everything", None)
    with pytest.raises(UnknownCommandError):
        ENGINE.require_commands(["record_consent", "delete_everything"])


def test_a_policy_without_commands_permits_none() -> None:
    engine = load(policy())
    assert engine.commands == {}
    with pytest.raises(UnknownCommandError):
        engine.permits_command("record_consent", None, None, None)
    with pytest.raises(UnknownCommandError):
        engine.require_commands(REFERRALS_COMMANDS)


# ------------------------------------------------------------------------------------ loading
GOOD = """
commands:
  record_consent:
    description: Social care records consent.
    system: true
    permit:
      - agencies: [social_care]
  get_place_profile:
    description: Panel analysis, or social care.
    permit:
      - purposes: [panel_analysis]
      - agencies: [social_care]
        roles: [social_worker, mash_manager]
"""


def with_commands(commands: str) -> str:
    return policy(PERMIT, tail=commands)


def test_a_commands_table_loads_and_decides() -> None:
    engine = load(with_commands(GOOD))
    assert sorted(engine.commands) == ["get_place_profile", "record_consent"]
    assert engine.permits_command("record_consent", None, None, None).allowed
    assert not engine.permits_command("get_place_profile", None, None, None).allowed  # system: default false
    assert engine.permits_command("get_place_profile", "police", "panel_member", "panel_analysis").allowed
    assert engine.permits_command("get_place_profile", "social_care", "mash_manager", "referral_screening").allowed
    assert not engine.permits_command("get_place_profile", "social_care", "chair", "referral_screening").allowed
    assert not engine.permits_command("record_consent", "police", "police_officer", "referral_screening").allowed


BAD_COMMANDS = {
    "unknown key in a command": (GOOD.replace("    system: true", "    sytem: true"), r"unknown key\(s\) \['sytem'\]"),
    "unknown agency": (
        GOOD.replace("agencies: [social_care]\n    ", "agencies: [social_kare]\n    ", 1),
        "social_kare",
    ),
    "unknown role": (GOOD.replace("mash_manager]", "mash_manger]"), "mash_manger"),
    "unknown purpose": (GOOD.replace("[panel_analysis]", "[panel_analysys]"), "panel_analysys"),
    "a read condition": (GOOD.replace("purposes: [panel_analysis]", "data_classes: [operational]"), "data_classes"),
    "an unknown condition": (GOOD.replace("purposes: [panel_analysis]", "agency: [police]"), "'agency'"),
    "missing description": (GOOD.replace("    description: Social care records consent.\n", ""), "description"),
    "empty description": (GOOD.replace("Social care records consent.", "''"), "description"),
    "missing permit": (
        GOOD.replace("    permit:\n      - agencies: [social_care]\n  get_place", "  get_place"),
        r"missing key\(s\) \['permit'\]",
    ),
    "empty permit": (GOOD.replace("permit:\n      - agencies: [social_care]\n", "permit: []\n"), "'permit'"),
    "empty permit entry": (GOOD.replace("      - agencies: [social_care]\n  get", "      - {}\n  get"), "non-empty"),
    "empty agencies": (GOOD.replace("agencies: [social_care]\n  get", "agencies: []\n  get"), "non-empty list"),
    "system not a boolean": (GOOD.replace("system: true", "system: yes please"), "'system'"),
    "bad command name": (GOOD.replace("record_consent:", "Record-Consent:"), "snake_case"),
    "duplicate command": (GOOD + GOOD.replace("commands:\n", "").split("  get_place")[0], "duplicate key"),
    "duplicate agency": (GOOD.replace("[social_care]\n  get", "[social_care, social_care]\n  get"), "twice"),
    "commands not a mapping": ("\ncommands: [record_consent]\n", "commands must be a non-empty mapping"),
    "empty commands": ("\ncommands: {}\n", "commands must be a non-empty mapping"),
    "a command not a mapping": ("\ncommands:\n  record_consent: [social_care]\n", "must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_a_bad_commands_table_fails_on_load(case: str) -> None:
    text, message = BAD_COMMANDS[case]
    assert text != GOOD, case
    with pytest.raises(PolicyError, match=message):
        load(with_commands(text))
