"""Run an alembic command for one service: `python tools/migrations.py referrals check`.

Each service's migrations live in services/<name>/src/csx_<name>/migrations; the database URL comes
from the service's own setting (CSX_<NAME>_DATABASE_URL), defaulting to a scratch SQLite file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from alembic import command

from csx_common.migrations import alembic_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    service, verb, *args = sys.argv[1:]
    url = os.environ.get(
        f"CSX_{service.upper()}_DATABASE_URL", f"sqlite+aiosqlite:///{ROOT}/build/alembic-{service}.db"
    )
    cfg = alembic_config(ROOT / "services" / service / "src" / f"csx_{service}" / "migrations", url)
    if verb == "revision":
        command.upgrade(cfg, "head")
        command.revision(cfg, message=args[0], autogenerate=True)
    elif verb == "check":
        command.upgrade(cfg, "head")
        command.check(cfg)
    else:
        getattr(command, verb)(cfg, *args)


if __name__ == "__main__":
    main()
