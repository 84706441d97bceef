"""A concern carrying fields its contract does not name keeps none of them: not in any table, the
SQLite file, the stream the service publishes to, nor any answer (tests/hostile/test_unknown_fields.py
has the property over every message type)."""

from __future__ import annotations

from pathlib import Path

from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.natsserver import NatsServer
from tests.hostile.test_unknown_fields import CANARY, hostile_submission, rows_holding, unknown_anywhere
from tests.referrals.conftest import Referrals
from tests.support import eventually, files_containing


async def test_a_concern_with_unknown_fields_keeps_none_of_them(referrals: Referrals, nats_server: NatsServer) -> None:
    stub = referrals.stub
    request = pb.SubmitConcernRequest.FromString(hostile_submission("unknown-fields-1"))
    assert unknown_anywhere(request)
    response = await stub.SubmitConcern(request, timeout=10)
    assert not unknown_anywhere(response)
    got = await stub.GetConcern(pb.GetConcernRequest(concern_id=response.concern_id), timeout=10)
    assert not unknown_anywhere(got)
    assert got.concern.child.given_name == "Canarygiven"
    assert await rows_holding(referrals.runtime, CANARY) == []
    url = referrals.runtime.settings.database_url
    if url.startswith("sqlite"):
        assert files_containing(Path(url.split("///", 1)[1]).parent, [CANARY]) == []

    async def published() -> bool:  # ConcernRecorded (with the contexts) reached the stream's store
        return bool(files_containing(nats_server.store_dir, [response.concern_id.encode()]))

    await eventually(published, within=10)
    assert files_containing(nats_server.store_dir, [CANARY]) == []


async def test_a_retry_with_unknown_fields_answers_without_them(referrals: Referrals) -> None:
    request = pb.SubmitConcernRequest.FromString(hostile_submission("unknown-fields-2"))
    first = await referrals.stub.SubmitConcern(request, timeout=10)
    again = await referrals.stub.SubmitConcern(request, timeout=10)
    assert again == first
    assert not unknown_anywhere(again)
