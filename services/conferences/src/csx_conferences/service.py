"""Conference use cases. Each is a unit of work (csx_common.unit_of_work), or runs in the inbox
consumer's: its state, outbox event, audit entries and idempotency key commit together, or none of
them do. The caller is given by the adapter; a use case never looks it up."""

from __future__ import annotations

import uuid
from datetime import UTC

from google.protobuf import message as pb_message

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.referrals.v1 import events_pb2 as referral_events
from csx_common.datakeys import child_scope
from csx_common.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied
from csx_common.identity import Principal
from csx_common.messaging.consumer import PoisonEvent
from csx_common.timestamps import ts
from csx_common.unit_of_work import Once, UnitOfWork, UnitsOfWork
from csx_conferences import domain
from csx_conferences.repository import ConferencesRepository
from csx_safeguarding.calendar import london_date
from csx_safeguarding.disclosure import Discloser, DisclosureViews, Record, owned_elements, requester
from csx_safeguarding.policy import AGENCY_BY_NAME, Involvement, PolicyEngine

# The commands of this service, each named in the policy's `commands` section (checked at start-up).
COMMANDS = ("conclude_conference",)


class ConferencesService:
    def __init__(
        self,
        units: UnitsOfWork,
        repo: ConferencesRepository,
        discloser: Discloser,
        views: DisclosureViews,
        *,
        contextual_review_working_days: int,
        policy: PolicyEngine | None = None,
    ) -> None:
        """`policy`: the process's one policy (the runtime's, the discloser's); by default the
        shipped one. It decides who may run each command as it decides every read."""
        self._policy = policy if policy is not None else PolicyEngine.default()
        self._policy.require_commands(COMMANDS)
        self._units = units
        self._discloser = discloser
        self._views = views
        self._repo = repo
        self._review_days = contextual_review_working_days

    async def schedule_from_routing(self, uow: UnitOfWork, event: referral_events.ReferralRouted) -> bool:
        """Runs in the inbox consumer's unit of work. False if the referral already has its
        conference (the same routing announced twice under different message ids)."""
        if await self._repo.exists_for_referral(uow.tx, event.referral_id):
            return False
        try:
            schedule = domain.schedule_for_routing(
                event.intervention,
                strategy_discussion_on=event.strategy_discussion_on,
                routed_on=london_date(event.routed_at.ToDatetime(tzinfo=UTC)),
                contextual_review_working_days=self._review_days,
            )
        except ValueError as exc:
            # A routing the contract does not allow will never schedule: park it, do not retry.
            raise PoisonEvent(str(exc)) from exc
        conference = pb.Conference(
            conference_id=str(uuid.uuid4()),
            kind=schedule.kind,
            status=pb.CONFERENCE_STATUS_SCHEDULED,
            child_id=event.child_id,
            referral_id=event.referral_id,
            due_on=schedule.due_on.isoformat(),
            due_rule=schedule.rule,
            scheduled_at=ts(uow.now),
            version=1,
            invited_agencies=sorted(set(event.referring_agencies)),
        )
        await self._repo.add(uow.tx, conference)
        await uow.publish(
            events.ConferenceScheduled(
                conference_id=conference.conference_id,
                child_id=conference.child_id,
                referral_id=conference.referral_id,
                kind=conference.kind,
                due_on=conference.due_on,
                scheduled_at=conference.scheduled_at,
            ),
        )
        return True

    async def get_conference(
        self, caller: Principal | None, conference_id: str
    ) -> tuple[pb.Conference, tuple[str, ...]]:
        """The conference as the caller may see it, and what was cleared; NOT_FOUND without a basis."""

        # A unit of work, not a plain read: the audit entries commit with it or the read fails.
        async def work(uow: UnitOfWork) -> tuple[pb_message.Message, tuple[str, ...]] | None:
            conference = await self._repo.get(uow.tx, conference_id)
            if conference is None:
                raise NotFound("conference not found")
            [(shown, redacted)] = await self._disclose(uow, [conference])
            return None if shown is None else (shown, redacted)

        disclosed = await self._units.run(work, caller=caller)
        if disclosed is None:  # raised after the commit, so the audited refusal stays
            raise NotFound("conference not found")
        return disclosed  # type: ignore[return-value]

    async def list_conferences(self, caller: Principal | None, child_id: str) -> tuple[list[pb.Conference], list[str]]:
        async def work(uow: UnitOfWork) -> list[tuple[pb_message.Message | None, tuple[str, ...]]]:
            return await self._disclose(uow, await self._repo.list_for_child(uow.tx, child_id))

        disclosed = await self._units.run(work, caller=caller)
        shown = [(c, paths) for c, paths in disclosed if c is not None]
        redacted = [f"conferences[{i}].{path}" for i, (_, paths) in enumerate(shown) for path in paths]
        return [c for c, _ in shown], redacted  # type: ignore[misc]

    async def _disclose(
        self, uow: UnitOfWork, conferences: list[pb.Conference]
    ) -> list[tuple[pb_message.Message | None, tuple[str, ...]]]:
        """Each conference through the policy: an agency invited to it (the referring agencies), or
        given an action at it, attends it."""
        user = uow.caller
        agency = AGENCY_BY_NAME.get(user.agency) if user else None
        records = [
            Record(
                c,
                c.conference_id,
                c.child_id,
                frozenset({Involvement.CONFERENCE_ATTENDEE})
                if agency in {*c.invited_agencies, *(a.owner_agency for a in c.actions)}
                else frozenset(),
                own=owned_elements("actions", [a.owner_agency for a in c.actions], agency),
            )
            for c in conferences
        ]
        return await self._discloser.disclose_records(
            uow.tx, user, records, self._views, record_type="conference", at=uow.now
        )

    async def conclude_conference(
        self, caller: Principal | None, request: pb.ConcludeConferenceRequest
    ) -> pb.ConcludeConferenceResponse:
        if not self._policy.permits_caller("conclude_conference", caller).allowed:
            raise PermissionDenied("only social care's chair concludes a conference", reason="CHAIR_ONLY")
        if caller is not None:
            # The answer is read back through the policy, which refuses a token with an unknown
            # purpose: refuse it before anything is written, not after the conclusion committed.
            requester(caller)

        async def work(uow: UnitOfWork) -> pb.ConcludeConferenceResponse:
            conference = await self._repo.get(uow.tx, request.conference_id)
            if conference is None:
                raise NotFound("conference not found")
            uow.seals_under(child_scope(conference.child_id))
            if conference.status == pb.CONFERENCE_STATUS_CONCLUDED:
                raise FailedPrecondition(
                    "conference is already concluded",
                    subject=f"conferences/{request.conference_id}",
                    reason="CONFERENCE_ALREADY_CONCLUDED",
                )
            domain.check_outcome(conference.kind, request.outcome)
            if conference.version != request.expected_version:
                raise Aborted("conference changed since it was read; read it again")
            now = uow.now
            conference.status = pb.CONFERENCE_STATUS_CONCLUDED
            conference.outcome = request.outcome
            conference.summary = request.summary
            conference.actions.extend(request.actions)
            conference.chair = request.chair
            conference.concluded_at.CopyFrom(ts(now))
            family_due = domain.family_summary_due_on(conference.kind, london_date(now))
            conference.family_summary_due_on = family_due.isoformat() if family_due else ""
            conference.version = request.expected_version + 1
            if not await self._repo.update(uow.tx, conference, request.expected_version):
                raise Aborted("conference changed since it was read; read it again")
            await uow.publish(
                events.ConferenceConcluded(
                    conference_id=conference.conference_id,
                    child_id=conference.child_id,
                    kind=conference.kind,
                    outcome=conference.outcome,
                    action_count=len(conference.actions),
                    concluded_at=conference.concluded_at,
                ),
            )
            # The key remembers a receipt only: the answer is read back below, through the policy
            # for this caller.
            return pb.ConcludeConferenceResponse(
                conference=pb.Conference(conference_id=conference.conference_id, version=conference.version)
            )

        receipt = await self._units.run(
            work,
            caller=caller,
            once=Once(
                f"conclude:{request.conference_id}", request.idempotency_key, request, pb.ConcludeConferenceResponse
            ),
        )
        # A concluded conference never changes again, so a retry reads the same answer.
        conference, _redacted = await self.get_conference(caller, receipt.conference.conference_id)
        return pb.ConcludeConferenceResponse(conference=conference)
