"""Issue 4's figures: the key hierarchy's costs, measured in this process on SQLite.

- KEK wrap and unwrap of a data key (the file keyring; a KMS adds its round trip).
- A data key fetched for encryption (one counting UPDATE ... RETURNING) and for decryption, with
  the unwrapped key cached and not.
- Re-wrap rate during a rotation (`csx keys rotate`'s core) over N data keys.
- Finding a child by NHS number and by name + date of birth among 100,000 children: truncated
  blind index, then the candidates' identities decrypted and compared.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select

from benchmarks.support import Report, us_line
from csx.referrals.v1 import referrals_pb2 as pb
from csx_cli.rotation import rotate
from csx_common.crypto import DataKey, FieldCipher
from csx_common.datakeys import ACTIVE, DataKeys, child_scope, wrap_aad
from csx_common.db import Database
from csx_common.keyring import FileKeyring
from csx_common.migrations import upgrade
from csx_common.sealing import Sealer
from csx_common.sensitivity import registry
from csx_referrals import tables
from csx_referrals.app import MIGRATIONS
from csx_referrals.repository import CHILDREN, ReferralsRepository


async def per_op_us(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(rounds):
        await fn()
    return (time.perf_counter() - start) / rounds * 1e6


def nhs_number(i: int) -> str:
    """A valid NHS number (modulus 11) near 500000000 + i."""
    while True:
        digits = [int(d) for d in f"{500000000 + i:09d}"]
        check = (11 - sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True)) % 11) % 11
        if check != 10:
            return f"{500000000 + i:09d}{check}"
        i += 1_000_000_000 // 7  # skip the stems with no valid check digit (about 1 in 11)


def identity(i: int) -> pb.ChildIdentity:
    return pb.ChildIdentity(
        nhs_number=nhs_number(i),
        given_name=f"Child{i}",
        family_name=random.Random(i).choice(["Smith", "Jones", "Khan", "Nowak", "O'Brien"]),
        date_of_birth=f"20{10 + i % 8:02d}-{1 + i % 12:02d}-{1 + i % 28:02d}",
    )


async def populate(db: Database, repo: ReferralsRepository, keys: DataKeys, children: int) -> list[str]:
    """`children` rows as find_or_create_child writes them, each with its own wrapped data key, in bulk."""
    cipher = FieldCipher("referrals")
    ids: list[str] = []
    batch = 5000
    now = datetime.now(UTC)
    for start in range(0, children, batch):
        key_rows, child_rows = [], []
        for i in range(start, min(children, start + batch)):
            child_id = str(uuid.UUID(int=i + 1))
            ids.append(child_id)
            key_id, material = f"dk-bench{i:08d}", AESGCM.generate_key(256)
            kek_id, wrapped = await keys.keks.wrap(material, wrap_aad("referrals", child_scope(child_id), key_id))
            key_rows.append(
                {
                    "key_id": key_id,
                    "scope": child_scope(child_id),
                    "state": ACTIVE,
                    "kek_id": kek_id,
                    "wrapped": wrapped,
                    "encryptions": 4,
                    "created_at": now,
                }
            )
            who = identity(i)
            nhs, name_dob = repo.indexes(who)
            sealed = {}
            for field in ("nhs_number", "given_name", "family_name", "date_of_birth"):
                ctx = cipher.context(CHILDREN, child_id, field)
                blob = cipher.encrypt(getattr(who, field).encode(), ctx, DataKey(key_id, material))
                sealed[field] = base64.b64encode(blob).decode()
            child_rows.append(
                {
                    "child_id": child_id,
                    "nhs_index": nhs,
                    "name_dob_index": name_dob,
                    "sealed": sealed,
                    "created_at": now,
                }
            )
        async with db.transaction() as s:
            await s.execute(tables.data_keys.insert(), key_rows)
            await s.execute(tables.children.insert(), child_rows)
    return ids


async def bench_keys(work_dir: Path, out: Report, *, children: int = 100_000, rewrap: int = 20_000) -> None:
    out.append("-- Keys (issue 4), in-process, SQLite --")
    ring = FileKeyring.create(work_dir / "keys-bench-keyring.json")
    material = AESGCM.generate_key(256)
    kek_id, wrapped = await ring.wrap(material, b"aad")
    out.append(
        us_line("KEK wrap of a data key (file keyring)", await per_op_us(lambda: ring.wrap(material, b"aad"), 20000))
    )
    out.append(
        us_line(
            "KEK unwrap of a data key (file keyring)",
            await per_op_us(lambda: ring.unwrap(kek_id, wrapped, b"aad"), 20000),
        )
    )

    db = Database(f"sqlite+aiosqlite:///{work_dir / 'keys-bench.db'}")
    await upgrade(db, MIGRATIONS)
    keys = DataKeys(tables.data_keys, ring, "referrals")
    uncached = DataKeys(tables.data_keys, ring, "referrals", cache_seconds=0)
    repo = ReferralsRepository(Sealer(keys, registry()), ring.blind_index_key)
    async with db.transaction() as s:
        key = await keys.encryption_key(s, child_scope("bench"))

    async def for_encryption() -> None:
        async with db.transaction() as s:
            await keys.encryption_key(s, child_scope("bench"))

    async def for_decryption(which: DataKeys) -> None:
        async with db.session() as s:
            await which.decryption_keys(s, [key.key_id])

    out.append(us_line("data key for encryption (count + commit)", await per_op_us(for_encryption, 500)))
    out.append(us_line("data key for decryption, cached unwrap", await per_op_us(lambda: for_decryption(keys), 2000)))
    out.append(
        us_line("data key for decryption, fresh unwrap", await per_op_us(lambda: for_decryption(uncached), 2000))
    )

    t0 = time.perf_counter()
    ids = await populate(db, repo, keys, children)
    out.append(
        f"{'(populated ' + str(children) + ' children with their own keys)':<44} {time.perf_counter() - t0:9.1f} s"
    )
    rng = random.Random(7)

    async def lookup(by_nhs: bool) -> None:
        i = rng.randrange(children)
        who = identity(i)
        if not by_nhs:
            who.ClearField("nhs_number")
        async with db.session() as s:
            found, _possible = await repo.match_child(s, who)
        assert found is not None and found[0] == ids[i], "matching returned the wrong child"

    out.append(
        us_line(f"find a child by NHS number ({children:,} children)", await per_op_us(lambda: lookup(True), 2000))
    )
    out.append(
        us_line(f"find a child by name + DOB ({children:,} children)", await per_op_us(lambda: lookup(False), 2000))
    )
    async with db.session() as s:
        c = tables.children.c
        per_value = (
            (await s.execute(select(func.count()).select_from(tables.children).group_by(c.nhs_index))).scalars().all()
        )
    out.append(
        f"{'  children per NHS index value':<44} mean {sum(per_value) / len(per_value):.2f}, max {max(per_value)}"
    )
    await db.dispose()

    # Re-wrap: a rotation over `rewrap` data keys (no services running, so no rollout grace).
    rot_db = Database(f"sqlite+aiosqlite:///{work_dir / 'keys-bench-rotate.db'}")
    await upgrade(rot_db, MIGRATIONS)
    rot_keys = DataKeys(tables.data_keys, ring, "referrals")
    await populate(rot_db, ReferralsRepository(Sealer(rot_keys, registry()), ring.blind_index_key), rot_keys, rewrap)
    await rot_db.dispose()
    summary = await rotate(ring.path, {"referrals": str(rot_db.url)}, grace_seconds=0)
    out.append(
        f"{'re-wrap during rotation (' + str(summary.total_rewrapped) + ' keys)':<44} "
        f"{summary.keys_per_second:>9.0f}/s   whole rotation {summary.seconds:.1f} s"
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bench_keys(Path(tmp), Report(), children=20_000, rewrap=5_000))
