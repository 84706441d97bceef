"""A fuzz target for message decoding: bytes -> every request and event message type the services
accept -> `FromString` -> the request rules (protovalidate, via csx_common.validation) and the
event checks consumers make. Each step must either succeed or fail the expected way (DecodeError;
a list of violations, InvalidArgument); anything else is a finding.

Two ways to run it:

- in the suite, briefly: tests/hostile/test_fuzz_decode.py drives `check` with Hypothesis
  (a few hundred examples over arbitrary and damaged bytes, for every type);
- for a long, coverage-guided run (docs/reliability.md):

      .tools/bin/uv run --frozen --with atheris python tests/hostile/fuzz_decode.py --seconds 600

  atheris (libFuzzer) is not a project dependency; `uv run --with` lays it over the environment for
  this run only. Without atheris (or with `--engine hypothesis`) the same target is driven by
  Hypothesis's `fuzz_one_input` on random buffers for the time given: not coverage-guided, but the
  same checks. Findings are written under build/fuzz/ (atheris: crash-* files to replay with
  `python tests/hostile/fuzz_decode.py build/fuzz/crash-...`).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from google.protobuf import message as pb_message
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from csx.actionplans.v1 import actionplans_pb2
from csx.actionplans.v1 import events_pb2 as actionplans_events
from csx.conferences.v1 import conferences_pb2
from csx.conferences.v1 import events_pb2 as conferences_events
from csx.intake.v1 import intake_pb2
from csx.panel.v1 import events_pb2 as panel_events
from csx.panel.v1 import panel_pb2
from csx.referrals.v1 import events_pb2 as referrals_events
from csx.referrals.v1 import referrals_pb2
from csx.safeguarding.v1 import events_pb2 as safeguarding_events
from csx_common.errors import FieldViolation, InvalidArgument
from csx_common.validation import event_violations, validate, violations

MessageType = type[pb_message.Message]


def _class(descriptor: Descriptor) -> MessageType:
    return message_factory.GetMessageClass(descriptor)  # type: ignore[no-any-return]


def request_types() -> list[MessageType]:
    """The request of every RPC of every service."""
    found: dict[str, MessageType] = {}
    for module in (referrals_pb2, panel_pb2, conferences_pb2, actionplans_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[method.input_type.full_name] = _class(method.input_type)
    return [found[name] for name in sorted(found)]


def event_types() -> list[MessageType]:
    """Every event on the bus, and the sealed-intake messages referrals reads from NATS."""
    found: dict[str, MessageType] = {}
    for module in (
        referrals_events,
        safeguarding_events,
        panel_events,
        conferences_events,
        actionplans_events,
        intake_pb2,
    ):
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            found[descriptor.full_name] = _class(descriptor)
    return [found[name] for name in sorted(found)]


REQUESTS = request_types()
EVENTS = event_types()
TYPES = REQUESTS + [t for t in EVENTS if t not in REQUESTS]


def check(message_type: MessageType, data: bytes) -> str:
    """Decode and validate; return what happened ("undecodable", "invalid", "valid"). Raises
    (a finding) on anything but the expected failures."""
    try:
        msg = message_type.FromString(data)
    except DecodeError:
        return "undecodable"
    found = violations(msg)
    assert all(isinstance(v, FieldViolation) for v in found)
    try:
        validate(msg)
    except InvalidArgument as exc:
        assert exc.violations, "InvalidArgument without violations"
    if message_type in EVENTS:
        event_violations(msg)
    # What decoded re-encodes, and decodes to the same message.
    again = message_type.FromString(msg.SerializeToString())
    assert again == msg, "a message changed through a re-encode"
    return "invalid" if found else "valid"


def sample(message_type: MessageType) -> pb_message.Message:
    """A message with every field set (to something, not necessarily valid): a seed whose bytes
    the fuzzers damage, so damage lands in every field's wire format."""
    msg = message_type()
    _fill(msg, depth=0)
    return msg


def _fill(msg: pb_message.Message, depth: int) -> None:
    for f in msg.DESCRIPTOR.fields:
        value: object
        if f.message_type is not None:
            if depth > 3:
                continue
            if f.is_repeated:
                _fill(getattr(msg, f.name).add(), depth + 1)
            elif f.message_type.full_name == "google.protobuf.Timestamp":
                getattr(msg, f.name).seconds = 1_790_000_000
            else:
                _fill(getattr(msg, f.name), depth + 1)
            continue
        if f.enum_type is not None:
            value = max(f.enum_type.values_by_number)
        elif f.type == FieldDescriptor.TYPE_STRING:
            value = "2026-03-02" if f.name.endswith("_on") else "0b5c7a1e-7d3f-4f0e-9b5a-2f6c1d8e9a10"
        elif f.type == FieldDescriptor.TYPE_BYTES:
            value = b"\x01\x02"
        elif f.type == FieldDescriptor.TYPE_BOOL:
            value = True
        else:
            value = 3
        if f.is_repeated:
            getattr(msg, f.name).extend([value, value])
        else:
            setattr(msg, f.name, value)


SEEDS = {t: sample(t).SerializeToString() for t in TYPES}


def one_input(data: bytes) -> None:
    """The libFuzzer-style entry point: the first byte picks the type, the rest is the payload."""
    if not data:
        return
    check(TYPES[data[0] % len(TYPES)], data[1:])


# Long runs --------------------------------------------------------------------------------------


def _run_atheris(seconds: int, out: Path, extra: list[str]) -> None:
    import atheris  # type: ignore[import-not-found]

    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(TYPES):  # one valid-looking seed per type
        (corpus / f"seed-{i:02d}").write_bytes(bytes([i]) + SEEDS[t])
    atheris.instrument_all()
    args = [sys.argv[0], f"-max_total_time={seconds}", f"-artifact_prefix={out}/", "-rss_limit_mb=4096", *extra]
    atheris.Setup([*args, str(corpus)], one_input)
    atheris.Fuzz()


def _run_hypothesis(seconds: int, out: Path) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(database=None, deadline=None)
    @given(st.sampled_from(TYPES), st.binary(max_size=512))
    def target(message_type: MessageType, data: bytes) -> None:
        check(message_type, data)

    fuzz: Callable[[bytes], object] = target.hypothesis.fuzz_one_input  # type: ignore[attr-defined]
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    end = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < end:
        buffer = rng.randbytes(rng.randint(1, 1024))
        try:
            fuzz(buffer)
        except Exception:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"hypothesis-crash-{runs}"
            path.write_bytes(buffer)
            print(f"finding written to {path} (replay: fuzz_one_input on its bytes)", file=sys.stderr)
            raise
        runs += 1
    print(f"{runs} inputs, no findings", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("build/fuzz"), help="corpus and findings")
    parser.add_argument("replay", nargs="*", type=Path, help="inputs to run once (e.g. a crash file)")
    args, extra = parser.parse_known_args(argv)
    if args.replay:
        for path in args.replay:
            one_input(path.read_bytes())
            print(f"{path}: no finding")
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # type: ignore[import-not-found]  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    print(f"fuzzing {len(TYPES)} message types for {args.seconds}s with {engine}", file=sys.stderr)
    if engine == "atheris":
        _run_atheris(args.seconds, args.out, extra)
    else:
        _run_hypothesis(args.seconds, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
