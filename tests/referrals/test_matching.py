"""Finding a known child without searching plaintext (issue 4 item 5): truncated blind indexes over
the NHS number and the normalised name + date of birth, candidates decrypted and compared exactly."""

from __future__ import annotations

import itertools
import unicodedata

from sqlalchemy import select

from csx_common.crypto import blind_index
from csx_referrals import tables
from csx_referrals.repository import INDEX_BITS
from tests.referrals.conftest import Referrals
from tests.support import concern_request


def nhs_numbers() -> itertools.count:  # type: ignore[type-arg]
    """Valid NHS numbers (modulus 11 check digit), in order."""
    for stem in itertools.count(400000000):
        digits = [int(d) for d in f"{stem:09d}"]
        check = 11 - sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True)) % 11
        if check == 11:
            check = 0
        if check != 10:
            yield f"{stem:09d}{check}"


def colliding(key: bytes, purpose: str, values: itertools.count) -> tuple[str, str]:  # type: ignore[type-arg]
    """Two different values whose truncated index is the same (birthday search)."""
    seen: dict[str, str] = {}
    for value in values:
        index = blind_index(key, purpose, value, bits=INDEX_BITS)
        if index in seen:
            return seen[index], value
        seen[index] = value
    raise AssertionError("unreachable")


def child(nhs: str = "", given: str = "Ada", family: str = "Lovelace", dob: str = "2011-03-04") -> dict[str, str]:
    return {"nhs_number": nhs, "given_name": given, "family_name": family, "date_of_birth": dob}


async def submit(referrals: Referrals, key: str, identity: dict[str, str]) -> str:
    response = await referrals.stub.SubmitConcern(concern_request(key, child=identity), timeout=10)
    return response.child_id


async def test_children_sharing_an_nhs_index_value_are_not_confused(referrals: Referrals) -> None:
    key = referrals.runtime.keyring.blind_index_key
    first, second = colliding(key, "nhs_number", nhs_numbers())
    a = await submit(referrals, "match-nhs-a", child(first, "Ann", "One"))
    b = await submit(referrals, "match-nhs-b", child(second, "Bea", "Two"))
    assert a != b
    assert await submit(referrals, "match-nhs-a2", child(first, "Ann", "One")) == a
    assert await submit(referrals, "match-nhs-b2", child(second, "Bea", "Two")) == b
    async with referrals.runtime.db.session() as s:
        c = tables.children.c
        indexes = dict((await s.execute(select(c.child_id, c.nhs_index))).all())
    assert indexes[a] == indexes[b] and len(indexes[a]) == INDEX_BITS // 4  # truncated, shared


async def test_the_same_child_is_found_by_name_and_date_of_birth_in_another_unicode_form(
    referrals: Referrals,
) -> None:
    composed = child("", "Zoë", "Łukasiewicz-Brontë", "2012-01-02")
    decomposed = child(
        "", unicodedata.normalize("NFD", " ZOË "), unicodedata.normalize("NFD", "łukasiewicz-brontë"), "2012-01-02"
    )
    assert decomposed["given_name"] != composed["given_name"]
    known = await submit(referrals, "match-name-1", composed)
    assert await submit(referrals, "match-name-2", decomposed) == known
    # Known by name only, then with an NHS number: the same child, which is then found by it.
    nhs = next(nhs_numbers())
    assert await submit(referrals, "match-name-3", dict(composed, nhs_number=nhs)) == known
    # The same NHS number with another name is not linked: a possible match for the MASH.
    assert await submit(referrals, "match-name-4", child(nhs, "Different", "Spelling", "2012-01-02")) != known
    # Same name and date of birth but a different NHS number: a different child.
    other_nhs = next(itertools.islice(nhs_numbers(), 1, None))
    assert await submit(referrals, "match-name-5", dict(composed, nhs_number=other_nhs)) != known


async def test_children_sharing_a_name_index_value_are_not_confused(referrals: Referrals) -> None:
    key = referrals.runtime.keyring.blind_index_key
    names = (f"given{i} family|2013-05-06" for i in itertools.count())
    first, second = colliding(key, "name_dob", names)  # type: ignore[arg-type]
    a = await submit(referrals, "match-nd-a", child("", first.split(" ")[0], "Family", "2013-05-06"))
    b = await submit(referrals, "match-nd-b", child("", second.split(" ")[0], "Family", "2013-05-06"))
    assert a != b
    async with referrals.runtime.db.session() as s:
        c = tables.children.c
        rows = dict((await s.execute(select(c.child_id, c.name_dob_index))).all())
    assert rows[a] == rows[b]


async def test_the_children_table_holds_no_plaintext_identity(referrals: Referrals) -> None:
    await submit(referrals, "match-plain-1", child("", "Canaryonly", "Plainsearch", "2014-07-08"))
    async with referrals.runtime.db.session() as s:
        rows = (await s.execute(select(tables.children))).all()
    assert rows and all("Canaryonly" not in repr(tuple(r)) and "2014-07-08" not in repr(tuple(r)) for r in rows)
