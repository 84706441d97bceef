"""Fields the contract does not name never reach a handler, a store, a response or the bus.

An unknown field is neither classified nor sealed: kept, it would be stored in the clear part of a
record and handed back to whoever reads it. Every edge drops them (the gRPC guard, the event
consumer, sealed intake) and the sealer and the outbox serialize only known fields behind them.

- a property over every request and every event type of every contract: unknown fields of any
  wire type and number, at every nesting level, are gone after the edge decodes the message;
- end to end (tests/referrals/test_unknown_fields.py, tests/intake): a SubmitConcern with a canary in
  an unknown field at every level leaves the canary in no table, no stored event and no response.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import message as pb_message
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

import csx
from csx.referrals.v1 import referrals_pb2 as pb
from csx_common.grpc_server import _decode
from csx_common.messaging.consumer import decode_event
from csx_safeguarding.runtime import SafeguardingRuntime
from tests.hostile.support import hostile_settings
from tests.support import concern_request

CANARY = b"UNKNOWN-FIELD-CANARY"


# Every request and event type -------------------------------------------------------------------


def _contract_messages() -> Iterator[type[pb_message.Message]]:
    for info in pkgutil.walk_packages(csx.__path__, "csx."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for name in module.DESCRIPTOR.message_types_by_name:
            cls = getattr(module, name)
            if name.endswith("Request") or module.__name__.endswith("events_pb2"):
                yield cls


MESSAGES = sorted(_contract_messages(), key=lambda c: c.DESCRIPTOR.full_name)


def _fill(msg: pb_message.Message, depth: int = 0) -> None:
    """Set every field (one element of each repeated one) so that every nesting level exists."""
    for field in msg.DESCRIPTOR.fields:
        if field.containing_oneof is not None and msg.WhichOneof(field.containing_oneof.name):
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry or depth > 4:
                continue
            target = getattr(msg, field.name).add() if field.is_repeated else getattr(msg, field.name)
            _fill(target, depth + 1)
            if not field.is_repeated:
                target.SetInParent()
            continue
        value: Any
        if field.type == FieldDescriptor.TYPE_STRING:
            value = "x"
        elif field.type == FieldDescriptor.TYPE_BYTES:
            value = b"x"
        elif field.type == FieldDescriptor.TYPE_BOOL:
            value = True
        elif field.enum_type is not None:
            value = field.enum_type.values[-1].number
        elif field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT or field.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE:
            value = 1.5
        else:
            value = 1
        if field.is_repeated:
            getattr(msg, field.name).append(value)
        else:
            setattr(msg, field.name, value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _unknown(number: int, wire: int, canary: bytes) -> bytes:
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(int.from_bytes(canary[:8], "little"))
    if wire == 1:
        return tag + canary[:8].ljust(8, b"\0")
    if wire == 5:
        return tag + canary[:4].ljust(4, b"\0")
    return tag + _varint(len(canary)) + canary


def with_unknowns(msg: pb_message.Message, unknown: bytes, levels: set[int] | None = None, depth: int = 0) -> bytes:
    """`msg`'s wire bytes with `unknown` appended inside every nested message (at the depths in
    `levels`, or all), so that the parsed message holds unknown fields at each of those levels."""
    out = bytearray()
    for field, value in msg.ListFields():
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if field.is_repeated else [value]:
                inner = with_unknowns(item, unknown, levels, depth + 1)
                out += _varint(field.number << 3 | 2) + _varint(len(inner)) + inner
        else:
            single = type(msg)()
            single.MergeFrom(msg)
            for other, _ in single.ListFields():
                if other is not field:
                    single.ClearField(other.name)
            out += single.SerializeToString()
    if levels is None or depth in levels:
        out += unknown
    return bytes(out)


def unknown_anywhere(msg: pb_message.Message) -> bool:
    if len(UnknownFieldSet(msg)):
        return True
    for field, value in msg.ListFields():
        if field.message_type is not None:
            items = value if field.is_repeated else [value]
            if field.message_type.GetOptions().map_entry:
                items = [v for v in value.values() if isinstance(v, pb_message.Message)]
            if any(unknown_anywhere(item) for item in items):
                return True
    return False


def test_the_contracts_have_requests_and_events_to_check() -> None:
    names = {cls.DESCRIPTOR.full_name for cls in MESSAGES}
    assert "csx.referrals.v1.SubmitConcernRequest" in names
    assert "csx.referrals.v1.ConcernRecorded" in names
    assert len(MESSAGES) >= 25


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.DESCRIPTOR.full_name)
@hostile_settings(15)
@given(
    number=st.integers(min_value=1000, max_value=18999) | st.integers(min_value=20000, max_value=2**29 - 1),
    wire=st.sampled_from([0, 1, 2, 5]),
    levels=st.none() | st.sets(st.integers(min_value=0, max_value=5), min_size=1),
)
def test_every_edge_drops_unknown_fields_at_every_level(
    cls: type[pb_message.Message], number: int, wire: int, levels: set[int] | None
) -> None:
    full = cls()
    _fill(full)
    payload = with_unknowns(full, _unknown(number, wire, CANARY), levels)
    if levels is None:  # the injection itself works: the plain parser keeps them all
        assert unknown_anywhere(cls.FromString(payload))
    for decoded in (_decode(cls.FromString, payload), decode_event(cls, payload)):
        assert not unknown_anywhere(decoded)
        assert CANARY not in decoded.SerializeToString()
        assert decoded == full


def hostile_submission(key: str) -> bytes:
    """A valid SubmitConcern whose every message (the request, child, referrer, intelligence, each
    context) carries the canary in an unknown field."""
    request = concern_request(key)
    request.intelligence.CopyFrom(
        pb.IntelligenceGrading(source_grade=pb.SOURCE_GRADE_B, intelligence_grade=2, handling_code=pb.HANDLING_CODE_P)
    )
    return with_unknowns(request, _unknown(99, 2, CANARY))


async def rows_holding(runtime: SafeguardingRuntime, needle: bytes) -> list[str]:
    """Every table of the service whose rows hold `needle` anywhere (any backend)."""
    hits = []
    async with runtime.db.session() as session:
        for table in runtime.metadata.sorted_tables:
            for row in (await session.execute(select(table))).all():
                if any(needle in (v if isinstance(v, bytes) else str(v).encode()) for v in row):
                    hits.append(table.name)
    return hits
