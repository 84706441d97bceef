"""The conferences service as this service sees it: one call, with a deadline."""

from __future__ import annotations

from typing import Protocol

import grpc

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import conferences_pb2_grpc


class ConferenceSource(Protocol):
    async def get_conference(self, conference_id: str) -> pb.Conference: ...


class ConferencesClient:
    """Errors surface as grpc.aio.AioRpcError (UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND...): the
    caller is an event handler, and a raise makes the consumer redeliver with backoff."""

    def __init__(self, channel: grpc.aio.Channel, timeout_seconds: float) -> None:
        self._stub = conferences_pb2_grpc.ConferencesServiceStub(channel)
        self._timeout = timeout_seconds

    async def get_conference(self, conference_id: str) -> pb.Conference:
        response: pb.GetConferenceResponse = await self._stub.GetConference(
            pb.GetConferenceRequest(conference_id=conference_id), timeout=self._timeout
        )
        return response.conference
