"""`csx audit verify | child | checkpoint | keygen` against real databases (both backends).

The CLI runs its own event loop (asyncio.run), so it is invoked in a worker thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from csx_cli.main import app
from csx_common.audit import AuditSigner
from tests.audit.support import CHILDREN, Rig, make_rig

runner = CliRunner()


@pytest.fixture
async def rig(databases, tmp_path: Path) -> AsyncIterator[Rig]:  # type: ignore[no-untyped-def]
    rig = await make_rig(databases, tmp_path)
    yield rig
    await rig.db.dispose()


def url(rig: Rig) -> str:
    return rig.db.url.render_as_string(hide_password=False)


async def csx(*args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"COLUMNS": "300"})


def flat(text: str) -> str:
    return " ".join(text.split())


async def test_verify_intact(rig: Rig, tmp_path: Path) -> None:
    await rig.append(6)
    await rig.checkpoint()
    await rig.append(2, start=6)
    pub = str(AuditSigner.public_path(tmp_path / "audit-signing.key"))
    result = await csx("audit", "verify", "--database-url", url(rig), "--public-key", pub)
    assert result.exit_code == 0, result.output
    assert "audit chain intact: 8 entries, 1 signed checkpoints (latest at entry 6, 2 entries after it)" in flat(
        result.output
    )
    result = await csx("audit", "verify", "--database-url", url(rig), "--public-key", pub, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True and report["entries"] == 8 and report["unanchored"] == 2


async def test_verify_reports_the_first_broken_entry(rig: Rig, tmp_path: Path) -> None:
    await rig.append(8)
    await rig.checkpoint()
    await rig.unguard()
    await rig.sql("UPDATE audit_log SET purpose = 'curiosity' WHERE seq IN (5, 7)")
    pub = str(AuditSigner.public_path(tmp_path / "audit-signing.key"))
    result = await csx("audit", "verify", "--database-url", url(rig), "--public-key", pub)
    assert result.exit_code == 1, result.output
    assert "audit chain BROKEN at entry 5 (hash_mismatch)" in flat(result.output)
    result = await csx("audit", "verify", "--database-url", url(rig), "--public-key", pub, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert (report["ok"], report["broken_seq"], report["kind"], report["entries"]) == (
        False,
        5,
        "hash_mismatch",
        4,
    )


async def test_verify_detects_a_truncated_tail(rig: Rig, tmp_path: Path) -> None:
    await rig.append(8)
    await rig.checkpoint()
    await rig.unguard()
    await rig.sql("DELETE FROM audit_log WHERE seq > 6")
    [(h6,)] = await rig.sql("SELECT hash FROM audit_log WHERE seq = 6")
    await rig.sql("UPDATE audit_head SET seq = 6, hash = :h", h=h6)
    pub = str(AuditSigner.public_path(tmp_path / "audit-signing.key"))
    result = await csx("audit", "verify", "--database-url", url(rig), "--public-key", pub)
    assert result.exit_code == 1, result.output
    assert "BROKEN at entry 7 (truncated)" in flat(result.output)


async def test_verify_with_the_wrong_public_key(rig: Rig, tmp_path: Path) -> None:
    await rig.append(2)
    await rig.checkpoint()
    other = tmp_path / "other.key"
    AuditSigner.load_or_create(other)
    result = await csx(
        "audit", "verify", "--database-url", url(rig), "--public-key", str(AuditSigner.public_path(other))
    )
    assert result.exit_code == 1, result.output
    assert "unknown_key" in result.output


async def test_verify_cannot_check(rig: Rig, tmp_path: Path) -> None:
    pub = str(AuditSigner.public_path(tmp_path / "audit-signing.key"))
    result = await csx("audit", "verify", "--database-url", url(rig), "--public-key", str(tmp_path / "nope.pub"))
    assert result.exit_code == 2, result.output
    (tmp_path / "garbage.pub").write_text("not a key")
    result = await csx("audit", "verify", "--database-url", url(rig), "--public-key", str(tmp_path / "garbage.pub"))
    assert result.exit_code == 2, result.output
    missing = tmp_path / "missing.db"
    result = await csx("audit", "verify", "--database-url", f"sqlite+aiosqlite:///{missing}", "--public-key", pub)
    assert result.exit_code == 2 and not missing.exists(), result.output
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    result = await csx("audit", "verify", "--database-url", f"sqlite+aiosqlite:///{empty}", "--public-key", pub)
    assert result.exit_code == 2, result.output
    assert "cannot read the audit tables" in flat(result.output)


async def test_child_history(rig: Rig) -> None:
    await rig.append(6)
    result = await csx("audit", "child", CHILDREN[0], "--database-url", url(rig))
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"Audit history of child {CHILDREN[0]}" in out and "3 entries" in out
    assert "usr-police-0" in out and "police" in out and "child.date_of_birth" in out
    assert "ref-0001" not in out  # an entry about the other child
    result = await csx("audit", "child", CHILDREN[1], "--database-url", url(rig), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["seq"] for r in rows] == [2, 4, 6]
    assert rows[0]["field_names"] == ["actions[1].description", "child.date_of_birth", "concern.narrative"]
    assert rows[0]["at"].endswith("Z")
    result = await csx("audit", "child", "chd-nobody", "--database-url", url(rig))
    assert result.exit_code == 0 and "no audit entries" in result.output


async def test_keygen_checkpoint_verify(rig: Rig, tmp_path: Path) -> None:
    await rig.append(3)
    key = tmp_path / "ops" / "audit.key"
    result = await csx("audit", "keygen", str(key))
    assert result.exit_code == 0 and "new key" in result.output, result.output
    result = await csx("audit", "keygen", str(key))
    assert result.exit_code == 0 and "existing key" in result.output, result.output
    result = await csx("audit", "checkpoint", "--database-url", url(rig), "--signing-key", str(key), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["seq"] == 3
    result = await csx("audit", "verify", "--database-url", url(rig), "--public-key", str(AuditSigner.public_path(key)))
    assert result.exit_code == 0, result.output
    assert "1 signed checkpoints" in flat(result.output)
