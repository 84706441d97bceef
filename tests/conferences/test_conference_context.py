"""Intervention A with context: the intra-familial grounds and the contexts (places, peer groups)
the child protection conference considers, recorded by social care on A's conferences only."""

from __future__ import annotations

import uuid

import pytest
from conferences_support import SOCIAL_WORKER, Harness, routed
from sqlalchemy import func, select

from csx.conferences.v1 import conferences_pb2 as pb
from csx.types.v1 import types_pb2
from csx_common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from csx_common.identity import Principal
from csx_common.validation import validate
from csx_conferences import tables

NOTE = "CANARY-CONTEXT-7f1e older males at the station car park after school"


async def conference(h: Harness, intervention: int) -> pb.Conference:
    child_id = str(uuid.uuid4())
    strategy = "2026-03-02" if intervention == types_pb2.INTERVENTION_A else ""
    await h.deliver(routed(str(uuid.uuid4()), child_id, intervention, strategy_discussion_on=strategy))
    (found,) = (await h.service.list_conferences(None, child_id))[0]
    return found


def context_request(c: pb.Conference, key: str, grounds: list[int]) -> pb.RecordConferenceContextRequest:
    return pb.RecordConferenceContextRequest(
        conference_id=c.conference_id,
        idempotency_key=key,
        expected_version=c.version,
        grounds=grounds,
        contexts=[
            pb.ContextConsidered(place_id="plc-station", context_type=types_pb2.CONTEXT_TYPE_TRANSPORT, note=NOTE),
            pb.ContextConsidered(context_type=types_pb2.CONTEXT_TYPE_PEER_GROUP),
        ],
    )


async def test_a_records_its_grounds_and_the_contexts_considered(harness: Harness) -> None:
    h = harness
    initial = await conference(h, types_pb2.INTERVENTION_A)
    grounds = [types_pb2.HARM_TYPE_NEGLECT, types_pb2.HARM_TYPE_EMOTIONAL_ABUSE]
    done = await h.service.record_conference_context(SOCIAL_WORKER, context_request(initial, "context-a-0001", grounds))
    recorded = done.conference
    assert list(recorded.grounds) == grounds
    assert [(c.place_id, c.context_type, c.note) for c in recorded.contexts] == [
        ("plc-station", types_pb2.CONTEXT_TYPE_TRANSPORT, NOTE),
        ("", types_pb2.CONTEXT_TYPE_PEER_GROUP, ""),
    ]
    assert recorded.version == initial.version + 1
    # A second record replaces the first.
    again = context_request(recorded, "context-a-0002", [types_pb2.HARM_TYPE_PHYSICAL_ABUSE])
    del again.contexts[1:]
    replaced = (await h.service.record_conference_context(SOCIAL_WORKER, again)).conference
    assert list(replaced.grounds) == [types_pb2.HARM_TYPE_PHYSICAL_ABUSE] and len(replaced.contexts) == 1
    # The note is sealed: not in clear in the conferences table.
    async with h.db.session() as s:
        bodies = (await s.execute(select(tables.conferences.c.body, tables.conferences.c.sealed))).all()
    assert all(NOTE.encode() not in row.body and NOTE not in str(row.sealed) for row in bodies)


async def test_grounds_are_for_a_and_social_care_records_them(harness: Harness) -> None:
    h = harness
    b = await conference(h, types_pb2.INTERVENTION_B)
    with pytest.raises(FailedPrecondition) as err:
        await h.service.record_conference_context(
            SOCIAL_WORKER, context_request(b, "context-b-0001", [types_pb2.HARM_TYPE_NEGLECT])
        )
    assert err.value.reason == "NOT_CHILD_PROTECTION"
    initial = await conference(h, types_pb2.INTERVENTION_A)
    police = Principal("pc.1", "police", "police_officer", "conference_participation")
    with pytest.raises(PermissionDenied) as denied:
        await h.service.record_conference_context(
            police, context_request(initial, "context-pc-0001", [types_pb2.HARM_TYPE_NEGLECT])
        )
    assert denied.value.reason == "SOCIAL_CARE_ONLY"
    async with h.db.session() as s:
        versions = (await s.execute(select(func.max(tables.conferences.c.version)))).scalar_one()
    assert versions == 1  # nothing written by either refusal


def test_only_intra_familial_grounds_are_accepted_by_the_contract() -> None:
    c = pb.Conference(conference_id=str(uuid.uuid4()), version=1)
    for grounds in ([types_pb2.HARM_TYPE_CHILD_CRIMINAL_EXPLOITATION], [], [9, 9]):
        with pytest.raises(InvalidArgument):
            validate(context_request(c, "context-bad-0001", grounds))
    validate(context_request(c, "context-ok-0001", [9, 10, 11, 12]))


async def test_a_day_that_does_not_exist_is_invalid_not_an_internal_error(harness: Harness) -> None:
    """The contract's date patterns let 2010-02-29 through; the use cases refuse it as invalid (a
    chair registered with it would otherwise break arranging every conference)."""
    from conferences_support import MANAGER

    bad = pb.RegisterChairRequest(
        idempotency_key="chair-bad-date-01",
        chair=pb.Chair(user_id="chair.baddate", name="Chair Bad Date", trained_on="2010-02-29"),
    )
    with pytest.raises(InvalidArgument) as err:
        await harness.service.register_chair(MANAGER, bad)
    assert [v.field for v in err.value.violations] == ["chair.trained_on"]
    assert await harness.service.list_chairs(MANAGER) == []
