"""gRPC adapter: requests arrive validated (the guard ran the proto rules) and identified; the
caller the guard established is handed to each use case."""

from __future__ import annotations

import grpc

from csx.panel.v1 import panel_pb2 as pb
from csx.panel.v1 import panel_pb2_grpc
from csx_common.identity import current_user
from csx_panel.service import PanelService


class PanelApi(panel_pb2_grpc.PanelServiceServicer):
    def __init__(self, service: PanelService) -> None:
        self._service = service

    async def GetPlaceProfile(
        self, request: pb.GetPlaceProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPlaceProfileResponse:
        profile = await self._service.get_place_profile(current_user(), request.place_id)
        return pb.GetPlaceProfileResponse(profile=profile)

    async def GetChildLinks(
        self, request: pb.GetChildLinksRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetChildLinksResponse:
        return await self._service.get_child_links(current_user(), request.child_id)
