from __future__ import annotations

import base64

import pytest

from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.crypto import DataLossError, FieldCipher, Keyring, blind_index
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry


@pytest.fixture
def cipher() -> FieldCipher:
    return FieldCipher(Keyring.generate(), "referrals")


def test_round_trip_and_random_nonce(cipher: FieldCipher) -> None:
    ctx = cipher.context("concerns", "r1", "narrative")
    a, b = cipher.encrypt(b"secret", ctx), cipher.encrypt(b"secret", ctx)
    assert a != b
    assert cipher.decrypt(a, ctx) == b"secret"


@pytest.mark.parametrize(
    "other",
    [
        ("concerns", "r2", "narrative"),
        ("concerns", "r1", "child.given_name"),
        ("referrals", "r1", "narrative"),
    ],
)
def test_ciphertext_bound_to_its_place(cipher: FieldCipher, other: tuple[str, str, str]) -> None:
    blob = cipher.encrypt(b"secret", cipher.context("concerns", "r1", "narrative"))
    with pytest.raises(DataLossError):
        cipher.decrypt(blob, cipher.context(*other))


def test_other_service_cannot_decrypt() -> None:
    ring = Keyring.generate()
    blob = FieldCipher(ring, "referrals").encrypt(b"x", FieldCipher(ring, "referrals").context("t", "r", "f"))
    panel = FieldCipher(ring, "panel")
    with pytest.raises(DataLossError):
        panel.decrypt(blob, panel.context("t", "r", "f"))


@pytest.mark.parametrize("mutate", ["flip", "truncate", "unknown_key", "empty", "version"])
def test_tampering_is_data_loss(cipher: FieldCipher, mutate: str) -> None:
    ctx = cipher.context("t", "r", "f")
    blob = bytearray(cipher.encrypt(b"value", ctx))
    if mutate == "flip":
        blob[-1] ^= 1
    elif mutate == "truncate":
        blob = blob[:-5]
    elif mutate == "unknown_key":
        blob[2] = ord("z")
    elif mutate == "empty":
        blob = bytearray()
    else:
        blob[0] = 9
    with pytest.raises(DataLossError):
        cipher.decrypt(bytes(blob), ctx)


def test_keyring_file_round_trip_and_permissions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys" / "keyring.json"
    ring = Keyring.load_or_create(path)
    assert path.stat().st_mode & 0o077 == 0
    again = Keyring.load_or_create(path)
    key_id, key = ring.encryption_key("")
    assert again.decryption_key(key_id) == key
    assert again.blind_index_key == ring.blind_index_key


def test_blind_index_is_keyed_and_per_purpose() -> None:
    k1, k2 = b"a" * 32, b"b" * 32
    assert blind_index(k1, "nhs", "9434765919") == blind_index(k1, "nhs", "9434765919")
    assert blind_index(k1, "nhs", "9434765919") != blind_index(k2, "nhs", "9434765919")
    assert blind_index(k1, "nhs", "9434765919") != blind_index(k1, "name", "9434765919")


def test_sealer_clears_personal_fields_and_restores_them(cipher: FieldCipher) -> None:
    sealer = Sealer(cipher, registry())
    concern = pb.Concern(
        concern_id="c1",
        agency_reference="REF1",
        narrative="CANARY-NARRATIVE",
        child=pb.ChildIdentity(given_name="CANARY-GIVEN", family_name="Fam", date_of_birth="2011-02-03"),
        referrer=pb.Referrer(name="Ref", role="DSL", email="ref@example.org"),
    )
    body, sealed = sealer.seal_record(concern, table="concerns", record_id="c1")
    assert b"CANARY" not in body and b"Fam" not in body and b"2011-02-03" not in body
    assert b"REF1" in body and b"DSL" in body
    assert set(sealed) >= {"narrative", "child.given_name", "referrer.email"}
    restored = sealer.open_record(pb.Concern, body, sealed, table="concerns", record_id="c1")
    assert restored == concern


def test_sealed_value_moved_to_another_field_is_data_loss(cipher: FieldCipher) -> None:
    sealer = Sealer(cipher, registry())
    _, sealed = sealer.seal_record(
        pb.Concern(narrative="n", child=pb.ChildIdentity(given_name="g")), table="concerns", record_id="c1"
    )
    moved = {"child.given_name": sealed["narrative"]}
    with pytest.raises(DataLossError):
        sealer.open_record(pb.Concern, b"", moved, table="concerns", record_id="c1")
    garbage = {"narrative": base64.b64encode(b"\x01\x02ab").decode()}
    with pytest.raises(DataLossError):
        sealer.open_record(pb.Concern, b"", garbage, table="concerns", record_id="c1")


def test_sealer_handles_repeated_messages(cipher: FieldCipher) -> None:
    from csx.conferences.v1 import conferences_pb2 as cpb

    sealer = Sealer(cipher, registry())
    conf = cpb.Conference(
        conference_id="c1",
        summary="CANARY-SUMMARY",
        actions=[
            cpb.AgreedAction(owner_agency=1, description="CANARY-ONE", due_on="2027-01-01"),
            cpb.AgreedAction(owner_agency=3, description="CANARY-TWO", due_on="2027-01-02"),
        ],
    )
    body, sealed = sealer.seal_record(conf, table="conferences", record_id="c1")
    assert b"CANARY" not in body
    assert set(sealed) == {"summary", "actions[0].description", "actions[1].description"}
    assert sealer.open_record(cpb.Conference, body, sealed, table="conferences", record_id="c1") == conf
    swapped = dict(sealed)
    swapped["actions[0].description"], swapped["actions[1].description"] = (
        sealed["actions[1].description"],
        sealed["actions[0].description"],
    )
    with pytest.raises(DataLossError):
        sealer.open_record(cpb.Conference, body, swapped, table="conferences", record_id="c1")
    with pytest.raises(DataLossError):
        sealer.open_record(
            cpb.Conference, body, {"conference_id": sealed["summary"]}, table="conferences", record_id="c1"
        )
