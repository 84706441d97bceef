"""Action plan use cases. Each is a unit of work (csx_common.unit_of_work), its own or the
consumer's: state, outbox events, audit entries and idempotency key commit together, or none of
them do. The caller is given by the adapter; a use case never looks it up."""

from __future__ import annotations

import uuid
from datetime import UTC

from csx.actionplans.v1 import actionplans_pb2 as pb
from csx.actionplans.v1 import events_pb2 as events
from csx.conferences.v1 import conferences_pb2 as conf_pb
from csx.conferences.v1 import events_pb2 as conf_events
from csx_actionplans import domain
from csx_actionplans.conferences_client import ConferenceSource
from csx_actionplans.repository import ActionPlansRepository
from csx_common.datakeys import child_scope
from csx_common.errors import Aborted, FailedPrecondition, NotFound
from csx_common.identity import Principal
from csx_common.messaging.consumer import Apply
from csx_common.timestamps import ts
from csx_common.unit_of_work import Once, UnitOfWork, UnitsOfWork
from csx_safeguarding.disclosure import Discloser, DisclosureViews, Record, owned_elements
from csx_safeguarding.policy import AGENCY_BY_NAME, AGENCY_NAME, Involvement, PolicyEngine


class ConferenceNotConcluded(RuntimeError):
    """Conferences answered with a conference that is not (yet) concluded: retry later."""


# The commands of this service, each named in the policy's `commands` section (checked at start-up).
COMMANDS = ("update_any_action",)


class ActionPlansService:
    def __init__(
        self,
        units: UnitsOfWork,
        repo: ActionPlansRepository,
        conferences: ConferenceSource,
        discloser: Discloser,
        views: DisclosureViews,
        *,
        policy: PolicyEngine | None = None,
    ) -> None:
        """`policy`: the process's one policy (the runtime's, the discloser's); by default the
        shipped one. It decides who may run each command as it decides every read."""
        self._policy = policy if policy is not None else PolicyEngine.default()
        self._policy.require_commands(COMMANDS)
        self._units = units
        self._repo = repo
        self._conferences = conferences
        self._discloser = discloser
        self._views = views

    # Events -------------------------------------------------------------------------------
    async def prepare_plan(self, event: conf_events.ConferenceConcluded) -> Apply | None:
        """Before the inbox transaction: fetch the agreed actions from conferences (events are thin)
        and build the plan; no database lock is held during the call. Any raise (conferences down,
        deadline passed) leaves the message to be redelivered with backoff. A malformed event (an id
        that conferences would refuse on every attempt) never gets here: the route's check parks it."""
        if event.outcome == conf_pb.CONFERENCE_OUTCOME_NO_PLAN:
            return None  # the thin event already says there is nothing to fetch
        async with self._units.db.session() as session:
            if await self._repo.plan_id_for_conference(session, event.conference_id) is not None:
                return None  # already published, e.g. the event was republished under a new id
        conference = await self._conferences.get_conference(event.conference_id)
        if conference.status != conf_pb.CONFERENCE_STATUS_CONCLUDED:
            raise ConferenceNotConcluded("conference is not concluded")
        if not domain.needs_plan(conference.outcome, len(conference.actions)):
            if not event.transition_to_contextual_safeguarding:
                return None

            async def end_only(uow: UnitOfWork) -> None:
                """A move to B with no actions agreed (the contract requires some): the CP plan still ends."""
                await self._end_for_transition(uow, event, successor="")

            return end_only
        plan = pb.ActionPlan(
            plan_id=str(uuid.uuid4()),
            conference_id=conference.conference_id or event.conference_id,
            child_id=conference.child_id or event.child_id,
            kind=domain.PLAN_KIND.get(conference.outcome, pb.PLAN_KIND_UNSPECIFIED),
            status=pb.PLAN_STATUS_ACTIVE,
            actions=[
                pb.Action(
                    action_id=str(uuid.uuid4()),
                    owner_agency=agreed.owner_agency,
                    description=agreed.description,
                    due_on=agreed.due_on,
                    status=pb.ACTION_STATUS_OPEN,
                    version=1,
                )
                for agreed in conference.actions
            ],
        )

        async def publish(uow: UnitOfWork) -> None:
            """In the inbox's unit of work: store the plan and its event, once per conference; on a
            move to B, end the child protection plan in the same change (one event, one commit)."""
            if await self._repo.plan_id_for_conference(uow.tx, plan.conference_id) is not None:
                return
            plan.published_at.CopyFrom(ts(uow.now))
            if event.transition_to_contextual_safeguarding:
                await self._end_for_transition(uow, event, successor=plan.plan_id)
            await self._repo.add_plan(uow.tx, plan)
            await uow.publish(
                events.ActionPlanPublished(
                    plan_id=plan.plan_id,
                    conference_id=plan.conference_id,
                    child_id=plan.child_id,
                    owner_agencies=domain.owner_agencies(plan.actions),
                    action_count=len(plan.actions),
                    published_at=plan.published_at,
                    kind=plan.kind,
                ),
            )
            await self._notify_partners(uow, plan)

        return publish

    async def _end_for_transition(
        self, uow: UnitOfWork, event: conf_events.ConferenceConcluded, *, successor: str
    ) -> None:
        """The child protection plan ends when the review that moved the child to B concluded."""
        reason = pb.PLAN_END_REASON_TRANSITIONED_TO_CONTEXTUAL_SAFEGUARDING
        ended_at = event.concluded_at.ToDatetime(tzinfo=UTC) if event.HasField("concluded_at") else uow.now
        # Plans made before plans had kinds (UNSPECIFIED) are the child's earlier plans too.
        kinds = (pb.PLAN_KIND_CHILD_PROTECTION, pb.PLAN_KIND_UNSPECIFIED)
        for plan_id, kind in await self._repo.end_active_plans(
            uow.tx, event.child_id, kinds, reason, event.conference_id, ended_at
        ):
            await uow.publish(
                events.ActionPlanEnded(
                    plan_id=plan_id,
                    child_id=event.child_id,
                    kind=kind,
                    reason=reason,
                    ended_by_conference_id=event.conference_id,
                    ended_at=ts(ended_at),
                    successor_plan_id=successor,
                )
            )

    async def _notify_partners(self, uow: UnitOfWork, plan: pb.ActionPlan) -> None:
        """Each owning agency's portal hears of its own actions, where the policy lets it know the child."""
        by_agency: dict[int, list[pb.Action]] = {}
        for action in plan.actions:
            by_agency.setdefault(action.owner_agency, []).append(action)
        for agency, owned in sorted(by_agency.items()):
            allowed = await self._discloser.may_publish_to(
                uow.tx,
                agency,
                self._views,
                involvement=frozenset({Involvement.ACTION_OWNER}),
                record_type="action_plan",
                record_id=plan.plan_id,
                child_id=plan.child_id,
                at=uow.now,
            )
            if allowed:
                await uow.publish(
                    events.PartnerActionsAssigned(
                        plan_id=plan.plan_id,
                        child_id=plan.child_id,
                        agency=agency,
                        action_ids=[a.action_id for a in owned],
                        first_due_on=min(a.due_on for a in owned),
                        published_at=plan.published_at,
                    ),
                    agency=AGENCY_NAME[agency],
                )

    # Queries ------------------------------------------------------------------------------
    async def get_action_plan(self, caller: Principal | None, plan_id: str) -> tuple[pb.ActionPlan, tuple[str, ...]]:
        """The plan as the caller may see it, and what was cleared; NOT_FOUND without a basis."""

        # A unit of work, not a plain read: the audit entries commit with it or the read fails.
        async def work(uow: UnitOfWork) -> tuple[pb.ActionPlan | None, tuple[str, ...]]:
            plan = await self._repo.get_plan(uow.tx, plan_id)
            if plan is None:
                raise NotFound("action plan not found")
            [disclosed] = await self._disclose(uow, [plan])
            return disclosed

        shown, redacted = await self._units.run(work, caller=caller)
        if shown is None:  # raised after the commit, so the audited refusal stays
            raise NotFound("action plan not found")
        return shown, redacted

    async def list_action_plans(
        self, caller: Principal | None, *, child_id: str = "", conference_id: str = ""
    ) -> tuple[list[pb.ActionPlan], list[str]]:
        async def work(uow: UnitOfWork) -> list[tuple[pb.ActionPlan | None, tuple[str, ...]]]:
            plans = await self._repo.list_plans(uow.tx, child_id=child_id, conference_id=conference_id)
            return await self._disclose(uow, plans)

        disclosed = await self._units.run(work, caller=caller)
        shown = [plan for plan, _ in disclosed if plan is not None]
        redacted = [f"plans[{i}].{path}" for i, (_, paths) in enumerate(d for d in disclosed if d[0]) for path in paths]
        return shown, redacted

    async def _disclose(
        self, uow: UnitOfWork, plans: list[pb.ActionPlan]
    ) -> list[tuple[pb.ActionPlan | None, tuple[str, ...]]]:
        """Each plan through the policy: an agency owning an action in it has a basis for its child."""
        user = uow.caller
        agency = AGENCY_BY_NAME.get(user.agency) if user else None
        records = [
            Record(
                plan,
                plan.plan_id,
                plan.child_id,
                frozenset({Involvement.ACTION_OWNER})
                if agency in {a.owner_agency for a in plan.actions}
                else frozenset(),
                # An agency reads its own actions in full; others' only as the policy allows.
                own=owned_elements("actions", [a.owner_agency for a in plan.actions], agency),
            )
            for plan in plans
        ]
        return await self._discloser.disclose_records(  # type: ignore[return-value]
            uow.tx, user, records, self._views, record_type="action_plan", at=uow.now
        )

    # Commands -----------------------------------------------------------------------------
    def _may_update(self, caller: Principal | None, owner_agency: int) -> bool:
        """The owning agency moves its action on: comparing the caller's agency with the action's
        owner is a fact of the record, so it stays here. Moving on ANY action (social care, who leads
        the plan; no user only in INSECURE_DEV) is a permission about the caller: the policy's."""
        if caller is not None and AGENCY_BY_NAME.get(caller.agency) == owner_agency:
            return True
        return self._policy.permits_caller("update_any_action", caller).allowed

    async def update_action(self, caller: Principal | None, request: pb.UpdateActionRequest) -> pb.UpdateActionResponse:
        """The owning agency (or social care, who leads the plan) moves its action on; anyone else
        is told the action does not exist, before anything else is looked at."""
        async with self._units.db.session() as session:
            found = await self._repo.get_action(session, request.plan_id, request.action_id)
        if found is None or not self._may_update(caller, found[0].owner_agency):
            raise NotFound("action not found in that plan")

        async def work(uow: UnitOfWork) -> pb.UpdateActionResponse:
            found = await self._repo.get_action(uow.tx, request.plan_id, request.action_id)
            if found is None:
                raise NotFound("action not found in that plan")
            action, child_id = found
            # The answer holds the action's description: remembered under the child's key, it is
            # erased with the child.
            uow.seals_under(child_scope(child_id))
            if action.version != request.expected_version:
                raise Aborted("action changed since it was read; read it again")
            if not domain.can_move(action.status, request.status):
                raise FailedPrecondition(
                    "a done or cancelled action cannot change status",
                    subject=f"actions/{request.action_id}",
                    reason="ACTION_CLOSED",
                )
            if action.status != request.status:  # same status: nothing changes, no event
                if not await self._repo.update_status(
                    uow.tx, action.action_id, request.status, request.expected_version, uow.now
                ):
                    raise Aborted("action changed concurrently; read it again")
                action.status = request.status
                action.version += 1
                await uow.publish(
                    events.ActionUpdated(
                        plan_id=request.plan_id,
                        action_id=action.action_id,
                        owner_agency=action.owner_agency,
                        status=action.status,
                        version=action.version,
                        updated_at=ts(uow.now),
                    ),
                )
            return pb.UpdateActionResponse(action=action)

        return await self._units.run(
            work,
            caller=caller,
            once=Once(
                f"update_action:{request.action_id}:{caller.user_id if caller else ''}",
                request.idempotency_key,
                request,
                pb.UpdateActionResponse,
            ),
        )
