"""Hostile input: strategies that start from a valid message and break it, and the checks every
answer must pass (a clean status, nothing echoed, no rows and no events left by a rejection).

`CSX_HOSTILE_EXAMPLES=<n>` scales every property's example count up (or down) for a long run.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.sql import Select

from csx_common.messaging.events import MSG_ID_HEADER
from csx_safeguarding.runtime import SafeguardingRuntime

# Example counts --------------------------------------------------------------------------------


def examples(default: int) -> int:
    """`default` examples, or CSX_HOSTILE_EXAMPLES (a long run) when set."""
    raw = os.environ.get("CSX_HOSTILE_EXAMPLES", "").strip()
    return int(raw) if raw else default


def hostile_settings(default: int) -> settings:
    return settings(
        max_examples=examples(default),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        # The services under test keep state between examples; shrinking still works because
        # every example starts from freshly counted rows.
        print_blob=True,
    )


# Statuses --------------------------------------------------------------------------------------

# What a hostile request may get back. Never INTERNAL, UNKNOWN or DATA_LOSS (nor a timeout).
CLEAN = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# Rejected before any handler ran: not even an audit entry may be written.
REJECTED_AT_THE_DOOR = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED}
)
# Every read and every refusal is audited (docs/security.md, audit): the audit chain may grow on a refusal
# that a handler decided; nothing else may.
AUDIT_TABLES = frozenset({"audit_log", "audit_head", "audit_checkpoints"})


# Adversarial values ----------------------------------------------------------------------------

SQL_LOOKING = [
    "'; DROP TABLE concerns;--",
    "' OR '1'='1",
    "1; DELETE FROM outbox WHERE 1=1",
    '" OR ""="',
    "') UNION SELECT sealed FROM children --",
    "%s",
    "%s%s%s%s%n",
    "%(child_id)s",
    "{}",
    "{0}",
    "{child_id}",
    "${jndi:ldap://x/a}",
    "\\",
    "%",
    "_",
    "*",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "NULL",
    "null",
    "None",
    "NaN",
    "-1",
    "0",
    "true",
    "[]",
    '{"$gt": ""}',
]
UNICODE_EDGES = [
    "\x00",
    "a\x00b",
    "\uffff",
    "\ufffe",
    "\ufeff",
    "\u202eevil\u202c",
    "\u200b",
    "e\u0301\u0301\u0301\u0301",
    "\U0001f600",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "\U0010ffff",
    "\U0001d518\U0001d52b",
    "\u0130\u0131",
    "\u00df",
    "\r\n",
    "\t",
    " ",
    "\u01c5",
    "\u0085",
    "\u2028",
    "Z\u0337\u0322\u031b\u031ba\u0335l\u0336g\u0338o",
    "\ufdfa",
    "\uff21\uff22\uff23",
    "\u0661\u0662\u0663",
]
# Lengths either side of the limits in the protos (64, 100, 200, 1000, 4000, 20000) and beyond
# the 256 KiB message limit of the services under test.
LENGTHS = [1, 7, 8, 9, 10, 19, 20, 36, 63, 64, 65, 100, 101, 200, 201, 1000, 1001, 4000, 4001, 20000, 20001, 300_000]
DATES = [
    "2010-02-29",
    "2023-02-31",
    "2024-02-29",
    "0000-01-01",
    "0001-01-01",
    "9999-12-31",
    "1900-01-01",
    "2010-13-01",
    "2010-00-10",
    "2010-05-17\n",
    "2010-5-17",
    "17/05/2010",
    "2099-01-01",
]
CHARS = st.characters(exclude_categories=("Cs",))


def long_strings() -> st.SearchStrategy[str]:
    return st.builds(
        lambda n, c: (c * n)[:n] if len(c) == 1 else c * max(1, n // len(c)),
        st.sampled_from(LENGTHS),
        st.sampled_from(["A", "\u00e9", "\U0001f600", "'", "\x00", "e\u0301", "; DROP TABLE x;--"]),
    )


def adversarial_text() -> st.SearchStrategy[str]:
    edges = st.sampled_from(SQL_LOOKING + UNICODE_EDGES)
    return st.one_of(
        edges,
        st.builds(lambda a, b: a + b, edges, edges),
        st.builds(lambda a, b: f"Hostile{a}value{b}", edges, edges),
        st.text(CHARS, max_size=80),
        long_strings(),
        st.just(""),
    )


def uuid_variants() -> st.SearchStrategy[str]:
    return st.one_of(
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: "{" + str(u) + "}"),
        st.uuids().map(lambda u: u.hex),
        st.uuids().map(lambda u: str(u) + "\n"),
        st.uuids().map(lambda u: str(u) + "\x00"),
        st.uuids().map(lambda u: " " + str(u)),
        st.uuids().map(lambda u: str(u) + "'; --"),
        st.just("00000000-0000-0000-0000-000000000000"),
        st.just("ffffffff-ffff-ffff-ffff-ffffffffffff"),
    )


def ids(known: Sequence[str] = ()) -> st.SearchStrategy[str]:
    options = [uuid_variants(), adversarial_text()]
    if known:
        options.insert(0, st.sampled_from(list(known)))
    return st.one_of(*options)


def dates() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(DATES), st.dates().map(lambda d: d.isoformat()), adversarial_text())


INT32_EDGES = [0, 1, -1, 2, 5, 6, 1000, 100_000, 100_001, 2**31 - 1, -(2**31)]
INT64_EDGES = [*INT32_EDGES, 2**31, 2**63 - 1, -(2**63)]
UINT_EDGES = [0, 1, 2, 2**31, 2**32 - 1]
ENUM_EDGES = [0, -1, 9, 11, 999, 2**31 - 1, -(2**31)]
NOW = 1_795_000_000
TIMESTAMP_SECONDS = [
    0,
    -1,
    -62_135_596_800,
    -62_135_596_801,
    253_402_300_799,
    253_402_300_800,
    NOW,
    NOW + 3600,
    NOW + 10 * 365 * 86400,
    2**62,
    -(2**62),
]


def ints(kind: int) -> st.SearchStrategy[int]:
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.sampled_from(UINT_EDGES), st.integers(0, 2**32 - 1))
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.sampled_from([*UINT_EDGES, 2**64 - 1]), st.integers(0, 2**64 - 1))
    return st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))


def enum_numbers(field: FieldDescriptor) -> st.SearchStrategy[int]:
    defined = sorted(field.enum_type.values_by_number)
    return st.one_of(st.sampled_from(ENUM_EDGES), st.sampled_from(defined), st.integers(-(2**31), 2**31 - 1))


# Mutation --------------------------------------------------------------------------------------

UUID_LIKE = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


@dataclass
class Injected:
    """The values put into a request, to check that no error sends one back."""

    values: set[str] = field(default_factory=set)

    def add(self, value: str) -> None:
        # Ids may be named in an error (a precondition's subject); anything else may not. Short
        # values could match an error's own words by chance.
        if len(value) >= 8 and not UUID_LIKE.search(value) and value.strip():
            self.values.add(value)

    def echoed_in(self, *texts: bytes) -> list[str]:
        return [v for v in self.values if any(v.encode() in t for t in texts)]


def _slots(
    msg: pb_message.Message, prefix: str = "", depth: int = 0
) -> list[tuple[str, pb_message.Message, FieldDescriptor]]:
    """Every field that can be mutated: all fields of `msg`, and of the messages set inside it."""
    out = []
    for f in msg.DESCRIPTOR.fields:
        out.append((prefix + f.name, msg, f))
        if f.message_type is None or depth > 3 or f.message_type.full_name == "google.protobuf.Timestamp":
            continue
        if f.is_repeated:
            for i, item in enumerate(list(getattr(msg, f.name))[:2]):
                out.extend(_slots(item, f"{prefix}{f.name}[{i}].", depth + 1))
        elif msg.HasField(f.name):
            out.extend(_slots(getattr(msg, f.name), f"{prefix}{f.name}.", depth + 1))
    return out


def _string_strategy(f: FieldDescriptor, known_ids: Sequence[str]) -> st.SearchStrategy[str]:
    name = f.name
    if name.endswith("_id") or name == "erasure_id":
        return ids(known_ids)
    if name.endswith("_on") or "date" in name:
        return dates()
    return adversarial_text()


def _huge_count() -> st.SearchStrategy[int]:
    # Just beyond the limits in the protos (8, 20, 100) and far beyond.
    return st.sampled_from([9, 21, 101, 1000, 20_000])


# Copies of one element stop at about this many bytes: well past every service's message limit,
# never a message too big to build (a 300 000-character string copied 20 000 times).
HUGE_BYTES = 2_000_000


def _copies(wanted: int, element_bytes: int) -> int:
    return max(1, min(wanted, HUGE_BYTES // max(1, element_bytes)))


def mutate_field(
    draw: Any, holder: pb_message.Message, f: FieldDescriptor, injected: Injected, known_ids: Sequence[str]
) -> None:
    name = f.name
    if f.message_type is not None:
        if f.message_type.full_name == "google.protobuf.Timestamp" and not f.is_repeated:
            choice = draw(st.sampled_from(["clear", "seconds", "nanos"]))
            stamp: timestamp_pb2.Timestamp = getattr(holder, name)
            if choice == "clear":
                holder.ClearField(name)
            elif choice == "seconds":
                stamp.seconds = draw(st.one_of(st.sampled_from(TIMESTAMP_SECONDS), ints(FieldDescriptor.TYPE_INT64)))
            else:
                stamp.nanos = draw(st.sampled_from([-1, 999_999_999, 10**9, 2**31 - 1]))
            return
        if f.is_repeated:
            items = getattr(holder, name)
            choice = draw(st.sampled_from(["clear", "huge", "duplicate"]))
            if choice == "clear":
                del items[:]
                return
            template = items[0] if len(items) else items.add()
            for _ in range(_copies(draw(_huge_count()), template.ByteSize()) if choice == "huge" else 1):
                items.add().CopyFrom(template)
            return
        holder.ClearField(name)
        if draw(st.booleans()):
            getattr(holder, name).SetInParent()  # present, but empty
        return
    if f.is_repeated:
        items = getattr(holder, name)
        choice = draw(st.sampled_from(["clear", "huge", "odd"]))
        if choice == "clear":
            del items[:]
        elif f.enum_type is not None:
            if choice == "huge":
                items.extend([draw(enum_numbers(f))] * _copies(draw(_huge_count()), 5))
            else:
                items.extend(draw(st.lists(enum_numbers(f), min_size=1, max_size=5)))
        elif f.type == FieldDescriptor.TYPE_STRING:
            values = draw(st.lists(_string_strategy(f, known_ids), min_size=1, max_size=3))
            for v in values:
                injected.add(v)
            size = sum(len(v.encode()) for v in values)
            items.extend(values * (_copies(draw(_huge_count()), size) if choice == "huge" else 1))
        return
    if f.enum_type is not None:
        setattr(holder, name, draw(enum_numbers(f)))
    elif f.type == FieldDescriptor.TYPE_STRING:
        value = draw(_string_strategy(f, known_ids))
        injected.add(value)
        setattr(holder, name, value)
    elif f.type == FieldDescriptor.TYPE_BOOL:
        setattr(holder, name, not getattr(holder, name))
    elif f.type == FieldDescriptor.TYPE_BYTES:
        setattr(holder, name, draw(st.binary(max_size=64)))
    else:
        setattr(holder, name, draw(ints(f.type)))


def mutated(
    draw: Any, base: pb_message.Message, injected: Injected, known_ids: Sequence[str] = ()
) -> pb_message.Message:
    """A copy of `base` with zero to three of its fields broken."""
    msg = type(base)()
    msg.CopyFrom(base)
    for _ in range(draw(st.integers(0, 3))):
        slots = _slots(msg)
        if not slots:  # a request with no fields (a listing): only its bytes can be attacked
            break
        _path, holder, f = draw(st.sampled_from(slots))
        mutate_field(draw, holder, f, injected, known_ids)
    return msg


# Raw bytes -------------------------------------------------------------------------------------

NASTY_WIRE = [
    b"",
    b"\x00",
    b"\xff",
    b"\x08",  # a tag with no value
    b"\x08" + b"\xff" * 10 + b"\x01",  # an overlong varint
    b"\x0a\xff\xff\xff\xff\x0f",  # a length far beyond the payload
    b"\x0a\x05ab",  # a length beyond the payload
    b"\x0a\x02\xff\xfe",  # a string field that is not UTF-8
    b"\x0b" * 200,  # groups opened and never closed
    b"\x0b" * 5000 + b"\x0c" * 5000,  # nesting far beyond the recursion limit
    b"\x0c",  # a group closed that was never opened
    b"\x07\x00",  # field number 0
    b"\xf8\xff\xff\xff\x0f\x01",  # field number 2**29 - 1, the largest
    b"\x0d\x00\x00",  # a truncated fixed32
    b"\x09\x00\x00\x00",  # a truncated fixed64
]


def raw_payloads(valid: bytes) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, the known-nasty wire shapes, and a valid request truncated, bit-flipped,
    extended or spliced."""

    def truncated(n: int) -> bytes:
        return valid[: n % (len(valid) + 1)]

    def flipped(i: int, bit: int) -> bytes:
        if not valid:
            return b"\x80"
        data = bytearray(valid)
        data[i % len(data)] ^= 1 << bit
        return bytes(data)

    return st.one_of(
        st.binary(max_size=256),
        st.sampled_from(NASTY_WIRE),
        st.integers(0, 10_000).map(truncated),
        st.builds(flipped, st.integers(0, 10_000), st.integers(0, 7)),
        st.builds(lambda tail: valid + tail, st.binary(min_size=1, max_size=32)),
        st.builds(lambda head: head + valid, st.sampled_from(NASTY_WIRE[1:])),
    )


# Rows ------------------------------------------------------------------------------------------


def _counts_query(runtime: SafeguardingRuntime) -> Select[Any]:
    tables = sorted(runtime.metadata.tables.values(), key=lambda t: t.name)
    return select(*[select(func.count()).select_from(t).scalar_subquery().label(t.name) for t in tables])


async def row_counts(runtime: SafeguardingRuntime) -> dict[str, int]:
    """Rows in every table of the service's metadata, in one query."""
    async with runtime.db.session() as session:
        row = (await session.execute(_counts_query(runtime))).one()
    return {str(k): int(v) for k, v in row._mapping.items()}


def changed(before: dict[str, int], after: dict[str, int], ignore: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
    skip = set(ignore)
    return {k: (before[k], after.get(k, -1)) for k in before if k not in skip and before[k] != after.get(k, -1)}


# Calls -----------------------------------------------------------------------------------------


CALL_TIMEOUT = 20.0


@dataclass
class Answer:
    code: grpc.StatusCode
    message: str
    trailers: bytes
    response: Any = None


async def call(channel: grpc.aio.Channel, path: str, payload: pb_message.Message | bytes) -> Answer:
    """One call with the payload's exact bytes; the answer's status, message and trailers."""
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    method = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        response = await method(data, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as err:
        trailers = b"".join(
            (v if isinstance(v, bytes) else str(v).encode()) for _k, v in (err.trailing_metadata() or ())
        )
        return Answer(err.code(), err.details() or "", trailers)
    return Answer(grpc.StatusCode.OK, "", b"", response)


def assert_clean(answer: Answer, injected: Injected, what: str) -> None:
    assert answer.code in CLEAN, f"{what}: {answer.code.name} {answer.message!r}"
    echoed = injected.echoed_in(answer.message.encode(), answer.trailers)
    assert not echoed, f"{what}: the error repeats a value it was sent: {echoed!r}"


async def assert_nothing_left(
    runtime: SafeguardingRuntime, before: dict[str, int], answer: Answer, what: str
) -> dict[str, int]:
    """After a rejected request: no new rows anywhere (bar the audit of a refusal a handler made),
    so no outbox row either. Returns the counts to start the next example from."""
    after = await row_counts(runtime)
    if answer.code != grpc.StatusCode.OK:
        ignore = () if answer.code in REJECTED_AT_THE_DOOR else AUDIT_TABLES
        diff = changed(before, after, ignore)
        assert not diff, f"{what}: rejected with {answer.code.name} but rows changed: {diff}"
    return after


# Events ----------------------------------------------------------------------------------------


class FakeMsg:
    """A JetStream message as InboxConsumer.handle sees it, recording how it was settled."""

    def __init__(self, subject: str, data: bytes, msg_id: str, delivered: int = 1) -> None:
        self.subject = subject
        self.data = data
        self.headers = {MSG_ID_HEADER: msg_id}
        self.metadata = SimpleNamespace(
            stream="TEST", sequence=SimpleNamespace(stream=1, consumer=1), num_delivered=delivered
        )
        self.settled: str | None = None
        self.delay: float | None = None

    async def ack(self) -> None:
        self.settled = "ack"

    async def nak(self, delay: float | None = None) -> None:
        self.settled, self.delay = "nak", delay

    async def term(self) -> None:
        self.settled = "term"


async def deliver(consumer: Any, subject: str, data: bytes, *, max_rounds: int | None = None) -> tuple[str, int]:
    """Hand one message to a real InboxConsumer as JetStream would, redelivering while it is
    nak'ed (as the server would after the backoff) up to the consumer's max_deliver. Returns how
    it was finally settled and after how many deliveries."""
    msg_id = str(uuid.uuid4())
    rounds = max_rounds or consumer.spec.max_deliver
    for delivered in range(1, rounds + 1):
        msg = FakeMsg(subject, data, msg_id, delivered)
        await consumer.handle(msg)
        assert msg.settled is not None, "the consumer neither acked, nak'ed nor terminated the message"
        if msg.settled != "nak":
            return msg.settled, delivered
    return "nak", rounds


def consumer_for(runtime: SafeguardingRuntime, subject: str, durable: str | None = None) -> Any:
    for consumer in runtime.consumers:
        if (durable is None or consumer.spec.durable == durable) and any(
            r.subject == subject for r in consumer.spec.routes
        ):
            return consumer
    raise LookupError(f"no consumer of {subject} in {runtime.service}")


# One RPC, attacked -----------------------------------------------------------------------------

# Personal values in the valid requests the mutations start from: never in an error.
CANARIES = ["Hostilegivenname", "Hostilefamilyname", "HOSTILE-NARRATIVE-canary", "Hostile Referrer Name"]


class Rpc:
    """An RPC under attack: its path, a valid request to start from (given a fresh idempotency
    key), who normally calls it, and who else might try."""

    def __init__(
        self, path: str, base: Any, caller: Any, others: Sequence[Any] = (), known_ids: Sequence[str] = ()
    ) -> None:
        self.path, self.base, self.caller = path, base, caller
        self.others, self.known_ids = list(others), list(known_ids)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"Rpc({self.name})"


async def attack_with_mutations(running: Any, rpc: Rpc, data: Any) -> None:
    """One example: a mutated request from the usual caller or another; a clean answer, nothing
    echoed, and nothing left behind if it was refused."""
    injected = Injected()
    for canary in CANARIES:
        injected.add(canary)
    base = rpc.base(f"hostile-{uuid.uuid4().hex[:16]}")
    request = mutated(data.draw, base, injected, rpc.known_ids)
    principal = data.draw(st.one_of(st.just(rpc.caller), st.sampled_from([rpc.caller, *rpc.others])))
    before = await row_counts(running.runtime)
    answer = await call(running.channel(principal), rpc.path, request)
    assert_clean(answer, injected, rpc.name)
    await assert_nothing_left(running.runtime, before, answer, rpc.name)


async def attack_with_bytes(running: Any, rpc: Rpc, data: Any) -> None:
    """One example: arbitrary or damaged bytes sent as the request."""
    valid = rpc.base(f"hostile-{uuid.uuid4().hex[:16]}").SerializeToString()
    payload = data.draw(raw_payloads(valid))
    before = await row_counts(running.runtime)
    answer = await call(running.channel(rpc.caller), rpc.path, payload)
    injected = Injected()
    for canary in CANARIES:
        injected.add(canary)
    assert_clean(answer, injected, rpc.name)
    await assert_nothing_left(running.runtime, before, answer, rpc.name)


def service_methods(descriptor_file: Any, service: str) -> list[str]:
    """Every RPC path of a service, from its proto descriptor (so a new RPC is attacked too)."""
    svc = descriptor_file.services_by_name[service]
    return [f"/{svc.full_name}/{m.name}" for m in svc.methods]
