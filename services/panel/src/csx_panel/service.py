"""Panel use cases. Each read is a unit of work (csx_common.unit_of_work), so its audit entries
commit with it; the caller is given by the gRPC adapter, never looked up. The event handlers run in
the inbox consumer's unit of work: a concern's links, flag and outbox event commit with the inbox row."""

from __future__ import annotations

from datetime import UTC

from google.protobuf import message as pb_message

from csx.panel.v1 import events_pb2 as events
from csx.panel.v1 import panel_pb2 as pb
from csx.referrals.v1 import events_pb2 as referrals_events
from csx_common.errors import NotFound, PermissionDenied
from csx_common.identity import Principal
from csx_common.timestamps import ts
from csx_common.unit_of_work import UnitOfWork, UnitsOfWork
from csx_panel import domain
from csx_panel.repository import PanelRepository
from csx_safeguarding.disclosure import Discloser, DisclosureViews, Record, requester
from csx_safeguarding.policy import AGENCY_BY_NAME, Involvement, PolicyEngine

# The commands of this service, each named in the policy's `commands` section (checked at start-up).
COMMANDS = ("get_place_profile",)


class PanelService:
    def __init__(
        self,
        units: UnitsOfWork,
        repo: PanelRepository,
        flag_threshold_children: int,
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
        self._discloser = discloser
        self._views = views
        self._repo = repo
        self._threshold = flag_threshold_children

    async def on_concern_recorded(self, uow: UnitOfWork, event: pb_message.Message) -> None:
        """Handler for ConcernRecorded (one call per message id, via the inbox, checked at its edge)."""
        if not isinstance(event, referrals_events.ConcernRecorded):
            raise TypeError(f"unexpected event {event.DESCRIPTOR.full_name}")
        recorded_at = event.recorded_at.ToDatetime(tzinfo=UTC)
        fresh = await self._repo.add_concern(uow.tx, event.concern_id, event.child_id, event.agency, recorded_at)
        if not fresh:  # the same concern delivered again under another message id
            return
        harm_types = sorted(set(event.harm_types))
        flagged: list[events.PlaceFlagged] = []
        # Places in id order, so two concerns naming the same places lock them in the same order.
        for mention in sorted(domain.place_mentions(event.contexts), key=lambda m: m.place_id):
            already_flagged = await self._repo.lock_place(uow.tx, mention.place_id)
            await self._repo.add_place_link(
                uow.tx, event.concern_id, mention, event.child_id, event.agency, harm_types, recorded_at
            )
            if already_flagged:  # flagged once: nothing left to count
                continue
            reached = await self._repo.child_count(uow.tx, mention.place_id, up_to=self._threshold)
            if not domain.reaches_threshold(reached, self._threshold, already_flagged):
                continue
            count = await self._repo.child_count(uow.tx, mention.place_id)
            if await self._repo.flag_place(uow.tx, mention.place_id, uow.now):
                flagged.append(
                    events.PlaceFlagged(place_id=mention.place_id, child_count=count, flagged_at=ts(uow.now))
                )
        for place_flagged in flagged:
            await uow.publish(place_flagged)

    async def get_place_profile(self, caller: Principal | None, place_id: str) -> pb.PlaceProfile:
        """A place's aggregate, for the MARVE panel's work (panel analysis) and social care; audited.
        Below the flagging threshold a profile may describe one child, so it is not for browsing."""
        if not self._policy.permits_caller("get_place_profile", caller).allowed:
            raise PermissionDenied("place profiles are for panel analysis", reason="PANEL_ANALYSIS_ONLY")

        # A unit of work, not a plain read: the audit entry commits with it or the read fails.
        async def work(uow: UnitOfWork) -> pb.PlaceProfile:
            profile = await self._repo.place_profile(uow.tx, place_id)
            if profile is None:
                raise NotFound("no concern names this place")
            if uow.caller is not None:
                await self._discloser.audit_action(
                    uow.tx,
                    requester(uow.caller),
                    "read",
                    rule_id="panel-place-profile",
                    record_type="place_profile",
                    record_id=place_id,
                )
            return profile

        return await self._units.run(work, caller=caller)

    async def on_referral_routed(self, uow: UnitOfWork, event: pb_message.Message) -> None:
        """Handler for ReferralRouted: the referring agencies now have a basis."""
        if not isinstance(event, referrals_events.ReferralRouted):
            raise TypeError(f"unexpected event {event.DESCRIPTOR.full_name}")
        await self._repo.add_routed_agencies(uow.tx, event.child_id, list(event.referring_agencies))

    async def on_children_merged(self, uow: UnitOfWork, event: pb_message.Message) -> None:
        """Handler for ChildrenMerged: the MASH decided two records are one child."""
        if not isinstance(event, referrals_events.ChildrenMerged):
            raise TypeError(f"unexpected event {event.DESCRIPTOR.full_name}")
        await self._repo.merge_child(uow.tx, event.from_child_id, event.into_child_id)

    async def get_child_links(self, caller: Principal | None, child_id: str) -> pb.GetChildLinksResponse:
        """A child's links, for callers with a basis for the child (an agency whose concerns social
        care routed, social care, the panel in panel analysis); audited like every read."""

        async def work(uow: UnitOfWork) -> pb.GetChildLinksResponse | None:
            links = await self._repo.child_links(uow.tx, child_id)
            if links is None:
                raise NotFound("no concerns recorded about this child")
            agency = AGENCY_BY_NAME.get(uow.caller.agency) if uow.caller else None
            routed = agency in await self._repo.routed_agencies(uow.tx, child_id)
            record = Record(links, child_id, child_id, frozenset({Involvement.REFERRED}) if routed else frozenset())
            [(shown, _redacted)] = await self._discloser.disclose_records(
                uow.tx, uow.caller, [record], self._views, record_type="child_links", at=uow.now
            )
            return None if shown is None else links

        links = await self._units.run(work, caller=caller)
        if links is None:  # raised after the commit, so the audited refusal stays
            raise NotFound("no concerns recorded about this child")
        return links
