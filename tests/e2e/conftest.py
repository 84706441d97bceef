"""The whole system as `make run` starts it, shared by the end-to-end modules: nats-server plus the
four service processes, on SQLite (and on PostgreSQL where a URL is configured), started once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from csx_cli import conference_flow
from csx_cli.stack import Stack, StackConfig
from tests.conftest import POSTGRES_URL
from tests.support import user, user_channel

MANAGER = user("social_care", "mash_manager", "conference_participation", "manager.e2e")


async def hold(stack, conferences, chair, conference, key: str):  # type: ignore[no-untyped-def]
    """The conference arranged with `chair` (registered first) and a quorate meeting recorded: HELD."""
    from csx.conferences.v1 import conferences_pb2_grpc

    async with user_channel(stack.addresses["conferences"], MANAGER, stack.pki) as channel:
        manager = conferences_pb2_grpc.ConferencesServiceStub(channel)
        await conference_flow.register_chair(manager, chair.user_id)
        return await conference_flow.hold(manager, conferences, conference, key=key, chair_id=chair.user_id)


BACKENDS = ["sqlite", "postgres"] if POSTGRES_URL else ["sqlite"]


@pytest.fixture(scope="package", params=BACKENDS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp(f"stack-{request.param}")
    urls: dict[str, str] = {}
    created: list[str] = []
    if request.param == "postgres":
        import asyncio
        import uuid

        from sqlalchemy.engine.url import make_url

        from tests.conftest import _admin

        for name in ("referrals", "panel", "conferences", "actionplans"):
            db_name = f"csx_e2e_{name}_{uuid.uuid4().hex[:8]}"
            asyncio.run(_admin(f'CREATE DATABASE "{db_name}"'))
            created.append(db_name)
            urls[name] = make_url(POSTGRES_URL).set(database=db_name).render_as_string(hide_password=False)
    config = StackConfig(
        data_dir=data_dir,
        base_port=0,
        nats_port=0,
        trace_file=str(data_dir / "spans.jsonl"),
        database_urls=urls,
        log_level="INFO",
        # Sign audit checkpoints every second so the tests see them.
        env={
            f"CSX_{name.upper()}_AUDIT_CHECKPOINT_SECONDS": "1" for name in ("referrals", "conferences", "actionplans")
        },
    )
    with Stack(config) as running:
        yield running
    if created:
        import asyncio

        from tests.conftest import _admin

        for db_name in created:
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


def csx(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for name, address in stack.addresses.items():
        env[f"CSX_{name.upper()}_ADDRESS"] = address
    env["CSX_NATS_URL"] = stack.nats_url
    env["CSX_PKI_DIR"] = str(stack.pki.root)
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "csx_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
