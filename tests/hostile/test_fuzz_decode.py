"""The decoding fuzz target (fuzz_decode.py), run briefly in the suite with Hypothesis: arbitrary,
truncated, bit-flipped and spliced bytes for every request and event message type. The long,
coverage-guided run is documented in docs/reliability.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile.fuzz_decode import EVENTS, REQUESTS, SEEDS, TYPES, check, main, one_input
from tests.hostile.support import hostile_settings, raw_payloads


def test_every_request_and_event_type_is_fuzzed() -> None:
    from csx.actionplans.v1 import actionplans_pb2
    from csx.conferences.v1 import conferences_pb2
    from csx.panel.v1 import panel_pb2
    from csx.referrals.v1 import referrals_pb2

    inputs = {
        m.input_type.full_name
        for module in (referrals_pb2, panel_pb2, conferences_pb2, actionplans_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert inputs == {t.DESCRIPTOR.full_name for t in REQUESTS}
    names = {t.DESCRIPTOR.full_name for t in EVENTS}
    assert {
        "csx.safeguarding.v1.ConsentChanged",
        "csx.conferences.v1.ConferenceConcluded",
        "csx.intake.v1.Envelope",
    } <= names
    # Each seed is a decodable message, so damaging it exercises every field's wire format.
    assert all(check(t, SEEDS[t]) in ("valid", "invalid") for t in TYPES)


@pytest.mark.parametrize("message_type", TYPES, ids=lambda t: t.DESCRIPTOR.name)
@hostile_settings(60)
@given(data=st.data())
def test_decoding_and_validation_fail_only_the_expected_ways(message_type, data) -> None:  # type: ignore[no-untyped-def]
    payload = data.draw(raw_payloads(SEEDS[message_type]))
    assert check(message_type, payload) in ("undecodable", "invalid", "valid")


@hostile_settings(500)
@given(st.binary(max_size=512))
def test_the_fuzzer_entry_point(data: bytes) -> None:
    one_input(data)


def test_the_long_run_entry_point_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["--seconds", "1", "--engine", "hypothesis", "--out", str(tmp_path)]) == 0
    crash = tmp_path / "input"
    crash.write_bytes(b"\x00" + SEEDS[TYPES[0]][:3])
    assert main([str(crash)]) == 0
