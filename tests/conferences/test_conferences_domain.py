"""Due dates and outcome rules for conferences (WT23, the pilot procedure, the local B standard)."""

from __future__ import annotations

from datetime import date

import pytest

from csx.conferences.v1 import conferences_pb2 as pb
from csx.types.v1 import types_pb2
from csx_common.errors import FailedPrecondition
from csx_conferences import domain
from csx_conferences.settings import ConferencesSettings


def schedule(intervention: int, strategy: str = "", routed_on: date = date(2026, 3, 2), days: int = 15):  # type: ignore[no-untyped-def]
    return domain.schedule_for_routing(
        intervention,
        strategy_discussion_on=strategy,
        routed_on=routed_on,
        contextual_review_working_days=days,
    )


def test_a_is_an_initial_cpc_15_working_days_after_the_strategy_discussion() -> None:
    # Monday 2 March 2026: three clear weeks, no bank holidays.
    s = schedule(types_pb2.INTERVENTION_A, "2026-03-02")
    assert s.kind == pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION
    assert s.due_on == date(2026, 3, 23)
    assert s.rule.startswith("WT23") and "15 working days" in s.rule


def test_a_skips_christmas_and_new_year_bank_holidays() -> None:
    # Friday 18 Dec 2026: Christmas Day (Fri 25), Boxing Day substitute (Mon 28) and
    # New Year's Day (Fri 1 Jan 2027) are not working days.
    s = schedule(types_pb2.INTERVENTION_A, "2026-12-18", routed_on=date(2026, 12, 18))
    assert s.due_on == date(2027, 1, 13)


def test_a_counts_from_the_strategy_discussion_not_the_routing() -> None:
    s = schedule(types_pb2.INTERVENTION_A, "2026-03-02", routed_on=date(2026, 3, 6))
    assert s.due_on == date(2026, 3, 23)


def test_b_is_a_contextual_review_due_after_the_local_standard() -> None:
    s = schedule(types_pb2.INTERVENTION_B, routed_on=date(2026, 3, 2))
    assert s.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
    assert s.due_on == date(2026, 3, 23)
    assert "15 working days" in s.rule
    assert schedule(types_pb2.INTERVENTION_B, routed_on=date(2026, 3, 2), days=10).due_on == date(2026, 3, 16)


def test_b_ignores_a_strategy_discussion_date() -> None:
    assert schedule(types_pb2.INTERVENTION_B, "2026-01-05").due_on == date(2026, 3, 23)


@pytest.mark.parametrize("intervention", [types_pb2.INTERVENTION_UNSPECIFIED, types_pb2.INTERVENTION_C])
def test_only_a_and_b_come_from_routing(intervention: int) -> None:
    with pytest.raises(ValueError, match="not scheduled"):
        schedule(intervention, "2026-03-02")


def test_a_without_a_strategy_discussion_breaks_the_contract() -> None:
    with pytest.raises(ValueError, match="strategy discussion"):
        schedule(types_pb2.INTERVENTION_A)


def test_family_summary_is_due_2_working_days_after_a_b_review() -> None:
    assert domain.family_summary_due_on(pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, date(2026, 3, 2)) == date(2026, 3, 4)
    # Thursday before Easter 2026: Good Friday (3 Apr) and Easter Monday (6 Apr) are skipped.
    assert domain.family_summary_due_on(pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, date(2026, 4, 2)) == date(2026, 4, 8)


@pytest.mark.parametrize("kind", [pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION, pb.CONFERENCE_KIND_CONTEXT])
def test_family_summary_rule_is_for_b_only(kind: int) -> None:
    assert domain.family_summary_due_on(kind, date(2026, 3, 2)) is None


A, B, C = (
    pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION,
    pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW,
    pb.CONFERENCE_KIND_CONTEXT,
)
CPP = pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN
CSP = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
CTX = pb.CONFERENCE_OUTCOME_CONTEXT_PLAN
NONE = pb.CONFERENCE_OUTCOME_NO_PLAN

OUTCOMES = [
    (A, CPP, True), (A, NONE, True), (A, CSP, False), (A, CTX, False),
    (B, CSP, True), (B, NONE, True), (B, CPP, False), (B, CTX, False),
    (C, CTX, True), (C, NONE, True), (C, CPP, False), (C, CSP, False),
    (pb.CONFERENCE_KIND_UNSPECIFIED, NONE, False),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "outcome", "allowed"), OUTCOMES)
def test_outcomes_allowed_per_kind(kind: int, outcome: int, allowed: bool) -> None:
    if allowed:
        domain.check_outcome(kind, outcome)
    else:
        with pytest.raises(FailedPrecondition) as err:
            domain.check_outcome(kind, outcome)
        assert err.value.reason == "OUTCOME_NOT_ALLOWED_FOR_KIND"


def test_settings_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "GRPC_ADDRESS": "127.0.0.1:0",
        "DATABASE_URL": "sqlite+aiosqlite:///x.db",
        "NATS_URL": "nats://127.0.0.1:1",
        "KEYRING_FILE": "k.json",
        "INSECURE_DEV": "true",
    }.items():
        monkeypatch.setenv(f"CSX_CONFERENCES_{name}", value)
    assert ConferencesSettings().contextual_review_working_days == 15  # type: ignore[call-arg]
    monkeypatch.setenv("CSX_CONFERENCES_CONTEXTUAL_REVIEW_WORKING_DAYS", "10")
    assert ConferencesSettings().contextual_review_working_days == 10  # type: ignore[call-arg]
