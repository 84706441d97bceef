"""The gRPC and security layer (issue 11): verified tokens remembered only while they are valid, one
guard that opens the server span itself (the caller's trace continued, no personal data on
it), and the default deadline applied without a task per call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_common import client, errors, identity
from csx_common.grpc_server import GrpcServer
from csx_common.identity import LEEWAY_SECONDS, IdentityError, Principal, TokenIssuer, TokenVerifier, bearer
from csx_common.pki import DevPki, PeerIdentity
from tests.support import concern_request, dev_pki

CANARY = "Zqxcanary"
USER = Principal("zqx.canary.user", "education", "dsl", "referral_screening")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
SUBMIT = "csx.referrals.v1.ReferralsService/SubmitConcern"


# -- Verified tokens, cached until they expire ---------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> DevPki:
    return dev_pki()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def counting_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token that reached the signature check (a cache hit does not)."""
    seen: list[str] = []
    decode = jwt.decode

    def counted(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(identity.jwt, "decode", counted)
    return seen


def issued(pki: DevPki, principal: Principal = USER, ttl: int = 60) -> tuple[str, int]:
    token = TokenIssuer(pki.token_key_file.read_bytes()).issue(principal, ttl)
    return token, jwt.decode(token, options={"verify_signature": False})["exp"]


def test_a_cached_token_answers_until_it_expires_and_never_after(pki: DevPki, monkeypatch: pytest.MonkeyPatch) -> None:
    token, exp = issued(pki)
    clock = Clock(exp - 60)
    verifier = TokenVerifier(pki.token_public_file.read_bytes(), clock=clock)
    decodes = counting_decodes(monkeypatch)
    assert verifier.verify(token) == USER
    clock.now = exp - 1
    assert verifier.verify(token) == USER
    assert len(decodes) == 1  # the second answer came from the cache
    # From exp on, the cache no longer answers: only the full check, which allows the leeway...
    clock.now = exp
    assert verifier.verify(token) == USER
    assert len(decodes) == 2
    # ...and after it, refuses, though the token is still valid by the system clock.
    clock.now = exp + LEEWAY_SECONDS
    with pytest.raises(IdentityError, match="ExpiredSignatureError"):
        verifier.verify(token)


def test_a_different_or_forged_token_is_not_answered_from_the_cache(pki: DevPki) -> None:
    token, _ = issued(pki)
    verifier = TokenVerifier(pki.token_public_file.read_bytes())
    assert verifier.verify(token) == USER
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    with pytest.raises(IdentityError):
        verifier.verify(tampered)
    # The very same claims, signed by a key that is not the identity provider's.
    claims = jwt.decode(token, options={"verify_signature": False})
    other_key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(IdentityError):
        verifier.verify(jwt.encode(claims, other_key, algorithm="EdDSA"))
    # Another user's genuine token is that user, not the cached one.
    other = Principal("sw.other", "social_care", "social_worker", "referral_screening")
    assert verifier.verify(issued(pki, other)[0]) == other


def test_a_refused_token_is_never_cached(pki: DevPki, monkeypatch: pytest.MonkeyPatch) -> None:
    token, exp = issued(pki)
    clock = Clock(exp + LEEWAY_SECONDS)  # expired by this verifier's clock
    verifier = TokenVerifier(pki.token_public_file.read_bytes(), clock=clock)
    decodes = counting_decodes(monkeypatch)
    for _ in range(2):
        with pytest.raises(IdentityError):
            verifier.verify(token)
    assert len(decodes) == 2  # checked in full each time


def test_the_cache_is_bounded(pki: DevPki, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(pki.token_public_file.read_bytes(), cache_size=3)
    tokens = [issued(pki)[0] for _ in range(5)]  # each token has its own jti
    for token in tokens:
        verifier.verify(token)
    decodes = counting_decodes(monkeypatch)
    verifier.verify(tokens[-1])  # recent: remembered
    assert decodes == []
    verifier.verify(tokens[0])  # the least recently used went first
    assert decodes == [tokens[0]]


# -- The guard: one server span, no personal data, the default deadline ---------------------


class Servicer(referrals_pb2_grpc.ReferralsServiceServicer):
    delay = 0.0

    async def SubmitConcern(self, request: Any, context: Any) -> pb.SubmitConcernResponse:
        return pb.SubmitConcernResponse()

    async def GetConcern(self, request: Any, context: Any) -> pb.GetConcernResponse:
        raise errors.NotFound("concern not found")

    async def GetReferral(self, request: Any, context: Any) -> pb.GetReferralResponse:
        await asyncio.sleep(self.delay)
        return pb.GetReferralResponse()

    async def GetDisclosureState(self, request: Any, context: Any) -> pb.GetDisclosureStateResponse:
        raise ValueError(f"NHS 9434765919 for {CANARY}")  # as a driver error with parameters would


class Rig:
    def __init__(self, channel: grpc.aio.Channel, token: str, exporter: InMemorySpanExporter, servicer: Servicer):
        self.stub = referrals_pb2_grpc.ReferralsServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.token = token
        self.exporter = exporter
        self.servicer = servicer

    def metadata(self, traced: bool = True) -> tuple[tuple[str, str], ...]:
        parent = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),) if traced else ()
        return (*bearer(self.token), *parent)

    def spans(self) -> list[ReadableSpan]:
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        return spans

    async def call(self, method: Callable[..., Any], request: Any, **kwargs: Any) -> Any:
        return await method(request, metadata=self.metadata(), **kwargs)


@pytest.fixture(scope="module")
async def rig(pki: DevPki) -> AsyncIterator[Rig]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    servicer = Servicer()
    server = GrpcServer(
        "127.0.0.1:0",
        max_concurrent_rpcs=16,
        max_message_bytes=1 << 20,
        default_deadline=0.5,
        reflection_on=True,
        credentials=pki.credentials(PeerIdentity("service", "referrals")),
        verifier=TokenVerifier(pki.token_public_file.read_bytes()),
        tracer_provider=provider,
    )
    server.add(
        referrals_pb2_grpc.add_ReferralsServiceServicer_to_server,
        servicer,
        pb.DESCRIPTOR.services_by_name["ReferralsService"].full_name,
    )
    await server.start()
    await server.set_serving(True)
    # A plain channel: the trace context is the test's own traceparent, not a client span's.
    credentials = client.channel_credentials(pki.credentials(PeerIdentity("agency", USER.agency)))
    token = TokenIssuer(pki.token_key_file.read_bytes()).issue(USER)
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
        yield Rig(channel, token, exporter, servicer)
    await server.stop(0)


async def test_a_call_has_one_server_span_continuing_the_callers_trace(rig: Rig) -> None:
    rig.spans()
    await rig.call(rig.stub.SubmitConcern, concern_request("layer-span-01"), timeout=5)
    [span] = rig.spans()
    assert span.name == SUBMIT and span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN_ID
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "csx.referrals.v1.ReferralsService",
        "rpc.method": "SubmitConcern",
        "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_without_a_callers_trace_the_span_starts_one(rig: Rig) -> None:
    rig.spans()
    await rig.stub.SubmitConcern(concern_request("layer-span-02"), metadata=rig.metadata(traced=False), timeout=5)
    [span] = rig.spans()
    assert span.parent is None and format(span.context.trace_id, "032x") != TRACE_ID


async def test_spans_carry_codes_and_never_personal_data(rig: Rig) -> None:
    rig.spans()
    request = concern_request("layer-span-03")
    request.child.given_name = CANARY
    await rig.call(rig.stub.SubmitConcern, request, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rig.call(rig.stub.GetConcern, pb.GetConcernRequest(concern_id=str(uuid.uuid4())), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rig.call(rig.stub.GetDisclosureState, pb.GetDisclosureStateRequest(child_id=str(uuid.uuid4())), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    with pytest.raises(grpc.aio.AioRpcError) as err:  # invalid: the proto rules refuse it
        await rig.call(rig.stub.GetConcern, pb.GetConcernRequest(concern_id=f"{CANARY}-not-a-uuid"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    submitted, not_found, internal, invalid = rig.spans()
    assert not_found.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not_found.status.status_code is StatusCode.UNSET  # a refusal is the server working
    assert internal.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert internal.status.status_code is StatusCode.ERROR
    assert invalid.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    text = repr(
        [(s.name, s.attributes, s.status, [(e.name, e.attributes) for e in s.events], s.links) for s in rig.spans()]
        + [
            (s.name, dict(s.attributes or {}), s.status.description, [(e.name, e.attributes) for e in s.events])
            for s in (submitted, not_found, internal, invalid)
        ]
    )
    for secret in (CANARY, "9434765919", USER.user_id, rig.token, "ValueError"):
        assert secret not in text


async def test_health_calls_go_without_a_span(rig: Rig) -> None:
    rig.spans()
    reply = await rig.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert rig.spans() == []


async def test_a_call_without_a_deadline_gets_the_default_one(rig: Rig) -> None:
    rig.spans()
    rig.servicer.delay = 5.0
    request = pb.GetReferralRequest(referral_id=str(uuid.uuid4()))
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rig.call(rig.stub.GetReferral, request)  # no deadline from the client
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert asyncio.get_running_loop().time() - started < 3
        [span] = rig.spans()
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert span.status.status_code is StatusCode.ERROR
        # The client's own deadline, longer than the default, is the one that counts.
        rig.servicer.delay = 1.0
        await rig.call(rig.stub.GetReferral, request, timeout=5)
    finally:
        rig.servicer.delay = 0.0


async def test_concurrent_calls_each_get_a_span_of_their_own(rig: Rig) -> None:
    rig.spans()
    await asyncio.gather(
        *(rig.call(rig.stub.SubmitConcern, concern_request(f"layer-many-{i:02d}"), timeout=5) for i in range(20))
    )
    spans = rig.spans()
    assert len({s.context.span_id for s in spans}) == len(spans) == 20
    assert {(s.name, format(s.context.trace_id, "032x")) for s in spans} == {(SUBMIT, TRACE_ID)}
