"""Micro-benchmark (reported, not asserted): audit appends beside a plain write, and verification.

Run alone with `pytest tests/audit/test_audit_bench.py -q -s` to see the figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.audit.support import benchmark, make_rig


async def test_append_and_verify_throughput(databases, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig(databases, tmp_path, "auditbench")
    try:
        r = await benchmark(rig.db, rig.audit, rig.signer, n=400)
        with capsys.disabled():
            print(
                f"\n[audit bench {databases.backend}] one-row transactions/s {r['baseline_tx_per_s']:,.0f}; "
                f"one-append transactions/s {r['append_tx_per_s']:,.0f} "
                f"({r['append_tx_per_s_20']:,.0f} with 20 at once); "
                f"an append adds {r['append_us_in_tx']:,.0f} us inside a transaction; "
                f"verify {r['verify_entries_per_s']:,.0f} entries/s"
            )
    finally:
        await rig.db.dispose()
