"""gRPC server bootstrap: validation, error mapping, default deadline, health, reflection, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from csx_common import errors
from csx_common.crypto import DataLossError
from csx_common.validation import validate

log = structlog.get_logger("csx.grpc")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Runs before every CSX handler: validates the request against the proto rules (so a handler
    never sees invalid input), applies a default deadline, and maps errors to statuses."""

    def __init__(self, default_deadline: float) -> None:
        self._default_deadline = default_deadline

    async def intercept_service(
        self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith("/csx."):
            return handler
        inner = handler.unary_unary
        method = details.method
        default_deadline = self._default_deadline

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                validate(request)
                remaining = context.time_remaining()
                timeout = default_deadline if remaining is None else None
                return await asyncio.wait_for(inner(request, context), timeout)
            except grpc.aio.AbortError:
                raise
            except errors.CsxError as exc:
                code, message, trailers = errors.to_status(exc)
                await context.abort(code, message, trailing_metadata=trailers)
            except DataLossError:
                code, message, trailers = errors.to_status(
                    errors.DataLoss("a stored value failed authentication")
                )
                log.error("data_loss", method=method)
                await context.abort(code, message, trailing_metadata=trailers)
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            except Exception as exc:
                # The exception's text may hold values: log its type only.
                log.error("unhandled_error", method=method, error=type(exc).__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class GrpcServer:
    def __init__(
        self,
        address: str,
        *,
        max_concurrent_rpcs: int,
        max_message_bytes: int,
        default_deadline: float,
        reflection_on: bool,
    ) -> None:
        self.address = address
        self._reflection = reflection_on
        self.server = grpc.aio.server(
            interceptors=[aio_server_interceptor(), ServiceInterceptor(default_deadline)],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self.port = 0

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        register(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> None:
        if self._reflection:
            reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise SystemExit(f"cannot listen on {self.address}")
        for name in ["", *self._service_names[1:]]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names[1:]]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
