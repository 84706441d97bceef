"""gRPC adapter: requests arrive validated (the interceptor ran the proto rules) and identified; the
caller the interceptor established is handed to each use case."""

from __future__ import annotations

import grpc

from csx.conferences.v1 import conferences_pb2 as pb
from csx.conferences.v1 import conferences_pb2_grpc
from csx_common.identity import current_user
from csx_conferences.service import ConferencesService


class ConferencesApi(conferences_pb2_grpc.ConferencesServiceServicer):
    def __init__(self, service: ConferencesService) -> None:
        self._service = service

    async def GetConference(
        self, request: pb.GetConferenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConferenceResponse:
        conference, redacted = await self._service.get_conference(current_user(), request.conference_id)
        return pb.GetConferenceResponse(conference=conference, redacted_fields=redacted)

    async def ListConferences(
        self, request: pb.ListConferencesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConferencesResponse:
        conferences, redacted = await self._service.list_conferences(current_user(), request.child_id)
        return pb.ListConferencesResponse(conferences=conferences, redacted_fields=redacted)

    async def ConcludeConference(
        self, request: pb.ConcludeConferenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConcludeConferenceResponse:
        return await self._service.conclude_conference(current_user(), request)
