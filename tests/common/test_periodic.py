"""ServiceRuntime.add_periodic's timer: the job runs soon after start and then every period, a failing
run is logged by type and the next one still happens, and stopping ends it at once."""

from __future__ import annotations

import asyncio
import time

from csx_common.runtime import _every


async def test_a_periodic_job_runs_survives_a_failure_and_stops() -> None:
    runs: list[float] = []

    async def job() -> None:
        runs.append(time.monotonic())
        if len(runs) == 2:
            raise RuntimeError("CANARY-value-in-an-error")

    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(_every("test", 0.05, job, stop))
    while len(runs) < 4:
        await asyncio.sleep(0.01)
        assert time.monotonic() - started < 5, "the job stopped running"
    stop.set()
    await asyncio.wait_for(task, 1)
    assert runs[0] - started < 0.5  # soon after start
    assert all(b - a >= 0.04 for a, b in zip(runs, runs[1:], strict=False))  # about every period
    count = len(runs)
    await asyncio.sleep(0.15)
    assert len(runs) == count  # nothing after the stop
