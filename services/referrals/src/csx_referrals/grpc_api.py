"""gRPC adapter: requests arrive validated (the guard ran the proto rules) and identified; the
caller the guard established is handed to each use case."""

from __future__ import annotations

import grpc

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_common.identity import current_user
from csx_referrals.erasure import ErasureService
from csx_referrals.service import ReferralsService


class ReferralsApi(referrals_pb2_grpc.ReferralsServiceServicer):
    def __init__(self, service: ReferralsService, erasure: ErasureService) -> None:
        self._service = service
        self._erasure = erasure

    async def SubmitConcern(
        self, request: pb.SubmitConcernRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitConcernResponse:
        return await self._service.submit_concern(current_user(), request)

    async def GetConcern(
        self, request: pb.GetConcernRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConcernResponse:
        concern, redacted = await self._service.get_concern(current_user(), request.concern_id)
        return pb.GetConcernResponse(concern=concern, redacted_fields=redacted)

    async def RecordScreeningDecision(
        self, request: pb.RecordScreeningDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordScreeningDecisionResponse:
        return await self._service.record_screening_decision(current_user(), request)

    async def GetReferral(
        self, request: pb.GetReferralRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetReferralResponse:
        referral, redacted = await self._service.get_referral(current_user(), request.referral_id)
        return pb.GetReferralResponse(referral=referral, redacted_fields=redacted)

    async def RecordConsent(
        self, request: pb.RecordConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordConsentResponse:
        return await self._service.record_consent(current_user(), request)

    async def RecordSharingDecision(
        self, request: pb.RecordSharingDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordSharingDecisionResponse:
        return await self._service.record_sharing_decision(current_user(), request)

    async def GetDisclosureState(
        self, request: pb.GetDisclosureStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDisclosureStateResponse:
        return await self._service.get_disclosure_state(current_user(), request.child_id)

    async def ListPossibleMatches(
        self, request: pb.ListPossibleMatchesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPossibleMatchesResponse:
        return await self._service.list_possible_matches(current_user(), request.include_resolved)

    async def ResolvePossibleMatch(
        self, request: pb.ResolvePossibleMatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolvePossibleMatchResponse:
        return await self._service.resolve_possible_match(current_user(), request)

    async def StartBreakGlass(
        self, request: pb.StartBreakGlassRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartBreakGlassResponse:
        return await self._service.start_break_glass(current_user(), request)

    async def RecordBreakGlassReview(
        self, request: pb.RecordBreakGlassReviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordBreakGlassReviewResponse:
        return await self._service.record_break_glass_review(current_user(), request)

    async def RequestErasure(
        self, request: pb.RequestErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestErasureResponse:
        return await self._erasure.request(current_user(), request)

    async def ApproveErasure(
        self, request: pb.ApproveErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApproveErasureResponse:
        return await self._erasure.approve(current_user(), request)

    async def EraseDue(self, request: pb.EraseDueRequest, context: grpc.aio.ServicerContext) -> pb.EraseDueResponse:
        return await self._erasure.erase_due(current_user(), request)
