"""Helpers shared by the benchmark modules: percentiles, a closed-loop load driver, report lines."""

from __future__ import annotations

import asyncio
import time


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def load(call, total: int, concurrency: int) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start), latencies


class Report(list[str]):
    """Lines printed as they are measured (a long run shows progress)."""

    def append(self, text: str) -> None:
        print(text, flush=True)
        super().append(text)

    def extend(self, texts) -> None:  # type: ignore[no-untyped-def]
        for text in texts:
            self.append(text)


def line(name: str, rate: float, lat: list[float]) -> str:
    return f"{name:<44} {rate:>9.0f}/s   p50 {pct(lat, 50) * 1e3:7.2f} ms   p99 {pct(lat, 99) * 1e3:7.2f} ms"


def us_line(name: str, us: float, note: str = "") -> str:
    """A per-operation figure in microseconds, with its rate, aligned with `line`."""
    return f"{name:<44} {1e6 / us:>9.0f}/s   {us:10.1f} µs each" + (f"   {note}" if note else "")
