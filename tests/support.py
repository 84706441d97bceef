"""Helpers for tests that run a service in-process with real gRPC, NATS and databases."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from csx.referrals.v1 import referrals_pb2 as rpb

VALID_NHS = "9434765919"


def concern_request(key: str, **overrides: object) -> rpb.SubmitConcernRequest:
    req = rpb.SubmitConcernRequest(
        idempotency_key=key,
        agency=3,  # AGENCY_EDUCATION
        agency_reference=f"EDU-{key}",
        referrer=rpb.Referrer(
            name="Canary Referrer", role="Designated safeguarding lead", email="dsl@school.example"
        ),
        child=rpb.ChildIdentity(
            nhs_number=VALID_NHS,
            given_name="Canarygiven",
            family_name="Canaryfamily",
            date_of_birth="2010-05-17",
        ),
        harm_types=[2],
        contexts=[{"place_id": "plc-riverside-park", "context_type": 3}],
        narrative="CANARY-NARRATIVE seen with older youths near the station",
    )
    for name, value in overrides.items():
        if isinstance(value, dict):
            getattr(req, name).Clear()
            for k, v in value.items():
                setattr(getattr(req, name), k, v)
        else:
            setattr(req, name, value)  # type: ignore[arg-type]
    return req


async def eventually(
    check: Callable[[], Awaitable[bool]],
    within: float = 15.0,
    every: float = 0.05,
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(every)


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits.extend(f"{path}: {n!r}" for n in needles if n in data)
    return hits
