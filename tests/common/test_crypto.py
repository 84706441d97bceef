"""Field ciphers, KEK wrapping, data keys and the sealer, on real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import MetaData, select

from csx.conferences.v1 import conferences_pb2 as cpb
from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.crypto import DataKey, DataLossError, FieldCipher, KeyDestroyedError, blind_index, key_id_of
from csx_common.datakeys import DataKeys, child_scope, data_keys_table, rewrap_batch
from csx_common.db import Database
from csx_common.keyring import DESTROYED, ENABLED, PRIMARY, FileKeyring, KeyringError
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry

KEY = DataKey("dk-test", b"k" * 32)


@pytest.fixture
def cipher() -> FieldCipher:
    return FieldCipher("referrals")


def test_round_trip_and_random_nonce(cipher: FieldCipher) -> None:
    ctx = cipher.context("concerns", "r1", "narrative")
    a, b = cipher.encrypt(b"secret", ctx, KEY), cipher.encrypt(b"secret", ctx, KEY)
    assert a != b
    assert key_id_of(a) == "dk-test"
    assert cipher.decrypt(a, ctx, {KEY.key_id: KEY.key}) == b"secret"


@pytest.mark.parametrize(
    "other",
    [("concerns", "r2", "narrative"), ("concerns", "r1", "child.given_name"), ("referrals", "r1", "narrative")],
)
def test_ciphertext_bound_to_its_place(cipher: FieldCipher, other: tuple[str, str, str]) -> None:
    blob = cipher.encrypt(b"secret", cipher.context("concerns", "r1", "narrative"), KEY)
    with pytest.raises(DataLossError):
        cipher.decrypt(blob, cipher.context(*other), {KEY.key_id: KEY.key})


def test_other_service_cannot_decrypt(cipher: FieldCipher) -> None:
    blob = cipher.encrypt(b"x", cipher.context("t", "r", "f"), KEY)
    panel = FieldCipher("panel")
    with pytest.raises(DataLossError):
        panel.decrypt(blob, panel.context("t", "r", "f"), {KEY.key_id: KEY.key})


@pytest.mark.parametrize("mutate", ["flip", "flip_nonce", "truncate", "unknown_key", "empty", "version", "header"])
def test_tampering_is_data_loss_never_a_value(cipher: FieldCipher, mutate: str) -> None:
    ctx = cipher.context("t", "r", "f")
    blob = bytearray(cipher.encrypt(b"value", ctx, KEY))
    if mutate == "flip":
        blob[-1] ^= 1
    elif mutate == "flip_nonce":
        blob[2 + len(KEY.key_id)] ^= 0x80
    elif mutate == "truncate":
        blob = blob[:-5]
    elif mutate == "unknown_key":
        blob[3] = ord("z")
    elif mutate == "empty":
        blob = bytearray()
    elif mutate == "header":
        blob = blob[:4]
    else:
        blob[0] = 9
    with pytest.raises(DataLossError):
        cipher.decrypt(bytes(blob), ctx, {KEY.key_id: KEY.key})


@pytest.mark.slow
def test_a_million_encryptions_under_one_key_never_repeat_a_nonce(cipher: FieldCipher) -> None:
    """Random 96-bit nonces: a repeat in 10^6 draws has probability ~2^-57. A repeat here would
    mean a broken nonce source, which is what this guards against."""
    ctx = cipher.context("t", "r", "f")
    start = 2 + len(KEY.key_id)
    nonces = {cipher.encrypt(b"", ctx, KEY)[start : start + 12] for _ in range(1_000_000)}
    assert len(nonces) == 1_000_000


def test_blind_index_is_keyed_per_purpose_and_truncated() -> None:
    k1, k2 = b"a" * 32, b"b" * 32
    assert blind_index(k1, "nhs", "9434765919") == blind_index(k1, "nhs", "9434765919")
    assert blind_index(k1, "nhs", "9434765919") != blind_index(k2, "nhs", "9434765919")
    assert blind_index(k1, "nhs", "9434765919") != blind_index(k1, "name", "9434765919")
    assert len(blind_index(k1, "nhs", "x", bits=16)) == 4
    assert blind_index(k1, "nhs", "x", bits=16) == blind_index(k1, "nhs", "x", bits=64)[:4]
    with pytest.raises(ValueError):
        blind_index(k1, "nhs", "x", bits=6)


# Keyring ----------------------------------------------------------------------------------------
async def test_keyring_file_is_private_and_wraps_under_its_primary(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "keyring.json"
    ring = FileKeyring.load_or_create(path)
    assert path.stat().st_mode & 0o077 == 0
    kek_id, wrapped = await ring.wrap(b"d" * 32, b"aad")
    assert kek_id == ring.primary_id
    again = FileKeyring.load_or_create(path)
    assert await again.unwrap(kek_id, wrapped, b"aad") == b"d" * 32
    assert again.blind_index_key == ring.blind_index_key
    with pytest.raises(DataLossError):
        await again.unwrap(kek_id, wrapped, b"other aad")
    with pytest.raises(DataLossError):
        await again.unwrap(kek_id, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), b"aad")
    with pytest.raises(DataLossError):
        await again.unwrap("kek-unknown", wrapped, b"aad")


async def test_keyring_rotation_steps_are_seen_by_a_running_reader(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    admin = FileKeyring.create(path)
    service = FileKeyring(path)
    old = admin.primary_id
    new = admin.add()
    admin.save()
    assert admin.keks[new].state == ENABLED
    # Not yet primary: the service still wraps under the old KEK, but can already unwrap the new.
    assert (await service.wrap(b"x" * 32, b"a"))[0] == old
    admin.promote(new)
    admin.save()
    kek_id, wrapped = await service.wrap(b"x" * 32, b"a")  # picks up the promotion at once
    assert kek_id == new and service.keks[old].state == ENABLED
    with pytest.raises(KeyringError):
        admin.destroy(new)
    admin.destroy(old)
    admin.save()
    assert FileKeyring(path).keks[old].state == DESTROYED and FileKeyring(path).keks[old].material is None
    assert await service.unwrap(new, wrapped, b"a") == b"x" * 32
    assert [k.state for k in FileKeyring(path).keks.values()].count(PRIMARY) == 1


def test_keyring_refuses_a_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text('{"primary": "k1", "keys": []}')
    with pytest.raises(KeyringError):
        FileKeyring(path)


# Data keys and the sealer, on both backends --------------------------------------------------------
@dataclass
class Keys:
    db: Database
    keys: DataKeys
    sealer: Sealer
    ring: FileKeyring


@pytest.fixture
async def dk(databases, tmp_path: Path) -> AsyncIterator[Keys]:  # type: ignore[no-untyped-def]
    metadata = MetaData()
    table = data_keys_table(metadata)
    db = Database(await databases.new("datakeys"))
    await db.run_sync(metadata.create_all)
    ring = FileKeyring.create(tmp_path / "keyring.json")
    keys = DataKeys(table, ring, "referrals", max_encryptions=5, reserve=1)
    yield Keys(db, keys, Sealer(keys, registry()), ring)
    await db.dispose()


async def test_one_key_per_child_and_rolled_over_at_the_cap(dk: Keys) -> None:
    async with dk.db.transaction() as s:
        a1 = await dk.keys.encryption_key(s, child_scope("a"), 3)
        b1 = await dk.keys.encryption_key(s, child_scope("b"), 1)
        a2 = await dk.keys.encryption_key(s, child_scope("a"), 2)
        a3 = await dk.keys.encryption_key(s, child_scope("a"), 1)  # 3 + 2 + 1 > 5: a new key
    assert a1 == a2 and a1 != b1 and a3 != a1
    t = dk.keys.table.c
    async with dk.db.session() as s:
        rows = {r.key_id: r for r in (await s.execute(select(dk.keys.table))).all()}
        assert rows[a1.key_id].state == "retired" and rows[a1.key_id].encryptions == 5
        assert rows[a3.key_id].state == "active" and rows[a3.key_id].encryptions == 1
        assert all(r.wrapped and a1.key not in r.wrapped for r in rows.values())  # stored wrapped only
        # The retired key still decrypts what it encrypted.
        assert (await dk.keys.decryption_keys(s, [a1.key_id, a3.key_id])) == {a1.key_id: a1.key, a3.key_id: a3.key}
        assert (await s.execute(select(t.kek_id).distinct())).scalars().all() == [dk.ring.primary_id]


async def test_encryptions_are_counted_once_per_transaction_and_never_undercounted(dk: Keys) -> None:
    keys = DataKeys(dk.keys.table, dk.ring, "referrals", max_encryptions=100, reserve=16)
    async with dk.db.transaction() as s:
        first = await keys.encryption_key(s, child_scope("c"), 1)  # the scope's first key: rolled
    statements: list[str] = []
    async with dk.db.transaction() as s:
        execute = s.execute

        async def counting(statement, params=None):  # type: ignore[no-untyped-def]
            statements.append(str(statement).split()[0])
            return await execute(statement, params)

        s.execute = counting  # type: ignore[method-assign]
        for _ in range(5):
            assert await keys.encryption_key(s, child_scope("c"), 3) == first  # one reservation
        assert statements == ["UPDATE"], statements
    async with dk.db.transaction() as s:
        assert await keys.encryption_key(s, child_scope("c"), 20) == first  # a reservation of its own
    async with dk.db.session() as s:
        row = (await s.execute(select(keys.table).where(keys.table.c.key_id == first.key_id))).one()
    assert row.encryptions == 16 + 16 + 20 >= 1 + 15 + 20  # reserved or more, never fewer than made


async def test_sealed_record_round_trip_and_tampering(dk: Keys) -> None:
    concern = pb.Concern(
        concern_id="c1",
        agency_reference="REF1",
        narrative="CANARY-NARRATIVE",
        child=pb.ChildIdentity(given_name="CANARY-GIVEN", family_name="Fam", date_of_birth="2011-02-03"),
        referrer=pb.Referrer(name="Ref", role="DSL", email="ref@example.org"),
    )
    async with dk.db.transaction() as s:
        body, sealed = await dk.sealer.seal_record(s, concern, table="concerns", record_id="c1", scope=child_scope("a"))
    assert b"CANARY" not in body and b"Fam" not in body and b"2011-02-03" not in body
    assert b"REF1" in body and b"DSL" in body
    assert set(sealed) >= {"narrative", "child.given_name", "referrer.email"}
    async with dk.db.session() as s:
        assert await dk.sealer.open_record(s, pb.Concern, body, sealed, table="concerns", record_id="c1") == concern
        only = await dk.sealer.open_record(
            s, pb.Concern, body, sealed, table="concerns", record_id="c1", only=lambda p: p == "narrative"
        )
        assert only.narrative == "CANARY-NARRATIVE" and only.child.given_name == ""
        for bad in (
            {"child.given_name": sealed["narrative"]},  # moved to another field
            {"narrative": base64.b64encode(b"\x01\x02ab").decode()},  # garbage
            {"narrative": "not base64!"},
            {"conference_id": sealed["narrative"]},  # not a sealed path
        ):
            with pytest.raises(DataLossError):
                await dk.sealer.open_record(s, pb.Concern, body, bad, table="concerns", record_id="c1")
        with pytest.raises(DataLossError):
            await dk.sealer.open_record(s, pb.Concern, body, sealed, table="concerns", record_id="c2")


async def test_the_sealer_stores_and_answers_only_fields_the_contract_names(dk: Keys) -> None:
    """Behind the edges that drop them: a record holding unknown fields (nested too) is stored and
    read back without them, so they are never kept in the clear body."""
    from tests.hostile.test_unknown_fields import CANARY, _unknown, unknown_anywhere, with_unknowns

    concern = pb.Concern(concern_id="c1", child=pb.ChildIdentity(given_name="G"), narrative="N")
    hostile = pb.Concern.FromString(with_unknowns(concern, _unknown(77, 2, CANARY)))
    assert unknown_anywhere(hostile)
    async with dk.db.transaction() as s:
        body, sealed = await dk.sealer.seal_record(s, hostile, table="concerns", record_id="c1", scope=child_scope("a"))
    assert CANARY not in body
    stored_before = body + with_unknowns(pb.Concern(), _unknown(78, 2, CANARY))  # a row written before
    async with dk.db.session() as s:
        opened = await dk.sealer.open_record(s, pb.Concern, stored_before, sealed, table="concerns", record_id="c1")
    assert not unknown_anywhere(opened) and opened == concern


async def test_sealer_handles_repeated_messages(dk: Keys) -> None:
    conf = cpb.Conference(
        conference_id="c1",
        summary="CANARY-SUMMARY",
        actions=[
            cpb.AgreedAction(owner_agency=1, description="CANARY-ONE", due_on="2027-01-01"),
            cpb.AgreedAction(owner_agency=3, description="CANARY-TWO", due_on="2027-01-02"),
        ],
    )
    async with dk.db.transaction() as s:
        body, sealed = await dk.sealer.seal_record(s, conf, table="conferences", record_id="c1", scope="service")
    assert b"CANARY" not in body
    assert set(sealed) == {"summary", "actions[0].description", "actions[1].description"}
    swapped = dict(sealed)
    swapped["actions[0].description"], swapped["actions[1].description"] = (
        sealed["actions[1].description"],
        sealed["actions[0].description"],
    )
    async with dk.db.session() as s:
        assert await dk.sealer.open_record(s, cpb.Conference, body, sealed, table="conferences", record_id="c1") == conf
        with pytest.raises(DataLossError):
            await dk.sealer.open_record(s, cpb.Conference, body, swapped, table="conferences", record_id="c1")


async def test_destroyed_key_erases_the_scope_and_nothing_else(dk: Keys) -> None:
    async with dk.db.transaction() as s:
        erased = await dk.sealer.seal(s, pb.Concern(narrative="A"), table="t", record_id="1", scope=child_scope("a"))
        kept = await dk.sealer.seal(s, pb.Concern(narrative="B"), table="t", record_id="2", scope=child_scope("b"))
        assert await dk.keys.destroy(s, child_scope("a"), datetime.now(UTC)) == 1
        assert await dk.keys.destroy(s, child_scope("a"), datetime.now(UTC)) == 0  # idempotent
        assert await dk.keys.destroy(s, child_scope("never-seen"), datetime.now(UTC)) == 0
    async with dk.db.transaction() as s:
        with pytest.raises(KeyDestroyedError):
            await dk.sealer.unseal(s, pb.Concern(), erased, table="t", record_id="1")
        assert (await dk.sealer.unseal(s, pb.Concern(), kept, table="t", record_id="2")).narrative == "B"
        assert await dk.keys.erased(s, child_scope("a")) and await dk.keys.erased(s, child_scope("never-seen"))
        with pytest.raises(KeyDestroyedError):  # an erased scope never gets a key again
            await dk.keys.encryption_key(s, child_scope("a"))


async def test_a_wrapped_key_moved_to_another_scope_does_not_unwrap(dk: Keys) -> None:
    async with dk.db.transaction() as s:
        a = await dk.keys.encryption_key(s, child_scope("a"))
        b = await dk.keys.encryption_key(s, child_scope("b"))
    t = dk.keys.table.c
    fresh = DataKeys(dk.keys.table, dk.ring, "referrals")  # no cache
    async with dk.db.transaction() as s:
        wrapped_a = (await s.execute(select(t.wrapped).where(t.key_id == a.key_id))).scalar_one()
        await s.execute(dk.keys.table.update().where(t.key_id == b.key_id).values(wrapped=wrapped_a))
        with pytest.raises(DataLossError):
            await fresh.decryption_keys(s, [b.key_id])
        with pytest.raises(DataLossError):
            await fresh.decryption_keys(s, ["dk-unknown"])


async def test_rewrap_moves_every_key_to_the_new_primary(dk: Keys) -> None:
    async with dk.db.transaction() as s:
        sealed = [
            await dk.sealer.seal(
                s, pb.Concern(narrative=f"n{i}"), table="t", record_id=str(i), scope=child_scope(str(i))
            )
            for i in range(7)
        ]
    old = dk.ring.primary_id
    new = dk.ring.add()
    dk.ring.promote(new)
    dk.ring.save()
    done = 0
    while True:
        async with dk.db.transaction() as s:
            n = await rewrap_batch(s, dk.keys, new, limit=3)
        done += n
        if not n:
            break
    assert done == 7
    async with dk.db.session() as s:
        assert await dk.keys.wrapped_by(s) == {new: 7}
    dk.ring.destroy(old)
    dk.ring.save()
    fresh = DataKeys(dk.keys.table, FileKeyring(dk.ring.path), "referrals")
    async with dk.db.session() as s:
        for i, blob in enumerate(sealed):
            restored = await Sealer(fresh, registry()).unseal(s, pb.Concern(), blob, table="t", record_id=str(i))
            assert restored.narrative == f"n{i}"


async def test_a_key_made_while_its_scope_is_erased_does_not_survive_the_erasure(dk: Keys) -> None:
    """PostgreSQL: a transaction making the scope's first key and one erasing the scope, at once. Each
    takes the scope's lock, so the erasure sees (and destroys) the new key; without it, a live key
    would stay beside the tombstone."""
    import asyncio

    made = asyncio.Event()

    async def make() -> None:
        async with dk.db.transaction() as s:
            await dk.keys.encryption_key(s, child_scope("racing"))
            made.set()
            await asyncio.sleep(0.3)  # still uncommitted while the erasure starts

    async def erase() -> None:
        await made.wait()
        async with dk.db.transaction() as s:
            await dk.keys.destroy(s, child_scope("racing"), datetime.now(UTC))

    await asyncio.gather(make(), erase())
    t = dk.keys.table.c
    async with dk.db.transaction() as s:
        states = (await s.execute(select(t.state).where(t.scope == child_scope("racing")))).scalars().all()
        assert states and set(states) == {"destroyed"}
        with pytest.raises(KeyDestroyedError):
            await dk.keys.encryption_key(s, child_scope("racing"))
