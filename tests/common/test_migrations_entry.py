"""`python -m csx_<name>.migrate`, the deployment's migration step, as an operator runs it."""

from __future__ import annotations

import importlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from csx_common.migrations import main

SERVICES = ("referrals", "panel", "conferences", "actionplans")


@pytest.mark.parametrize("service", SERVICES)
def test_migrate_brings_each_database_to_head_idempotently(
    service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / f"{service}.db"
    monkeypatch.setenv(f"CSX_{service.upper()}_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
    migrations = Path(importlib.import_module(f"csx_{service}.migrate").__file__).parent / "migrations"  # type: ignore[arg-type]
    main(service, migrations)
    main(service, migrations)  # a second run is a no-op
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"alembic_version", "outbox", "inbox", "dead_letters"} <= tables


def test_module_entry_point_and_missing_setting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSX_PANEL_")}
    missing = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "csx_panel.migrate"], env=env, capture_output=True, text=True, check=False
    )
    assert missing.returncode != 0 and "CSX_PANEL_DATABASE_URL" in missing.stderr
    env["CSX_PANEL_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'panel.db'}"
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "csx_panel.migrate"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
