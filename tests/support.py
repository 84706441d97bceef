"""Helpers for tests that run a service in-process with real gRPC, NATS and databases."""

from __future__ import annotations

import asyncio
import functools
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from csx.referrals.v1 import referrals_pb2 as rpb
from csx_common import client
from csx_common.client import TokenSource
from csx_common.identity import Principal, TokenIssuer
from csx_common.pki import DevPki, PeerIdentity

VALID_NHS = "9434765919"


def concern_request(key: str, **overrides: object) -> rpb.SubmitConcernRequest:
    req = rpb.SubmitConcernRequest(
        idempotency_key=key,
        agency=3,  # AGENCY_EDUCATION
        agency_reference=f"EDU-{key}",
        referrer=rpb.Referrer(name="Canary Referrer", role="Designated safeguarding lead", email="dsl@school.example"),
        child=rpb.ChildIdentity(
            nhs_number=VALID_NHS,
            given_name="Canarygiven",
            family_name="Canaryfamily",
            date_of_birth="2010-05-17",
        ),
        harm_types=[2],
        contexts=[{"place_id": "plc-riverside-park", "context_type": 3}],
        narrative="CANARY-NARRATIVE seen with older youths near the station",
    )
    for name, value in overrides.items():
        if isinstance(value, dict):
            getattr(req, name).Clear()
            for k, v in value.items():
                setattr(getattr(req, name), k, v)
        else:
            setattr(req, name, value)  # type: ignore[arg-type]
    return req


async def eventually(
    check: Callable[[], Awaitable[bool]],
    within: float = 15.0,
    every: float = 0.05,
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(every)


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits.extend(f"{path}: {n!r}" for n in needles if n in data)
    return hits


# Identities ----------------------------------------------------------------------------------
# One development PKI for the whole test session: a CA, service and agency certificates, and the
# token issuer's key, exactly as `csx up` generates them.


@functools.cache
def dev_pki() -> DevPki:
    return DevPki(Path(tempfile.mkdtemp(prefix="csx-test-pki-"))).ensure()


def identity_settings(service: str) -> dict[str, str]:
    """The TLS and token settings for a service under test."""
    pki = dev_pki()
    peer = PeerIdentity("service", service)
    return {
        "tls_ca_file": str(pki.ca_file),
        "tls_cert_file": str(pki.cert_file(peer)),
        "tls_key_file": str(pki.key_file(peer)),
        "token_public_key_file": str(pki.token_public_file),
    }


def user(
    agency: str = "social_care",
    role: str = "social_worker",
    purpose: str = "referral_screening",
    user_id: str = "sw.test",
) -> Principal:
    return Principal(user_id, agency, role, purpose)


def user_channel(address: str, principal: Principal | None = None, pki: DevPki | None = None) -> grpc.aio.Channel:
    """A partner agency's system calling for one of its users (agency certificate + user token)."""
    principal = principal or user()
    pki = pki or dev_pki()
    issuer = TokenIssuer(pki.token_key_file.read_bytes())
    return client.channel(
        address, pki.credentials(PeerIdentity("agency", principal.agency)), TokenSource(issuer, principal)
    )


def service_channel(address: str, service: str) -> grpc.aio.Channel:
    """A CSX service calling another for event-driven work (its certificate, no user)."""
    return client.channel(address, dev_pki().credentials(PeerIdentity("service", service)))


def server_credentials(service: str) -> grpc.ServerCredentials:
    creds = dev_pki().credentials(PeerIdentity("service", service))
    return grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True)
