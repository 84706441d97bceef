"""Micro-benchmark of the disclosure policy decision point (not a test: no timing is asserted).

    .venv/bin/python -m tests.policy.benchmark            # from the repository root

Measures, for a realistic context (consent scoped to health, two sharing decisions, C-coded
intelligence, involvement):
- one `decide` of a single field (the context's facts are computed on every call);
- one `decide_fields` over a 20-field record (facts once, then once per data class and subject);
- building the `DisclosureContext` itself (validation), which a read path also pays.
`benchmarks/run.py` (`make bench`) can import `measure` and print its numbers beside a plain read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from csx_safeguarding.policy import (
    Agency,
    Consent,
    DataClass,
    DisclosureContext,
    HandlingCode,
    IntelligenceHandling,
    Involvement,
    LawfulBasis,
    PolicyEngine,
    Purpose,
    Requester,
    Role,
    SharingDecision,
)

DC = DataClass
#: A 20-field record shaped like a concern read (referrer, child identity, intelligence, plan).
RECORD_20: dict[str, int] = {
    "concern_id": DC.DATA_CLASS_OPERATIONAL,
    "agency": DC.DATA_CLASS_OPERATIONAL,
    "agency_reference": DC.DATA_CLASS_OPERATIONAL,
    "referrer.name": DC.DATA_CLASS_IDENTITY,
    "referrer.role": DC.DATA_CLASS_OPERATIONAL,
    "referrer.email": DC.DATA_CLASS_CONTACT,
    "referrer.phone": DC.DATA_CLASS_CONTACT,
    "child.nhs_number": DC.DATA_CLASS_IDENTITY,
    "child.given_name": DC.DATA_CLASS_IDENTITY,
    "child.family_name": DC.DATA_CLASS_IDENTITY,
    "child.date_of_birth": DC.DATA_CLASS_IDENTITY,
    "harm_types": DC.DATA_CLASS_OPERATIONAL,
    "contexts.place_id": DC.DATA_CLASS_OPERATIONAL,
    "contexts.context_type": DC.DATA_CLASS_OPERATIONAL,
    "narrative": DC.DATA_CLASS_NARRATIVE,
    "intelligence.source_grade": DC.DATA_CLASS_POLICE_INTELLIGENCE,
    "intelligence.intelligence_grade": DC.DATA_CLASS_POLICE_INTELLIGENCE,
    "intelligence.handling_code": DC.DATA_CLASS_POLICE_INTELLIGENCE,
    "intelligence.handling_conditions": DC.DATA_CLASS_POLICE_INTELLIGENCE,
    "recorded_at": DC.DATA_CLASS_OPERATIONAL,
}


def make_context(now: datetime) -> DisclosureContext:
    return DisclosureContext(
        requester=Requester("u-bench", Agency.AGENCY_HEALTH, Role.HEALTH_SAFEGUARDING_NURSE, Purpose.ACTION_DELIVERY),
        consent=Consent("given", frozenset({Agency.AGENCY_HEALTH}), None),
        sharing_decisions=(
            SharingDecision(
                "sd-1",
                True,
                "risk of exploitation; seeking consent would prejudice protection",
                "mash-manager-1",
                frozenset({Agency.AGENCY_HEALTH, Agency.AGENCY_POLICE}),
                frozenset({DC.DATA_CLASS_NARRATIVE}),
                LawfulBasis.SCH1_PARA18,
                now + timedelta(days=30),
            ),
            SharingDecision("nts-1", False, "family safety", "mash-manager-1", frozenset({Agency.AGENCY_HOUSING})),
        ),
        handling=IntelligenceHandling(HandlingCode.C, "not to the family", frozenset({Agency.AGENCY_HEALTH})),
        involvement=frozenset({Involvement.ACTION_OWNER, Involvement.CONFERENCE_ATTENDEE}),
        at=now,
    )


def _best_us(fn: Callable[[], object], rounds: int, repeat: int = 5) -> float:
    """Best of `repeat` runs of `rounds` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        best = min(best, (time.perf_counter() - start) / rounds)
    return best * 1e6


def measure(rounds: int = 20_000) -> dict[str, float]:
    engine = PolicyEngine.default()
    now = datetime.now(UTC)
    ctx = make_context(now)
    one = ctx.field(DC.DATA_CLASS_HEALTH)
    return {
        "per_field_us": _best_us(lambda: engine.decide(one), rounds),
        "per_record_us": _best_us(lambda: engine.decide_fields(ctx, RECORD_20), max(1, rounds // 10)),
        "context_build_us": _best_us(lambda: make_context(now), max(1, rounds // 10)),
        "fields_per_record": len(RECORD_20),
    }


def main() -> None:
    result = measure()
    print(f"policy decision, one field:        {result['per_field_us']:8.1f} µs")
    print(f"policy decisions, 20-field record: {result['per_record_us']:8.1f} µs")
    print(f"building the DisclosureContext:    {result['context_build_us']:8.1f} µs")


if __name__ == "__main__":
    main()
