"""gRPC server bootstrap: identity, validation, error mapping, default deadline, server spans, health,
reflection, limits."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

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

# The peer named by a client certificate, parsed once per certificate rather than on every call (a
# connection presents the same one for all its calls; the TLS handshake has already verified it).
_peer_of = functools.lru_cache(maxsize=1024)(peer_from_pem)


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
        peer = _peer_of(pem[0])
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


class ServiceGuard:
    """Wraps every CSX handler, once, when its servicer is registered (GrpcServer.add): the wrapper
    opens the call's server span (continuing the caller's trace), identifies the caller (certificate
    and user token), validates the request against the proto rules (so a handler never sees invalid
    input), applies a default deadline, and maps errors to statuses. Health and reflection are
    registered unwrapped.

    A wrapper fixed at registration rather than a server interceptor: grpc.aio runs an interceptor
    as a coroutine chain on every call, before the method's handler is even found. And one wrapper
    rather than OpenTelemetry's and ours: theirs also records exception text and the peer's address
    on the span. Spans here carry the method and the status code only: never the request, the token
    or who the user is."""

    def __init__(
        self,
        default_deadline: float,
        verifier: TokenVerifier | None,
        require_identity: bool,
        service_calls: Mapping[str, frozenset[str]] | None = None,
        admits: Admits | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self._admits = admits
        self._service_calls = dict(service_calls or {})
        self._default_deadline = default_deadline
        self._verifier = verifier
        self._require_identity = require_identity
        self._tracer = trace.get_tracer("csx.grpc", tracer_provider=tracer_provider)  # None: the global one

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None:
            raise TypeError(f"{method}: CSX methods are unary (a streaming one needs its own guard)")
        return self._wrap(method, handler)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        default_deadline = self._default_deadline
        # The request arrives as bytes and is decoded here, not by grpc: grpc answers a payload that
        # fails to parse (truncated, corrupt, bad UTF-8) with UNKNOWN and the parser's text, where a
        # client sending bad bytes should get INVALID_ARGUMENT like any other invalid request.
        decode = handler.request_deserializer

        verifier = self._verifier
        require_identity = self._require_identity
        service_calls = self._service_calls
        admits = self._admits
        tracer = self._tracer
        span_name = method.removeprefix("/")  # package.Service/Method
        service_name, _, method_name = span_name.partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service_name, "rpc.method": method_name}

        async def guarded(payload: bytes, context: grpc.aio.ServicerContext) -> Any:
            # The caller's trace context (traceparent) from the call's metadata, by the global propagator.
            parent = propagate.extract(dict(context.invocation_metadata() or ()))
            with tracer.start_as_current_span(
                span_name,
                context=parent,
                kind=trace.SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,  # an exception's text may hold values
                set_status_on_exception=False,
            ) as span:
                try:
                    response = await handle(payload, context)
                except grpc.aio.AbortError:
                    _record_status(span, context.code() or grpc.StatusCode.UNKNOWN)
                    raise
                except BaseException:  # cancelled (the client went away): no status of ours to record
                    _record_status(span, grpc.StatusCode.CANCELLED)
                    raise
                span.set_attribute(RPC_STATUS_CODE, 0)
                return response

        async def handle(payload: bytes, context: grpc.aio.ServicerContext) -> Any:
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
                if context.time_remaining() is not None:
                    return await inner(request, context)  # grpc ends the call at the client's deadline
                # No deadline from the client: ours. asyncio.timeout, not wait_for: no task per call.
                async with asyncio.timeout(default_deadline):
                    return await inner(request, context)
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
            request_deserializer=None,  # bytes: decoded in `handle`
            response_serializer=handler.response_serializer,
        )


class _Registering:
    """Stands in for the server while generated code registers a servicer: keeps its method
    handlers by name (what `add_registered_method_handlers` is given) for the guard to wrap."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass  # the same handlers, also given by name below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, dict(handlers)


RPC_STATUS_CODE = "rpc.grpc.status_code"
# The codes that mean the server failed (OpenTelemetry's RPC conventions): a span's status is ERROR
# for these only; a refused or invalid request is the server working as it should.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _record_status(span: trace.Span, code: grpc.StatusCode) -> None:
    """The call's status on its span: the code alone, never the message (it may name a value)."""
    span.set_attribute(RPC_STATUS_CODE, code.value[0])
    if code in SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code.name))


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
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.address = address
        self.health_address = health_address
        self._reflection = reflection_on
        self._credentials = credentials
        self._guard = ServiceGuard(
            default_deadline,
            verifier,
            require_identity=credentials is not None,
            service_calls=service_calls,
            admits=admits,
            tracer_provider=tracer_provider,
        )
        self._server = grpc.aio.server(
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
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

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        """Register `servicer` (with its generated `add_..._to_server`), each method wrapped by the guard."""
        registering = _Registering()
        register(servicer, registering)
        if registering.service != full_name or not registering.handlers:
            raise TypeError(f"{full_name}: the generated code registers no method handlers by name")
        wrapped = {
            name: self._guard.wrap(f"/{full_name}/{name}", handler) for name, handler in registering.handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, wrapped),))
        self._server.add_registered_method_handlers(full_name, wrapped)
        self._service_names.append(full_name)

    async def start(self) -> None:
        if self._reflection:
            reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], self._server)
        if self._credentials is None:
            self.port = self._server.add_insecure_port(self.address)
        else:
            creds = grpc.ssl_server_credentials(
                [(self._credentials.key, self._credentials.cert)],
                root_certificates=self._credentials.ca,
                require_client_auth=True,
            )
            self.port = self._server.add_secure_port(self.address, creds)
        if self.port == 0:
            raise SystemExit(f"cannot listen on {self.address}")
        for name in ["", *self._service_names[1:]]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
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
        await self._server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
