"""`make chaos` and `make soak`: the whole stack under faults, then the history checked.

    python -m tests.chaos.run chaos [--concerns 10000] [--seed N] [--rate 40] [--backend postgres]
    python -m tests.chaos.run soak  [--minutes 10] [--rate 20]

chaos: the workload (gRPC and sealed intake, part of it driven on to a conference and a plan) runs
while the nemeses strike in a seeded random order, each at least once; then every process is healed,
reconciliation republishes what a consumer never received, the system settles, and the checker
prints attempted / acknowledged / lost / duplicated / unexpected. Exit 1 unless all three are 0.
The seed is printed: `--seed` replays the same order of faults.

soak: a steady rate for N minutes, no faults; throughput, latency percentiles, and the resident
memory of every process sampled every 30 s (start, end and the curve). Exit 1 if the history check
fails or a service's memory keeps growing (its last third more than 10% over its middle third).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from csx_cli.stack import SERVICES, Stack, StackConfig
from tests.chaos.checker import Verdict, observe
from tests.chaos.nemesis import NAMES, Faults, schedule, unleash
from tests.chaos.workload import History, Workload


@dataclass
class ChaosConfig:
    data_dir: Path
    concerns: int = 300
    rate: float = 10.0
    seed: int = 1
    rounds: int = 1
    extra: int = 0
    gap: float = 0.5
    ack_wait: float = 2.0
    database_urls: dict[str, str] = field(default_factory=dict)
    settle_timeout: float = 180.0
    only: tuple[str, ...] = ()  # run just these nemeses (each on its own: `--nemesis kill-nats`)


@dataclass
class ChaosResult:
    verdict: Verdict
    history: History
    faults: Faults
    reconciled: int
    seconds: float

    def lines(self) -> list[str]:
        out = [f"faults injected: {len(self.faults.injected)}"]
        for f in self.faults.injected:
            out.append(f"  {f.name:<40} {f.ended - f.started:5.1f} s  {f.note}")
        acked = [o for o in self.history.acknowledged]
        windows = [(f.started, f.ended) for f in self.faults.injected]
        during = [o for o in acked if any(a <= o.acked_at <= b for a, b in windows)]
        fault_seconds = sum(b - a for a, b in windows)
        span = max(1e-9, self.history.finished - self.history.started)
        out.append(f"throughput: {len(acked) / span:.1f} acknowledged/s overall over {span:.0f} s")
        if fault_seconds:
            out.append(f"            {len(during) / fault_seconds:.1f} acknowledged/s while a fault was in force")
        if acked:
            lat = sorted(o.latency for o in acked)
            out.append(
                f"latency (acknowledged, with retries): p50 {lat[len(lat) // 2] * 1e3:.0f} ms, "
                f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms"
            )
        out.append(f"republished by reconciliation: {self.reconciled}")
        out += self.verdict.lines()
        out.append(f"took {self.seconds:.0f} s")
        return out


def stack_for(data_dir: Path, ack_wait: float, database_urls: dict[str, str]) -> Stack:
    env = {f"CSX_{name.upper()}_CONSUMER_ACK_WAIT_SECONDS": str(ack_wait) for name in SERVICES}
    return Stack(
        StackConfig(
            data_dir=data_dir,
            base_port=0,
            nats_port=0,
            log_level="WARNING",
            database_urls=database_urls,
            env=env,
            stop_timeout=15.0,
        )
    )


async def heal(stack: Stack) -> None:
    """Every process running again, whatever the nemeses left behind."""
    if stack.process("nats") is None:
        await asyncio.to_thread(stack.start_nats)
    for name in SERVICES:
        if stack.process(name) is None:
            await asyncio.to_thread(stack.start_service, name)


async def reconcile_once(stack: Stack, settle: float) -> int:
    from csx_cli.reconcile import run_all

    report = await run_all(
        urls={name: stack.database_url(name) for name in SERVICES},
        nats_url=stack.nats_url,
        nats_dir=stack.pki.root / "nats",
        settle=settle,
        dry_run=False,
        lookback=None,
        producers=None,
        timeout=5.0,
    )
    return sum(p.republished for p in report.pairs)


async def settle(stack: Stack, history: History, within: float) -> tuple[Verdict, int]:
    """Reconcile and re-check until the history holds, or the time is up; the last verdict."""
    deadline = time.monotonic() + within
    reconciled = 0
    while True:
        verdict = await observe(stack, history)
        lost, duplicated, unexpected = verdict.totals()
        if verdict.ok or duplicated or unexpected or time.monotonic() > deadline:
            return verdict, reconciled
        await asyncio.sleep(2.0)
        # Settle time 3 s: anything published that long ago and still not applied is missing.
        reconciled += await reconcile_once(stack, settle=3.0)


async def run_chaos(config: ChaosConfig) -> ChaosResult:
    started = time.monotonic()
    stack = stack_for(config.data_dir, config.ack_wait, config.database_urls)
    await asyncio.to_thread(stack.start)
    try:
        faults = Faults(stack, config.ack_wait)
        await faults.chaos_user()
        names = sorted(config.only or NAMES)
        order = schedule(names, config.seed, rounds=config.rounds, extra=config.extra)
        print(
            f"chaos: seed {config.seed}, {config.concerns} concerns at {config.rate}/s, {len(order)} faults", flush=True
        )
        workload = Workload(stack, uuid.uuid4().hex[:8])
        stop = asyncio.Event()  # nothing sets it here; a caller embedding the run could
        nemeses = asyncio.create_task(unleash(faults, order, gap=config.gap, stop=stop))
        # The load runs until both the concerns are in and the last fault is over: faults need traffic.
        history = await workload.run(config.concerns, rate=config.rate, more=lambda: not nemeses.done())
        await nemeses
        await heal(stack)
        verdict, reconciled = await settle(stack, history, config.settle_timeout)
        return ChaosResult(verdict, history, faults, reconciled, time.monotonic() - started)
    finally:
        await asyncio.to_thread(stack.stop)


# -- soak ---------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_soak(data_dir: Path, minutes: float, rate: float, sample_every: float = 30.0) -> bool:
    stack = stack_for(data_dir, 30.0, {})
    await asyncio.to_thread(stack.start)
    try:
        samples: list[tuple[float, dict[str, float]]] = []
        t0 = time.monotonic()

        async def sample() -> None:
            while True:
                memory = {n: rss_mb(pid) for n, pid in stack.pids.items() if pid}
                samples.append((time.monotonic() - t0, memory))
                print(
                    f"  t={samples[-1][0]:5.0f}s  " + "  ".join(f"{n} {mb:.0f}MB" for n, mb in memory.items()),
                    flush=True,
                )
                await asyncio.sleep(sample_every)

        sampler = asyncio.create_task(sample())
        workload = Workload(stack, uuid.uuid4().hex[:8], route_every=20)
        history = await workload.run(int(minutes * 60 * rate), rate=rate, concurrency=16)
        sampler.cancel()
        samples.append((time.monotonic() - t0, {n: rss_mb(pid) for n, pid in stack.pids.items() if pid}))
        verdict, _ = await settle(stack, history, 120.0)
    finally:
        await asyncio.to_thread(stack.stop)
    acked = sorted(o.latency for o in history.acknowledged)
    span = history.finished - history.started
    print(f"soak: {len(history.ops)} concerns over {span:.0f} s, {len(acked) / span:.1f} acknowledged/s")
    if acked:
        pct = {p: acked[min(len(acked) - 1, int(len(acked) * p / 100))] * 1e3 for p in (50, 90, 99, 99.9)}
        print("latency: " + ", ".join(f"p{p} {v:.0f} ms" for p, v in pct.items()) + f", max {acked[-1] * 1e3:.0f} ms")
    first, last = samples[0][1], samples[-1][1]
    print(
        "resident memory (MB), start -> end: "
        + ", ".join(f"{n} {first.get(n, 0):.0f} -> {last.get(n, 0):.0f}" for n in last)
    )
    thirds = len(samples) // 3
    growing = []
    if thirds >= 1:
        # The services must level off. nats-server is reported but not judged: its memory follows the
        # stream's index, which grows with every retained message (30 days' worth, by design).
        for name in SERVICES:
            middle = max(s[1].get(name, 0) for s in samples[thirds : 2 * thirds])
            end = max(s[1].get(name, 0) for s in samples[2 * thirds :])
            if end > middle * 1.10 + 5:
                growing.append(f"{name} {middle:.0f} -> {end:.0f} MB")
    print("memory: " + ("still growing: " + ", ".join(growing) if growing else "flat after warm-up"))
    print("\n".join(verdict.lines()))
    return verdict.ok and not growing


def main() -> None:
    # nats-py logs every refused reconnect with a traceback; faults make many, by design.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["chaos", "soak"])
    parser.add_argument("--concerns", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=0.0, help="concerns per second (chaos 40, soak 20)")
    parser.add_argument("--seed", type=int, default=0, help="0: a random seed (printed)")
    parser.add_argument("--rounds", type=int, default=3, help="chaos: each nemesis this many times at least")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: how long")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stack's files here")
    parser.add_argument(
        "--nemesis", action="append", default=[], help="chaos: only this nemesis (repeatable; default: all)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"csx-{args.mode}-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        if args.mode == "soak":
            ok = asyncio.run(run_soak(data_dir, args.minutes, args.rate or 20.0))
            sys.exit(0 if ok else 1)
        seed = args.seed or random.SystemRandom().randrange(1, 2**31)
        urls = postgres_urls() if args.backend == "postgres" else {}
        if unknown := set(args.nemesis) - set(NAMES):
            parser.error(f"unknown nemesis {sorted(unknown)}; known: {', '.join(NAMES)}")
        config = ChaosConfig(
            data_dir,
            concerns=args.concerns,
            rate=args.rate or 40.0,
            seed=seed,
            rounds=args.rounds,
            database_urls=urls,
            only=tuple(args.nemesis),
        )
        # Faults keep coming for as long as the load runs: enough extra ones to fill it.
        kinds = len(config.only or NAMES)
        config.extra = max(0, int(config.concerns / config.rate / 6) - kinds * args.rounds)
        try:
            result = asyncio.run(run_chaos(config))
        finally:
            drop_databases(urls)
        print("\n".join(result.lines()))
        print(f"replay with: python -m tests.chaos.run chaos --seed {seed} --concerns {args.concerns}")
        sys.exit(0 if result.verdict.ok else 1)


def postgres_urls() -> dict[str, str]:
    import os

    from sqlalchemy.engine.url import make_url

    from tests.conftest import _admin

    base = os.environ.get("CSX_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    urls = {}
    for name in SERVICES:
        db_name = f"csx_chaos_{name}_{uuid.uuid4().hex[:8]}"
        asyncio.run(_admin(f'CREATE DATABASE "{db_name}"'))
        urls[name] = make_url(base).set(database=db_name).render_as_string(hide_password=False)
    return urls


def drop_databases(urls: dict[str, str]) -> None:
    from sqlalchemy.engine.url import make_url

    from tests.conftest import _admin

    for url in urls.values():
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
