"""gRPC adapter: requests arrive validated (the guard ran the proto rules) and identified; the
caller the guard established is handed to each use case."""

from __future__ import annotations

import grpc

from csx.actionplans.v1 import actionplans_pb2 as pb
from csx.actionplans.v1 import actionplans_pb2_grpc
from csx_actionplans.service import ActionPlansService
from csx_common.identity import current_user


class ActionPlansApi(actionplans_pb2_grpc.ActionPlansServiceServicer):
    def __init__(self, service: ActionPlansService) -> None:
        self._service = service

    async def GetActionPlan(
        self, request: pb.GetActionPlanRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetActionPlanResponse:
        plan, redacted = await self._service.get_action_plan(current_user(), request.plan_id)
        return pb.GetActionPlanResponse(plan=plan, redacted_fields=redacted)

    async def ListActionPlans(
        self, request: pb.ListActionPlansRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListActionPlansResponse:
        plans, redacted = await self._service.list_action_plans(
            current_user(), child_id=request.child_id, conference_id=request.conference_id
        )
        return pb.ListActionPlansResponse(plans=plans, redacted_fields=redacted)

    async def UpdateAction(
        self, request: pb.UpdateActionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateActionResponse:
        return await self._service.update_action(current_user(), request)
