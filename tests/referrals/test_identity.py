"""Who may call: mutual TLS with certificates from the partnership's CA, and the originating user's
token, which must belong to the agency whose certificate made the call (issue 3)."""

from __future__ import annotations

import grpc
import pytest

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_common import client
from csx_common.client import TokenSource
from csx_common.identity import Principal, TokenIssuer
from csx_common.pki import DevPki, PeerIdentity
from tests.referrals.conftest import Referrals
from tests.support import concern_request, dev_pki, service_channel, user, user_channel

UNKNOWN = pb.GetReferralRequest(referral_id="0f8fad5b-d9cb-469f-a165-70867728950e")


async def code_of(channel: grpc.aio.Channel) -> grpc.StatusCode:
    async with channel:
        stub = referrals_pb2_grpc.ReferralsServiceStub(channel)
        try:
            await stub.GetReferral(UNKNOWN, timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def address(referrals: Referrals) -> str:
    return referrals.runtime.settings.grpc_address


async def test_named_user_of_the_certificates_agency_is_served(referrals: Referrals) -> None:
    # NOT_FOUND: identified and served; the referral just does not exist.
    assert (
        await code_of(user_channel(address(referrals), user("police", "police_officer"))) == grpc.StatusCode.NOT_FOUND
    )


async def test_service_without_a_person_is_refused_unless_granted_the_method(referrals: Referrals) -> None:
    # Services call each other without a user only where a method is granted to them (none here);
    # everything else needs a person's token, so a service certificate alone reads nothing.
    assert await code_of(service_channel(address(referrals), "panel")) == grpc.StatusCode.PERMISSION_DENIED


async def test_no_client_certificate_is_refused(referrals: Referrals) -> None:
    ca_only = grpc.ssl_channel_credentials(root_certificates=dev_pki().ca_file.read_bytes())
    channel = grpc.aio.secure_channel(address(referrals), ca_only)
    assert await code_of(channel) == grpc.StatusCode.UNAVAILABLE  # the handshake fails


async def test_plaintext_is_refused(referrals: Referrals) -> None:
    assert await code_of(grpc.aio.insecure_channel(address(referrals))) == grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_another_ca_is_refused(referrals: Referrals, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rogue = DevPki(tmp_path / "rogue").ensure()
    police = rogue.credentials(PeerIdentity("agency", "police"))
    # Trusts our CA (so the server is accepted) but presents a rogue client certificate.
    mixed = client.Credentials(dev_pki().ca_file.read_bytes(), police.cert, police.key)
    issuer = TokenIssuer(dev_pki().token_key_file.read_bytes())
    channel = client.channel(address(referrals), mixed, TokenSource(issuer, user("police", "police_officer")))
    assert await code_of(channel) == grpc.StatusCode.UNAVAILABLE


async def test_token_for_another_agency_is_permission_denied(referrals: Referrals) -> None:
    pki = dev_pki()
    issuer = TokenIssuer(pki.token_key_file.read_bytes())
    health_user = Principal("nurse.1", "health", "health_safeguarding_nurse", "conference_participation")
    channel = client.channel(
        address(referrals),
        pki.credentials(PeerIdentity("agency", "police")),
        TokenSource(issuer, health_user),
    )
    assert await code_of(channel) == grpc.StatusCode.PERMISSION_DENIED


async def test_agency_call_without_user_token_is_unauthenticated(referrals: Referrals) -> None:
    channel = client.channel(address(referrals), dev_pki().credentials(PeerIdentity("agency", "education")))
    assert await code_of(channel) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("forgery", ["other_issuer_key", "expired", "garbage"])
async def test_forged_or_expired_token_is_unauthenticated(referrals: Referrals, forgery: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pki = dev_pki()
    principal = user("education", "dsl")
    if forgery == "other_issuer_key":
        rogue = DevPki(tmp_path / "rogue").ensure()
        token = TokenSource(TokenIssuer(rogue.token_key_file.read_bytes()), principal)
    elif forgery == "expired":
        issuer = TokenIssuer(pki.token_key_file.read_bytes())
        expired = issuer.issue(principal, ttl_seconds=-60)
        token = lambda: expired  # noqa: E731
    else:
        token = lambda: "not.a.token"  # noqa: E731
    channel = client.channel(address(referrals), pki.credentials(PeerIdentity("agency", "education")), token)
    assert await code_of(channel) == grpc.StatusCode.UNAUTHENTICATED


async def test_refused_calls_store_nothing(referrals: Referrals) -> None:
    channel = client.channel(address(referrals), dev_pki().credentials(PeerIdentity("agency", "police")))
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await referrals_pb2_grpc.ReferralsServiceStub(channel).SubmitConcern(
                concern_request("noauth-01"), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await referrals.stored() == (0, 0, 0, 0)


async def test_plaintext_health_port_serves_health_and_nothing_else(databases, nats_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from csx_common.natsserver import free_port
    from csx_referrals.app import build
    from csx_referrals.settings import ReferralsSettings
    from tests.support import identity_settings

    health_address = f"127.0.0.1:{free_port()}"
    settings = ReferralsSettings(
        grpc_address=f"127.0.0.1:{free_port()}",
        database_url=await databases.new("referrals"),
        nats_url=nats_url,
        keyring_file=str(tmp_path / "keyring.json"),
        health_address=health_address,
        **identity_settings("referrals"),
    )
    runtime = build(settings)
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(health_address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await referrals_pb2_grpc.ReferralsServiceStub(channel).GetReferral(UNKNOWN, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await runtime.shutdown()
