"""Referral use cases. Each is a unit of work (csx_common.unit_of_work): its state, outbox events,
audit entries and idempotency key commit together, or none of them do. The caller is given by
the adapter (gRPC or sealed intake); a use case never looks it up."""

from __future__ import annotations

import dataclasses
import uuid

from csx.referrals.v1 import events_pb2 as events
from csx.referrals.v1 import referrals_pb2 as pb
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.types.v1 import types_pb2
from csx_common.datakeys import child_scope
from csx_common.db import Tx
from csx_common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, PermissionDenied
from csx_common.idempotency import IDEMPOTENCY_KEY_REUSED
from csx_common.identity import Principal, actor_id
from csx_common.timestamps import ts
from csx_common.unit_of_work import Apply, Once, UnitOfWork, UnitsOfWork
from csx_referrals import domain
from csx_referrals.cases import Cases
from csx_referrals.repository import Grant, ReferralsRepository
from csx_safeguarding.disclosure import Discloser, requester
from csx_safeguarding.policy import (
    AGENCY_BY_NAME,
    AGENCY_NAME,
    BreakGlassGrant,
    Consent,
    DisclosureContext,
    HandlingCode,
    IntelligenceHandling,
    Involvement,
    PolicyEngine,
    Requester,
    SharingDecision,
)

# The commands of this service, each named in the policy's `commands` section (checked at start-up).
COMMANDS = (
    "submit_concern_for_another_agency",
    "record_screening_decision",
    "list_possible_matches",
    "resolve_possible_match",
    "record_consent",
    "record_sharing_decision",
    "get_disclosure_state",
    "review_break_glass",
)


class ReferralsService:
    def __init__(
        self,
        units: UnitsOfWork,
        repo: ReferralsRepository,
        discloser: Discloser,
        *,
        policy: PolicyEngine | None = None,
        cases: Cases | None = None,
    ) -> None:
        """`policy`: the process's one policy (the runtime's, the discloser's); by default the
        shipped one. It decides who may run each command as it decides every read. `cases`: the
        child's case, evaluated by every change that can open or close it (docs/adr/0014)."""
        self._policy = policy if policy is not None else PolicyEngine.default()
        self._policy.require_commands(COMMANDS)
        self._units = units
        self._db = units.db
        self._discloser = discloser
        self._state = _ChildState(repo, units)
        self._repo = repo
        self._cases = cases or Cases()

    async def submit_concern(
        self, caller: Principal | None, request: pb.SubmitConcernRequest, *, before: Apply | None = None
    ) -> pb.SubmitConcernResponse:
        """`before`: the caller's own writes, committed with the concern or not at all (sealed
        intake claims its envelope so)."""
        submitter = caller.agency if caller else None
        # An agency submits concerns as itself: comparing the caller's agency with the concern's is a
        # fact of this request, not a permission, so it is not policy. Submitting for ANOTHER agency
        # is a permission about the caller (social care recording a GP's phone call): the policy's.
        if (
            submitter != domain.agency_name(request.agency)
            and not self._policy.permits_caller("submit_concern_for_another_agency", caller).allowed
        ):
            raise PermissionDenied("an agency submits concerns as itself", reason="AGENCY_MISMATCH")
        # The agency's own reference is the concern's natural key, over gRPC as over sealed intake:
        # the same reference answers with the first concern whatever idempotency key comes with it
        # (a resend from a system that lost its key), and never makes a second concern. Keyed on the
        # submitter too: social care may submit on an agency's behalf, and must not be able to take
        # that agency's reference first.
        scope = f"submit_concern:{request.agency}"
        key = domain.reference_key(submitter or "system", request.agency_reference)
        content = pb.SubmitConcernRequest()
        content.CopyFrom(request)
        content.ClearField("idempotency_key")

        async def work(uow: UnitOfWork) -> pb.SubmitConcernResponse:
            now = uow.now
            child_id, new, possible = await self._repo.find_or_create_child(uow.tx, request.child, now)
            uow.seals_under(child_scope(child_id))
            for candidate, kind in possible:
                await self._repo.add_possible_match(uow.tx, child_id, candidate, kind, now)
            due = domain.decision_due_on(now)
            referral_id = None if new else await self._repo.open_referral_for(uow.tx, child_id)
            if referral_id is None:
                referral_id = await self._repo.open_referral(uow.tx, child_id, now, due)
            concern = pb.Concern(
                concern_id=str(uuid.uuid4()),
                referral_id=referral_id,
                child_id=child_id,
                agency=request.agency,
                agency_reference=request.agency_reference,
                referrer=request.referrer,
                child=request.child,
                harm_types=request.harm_types,
                contexts=request.contexts,
                narrative=request.narrative,
                recorded_at=ts(now),
            )
            if request.HasField("intelligence"):
                concern.intelligence.CopyFrom(request.intelligence)
            await self._repo.add_concern(uow.tx, concern)
            await self._cases.concern_recorded(uow, child_id, now)  # a referral awaits a decision: open
            await uow.publish(
                events.ConcernRecorded(
                    concern_id=concern.concern_id,
                    referral_id=referral_id,
                    child_id=child_id,
                    agency=request.agency,
                    harm_types=request.harm_types,
                    contexts=request.contexts,
                    recorded_at=concern.recorded_at,
                ),
            )
            return pb.SubmitConcernResponse(
                concern_id=concern.concern_id,
                referral_id=referral_id,
                child_id=child_id,
                recorded_at=concern.recorded_at,
                decision_due_on=due.isoformat(),
            )

        try:
            response = await self._units.run(
                work, caller=caller, once=Once(scope, key, content, pb.SubmitConcernResponse), before=before
            )
        except FailedPrecondition as exc:
            if exc.reason != IDEMPOTENCY_KEY_REUSED:
                raise
            raise AlreadyExists(
                "this agency reference was already used for a concern with different content",
                reason="AGENCY_REFERENCE_CONFLICT",
            ) from None
        return response

    async def get_concern(self, caller: Principal | None, concern_id: str) -> tuple[pb.Concern, tuple[str, ...]]:
        """The concern as the caller may see it, and the paths of what was cleared. Audited; a
        caller with no basis for the child gets NOT_FOUND (and the refusal is audited too)."""

        # A unit of work, not a plain read: the audit entries commit with it or the read fails.
        async def work(uow: UnitOfWork) -> tuple[pb.Concern, tuple[str, ...]] | None:
            if uow.caller is None:  # INSECURE_DEV only: the guard refuses services without a person
                concern = await self._repo.get_concern(uow.tx, concern_id)
                if concern is None:
                    raise NotFound("concern not found")
                return concern, ()
            # Decide on the operational part first; decrypt only what the caller may see.
            loaded = await self._repo.load_concern(uow.tx, concern_id)
            if loaded is None:
                raise NotFound("concern not found")
            concern = loaded.message
            context = await self._disclosure_context(uow, uow.caller, concern.child_id, concern=concern)
            # The raising agency reads its own concern: its own words are not a disclosure to it.
            own = context.requester.agency == concern.agency
            disclosed = await self._discloser.disclose_if_visible(  # clears what the caller may not see
                uow.tx,
                concern,
                context,
                record_type="concern",
                record_id=concern_id,
                child_id=concern.child_id,
                own=(lambda _path: True) if own else None,
            )
            if disclosed is None:
                return None
            loaded.decrypt_into(concern, {path for path, d in disclosed.decisions.items() if d.allowed}.__contains__)
            return concern, disclosed.redacted_fields

        shown = await self._units.run(work, caller=caller)
        if shown is None:  # raised after the commit, so the audited refusal stays
            raise NotFound("concern not found")
        return shown

    async def _disclosure_context(
        self,
        uow: UnitOfWork,
        user: Principal,
        child_id: str,
        *,
        concern: pb.Concern | None = None,
        referring: bool = False,
    ) -> DisclosureContext:
        """Everything the policy needs about this caller and this child (and, for a concern, its
        raising agency and intelligence handling). The caller's basis for the child is a recorded
        decision (a routing of a referral holding its concern; a decision to share, which the
        policy reads from the decisions themselves), never its own submissions."""
        who = requester(user)
        facts = await self._repo.disclosure_facts(uow.tx, child_id, uow.now, user_id=who.user_id)
        handling = None
        if concern is not None and concern.HasField("intelligence") and concern.intelligence.handling_code:
            code = HandlingCode.C if concern.intelligence.handling_code == pb.HANDLING_CODE_C else HandlingCode.P
            # The conditions' text stays sealed until the policy has decided; that they exist is enough.
            handling = IntelligenceHandling(code, "recorded with the intelligence" if code is HandlingCode.C else "")
        grant = await self._break_glass(uow, who, child_id, facts.grants)
        return DisclosureContext(
            who,
            break_glass=grant,
            consent=facts.consent,
            sharing_decisions=facts.decisions,
            handling=handling,
            involvement=frozenset({Involvement.REFERRED}) if who.agency in facts.routed else frozenset(),
            referring_agency=referring or (concern is not None and who.agency == concern.agency),
            at=uow.now,
        )

    async def get_referral(self, caller: Principal | None, referral_id: str) -> tuple[pb.Referral, tuple[str, ...]]:
        """The referral as the caller may see it (the screening reason is social care's), audited;
        NOT_FOUND for a caller with no basis for the child. An agency whose concern is in it is
        told its status and outcome (WT23), and sees only its own concerns listed, unless it has a
        basis for the child."""

        async def work(uow: UnitOfWork) -> tuple[pb.Referral, tuple[str, ...]] | None:
            found = await self._repo.get_referral(uow.tx, referral_id)
            if found is None:
                raise NotFound("referral not found")
            referral = found[0]
            if uow.caller is None:  # INSECURE_DEV only: the guard refuses services without a person
                return referral, ()
            concerns = await self._repo.referral_concerns(uow.tx, referral_id)
            agency = AGENCY_BY_NAME.get(uow.caller.agency)
            context = await self._disclosure_context(uow, uow.caller, referral.child_id)
            if any(a == agency for _, a in concerns) and not self._discloser.visible(context).allowed:
                # Its own concerns only: the others are other agencies' records.
                referral.concern_ids[:] = [concern_id for concern_id, a in concerns if a == agency]
                context = dataclasses.replace(context, referring_agency=True)
            disclosed = await self._discloser.disclose_if_visible(
                uow.tx, referral, context, record_type="referral", record_id=referral_id, child_id=referral.child_id
            )
            return None if disclosed is None else (referral, disclosed.redacted_fields)

        shown = await self._units.run(work, caller=caller)
        if shown is None:  # raised after the commit, so the audited refusal stays
            raise NotFound("referral not found")
        return shown

    async def record_screening_decision(
        self, caller: Principal | None, request: pb.RecordScreeningDecisionRequest
    ) -> pb.RecordScreeningDecisionResponse:
        self._require_social_care("record_screening_decision", caller)

        async def work(uow: UnitOfWork) -> pb.RecordScreeningDecisionResponse:
            found = await self._repo.get_referral(uow.tx, request.referral_id)
            if found is None:
                raise NotFound("referral not found")
            referral, version = found
            uow.seals_under(child_scope(referral.child_id))
            if referral.status != pb.REFERRAL_STATUS_AWAITING_DECISION:
                raise FailedPrecondition(
                    "referral already has a screening decision",
                    subject=f"referrals/{request.referral_id}",
                    reason="REFERRAL_ALREADY_DECIDED",
                )
            if await self._repo.has_open_match(uow.tx, referral.child_id):
                raise FailedPrecondition(
                    "the child may be a known child: resolve the possible match first",
                    subject=f"referrals/{request.referral_id}",
                    reason="POSSIBLE_MATCH_UNRESOLVED",
                )
            now = uow.now
            referral.status = domain.status_after(request.outcome)
            referral.outcome = request.outcome
            referral.reason = request.reason
            referral.decided_by = request.decided_by
            referral.strategy_discussion_on = request.strategy_discussion_on
            referral.decided_at.CopyFrom(ts(now))
            if not await self._repo.record_decision(uow.tx, referral, version):
                raise Aborted("referral changed concurrently; read it again")
            # Routed: open until conferences announces its conference; no further action: may close.
            await self._cases.evaluate(uow, referral.child_id, now)
            concerns = await self._repo.referral_concerns(uow.tx, referral.referral_id)
            referring = sorted({agency for _, agency in concerns})
            intervention = domain.ROUTES.get(request.outcome)
            if intervention is not None:
                # The routing is what opens the child's records to the referring agencies.
                for agency in referring:
                    await self._discloser.audit_involvement(
                        uow.tx,
                        requester(_user(uow.caller)),
                        agency,
                        basis=Involvement.REFERRED,
                        record_id=referral.referral_id,
                        child_id=referral.child_id,
                    )
                await uow.publish(
                    events.ReferralRouted(
                        referral_id=referral.referral_id,
                        child_id=referral.child_id,
                        intervention=intervention,
                        strategy_discussion_on=request.strategy_discussion_on,
                        routed_at=referral.decided_at,
                        referring_agencies=referring,
                    ),
                )
            await self._tell_referrers(uow, referral, concerns)
            return pb.RecordScreeningDecisionResponse(referral=referral)

        response = await self._units.run(
            work,
            caller=caller,
            once=Once(
                f"screening_decision:{request.referral_id}",
                request.idempotency_key,
                request,
                pb.RecordScreeningDecisionResponse,
            ),
        )
        return response

    async def _tell_referrers(self, uow: UnitOfWork, referral: pb.Referral, concerns: list[tuple[str, int]]) -> None:
        """Each referring agency hears the outcome (never the reasons) on its partner subject, as the
        policy decides for that agency and audits (WT23: the referrer is told the decision)."""
        for agency in sorted({a for _, a in concerns}):
            if not await self._discloser.may_publish_to(
                uow.tx,
                agency,
                self._state,
                involvement=frozenset(),
                referring=True,
                record_type="referral",
                record_id=referral.referral_id,
                child_id=referral.child_id,
                at=uow.now,
            ):
                continue
            await uow.publish(
                events.ReferralDecided(
                    referral_id=referral.referral_id,
                    child_id=referral.child_id,
                    agency=agency,
                    concern_ids=[concern_id for concern_id, a in concerns if a == agency],
                    outcome=referral.outcome,
                    decided_at=referral.decided_at,
                ),
                agency=AGENCY_NAME[agency],
            )

    # Possible matches ----------------------------------------------------------------------------
    async def list_possible_matches(
        self, caller: Principal | None, include_resolved: bool
    ) -> pb.ListPossibleMatchesResponse:
        self._require_social_care("list_possible_matches", caller)
        async with self._db.session() as session:
            matches = await self._repo.possible_matches(session, include_resolved=include_resolved)
        return pb.ListPossibleMatchesResponse(matches=matches)

    async def resolve_possible_match(
        self, caller: Principal | None, request: pb.ResolvePossibleMatchRequest
    ) -> pb.ResolvePossibleMatchResponse:
        """The MASH's recorded decision on a possible match. The same child: the new record's
        concerns and open referral move to the known child (ChildrenMerged tells the panel); a
        different child: both stay. Either way the child can then be screened."""
        self._require_social_care("resolve_possible_match", caller)

        async def work(uow: UnitOfWork) -> pb.ResolvePossibleMatchResponse:
            found = await self._repo.possible_matches(uow.tx, match_id=request.match_id, include_resolved=True)
            if not found:
                raise NotFound("possible match not found")
            match = found[0]
            uow.seals_under(child_scope(match.child_id))
            if match.status != pb.POSSIBLE_MATCH_STATUS_OPEN:
                raise FailedPrecondition(
                    "the possible match is already resolved",
                    subject=f"possible_matches/{request.match_id}",
                    reason="POSSIBLE_MATCH_ALREADY_RESOLVED",
                )
            now = uow.now
            match.status = (
                pb.POSSIBLE_MATCH_STATUS_SAME_CHILD if request.same_child else pb.POSSIBLE_MATCH_STATUS_DIFFERENT_CHILD
            )
            match.reason = request.reason
            match.resolved_by = actor_id(uow.caller)
            match.resolved_at.CopyFrom(ts(now))
            if not await self._repo.resolve_match(uow.tx, match):
                raise Aborted("the possible match changed concurrently; read it again")
            if request.same_child:
                await self._repo.merge_child(uow.tx, match.new_child_id, match.child_id, now)
                await self._cases.forget(uow, match.new_child_id)
                await self._cases.evaluate(uow, match.child_id, now)  # its referral joined: open
                await uow.publish(
                    events.ChildrenMerged(
                        match_id=match.match_id,
                        from_child_id=match.new_child_id,
                        into_child_id=match.child_id,
                        merged_at=match.resolved_at,
                    ),
                )
            return pb.ResolvePossibleMatchResponse(match=match)

        response = await self._units.run(
            work,
            caller=caller,
            once=Once(
                f"possible_match:{request.match_id}", request.idempotency_key, request, pb.ResolvePossibleMatchResponse
            ),
        )
        return response

    # Consent and sharing decisions ------------------------------------------------------------
    async def record_consent(
        self, caller: Principal | None, request: pb.RecordConsentRequest
    ) -> pb.RecordConsentResponse:
        self._require_social_care("record_consent", caller)

        async def work(uow: UnitOfWork) -> pb.RecordConsentResponse:
            uow.seals_under(child_scope(request.child_id))
            if not await self._repo.child_exists(uow.tx, request.child_id):
                raise NotFound("child not found")
            previous = await self._repo.current_consent(uow.tx, request.child_id)
            record = pb.ConsentRecord(
                child_id=request.child_id,
                status=request.status,
                given_by=request.given_by,
                agencies=request.agencies,
                data_classes=request.data_classes,
                reason_not_sought=request.reason_not_sought,
                recorded_by=actor_id(uow.caller),
                recorded_at=ts(uow.now),
                version=(previous.version if previous else 0) + 1,
            )
            await self._repo.add_consent(uow.tx, record)
            await uow.publish(
                safeguarding_events.ConsentChanged(
                    child_id=record.child_id,
                    status=record.status,
                    agencies=record.agencies,
                    data_classes=record.data_classes,
                    version=record.version,
                    changed_at=record.recorded_at,
                ),
            )
            return pb.RecordConsentResponse(consent=record)

        response = await self._units.run(
            work,
            caller=caller,
            once=Once(f"consent:{request.child_id}", request.idempotency_key, request, pb.RecordConsentResponse),
        )
        return response

    async def record_sharing_decision(
        self, caller: Principal | None, request: pb.RecordSharingDecisionRequest
    ) -> pb.RecordSharingDecisionResponse:
        self._require_social_care("record_sharing_decision", caller)

        async def work(uow: UnitOfWork) -> pb.RecordSharingDecisionResponse:
            uow.seals_under(child_scope(request.child_id))
            if not await self._repo.child_exists(uow.tx, request.child_id):
                raise NotFound("child not found")
            decision = pb.SharingDecision(
                decision_id=str(uuid.uuid4()),
                child_id=request.child_id,
                share=request.share,
                lawful_basis=request.lawful_basis,
                reason=request.reason,
                approver=request.approver,
                decided_by=actor_id(uow.caller),
                decided_at=ts(uow.now),
                agencies=request.agencies,
                data_classes=request.data_classes,
            )
            if request.HasField("expires_at"):
                decision.expires_at.CopyFrom(request.expires_at)
            await self._repo.add_sharing_decision(uow.tx, decision)
            if decision.share:  # a decision to share opens the child's records to these agencies
                for agency in decision.agencies:
                    await self._discloser.audit_involvement(
                        uow.tx,
                        requester(_user(uow.caller)),
                        agency,
                        basis=Involvement.SHARING_DECISION,
                        record_id=decision.decision_id,
                        child_id=decision.child_id,
                    )
            recorded = safeguarding_events.SharingDecisionRecorded(
                decision_id=decision.decision_id,
                child_id=decision.child_id,
                share=decision.share,
                lawful_basis=decision.lawful_basis,
                approver=decision.approver,
                agencies=decision.agencies,
                data_classes=decision.data_classes,
                decided_at=decision.decided_at,
            )
            if decision.HasField("expires_at"):
                recorded.expires_at.CopyFrom(decision.expires_at)
            await uow.publish(recorded)
            return pb.RecordSharingDecisionResponse(decision=decision)

        response = await self._units.run(
            work,
            caller=caller,
            once=Once(
                f"sharing:{request.child_id}", request.idempotency_key, request, pb.RecordSharingDecisionResponse
            ),
        )
        return response

    async def get_disclosure_state(self, caller: Principal | None, child_id: str) -> pb.GetDisclosureStateResponse:
        self._require_social_care("get_disclosure_state", caller)
        async with self._db.session() as session:
            if not await self._repo.child_exists(session, child_id):
                raise NotFound("child not found")
            consent = await self._repo.current_consent(session, child_id)
            decisions = await self._repo.active_sharing_decisions(session, child_id, self._units.clock())
        response = pb.GetDisclosureStateResponse(decisions=decisions)
        if consent is not None:
            response.consent.CopyFrom(consent)
        return response

    # Break-glass -------------------------------------------------------------------------------
    async def start_break_glass(
        self, caller: Principal | None, request: pb.StartBreakGlassRequest
    ) -> pb.StartBreakGlassResponse:
        user = caller
        if user is None:
            raise PermissionDenied("break-glass is granted to a named user", reason="USER_REQUIRED")
        who = requester(user)

        async def work(uow: UnitOfWork) -> pb.StartBreakGlassResponse:
            uow.seals_under(child_scope(request.child_id))
            if not await self._repo.child_exists(uow.tx, request.child_id):
                raise NotFound("child not found")
            now = uow.now
            grant = pb.BreakGlassGrant(
                grant_id=str(uuid.uuid4()),
                child_id=request.child_id,
                user_id=user.user_id,
                agency=who.agency,
                reason=request.reason,
                granted_at=ts(now),
                expires_at=ts(now + domain.BREAK_GLASS_FOR),
                review_due_at=ts(now + domain.BREAK_GLASS_REVIEW_WITHIN),
            )
            await self._repo.add_grant(uow.tx, grant)
            # Every service holds the grant in its view, so the emergency read works wherever the
            # child's records are, and ends everywhere when it expires.
            await uow.publish(
                safeguarding_events.BreakGlassGranted(
                    grant_id=grant.grant_id,
                    child_id=grant.child_id,
                    user_id=grant.user_id,
                    agency=grant.agency,
                    granted_at=grant.granted_at,
                    expires_at=grant.expires_at,
                ),
            )
            await self._discloser.audit_action(
                uow.tx,
                who,
                "break_glass_start",
                rule_id="break-glass-grant",
                record_type="break_glass_grant",
                record_id=grant.grant_id,
                child_id=grant.child_id,
            )
            return pb.StartBreakGlassResponse(grant=grant)

        response = await self._units.run(
            work,
            caller=caller,
            once=Once(f"break_glass:{user.user_id}", request.idempotency_key, request, pb.StartBreakGlassResponse),
        )
        return response

    async def record_break_glass_review(
        self, caller: Principal | None, request: pb.RecordBreakGlassReviewRequest
    ) -> pb.RecordBreakGlassReviewResponse:
        """The review a grant promises, by a second person within 72 hours (late reviews are still
        recorded, and stay visible as late)."""
        user = caller
        # Who may review is policy; that the reviewer is not the grantee is a fact of the grant,
        # checked below in the use case.
        if user is None or not self._policy.permits_caller("review_break_glass", user).allowed:
            raise PermissionDenied(
                "break-glass is reviewed by social care's MASH manager or data protection officer",
                reason="BREAK_GLASS_REVIEWER_ONLY",
            )
        who = requester(user)

        async def work(uow: UnitOfWork) -> pb.RecordBreakGlassReviewResponse:
            grant = await self._repo.get_grant(uow.tx, request.grant_id)
            if grant is None:
                raise NotFound("break-glass grant not found")
            uow.seals_under(child_scope(grant.child_id))
            if grant.user_id == user.user_id:
                raise FailedPrecondition(
                    "a grant is reviewed by a second person, never its own user",
                    subject=f"break_glass_grants/{request.grant_id}",
                    reason="REVIEWER_IS_GRANTEE",
                )
            if grant.reviewed_by:
                raise FailedPrecondition(
                    "the grant was already reviewed",
                    subject=f"break_glass_grants/{request.grant_id}",
                    reason="BREAK_GLASS_ALREADY_REVIEWED",
                )
            grant.reviewed_by = user.user_id
            grant.reviewed_at.CopyFrom(ts(uow.now))
            grant.review_outcome = request.outcome
            grant.review_notes = request.notes
            if not await self._repo.record_review(uow.tx, grant):
                raise Aborted("the grant was reviewed concurrently; read it again")
            await self._discloser.audit_action(
                uow.tx,
                who,
                "break_glass_review",
                rule_id="break-glass-review",
                record_type="break_glass_grant",
                record_id=grant.grant_id,
                child_id=grant.child_id,
            )
            return pb.RecordBreakGlassReviewResponse(grant=grant)

        response = await self._units.run(
            work,
            caller=caller,
            once=Once(
                f"break_glass_review:{request.grant_id}",
                request.idempotency_key,
                request,
                pb.RecordBreakGlassReviewResponse,
            ),
        )
        return response

    def _require_social_care(self, command: str, caller: Principal | None) -> None:
        if not self._policy.permits_caller(command, caller).allowed:
            raise PermissionDenied("only social care records this", reason="SOCIAL_CARE_ONLY")

    async def _break_glass(
        self, uow: UnitOfWork, who: Requester, child_id: str, grants: tuple[Grant, ...]
    ) -> BreakGlassGrant | None:
        """The user's active grant for the child; a grant seen expired is audited as ended, once."""
        now = uow.now
        active = None
        for row in grants:
            if now < row.expires_at:
                active = BreakGlassGrant(row.grant_id, who.user_id, "granted", row.granted_at, row.expires_at)
                continue
            await self._discloser.audit_action(
                uow.tx,
                who,
                "break_glass_end",
                rule_id="break-glass-expired",
                record_type="break_glass_grant",
                record_id=row.grant_id,
                child_id=child_id,
            )
            await self._repo.mark_grant_end_audited(uow.tx, row.grant_id)
        return active


class _ChildState:
    """The child's consent and sharing decisions as the policy takes them, from referrals' own records."""

    def __init__(self, repo: ReferralsRepository, units: UnitsOfWork) -> None:
        self._repo, self._units = repo, units

    async def load(self, session: Tx, child_id: str) -> tuple[Consent, tuple[SharingDecision, ...]]:
        facts = await self._repo.disclosure_facts(session, child_id, self._units.clock())
        return facts.consent, facts.decisions


def _user(user: Principal | None) -> Principal:
    """The deciding user (decisions are only recorded by people: services have no such method)."""
    if user is None:
        return Principal("system", domain.SOCIAL_CARE, "social_worker", "referral_screening")
    return user


__all__ = ["ReferralsService", "types_pb2"]
