"""Conference rules, free of I/O: which conference a routing decision calls for, when it is due,
and which outcomes each kind of conference may reach."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from csx.conferences.v1 import conferences_pb2 as pb
from csx.types.v1 import types_pb2
from csx_common.errors import FailedPrecondition
from csx_safeguarding.calendar import add_working_days

# Working Together to Safeguard Children 2023 (WT23): the initial child protection conference is
# held within 15 working days of the strategy discussion that started the section 47 enquiry.
INITIAL_CPC_WORKING_DAYS = 15
INITIAL_CPC_RULE = "WT23: initial child protection conference within 15 working days of the strategy discussion"

# The pilot's procedure for intervention B: the summary and plan go to the family within
# 2 working days of the review meeting.
FAMILY_SUMMARY_WORKING_DAYS = 2

# Which outcomes each conference may reach. Only an (initial or review) child protection
# conference can make a child protection plan (WT23); B and C make their own kinds of plan.
ALLOWED_OUTCOMES: dict[int, frozenset[int]] = {
    pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION: frozenset(
        {pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN, pb.CONFERENCE_OUTCOME_NO_PLAN}
    ),
    pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW: frozenset(
        {pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN, pb.CONFERENCE_OUTCOME_NO_PLAN}
    ),
    pb.CONFERENCE_KIND_CONTEXT: frozenset({pb.CONFERENCE_OUTCOME_CONTEXT_PLAN, pb.CONFERENCE_OUTCOME_NO_PLAN}),
}


@dataclass(frozen=True, slots=True)
class Schedule:
    kind: int
    due_on: date
    # Names the rule that set due_on, so a chair can see why a date was chosen.
    rule: str


def contextual_review_rule(working_days: int) -> str:
    return f"Local standard: contextual safeguarding review within {working_days} working days of routing"


def schedule_for_routing(
    intervention: int,
    *,
    strategy_discussion_on: str,
    routed_on: date,
    contextual_review_working_days: int,
) -> Schedule:
    """The conference a routed referral calls for. Raises ValueError for an event that breaks the
    referrals contract (only A and B are routed; A always carries its strategy discussion date),
    so the consumer parks it as a dead letter rather than inventing a date."""
    if intervention == types_pb2.INTERVENTION_A:
        if not strategy_discussion_on:
            raise ValueError("intervention A routed without a strategy discussion date")
        start = date.fromisoformat(strategy_discussion_on)
        return Schedule(
            pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION,
            add_working_days(start, INITIAL_CPC_WORKING_DAYS),
            INITIAL_CPC_RULE,
        )
    if intervention == types_pb2.INTERVENTION_B:
        return Schedule(
            pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW,
            add_working_days(routed_on, contextual_review_working_days),
            contextual_review_rule(contextual_review_working_days),
        )
    raise ValueError(f"intervention {intervention} is not scheduled from a referral")


def family_summary_due_on(kind: int, concluded_on: date) -> date | None:
    """B only (pilot procedure): the family has the summary and plan 2 working days after the meeting."""
    if kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW:
        return add_working_days(concluded_on, FAMILY_SUMMARY_WORKING_DAYS)
    return None


def check_outcome(kind: int, outcome: int) -> None:
    if outcome not in ALLOWED_OUTCOMES.get(kind, frozenset()):
        raise FailedPrecondition(
            f"outcome {pb.ConferenceOutcome.Name(outcome)} is not allowed for {pb.ConferenceKind.Name(kind)}",
            subject="outcome",
            reason="OUTCOME_NOT_ALLOWED_FOR_KIND",
        )


# Who concludes a conference (social care's chair, or the allocated social worker or MASH manager
# recording the chair's decision) is the policy's `conclude_conference` command
# (csx_safeguarding/policy/policy.yaml).
