"""Conference use cases. Each owns its transaction (or runs in the consumer's): state, outbox event
and idempotency key commit together, and the relay is woken after the commit."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import events_pb2 as events
from csx.referrals.v1 import events_pb2 as referral_events
from csx_common.calendar import london_date
from csx_common.db import Database, Tx
from csx_common.disclosure import Discloser, DisclosureViews, Record, owned_elements, requester
from csx_common.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied
from csx_common.idempotency import IdempotencyKeys
from csx_common.identity import current_user
from csx_common.messaging.consumer import PoisonEvent
from csx_common.messaging.events import StreamSpec
from csx_common.messaging.outbox import Outbox
from csx_common.policy import AGENCY_BY_NAME, Involvement
from csx_common.timestamps import ts
from csx_conferences import domain
from csx_conferences.repository import ConferencesRepository


class ConferencesService:
    def __init__(
        self,
        db: Database,
        repo: ConferencesRepository,
        outbox: Outbox,
        idempotency: IdempotencyKeys,
        stream: StreamSpec,
        discloser: Discloser,
        views: DisclosureViews,
        *,
        contextual_review_working_days: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._discloser = discloser
        self._views = views
        self._repo = repo
        self._outbox = outbox
        self._idem = idempotency
        self._stream = stream
        self._review_days = contextual_review_working_days
        self._clock = clock

    async def schedule_from_routing(self, session: Tx, event: referral_events.ReferralRouted) -> bool:
        """Runs in the inbox consumer's transaction. False if the referral already has its conference
        (the same routing announced twice under different message ids)."""
        if await self._repo.exists_for_referral(session, event.referral_id):
            return False
        now = self._clock()
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
            scheduled_at=ts(now),
            version=1,
            invited_agencies=sorted(set(event.referring_agencies)),
        )
        await self._repo.add(session, conference)
        await self._outbox.add(
            session,
            self._stream.subject("conference_scheduled"),
            events.ConferenceScheduled(
                conference_id=conference.conference_id,
                child_id=conference.child_id,
                referral_id=conference.referral_id,
                kind=conference.kind,
                due_on=conference.due_on,
                scheduled_at=conference.scheduled_at,
            ),
        )
        # No relay wake-up here: the consumer commits after we return, and the relay's poll
        # picks the event up within relay_poll_seconds.
        return True

    async def get_conference(self, conference_id: str) -> tuple[pb.Conference, tuple[str, ...]]:
        """The conference as the caller may see it, and what was cleared; NOT_FOUND without a basis."""
        async with self._db.transaction() as session:  # the audit commits with the read
            conference = await self._repo.get(session, conference_id)
            if conference is None:
                raise NotFound("conference not found")
            [(shown, redacted)] = await self._disclose(session, [conference])
        if shown is None:
            raise NotFound("conference not found")
        return shown, redacted  # type: ignore[return-value]

    async def list_conferences(self, child_id: str) -> tuple[list[pb.Conference], list[str]]:
        async with self._db.transaction() as session:
            disclosed = await self._disclose(session, await self._repo.list_for_child(session, child_id))
        shown = [(c, paths) for c, paths in disclosed if c is not None]
        redacted = [f"conferences[{i}].{path}" for i, (_, paths) in enumerate(shown) for path in paths]
        return [c for c, _ in shown], redacted  # type: ignore[misc]

    async def _disclose(self, session: Tx, conferences: list[pb.Conference]) -> list:  # type: ignore[type-arg]
        """Each conference through the policy: an agency invited to it (the referring agencies), or
        given an action at it, attends it."""
        user = current_user()
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
            session, user, records, self._views, record_type="conference", at=self._clock()
        )

    async def conclude_conference(self, request: pb.ConcludeConferenceRequest) -> pb.ConcludeConferenceResponse:
        user = current_user()
        if user is not None and not domain.may_conclude(user.agency, user.role):
            raise PermissionDenied("only social care's chair concludes a conference", reason="CHAIR_ONLY")
        if user is not None:
            # The answer is read back through the policy, which refuses a token with an unknown
            # purpose: refuse it before anything is written, not after the conclusion committed.
            requester(user)

        async def work(session: Tx) -> pb.ConcludeConferenceResponse:
            conference = await self._repo.get(session, request.conference_id)
            if conference is None:
                raise NotFound("conference not found")
            if conference.status == pb.CONFERENCE_STATUS_CONCLUDED:
                raise FailedPrecondition(
                    "conference is already concluded",
                    subject=f"conferences/{request.conference_id}",
                    reason="CONFERENCE_ALREADY_CONCLUDED",
                )
            domain.check_outcome(conference.kind, request.outcome)
            if conference.version != request.expected_version:
                raise Aborted("conference changed since it was read; read it again")
            now = self._clock()
            conference.status = pb.CONFERENCE_STATUS_CONCLUDED
            conference.outcome = request.outcome
            conference.summary = request.summary
            conference.actions.extend(request.actions)
            conference.chair = request.chair
            conference.concluded_at.CopyFrom(ts(now))
            family_due = domain.family_summary_due_on(conference.kind, london_date(now))
            conference.family_summary_due_on = family_due.isoformat() if family_due else ""
            conference.version = request.expected_version + 1
            if not await self._repo.update(session, conference, request.expected_version):
                raise Aborted("conference changed since it was read; read it again")
            await self._outbox.add(
                session,
                self._stream.subject("conference_concluded"),
                events.ConferenceConcluded(
                    conference_id=conference.conference_id,
                    child_id=conference.child_id,
                    kind=conference.kind,
                    outcome=conference.outcome,
                    action_count=len(conference.actions),
                    concluded_at=conference.concluded_at,
                ),
            )
            # The idempotency table keeps the response in clear, so it gets a receipt without the
            # sealed summary and actions; the full answer is read back below.
            return pb.ConcludeConferenceResponse(
                conference=pb.Conference(conference_id=conference.conference_id, version=conference.version)
            )

        receipt, _ = await self._idem.run_once(
            self._db,
            f"conclude:{request.conference_id}",
            request.idempotency_key,
            request,
            pb.ConcludeConferenceResponse,
            work,
        )
        # A concluded conference never changes again, so a retry reads the same answer.
        conference, _redacted = await self.get_conference(receipt.conference.conference_id)
        return pb.ConcludeConferenceResponse(conference=conference)
