"""The real SubmitConcern use case in process (no gRPC, no NATS): what the unit of work, the writer
and the group commit deliver on this machine, on SQLite and, where a URL is given, PostgreSQL.

    .venv/bin/python benchmarks/inprocess.py [-n 2000] [--postgres postgresql+asyncpg://...]

Each run uses a new database. Every submission is `make bench`'s, a new child each time (the
heaviest path: a data key made, an identity, a referral, a concern, an outbox event, an idempotency
key). Also reported: how many
COMMITs the writer made (SQLite), so the size of its groups shows.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.run import REFERRER, request
from benchmarks.support import Report, line, load
from csx_common.migrations import upgrade
from csx_common.sensitivity import registry
from csx_referrals.app import build
from csx_referrals.repository import ReferralsRepository
from csx_referrals.service import ReferralsService
from csx_referrals.settings import ReferralsSettings
from csx_safeguarding.disclosure import Discloser


async def measure(url: str, data: Path, n: int, label: str, out: Report) -> None:
    settings = ReferralsSettings(
        grpc_address="127.0.0.1:0",
        database_url=url,
        nats_url="nats://127.0.0.1:1",  # never connected: in process, events stay in the outbox
        keyring_file=str(data / "keyring.json"),
        insecure_dev=True,
    )
    runtime = build(settings)
    await upgrade(runtime.db, runtime.migrations)
    repo = ReferralsRepository(runtime.sealer, runtime.keyring.blind_index_key)
    service = ReferralsService(runtime.units, repo, Discloser(runtime.policy, registry(), None))

    async def submit(_i: int) -> None:
        await service.submit_concern(REFERRER, request())

    try:
        await load(submit, 100, 8)  # warm-up
        for concurrency, total in ((1, max(200, n // 4)), (32, n)):
            commits = runtime.db.commits
            rate, lat = await load(submit, total, concurrency)
            grouped = runtime.db.commits - commits
            note = f"   {total / grouped:.1f} per COMMIT" if grouped else ""
            out.append(line(f"SubmitConcern in process ({label}), conc. {concurrency}", rate, lat) + note)
    finally:
        await runtime.db.dispose()


async def bench(n: int, postgres: str, out: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="csx-inproc-") as tmp:
        await measure(f"sqlite+aiosqlite:///{tmp}/referrals.db", Path(tmp), n, "SQLite", out)
        if postgres:
            await measure(postgres, Path(tmp), n, "PostgreSQL", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="submissions at concurrency 32")
    parser.add_argument("--postgres", default="", help="also measure on this (empty) PostgreSQL database")
    args = parser.parse_args()
    asyncio.run(bench(args.n, args.postgres, Report()))


if __name__ == "__main__":
    main()
