"""The do-nothing SubmitConcern: the referrals service's gRPC layer as `csx up` runs it (mutual TLS,
the user token verified, the proto rules, the guard, tracing and logs configured as a service
configures them) with a handler that answers an empty SubmitConcernResponse and touches no database.

Between the bare echo (benchmarks/echo_server.py) and the real SubmitConcern, it shows what the
gRPC and security layer costs and what the work behind it costs."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_common import logs, telemetry
from csx_common.grpc_server import GrpcServer
from csx_common.identity import TokenVerifier
from csx_common.pki import DevPki, PeerIdentity
from csx_common.settings import ServiceSettings
from csx_safeguarding.policy import PolicyEngine


class DoNothing(referrals_pb2_grpc.ReferralsServiceServicer):
    async def SubmitConcern(
        self, request: pb.SubmitConcernRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitConcernResponse:
        return pb.SubmitConcernResponse()


async def serve(port: int, pki_dir: str) -> None:
    pki = DevPki(pki_dir)

    def default(name: str) -> Any:  # the limits every service runs with unless configured
        return ServiceSettings.model_fields[name].default

    server = GrpcServer(
        f"127.0.0.1:{port}",
        max_concurrent_rpcs=default("max_concurrent_rpcs"),
        max_message_bytes=default("max_message_bytes"),
        default_deadline=default("default_deadline_seconds"),
        reflection_on=default("reflection"),
        credentials=pki.credentials(PeerIdentity("service", "referrals")),
        verifier=TokenVerifier(pki.token_public_file.read_bytes()),
        admits=PolicyEngine.default().admits,
    )
    server.add(
        referrals_pb2_grpc.add_ReferralsServiceServicer_to_server,
        DoNothing(),
        pb.DESCRIPTOR.services_by_name["ReferralsService"].full_name,
    )
    await server.start()
    await server.set_serving(True)
    await server.wait_for_termination()


if __name__ == "__main__":
    logs.configure("referrals", "WARNING")  # as the bench's stack runs the services
    telemetry.configure("csx-referrals-noop")
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
