"""Names and other short identity fields are one line of printable text, NFC-normalised; free text
keeps line breaks and tabs but no other control or bidi character. Refusals name the field and
leave nothing behind."""

from __future__ import annotations

import grpc
import pytest

from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.errors import field_violations
from tests.referrals.conftest import Referrals
from tests.support import concern_request

REFUSED_NAMES = {
    "right-to-left override": "Ali\u202eecil",
    "zero-width joiner": "Ali\u200dce",
    "zero-width space": "Ali\u200bce",
    "NUL": "Ali\x00ce",
    "line break": "Ali\nce",
    "private use": "Ali\ue000ce",
    "only spaces": "   ",
    "only a no-break space": "\u00a0",
}


@pytest.mark.parametrize("where", ["child.given_name", "child.family_name", "referrer.name"])
@pytest.mark.parametrize("value", list(REFUSED_NAMES.values()), ids=list(REFUSED_NAMES))
async def test_a_name_with_control_format_or_private_use_characters_is_refused(
    referrals: Referrals, where: str, value: str
) -> None:
    request = concern_request("text-rules-1")
    holder, name = where.split(".")
    setattr(getattr(request, holder), name, value)
    before = await referrals.stored()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.SubmitConcern(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert where in {path for path, _ in field_violations(err.value)}
    assert value.strip() == "" or value not in (err.value.details() or "")
    assert await referrals.stored() == before


@pytest.mark.parametrize("value", ["x\u202ey", "x\u2066y\u2069", "x\x00y", "x\x1by", "x\x85y"])
async def test_free_text_refuses_controls_and_bidi_characters(referrals: Referrals, value: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await referrals.stub.SubmitConcern(concern_request("text-rules-2", narrative=value), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "narrative" in {path for path, _ in field_violations(err.value)}


async def test_free_text_keeps_line_breaks_and_tabs(referrals: Referrals) -> None:
    narrative = "Seen at the station.\r\n\tWith two older youths.\nAgain on Friday."
    response = await referrals.stub.SubmitConcern(concern_request("text-rules-3", narrative=narrative), timeout=10)
    got = await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=response.concern_id), timeout=10)
    assert got.concern.narrative == narrative


async def test_accepted_names_are_stored_nfc_and_match_either_form(referrals: Referrals) -> None:
    decomposed, composed = "Zoe\u0308", "Zo\u00eb"
    first = await referrals.stub.SubmitConcern(
        concern_request(
            "text-rules-4",
            child={
                "given_name": decomposed,
                "family_name": "Family",
                "date_of_birth": "2010-05-17",
                "nhs_number": "9434765919",
            },
        ),
        timeout=10,
    )
    got = await referrals.stub.GetConcern(pb.GetConcernRequest(concern_id=first.concern_id), timeout=10)
    assert got.concern.child.given_name == composed
    again = await referrals.stub.SubmitConcern(
        concern_request(
            "text-rules-5",
            agency_reference="EDU-text-rules-5",
            child={
                "given_name": composed,
                "family_name": "Family",
                "date_of_birth": "2010-05-17",
                "nhs_number": "9434765919",
            },
        ),
        timeout=10,
    )
    assert again.child_id == first.child_id
