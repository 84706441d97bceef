"""gRPC adapter: requests arrive validated (the guard ran the proto rules) and identified; the
caller the guard established is handed to each use case."""

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

    async def ListOverdueConferences(
        self, request: pb.ListOverdueConferencesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOverdueConferencesResponse:
        conferences, redacted = await self._service.list_overdue_conferences(current_user())
        return pb.ListOverdueConferencesResponse(conferences=conferences, redacted_fields=redacted)

    async def ArrangeConference(
        self, request: pb.ArrangeConferenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.ArrangeConferenceResponse:
        return await self._service.arrange_conference(current_user(), request)

    async def RescheduleConference(
        self, request: pb.RescheduleConferenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RescheduleConferenceResponse:
        return await self._service.reschedule_conference(current_user(), request)

    async def CancelConference(
        self, request: pb.CancelConferenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelConferenceResponse:
        return await self._service.cancel_conference(current_user(), request)

    async def InviteParticipants(
        self, request: pb.InviteParticipantsRequest, context: grpc.aio.ServicerContext
    ) -> pb.InviteParticipantsResponse:
        return await self._service.invite_participants(current_user(), request)

    async def RecordConferenceContext(
        self, request: pb.RecordConferenceContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordConferenceContextResponse:
        return await self._service.record_conference_context(current_user(), request)

    async def SubmitConferenceReport(
        self, request: pb.SubmitConferenceReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitConferenceReportResponse:
        return await self._service.submit_conference_report(current_user(), request)

    async def RecordConferenceMeeting(
        self, request: pb.RecordConferenceMeetingRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordConferenceMeetingResponse:
        return await self._service.record_conference_meeting(current_user(), request)

    async def RecordFamilySummary(
        self, request: pb.RecordFamilySummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordFamilySummaryResponse:
        return await self._service.record_family_summary(current_user(), request)

    async def RecordEligibility(
        self, request: pb.RecordEligibilityRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEligibilityResponse:
        return await self._service.record_eligibility(current_user(), request)

    async def RecordNetworkMeeting(
        self, request: pb.RecordNetworkMeetingRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordNetworkMeetingResponse:
        return await self._service.record_network_meeting(current_user(), request)

    async def OfferTransition(
        self, request: pb.OfferTransitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OfferTransitionResponse:
        return await self._service.offer_transition(current_user(), request)

    async def RecordTransitionAnswer(
        self, request: pb.RecordTransitionAnswerRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordTransitionAnswerResponse:
        return await self._service.record_transition_answer(current_user(), request)

    async def RegisterChair(
        self, request: pb.RegisterChairRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterChairResponse:
        return await self._service.register_chair(current_user(), request)

    async def ListChairs(
        self, request: pb.ListChairsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListChairsResponse:
        return pb.ListChairsResponse(chairs=await self._service.list_chairs(current_user()))
