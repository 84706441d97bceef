"""Referral rules, free of I/O."""

from __future__ import annotations

import hashlib
import unicodedata
from datetime import date, datetime, timedelta

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
