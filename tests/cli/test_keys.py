"""`csx keys`: rotating key-encryption keys while the services keep serving, resuming a rotation that
was interrupted (by an exception or by SIGKILL), and the commands' output.

Real keyring files; real SQLite and (where CSX_TEST_POSTGRES_URL is set) PostgreSQL; for the load
test the referrals service in-process with real gRPC (mutual TLS, user tokens) and a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import MetaData, select
from typer.testing import CliRunner

from csx.referrals.v1 import referrals_pb2 as pb
from csx_cli.main import app
from csx_cli.rotation import Progress, RotationError, _exclusive, rotate
from csx_common.datakeys import DataKeys, child_scope, data_keys_table
from csx_common.db import Database
from csx_common.keyring import DESTROYED, PRIMARY, FileKeyring
from csx_referrals import tables as referrals_tables
from tests.referrals.conftest import Referrals, referrals  # noqa: F401  (the fixture, reused)
from tests.support import concern_request

GRACE = 0.05
runner = CliRunner()


# Helpers --------------------------------------------------------------------------------------


async def seed(url: str, service: str, keyring: Path, children: int, *, erased: int = 0) -> None:
    """A service database with a data_keys table, `children` live keys and `erased` erased scopes."""
    table = data_keys_table(MetaData())
    db = Database(url)
    try:
        await db.run_sync(table.metadata.create_all)
        keys = DataKeys(table, FileKeyring(keyring), service)
        async with db.transaction() as s:
            for i in range(children):
                await keys.encryption_key(s, child_scope(f"{service}-{i}"))
            for i in range(erased):
                await keys.encryption_key(s, child_scope(f"{service}-erased-{i}"))
                await keys.destroy(s, child_scope(f"{service}-erased-{i}"), now=_now())
    finally:
        await db.dispose()


def _now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def wrapping(url: str) -> list[tuple[str, str | None, bool]]:
    """(key id, KEK id, has a wrapped key) for every row."""
    table = data_keys_table(MetaData())
    db = Database(url)
    try:
        async with db.session() as s:
            rows = await s.execute(select(table.c.key_id, table.c.kek_id, table.c.wrapped.is_not(None)))
            return [tuple(r) for r in rows.all()]  # type: ignore[misc]
    finally:
        await db.dispose()


async def assert_rotated(keyring: Path, urls: dict[str, str], old: str) -> str:
    """One primary KEK wraps every live data key, every key still unwraps (as its own service,
    through a fresh keyring), the old KEK is destroyed and no rotation is pending."""
    ring = FileKeyring(keyring)
    new = ring.primary_id
    assert new != old
    assert ring.keks[old].state == DESTROYED and ring.keks[old].material is None
    assert ring.rotation is None
    assert ring.enabled_ids() == []
    for service, url in urls.items():
        rows = await wrapping(url)
        assert rows and all(kek == new for _key, kek, live in rows if live), service
        table = data_keys_table(MetaData())
        db = Database(url)
        try:
            async with db.session() as s:
                live = [key for key, _kek, is_live in rows if is_live]
                assert len(await DataKeys(table, ring, service).decryption_keys(s, live)) == len(live)
        finally:
            await db.dispose()
    return new


class Interrupted(Exception):
    pass


# The rotation under load ------------------------------------------------------------------------


def child_concern(key: str) -> pb.SubmitConcernRequest:
    """A concern about a child of its own (no NHS number; a name nobody else has)."""
    req = concern_request(key, narrative=f"CANARY-NARRATIVE {key}")
    req.child.ClearField("nhs_number")
    req.child.given_name = f"Rot{key}"
    return req


async def test_rotation_while_concerns_are_submitted_and_read(referrals: Referrals) -> None:  # noqa: F811
    settings = referrals.runtime.settings
    keyring, url = Path(settings.keyring_file), settings.database_url
    old = FileKeyring(keyring).primary_id
    stub = referrals.stub  # a social-care user: sees the narrative

    earlier = [await stub.SubmitConcern(child_concern(f"before-{i:03d}"), timeout=10) for i in range(16)]
    submitted: list[tuple[str, str]] = []
    reads = 0
    failures: list[str] = []
    stop = asyncio.Event()

    async def read(concern_id: str, key: str) -> None:
        nonlocal reads
        got = await stub.GetConcern(pb.GetConcernRequest(concern_id=concern_id), timeout=10)
        if got.concern.narrative != f"CANARY-NARRATIVE {key}":
            raise AssertionError(f"{key}: narrative not read back")
        reads += 1

    async def traffic(worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key = f"during-{worker}-{i:04d}"
            try:
                reply = await stub.SubmitConcern(child_concern(key), timeout=10)
                submitted.append((reply.concern_id, key))
                await read(reply.concern_id, key)
                n = random.randrange(len(earlier))
                await read(earlier[n].concern_id, f"before-{n:03d}")
            except Exception as exc:  # every failure counts, whatever it is
                failures.append(f"{key}: {exc!r}")

    workers = [asyncio.create_task(traffic(w)) for w in range(3)]
    await asyncio.sleep(0.3)  # traffic is flowing before the rotation starts
    during_rewrap: list[int] = []

    def progress(p: Progress) -> None:
        if p.step == "rewrap":
            during_rewrap.append(len(submitted))

    before = (len(submitted), reads)
    summary = await rotate(keyring, {"referrals": url}, batch=3, grace_seconds=0.5, progress=progress)
    after = (len(submitted), reads)
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*workers)

    assert failures == []
    assert after[0] - before[0] >= 3 and after[1] - before[1] >= 6, (before, after)  # served throughout
    assert summary.from_kek_id == old and summary.destroyed == [old]
    assert summary.rewrapped["referrals"] >= len(earlier) and summary.keys_per_second > 0
    # Every data key is wrapped by the new primary; the old KEK is gone from the file.
    new = summary.to_kek_id
    ring = FileKeyring(keyring)
    assert ring.primary_id == new and ring.keks[old].state == DESTROYED and ring.rotation is None
    async with referrals.runtime.db.session() as s:
        t = referrals_tables.data_keys.c
        live = (await s.execute(select(t.key_id, t.kek_id).where(t.wrapped.is_not(None)))).all()
    assert live and {kek for _key, kek in live} == {new}
    # Everything written before and during the rotation still reads back.
    for i, reply in enumerate(earlier):
        await read(reply.concern_id, f"before-{i:03d}")
    await asyncio.gather(*(read(concern_id, key) for concern_id, key in submitted))
    print(
        f"\nrotation under load: {summary.total_rewrapped} keys re-wrapped at {summary.keys_per_second:.0f} keys/s; "
        f"{after[0] - before[0]} submits and {after[1] - before[1]} reads during {summary.seconds:.2f}s, "
        f"submits seen during re-wrap: {during_rewrap[-1] - during_rewrap[0] if during_rewrap else 0}"
    )


# Resumability ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "after"),
    [("add", 0), ("promote", 0), ("rewrap", 2), ("verify", 0)],
    ids=["after-add", "after-promote", "mid-rewrap", "before-retire"],
)
async def test_interrupted_rotation_resumes_and_ends_the_same(databases, tmp_path: Path, step: str, after: int) -> None:  # type: ignore[no-untyped-def]
    keyring = tmp_path / "keyring.json"
    old = FileKeyring.create(keyring).primary_id
    urls = {"referrals": await databases.new("referrals"), "panel": await databases.new("panel")}
    await seed(urls["referrals"], "referrals", keyring, 16, erased=2)
    await seed(urls["panel"], "panel", keyring, 6)
    seen = 0

    def crash(p: Progress) -> None:
        nonlocal seen
        if p.step == step:
            seen += 1
            if seen > after:
                raise Interrupted

    with pytest.raises(Interrupted):
        await rotate(keyring, urls, batch=4, grace_seconds=GRACE, progress=crash)
    # Interrupted: the rotation is recorded, nothing is destroyed, every key still unwraps.
    ring = FileKeyring(keyring)
    assert ring.rotation is not None and ring.rotation["from"] == old
    to = ring.rotation["to"]
    assert ring.keks[old].state != DESTROYED
    assert ring.keks[to].state == (PRIMARY if step != "add" else "enabled")
    if step == "rewrap":
        kek_ids = {kek for _k, kek, live in await wrapping(urls["referrals"]) if live}
        assert kek_ids == {old, to}  # half-way

    summary = await rotate(keyring, urls, batch=4, grace_seconds=GRACE)
    assert summary.resumed and (summary.from_kek_id, summary.to_kek_id) == (old, to)
    assert summary.destroyed == [old]
    assert await assert_rotated(keyring, urls, old) == to
    # Erased keys stay erased: no KEK, nothing wrapped.
    assert sum(1 for _k, kek, live in await wrapping(urls["referrals"]) if not live and kek is None) == 2


async def test_two_rotations_in_a_row_are_two_clean_rotations(databases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keyring = tmp_path / "keyring.json"
    first = FileKeyring.create(keyring).primary_id
    urls = {"conferences": await databases.new("conferences")}
    await seed(urls["conferences"], "conferences", keyring, 20)
    one = await rotate(keyring, urls, batch=7, grace_seconds=GRACE)
    two = await rotate(keyring, urls, batch=7, grace_seconds=GRACE)
    assert not one.resumed and not two.resumed
    assert (one.from_kek_id, two.from_kek_id) == (first, one.to_kek_id)
    assert one.rewrapped == two.rewrapped == {"conferences": 20}
    await assert_rotated(keyring, urls, one.to_kek_id)
    states = sorted(k.state for k in FileKeyring(keyring).keks.values())
    assert states == [DESTROYED, DESTROYED, PRIMARY]


async def test_killed_rotation_resumes(tmp_path: Path) -> None:
    """SIGKILL mid-rotation (the lock dies with the process); the next run finishes it."""
    keyring = tmp_path / "keyring.json"
    old = FileKeyring.create(keyring).primary_id
    urls = {"actionplans": f"sqlite+aiosqlite:///{tmp_path / 'actionplans.db'}"}
    await seed(urls["actionplans"], "actionplans", keyring, 10)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "csx_cli", "keys", "rotate", "--keyring", str(keyring), "--grace", "30"),
        *("--database", f"actionplans={urls['actionplans']}"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while FileKeyring(keyring).rotation is None:  # added, recorded, now in its rollout grace
            assert proc.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        await proc.wait()
    summary = await rotate(keyring, urls, grace_seconds=GRACE)
    assert summary.resumed and summary.destroyed == [old]
    await assert_rotated(keyring, urls, old)


async def test_a_key_wrapped_late_under_the_old_kek_is_rewrapped_and_the_kek_never_orphaned(tmp_path: Path) -> None:
    """A service that wraps under the old KEK after the re-wrap (it had not seen the promotion) holds
    the retirement back: another pass re-wraps its key; a KEK still referenced is never destroyed."""
    keyring = tmp_path / "keyring.json"
    old = FileKeyring.create(keyring).primary_id
    url = f"sqlite+aiosqlite:///{tmp_path / 'panel.db'}"
    await seed(url, "panel", keyring, 5)
    stale = tmp_path / "stale.json"
    stale.write_bytes(keyring.read_bytes())  # what a service that missed the promotion wraps with
    table = data_keys_table(MetaData())
    step, late = "", 0

    def track(p: Progress) -> None:
        nonlocal step
        step = p.step

    async def sleep_while_a_late_key_commits(seconds: float, *, every: bool) -> None:
        nonlocal late
        if step == "verify" and (every or late == 0):
            late += 1
            db = Database(url)
            try:
                async with db.transaction() as s:
                    await DataKeys(table, FileKeyring(stale), "panel").encryption_key(s, child_scope(f"late-{late}"))
            finally:
                await db.dispose()

    async def once(seconds: float) -> None:
        await sleep_while_a_late_key_commits(seconds, every=False)

    async def always(seconds: float) -> None:
        await sleep_while_a_late_key_commits(seconds, every=True)

    summary = await rotate(keyring, {"panel": url}, grace_seconds=0, progress=track, sleep=once)
    assert late == 1 and summary.passes == 2 and summary.rewrapped == {"panel": 6}
    await assert_rotated(keyring, {"panel": url}, old)

    # Late keys at every verification: the rotation gives up after max_passes, destroying nothing.
    stale.write_bytes(keyring.read_bytes())
    current = FileKeyring(keyring).primary_id
    with pytest.raises(RotationError, match="after 2 passes"):
        await rotate(keyring, {"panel": url}, grace_seconds=0, progress=track, sleep=always, max_passes=2)
    ring = FileKeyring(keyring)
    assert ring.keks[current].state == "enabled" and ring.rotation is not None
    finished = await rotate(keyring, {"panel": url}, grace_seconds=0)
    assert finished.resumed and finished.destroyed == [current]
    await assert_rotated(keyring, {"panel": url}, current)


# Refusals -------------------------------------------------------------------------------------


async def test_wrong_service_name_or_unknown_kek_stops_before_any_change(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.json"
    FileKeyring.create(keyring)
    url = f"sqlite+aiosqlite:///{tmp_path / 'referrals.db'}"
    await seed(url, "referrals", keyring, 3)
    before = keyring.read_bytes()
    with pytest.raises(RotationError, match="wrong service name"):
        await rotate(keyring, {"panel": url}, grace_seconds=GRACE)
    other = tmp_path / "other.json"
    FileKeyring.create(other)
    with pytest.raises(RotationError, match="not at all"):
        await rotate(other, {"referrals": url}, grace_seconds=GRACE)
    with pytest.raises(RotationError, match="no SQLite database"):
        await rotate(keyring, {"referrals": url, "panel": f"sqlite+aiosqlite:///{tmp_path / 'none.db'}"})
    assert not (tmp_path / "none.db").exists()
    with _exclusive(keyring), pytest.raises(RotationError, match="another rotation"):
        await rotate(keyring, {"referrals": url}, grace_seconds=GRACE)
    assert keyring.read_bytes() == before


# The commands ---------------------------------------------------------------------------------


def test_status_and_rotate_commands(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    keyring = data_dir / "keyring.json"
    old = FileKeyring.create(keyring).primary_id
    services = ("referrals", "panel", "conferences", "actionplans")
    urls = {s: f"sqlite+aiosqlite:///{data_dir / f'{s}.db'}" for s in services}

    async def setup() -> None:
        for n, (service, url) in enumerate(urls.items()):
            await seed(url, service, keyring, 3 + n)

    asyncio.run(setup())

    # Defaults: the local stack's keyring and four databases under --data-dir.
    shown = runner.invoke(app, ["keys", "status", "--data-dir", str(data_dir), "--json"])
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.stdout)
    assert status["primary"] == old and status["rotation"] is None
    assert status["keks"] == [
        {
            "id": old,
            "state": "primary",
            "created_at": status["keks"][0]["created_at"],
            "data_keys": {"referrals": 3, "panel": 4, "conferences": 5, "actionplans": 6},
        }
    ]
    table = runner.invoke(app, ["keys", "status", "--data-dir", str(data_dir)])
    assert table.exit_code == 0 and old in table.stdout and "no rotation in progress" in table.stdout

    rotated = runner.invoke(
        app, ["keys", "rotate", "--data-dir", str(data_dir), "--grace", "0", "--batch", "2", "--json"]
    )
    assert rotated.exit_code == 0, rotated.output
    summary = json.loads(rotated.stdout)
    assert summary["from_kek_id"] == old and summary["destroyed"] == [old]
    assert summary["rewrapped"] == {"referrals": 3, "panel": 4, "conferences": 5, "actionplans": 6}
    assert summary["total_rewrapped"] == 18 and summary["keys_per_second"] > 0 and summary["resumed"] is False

    # Explicit keyring and databases: only those are looked at.
    explicit = ["--keyring", str(keyring), "--database", f"panel={urls['panel']}"]
    after = json.loads(runner.invoke(app, ["keys", "status", *explicit, "--json"]).stdout)
    states = {k["id"]: (k["state"], k["data_keys"]) for k in after["keks"]}
    assert states == {old: ("destroyed", {"panel": 0}), summary["to_kek_id"]: ("primary", {"panel": 4})}

    # Human output: a progress bar on stderr, the summary on stdout.
    again = runner.invoke(app, ["keys", "rotate", *explicit, "--grace", "0"])
    assert again.exit_code == 0, again.output
    assert "Rotation complete" in again.stdout and "keys/s" in again.stdout

    bad = runner.invoke(app, ["keys", "rotate", "--keyring", str(keyring), "--database", "panel"])
    assert bad.exit_code == 2 and "SERVICE=URL" in bad.stderr
    missing = runner.invoke(app, ["keys", "status", "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no keyring" in missing.stderr
