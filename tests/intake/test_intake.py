"""Sealed intake end to end: an agency system seals, signs and publishes a concern on NATS; referrals
verifies, opens and records it exactly as SubmitConcern over gRPC would, or rejects it with a reason
and keeps nothing of it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from csx.intake.v1 import intake_pb2
from csx.referrals.v1 import events_pb2
from csx.referrals.v1 import referrals_pb2 as pb
from csx_client import ACCEPTED, Recipient, seal
from csx_common.intake import Delivery, IntakeRejected
from csx_common.pki import DevPki
from csx_referrals import tables
from csx_referrals.app import build
from tests.intake.conftest import Intake, identity, police_concern, recipient, rejected, start_referrals
from tests.support import eventually, files_containing

NOTHING = {"concerns": 0, "children": 0, "referrals": 0, "outbox": 0, "idempotency": 0, "inbox": 0}
CANARIES = [b"CANARY-NARRATIVE", b"Canarygiven", b"Canaryfamily", b"9434765919", b"dsl@school.example"]


async def answer(future: asyncio.Future[intake_pb2.IntakeResult]) -> intake_pb2.IntakeResult:
    return await asyncio.wait_for(future, 15)


# --- accepted -----------------------------------------------------------------------------------------


async def test_accepted_concern_is_recorded_as_over_grpc(intake: Intake) -> None:
    police = await intake.client("police")
    request = police_concern("POL-2026-0001")
    result = await police.submit(request, wait=15)
    assert result.status == ACCEPTED, result
    response = result.response
    assert response.concern_id and response.referral_id and response.child_id and response.decision_due_on
    # Readable through gRPC like any concern: the police read their own concern in full.
    got = await intake.grpc("police").GetConcern(pb.GetConcernRequest(concern_id=response.concern_id), timeout=5)
    assert got.concern.child == request.child and got.concern.narrative == request.narrative
    assert got.concern.agency == request.agency and got.concern.agency_reference == "POL-2026-0001"
    assert not got.redacted_fields
    # The same event as a gRPC submission, in the same transaction; the envelope is gone from the stream.
    async with intake.runtime.db.session() as s:
        (row,) = (await s.execute(tables.delivery.outbox.select())).all()
    event = events_pb2.ConcernRecorded.FromString(row.payload)
    assert (row.subject, event.concern_id, event.agency) == ("csx.referrals.concern_recorded", response.concern_id, 1)
    assert await intake.stored() == {k: 1 for k in NOTHING}
    assert await intake.stream_messages() == 0


async def test_resend_of_an_agency_reference_answers_with_the_first_result(intake: Intake) -> None:
    police = await intake.client("police")
    first = await police.submit(police_concern("POL-2026-0002"), wait=15)
    again = await police.submit(police_concern("POL-2026-0002"), wait=15)  # a new envelope, same reference
    assert first.status == again.status == ACCEPTED
    assert again.response == first.response
    assert first.message_id != again.message_id
    stored = await intake.stored()
    assert (stored["concerns"], stored["outbox"], stored["idempotency"], stored["inbox"]) == (1, 1, 1, 2)
    # The same reference with other content is refused, as over gRPC (AGENCY_REFERENCE_CONFLICT).
    other = await police.submit(police_concern("POL-2026-0002", narrative="CANARY-NARRATIVE changed"), wait=15)
    assert rejected(other) == "AGENCY_REFERENCE_CONFLICT"
    assert (await intake.stored())["concerns"] == 1


async def test_many_in_flight_are_all_answered(intake: Intake) -> None:
    police = await intake.client("police")
    results = await police.submit_many([police_concern(f"POL-BULK-{i:03}") for i in range(20)], wait=60)
    assert [r.status for r in results] == [ACCEPTED] * 20
    assert len({r.response.concern_id for r in results}) == 20


async def test_the_jetstream_store_holds_no_plaintext(intake: Intake) -> None:
    """While the sealed concern waits in the stream (the consumer is stopped), the store's files hold
    its ids but none of its values."""
    assert intake.runtime.intake is not None
    await intake.runtime.intake.stop()
    police = await intake.client("police")
    message_id, data = seal(police_concern("POL-2026-0003"), identity("police"), recipient())
    pending = await police.publish_sealed(data, msg_id=message_id)
    assert await intake.stream_messages() == 1
    store = intake.server.store_dir

    async def on_disk() -> bool:
        return bool(files_containing(store, [message_id.encode()]))

    await eventually(on_disk, within=10)  # the scan does see what the store holds
    assert files_containing(store, CANARIES) == []
    await intake.runtime.intake.start()
    assert (await answer(pending)).status == ACCEPTED

    async def consumed() -> bool:  # acked after the COMMIT, so it may trail the answer a little
        return await intake.stream_messages() == 0

    await eventually(consumed, within=10)


async def test_a_concern_waiting_in_the_stream_does_not_go_stale(databases, secured_nats, tmp_path: Path) -> None:
    """Freshness is judged at the broker's storing time, not when referrals gets round to it."""
    runtime = await start_referrals(databases, secured_nats, tmp_path, intake_max_age_seconds=1.0)
    harness = Intake(runtime, *secured_nats)
    try:
        assert runtime.intake is not None
        await runtime.intake.stop()
        police = await harness.client("police")
        message_id, data = seal(police_concern("POL-2026-0004"), identity("police"), recipient())
        pending = await police.publish_sealed(data, msg_id=message_id)
        await asyncio.sleep(2.0)
        await runtime.intake.start()
        assert (await answer(pending)).status == ACCEPTED
    finally:
        await harness.close()
        await runtime.shutdown()


# --- rejected, and nothing kept -------------------------------------------------------------------------


class _Raw:
    """Bytes that are not a SubmitConcernRequest, sealed as if they were."""

    def SerializeToString(self) -> bytes:  # noqa: N802
        return b"\xff\xff\xff\xff not a protobuf"


class _LyingRecipient(Recipient):
    """Seals to one key while naming another's key id."""

    def __init__(self, public_key: x25519.X25519PublicKey, claimed: str) -> None:
        object.__setattr__(self, "public_key", public_key)
        object.__setattr__(self, "_claimed", claimed)

    @property
    def key_id(self) -> str:
        return self._claimed  # type: ignore[attr-defined]


def _tampered(data: bytes, part: str) -> bytes:
    outer = intake_pb2.Envelope.FromString(data)
    if part == "signature":
        sig = bytearray(outer.signature)
        sig[-1] ^= 0x01
        outer.signature = bytes(sig)
    else:  # the ciphertext inside the signed part, not re-signed
        inner = intake_pb2.SealedConcern.FromString(outer.sealed_concern)
        ct = bytearray(inner.ciphertext)
        ct[-1] ^= 0x01
        inner.ciphertext = bytes(ct)
        outer.sealed_concern = inner.SerializeToString()
    return outer.SerializeToString()


def _signed_garbage() -> bytes:
    who = identity("police")
    from csx_client.envelope import sign, signing_input

    body = b"\x0a\xff not a sealed concern"
    return intake_pb2.Envelope(
        sealed_concern=body, signature=sign(who.key, signing_input(body)), certificate=who.certificate_der
    ).SerializeToString()


def _resigned(data: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    """The envelope with its SealedConcern changed and signed again by police (a well-signed oddity)."""
    from csx_client.envelope import sign, signing_input

    outer = intake_pb2.Envelope.FromString(data)
    inner = intake_pb2.SealedConcern.FromString(outer.sealed_concern)
    change(inner)
    outer.sealed_concern = inner.SerializeToString()
    outer.signature = sign(identity("police").key, signing_input(outer.sealed_concern))
    return outer.SerializeToString()


def envelope_for(case: str, tmp_path: Path) -> tuple[str, bytes, str]:
    """(NATS user that publishes it, envelope bytes, expected reason)."""
    request = police_concern(f"POL-{case}")
    now = datetime.now(UTC)
    if case == "wrong_recipient_key":
        other = Recipient(x25519.X25519PrivateKey.generate().public_key())
        return "police", seal(request, identity("police"), other)[1], "SEALED_TO_UNKNOWN_KEY"
    if case == "our_key_id_on_another_key":
        liar = _LyingRecipient(x25519.X25519PrivateKey.generate().public_key(), recipient().key_id)
        return "police", seal(request, identity("police"), liar)[1], "UNDECRYPTABLE"
    if case == "police_signs_claiming_health":
        # Published by health's own system, so the subject agrees with the claim; the certificate does not.
        request.agency = 2
        return "health", seal(request, identity("police", claims="health"), recipient())[1], "AGENCY_MISMATCH"
    if case == "police_claims_health_on_its_own_subject":
        return "police", seal(request, identity("police", claims="health"), recipient())[1], "AGENCY_MISMATCH"
    if case == "health_envelope_replayed_by_police":
        request.agency = 2
        return "police", seal(request, identity("health"), recipient())[1], "AGENCY_MISMATCH"
    if case == "request_names_another_agency":
        request.agency = 2  # the envelope is police's, the concern claims health: as over gRPC
        return "police", seal(request, identity("police"), recipient())[1], "AGENCY_MISMATCH"
    if case == "certificate_from_another_ca":
        rogue = DevPki(tmp_path / "rogue-ca").ensure()
        return "police", seal(request, identity("police", rogue), recipient())[1], "UNTRUSTED_CERTIFICATE"
    if case == "signature_altered":
        return "police", _tampered(seal(request, identity("police"), recipient())[1], "signature"), "BAD_SIGNATURE"
    if case == "ciphertext_altered":
        return "police", _tampered(seal(request, identity("police"), recipient())[1], "ciphertext"), "BAD_SIGNATURE"
    if case == "stale":
        old = now - timedelta(minutes=10)
        return "police", seal(request, identity("police"), recipient(), signed_at=old)[1], "STALE"
    if case == "from_the_future":
        ahead = now + timedelta(minutes=10)
        return "police", seal(request, identity("police"), recipient(), signed_at=ahead)[1], "STALE"
    if case == "malformed_bytes":
        return "police", b"\x00\x01 definitely not an envelope \xff", "MALFORMED"
    if case == "empty":
        return "police", b"", "MALFORMED"
    if case == "signed_garbage":
        return "police", _signed_garbage(), "MALFORMED"
    if case == "unknown_version":
        sealed = seal(request, identity("police"), recipient())[1]
        return "police", _resigned(sealed, lambda inner: setattr(inner, "version", 2)), "MALFORMED"
    if case == "timestamp_out_of_range":
        sealed = seal(request, identity("police"), recipient())[1]
        return "police", _resigned(sealed, lambda inner: setattr(inner.signed_at, "seconds", 2**62)), "MALFORMED"
    if case == "message_id_swapped":  # the HPKE info binds the message id: the ciphertext no longer opens
        sealed = seal(request, identity("police"), recipient())[1]
        swapped = _resigned(sealed, lambda inner: setattr(inner, "message_id", "another-id-0001"))
        return "police", swapped, "UNDECRYPTABLE"
    if case == "sealed_garbage":
        return "police", seal(_Raw(), identity("police"), recipient())[1], "MALFORMED"  # type: ignore[arg-type]
    raise AssertionError(case)


CASES = [
    "wrong_recipient_key",
    "our_key_id_on_another_key",
    "police_signs_claiming_health",
    "police_claims_health_on_its_own_subject",
    "health_envelope_replayed_by_police",
    "request_names_another_agency",
    "certificate_from_another_ca",
    "signature_altered",
    "ciphertext_altered",
    "stale",
    "from_the_future",
    "malformed_bytes",
    "empty",
    "signed_garbage",
    "unknown_version",
    "timestamp_out_of_range",
    "message_id_swapped",
    "sealed_garbage",
]


@pytest.mark.parametrize("case", CASES)
async def test_rejected_with_its_reason_and_stored_nowhere(intake: Intake, case: str, tmp_path: Path) -> None:
    publisher, data, reason = envelope_for(case, tmp_path)
    client = await intake.client(publisher)
    result = await answer(await client.publish_sealed(data))
    assert rejected(result) == reason
    assert await intake.stored() == NOTHING
    assert await intake.stream_messages() == 0
    assert all(c not in result.SerializeToString() for c in CANARIES)


async def test_invalid_request_is_rejected_naming_fields_only(intake: Intake) -> None:
    police = await intake.client("police")
    bad = police_concern(
        "POL-2026-0005",
        child={
            "nhs_number": "9434765918",
            "given_name": "Canarygiven",
            "family_name": "X",
            "date_of_birth": "2999-01-01",
        },
    )
    result = await police.submit(bad, wait=15)
    assert rejected(result) == "INVALID"
    assert list(result.field_paths) == ["child.date_of_birth", "child.nhs_number"]
    for value in (b"9434765918", b"2999-01-01", b"Canarygiven"):
        assert value not in result.SerializeToString()
    assert await intake.stored() == NOTHING


async def test_replayed_envelope_is_rejected_even_after_a_restart(intake: Intake) -> None:
    police = await intake.client("police")
    request = police_concern("POL-2026-0006")
    message_id, data = seal(request, identity("police"), recipient())
    first = await answer(await police.publish_sealed(data, msg_id=message_id))
    assert first.status == ACCEPTED
    # The same bytes again (without the publisher's dedup header, as an attacker would send them).
    assert rejected(await answer(await police.publish_sealed(data))) == "REPLAYED"
    before = await intake.stored()
    assert before["concerns"] == 1 and before["inbox"] == 1
    # The seen message ids are in the database: a restarted service still knows them.
    settings = intake.runtime.settings
    await intake.close()
    await intake.runtime.shutdown()
    intake.runtime = build(settings)  # type: ignore[arg-type]
    await intake.runtime.start()
    police = await intake.client("police")
    assert rejected(await answer(await police.publish_sealed(data))) == "REPLAYED"
    assert await intake.stored() == before


async def test_redelivery_of_an_answered_message_is_answered_again(intake: Intake) -> None:
    """A crash between answering and acking redelivers the same stream message: not a replay."""
    police = await intake.client("police")
    message_id, data = seal(police_concern("POL-2026-0007"), identity("police"), recipient())
    first = await answer(await police.publish_sealed(data, msg_id=message_id))
    runtime = intake.runtime
    assert runtime.intake_opener is not None and runtime.concern_intake is not None
    opened = runtime.intake_opener.open(data, "police")
    delivery = Delivery(first.stream_sequence, redelivered=True, stored_at=datetime.now(UTC))
    again = await runtime.concern_intake.accept(opened, delivery)
    assert again.status == ACCEPTED and again.response == first.response
    assert (await intake.stored())["concerns"] == 1


async def test_a_concern_and_its_claim_commit_in_one_transaction(intake: Intake, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The envelope's message id is claimed in the use case's own unit of work: recorded with the
    concern, its event and its idempotency key, or not at all (no crash between the two)."""
    runtime = intake.runtime
    assert runtime.intake_opener is not None and runtime.concern_intake is not None
    message_id, data = seal(police_concern("POL-2026-0008"), identity("police"), recipient())
    opened = runtime.intake_opener.open(data, "police")
    ours = asyncio.current_task()
    opened_here: list[str] = []
    transaction = runtime.db.transaction

    def counted():  # type: ignore[no-untyped-def]
        if asyncio.current_task() is ours:  # not the relay's
            opened_here.append("transaction")
        return transaction()

    monkeypatch.setattr(runtime.db, "transaction", counted)
    result = await runtime.concern_intake.accept(opened, Delivery(1, redelivered=False, stored_at=datetime.now(UTC)))
    assert result.status == ACCEPTED
    assert opened_here == ["transaction"]
    async with runtime.db.session() as s:
        claimed = (await s.execute(tables.delivery.inbox.select())).all()
    assert [row.msg_id for row in claimed] == [f"police:{message_id}"]
    assert (await intake.stored())["concerns"] == 1
    # The same envelope again, not a redelivery: refused, and nothing more written.
    with pytest.raises(IntakeRejected) as refused:
        await runtime.concern_intake.accept(opened, Delivery(2, redelivered=False, stored_at=datetime.now(UTC)))
    assert refused.value.reason == "REPLAYED"
    assert (await intake.stored())["concerns"] == 1


async def test_the_same_envelope_twice_at_once_is_recorded_once(intake: Intake) -> None:
    """Two copies of one envelope in the same batch, handled at once: one is recorded and
    answered, the other is REPLAYED; one concern, one claim."""
    assert intake.runtime.intake is not None
    await intake.runtime.intake.stop()
    police = await intake.client("police")
    _, data = seal(police_concern("POL-2026-0009"), identity("police"), recipient())
    pending = [await police.publish_sealed(data), await police.publish_sealed(data)]
    await intake.runtime.intake.start()
    results = [await answer(p) for p in pending]
    replayed = (intake_pb2.INTAKE_STATUS_REJECTED, "REPLAYED")
    assert sorted((r.status, r.reason) for r in results) == [(ACCEPTED, ""), replayed]
    stored = await intake.stored()
    assert (stored["concerns"], stored["inbox"], stored["idempotency"]) == (1, 1, 1)
    assert await intake.stream_messages() == 0


async def test_unknown_fields_in_a_sealed_concern_are_kept_nowhere(intake: Intake) -> None:
    """The sealed request carries a canary in an unknown field at every level: it is recorded, and
    the canary is in no table and no stream (ConcernRecorded copies the contexts)."""
    from tests.hostile.test_unknown_fields import CANARY, hostile_submission, rows_holding, unknown_anywhere

    police = await intake.client("police")
    request = pb.SubmitConcernRequest.FromString(hostile_submission("unknown-fields-intake"))
    request.agency, request.agency_reference = 1, "POL-UNKNOWN-1"  # AGENCY_POLICE
    assert unknown_anywhere(request)
    result = await police.submit(request)
    assert result.status == ACCEPTED, result.reason
    assert not unknown_anywhere(result)
    assert await rows_holding(intake.runtime, CANARY) == []

    async def published() -> bool:
        return bool(files_containing(intake.server.store_dir, [result.response.concern_id.encode()]))

    await eventually(published, within=10)
    assert files_containing(intake.server.store_dir, [CANARY]) == []
