"""Action plan rules, free of I/O."""

from __future__ import annotations

from collections.abc import Iterable

from csx.actionplans.v1 import actionplans_pb2 as pb
from csx.conferences.v1 import conferences_pb2 as conf_pb

# Once done or cancelled an action stays so; reopening work means agreeing a new action.
TERMINAL = frozenset({pb.ACTION_STATUS_DONE, pb.ACTION_STATUS_CANCELLED})


def needs_plan(outcome: int, action_count: int) -> bool:
    """A concluded conference yields a plan unless it decided on none or agreed no actions."""
    return outcome != conf_pb.CONFERENCE_OUTCOME_NO_PLAN and action_count > 0


# The plan each conference outcome makes.
PLAN_KIND = {
    conf_pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN: pb.PLAN_KIND_CHILD_PROTECTION,
    conf_pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN: pb.PLAN_KIND_CONTEXTUAL_SAFEGUARDING,
    conf_pb.CONFERENCE_OUTCOME_CONTEXT_PLAN: pb.PLAN_KIND_CONTEXT_SAFETY,
}


def can_move(current: int, target: int) -> bool:
    return current == target or current not in TERMINAL


def owner_agencies(actions: Iterable[pb.Action]) -> list[int]:
    return sorted({a.owner_agency for a in actions})


# Who may move an action on: its owning agency (the use case compares it with the action), or any
# agency the policy's `update_any_action` command permits (csx_safeguarding/policy/policy.yaml).
