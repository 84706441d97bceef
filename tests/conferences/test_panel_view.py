"""The MARVE panel's view of each place a child protection conference considers, attached when social
care records the contexts: read from a panel stand-in on a real loopback gRPC server (the true
boundary of this service) through the real client; never taken from the caller; a panel that is
down or does not know the place leaves the view out, never the context. The running panel's own
answer is checked end to end in tests/e2e/test_conference_process.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from conferences_support import CHAIR, SOCIAL_WORKER, Harness, routed
from google.protobuf import timestamp_pb2
from sqlalchemy import select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.panel.v1 import panel_pb2, panel_pb2_grpc
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx.safeguarding.v1 import safeguarding_pb2
from csx.types.v1 import types_pb2
from csx_common.errors import PermissionDenied
from csx_common.identity import Principal
from csx_common.natsserver import free_port
from csx_conferences import tables
from csx_conferences.panel_client import PanelClient
from tests.support import server_credentials, service_channel

STATION = "plc-station"
FIRST_SEEN = timestamp_pb2.Timestamp(seconds=1_780_000_000)
POLICE = Principal("pc.jones", "police", "police_officer", "conference_participation")


class FakePanel(panel_pb2_grpc.PanelServiceServicer):
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def GetPlaceProfile(
        self, request: panel_pb2.GetPlaceProfileRequest, context: grpc.aio.ServicerContext
    ) -> panel_pb2.GetPlaceProfileResponse:
        self.asked.append(request.place_id)
        if request.place_id != STATION:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no concern names this place")
        return panel_pb2.GetPlaceProfileResponse(
            profile=panel_pb2.PlaceProfile(
                place_id=STATION,
                concern_count=7,
                child_count=4,
                harm_types=[types_pb2.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION],
                reporting_agencies=[types_pb2.AGENCY_POLICE, types_pb2.AGENCY_TRANSPORT],
                first_seen_at=FIRST_SEEN,
                last_seen_at=timestamp_pb2.Timestamp(seconds=1_790_000_000),
                flagged_for_panel=True,
            )
        )


@pytest.fixture
async def panel() -> AsyncIterator[tuple[FakePanel, str]]:
    servicer = FakePanel()
    server = grpc.aio.server()
    panel_pb2_grpc.add_PanelServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials("panel"))
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


def with_panel(h: Harness, address: str) -> grpc.aio.Channel:
    channel = service_channel(address, "conferences")
    h.service._panel = PanelClient(channel, timeout_seconds=2.0)
    return channel


async def initial(h: Harness) -> pb.Conference:
    """An initial child protection conference the police referred (so the police are invited)."""
    child_id = str(uuid.uuid4())
    event = routed(str(uuid.uuid4()), child_id, types_pb2.INTERVENTION_A, strategy_discussion_on="2026-03-02")
    event.referring_agencies.append(types_pb2.AGENCY_POLICE)
    await h.deliver(event)
    (found,) = (await h.service.list_conferences(None, child_id))[0]
    return found


def contexts(c: pb.Conference, *places: str) -> pb.RecordConferenceContextRequest:
    request = pb.RecordConferenceContextRequest(
        conference_id=c.conference_id,
        idempotency_key=f"ctx-{uuid.uuid4().hex[:16]}",
        expected_version=c.version,
        grounds=[types_pb2.HARM_TYPE_NEGLECT],
    )
    for place in places:
        request.contexts.add(place_id=place, context_type=types_pb2.CONTEXT_TYPE_TRANSPORT)
    request.contexts.add(context_type=types_pb2.CONTEXT_TYPE_PEER_GROUP)
    return request


async def test_the_panels_view_of_each_place_is_attached_and_a_callers_is_discarded(
    harness: Harness, panel: tuple[FakePanel, str]
) -> None:
    h, (fake, address) = harness, panel
    channel = with_panel(h, address)
    try:
        request = contexts(await initial(h), STATION, "plc-nobody-named", STATION)
        # A caller's own "panel view" is not the panel's: discarded.
        request.contexts[1].panel_view.CopyFrom(pb.PanelView(child_count=99, flagged_for_panel=True))
        recorded = (await h.service.record_conference_context(SOCIAL_WORKER, request)).conference
    finally:
        await channel.close()
    station, unknown, again, peers = recorded.contexts
    view = station.panel_view
    assert (view.concern_count, view.child_count, view.flagged_for_panel) == (7, 4, True)
    assert list(view.harm_types) == [types_pb2.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION]
    assert list(view.reporting_agencies) == [types_pb2.AGENCY_POLICE, types_pb2.AGENCY_TRANSPORT]
    assert view.first_seen_at == FIRST_SEEN and view.read_at.ToDatetime() == h.clock.now.replace(tzinfo=None)
    assert not unknown.HasField("panel_view") and not peers.HasField("panel_view")  # unknown place; a peer group
    assert again.panel_view == view  # a place named twice: read once, attached to both
    assert sorted(fake.asked) == ["plc-nobody-named", STATION]  # each place once; never for a peer group
    # Read back as the chair (the conference's record, through the policy).
    for_chair, _ = await h.service.get_conference(CHAIR, recorded.conference_id)
    assert for_chair.contexts[0].panel_view.child_count == 4
    # The read is audited, for the person who caused it.
    log = tables.audit.log.c
    async with h.db.session() as s:
        audited = (
            await s.execute(
                select(log.actor_user_id, log.record_id, log.rule_id).where(log.record_type == "place_profile")
            )
        ).all()
    assert [tuple(row) for row in audited] == [(SOCIAL_WORKER.user_id, STATION, "conference-panel-view")]


async def test_a_partner_never_reads_the_panels_view_even_with_the_childs_consent(
    harness: Harness, panel: tuple[FakePanel, str]
) -> None:
    h, (_, address) = harness, panel
    channel = with_panel(h, address)
    try:
        recorded = (
            await h.service.record_conference_context(SOCIAL_WORKER, contexts(await initial(h), STATION))
        ).conference
    finally:
        await channel.close()
    async with h.units.begin() as uow:  # the family consents to sharing everything with every agency
        consent = safeguarding_events.ConsentChanged(
            child_id=recorded.child_id, status=safeguarding_pb2.CONSENT_STATUS_GIVEN, version=1
        )
        await h.service._views._on_consent(uow, consent)
    shown, redacted = await h.service.get_conference(POLICE, recorded.conference_id)
    assert shown.contexts[0].place_id == STATION  # the police, invited, see the context itself
    assert shown.contexts[0].panel_view == pb.PanelView()  # not one figure about other children
    assert "contexts[0].panel_view.child_count" in redacted and "contexts[0].panel_view.read_at" in redacted


async def test_a_panel_that_does_not_answer_leaves_the_view_out_and_records_the_context(harness: Harness) -> None:
    h = harness
    channel = with_panel(h, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        recorded = (
            await h.service.record_conference_context(SOCIAL_WORKER, contexts(await initial(h), STATION))
        ).conference
    finally:
        await channel.close()
    assert [c.place_id for c in recorded.contexts] == [STATION, ""]
    assert not recorded.contexts[0].HasField("panel_view")


async def test_the_panel_is_not_asked_for_a_caller_who_may_not_record_contexts(
    harness: Harness, panel: tuple[FakePanel, str]
) -> None:
    h, (fake, address) = harness, panel
    channel = with_panel(h, address)
    try:
        with pytest.raises(PermissionDenied):
            await h.service.record_conference_context(POLICE, contexts(await initial(h), STATION))
    finally:
        await channel.close()
    assert fake.asked == []
