"""gRPC client channels the CSX way: mutual TLS with the caller's certificate, the originating
user's token on every call, tracing, and nothing else to remember."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from csx_common.identity import TOKEN_METADATA_KEY, Principal, TokenIssuer
from csx_common.pki import Credentials


class TokenSource:
    """A user's token, re-issued shortly before it expires."""

    def __init__(self, issuer: TokenIssuer, principal: Principal, ttl_seconds: int = 300) -> None:
        self.principal = principal
        self._issuer = issuer
        self._ttl = ttl_seconds
        self._token = ""
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if time.monotonic() >= self._renew_at:
                self._token = self._issuer.issue(self.principal, self._ttl)
                self._renew_at = time.monotonic() + self._ttl * 0.8
            return self._token


class _Bearer(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), (TOKEN_METADATA_KEY, f"Bearer {self._token()}")]
        details = details._replace(metadata=metadata)
        return await continuation(details, request)


def channel_credentials(credentials: Credentials) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=credentials.ca, private_key=credentials.key, certificate_chain=credentials.cert
    )


def channel(
    address: str,
    credentials: Credentials | None,
    token: Callable[[], str] | None = None,
    *,
    extra_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to a CSX service. `credentials=None` only for INSECURE_DEV servers."""
    interceptors: list[grpc.aio.ClientInterceptor] = [*aio_client_interceptors(), *extra_interceptors]
    if token is not None:
        interceptors.append(_Bearer(token))
    if credentials is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    return grpc.aio.secure_channel(address, channel_credentials(credentials), interceptors=interceptors)


def sync_channel(address: str, credentials: Credentials | None) -> grpc.Channel:
    """A blocking channel (health checks from tools)."""
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(credentials))
