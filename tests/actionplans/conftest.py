"""A stand-in conferences service on a real loopback gRPC server: the true boundary of actionplans."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import timestamp_pb2

from csx.conferences.v1 import conferences_pb2 as cpb
from csx.conferences.v1 import conferences_pb2_grpc
from csx.conferences.v1 import events_pb2 as cev
from csx.types.v1 import types_pb2 as t
from tests.support import server_credentials

CANARY = "CANARY-ACTION-7f3a"


class FakeConferences(conferences_pb2_grpc.ConferencesServiceServicer):
    def __init__(self) -> None:
        self.conferences: dict[str, cpb.Conference] = {}
        self.calls = 0
        self.down = False
        self.delay = 0.0
        self.traceparents: list[str] = []

    async def GetConference(
        self, request: cpb.GetConferenceRequest, context: grpc.aio.ServicerContext
    ) -> cpb.GetConferenceResponse:
        self.calls += 1
        metadata = dict(context.invocation_metadata() or ())
        if "traceparent" in metadata:
            self.traceparents.append(str(metadata["traceparent"]))
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "conferences is down")
        if self.delay:
            await asyncio.sleep(self.delay)
        found = self.conferences.get(request.conference_id)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "conference not found")
        return cpb.GetConferenceResponse(conference=found)

    def conclude(
        self,
        outcome: int = cpb.CONFERENCE_OUTCOME_CHILD_PROTECTION_PLAN,
        actions: list[cpb.AgreedAction] | None = None,
        child_id: str | None = None,
    ) -> cev.ConferenceConcluded:
        """Store a concluded conference and return the thin event conferences would publish."""
        if actions is None:
            actions = default_actions()
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        conference = cpb.Conference(
            conference_id=str(uuid.uuid4()),
            kind=cpb.CONFERENCE_KIND_INITIAL_CHILD_PROTECTION,
            status=cpb.CONFERENCE_STATUS_CONCLUDED,
            child_id=child_id or str(uuid.uuid4()),
            outcome=outcome,
            summary="CANARY-SUMMARY not for actionplans",
            actions=actions,
            chair="chair@la.example",
            concluded_at=now,
            version=2,
        )
        self.conferences[conference.conference_id] = conference
        return cev.ConferenceConcluded(
            conference_id=conference.conference_id,
            child_id=conference.child_id,
            kind=conference.kind,
            outcome=outcome,
            action_count=len(actions),
            concluded_at=now,
        )


def default_actions() -> list[cpb.AgreedAction]:
    return [
        cpb.AgreedAction(owner_agency=t.AGENCY_POLICE, description=f"{CANARY} patrol the park", due_on="2026-12-01"),
        cpb.AgreedAction(
            owner_agency=t.AGENCY_EDUCATION, description=f"{CANARY} mentor at school", due_on="2026-12-05"
        ),
        cpb.AgreedAction(owner_agency=t.AGENCY_POLICE, description=f"{CANARY} disrupt contact", due_on="2026-12-10"),
    ]


class ConferencesServer:
    def __init__(self, servicer: FakeConferences, server: grpc.aio.Server, port: int) -> None:
        self.servicer, self.server, self.port = servicer, server, port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def conferences() -> AsyncIterator[ConferencesServer]:
    servicer = FakeConferences()
    server = grpc.aio.server()
    conferences_pb2_grpc.add_ConferencesServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials("conferences"))
    await server.start()
    yield ConferencesServer(servicer, server, port)
    await server.stop(None)
