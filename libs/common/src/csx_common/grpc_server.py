"""gRPC server bootstrap: validation, error mapping, default deadline, health, reflection, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from csx_common import errors
from csx_common.crypto import DataLossError, KeyDestroyedError
from csx_common.identity import (
    TOKEN_METADATA_KEY,
    Caller,
    IdentityError,
    TokenVerifier,
    current_caller,
)
from csx_common.pki import Credentials, PeerIdentity, peer_from_pem
from csx_common.validation import normalise_text, validate

log = structlog.get_logger("csx.grpc")
# (agency, role, purpose) of a user token -> may such a user call at all.
Admits = Callable[[str, str, str], bool]


def identify(
    context: grpc.aio.ServicerContext,
    verifier: TokenVerifier | None,
    method: str = "",
    service_calls: Mapping[str, frozenset[str]] | None = None,
    admits: Admits | None = None,
) -> Caller | None:
    """The peer from its client certificate and the originating user from the call's token.

    An agency's system must present a user token for that same agency. A CSX service may call
    without one only the methods `service_calls` grants it (event-driven work such as actionplans
    fetching a concluded conference); anything else needs a person. Raises IdentityError or
    PermissionError otherwise. `admits` (the policy's table of which agencies' users may hold which
    roles) refuses a token pairing a role with an agency that may not hold it."""
    peer = None
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    if pem:
        peer = peer_from_pem(pem[0])
        if peer is None:
            raise IdentityError("client certificate names no CSX peer")
    token = ""
    for key, value in context.invocation_metadata() or ():
        if key == TOKEN_METADATA_KEY and isinstance(value, str) and value.startswith("Bearer "):
            token = value.removeprefix("Bearer ")
    user = None
    if token:
        if verifier is None:
            raise IdentityError("no token verifier configured")
        user = verifier.verify(token)
        if admits is not None and not admits(user.agency, user.role, user.purpose):
            raise PermissionError("the token's role is not one its agency's users may hold")
    if peer is None:  # INSECURE_DEV: no certificates; trust the token's agency
        return Caller(PeerIdentity("agency", user.agency), user) if user else None
    if peer.kind == "agency":
        if user is None:
            raise IdentityError("agency calls need a user token")
        if user.agency != peer.name:
            raise PermissionError("token agency does not match the client certificate")
    elif user is None and peer.name not in (service_calls or {}).get(method, frozenset()):
        raise PermissionError("this method needs a person's token")
    return Caller(peer, user)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Runs before every CSX handler: identifies the caller (certificate and user token), validates
    the request against the proto rules (so a handler never sees invalid input), applies a default
    deadline, and maps errors to statuses."""

    def __init__(
        self,
        default_deadline: float,
        verifier: TokenVerifier | None,
        require_identity: bool,
        service_calls: Mapping[str, frozenset[str]] | None = None,
        admits: Admits | None = None,
    ) -> None:
        self._admits = admits
        self._service_calls = dict(service_calls or {})
        self._default_deadline = default_deadline
        self._verifier = verifier
        self._require_identity = require_identity

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith("/csx."):
            return handler
        inner = handler.unary_unary
        method = details.method
        default_deadline = self._default_deadline
        # The request arrives as bytes and is decoded here, not by grpc: grpc answers a payload that
        # fails to parse (truncated, corrupt, bad UTF-8) with UNKNOWN and the parser's text, where a
        # client sending bad bytes should get INVALID_ARGUMENT like any other invalid request.
        decode = handler.request_deserializer

        verifier = self._verifier
        require_identity = self._require_identity
        service_calls = self._service_calls
        admits = self._admits

        async def guarded(payload: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                try:
                    caller = identify(context, verifier, method, service_calls, admits)
                except IdentityError as exc:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                except PermissionError as exc:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                if caller is None and require_identity:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "caller not identified")
                current_caller.set(caller)
                request = _decode(decode, payload)
                normalise_text(request)
                validate(request)
                remaining = context.time_remaining()
                timeout = default_deadline if remaining is None else None
                return await asyncio.wait_for(inner(request, context), timeout)
            except grpc.aio.AbortError:
                raise
            except errors.CsxError as exc:
                code, message, trailers = errors.to_status(exc)
                await context.abort(code, message, trailing_metadata=trailers)
            except KeyDestroyedError:
                # Erased on purpose (key destroyed): the record no longer exists for anyone.
                code, message, trailers = errors.to_status(errors.NotFound("record erased", reason="RECORD_ERASED"))
                await context.abort(code, message, trailing_metadata=trailers)
            except DataLossError:
                code, message, trailers = errors.to_status(errors.DataLoss("a stored value failed authentication"))
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
            request_deserializer=None,  # bytes: decoded in `guarded`
            response_serializer=handler.response_serializer,
        )


def _decode(deserializer: Callable[[bytes], Any] | None, payload: bytes) -> Any:
    """The request message from its wire bytes; bytes that do not parse are INVALID_ARGUMENT, with a
    fixed message (the parser's text is not echoed back)."""
    if deserializer is None:
        return payload
    try:
        request = deserializer(payload)
    except Exception:  # DecodeError, or anything else a corrupt payload makes the parser raise
        raise errors.InvalidArgument(
            [errors.FieldViolation("", "the request is not a valid protobuf message of this method's type")],
            "request could not be decoded",
        ) from None
    # Fields the contract does not name never reach a handler, a store or a response: they would be
    # kept, unclassified and unencrypted, in every serialization of the message.
    request.DiscardUnknownFields()
    return request


class GrpcServer:
    def __init__(
        self,
        address: str,
        *,
        max_concurrent_rpcs: int,
        max_message_bytes: int,
        default_deadline: float,
        reflection_on: bool,
        credentials: Credentials | None = None,
        verifier: TokenVerifier | None = None,
        health_address: str = "",
        service_calls: Mapping[str, frozenset[str]] | None = None,
        admits: Admits | None = None,
    ) -> None:
        self.address = address
        self.health_address = health_address
        self._reflection = reflection_on
        self._credentials = credentials
        self.server = grpc.aio.server(
            interceptors=[
                aio_server_interceptor(),
                ServiceInterceptor(
                    default_deadline,
                    verifier,
                    require_identity=credentials is not None,
                    service_calls=service_calls,
                    admits=admits,
                ),
            ],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # The same health servicer on a plaintext port of its own, when asked for (probes).
        self.health_server: grpc.aio.Server | None = None
        if health_address:
            # No SO_REUSEPORT (grpc's default turns it on): another process must not be able to
            # bind this port too and answer some of the probes.
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = 0
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self.port = 0

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        register(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> None:
        if self._reflection:
            reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], self.server)
        if self._credentials is None:
            self.port = self.server.add_insecure_port(self.address)
        else:
            creds = grpc.ssl_server_credentials(
                [(self._credentials.key, self._credentials.cert)],
                root_certificates=self._credentials.ca,
                require_client_auth=True,
            )
            self.port = self.server.add_secure_port(self.address, creds)
        if self.port == 0:
            raise SystemExit(f"cannot listen on {self.address}")
        for name in ["", *self._service_names[1:]]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.health_server is not None:
            self.health_port = self.health_server.add_insecure_port(self.health_address)
            if self.health_port == 0:
                raise SystemExit(f"cannot listen on {self.health_address}")
            await self.health_server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names[1:]]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
