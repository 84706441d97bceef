"""Referral rules, free of I/O."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from csx.conferences.v1 import conferences_pb2 as conferences
from csx.referrals.v1 import referrals_pb2 as pb
from csx.types.v1 import types_pb2
from csx_safeguarding.calendar import add_working_days

# WT23: a decision on a referral, and acknowledgement to the referrer, within 1 working day.
DECISION_WORKING_DAYS = 1

ROUTES = {
    pb.SCREENING_OUTCOME_INTERVENTION_A: types_pb2.INTERVENTION_A,
    pb.SCREENING_OUTCOME_INTERVENTION_B: types_pb2.INTERVENTION_B,
}


def decision_due_on(received: datetime) -> date:
    """By the end of the next working day after the London day the concern arrived."""
    return add_working_days(received, DECISION_WORKING_DAYS)


def reference_key(submitter: str, agency_reference: str) -> str:
    """The idempotency key of a concern: one per submitting agency and agency reference (hashed: a
    reference may hold characters a key may not)."""
    return "ref-" + hashlib.sha256(f"{submitter}:{agency_reference}".encode()).hexdigest()[:40]


def normalise_name(given: str, family: str) -> str:
    """NFC, case-folded, whitespace collapsed: the same name typed two ways matches."""
    joined = f"{given} {family}"
    return " ".join(unicodedata.normalize("NFC", joined).casefold().split())


def status_after(outcome: int) -> int:
    if outcome == pb.SCREENING_OUTCOME_NO_FURTHER_ACTION:
        return pb.REFERRAL_STATUS_CLOSED
    return pb.REFERRAL_STATUS_ROUTED


# Who may run each command (social care records screening decisions, consent and sharing decisions;
# a data protection officer requests and approves erasures; ...) is the policy's `commands` section
# (csx_safeguarding/policy/policy.yaml), decided by the policy decision point like every read.
SOCIAL_CARE = "social_care"


def agency_name(agency: int) -> str:
    return types_pb2.Agency.Name(agency).removeprefix("AGENCY_").lower()


# Child protection records are kept 35 years after the case closes: the policy held lawful in
# R(C) v Northumberland CC [2015] EWHC 2134 (Admin). Then the child's keys are destroyed.
RETENTION_YEARS = 35


def retention_cutoff(now: datetime, years: int) -> datetime:
    """Cases closed before this instant have passed their retention period (29 Feb -> 28 Feb)."""
    try:
        return now.replace(year=now.year - years)
    except ValueError:
        return now.replace(year=now.year - years, day=28)


# Break-glass (docs/security.md; local standard after ASVS V8): time-boxed to one hour, reviewed by
# a second person within 72 hours (who may review: the policy's `review_break_glass` command).
BREAK_GLASS_FOR = timedelta(hours=1)
BREAK_GLASS_REVIEW_WITHIN = timedelta(hours=72)


# A child's case (docs/adr/0014) ------------------------------------------------------------------
CASE_OPEN = "open"
CASE_CLOSED = "closed"

# The intervention each kind of conference about a child belongs to. C (a context conference) is
# about a place, never a child's case: its events are not the case's.
CONFERENCE_INTERVENTION = {
    conferences.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION: types_pb2.INTERVENTION_A,
    conferences.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW: types_pb2.INTERVENTION_A,
    conferences.CONFERENCE_KIND_CONTEXTUAL_REVIEW: types_pb2.INTERVENTION_B,
}


def about_a_place(kind: int) -> bool:
    return kind == conferences.CONFERENCE_KIND_CONTEXT


@dataclass(frozen=True)
class CaseFacts:
    """What keeps a child's case open: a referral awaiting a decision; routed referrals whose
    conference conferences has not announced yet (their interventions); open conferences (theirs,
    0 where not yet known)."""

    awaiting_decision: bool
    pending_routings: tuple[int, ...] = ()
    open_conferences: tuple[int, ...] = ()

    @property
    def open(self) -> bool:
        return self.awaiting_decision or bool(self.pending_routings) or bool(self.open_conferences)

    @property
    def intervention(self) -> int:
        """What the open case follows: its open conferences' intervention (A before B: child
        protection takes precedence), else the one its pending routings call for; none when closed."""
        for source in (self.open_conferences, self.pending_routings):
            chosen = _strongest(source)
            if chosen:
                return chosen
        return types_pb2.INTERVENTION_UNSPECIFIED


def _strongest(interventions: Collection[int]) -> int:
    for intervention in (types_pb2.INTERVENTION_A, types_pb2.INTERVENTION_B):
        if intervention in interventions:
            return intervention
    return types_pb2.INTERVENTION_UNSPECIFIED


def case_change(status: str | None, facts: CaseFacts) -> str | None:
    """How the case changes: "opened" (a first opening: no event, the concern is the event),
    "reopened", "closed", or None."""
    if facts.open:
        if status is None:
            return "opened"
        return "reopened" if status == CASE_CLOSED else None
    return "closed" if status == CASE_OPEN else None
