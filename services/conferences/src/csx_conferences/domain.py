"""Conference rules, free of I/O: which conference a routing decision calls for, when it is due,
which outcomes each kind of conference may reach, who may chair it and when a meeting is quorate
(docs/conferences.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from csx.conferences.v1 import conferences_pb2 as pb
from csx.types.v1 import types_pb2
from csx_common.errors import FailedPrecondition
from csx_safeguarding.calendar import add_months, add_working_days, working_day_on_or_before

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
    # A review continues the plan (CHILD_PROTECTION_PLAN), ends it (NO_PLAN), or ends it and starts
    # B when the family accepted the offer (CONTEXTUAL_SAFEGUARDING_PLAN, see check_transition).
    pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW: frozenset(
        {
            pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN,
            pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
            pb.CONFERENCE_OUTCOME_NO_PLAN,
        }
    ),
}

# A's conferences: the initial child protection conference and its reviews.
CHILD_PROTECTION_KINDS = frozenset(
    {pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION, pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW}
)

# Reviews, while the plan lasts. WT23: the first review conference within 3 months of the initial
# conference, later ones at most 6 months apart. B (the pilot): at the interval the chair sets,
# by default every 3 months.
CP_FIRST_REVIEW_MONTHS = 3
CP_LATER_REVIEW_MONTHS = 6
B_REVIEW_MONTHS = 3
B_LONGEST_REVIEW_MONTHS = 12


def next_review(kind: int, outcome: int, meeting_day: date, months: int = 0) -> Schedule | None:
    """The review a conclusion schedules (None when no plan continues): its kind, its due date (a
    working day on or before `months` calendar months after the meeting's day; 0: the default)
    and the rule. FailedPrecondition REVIEW_INTERVAL_TOO_LONG beyond what the rule allows."""
    if outcome == pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN and kind in CHILD_PROTECTION_KINDS:
        if kind == pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION:
            longest = default = CP_FIRST_REVIEW_MONTHS
            rule = "WT23: first review conference within 3 months of the initial conference"
        else:
            longest = default = CP_LATER_REVIEW_MONTHS
            rule = "WT23: review conferences at most 6 months apart"
        next_kind = pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW
    elif outcome == pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN:
        # B's reviews, and the first one after a child protection review moved the child to B.
        longest, default, next_kind = B_LONGEST_REVIEW_MONTHS, B_REVIEW_MONTHS, pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
        rule = f"Pilot: contextual safeguarding review every {months or B_REVIEW_MONTHS} months while the plan lasts"
    else:
        return None
    if months > longest:
        raise FailedPrecondition(
            f"the next review is due within {longest} months",
            subject="next_review_months",
            reason="REVIEW_INTERVAL_TOO_LONG",
        )
    due = working_day_on_or_before(add_months(meeting_day, months or default))
    return Schedule(next_kind, due, rule)


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


def family_summary_due_on(kind: int, meeting_day: date) -> date | None:
    """B only (pilot procedure): the family has the summary and plan 2 working days after the
    meeting's day (the day it was held, not the day its outcome was written)."""
    if kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW:
        return add_working_days(meeting_day, FAMILY_SUMMARY_WORKING_DAYS)
    return None


def check_outcome(kind: int, outcome: int) -> None:
    if outcome not in ALLOWED_OUTCOMES.get(kind, frozenset()):
        raise FailedPrecondition(
            f"outcome {pb.ConferenceOutcome.Name(outcome)} is not allowed for {pb.ConferenceKind.Name(kind)}",
            subject="outcome",
            reason="OUTCOME_NOT_ALLOWED_FOR_KIND",
        )


def check_transition(conference: pb.Conference, outcome: int) -> None:
    """CP plan -> B: only a child protection review makes the move (the initial conference may not
    reach B's outcome at all, check_outcome), and only once the family accepted the offer."""
    accepted = any(o.answer == pb.TRANSITION_ANSWER_ACCEPTED for o in conference.transition_offers)
    if is_transition(conference.kind, outcome) and not accepted:
        raise FailedPrecondition(
            "the move to B needs the family's acceptance of the offer, recorded before the review concludes",
            subject=f"conferences/{conference.conference_id}",
            reason="TRANSITION_NOT_ACCEPTED",
        )


def is_transition(kind: int, outcome: int) -> bool:
    return kind == pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW and outcome == (
        pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    )


# B's criteria (the pilot's procedure): extra-familial harm, no significant harm within the family,
# and a child under 10 only with the chair's reason.
B_YOUNGEST_WITHOUT_REASON = 10
INTRA_FAMILIAL_GROUNDS = frozenset(
    {
        types_pb2.HARM_TYPE_NEGLECT,
        types_pb2.HARM_TYPE_PHYSICAL_ABUSE,
        types_pb2.HARM_TYPE_EMOTIONAL_ABUSE,
        types_pb2.HARM_TYPE_SEXUAL_ABUSE,
    }
)


# Where B's criteria are recorded: a B review, and a child protection review that may move the
# child to B (the move makes a B plan, so the same criteria hold).
ELIGIBILITY_KINDS = frozenset({pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW})

# Bounds on what one conference record holds (it is one sealed record, read whole).
MAX_NETWORK_MEETINGS = 50
MAX_TRANSITION_OFFERS = 10
# The whole record, as sent: well within the 1 MiB a message may carry (CSX_*_MAX_MESSAGE_BYTES).
MAX_RECORD_BYTES = 512 * 1024


def eligibility_refusal(conference: pb.Conference) -> str | None:
    """Why this conference may not make a B plan for the child (a reason code), or None. An under-10
    reason counts only if this conference's assigned chair recorded it."""
    if not conference.HasField("eligibility"):
        return "ELIGIBILITY_NOT_RECORDED"
    eligibility = conference.eligibility
    if eligibility.significant_intra_familial_harm:
        return "SIGNIFICANT_INTRA_FAMILIAL_HARM"
    chairs_reason = eligibility.under_ten_reason and eligibility.under_ten_reason_by == conference.chair
    if eligibility.age_years < B_YOUNGEST_WITHOUT_REASON and not chairs_reason:
        return "UNDER_TEN_REASON_REQUIRED"
    return None


ELIGIBILITY_REFUSALS = {
    "ELIGIBILITY_NOT_RECORDED": "record the child's eligibility for B before the review makes a plan",
    "SIGNIFICANT_INTRA_FAMILIAL_HARM": "significant harm within the family: the child's case belongs in A",
    "UNDER_TEN_REASON_REQUIRED": "a child under 10 needs the chair's recorded reason for B",
}


# Who may call each command is the policy's (csx_safeguarding/policy/policy.yaml, `commands`); which
# chair may chair which conference, and what makes a meeting quorate, is below.

# The lead chair chairs every B and C meeting in the lead-chair period (the pilot's procedure).
LEAD_CHAIRED_KINDS = frozenset({pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW, pb.CONFERENCE_KIND_CONTEXT})


@dataclass(frozen=True, slots=True)
class ChairRecord:
    """A chair as the rules see one (from the register's Chair message)."""

    user_id: str
    trained_on: date | None
    manages_teams: frozenset[str]
    lead_from: date | None
    lead_until: date | None

    @classmethod
    def of(cls, chair: pb.Chair) -> ChairRecord:
        def day(text: str) -> date | None:
            return date.fromisoformat(text) if text else None

        return cls(
            chair.user_id,
            day(chair.trained_on),
            frozenset(chair.manages_teams),
            day(chair.lead_from),
            day(chair.lead_until),
        )

    def leads_on(self, day: date) -> bool:
        return self.lead_from is not None and self.lead_until is not None and self.lead_from <= day <= self.lead_until


def chair_refusal(
    chair: ChairRecord | None, *, kind: int, managing_team: str, meeting_day: date, register: Sequence[ChairRecord]
) -> str | None:
    """Why `chair` may not chair this meeting (a reason code), or None. In order: the chair is in the
    register; trained in contextual safeguarding by the meeting's day; independent of the case (does
    not manage the team managing it); and, for B and C, the lead chair when a lead-chair period
    covers the meeting's day."""
    if chair is None:
        return "CHAIR_NOT_REGISTERED"
    if chair.trained_on is None or chair.trained_on > meeting_day:
        return "CHAIR_NOT_TRAINED"
    if managing_team in chair.manages_teams:
        return "CHAIR_NOT_INDEPENDENT"
    if kind in LEAD_CHAIRED_KINDS:
        leads = {c.user_id for c in register if c.leads_on(meeting_day)}
        if leads and chair.user_id not in leads:
            return "LEAD_CHAIR_REQUIRED"
    return None


CHAIR_REFUSALS = {
    "CHAIR_NOT_REGISTERED": "the chair is not in the chair register",
    "CHAIR_NOT_TRAINED": "the chair is not trained in contextual safeguarding by the meeting's day",
    "CHAIR_NOT_INDEPENDENT": "the chair manages the team managing this case",
    "LEAD_CHAIR_REQUIRED": "B and C meetings in the lead-chair period are chaired by the lead chair",
}

# London Safeguarding Children Procedures: children's social care and at least two other agencies
# that have had direct contact with the child (the number is configurable).
QUORUM_OTHER_AGENCIES = 2


def quorate(attendance: Sequence[pb.Attendance], other_agencies: int = QUORUM_OTHER_AGENCIES) -> bool:
    agencies = {a.agency for a in attendance}
    others = {a.agency for a in attendance if a.direct_contact and a.agency != types_pb2.AGENCY_SOCIAL_CARE}
    return types_pb2.AGENCY_SOCIAL_CARE in agencies and len(others) >= other_agencies
