"""The short chaos run in `make test` (issue 6): a few hundred concerns through gRPC and sealed intake,
part of them driven on to a conference and a plan, while every nemesis strikes at least once in an
order fixed by the seed; afterwards nothing acknowledged is lost, nothing is applied twice, nothing
appears that was never attempted, and reconciliation recovers the message the broker lost.
`make chaos` is the long version (tests/chaos/run.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.nemesis import NAMES
from tests.chaos.run import ChaosConfig, run_chaos

SEED = 20261128


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_faults_lose_double_and_invent_nothing(tmp_path: Path) -> None:
    config = ChaosConfig(tmp_path, concerns=240, rate=8.0, seed=SEED)
    result = await run_chaos(config)
    report = "\n".join(result.lines())
    print(report)
    assert {f.name for f in result.faults.injected} == set(NAMES), report
    assert result.verdict.acknowledged >= 0.95 * config.concerns, report
    assert result.verdict.routed > 0 and result.verdict.concluded > 0, report
    assert result.verdict.ok, report
    lost = [f for f in result.faults.injected if f.name == "lose-message"]
    assert lost and lost[0].note.startswith("deleted"), report
    assert result.reconciled >= 1, report  # the lost message came back only through reconciliation
