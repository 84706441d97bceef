"""The service on the wire: gRPC statuses through the real guard, and routing events through
a real JetStream consumer with the outbox relay publishing ConferenceScheduled."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from conferences_support import CHAIR, Harness, held, routed
from google.rpc import error_details_pb2
from nats.js.errors import NotFoundError
from sqlalchemy import select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import conferences_pb2_grpc
from csx.conferences.v1 import events_pb2 as events
from csx.types.v1 import types_pb2
from csx_common.errors import field_violations, status_details
from csx_common.grpc_server import GrpcServer
from csx_common.identity import TokenVerifier
from csx_common.messaging.consumer import InboxConsumer
from csx_common.messaging.events import MSG_ID_HEADER, StreamSpec
from csx_common.messaging.relay import Relay
from csx_common.messaging.streams import connect, ensure_stream
from csx_common.messaging.topology import topology
from csx_common.pki import PeerIdentity
from csx_conferences import tables
from csx_conferences.consumers import referrals_consumer
from csx_conferences.grpc_api import ConferencesApi
from tests.support import dev_pki, user, user_channel

REFERRALS = topology().stream("referrals")


@pytest.fixture
async def stub(harness: Harness) -> AsyncIterator[conferences_pb2_grpc.ConferencesServiceStub]:
    server = GrpcServer(
        "127.0.0.1:0",
        max_concurrent_rpcs=16,
        max_message_bytes=1 << 20,
        default_deadline=10,
        reflection_on=False,
        credentials=dev_pki().credentials(PeerIdentity("service", "conferences")),
        verifier=TokenVerifier(dev_pki().token_public_file.read_bytes()),
    )
    server.add(
        conferences_pb2_grpc.add_ConferencesServiceServicer_to_server,
        ConferencesApi(harness.service),
        pb.DESCRIPTOR.services_by_name["ConferencesService"].full_name,
    )
    await server.start()
    async with user_channel(f"127.0.0.1:{server.port}", CHAIR) as channel:
        yield conferences_pb2_grpc.ConferencesServiceStub(channel)
    await server.stop(0)


def reason(err: grpc.aio.AioRpcError) -> str:
    status = status_details(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def test_grpc_statuses(harness: Harness, stub: conferences_pb2_grpc.ConferencesServiceStub) -> None:
    referral_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
    await harness.deliver(routed(referral_id, child_id))
    (conference,) = (await stub.ListConferences(pb.ListConferencesRequest(child_id=child_id))).conferences
    assert (await stub.GetConference(pb.GetConferenceRequest(conference_id=conference.conference_id))).conference == (
        conference
    )
    empty = await stub.ListConferences(pb.ListConferencesRequest(child_id=str(uuid.uuid4())))
    assert list(empty.conferences) == []

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetConference(pb.GetConferenceRequest(conference_id="not-a-uuid"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["conference_id"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetConference(pb.GetConferenceRequest(conference_id=str(uuid.uuid4())))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    conference = await held(harness, conference)
    request = pb.ConcludeConferenceRequest(
        conference_id=conference.conference_id,
        idempotency_key="grpc-conclude-01",
        expected_version=conference.version,
        outcome=pb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN,
        summary="Review held with the family and partners.",
        actions=[pb.AgreedAction(owner_agency=types_pb2.AGENCY_POLICE, description="Patrols", due_on="2026-03-16")],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ConcludeConference(request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(err.value) == "OUTCOME_NOT_ALLOWED_FOR_KIND"

    request.outcome = pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN
    request.expected_version = conference.version + 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ConcludeConference(request)
    assert err.value.code() == grpc.StatusCode.ABORTED

    # A plan outcome without actions breaks the proto's message rule.
    request.expected_version = conference.version
    del request.actions[:]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ConcludeConference(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    request.actions.add(owner_agency=types_pb2.AGENCY_POLICE, description="Patrols", due_on="2026-03-16")
    done = (await stub.ConcludeConference(request)).conference
    assert done.status == pb.CONFERENCE_STATUS_CONCLUDED and done.version == conference.version + 1
    assert (await stub.ConcludeConference(request)).conference == done


async def test_routing_event_over_jetstream(harness: Harness, nats_url: str) -> None:
    nc = await connect(nats_url, "conferences-test")
    js = nc.jetstream()
    conferences_stream = StreamSpec.for_service("conferences")
    await ensure_stream(js, REFERRALS)
    await ensure_stream(js, conferences_stream)
    # A durable of its own: the session's NATS is shared with other tests.
    spec = dataclasses.replace(referrals_consumer(harness.service), durable=f"conferences-test-{uuid.uuid4().hex}")
    consumer = InboxConsumer(harness.units, tables.delivery, js, spec)
    relay = Relay(harness.db, tables.delivery, js, poll_seconds=0.05)
    await consumer.declare()
    consumer.start()
    relay.start()
    try:
        referral_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
        event = routed(referral_id, child_id, types_pb2.INTERVENTION_A, strategy_discussion_on="2026-12-18")
        subject = REFERRALS.subject("referral_routed")
        for msg_id in ("evt-1", "evt-1", "evt-2"):  # a broker duplicate, then a second announcement
            await js.publish(subject, event.SerializeToString(), headers={MSG_ID_HEADER: f"{referral_id}-{msg_id}"})

        scheduled_subject = conferences_stream.subject("conference_scheduled")

        async def announced() -> events.ConferenceScheduled | None:
            try:
                last = await js.get_last_msg(conferences_stream.name, scheduled_subject)
            except NotFoundError:
                return None
            found = events.ConferenceScheduled.FromString(last.data)
            return found if found.child_id == child_id else None

        async def inbox_ids() -> set[str]:
            inbox = tables.delivery.inbox.c
            async with harness.db.session() as s:
                return set((await s.execute(select(inbox.msg_id).where(inbox.consumer == spec.durable))).scalars())

        both = {f"{referral_id}-evt-1", f"{referral_id}-evt-2"}
        for _ in range(200):
            if both <= await inbox_ids() and await announced():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("routing events not consumed, or the conference not announced")
        (conference,) = (await harness.service.list_conferences(None, child_id))[0]
        assert conference.kind == pb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION
        assert conference.due_on == "2027-01-13"
        scheduled = await announced()
        assert scheduled is not None and scheduled.conference_id == conference.conference_id
    finally:
        await relay.stop()
        await consumer.stop()
        await js.delete_consumer(REFERRALS.name, spec.durable)
        await nc.drain()


async def test_only_social_care_concludes_and_a_refusal_writes_nothing(harness: Harness) -> None:
    from sqlalchemy import func, select

    from csx_common.errors import PermissionDenied
    from csx_conferences import tables

    referral_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
    await harness.deliver(routed(referral_id, child_id))
    (conference,) = (await harness.service.list_conferences(None, child_id))[0]
    request = pb.ConcludeConferenceRequest(
        conference_id=conference.conference_id,
        idempotency_key="conclude-nurse-1",
        expected_version=conference.version,
        outcome=pb.CONFERENCE_OUTCOME_CONTEXTUAL_SAFEGUARDING_PLAN,
        summary="A plan the nurse has no authority to agree.",
        actions=[pb.AgreedAction(owner_agency=2, description="Health check", due_on="2027-02-01")],
    )
    nurse = user("health", "health_safeguarding_nurse")
    with pytest.raises(PermissionDenied) as err:
        await harness.service.conclude_conference(nurse, request)
    assert err.value.reason == "CHAIR_ONLY"
    async with harness.db.session() as s:
        events = (await s.execute(select(func.count()).select_from(tables.delivery.outbox))).scalar_one()
    assert events == 1  # only ConferenceScheduled: no conclusion, no event for the refused request
    (shown, _) = await harness.service.get_conference(None, conference.conference_id)
    assert shown.status == pb.CONFERENCE_STATUS_SCHEDULED
