"""Failpoints: crash the process at a named point, so the chaos tests (tests/chaos) can put a
crash exactly where a real one would hurt most, e.g. after a commit and before the publish or ack
that follows it. Off unless FAILPOINTS names them (a setting; never set in a deployment); then
`hit(name)` ends the process at once, as SIGKILL would: no cleanup, no flush, exit status 86.

The points: `relay.before_publish` (events committed, not yet published), `relay.before_mark`
(published, not yet marked published), `consumer.before_ack` (effect committed, not acknowledged).
"""

from __future__ import annotations

import os

EXIT_STATUS = 86
_armed: frozenset[str] = frozenset()


def arm(spec: str) -> None:
    """Arm the comma-separated failpoints in `spec` (the composition root does this once)."""
    global _armed
    _armed = frozenset(p.strip() for p in spec.split(",") if p.strip())


def hit(name: str) -> None:
    if name in _armed:
        os._exit(EXIT_STATUS)
