"""`make bench`: CSX beside bare gRPC and bare JetStream, measured in the same run on this machine.

1. SubmitConcern (validate, encrypt, store, outbox) at concurrency 1 and 32 against the referrals
   service as `csx up` runs it (own process, SQLite), beside a do-nothing SubmitConcern (the same
   gRPC and security layer answering an empty response, benchmarks/noop_server.py) and a bare gRPC
   echo of a message of the same size, each in its own process. Issue 11's ratios: do-nothing /
   echo (the layer's cost) and real / do-nothing (the work's cost).
2. Concern -> panel record latency at a steady 300 concerns/s (issue 11: p99 <= 100 ms): from the
   SubmitConcern reply to the row appearing in the panel's database (a read-only probe reading the
   new rows every 2 ms).
3. A bare JetStream publish of a message of the same size (concurrency 1 and 32), for the
   broker's share of the pipeline.
4. Issue 3, first (on a quiet stack): a policy decision, a full disclosure of one concern (policy,
   decrypt, audit) and an audit append, each beside a plain read of the same record
   (benchmarks/disclosure.py).
5. Issue 4, last: KEK wrap/unwrap, data keys, finding a child among 100,000 by blind index, and the
   re-wrap rate of a rotation (benchmarks/keys.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import nats

from csx.referrals.v1 import referrals_pb2 as pb
from csx.referrals.v1 import referrals_pb2_grpc
from csx_cli.identity import probe_credentials, user_channel
from csx_cli.stack import Stack, StackConfig
from csx_common import client
from csx_common.identity import Principal
from csx_common.natsauth import inbox_prefix
from csx_common.natsserver import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.disclosure import bench_disclosure
from benchmarks.echo_server import METHOD
from benchmarks.keys import bench_keys
from benchmarks.support import Report, line, load, pct

# NATS requires a user since DevNatsAuth. The baseline publishes as a service the bench does not start,
# on that service's own subjects (the only stream its permissions let it create).
BASELINE_USER = "actionplans"
BASELINE_STREAM = "CSX_ACTIONPLANS"
BASELINE_SUBJECT = "csx.actionplans.bench"

REFERRER = Principal("bench.dsl", "education", "dsl", "referral_screening")


_serial = itertools.count()


def request() -> pb.SubmitConcernRequest:
    """A new concern about a new child at every call. An agency reference is a concern's natural key
    (a reused one is answered with the first concern, nothing written), so none repeats; fixed width,
    so every request has the same size."""
    n = next(_serial)
    return pb.SubmitConcernRequest(
        idempotency_key=f"bench-{uuid.uuid4().hex}",
        agency=3,
        agency_reference=f"EDU-{n:08d}",
        referrer=pb.Referrer(name="Bench Referrer", role="Designated safeguarding lead", email="dsl@school.example"),
        child=pb.ChildIdentity(given_name=f"Child{n:08d}", family_name="Bench", date_of_birth="2010-05-17"),
        harm_types=[2, 3],
        contexts=[{"place_id": "plc-bench-park", "context_type": 3}],
        narrative="Seen with older youths near the station late at night; new phone and clothes. " * 3,
    )


async def bench(stack: Stack, echo_address: str, noop_address: str, n: int) -> list[str]:
    out = Report()
    await bench_disclosure(stack, stack.data_dir, n, out)
    out.append("-- Submission and pipeline --")
    async with (
        user_channel(stack.addresses["referrals"], REFERRER, stack.pki) as ch,
        user_channel(noop_address, REFERRER, stack.pki) as noop_ch,  # the same client setup as the real one
        client.channel(echo_address, probe_credentials(stack.pki)) as echo_ch,
    ):
        stub = referrals_pb2_grpc.ReferralsServiceStub(ch)
        noop_stub = referrals_pb2_grpc.ReferralsServiceStub(noop_ch)
        echo = echo_ch.unary_unary(METHOD)
        payload = request().SerializeToString()

        async def submit(_i: int) -> None:
            await stub.SubmitConcern(request(), timeout=30)

        async def noop(_i: int) -> None:
            await noop_stub.SubmitConcern(request(), timeout=30)

        async def bare(_i: int) -> None:
            await echo(payload, timeout=30)

        await load(submit, 50, 8)  # warm-up: connections, caches, SQLite pages
        await load(noop, 200, 8)
        await load(bare, 200, 8)
        # The baselines first: real submissions leave the relay and the panel busy with their events
        # for a while, on the same cores.
        results: dict[tuple[str, int], tuple[float, list[float]]] = {}
        for name, call in (("echo", bare), ("noop", noop), ("submit", submit)):
            for c in (1, 32):
                results[(name, c)] = await load(call, n if c == 32 else max(200, n // 4), c)
        for c in (1, 32):
            s_rate, s_lat = results[("submit", c)]
            n_rate, n_lat = results[("noop", c)]
            e_rate, e_lat = results[("echo", c)]
            out.append(line(f"SubmitConcern, concurrency {c}", s_rate, s_lat))
            out.append(line(f"do-nothing SubmitConcern, concurrency {c}", n_rate, n_lat))
            out.append(line(f"bare gRPC echo ({len(payload)} B), concurrency {c}", e_rate, e_lat))
            out.append(f"{'':<44} ratio SubmitConcern / echo throughput: {s_rate / e_rate:.2f}")
        out.extend(layer_ratios(results))
        out.extend(await intake_beside_grpc(stack, results[("submit", 1)][0], results[("submit", 32)][0], n))
        # Concern -> panel, at a steady 300/s, from a quiet pipeline.
        out.append(await panel_caught_up(stack.data_dir, within=120))
        out.append(await panel_latency(stub, stack.data_dir / "panel.db", rate=300, seconds=10))
    out.extend(await jetstream_baseline(stack, len(payload), n))
    await bench_keys(stack.data_dir, out, children=100_000, rewrap=10_000)
    return out


def layer_ratios(results: dict[tuple[str, int], tuple[float, list[float]]]) -> list[str]:
    """Issue 11: what the gRPC and security layer costs beside bare gRPC (do-nothing / echo), and
    what the work costs beside the layer (real / do-nothing). Throughput at concurrency 32 (higher is
    better; targets >= 0.6 and >= 0.5), latency at concurrency 1 (a ratio of times: lower is better)."""

    def ratios(a: str, b: str) -> str:
        rate = results[(a, 32)][0] / results[(b, 32)][0]
        p50, p99 = (pct(results[(a, 1)][1], p) / pct(results[(b, 1)][1], p) for p in (50, 99))
        return f"throughput (c=32) {rate:.2f}   p50 (c=1) x{p50:.2f}   p99 (c=1) x{p99:.2f}"

    return [
        f"{'  do-nothing / echo (target >= 0.6)':<44} {ratios('noop', 'echo')}",
        f"{'  real / do-nothing (target >= 0.5)':<44} {ratios('submit', 'noop')}",
    ]


async def panel_caught_up(data_dir: Path, *, within: float) -> str:
    """Waits until the panel has recorded every concern so far (the submissions above leave it a
    backlog), so the latency below measures the pipeline, not the queue in front of it."""

    def count(db: str, table: str) -> int:
        with closing(sqlite3.connect(f"file:{data_dir / db}?mode=ro", uri=True)) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    start = time.perf_counter()
    while (behind := count("referrals.db", "concerns") - count("panel.db", "concern_links")) > 0:
        if time.perf_counter() - start > within:
            break
        await asyncio.sleep(0.2)
    took = time.perf_counter() - start
    state = f"caught up in {took:.1f} s" if behind <= 0 else f"still {behind} behind after {took:.0f} s"
    return f"{'  (panel backlog before the next line)':<44} {state}"


async def panel_latency(stub, panel_db: Path, *, rate: int, seconds: int) -> str:  # type: ignore[no-untyped-def]
    replied: dict[str, float] = {}
    seen: dict[str, float] = {}
    probe = sqlite3.connect(f"file:{panel_db}?mode=ro", uri=True)
    stop = asyncio.Event()

    async def watch() -> None:
        # Until every replied concern is seen. Only rows new since the last look are read: reading the
        # whole table every 2 ms would cost the probe more CPU than the pipeline it measures.
        last = probe.execute("SELECT coalesce(max(rowid), 0) FROM concern_links").fetchone()[0]
        while not stop.is_set() or not replied.keys() <= seen.keys():
            rows = probe.execute(
                "SELECT rowid, concern_id FROM concern_links WHERE rowid > ? ORDER BY rowid", (last,)
            ).fetchall()
            now = time.perf_counter()
            for rowid, cid in rows:
                seen.setdefault(cid, now)
                last = rowid
            await asyncio.sleep(0.002)
            if stop.is_set() and now - stop_time[0] > 30:
                break

    stop_time = [0.0]

    # Open-loop at the target rate, but never more in flight than the server admits: if it cannot
    # keep up, the achieved rate printed says so.
    in_flight = asyncio.Semaphore(128)

    async def one() -> None:
        async with in_flight:
            reply = await stub.SubmitConcern(request(), timeout=60)
        replied[reply.concern_id] = time.perf_counter()

    watcher = asyncio.create_task(watch())
    tasks = []
    start = time.perf_counter()
    for i in range(rate * seconds):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    achieved = len(tasks) / (time.perf_counter() - start)
    stop_time[0] = time.perf_counter()
    stop.set()
    await watcher
    probe.close()
    lat = [seen[c] - t for c, t in replied.items() if c in seen]
    missing = len(replied) - len(lat)
    if not lat:  # the panel still behind on earlier events 30 s after the last reply
        return f"{'concern -> panel record at ' + str(rate) + '/s':<44} {achieved:>9.0f}/s   none seen within 30 s"
    return (
        f"{'concern -> panel record at ' + str(rate) + '/s':<44} {achieved:>9.0f}/s   p50 {pct(lat, 50) * 1e3:7.2f} ms"
        f"   p99 {pct(lat, 99) * 1e3:7.2f} ms   (not seen: {missing})"
    )


async def intake_beside_grpc(stack: Stack, grpc_rate_1: float, grpc_rate_32: float, n: int) -> list[str]:
    """Sealed intake (HPKE + signature over NATS) beside SubmitConcern over gRPC, same run, same service.
    One at a time (publish, wait for the answer) and pipelined (publish all, then wait for all)."""
    from csx_client import ACCEPTED, AgencyIdentity, IntakeClient, Recipient
    from csx_common.natsauth import DevNatsAuth
    from csx_common.pki import PeerIdentity

    peer = PeerIdentity("agency", "education")
    identity = AgencyIdentity.from_files("education", stack.pki.cert_file(peer), stack.pki.key_file(peer))
    recipient = Recipient.from_file(stack.pki.intake_public_file)
    password = DevNatsAuth(stack.pki.root / "nats").password_file("agency-education").read_text().strip()
    client = await IntakeClient.connect(stack.nats_url, identity, recipient, password=password)
    lines = []
    try:

        def sealed_request() -> pb.SubmitConcernRequest:
            req = request()
            req.agency_reference = f"INTAKE-{uuid.uuid4().hex[:20]}"
            return req

        async def one(_i: int) -> None:
            result = await client.submit(sealed_request(), wait=30)
            assert result.status == ACCEPTED, result.reason

        await load(one, 20, 1)  # warm-up
        rate, lat = await load(one, max(100, n // 10), 1)
        lines.append(line("sealed intake, one at a time", rate, lat))
        lines.append(f"{'':<44} ratio to SubmitConcern over gRPC (c=1): {rate / grpc_rate_1:.2f}")
        total = max(200, n // 4)
        start = time.perf_counter()
        results = await client.submit_many((sealed_request() for _ in range(total)), wait=300)
        elapsed = time.perf_counter() - start
        assert all(r.status == ACCEPTED for r in results)
        lines.append(f"{'sealed intake, ' + str(total) + ' pipelined':<44} {total / elapsed:>9.0f}/s")
        lines.append(f"{'':<44} ratio to SubmitConcern over gRPC (c=32): {total / elapsed / grpc_rate_32:.2f}")
    finally:
        await client.close()
    return lines


async def jetstream_baseline(stack: Stack, size: int, n: int) -> list[str]:
    password = stack.nats_auth.password_file(BASELINE_USER).read_text().strip()
    nc = await nats.connect(
        stack.nats_url,
        user=BASELINE_USER,
        password=password,
        allow_reconnect=False,
        inbox_prefix=inbox_prefix(BASELINE_USER),
    )
    js = nc.jetstream()
    await js.add_stream(name=BASELINE_STREAM, subjects=[BASELINE_SUBJECT])
    payload = b"x" * size

    async def publish(_i: int) -> None:
        await js.publish(BASELINE_SUBJECT, payload, headers={"Nats-Msg-Id": uuid.uuid4().hex})

    await load(publish, 200, 8)
    out = []
    for c in (1, 32):
        rate, lat = await load(publish, n if c == 32 else max(200, n // 4), c)
        out.append(line(f"bare JetStream publish ({size} B), concurrency {c}", rate, lat))
    # No delete: the user may not (the stream goes with the temporary data directory).
    await nc.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="requests per measurement at concurrency 32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="csx-bench-") as tmp:
        config = StackConfig(
            data_dir=Path(tmp), base_port=0, nats_port=0, log_level="WARNING", services=("referrals", "panel")
        )
        stack = Stack(config)
        stack.pki.ensure()  # the echo server uses the same certificates, so both run mutual TLS
        echo_port, noop_port = free_port(), free_port()
        baselines = [
            subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), str(port), str(stack.pki.root)])
            for script, port in (("echo_server.py", echo_port), ("noop_server.py", noop_port))
        ]
        try:
            with stack:
                print(
                    f"CSX benchmark  ({time.strftime('%Y-%m-%d %H:%M')}, Python {sys.version.split()[0]}, SQLite, loopback)"
                )
                asyncio.run(bench(stack, f"127.0.0.1:{echo_port}", f"127.0.0.1:{noop_port}", args.n))
        finally:
            for process in baselines:
                process.terminate()
                process.wait()


if __name__ == "__main__":
    main()
