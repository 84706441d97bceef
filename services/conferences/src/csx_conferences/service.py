"""Conference use cases. Each is a unit of work (csx_common.unit_of_work), or runs in the inbox
consumer's: its state, outbox event, audit entries and idempotency key commit together, or none of
them do. The caller is given by the adapter; a use case never looks it up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date

from google.protobuf import message as pb_message

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.panel.v1 import panel_pb2
from csx.referrals.v1 import events_pb2 as referral_events
from csx.types.v1 import types_pb2
from csx_common.crypto import KeyDestroyedError
from csx_common.datakeys import SERVICE_SCOPE, child_scope
from csx_common.db import advisory_lock
from csx_common.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument, NotFound, PermissionDenied
from csx_common.identity import Principal, actor_id
from csx_common.messaging.consumer import PoisonEvent
from csx_common.timestamps import ts
from csx_common.unit_of_work import Once, UnitOfWork, UnitsOfWork
from csx_conferences import domain
from csx_conferences.panel_client import PanelSource
from csx_conferences.repository import ConferencesRepository
from csx_safeguarding.calendar import london_date
from csx_safeguarding.disclosure import Discloser, DisclosureViews, Record, owned_elements, requester
from csx_safeguarding.policy import AGENCY_BY_NAME, Involvement, PolicyEngine

# The commands of this service, each named in the policy's `commands` section (checked at start-up),
# with the reason a refusal gives.
COMMANDS = {
    "manage_conference": ("only social care arranges and manages conferences", "SOCIAL_CARE_ONLY"),
    "chair_conference": ("only a chair records a conference's meeting and concludes it", "CHAIR_ONLY"),
    "manage_chairs": ("only social care's managers keep the chair register", "SOCIAL_CARE_MANAGER_ONLY"),
    "contribute_to_conference": ("only a practitioner contributes to a conference", "PRACTITIONER_ONLY"),
}
# A change to a conference, in its unit of work: checks the rules, alters the conference in place
# and returns the events to publish once it is written.
Change = Callable[[UnitOfWork, pb.Conference], Awaitable[list[pb_message.Message]]]


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
        quorum_other_agencies: int = domain.QUORUM_OTHER_AGENCIES,
        panel: PanelSource | None = None,
    ) -> None:
        """`policy`: the process's one policy (the runtime's, the discloser's); by default the
        shipped one. It decides who may run each command as it decides every read. `panel`: where
        the panel's view of a place comes from (none: contexts are recorded without it)."""
        self._policy = policy if policy is not None else PolicyEngine.default()
        self._policy.require_commands(COMMANDS)
        self._units = units
        self._discloser = discloser
        self._views = views
        self._repo = repo
        self._review_days = contextual_review_working_days
        self._quorum = quorum_other_agencies
        self._panel = panel

    async def schedule_from_routing(self, uow: UnitOfWork, event: referral_events.ReferralRouted) -> bool:
        """Runs in the inbox consumer's unit of work. One open intervention per child: a routing for
        a child whose case is open joins its open conference (see _join). False if the referral
        already has its conference or joined one (the same routing announced twice under different
        message ids)."""
        # One open conference per child, across replicas: the child's routings one at a time.
        await advisory_lock(uow.tx, f"conferences-child:{event.child_id}")
        if await self._repo.exists_for_referral(uow.tx, event.referral_id):
            return False
        open_conference = await self._repo.open_for_child(uow.tx, event.child_id)
        conference_id = str(uuid.uuid4())
        if open_conference is not None:
            if not (
                event.intervention == types_pb2.INTERVENTION_A
                and open_conference.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW
            ):
                return await self._join(uow, open_conference, event)
            # Routed to A while a B review is open: the initial child protection conference (which
            # considers context) is a statutory duty and replaces the review, never joins it.
            await self._close_for_escalation(uow, open_conference, replaced_by=conference_id)
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
            conference_id=conference_id,
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
        await uow.publish(_scheduled(conference))
        return True

    async def _write(self, uow: UnitOfWork, conference: pb.Conference) -> bool:
        """Store the changed conference as its next version, if the stored one is still the one it
        was read at; False if someone else changed it first."""
        read_at = conference.version
        conference.version = read_at + 1
        return await self._repo.update(uow.tx, conference, read_at)

    async def _close_for_escalation(self, uow: UnitOfWork, conference: pb.Conference, *, replaced_by: str) -> None:
        uow.seals_under(child_scope(conference.child_id))
        _record_change(conference, pb.CHANGE_REASON_ESCALATED_TO_CHILD_PROTECTION, "", uow)
        conference.status = pb.CONFERENCE_STATUS_CANCELLED
        if not await self._write(uow, conference):
            raise Aborted("conference changed while the child was routed to A")  # the consumer retries
        await uow.publish(
            events.ConferenceCancelled(
                conference_id=conference.conference_id,
                child_id=conference.child_id,
                kind=conference.kind,
                reason=pb.CHANGE_REASON_ESCALATED_TO_CHILD_PROTECTION,
                cancelled_at=ts(uow.now),
                replaced_by_conference_id=replaced_by,
                referral_ids=_referrals_taken(conference),
            )
        )

    async def _join(self, uow: UnitOfWork, conference: pb.Conference, event: referral_events.ReferralRouted) -> bool:
        """The referral joins the child's open conference: its agencies are invited, the chair and
        social worker told (ReferralJoinedConference); no second conference, no parallel review."""
        if event.referral_id in conference.joined_referral_ids:
            return False
        uow.seals_under(child_scope(conference.child_id))
        await self._repo.take_referral(uow.tx, event.referral_id, conference.conference_id)
        conference.joined_referral_ids.append(event.referral_id)
        invited = set(_invited(conference))
        for agency in sorted(set(event.referring_agencies) - invited):
            conference.invitations.add(role=pb.PARTICIPANT_ROLE_AGENCY, agency=agency, invited_at=ts(uow.now))
        if not await self._write(uow, conference):
            raise Aborted("conference changed while a referral joined it")  # the consumer retries
        await uow.publish(
            events.ReferralJoinedConference(
                conference_id=conference.conference_id,
                child_id=conference.child_id,
                referral_id=event.referral_id,
                intervention=event.intervention,
                kind=conference.kind,
                chair=conference.chair,
            )
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

        return _listed(await self._units.run(work, caller=caller))

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
                if agency in {*_invited(c), *(a.owner_agency for a in _all_actions(c))}
                else frozenset(),
                own=_owned_by(c, agency),
            )
            for c in conferences
        ]
        return await self._discloser.disclose_records(
            uow.tx, user, records, self._views, record_type="conference", at=uow.now
        )

    # Commands ----------------------------------------------------------------------------------
    def _require(self, command: str, caller: Principal | None) -> None:
        if not self._policy.permits_caller(command, caller).allowed:
            message, reason = COMMANDS[command]
            raise PermissionDenied(message, reason=reason)
        if caller is not None:
            # The answer is read back through the policy, which refuses a token with an unknown
            # purpose: refuse it before anything is written, not after the change committed.
            requester(caller)

    async def _change(
        self,
        caller: Principal | None,
        request: pb_message.Message,
        response: type[pb_message.Message],
        command: str,
        change: Change,
    ) -> pb.Conference:
        """One change to one conference, as a unit of work: the command's policy check, the
        conference read, `change` (which checks the rules, alters the conference in place and names
        its event), the version check, the write and the event; idempotent by the request's key.
        The answer is the conference read back through the policy for this caller."""
        self._require(command, caller)
        conference_id: str = request.conference_id  # type: ignore[attr-defined]
        expected: int = request.expected_version  # type: ignore[attr-defined]

        async def work(uow: UnitOfWork) -> pb_message.Message:
            conference = await self._repo.get(uow.tx, conference_id)
            if conference is None:
                raise NotFound("conference not found")
            uow.seals_under(child_scope(conference.child_id))
            published = await change(uow, conference)
            if conference.ByteSize() > domain.MAX_RECORD_BYTES:
                # One sealed record, read whole and sent in one message: it must stay well within one.
                raise _refused("the conference record would grow too large", "RECORD_TOO_LARGE", conference)
            if conference.version != expected or not await self._write(uow, conference):
                raise Aborted("conference changed since it was read; read it again")
            for event in published:
                await uow.publish(event)
            # The key remembers a receipt only: the answer is read back below, through the policy.
            return response(conference=pb.Conference(conference_id=conference_id, version=conference.version))  # type: ignore[call-arg]

        name = type(request).DESCRIPTOR.name.removesuffix("Request")
        await self._units.run(
            work,
            caller=caller,
            once=Once(f"{name}:{conference_id}", request.idempotency_key, request, response),  # type: ignore[attr-defined]
        )
        conference, _redacted = await self.get_conference(caller, conference_id)
        return conference

    async def arrange_conference(
        self, caller: Principal | None, request: pb.ArrangeConferenceRequest
    ) -> pb.ArrangeConferenceResponse:
        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            _require_status(conference, pb.CONFERENCE_STATUS_SCHEDULED)
            if conference.HasField("meeting"):
                raise _refused("the meeting is already arranged: reschedule it", "ALREADY_ARRANGED", conference)
            conference.managing_team = request.managing_team
            await self._assign_chair(uow, conference, request.chair, request.meeting)
            conference.meeting.CopyFrom(request.meeting)
            last = conference.changes[-1].reason if conference.changes else pb.CHANGE_REASON_UNSPECIFIED
            return [_arranged(conference, last)]

        conference = await self._change(caller, request, pb.ArrangeConferenceResponse, "manage_conference", change)
        return pb.ArrangeConferenceResponse(conference=conference)

    async def reschedule_conference(
        self, caller: Principal | None, request: pb.RescheduleConferenceRequest
    ) -> pb.RescheduleConferenceResponse:
        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            _require_status(conference, pb.CONFERENCE_STATUS_SCHEDULED)
            if not conference.HasField("meeting"):
                raise _refused("no meeting is arranged: arrange one", "NOT_ARRANGED", conference)
            await self._assign_chair(uow, conference, request.chair or conference.chair, request.meeting)
            _record_change(conference, request.reason, request.note, uow)
            conference.meeting.CopyFrom(request.meeting)
            return [_arranged(conference, request.reason)]

        conference = await self._change(caller, request, pb.RescheduleConferenceResponse, "manage_conference", change)
        return pb.RescheduleConferenceResponse(conference=conference)

    async def cancel_conference(
        self, caller: Principal | None, request: pb.CancelConferenceRequest
    ) -> pb.CancelConferenceResponse:
        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            # Also once held: an outcome never recorded (the chair gone) must not keep the case open.
            if conference.status not in (pb.CONFERENCE_STATUS_SCHEDULED, pb.CONFERENCE_STATUS_HELD):
                _require_status(conference, pb.CONFERENCE_STATUS_SCHEDULED)
            _record_change(conference, request.reason, request.note, uow)
            conference.status = pb.CONFERENCE_STATUS_CANCELLED
            return [
                events.ConferenceCancelled(
                    conference_id=conference.conference_id,
                    child_id=conference.child_id,
                    kind=conference.kind,
                    reason=request.reason,
                    cancelled_at=ts(uow.now),
                    referral_ids=_referrals_taken(conference),
                )
            ]

        conference = await self._change(caller, request, pb.CancelConferenceResponse, "manage_conference", change)
        return pb.CancelConferenceResponse(conference=conference)

    async def invite_participants(
        self, caller: Principal | None, request: pb.InviteParticipantsRequest
    ) -> pb.InviteParticipantsResponse:
        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            _require_status(conference, pb.CONFERENCE_STATUS_SCHEDULED)
            invited = set(_invited(conference))
            for invitation in request.invitations:
                if invitation.role == pb.PARTICIPANT_ROLE_AGENCY and invitation.agency in invited:
                    continue  # already invited: inviting twice changes nothing
                invited.add(invitation.agency)
                added = conference.invitations.add()
                added.CopyFrom(invitation)
                added.invited_at.CopyFrom(ts(uow.now))
            return []

        conference = await self._change(caller, request, pb.InviteParticipantsResponse, "manage_conference", change)
        return pb.InviteParticipantsResponse(conference=conference)

    async def record_conference_context(
        self, caller: Principal | None, request: pb.RecordConferenceContextRequest
    ) -> pb.RecordConferenceContextResponse:
        """A: the intra-familial grounds and the contexts considered with them, replacing what was
        recorded before, until the conference is concluded. Each place's panel view is read first,
        outside the unit of work (no transaction waits on the panel), and only for a caller who may
        record the contexts."""
        self._require("manage_conference", caller)
        views = await self._panel_views(request.contexts)

        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            if conference.kind not in domain.CHILD_PROTECTION_KINDS:
                raise _refused("grounds and contexts are recorded for A", "NOT_CHILD_PROTECTION", conference)
            if conference.status not in (pb.CONFERENCE_STATUS_SCHEDULED, pb.CONFERENCE_STATUS_HELD):
                _require_status(conference, pb.CONFERENCE_STATUS_SCHEDULED)
            del conference.grounds[:]
            conference.grounds.extend(request.grounds)
            del conference.contexts[:]
            for given in request.contexts:
                context = conference.contexts.add()
                context.CopyFrom(given)
                context.ClearField("panel_view")  # the panel's, never the caller's
                profile = views.get(given.place_id)
                if profile is not None:
                    context.panel_view.CopyFrom(_panel_view(profile, uow))
            attached = sorted(p for p, profile in views.items() if profile is not None)
            for place_id in attached if caller is not None else ():
                # The panel audits the reads of people; this one, made as a service for a person, here.
                await self._discloser.audit_action(
                    uow.tx,
                    requester(caller),
                    "read",
                    rule_id="conference-panel-view",
                    record_type="place_profile",
                    record_id=place_id,
                    child_id=conference.child_id,
                )
            return []

        conference = await self._change(
            caller, request, pb.RecordConferenceContextResponse, "manage_conference", change
        )
        return pb.RecordConferenceContextResponse(conference=conference)

    async def _panel_views(self, contexts: Sequence[pb.ContextConsidered]) -> dict[str, panel_pb2.PlaceProfile | None]:
        """The panel's profile of each place among `contexts` (peer groups aside), each place read once
        and all at once: the panel's deadline bounds the whole, not each place in turn."""
        if self._panel is None:
            return {}
        panel = self._panel
        places = sorted(
            {c.place_id for c in contexts if c.place_id and c.context_type != types_pb2.CONTEXT_TYPE_PEER_GROUP}
        )
        profiles = await asyncio.gather(*(panel.place_profile(place) for place in places))
        return dict(zip(places, profiles, strict=True))

    async def submit_conference_report(
        self, caller: Principal | None, request: pb.SubmitConferenceReportRequest
    ) -> pb.SubmitConferenceReportResponse:
        self._require("contribute_to_conference", caller)
        assert caller is not None  # the command is not a system one
        agency = AGENCY_BY_NAME[caller.agency]

        async def work(uow: UnitOfWork) -> pb.SubmitConferenceReportResponse:
            conference = await self._repo.get(uow.tx, request.conference_id)
            if conference is None or agency not in _invited(conference):
                # An agency not invited is told nothing about the conference, not even that it exists.
                raise PermissionDenied("your agency is not invited to this conference", reason="NOT_INVITED")
            uow.seals_under(child_scope(conference.child_id))
            _require_status(conference, pb.CONFERENCE_STATUS_SCHEDULED)
            if conference.HasField("meeting") and uow.now >= conference.meeting.starts_at.ToDatetime(tzinfo=UTC):
                raise _refused("reports are submitted before the meeting starts", "MEETING_STARTED", conference)
            kept = [r for r in conference.reports if r.agency != agency]
            del conference.reports[:]
            conference.reports.extend(kept)
            conference.reports.add(
                agency=agency, text=request.text, submitted_by=caller.user_id, submitted_at=ts(uow.now)
            )
            if not await self._write(uow, conference):
                raise Aborted("conference changed while the report was written; send it again")
            return pb.SubmitConferenceReportResponse(conference_id=conference.conference_id, submitted_at=ts(uow.now))

        return await self._units.run(
            work,
            caller=caller,
            once=Once(
                f"report:{request.conference_id}:{agency}",
                request.idempotency_key,
                request,
                pb.SubmitConferenceReportResponse,
            ),
        )

    async def record_conference_meeting(
        self, caller: Principal | None, request: pb.RecordConferenceMeetingRequest
    ) -> pb.RecordConferenceMeetingResponse:
        quorate = domain.quorate(request.attendance, self._quorum)

        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            _require_assigned_chair(conference, caller)
            _require_status(conference, pb.CONFERENCE_STATUS_SCHEDULED)
            if not conference.HasField("meeting"):
                raise _refused("no meeting is arranged", "NOT_ARRANGED", conference)
            starts_at = conference.meeting.starts_at
            if uow.now < starts_at.ToDatetime(tzinfo=UTC):
                raise _refused("the meeting has not started yet", "MEETING_NOT_STARTED", conference)
            may_attend = {types_pb2.AGENCY_SOCIAL_CARE, *_invited(conference)}
            if any(a.agency not in may_attend for a in request.attendance):
                raise _refused("attendance names an agency that was not invited", "ATTENDEE_NOT_INVITED", conference)
            if quorate:
                conference.status = pb.CONFERENCE_STATUS_HELD
                del conference.attendance[:]
                conference.attendance.extend(request.attendance)
                conference.held_at.CopyFrom(starts_at)
            else:
                if not request.note:
                    raise _refused("say why the meeting was not quorate", "NOTE_REQUIRED", conference)
                _record_change(conference, pb.CHANGE_REASON_NO_QUORUM, request.note, uow)
                conference.ClearField("meeting")
            return [
                events.ConferenceMeetingRecorded(
                    conference_id=conference.conference_id,
                    child_id=conference.child_id,
                    kind=conference.kind,
                    quorate=quorate,
                    held_at=starts_at,
                    due_on=conference.due_on,
                )
            ]

        conference = await self._change(caller, request, pb.RecordConferenceMeetingResponse, "chair_conference", change)
        return pb.RecordConferenceMeetingResponse(conference=conference, quorate=quorate)

    async def conclude_conference(
        self, caller: Principal | None, request: pb.ConcludeConferenceRequest
    ) -> pb.ConcludeConferenceResponse:
        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            _require_assigned_chair(conference, caller)
            if conference.status == pb.CONFERENCE_STATUS_CONCLUDED:
                raise _refused("conference is already concluded", "CONFERENCE_ALREADY_CONCLUDED", conference)
            if conference.status != pb.CONFERENCE_STATUS_HELD:
                raise _refused("a conference is concluded after a quorate meeting", "CONFERENCE_NOT_HELD", conference)
            domain.check_outcome(conference.kind, request.outcome)
            domain.check_transition(conference, request.outcome)
            if request.outcome == pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN:
                # B's criteria, for a B review's plan and for the move from a child protection plan.
                refusal = domain.eligibility_refusal(conference)
                if refusal is not None:
                    raise _refused(domain.ELIGIBILITY_REFUSALS[refusal], refusal, conference)
            attended = {a.agency for a in conference.attendance}
            if len({v.agency for v in request.views}) != len(request.views):
                raise _refused("one view per agency", "DUPLICATE_VIEW", conference)
            if any(v.agency not in attended for v in request.views):
                raise _refused("a view is recorded for an agency that attended", "VIEW_FROM_ABSENT_AGENCY", conference)
            conference.status = pb.CONFERENCE_STATUS_CONCLUDED
            conference.outcome = request.outcome
            conference.summary = request.summary
            conference.minutes = request.minutes
            conference.views.extend(request.views)
            conference.actions.extend(request.actions)
            conference.concluded_at.CopyFrom(ts(uow.now))
            meeting_day = london_date(conference.held_at.ToDatetime(tzinfo=UTC))
            family_due = domain.family_summary_due_on(conference.kind, meeting_day)
            conference.family_summary_due_on = family_due.isoformat() if family_due else ""
            review = domain.next_review(conference.kind, request.outcome, meeting_day, request.next_review_months)
            concluded = events.ConferenceConcluded(
                conference_id=conference.conference_id,
                child_id=conference.child_id,
                kind=conference.kind,
                outcome=conference.outcome,
                action_count=len(conference.actions),
                concluded_at=conference.concluded_at,
                transition_to_contextual_safeguarding=domain.is_transition(conference.kind, conference.outcome),
                referral_ids=_referrals_taken(conference),
            )
            if review is None:
                return [concluded]
            scheduled = await self._schedule_review(uow, conference, review)
            concluded.review_conference_id = scheduled.conference_id
            return [concluded, scheduled]

        conference = await self._change(caller, request, pb.ConcludeConferenceResponse, "chair_conference", change)
        return pb.ConcludeConferenceResponse(conference=conference)

    async def record_family_summary(
        self, caller: Principal | None, request: pb.RecordFamilySummaryRequest
    ) -> pb.RecordFamilySummaryResponse:
        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            if conference.status != pb.CONFERENCE_STATUS_CONCLUDED:
                raise _refused("the family summary follows the conclusion", "CONFERENCE_NOT_CONCLUDED", conference)
            _require_dates_exist(sent_on=request.sent_on)
            sent = date.fromisoformat(request.sent_on)
            if not london_date(conference.held_at.ToDatetime(tzinfo=UTC)) <= sent <= london_date(uow.now):
                raise _refused(
                    "the summary is sent between the meeting's day and today", "SENT_ON_OUT_OF_RANGE", conference
                )
            conference.family_summary = request.text
            conference.family_summary_sent_on = request.sent_on
            return []

        conference = await self._change(caller, request, pb.RecordFamilySummaryResponse, "manage_conference", change)
        return pb.RecordFamilySummaryResponse(conference=conference)

    async def record_eligibility(
        self, caller: Principal | None, request: pb.RecordEligibilityRequest
    ) -> pb.RecordEligibilityResponse:
        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            if conference.kind not in domain.ELIGIBILITY_KINDS:
                raise _refused(
                    "eligibility is B's: a contextual review, or a child protection review moving to B",
                    "NOT_CONTEXTUAL_REVIEW",
                    conference,
                )
            _require_open(conference)
            given = request.eligibility
            by_chair = caller is not None and caller.user_id == conference.chair
            if given.under_ten_reason and not by_chair:
                # The pilot's procedure: the chair, not the case's social worker, owns that judgement.
                raise PermissionDenied("only the conference's assigned chair may do this", reason="NOT_ASSIGNED_CHAIR")
            previous = pb.Eligibility()
            previous.CopyFrom(conference.eligibility)
            conference.eligibility.CopyFrom(given)
            conference.eligibility.ClearField("under_ten_reason_by")  # the service's, never the caller's
            if given.under_ten_reason:
                conference.eligibility.under_ten_reason_by = conference.chair
            elif previous.under_ten_reason and given.age_years < domain.B_YOUNGEST_WITHOUT_REASON and not by_chair:
                # Someone else's update keeps the chair's reason (only the chair withdraws it).
                conference.eligibility.under_ten_reason = previous.under_ten_reason
                conference.eligibility.under_ten_reason_by = previous.under_ten_reason_by
            conference.eligibility.recorded_by = actor_id(caller)
            conference.eligibility.recorded_at.CopyFrom(ts(uow.now))
            return []

        conference = await self._change(caller, request, pb.RecordEligibilityResponse, "manage_conference", change)
        return pb.RecordEligibilityResponse(conference=conference)

    async def record_network_meeting(
        self, caller: Principal | None, request: pb.RecordNetworkMeetingRequest
    ) -> pb.RecordNetworkMeetingResponse:
        given = request.meeting
        _require_dates_exist(
            **{"meeting.held_on": given.held_on},
            **{f"meeting.actions[{i}].due_on": a.due_on for i, a in enumerate(given.actions)},
        )

        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            # A B plan: made by a B review, or by the child protection review that moved the child to B.
            if not (
                conference.status == pb.CONFERENCE_STATUS_CONCLUDED
                and conference.outcome == pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
            ):
                raise _refused(
                    "a network meeting serves a B plan: name the review that made it", "NO_CONTEXTUAL_PLAN", conference
                )
            if len(conference.network_meetings) >= domain.MAX_NETWORK_MEETINGS:
                raise _refused(
                    f"at most {domain.MAX_NETWORK_MEETINGS} network meetings are recorded on one review's plan",
                    "TOO_MANY_NETWORK_MEETINGS",
                    conference,
                )
            held = date.fromisoformat(given.held_on)
            # Between reviews: from the review that made the plan until the next one meets.
            latest = london_date(uow.now)
            following = await self._repo.following(uow.tx, conference)
            if following is not None and following.HasField("held_at"):
                latest = min(latest, london_date(following.held_at.ToDatetime(tzinfo=UTC)))
            if not london_date(conference.held_at.ToDatetime(tzinfo=UTC)) <= held <= latest:
                raise _refused(
                    "a network meeting is held between the review that made the plan and the next one, not after today",
                    "HELD_ON_OUT_OF_RANGE",
                    conference,
                )
            meeting = conference.network_meetings.add()
            meeting.CopyFrom(given)
            meeting.meeting_id = str(uuid.uuid4())
            meeting.convened_by = actor_id(caller)
            meeting.recorded_at.CopyFrom(ts(uow.now))
            return [
                events.NetworkMeetingRecorded(
                    conference_id=conference.conference_id,
                    child_id=conference.child_id,
                    meeting_id=meeting.meeting_id,
                    held_on=meeting.held_on,
                    action_count=len(meeting.actions),
                )
            ]

        conference = await self._change(caller, request, pb.RecordNetworkMeetingResponse, "manage_conference", change)
        return pb.RecordNetworkMeetingResponse(conference=conference)

    async def offer_transition(
        self, caller: Principal | None, request: pb.OfferTransitionRequest
    ) -> pb.OfferTransitionResponse:
        _require_dates_exist(offered_on=request.offered_on)

        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            if conference.kind != pb.CONFERENCE_KIND_CHILD_PROTECTION_REVIEW:
                raise _refused(
                    "the move to B is offered for a review conference of a child protection plan",
                    "TRANSITION_AT_REVIEW_ONLY",
                    conference,
                )
            _require_open(conference)
            _require_not_the_chair(conference, caller)
            if any(
                o.answer in (pb.TRANSITION_ANSWER_PENDING, pb.TRANSITION_ANSWER_ACCEPTED)
                for o in conference.transition_offers
            ):
                raise _refused("an offer is already pending or accepted", "OFFER_ALREADY_OPEN", conference)
            if len(conference.transition_offers) >= domain.MAX_TRANSITION_OFFERS:
                raise _refused(
                    f"at most {domain.MAX_TRANSITION_OFFERS} offers are made at one review",
                    "TOO_MANY_OFFERS",
                    conference,
                )
            if date.fromisoformat(request.offered_on) > london_date(uow.now):
                raise _refused("an offer is recorded once made", "OFFERED_ON_IN_FUTURE", conference)
            conference.transition_offers.add(
                offer_id=str(uuid.uuid4()),
                extra_familial_harms=request.extra_familial_harms,
                offered_on=request.offered_on,
                offered_by=actor_id(caller),
                note=request.note,
                answer=pb.TRANSITION_ANSWER_PENDING,
            )
            return []

        conference = await self._change(caller, request, pb.OfferTransitionResponse, "manage_conference", change)
        return pb.OfferTransitionResponse(conference=conference)

    async def record_transition_answer(
        self, caller: Principal | None, request: pb.RecordTransitionAnswerRequest
    ) -> pb.RecordTransitionAnswerResponse:
        _require_dates_exist(answered_on=request.answered_on)

        async def change(uow: UnitOfWork, conference: pb.Conference) -> list[pb_message.Message]:
            _require_open(conference)
            _require_not_the_chair(conference, caller)
            pending = [o for o in conference.transition_offers if o.answer == pb.TRANSITION_ANSWER_PENDING]
            if not pending:
                raise _refused("no offer awaits the family's answer", "NO_PENDING_OFFER", conference)
            [offer] = pending
            answered = date.fromisoformat(request.answered_on)
            if not date.fromisoformat(offer.offered_on) <= answered <= london_date(uow.now):
                raise _refused(
                    "the family answers on or after the offer, and not after today",
                    "ANSWERED_ON_OUT_OF_RANGE",
                    conference,
                )
            offer.answer = request.answer
            offer.answered_on = request.answered_on
            offer.family_response = request.family_response
            offer.answered_by = actor_id(caller)
            return []

        conference = await self._change(caller, request, pb.RecordTransitionAnswerResponse, "manage_conference", change)
        return pb.RecordTransitionAnswerResponse(conference=conference)

    async def list_overdue_conferences(self, caller: Principal | None) -> tuple[list[pb.Conference], list[str]]:
        """Scheduled conferences past their due date (London), oldest due first, through the policy."""
        self._require("manage_conference", caller)

        async def work(uow: UnitOfWork) -> list[tuple[pb_message.Message | None, tuple[str, ...]]]:
            return await self._disclose(uow, await self._repo.list_overdue(uow.tx, london_date(uow.now)))

        return _listed(await self._units.run(work, caller=caller))

    async def announce_overdue(self) -> int:
        """Publish ConferenceOverdue, once each, for the scheduled conferences past their due date
        (run periodically). Each announcement is its own unit of work under the conference's version,
        so two replicas sweeping at once announce each conference once. Returns how many it announced."""

        async def overdue(uow: UnitOfWork) -> list[tuple[str, int]]:
            return await self._repo.overdue_to_announce(uow.tx, london_date(uow.now))

        announced = 0
        for conference_id, version in await self._units.run(overdue, caller=None):

            async def announce(uow: UnitOfWork, conference_id: str = conference_id, version: int = version) -> bool:
                try:
                    conference = await self._repo.get(uow.tx, conference_id)
                except KeyDestroyedError:
                    return False  # the child was erased: nothing to announce about anyone
                if conference is None or conference.version != version:
                    return False  # changed since the sweep read it (held, moved, or announced elsewhere)
                uow.seals_under(child_scope(conference.child_id))
                conference.overdue_announced_on = london_date(uow.now).isoformat()
                if not await self._write(uow, conference):
                    return False
                await uow.publish(
                    events.ConferenceOverdue(
                        conference_id=conference.conference_id,
                        child_id=conference.child_id,
                        kind=conference.kind,
                        due_on=conference.due_on,
                        chair=conference.chair,
                    )
                )
                return True

            announced += int(await self._units.run(announce, caller=None))
        return announced

    # The chair register -------------------------------------------------------------------------
    async def register_chair(
        self, caller: Principal | None, request: pb.RegisterChairRequest
    ) -> pb.RegisterChairResponse:
        self._require("manage_chairs", caller)
        given = request.chair
        _require_dates_exist(
            **{
                "chair.trained_on": given.trained_on,
                "chair.lead_from": given.lead_from,
                "chair.lead_until": given.lead_until,
            }
        )

        async def work(uow: UnitOfWork) -> pb.RegisterChairResponse:
            uow.seals_under(SERVICE_SCOPE)
            chair = pb.Chair()
            chair.CopyFrom(request.chair)
            chair.version = request.chair.version + 1
            if not await self._repo.put_chair(uow.tx, chair):
                raise Aborted("the chair changed since it was read (or is already registered); read it again")
            return pb.RegisterChairResponse(chair=pb.Chair(user_id=chair.user_id, version=chair.version))

        receipt = await self._units.run(
            work,
            caller=caller,
            once=Once(f"chair:{request.chair.user_id}", request.idempotency_key, request, pb.RegisterChairResponse),
        )
        chairs = {c.user_id: c for c in await self.list_chairs(caller)}
        return pb.RegisterChairResponse(chair=chairs[receipt.chair.user_id])

    async def list_chairs(self, caller: Principal | None) -> list[pb.Chair]:
        self._require("manage_conference", caller)

        async def work(uow: UnitOfWork) -> list[pb.Chair]:
            return await self._repo.chairs(uow.tx)

        return await self._units.run(work, caller=caller)

    async def _schedule_review(
        self, uow: UnitOfWork, previous: pb.Conference, review: domain.Schedule
    ) -> events.ConferenceScheduled:
        """The review the plan now needs, scheduled with the conclusion that continued the plan:
        the same child and case, its participants invited again."""
        conference = pb.Conference(
            conference_id=str(uuid.uuid4()),
            kind=review.kind,
            status=pb.CONFERENCE_STATUS_SCHEDULED,
            child_id=previous.child_id,
            referral_id=previous.referral_id,
            due_on=review.due_on.isoformat(),
            due_rule=review.rule,
            scheduled_at=ts(uow.now),
            version=1,
            invited_agencies=sorted(set(_invited(previous))),
            invitations=[
                pb.Invitation(role=i.role, name=i.name, relationship=i.relationship, invited_at=ts(uow.now))
                for i in previous.invitations
                if i.role != pb.PARTICIPANT_ROLE_AGENCY
            ],
            managing_team=previous.managing_team,
            previous_conference_id=previous.conference_id,
            review_number=previous.review_number + 1,
        )
        if review.kind == pb.CONFERENCE_KIND_CONTEXTUAL_REVIEW and previous.HasField("eligibility"):
            # B's criteria carry to the next review, where social care confirms or changes them; an
            # under-10 reason is each review's chair's own, so it does not carry.
            conference.eligibility.CopyFrom(previous.eligibility)
            conference.eligibility.ClearField("under_ten_reason")
            conference.eligibility.ClearField("under_ten_reason_by")
        await self._repo.add(uow.tx, conference)
        return _scheduled(conference)

    async def _assign_chair(
        self, uow: UnitOfWork, conference: pb.Conference, chair_id: str, meeting: pb.Meeting
    ) -> None:
        if uow.caller is not None and uow.caller.user_id == chair_id:
            # A chair is assigned by someone else: independence is not a chair's own assertion.
            raise PermissionDenied("a chair may not assign themselves to a conference", reason="CHAIR_SELF_ASSIGNED")
        if chair_id in {p for o in conference.transition_offers for p in (o.offered_by, o.answered_by)}:
            # Who made or recorded the offer to move to B does not then decide on it.
            raise _refused("the chair made or recorded the offer to move to B", "CHAIR_NOT_INDEPENDENT", conference)
        register = {c.user_id: domain.ChairRecord.of(c) for c in await self._repo.chairs(uow.tx)}
        refusal = domain.chair_refusal(
            register.get(chair_id),
            kind=conference.kind,
            managing_team=conference.managing_team,
            meeting_day=london_date(meeting.starts_at.ToDatetime(tzinfo=UTC)),
            register=list(register.values()),
        )
        if refusal is not None:
            raise _refused(domain.CHAIR_REFUSALS[refusal], refusal, conference)
        conference.chair = chair_id


def _listed(
    disclosed: list[tuple[pb_message.Message | None, tuple[str, ...]]],
) -> tuple[list[pb.Conference], list[str]]:
    """The conferences the caller may know of, and what was cleared in each, by position."""
    shown = [(c, paths) for c, paths in disclosed if c is not None]
    redacted = [f"conferences[{i}].{path}" for i, (_, paths) in enumerate(shown) for path in paths]
    return [c for c, _ in shown], redacted  # type: ignore[misc]


def _require_dates_exist(**dates: str) -> None:
    """The contract's YYYY-MM-DD patterns let a day like 2010-02-29 through: INVALID_ARGUMENT naming
    each such field."""
    bad = []
    for name, text in dates.items():
        try:
            date.fromisoformat(text) if text else None
        except ValueError:
            bad.append(FieldViolation(name, "must be a date that exists"))
    if bad:
        raise InvalidArgument(bad)


def _invited(conference: pb.Conference) -> list[int]:
    """The agencies invited: the referring agencies, and agencies invited since."""
    return [
        *conference.invited_agencies,
        *(i.agency for i in conference.invitations if i.role == pb.PARTICIPANT_ROLE_AGENCY),
    ]


def _panel_view(profile: panel_pb2.PlaceProfile, uow: UnitOfWork) -> pb.PanelView:
    view = pb.PanelView(
        concern_count=profile.concern_count,
        child_count=profile.child_count,
        harm_types=profile.harm_types,
        reporting_agencies=profile.reporting_agencies,
        flagged_for_panel=profile.flagged_for_panel,
        read_at=ts(uow.now),
    )
    for name in ("first_seen_at", "last_seen_at"):
        if profile.HasField(name):
            getattr(view, name).CopyFrom(getattr(profile, name))
    return view


def _referrals_taken(conference: pb.Conference) -> list[str]:
    """The routing that scheduled the conference (or its first, for a review) and those that joined it
    (the first 100, the event's bound: a case takes a few)."""
    return [r for r in (conference.referral_id, *conference.joined_referral_ids) if r][:100]


def _all_actions(conference: pb.Conference) -> list[pb.AgreedAction]:
    """The actions agreed at the conference and at the network meetings under its plan."""
    return [*conference.actions, *(a for m in conference.network_meetings for a in m.actions)]


def _owned_by(conference: pb.Conference, agency: int | None) -> Callable[[str], bool]:
    """The parts of the conference the agency itself wrote or owns: its report, its view, its actions."""
    owns = [
        owned_elements("actions", [a.owner_agency for a in conference.actions], agency),
        owned_elements("reports", [r.agency for r in conference.reports], agency),
        owned_elements("views", [v.agency for v in conference.views], agency),
        *(
            owned_elements(f"network_meetings[{i}].actions", [a.owner_agency for a in m.actions], agency)
            for i, m in enumerate(conference.network_meetings)
        ),
    ]
    return lambda path: any(own(path) for own in owns)


def _refused(message: str, reason: str, conference: pb.Conference) -> FailedPrecondition:
    return FailedPrecondition(message, subject=f"conferences/{conference.conference_id}", reason=reason)


def _require_status(conference: pb.Conference, status: int) -> None:
    if conference.status != status:
        raise _refused(
            f"the conference is {pb.ConferenceStatus.Name(conference.status)}", "CONFERENCE_NOT_SCHEDULED", conference
        )


def _require_open(conference: pb.Conference) -> None:
    if conference.status not in (pb.CONFERENCE_STATUS_SCHEDULED, pb.CONFERENCE_STATUS_HELD):
        raise _refused(
            f"the conference is {pb.ConferenceStatus.Name(conference.status)}", "CONFERENCE_NOT_OPEN", conference
        )


def _require_not_the_chair(conference: pb.Conference, caller: Principal | None) -> None:
    """The offer to move to B and the family's answer are the case team's: the chair who will decide
    on the move at the review stays independent of them."""
    if caller is not None and conference.chair and caller.user_id == conference.chair:
        raise PermissionDenied(
            "the conference's chair does not make or answer the offer", reason="CHAIR_NOT_INDEPENDENT"
        )


def _require_assigned_chair(conference: pb.Conference, caller: Principal | None) -> None:
    if caller is None or not conference.chair or caller.user_id != conference.chair:
        raise PermissionDenied("only the conference's assigned chair may do this", reason="NOT_ASSIGNED_CHAIR")


def _record_change(conference: pb.Conference, reason: int, note: str, uow: UnitOfWork) -> None:
    change = conference.changes.add(reason=reason, note=note, changed_at=ts(uow.now))
    change.changed_by = actor_id(uow.caller)
    if conference.HasField("meeting"):
        change.previous_starts_at.CopyFrom(conference.meeting.starts_at)


def _scheduled(conference: pb.Conference) -> events.ConferenceScheduled:
    return events.ConferenceScheduled(
        conference_id=conference.conference_id,
        child_id=conference.child_id,
        referral_id=conference.referral_id,
        kind=conference.kind,
        due_on=conference.due_on,
        scheduled_at=conference.scheduled_at,
        previous_conference_id=conference.previous_conference_id,
    )


def _arranged(conference: pb.Conference, reason: int) -> events.ConferenceArranged:
    return events.ConferenceArranged(
        conference_id=conference.conference_id,
        child_id=conference.child_id,
        kind=conference.kind,
        starts_at=conference.meeting.starts_at,
        due_on=conference.due_on,
        reason=reason,
    )
