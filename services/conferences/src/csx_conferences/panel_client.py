"""The MARVE panel as this service sees it: a place's profile, read once when a conference records the
contexts it considers, with a deadline. The panel being down or slow never stops a conference: the
context is recorded without the panel's view, and recording it again later attaches one."""

from __future__ import annotations

from typing import Protocol

import grpc
import structlog

from csx.panel.v1 import panel_pb2, panel_pb2_grpc

log = structlog.get_logger("csx.conferences.panel")


class PanelSource(Protocol):
    async def place_profile(self, place_id: str) -> panel_pb2.PlaceProfile | None: ...


class PanelClient:
    def __init__(self, channel: grpc.aio.Channel, timeout_seconds: float) -> None:
        self._stub = panel_pb2_grpc.PanelServiceStub(channel)
        self._timeout = timeout_seconds

    async def place_profile(self, place_id: str) -> panel_pb2.PlaceProfile | None:
        """The panel's profile of the place; None when no concern names it, or the panel did not
        answer in time (logged with the status only: a place id is operational, but nothing else is)."""
        try:
            response: panel_pb2.GetPlaceProfileResponse = await self._stub.GetPlaceProfile(
                panel_pb2.GetPlaceProfileRequest(place_id=place_id), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("panel_view_unavailable", status=exc.code().name)
            return None
        return response.profile
