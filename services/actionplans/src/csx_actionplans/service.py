"""Action plan use cases. Each owns its transaction (or runs in the consumer's): state, outbox
event and idempotency key commit together, and the relay is woken after the commit."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from csx.actionplans.v1 import actionplans_pb2 as pb
from csx.actionplans.v1 import events_pb2 as events
from csx.conferences.v1 import conferences_pb2 as conf_pb
from csx.conferences.v1 import events_pb2 as conf_events
from csx_actionplans import domain
from csx_actionplans.conferences_client import ConferenceSource
from csx_actionplans.repository import ActionPlansRepository
from csx_common.db import Database, Tx
from csx_common.disclosure import Discloser, DisclosureViews, Record, owned_elements
from csx_common.errors import Aborted, FailedPrecondition, NotFound
from csx_common.idempotency import IdempotencyKeys
from csx_common.identity import current_user
from csx_common.messaging.consumer import Apply
from csx_common.messaging.events import StreamSpec
from csx_common.messaging.outbox import Outbox
from csx_common.policy import AGENCY_BY_NAME, AGENCY_NAME, Involvement
from csx_common.timestamps import ts
from csx_common.validation import validate_event


class ConferenceNotConcluded(RuntimeError):
    """Conferences answered with a conference that is not (yet) concluded: retry later."""


def check_concluded(event: conf_events.ConferenceConcluded) -> None:
    """A malformed event is parked at once (InvalidArgument), not retried against conferences: an
    id that is not a UUID would be refused there (INVALID_ARGUMENT) on every attempt. (The outcome
    may be unspecified: conferences has the last word on it.)"""
    validate_event(event, uuids=("conference_id", "child_id"))


class ActionPlansService:
    def __init__(
        self,
        db: Database,
        repo: ActionPlansRepository,
        outbox: Outbox,
        idempotency: IdempotencyKeys,
        stream: StreamSpec,
        conferences: ConferenceSource,
        discloser: Discloser,
        views: DisclosureViews,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._repo = repo
        self._outbox = outbox
        self._idem = idempotency
        self._stream = stream
        self._conferences = conferences
        self._discloser = discloser
        self._views = views
        self._clock = clock

    # Events -------------------------------------------------------------------------------
    async def prepare_plan(self, event: conf_events.ConferenceConcluded) -> Apply | None:
        """Before the inbox transaction: fetch the agreed actions from conferences (events are thin)
        and build the plan; no database lock is held during the call. Any raise (conferences down,
        deadline passed) leaves the message to be redelivered with backoff."""
        check_concluded(event)
        if event.outcome == conf_pb.CONFERENCE_OUTCOME_NO_PLAN:
            return None  # the thin event already says there is nothing to fetch
        async with self._db.session() as session:
            if await self._repo.plan_id_for_conference(session, event.conference_id) is not None:
                return None  # already published, e.g. the event was republished under a new id
        conference = await self._conferences.get_conference(event.conference_id)
        if conference.status != conf_pb.CONFERENCE_STATUS_CONCLUDED:
            raise ConferenceNotConcluded("conference is not concluded")
        if not domain.needs_plan(conference.outcome, len(conference.actions)):
            return None
        now = ts(self._clock())
        plan = pb.ActionPlan(
            plan_id=str(uuid.uuid4()),
            conference_id=conference.conference_id or event.conference_id,
            child_id=conference.child_id or event.child_id,
            published_at=now,
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

        async def publish(session: Tx) -> None:
            """In the inbox transaction: store the plan and its event, once per conference."""
            if await self._repo.plan_id_for_conference(session, plan.conference_id) is not None:
                return
            await self._repo.add_plan(session, plan)
            await self._outbox.add(
                session,
                self._stream.subject("action_plan_published"),
                events.ActionPlanPublished(
                    plan_id=plan.plan_id,
                    conference_id=plan.conference_id,
                    child_id=plan.child_id,
                    owner_agencies=domain.owner_agencies(plan.actions),
                    action_count=len(plan.actions),
                    published_at=now,
                ),
            )
            await self._notify_partners(session, plan, now)

        return publish

    async def _notify_partners(self, session: Tx, plan: pb.ActionPlan, now: timestamp_pb2.Timestamp) -> None:
        """Each owning agency's portal hears of its own actions, where the policy lets it know the child."""
        by_agency: dict[int, list[pb.Action]] = {}
        for action in plan.actions:
            by_agency.setdefault(action.owner_agency, []).append(action)
        for agency, owned in sorted(by_agency.items()):
            allowed = await self._discloser.may_publish_to(
                session,
                agency,
                self._views,
                involvement=frozenset({Involvement.ACTION_OWNER}),
                record_type="action_plan",
                record_id=plan.plan_id,
                child_id=plan.child_id,
                at=self._clock(),
            )
            if allowed:
                await self._outbox.add(
                    session,
                    self._stream.subject(f"partner.{AGENCY_NAME[agency]}.action_assigned"),
                    events.PartnerActionsAssigned(
                        plan_id=plan.plan_id,
                        child_id=plan.child_id,
                        agency=agency,
                        action_ids=[a.action_id for a in owned],
                        first_due_on=min(a.due_on for a in owned),
                        published_at=now,
                    ),
                )

    # Queries ------------------------------------------------------------------------------
    async def get_action_plan(self, plan_id: str) -> tuple[pb.ActionPlan, tuple[str, ...]]:
        """The plan as the caller may see it, and what was cleared; NOT_FOUND without a basis."""
        async with self._db.transaction() as session:  # the audit commits with the read
            plan = await self._repo.get_plan(session, plan_id)
            if plan is None:
                raise NotFound("action plan not found")
            [(shown, redacted)] = await self._disclose(session, [plan])
        if shown is None:
            raise NotFound("action plan not found")
        return shown, redacted

    async def list_action_plans(
        self, *, child_id: str = "", conference_id: str = ""
    ) -> tuple[list[pb.ActionPlan], list[str]]:
        async with self._db.transaction() as session:
            plans = await self._repo.list_plans(session, child_id=child_id, conference_id=conference_id)
            disclosed = await self._disclose(session, plans)
        shown = [plan for plan, _ in disclosed if plan is not None]
        redacted = [f"plans[{i}].{path}" for i, (_, paths) in enumerate(d for d in disclosed if d[0]) for path in paths]
        return shown, redacted

    async def _disclose(
        self, session: Tx, plans: list[pb.ActionPlan]
    ) -> list[tuple[pb.ActionPlan | None, tuple[str, ...]]]:
        """Each plan through the policy: an agency owning an action in it has a basis for its child."""
        user = current_user()
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
            session, user, records, self._views, record_type="action_plan", at=self._clock()
        )

    # Commands -----------------------------------------------------------------------------
    async def update_action(self, request: pb.UpdateActionRequest) -> pb.UpdateActionResponse:
        """The owning agency (or social care, who leads the plan) moves its action on; anyone else
        is told the action does not exist, before anything else is looked at."""
        user = current_user()
        async with self._db.session() as session:
            action = await self._repo.get_action(session, request.plan_id, request.action_id)
        if action is None or not domain.may_update(user.agency if user else None, action.owner_agency):
            raise NotFound("action not found in that plan")
        done: list[pb.Action] = []

        async def work(session: Tx) -> pb.UpdateActionResponse:
            action = await self._repo.get_action(session, request.plan_id, request.action_id)
            if action is None:
                raise NotFound("action not found in that plan")
            if action.version != request.expected_version:
                raise Aborted("action changed since it was read; read it again")
            if not domain.can_move(action.status, request.status):
                raise FailedPrecondition(
                    "a done or cancelled action cannot change status",
                    subject=f"actions/{request.action_id}",
                    reason="ACTION_CLOSED",
                )
            if action.status != request.status:  # same status: nothing changes, no event
                now = self._clock()
                if not await self._repo.update_status(
                    session, action.action_id, request.status, request.expected_version, now
                ):
                    raise Aborted("action changed concurrently; read it again")
                action.status = request.status
                action.version += 1
                await self._outbox.add(
                    session,
                    self._stream.subject("action_updated"),
                    events.ActionUpdated(
                        plan_id=request.plan_id,
                        action_id=action.action_id,
                        owner_agency=action.owner_agency,
                        status=action.status,
                        version=action.version,
                        updated_at=ts(now),
                    ),
                )
            done.append(action)
            # The idempotency table stores this response in clear: keep sealed fields out of it.
            return pb.UpdateActionResponse(action=self._repo.operational(action))

        response, fresh = await self._idem.run_once(
            self._db,
            f"update_action:{request.action_id}:{user.user_id if user else ''}",
            request.idempotency_key,
            request,
            pb.UpdateActionResponse,
            work,
        )
        if fresh:
            return pb.UpdateActionResponse(action=done[-1])
        # A replay: the first answer, with its sealed fields restored from the (immutable) row.
        async with self._db.session() as session:
            current = await self._repo.get_action(session, request.plan_id, request.action_id)
        if current is not None:
            self._repo.restore_sealed(response.action, current)
        return response
