"""`csx audit verify` with no arguments: every service of the local stack, one line each.

A data directory laid out as `csx up` lays it out (<dir>/<service>.db, <dir>/pki/audit/<service>.key
and .pub), each database holding a short signed audit chain; no service process runs. The CLI runs
its own event loop, so it is invoked in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from csx_cli.main import app
from csx_cli.stack import SERVICES, local_audit_signing_key, local_database_url
from csx_common.audit import AuditLog, AuditSigner
from csx_common.db import Database
from tests.audit.support import Rig, metadata, tables

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


async def csx(*args: str, env: dict[str, str] | None = None) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"COLUMNS": "300", **(env or {})})


async def rig(data_dir: Path, name: str) -> Rig:
    db = Database(local_database_url(data_dir, name))
    await db.run_sync(metadata.create_all)
    return Rig(db, AuditLog(tables), AuditSigner.load_or_create(local_audit_signing_key(data_dir, name)))


@pytest.fixture
async def data_dir(tmp_path: Path) -> Path:
    """Four services' databases, each with 3 entries and a checkpoint at entry 3 (then 1 more)."""
    for name in SERVICES:
        r = await rig(tmp_path, name)
        try:
            await r.append(3)
            await r.checkpoint()
            await r.append(1, start=3)
        finally:
            await r.db.dispose()
    return tmp_path


def service_lines(output: str) -> dict[str, str]:
    return {
        line.split()[0]: flat(line) for line in output.splitlines() if line.split()[:1] and line.split()[0] in SERVICES
    }


async def test_verifies_every_service(data_dir: Path) -> None:
    result = await csx("audit", "verify", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    lines = service_lines(result.output)
    assert list(lines) == list(SERVICES)
    for name in SERVICES:
        assert lines[name].startswith(
            f"{name} intact: 4 entries, 1 signed checkpoints (latest at entry 3, 1 entries after it)"
        ), lines[name]


async def test_the_data_dir_comes_from_csx_data_dir(data_dir: Path) -> None:
    result = await csx("audit", "verify", "--json", env={"CSX_DATA_DIR": str(data_dir)})
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout)
    assert list(reports) == list(SERVICES)
    for name in SERVICES:
        assert reports[name]["ok"] is True and reports[name]["entries"] == 4
        assert reports[name]["public_key"] == str(AuditSigner.public_path(local_audit_signing_key(data_dir, name)))


async def test_a_tampered_service_fails_the_whole_run(data_dir: Path) -> None:
    r = await rig(data_dir, "conferences")
    try:
        await r.unguard()
        await r.sql("UPDATE audit_log SET purpose = 'curiosity' WHERE seq = 2")
    finally:
        await r.db.dispose()
    result = await csx("audit", "verify", "--data-dir", str(data_dir))
    assert result.exit_code == 1, result.output
    lines = service_lines(result.output)
    assert list(lines) == list(SERVICES)
    assert lines["conferences"].startswith("conferences BROKEN at entry 2 (hash_mismatch)"), lines
    for name in ("referrals", "panel", "actionplans"):
        assert f"{name} intact" in lines[name]
    result = await csx("audit", "verify", "--data-dir", str(data_dir), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)["conferences"]
    assert (report["ok"], report["broken_seq"], report["kind"]) == (False, 2, "hash_mismatch")


async def test_a_service_that_cannot_be_checked(data_dir: Path) -> None:
    (data_dir / "panel.db").unlink()
    result = await csx("audit", "verify", "--data-dir", str(data_dir))
    assert result.exit_code == 2, result.output
    lines = service_lines(result.output)
    assert lines["panel"].startswith("panel cannot check: no SQLite database at"), lines
    assert not (data_dir / "panel.db").exists()
    assert "referrals intact" in lines["referrals"]


async def test_a_signature_from_another_key_is_a_broken_chain(data_dir: Path) -> None:
    other = AuditSigner.load_or_create(data_dir / "other.key")
    AuditSigner.public_path(local_audit_signing_key(data_dir, "actionplans")).write_bytes(other.public_pem())
    result = await csx("audit", "verify", "--data-dir", str(data_dir))
    assert result.exit_code == 1, result.output
    assert "unknown_key" in service_lines(result.output)["actionplans"]


async def test_half_of_the_explicit_form_is_a_usage_error(data_dir: Path) -> None:
    url = local_database_url(data_dir, "referrals")
    result = await csx("audit", "verify", "--database-url", url)
    assert result.exit_code == 2
    assert "give both --database-url and --public-key" in flat(result.output)
    pub = str(AuditSigner.public_path(local_audit_signing_key(data_dir, "referrals")))
    result = await csx("audit", "verify", "--public-key", pub)
    assert result.exit_code == 2
    result = await csx("audit", "verify", "--database-url", url, "--public-key", pub)
    assert result.exit_code == 0, result.output
    assert "audit chain intact: 4 entries" in flat(result.output)
